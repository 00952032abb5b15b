"""The BlockSource interface (the contract is in the package docstring)."""

from __future__ import annotations

import abc
from collections.abc import Sequence

from cachepoint.blocks import zeros
from cachepoint.errors import BlockMissing
from cachepoint.ids import BlockId

Target = tuple[bytes, memoryview]  # a block id and where its bytes go (a block's extent in a buffer)


def copy_block(data: bytes | memoryview, target: memoryview) -> None:
    """A block's bytes into the start of its target, and zeros after them when the block is shorter
    (a layer's short last block under a longer one of the disk): the target may be a reply buffer
    used again, which holds the bytes of an earlier read."""
    n = min(len(data), len(target))
    target[:n] = memoryview(data)[:n]
    zero_after(target, n)


def zero_after(target: memoryview, n: int) -> None:
    """Zeros in ``target`` after its first ``n`` bytes (the block that filled them was shorter)."""
    if n < len(target):
        target[n:] = zeros(len(target) - n)


class BlockSource(abc.ABC):
    far = False
    """A miss may cost a round trip to another machine: callers name their readahead in ``also``."""

    @abc.abstractmethod
    def get_many(self, ids: Sequence[bytes], *, also: Sequence[bytes] = ()) -> dict[bytes, bytes]:
        """The plain bytes of each id this source can give; an id it cannot give is absent (missing).
        ``also``: ids the caller expects to want next (a disk's readahead); a source that must go
        far for a missing id may fetch them in the same trip and keep them, never return them.

        Raises BlockUnreadable or BlockCorrupt naming a block it holds but cannot read."""

    def get_views(
        self, ids: Sequence[bytes], *, also: Sequence[bytes] = ()
    ) -> dict[bytes, bytes | memoryview]:
        """``get_many`` for a caller that copies each block at once and keeps none (a cache's read):
        a block may be a view into a buffer shared with the others."""
        return dict(self.get_many(ids, also=also))

    @abc.abstractmethod
    def stored_many(self, ids: Sequence[bytes]) -> dict[bytes, bytes]:
        """The stored values (codec byte + payload, cachepoint/blocks.py) of the ids this source can
        give, for sending to another machine as they are; absent where missing."""

    def read_into(
        self, wanted: Sequence[Target], *, nowait: bool = False, also: Sequence[bytes] = ()
    ) -> list[int]:
        """Copy each block into the start of its target (at most the target's length); returns the
        positions in ``wanted`` of blocks that are missing. ``nowait``: copy only what is in memory
        and return every other position, so that an event loop can try here before a thread.

        This default asks ``get_many``; a cache answers from its own memory without the copy."""
        if nowait or not wanted:
            return list(range(len(wanted)))
        found = self.get_many(list(dict.fromkeys(d for d, _ in wanted)), also=also)
        missing = []
        for position, (digest, target) in enumerate(wanted):
            data = found.get(digest)
            if data is None:
                missing.append(position)
                continue
            copy_block(data, target)
        return missing

    def holds_all(self, ids: Sequence[bytes]) -> bool:
        """Whether every block of ``ids`` is in this source's memory, asked before a buffer is made
        for them: only a cache can say yes (a read that would find some absent is not tried in a
        hurry only to be done again). True need not mean a read cannot miss (the page cache may
        have dropped a slot); False means one would."""
        return False

    def remember(self, blocks: Sequence[tuple[bytes, bytes]]) -> None:  # noqa: B027 - optional
        """Blocks the caller just made, each named by its own digest (a disk's copy-on-write): a
        source that caches may keep them. Others ignore them."""

    def close(self) -> None:  # noqa: B027 - optional
        """Release what the source holds (channels, cache files) once no reader uses it."""


def require(ids: Sequence[bytes], found: dict[bytes, bytes]) -> None:
    """For a reader whose blocks must all be there: BlockMissing naming the first that is not."""
    for digest in ids:
        if digest not in found:
            raise BlockMissing(BlockId(digest))
