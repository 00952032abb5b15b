"""`make run` (cachepoint/demo.py) end to end, on a small image: it finishes by itself, its fleet runs
with mutual TLS on machines it enrolled with join tokens, and it shows the calls the fleet refuses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

DEMO_TIMEOUT = 900.0  # seconds: a few on an idle machine, far more with the cores shared


def run_demo(workdir: Path) -> subprocess.CompletedProcess[str]:
    # Its own session, so that on a timeout the daemons it started go with it.
    proc = subprocess.Popen(
        [sys.executable, "-m", "cachepoint.demo", "--dir", str(workdir), "--size-mib", "8"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={k: v for k, v in os.environ.items() if k not in ("CACHEPOINT_IDENTITY", "CACHEPOINT_STORE")},
    )
    try:
        out, err = proc.communicate(timeout=DEMO_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"the demo did not finish within {DEMO_TIMEOUT:.0f}s:\n{out}\n{err}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_the_demo_enrolls_its_fleet_over_mutual_tls_and_shows_the_calls_it_refuses(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    run = run_demo(workdir)
    assert run.returncode == 0, f"{run.stdout}\n{run.stderr}"
    out = run.stdout

    # The coordinator made the fleet's CA, and every machine enrolled through the real commands: a
    # token from the coordinator's data directory, spent where the key is made and kept.
    assert "serve --data" in out and "--tls" in out, out
    assert (workdir / "coordinator" / "ca" / "ca.crt").is_file()
    identities = {
        "release-bot": workdir / "admin" / "identity",
        "blade-1": workdir / "blade-1" / "identity",
        "blade-2": workdir / "blade-2" / "identity",
        "alice": workdir / "alice-identity",
    }
    for name, identity in identities.items():
        assert f"$ cachepoint-coordinator enroll {name} --data" in out, out
        assert f"enrolled as {name} " in out, out
        assert (identity / "cert.pem").is_file() and (identity / "key.pem").is_file(), identity
    # The token is a secret: the demo shows only its beginning.
    assert "--token 'cpjoin1." in out and "…'" in out, out

    # The fleet still works over TLS: the second blade got the image from its site peer, exactly.
    assert "blade-2: origin 0 blocks (0.0 MiB), site " in out, out
    assert "sha256 blade-2.img == gold-v2.img" in out, out

    # A client without a certificate is refused in the handshake (exit 9, told to enroll), and a
    # blade alice is not assigned to is refused her history naming principal, method and rule (exit 10).
    assert "this machine must enroll first" in out and "(refused: exit 9)" in out, out
    assert (
        "(PERMISSION_DENIED): principal 'blade-2' may not call /cachepoint.v1.History/FileHistory: "
        "rule own-history" in out
    ), out
    assert "(refused: exit 10)" in out, out
    # ... while alice, with her own certificate, reads it.
    assert "user/alice/home@2  blade-1" in out, out
