"""The on-disk layout of a store: where everything lives and what its bytes mean.

A store is a directory holding ``db/``, one RocksDB database opened through rocksdict in raw mode
(RocksDB's own compression off: block payloads are already zstd-compressed when that helps).

Column families, key layout and values (sizes in bytes):

``meta``       b"format_version" -> u32 BE             (FORMAT_VERSION of the writer)
               b"journal_seq"    -> u64 BE             (seq of the last catalog-journal record this
                                                        database applied; see cachepoint/store/journal.py)
               b"store_id"       -> 16 random bytes    (names this store in logs and peers)
               b"prefilter_seed" -> u64 BE             (per-store secret seed of the xxh3 pre-filter)
               b"scrub"          -> JSON {"format", "last", "current", "armed_ns"}: the last finished
                                    scrub's result, the pass in progress (cursor, counters, bad blocks
                                    found so far, so an interrupted pass resumes), and when scheduled
                                    scrubs started (see cachepoint/store/scrub.py). Store-local.
               b"migrated_from"  -> JSON {"store_id", "from", "at"} (a coordinator's catalog in PostgreSQL
                                    only: the embedded store `migrate` copied it from; see
                                    coordinator/backends/embedded_to_shared.py)
``blocks``     digest[32]        -> codec[1] payload   (codec 0 raw, 1 zstd, 2 lz4: see cachepoint/blocks.py)
``manifests``  digest[32]        -> codec[1] payload   (a serialized cachepoint.v1.Manifest; the digest
                                                        is SHA-256 of the uncompressed serialization)
``layers``     name (utf-8)      -> JSON {"kind", "latest", "created_ns"}
``versions``   name 0x00 number[u64 BE] -> serialized cachepoint.v1.VersionInfo
``tags``       name 0x00 tag     -> number[u64 BE]
``tag_log``    name 0x00 tag 0x00 seq[u64 BE] -> serialized cachepoint.v1.TagMove (every move, kept)
``prefilter``  manifest digest[32] entry index[u32 BE] -> xxh3-128 digests[16 per block]
               Derived, store-local state: the xxh3 of every block of each file, seeded with this
               store's secret, so a re-ingest skips unchanged blocks. Rebuildable from the blocks.
``units``      chunk id[32]      -> unit size[u32 BE] xxh3-128 digests[16 per unit] (content chunks: the
               seed-0 xxh3-128 of each unit, what a pull matches a new chunk's units against; see
               cachepoint/store/units.py). Derived, store-local: written as chunks arrive, made from a
               chunk's bytes when a pull needs it and absent, deleted with the chunk.
``ingests``    ingest id[16]     -> JSON {"layer", "pid", "started_ns"}: an ingest in progress.
               Written before its first block and deleted in the batch that commits its version,
               so a record left behind names an ingest that was interrupted.
``images``     name (utf-8)      -> JSON {"refs": [...], "created_ns"}
``events``     position[u64 BE]  -> serialized cachepoint.v1.CatalogEvent (the coordinator's catalog
               log, written in the same batch as the change it records; positions start at 1)
``commit_ids`` commit id (utf-8)  -> layer 0x00 number[u64 BE] (coordinator: commits already made, so a
               retried commit returns its version instead of making a second one)
``working``    0x00 "working-disk" 0x00 disk -> JSON {"layer", "base", "block_size", "created_ns"}
               0x00 "working" 0x00 disk 0x00 index[u64 BE] -> digest[32] (an attached disk's writes
               since its last snapshot; GC keeps every block named here; see cachepoint/disk/working.py)
``pushed``     layer 0x00 local number[u64 BE] -> JSON {"number", "pushed_ns"} (cachepoint: which local
               versions the coordinator has, under which number; a local user/ version without a record
               is in the outbox)
``file_classes`` manifest digest[32] -> class code[1] per manifest entry (0 none, 1 apps, 2 config,
               3 data; see cachepoint/capture/classify.py). Derived, store-local: rebuildable from the
               entries' names and first blocks, and rebuilt so when a version has no record.
``capture_index`` layer (utf-8)  -> codec[1] payload: the stat index of the layer's last file-level capture
               (cachepoint/capture/index.py): the manifest it describes, the captured directory, and
               per entry inode, device and ctime, so a re-capture does not open unchanged files.
               Derived, store-local: without it a capture reads every file (the pre-filter still
               skips unchanged blocks).
``audit``      seq[u64 BE]       -> canonical JSON of one audit record (coordinator: every admin action,
               hash-chained, append-only; seqs start at 1; see coordinator/history/audit.py)
``holds``      user (utf-8)      -> JSON {"format", "user", "reason", "actor", "set_ns"} (coordinator: a
               legal hold; while it exists no version of user/USER/... and none of its blocks is deleted)

Column families added within format 1 (``events``, ``commit_ids``, ``pushed``, ``working``, ``audit``,
``holds``, ``file_classes``, ``capture_index``, ``units``) are created when a store is opened for writing; a
read-only open of a store that predates them sees them as empty.

Durability: blocks are written with RocksDB's WAL off (it would write every block twice), then the
``blocks`` family is flushed to SST files, and only then is the version committed in one synced,
WAL-logged WriteBatch (manifest + version + layer + tags + ingest record removal). A crash at any
moment therefore leaves the old state or the new one, never a version whose blocks are missing.
Blocks received from other nodes are written with the WAL on instead, so that a pull killed midway
keeps every batch it had stored and resumes after it.
"""

