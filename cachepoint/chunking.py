"""Content-aligned chunking of disk images: where a chunk ends, chosen by content, on unit boundaries.

File systems (ext4, XFS, NTFS) keep file data at 4 KiB-aligned offsets that move between versions. A
fixed grid cuts the same file differently wherever it lands; this chunker cuts only between units
(4 KiB by default) and decides by the unit's own bytes, so the same content at any aligned offset
gives the same chunks once the first boundary inside it is passed.

The rule (part of the manifest format: changing it changes every chunk id):
- a unit that is all zeros is a hole: it ends the chunk before it, and a run of them is one hole extent
  that is never stored or sent;
- else the unit joins the current chunk, which ends after it when the chunk has reached ``max_length``,
  or has reached ``min_length`` and the unit's xxh3-64 (seed 0: the same cut on every machine, unlike
  the per-store pre-filter) is below ``threshold``;
- a file's last unit may be short; the last chunk ends at the end of the file.

With p = unit / (average - min_length) the chance of a cut after each unit past the minimum, chunks
average ``average`` bytes (a little less, as max_length truncates the tail). min_length is half the
average (units before it are never hashed: the cut costs half the hash calls, and there are fewer
tiny chunks than a pure geometric law gives) and max_length four times it: a bound the store, the
fetcher and the coordinator check every chunk against.
"""

from __future__ import annotations

import bisect
from collections.abc import Container
from dataclasses import dataclass

import xxhash

from cachepoint.errors import InvalidBlockSize

KiB = 1024
DEFAULT_UNIT = 4 * KiB
DEFAULT_AVERAGE = 64 * KiB  # why 64 KiB rather than 32: docs/design.md, "Why 64 KiB"
MIN_UNIT = 512
MAX_AVERAGE = 1024 * KiB  # max_length then is 4 MiB, the largest block the store takes


