"""Settings of the `cachepoint` command: defaults, then a TOML file, then the environment, then flags.

The TOML keys are the field names, e.g.::

    store = "/var/lib/cachepoint"
    block_size = "64K"
    chunking = "content"
    chunk_average = "64K"
    author = "image-team"
    device = "build-01"
    coordinator = "coordinator.example:7400"   # for serve, publish, pull, scrub, repair, enroll
    identity = "/etc/cachepoint/identity"      # key and certificates to call the fleet with
    # for `cachepoint serve`
    listen = "0.0.0.0:7401"
    site = "branch-12"
    subscribe = ["os/win10:production", "app/office:production"]
    wan_rate = "100Mbit"
    site_fanout = true
    pull_wal = false
    snapshot_every = "15m"
    read_cache = "1G"
    hot_codec = "lz4"
    nbd_write_budget = "64M"
    nbd_idle_timeout = "30s"
    nbd_tls = true
    watch = ["alice=/home/alice", "user/bob/profile=/srv/profiles/bob"]
    watch_interval = "5s"
    watch_debounce = "2s"
    scrub_every = "7d"
    scrub_rate = "50MiB/s"
    min_free = "5%"
    reserve = "64M"
    agent_group = "cachepoint"
    http_tls = true
    log_format = "json"

`cachepoint check-config FILE` reads every key as the commands would (cachepoint/config_check.py).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

from cachepoint.config_check import read_toml
from cachepoint.errors import InvalidInput

ENV_STORE = "CACHEPOINT_STORE"
ENV_CONFIG = "CACHEPOINT_CONFIG"
ENV_COORDINATOR = "CACHEPOINT_COORDINATOR"


def default_config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "cachepoint" / "config.toml"


def default_store_path() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "cachepoint"


@dataclass
class Settings:
    store: str = ""
    """The store directory (holds ``db/``). Default: $XDG_DATA_HOME/cachepoint (~/.local/share/cachepoint;
    for root, /root/.local/share/cachepoint: a system daemon names its store)."""
    identity: str = ""
    """Key and certificates to call the fleet with [env CACHEPOINT_IDENTITY]. Default: STORE/identity."""
    block_size: str = "64K"
    """Block size of new layers with fixed chunking: a power of two from 4K to 4M."""
    chunking: str = "fixed"
    """How `ingest` and `publish` cut a new disk-image layer: "fixed" (block_size blocks on a fixed
    grid) or "content" (chunks on chunk_unit boundaries chosen by content, chunk_average long on
    average: the same file data at any aligned offset gives the same chunks). Both stack in images
    and take a user layer. Trees always use fixed blocks."""
    chunk_average: str = "64K"
    """Average chunk length of new content-chunked layers: a power of two, 2 units to 1M."""
    chunk_unit: str = "4K"
    """Content chunks start and end on multiples of this (the guest file system's block size)."""
    author: str = ""
    """Recorded as the author of new versions. Default: the login name."""
    device: str = ""
    """Recorded as the device of new versions. Default: the host name."""
    listen: str = "127.0.0.1:7401"
    """`serve`: HOST:PORT of the daemon's gRPC server (peers fetch blocks here)."""
    coordinator: str = ""
    """HOST:PORT of the coordinator [env CACHEPOINT_COORDINATOR]: `serve` follows it (empty: serves the
    local store alone); `publish`, `pull`, `scrub`, `repair` and `enroll` ask it unless told otherwise.
    Replicas: "a:7400,b:7400" or a list; calls go to the first that is up (docs/design.md "Failover")."""
    site: str = "default"
    """`serve`: locality label; peers of one site fetch from each other first."""
    node_id: str = ""
    """`serve`: name of this node in the fleet. Default: host name and store id."""
    subscribe: list[str] = field(default_factory=list)
    """`serve`: refs to keep current, e.g. ["os/win10:production"]."""
    wan_rate: str = "0"
    """`serve`, `pull`: cap on fetching from other sites and the coordinator, e.g. "100Mbit" (0: none)."""
    site_rate: str = "0"
    """`serve`, `pull`: cap on fetching from peers of the same site (0: none)."""
    site_fanout: str = "true"
    """`serve`: nodes of a site pulling one version at once share its WAN fetch, each block crossing
    the WAN once for the site (true); false: this node fetches what its site lacks on its own."""
    pull_wal: str = "false"
    """`serve`, `pull`: write each fetched block to RocksDB's write-ahead log as it lands (true): a
    process killed mid-pull keeps every block it fetched, for twice the disk writes. false: blocks
    are written once, flushed every 16 MiB and before the version commits; a killed pull fetches
    its last 16 MiB or so again."""
    snapshot_every: str = "0"
    """`serve`: snapshot every attached user disk that has new writes this often, e.g. "15m" (0: never)."""
    read_cache: str = "1G"
    """`serve`: decoded blocks kept for attached disks' reads, in a sparse file in the store (0: none)."""
    hot_codec: str = "lz4"
    """`serve`: blocks that attached disks and the HTTP reader decode from the store a second time
    (they did not stay in read_cache) are re-stored here in this codec: "lz4" decodes about 4x faster
    than zstd for about a quarter more disk space; "none" keeps every block as it came."""
    nbd_write_budget: str = "64M"
    """`serve`: NBD WRITE payloads held in memory at once, all clients together; beyond it the
    server stops reading clients' sockets until a write has been applied."""
    nbd_idle_timeout: str = "30s"
    """`serve`: an NBD client that sends nothing in the middle of a request (or reads nothing of a
    reply) for this long loses its connection."""
    nbd_tls: str = "false"
    """`serve`: NBD over TCP requires TLS with a client certificate of the fleet (true/false); without
    it, `--nbd` serves loopback addresses only."""
    watch: list[str] = field(default_factory=list)
    """`serve`: directories to keep captured, USER=DIR (into user/USER/home) or user/USER/LAYER=DIR."""
    watch_interval: str = "5s"
    """`serve`: how often each watched directory is looked at."""
    watch_debounce: str = "2s"
    """`serve`: how long a watched directory must stay unchanged before it is captured."""
    scrub_every: str = "7d"
    """`serve`: read and verify every stored block this often, healing bad ones from the fleet (0: never).
    The first pass comes one interval after a daemon first runs on the store."""
    scrub_rate: str = "50MiB/s"
    """`serve`, `scrub`: stored bytes a scrub reads per second, e.g. "50MiB/s" (0: unlimited)."""
    min_free: str = "5%"
    """`serve`: pulls pause while less than this is free on the store's file system ("5%" or "2G")."""
    reserve: str = "64M"
    """Held back in STORE/reserve so gc runs on a full disk; at most 1% of the fs and the db size, 0: off."""
    agent_group: str = ""
    """`serve`: members of this group may use the daemon's local control socket STORE/agent.sock (mode
    0660); empty: only the daemon's own user (0600). The Agent is never served on the network."""
    http_tls: str = "false"
    """`serve --http`: HTTPS with the node's identity, clients authenticated by a certificate or a
    bearer token of the fleet (true); false: plaintext HTTP, on a loopback address only."""
    log_format: str = ""
    """`serve`: log lines as "json" or "text"; empty: JSON unless stderr is a terminal."""


# String keys that also take a TOML list, kept as the comma-separated string the flag takes.
JOINED_LISTS = ("coordinator",)


def apply_toml(settings: object, path: Path) -> None:
    """Set a settings dataclass's fields from a TOML file whose keys are the field names: unknown
    keys are refused by name; list fields take lists of strings, the others strings."""
    apply_table(settings, read_toml(path), path)


def apply_table(settings: object, data: dict[str, object], path: Path) -> None:
    kinds = {f.name: f.type for f in fields(settings)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(kinds))
    if unknown:
        raise InvalidInput(f"config {path}: unknown keys {unknown} (known: {sorted(kinds)})")
    for key, value in data.items():
        if key in JOINED_LISTS and isinstance(value, list) and all(isinstance(v, str) for v in value):
            setattr(settings, key, ",".join(value))  # coordinator = ["a:7400", "b:7400"]: its replicas
        elif str(kinds[key]).startswith("list"):
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise InvalidInput(f"config {path}: {key} must be a list of strings")
            setattr(settings, key, list(value))
        else:
            setattr(settings, key, str(value))


def load_settings(config_path: str | None, store_flag: str | None) -> Settings:
    settings = Settings()
    explicit = config_path or os.environ.get(ENV_CONFIG)
    path = Path(explicit) if explicit else default_config_path()
    if path.exists():
        apply_toml(settings, path)
    elif explicit:
        raise InvalidInput(f"config file {path} does not exist")
    if os.environ.get(ENV_STORE):
        settings.store = os.environ[ENV_STORE]
    if os.environ.get(ENV_COORDINATOR):
        settings.coordinator = os.environ[ENV_COORDINATOR]
    if store_flag:
        settings.store = store_flag
    if not settings.store:
        settings.store = str(default_store_path())
    return settings


def parse_switch(text: str, what: str) -> bool:
    """true/false (TOML booleans arrive as "True"/"False"), on/off."""
    value = text.strip().lower()
    if value in ("true", "on"):
        return True
    if value in ("false", "off", ""):
        return False
    raise InvalidInput(f"{what} {text!r}: write true or false")


_BYTES_RE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE)
_BYTES_SCALE = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_byte_size(text: str, what: str) -> int:
    """Bytes from ``1G``, ``512M``, ``64KiB`` or plain digits (binary units)."""
    match = _BYTES_RE.match(text)
    if not match:
        raise InvalidInput(f"{what} {text!r}: write a size like 1G, 512M or 0")
    return int(match.group(1)) * _BYTES_SCALE[match.group(2).upper()]


_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_SCALE = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def parse_duration(text: str) -> float:
    """Seconds from ``30s``, ``15m``, ``1h``, ``1.5h``, ``250ms`` or a bare number of seconds."""
    match = _DURATION_RE.match(text)
    if not match:
        raise InvalidInput(f"duration {text!r}: write it like 30s, 15m or 1h (0: never)")
    return float(match.group(1)) * _DURATION_SCALE[match.group(2)]
