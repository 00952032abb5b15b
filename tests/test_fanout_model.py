"""The fan-out model's invariants (bench/fanout_model.py): small scenarios, no processes, no clocks."""

from __future__ import annotations

from dataclasses import replace

import pytest

from bench.fanout_model import Inputs, Scenario, percentile, simulate

MiB = 1 << 20
# Three sites, a 64 MiB version in pieces of 64 blocks (4 MiB): milliseconds per run.
SMALL = Scenario(version_bytes=64 * MiB, sites=3, nodes_per_site=4, piece_blocks=64, origin_bits_s=10e9)
INPUTS = Inputs()


@pytest.mark.parametrize("per_site", [1, 2, 4, 8])
def test_cooperation_never_moves_more_wan_bytes_than_no_cooperation(per_site: int) -> None:
    scenario = replace(SMALL, nodes_per_site=per_site)
    cooperative = simulate(scenario, INPUTS, "cooperative")
    alone = simulate(scenario, INPUTS, "none")
    assert cooperative.wan_bytes_per_site <= alone.wan_bytes_per_site * (1 + 1e-9)
    assert cooperative.origin_bytes <= alone.origin_bytes * (1 + 1e-9)
    # Each block crosses a site's WAN once: the version and its framing, whatever the number of nodes.
    assert cooperative.wan_bytes_per_site == pytest.approx(scenario.version_bytes * INPUTS.wire_overhead)
    assert alone.wan_bytes_per_site == pytest.approx(per_site * cooperative.wan_bytes_per_site)


def test_with_one_node_per_site_both_policies_agree_but_for_the_settle() -> None:
    scenario = replace(SMALL, nodes_per_site=1)
    alone = simulate(scenario, INPUTS, "none")
    cooperative = simulate(scenario, INPUTS, "cooperative")
    assert cooperative.wan_bytes_per_site == pytest.approx(alone.wan_bytes_per_site)
    assert cooperative.origin_bytes == pytest.approx(alone.origin_bytes)
    assert sorted(cooperative.done_s) == pytest.approx(
        [t + INPUTS.pullers_settle_s for t in sorted(alone.done_s)]
    )
    unsettled = simulate(scenario, replace(INPUTS, pullers_settle_s=0.0), "cooperative")
    assert sorted(unsettled.done_s) == pytest.approx(sorted(alone.done_s))


@pytest.mark.parametrize("policy", ["cooperative", "none"])
def test_time_to_deliver_grows_with_the_version_size(policy: str) -> None:
    times = [
        simulate(replace(SMALL, version_bytes=size), INPUTS, policy)
        for size in (16 * MiB, 64 * MiB, 256 * MiB)
    ]
    for smaller, larger in zip(times, times[1:], strict=False):
        assert larger.p50_s > smaller.p50_s
        assert larger.p99_s > smaller.p99_s
        assert larger.last_s > smaller.last_s


def test_no_node_finishes_before_its_intake_or_its_site_wan_could_carry_the_version() -> None:
    for policy in ("cooperative", "none"):
        outcome = simulate(SMALL, INPUTS, policy)
        wire = SMALL.version_bytes * INPUTS.wire_overhead
        floor = max(wire / INPUTS.node_intake_bytes_s, wire / (SMALL.wan_bits_s / 8))
        assert min(outcome.done_s) >= floor
        assert outcome.nodes == SMALL.sites * SMALL.nodes_per_site == len(outcome.done_s)


def test_percentiles_are_nearest_rank() -> None:
    values = [float(i) for i in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile([7.0], 99) == 7.0


def test_an_unknown_policy_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="'tree'"):
        simulate(SMALL, INPUTS, "tree")
