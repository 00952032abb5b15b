"""Blocks: sizes, holes, hashing and the at-rest codec.

A stored block value is one codec byte followed by the payload (see store/format.py). zstd level 1
is used because it keeps ~96% of level 3's ratio at ~1.3x its speed on this class of data, and a
block is stored compressed only when that saves space (random data is kept raw, so reading it back
costs no decompression).
"""

from __future__ import annotations

import hashlib
import re
import threading

import zstandard

from cachepoint.errors import BlockCorrupt, InvalidBlockSize
from cachepoint.ids import BlockId

KiB = 1024
MiB = 1024 * KiB
DEFAULT_BLOCK_SIZE = 64 * KiB
MIN_BLOCK_SIZE = 4 * KiB
MAX_BLOCK_SIZE = 4 * MiB

CODEC_RAW = 0
CODEC_ZSTD = 1
ZSTD_LEVEL = 1

_ZEROS = bytes(MAX_BLOCK_SIZE)
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KkMm]?)(i?[Bb])?\s*$")


def parse_block_size(text: str | int) -> int:
    """Parse ``64K``, ``1M``, ``65536``; the result is a power of two in [4 KiB, 4 MiB]."""
    if isinstance(text, int):
        size = text
    else:
        match = _SIZE_RE.match(text)
        if not match:
            raise InvalidBlockSize(text, "write it as a number of bytes or with K/M (e.g. 64K)")
        size = int(match.group(1)) * {"": 1, "k": KiB, "m": MiB}[match.group(2).lower()]
    if size < MIN_BLOCK_SIZE or size > MAX_BLOCK_SIZE:
        raise InvalidBlockSize(text, f"it must be between {MIN_BLOCK_SIZE} (4K) and {MAX_BLOCK_SIZE} (4M)")
    if size & (size - 1):
        raise InvalidBlockSize(text, f"{size} is not a power of two")
    return size


def is_hole(data: bytes) -> bool:
    """All-zero blocks are holes: never stored, never sent. (~40 GB/s on bytes; pass bytes, not a
    memoryview, whose comparison with bytes runs element by element.)"""
    return data == _ZEROS[: len(data)]


def block_digest(data: bytes | memoryview) -> bytes:
    return hashlib.sha256(data).digest()


_local = threading.local()


def _compressor() -> zstandard.ZstdCompressor:
    # A ZstdCompressor is not thread-safe; one per thread, and zstd releases the GIL while it works.
    comp = getattr(_local, "compressor", None)
    if comp is None:
        comp = _local.compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True)
    return comp


def _decompressor() -> zstandard.ZstdDecompressor:
    dec = getattr(_local, "decompressor", None)
    if dec is None:
        dec = _local.decompressor = zstandard.ZstdDecompressor()
    return dec


def encode_block(data: bytes | memoryview) -> bytes:
    """The stored value of a block: codec byte + payload, compressed only when that saves space."""
    packed = _compressor().compress(data)
    if len(packed) < len(data):
        return bytes((CODEC_ZSTD,)) + packed
    return bytes((CODEC_RAW,)) + bytes(data)


def decode_block(value: bytes, max_size: int = MAX_BLOCK_SIZE) -> bytes:
    codec = value[0]
    if codec == CODEC_RAW:
        return value[1:]
    if codec == CODEC_ZSTD:
        return _decompressor().decompress(value[1:], max_output_size=max_size)
    raise ValueError(f"unknown block codec {codec}")


def decode_verified(digest: bytes, value: bytes) -> bytes:
    """Decode a stored value and check it against its id: every read is verified."""
    try:
        data = decode_block(value)
    except (ValueError, zstandard.ZstdError) as err:
        raise BlockCorrupt(BlockId(digest), f"undecodable ({err})") from err
    actual = block_digest(data)
    if actual != digest:
        raise BlockCorrupt(BlockId(digest), BlockId(actual))
    return data


def raw_size(value: bytes) -> int:
    """The raw length of a stored value, without decompressing it (zstd frames carry it)."""
    if value[0] == CODEC_ZSTD:
        return zstandard.frame_content_size(value[1:])
    return len(value) - 1
