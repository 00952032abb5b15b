"""ansible/site.yml applied to a real systemd: a coordinator and two cachepoints (a blade and a laptop)
on this machine, enrolled, healthy, replicating a publish; a second run changes nothing.

systemd runs as PID 1 of its own PID and mount namespaces over an overlay of / (tests/tools/systemd-ns),
so the units, users and files the playbook makes vanish at the end; the network is shared, so every
server listens on a free loopback port. The three inventory hosts are this machine
(ansible_connection=local), told apart by their instance names.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleetlab.ports import quiet_port
from tests.conftest import REPO
from tests.fleet import random_image, wait_until

SYSTEMD_NS = REPO / "tests" / "tools" / "systemd-ns"
ANSIBLE_BIN = REPO / ".venv-ansible" / "bin"
# The daemons' venv is made by a Python its system users can run (the project's may sit under /root),
# whose version must match the wheels built here.
TARGET_PYTHON = Path("/usr/bin/python3")
PREFIX = "/opt/cachepoint-test"  # inside the overlay: gone at stop
COORDINATOR = "cachepoint-coordinator-test"
NODES = {"blade": "cachepoint-blade-test", "laptop": "cachepoint-laptop-test"}
REF = "os/demo:production"
PLAYBOOK_TIMEOUT = 600
RECAP_RE = re.compile(r"^(\S+)\s+:\s+ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.M)


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "needs root: systemd-ns makes PID and mount namespaces"
    for tool in ("unshare", "nsenter", "pgrep", "runuser"):
        if shutil.which(tool) is None:
            return f"needs {tool} (util-linux, procps)"
    if not Path("/lib/systemd/systemd").exists():
        return "needs systemd (/lib/systemd/systemd)"
    if not (ANSIBLE_BIN / "ansible-playbook").exists():
        return "needs ansible-core in .venv-ansible: make ansible-tools"
    probe = (
        subprocess.run(
            [str(TARGET_PYTHON), "-c", "import ensurepip, sys; print(*sys.version_info[:2], sep='.')"],
            capture_output=True,
            text=True,
        )
        if TARGET_PYTHON.exists()
        else None
    )
    ours = f"{sys.version_info[0]}.{sys.version_info[1]}"
    if probe is None or probe.returncode != 0 or probe.stdout.strip() != ours:
        return f"needs {TARGET_PYTHON} {ours} with the venv module (Debian: python3-venv)"
    return None


pytestmark = [pytest.mark.slow, pytest.mark.skipif(_why_not() is not None, reason=str(_why_not()))]


class Machine:
    """A systemd booted by systemd-ns; commands run inside it (its root, its systemd)."""

    def __init__(self, pid: str) -> None:
        self.pid = pid

    def run(
        self, *argv: str | Path, timeout: float = 120, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        env = {
            "ANSIBLE_CONFIG": str(REPO / "ansible" / "ansible.cfg"),  # pipelining, as operators get it
            "PATH": f"{ANSIBLE_BIN}:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": "/root",
            "LANG": "C.UTF-8",
        }
        proc = subprocess.run(
            [str(SYSTEMD_NS), "run", self.pid, *map(str, argv)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{argv} exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
            )
        return proc

    def journal(self) -> str:
        units = [f"--unit={u}.service" for u in (COORDINATOR, *NODES.values())]
        return self.run("journalctl", "--no-pager", "-n", "60", *units, check=False).stdout


@pytest.fixture
def machine(tmp_path: Path) -> Iterator[Machine]:
    """systemd, with tmp_path shared both ways; stopped (and its overlay dropped) also on failure."""
    # Inside, /tmp is a fresh tmpfs: a checkout under /tmp (its .venv-ansible) is shared too.
    shared = [tmp_path, *([REPO] if REPO.is_relative_to("/tmp") else [])]
    started = subprocess.run(
        [str(SYSTEMD_NS), "start"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "SYSTEMD_NS_BIND": " ".join(map(str, shared))},
    )
    assert started.returncode == 0, started.stderr
    pid = started.stdout.strip()
    try:
        yield Machine(pid)
    finally:
        subprocess.run([str(SYSTEMD_NS), "stop", pid], timeout=60)


# The dependencies' wheels, kept between runs beside the tools' venv: gathering them asks the package
# index for each one (a minute or two here), and they change only with the project's requirements.
DEPENDENCY_WHEELS = REPO / ".venv-ansible" / "dependency-wheels"


def _pip_wheel(into: Path, *args: str) -> None:
    """Built with the dev venv's setuptools (grpcio-tools brings a recent one): an isolated build would
    install one first, for every run."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", *args, str(REPO)]
        + ["-w", str(into)],
        check=True,
        capture_output=True,
        timeout=600,
        cwd=into.parent,
    )


