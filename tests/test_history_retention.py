"""Retention rules: what each rule keeps, that any rule keeping a version is enough, that the latest and
tagged versions and held users' versions always survive, and how policies are read from the config."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from cachepoint.errors import InvalidInput
from cachepoint.model import LayerKind, Manifest, VersionInfo
from cachepoint.store.catalog import PendingCommit
from cachepoint.store.store import Store
from cachepoint.wire import manifest_to_bytes
from coordinator.config import load
from coordinator.history.gc import plan
from coordinator.history.retention import Retention, RetentionPolicy, reasons_to_keep
from tests.fleet import open_coordinator_store

pytestmark = pytest.mark.coordinator_backends  # every test runs on both backends (tests/conftest.py)

HOUR = 3600 * 10**9
DAY = 24 * HOUR
NOW = int(datetime(2026, 11, 26, 12, tzinfo=UTC).timestamp()) * 10**9


def version(number: int, created_ns: int, layer: str = "user/alice/home") -> VersionInfo:
    return VersionInfo(
        layer, number, number - 1, created_ns, "a", "d", "", bytes(32), LayerKind.USER, 0, 65536
    )


def kept(policy: RetentionPolicy, versions: list[VersionInfo]) -> list[int]:
    return sorted(n for n, why in reasons_to_keep(versions, policy, NOW).items() if why)


# Ten versions: two a day for the last five days (06:00 and 11:00 UTC).
TEN = [version(n, NOW - (5 - (n - 1) // 2) * DAY + (-6 * HOUR if n % 2 else -HOUR)) for n in range(1, 11)]


def test_each_rule_keeps_what_it_says():
    assert kept(RetentionPolicy(keep_last=3), TEN) == [8, 9, 10]
    assert kept(RetentionPolicy(keep_days=3), TEN) == [7, 8, 9, 10]
    assert kept(RetentionPolicy(keep_daily=3), TEN) == [6, 8, 10], "the newest of each of the 3 newest days"
    assert kept(RetentionPolicy(keep_all=True), TEN) == list(range(1, 11))
    assert kept(RetentionPolicy(), TEN) == []


def test_a_version_any_rule_keeps_is_kept():
    both = RetentionPolicy(keep_last=1, keep_daily=2)
    assert kept(both, TEN) == [8, 10]
    reasons = reasons_to_keep(TEN, both, NOW)
    assert sorted(reasons[10]) == ["keep_daily", "keep_last"]


def test_weeklies_keep_the_newest_version_of_each_iso_week():
    weekly = [version(n, NOW - (30 - 3 * n) * DAY) for n in range(1, 11)]  # every third day
    weeks = {datetime.fromtimestamp(v.created_ns / 1e9, UTC).isocalendar()[:2] for v in weekly}
    chosen = kept(RetentionPolicy(keep_weekly=len(weeks)), weekly)
    assert len(chosen) == len(weeks) and 10 in chosen


def commit(store: Store, layer: str, created_ns: int, tags: tuple[str, ...] = ()) -> None:
    manifest = Manifest(65536, False, ())
    store.catalog.commit(
        layer=layer,
        kind=LayerKind.parse(layer.split("/")[0]),
        pending=PendingCommit(manifest_to_bytes(manifest), {}),
        manifest=manifest,
        author="a",
        device="d",
        message="",
        tags=tags,
        created_ns=created_ns,
    )


def test_the_latest_tagged_and_held_versions_survive_and_kinds_without_a_policy_keep_everything(tmp_path):
    with open_coordinator_store(tmp_path / "store") as store:
        for n in range(1, 5):
            commit(store, "user/alice/home", NOW - (10 - n) * DAY, tags=("pinned",) if n == 2 else ())
            commit(store, "user/bob/home", NOW - (10 - n) * DAY)
            commit(store, "os/win10", NOW - (10 - n) * DAY)
        nothing = Retention({LayerKind.USER: RetentionPolicy()})
        result = plan(store, nothing, held_users={"bob"}, now_ns=NOW)
        assert [v.ref for v in result.delete] == ["user/alice/home@1", "user/alice/home@3"]
        assert [v.ref for v in result.held] == ["user/bob/home@1", "user/bob/home@2", "user/bob/home@3"]
        assert result.kept == 12 - 2


def test_retention_is_read_from_the_coordinator_config_and_mistakes_are_named(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text(
        'data = "d"\n[retention.user]\nkeep_last = 10\nkeep_daily = 7\n[retention.os]\nkeep_all = true\n'
    )
    settings = load(config)
    assert settings.retention_rules.for_kind(LayerKind.USER) == RetentionPolicy(keep_last=10, keep_daily=7)
    assert settings.retention_rules.for_kind(LayerKind.APP) == RetentionPolicy(keep_all=True), (
        "no policy: keep"
    )
    for text, words in [
        ("[retention.usr]\nkeep_last = 1\n", "unknown layer kind"),
        ("[retention.user]\nkeep_lats = 1\n", "unknown rules ['keep_lats']"),
        ('[retention.user]\nkeep_last = "10"\n', "keep_last must be a whole number"),
        ("[retention.user]\nkeep_days = -1\n", "keep_days = -1"),
        ("[retention.user]\nkeep_all = 1\n", "keep_all must be true or false"),
        ('retention = "all"\n', "retention must be a table"),
    ]:
        config.write_text(text)
        with pytest.raises(InvalidInput, match=words.replace("[", r"\[").replace("]", r"\]")):
            load(config)
