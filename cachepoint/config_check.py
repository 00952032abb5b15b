"""`check-config`: every key of a TOML config read as the program that owns it would read it, and every
problem named at once (unknown keys with the nearest known one, values that do not parse).

One model for both programs: a config is a table of keys, each with a check that parses its value the
way the program does (raising InvalidInput or ValueError with the message a user would otherwise meet
at start-up). The tables are `cachepoint_checks()` here and `coordinator.config.coordinator_checks()`.
"""

from __future__ import annotations

import difflib
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cachepoint.errors import InvalidInput

Check = Callable[[Any], object]


@dataclass(frozen=True, slots=True)
class Problem:
    key: str
    message: str

    def as_json(self) -> dict[str, str]:
        return {"key": self.key, "message": self.message}


def read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise InvalidInput(f"cannot read config {path}: {err}") from err


def check_table(data: Mapping[str, Any], checks: Mapping[str, Check]) -> list[Problem]:
    """Unknown keys first (sorted), then each known key whose value its check refuses."""
    problems = []
    for key in sorted(set(data) - set(checks)):
        near = difflib.get_close_matches(key, list(checks), n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else f" (known: {', '.join(sorted(checks))})"
        problems.append(Problem(key, f"unknown key{hint}"))
    for key, check in checks.items():
        if key in data:
            try:
                check(data[key])
            except (InvalidInput, ValueError) as err:
                problems.append(Problem(key, str(err)))
    return problems


def scalar(parse: Callable[[str], object] | None = None) -> Check:
    """A string (or a TOML number or boolean, read as its text) that ``parse`` accepts."""

    def check(value: Any) -> object:
        if isinstance(value, dict | list):
            raise InvalidInput(f"write a string, not a {'table' if isinstance(value, dict) else 'list'}")
        return parse(str(value)) if parse is not None else None

    return check


def strings(parse: Callable[[str], object] | None = None) -> Check:
    """A list of strings, each of which ``parse`` accepts."""

    def check(value: Any) -> object:
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise InvalidInput('write a list of strings, e.g. ["a", "b"]')
        return [parse(item) for item in value] if parse is not None else None

    return check


def address(text: str) -> object:
    from cachepoint.rpc.serving import split_address

    return split_address(text)


def optional_address(text: str) -> object:
    return address(text) if text else None


def replicas(value: Any) -> object:
    """``coordinator``: HOST:PORT, its replicas as "a:7400,b:7400", or a list of HOST:PORT."""
    if isinstance(value, list):
        return strings(address)(value)
    return scalar(lambda text: [address(part.strip()) for part in text.split(",") if part.strip()])(value)


def cachepoint_checks() -> dict[str, Check]:
    """How `cachepoint` reads each key of its config (cachepoint/config.py, Settings)."""
    from cachepoint.blocks import parse_block_size
    from cachepoint.blocksource.recode import parse_hot_codec
    from cachepoint.capture.watch import parse_watch
    from cachepoint.config import parse_byte_size, parse_duration, parse_switch
    from cachepoint.ids import Ref
    from cachepoint.logs import check_format
    from cachepoint.model import Chunking
    from cachepoint.replication.ratelimit import parse_rate
    from cachepoint.store.space import SpaceLimit

    def size(what: str) -> Check:
        return scalar(lambda text: parse_byte_size(text, what))

    def switch(what: str) -> Check:
        return scalar(lambda text: parse_switch(text, what))

    return {
        "store": scalar(),
        "identity": scalar(),
        "block_size": scalar(parse_block_size),
        "chunking": scalar(Chunking.parse),
        "chunk_average": scalar(parse_block_size),
        "chunk_unit": scalar(parse_block_size),
        "author": scalar(),
        "device": scalar(),
        "listen": scalar(address),
        "coordinator": replicas,
        "site": scalar(),
        "node_id": scalar(),
        "subscribe": strings(Ref.parse),
        "wan_rate": scalar(parse_rate),
        "site_rate": scalar(parse_rate),
        "site_fanout": switch("site_fanout"),
        "pull_wal": switch("pull_wal"),
        "snapshot_every": scalar(parse_duration),
        "read_cache": size("read_cache"),
        "hot_codec": scalar(parse_hot_codec),
        "nbd_write_budget": size("nbd_write_budget"),
        "nbd_idle_timeout": scalar(parse_duration),
        "nbd_tls": switch("nbd_tls"),
        "watch": strings(parse_watch),
        "watch_interval": scalar(parse_duration),
        "watch_debounce": scalar(parse_duration),
        "scrub_every": scalar(parse_duration),
        "scrub_rate": scalar(parse_rate),
        "min_free": scalar(lambda text: SpaceLimit.parse(text, "min_free")),
        "reserve": size("reserve"),
        "agent_group": scalar(),
        "http_tls": switch("http_tls"),
        "log_format": scalar(check_format),
    }


def check_file(path: Path, checks: Mapping[str, Check]) -> list[Problem]:
    """The problems of the config at ``path``; an unreadable file or bad TOML is one problem (key "")."""
    try:
        data = read_toml(path)
    except InvalidInput as err:
        return [Problem("", str(err))]
    return check_table(data, checks)


def report(path: Path, problems: list[Problem], as_json: bool) -> None:
    """Print the verdict; exit 4 (invalid input) when there is any problem."""
    import click

    from cachepoint.console import emit_json
    from cachepoint.errors import EXIT_INVALID

    if as_json:
        emit_json({"file": str(path), "ok": not problems, "problems": [p.as_json() for p in problems]})
    elif not problems:
        click.echo(f"{path}: ok")
    for problem in problems if not as_json else ():
        where = f"{path}: {problem.key}" if problem.key else str(path)
        click.echo(f"{where}: {problem.message}", err=True)
    if problems:
        raise SystemExit(EXIT_INVALID)
