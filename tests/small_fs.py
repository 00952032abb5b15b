"""A small tmpfs that this test process and every child it starts can use like any directory.

The tmpfs is mounted inside a new mount namespace (``unshare -rm``: a user and mount namespace, so no
privileges are needed; or ``unshare -m`` when only root can do it), by a holder process that then
sleeps. Every process reaches it through ``/proc/HOLDER/root/MOUNT``: the holder's view of the file
system, tmpfs included. Nothing is mounted in the test's own namespace, so nothing can be left
mounted: ending the holder (by its pid) ends the namespace, and the tmpfs goes once the last file
open on it is closed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shlex
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

HOLDER_SECONDS = 1800  # the holder ends by itself even if this process is killed before it ends it
START_TIMEOUT = 30.0


class SmallFilesystem:
    def __init__(self, holder: subprocess.Popen[str], mount: Path) -> None:
        self.holder = holder
        self.mount = mount

    @property
    def path(self) -> Path:
        """The tmpfs, as every process on this host can reach it while the holder lives."""
        return Path(f"/proc/{self.holder.pid}/root{self.mount}")

    def free(self) -> int:
        """Bytes an unprivileged writer may still write (what `df` shows as available)."""
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def total(self) -> int:
        st = os.statvfs(self.path)
        return st.f_blocks * st.f_frsize

    def fill(self, name: str = "filler", leave: int = 0) -> Path:
        """Write zeros into ``name`` until only ``leave`` bytes are free (0: until ENOSPC, in ever
        smaller writes so that not one page is left). Bounded: it stops at the first refusal."""
        path = self.path / name
        with open(path, "ab", buffering=0) as f:
            for chunk in (1 << 20, 64 << 10, 4 << 10):
                while self.free() - chunk >= leave:
                    try:
                        f.write(b"\0" * chunk)
                    except OSError as err:
                        if err.errno != errno.ENOSPC:
                            raise
                        break
            os.fsync(f.fileno())
        return path


def _start_holder(mount: Path, size: str, userns: bool) -> subprocess.Popen[str] | None:
    script = (
        f"mount -t tmpfs -o size={size} none {shlex.quote(str(mount))} && echo ready && "
        f"exec sleep {HOLDER_SECONDS}"
    )
    args = ["unshare", "-rm" if userns else "-m", "sh", "-c", script]
    holder = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert holder.stdout is not None
    line = holder.stdout.readline()  # "ready", or "" when the mount failed and sh exited
    if line.strip() == "ready":
        return holder
    holder.wait(START_TIMEOUT)
    return None


@contextlib.contextmanager
def small_filesystem(mount: Path, size: str) -> Iterator[SmallFilesystem]:
    """A tmpfs of ``size`` mounted at ``mount`` in its own namespace; skips when none can be made."""
    if not shutil.which("unshare"):
        pytest.skip("needs a small file system: unshare (util-linux) is not installed")
    mount.mkdir(parents=True, exist_ok=True)
    holder = _start_holder(mount, size, userns=True)
    if holder is None and os.geteuid() == 0:
        holder = _start_holder(mount, size, userns=False)
    if holder is None:
        pytest.skip("needs a small file system: cannot mount a tmpfs in a new mount namespace here")
    try:
        yield SmallFilesystem(holder, mount)
    finally:
        holder.send_signal(signal.SIGTERM)
        try:
            holder.wait(START_TIMEOUT)
        except subprocess.TimeoutExpired:
            holder.kill()
            holder.wait(START_TIMEOUT)
