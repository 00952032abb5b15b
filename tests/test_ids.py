from __future__ import annotations

import pytest

from cachepoint.errors import InvalidLayerName, InvalidRef, InvalidTag
from cachepoint.ids import BlockId, Ref, validate_layer_name, validate_tag


def test_a_block_id_names_its_algorithm_and_round_trips_through_text():
    block = BlockId.of(b"hello")
    text = str(block)
    assert text.startswith("sha256:") and len(text) == len("sha256:") + 64
    assert BlockId.parse(text) == block


@pytest.mark.parametrize("text", ["md5:abcd", "sha256:zz", "abc", "sha256:" + "00" * 31])
def test_malformed_block_ids_are_refused(text):
    with pytest.raises(ValueError):
        BlockId.parse(text)


@pytest.mark.parametrize(
    ("text", "layer", "number", "tag"),
    [
        ("os/win10@7", "os/win10", 7, None),
        ("os/win10:production", "os/win10", None, "production"),
        ("os/win10", "os/win10", None, "latest"),
        ("user/alice/desktop@1", "user/alice/desktop", 1, None),
    ],
)
def test_refs_parse_into_layer_and_selector(text, layer, number, tag):
    ref = Ref.parse(text)
    assert (ref.layer, ref.number, ref.tag) == (layer, number, tag)


@pytest.mark.parametrize(
    "text",
    ["os/win10@0", "os/win10@x", "os/win10@", "OS/Win10", "os//win10", "os/win10:", "os/win10:a b", "../x"],
)
def test_malformed_refs_are_refused_with_the_expected_forms(text):
    with pytest.raises(InvalidRef) as err:
        Ref.parse(text)
    assert "LAYER@N" in str(err.value)


@pytest.mark.parametrize("name", ["", "/os", "os/", "Os", "os/..", "a" * 300, "os/-x", "os/win 10"])
def test_invalid_layer_names_are_refused(name):
    with pytest.raises(InvalidLayerName):
        validate_layer_name(name)


def test_an_all_digit_tag_is_refused_because_it_reads_as_a_version():
    with pytest.raises(InvalidTag):
        validate_tag("123")
