"""Network namespaces for fleet tests (fleetlab/netns.py), skipped with the reason when they cannot be
made here (not root, no iproute2, no veth). The namespaces are removed when the test ends, failed or
not; the test stops its daemons first (the Fleet is closed inside the ``with`` block)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TypeVar

import pytest

from fleetlab import netns
from fleetlab.netns import DC_ADDRESS, Namespace, NamespacesUnavailable, SiteLan, WanLink

T = TypeVar("T")

__all__ = ["DC_ADDRESS", "Namespace", "SiteLan", "WanLink", "site_lan", "skip_unless_possible", "wan_link"]


def skip_unless_possible() -> None:
    """Skip the calling test, saying why, when namespaces cannot be made here."""
    try:
        netns.check_possible()
    except NamespacesUnavailable as err:
        pytest.skip(str(err))


@contextlib.contextmanager
def _skipping_setup(made: contextlib.AbstractContextManager[T]) -> Iterator[T]:
    """Enter ``made``; a NamespacesUnavailable while building it skips the test (one raised by the
    test's own body is not caught here)."""
    with contextlib.ExitStack() as stack:
        try:
            value = stack.enter_context(made)
        except NamespacesUnavailable as err:
            pytest.skip(str(err))
        yield value


def wan_link() -> contextlib.AbstractContextManager[WanLink]:
    """A datacenter namespace and a site namespace joined by a veth (fleetlab.netns.wan_link)."""
    return _skipping_setup(netns.wan_link())


def site_lan(nodes: int) -> contextlib.AbstractContextManager[SiteLan]:
    """A site of ``nodes`` node namespaces on a bridge behind a WAN veth (fleetlab.netns.site_lan)."""
    return _skipping_setup(netns.site_lan(nodes))
