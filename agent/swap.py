"""The swap state machine (pure): which step comes next and when a swap has
failed. Every side effect comes in through `InstanceOps` and `Clock`, so a
swap can be replayed in a test as a sequence of events with a fake clock and
a fake systemd.

    preflight -> start -> ready -> drain -> retire -> done
                      \\-> (exited | not ready | deadline) -> stop new -> rolled back
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, NoReturn, Protocol

from . import rollout
from .config import Ready, ServiceConfig
from .errors import SwapFailed
from .rollout import Batch


@dataclass(frozen=True)
class InstanceStatus:
    active: str  # systemd ActiveState
    sub: str  # systemd SubState
    result: str  # systemd Result of the service (timeout = killed at TimeoutStopSec)
    restarts: int = 0
    job: str = ""  # queued systemd job: start, stop, restart, ... or ""
    exit: str = ""  # how its main process last ended: "exited 0", "killed by SIGTERM", ...

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

    def instances(self, version: str) -> list[str]: ...  # its active instances
    def prepare(self, instance: str, version: str) -> None: ...  # its drop-in, reload
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
    def memory(self, olds: list[str]) -> Memory | None: ...  # None: not measurable


@dataclass(frozen=True)
class Memory:
    """The largest old instance's footprint and what the host has left."""

    per_instance: int  # bytes
    available: int  # bytes
    source: str  # "cgroup" (the unit's memory.current) or "rss" (its processes')


HEADROOM = 1.25  # margin over an old instance's footprint for each new one


def peak_extra(batches: list[Batch], olds: int) -> int:
    """How many instances beyond the old ones run at the plan's peak."""
    old, new, peak = olds, 0, olds
    for b in batches:
        old -= b.stop_first
        new += b.start
        peak = max(peak, old + new)
        old -= b.drain
    return peak - olds


def fit_plan(svc: ServiceConfig, olds: int, mem: Memory) -> tuple[list[Batch], str]:
    """The rollout that fits in memory: the configured one, or a smaller surge,
    or in place (surge 0) where max_unavailable allows it. ValueError, with
    the numbers, when nothing fits: never let the OOM killer choose."""
    batches = rollout.plan(svc.replicas, svc.max_surge, svc.max_unavailable)
    need_each = int(mem.per_instance * HEADROOM)
    extra = peak_extra(batches, olds)
    if extra == 0 or need_each * extra <= mem.available:
        return batches, ""
    mib = 1024 * 1024
    numbers = (f"each old instance uses up to {mem.per_instance // mib} MiB ({mem.source}), "
               f"so {extra} more need {need_each * extra // mib} MiB with a {HEADROOM:g}x "
               f"margin and {mem.available // mib} MiB are available")
    fits = mem.available // need_each if need_each else extra
    if fits == 0 and svc.max_unavailable == 0:
        raise ValueError(f"not enough memory to start a new instance of {svc.name}: {numbers}; "
                         "free memory, or set strategy.max_unavailable to replace in place")
    surge = min(fits, svc.max_surge)
    how = f"a surge of {surge}" if surge else "in place (surge 0)"
    return (rollout.plan(svc.replicas, surge, svc.max_unavailable),
            f"{numbers}: replacing with {how}")


class Clock(Protocol):
    def monotonic(self) -> float: ...
    def sleep(self, seconds: float) -> None: ...
    def time(self) -> float: ...


class SystemClock:
    monotonic = staticmethod(time.monotonic)
    sleep = staticmethod(time.sleep)
    time = staticmethod(time.time)


Emit = Callable[[str, dict[str, Any]], None]
Intent = Callable[[str | None, str, str, dict[str, Any]], None]

