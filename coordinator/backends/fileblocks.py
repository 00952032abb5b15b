"""Blocks as files in a directory every replica mounts (``blocks = "file:///..."``: NFS, CephFS or
GlusterFS in production): content-addressed, ``ab/cd/abcd…`` under the root (two levels of 256
directories: a few thousand files per directory at a billion blocks), each written to a temporary
name in its directory, synced and renamed, so a reader on any replica sees a whole block or none.
The stored bytes are the store's encoded values (cachepoint/blocks.py), as RocksDB holds them.

GC and pushes (the race of a commit whose blocks are pushed before its version exists): a sweep
removes only files older than the grace period (``block_grace``), and asking whether a block is here
(HasBlocks, before a push that then skips it) makes an older file young again. So a block a commit
in progress relies on is either young or is pushed again after the sweep.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from urllib.parse import unquote, urlparse

from cachepoint.blocks import decode_verified
from cachepoint.errors import BlockMissing, BlockUnreadable, InvalidInput, OutOfSpace
from cachepoint.ids import DIGEST_SIZE, BlockId
from cachepoint.store.db import is_no_space

DEFAULT_GRACE_S = 3600.0


def blocks_root(url: str) -> Path:
    """The directory of a ``file:///`` URL (absolute path only)."""
    parsed = urlparse(url)
    if parsed.scheme != "file" or parsed.netloc not in ("", "localhost") or not parsed.path.startswith("/"):
        raise InvalidInput(
            f"blocks = {url!r}: write a file URL of an absolute directory, e.g. file:///srv/blocks"
        )
    return Path(unquote(parsed.path))


class FileBlocks:
    """The BlockStore interface (cachepoint/store/blockstore.py) over files."""

    in_database = False  # no RocksDB compaction gives space back: unlinking does

    def __init__(self, root: Path, grace_s: float = DEFAULT_GRACE_S) -> None:
        self.root = Path(root)
        self.grace_s = grace_s
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise InvalidInput(f"blocks directory {self.root}: {err.strerror}") from err

    def path(self, digest: bytes) -> Path:
        name = digest.hex()
        return self.root / name[:2] / name[2:4] / name

    def has(self, digest: bytes) -> bool:
        path = self.path(digest)
        try:
            mtime = path.stat().st_mtime
        except FileNotFoundError:
            return False
        if time.time() - mtime > self.grace_s / 2:
            # Asked about: a push that skips it may be followed by a commit naming it (module docstring).
            try:
                os.utime(path)
            except FileNotFoundError:
                return False
        return True

    def missing(self, digests: Iterable[bytes]) -> list[bytes]:
        return [d for d in digests if not self.has(d)]

    def put_many(
        self,
        values: Iterable[tuple[bytes, bytes]],
        durable: bool = False,
        unit_records: Iterable[tuple[bytes, bytes]] = (),
    ) -> int:
        """Write encoded blocks (synced and renamed: every write here is durable). ``unit_records``
        are not kept: the shared store answers whole blocks."""
        written = 0
        directories: set[Path] = set()
        for digest, value in values:
            path = self.path(digest)
            if path.exists():
                os.utime(path)  # pushed again: young again (module docstring)
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
            try:
                with open(temporary, "wb") as out:
                    out.write(value)
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(temporary, path)
            except OSError as err:
                temporary.unlink(missing_ok=True)
                if is_no_space(err):
                    raise OutOfSpace(self.root, str(err)) from err
                raise
            directories.add(path.parent)
            written += len(value)
        for directory in directories:  # the renames themselves
            fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        return written

    def persist(self) -> None:
        """Nothing staged: ``put_many`` returns once the files are synced."""

    def raw(self, digest: bytes) -> bytes | None:
        try:
            return self.path(digest).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as err:
            raise BlockUnreadable(BlockId(digest), err) from err

    def raw_many(self, digests: list[bytes]) -> list[bytes | None]:
        return [self.raw(digest) for digest in digests]

    def read(self, digest: bytes) -> bytes:
        value = self.raw(digest)
        if value is None:
            raise BlockMissing(BlockId(digest))
        return decode_verified(digest, value)

    def delete_many(self, digests: Iterable[bytes], older_than: float | None = None) -> list[bytes]:
        """Unlink blocks; with ``older_than`` (a time.time()), only those not touched since. Returns
        those this call removed (not one another replica removed first)."""
        gone: list[bytes] = []
        for digest in digests:
            path = self.path(digest)
            try:
                if older_than is not None and path.stat().st_mtime >= older_than:
                    continue
                path.unlink()
                gone.append(digest)
            except FileNotFoundError:
                continue
        return gone

    def _names(self) -> Iterator[tuple[bytes, Path]]:
        for first in sorted(os.listdir(self.root)):
            level1 = self.root / first
            if len(first) != 2 or not level1.is_dir():
                continue
            for second in sorted(os.listdir(level1)):
                level2 = level1 / second
                if len(second) != 2 or not level2.is_dir():
                    continue
                for name in sorted(os.listdir(level2)):
                    if name.startswith(".") or len(name) != 2 * DIGEST_SIZE:
                        continue
                    try:
                        yield bytes.fromhex(name), level2 / name
                    except ValueError:
                        continue

    def scan_ids(self) -> Iterator[bytes]:
        return (digest for digest, _ in self._names())

    def scan(self) -> Iterator[tuple[bytes, bytes]]:
        for digest, path in self._names():
            try:
                yield digest, path.read_bytes()
            except FileNotFoundError:
                continue

    def scan_sizes(self) -> Iterator[tuple[bytes, int, float]]:
        """(id, stored size, modification time) of every block, without reading them."""
        for digest, path in self._names():
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            yield digest, st.st_size, st.st_mtime

    def scan_unchecked(self, after: bytes | None, limit: int) -> tuple[list[tuple[bytes, bytes]], str]:
        found: list[tuple[bytes, bytes]] = []
        for digest, value in self.scan():
            if after is not None and digest <= after:
                continue
            found.append((digest, value))
            if len(found) >= limit:
                break
        return found, ""
