"""A swap's outcome: its result names, the record kept in history, and the
sentences that say what happened (one place, so messages stay alike)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .drain import DrainResult

OK = "ok"  # proven: admitted on evidence, baked, the old version drained
UNCHANGED = "unchanged"  # the version asked for already serves
ROLLED_BACK = "rolled_back"  # failed before any old instance relied on it: old serves
FAILED = "failed"  # failed after an old instance was signalled: old restarted (or not)
ABORTED = "aborted"  # refused before anything started (hook, memory)
AUTO_REVERTED = "auto_reverted"  # the daemon's watch swapped back by itself
RUNNING = "running"


@dataclass
class SwapResult:
    service: str
    from_version: str | None
    to_version: str
    result: str = RUNNING
    reason: str = ""
    started_at: float = 0.0
    seconds: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)
    # the swap thread's CPU time, ms: "total" (the rollout) and per phase
    # (what the bake's and the drain's polling cost, beside the fixed work of
    # a swap); "command": the whole swap command in that thread, the config,
    # the unit files, the recovery check and the records included (up to
    # the last record's write, which cannot hold its own cost)
    cpu_ms: dict[str, float] = field(default_factory=dict)
    readiness_checks: int = 0
    drain: DrainResult | None = None
    journal: list[str] = field(default_factory=list)
    tcp: dict[str, int] = field(default_factory=dict)  # kernel counter deltas over the swap
    plan: str = ""  # the batches, e.g. "+1 -1, +1 -1"
    hooks: dict[str, str] = field(default_factory=dict)  # hook -> outcome
    headroom: str = ""  # why the plan was narrowed to fit in memory, if it was
    # what was checked before "ok": one line per instance and check
    evidence: list[str] = field(default_factory=list)
    # the bake: its seconds and each instance's new connections during it
    bake: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    # who watches the new version after the swap: {"seconds": N, "until": epoch}
    # from the daemon, or {"seconds": 0, "note": why nothing does}
    watch: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.drain is not None:
            d["drain"]["connections_drained"] = self.drain.drained
        return d

    def add_bake(self, seconds: float, accepted: dict[str, int],
                 trial: dict[str, Any] | None = None) -> None:
        self.bake["seconds"] = round(self.bake.get("seconds", 0.0) + seconds, 3)
        self.bake.setdefault("accepted", {}).update(accepted)
        if trial is not None:
            self.bake.setdefault("trials", []).append(trial)


def closed_idle_warning(service: str, n: int) -> str:
    return (f"the old instance of {service} closed {n} connection{'s' if n != 1 else ''} "
            "after its drain signal without answering on them (idle keep-alive connections, "
            "or a request left unanswered): clients writing their next request on them get "
            "a reset. Fix: answer the next request with `Connection: close` (the drain kit "
            "does: docs/drain-kit.md)")


def interrupted(old: str | None, new: str, signalled: bool) -> str:
    if signalled:
        return f"interrupted after {old} was signalled: finishing the swap to {new}"
    return f"interrupted before {old or 'any old instance'} was signalled: rolled back"


def error_before_signal(old: str | None, e: BaseException) -> str:
    return (f"{type(e).__name__}: {e} before {old or 'any old instance'} was signalled: "
            "rolled back")
