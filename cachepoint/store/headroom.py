"""The store's reserve: a preallocated file, ``STORE/reserve``, that holds disk space back so that the
commands that give space back (``gc``, ``repair``, deleting versions) can still run on a full disk.

On a 100% full file system RocksDB cannot even open a database for writing (it writes a new OPTIONS
file, an info LOG, a MANIFEST and replays the WAL into an SST file), let alone log the tombstones of a
GC. ``with headroom(store_root):`` deletes the reserve for the duration of such a command and creates
it again afterwards when space allows::

    with headroom(store_root, reserve_bytes):
        with Store.open(store_root, writable=True) as store:
            ...  # writes that free space

Size: ``reserve`` in the settings (default 64 MiB), but no more than 1% of the file system nor more
than the database itself takes (a GC's compaction rewrites at most that much), and at least 1 MiB
(opening the database for writing takes about half of that) when the setting allows. So a large
store on a large disk holds 64 MiB back, a small file system keeps its space, and the many small
stores of a test run do not each take 64 MiB. It grows with the store at later writable opens. The
file is
written with real blocks (``posix_fallocate``, which writes zeros where a file system cannot
preallocate), never sparse: a sparse file would hold nothing back. It is (re)created only while at
least as much again stays free, so making it never fills a disk by itself; on a disk that is already
full it waits for the next writable open or the end of the next ``headroom``. On copy-on-write file
systems with snapshots (btrfs, ZFS) deleting a file may free nothing: there the reserve does not help.

Releases nest: inside one process, only the outermost ``headroom`` of a store re-creates the reserve.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from cachepoint.store.space import file_system

log = logging.getLogger("cachepoint.store")

RESERVE_FILE = "reserve"
DEFAULT_RESERVE = 64 << 20
MAX_SHARE = 100  # the reserve is at most 1/MAX_SHARE of the file system and the database's size...
MIN_SIZE = 1 << 20  # ...but may take this much however small they are
_ALIGN = 4096

_lock = threading.Lock()
_released: dict[Path, int] = {}  # store root -> how many headrooms of this process hold it released


def reserve_path(root: Path) -> Path:
    return Path(root) / RESERVE_FILE


def database_bytes(root: Path) -> int:
    """What the store's RocksDB files take (their sizes; the directory is flat)."""
    total = 0
    try:
        with os.scandir(Path(root) / "db") as entries:
            for entry in entries:
                with contextlib.suppress(OSError):
                    total += entry.stat(follow_symlinks=False).st_size
    except OSError:
        return 0
    return total


def reserve_size(root: Path, configured: int) -> int:
    """The reserve's size for a store at ``root`` with ``reserve = configured`` in the settings."""
    if configured <= 0:
        return 0
    total, _ = file_system(Path(root))
    scale = min(total // MAX_SHARE, database_bytes(root))
    return min(configured, max(scale, MIN_SIZE)) // _ALIGN * _ALIGN


def reserve_on_disk(root: Path) -> int:
    """Bytes the reserve really holds now (allocated blocks, so a sparse file counts for what it is)."""
    try:
        st = reserve_path(root).stat()
    except OSError:
        return 0
    return min(st.st_size, st.st_blocks * 512)


def _sync_dir(path: Path) -> None:
    # ext4 makes a deleted file's blocks reusable only once the journal commits its removal.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_reserve(root: Path, configured: int = DEFAULT_RESERVE) -> int:
    """Create or resize the reserve when space allows; returns the bytes it holds now. Never raises
    for lack of space: a reserve that cannot be made now is made by a later call."""
    root = Path(root)
    if not root.is_dir():
        return 0
    with _lock:
        if _released.get(root):
            return 0  # a headroom of this process has it released: its end re-creates it
        path = reserve_path(root)
        target = reserve_size(root, configured)
        held = reserve_on_disk(root)
        if held == target and (target == 0 or path.stat().st_size == target):
            return held
        if target == 0:
            path.unlink(missing_ok=True)
            return 0
        if target < held:
            os.truncate(path, target)
            return target
        _, free = file_system(root)
        if free - (target - held) < target:
            return held
        try:
            fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
        except OSError as err:
            log.warning("cannot create the reserve %s: %s", path, err)
            return held
        try:
            os.posix_fallocate(fd, 0, target)
            os.fsync(fd)
        except OSError as err:
            # Out of space in the meantime, or a file system that refuses: give back what was taken.
            with contextlib.suppress(OSError):
                os.ftruncate(fd, held)
            if err.errno not in (errno.ENOSPC, errno.EDQUOT):
                log.warning("cannot preallocate the reserve %s: %s", path, err)
            return reserve_on_disk(root)
        finally:
            os.close(fd)
        return reserve_on_disk(root)


def release_reserve(root: Path) -> int:
    """Delete the reserve now; returns the bytes it held."""
    path = reserve_path(root)
    held = reserve_on_disk(root)
    try:
        path.unlink()
    except FileNotFoundError:
        return 0
    _sync_dir(Path(root))
    return held


@contextlib.contextmanager
def headroom(root: Path | str, configured: int = DEFAULT_RESERVE) -> Iterator[int]:
    """Release the store's reserve for the duration; yields the bytes released (0 when there was none
    or an enclosing headroom already released it). Afterwards the outermost headroom re-creates it at
    ``configured`` bytes (see ``reserve_size``) when space allows."""
    root = Path(root)
    with _lock:
        outermost = not _released.get(root)
        _released[root] = _released.get(root, 0) + 1
    released = release_reserve(root) if outermost else 0
    if released:
        log.info("released the %d-byte reserve of %s", released, root)
    try:
        yield released
    finally:
        with _lock:
            _released[root] -= 1
            if not _released[root]:
                del _released[root]
        if outermost:
            try:
                ensure_reserve(root, configured)
            except OSError as err:  # the reserve is a safety margin: its absence must not fail the work
                log.warning("could not re-create the reserve of %s: %s", root, err)
