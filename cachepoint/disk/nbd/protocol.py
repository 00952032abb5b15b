"""The NBD wire format (doc/proto.md of the NBD project): constants, message layouts, and the
parsing and packing of option data and replies. No I/O here.

Supported: the fixed newstyle handshake, NBD_OPT_INFO/GO/LIST/ABORT/EXPORT_NAME, structured replies,
the ``base:allocation`` metadata context for NBD_CMD_BLOCK_STATUS, and NBD_OPT_STARTTLS when the
server is given TLS (tls.py). Not offered: extended headers (a client is told NBD_REP_ERR_UNSUP and
goes on without them).
"""

from __future__ import annotations

import errno
import os
import struct
from typing import Protocol

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OPTION_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR_UNSUP = (1 << 31) + 1
REP_ERR_POLICY = (1 << 31) + 2
REP_ERR_INVALID = (1 << 31) + 3
REP_ERR_TLS_REQD = (1 << 31) + 5
REP_ERR_UNKNOWN = (1 << 31) + 6

INFO_EXPORT = 0
INFO_BLOCK_SIZE = 3

TX_HAS_FLAGS = 1 << 0
TX_READ_ONLY = 1 << 1
TX_SEND_FLUSH = 1 << 2
TX_SEND_FUA = 1 << 3
TX_SEND_TRIM = 1 << 5
TX_SEND_WRITE_ZEROES = 1 << 6
TX_SEND_DF = 1 << 7
TX_CAN_MULTI_CONN = 1 << 8

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3

REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) + 1

# base:allocation's status flags.
STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1
BASE_ALLOCATION = "base:allocation"
BASE_ALLOCATION_ID = 1  # the context id this server hands out for it

# Error values are the protocol's own (they match Linux errno, but are defined by the spec).
EPERM = 1
EIO = 5
EINVAL = 22
ENOSPC = 28

MAX_OPTION_DATA = 8192  # names are at most 4096 bytes; nothing we accept needs more
MAX_PAYLOAD = 32 * 1024 * 1024  # largest READ or WRITE, announced as NBD_INFO_BLOCK_SIZE's maximum
MAX_MESSAGE = 4096  # error strings, by the spec

HELLO = struct.Struct(">QQH")
OPTION = struct.Struct(">QII")
OPTION_REPLY = struct.Struct(">QIII")
REQUEST = struct.Struct(">IHHQQI")
SIMPLE_REPLY = struct.Struct(">IIQ")
CHUNK = struct.Struct(">IHHQI")  # magic, flags, type, handle, payload length
OFFSET = struct.Struct(">Q")
DESCRIPTOR = struct.Struct(">II")


class BlockDevice(Protocol):
    """What an export serves. Offsets and lengths are checked against ``size`` before a call."""

    @property
    def size(self) -> int: ...

    @property
    def read_only(self) -> bool: ...

    @property
    def block_size(self) -> int:
        """The preferred I/O size (a hint to clients; any byte range is accepted)."""
        ...

    async def read(self, offset: int, length: int) -> bytes | bytearray | memoryview: ...

    async def write(self, offset: int, data: bytes) -> None: ...

    async def flush(self) -> None: ...

    async def trim(self, offset: int, length: int) -> None: ...

    async def write_zeroes(self, offset: int, length: int) -> None: ...

    def zero_runs(self, offset: int, length: int, limit: int) -> list[tuple[int, bool]]:
        """Consecutive runs from ``offset`` as (length, reads as zeros), covering at most
        ``length`` bytes in at most ``limit`` runs. Answered without reading data."""
        ...


class NbdError(Exception):
    """Raised by a device to answer a request with a given NBD error value."""

    def __init__(self, code: int, message: str = "") -> None:
        super().__init__(message or os.strerror(code))
        self.code = code


class Violation(Exception):
    """The client broke the protocol: its connection is dropped (a hard disconnect)."""


def error_code(err: BaseException) -> int:
    """The NBD error value for an exception raised by a device."""
    if isinstance(err, NbdError):
        return err.code
    if isinstance(err, PermissionError):
        return EPERM
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return ENOSPC
    if isinstance(err, OSError) and err.errno == errno.EINVAL:
        return EINVAL
    if isinstance(err, ValueError):
        return EINVAL
    return EIO


