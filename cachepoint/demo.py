"""`make run`: cachepoint at work on a generated disk image, with embedded defaults.

Part 1, the local store: ingest a gold image, ingest a patched version (only changed blocks are
stored), look at the log and the diff, export and verify, roll back, check integrity, composite an
image from layers. Part 2, the fleet on loopback, with mutual TLS: a coordinator with its own CA,
a publisher and two cachepoints in one site enrolled with one-time join tokens, and a client without a
certificate refused; a published image reaches both nodes (the second from its site peer), a changed
version moves only its delta, and each node tells how many bytes came from peers and how many from
the coordinator. Part 3, user data: a home directory captured on the blade the user is assigned to,
an application install it labels, the user's history at the coordinator read with her own
certificate, and the other blade refused it (PERMISSION_DENIED naming principal, method and rule).

Every step runs the real commands as child processes (each command is printed before it runs).
Ctrl-C stops everything cleanly.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from cachepoint.samples import generate, mutate

DEFAULT_DIR = Path(".demo")
MiB = 1024 * 1024


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            digest.update(chunk)
    return digest.hexdigest()


class Demo:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.env = dict(os.environ, CACHEPOINT_STORE=str(workdir / "store"))
        self.children: list[subprocess.Popen[str]] = []

    def env_for(self, store: Path) -> dict[str, str]:
        return dict(self.env, CACHEPOINT_STORE=str(store))

    def start(self, label: str, command: list[str], env: dict[str, str]) -> str:
        """Start a daemon, wait for its ready line, return the address it listens on."""
        print(f"$ {' '.join(shlex.quote(c) for c in command)}    # {label}", flush=True)
        log = open(self.workdir / f"{label}.log", "w")  # noqa: SIM115 - lives as long as the child
        child = subprocess.Popen(
            [sys.executable, *command[1:]] if command[0] == "python" else command,
            env=env,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
        self.children.append(child)
        assert child.stdout is not None
        line = child.stdout.readline()
        if not line:
            raise SystemExit(f"{label} did not start; see {self.workdir / (label + '.log')}")
        return str(json.loads(line)["listening"])

    def stop_all(self) -> None:
        for child in reversed(self.children):
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in self.children:
            try:
                child.wait(timeout=15)
            except subprocess.TimeoutExpired:
                child.kill()

    def status(self, store: Path) -> dict[str, object]:
        out = subprocess.run(
            [sys.executable, "-m", "cachepoint", "status", "--json"],
            env=self.env_for(store),
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return dict(json.loads(out))

    def wait_for(self, stores: dict[str, Path], ref: str, timeout: float = 300) -> None:
        """Show each node's progress until all hold ``ref``."""
        deadline = time.monotonic() + timeout
        while True:
            states = {name: self.status(store) for name, store in stores.items()}
            held = {name: ref in s["versions"] for name, s in states.items()}  # type: ignore[operator]
            line = "  ".join(
                f"{name}: {'has ' + ref if held[name] else s['subscriptions'][0]['state']}"  # type: ignore[index]
                for name, s in states.items()
            )
            if all(held.values()):
                print(f"\r{line}" if sys.stdout.isatty() else line, flush=True)
                return
            if sys.stdout.isatty():
                print(f"\r{line}", end="", flush=True)
            if time.monotonic() > deadline:
                raise SystemExit(f"\n{ref} did not reach every node within {timeout:.0f}s")
            time.sleep(0.3)

    def report_sources(self, stores: dict[str, Path]) -> None:
        for name, store in stores.items():
            sources = self.status(store)["bytes_by_source"]
            parts = [
                f"{cls} {sizes['blocks']} blocks ({sizes['bytes'] / MiB:.1f} MiB)"  # type: ignore[index]
                for cls, sizes in sources.items()
            ]  # type: ignore[union-attr]
            print(f"  {name}: " + ", ".join(parts), flush=True)

    def say(self, text: str) -> None:
        print(f"\n\033[1m== {text}\033[0m" if sys.stdout.isatty() else f"\n== {text}", flush=True)

    def run(self, *args: str | Path) -> None:
        self.run_on(Path(self.env["CACHEPOINT_STORE"]), *args)

    def run_on(
        self, store: Path, *args: str | Path, shown: dict[str, str] | None = None, note: str = ""
    ) -> None:
        """Run `cachepoint ARGS` on ``store``; ``shown`` replaces arguments in the printed command,
        ``note`` follows it as a comment."""
        printed = " ".join(shlex.quote((shown or {}).get(str(a), str(a))) for a in args)
        print(f"$ cachepoint {printed}" + (f"    # {note}" if note else ""), flush=True)
        subprocess.run(
            [sys.executable, "-m", "cachepoint", *map(str, args)], env=self.env_for(store), check=True
        )

    def coordinator_cli(self, *args: str, capture: bool = False, note: str = "") -> str:
        """Run `cachepoint-coordinator ARGS`; with ``capture``, return what it printed instead."""
        printed = " ".join(shlex.quote(a) for a in args)
        print(f"$ cachepoint-coordinator {printed}" + (f"    # {note}" if note else ""), flush=True)
        command = [sys.executable, "-c", "from coordinator.cli import main; main()", *args]
        done = subprocess.run(command, env=self.env, check=True, text=True, capture_output=capture)
        return done.stdout or ""

    def coordinator_refuses(self, *args: str) -> None:
        """Run a `cachepoint-coordinator` command that must be refused and show its message and exit
        code (the demo stops if it was not refused: then the fleet is open, which matters more)."""
        print(f"$ cachepoint-coordinator {' '.join(shlex.quote(a) for a in args)}", flush=True)
        command = [sys.executable, "-c", "from coordinator.cli import main; main()", *args]
        done = subprocess.run(command, env=self.env, text=True, capture_output=True, timeout=120)
        if done.returncode == 0:
            raise SystemExit(f"this call should have been refused, and was not:\n{done.stdout}")
        print(f"{done.stderr.strip()}\n(refused: exit {done.returncode})", flush=True)

    def check_same(self, exported: Path, source: Path) -> None:
        same = sha256_of(exported) == sha256_of(source)
        print(f"sha256 {exported.name} {'==' if same else '!='} {source.name}", flush=True)
        if not same:
            raise SystemExit(f"export of {exported} differs from {source}")


