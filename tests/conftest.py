"""Shared fixtures: a store directory, and the real `cachepoint` command run as a child process."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def sha256_file(path: Path) -> str:
    """SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class Run:
    code: int
    out: str
    err: str

    def json(self) -> object:
        return json.loads(self.out)


def cli_env(store: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["CACHEPOINT_STORE"] = str(store)
    env["CACHEPOINT_CONFIG"] = ""
    env["XDG_CONFIG_HOME"] = str(store.parent / "xdg-config")  # no stray user config
    env.pop("CACHEPOINT_DEBUG", None)
    return env


def run_cli(store: Path, *args: str | Path, check: bool = True, timeout: float = 300) -> Run:
    proc = subprocess.run(
        [sys.executable, "-m", "cachepoint", *map(str, args)],
        env=cli_env(store),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )
    result = Run(proc.returncode, proc.stdout, proc.stderr)
    if check and proc.returncode != 0:
        raise AssertionError(f"cachepoint {args} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return result


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def cli(store_dir: Path):
    def call(*args: str | Path, check: bool = True) -> Run:
        return run_cli(store_dir, *args, check=check)

    return call
