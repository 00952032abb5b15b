"""A serving daemon reuses the memory of freed read replies instead of faulting in new pages for each
burst (cachepoint/memory.py, ``keep_reply_buffers``): glibc otherwise hands a burst's freed 2 MiB
buffers back to the kernel, and a warm `qemu-img convert` of a 1 GiB export paid 64,000 page
faults in the daemon (a quarter of its CPU).

Minor faults are counted, not time: they do not depend on how busy the machine is.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from cachepoint.disk.nbd import protocol as nbd
from tests.conftest import REPO, daemon, run_cli
from tests.test_nbd_protocol import connect, recv_exactly, request_disc

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs Linux /proc")

MiB = 1 << 20
PAGE = os.sysconf("SC_PAGE_SIZE")
IMAGE_BYTES = 16 * MiB
READ = 2 * MiB  # qemu-img convert's request size
IN_FLIGHT = 8
WARM_PASSES = 4  # the read cache fills, and the heap grows to the most replies have needed at once
PASSES = 64  # 1 GiB of replies
TIMEOUT = 120

BURSTS = """
import resource, sys
from cachepoint import memory
assert memory.keep_reply_buffers(), "glibc's mallopt refused the thresholds"

def burst():  # what a copying client keeps in flight: eight 2 MiB replies, then all freed
    replies = [bytearray(2 << 20) for _ in range(8)]
    del replies

burst()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
    burst()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def minor_faults(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[7])


def test_bursts_of_freed_two_mib_buffers_are_reused_without_new_page_faults():
    proc = subprocess.run(
        [sys.executable, "-c", BURSTS], cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT
    )
    if "refused" in proc.stderr or "AttributeError" in proc.stderr:
        pytest.skip(f"not glibc: {proc.stderr.strip()[-200:]}")
    assert proc.returncode == 0, proc.stderr
    touched = 50 * 8 * (2 << 20) // PAGE
    faults = int(proc.stdout)
    # Without the thresholds every page of every burst faults again (~100%).
    assert faults < touched // 20, f"{faults} minor faults for {touched} pages written"


def pipelined_reads(sock: socket.socket, size: int, passes: int) -> None:
    """Read the export whole ``passes`` times in 2 MiB READs, IN_FLIGHT at once, as a copying client
    does (simple replies: each is a 16-byte header, then the payload)."""
    offsets = [offset for _ in range(passes) for offset in range(0, size, READ)]
    sent = 0
    for done in range(len(offsets)):
        while sent < len(offsets) and sent - done < IN_FLIGHT:
            header = struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, 0, nbd.CMD_READ, sent, offsets[sent], READ)
            sock.sendall(header)
            sent += 1
        magic, error, _ = struct.unpack(">IIQ", recv_exactly(sock, 16))
        assert (magic, error) == (nbd.SIMPLE_REPLY_MAGIC, 0)
        recv_exactly(sock, READ)


def test_warm_pipelined_nbd_reads_fault_in_few_new_pages_in_the_daemon(tmp_path):
    store = tmp_path / "store"
    image = tmp_path / "os.img"
    image.write_bytes(os.urandom(IMAGE_BYTES))
    run_cli(store, "ingest", "os/base", image)
    run_cli(store, "image", "create", "desk", "os/base")
    with daemon(store, "--nbd", "127.0.0.1:0") as ready:
        pid = int(ready["pid"])  # type: ignore[call-overload]
        port = int(str(ready["nbd"][0]).rpartition(":")[2])  # type: ignore[index]
        run_cli(store, "attach", "desk", "--json")
        # One connection throughout: a connection's end lets the daemon trim its heap (memory.py).
        sock, size, _ = connect(port, "desk")
        with sock:
            sock.settimeout(TIMEOUT)
            assert size == IMAGE_BYTES
            pipelined_reads(sock, size, WARM_PASSES)
            before = minor_faults(pid)
            pipelined_reads(sock, size, PASSES)
            faults = minor_faults(pid) - before
            request_disc(sock)
    pages = PASSES * IMAGE_BYTES // PAGE
    # Before: about a fifth of the replies' pages were faulted in anew; now only the heap's growth to
    # a new peak of replies at once (a few thousand, rarely) is.
    assert faults < pages // 20, f"{faults} minor faults in the daemon for {pages} pages of replies"
