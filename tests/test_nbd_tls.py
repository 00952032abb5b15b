"""NBD with TLS, end to end: a real daemon serving `--nbd-tls` (here through `nbd_tls = true` in its
config) with its node certificate, real clients presenting certificates of the fleet's CA (qemu-img and
qemu-io with tls-creds-x509, nbdinfo and nbdcopy with nbds:// URIs), and the refusals: a plaintext
client, a client certificate of another CA, a principal that may not read the export, and a daemon
asked to serve plaintext NBD off loopback.

Identities are issued by a CA made with the coordinator's own code (coordinator/pki/ca.py), as
enrollment would issue them, so no coordinator needs to run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cachepoint.trust.principal import PEER_TLS_NAME
from tests.conftest import run_cli
from tests.fleet import Fleet, Node, issue_identity, nbd_client_credentials, wait_until

TIMEOUT = 120
MIB = 1 << 20
NODE = "node-a"


def _missing_tools() -> list[str]:
    tools = {"qemu-img": "qemu-utils", "qemu-io": "qemu-utils", "nbdinfo": "libnbd-bin"}
    tools["nbdcopy"] = "libnbd-bin"
    return sorted({package for tool, package in tools.items() if shutil.which(tool) is None})


pytestmark = pytest.mark.skipif(
    bool(_missing_tools()), reason=f"needs {', '.join(_missing_tools())} (apt-get install)"
)


def run(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=TIMEOUT)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


@dataclass
class TlsDaemon:
    node: Node
    root: Path
    base: Path  # the bytes of os/base, which the image desk is made of
    address: str  # the NBD TCP address
    creds: dict[str, Path]  # client credential directories by who holds them
    fleet: Fleet

    def log(self) -> str:
        return self.node.stderr()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsDaemon]:
    root = tmp_path_factory.mktemp("nbdtls")
    store, ca = root / "store", root / "fleet-ca"
    base = root / "base.img"
    base.write_bytes(os.urandom(3 * MIB) + bytes(MIB) + os.urandom(MIB // 2))
    run_cli(store, "ingest", "os/base", base)
    run_cli(store, "image", "create", "desk", "os/base")
    own = issue_identity(ca, store / "identity", NODE, "node")
    creds = {"node-a": nbd_client_credentials(own, root / "creds-node-a")}
    principals = {"alice": "user:alice", "bob": "user:bob", "carol": "auditor", "node-b": "node"}
    for name, role in principals.items():
        creds[name] = nbd_client_credentials(issue_identity(ca, root / f"id-{name}", name, role), root / name)
    # An alice of another CA who also trusts the fleet's CA: she checks the server's certificate (and
    # qemu her own) and goes on, so the refusal is the server's, not the client's.
    stranger = issue_identity(root / "other-ca", root / "id-stranger", "alice", "user:alice")
    creds["stranger"] = nbd_client_credentials(stranger, root / "stranger")
    with open(creds["stranger"] / "ca-cert.pem", "ab") as bundle:
        bundle.write((ca / "ca" / "ca.crt").read_bytes())
    config = root / "cachepoint.toml"
    config.write_text("nbd_tls = true\n")
    with Fleet(root / "fleet") as fleet:
        node = fleet.serve_store("tls-node", store, "--nbd", "127.0.0.1:0", config=config)
        assert node.node_id == NODE, node.ready
        address = node.ready["nbd"][0]
        attached = run_cli(store, "attach", "desk", "--json").json()
        assert attached["nbd"] == f"nbds://{address}/desk", attached  # type: ignore[index]
        run_cli(store, "attach", "desk", "--user", "alice")
        yield TlsDaemon(node, root, base, address, creds, fleet)


# -- clients ----------------------------------------------------------------------------------------


def qemu_target(address: str, export: str) -> str:
    """A qemu json: filename for ``export`` over TLS; the node's certificate names PEER_TLS_NAME."""
    host, _, port = address.rpartition(":")
    nbd = {
        "driver": "nbd",
        "server": {"type": "inet", "host": host, "port": port},
        "export": export,
        "tls-creds": "tls0",
        "tls-hostname": PEER_TLS_NAME,
    }
    return "json:" + json.dumps({"driver": "raw", "file": nbd})


