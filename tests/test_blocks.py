from __future__ import annotations

import os

import pytest

from cachepoint.blocks import (
    CODEC_LZ4,
    CODEC_RAW,
    CODEC_ZSTD,
    block_digest,
    decode_batch,
    decode_stored,
    decode_verified,
    encode_block,
    encode_fast,
    is_hole,
    parse_block_size,
    raw_size,
    size_problem,
)
from cachepoint.errors import BlockCorrupt, BlockOversized, InvalidBlockSize


@pytest.mark.parametrize(
    ("text", "size"),
    [("64K", 65536), ("4K", 4096), ("4M", 4 << 20), ("1m", 1 << 20), ("131072", 131072), ("8KiB", 8192)],
)
def test_block_sizes_parse_from_human_units(text, size):
    assert parse_block_size(text) == size


@pytest.mark.parametrize("text", ["48K", "2K", "8M", "65537", "abc", "0"])
def test_block_sizes_outside_powers_of_two_from_4k_to_4m_are_refused(text):
    with pytest.raises(InvalidBlockSize) as err:
        parse_block_size(text)
    assert repr(text) in str(err.value)


def test_only_all_zero_blocks_are_holes():
    assert is_hole(bytes(65536))
    assert not is_hole(bytes(65535) + b"\x01")


def test_compressible_blocks_are_stored_compressed_and_random_ones_raw():
    text = b"the quick brown fox " * 4000
    noise = os.urandom(65536)
    assert encode_block(text)[0] == CODEC_ZSTD and len(encode_block(text)) < len(text)
    assert encode_block(noise)[0] == CODEC_RAW and len(encode_block(noise)) == len(noise) + 1


def test_reading_back_verifies_the_block_against_its_id():
    data = os.urandom(4096)
    value = encode_block(data)
    assert decode_verified(block_digest(data), value) == data
    tampered = value[:-1] + bytes([value[-1] ^ 1])
    with pytest.raises(BlockCorrupt) as err:
        decode_verified(block_digest(data), tampered)
    assert "sha256:" in str(err.value)


def test_lz4_values_decode_like_zstd_ones_and_declare_their_size():
    text = b"the quick brown fox " * 3000
    fast, small = encode_fast(text), encode_block(text)
    assert fast[0] == CODEC_LZ4 and small[0] == CODEC_ZSTD
    assert raw_size(fast) == raw_size(small) == len(text)
    digest = block_digest(text)
    assert decode_verified(digest, fast) == decode_stored(digest, fast) == text
    noise = os.urandom(4096)
    assert encode_fast(noise) == bytes((CODEC_RAW,)) + noise  # lz4 saves nothing: kept raw
    # One batch of both codecs and raw, in any order.
    values = {digest: fast, block_digest(noise): encode_block(noise), b"z" * 32: small}
    assert {d: bytes(v) for d, v in decode_batch(values).items()} == {
        digest: text,
        block_digest(noise): noise,
        b"z" * 32: text,
    }


def test_an_lz4_value_that_declares_too_much_or_nothing_is_refused_before_it_is_decoded():
    text = b"abcd" * 1024
    fast = encode_fast(text)
    assert size_problem(fast, 4096) == ""
    assert "more than the block size 2048" in size_problem(fast, 2048)
    lying = fast[:1] + (1 << 30).to_bytes(4, "little") + fast[5:]  # a few bytes that claim 1 GiB
    assert "decodes to 1073741824 bytes" in size_problem(lying)
    with pytest.raises(BlockOversized):
        decode_stored(block_digest(text), lying)
    assert "too short" in size_problem(fast[:3])
    damaged = fast[:5] + bytes(len(fast) - 5)
    with pytest.raises(BlockCorrupt, match="undecodable"):
        decode_stored(block_digest(text), damaged)
