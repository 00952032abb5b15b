"""The generated code under cachepoint/v1 must be what `make proto` makes of proto/ today."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def test_committed_generated_code_matches_the_protos(tmp_path: Path):
    protos = sorted(str(p.relative_to(REPO / "proto")) for p in (REPO / "proto").rglob("*.proto"))
    assert protos, "no .proto files found"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-Iproto",
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            *[f"proto/{p}" for p in protos],
        ],
        cwd=REPO,
        check=True,
    )
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.py*"))
    assert generated
    stale = [str(p) for p in generated if not filecmp.cmp(tmp_path / p, REPO / p, shallow=False)]
    assert not stale, f"run `make proto`: stale generated files {stale}"
    committed = sorted(p.relative_to(REPO) for p in (REPO / "cachepoint" / "v1").glob("*_pb2*.py*"))
    assert committed == generated, "generated files without a .proto (or the reverse)"


def test_a_manifest_round_trips_through_its_wire_form():
    from cachepoint.ids import HOLE_DIGEST
    from cachepoint.model import EntryType, FileEntry, Manifest
    from cachepoint.wire import manifest_digest, manifest_from_bytes, manifest_to_bytes

    entry = FileEntry(
        "disk.img", EntryType.FILE, 0o640, 3 * 65536, 123, blocks=b"\x01" * 32 + HOLE_DIGEST * 2
    )
    manifest = Manifest(65536, True, (entry,))
    raw = manifest_to_bytes(manifest)
    assert manifest_from_bytes(raw) == manifest
    assert manifest_digest(raw) == manifest_digest(manifest_to_bytes(manifest_from_bytes(raw)))
