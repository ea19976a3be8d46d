"""The readiness gate: a starting instance is admitted once it claims to be
ready (READY=1, or its probe passes success_threshold times) AND the kernel
shows it serving where the socket mode says it must (its own processes hold a
LISTEN socket on every listen address: `InstanceOps.missing_listeners`).

A claim without that evidence is not admission: gunicorn's arbiter sends
READY=1 before any worker has imported the app (gunicorn #2778), a program
with SO_REUSEPORT may bind after it said ready (Envoy #14295).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .config import Ready
from .instance import Host

# How often the gate looks at a starting instance between probes.
START_POLL = 0.05  # seconds between two looks for what systemd does not announce
# the longest wait for systemd's news of READY=1, an exit or a restart (it
# wakes the gate at once): how late a deadline may be seen
EVENT_WAIT = 0.25


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

    def expired(self, now: float, extra: float = 0.0) -> bool:
        return now - self.started >= self.ready.deadline + extra

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


@dataclass
class GateOutcome:
    verdict: str  # ready | failed
    reason: str = ""
    checks: int = 0
    seconds: float = 0.0
    evidence: list[str] = field(default_factory=list)  # what admitted each instance
    failed: str | None = None  # the instance that failed


def run_gate(host: Host, group: list[str], extra_deadline: float = 0.0) -> GateOutcome:
    """Wait until every instance of `group` is ready and holds its listeners;
    fail at the first that exits, restarts, flaps or misses the deadline
    (`extra_deadline` seconds later: an old instance being restored may first
    have to finish its drain before systemd starts it again)."""
    svc, ops, clock = host.svc, host.ops, host.clock
    ready = svc.ready
    t = clock.monotonic()
    gates = {x: ReadinessGate(ready, started=t) for x in group}
    restarts0 = {x: ops.status(x).restarts for x in group}
    last_probe: dict[str, float | None] = {x: None for x in group}
    claimed: dict[str, str] = {}  # instance -> what it claimed
    pending = list(group)
    out = GateOutcome("ready")

    def fail(x: str, reason: str) -> GateOutcome:
        out.verdict, out.reason, out.failed = "failed", reason, x
        return out

    try:
        while True:
            now = clock.monotonic()
            probed = False
            for x in list(pending):
                gate = gates[x]
                st = ops.status(x)
                if st.gone or st.restarts > restarts0[x]:
                    return fail(x, f"{svc.name} {x} exited during start-up ({st.describe()})")
                if gate.expired(now, extra_deadline):
                    if x in claimed:
                        missing = ops.missing_listeners(x) or ["(processes unknown)"]
                        return fail(x, f"{svc.name} {x} said it was ready ({claimed[x]}) but "
                                       f"its processes hold no LISTEN socket on "
                                       f"{', '.join(missing)} after the deadline of "
                                       f"{ready.deadline:g}s (socket: {svc.socket})")
                    detail = f"; last check: {gate.last_detail}" if gate.last_detail else ""
                    return fail(x, f"{svc.name} {x} was not ready within the deadline of "
                                   f"{ready.deadline:g}s{detail}")
                if x not in claimed:
                    if ready.type == "notify":
                        if st.active == "active":  # systemd got READY=1
                            gate.checks += 1
                            claimed[x] = f"READY=1, main PID {st.main_pid}"
                    elif now >= gate.next_probe(last_probe[x]):
                        last_probe[x] = now
                        probed = True
                        ok, detail = ops.probe(x)
                        verdict = gate.observe(ok, detail)
                        host.emit("probe", version=x, ok=ok, detail=detail, checks=gate.checks,
                                  successes=gate.successes, needed=ready.success_threshold)
                        if verdict == "failed":
                            return fail(x, f"{svc.name} {x} failed {gate.failures} readiness "
                                           f"checks in a row: {detail}")
                        if verdict == "ready":
                            claimed[x] = (f"{gate.successes} {ready.type} check"
                                          f"{'s' if gate.successes > 1 else ''} passed: "
                                          f"{detail}")
                if x in claimed and st.active == "active":
                    # the claim, then the kernel's word: its own LISTEN sockets
                    missing = ops.missing_listeners(x)  # None: unknown, look again
                    if missing == []:
                        pending.remove(x)
                        out.evidence.append(f"{x}: {claimed[x]}; holds its listeners")
            if not pending:
                return out
            if not probed:
                # READY=1, an exit, a restart: systemd announces them (the
                # wait ends at once); a bind and a probe's time are looked for
                looking = ready.type != "notify" or any(x in claimed for x in pending)
                host.wait(pending, START_POLL if looking else EVENT_WAIT)
    finally:
        out.checks = sum(g.checks for g in gates.values())
        out.seconds = clock.monotonic() - t
