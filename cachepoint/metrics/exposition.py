"""What a program's ``/metrics`` shows: one registry per process object, never the library's global one,
so that two daemons (or a daemon and a coordinator) in one test process keep their own series.

Names follow Prometheus's conventions: a ``cachepoint_`` (node) or ``cachepoint_coordinator_`` prefix,
base units in the name (``_seconds``, ``_bytes``), counters ending ``_total``. Labels hold bounded sets
only (source classes, sites, methods, status codes, NBD commands); never a user's name or a block id:
a user layer appears as ``user/*`` (``layer_label``).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry

USER_ROOT = "user/"


def layer_label(ref: str) -> str:
    """A layer or ref as a label value: os/ and app/ ones as they are; a user's as ``user/*``."""
    return "user/*" if ref.startswith(USER_ROOT) else ref


class Exposition:
    """A registry, and what to read before it is collected (values that cost I/O, off the loop)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)

    async def refresh(self) -> None:
        """Read what the next collection shows that is not kept up to date as it changes."""
