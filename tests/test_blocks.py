from __future__ import annotations

import os

import pytest

from cachepoint.blocks import (
    CODEC_RAW,
    CODEC_ZSTD,
    block_digest,
    decode_verified,
    encode_block,
    is_hole,
    parse_block_size,
)
from cachepoint.errors import BlockCorrupt, InvalidBlockSize


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