from __future__ import annotations

import struct

FORMAT_VERSION = 1
SUPPORTED_VERSIONS = frozenset({1})

CF_META = "meta"
CF_BLOCKS = "blocks"
CF_MANIFESTS = "manifests"
CF_LAYERS = "layers"
CF_VERSIONS = "versions"
CF_TAGS = "tags"
CF_TAG_LOG = "tag_log"
CF_PREFILTER = "prefilter"
CF_INGESTS = "ingests"
CF_IMAGES = "images"
CF_EVENTS = "events"
CF_COMMIT_IDS = "commit_ids"
CF_PUSHED = "pushed"
CF_WORKING = "working"
CF_FILE_CLASSES = "file_classes"
CF_CAPTURE_INDEX = "capture_index"
CF_AUDIT = "audit"
CF_HOLDS = "holds"
CF_UNITS = "units"
WORKING_HEADER_PREFIX = b"\x00working-disk\x00"
WORKING_ENTRY_PREFIX = b"\x00working\x00"
COLUMN_FAMILIES = (
    CF_META,
    CF_BLOCKS,
    CF_MANIFESTS,
    CF_LAYERS,
    CF_VERSIONS,
    CF_TAGS,
    CF_TAG_LOG,
    CF_PREFILTER,
    CF_INGESTS,
    CF_IMAGES,
    CF_EVENTS,
    CF_COMMIT_IDS,
    CF_PUSHED,
    CF_WORKING,
    CF_FILE_CLASSES,
    CF_CAPTURE_INDEX,
    CF_AUDIT,
    CF_HOLDS,
    CF_UNITS,
)

META_FORMAT_VERSION = b"format_version"
META_STORE_ID = b"store_id"
META_PREFILTER_SEED = b"prefilter_seed"
META_JOURNAL_SEQ = b"journal_seq"
# Where the journal record after ``journal_seq`` starts: (journal file's inode u64, offset u64). A
# writable open scans the journal from there instead of from its start; the inode tells a checkpoint's
# new file (whose offsets differ) from the file the offset was taken in.
META_JOURNAL_END = b"journal_end"

# Families whose every write is also appended to the catalog journal (cachepoint/store/journal.py),
# so that repair can rebuild them. The others are bulk data (blocks: verified by their ids and
# re-fetchable), derived state (prefilter, file_classes, capture_index, units: rebuildable), transient
# records (ingests) or an attached disk's map since its last snapshot (working: written at every
# FLUSH, so journaling it would double the cost of a guest's fsync; a snapshot bounds what it holds).
JOURNALED_FAMILIES = frozenset(
    {
        CF_META,
        CF_MANIFESTS,
        CF_LAYERS,
        CF_VERSIONS,
        CF_TAGS,
        CF_TAG_LOG,
        CF_IMAGES,
        CF_EVENTS,
        CF_COMMIT_IDS,
        CF_PUSHED,
        CF_AUDIT,
        CF_HOLDS,
    }
)
META_SCRUB = b"scrub"
# Meta keys that are the database's own bookkeeping, not catalog content (the scrub record is
# rewritten every few seconds while a scrub runs: journaling it would cost an fsync each time).
UNJOURNALED_META = frozenset({META_JOURNAL_SEQ, META_JOURNAL_END, META_SCRUB})

SEP = b"\x00"
PREFILTER_DIGEST_SIZE = 16

_U64 = struct.Struct(">Q")
_U32 = struct.Struct(">I")


def u64(value: int) -> bytes:
    return _U64.pack(value)


def read_u64(raw: bytes) -> int:
    return _U64.unpack(raw)[0]


def u32(value: int) -> bytes:
    return _U32.pack(value)


def read_u32(raw: bytes) -> int:
    return _U32.unpack(raw)[0]


def layer_prefix(layer: str) -> bytes:
    return layer.encode() + SEP


def version_key(layer: str, number: int) -> bytes:
    return layer_prefix(layer) + u64(number)


def split_version_key(key: bytes) -> tuple[str, int]:
    return key[:-9].decode(), read_u64(key[-8:])


def tag_key(layer: str, tag: str) -> bytes:
    return layer_prefix(layer) + tag.encode()


def tag_log_key(layer: str, tag: str, seq: int) -> bytes:
    return tag_key(layer, tag) + SEP + u64(seq)


def prefilter_key(manifest_digest: bytes, entry_index: int) -> bytes:
    return manifest_digest + u32(entry_index)
