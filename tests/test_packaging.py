"""The wheel operators install: the .proto files beside the code made from them, the license, no cap on
the Python version, and the reflection service's dependency. Built once with pip, as a release would."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q"]
        + ["-w", str(out)],
        check=True,
        timeout=300,
    )
    (built,) = out.glob("cachepoint-*.whl")
    return zipfile.ZipFile(built)


def metadata(wheel: zipfile.ZipFile) -> dict[str, list[str]]:
    (name,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
    parsed = Parser().parsestr(wheel.read(name).decode())
    return {key: parsed.get_all(key) or [] for key in set(parsed.keys())}


def test_the_wheel_ships_every_proto_file_as_it_is_in_proto(wheel: zipfile.ZipFile) -> None:
    sources = sorted((ROOT / "proto" / "cachepoint" / "v1").glob("*.proto"))
    assert sources
    for source in sources:
        assert wheel.read(f"cachepoint/v1/{source.name}") == source.read_bytes(), source.name


def test_the_wheel_carries_the_apache_license_and_no_python_version_cap(wheel: zipfile.ZipFile) -> None:
    (license_file,) = [n for n in wheel.namelist() if n.endswith("/LICENSE")]
    assert b"Apache License" in wheel.read(license_file)
    fields = metadata(wheel)
    assert fields["License-Expression"] == ["Apache-2.0"]
    assert fields["Requires-Python"] == [">=3.11"]
    assert any(dep.startswith("grpcio-reflection") for dep in fields["Requires-Dist"])
