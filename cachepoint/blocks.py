"""Blocks: sizes, holes, hashing and the at-rest codec.

A stored block value is one codec byte followed by the payload (see store/format.py). zstd level 1
is used because it keeps ~96% of level 3's ratio at ~1.3x its speed on this class of data, and a
block is stored compressed only when that saves space (random data is kept raw, so reading it back
costs no decompression).

lz4 (codec 2) is the read-side codec: a daemon re-stores in it the blocks its disks keep reading
from the store (cachepoint/blocksource/recode.py). On the real disk image's blocks it decodes in 16
µs where zstd takes 60-70, for about a quarter more bytes. Every reader of a stored value takes
either codec; what ingest writes and what the coordinator keeps stays zstd.
"""

from __future__ import annotations

import hashlib
import re
import threading

import lz4.block
import zstandard

from cachepoint.errors import BlockCorrupt, BlockOversized, InvalidBlockSize
from cachepoint.ids import BlockId

KiB = 1024
MiB = 1024 * KiB
DEFAULT_BLOCK_SIZE = 64 * KiB
MIN_BLOCK_SIZE = 4 * KiB
MAX_BLOCK_SIZE = 4 * MiB

CODEC_RAW = 0
CODEC_ZSTD = 1
CODEC_LZ4 = 2  # payload: the decoded length (u32 LE) then one lz4 block
_ZSTD_BYTE = bytes((CODEC_ZSTD,))
_LZ4_BYTE = bytes((CODEC_LZ4,))
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


def zeros(length: int) -> bytes | memoryview:
    """``length`` zero bytes, a view of one shared buffer when it is long enough (no allocation)."""
    return memoryview(_ZEROS)[:length] if length <= len(_ZEROS) else bytes(length)


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


def encode_fast(data: bytes | memoryview) -> bytes:
    """The stored value of a block in the read-side codec (lz4), or raw when lz4 saves nothing."""
    packed = lz4.block.compress(data, store_size=True)
    if len(packed) < len(data):
        return _LZ4_BYTE + packed
    return bytes((CODEC_RAW,)) + bytes(data)


def _lz4_size(value: bytes | memoryview) -> int:
    """The decoded length an lz4 value declares (-1: too short to declare one)."""
    return int.from_bytes(value[1:5], "little") if len(value) >= 5 else -1


def decode_block(value: bytes, max_size: int = MAX_BLOCK_SIZE) -> bytes:
    codec = value[0]
    if codec == CODEC_RAW:
        return value[1:]
    if codec == CODEC_ZSTD:
        # A view past the codec byte: value[1:] would copy the payload first.
        return _decompressor().decompress(memoryview(value)[1:], max_output_size=max_size)
    if codec == CODEC_LZ4:
        declared = _lz4_size(value)
        if not 0 <= declared <= max_size:
            raise ValueError(f"an lz4 block that declares {declared} bytes (at most {max_size})")
        return lz4.block.decompress(memoryview(value)[1:])
    raise ValueError(f"unknown block codec {codec}")


def stored_size_limit(block_size: int) -> int:
    """The most bytes a stored value of a block of ``block_size`` bytes may take: the codec byte and
    zstd's worst case for data it cannot shrink (ZSTD_compressBound: our encoder stores such a block
    raw, another writer may not)."""
    small = (128 * KiB - block_size) >> 11 if block_size < 128 * KiB else 0
    return 1 + block_size + (block_size >> 8) + small


MAX_STORED_SIZE = stored_size_limit(MAX_BLOCK_SIZE)  # 4 MiB + 16 KiB + 1: any block on the wire or at rest


