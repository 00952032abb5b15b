"""Opening the store's RocksDB database: creation, locking, format checks, write modes, the
catalog journal beside it, and reads that never mistake a read error for the end of the data."""

from __future__ import annotations

import errno
import logging
import secrets
from collections.abc import Iterable, Iterator
from pathlib import Path

import rocksdict

from cachepoint.errors import (
    CachepointError,
    IncompatibleFormat,
    OutOfSpace,
    RecordsUnreadable,
    StoreBusy,
    StoreDamaged,
    StoreMissing,
)
from cachepoint.store import format as fmt
from cachepoint.store import journal as jr

log = logging.getLogger(__name__)

# In salvage mode RocksDB opens each SST file when a read first needs it, instead of all of them at
# open (where one damaged footer fails the whole open), and does not stop at the first damage.
SALVAGE_MAX_OPEN_FILES = 256

KEEP_INFO_LOGS = 8

BLOCK_WRITE_BUFFERS = 4  # the blocks family's memtables: one filling, up to three waiting for a flush


def _options(for_blocks: bool = False) -> rocksdict.Options:
    options = rocksdict.Options(raw_mode=True)
    options.set_compression_type(rocksdict.DBCompressionType.none())
    # RocksDB's defaults, stated because reads rely on them: every SST block read is checked against
    # its CRC (ReadOptions.verify_checksums) and damage found at open or in compaction stops the
    # database (paranoid checks). Local block reads do not hash again (cachepoint/blocksource).
    options.set_paranoid_checks(True)
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
        # Room for three full 64 MiB memtables waiting for their flush, not one: when the flush falls
        # behind (a busy or slow disk), RocksDB stops writes, and rocksdict's write() waits holding the
        # GIL, so an ingest's hashing threads and a daemon's event loop stop with it. Seen in the
        # store's LOG ("Stopping writes because we have 2 immutable memtables") during a 1 GiB ingest.
        # The memory is used only while writes outrun the disk.
        options.set_max_write_buffer_number(BLOCK_WRITE_BUFFERS)
    return options


def is_corruption(err: BaseException) -> bool:
    text = str(err)
    return any(sign in text for sign in ("Corruption", "checksum mismatch", "IO error", "Bad table magic"))


def is_no_space(err: BaseException) -> bool:
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(err)
    return "No space left" in text or "ENOSPC" in text or "Disk quota exceeded" in text


class Batch:
    """A write batch that also remembers its writes to journaled families (format.JOURNALED_FAMILIES),
    so that ``StoreDB.write`` can append them to the catalog journal."""

    def __init__(self, db: StoreDB) -> None:
        self.inner = rocksdict.WriteBatch(raw_mode=True)
        self._names = db.handle_names
        self.journal_ops: list[jr.Op] = []

    def _journaled(self, handle: rocksdict.ColumnFamily, key: bytes) -> str | None:
        family = self._names.get(id(handle))
        if family not in fmt.JOURNALED_FAMILIES:
            return None
        if family == fmt.CF_META and key in fmt.UNJOURNALED_META:
            return None
        return family

    def put(self, key: bytes, value: bytes, handle: rocksdict.ColumnFamily) -> None:
        self.inner.put(key, value, handle)
        family = self._journaled(handle, key)
        if family is not None:
            self.journal_ops.append((jr.OP_PUT, family, bytes(key), bytes(value)))

    def put_many(self, items: Iterable[tuple[bytes, bytes]], handle: rocksdict.ColumnFamily) -> int:
        """``put`` of each (key, value) into one family; their value bytes. Whether the family is
        journaled is asked once, not per key: an ingest puts tens of thousands of blocks per GiB on its
        single writer thread."""
        # A journaled family goes key by key (some keys of the meta family are not journaled).
        put = self.put if self._names.get(id(handle)) in fmt.JOURNALED_FAMILIES else self.inner.put
        written = 0
        for key, value in items:
            put(key, value, handle)
            written += len(value)
        return written

    def delete(self, key: bytes, handle: rocksdict.ColumnFamily) -> None:
        self.inner.delete(key, handle)
        family = self._journaled(handle, key)
        if family is not None:
            self.journal_ops.append((jr.OP_DELETE, family, bytes(key), None))

    def __len__(self) -> int:
        return self.inner.len()