class Enrollment:
    """Machines join the fleet the way an operator enrolls them: a one-time join token from the
    coordinator's data directory, spent on the machine, which makes its key there."""

    def __init__(self, demo: Demo, data: Path, coordinator: str) -> None:
        self.demo, self.data, self.coordinator = demo, data, coordinator

    def token(self, name: str, *options: str) -> str:
        args = ["enroll", name, "--data", str(self.data), *options, "--json"]
        out = self.demo.coordinator_cli(*args, capture=True, note="a join token, valid once for an hour")
        return str(json.loads(out)["token"])

    def enroll(self, store: Path, name: str, *options: str, identity: Path | None = None) -> None:
        token = self.token(name, *options)
        elsewhere = ("--identity", identity) if identity is not None else ()
        # The token is a secret (and long): the command is shown with its first characters only.
        self.demo.run_on(
            store,
            "enroll",
            "--coordinator",
            self.coordinator,
            "--token",
            token,
            *elsewhere,
            shown={token: token[:14] + "…"},
            note=f"on {name}'s machine",
        )

    def assign(self, user: str, node: str) -> None:
        self.demo.coordinator_cli("assign", user, node, "--data", str(self.data))


def fleet_part(demo: Demo, v1: Path, v2: Path) -> None:
    workdir = demo.workdir
    layer = "os/win10"
    demo.say("part 2: a fleet on loopback with mutual TLS: a coordinator and two cachepoints of one site")
    data = workdir / "coordinator"
    coordinator = demo.start(
        "coordinator",
        [
            "python",
            "-c",
            "from coordinator.cli import main; main()",
            "serve",
            "--data",
            str(data),
            "--listen",
            "127.0.0.1:0",
            "--tls",
        ],
        demo.env,
    )
    stores = {"blade-1": workdir / "blade-1", "blade-2": workdir / "blade-2"}
    admin = workdir / "admin"
    demo.say("enroll: a one-time join token each; the key is made where it is kept and never leaves it")
    fleet = Enrollment(demo, data, coordinator)
    fleet.enroll(admin, "release-bot", "--role", "publisher")
    for name, store in stores.items():
        fleet.enroll(store, name, "--site", "hq")
    demo.say("anything without a certificate of the fleet's CA is refused in the TLS handshake")
    demo.coordinator_refuses("fleet", "--coordinator", coordinator)

    def cachepoint(name: str) -> str:
        # Its node id and site come from its certificate; its peer port serves mutual TLS too.
        return demo.start(
            name,
            [
                "python",
                "-m",
                "cachepoint",
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--coordinator",
                coordinator,
                "--subscribe",
                f"{layer}:production",
            ],
            demo.env_for(stores[name]),
        )

    cachepoint("blade-1")
    demo.say("publish the gold image as release-bot: it reaches blade-1 from the coordinator")
    to_production = ("--coordinator", coordinator, "--tag", "production", "-m")
    demo.run_on(admin, "publish", layer, v1, *to_production, "gold image")
    demo.wait_for({"blade-1": stores["blade-1"]}, f"{layer}@1")
    demo.say("blade-2 joins the site: it gets the image from its site peer, not across the WAN")
    cachepoint("blade-2")
    demo.wait_for(stores, f"{layer}@1")
    demo.report_sources(stores)
    demo.say("publish a version with 5% of its blocks changed: only the delta moves")
    demo.run_on(admin, "publish", layer, v2, *to_production, "patch tuesday")
    demo.wait_for(stores, f"{layer}@2")
    demo.say("bytes each blade fetched, by source (site peers vs the coordinator)")
    demo.report_sources(stores)
    out = workdir / "blade-2.img"
    demo.run_on(stores["blade-2"], "export", f"{layer}:production", out)
    demo.check_same(out, v2)
    print("\nfleet:", flush=True)
    demo.coordinator_cli("--identity", str(admin / "identity"), "fleet", "--coordinator", coordinator)
    user_part(demo, fleet, stores)


