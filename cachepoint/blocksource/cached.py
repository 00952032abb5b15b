"""A decoded cache over any source: blocks a reader asked for are kept in plain form for the next read.

Two caches fit: the daemon's ``DecodedCache`` (cachepoint/disk/readcache.py: slots of a file the
kernel caches, shared by every disk and the HTTP reader) and ``MemoryCache`` (a small LRU in the
process, for a disk opened by a command). A cache holds only what its inner source gave, so it adds
no check of its own beyond the slot checksum that guards its file.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Protocol

from cachepoint.blocksource.base import BlockSource, Target, copy_block


class Cache(Protocol):
    def copy_many(self, wanted: list[Target], nowait: bool = False) -> list[int]:
        """Copy each cached block into its target; the positions not copied."""
        ...

    def get_many(self, ids: Sequence[bytes]) -> dict[bytes, bytes]: ...

    def holds_all(self, ids: Sequence[bytes]) -> bool:
        """Whether every id is cached (an index lookup each, no read)."""
        ...

    def put_many(self, blocks: Sequence[tuple[bytes, bytes | memoryview]]) -> None:
        """Keep copies of blocks (a block may be a view its caller does not keep)."""
        ...


class MemoryCache:
    """Decoded blocks by id (content never changes under an id), least recently used out."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._used = 0
        self._blocks: OrderedDict[bytes, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def copy_many(self, wanted: list[Target], nowait: bool = False) -> list[int]:
        missing = []
        with self._lock:
            for position, (digest, target) in enumerate(wanted):
                data = self._blocks.get(digest)
                if data is None:
                    missing.append(position)
                    continue
                self._blocks.move_to_end(digest)
                copy_block(data, target)
        return missing

    def get_many(self, ids: Sequence[bytes]) -> dict[bytes, bytes]:
        with self._lock:
            return {digest: data for digest in ids if (data := self._blocks.get(digest)) is not None}

    def holds_all(self, ids: Sequence[bytes]) -> bool:
        blocks = self._blocks
        return all(digest in blocks for digest in ids)

    def put_many(self, blocks: Sequence[tuple[bytes, bytes | memoryview]]) -> None:
        with self._lock:
            for digest, data in blocks:
                if digest in self._blocks or len(data) > self._capacity:
                    continue
                self._blocks[digest] = bytes(data)  # a view would keep its whole batch alive
                self._used += len(data)
                while self._used > self._capacity:
                    _, dropped = self._blocks.popitem(last=False)
                    self._used -= len(dropped)


class CachedSource(BlockSource):
    def __init__(self, inner: BlockSource, cache: Cache) -> None:
        self.inner = inner
        self.cache = cache
        self.far = inner.far

    def read_into(
        self, wanted: Sequence[Target], *, nowait: bool = False, also: Sequence[bytes] = ()
    ) -> list[int]:
        wanted = list(wanted)
        missing = self.cache.copy_many(wanted, nowait=nowait)
        if not missing or nowait:
            return missing
        # Views (one buffer per batch): each is copied into its target and into the cache, never kept.
        found = self.inner.get_views(list(dict.fromkeys(wanted[p][0] for p in missing)), also=also)
        absent = []
        for position in missing:
            digest, target = wanted[position]
            data = found.get(digest)
            if data is None:
                absent.append(position)
                continue
            copy_block(data, target)
        # Together: the daemon's cache puts them in consecutive slots, read back with one preadv.
        self.cache.put_many(list(found.items()))
        return absent

    def get_many(self, ids: Sequence[bytes], *, also: Sequence[bytes] = ()) -> dict[bytes, bytes]:
        found = self.cache.get_many(ids)
        rest = [digest for digest in dict.fromkeys(ids) if digest not in found]
        if rest:
            fetched = self.inner.get_many(rest, also=also)
            self.cache.put_many(list(fetched.items()))
            found.update(fetched)
        return found

    def stored_many(self, ids: Sequence[bytes]) -> dict[bytes, bytes]:
        return self.inner.stored_many(ids)

    def holds_all(self, ids: Sequence[bytes]) -> bool:
        return self.cache.holds_all(ids)

    def remember(self, blocks: Sequence[tuple[bytes, bytes]]) -> None:
        self.cache.put_many(list(blocks))
