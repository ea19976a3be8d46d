from __future__ import annotations

import pytest

from agent.traffic.series import BUCKET, Series, bin_ms, latency_bin, merge


def test_latency_bins_are_five_percent_wide_upper_edges() -> None:
    for ms in (0.05, 0.1, 0.37, 1.0, 12.5, 480.0, 9000.0):
        b = latency_bin(ms / 1000)
        assert bin_ms(b) >= ms * 0.999
        assert b == 0 or bin_ms(b - 1) < ms


def test_windows_totals_and_percentiles() -> None:
    s = Series(t0=1000.0)
    for i in range(100):  # 1 ms each, in the first second
        s.record(True, 0.001, end=1000.0 + i / 100)
    for i in range(10):  # 200 ms each, at 2.0-2.1 s, and 3 failures
        s.record(True, 0.2, end=1002.0 + i / 100)
    for _ in range(3):
        s.record(False, 0.0, end=1002.05)
    steady = s.window(1000.0, 1001.0)
    swap = s.window(1002.0, 1002.2)
    assert s.totals(steady) == (100, 0)
    assert s.totals(swap) == (10, 3)
    assert s.totals() == (110, 3)
    assert 1.0 <= s.percentile(99, steady) < 1.06
    assert 200 <= s.percentile(50, swap) < 211
    assert s.percentile(99, range(0)) == 0.0
    back = Series.from_dict(s.to_dict())
    assert back.totals() == s.totals() and back.percentile(99) == s.percentile(99)


def test_merge_aligns_clients_that_started_apart() -> None:
    a, b = Series(t0=500.0), Series(t0=500.0 + 3 * BUCKET)
    a.record(True, 0.01, end=500.0 + 3.5 * BUCKET)
    b.record(True, 0.01, end=500.0 + 3.5 * BUCKET)
    m = merge([a, b])
    assert m.t0 == 500.0 and m.ok[3] == 2 and m.totals() == (2, 0)


def test_a_series_with_another_bucket_is_refused() -> None:
    with pytest.raises(ValueError):
        Series.from_dict({"t0": 0, "bucket": 1.0, "ok": [], "failed": [], "hist": []})
