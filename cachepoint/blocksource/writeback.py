"""A write-back: the local store first; what it lacks is fetched from a remote source and kept.

A lazily booted disk reads through one of these: a cold read fetches the blocks it needs (and the
readahead its caller names in ``also``) in one trip, writes them into the store with the WAL on
(a daemon killed a moment later keeps them), and reads them back from there. One fetch at a time:
readers run in parallel, and two of them must not both fetch the blocks (or the readahead) they
share; a reader that waited finds what the other fetched already here. GC must not take what was
fetched while no local version names it: the caller pins those ids (cachepoint/disk/exports.py).
The remote's values go into the store as they are, so it must give only verified ones (TieredSource's
were checked against their ids as they arrived).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

from cachepoint.blocksource.base import BlockSource
from cachepoint.blocksource.local import StoreSource

Value = TypeVar("Value", bytes, bytes | memoryview)


class WriteBack(BlockSource):
    far = True

    def __init__(self, local: StoreSource, remote: BlockSource) -> None:
        self.local = local
        self.remote = remote
        self.fetched = 0  # blocks fetched from the remote source, readahead included
        self._fetching = threading.Lock()

    def _fill(self, missing: list[bytes], also: Sequence[bytes]) -> None:
        with self._fetching:
            missing = self.local.lacking(missing)
            if not missing:
                return
            asked = set(missing)
            ahead = self.local.lacking([d for d in dict.fromkeys(also) if d not in asked])
            got = self.remote.stored_many(missing + ahead)
            if got:
                self.local.keep(got)
                self.fetched += len(got)

    def _through(
        self,
        read: Callable[[Sequence[bytes]], dict[bytes, Value]],
        ids: Sequence[bytes],
        also: Sequence[bytes],
    ) -> dict[bytes, Value]:
        """``read`` of the local store, after fetching what it lacks (and ``also``) from the remote."""
        found = read(ids)
        missing = [digest for digest in dict.fromkeys(ids) if digest not in found]
        if missing:
            self._fill(missing, also)
            found.update(read(missing))
        return found

    def get_many(self, ids: Sequence[bytes], *, also: Sequence[bytes] = ()) -> dict[bytes, bytes]:
        return self._through(self.local.get_many, ids, also)

    def get_views(
        self, ids: Sequence[bytes], *, also: Sequence[bytes] = ()
    ) -> dict[bytes, bytes | memoryview]:
        return self._through(self.local.get_views, ids, also)

    def stored_many(self, ids: Sequence[bytes]) -> dict[bytes, bytes]:
        return self._through(self.local.stored_many, ids, ())

    def close(self) -> None:
        self.remote.close()
