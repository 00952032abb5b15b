"""HTTP: Range, If-None-Match and If-Range parsing and multipart framing, without a server."""

from __future__ import annotations

import pytest

from cachepoint.http.ranges import (
    MAX_RANGES,
    ByteRange,
    RangeNotSatisfiable,
    multipart,
    none_match,
    parse_range,
    range_allowed,
)
from cachepoint.http.reader import spans
from cachepoint.layers.export import PlacedFile
from cachepoint.model import EntryType, FileEntry

SIZE = 1000


def test_the_three_forms_of_a_byte_range_resolve_against_the_size():
    assert parse_range("bytes=0-9", SIZE) == [ByteRange(0, 10)]
    assert parse_range("bytes=990-", SIZE) == [ByteRange(990, 1000)]
    assert parse_range("bytes=-10", SIZE) == [ByteRange(990, 1000)]
    assert parse_range("bytes=-5000", SIZE) == [ByteRange(0, 1000)]
    assert parse_range("bytes=999-5000", SIZE) == [ByteRange(999, 1000)]


def test_the_unit_is_case_insensitive_and_whitespace_and_empty_elements_are_allowed():
    assert parse_range("Bytes = 0-1 ,\t, 5-6", SIZE) == [ByteRange(0, 2), ByteRange(5, 7)]


@pytest.mark.parametrize(
    "header",
    ["bytes=", "bytes=,", "bytes=-", "bytes=9-3", "bytes=a-b", "bytes=1-2-3", "bytes 1-2", "lines=1-2",
     "bytes=0-1,junk", "bytes=\u0661-\u0662", "bytes=+1-2", "bytes=1 -2"],
)  # fmt: skip
def test_a_malformed_header_means_send_everything(header):
    assert parse_range(header, SIZE) is None


def test_ranges_of_an_empty_object_are_ignored():
    assert parse_range("bytes=0-0", 0) is None


def test_ranges_starting_past_the_end_are_dropped_and_none_left_is_unsatisfiable():
    assert parse_range("bytes=1000-,0-0", SIZE) == [ByteRange(0, 1)]
    with pytest.raises(RangeNotSatisfiable) as caught:
        parse_range("bytes=1000-1001,-0", SIZE)
    assert caught.value.size == SIZE


def test_huge_positions_are_past_any_end_rather_than_an_error():
    digits = "9" * 5000  # beyond Python's default int() digit limit
    assert parse_range(f"bytes=0-{digits}", SIZE) == [ByteRange(0, SIZE)]
    assert parse_range(f"bytes=-{digits}", SIZE) == [ByteRange(0, SIZE)]
    with pytest.raises(RangeNotSatisfiable):
        parse_range(f"bytes={digits}-", SIZE)


def test_disjoint_ranges_keep_their_order_and_overlapping_ones_are_merged_in_ascending_order():
    assert parse_range("bytes=500-599,0-9", SIZE) == [ByteRange(500, 600), ByteRange(0, 10)]
    assert parse_range("bytes=500-599,0-9,5-20,21-30", SIZE) == [ByteRange(0, 31), ByteRange(500, 600)]


def test_too_many_ranges_mean_send_everything():
    many = ",".join(f"{i * 10}-{i * 10 + 1}" for i in range(MAX_RANGES + 1))
    assert parse_range("bytes=" + many, SIZE) is None
    # Thousands of copies of one range coalesce to one, which is served.
    assert parse_range("bytes=" + ",".join(["0-99"] * 5000), SIZE) == [ByteRange(0, 100)]


def test_if_none_match_compares_weakly_and_star_matches_anything():
    etag = '"abc"'
    assert none_match('"abc"', etag)
    assert none_match('W/"abc"', etag)
    assert none_match(' "x" , W/"abc" ', etag)
    assert none_match("*", etag)
    assert not none_match(None, etag)
    assert not none_match('"abcd"', etag)
    assert not none_match("abc", etag)  # unquoted: does not parse, so no match


def test_if_range_needs_the_identical_strong_etag():
    etag = '"abc"'
    assert range_allowed(None, etag)
    assert range_allowed('"abc"', etag)
    assert not range_allowed('W/"abc"', etag)
    assert not range_allowed('"abc", "def"', etag)
    assert not range_allowed("Wed, 21 Oct 2015 07:28:00 GMT", etag)


def test_multipart_framing_announces_exactly_the_bytes_it_frames():
    ranges = [ByteRange(0, 10), ByteRange(100, 150)]
    body = multipart(ranges, SIZE, "application/octet-stream", "B0UND")
    assert body.content_type == "multipart/byteranges; boundary=B0UND"
    assert body.parts[0][0] == (
        b"--B0UND\r\nContent-Type: application/octet-stream\r\nContent-Range: bytes 0-9/1000\r\n\r\n"
    )
    assert body.parts[1][0].startswith(b"\r\n--B0UND\r\n")
    assert body.closing == b"\r\n--B0UND--\r\n"
    written = b"".join(head + bytes(r.length) for head, r in body.parts) + body.closing
    assert len(written) == body.content_length


def test_reads_are_cut_at_block_aligned_mebibytes():
    bs = 65536
    placed = PlacedFile(FileEntry("d.img", EntryType.FILE, 0o644, size=10 << 20), bs)
    cut = list(spans(placed, ByteRange(100, (3 << 20) + 5)))
    assert cut[0] == ByteRange(100, 1 << 20)
    assert cut[1] == ByteRange(1 << 20, 2 << 20)
    assert cut[-1] == ByteRange(3 << 20, (3 << 20) + 5)
    big = PlacedFile(FileEntry("d.img", EntryType.FILE, 0o644, size=10 << 20), 4 << 20)
    assert list(spans(big, ByteRange(0, 9 << 20))) == [
        ByteRange(0, 4 << 20),
        ByteRange(4 << 20, 8 << 20),
        ByteRange(8 << 20, 9 << 20),
    ]