def build_wheels(into: Path) -> Path:
    """The project's wheel, built now, and every dependency's, so the playbook installs offline; the
    project's. The dependencies' come from DEPENDENCY_WHEELS when a run with the same requirements (and
    Python) left them there."""
    requirements = hashlib.sha256(sys.version.encode())
    for name in ("pyproject.toml", "setup.py"):
        requirements.update((REPO / name).read_bytes())
    cached = DEPENDENCY_WHEELS / requirements.hexdigest()[:16]
    into.mkdir(parents=True)
    if cached.is_dir():
        _pip_wheel(into, "--no-deps")
        for dependency in cached.glob("*.whl"):
            shutil.copy2(dependency, into)
    else:
        _pip_wheel(into)
        partial = DEPENDENCY_WHEELS / f"{cached.name}.partial-{os.getpid()}"
        partial.mkdir(parents=True)
        for dependency in into.glob("*.whl"):
            if not dependency.name.startswith("cachepoint-"):
                shutil.copy2(dependency, partial)
        partial.rename(cached)  # whole or absent: a run killed while copying leaves only a .partial
    (wheel,) = into.glob("cachepoint-*.whl")
    return wheel


def quiet_ports(names: list[str]) -> dict[str, int]:
    """Free loopback ports below the ephemeral range: the services bind them minutes after they are
    picked, and the other tests' servers (port 0) take theirs from the ephemeral range."""
    return {name: quiet_port() for name in names}


def inventory(path: Path, wheel: Path) -> dict[str, int]:
    """Three hosts on this machine; returns the ports."""
    ports = quiet_ports(["grpc", "enroll", "http", "blade", "blade_http", "laptop", "laptop_http"])

    def cachepoint(kind: str) -> dict[str, object]:
        return {
            "cachepoint_site": "test-site",
            "cachepoint_instance": NODES[kind],
            "cachepoint_user": NODES[kind],  # users made at once by two hosts of one machine would race
            "cachepoint_node_name": f"{kind}-1",
            "cachepoint_listen": f"127.0.0.1:{ports[kind]}",
            "cachepoint_http": f"127.0.0.1:{ports[kind + '_http']}",
            "cachepoint_extra_config": {"scrub_every": "0"},
        }

    hosts = {
        "all": {
            "vars": {
                "ansible_connection": "local",
                "ansible_python_interpreter": sys.executable,
                "cachepoint_install_wheel": str(wheel),
                "cachepoint_install_prefix": PREFIX,
                "cachepoint_install_python": str(TARGET_PYTHON),
                "cachepoint_install_pip_args": f"--no-index --find-links {wheel.parent}",
            },
            "children": {
                "coordinators": {
                    "hosts": {
                        "coord": {
                            "coordinator_instance": COORDINATOR,
                            "coordinator_listen": f"127.0.0.1:{ports['grpc']}",
                            "coordinator_enroll_listen": f"127.0.0.1:{ports['enroll']}",
                            "coordinator_address": f"127.0.0.1:{ports['grpc']}",
                            "coordinator_http": f"127.0.0.1:{ports['http']}",
                        }
                    }
                },
                "blades": {"hosts": {"blade": {**cachepoint("blade"), "cachepoint_subscribe": [REF]}}},
                "laptops": {"hosts": {"laptop": {**cachepoint("laptop"), "cachepoint_pinned": [REF]}}},
            },
        }
    }
    path.write_text(json.dumps(hosts, indent=1))  # JSON is YAML
    return ports


