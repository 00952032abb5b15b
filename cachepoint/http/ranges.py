"""HTTP range requests and validators (RFC 9110 §13, §14): parsing and framing only, no I/O.

A malformed Range header is ignored (the whole representation is sent), never an error: RFC 9110
§14.2 lets a server ignore it, and a client that sent nonsense still gets correct bytes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Ranges kept after coalescing; more is a broken client or an amplification attempt (RFC 9110
# §14.2), answered with the whole representation as Apache's MaxRanges does.
MAX_RANGES = 64
# Positions longer than this are larger than any representation; capping them keeps int() away
# from Python's 4300-digit conversion limit.
_MAX_DIGITS = 19
_HUGE = 10**_MAX_DIGITS
_SPEC_RE = re.compile(r"^([0-9]*)-([0-9]*)$")
# An entity tag: optional weakness prefix, then a quoted string without quotes (RFC 9110 §8.8.3).
_ETAG_RE = re.compile(r'\s*(W/)?("[^"]*")\s*(?:,|$)')


class RangeNotSatisfiable(Exception):
    """None of the requested ranges overlaps the representation: the caller answers 416."""

    def __init__(self, header: str, size: int) -> None:
        super().__init__(f"no range in {header!r} overlaps the {size} bytes of this object")
        self.size = size


@dataclass(frozen=True, slots=True)
class ByteRange:
    """Bytes [start, stop) of a representation; never empty."""

    start: int
    stop: int

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.stop:
            raise ValueError(f"byte range [{self.start}, {self.stop}) is empty or negative")

    @property
    def length(self) -> int:
        return self.stop - self.start

    def content_range(self, size: int) -> str:
        return f"bytes {self.start}-{self.stop - 1}/{size}"


def _number(digits: str) -> int:
    return _HUGE if len(digits) > _MAX_DIGITS else int(digits)


def parse_range(header: str, size: int) -> list[ByteRange] | None:
    """The ranges of a Range header for a representation of ``size`` bytes, in the order asked.

    None means "send the whole representation": the header is malformed, names another unit, asks
    for too many ranges, or the representation is empty (no byte range of it can be expressed).
    Raises RangeNotSatisfiable when the header is valid but no range starts inside the object.
    """
    unit, sep, specs = header.partition("=")
    if not sep or unit.strip().lower() != "bytes" or size <= 0:
        return None
    ranges: list[ByteRange] = []
    seen = 0
    for raw in specs.split(","):
        spec = raw.strip(" \t")
        if not spec:  # the list syntax (RFC 9110 §5.6.1) allows empty elements: skip them
            continue
        match = _SPEC_RE.match(spec)
        if match is None:
            return None
        first, last = match.groups()
        if not first and not last:
            return None
        seen += 1
        if not first:  # suffix: the last N bytes
            suffix = _number(last)
            if suffix > 0:
                ranges.append(ByteRange(max(0, size - suffix), size))
            continue
        start = _number(first)
        stop = size if not last else _number(last) + 1
        if last and stop <= start:  # last before first is invalid syntax, not merely unsatisfiable
            return None
        if start < size:
            ranges.append(ByteRange(start, min(stop, size)))
    if not seen:
        return None
    if not ranges:
        raise RangeNotSatisfiable(header, size)
    if _overlapping(ranges):
        ranges = _coalesce(ranges)
    return ranges if len(ranges) <= MAX_RANGES else None


def _overlapping(ranges: list[ByteRange]) -> bool:
    ordered = sorted(ranges, key=lambda r: r.start)
    return any(b.start < a.stop for a, b in zip(ordered, ordered[1:], strict=False))


def _coalesce(ranges: list[ByteRange]) -> list[ByteRange]:
    """Merge overlapping and touching ranges, in ascending order (RFC 9110 §14.2 allows both), so an
    overlapping request can never make the server send more bytes than the object holds."""
    merged: list[ByteRange] = []
    for r in sorted(ranges, key=lambda r: r.start):
        if merged and r.start <= merged[-1].stop:
            merged[-1] = ByteRange(merged[-1].start, max(merged[-1].stop, r.stop))
        else:
            merged.append(r)
    return merged


# -- validators ----------------------------------------------------------------------------------


def _entity_tags(header: str) -> list[tuple[bool, str]] | None:
    """(weak, quoted tag) pairs of an If-None-Match or If-Range value; None if it does not parse."""
    tags: list[tuple[bool, str]] = []
    pos = 0
    text = header.strip()
    while pos < len(text):
        match = _ETAG_RE.match(text, pos)
        if match is None:
            return None
        tags.append((match.group(1) is not None, match.group(2)))
        pos = match.end()
    return tags


def none_match(header: str | None, etag: str) -> bool:
    """True when If-None-Match names the current representation (weak comparison, RFC 9110 §13.1.2):
    a GET or HEAD then answers 304."""
    if header is None:
        return False
    if header.strip() == "*":
        return True
    tags = _entity_tags(header)
    return tags is not None and any(tag == etag for _, tag in tags)


def range_allowed(if_range: str | None, etag: str) -> bool:
    """Whether to honour Range under If-Range (RFC 9110 §13.1.5): only a strong ETag equal to ours.

    A date is never taken as a match because no Last-Modified is sent (a tag moved back to an
    older version would make dates lie); the client then gets the whole, current representation.
    """
    if if_range is None:
        return True
    tags = _entity_tags(if_range)
    return tags is not None and len(tags) == 1 and tags[0] == (False, etag)


# -- multipart/byteranges ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Multipart:
    """The framing of a multipart/byteranges body (RFC 9110 §14.6): the bytes written before each
    range and after the last, so the Content-Length is known before the first block is read."""

    content_type: str
    parts: list[tuple[bytes, ByteRange]]
    closing: bytes

    @property
    def content_length(self) -> int:
        return sum(len(head) + r.length for head, r in self.parts) + len(self.closing)


def multipart(ranges: list[ByteRange], size: int, part_type: str, boundary: str) -> Multipart:
    parts = []
    for index, r in enumerate(ranges):
        # Each delimiter after the first starts with the CRLF that ends the previous part's data.
        lead = "" if index == 0 else "\r\n"
        head = (
            f"{lead}--{boundary}\r\nContent-Type: {part_type}\r\n"
            f"Content-Range: {r.content_range(size)}\r\n\r\n"
        )
        parts.append((head.encode("ascii"), r))
    closing = f"\r\n--{boundary}--\r\n".encode("ascii")
    return Multipart(f"multipart/byteranges; boundary={boundary}", parts, closing)
