"""Request outcomes over time, as every load client reports them: per 100 ms
bucket, the requests that succeeded and failed and a latency histogram, so
that a run can be cut afterwards into steady state and swap windows (p50/p99
in each) and plotted. The Node client (http_client.js) writes the same form.

Latency bins are logarithmic, 5% wide from 0.1 ms: bin b holds latencies up
to 0.1 ms * 1.05**b, and a percentile reads as its bin's upper edge (at most
5% high)."""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

BUCKET = 0.1  # seconds
BASE_MS = 0.1
RATIO = 1.05


def latency_bin(seconds: float) -> int:
    ms = seconds * 1000
    return 0 if ms <= BASE_MS else math.ceil(math.log(ms / BASE_MS) / math.log(RATIO))


def bin_ms(b: int) -> float:
    return BASE_MS * RATIO ** b


@dataclass
class Series:
    t0: float = field(default_factory=time.time)  # epoch seconds of bucket 0
    ok: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    hist: list[Counter[int]] = field(default_factory=list)

    def _index(self, t: float) -> int:
        i = max(0, int((t - self.t0) / BUCKET))
        while len(self.ok) <= i:
            self.ok.append(0)
            self.failed.append(0)
            self.hist.append(Counter())
        return i

    def record(self, ok: bool, latency: float, end: float | None = None) -> None:
        """A request that ended at `end` (epoch seconds; now) after `latency` s."""
        i = self._index(time.time() if end is None else end)
        if ok:
            self.ok[i] += 1
            self.hist[i][latency_bin(latency)] += 1
        else:
            self.failed[i] += 1

    def to_dict(self) -> dict[str, Any]:
        return {"t0": self.t0, "bucket": BUCKET, "ok": self.ok, "failed": self.failed,
                "hist": [{str(b): n for b, n in h.items()} for h in self.hist]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Series:
        if abs(float(d.get("bucket", BUCKET)) - BUCKET) > 1e-9:
            raise ValueError(f"series bucket {d.get('bucket')} is not {BUCKET}")
        return cls(float(d["t0"]), [int(x) for x in d["ok"]], [int(x) for x in d["failed"]],
                   [Counter({int(b): int(n) for b, n in h.items()}) for h in d["hist"]])

    def times(self) -> list[float]:
        """Each bucket's start, epoch seconds."""
        return [self.t0 + i * BUCKET for i in range(len(self.ok))]

    def window(self, start: float, end: float) -> range:
        """The buckets that lie within [start, end) (epoch seconds)."""
        a = max(0, math.ceil((start - self.t0) / BUCKET - 1e-9))
        b = min(len(self.ok), int((end - self.t0) / BUCKET))
        return range(a, max(a, b))

    @property
    def end(self) -> float:
        """Epoch seconds at the end of the last bucket."""
        return self.t0 + len(self.ok) * BUCKET

    def steady_and_during(self, windows: list[tuple[float, float]], start: float,
                          settle: float = 0.5, after: float = 1.0
                          ) -> tuple[list[int], list[int]]:
        """The buckets of steady state (from `start` + `settle` to the first
        window, and from `after` past the last one to the end) and those of
        the windows (swaps), each stretched a bucket: a request that began
        in a swap may end a bucket after it."""
        during = sorted({i for a, b in windows for i in self.window(a, b + BUCKET)})
        first = windows[0][0] if windows else self.end
        last = windows[-1][1] if windows else first
        steady = [*self.window(start + settle, first), *self.window(last + after, self.end)]
        return steady, during

    def totals(self, buckets: Iterable[int] | None = None) -> tuple[int, int]:
        idx = range(len(self.ok)) if buckets is None else buckets
        return sum(self.ok[i] for i in idx), sum(self.failed[i] for i in idx)

    def percentile(self, p: float, buckets: Iterable[int] | None = None) -> float:
        """The p-th percentile latency in ms (0 when there is nothing)."""
        merged: Counter[int] = Counter()
        for i in range(len(self.hist)) if buckets is None else buckets:
            merged.update(self.hist[i])
        total = sum(merged.values())
        if not total:
            return 0.0
        rank, seen = p / 100 * total, 0
        for b in sorted(merged):
            seen += merged[b]
            if seen >= rank:
                return bin_ms(b)
        return bin_ms(max(merged))


def merge(series: Iterable[Series]) -> Series:
    """Several clients' series on one time axis (the earliest start)."""
    parts = list(series)
    if not parts:
        return Series()
    out = Series(min(s.t0 for s in parts))
    for s in parts:
        shift = round((s.t0 - out.t0) / BUCKET)
        for i in range(len(s.ok)):
            j = out._index(out.t0 + (i + shift + 0.5) * BUCKET)
            out.ok[j] += s.ok[i]
            out.failed[j] += s.failed[i]
            out.hist[j].update(s.hist[i])
    return out
