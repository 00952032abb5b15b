"""Images: stacks of layers composited into one tree or one disk."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from tests.test_roundtrip import sha256_of

BS = 65536


def test_a_tree_image_lets_upper_layers_win_and_whiteouts_hide_lower_paths(cli, tmp_path):
    base, app = tmp_path / "base", tmp_path / "app"
    (base / "etc").mkdir(parents=True)
    (base / "etc" / "os.conf").write_text("base")
    (base / "etc" / "motd").write_text("hello")
    (base / "opt" / "old").mkdir(parents=True)
    (base / "opt" / "old" / "bin").write_text("old app")
    (app / "etc").mkdir(parents=True)
    (app / "etc" / "os.conf").write_text("overridden")
    (app / "etc" / ".wh.motd").write_text("")
    (app / "opt").mkdir()
    (app / "opt" / ".wh.old").write_text("")
    (app / "opt" / "new").write_text("new app")
    cli("ingest", "os/base", base)
    cli("ingest", "app/tool", app)
    cli("image", "create", "desk", "os/base", "app/tool")
    dest = tmp_path / "out"
    run = cli("image", "export", "desk", dest, "--json").json()
    assert run["layers"] == ["os/base@1", "app/tool@1"]
    assert (dest / "etc" / "os.conf").read_text() == "overridden"
    assert not (dest / "etc" / "motd").exists()
    assert not (dest / "opt" / "old").exists()
    assert (dest / "opt" / "new").read_text() == "new app"
    assert not list(dest.rglob(".wh.*")), "whiteout markers leaked into the composite"


def test_a_disk_image_takes_each_block_from_the_topmost_layer_that_has_it(cli, tmp_path):
    blocks = 16
    lower = [os.urandom(BS) for _ in range(blocks)]
    upper = [os.urandom(BS) if i % 3 == 0 else bytes(BS) for i in range(blocks)]
    (tmp_path / "os.img").write_bytes(b"".join(lower))
    (tmp_path / "user.img").write_bytes(b"".join(upper))
    cli("ingest", "os/disk", tmp_path / "os.img")
    cli("ingest", "user/alice/disk", tmp_path / "user.img")
    cli("image", "create", "alice", "os/disk", "user/alice/disk")
    cli("image", "export", "alice", tmp_path / "out.img")
    expected = b"".join(u if i % 3 == 0 else lo for i, (lo, u) in enumerate(zip(lower, upper, strict=True)))
    assert hashlib.sha256(expected).hexdigest() == sha256_of(tmp_path / "out.img")


def test_an_image_of_an_unknown_ref_or_of_mixed_kinds_is_refused(cli, tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_text("x")
    (tmp_path / "x.img").write_bytes(os.urandom(BS))
    cli("ingest", "app/tree", tmp_path / "d")
    cli("ingest", "os/disk", tmp_path / "x.img")
    missing = cli("image", "create", "bad", "os/disk", "app/nope", check=False)
    assert missing.code == 3 and "app/nope" in missing.err
    cli("image", "create", "mixed", "os/disk", "app/tree")
    mixed = cli("image", "export", "mixed", tmp_path / "out", check=False)
    assert mixed.code == 4 and "not both" in mixed.err


def test_clones_of_an_image_are_stored_once_plus_their_changes(cli, tmp_path: Path):
    from bench.gen_image import generate, mutate

    base = tmp_path / "base.img"
    generate(base, 8 << 20, seed=11)
    cli("ingest", "os/base", base)
    one = cli("stats", "--json").json()
    for i in range(4):
        clone = tmp_path / f"clone{i}.img"
        mutate(base, clone, 0.02, seed=100 + i)
        cli("ingest", f"os/clone{i}", clone)
        clone.unlink()
    many = cli("stats", "--json").json()
    assert many["logical_bytes"] == 5 * one["logical_bytes"]
    assert many["stored_bytes"] < 1.2 * one["stored_bytes"]
    assert many["dedup_ratio"] > 4
    assert one["compression_ratio"] > 1.1  # the text part of the image compresses
