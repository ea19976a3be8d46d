"""The bake (Kubernetes minReadySeconds, Nomad min_healthy_time): after the
gate, each new instance serves beside the old ones for `strategy.min_ready`
and must show, on evidence, that it stays up and serves:

- same main PID, no restart by systemd, still active (a release that sends
  READY=1 and dies a second later, or gunicorn's arbiter whose workers
  cannot import the app, fails here, while the old version still serves);
- its readiness probe (http/tcp/grpc/exec) still passing;
- its own LISTEN sockets still held (`missing_listeners`);
- where traffic flows, it takes its share of new connections: when the old
  instances accept new connections during the whole bake and a new one
  accepts none, it does not serve (a program that stopped calling accept()).

The same up-check (`check_admitted`) runs again before each old instance
gets its drain signal and at every poll of a drain.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .instance import Host

BAKE_POLL = 0.25  # seconds between two looks at systemd's state
ACCEPT_POLL = 0.5  # seconds between two connection censuses (they walk /proc/PID/fd)
# New connections the old instances must accept during a bake before a new
# instance that accepted none is judged idle: below it, too little traffic
# flowed to tell (keep-alive clients stay where they are).
MIN_TRAFFIC = 8
# The census samples (every ACCEPT_POLL), so a short connection is seen only
# if it is open at a poll, and the kernel's wakeups among processes sharing a
# listener are far from fair (measured: 9/0/1/0 among four old instances).
# A new instance that saw none is judged idle only when, had it taken a fair
# share of what the others were seen to take, seeing none would have had a
# chance below this; and only if its processes moved no socket or file bytes
# either (/proc/PID/io rchar + wchar: an instance that serves reads requests).
IDLE_CHANCE = 1e-4
IDLE_IO_BYTES = 4096


def needed_traffic(instances: int) -> int:
    """New connections the others must be seen taking before none for one of
    `instances` is evidence: (1 - 1/n)^T < IDLE_CHANCE."""
    if instances < 2:
        return 1 << 30
    return max(MIN_TRAFFIC, math.ceil(math.log(IDLE_CHANCE) / math.log(1 - 1 / instances)))


@dataclass(frozen=True)
class Baseline:
    """An admitted instance as it was at admission."""

    main_pid: int
    restarts: int


def check_admitted(host: Host, admitted: dict[str, Baseline]) -> tuple[str, str] | None:
    """(instance, reason) for the first admitted instance that is no longer
    up with the main PID and restart count it was admitted with; None when
    all are."""
    for x, base in admitted.items():
        st = host.ops.status(x)
        if not st.up:
            return x, f"{host.svc.name} {x} is no longer running ({st.describe()})"
        if st.restarts > base.restarts:
            return x, (f"{host.svc.name} {x} was restarted by systemd "
                       f"({st.restarts - base.restarts}x since it was admitted; "
                       f"{st.describe()})")
        if base.main_pid and st.main_pid and st.main_pid != base.main_pid:
            return x, (f"{host.svc.name} {x} changed its main PID from {base.main_pid} to "
                       f"{st.main_pid}: the process systemd admitted is gone")
    return None


STUCK_SECONDS = 5.0  # an accept queue that holds connections and never shrinks this long


class AcceptQueue:
    """Whether anybody accepts: a listener's accept queue that holds
    connections at every look for STUCK_SECONDS and never shrinks is served
    by nobody (a program that said READY=1 and never calls accept(), once the
    old instance no longer takes the connections). A busy server's queue
    shrinks between looks."""

    def __init__(self, poll: float) -> None:
        self.needed = max(2, round(STUCK_SECONDS / poll))
        self.seen: list[int] = []

    def observe(self, queued: int | None) -> bool:
        """True once stuck."""
        if queued is None:
            return False
        if queued == 0 or (self.seen and queued < self.seen[-1]):
            self.seen = [queued] if queued else []
            return False
        self.seen.append(queued)
        return len(self.seen) >= self.needed

    def describe(self) -> str:
        return (f"{self.seen[-1]} connections wait in the accept queue and none was accepted "
                f"for {STUCK_SECONDS:g}s")


class AcceptShare:
    """New connections each instance accepted, from successive censuses of
    its established sockets (inodes are not reused soon: a new one is new)."""

    def __init__(self) -> None:
        self.last: dict[str, frozenset[int]] = {}
        self.accepted: dict[str, int] = {}

    def observe(self, sets: dict[str, frozenset[int]]) -> None:
        for x, inodes in sets.items():
            before = self.last.get(x)
            self.accepted.setdefault(x, 0)
            if before is not None:
                self.accepted[x] += len(inodes - before)
            self.last[x] = inodes

    def idle(self, news: list[str], olds: list[str]) -> tuple[list[str], int]:
        """The new instances seen accepting nothing while the others were
        seen accepting enough for that to be evidence (needed_traffic); and
        what the old ones accepted."""
        old_total = sum(self.accepted.get(x, 0) for x in olds)
        others = sum(v for x, v in self.accepted.items() if x not in news)
        if others < needed_traffic(len(self.accepted)):
            return [], old_total
        return [x for x in news if self.accepted.get(x, 0) == 0], old_total


def _quiet(before: int | None, after: int | None) -> bool:
    """No socket or file I/O between two readings (unknown counts as quiet)."""
    return before is None or after is None or after - before < IDLE_IO_BYTES


@dataclass
class BakeOutcome:
    verdict: str = "ready"  # ready | failed
    reason: str = ""
    failed: str | None = None
    seconds: float = 0.0
    accepted: dict[str, int] = field(default_factory=dict)  # new connections per instance
    evidence: list[str] = field(default_factory=list)


def run_bake(host: Host, group: list[str], admitted: dict[str, Baseline],
             serving_olds: list[str]) -> BakeOutcome:
    """Keep `group` (already in `admitted`) under watch for min_ready beside
    `serving_olds`; every admitted instance must stay up meanwhile."""
    svc, ops, clock = host.svc, host.ops, host.clock
    out = BakeOutcome()
    t0 = clock.monotonic()
    end = t0 + svc.min_ready
    probing = svc.ready.type != "notify"
    next_probe = {x: t0 + svc.ready.period for x in group}
    failures = {x: 0 for x in group}
    share = AcceptShare()
    counted = list(serving_olds) + list(admitted)
    next_census = t0
    io0 = {x: ops.io_bytes(x) for x in group}

    def fail(x: str, reason: str) -> BakeOutcome:
        out.verdict, out.reason, out.failed = "failed", reason, x
        return out

    try:
        while True:
            bad = check_admitted(host, admitted)
            if bad:
                return fail(bad[0], f"{bad[1]}, {clock.monotonic() - t0:.1f}s into the bake "
                                    f"(min_ready {svc.min_ready:g}s)")
            now = clock.monotonic()
            if probing:
                for x in group:
                    if now < next_probe[x] or now >= end:
                        continue
                    next_probe[x] = now + svc.ready.period
                    ok, detail = ops.probe(x)
                    host.emit("probe", version=x, ok=ok, detail=detail, checks=0,
                              successes=int(ok), needed=1, phase="bake")
                    failures[x] = 0 if ok else failures[x] + 1
                    if failures[x] >= svc.ready.failure_threshold:
                        return fail(x, f"{svc.name} {x} failed {failures[x]} readiness checks "
                                       f"in a row during the bake: {detail}")
            if now >= next_census or now >= end:
                next_census = now + ACCEPT_POLL
                for x in group:
                    missing = ops.missing_listeners(x)  # None: unknown this time
                    if missing:
                        return fail(x, f"{svc.name} {x} no longer holds a LISTEN socket on "
                                       f"{', '.join(missing)}")
                try:
                    share.observe(ops.connection_sets(counted))
                except OSError as e:  # the census is evidence, not a reason to fail
                    host.emit("warning", message=f"connection census failed: {e}")
            if now >= end:
                break
            host.sleep(min(BAKE_POLL, end - now))
        out.accepted = dict(share.accepted)
        idle, old_total = share.idle(group, serving_olds)
        idle = [x for x in idle if _quiet(io0[x], ops.io_bytes(x))]
        if idle and svc.min_ready > 0:
            return fail(idle[0], f"{svc.name} {idle[0]} accepted no connection during the "
                                 f"{svc.min_ready:g}s bake while "
                                 f"{', '.join(serving_olds)} accepted {old_total}: it does "
                                 "not serve (is it calling accept()?)")
        for x in group:
            st = ops.status(x)
            took = (f", accepted {share.accepted[x]} new connections"
                    if x in share.accepted and svc.min_ready > 0 else "")
            out.evidence.append(f"{x}: up {clock.monotonic() - t0:.1f}s beside "
                                f"{', '.join(serving_olds) or 'nothing'} (main PID "
                                f"{st.main_pid}, {st.restarts} restarts){took}")
        return out
    finally:
        out.seconds = clock.monotonic() - t0
        out.accepted = dict(share.accepted)