# How often a drain counts connections; how often it checks whether the old
# instance is gone (a cheap property read: the drain ends within 50 ms of it).
DRAIN_POLL = 0.25
STATE_POLL = 0.05
# Below this many connections left, a drain lists their peers (long-lived ones:
# WebSockets, HTTP/2 and gRPC streams), at most once a second.
LIST_BELOW = 10
# How often the gate looks at a starting instance between probes.
START_POLL = 0.05


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
    # how each old instance's main process ended: "exited 0" is a program
    # that drained and returned; "killed by SIGTERM" one that died of the
    # drain signal (a clean stop to systemd, but nothing was drained);
    # "killed by SIGKILL" the kill at the grace period
    exits: list[str] = field(default_factory=list)

    def merge(self, other: DrainResult) -> DrainResult:
        """Several batches' drains as one."""
        return DrainResult(self.connections_at_start + other.connections_at_start,
                           self.connections_at_end + other.connections_at_end,
                           self.killed_at_grace or other.killed_at_grace,
                           self.seconds + other.seconds, self.held + other.held,
                           self.exits + other.exits)


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
    plan: str = ""  # the batches, e.g. "+1 -1, +1 -1"
    hooks: dict[str, str] = field(default_factory=dict)  # hook -> outcome
    headroom: str = ""  # why the plan was narrowed to fit in memory, if it was

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.drain is not None:
            d["drain"]["connections_drained"] = (self.drain.connections_at_start
                                                 - self.drain.connections_at_end)
        return d


# ---------------------------------------------------------------------- swap


def plan_batches(svc: ServiceConfig, olds: list[str]) -> list[Batch]:
    if not olds:  # first deploy: start them all
        return [Batch(0, svc.replicas, 0)]
    return rollout.plan(svc.replicas, svc.max_surge, svc.max_unavailable)


def fitted_plan(svc: ServiceConfig, olds: list[str],
                mem: Memory | None) -> tuple[list[Batch], str]:
    """plan_batches, narrowed by fit_plan to what fits in memory where the old
    instances' memory is known (ValueError when nothing fits), and why."""
    if not olds or mem is None:
        return plan_batches(svc, olds), ""
    return fit_plan(svc, len(olds), mem)


def instance_ids(version: str, replicas: int) -> list[str]:
    """The instances of a version: VERSION alone, or VERSION-1..VERSION-N."""
    return [version] if replicas == 1 else [f"{version}-{i}" for i in range(1, replicas + 1)]


