"""Console conventions shared by the `cachepoint` and `cachepoint-coordinator` commands: JSON output,
human sizes and times, and errors turned into a message and a documented exit code."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import click

from cachepoint.errors import EXIT_INVALID, CachepointError

F = TypeVar("F", bound=Callable[..., Any])


def emit_json(data: object) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False))


def warn(message: str) -> None:
    click.echo(f"cachepoint: warning: {message}", err=True)


def note(message: str) -> None:
    """A line on stderr about what a command is doing (stdout stays for its result)."""
    click.echo(f"cachepoint: {message}", err=True)


def when(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, UTC).strftime("%Y-%m-%d %H:%M:%S")


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def handles_errors(func: F) -> F:
    """Turn our errors into a message naming the object and the limit, and a documented exit code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        as_json = kwargs.get("as_json", False)
        try:
            return func(*args, **kwargs)
        except CachepointError as err:
            fail(str(err), err.exit_code, as_json)
        except ValueError as err:  # value validation in the domain types
            fail(str(err), EXIT_INVALID, as_json)
        except KeyboardInterrupt:
            fail("interrupted (nothing was committed by the interrupted command)", 130, as_json)

    return wrapper  # type: ignore[return-value]


def fail(message: str, code: int, as_json: bool) -> None:
    if as_json:
        emit_json({"error": {"message": message, "exit_code": code}})
    context = click.get_current_context(silent=True)
    program = context.find_root().info_name if context is not None else None
    click.echo(f"{program or 'cachepoint'}: error: {message}", err=True)
    sys.exit(code)


json_option = click.option(
    "--json", "as_json", is_flag=True, help="Machine-readable output, no progress bars."
)

# Both programs' `serve` (cachepoint/logs.py writes the lines).
log_format_option = click.option(
    "--log-format",
    "log_format",
    type=click.Choice(["json", "text"]),
    default=None,
    help="Log lines as JSON or text [config log_format; JSON unless stderr is a terminal].",
)