@dataclass(frozen=True, slots=True)
class ChunkParams:
    unit: int = DEFAULT_UNIT
    average: int = DEFAULT_AVERAGE

    def __post_init__(self) -> None:
        if self.unit < MIN_UNIT or self.unit & (self.unit - 1):
            raise InvalidBlockSize(self.unit, f"a chunk unit is a power of two of at least {MIN_UNIT}")
        if self.average & (self.average - 1) or not 2 * self.unit <= self.average <= MAX_AVERAGE:
            raise InvalidBlockSize(
                self.average,
                f"a chunk average is a power of two from twice the unit ({2 * self.unit}) to {MAX_AVERAGE}",
            )

    @property
    def min_length(self) -> int:
        return max(self.unit, self.average // 2)

    @property
    def max_length(self) -> int:
        return self.average * 4

    @property
    def threshold(self) -> int:
        """A unit past the minimum ends its chunk when its xxh3-64 is below this."""
        return (1 << 64) * self.unit // (self.average - self.min_length + self.unit)


# An extent of a file: (start, length, hole). Holes are runs of all-zero units.
Extent = tuple[int, int, bool]


def cut(
    data: bytes,
    base: int,
    params: ChunkParams,
    final: bool,
    begin: int = 0,
    stop_at: Container[int] = (),
    zeros: list[int] | None = None,
) -> tuple[list[Extent], int]:
    """Cut ``data`` from index ``begin`` (a chunk start, unit-aligned; ``data`` starts at file offset
    ``base``, also unit-aligned) into extents.

    Returns the extents and the index in ``data`` where they end: without ``final`` the unfinished
    chunk at the end is left out (the caller passes those bytes again, followed by the next ones;
    the cut is the same as if the whole file had been passed at once). A hole at the end is returned
    (holes carry no state; adjacent ones are merged by ``merge_holes``). The cut also returns early
    when an extent ends at a file offset in ``stop_at`` (a re-ingest then tries the previous
    version's chunk there, see ``ends_by_content``). ``zeros``: ``zero_units(data, 0, len(data))``
    when the caller cuts the same data from several places (found once instead of once per call)."""
    unit, n = params.unit, len(data)
    lo, hi, threshold = params.min_length, params.max_length, params.threshold
    hash64 = xxhash.xxh3_64_intdigest
    view = memoryview(data)
    full_end = begin + (n - begin) // unit * unit
    if zeros is None:
        zeros = zero_units(data, begin, full_end, unit)
    else:
        zeros = [z for z in zeros[bisect.bisect_left(zeros, begin) :] if z < full_end]
    if final and full_end < n and data[full_end:] == _zero_unit(unit)[: n - full_end]:
        zeros.append(full_end)  # a short last unit of zeros is a hole too
    zeros.append(n + unit)  # a sentinel past the end
    next_zero = 0
    extents: list[Extent] = []
    start = pos = begin
    in_hole = False
    # Units are only hashed where a chunk may end (from min_length on: about half of them); zero units
    # were found above with C-speed scans; units in between are jumped over (~0.3 us per 4 KiB hash).
    while pos < n:
        end = pos + unit if pos + unit <= n else n
        if zeros[next_zero] == pos:
            next_zero += 1
            if not in_hole:
                if pos > start:
                    extents.append((base + start, pos - start, False))
                start, in_hole = pos, True
            pos = end
            continue
        if in_hole:
            extents.append((base + start, pos - start, True))
            start, in_hole = pos, False
            if base + start in stop_at:
                return extents, start
        length = end - start
        if length < lo:
            # The first unit that may end this chunk ends at start + min_length: go there, unless a
            # zero unit (or the end of the data) comes first. (A short last unit may sit before that
            # point: then ``end`` is the end of the data.)
            pos = min(max(start + lo - unit, end), zeros[next_zero], n)
            continue
        if length >= hi or hash64(view[pos:end]) < threshold:
            extents.append((base + start, length, False))
            start = end
            if base + start in stop_at:
                return extents, start
        pos = end
    if in_hole:
        extents.append((base + start, n - start, True))
        start = n
    elif final and start < n:
        extents.append((base + start, n - start, False))
        start = n
    return extents, start


def zero_units(data: bytes, begin: int, stop: int, unit: int) -> list[int]:
    """Offsets of the all-zero units in ``data[begin:stop]``: units whose first, middle and last bytes
    are zero (three strided slices, OR-ed as integers: C speed) are then counted in full."""
    if stop <= begin:
        return []
    firsts = data[begin:stop:unit]
    middles = data[begin + unit // 2 : stop : unit]
    lasts = data[begin + unit - 1 : stop : unit]
    merged = (int.from_bytes(firsts) | int.from_bytes(middles) | int.from_bytes(lasts)).to_bytes(len(firsts))
    found: list[int] = []
    zero = _zero_unit(unit)
    index = merged.find(0)
    while index != -1:
        at = begin + index * unit
        if data[at : at + unit] == zero:  # a copy and a memcmp: ~10x faster than bytes.count(0)
            found.append(at)
        index = merged.find(0, index + 1)
    return found


def ends_by_content(chunk: bytes | memoryview, params: ChunkParams) -> bool:
    """Whether the cut ends a chunk of these bytes after its last unit whatever follows (a chunk the
    previous version had can then be taken whole, without cutting its units again): it is as long as
    a chunk may be, or long enough and its last unit's hash says so. A chunk that ended at a hole or
    at the end of the file does not qualify."""
    length = len(chunk)
    if length % params.unit:
        return False
    if length == params.max_length:
        return True
    last = xxhash.xxh3_64_intdigest(chunk[length - params.unit :])
    return params.min_length <= length < params.max_length and last < params.threshold


def merge_holes(extents: list[Extent]) -> list[Extent]:
    merged: list[Extent] = []
    for extent in extents:
        if extent[2] and merged and merged[-1][2]:
            first = merged[-1]
            merged[-1] = (first[0], first[1] + extent[1], True)
        else:
            merged.append(extent)
    return merged


_zero_units_by_size: dict[int, bytes] = {}


def _zero_unit(unit: int) -> bytes:
    found = _zero_units_by_size.get(unit)
    if found is None:
        found = _zero_units_by_size[unit] = bytes(unit)
    return found


# -- unit digests: what a receiver matches a new chunk's units against (docs/design.md "Unit fetch") --

UNIT_DIGEST_SIZE = 16
MAX_UNIT = 4 * 1024 * KiB


def unit_count(length: int, unit: int) -> int:
    return -(-length // unit)


def unit_digests(data: bytes | memoryview, unit: int) -> bytes:
    """The xxh3-128 (seed 0: the same on every machine) of each ``unit`` bytes of ``data``, packed; the
    last unit may be short. A hint, never an identity: a chunk assembled from units matched by these
    is checked against its SHA-256 id before it is kept (a collision then costs a whole-chunk fetch)."""
    digest = xxhash.xxh3_128_digest
    view = memoryview(data)  # slices of a view hash in place; slices of bytes would copy each unit
    return b"".join([digest(view[at : at + unit]) for at in range(0, len(data), unit)])


def valid_unit(unit: int) -> bool:
    return MIN_UNIT <= unit <= MAX_UNIT and not unit & (unit - 1)


def pack_mask(indexes: list[int]) -> bytes:
    """A bitmap naming ``indexes`` (least significant bit first, as HasBlocks answers)."""
    mask = bytearray((max(indexes) + 8) // 8 if indexes else 0)
    for index in indexes:
        mask[index // 8] |= 1 << (index % 8)
    return bytes(mask)


def mask_indexes(mask: bytes) -> list[int]:
    return [at * 8 + bit for at, byte in enumerate(mask) if byte for bit in range(8) if byte >> bit & 1]


def select_units(data: bytes | memoryview, unit: int, indexes: list[int]) -> bytes:
    view = memoryview(data)
    return b"".join(view[i * unit : (i + 1) * unit] for i in indexes)
