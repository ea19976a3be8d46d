"""One run over time, as a PNG (matplotlib): requests per second and
failures, latency, each instance's connections, and each swap's phases
shaded (start, ready, drain, retire). Written by `zdd-agent verify --plot`
and by bench/suite.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .traffic.series import BUCKET, Series

PHASES = ("start", "ready", "drain", "retire")
COLORS = {"start": "#9ecae1", "ready": "#a1d99b", "drain": "#fdae6b", "retire": "#bcbddc"}


def phase_spans(swaps: list[dict[str, Any]]) -> list[tuple[str, float, float]]:
    """(phase, start, end) in epoch seconds, from each swap's start time and
    phase durations (batches of a replicated service are summed per phase)."""
    spans = []
    for r in swaps:
        t = float(r.get("started_at") or 0)
        for name in PHASES:
            d = float((r.get("phases") or {}).get(name, 0.0))
            if t and d > 0:
                spans.append((name, t, t + d))
                t += d
    return spans


def write(path: Path, series: Series, watch: list[dict[str, Any]],
          swaps: list[dict[str, Any]], title: str,
          xlim: tuple[float, float] | None = None) -> Path:
    """xlim: (start, end) in epoch seconds, to show one swap of a longer run."""
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("plotting needs matplotlib (pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = series.t0
    xs = [t - t0 for t in series.times()]
    fig, (ax_rate, ax_lat, ax_conn) = plt.subplots(3, 1, figsize=(11, 8), sharex=True)
    ax_rate.plot(xs, [n / BUCKET for n in series.ok], color="#3182bd", lw=1, label="ok/s")
    ax_rate.plot(xs, [n / BUCKET for n in series.failed], color="#de2d26", lw=1.5,
                 label="failed/s")
    ax_rate.set_ylabel("requests/s")
    ax_rate.legend(loc="upper right", fontsize=8)
    p99 = [series.percentile(99, [i]) for i in range(len(series.ok))]
    p50 = [series.percentile(50, [i]) for i in range(len(series.ok))]
    ax_lat.plot(xs, p99, color="#756bb1", lw=1, label="p99")
    ax_lat.plot(xs, p50, color="#9e9ac8", lw=1, label="p50")
    ax_lat.set_ylabel("latency, ms")
    ax_lat.legend(loc="upper right", fontsize=8)
    instances = sorted({i for w in watch for i in w["connections"]
                        if xlim is None or xlim[0] <= w["t"] <= xlim[1]})
    for inst in instances:
        pts = [(w["t"] - t0, w["connections"][inst]) for w in watch if inst in w["connections"]]
        ax_conn.plot([p[0] for p in pts], [p[1] for p in pts], lw=1.2, label=inst)
    ax_conn.set_ylabel("connections")
    ax_conn.set_xlabel("seconds")
    if instances:
        ax_conn.legend(loc="upper right", fontsize=8, title="instance")
    seen = set()
    for name, a, b in phase_spans(swaps):
        for ax in (ax_rate, ax_lat, ax_conn):
            ax.axvspan(a - t0, b - t0, color=COLORS[name], alpha=0.35, lw=0,
                       label=name if ax is ax_lat and name not in seen else None)
        seen.add(name)
    if seen:
        ax_lat.legend(loc="upper right", fontsize=8, ncol=2)
    if xlim is not None:
        ax_conn.set_xlim(xlim[0] - t0, xlim[1] - t0)
    ax_rate.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