def user_part(demo: Demo, fleet: Enrollment, stores: dict[str, Path]) -> None:
    """Part 3: a user's home directory captured on a blade (through its daemon, which sends each
    version to the coordinator), an application install the capture notices, the user's history as
    the coordinator keeps it, and a blade alice does not use refused her files."""
    blade, coordinator = stores["blade-1"], fleet.coordinator
    home = demo.workdir / "alice-home"
    (home / "Documents").mkdir(parents=True)
    (home / "Documents" / "plan.txt").write_text("q3 plan, first draft\n")
    (home / ".config" / "editor").mkdir(parents=True)
    (home / ".config" / "editor" / "settings.ini").write_text("theme = dark\n")
    demo.say("part 3: user data. alice uses blade-1, which may now commit (and read) her layers")
    fleet.assign("alice", "blade-1")
    demo.say("alice's home directory, captured on blade-1 (only changed files are read)")
    demo.run_on(blade, "capture", home, "--user", "alice", "-m", "first day")
    demo.say("alice installs an application: the capture sees a new executable and labels the version")
    app = home / "Apps" / "Editor"
    app.mkdir(parents=True)
    (app / "editor").write_bytes(b"\x7fELF" + bytes(60) + b"a program, as far as the capture can tell")
    (app / "editor.conf").write_text("autosave = on\n")
    (home / "Documents" / "plan.txt").write_text("q3 plan, second draft\n")
    demo.run_on(blade, "capture", home, "--user", "alice", "-m", "after installing the editor")
    deadline = time.monotonic() + 120
    while demo.status(blade)["outbox_depth"] and time.monotonic() < deadline:
        time.sleep(0.3)  # the blade's outbox delivers both versions to the coordinator
    demo.say("the coordinator's timeline of alice, read with her own certificate")
    alice = demo.workdir / "alice-identity"
    fleet.enroll(demo.workdir / "alice-laptop", "alice", "--role", "user:alice", identity=alice)
    timeline = ("history", "timeline", "alice", "--coordinator", coordinator)
    plan = ("history", "file", "alice", "Documents/plan.txt", "--coordinator", coordinator)
    demo.coordinator_cli("--identity", str(alice), *timeline)
    demo.coordinator_cli("--identity", str(alice), *plan)
    demo.say("blade-2 is not alice's: the coordinator refuses it her files, naming who, what and the rule")
    demo.coordinator_refuses("--identity", str(stores["blade-2"] / "identity"), *plan)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="work directory (wiped first) [.demo]")
    parser.add_argument("--size-mib", type=int, default=256, help="size of the generated image [256]")
    args = parser.parse_args()
    workdir: Path = args.dir
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    demo = Demo(workdir)
    v1, v2 = workdir / "gold-v1.img", workdir / "gold-v2.img"

    mix = "40% free space, 30% text, 30% binary"
    demo.say(f"part 1: the local store. Generate a {args.size_mib} MiB disk image: {mix}")
    generate(v1, args.size_mib * MiB, seed=1)
    demo.run("ingest", "os/win10", v1, "--kind", "os", "-m", "gold image", "--tag", "staging")

    demo.say("patch 5% of its blocks and ingest again: unchanged blocks are skipped by the xxh3 pre-filter")
    mutate(v1, v2, 0.05, seed=2)
    demo.run("ingest", "os/win10", v2, "-m", "patch tuesday", "--tag", "staging")
    demo.run("tag", "os/win10@1", "production")
    demo.run("log", "os/win10")

    demo.say("what changed between the versions, as byte ranges")
    demo.run("diff", "os/win10@1", "os/win10:staging")

    demo.say("export the patched version and check it is byte-identical")
    out = workdir / "exported.img"
    demo.run("export", "os/win10:staging", out)
    demo.check_same(out, v2)

    demo.say("roll back: a new version with the gold content (version 2 stays in the log)")
    demo.run("rollback", "os/win10", "--to", "os/win10:production", "-m", "undo the patch")
    out.unlink()
    demo.run("export", "os/win10", out)
    demo.check_same(out, v1)

    demo.say("layers: an app layer on top of a base tree, composited with a whiteout")
    base, app = workdir / "base-tree", workdir / "app-tree"
    (base / "etc").mkdir(parents=True)
    (base / "etc" / "motd").write_text("welcome\n")
    (base / "etc" / "legacy.conf").write_text("old = true\n")
    (app / "etc").mkdir(parents=True)
    (app / "etc" / "motd").write_text("welcome, with the app installed\n")
    (app / "etc" / ".wh.legacy.conf").write_text("")
    (app / "opt" / "app").mkdir(parents=True)
    (app / "opt" / "app" / "run.sh").write_text("#!/bin/sh\necho app\n")
    (app / "opt" / "app" / "run.sh").chmod(0o755)
    demo.run("ingest", "os/base", base)
    demo.run("ingest", "app/tool", app)
    demo.run("image", "create", "desktop", "os/base", "app/tool")
    demo.run("image", "export", "desktop", workdir / "desktop")
    desktop = workdir / "desktop"
    print("composite:", sorted(str(p.relative_to(desktop)) for p in desktop.rglob("*")))

    demo.say("space and integrity")
    demo.run("stats")
    demo.run("fsck")
    try:
        fleet_part(demo, v1, v2)
    except KeyboardInterrupt:
        print("\ninterrupted: stopping the daemons", flush=True)
    finally:
        demo.stop_all()
    store = workdir / "store"
    print(f"\nthe stores are kept under {workdir}; try: CACHEPOINT_STORE={store} cachepoint ls")


if __name__ == "__main__":
    main()
