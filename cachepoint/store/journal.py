"""The catalog journal: a second, independent copy of every catalog write, beside the database.

RocksDB keeps the catalog (versions, manifests, tags and their log, layers, images, and at the
coordinator its events, commit ids, audit log and holds) in a few small SST files. One flipped byte in
one of them used to make a whole family read as empty. The journal is an append-only file,
``STORE/catalog.journal``, that receives each catalog batch before the database does, so that
``cachepoint repair`` can rebuild whatever the database loses, and GC can prove it read everything.

File layout (sizes in bytes, integers big-endian)::

    header   b"CPJRNL01" store_id[16]
    record   MAGIC[4] length[u32] check[u64] body[length]
             check = xxh3-64 of length[u32] + body (a record that fails it is damaged)
    body     seq[u64] kind[u8] count[u32] op*count
             kind: 1 batch (ops apply on top of what came before),
                   2 reset (a checkpoint starts: the state is empty before its ops)
    op       code[u8] (1 put, 2 delete) family_len[u8] family key_len[u32] key
             [value_len[u32] value]    (put only)

``seq`` numbers batches from 1; the database stores the seq of the last batch it applied
(``meta/journal_seq``) in that same batch. On a writable open, journal records past the database's
seq are applied again (a crash between the two writes, or a WAL whose tail RocksDB dropped); a
database ahead of its journal (a damaged or truncated journal) is reported by fsck and mended by
``repair``, which rewrites the journal as a checkpoint of the state it recovered.

A damaged record is skipped by looking for the next MAGIC, so one bad byte costs one batch of the
journal, never the rest; the database usually still holds that batch.
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import xxhash

FILE_NAME = "catalog.journal"
HEADER_MAGIC = b"CPJRNL01"
HEADER_SIZE = len(HEADER_MAGIC) + 16
MAGIC = b"\xc7\x9aJR"
KIND_BATCH = 1
KIND_RESET = 2
OP_PUT = 1
OP_DELETE = 2
# A checkpoint splits the state into records of about this size, so that one damaged record costs
# little of it.
CHECKPOINT_RECORD_BYTES = 1 << 20
MAX_RECORD_BYTES = 1 << 30  # a length beyond this is damage, not a record

_PREFIX = struct.Struct(">4sIQ")  # magic, length, check
_BODY_HEAD = struct.Struct(">QBI")  # seq, kind, count
_U32 = struct.Struct(">I")

Op = tuple[int, str, bytes, bytes | None]  # (code, family, key, value or None)


class JournalError(Exception):
    """The journal file cannot be used at all (not a journal, another store's, unreadable)."""


def _check(length_and_body: bytes) -> int:
    return xxhash.xxh3_64_intdigest(length_and_body)


def encode_record(seq: int, kind: int, ops: Iterable[Op]) -> bytes:
    parts = []
    count = 0
    for code, family, key, value in ops:
        name = family.encode()
        parts.append(bytes((code, len(name))) + name + _U32.pack(len(key)) + key)
        if code == OP_PUT:
            assert value is not None
            parts.append(_U32.pack(len(value)) + value)
        count += 1
    body = _BODY_HEAD.pack(seq, kind, count) + b"".join(parts)
    length = _U32.pack(len(body))
    return MAGIC + length + struct.pack(">Q", _check(length + body)) + body


def _decode_body(body: bytes) -> tuple[int, int, list[Op]]:
    seq, kind, count = _BODY_HEAD.unpack_from(body, 0)
    at = _BODY_HEAD.size
    ops: list[Op] = []
    for _ in range(count):
        code, name_len = body[at], body[at + 1]
        at += 2
        family = body[at : at + name_len].decode()
        at += name_len
        (key_len,) = _U32.unpack_from(body, at)
        at += 4
        key = body[at : at + key_len]
        at += key_len
        value = None
        if code == OP_PUT:
            (value_len,) = _U32.unpack_from(body, at)
            at += 4
            value = body[at : at + value_len]
            at += value_len
        elif code != OP_DELETE:
            raise ValueError(f"unknown op {code}")
        ops.append((code, family, key, value))
    if at != len(body):
        raise ValueError("trailing bytes in record")
    return seq, kind, ops


@dataclass(frozen=True, slots=True)
class Damage:
    """A stretch of the journal that could not be read as records."""

    offset: int
    length: int
    detail: str
    torn: bool = False  # a last record the file ends inside of (a crash while appending)

    def __str__(self) -> str:
        return f"bytes {self.offset}..{self.offset + self.length} of the journal: {self.detail}"


@dataclass
class JournalState:
    """What replaying the journal gives: the catalog families as they should be."""

    families: dict[str, dict[bytes, bytes]] = field(default_factory=dict)
    last_seq: int = 0  # of the last record applied
    seen_seq: int = 0  # of the last record in the file (past upto_seq too)
    records: int = 0
    damage: list[Damage] = field(default_factory=list)
    # seqs missing between records that were read (a damaged record lost them)
    gaps: list[tuple[int, int]] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.damage and not self.gaps

    def apply(self, kind: int, ops: list[Op]) -> None:
        if kind == KIND_RESET:
            self.families.clear()
        for code, family, key, value in ops:
            records = self.families.setdefault(family, {})
            if code == OP_PUT:
                assert value is not None
                records[key] = value
            else:
                records.pop(key, None)


def scan_records(data: bytes, start: int) -> Iterator[tuple[int, int, int, list[Op]] | Damage]:
    """Yield (offset, seq, kind, ops) per readable record, and a Damage for each unreadable stretch."""
    at = start
    end = len(data)
    while at < end:
        problem = ""
        if end - at >= _PREFIX.size:
            magic, length, check = _PREFIX.unpack_from(data, at)
            body_at = at + _PREFIX.size
            if magic != MAGIC:
                problem = "no record starts here"
            elif length > MAX_RECORD_BYTES or body_at + length > end:
                problem = "a record runs past the end of the file (cut short, or its length is damaged)"
            else:
                body = data[body_at : body_at + length]
                if _check(data[at + 4 : at + 8] + body) != check:
                    problem = "a record's checksum does not match its bytes"
                else:
                    try:
                        seq, kind, ops = _decode_body(body)
                    except (ValueError, struct.error, IndexError, UnicodeDecodeError) as err:
                        problem = f"a record cannot be decoded: {err}"
                    else:
                        yield at, seq, kind, ops
                        at = body_at + length
                        continue
        else:
            problem = "a record is cut short at the end of the file"
        following = data.find(MAGIC, at + 1)
        resume = end if following < 0 else following
        torn = resume == end and problem.startswith("a record runs past") or "cut short" in problem
        yield Damage(at, resume - at, problem, torn)
        at = resume


def read_state(
    path: Path,
    store_id: bytes | None = None,
    *,
    upto_seq: int | None = None,
    writer_may_append: bool = False,
) -> JournalState:
    """Replay the journal at ``path`` (up to record ``upto_seq`` when given). Raises JournalError
    when it is not this store's journal. ``writer_may_append``: another process may be appending
    right now, so an unfinished last record is not damage."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return JournalState()
    except OSError as err:
        raise JournalError(f"cannot read {path}: {err}") from err
    state = JournalState()
    if len(data) < HEADER_SIZE or not data.startswith(HEADER_MAGIC):
        # The header itself is damaged: records still carry their own checks.
        state.damage.append(Damage(0, min(len(data), HEADER_SIZE), "the journal's header is damaged"))
    elif store_id is not None and data[len(HEADER_MAGIC) : HEADER_SIZE] != store_id:
        raise JournalError(f"{path} belongs to another store")
    for item in scan_records(data, HEADER_SIZE if len(data) >= HEADER_SIZE else 0):
        if isinstance(item, Damage):
            if not (item.torn and writer_may_append):
                state.damage.append(item)
            continue
        _, seq, kind, ops = item
        state.seen_seq = max(state.seen_seq, seq)
        if upto_seq is not None and seq > upto_seq:
            continue
        if kind == KIND_RESET:
            state.gaps = [gap for gap in state.gaps if gap[1] >= seq]
        elif seq > state.last_seq + 1:
            state.gaps.append((state.last_seq + 1, seq - 1))
        state.apply(kind, ops)
        state.last_seq = max(state.last_seq, seq)
        state.records += 1
    return state


@dataclass
class JournalTail:
    last_seq: int = 0
    records: list[tuple[int, list[Op]]] = field(default_factory=list)  # (seq, ops) past after_seq
    torn_at: int | None = None  # where an unfinished last record starts (a crash while appending)


def read_tail(
    path: Path, store_id: bytes, after_seq: int, resume: tuple[int, int] | None = None
) -> JournalTail:
    """The journal's last seq and the batch records past ``after_seq``, for a writable open. Checks
    every record it reads (xxh3 runs at memory speed) but decodes only those it returns.

    ``resume`` (inode, offset): where the record after ``after_seq`` starts, as the database recorded
    it. The scan then starts there, so an open costs what was appended since the last database write,
    not the whole journal; when the offset does not fit this file (a checkpoint replaced it, damage),
    the whole file is read."""
    try:
        with open(path, "rb") as f:
            header = f.read(HEADER_SIZE)
            if len(header) == HEADER_SIZE and header.startswith(HEADER_MAGIC):
                if header[len(HEADER_MAGIC) :] != store_id:
                    raise JournalError(f"{path} belongs to another store")
            tail = _tail_from(f, resume, after_seq) if resume is not None else None
            if tail is None:
                f.seek(0)
                tail = _scan_tail(f.read(), HEADER_SIZE, 0, after_seq)
    except OSError as err:
        raise JournalError(f"cannot read {path}: {err}") from err
    return tail


def _tail_from(f: BinaryIO, resume: tuple[int, int], after_seq: int) -> JournalTail | None:
    """The tail read from the recorded offset, or None when that offset cannot be trusted."""
    inode, offset = resume
    stat = os.fstat(f.fileno())
    if stat.st_ino != inode or not HEADER_SIZE <= offset <= stat.st_size:
        return None
    f.seek(offset)
    data = f.read()
    if data:
        first = next(scan_records(data, 0))
        # The next record must start exactly there and be the one after the database's.
        if isinstance(first, Damage) and first.offset == 0 and not first.torn:
            return None
        if not isinstance(first, Damage) and first[1] != after_seq + 1:
            return None
    tail = _scan_tail(data, 0, offset, after_seq)
    tail.last_seq = max(tail.last_seq, after_seq)
    return tail


def _scan_tail(data: bytes, start: int, base: int, after_seq: int) -> JournalTail:
    """``data`` is the file from offset ``base`` on; offsets in the result are the file's."""
    tail = JournalTail()
    for item in scan_records(data, start):
        if isinstance(item, Damage):
            tail.torn_at = base + item.offset if item.torn else None
            continue
        tail.torn_at = None
        _, seq, kind, ops = item
        tail.last_seq = max(tail.last_seq, seq)
        if seq > after_seq and kind == KIND_BATCH:
            tail.records.append((seq, ops))
    return tail


class Journal:
    """The journal of one open, writable store. ``append`` is called with the database's write lock
    held, so records are written in seq order."""

    def __init__(self, root: Path, store_id: bytes) -> None:
        self.path = Path(root) / FILE_NAME
        self.store_id = store_id
        self.lock = threading.Lock()
        self._fd = -1
        self.last_seq = 0

    def open(self, last_seq: int, torn_at: int | None = None) -> None:
        """Open for appending; ``last_seq`` is the seq of the last record (read by the caller), and
        ``torn_at`` where a record cut short by a crash begins (it is cut off: its batch never
        reached the database, which is written only after the journal is synced)."""
        exists = self.path.exists()
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        if torn_at is not None and torn_at >= HEADER_SIZE:
            self._truncate(torn_at)
        if not exists or os.fstat(self._fd).st_size == 0:
            os.write(self._fd, HEADER_MAGIC + self.store_id)
            os.fsync(self._fd)
            _sync_dir(self.path.parent)
        self.last_seq = last_seq

    def append(self, ops: list[Op]) -> tuple[int, int]:
        """Write one batch durably; returns (its seq, the file size before it) for ``undo``."""
        seq = self.last_seq + 1
        record = encode_record(seq, KIND_BATCH, ops)
        before = os.fstat(self._fd).st_size
        try:
            os.write(self._fd, record)
            os.fsync(self._fd)
        except OSError:
            self._truncate(before)
            raise
        self.last_seq = seq
        return seq, before

    def position(self) -> tuple[int, int]:
        """(inode, size) of the journal file: after an append, where the next record will start."""
        stat = os.fstat(self._fd)
        return stat.st_ino, stat.st_size

    def undo(self, seq: int, size_before: int) -> None:
        """Take back the last record: its database write failed, so the batch never happened."""
        if seq == self.last_seq:
            self._truncate(size_before)
            self.last_seq = seq - 1

    def _truncate(self, size: int) -> None:
        try:
            os.ftruncate(self._fd, size)
            os.fsync(self._fd)
        except OSError:  # the record stays; a writable open applies it (its blocks were durable)
            pass

    def checkpoint(self, families: dict[str, dict[bytes, bytes]], seq: int) -> None:
        """Replace the journal with one that holds ``families`` as they are now (repair, or a GC
        that deleted history): written to a temporary file, synced, then renamed over."""
        temp = self.path.with_name(FILE_NAME + ".new")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, HEADER_MAGIC + self.store_id)
            kind = KIND_RESET
            chunk: list[Op] = []
            size = 0

            def emit() -> None:
                nonlocal kind, chunk, size
                data = encode_record(seq, kind, chunk)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                kind, chunk, size = KIND_BATCH, [], 0

            for family in sorted(families):
                for key, value in families[family].items():
                    chunk.append((OP_PUT, family, key, value))
                    size += len(key) + len(value)
                    if size >= CHECKPOINT_RECORD_BYTES:
                        emit()
            if chunk or kind == KIND_RESET:
                emit()
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            temp.unlink(missing_ok=True)
            raise
        os.close(fd)
        os.replace(temp, self.path)
        _sync_dir(self.path.parent)
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
        self.last_seq = seq

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
