"""Retention policies, one per layer kind, from the coordinator's TOML config::

    [retention.user]
    keep_last = 10      # the 10 newest versions of each layer
    keep_days = 30      # every version made in the last 30 days
    keep_daily = 7      # the newest version of each of the 7 newest days that have versions (UTC)
    keep_weekly = 4     # the newest version of each of the 4 newest ISO weeks that have versions
    [retention.os]
    keep_all = true

A version is kept when any rule keeps it. A kind without a policy keeps everything: deleting needs
an explicit policy. Whatever the policy, the newest version of a layer and every tagged version are
kept (a ref someone can name never dangles), and so is every version of a user on hold (holds.py).
This module only decides; gc.py deletes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields, replace
from datetime import UTC, datetime
from typing import Any

from cachepoint.errors import InvalidInput
from cachepoint.model import LayerKind, VersionInfo

DAY_NS = 86_400 * 1_000_000_000
MAX_COUNT = 1_000_000


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    keep_all: bool = False
    """Keep every version (the default for a kind without a policy)."""
    keep_last: int = 0
    """Keep the N newest versions of each layer."""
    keep_days: int = 0
    """Keep every version made in the last D days."""
    keep_daily: int = 0
    """Keep the newest version of each of the N newest days (UTC) that have a version."""
    keep_weekly: int = 0
    """Keep the newest version of each of the N newest ISO weeks that have a version."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name != "keep_all" and not 0 <= value <= MAX_COUNT:
                raise InvalidInput(f"retention {f.name} = {value}: a whole number from 0 to {MAX_COUNT}")

    def as_json(self) -> dict[str, object]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name)}


KEEP_EVERYTHING = RetentionPolicy(keep_all=True)


def parse_policies(data: Any, source: str) -> dict[LayerKind, RetentionPolicy]:
    """The ``[retention.KIND]`` tables of a config; unknown kinds, rules and wrong types are refused
    by name."""
    if not isinstance(data, dict):
        raise InvalidInput(f"config {source}: retention must be a table of [retention.KIND] tables")
    kinds = {str(kind): kind for kind in LayerKind}
    rules = {f.name: f.type for f in fields(RetentionPolicy)}
    policies: dict[LayerKind, RetentionPolicy] = {}
    for kind_name, table in data.items():
        if kind_name not in kinds:
            raise InvalidInput(
                f"config {source}: retention.{kind_name}: unknown layer kind (known: {sorted(kinds)})"
            )
        if not isinstance(table, dict):
            raise InvalidInput(f"config {source}: retention.{kind_name} must be a table")
        unknown = sorted(set(table) - set(rules))
        if unknown:
            raise InvalidInput(
                f"config {source}: retention.{kind_name}: unknown rules {unknown} (known: {sorted(rules)})"
            )
        for rule, value in table.items():
            wanted = bool if rule == "keep_all" else int
            if not isinstance(value, wanted) or (wanted is int and isinstance(value, bool)):
                raise InvalidInput(
                    f"config {source}: retention.{kind_name}.{rule} must be "
                    f"{'true or false' if wanted is bool else 'a whole number'}, not {value!r}"
                )
        policies[kinds[kind_name]] = RetentionPolicy(**table)
    return policies


def _newest_per_period(versions: list[VersionInfo], count: int, period: Callable[[int], object]) -> set[int]:
    """Numbers of the newest version of each of the ``count`` newest periods that have versions."""
    chosen: dict[object, int] = {}
    for info in versions:  # newest first
        key = period(info.created_ns)
        if key not in chosen:
            if len(chosen) >= count:
                break
            chosen[key] = info.number
    return set(chosen.values())


def _day(ns: int) -> object:
    return datetime.fromtimestamp(ns / 1e9, UTC).date()


def _week(ns: int) -> object:
    return datetime.fromtimestamp(ns / 1e9, UTC).isocalendar()[:2]


def reasons_to_keep(
    versions: Iterable[VersionInfo], policy: RetentionPolicy, now_ns: int
) -> dict[int, list[str]]:
    """For each version of ONE layer, the rules that keep it (an empty list: no rule does).

    Ages are judged on the coordinator's clock: by each version's kept time (a device's time corrected
    for its skew, coordinator/catalog/clock.py), and again by its arrival. A clock set between making a
    version and delivering it (a reset clock fixed by NTP) leaves a kept time in the past that no
    reading could correct; a version made before it arrived is never younger than its arrival says, so
    a version kept by either view is kept. (Versions recorded before arrival times were kept have one
    view.)"""
    versions = list(versions)
    reasons = _reasons(versions, policy, now_ns)
    if any(v.received_ns for v in versions):
        by_arrival = [replace(v, created_ns=v.received_ns or v.created_ns) for v in versions]
        for number, rules in _reasons(by_arrival, policy, now_ns).items():
            reasons[number] += [f"{rule} (by arrival)" for rule in rules if rule not in reasons[number]]
    return reasons


def _reasons(versions: list[VersionInfo], policy: RetentionPolicy, now_ns: int) -> dict[int, list[str]]:
    newest_first = sorted(versions, key=lambda v: (v.created_ns, v.number), reverse=True)
    reasons: dict[int, list[str]] = {v.number: [] for v in newest_first}
    if policy.keep_all:
        for number in reasons:
            reasons[number].append("keep_all")
    for info in newest_first[: policy.keep_last]:
        reasons[info.number].append("keep_last")
    if policy.keep_days:
        horizon = now_ns - policy.keep_days * DAY_NS
        for info in newest_first:
            if info.created_ns >= horizon:
                reasons[info.number].append("keep_days")
    if policy.keep_daily:
        for number in _newest_per_period(newest_first, policy.keep_daily, _day):
            reasons[number].append("keep_daily")
    if policy.keep_weekly:
        for number in _newest_per_period(newest_first, policy.keep_weekly, _week):
            reasons[number].append("keep_weekly")
    return reasons


@dataclass(frozen=True, slots=True)
class Retention:
    """The policies of every kind; a kind without one keeps everything."""

    policies: Mapping[LayerKind, RetentionPolicy]

    def for_kind(self, kind: LayerKind) -> RetentionPolicy:
        return self.policies.get(kind, KEEP_EVERYTHING)

    def as_json(self) -> dict[str, object]:
        return {str(kind): self.for_kind(kind).as_json() for kind in LayerKind}
