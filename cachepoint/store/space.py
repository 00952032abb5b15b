"""Room on a store's file system: how much new data it can still take, and limits such as ``min_free``
written as a size ("2G") or as a share of the file system ("5%").

Free space is what ``statvfs`` offers an unprivileged writer (``f_bavail``), minus two things that are
already spoken for: the bytes in the blocks family's memtables, which a flush will write again as SST
files (blocks received from peers sit in the WAL *and* in a memtable until then: counting them once
would let a full memtable's flush run the disk out of space, and a flush that fails for space leaves
RocksDB refusing every write until the store is reopened), and the part of the store's reserve
(cachepoint/store/headroom.py) that is not on disk right now (released for a GC, or never created).
The other families' memtables hold kilobytes and are left out: RocksDB reports each non-empty one as
at least one arena block (1 MiB), which would overstate them a hundredfold.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from cachepoint.config import parse_byte_size
from cachepoint.errors import InvalidInput
from cachepoint.store import format as fmt
from cachepoint.store.store import Store

TOMBSTONE_BYTES = 128  # what one deletion takes in an SST file, rounded up (key, sequence, type, index)
_PERCENT_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*$")


@dataclass(frozen=True, slots=True)
class SpaceLimit:
    """A number of bytes, either absolute or a share of the file system it applies to."""

    text: str
    absolute: int = 0
    percent: float = 0.0

    @classmethod
    def parse(cls, text: str, what: str) -> SpaceLimit:
        match = _PERCENT_RE.match(text)
        if match:
            percent = float(match.group(1))
            if percent >= 100:
                raise InvalidInput(f"{what} {text!r}: a share of the file system must be below 100%")
            return cls(text.strip(), percent=percent)
        try:
            return cls(text.strip(), absolute=parse_byte_size(text, what))
        except InvalidInput:
            raise InvalidInput(
                f"{what} {text!r}: write a size like 2G or 512M, or a share of the file system like 5%"
            ) from None

    def of(self, total: int) -> int:
        """The limit in bytes on a file system of ``total`` bytes."""
        return int(total * self.percent / 100) if self.percent else self.absolute

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True, slots=True)
class Room:
    total: int  # size of the file system
    free: int  # what statvfs says an unprivileged writer may still write
    unflushed: int  # memtable bytes RocksDB will write again when it flushes them
    reserve_missing: int  # the part of the store's reserve not on disk now

    @property
    def available(self) -> int:
        """What new data may still take without eating into the reserve or a pending flush."""
        return max(self.free - self.unflushed - self.reserve_missing, 0)


def file_system(path: Path) -> tuple[int, int]:
    """(size, free bytes for an unprivileged writer) of the file system holding ``path``."""
    st = os.statvfs(path)
    return st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize


def unflushed_bytes(store: Store) -> int:
    """What flushing the blocks family's memtables will write: RocksDB's memory accounting (allocated
    arena blocks, so up to 1 MiB more than the data), or, when they hold only deletions (a GC's), the
    tombstones' size."""
    cf = store.db.cf.get(fmt.CF_BLOCKS)
    if cf is None:
        return 0

    def prop(name: str) -> int:
        return int(cf.property_int_value(f"rocksdb.{name}") or 0)

    entries = prop("num-entries-active-mem-table") + prop("num-entries-imm-mem-tables")
    deletes = prop("num-deletes-active-mem-table") + prop("num-deletes-imm-mem-tables")
    if entries == deletes:
        return deletes * TOMBSTONE_BYTES
    return prop("cur-size-all-mem-tables")


def measure(store: Store, reserve_target: int) -> Room:
    from cachepoint.store.headroom import reserve_on_disk

    total, free = file_system(store.root)
    missing = max(reserve_target - reserve_on_disk(store.root), 0)
    return Room(total, free, unflushed_bytes(store), missing)
