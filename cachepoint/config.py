"""Settings of the `cachepoint` command: defaults, then a TOML file, then the environment, then flags.

The TOML keys are the field names, e.g.::

    store = "/var/lib/cachepoint"
    block_size = "64K"
    author = "image-team"
    device = "build-01"
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path

from cachepoint.errors import InvalidInput

ENV_STORE = "CACHEPOINT_STORE"
ENV_CONFIG = "CACHEPOINT_CONFIG"


def default_config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "cachepoint" / "config.toml"


def default_store_path() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "cachepoint"


@dataclass
class Settings:
    store: str = ""
    """The store directory (holds ``db/``). Default: $XDG_DATA_HOME/cachepoint."""
    block_size: str = "64K"
    """Block size of new layers: a power of two from 4K to 4M."""
    author: str = ""
    """Recorded as the author of new versions. Default: the login name."""
    device: str = ""
    """Recorded as the device of new versions. Default: the host name."""


def load_settings(config_path: str | None, store_flag: str | None) -> Settings:
    settings = Settings()
    explicit = config_path or os.environ.get(ENV_CONFIG)
    path = Path(explicit) if explicit else default_config_path()
    if path.exists():
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as err:
            raise InvalidInput(f"cannot read config {path}: {err}") from err
        known = {f.name for f in fields(Settings)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidInput(f"config {path}: unknown keys {unknown} (known: {sorted(known)})")
        for key, value in data.items():
            setattr(settings, key, str(value))
    elif explicit:
        raise InvalidInput(f"config file {path} does not exist")
    if os.environ.get(ENV_STORE):
        settings.store = os.environ[ENV_STORE]
    if store_flag:
        settings.store = store_flag
    if not settings.store:
        settings.store = str(default_store_path())
    return settings
