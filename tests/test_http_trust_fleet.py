"""The HTTP servers with TLS, end to end: the coordinator's REST API (`serve --http-tls`) and a daemon's
HTTP server (`cachepoint serve --http-tls`), called with curl over real TLS handshakes on loopback with
client certificates and bearer tokens of the fleet's CA, of another CA, expired, revoked, of the wrong
role and valid; and plaintext HTTP refused off loopback. Real coordinator and daemon processes."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from cachepoint.trust.bearer import BearerToken
from cachepoint.trust.principal import PEER_TLS_NAME, Principal, Role
from coordinator.fleet.registry import HEARTBEAT_INTERVAL_MS
from coordinator.pki.ca import CertificateAuthority
from tests.conftest import daemon, run_cli
from tests.fleet import Child, Fleet, backend_args, cachepoint_cli, coordinator_cli, random_image, wait_until
from tests.test_authz_fleet import assign, enrolled
from tests.test_trust_fleet import data_of, expired_here, issued_here, tls_coordinator

pytestmark = [
    pytest.mark.skipif(
        shutil.which("curl") is None, reason="curl is not installed (`make test` installs it with apt-get)"
    ),
    pytest.mark.coordinator_backends,  # every test runs on both backends (tests/conftest.py)
]
MIB = 1024 * 1024
# A revocation or an assignment reaches a node with its next heartbeat reply: one interval, plus slack
# for a loaded machine (waited for, not timed).
APPLIED_WITHIN = 10 * HEARTBEAT_INTERVAL_MS / 1000
HANDSHAKE_REFUSED = (35, 52, 56)  # curl: SSL connect error, empty reply, failure receiving data


@dataclass
class Answer:
    exit: int
    status: int
    body: bytes
    err: str

    def json(self) -> Any:
        return json.loads(self.body)

    def __str__(self) -> str:
        return f"curl exit {self.exit}, HTTP {self.status}: {self.body[:400]!r} {self.err}"


def curl(url: str, *args: str | Path, method: str = "GET", body: dict[str, Any] | None = None) -> Answer:
    command = ["curl", "--silent", "--show-error", "--max-time", "30", "--request", method]
    command += ["--write-out", "\n%{http_code}", *map(str, args)]
    if body is not None:
        command += ["--header", "Content-Type: application/json", "--data", json.dumps(body)]
    run = subprocess.run([*command, url], capture_output=True, timeout=60)
    data, _, code = run.stdout.rpartition(b"\n")
    return Answer(run.returncode, int(code or b"0"), data, run.stderr.decode(errors="replace").strip())


def with_cert(identity: Path) -> list[str | Path]:
    return ["--cert", identity / "cert.pem", "--key", identity / "key.pem"]


def with_token(token: str) -> list[str]:
    return ["--header", f"Authorization: Bearer {token}"]


def bearer(fleet: Fleet, name: str, role: str, ttl: str = "8h") -> str:
    out = coordinator_cli(
        "token", name, "--data", str(data_of(fleet)), "--role", role, "--ttl", ttl, "--json"
    )
    data = out.json()
    assert isinstance(data, dict) and data["token"].startswith("cpbearer1."), data
    return str(data["token"])


def person(fleet: Fleet, root: Path, name: str, role: str, lifetime: timedelta = timedelta(hours=1)) -> Path:
    return issued_here(fleet, root / name, Principal(name, (Role.parse(role),)), lifetime)


def assert_unauthenticated(answer: Answer, *words: str) -> None:
    assert answer.exit == 0 and answer.status == 401, answer
    error = answer.json()
    assert error["type"] == "Unauthenticated", error
    for word in words:
        assert word in error["error"], (word, error)


def assert_forbidden(answer: Answer, principal: str, route: str, rule: str) -> None:
    assert answer.exit == 0 and answer.status == 403, answer
    error = answer.json()
    assert (error["principal"], error["route"], error["rule"]) == (principal, route, rule), error
    assert f"principal {principal!r} may not call {route}: rule {rule}" in error["error"], error


@dataclass
class Credentials:
    """The identities every route is called with."""

    ca: Path  # the fleet's CA certificate (--cacert)
    stranger: Path  # a certificate of another CA
    expired: Path
    revoked: Path | None  # None where revocations are not known (a node)


def refusals(url: str, creds: Credentials, method: str, body: dict[str, Any] | None, *extra: str) -> None:
    """The route refuses every request without a current credential of the fleet."""
    base: list[str | Path] = ["--cacert", creds.ca, *extra]
    assert_unauthenticated(curl(url, *base, method=method, body=body), "no credential", "Bearer")
    stranger = curl(url, *base, *with_cert(creds.stranger), method=method, body=body)
    assert stranger.exit in HANDSHAKE_REFUSED and stranger.status == 0, stranger
    expired = curl(url, *base, *with_cert(creds.expired), method=method, body=body)
    assert_unauthenticated(expired, "expired")
    if creds.revoked is not None:
        revoked = curl(url, *base, *with_cert(creds.revoked), method=method, body=body)
        assert_unauthenticated(revoked, "revoked")


# -- the coordinator's REST API ------------------------------------------------------------------------

# (method, path, body, route, rule, who may, expected status, who may not (or None: anyone may))
REST_CALLS: list[tuple[str, str, dict[str, Any] | None, str, str, str, int, str | None]] = [
    ("GET", "/healthz", None, "GET /healthz", "any", "n1", 200, None),
    ("GET", "/metrics", None, "GET /metrics", "metrics", "prom", 200, "audrey"),
    (
        "GET",
        "/v1/history/users/alice/timeline",
        None,
        "GET /v1/history/users/{user}/timeline",
        "own-history",
        "alice",
        404,  # alice has no versions yet: the handler's answer, past the rule
        "bob",
    ),
    (
        "GET",
        "/v1/history/users/alice/files/docs/a.txt",
        None,
        "GET /v1/history/users/{user}/files/{path}",
        "own-history",
        "alice",
        404,
        "n1",
    ),
    (
        "GET",
        "/v1/history/users/alice/content/docs/a.txt?actor=mallory",
        None,
        "GET /v1/history/users/{user}/content/{path}",
        "restore",
        "audrey",
        404,
        "bob",
    ),
    (
        "POST",
        "/v1/history/users/alice/export",
        {"actor": "mallory"},
        "POST /v1/history/users/{user}/export",
        "export",
        "audrey",
        404,
        "alice",
    ),
    (
        "GET",
        "/v1/history/diff?old=user/alice/home@1&new=user/alice/home@2",
        None,
        "GET /v1/history/diff",
        "read-diff",
        "alice",
        404,
        "bob",
    ),
    ("GET", "/v1/history/holds", None, "GET /v1/history/holds", "oversight", "audrey", 200, "alice"),
    (
        "PUT",
        "/v1/history/holds/bob",
        {"reason": "case 7", "actor": "somebody-else"},
        "PUT /v1/history/holds/{user}",
        "hold",
        "audrey",
        201,
        "alice",
    ),
    # audrey set the hold: she may not release it, otto may.
    (
        "DELETE",
        "/v1/history/holds/bob?actor=audrey",
        None,
        "DELETE /v1/history/holds/{user}",
        "release",
        "otto",
        200,
        "audrey",
    ),
    ("POST", "/v1/history/gc", {"dry_run": True}, "POST /v1/history/gc", "gc", "root", 200, "audrey"),
    ("GET", "/v1/history/audit", None, "GET /v1/history/audit", "oversight", "audrey", 200, "alice"),
    (
        "GET",
        "/v1/history/audit/verify",
        None,
        "GET /v1/history/audit/verify",
        "oversight",
        "root",
        200,
        "n1",
    ),
]


def test_every_rest_route_with_tls_refuses_callers_without_a_valid_credential_and_applies_its_rule(
    tmp_path: Path,
) -> None:
    with Fleet(tmp_path) as fleet:
        coordinator = tls_coordinator(fleet, "--http", "127.0.0.1:0", "--http-tls")
        base = f"https://{coordinator.ready['http']}"
        people = {
            name: person(fleet, tmp_path, name, role)
            for name, role in [
                ("alice", "user:alice"),
                ("bob", "user:bob"),
                ("n1", "node"),
                ("audrey", "auditor"),
                ("otto", "auditor"),
                ("root", "admin"),
                ("carol", "auditor"),
                ("prom", "monitor"),
            ]
        }
        other = CertificateAuthority.create(tmp_path / "other")
        creds = Credentials(
            ca=people["alice"] / "ca.pem",
            stranger=issued_here(
                fleet,
                tmp_path / "stranger",
                Principal("audrey", (Role("auditor"),)),
                timedelta(hours=1),
                other,
            ),
            expired=expired_here(fleet, tmp_path / "old-audrey", Principal("old-audrey", (Role("auditor"),))),
            revoked=people["carol"],
        )
        carols_token = bearer(fleet, "carol", "auditor")
        coordinator_cli("revoke", "carol", "--data", str(data_of(fleet)))

        for method, path, body, route, rule, allowed, status, refused in REST_CALLS:
            url = base + path
            refusals(url, creds, method, body)
            tls: list[str | Path] = ["--cacert", creds.ca]
            if refused is not None:
                wrong = curl(url, *tls, *with_cert(people[refused]), method=method, body=body)
                assert_forbidden(wrong, refused, route, rule)
            right = curl(url, *tls, *with_cert(people[allowed]), method=method, body=body)
            assert right.exit == 0 and right.status == status, (route, str(right))
            assert right.status not in (401, 403)

        # Bearer tokens: alice's reads her history and not bob's; a forged, foreign, expired or
        # revoked one is a 401 saying which.
        tls = ["--cacert", creds.ca]
        alices = bearer(fleet, "alice", "user:alice")
        own = curl(base + "/v1/history/users/alice/timeline", *tls, *with_token(alices))
        assert own.status == 404 and "no layers" in own.json()["error"], own
        bobs = curl(base + "/v1/history/users/bob/timeline", *tls, *with_token(alices))
        assert_forbidden(bobs, "alice", "GET /v1/history/users/{user}/timeline", "own-history")
        head, _, signature = alices.rpartition(".")
        claims = json.loads(_unb64(head.removeprefix("cpbearer1.")))
        claims["roles"] = ["auditor"]
        forged = "cpbearer1." + _b64(json.dumps(claims).encode()) + "." + signature
        audit_url = base + "/v1/history/audit"
        assert_unauthenticated(curl(audit_url, *tls, *with_token(forged)), "signature")
        foreign = BearerToken.issue(
            other.key, Principal("audrey", (Role("auditor"),)), timedelta(hours=1), time.time()
        )
        assert_unauthenticated(curl(audit_url, *tls, *with_token(foreign)), "not the fleet CA's")
        short = bearer(fleet, "audrey", "auditor", ttl="1s")
        time.sleep(2)
        assert_unauthenticated(curl(audit_url, *tls, *with_token(short)), "expired")
        assert_unauthenticated(curl(audit_url, *tls, *with_token(carols_token)), "carol", "revoked")
        assert_unauthenticated(curl(audit_url, *tls, *with_token("Basic xyz")), "not a cachepoint bearer")
        # A certificate and a token must name the same principal.
        both = curl(audit_url, *tls, *with_cert(people["audrey"]), *with_token(alices))
        assert_unauthenticated(both, "'audrey'", "'alice'")

        # The audit log names authenticated principals only: the hold was set by audrey and released
        # by otto whatever the requests claimed, and the refused calls that would have changed
        # something are there under the refused principal's name.
        records = curl(audit_url, *tls, *with_token(bearer(fleet, "otto", "auditor"))).json()["records"]
        about_bob = [(r["action"], r["actor"]) for r in records if r["subject"] == "user/bob"]
        assert about_bob == [("hold.set", "audrey"), ("hold.release", "otto")], about_bob
        denied = {(r["actor"], r["subject"]) for r in records if r["action"] == "access.denied"}
        assert denied == {
            ("bob", "GET /v1/history/users/{user}/content/{path}"),
            ("alice", "POST /v1/history/users/{user}/export"),
            ("alice", "PUT /v1/history/holds/{user}"),
            ("audrey", "DELETE /v1/history/holds/{user}"),
            ("audrey", "POST /v1/history/gc"),
        }, denied
        assert not any(r["actor"] in ("mallory", "somebody-else") for r in records), records


def _b64(data: bytes) -> str:
    import base64

    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    import base64

    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# -- a daemon's HTTP server ------------------------------------------------------------------------------


def test_a_daemons_https_serves_each_route_only_to_principals_the_table_lets_read(tmp_path: Path) -> None:
    with Fleet(tmp_path) as fleet:
        CertificateAuthority.create(data_of(fleet))  # the fleet's CA (no coordinator needs to run)
        store = tmp_path / "n1"
        issued_here(fleet, store / "identity", Principal("n1", (Role("node"),)), timedelta(hours=1))
        disk, bobs_disk = tmp_path / "disk.img", tmp_path / "bob.img"
        random_image(disk, MIB, seed=21)
        random_image(bobs_disk, MIB, seed=22)
        for user in ("alice", "bob"):
            home = tmp_path / f"{user}-home"
            home.mkdir()
            (home / f"{user}.txt").write_text(f"{user}'s notes\n")
            cachepoint_cli(store, "ingest", f"user/{user}/home", home)
        cachepoint_cli(store, "ingest", "os/x", disk)
        cachepoint_cli(store, "ingest", "user/bob/disk", bobs_disk)
        cachepoint_cli(store, "image", "create", "desk", "os/x@1")
        cachepoint_cli(store, "image", "create", "bobdesk", "os/x@1", "user/bob/disk@1")

        people = {
            name: person(fleet, tmp_path, name, role)
            for name, role in [
                ("alice", "user:alice"),
                ("bob", "user:bob"),
                ("n2", "node"),
                ("prom", "monitor"),
            ]
        }
        people["n1"] = store / "identity"
        creds = Credentials(
            ca=store / "identity" / "ca.pem",
            stranger=issued_here(
                fleet,
                tmp_path / "stranger",
                Principal("bob", (Role("user", "bob"),)),
                timedelta(hours=1),
                CertificateAuthority.create(tmp_path / "other"),
            ),
            expired=expired_here(fleet, tmp_path / "old-bob", Principal("old-bob", (Role("user", "bob"),))),
            revoked=None,  # no coordinator here: revocations reach a node with heartbeats (next test)
        )
        with daemon(store, "--http", "127.0.0.1:0", "--http-tls") as ready:
            port = str(ready["http"]).rpartition(":")[2]
            base = f"https://{PEER_TLS_NAME}:{port}"
            # The node's certificate names the fleet's peer name, never an address.
            tls: list[str | Path] = ["--cacert", creds.ca, "--resolve", f"{PEER_TLS_NAME}:{port}:127.0.0.1"]
            bob_file = "/v1/versions/user%2Fbob%2Fhome@1/files/bob.txt"
            bob_disk = "/v1/versions/user%2Fbob%2Fdisk@1/file"
            read_ref, read_layer = "read-ref", "read-layer"
            calls = [  # (path, route, rule, who may, who may not)
                ("/healthz", "GET /healthz", "any", "alice", None),
                ("/readyz", "GET /readyz", "any", "n2", None),
                ("/metrics", "GET /metrics", "metrics", "prom", "n2"),
                ("/v1/versions/os%2Fx@1/file", "GET /v1/versions/{ref}/file", read_ref, "alice", None),
                (bob_disk, "GET /v1/versions/{ref}/file", read_ref, "bob", "alice"),
                (bob_disk, "GET /v1/versions/{ref}/file", read_ref, "n1", "n2"),
                (bob_file, "GET /v1/versions/{ref}/files/{path}", read_ref, "bob", "alice"),
                ("/v1/images/desk/disk", "GET /v1/images/{name}/disk", read_layer, "alice", None),
                ("/v1/images/bobdesk/disk", "GET /v1/images/{name}/disk", read_layer, "bob", "n2"),
            ]
            for path, route, rule, allowed, refused in calls:
                url = base + path
                refusals(url, creds, "GET", None, "--resolve", f"{PEER_TLS_NAME}:{port}:127.0.0.1")
                if refused is not None:
                    assert_forbidden(curl(url, *tls, *with_cert(people[refused])), refused, route, rule)
                right = curl(url, *tls, *with_cert(people[allowed]))
                assert right.exit == 0 and right.status == 200, (path, str(right))
            assert curl(base + bob_disk, *tls, *with_cert(people["n1"])).body == bobs_disk.read_bytes()
            assert curl(base + bob_file, *tls, *with_cert(people["bob"])).body == b"bob's notes\n"

            # A token from the coordinator, checked offline by the node: alice's reads her files,
            # not bob's, and a range of the OS disk.
            alices = bearer(fleet, "alice", "user:alice")
            own = curl(base + "/v1/versions/user%2Falice%2Fhome@1/files/alice.txt", *tls, *with_token(alices))
            assert own.status == 200 and own.body == b"alice's notes\n", own
            theirs = curl(base + bob_file, *tls, *with_token(alices))
            assert_forbidden(theirs, "alice", "GET /v1/versions/{ref}/files/{path}", read_ref)
            ranged = curl(base + "/v1/versions/os%2Fx@1/file", *tls, *with_token(alices), "--range", "0-99")
            assert ranged.status == 206 and ranged.body == disk.read_bytes()[:100], ranged
            # HEAD is checked as GET.
            head = curl(base + bob_file, *tls, *with_token(alices), "--head")
            assert head.status == 403, head


def test_a_daemons_https_applies_the_revocations_and_assignments_its_heartbeats_bring(
    tmp_path: Path,
) -> None:
    with Fleet(tmp_path) as fleet:
        coordinator = tls_coordinator(fleet)
        store = enrolled(fleet, coordinator, tmp_path, "n1")
        home = tmp_path / "alice-home"
        home.mkdir()
        (home / "alice.txt").write_text("alice's notes\n")
        cachepoint_cli(store, "ingest", "user/alice/home", home)
        n2 = enrolled(fleet, coordinator, tmp_path, "n2") / "identity"
        n3 = enrolled(fleet, coordinator, tmp_path, "n3") / "identity"
        audrey = person(fleet, tmp_path, "audrey", "auditor")
        audreys = bearer(fleet, "audrey", "auditor")
        https = ("--http", "127.0.0.1:0", "--http-tls")
        node = fleet.cachepoint("n1", coordinator.address, store=store, subscribe=(), extra=https)
        port = str(node.ready["http"]).rpartition(":")[2]
        tls: list[str | Path] = [
            "--cacert",
            store / "identity" / "ca.pem",
            "--resolve",
            f"{PEER_TLS_NAME}:{port}:127.0.0.1",
        ]
        url = f"https://{PEER_TLS_NAME}:{port}/v1/versions/user%2Falice%2Fhome@1/files/alice.txt"
        route, rule = "GET /v1/versions/{ref}/files/{path}", "read-ref"

        def read(*credential: str | Path) -> Answer:
            return curl(url, *tls, *credential)

        assert read(*with_cert(audrey)).status == 200
        assert read(*with_token(audreys)).status == 200
        for other in ("n2", "n3"):
            assert_forbidden(read(*with_cert(tmp_path / other / "identity")), other, route, rule)

        coordinator_cli("revoke", "audrey", "--data", str(data_of(fleet)))
        assign(fleet, "alice", "n2")
        wait_until(
            "n1's HTTPS to refuse the revoked auditor and let n2, now alice's, read her files",
            lambda: read(*with_cert(audrey)).status == 401 and read(*with_cert(n2)).status == 200,
            APPLIED_WITHIN,
            logs=fleet.logs,
        )
        assert_unauthenticated(read(*with_cert(audrey)), "'audrey'", "revoked")
        assert_unauthenticated(read(*with_token(audreys)), "'audrey'", "revoked")
        alices = read(*with_cert(n2))
        assert alices.status == 200 and alices.body == b"alice's notes\n", alices
        assert_forbidden(read(*with_cert(n3)), "n3", route, rule)

        # The view is live both ways: unassigned, n2 is refused again.
        coordinator_cli("unassign", "alice", "n2", "--data", str(data_of(fleet)))
        wait_until(
            "n1's HTTPS to refuse n2 once alice is unassigned from it",
            lambda: read(*with_cert(n2)).status == 403,
            APPLIED_WITHIN,
            logs=fleet.logs,
        )
        assert_forbidden(read(*with_cert(n2)), "n2", route, rule)


# -- plaintext ---------------------------------------------------------------------------------------------


def test_plaintext_http_off_loopback_is_refused_before_anything_is_bound(tmp_path: Path) -> None:
    store = tmp_path / "store"
    refused = run_cli(store, "serve", "--listen", "127.0.0.1:0", "--http", "0.0.0.0:0", check=False)
    assert refused.code == 4, refused
    assert "0.0.0.0:0" in refused.err and "--http-tls" in refused.err and "loopback" in refused.err
    assert not (store / "daemon.json").exists() and not (store / "agent.sock").exists()

    data = tmp_path / "coordinator"
    run = coordinator_cli(
        "serve",
        "--data",
        str(data),
        "--listen",
        "127.0.0.1:0",
        "--http",
        "0.0.0.0:0",
        *backend_args(),
        check=False,
    )
    assert run.code == 4 and "0.0.0.0:0" in run.err and "--http-tls" in run.err, run
    assert not data.exists()  # refused before even the store was made

    # --http-tls on a daemon without an identity is refused, naming what to do.
    no_identity = run_cli(
        store, "serve", "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0", "--http-tls", check=False
    )
    assert no_identity.code == 4 and "enroll" in no_identity.err, no_identity


def test_a_tls_rest_api_is_served_on_every_address_and_answers_only_with_tls(tmp_path: Path) -> None:
    with Fleet(tmp_path) as fleet:
        coordinator: Child = tls_coordinator(fleet, "--http", "0.0.0.0:0", "--http-tls")
        port = str(coordinator.ready["http"]).rpartition(":")[2]
        auditor = person(fleet, tmp_path, "audrey", "auditor")
        answer = curl(
            f"https://127.0.0.1:{port}/v1/history/holds", "--cacert", auditor / "ca.pem", *with_cert(auditor)
        )
        assert answer.status == 200 and answer.json() == {"holds": []}, answer
        plain = curl(f"http://127.0.0.1:{port}/v1/history/holds")
        assert plain.status in (0, 400) and b"holds" not in plain.body, plain
