"""Lazy boot of the real image: what an empty node fetches to check and read a file system it never pulled.

A coordinator child holds v1 (published from a scratch store); a `cachepoint serve --coordinator` child
on a fresh store attaches it lazily and exports it over NBD. Nothing is mounted: `nbdfuse` shows the
export as one file, `e2fsck -fn` checks the file system through it, then `debugfs` dumps the largest
shared libraries of one directory. After each step the daemon's `status --json` counters (``bytes_by_source``,
stored bytes as they came over the wire) say what the node fetched, against the image's stored bytes
(what the publish sent to the empty coordinator). Report only: no target.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.harness import Bench, Table, human_bytes, remove
from bench.replication_bench import CACHEPOINT, COORDINATOR, ROOT, _announcement, _run, _spawn, _stop

LAYER = "os/lazy"
REF = f"{LAYER}@1"
FILES = 5  # the largest shared libraries of DIRECTORY are dumped
DIRECTORY = "/usr/lib/x86_64-linux-gnu"
MOUNT_SECONDS = 60.0


def missing_tool() -> str:
    """Why the figure cannot be measured here, or "" when it can."""
    if not os.path.exists("/dev/fuse"):
        return "not measured: no /dev/fuse"
    for tool, package in (("nbdfuse", "libnbd-bin"), ("e2fsck", "e2fsprogs"), ("debugfs", "e2fsprogs")):
        if shutil.which(tool) is None:
            return f"not measured: {tool} is not installed ({package})"
    return ""


def _env(work: Path, store: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("CACHEPOINT_CONFIG", None)
    env["XDG_CONFIG_HOME"] = str(work / "xdg-config")  # a config of whoever runs the bench must not count
    env["CACHEPOINT_STORE"] = str(store)
    return env


def _cli(work: Path, store: Path, *args: str) -> dict[str, Any]:
    _, out = _run([*CACHEPOINT, *args, "--json"], f"cachepoint {args[0]}", env=_env(work, store), cwd=ROOT)
    return dict(json.loads(out))


def _fetched(work: Path, store: Path) -> tuple[int, int]:
    """(blocks, stored bytes) the daemon on ``store`` fetched so far, all sources together."""
    sources = _cli(work, store, "status")["bytes_by_source"].values()
    return sum(int(s["blocks"]) for s in sources), sum(int(s["bytes"]) for s in sources)


def _unmount(mount: Path, proc: subprocess.Popen[Any]) -> None:
    tool = ["fusermount3", "-u"] if shutil.which("fusermount3") else ["umount"]
    if proc.poll() is None:
        subprocess.run([*tool, str(mount)], capture_output=True, timeout=60)
    _stop(proc)
    if os.path.ismount(mount):  # nbdfuse was killed while mounted: a lazy unmount lets work/ be removed
        subprocess.run(["umount", "-l", str(mount)], capture_output=True, timeout=60)


@contextlib.contextmanager
def _nbdfuse(stack: contextlib.ExitStack, work: Path, uri: str) -> Any:
    """The export as the file ``MOUNT/nbd``, read-only; unmounted when the block ends, errors or not."""
    mount, pidfile = work / "mnt", work / "nbdfuse.pid"
    mount.mkdir()
    log = work / "nbdfuse.log"
    proc = _spawn(
        stack, ["nbdfuse", "-r", "-P", str(pidfile), str(mount), uri], log, stdin=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + MOUNT_SECONDS
        while not (pidfile.exists() and pidfile.read_text().strip()):
            if proc.poll() is not None:
                raise RuntimeError(f"nbdfuse exited with status {proc.returncode}: {log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"nbdfuse did not mount within {MOUNT_SECONDS:.0f} s")
            time.sleep(0.05)
        yield mount / "nbd"
    finally:
        _unmount(mount, proc)


def _largest_files(device: Path) -> list[tuple[str, int]]:
    """The FILES largest shared libraries of DIRECTORY (the binaries a boot reads), from `debugfs ls -p`
    (lines ``/inode/mode/uid/gid/name/size/``)."""
    _, out = _run(["debugfs", "-R", f"ls -p {DIRECTORY}", str(device)], "debugfs ls")
    files = []
    for line in out.splitlines():
        fields = line.strip().strip("/").split("/")
        regular = len(fields) == 6 and fields[1].startswith("100") and fields[5].isdigit()
        if regular and ".so" in fields[4]:
            files.append((f"{DIRECTORY}/{fields[4]}", int(fields[5])))
    files.sort(key=lambda f: (-f[1], f[0]))
    return files[:FILES]


def measure(work: Path, image: Path, log: Any) -> dict[str, Any]:
    """Every figure of a lazy boot of ``image``, with ``work`` as scratch (emptied afterwards)."""
    (work / "xdg-config").mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        coordinator_data, admin, node = work / "coordinator", work / "admin", work / "node"
        out, err = work / "coordinator.out", work / "coordinator.log"
        with open(out, "wb") as stdout:
            proc = _spawn(
                stack,
                [*COORDINATOR, "serve", "--data", str(coordinator_data), "--listen", "127.0.0.1:0"],
                err,
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                env=_env(work, coordinator_data),
            )
        coordinator = str(_announcement(proc, out, err, "coordinator")["listening"])
        published = _cli(work, admin, "publish", LAYER, str(image), "--coordinator", coordinator)
        log(f"lazy boot: published {published['ref']}: {published['bytes_sent']} bytes sent")
        out, err = work / "node.out", work / "node.log"
        with open(out, "wb") as stdout:
            proc = _spawn(
                stack,
                [
                    *CACHEPOINT,
                    "serve",
                    "--listen",
                    "127.0.0.1:0",
                    "--nbd",
                    "127.0.0.1:0",
                    "--coordinator",
                    coordinator,
                ],
                err,
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                env=_env(work, node),
                cwd=ROOT,
            )
        _announcement(proc, out, err, "cachepoint serve --coordinator")
        attached = _cli(work, node, "attach", REF)
        steps: list[dict[str, Any]] = [{"step": "attach", "seconds": 0.0, "read_bytes": 0}]
        steps[-1].update(zip(("blocks", "bytes"), _fetched(work, node), strict=True))
        with _nbdfuse(stack, work, str(attached["nbd"])) as device:
            seconds, _ = _run(["e2fsck", "-fn", str(device)], "e2fsck -fn")
            steps.append({"step": "e2fsck -fn", "seconds": seconds, "read_bytes": 0})
            steps[-1].update(zip(("blocks", "bytes"), _fetched(work, node), strict=True))
            files = _largest_files(device)
            dumps = work / "dumps"
            dumps.mkdir()
            commands = work / "dump.cmds"
            commands.write_text("".join(f'dump "{p}" "{dumps / str(i)}"\n' for i, (p, _) in enumerate(files)))
            seconds, _ = _run(["debugfs", "-f", str(commands), str(device)], "debugfs dump")
            dumped = sum(f.stat().st_size for f in dumps.iterdir())
            if dumped != sum(size for _, size in files):
                raise RuntimeError(f"debugfs dumped {dumped} bytes of {files}")
            steps.append(
                {"step": f"debugfs dump of {len(files)} libraries", "seconds": seconds, "read_bytes": dumped}
            )
            steps[-1].update(zip(("blocks", "bytes"), _fetched(work, node), strict=True))
    return {
        "image_bytes": os.path.getsize(image),
        "stored_blocks": int(published["blocks_sent"]),
        "stored_bytes": int(published["bytes_sent"]),
        "files": files,
        "steps": steps,
    }


METHOD = (
    "Lazy boot (report only, no target): a coordinator child holds v1 (published from a scratch store); "
    "a `cachepoint serve --coordinator` child on an empty store attaches it (`cachepoint attach`: "
    "lazily, nothing is fetched until read) and exports it over NBD. Nothing is mounted: `nbdfuse -r` "
    "shows the export as one file, `e2fsck -fn` checks the file system through it, then one `debugfs` "
    f"lists {DIRECTORY} and dumps its {FILES} largest shared libraries. After each step the daemon's "
    "`status --json` `bytes_by_source` says what the node fetched so far (stored bytes, as they come "
    "over the wire, readahead included), against the image's stored bytes (what the publish sent to "
    "the empty coordinator)."
)


def rows(table: Table, figures: dict[str, Any]) -> None:
    """The lazy boot's rows of the read paths table (report only: no target, no verdict)."""
    stored = int(figures["stored_bytes"])
    table.add(
        "Lazy boot: image / its stored bytes at the coordinator",
        f"{human_bytes(int(figures['image_bytes']))} / {human_bytes(stored)} "
        f"({figures['stored_blocks']} blocks)",
        "",
        "",
    )
    before = 0
    for step in figures["steps"]:
        fetched = int(step["bytes"])
        read = f", {human_bytes(int(step['read_bytes']))} of files read" if step["read_bytes"] else ""
        took = f"; {float(step['seconds']):.2f} s" if step["step"] != "attach" else ""
        table.add(
            f"Lazy boot: fetched after {step['step']}, total (% of stored)",
            f"{human_bytes(fetched)} ({int(step['blocks'])} blocks, {fetched / stored:.1%}; "
            f"this step {human_bytes(fetched - before)}{read}{took})",
            "",
            "",
        )
        before = fetched


def section_rows(bench: Bench, table: Table, image: Path) -> list[str]:
    """Measure a lazy boot of ``image`` and add its rows to ``table``; returns warnings (a failure
    becomes a "not measured" row, never a lost section)."""
    why = missing_tool()
    if not why:
        work = bench.path("lazy_boot")
        remove(work)
        work.mkdir()
        try:
            rows(table, measure(work, image, bench.log))
            return []
        except Exception as err:
            import traceback

            bench.log("lazy boot failed:\n" + traceback.format_exc())
            why = f"not measured: {type(err).__name__}: {err}"
        finally:
            remove(work)
    table.add("Lazy boot: bytes fetched by an empty node for `e2fsck -fn` and a few binaries", why, "", "")
    return [f"lazy boot {why}"]


def main() -> None:
    """``python -m bench.lazy_boot IMAGE``: the figures as one JSON object."""
    why = missing_tool()
    if why:
        sys.exit(why)
    with tempfile.TemporaryDirectory(prefix="lazy-boot-") as tmp:
        print(
            json.dumps(measure(Path(tmp), Path(sys.argv[1]), lambda m: print(m, file=sys.stderr)), indent=2)
        )


if __name__ == "__main__":
    main()