def size_problem(value: bytes, block_size: int = MAX_BLOCK_SIZE, *, at_rest: bool = False) -> str:
    """Why the stored value ``value`` cannot be a block of at most ``block_size`` bytes, or "" when it
    can. Cheap (a length and a frame header), so it runs before a received value is hashed, decoded
    or stored. A decoded size is what a zstd frame declares. From the network, a frame that declares
    none (our encoder always declares it) or whose header cannot be read is refused: the size must be
    known before the bytes are kept. ``at_rest``: those are left to the decoder, which stops at
    ``block_size`` anyway and reports them as undecodable."""
    limit = stored_size_limit(block_size)
    if len(value) > limit:
        return f"{len(value)} stored bytes, over {limit}, the most a block of block size {block_size} takes"
    if not value:
        return "an empty value (no codec byte)"
    if value[0] == CODEC_ZSTD:
        try:
            declared = zstandard.frame_content_size(memoryview(value)[1:])
        except zstandard.ZstdError as err:
            return "" if at_rest else f"an unreadable zstd frame ({err})"
        if declared < 0 and not at_rest:
            return "a zstd frame that does not declare its size"
        if declared > block_size:
            return f"it decodes to {declared} bytes, more than the block size {block_size}"
    elif value[0] == CODEC_LZ4:
        declared = _lz4_size(value)
        if declared < 0:
            return "an lz4 block too short to declare its size"
        if declared > block_size:
            return f"it decodes to {declared} bytes, more than the block size {block_size}"
    return ""


def decode_stored(digest: bytes, value: bytes, block_size: int = MAX_BLOCK_SIZE) -> bytes:
    """Decode a stored value of the local store, without hashing it: what reaches the store was
    verified on its way in (ingest hashes it, a block from another machine is checked against its id),
    and at rest RocksDB's block checksums refuse damaged records (BlockUnreadable). A value that cannot
    be decoded is BlockCorrupt, never missing; one that decodes to other bytes than its id says is
    left to the scrub, which hashes every block on purpose (cachepoint/store/scrub.py). A value that
    would decode to more than ``block_size`` bytes is refused before it is decoded (a zstd frame of a
    few bytes can declare gigabytes)."""
    if problem := size_problem(value, block_size, at_rest=True):
        raise BlockOversized(BlockId(digest), problem)
    try:
        return decode_block(value, block_size)
    except (ValueError, zstandard.ZstdError, lz4.block.LZ4BlockError) as err:
        raise BlockCorrupt(BlockId(digest), f"undecodable ({err})") from err


def decode_batch(
    values: dict[bytes, bytes], block_size: int = MAX_BLOCK_SIZE
) -> dict[bytes, bytes | memoryview]:
    """``decode_stored`` of many values, the zstd frames in one call that holds no GIL: a thread that
    decodes block by block takes the GIL back after each, and waits for it while the event loop
    runs (a real-image NBD copy with half its blocks missing the read cache: 1.46-1.57 s against
    1.58-1.66 s). Those blocks are views into one buffer of the batch: to copy, not to keep. Any
    frame the batch cannot take (no declared size, damage) sends the lot down the one-by-one path,
    which names the block at fault."""
    out: dict[bytes, bytes | memoryview] = {}
    batch: list[bytes] = []
    frames: list[memoryview] = []
    for digest, value in values.items():
        if value[:1] == _ZSTD_BYTE:
            if problem := size_problem(value, block_size, at_rest=True):
                raise BlockOversized(BlockId(digest), problem)
            batch.append(digest)
            frames.append(memoryview(value)[1:])
        else:
            out[digest] = decode_stored(digest, value, block_size)
    if frames:
        try:
            decoded = _decompressor().multi_decompress_to_buffer(frames)
        except (zstandard.ZstdError, ValueError):  # ValueError: a frame that declares no size
            return {digest: decode_stored(digest, value, block_size) for digest, value in values.items()}
        for digest, segment in zip(batch, decoded, strict=True):
            out[digest] = memoryview(segment)
    return out


def decode_verified(digest: bytes, value: bytes, block_size: int = MAX_BLOCK_SIZE) -> bytes:
    """Decode a stored value and check it against its id (SHA-256, ~35 µs per 64 KiB): for blocks
    from another machine, and for the checks that look for rot on purpose (scrub, fsck, heal)."""
    data = decode_stored(digest, value, block_size)
    actual = block_digest(data)
    if actual != digest:
        raise BlockCorrupt(BlockId(digest), BlockId(actual))
    return data


def raw_size(value: bytes) -> int:
    """The raw length of a stored value, without decompressing it (zstd frames and lz4 values carry it)."""
    if value[0] == CODEC_ZSTD:
        return zstandard.frame_content_size(value[1:])
    if value[0] == CODEC_LZ4:
        return _lz4_size(value)
    return len(value) - 1