def apply(machine: Machine, hosts: Path) -> dict[str, int]:
    """Runs site.yml; returns changed= per host, after checking none failed."""
    proc = machine.run(
        ANSIBLE_BIN / "ansible-playbook",
        "-i",
        hosts,
        REPO / "ansible" / "site.yml",
        timeout=PLAYBOOK_TIMEOUT,
        check=False,
    )
    recap = {m[0]: (int(m[2]), int(m[3]) + int(m[4])) for m in RECAP_RE.findall(proc.stdout)}
    assert proc.returncode == 0 and set(recap) == {"coord", "blade", "laptop"}, (
        f"ansible-playbook exited {proc.returncode}:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}\n"
        f"{machine.journal()}"
    )
    return {host: changed for host, (changed, _) in recap.items()}


def fetch(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as reply:
        return reply.read().decode()


def healthy(port: int) -> bool:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as reply:
        return reply.status == 200


def test_site_yml_deploys_an_enrolled_replicating_fleet_under_systemd_and_a_second_run_changes_nothing(
    machine: Machine, tmp_path: Path
) -> None:
    wheel = build_wheels(tmp_path / "wheels")
    hosts = tmp_path / "hosts.yml"
    ports = inventory(hosts, wheel)

    first = apply(machine, hosts)
    assert all(first.values()), first

    for unit in (COORDINATOR, *NODES.values()):
        state = machine.run("systemctl", "is-active", f"{unit}.service", check=False).stdout.strip()
        assert state == "active", f"{unit}: {state}\n{machine.journal()}"
        # Type=notify: active means READY=1 came, i.e. the ports were bound.
        unit_type = machine.run("systemctl", "show", "-P", "Type", f"{unit}.service").stdout.strip()
        assert unit_type == "notify"
    for port in (ports["http"], ports["blade_http"], ports["laptop_http"]):
        assert healthy(port)
    for instance in NODES.values():
        cert = f"/var/lib/{instance}/identity/cert.pem"
        assert machine.run("test", "-f", cert, check=False).returncode == 0, f"{instance} not enrolled"

    # A publisher enrolls the way the nodes did, then publishes; both nodes follow the ref.
    venv = Path(PREFIX) / "venv" / "bin"
    coordinator = f"127.0.0.1:{ports['grpc']}"
    enroll = f"runuser -u cachepoint-coordinator -- {venv}/cachepoint-coordinator enroll publisher"
    token = machine.run(*enroll.split(), "--data", f"/var/lib/{COORDINATOR}", "--role", "publisher", "--json")
    identity = ["--identity", tmp_path / "publisher-id"]
    store = ["--store", tmp_path / "publisher"]
    token_args = ["--token", json.loads(token.stdout)["token"]]
    machine.run(venv / "cachepoint", *store, "enroll", "--coordinator", coordinator, *token_args, *identity)
    image = tmp_path / "demo.img"
    random_image(image, 1 << 20, seed=14)
    publish = ["publish", "os/demo", image, "--coordinator", coordinator, "--tag", "production", "--json"]
    published = machine.run(venv / "cachepoint", *store, *identity, *publish)
    version = json.loads(published.stdout)["ref"]

    def holds(instance: str) -> bool:
        command = f"runuser -u {instance} -- {venv}/cachepoint --config /etc/{instance}/config.toml status"
        status = machine.run(*command.split(), "--json", check=False)
        return status.returncode == 0 and version in json.loads(status.stdout)["versions"]

    for instance in NODES.values():
        wait_until(f"{instance} to hold {version}", lambda i=instance: holds(i), 120, 1, machine.journal)

    # What docs/operations.md shows a newcomer next: the fleet on the dashboard, and both programs'
    # metrics (plaintext HTTP on loopback is open to anyone on this machine).
    page = fetch(ports["http"], "/")
    assert "<title>" in page and "dashboard" in page.lower(), page[:200]
    snapshot = json.loads(fetch(ports["http"], "/v1/dashboard"))
    assert snapshot["totals"]["nodes"] == 2 and snapshot["totals"]["online"] == 2, snapshot["totals"]
    assert version in json.dumps(snapshot["sites"]), snapshot["sites"]
    assert re.search(r"^cachepoint_coordinator_\w+", fetch(ports["http"], "/metrics"), re.MULTILINE)
    for node in ("blade", "laptop"):
        assert re.search(r"^cachepoint_\w+_bytes_total\{", fetch(ports[f"{node}_http"], "/metrics"), re.M)

    second = apply(machine, hosts)
    assert second == {"coord": 0, "blade": 0, "laptop": 0}, second
