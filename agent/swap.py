"""The swap state machine (pure): which step comes next and when a swap has
failed. Every side effect comes in through `InstanceOps` and `Clock`
(instance.py), so a swap can be replayed in a test as a sequence of events
with a fake clock and a fake systemd. Each phase has its own module:

    plan -> [per batch: stop_first -> start -> gate -> bake -> post_start -> drain] -> done
             gate.py                   gate.py  bake.py  (hook)          drain.py
    failure before any old instance relied on the new one -> revert.py -> rolled_back
    failure after                                         -> revert.py -> failed

"ok" is said only on evidence: each new instance admitted on its claim AND
the kernel's word (gate), up beside the old ones for min_ready with the same
main PID and its share of new connections (bake), re-checked before each
old instance's signal and at every drain poll. Once an old instance has its
signal, the swap is never left half-way: an interrupt or an error finishes
it (or restores the old version if the new one dies).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, NoReturn

from . import results, rollout
from .bake import AcceptQueue, Baseline, check_admitted, run_bake
from .config import ServiceConfig
from .drain import DRAIN_POLL, DrainResult, run_drain
from .errors import SwapBroken, SwapFailed
from .gate import START_POLL, ReadinessGate, run_gate
from .instance import (Clock, Emit, Host, InstanceOps, InstanceStatus, Intent, Interrupted,
                       SystemClock)
from .results import SwapResult
from .revert import GONE_MARGIN, discard, restore, restore_first, retire, wait_stopped
from .rollout import Batch

__all__ = ["DRAIN_POLL", "START_POLL", "Clock", "DrainResult", "Emit",
           "InstanceOps", "InstanceStatus", "Memory", "ReadinessGate", "Swap", "SwapResult",
           "SystemClock", "fit_plan", "fitted_plan", "instance_ids", "peak_extra",
           "plan_recovery", "tcp_delta"]


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


class _Failure(Exception):
    """A new instance failed its gate, bake, hook or re-check."""

    def __init__(self, reason: str, instance: str | None, broken: bool) -> None:
        super().__init__(reason)
        self.reason, self.instance, self.broken = reason, instance, broken


STAGES = ("stop_first", "start", "gate", "bake", "post_start", "drain")


@dataclass
class _Rollout:
    """Where a rollout stands; the batch loop resumes from it."""

    old: str | None
    new: str
    olds: list[str]
    news: list[str]
    batches: list[Batch]
    started: list[str] = field(default_factory=list)
    admitted: dict[str, Baseline] = field(default_factory=dict)
    relied: set[str] = field(default_factory=set)  # admitted before an old one's signal
    signalled: list[str] = field(default_factory=list)  # olds that got the drain signal
    drained: list[str] = field(default_factory=list)  # olds drained and retired
    hooked: set[str] = field(default_factory=set)  # post_start passed
    left: list[str] = field(default_factory=list)  # olds not yet retired
    pending: list[str] = field(default_factory=list)  # admitted, not yet routed to (nat)
    queue: AcceptQueue = field(default_factory=lambda: AcceptQueue(DRAIN_POLL))
    batch: int = 0
    stage: str = STAGES[0]

    def __post_init__(self) -> None:
        self.left = list(self.olds)

    @property
    def final(self) -> bool:
        return self.batch >= len(self.batches) - 1

    def group(self) -> list[str]:
        first = sum(b.start for b in self.batches[:self.batch])
        return self.news[first:first + self.batches[self.batch].start]

    def serving_olds(self) -> list[str]:
        return [x for x in self.left if x not in self.signalled]


class Swap:
    """Replaces the serving version `old` (None on a first deploy) with `new`,
    in batches when the service has several replicas (rollout.py)."""

    def __init__(self, svc: ServiceConfig, ops: InstanceOps, clock: Clock,
                 emit: Emit | None = None, intent: Intent | None = None,
                 interrupted: Callable[[], bool] | None = None) -> None:
        self.svc, self.ops, self.clock = svc, ops, clock
        self._cpu0 = 0.0  # this thread's CPU time when run() or recover() began
        self.host = Host(svc, ops, clock, emit or (lambda kind, data: None),
                         self._interrupt_now)
        # Persists (old, new, phase, extra) BEFORE each phase acts, so that an
        # agent killed anywhere can finish or revert the swap (recover()).
        self._intent = intent or (lambda old, new, phase, extra: None)
        self._asked_to_stop = interrupted or (lambda: False)
        self._ctx: _Rollout | None = None
        self._res: SwapResult | None = None
        self._finishing = False
        self._shielded = False  # rolling back: a request to stop waits for the end
        self._bad: str | None = None  # the instance the last re-check found down

    def emit(self, kind: str, **data: Any) -> None:
        self.host.emit(kind, **data)

    def plan(self, olds: list[str]) -> tuple[list[Batch], str]:
        """The batches, narrowed to what fits in memory, and why if they were."""
        return fitted_plan(self.svc, olds, self.ops.memory(olds) if olds else None)

    def _interrupt_now(self) -> bool:
        """Whether to stop now: yes until an old instance is signalled; after
        that, never half-way: say so once and go on."""
        if not self._asked_to_stop() or self._shielded:
            return False
        ctx = self._ctx
        if ctx is None or not ctx.signalled:
            return True
        if not self._finishing:
            self._finishing = True
            self._warn(results.interrupted(ctx.old, ctx.new, signalled=True))
        return False

    def _warn(self, message: str) -> None:
        if self._res is not None:
            self._res.warnings.append(message)
        self.emit("warning", message=message)

    # ------------------------------------------------------------------ run

    def run(self, old: str | None, new: str) -> SwapResult:
        res = self._res = SwapResult(self.svc.name, old, new, started_at=self.clock.time())
        t0 = self.clock.monotonic()
        self._cpu0 = time.thread_time()
        if old == new:
            res.result = results.UNCHANGED
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
        self._sync_routes(res, olds, t0)
        if not self._hook(res, "pre_swap", old, new):
            self._abort(res, t0, f"pre_swap hook failed: {res.hooks['pre_swap']}; nothing "
                                 "was started")
        ctx = self._ctx = _Rollout(old, new, olds, news, batches)
        attempts = 0
        while True:
            try:
                self._rollout(res, ctx)
                self._settle(ctx)
                break
            except _Failure as f:
                self._fail(res, ctx, f.reason, f.instance, f.broken, t0, before)  # raises
            except (Interrupted, KeyboardInterrupt) as e:
                if not ctx.signalled:
                    self._fail(res, ctx, results.interrupted(old, new, signalled=False), None,
                               False, t0, before)
                attempts += 1
                self._warn(results.interrupted(old, new, signalled=True))
                if attempts > 3:
                    raise e
            except Exception as e:
                if not ctx.signalled:
                    self._fail(res, ctx, results.error_before_signal(old, e), None, False,
                               t0, before, error=e)
                attempts += 1
                self._warn(f"{type(e).__name__}: {e} after {ctx.signalled[0]} was "
                           f"signalled: finishing the swap (attempt {attempts + 1})")
                if attempts > 2:  # the intent stays: the daemon's recovery takes it
                    raise
                self.clock.sleep(1.0)
        res.tcp = tcp_delta(before, self.ops.tcp_counters())
        self._hook(res, "post_swap", old, new)
        res.result = results.OK
        self._took(res, t0)
        self.emit("done", result=res.result, seconds=res.seconds)
        return res

    def _rollout(self, res: SwapResult, ctx: _Rollout) -> None:
        """The batches, each stage by name; resumes where `ctx` stands."""
        while ctx.batch < len(ctx.batches):
            for stage in STAGES[STAGES.index(ctx.stage):]:
                ctx.stage = stage
                getattr(self, f"_stage_{stage}")(res, ctx, ctx.batches[ctx.batch],
                                                 ctx.group())
            ctx.batch += 1
            ctx.stage = STAGES[0]

    def _settle(self, ctx: _Rollout) -> None:
        """The old instances are gone: is anybody accepting now? An accept
        queue that is empty at a look, or taken from between two, says yes
        at once; one stuck for STUCK_SECONDS (bake.AcceptQueue: the same
        connections waiting all along) says the new version does not serve,
        and the old one comes back."""
        if not ctx.signalled or not ctx.admitted:
            return
        ctx.queue.moved = False
        while True:
            reason = self._check(ctx)
            if reason:
                raise _Failure(f"{reason}, after {', '.join(ctx.signalled)} drained",
                               self._bad, broken=True)
            # nothing waiting at the last look, or taken from since the one
            # before: somebody accepts (a busy server's queue is seldom empty)
            if not ctx.queue.queued or ctx.queue.moved:
                return
            self.clock.sleep(DRAIN_POLL)

    def _stage_stop_first(self, res: SwapResult, ctx: _Rollout, b: Batch,
                          group: list[str]) -> None:
        if b.stop_first:
            self._drain_group(res, ctx, b.stop_first)

    def _stage_start(self, res: SwapResult, ctx: _Rollout, b: Batch, group: list[str]) -> None:
        if not group:
            return
        self._record(ctx, "start")
        self._phase(res, "start", lambda: [self._start(x, ctx) for x in group])

    def _stage_gate(self, res: SwapResult, ctx: _Rollout, b: Batch, group: list[str]) -> None:
        todo = [x for x in group if x not in ctx.admitted]
        if not todo:
            return
        self._record(ctx, "ready")
        self.emit("phase", phase="ready")
        with self._cpu(res, "ready"):
            out = run_gate(self.host, todo)
        res.readiness_checks += out.checks
        res.phases["ready"] = res.phases.get("ready", 0.0) + out.seconds
        if out.verdict != "ready":
            raise _Failure(out.reason, out.failed, broken=False)
        for x in todo:
            st = self.ops.status(x)
            ctx.admitted[x] = Baseline(st.main_pid, st.restarts)
        res.evidence += out.evidence

    def _stage_bake(self, res: SwapResult, ctx: _Rollout, b: Batch, group: list[str]) -> None:
        if not group:
            return
        if self.svc.min_ready > 0:
            self.emit("phase", phase="bake", seconds=self.svc.min_ready)
        with self._cpu(res, "bake"):
            out = run_bake(self.host, group, ctx.admitted, ctx.serving_olds())
        res.add_bake(out.seconds, out.accepted, out.trial)
        res.phases["bake"] = res.phases.get("bake", 0.0) + out.seconds
        if out.verdict != "ready":
            raise _Failure(out.reason, out.failed, broken=out.failed in ctx.relied)
        res.evidence += out.evidence

    def _stage_post_start(self, res: SwapResult, ctx: _Rollout, b: Batch,
                          group: list[str]) -> None:
        for x in group:
            if x in ctx.hooked:
                continue
            if not self._hook(res, "post_start", ctx.old, ctx.new, instance=x):
                raise _Failure(f"post_start hook failed for {self.svc.name} {x}: "
                               f"{res.hooks['post_start']}", x, broken=False)
            ctx.hooked.add(x)
        for x in group:
            self.ops.enable(x)
        ctx.pending += [x for x in group if x not in ctx.pending]
        if not (b.drain and ctx.left):
            # no old instance drains next in this batch: traffic now (socket: nat);
            # else in one transaction with their withdrawal (_drain_group)
            self._route(ctx, ctx.pending, [])

    def _stage_drain(self, res: SwapResult, ctx: _Rollout, b: Batch, group: list[str]) -> None:
        if b.drain:
            self._drain_group(res, ctx, b.drain)

    # --------------------------------------------------------------- steps

    def _record(self, ctx: _Rollout, phase: str) -> None:
        self._intent(ctx.old, ctx.new, phase, {
            "final": ctx.final, "olds": ctx.olds, "news": ctx.news,
            "signalled": ctx.signalled, "admitted": sorted(ctx.admitted)})

    def _restore_units(self, res: SwapResult) -> None:
        """The old version restarts (now, or at its next crash or boot) from
        the unit files it ran with, not from those the new config wrote. Best
        effort: a rollback goes on without it, and says so."""
        try:
            restored = self.ops.restore_units()
        except Exception as e:  # SystemdError, OSError: the rollback must not stop here
            res.warnings.append(f"cannot put the unit files back as they were before the "
                                f"swap: {e}; the old version restarts with the new settings")
            return
        if restored:
            res.warnings.append(f"unit files put back as they were before the swap: "
                                f"{', '.join(restored)} (the config on disk still asks for "
                                "the new settings: fix it before the next swap)")

    def _abort(self, res: SwapResult, t0: float, reason: str) -> NoReturn:
        self._restore_units(res)
        res.result, res.reason = results.ABORTED, reason
        self._took(res, t0)
        self.emit("done", result=res.result, reason=res.reason)
        raise SwapFailed(res.reason, result=res)

    def _check(self, ctx: _Rollout) -> str | None:
        """The new instances an old one relies on: still up as admitted, and
        is anybody accepting what the listeners queue?"""
        bad = check_admitted(self.host, ctx.admitted)
        if bad is None and ctx.admitted and ctx.signalled:
            if ctx.queue.observe(self.ops.accept_queue(sorted(ctx.admitted))):
                admitted = sorted(ctx.admitted)
                bad = (admitted[0], f"{self.svc.name} {', '.join(admitted)} do not accept: "
                                    f"{ctx.queue.describe()}")
        if bad is None:
            return None
        self._bad = bad[0]
        return bad[1]

    def _drain_group(self, res: SwapResult, ctx: _Rollout, count: int) -> None:
        """Signal, drain and retire the next `count` old instances (in parallel)."""
        victims = ctx.left[:count]
        if not victims:  # fewer old instances ran than replicas (one crashed, stopped)
            return
        self._record(ctx, "drain")
        fresh = [x for x in victims if x not in ctx.signalled]
        delay = self.svc.drain.pre_stop_delay
        if fresh and delay > 0:  # for an upstream load balancer to notice
            self.emit("pre_stop", version=", ".join(victims), delay=delay)
            end = self.clock.monotonic() + delay
            while self.clock.monotonic() < end:
                self._recheck(ctx, broken=bool(ctx.signalled), when=f"before {victims[0]} "
                                                                     "was signalled")
                self.host.sleep(min(DRAIN_POLL, end - self.clock.monotonic()))
        self._recheck(ctx, broken=bool(ctx.signalled), when=f"before {victims[0]} was "
                                                            "signalled")
        self._route(ctx, ctx.pending, victims)
        ctx.relied |= set(ctx.admitted)
        ctx.signalled += fresh
        self._record(ctx, "drain")
        self.emit("phase", phase="drain")
        t = self.clock.monotonic()
        with self._cpu(res, "drain"):
            d, broken = run_drain(self.host, victims, lambda: self._check(ctx))
        res.phases["drain"] = res.phases.get("drain", 0.0) + self.clock.monotonic() - t
        res.drain = d if res.drain is None else res.drain.merge(d)
        if d.listeners_closed:
            res.evidence.append(f"{', '.join(victims)}: {d.listeners_closed} LISTEN socket(s) "
                                "closed by the agent at the drain signal")
        if d.closed_idle:
            self._warn(results.closed_idle_warning(self.svc.name, d.closed_idle))
        if broken:
            raise _Failure(f"{broken}, after {', '.join(victims)} got the drain signal",
                           self._bad, broken=True)
        self._record(ctx, "retire")
        self._phase(res, "retire", lambda: retire(self.host, victims))
        ctx.left = ctx.left[len(victims):]
        ctx.drained += victims

    def _sync_routes(self, res: SwapResult, olds: list[str], t0: float) -> None:
        """Before anything starts: new connections go to the serving instances
        and nowhere else (socket: nat; the kernel's rules may have drifted)."""
        try:
            out = self.host.route([], [], only=olds)  # says "route" when it changed
        except Exception as e:  # nat.NatError, OSError: nothing was started
            self._abort(res, t0, f"cannot route {self.svc.name}'s connections: {e}")
        if out is not None and out[0] != out[1]:
            if out[0]:
                self._warn(f"the NAT rules sent {self.svc.name}'s new connections to ports "
                           f"{out[0]}, not to the serving instances' {out[1]}: set right")

    def _route(self, ctx: _Rollout, add: list[str], remove: list[str]) -> None:
        """New connections to `add`, none to `remove`: one transaction."""
        try:
            self.host.route(add, remove)
        except Exception as e:  # nat.NatError, OSError
            raise _Failure(f"cannot route {self.svc.name}'s new connections to "
                           f"{', '.join(add) or 'nothing new'} (away from "
                           f"{', '.join(remove) or 'none'}): {e}", None,
                           broken=bool(ctx.signalled)) from e
        ctx.pending = [x for x in ctx.pending if x not in add]

    def _recheck(self, ctx: _Rollout, broken: bool, when: str) -> None:
        reason = self._check(ctx)
        if reason:
            raise _Failure(f"{reason}, {when}", self._bad, broken=broken)

    def _phase(self, res: SwapResult, name: str, fn: Callable[[], Any]) -> Any:
        self.emit("phase", phase=name)
        t = self.clock.monotonic()
        with self._cpu(res, name):
            out = fn()
        res.phases[name] = res.phases.get(name, 0.0) + self.clock.monotonic() - t
        return out

    @contextmanager
    def _cpu(self, res: SwapResult, name: str) -> Iterator[None]:
        """Add the CPU time this thread spends in the body to res.cpu_ms[name]:
        what a phase costs the host beside its wall time (time.thread_time:
        the daemon runs each swap in a thread of its own)."""
        c = time.thread_time()
        try:
            yield
        finally:
            ms = (time.thread_time() - c) * 1000
            res.cpu_ms[name] = round(res.cpu_ms.get(name, 0.0) + ms, 1)

    def _took(self, res: SwapResult, t0: float) -> None:
        """The swap's wall time and this thread's CPU time (ms) so far."""
        res.seconds = self.clock.monotonic() - t0
        res.cpu_ms["total"] = round((time.thread_time() - self._cpu0) * 1000, 1)

    def _start(self, instance: str, ctx: _Rollout) -> None:
        st = self.ops.status(instance)
        if instance in ctx.started and not st.gone:
            return  # resumed: already started by this swap
        if not st.gone:  # a stray from an interrupted swap: start it afresh
            self.emit("stray", version=instance, state=st.active)
            self.ops.stop(instance)
            wait_stopped(self.host, instance, self.svc.drain.grace_period + GONE_MARGIN)
        self.ops.prepare(instance, ctx.new)
        self.ops.start(instance)
        if instance not in ctx.started:
            ctx.started.append(instance)

    def _hook(self, res: SwapResult, hook: str, old: str | None, new: str,
              instance: str | None = None) -> bool:
        """Run a configured hook; True when it passed or none is configured."""
        env = {"ZDD_SERVICE": self.svc.name, "ZDD_FROM_VERSION": old or "",
               "ZDD_TO_VERSION": new, "ZDD_PHASE": hook}
        if instance is not None:
            env["ZDD_INSTANCE"] = instance
        outcome = self.ops.run_hook(hook, env, instance)
        if outcome is None:
            return True
        ok, detail = outcome
        self.emit("hook", hook=hook, ok=ok, detail=detail)
        res.hooks[hook] = ("ok" if ok else "failed") + (f": {detail}" if detail else "")
        if not ok:
            self.emit("warning", message=f"{hook} hook failed: {detail}")
        return ok

    def _fail(self, res: SwapResult, ctx: _Rollout, reason: str, instance: str | None,
              broken: bool, t0: float, before: dict[str, int],
              error: BaseException | None = None) -> NoReturn:
        """Back to the old version, restore first (revert.py); raise
        SwapFailed (rolled back before any old instance relied on the new
        one) or SwapBroken (after: the old version had to be restarted)."""
        self._shielded = True
        self.emit("phase", phase="rollback", reason=reason)
        self._record(ctx, "rollback")
        # socket: nat: the old instances not yet signalled take new connections
        # again, the failed one none (restore_first routes those it restarts)
        back = [x for x in ctx.serving_olds() if self.ops.status(x).up]
        try:
            self.host.route(back, [instance] if instance else [])
        except Exception as e:
            self._warn(f"cannot route {self.svc.name}'s new connections back to "
                       f"{', '.join(back) or 'the old version'}: {e}")
        res.journal = self.ops.journal(instance or (ctx.started or ctx.news)[0])
        self._restore_units(res)
        alive = [x for x in ctx.admitted if x != instance and self.ops.status(x).up]
        unadmitted = [x for x in ctx.started if x not in alive]
        out = restore_first(self.host, ctx.old, list(ctx.signalled), alive, unadmitted,
                            len(ctx.serving_olds()))
        res.readiness_checks += out.checks
        if out.drain is not None:
            res.drain = out.drain if res.drain is None else res.drain.merge(out.drain)
        result = results.FAILED if broken or not out.ok else results.ROLLED_BACK
        if broken and out.ok:
            reason += f"; {ctx.old} restarted and serving again"
        if not out.ok:
            serving = [*out.kept, *[x for x in ctx.serving_olds() if self.ops.status(x).up]]
            kept = (f"{', '.join(serving)} keep serving" if serving else "nothing serves")
            reason += f"; restoring {ctx.old} failed: {out.detail}; {kept}"
        res.tcp = tcp_delta(before, self.ops.tcp_counters())
        self._hook(res, "on_rollback", res.from_version, ctx.new)
        res.result, res.reason = result, reason
        self._took(res, t0)
        self.emit("done", result=result, reason=reason)
        exc = SwapBroken if result == results.FAILED else SwapFailed
        raise exc(reason, result=res) from error

    # ------------------------------------------------------------ recovery

    def _recover_route(self, instances: list[str]) -> None:
        """New connections to these instances (socket: nat), best effort."""
        try:
            self.host.route(instances, [])
        except Exception as e:
            self._warn(f"cannot route {self.svc.name}'s new connections to "
                       f"{', '.join(instances)}: {e}")

    def recover(self, intent: dict[str, Any]) -> SwapResult:
        """Finish or revert a swap whose agent died, so that exactly one version
        serves. The instances' own state in systemd decides; the swap finishes
        only when the new instances are active."""
        old, new, phase = intent.get("from"), str(intent["to"]), str(intent.get("phase"))
        olds = list(intent.get("olds") or ([old] if old else []))
        news = list(intent.get("news") or [new])
        final = bool(intent.get("final", True))
        res = self._res = SwapResult(self.svc.name, old, new, started_at=self.clock.time())
        t0 = self.clock.monotonic()
        self._cpu0 = time.thread_time()
        old_serving = any(self.ops.status(x).active in ("active", "reloading") for x in olds)
        new_active = all(self.ops.status(x).active == "active" for x in news)
        action = plan_recovery(phase if final else "ready", old_serving, new_active, bool(olds))
        self.emit("recover", phase=phase, action=action, version=new, old=old)
        ctx = _Rollout(old, new, olds, news, [])
        if action == "finish":
            for x in news:
                self.ops.enable(x)
            self._recover_route(news)
            running = [x for x in olds if not self.ops.status(x).stopped]
            if running:
                self._record(ctx, "drain")
                t = self.clock.monotonic()
                res.drain, _ = run_drain(self.host, running)
                res.phases["drain"] = self.clock.monotonic() - t
            self._record(ctx, "retire")
            retire(self.host, olds)
            res.result = results.OK
            res.reason = f"recovered: finished a swap interrupted in {phase}"
        else:
            self._record(ctx, "rollback")
            discard(self.host, news)
            if action in ("revert", "restore") and old is not None:
                # stopped, or still draining: a start job queues behind the stop
                down = [x for x in olds if not self.ops.status(x).up]
                if down:
                    restore(self.host, old, down)
                    for x in down:
                        self.ops.enable(x)
                self._recover_route(olds)
            self._hook(res, "on_rollback", old, new)
            signalled = phase in ("drain", "retire")
            res.result = results.FAILED if signalled else results.ROLLED_BACK
            res.reason = f"recovered: reverted a swap interrupted in {phase} ({action})"
        self._took(res, t0)
        self.emit("done", result=res.result, reason=res.reason)
        return res


def tcp_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in after if k in before}


def plan_recovery(phase: str, old_serving: bool, new_active: bool, had_old: bool) -> str:
    """What to do with a swap interrupted in `phase` (pure).

    finish:  the new version is up and was admitted (drain/retire), or nothing
             else serves and it is up: keep it, retire the old one.
    revert:  not admitted and the old one still serves: stop the new one.
    restore: the new version is not up and the old one does not serve (an
             interrupted drain whose new version died, or nothing came up):
             start the old one again.
    abandon: a first deploy that never came up: clean up the new one.
    """
    if phase in ("drain", "retire") and new_active:
        return "finish"
    if old_serving and phase not in ("drain", "retire"):
        return "revert"
    if new_active:
        return "finish"
    return "restore" if had_old else "abandon"
