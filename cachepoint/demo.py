"""`make run`: the store at work on a generated disk image, with embedded defaults.

Runs the real `cachepoint` command step by step (each command is printed before it runs):
ingest a gold image, ingest a patched version (only changed blocks are stored), look at the log and
the diff, export and verify, roll back, check integrity, and composite an image from layers.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shlex
import shutil
import subprocess
import sys
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

    def say(self, text: str) -> None:
        print(f"\n\033[1m== {text}\033[0m" if sys.stdout.isatty() else f"\n== {text}", flush=True)

    def run(self, *args: str | Path) -> None:
        shown = " ".join(shlex.quote(str(a)) for a in args)
        print(f"$ cachepoint {shown}", flush=True)
        subprocess.run([sys.executable, "-m", "cachepoint", *map(str, args)], env=self.env, check=True)

    def check_same(self, exported: Path, source: Path) -> None:
        same = sha256_of(exported) == sha256_of(source)
        print(f"sha256 {exported.name} {'==' if same else '!='} {source.name}", flush=True)
        if not same:
            raise SystemExit(f"export of {exported} differs from {source}")


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

    demo.say(f"generate a {args.size_mib} MiB disk image: 40% free space, 30% text, 30% binary")
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
    store = workdir / "store"
    print(f"\nthe store is kept at {store}; try: CACHEPOINT_STORE={store} cachepoint ls")


if __name__ == "__main__":
    main()
