"""The swap state machine (pure): which step comes next and when a swap has
failed. Every side effect comes in through `InstanceOps` and `Clock`, so a
swap can be replayed in a test as a sequence of events with a fake clock and
a fake systemd.

    preflight -> start -> ready -> drain -> retire -> done
                      \\-> (exited | not ready | deadline) -> stop new -> rolled back
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from .config import Ready, ServiceConfig
from .errors import SwapFailed


@dataclass(frozen=True)
class InstanceStatus:
    active: str  # systemd ActiveState
    sub: str  # systemd SubState
    result: str  # systemd Result of the service (timeout = killed at TimeoutStopSec)
    restarts: int = 0
    job: str = ""  # queued systemd job: start, stop, restart, ... or ""

    @property
    def gone(self) -> bool:
        """Down and not on its way up (a start job may still be queued just
        after StartUnit; auto-restart means it died and systemd retries)."""
        if self.sub == "auto-restart":
            return True
        return self.active in ("inactive", "failed") and self.job not in ("start", "restart")

    @property
    def stopped(self) -> bool:
        return self.active in ("inactive", "failed") and not self.job


class InstanceOps(Protocol):
    """What the swap needs from the host, per version of one service."""

    def prepare(self, version: str) -> None: ...  # render its drop-in, reload systemd
    def start(self, version: str) -> None: ...  # start job queued (returns at once)
    def stop(self, version: str) -> None: ...  # stop job queued: the drain signal
    def status(self, version: str) -> InstanceStatus: ...
    def probe(self, version: str) -> tuple[bool, str]: ...  # http/tcp/exec readiness
    def pids(self, version: str) -> list[int]: ...
    def connections(self, pids: list[int]) -> int: ...  # census of those processes
    def peers(self, pids: list[int]) -> list[str]: ...  # their connections' peers
    def enable(self, version: str) -> None: ...
    def disable(self, version: str) -> None: ...
    def cleanup(self, version: str) -> None: ...  # drop-in and failed state gone
    def journal(self, version: str) -> list[str]: ...
    def tcp_counters(self) -> dict[str, int]: ...  # the kernel's, in the service's netns
    def run_hook(self, hook: str, env: dict[str, str]) -> tuple[bool, str] | None: ...


class Clock(Protocol):
    def monotonic(self) -> float: ...
    def sleep(self, seconds: float) -> None: ...
    def time(self) -> float: ...


class SystemClock:
    monotonic = staticmethod(time.monotonic)
    sleep = staticmethod(time.sleep)
    time = staticmethod(time.time)


Emit = Callable[[str, dict[str, Any]], None]
Intent = Callable[[str | None, str, str], None]

# How often a drain counts connections and checks whether the old instance is gone.
DRAIN_POLL = 0.25
# Below this many connections left, a drain lists their peers (long-lived ones:
# WebSockets, HTTP/2 and gRPC streams), at most once a second.
LIST_BELOW = 10
# How often the gate looks at a starting instance between probes.
START_POLL = 0.1


# ------------------------------------------------------------ readiness gate


@dataclass
class ReadinessGate:
    """Decides from probe results and time whether a starting instance is ready.

    - no probe before `initial_delay`, then one each `period`;
    - ready after `success_threshold` consecutive successes;
    - failures before the first success are start-up: only the deadline ends them;
    - `failure_threshold` consecutive failures after a success: flapping, failed;
    - not ready `deadline` after the start: failed.
    """

    ready: Ready
    started: float
    successes: int = 0
    failures: int = 0
    seen_success: bool = False
    checks: int = 0
    last_detail: str = ""

    def next_probe(self, last_probe: float | None) -> float:
        if last_probe is None:
            return self.started + self.ready.initial_delay
        return last_probe + self.ready.period

    def expired(self, now: float) -> bool:
        return now - self.started >= self.ready.deadline

    def observe(self, ok: bool, detail: str) -> str:
        """'ready', 'failed' or 'pending' after one probe."""
        self.checks += 1
        self.last_detail = detail
        if ok:
            self.successes += 1
            self.failures = 0
            self.seen_success = True
            return "ready" if self.successes >= self.ready.success_threshold else "pending"
        self.successes = 0
        self.failures += 1
        if self.seen_success and self.failures >= self.ready.failure_threshold:
            return "failed"
        return "pending"


# -------------------------------------------------------------------- result


@dataclass
class DrainResult:
    connections_at_start: int = 0
    connections_at_end: int = 0
    killed_at_grace: bool = False
    seconds: float = 0.0
    held: list[str] = field(default_factory=list)  # peers still connected at the last poll


@dataclass
class SwapResult:
    service: str
    from_version: str | None
    to_version: str
    result: str = "running"  # ok | rolled_back | unchanged
    reason: str = ""
    started_at: float = 0.0
    seconds: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)
    readiness_checks: int = 0
    drain: DrainResult | None = None
    journal: list[str] = field(default_factory=list)
    tcp: dict[str, int] = field(default_factory=dict)  # kernel counter deltas over the swap
    hooks: dict[str, str] = field(default_factory=dict)  # hook -> outcome

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.drain is not None:
            d["drain"]["connections_drained"] = (self.drain.connections_at_start
                                                 - self.drain.connections_at_end)
        return d


# ---------------------------------------------------------------------- swap


class Swap:
    """Replaces the serving instance `old` (None on a first deploy) with `new`."""

    def __init__(self, svc: ServiceConfig, ops: InstanceOps, clock: Clock,
                 emit: Emit | None = None, intent: Intent | None = None) -> None:
        self.svc, self.ops, self.clock = svc, ops, clock
        self._emit = emit or (lambda kind, data: None)
        # Persists (old, new, phase) BEFORE each phase acts, so that an agent
        # killed anywhere can finish or revert the swap (recover()).
        self._intent = intent or (lambda old, new, phase: None)

    def emit(self, kind: str, **data: Any) -> None:
        self._emit(kind, data)

    def run(self, old: str | None, new: str) -> SwapResult:
        res = SwapResult(self.svc.name, old, new, started_at=self.clock.time())
        t0 = self.clock.monotonic()
        if old == new:
            res.result = "unchanged"
            res.reason = f"{new} is already serving"
            self.emit("done", result=res.result, reason=res.reason)
            return res

        before = self.ops.tcp_counters()
        if not self._hook(res, "pre_swap", old, new):
            res.result = "aborted"
            res.reason = f"pre_swap hook failed: {res.hooks['pre_swap']}; nothing was started"
            res.seconds = self.clock.monotonic() - t0
            self.emit("done", result=res.result, reason=res.reason)
            raise SwapFailed(res.reason, result=res)
        try:
            self._intent(old, new, "start")
            self._phase(res, "start", lambda: self._start(new))
            self._intent(old, new, "ready")
            verdict, reason = self._gate(res, new)
        except KeyboardInterrupt:  # the operator gave up: the old one keeps serving
            verdict, reason = "failed", f"interrupted before {new} was admitted"
        if verdict != "ready":
            self._intent(old, new, "rollback")
            self._roll_back(res, new, reason, t0, before)  # raises
        self._admit(res, old, new)
        res.tcp = tcp_delta(before, self.ops.tcp_counters())
        self._hook(res, "post_swap", old, new)
        res.result = "ok"
        res.seconds = self.clock.monotonic() - t0
        self.emit("done", result="ok", seconds=res.seconds)
        return res

    def _admit(self, res: SwapResult, old: str | None, new: str) -> None:
        """The new instance serves: enable it, drain and retire the old one."""
        self.ops.enable(new)
        if old is not None:
            self._intent(old, new, "drain")
            delay = self.svc.drain.pre_stop_delay
            if delay > 0:  # for an upstream load balancer to notice
                self.emit("pre_stop", version=old, delay=delay)
                self.clock.sleep(delay)
            res.drain = self._phase(res, "drain", lambda: self._drain(old))
            self._intent(old, new, "retire")
            self._phase(res, "retire", lambda: self._retire(old))

    def _discard(self, new: str) -> None:
        """Stop a version that will not serve (its drain signal), forget it."""
        self.ops.stop(new)
        self._wait_gone(new, self.svc.drain.grace_period + 5)
        self.ops.disable(new)
        self.ops.cleanup(new)

    def _phase(self, res: SwapResult, name: str, fn: Callable[[], Any]) -> Any:
        self.emit("phase", phase=name)
        t = self.clock.monotonic()
        out = fn()
        res.phases[name] = self.clock.monotonic() - t
        return out

    def _start(self, new: str) -> None:
        st = self.ops.status(new)
        if not st.gone:  # a stray from an interrupted swap: start it afresh
            self.emit("stray", version=new, state=st.active)
            self.ops.stop(new)
            self._wait_gone(new, self.svc.drain.grace_period + 5)
        self.ops.prepare(new)
        self.ops.start(new)

    def _gate(self, res: SwapResult, new: str) -> tuple[str, str]:
        self.emit("phase", phase="ready")
        ready = self.svc.ready
        t = self.clock.monotonic()
        gate = ReadinessGate(ready, started=t)
        restarts0 = self.ops.status(new).restarts
        last_probe: float | None = None
        try:
            while True:
                now = self.clock.monotonic()
                st = self.ops.status(new)
                if st.gone or st.restarts > restarts0:
                    return "failed", (f"{self.svc.name} {new} exited during start-up "
                                      f"({st.active}/{st.sub}, result {st.result})")
                if gate.expired(now):
                    detail = f"; last check: {gate.last_detail}" if gate.last_detail else ""
                    return "failed", (f"{self.svc.name} {new} was not ready within the "
                                      f"deadline of {ready.deadline:g}s{detail}")
                if ready.type == "notify":
                    if st.active == "active":  # systemd got READY=1
                        gate.checks += 1
                        return "ready", "READY=1"
                elif now >= gate.next_probe(last_probe):
                    last_probe = now
                    ok, detail = self.ops.probe(new)
                    verdict = gate.observe(ok, detail)
                    self.emit("probe", version=new, ok=ok, detail=detail, checks=gate.checks,
                              successes=gate.successes, needed=ready.success_threshold)
                    if verdict == "failed":
                        return "failed", (f"{self.svc.name} {new} failed {gate.failures} "
                                          f"readiness checks in a row: {detail}")
                    if verdict == "ready":
                        return "ready", detail
                    continue
                self.clock.sleep(START_POLL)
        finally:
            res.readiness_checks = gate.checks
            res.phases["ready"] = self.clock.monotonic() - t

    def _hook(self, res: SwapResult, hook: str, old: str | None, new: str) -> bool:
        """Run a configured hook; True when it passed or none is configured."""
        env = {"ZDD_SERVICE": self.svc.name, "ZDD_FROM_VERSION": old or "",
               "ZDD_TO_VERSION": new, "ZDD_PHASE": hook}
        outcome = self.ops.run_hook(hook, env)
        if outcome is None:
            return True
        ok, detail = outcome
        self.emit("hook", hook=hook, ok=ok, detail=detail)
        res.hooks[hook] = ("ok" if ok else "failed") + (f": {detail}" if detail else "")
        if not ok:
            self.emit("warning", message=f"{hook} hook failed: {detail}")
        return ok

    def _roll_back(self, res: SwapResult, new: str, reason: str, t0: float,
                   before: dict[str, int]) -> None:
        self.emit("phase", phase="rollback", reason=reason)
        res.journal = self.ops.journal(new)
        self._discard(new)
        res.tcp = tcp_delta(before, self.ops.tcp_counters())
        self._hook(res, "on_rollback", res.from_version, new)
        res.result = "rolled_back"
        res.reason = reason
        res.seconds = self.clock.monotonic() - t0
        self.emit("done", result="rolled_back", reason=reason)
        raise SwapFailed(reason, result=res)

    def _wait_gone(self, version: str, limit: float) -> InstanceStatus:
        end = self.clock.monotonic() + limit
        while True:
            st = self.ops.status(version)
            if st.stopped or self.clock.monotonic() > end:
                return st
            self.clock.sleep(DRAIN_POLL)

    def _drain(self, old: str) -> DrainResult:
        """Stop the old instance (its drain signal) and count what it still holds.

        systemd sends KillSignal= and SIGKILLs at TimeoutStopSec= (the grace
        period); the agent only watches, so the grace period holds even if
        the agent dies meanwhile."""
        grace = self.svc.drain.grace_period
        pids = self.ops.pids(old)
        d = DrainResult(connections_at_start=self.ops.connections(pids))
        t = self.clock.monotonic()
        self.ops.stop(old)
        self.emit("drain", version=old, connections=d.connections_at_start, elapsed=0.0,
                  grace=grace)
        last = d.connections_at_start
        listed_at = -1.0
        while True:
            self.clock.sleep(DRAIN_POLL)
            st = self.ops.status(old)
            elapsed = self.clock.monotonic() - t
            if st.stopped:
                d.killed_at_grace = st.result == "timeout"
                d.connections_at_end = last if d.killed_at_grace else 0
                if not d.killed_at_grace:
                    d.held = []
                break
            last = self.ops.connections(pids)
            held: list[str] | None = None
            if 0 < last <= LIST_BELOW and elapsed - listed_at >= 1.0:
                listed_at = elapsed
                held = d.held = self.ops.peers(pids)
            elif last == 0:
                d.held = []
            self.emit("drain", version=old, connections=last, elapsed=elapsed, grace=grace,
                      **({"held": held} if held is not None else {}))
            if elapsed > grace + 30:  # systemd should have killed it long ago
                d.connections_at_end = last
                self.emit("warning", message=f"{old} still {st.active} {elapsed:.0f}s after "
                                             f"its drain signal (grace period {grace:g}s)")
                break
        d.seconds = self.clock.monotonic() - t
        if d.killed_at_grace:
            self.emit("killed", version=old, connections=d.connections_at_end, grace=grace,
                      held=d.held)
        self.emit("drained", version=old, connections=d.connections_at_end, seconds=d.seconds)
        return d

    def _retire(self, old: str) -> None:
        self.ops.disable(old)
        self.ops.cleanup(old)

    # ------------------------------------------------------------ recovery

    def recover(self, old: str | None, new: str, phase: str) -> SwapResult:
        """Finish or revert a swap whose agent died in `phase`, so that exactly
        one version serves. The instances' own state in systemd decides."""
        res = SwapResult(self.svc.name, old, new, started_at=self.clock.time())
        t0 = self.clock.monotonic()
        old_serving = old is not None and self.ops.status(old).active in ("active", "reloading")
        new_state = self.ops.status(new)
        action = plan_recovery(phase, old_serving, new_state.active == "active",
                               old is not None)
        self.emit("recover", phase=phase, action=action, version=new, old=old)
        if action == "finish":
            self._admit(res, old, new)
            res.result, res.reason = "ok", f"recovered: finished a swap interrupted in {phase}"
        else:
            self._intent(old, new, "rollback")
            self._discard(new)
            if action == "restore":
                assert old is not None
                self.ops.prepare(old)
                self.ops.start(old)
                self.ops.enable(old)
            self._hook(res, "on_rollback", old, new)
            res.result = "rolled_back"
            res.reason = f"recovered: reverted a swap interrupted in {phase} ({action})"
        res.seconds = self.clock.monotonic() - t0
        self.emit("done", result=res.result, reason=res.reason)
        return res


def tcp_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in after if k in before}


def plan_recovery(phase: str, old_serving: bool, new_active: bool, had_old: bool) -> str:
    """What to do with a swap interrupted in `phase` (pure).

    finish:  the new version was admitted (drain/retire), or nothing else serves
             and it is up: keep it, retire the old one.
    revert:  not admitted and the old one still serves: stop the new one.
    restore: not admitted, neither serves: start the old one again.
    abandon: a first deploy that never came up: clean up the new one.
    """
    if phase in ("drain", "retire"):
        return "finish"
    if old_serving:
        return "revert"
    if new_active:
        return "finish"
    return "restore" if had_old else "abandon"