class Swap:
    """Replaces the serving version `old` (None on a first deploy) with `new`,
    in batches when the service has several replicas (rollout.py)."""

    def __init__(self, svc: ServiceConfig, ops: InstanceOps, clock: Clock,
                 emit: Emit | None = None, intent: Intent | None = None) -> None:
        self.svc, self.ops, self.clock = svc, ops, clock
        self._emit = emit or (lambda kind, data: None)
        # Persists (old, new, phase, extra) BEFORE each phase acts, so that an
        # agent killed anywhere can finish or revert the swap (recover()).
        self._intent = intent or (lambda old, new, phase, extra: None)

    def emit(self, kind: str, **data: Any) -> None:
        self._emit(kind, data)

    def plan(self, olds: list[str]) -> tuple[list[Batch], str]:
        """The batches, narrowed to what fits in memory, and why if they were."""
        return fitted_plan(self.svc, olds, self.ops.memory(olds) if olds else None)

    def run(self, old: str | None, new: str) -> SwapResult:
        res = SwapResult(self.svc.name, old, new, started_at=self.clock.time())
        t0 = self.clock.monotonic()
        if old == new:
            res.result = "unchanged"
            res.reason = f"{new} is already serving"
            self.emit("done", result=res.result, reason=res.reason)
            return res
        olds = self.ops.instances(old) if old is not None else []
        news = instance_ids(new, self.svc.replicas)
        try:
            batches, res.headroom = self.plan(olds)
        except ValueError as e:
            self._abort(res, t0, str(e))
        res.plan = rollout.describe(batches)
        self.emit("plan", plan=res.plan, replicas=self.svc.replicas, batches=len(batches),
                  headroom=res.headroom)
        before = self.ops.tcp_counters()
        if not self._hook(res, "pre_swap", old, new):
            self._abort(res, t0, f"pre_swap hook failed: {res.hooks['pre_swap']}; nothing "
                                 "was started")
        ctx = _Rollout(old, new, olds, news)
        try:
            for i, batch in enumerate(batches):
                ctx.final = i == len(batches) - 1
                if batch.stop_first:
                    self._drain_group(res, ctx, batch.stop_first)
                if batch.start:
                    group = news[len(ctx.started):len(ctx.started) + batch.start]
                    self._record(ctx, "start")
                    self._phase(res, "start", functools.partial(self._start_all, group, new))
                    ctx.started += group
                    self._record(ctx, "ready")
                    verdict, reason = self._gate(res, group)
                    if verdict != "ready":
                        ctx.failed = group
                        break
                    for x in group:
                        self.ops.enable(x)
                if batch.drain:
                    self._drain_group(res, ctx, batch.drain)
            else:
                verdict, reason = "ready", ""
        except KeyboardInterrupt:  # the operator gave up: the old version keeps serving
            verdict, reason = "failed", f"interrupted before {new} was admitted"
        if verdict != "ready":
            self._record(ctx, "rollback")
            self._roll_back(res, ctx, reason, t0, before)  # raises
        res.tcp = tcp_delta(before, self.ops.tcp_counters())
        self._hook(res, "post_swap", old, new)
        res.result = "ok"
        res.seconds = self.clock.monotonic() - t0
        self.emit("done", result="ok", seconds=res.seconds)
        return res

    def _record(self, ctx: _Rollout, phase: str) -> None:
        self._intent(ctx.old, ctx.new, phase, {"final": ctx.final, "olds": ctx.olds,
                                               "news": ctx.news})

    def _abort(self, res: SwapResult, t0: float, reason: str) -> NoReturn:
        res.result, res.reason = "aborted", reason
        res.seconds = self.clock.monotonic() - t0
        self.emit("done", result=res.result, reason=res.reason)
        raise SwapFailed(res.reason, result=res)

    def _drain_group(self, res: SwapResult, ctx: _Rollout, count: int) -> None:
        """Drain and retire `count` old instances (in parallel)."""
        victims, ctx.left = ctx.left[:count], ctx.left[count:]
        self._record(ctx, "drain")
        delay = self.svc.drain.pre_stop_delay
        if delay > 0:  # for an upstream load balancer to notice
            self.emit("pre_stop", version=", ".join(victims), delay=delay)
            self.clock.sleep(delay)
        d = self._phase(res, "drain", lambda: self._drain(victims))
        res.drain = d if res.drain is None else res.drain.merge(d)
        self._record(ctx, "retire")
        self._phase(res, "retire", lambda: self._retire_all(victims))
        ctx.drained += victims

    def _discard(self, instances: list[str]) -> None:
        """Stop instances that will not serve (their drain signal), forget them."""
        for x in instances:
            self.ops.stop(x)
        for x in instances:
            self._wait_gone(x, self.svc.drain.grace_period + 5)
            self.ops.disable(x)
            self.ops.cleanup(x)

    def _phase(self, res: SwapResult, name: str, fn: Callable[[], Any]) -> Any:
        self.emit("phase", phase=name)
        t = self.clock.monotonic()
        out = fn()
        res.phases[name] = res.phases.get(name, 0.0) + self.clock.monotonic() - t
        return out

    def _start_all(self, instances: list[str], version: str) -> None:
        for x in instances:
            self._start(x, version)

    def _retire_all(self, instances: list[str]) -> None:
        for x in instances:
            self._retire(x)

    def _start(self, instance: str, version: str) -> None:
        st = self.ops.status(instance)
        if not st.gone:  # a stray from an interrupted swap: start it afresh
            self.emit("stray", version=instance, state=st.active)
            self.ops.stop(instance)
            self._wait_gone(instance, self.svc.drain.grace_period + 5)
        self.ops.prepare(instance, version)
        self.ops.start(instance)

    def _gate(self, res: SwapResult, group: list[str]) -> tuple[str, str]:
        """Wait until every instance of `group` is ready; fail at the first that
        exits, flaps or misses the deadline."""
        self.emit("phase", phase="ready")
        ready = self.svc.ready
        t = self.clock.monotonic()
        gates = {x: ReadinessGate(ready, started=t) for x in group}
        restarts0 = {x: self.ops.status(x).restarts for x in group}
        last_probe: dict[str, float | None] = {x: None for x in group}
        pending = list(group)
        try:
            while True:
                now = self.clock.monotonic()
                probed = False
                for x in list(pending):
                    gate = gates[x]
                    st = self.ops.status(x)
                    if st.gone or st.restarts > restarts0[x]:
                        return "failed", (f"{self.svc.name} {x} exited during start-up "
                                          f"({st.active}/{st.sub}, result {st.result})")
                    if gate.expired(now):
                        detail = f"; last check: {gate.last_detail}" if gate.last_detail else ""
                        return "failed", (f"{self.svc.name} {x} was not ready within the "
                                          f"deadline of {ready.deadline:g}s{detail}")
                    if ready.type == "notify":
                        if st.active == "active":  # systemd got READY=1
                            gate.checks += 1
                            pending.remove(x)
                    elif now >= gate.next_probe(last_probe[x]):
                        last_probe[x] = now
                        probed = True
                        ok, detail = self.ops.probe(x)
                        verdict = gate.observe(ok, detail)
                        self.emit("probe", version=x, ok=ok, detail=detail, checks=gate.checks,
                                  successes=gate.successes, needed=ready.success_threshold)
                        if verdict == "failed":
                            return "failed", (f"{self.svc.name} {x} failed {gate.failures} "
                                              f"readiness checks in a row: {detail}")
                        if verdict == "ready":
                            pending.remove(x)
                if not pending:
                    return "ready", ""
                if not probed:
                    self.clock.sleep(START_POLL)
        finally:
            res.readiness_checks += sum(g.checks for g in gates.values())
            res.phases["ready"] = res.phases.get("ready", 0.0) + self.clock.monotonic() - t

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

    def _roll_back(self, res: SwapResult, ctx: _Rollout, reason: str, t0: float,
                   before: dict[str, int]) -> None:
        """The whole service back to the old version: the new instances go, the
        old ones drained by earlier batches come back."""
        self.emit("phase", phase="rollback", reason=reason)
        res.journal = self.ops.journal((ctx.failed or ctx.started or ctx.news)[0])
        self._discard(ctx.started or ctx.news[:1])
        self._restore(ctx.old, ctx.drained)
        if ctx.old is not None and ctx.drained:
            verdict, why = self._gate(res, ctx.drained)
            if verdict != "ready":
                reason += f"; restoring {ctx.old} also failed: {why}"
        res.tcp = tcp_delta(before, self.ops.tcp_counters())
        self._hook(res, "on_rollback", res.from_version, ctx.new)
        res.result = "rolled_back"
        res.reason = reason
        res.seconds = self.clock.monotonic() - t0
        self.emit("done", result="rolled_back", reason=reason)
        raise SwapFailed(reason, result=res)

    def _restore(self, old: str | None, instances: list[str]) -> None:
        """Start old instances again (after a failed later batch, or recovery)."""
        if old is None or not instances:
            return
        self.emit("restore", version=old, instances=instances)
        for x in instances:
            self.ops.prepare(x, old)
            self.ops.start(x)
            self.ops.enable(x)

    def _wait_gone(self, version: str, limit: float) -> InstanceStatus:
        end = self.clock.monotonic() + limit
        while True:
            st = self.ops.status(version)
            if st.stopped or self.clock.monotonic() > end:
                return st
            self.clock.sleep(DRAIN_POLL)

    def _drain(self, olds: list[str]) -> DrainResult:
        """Stop old instances (their drain signal) and count what they still hold.

        systemd sends KillSignal= and SIGKILLs at TimeoutStopSec= (the grace
        period); the agent only watches, so the grace period holds even if
        the agent dies meanwhile."""
        grace = self.svc.drain.grace_period
        label = ", ".join(olds)
        pids = sorted({p for x in olds for p in self.ops.pids(x)})
        d = DrainResult(connections_at_start=self.ops.connections(pids))
        t = self.clock.monotonic()
        for x in olds:
            self.ops.stop(x)
        self.emit("drain", version=label, connections=d.connections_at_start, elapsed=0.0,
                  grace=grace)
        last = d.connections_at_start
        listed_at = -1.0
        counted_at = 0.0
        while True:
            self.clock.sleep(STATE_POLL)
            states = [self.ops.status(x) for x in olds]
            elapsed = self.clock.monotonic() - t
            if all(st.stopped for st in states):
                d.exits = [st.exit for st in states]
                d.killed_at_grace = any(st.result == "timeout" for st in states)
                d.connections_at_end = last if d.killed_at_grace else 0
                if not d.killed_at_grace:
                    d.held = []
                break
            if elapsed - counted_at < DRAIN_POLL:
                continue
            counted_at = elapsed
            now_count = self.ops.connections(pids)
            # Past the grace period systemd is killing them: what falls now was
            # cut, so the count at the last poll before it is what the kill cut.
            if elapsed < grace:
                last = now_count
            held: list[str] | None = None
            if 0 < last <= LIST_BELOW and elapsed - listed_at >= 1.0 and elapsed < grace:
                listed_at = elapsed
                held = d.held = self.ops.peers(pids)
            elif last == 0:
                d.held = []
            self.emit("drain", version=label, connections=now_count, elapsed=elapsed, grace=grace,
                      **({"held": held} if held is not None else {}))
            if elapsed > grace + 30:  # systemd should have killed them long ago
                d.connections_at_end = last
                self.emit("warning", message=f"{label} still running {elapsed:.0f}s after "
                                             f"the drain signal (grace period {grace:g}s)")
                break
        d.seconds = self.clock.monotonic() - t
        if d.killed_at_grace:
            self.emit("killed", version=label, connections=d.connections_at_end, grace=grace,
                      held=d.held)
        self.emit("drained", version=label, connections=d.connections_at_end, seconds=d.seconds)
        return d

    def _retire(self, old: str) -> None:
        self.ops.disable(old)
        self.ops.cleanup(old)

    # ------------------------------------------------------------ recovery

    def recover(self, intent: dict[str, Any]) -> SwapResult:
        """Finish or revert a swap whose agent died, so that exactly one version
        serves. The instances' own state in systemd decides."""
        old, new, phase = intent.get("from"), str(intent["to"]), str(intent.get("phase"))
        olds = list(intent.get("olds") or ([old] if old else []))
        news = list(intent.get("news") or [new])
        final = bool(intent.get("final", True))
        res = SwapResult(self.svc.name, old, new, started_at=self.clock.time())
        t0 = self.clock.monotonic()
        old_serving = any(self.ops.status(x).active in ("active", "reloading") for x in olds)
        new_active = all(self.ops.status(x).active == "active" for x in news)
        action = plan_recovery(phase if final else "ready", old_serving, new_active, bool(olds))
        self.emit("recover", phase=phase, action=action, version=new, old=old)
        ctx = _Rollout(old, new, olds, news)
        if action == "finish":
            for x in news:
                self.ops.enable(x)
            running = [x for x in olds if not self.ops.status(x).stopped]
            if running:
                self._record(ctx, "drain")
                res.drain = self._phase(res, "drain", lambda: self._drain(running))
            self._record(ctx, "retire")
            for x in olds:
                self._retire(x)
            res.result, res.reason = "ok", f"recovered: finished a swap interrupted in {phase}"
        else:
            self._record(ctx, "rollback")
            self._discard(news)
            if action in ("revert", "restore"):
                self._restore(old, [x for x in olds if self.ops.status(x).stopped])
            self._hook(res, "on_rollback", old, new)
            res.result = "rolled_back"
            res.reason = f"recovered: reverted a swap interrupted in {phase} ({action})"
        res.seconds = self.clock.monotonic() - t0
        self.emit("done", result=res.result, reason=res.reason)
        return res


@dataclass
class _Rollout:
    """Where a rollout stands: what was started, drained, is left."""

    old: str | None
    new: str
    olds: list[str]
    news: list[str]
    started: list[str] = field(default_factory=list)
    drained: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    final: bool = False
    left: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.left = list(self.olds)


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
