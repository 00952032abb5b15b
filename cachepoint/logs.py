"""How both daemons write their logs: JSON lines (one object per record) or plain text.

A JSON line carries ``time`` (UTC, ISO 8601 with milliseconds), ``level`` (debug, info, warning,
error, critical), ``logger``, ``message`` (formatted, as text logs show it) and ``fields``: what the
call site passed as ``extra=`` (a refused request's status, method, principal...), an empty object
when nothing. A record logged with a traceback carries it as ``exception``, in the same line, so one
record is one line whatever it holds. Log collectors (journald, Loki, Elasticsearch) read such lines
without a parser of our own.

The format is ``--log-format json|text`` on ``serve`` (config key ``log_format``); by default JSON when
stderr is not a terminal (a service), text when it is (a person watching).
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Protocol, TextIO

from cachepoint.errors import InvalidInput

FORMATS = ("json", "text")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
# The attributes every LogRecord has: anything else on a record came from ``extra=``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        moment = datetime.fromtimestamp(record.created, UTC)
        entry: dict[str, object] = {
            "time": moment.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "fields": {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")},
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        # default=str: a field that is not JSON (a Path, an enum) is written as its text, never dropped.
        return json.dumps(entry, ensure_ascii=False, default=str)


def check_format(text: str) -> str:
    value = text.strip().lower()
    if value not in FORMATS:
        raise InvalidInput(f"log format {text!r} (--log-format, config log_format): write json or text")
    return value


def default_format(stream: TextIO | None = None) -> str:
    stream = stream if stream is not None else sys.stderr
    try:
        return "text" if stream.isatty() else "json"
    except (AttributeError, ValueError):  # a closed or unusual stream: a service's
        return "json"


def configure(level: int, log_format: str = "", stream: TextIO | None = None) -> str:
    """Send the root logger's records to ``stream`` (stderr) in ``log_format`` ("" picks by whether
    stderr is a terminal), replacing any handler set before; the format used."""
    chosen = check_format(log_format) if log_format else default_format(stream)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if chosen == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    return chosen


def refused(logger: logging.Logger, level: int, message: str, **fields: object) -> None:
    """The one line a refused request gets (an authorization refusal, bad input): ``message`` as
    text, and ``fields`` (status or code, method or route, principal, peer...) with ``refused`` true,
    so that a log query finds every refusal. Never a traceback: the caller's error is not ours."""
    logger.log(level, "%s", message, extra={"refused": True, **fields})


class Request(Protocol):
    """What an HTTP request (aiohttp's web.Request) tells of itself for a refusal's line."""

    method: str
    path: str
    remote: str | None


def refused_request(logger: logging.Logger, request: Request, status: int, why: str, kind: str) -> None:
    """One line for an HTTP request refused as the client's error (400, 404, 405...), at INFO: a client
    asking for what is not there is not the server's problem, but the operator may want to see it. Both
    HTTP servers' error middlewares (cachepoint/http/app.py, coordinator/history/rest.py) use it."""
    refused(
        logger,
        logging.INFO,
        f"{request.method} {request.path} from {request.remote}: {status}: {why}",
        status=status,
        method=request.method,
        path=request.path,
        remote=request.remote,
        type=kind,
    )