class StoreDB:
    """One open RocksDB database with the store's column families.

    ``writable=False`` opens it read-only without taking RocksDB's lock, so read commands work
    while a daemon or another command writes; they see what was committed when they opened. A
    read-only open of a database RocksDB finds damaged retries in salvage mode (``salvaged`` then
    says why): what is readable reads, what is not raises. ``salvage=True`` asks for that mode
    directly (repair). A writable open of a damaged database raises StoreDamaged.
    """

    journaled = True  # the catalog journal beside the database (a shared catalog has none)
    shared = False  # only this process writes it (a shared catalog: coordinator/backends/records.py)

    def __init__(
        self,
        root: Path,
        writable: bool,
        create: bool = False,
        *,
        salvage: bool = False,
        attach_journal: bool = True,
        check_format: bool = True,
    ) -> None:
        self.root = Path(root)
        self.path = self.root / "db"
        self.writable = writable
        self.salvaged = ""
        self.journal: jr.Journal | None = None
        exists = (self.path / "CURRENT").exists()
        if not exists and not (writable and create):
            raise StoreMissing(self.root)
        if writable:
            self.root.mkdir(parents=True, exist_ok=True)
        try:
            self.db, families = self._open(exists, salvage)
            if salvage:
                self.salvaged = "opened in salvage mode"
        except StoreDamaged as err:
            if writable or salvage:
                raise
            self.db, families = self._open(exists, salvage=True)
            self.salvaged = str(err.args[1])
            log.warning("store %s opened in salvage mode: %s", self.root, self.salvaged)
        self.cf = {name: self.db.get_column_family(name) for name in families}
        self.handle = {name: self.db.get_column_family_handle(name) for name in families}
        self.handle_names = {id(handle): name for name, handle in self.handle.items()}
        if exists:
            if check_format:
                self.check_format()
        else:
            self._initialise()
        if writable and not salvage and attach_journal:
            self._open_journal()

    def _open(self, exists: bool, salvage: bool = False) -> tuple[rocksdict.Rdict, list[str]]:
        options = _options()
        if salvage:
            options.set_paranoid_checks(False)
            options.set_max_open_files(SALVAGE_MAX_OPEN_FILES)
            # A compaction would read damaged files and fail, or carry damage on into new files.
            options.set_disable_auto_compactions(True)
        names = list(fmt.COLUMN_FAMILIES)
        if exists and (not self.writable or salvage):
            # A read-only open cannot create families: open those present (an older store may lack
            # some, which then read as empty; a foreign layout fails the format check).
            try:
                present = set(rocksdict.Rdict.list_cf(str(self.path), rocksdict.Options(raw_mode=True)))
            except Exception as err:
                if is_corruption(err):
                    raise StoreDamaged(self.root, str(err)) from err
                raise CachepointError(f"cannot open store {self.root}: {err}") from err
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
            if is_corruption(err):
                raise StoreDamaged(self.root, text) from err
            raise CachepointError(f"cannot open store {self.root}: {text}") from err

    def check_format(self) -> None:
        if fmt.CF_META not in self.cf or fmt.CF_BLOCKS not in self.cf:
            raise IncompatibleFormat(
                self.root, "unknown", sorted(fmt.SUPPORTED_VERSIONS), "not a cachepoint store"
            )
        try:
            raw = self.get(fmt.CF_META, fmt.META_FORMAT_VERSION)
        except RecordsUnreadable:
            if self.salvaged:
                return  # salvage reads what it can; the format record is one more damaged record
            raise
        if raw is None and self.salvaged:
            return
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

    def writer_active(self) -> bool:
        """Whether some process holds the database open for writing (RocksDB's lock on db/LOCK).

        Read from /proc/locks: opening and closing LOCK here to test it would drop every POSIX lock
        this process holds on it, RocksDB's own included."""
        try:
            stat = (self.path / "LOCK").stat()
            with open("/proc/locks") as locks:
                lines = locks.read().splitlines()
        except OSError:
            return True  # cannot tell: assume a writer, the cautious answer for a reader
        for line in lines:
            fields = line.split()
            if len(fields) > 5 and fields[5].count(":") == 2:
                if int(fields[5].rsplit(":", 1)[1]) == stat.st_ino:
                    return True
        return False

    # -- the catalog journal -------------------------------------------------------------------

    def journal_seq(self) -> int:
        raw = self.get(fmt.CF_META, fmt.META_JOURNAL_SEQ)
        return fmt.read_u64(raw) if raw else 0

    def _open_journal(self) -> None:
        """Open the journal for appending and bring the database up to it (records it has that the
        database lacks: a crash between the two writes, or a WAL tail RocksDB dropped)."""
        store_id = self.meta(fmt.META_STORE_ID) or b""
        journal = jr.Journal(self.root, store_id)
        db_seq = self.journal_seq()
        if not journal.path.exists():
            # A store older than the journal, or one whose journal was removed: start it from what the
            # database holds now (every record read with checks; a damaged catalog cannot be copied).
            journal.checkpoint(self.journaled_state(), db_seq)
            self.journal = journal
            self._note_journal_end()
            return
        try:
            tail = jr.read_tail(journal.path, store_id, after_seq=db_seq, resume=self._journal_end())
        except jr.JournalError as err:
            raise StoreDamaged(self.root, str(err)) from err
        journal.open(max(tail.last_seq, db_seq), tail.torn_at)
        self.journal = journal
        for seq, ops in tail.records:
            batch = Batch(self)
            for code, family, key, value in ops:
                if family not in self.handle:
                    continue
                if code == jr.OP_PUT:
                    assert value is not None
                    batch.inner.put(key, value, self.handle[family])
                else:
                    batch.inner.delete(key, self.handle[family])
            batch.inner.put(fmt.META_JOURNAL_SEQ, fmt.u64(seq), self.handle[fmt.CF_META])
            self.write_unjournaled(batch.inner, sync=True, wal=True)
            log.warning("store %s: applied journal record %d that the database lacked", self.root, seq)
        self._note_journal_end()

    def _journal_end(self) -> tuple[int, int] | None:
        raw = self.get(fmt.CF_META, fmt.META_JOURNAL_END)
        if raw is None or len(raw) != 16:
            return None
        return fmt.read_u64(raw[:8]), fmt.read_u64(raw[8:])

    def _note_journal_end(self) -> None:
        """Record where the journal ends when the database is level with it and the record says
        otherwise (a checkpoint replaced the file, a roll-forward, a store older than the record), so
        that the next open scans only what comes after."""
        if self.journal is None or self.journal.last_seq != self.journal_seq():
            return
        position = self.journal.position()
        if self._journal_end() != position:
            batch = rocksdict.WriteBatch(raw_mode=True)
            batch.put(fmt.META_JOURNAL_END, _position_bytes(position), self.handle[fmt.CF_META])
            self.write_unjournaled(batch, sync=True, wal=True)

    def checkpoint_journal(self) -> None:
        """Rewrite the journal as one snapshot of the journaled families (after deletions that must not
        linger in it, and after repair, which opens the store without its journal)."""
        if self.journal is None:
            self.journal = jr.Journal(self.root, self.meta(fmt.META_STORE_ID) or b"")
        with self.journal.lock:
            self.journal.checkpoint(self.journaled_state(), self.journal_seq())
            self._note_journal_end()

    def journaled_state(self) -> dict[str, dict[bytes, bytes]]:
        """Every journaled family as the database holds it (checked reads: raises when it cannot)."""
        state: dict[str, dict[bytes, bytes]] = {}
        for family in sorted(fmt.JOURNALED_FAMILIES):
            records = dict(self.scan(family))
            if family == fmt.CF_META:
                for key in fmt.UNJOURNALED_META:
                    records.pop(key, None)
            state[family] = records
        return state

    # -- writing -------------------------------------------------------------------------------

    def batch(self) -> Batch:
        return Batch(self)

    def write(self, batch: Batch, *, sync: bool = False, wal: bool = True) -> None:
        """Apply a batch. One that touches journaled families is appended to the journal first and
        then written synced with the WAL, carrying its journal seq; if the database write fails the
        journal record is taken back."""
        if not batch.journal_ops or self.journal is None:
            self.write_unjournaled(batch.inner, sync=sync, wal=wal)
            return
        journal = self.journal
        with journal.lock:
            try:
                seq, size_before = journal.append(batch.journal_ops)
            except OSError as err:
                if is_no_space(err):
                    raise OutOfSpace(self.root, f"catalog journal: {err}") from err
                raise
            batch.inner.put(fmt.META_JOURNAL_SEQ, fmt.u64(seq), self.handle[fmt.CF_META])
            end = _position_bytes(journal.position())
            batch.inner.put(fmt.META_JOURNAL_END, end, self.handle[fmt.CF_META])
            try:
                self.write_unjournaled(batch.inner, sync=True, wal=True)
            except BaseException:
                journal.undo(seq, size_before)
                raise

    def write_unjournaled(self, batch: rocksdict.WriteBatch, *, sync: bool, wal: bool) -> None:
        """Apply a raw batch without the journal: for records the journal already holds (a writable
        open applying it) and for repair, which rewrites the journal itself afterwards."""
        options = rocksdict.WriteOptions()
        options.sync = sync
        options.disable_wal = not wal
        try:
            self.db.write(batch, options)
        except Exception as err:
            if is_no_space(err):
                raise OutOfSpace(self.root, str(err)) from err
            raise

    def flush(self, family: str, wait: bool = True) -> None:
        """Persist a family's memtable to SST files (for writes made with the WAL off). ``wait``:
        False only asks for it (RocksDB's background threads write it)."""
        try:
            self.cf[family].flush(wait)
        except Exception as err:
            if is_no_space(err):
                raise OutOfSpace(self.root, str(err)) from err
            raise

    # -- reading -------------------------------------------------------------------------------

    # rocksdict's items() and keys() end quietly when RocksDB hits damage: the iterator just stops.
    # A scan therefore walks one iterator of its own and asks it, at the end, whether it ended or
    # failed. One iterator is also one point in time: a record written while the scan runs is not in
    # it, so a second look cannot take a concurrent write (a pull's block landing during GC's census)
    # for the place where the first one stopped. It costs ~0.5 us more per record than items().

    def scan(self, family: str, prefix: bytes = b"") -> Iterator[tuple[bytes, bytes]]:
        """Records of a family in key order, as of the scan's start; raises RecordsUnreadable when
        RocksDB cannot read them all (never a silently shorter answer)."""
        if family not in self.cf:  # a family this (older, read-only) store does not have yet
            return
        iterator = self.cf[family].iter()
        valid, key_of, value_of, advance = iterator.valid, iterator.key, iterator.value, iterator.next
        try:
            iterator.seek(prefix)
            while valid():
                key = key_of()
                if not key.startswith(prefix):
                    return
                yield key, value_of()
                advance()
            iterator.status()  # the end, or where RocksDB stopped reading
        except Exception as err:
            raise RecordsUnreadable(family, self.root, err) from err

    def scan_keys(self, family: str, prefix: bytes = b"") -> Iterator[bytes]:
        """The keys of scan(), without reading the values."""
        if family not in self.cf:
            return
        iterator = self.cf[family].iter()
        valid, key_of, advance = iterator.valid, iterator.key, iterator.next
        try:
            iterator.seek(prefix)
            while valid():
                key = key_of()
                if not key.startswith(prefix):
                    return
                yield key
                advance()
            iterator.status()
        except Exception as err:
            raise RecordsUnreadable(family, self.root, err) from err

    def last_key(self, family: str) -> bytes | None:
        """The greatest key of a family (checked like a scan)."""
        if family not in self.cf:
            return None
        iterator = self.cf[family].iter()
        iterator.seek_to_last()
        key = iterator.key() if iterator.valid() else None
        try:
            iterator.status()
        except Exception as err:
            raise RecordsUnreadable(family, self.root, err) from err
        return key

    def get(self, family: str, key: bytes) -> bytes | None:
        """One record, or None when absent; raises RecordsUnreadable when RocksDB cannot read it."""
        if family not in self.cf:
            return None
        try:
            return self.cf[family].get(key)
        except Exception as err:
            raise RecordsUnreadable(family, self.root, err) from err

    def meta(self, key: bytes) -> bytes | None:
        return self.get(fmt.CF_META, key)

    def close(self) -> None:
        if self.journal is not None:
            self.journal.close()
            self.journal = None
        # Every column-family object keeps the database and its LOCK alive: drop them first.
        self.cf.clear()
        self.handle.clear()
        try:
            self.db.close()
        except Exception:  # closing twice or after a failed open is harmless
            pass


def _position_bytes(position: tuple[int, int]) -> bytes:
    return fmt.u64(position[0]) + fmt.u64(position[1])
