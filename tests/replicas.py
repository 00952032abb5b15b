"""Coordinator replicas for tests: several `cachepoint-coordinator serve` children over one PostgreSQL
database (tests/postgres.py) and one shared block directory, each with its own data directory (the
harness copies the fleet's CA into each)."""

from __future__ import annotations

from pathlib import Path

from cachepoint.store.store import Store
from coordinator.backends.choice import Backend
from tests.fleet import Child, Fleet


def shared_args(dsn: str, blocks: Path) -> list[str]:
    return ["--catalog", dsn, "--blocks", blocks.as_uri()]


def start_replicas(
    fleet: Fleet, dsn: str, blocks: Path, count: int, extra: list[str] | None = None
) -> list[Child]:
    return [
        fleet.coordinator(
            data=fleet.root / f"replica{i}",
            name=f"replica{i}",
            extra=[*shared_args(dsn, blocks), *(extra or [])],
        )
        for i in range(count)
    ]


def open_shared(dsn: str, blocks: Path, data: Path) -> Store:
    """The replicas' state as a replica opens it (the test reads the catalog through the real code)."""
    return Backend(data, dsn, blocks.as_uri()).open()
