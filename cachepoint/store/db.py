"""Opening the store's RocksDB database: creation, locking, format checks, write modes."""

from __future__ import annotations

import errno
import secrets
from collections.abc import Iterator
from pathlib import Path

import rocksdict

from cachepoint.errors import (
    CachepointError,
    IncompatibleFormat,
    OutOfSpace,
    StoreBusy,
    StoreMissing,
)
from cachepoint.store import format as fmt

KEEP_INFO_LOGS = 8


def _options(for_blocks: bool = False) -> rocksdict.Options:
    options = rocksdict.Options(raw_mode=True)
    options.set_compression_type(rocksdict.DBCompressionType.none())
    # Every writable open starts a new info LOG (~200 KiB: it lists every family's options) and keeps
    # the old one; RocksDB keeps 1000 by default, a quarter of a GiB for a store written by commands.
    options.set_keep_log_file_num(KEEP_INFO_LOGS)
    if for_blocks:
        # Every ingest asks "is this block here?" for each new block; a bloom filter answers the
        # common "no" without touching SST data.
        table = rocksdict.BlockBasedOptions()
        table.set_bloom_filter(10, False)
        options.set_block_based_table_factory(table)
        # Keys are random digests, so compaction only merges files; it never brings related keys
        # together. Let level 0 hold more files and make them larger, so that an ingest's flushes
        # are not followed at once by a rewrite of everything they wrote (which competes with the
        # next ingest for the same cores). Reads stay cheap: bloom filters skip most files.
        options.set_level_zero_file_num_compaction_trigger(12)
        options.set_level_zero_slowdown_writes_trigger(40)
        options.set_level_zero_stop_writes_trigger(64)
        options.set_target_file_size_base(256 * 1024 * 1024)
        options.set_max_bytes_for_level_base(4 * 1024 * 1024 * 1024)
    return options


def is_no_space(err: BaseException) -> bool:
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(err)
    return "No space left" in text or "ENOSPC" in text or "Disk quota exceeded" in text


class StoreDB:
    """One open RocksDB database with the store's column families.

    ``writable=False`` opens it read-only without taking RocksDB's lock, so read commands work
    while a daemon or another command writes; they see what was committed when they opened.
    """

    def __init__(self, root: Path, writable: bool, create: bool = False) -> None:
        self.root = Path(root)
        self.path = self.root / "db"
        self.writable = writable
        exists = (self.path / "CURRENT").exists()
        if not exists and not (writable and create):
            raise StoreMissing(self.root)
        if writable:
            self.root.mkdir(parents=True, exist_ok=True)
        self.db, families = self._open(exists)
        self.cf = {name: self.db.get_column_family(name) for name in families}
        self.handle = {name: self.db.get_column_family_handle(name) for name in families}
        if exists:
            self._check_format()
        else:
            self._initialise()

    def _open(self, exists: bool) -> tuple[rocksdict.Rdict, list[str]]:
        options = _options()
        names = list(fmt.COLUMN_FAMILIES)
        if exists and not self.writable:
            # A read-only open cannot create families: open those present (an older store may lack
            # some, which then read as empty; a foreign layout fails the format check).
            present = set(rocksdict.Rdict.list_cf(str(self.path), rocksdict.Options(raw_mode=True)))
            names = [name for name in names if name in present]
        families = {name: _options(name == fmt.CF_BLOCKS) for name in names}
        try:
            if self.writable:
                options.create_if_missing(True)
                options.create_missing_column_families(True)
                return rocksdict.Rdict(str(self.path), options, column_families=families), names
            db = rocksdict.Rdict(
                str(self.path),
                options,
                column_families=families,
                access_type=rocksdict.AccessType.read_only(),
            )
            return db, names
        except Exception as err:  # rocksdict raises bare Exception with RocksDB's status text
            text = str(err)
            if "lock" in text.lower() and ("LOCK" in text or "Resource temporarily" in text):
                raise StoreBusy(self.root, text) from err
            if is_no_space(err):
                raise OutOfSpace(self.root, text) from err
            if "Column family not found" in text or "Invalid argument" in text:
                raise IncompatibleFormat(self.root, "unknown", sorted(fmt.SUPPORTED_VERSIONS), text) from err
            raise CachepointError(f"cannot open store {self.root}: {text}") from err

    def _check_format(self) -> None:
        if fmt.CF_META not in self.cf or fmt.CF_BLOCKS not in self.cf:
            raise IncompatibleFormat(
                self.root, "unknown", sorted(fmt.SUPPORTED_VERSIONS), "not a cachepoint store"
            )
        raw = self.cf[fmt.CF_META].get(fmt.META_FORMAT_VERSION)
        if raw is None:
            raise IncompatibleFormat(self.root, "unknown", sorted(fmt.SUPPORTED_VERSIONS), "no format record")
        version = fmt.read_u32(raw)
        if version not in fmt.SUPPORTED_VERSIONS:
            self.close()
            hint = "upgrade cachepoint" if version > fmt.FORMAT_VERSION else "the store is too old"
            raise IncompatibleFormat(self.root, version, sorted(fmt.SUPPORTED_VERSIONS), hint)

    def _initialise(self) -> None:
        batch = self.batch()
        meta = self.handle[fmt.CF_META]
        batch.put(fmt.META_FORMAT_VERSION, fmt.u32(fmt.FORMAT_VERSION), meta)
        batch.put(fmt.META_STORE_ID, secrets.token_bytes(16), meta)
        batch.put(fmt.META_PREFILTER_SEED, fmt.u64(secrets.randbits(64)), meta)
        self.write(batch, sync=True)

    # -- writing -------------------------------------------------------------------------------

    def batch(self) -> rocksdict.WriteBatch:
        return rocksdict.WriteBatch(raw_mode=True)

    def write(self, batch: rocksdict.WriteBatch, *, sync: bool = False, wal: bool = True) -> None:
        options = rocksdict.WriteOptions()
        options.sync = sync
        options.disable_wal = not wal
        try:
            self.db.write(batch, options)
        except Exception as err:
            if is_no_space(err):
                raise OutOfSpace(self.root, str(err)) from err
            raise

    def flush(self, family: str) -> None:
        """Persist a family's memtable to SST files (for writes made with the WAL off)."""
        try:
            self.cf[family].flush(True)
        except Exception as err:
            if is_no_space(err):
                raise OutOfSpace(self.root, str(err)) from err
            raise

    # -- reading -------------------------------------------------------------------------------

    def scan(self, family: str, prefix: bytes = b"") -> Iterator[tuple[bytes, bytes]]:
        if family not in self.cf:  # a family this (older, read-only) store does not have yet
            return
        for key, value in self.cf[family].items(from_key=prefix):
            if not key.startswith(prefix):
                break
            yield key, value

    def scan_keys(self, family: str, prefix: bytes = b"") -> Iterator[bytes]:
        if family not in self.cf:
            return
        for key in self.cf[family].keys(from_key=prefix):
            if not key.startswith(prefix):
                break
            yield key

    def meta(self, key: bytes) -> bytes | None:
        return self.cf[fmt.CF_META].get(key)

    def close(self) -> None:
        # Every column-family object keeps the database and its LOCK alive: drop them first.
        self.cf.clear()
        self.handle.clear()
        try:
            self.db.close()
        except Exception:  # closing twice or after a failed open is harmless
            pass
