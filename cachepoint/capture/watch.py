"""watch: capture a directory whenever it has changed and then stayed quiet for a while.

A scan loop, no inotify: every ``interval`` the tree's names and stats are read (the same walk a
capture does, without opening files) and compared with those at the last capture. A change starts
the debounce: the tree is looked at again every ``min(interval, debounce)`` until it has not changed
for ``debounce``, and only then captured, so a program that writes many files is captured once it
is done. A failed capture (a file vanished while it was read, the store busy) is reported and tried
again at the next look. The loop ends when ``stop`` is set (SIGINT/SIGTERM in the command, daemon
shutdown), after ``max_captures`` new versions, or after ``run_for`` seconds.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cachepoint.capture.engine import CaptureReport
from cachepoint.capture.walk import Walked, identity, walk
from cachepoint.errors import CachepointError, InvalidInput


@dataclass(frozen=True, slots=True)
class WatchOptions:
    interval: float = 5.0
    """Seconds between looks at the tree."""
    debounce: float = 2.0
    """Seconds the tree must stay unchanged before it is captured."""
    max_captures: int = 0
    """Stop after this many new versions (0: never)."""
    run_for: float = 0.0
    """Stop after this many seconds (0: never)."""

    def __post_init__(self) -> None:
        if self.interval <= 0:
            raise InvalidInput(f"watch interval {self.interval}s: it must be more than 0")
        if self.debounce < 0 or self.max_captures < 0 or self.run_for < 0:
            raise InvalidInput("watch: debounce, max captures and run time cannot be negative")


@dataclass(frozen=True, slots=True)
class WatchSpec:
    """One directory a daemon keeps captured: ``layer=DIR`` in the ``watch`` config list."""

    layer: str
    root: Path


def parse_watch(text: str) -> WatchSpec:
    """``alice=/home/alice`` (into user/alice/home) or ``user/alice/profile=/srv/profiles/alice``."""
    from cachepoint.capture.engine import user_layer

    who, sep, directory = text.partition("=")
    if not sep or not who.strip() or not directory.strip():
        raise InvalidInput(f"watch {text!r}: write USER=DIR or user/USER/LAYER=DIR")
    who = who.strip()
    if who.startswith("user/"):
        if who.count("/") < 2:
            raise InvalidInput(f"watch {text!r}: a layer is user/USER/NAME, e.g. user/alice/home")
        return WatchSpec(user_layer(who.split("/")[1], who), Path(directory.strip()))
    return WatchSpec(user_layer(who, None), Path(directory.strip()))


def watch(
    root: Path,
    capture_now: Callable[[], CaptureReport],
    options: WatchOptions,
    stop: threading.Event,
    on_error: Callable[[Exception], None],
    store: Path | None = None,
) -> int:
    """Run the loop; returns the number of new versions made. ``store`` is not looked at (its files
    change with every capture; it may only appear with the first one)."""

    def tree_state(root: Path) -> list[Walked]:
        found = identity(store) if store is not None else None
        return walk(root, [found] if found else []).entries

    deadline = time.monotonic() + options.run_for if options.run_for else None

    def pause(seconds: float) -> bool:
        """Sleep, waking early to stop; True when the loop must end."""
        if deadline is not None:
            seconds = min(seconds, max(deadline - time.monotonic(), 0.0))
        stop.wait(seconds)
        return stop.is_set() or (deadline is not None and time.monotonic() >= deadline)

    captured: list[Walked] | None = None
    made = 0
    while True:
        try:
            state = tree_state(root)
            if state != captured:
                quiet_since = time.monotonic()
                while (quiet := time.monotonic() - quiet_since) < options.debounce:
                    if pause(min(options.interval, options.debounce - quiet)):
                        return made
                    now = tree_state(root)
                    if now != state:
                        state, quiet_since = now, time.monotonic()
                report = capture_now()
                captured = state
                if not report.unchanged:
                    made += 1
                    if options.max_captures and made >= options.max_captures:
                        return made
        except (CachepointError, OSError) as err:  # a vanished directory, a busy store: not fatal
            on_error(err)
            captured = None  # try again at the next look
        if pause(options.interval):
            return made


async def watch_in_thread(
    root: Path,
    capture_now: Callable[[], CaptureReport],
    options: WatchOptions,
    on_error: Callable[[Exception], None],
    store: Path | None = None,
) -> int:
    """``watch`` on a worker thread, for the daemon: cancelling the task stops the loop and waits for
    the capture in progress to finish (the store must outlive it)."""
    import asyncio  # only the daemon's watches need it; a command's start-up does without

    stop = threading.Event()
    task = asyncio.ensure_future(asyncio.to_thread(watch, root, capture_now, options, stop, on_error, store))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        stop.set()
        with contextlib.suppress(Exception):
            await task
        raise
