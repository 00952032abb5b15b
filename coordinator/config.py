"""Settings of `cachepoint-coordinator serve`: defaults, then a TOML file, then flags.

data = "/srv/cachepoint/coordinator"   # the embedded store
listen = "0.0.0.0:7400"
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, fields
from pathlib import Path

from cachepoint.errors import InvalidInput


@dataclass
class CoordinatorSettings:
    data: str = ""
    """Directory of the embedded store (blocks, catalog, event log)."""
    listen: str = "127.0.0.1:7400"
    """HOST:PORT of the gRPC server (Catalog, BlockExchange, Fleet, health)."""


def load(path: Path | None) -> CoordinatorSettings:
    settings = CoordinatorSettings()
    if path is None:
        return settings
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise InvalidInput(f"cannot read config {path}: {err}") from err
    known = {f.name for f in fields(CoordinatorSettings)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise InvalidInput(f"config {path}: unknown keys {unknown} (known: {sorted(known)})")
    for key, value in data.items():
        setattr(settings, key, str(value))
    return settings