def qemu(tool: str, command: str, creds: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    tls = ["--object", f"tls-creds-x509,id=tls0,dir={creds},endpoint=client"]
    return run(tool, command, *tls, *args, check=False) if command else run(tool, *tls, *args, check=False)


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def as_peer_host(served: TlsDaemon) -> list[str]:
    """A prefix that runs a command in a mount namespace of its own, where /etc/hosts names
    PEER_TLS_NAME as 127.0.0.1: libnbd checks the server's certificate against the URI's host, and a
    node's certificate names that DNS name only, never an address. The namespace ends with the command."""
    hosts = served.root / "hosts"
    hosts.write_text(f"127.0.0.1 {PEER_TLS_NAME}\n")
    prefix = ["unshare", "--mount", "sh", "-c", 'mount --bind "$0" /etc/hosts && exec "$@"', str(hosts)]
    probe = run(*prefix, "getent", "hosts", PEER_TLS_NAME, check=False)
    if probe.returncode != 0 or "127.0.0.1" not in probe.stdout:
        pytest.skip(f"cannot give a command its own /etc/hosts (unshare --mount): {probe.stderr.strip()}")
    return prefix


def nbds(served: TlsDaemon, export: str, who: str) -> str:
    port = served.address.rpartition(":")[2]
    return f"nbds://{PEER_TLS_NAME}:{port}/{export}?tls-certificates={served.creds[who]}"


# -- tests ------------------------------------------------------------------------------------------


def test_qemu_img_reads_and_qemu_io_writes_exports_over_tls_with_fleet_certificates(
    served: TlsDaemon,
) -> None:
    alice, address = served.creds["alice"], served.address
    info = ok(qemu("qemu-img", "info", alice, "--output=json", qemu_target(address, "desk")))
    assert json.loads(info)["virtual-size"] == served.base.stat().st_size
    compared = qemu("qemu-img", "compare", alice, "-f", "raw", served.base, qemu_target(address, "desk"))
    assert "Images are identical" in ok(compared)

    # alice writes her own disk over TLS, then reads it back whole with qemu-img convert.
    writable = qemu_target(address, "alice/desk")
    assert "wrote" in ok(qemu("qemu-io", "", alice, "-c", "write -P 0x5c 1000000 300000", writable))
    copy = served.root / "alice-desk.raw"
    ok(qemu("qemu-img", "convert", alice, "-O", "raw", writable, copy))
    expected = bytearray(served.base.read_bytes())
    expected[1000000:1300000] = b"\x5c" * 300000
    assert copy.read_bytes() == bytes(expected)

    # An auditor, and the node itself, may read alice's disk too (the table's read-layer rule).
    for who in ("carol", "node-a"):
        compared = qemu("qemu-img", "compare", served.creds[who], "-f", "raw", copy, writable)
        assert "Images are identical" in ok(compared), who


def test_a_plaintext_client_another_cas_certificate_and_another_user_are_refused_with_clear_errors(
    served: TlsDaemon,
) -> None:
    address = served.address
    plaintext = run("qemu-img", "info", f"nbd://{address}/desk", check=False)
    assert plaintext.returncode != 0 and "requires TLS" in plaintext.stderr, plaintext.stderr

    stranger = qemu("qemu-img", "info", served.creds["stranger"], qemu_target(address, "desk"))
    assert stranger.returncode != 0 and "TLS" in stranger.stderr, stranger.stderr

    bob = qemu("qemu-img", "info", served.creds["bob"], qemu_target(address, "alice/desk"))
    assert bob.returncode != 0, bob.stdout
    assert "principal 'bob' may not read export 'alice/desk'" in bob.stderr, bob.stderr
    other_node = qemu("qemu-img", "info", served.creds["node-b"], qemu_target(address, "alice/desk"))
    assert "principal 'node-b' may not read export 'alice/desk'" in other_node.stderr, other_node.stderr
    # bob may read the image's OS layer: the refusal is about alice's layer, not about bob.
    ok(qemu("qemu-img", "info", served.creds["bob"], qemu_target(address, "desk")))

    def logged() -> list[str] | None:
        lines = [line for line in served.log().splitlines() if "refused:" in line]
        wanted = ("requires TLS", "TLS handshake failed", "'bob' may not read", "'node-b' may not read")
        return lines if all(any(w in line for line in lines) for w in wanted) else None

    lines = wait_until("the daemon to log the refusals", logged, 30.0, logs=served.log)
    assert sum("'bob' may not read" in line for line in lines) == 1, lines  # once per connection
    assert served.node.running() and "Traceback" not in served.log()


def test_nbdinfo_and_nbdcopy_speak_nbds_and_four_connections_copy_the_export_byte_for_byte(
    served: TlsDaemon, as_peer_host: list[str]
) -> None:
    info = json.loads(ok(run(*as_peer_host, "nbdinfo", "--json", nbds(served, "desk", "alice"), check=False)))
    export = info["exports"][0]
    assert info["TLS"] is True and export["is_read_only"] and export["can_multi_conn"], info

    copy = served.root / "nbdcopy.raw"
    ok(run(*as_peer_host, "nbdcopy", "--connections=4", nbds(served, "desk", "alice"), copy, check=False))
    compared = run("qemu-img", "compare", "-f", "raw", "-F", "raw", served.base, copy, check=False)
    assert "Images are identical" in ok(compared)

    port = served.address.rpartition(":")[2]
    # libnbd 1.14 shows the error's name, not the server's message (qemu-img shows it: see above).
    plaintext = run("nbdinfo", "--size", f"nbd://127.0.0.1:{port}/desk", check=False)
    assert plaintext.returncode != 0 and not plaintext.stdout, plaintext.stdout + plaintext.stderr
    stranger = run(*as_peer_host, "nbdinfo", "--size", nbds(served, "desk", "stranger"), check=False)
    assert stranger.returncode != 0 and not stranger.stdout, stranger.stdout + stranger.stderr
    bob = run(*as_peer_host, "nbdinfo", "--size", nbds(served, "alice/desk", "bob"), check=False)
    assert bob.returncode != 0 and not bob.stdout, bob.stdout + bob.stderr
    # The same bob, on the image's OS layer: served (the refusal above was about alice's layer).
    size = ok(run(*as_peer_host, "nbdinfo", "--size", nbds(served, "desk", "bob"), check=False))
    assert int(size) == served.base.stat().st_size


def test_plaintext_nbd_off_loopback_is_refused_before_anything_binds(tmp_path: Path) -> None:
    store, sock = tmp_path / "store", tmp_path / "nbd.sock"
    for address in ("0.0.0.0:0", "[::]:0"):
        # (Without the check the daemon would start and run: the timeout ends it, and the test fails.)
        serve = ("serve", "--listen", "127.0.0.1:0", "--nbd", address, "--nbd-socket", sock)
        refused = run_cli(store, *serve, check=False, timeout=60)
        assert refused.code == 4, refused.err
        assert f"refusing to serve NBD on {address} without TLS" in refused.err and "--nbd-tls" in refused.err
        assert not sock.exists() and not store.exists()  # nothing bound, nothing made
    # --nbd-tls needs a certificate to serve: a daemon without an identity says so, and binds nothing.
    unenrolled = run_cli(
        store, "serve", "--nbd", "0.0.0.0:0", "--nbd-tls", "--nbd-socket", sock, check=False, timeout=60
    )
    assert unenrolled.code == 4 and "enroll" in unenrolled.err, unenrolled.err
    assert not sock.exists()


def test_the_nbd_tls_config_key_takes_booleans_only(tmp_path: Path) -> None:
    store, config = tmp_path / "store", tmp_path / "cachepoint.toml"
    config.write_text('nbd_tls = "sometimes"\n')
    refused = run_cli(store, "--config", config, "serve", "--nbd", "127.0.0.1:0", check=False)
    assert refused.code == 4 and "nbd_tls 'sometimes'" in refused.err, refused.err


def test_an_enrolled_nodes_nbd_follows_the_revocations_and_assignments_its_heartbeats_bring(
    tmp_path: Path,
) -> None:
    """A real coordinator with its CA, a node, a user and another node enrolled with join tokens: the
    other node reads alice's disk once alice is assigned to it, and alice, revoked at the coordinator,
    is refused and her open connection ends within a few heartbeats."""
    from cachepoint.disk.nbd.protocol import CMD_READ
    from coordinator.fleet.registry import HEARTBEAT_INTERVAL_MS
    from tests.fleet import coordinator_cli
    from tests.test_authz_fleet import enrolled
    from tests.test_nbd_protocol import go, greet, request
    from tests.test_nbd_starttls import upgrade
    from tests.test_trust_fleet import data_of, tls_coordinator

    within = 10 * HEARTBEAT_INTERVAL_MS / 1000
    base = tmp_path / "base.img"
    base.write_bytes(os.urandom(2 * MIB))
    with Fleet(tmp_path) as fleet:
        coordinator = tls_coordinator(fleet)
        store = enrolled(fleet, coordinator, tmp_path, "n-disk")
        alice = enrolled(fleet, coordinator, tmp_path, "alice", "--role", "user:alice") / "identity"
        other = enrolled(fleet, coordinator, tmp_path, "n-other") / "identity"
        run_cli(store, "ingest", "os/base", base)
        run_cli(store, "image", "create", "desk", "os/base")
        args = ("--coordinator", coordinator.address, "--nbd", "127.0.0.1:0", "--nbd-tls")
        node = fleet.serve_store("n-disk", store, *args)
        address = node.ready["nbd"][0]
        run_cli(store, "attach", "desk", "--user", "alice")
        creds = {
            "alice": nbd_client_credentials(alice, tmp_path / "creds-alice"),
            "other": nbd_client_credentials(other, tmp_path / "creds-other"),
        }

        def reads(who: str) -> subprocess.CompletedProcess[str]:
            return qemu("qemu-img", "info", creds[who], qemu_target(address, "alice/desk"))

        assert "may not read export 'alice/desk'" in reads("other").stderr
        coordinator_cli("assign", "alice", "n-other", "--data", str(data_of(fleet)))
        wait_until("n-other to be served alice's disk", lambda: reads("other").returncode == 0, within)

        tls = upgrade(greet(int(address.rpartition(":")[2])), alice, alice)
        with tls:
            go(tls, "alice/desk")
            assert request(tls, CMD_READ, 0, 4096) == (0, base.read_bytes()[:4096])
            coordinator_cli("revoke", "alice", "--data", str(data_of(fleet)))
            wait_until("alice to be refused", lambda: "revoked" in reads("alice").stderr, within)
            with pytest.raises((ConnectionError, OSError)):
                request(tls, CMD_READ, 0, 4096)
        assert any("disconnected from 'alice/desk'" in line for line in node.stderr().splitlines())
