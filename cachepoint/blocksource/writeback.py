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
from collections.abc import Sequence

from cachepoint.blocksource.base import BlockSource
from cachepoint.blocksource.local import StoreSource


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

    def get_many(self, ids: Sequence[bytes], *, also: Sequence[bytes] = ()) -> dict[bytes, bytes]:
        found = self.local.get_many(ids)
        missing = [digest for digest in dict.fromkeys(ids) if digest not in found]
        if missing:
            self._fill(missing, also)
            found.update(self.local.get_many(missing))
        return found

    def get_views(
        self, ids: Sequence[bytes], *, also: Sequence[bytes] = ()
    ) -> dict[bytes, bytes | memoryview]:
        found = self.local.get_views(ids)
        missing = [digest for digest in dict.fromkeys(ids) if digest not in found]
        if missing:
            self._fill(missing, also)
            found.update(self.local.get_views(missing))
        return found

    def stored_many(self, ids: Sequence[bytes]) -> dict[bytes, bytes]:
        found = self.local.stored_many(ids)
        missing = [digest for digest in dict.fromkeys(ids) if digest not in found]
        if missing:
            self._fill(missing, ())
            found.update(self.local.stored_many(missing))
        return found

    def close(self) -> None:
        self.remote.close()
