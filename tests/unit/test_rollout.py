"""Rolling batches: Kubernetes' arithmetic and the invariants at every step."""

from __future__ import annotations

import pytest

from agent.rollout import Batch, describe, plan, resolve


@pytest.mark.parametrize("value,n,up,want", [
    ("25%", 4, True, 1), ("25%", 5, True, 2), ("25%", 5, False, 1), ("0%", 7, True, 0),
    ("100%", 3, False, 3), (2, 10, True, 2), ("10%", 1, True, 1), ("10%", 1, False, 0)])
def test_resolve(value: int | str, n: int, up: bool, want: int) -> None:
    assert resolve(value, n, up) == want


@pytest.mark.parametrize("bad", ["101%", "-1", "x", "25 %", -1, "1.5%"])
def test_resolve_rejects(bad: int | str) -> None:
    with pytest.raises(ValueError):
        resolve(bad, 4, True)


def test_single_replica_is_start_then_drain() -> None:
    assert plan(1, 1, 0) == [Batch(0, 1, 1)]
    assert plan(1, 0, 1) == [Batch(1, 1, 0)]


def test_both_zero_rejected() -> None:
    with pytest.raises(ValueError, match="may not both be 0"):
        plan(4, 0, 0)


@pytest.mark.parametrize("n", range(1, 13))
@pytest.mark.parametrize("surge_pct,unavail_pct", [("25%", "0%"), ("0%", "25%"),
                                                   ("50%", "50%"), ("100%", "0%"),
                                                   ("10%", "10%"), ("0%", "100%")])
def test_invariants(n: int, surge_pct: str, unavail_pct: str) -> None:
    surge, unavail = resolve(surge_pct, n, True), resolve(unavail_pct, n, False)
    if surge == unavail == 0:
        with pytest.raises(ValueError):
            plan(n, surge, unavail)
        return
    old, new = n, 0
    for b in plan(n, surge, unavail):
        old -= b.stop_first
        assert old + new >= n - unavail  # ready never below the floor
        assert old + new + b.start <= n + surge  # never more running than allowed
        new += b.start
        old -= b.drain
        assert old >= 0 and old + new >= n - unavail
    assert (old, new) == (0, n)


def test_describe() -> None:
    assert describe(plan(4, 1, 0)) == "+1 -1, +1 -1, +1 -1, +1 -1"
    assert describe(plan(4, 0, 1)) == "-1 +1 -1, +1 -1, +1 -1, +1"
