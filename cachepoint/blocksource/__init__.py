"""Where a reader's blocks come from: one interface, ``BlockSource``, and sources that wrap others.

A reader (a composite disk, the HTTP reader, export, the coordinator's history, the FetchBlocks
server) asks one source for the blocks it needs and never branches on where they are. Sources compose
as a chain of wrappers, as in desync: a decoded cache over any source (``CachedSource``), the local
store (``StoreSource``), the fleet fetched nearest first (``TieredSource``), and a write-back that
keeps what a remote source gave in the local store (``WriteBack``). A lazily booted disk reads
``CachedSource(WriteBack(StoreSource(store), TieredSource(...)), cache)``; a disk of local versions
``CachedSource(StoreSource(store), cache)``.

The error contract, for every source:
- a block the source cannot give is *missing*: absent from ``get_many``'s answer (the caller asks
  the next source, or raises BlockMissing naming it);
- a block it holds but cannot read is an *error*, never "missing": BlockUnreadable (RocksDB's own
  checksums refused the record) or BlockCorrupt (the value cannot be decoded, or bytes from another
  machine do not hash to their id). A wrapper lets these through; it never falls back to another
  source on them, so damage is seen where it is and repaired by scrub and heal, not hidden.

Verified once: SHA-256 checks a block when it enters the store (ingest) and when it arrives from
another machine (``TieredSource``, PushBlocks). Reads of the local store do not hash again: RocksDB's
checksums catch damage at rest, and the scrub hashes every stored block on a schedule.

Ownership: this package owns the read path from a block id to its bytes; the store (``BlockStore``)
owns the records, ``cachepoint/replication/fetcher.py`` the streams to other machines, and
``cachepoint/disk/readcache.py`` the cache file. Sources are blocking (RocksDB, zstd, preadv) and
thread-safe: async callers run them in worker threads.
"""

from cachepoint.blocksource.base import BlockSource, Target
from cachepoint.blocksource.cached import CachedSource, MemoryCache
from cachepoint.blocksource.local import StoreSource, VerifiedSource, as_source
from cachepoint.blocksource.remote import TieredSource
from cachepoint.blocksource.writeback import WriteBack

__all__ = [
    "BlockSource",
    "CachedSource",
    "MemoryCache",
    "StoreSource",
    "Target",
    "VerifiedSource",
    "TieredSource",
    "WriteBack",
    "as_source",
]
