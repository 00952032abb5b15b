"""fsck finds a block corrupted on disk and names every version that uses it.

Two kinds of damage: bytes flipped inside a RocksDB SST file (RocksDB's own block checksum catches
it), and a block value replaced by other well-formed bytes (bit rot RocksDB cannot see: only the
block's SHA-256 id catches it). The victim block is shared by two layers and absent from a newer
version of one of them, so the versions fsck names must be exactly the two that contain it.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import pytest

from cachepoint.blocks import CODEC_RAW, CODEC_ZSTD
from cachepoint.ids import BlockId
from cachepoint.store.store import Store
from tests.conftest import run_cli, sha256_file
from tests.damage import flip_value_in_sst

BLOCK = 64 * 1024
ZERO = bytes(BLOCK)


def random_block(seed: int) -> bytes:
    return random.Random(seed).randbytes(BLOCK)


def text_block(seed: int) -> bytes:
    """Compressible and unique: stored zstd-compressed."""
    rng = random.Random(seed)
    words = [
        rng.choice(("disk", "layer", "block", "image", "kernel")) + str(rng.randrange(100)) for _ in range(64)
    ]
    return (" ".join(words).encode() * (BLOCK // 256 + 1))[:BLOCK]


# os/x@1 and app/y@1 share VICTIM and SHARED_TEXT; os/x@2 has neither (both replaced), but shares the rest.
VICTIM = random_block(1)
SHARED_TEXT = text_block(2)
X1 = [VICTIM, random_block(3), SHARED_TEXT, ZERO, text_block(4), random_block(5), ZERO, random_block(6)]
X2 = [
    random_block(7),
    random_block(3),
    text_block(8),
    ZERO,
    text_block(4),
    random_block(5),
    ZERO,
    random_block(6),
]
Y1 = [random_block(9), VICTIM, text_block(10), SHARED_TEXT, random_block(3)]
TOUCHED = ["app/y@1", "os/x@1"]


def digest_of(block: bytes) -> bytes:
    return hashlib.sha256(block).digest()


@pytest.fixture
def images(tmp_path: Path) -> dict[str, Path]:
    paths = {}
    for name, blocks in (("x1", X1), ("x2", X2), ("y1", Y1)):
        paths[name] = tmp_path / f"{name}.img"
        paths[name].write_bytes(b"".join(blocks))
    return paths


@pytest.fixture
def populated(store_dir: Path, cli, images: dict[str, Path]) -> Path:
    cli("ingest", "os/x", images["x1"], "--json")
    cli("ingest", "os/x", images["x2"], "--json")
    cli("ingest", "app/y", images["y1"], "--json")
    report = cli("fsck", "--json").json()
    assert report["ok"] and report["versions"] == 3
    return store_dir


def fsck_problems(store_dir: Path) -> list[dict]:
    result = run_cli(store_dir, "fsck", "--json", check=False)
    assert result.code == 8, f"fsck exited {result.code}:\n{result.out}\n{result.err}"
    report = result.json()
    assert report["ok"] is False
    return report["problems"]


@pytest.fixture
def flipped(populated: Path) -> bytes:
    """Flip bytes of VICTIM's stored value inside its SST file; returns the victim's digest."""
    victim = digest_of(VICTIM)
    with Store.open(populated) as store:
        stored = store.blocks.raw(victim)
    assert stored is not None and stored[0] == CODEC_RAW  # random data is kept raw
    flip_value_in_sst(populated, stored)
    return victim


def test_fsck_names_a_block_flipped_inside_an_sst_file_and_the_versions_using_it(
    populated: Path, flipped: bytes, images: dict[str, Path], tmp_path: Path
) -> None:
    problems = fsck_problems(populated)
    assert len(problems) == 1, problems
    problem = problems[0]
    assert problem["subject"] == str(BlockId(flipped))
    # RocksDB's checksum refuses the read before the block's own id is checked.
    assert problem["kind"] in ("unreadable-block", "corrupt-block")
    assert problem["versions"] == TOUCHED

    # The version without the block is unaffected.
    out = tmp_path / "x2-exported.img"  # not the source image itself (fixture images)
    run_cli(populated, "export", "os/x@2", out)
    assert sha256_file(out) == sha256_file(images["x2"])


def test_exporting_a_version_whose_block_the_database_cannot_read_names_the_block(
    populated: Path, flipped: bytes, tmp_path: Path
) -> None:
    # A damaged store is an expected condition, not a bug: the user must learn which block is
    # bad (to run fsck or fetch it again), not read an "internal error".
    for ref in TOUCHED:
        failed = run_cli(populated, "export", ref, tmp_path / "bad.img", check=False)
        assert failed.code != 0, f"export of {ref} succeeded with an unreadable block"
        assert "internal error" not in failed.err, failed.err
        assert str(BlockId(flipped)) in failed.err, failed.err


# Export reads blocks verified once (at ingest, on arrival) and does not hash them again: it refuses
# a value it cannot decode, while other well-formed bytes under a sound RocksDB record (written wrong,
# not rotted at rest: rot in an SST fails RocksDB's checksum, the test above) are fsck's and the
# scrub's to find, which hash every block on purpose.
@pytest.mark.parametrize(
    ("rotten", "export_refuses"),
    [
        pytest.param(bytes((CODEC_RAW,)) + random_block(99), False, id="other-raw-bytes"),
        pytest.param(bytes((CODEC_ZSTD,)) + random_block(98)[:4096], True, id="undecodable-zstd"),
    ],
)
def test_fsck_names_a_block_whose_bytes_rotted_below_the_database_and_export_refuses_it(
    populated: Path, images: dict[str, Path], tmp_path: Path, rotten: bytes, export_refuses: bool
) -> None:
    victim = digest_of(SHARED_TEXT)
    # Replace the value the way an ingest writes one, so RocksDB's checksums are all valid: only
    # the block's own id can tell that these are not its bytes.
    with Store.open(populated, writable=True) as store:
        assert store.blocks.raw(victim) is not None
        store.blocks.put_many([(victim, rotten)])
        store.blocks.persist()

    problems = fsck_problems(populated)
    assert [(p["kind"], p["subject"], p["versions"]) for p in problems] == [
        ("corrupt-block", str(BlockId(victim)), TOUCHED)
    ]

    for ref in TOUCHED if export_refuses else ():
        failed = run_cli(populated, "export", ref, tmp_path / "bad.img", check=False)
        assert failed.code != 0, f"export of {ref} succeeded with a corrupt block"
        assert str(BlockId(victim)) in failed.err and "corrupt" in failed.err, failed.err
        assert "internal error" not in failed.err
    out = tmp_path / "x2-exported.img"  # not the source image itself (fixture images)
    run_cli(populated, "export", "os/x@2", out)
    assert sha256_file(out) == sha256_file(images["x2"])