def transmission_flags(device: BlockDevice, structured: bool) -> int:
    flags = TX_HAS_FLAGS | TX_SEND_FLUSH | TX_SEND_FUA
    if structured:
        flags |= TX_SEND_DF  # every read is answered with one content chunk anyway
    # Multi-conn: every connection to an export is served by one device object, so all see the same
    # bytes at once. A read-only export never changes; a writable one applies each WRITE to the shared
    # device before replying, and FLUSH syncs the one store under it, so a flush on any connection
    # covers the writes answered on all of them (what the spec asks of NBD_FLAG_CAN_MULTI_CONN).
    # nbdcopy --connections=N and qemu-img convert -m then read in parallel.
    flags |= TX_CAN_MULTI_CONN
    if device.read_only:
        return flags | TX_READ_ONLY
    return flags | TX_SEND_TRIM | TX_SEND_WRITE_ZEROES


def option_reply(option: int, reply: int, payload: bytes = b"") -> bytes:
    return OPTION_REPLY.pack(OPTION_REPLY_MAGIC, option, reply, len(payload)) + payload


def decode_name(raw: bytes) -> str | None:
    try:
        name = raw.decode()
    except UnicodeDecodeError:
        return None
    return None if "\x00" in name else name


def _string(data: bytes, at: int) -> tuple[str, int] | None:
    """A u32-length-prefixed string at ``at``: (text, offset after it), or None if malformed."""
    if at + 4 > len(data):
        return None
    (length,) = struct.unpack_from(">I", data, at)
    end = at + 4 + length
    if end > len(data):
        return None
    text = decode_name(data[at + 4 : end])
    return None if text is None else (text, end)


def parse_info_request(data: bytes) -> tuple[str, set[int]] | None:
    """NBD_OPT_INFO/GO data: u32 name length, name, u16 count, count x u16 info types."""
    named = _string(data, 0)
    if named is None or named[1] + 2 > len(data):
        return None
    name, at = named
    (count,) = struct.unpack_from(">H", data, at)
    rest = data[at + 2 :]
    if len(rest) != 2 * count:
        return None
    return name, set(struct.unpack(f">{count}H", rest))


def parse_meta_context_request(data: bytes) -> tuple[str, list[str]] | None:
    """NBD_OPT_LIST/SET_META_CONTEXT data: export name, u32 query count, then each query."""
    named = _string(data, 0)
    if named is None or named[1] + 4 > len(data):
        return None
    name, at = named
    (count,) = struct.unpack_from(">I", data, at)
    at += 4
    queries: list[str] = []
    for _ in range(count):
        query = _string(data, at)
        if query is None:
            return None
        queries.append(query[0])
        at = query[1]
    return (name, queries) if at == len(data) else None


def matching_contexts(queries: list[str], listing: bool) -> list[str]:
    """The contexts of this server a query list selects. Only ``base:allocation`` exists; an
    empty list selects every context when listing and none when setting (as the spec says)."""
    if not queries:
        return [BASE_ALLOCATION] if listing else []
    for query in queries:
        if query == BASE_ALLOCATION or (listing and query == "base:"):
            return [BASE_ALLOCATION]
    return []


def meta_context_reply(option: int, context_id: int, name: str) -> bytes:
    return option_reply(option, REP_META_CONTEXT, struct.pack(">I", context_id) + name.encode())


def simple_reply(code: int, handle: int) -> bytes:
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, code, handle)


def data_chunk_header(handle: int, offset: int, length: int) -> bytes:
    """The header of a final OFFSET_DATA chunk carrying ``length`` bytes read at ``offset``."""
    return final_chunk(REPLY_TYPE_OFFSET_DATA, handle, 8 + length) + OFFSET.pack(offset)


def error_chunk(handle: int, code: int, message: str) -> bytes:
    text = message.encode()[:MAX_MESSAGE]
    payload = struct.pack(">IH", code, len(text)) + text
    return final_chunk(REPLY_TYPE_ERROR, handle, len(payload)) + payload


def none_chunk(handle: int) -> bytes:
    """The reply to a read of 0 bytes: a content chunk must carry at least one."""
    return final_chunk(REPLY_TYPE_NONE, handle, 0)


def block_status_chunk(handle: int, context_id: int, runs: list[tuple[int, int]]) -> bytes:
    """A final BLOCK_STATUS chunk for one context: ``runs`` of (length, status flags)."""
    payload = struct.pack(">I", context_id) + b"".join(DESCRIPTOR.pack(n, flags) for n, flags in runs)
    return final_chunk(REPLY_TYPE_BLOCK_STATUS, handle, len(payload)) + payload


def final_chunk(reply_type: int, handle: int, length: int) -> bytes:
    """The header of a reply's last chunk, carrying ``length`` bytes of payload."""
    return CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, reply_type, handle, length)
