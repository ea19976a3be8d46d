"""Rolling replacement of N replicas in batches (pure), with Kubernetes'
arithmetic for max_surge and max_unavailable: a surge given in percent rounds
up, unavailability rounds down, and both may not be zero.

Each batch first stops the old instances that the unavailability budget
allows, then starts new ones within the surge budget, waits until they are
ready, then drains the old ones they stand in for. At every moment at least
N - max_unavailable instances are ready and at most N + max_surge run.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

_PCT = re.compile(r"(\d{1,3})%")


def resolve(value: int | str, replicas: int, round_up: bool) -> int:
    """A count, or a percentage of `replicas` ('25%')."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"{value} is negative")
        return value
    m = _PCT.fullmatch(str(value).strip())
    if not m or int(m.group(1)) > 100:
        raise ValueError(f"{value!r} is not a count or a percentage 0%..100%")
    exact = replicas * int(m.group(1)) / 100
    return math.ceil(exact) if round_up else math.floor(exact)


@dataclass(frozen=True)
class Batch:
    stop_first: int  # old instances drained before starting any new one
    start: int  # new instances started, then waited for
    drain: int  # old instances drained once those are ready


def plan(replicas: int, surge: int, unavailable: int) -> list[Batch]:
    if surge == 0 and unavailable == 0:
        raise ValueError("max_surge and max_unavailable may not both be 0")
    old, new, batches = replicas, 0, []
    floor = replicas - unavailable  # ready instances we may never go below
    while new < replicas or old:
        x = min(old, max(0, old + new - floor))
        old -= x
        y = min(replicas - new, replicas + surge - (old + new))
        new += y
        z = min(old, max(0, old + new - floor))
        if new == replicas:
            z = old  # the last batch retires what is left
        old -= z
        if x == y == z == 0:
            raise AssertionError(f"rollout stuck: {replicas=} {surge=} {unavailable=}")
        batches.append(Batch(x, y, z))
    return batches


def describe(batches: list[Batch]) -> str:
    return ", ".join(
        " ".join(p for p in (f"-{b.stop_first}" if b.stop_first else "",
                             f"+{b.start}" if b.start else "",
                             f"-{b.drain}" if b.drain else "") if p)
        for b in batches)
