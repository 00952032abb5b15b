"""Settings of `cachepoint-coordinator serve`: defaults, then a TOML file, then flags.

data = "/srv/cachepoint/coordinator"   # the embedded store
listen = "0.0.0.0:7400"
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cachepoint.config import apply_toml


@dataclass
class CoordinatorSettings:
    data: str = ""
    """Directory of the embedded store (blocks, catalog, event log)."""
    listen: str = "127.0.0.1:7400"
    """HOST:PORT of the gRPC server (Catalog, BlockExchange, Fleet, health)."""


def load(path: Path | None) -> CoordinatorSettings:
    settings = CoordinatorSettings()
    if path is not None:
        apply_toml(settings, path)
    return settings
