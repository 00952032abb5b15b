"""Settings of `cachepoint-coordinator serve`: defaults, then a TOML file, then flags.

data = "/srv/cachepoint/coordinator"   # the embedded store
listen = "0.0.0.0:7400"
http = "127.0.0.1:7480"                # REST for history, holds and audit (empty: none)
gc_every = "1d"                        # retention GC on a schedule (default "0": only `history gc`)

[retention.user]                       # see coordinator/history/retention.py
keep_last = 10
keep_daily = 7
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

from cachepoint.errors import InvalidInput
from cachepoint.model import LayerKind
from coordinator.history.retention import Retention, RetentionPolicy, parse_policies


@dataclass
class CoordinatorSettings:
    data: str = ""
    """Directory of the embedded store (blocks, catalog, event log, audit log, holds)."""
    listen: str = "127.0.0.1:7400"
    """HOST:PORT of the gRPC server (Catalog, BlockExchange, Fleet, History, health)."""
    http: str = ""
    """HOST:PORT of the REST server for history, holds and audit; empty: none."""
    gc_every: str = "0"
    """Run the retention GC this often, e.g. "1d" (0: only when `history gc` asks)."""
    retention: dict[LayerKind, RetentionPolicy] = field(default_factory=dict)
    """Retention policy per layer kind (the ``[retention.KIND]`` tables); a kind without one keeps
    every version."""

    @property
    def retention_rules(self) -> Retention:
        return Retention(dict(self.retention))


def load(path: Path | None) -> CoordinatorSettings:
    settings = CoordinatorSettings()
    if path is None:
        return settings
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise InvalidInput(f"cannot read config {path}: {err}") from err
    known = {f.name for f in fields(settings)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise InvalidInput(f"config {path}: unknown keys {unknown} (known: {sorted(known)})")
    for key, value in data.items():
        if key == "retention":
            settings.retention = parse_policies(value, str(path))
        elif isinstance(value, dict | list):
            raise InvalidInput(f"config {path}: {key} must be a string")
        else:
            setattr(settings, key, str(value))
    return settings
