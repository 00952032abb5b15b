"""fleetlab.ports: the ports handed to servers that start later lie below the ephemeral range, where no
outgoing connection (or a client dialling a stopped server, connecting to itself) can take them."""

from __future__ import annotations

import socket

from fleetlab import ports


def test_quiet_ports_lie_below_the_ephemeral_range_are_free_and_never_repeat():
    start = ports._ephemeral_start()
    picked = [ports.quiet_port() for _ in range(50)]
    assert all(ports.LOWEST <= port < start for port in picked)
    assert len(set(picked)) == len(picked)
    for port in picked[:5]:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_a_port_taken_meanwhile_is_skipped(monkeypatch):
    with socket.socket() as held, socket.socket() as probe:
        held.bind(("127.0.0.1", 0))
        probe.bind(("127.0.0.1", 0))
        taken, free = held.getsockname()[1], probe.getsockname()[1]
        probe.close()
        draws = iter([taken, free])
        monkeypatch.setattr(ports.random, "randint", lambda low, high: next(draws))
        monkeypatch.setattr(ports, "_ephemeral_start", lambda: 65536)
        assert ports.quiet_port() == free
