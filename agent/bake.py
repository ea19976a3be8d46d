"""The bake (Kubernetes minReadySeconds, Nomad min_healthy_time): after the
gate, each new instance serves beside the old ones for `strategy.min_ready`
and must show, on evidence, that it stays up and serves:

- same main PID, no restart by systemd, still active (a release that sends
  READY=1 and dies a second later, or gunicorn's arbiter whose workers
  cannot import the app, fails here, while the old version still serves);
- its readiness probe (http/tcp/grpc/exec) still passing;
- its own LISTEN sockets still held (`missing_listeners`);
- where traffic flows, it takes its share of new connections: when the
  census saw the old instances accept new connections during the whole bake
  and a new one none, the agent opens connections itself (trial.py) and
  fails the new instance when it accepts none of them while the others do:
  it does not serve (a program that stopped calling accept()).

The same up-check (`check_admitted`) runs again before each old instance
gets its drain signal and at every poll of a drain.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .instance import Host
from .listeners import Waiting
from .modes import mode_for

if TYPE_CHECKING:
    from .trial import TrialResult

ACCEPT_POLL = 0.5  # seconds between two connection censuses (they walk /proc/PID/fd)
# The census samples (every ACCEPT_POLL), so a short connection is seen only
# if it is open at a poll: a fast new instance (no keep-alive clients yet) can
# be seen taking none while a busy old one is seen taking dozens (CI: 0 against
# 117 for an instance that served), and the kernel's wakeups among processes
# sharing a listener are far from fair (measured: 9/0/1/0 among four old
# instances). So the census only raises the suspicion: traffic flows (the
# others were seen taking a new connection) and a new instance was seen taking
# none. The verdict comes from connections the agent opens itself (trial.py),
# as many as make a fair share show with a chance above 1 - TRIAL_CHANCE.
TRIAL_CHANCE = 1e-6
MIN_TRAFFIC = 8  # never fewer connections in a trial


def needed_traffic(instances: int, chance: float = TRIAL_CHANCE) -> int:
    """Connections to open before none taken by one of `instances` is
    evidence that it does not accept: (1 - 1/n)^T < chance."""
    if instances < 2:
        return 1 << 30
    return max(MIN_TRAFFIC, math.ceil(math.log(chance) / math.log(1 - 1 / instances)))


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


STUCK_SECONDS = 5.0  # connections held in an accept queue this long, none accepted
# During the bake, where each instance has its own listener (reuseport), the
# connections the kernel hashes to a new instance that does not accept wait
# in its queue: judged sooner, since clients are waiting.
BAKE_STUCK_SECONDS = 2.0


class AcceptQueue:
    """Whether anybody accepts, from looks at the accept queues
    (listeners.Waiting). Stuck: for `seconds` of looks, connections wait at
    each, their count never falls, and (where the queue's content is known)
    none of the connections of one look is gone at the next. accept(2)
    takes a queue's oldest connection (first in, first out:
    inet_csk_accept), so a queue that only grows in content took nothing:
    a program that said READY=1 and never calls accept(). The count alone
    cannot tell that from a busy server whose queue holds a steady few that
    it keeps taking (CI: 6 waiting at five looks in 2 s beside 64 clients,
    and a healthy instance rolled back). A connection is also gone when its
    client reset it before anyone accepted it (it leaves the dump, not the
    count): rare, and read as an accept. `moved`: a look found the count
    fallen or a connection of the look before gone: somebody accepts."""

    def __init__(self, poll: float, seconds: float = STUCK_SECONDS) -> None:
        self.seconds = seconds
        self.needed = max(2, round(seconds / poll) + 1)  # looks that span `seconds`
        self.looks = 0
        self.queued = 0  # at the last look
        self.ids: frozenset[int] | None = None  # at the last look (None: not known)
        self.since = 1  # the first look of the current run: waiting, nothing taken
        self.moved = False

    def observe(self, waiting: Waiting | None) -> bool:
        """True once stuck; None (not known this time) tells nothing."""
        if waiting is None:
            return False
        self.looks += 1
        queued, ids = waiting.queued, waiting.ids
        taken = queued < self.queued or (
            ids is not None and self.ids is not None and not self.ids <= ids)
        if queued == 0:
            self.since = self.looks + 1
        elif taken:
            self.since = self.looks
        self.moved = self.moved or (self.queued > 0 and taken)
        self.queued, self.ids = queued, ids
        return queued > 0 and self.looks - self.since + 1 >= self.needed

    def reset(self) -> None:
        """Judge afresh from the next look."""
        self.since = self.looks + 1

    def describe(self) -> str:
        return (f"{self.queued} connections wait in the accept queue and none was accepted "
                f"for {self.seconds:g}s")


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

    def settled(self, news: list[str]) -> bool:
        """Whether every new instance was seen accepting: nothing later can
        raise the suspicion, so the census may stop (with thousands of
        connections, each count walks the listening instances' descriptor
        tables). `accepted` then counts what was seen until then."""
        return all(self.accepted.get(x, 0) > 0 for x in news)

    def idle(self, news: list[str], olds: list[str]) -> tuple[list[str], int]:
        """The new instances seen accepting nothing while the others were
        seen accepting something (traffic flows); and what the old ones
        accepted. A suspicion, not a verdict (the census samples)."""
        old_total = sum(self.accepted.get(x, 0) for x in olds)
        others = sum(v for x, v in self.accepted.items() if x not in news)
        if others == 0:
            return [], old_total
        return [x for x in news if self.accepted.get(x, 0) == 0], old_total


@dataclass
class BakeOutcome:
    verdict: str = "ready"  # ready | failed
    reason: str = ""
    failed: str | None = None
    seconds: float = 0.0
    # new connections seen accepted per instance, until each new one was seen
    # accepting (AcceptShare.settled)
    accepted: dict[str, int] = field(default_factory=dict)
    trial: dict[str, Any] | None = None  # trial.TrialResult.as_dict(), when one ran
    evidence: list[str] = field(default_factory=list)


# After a new instance's listener is found gone: up to 1 s (0.05 s polls) for
# systemd to report its exit, the better reason when that is what it does.
EXIT_WAIT_POLLS = 20


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
    mode = mode_for(svc)
    # own listeners: a new instance's queue is its own (modes.ReusePort)
    queues = ({x: AcceptQueue(ACCEPT_POLL, BAKE_STUCK_SECONDS) for x in group}
              if mode.own_listeners and not mode.routes else {})
    counted = list(serving_olds) + list(admitted)
    next_census = t0

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
                        # a program that is exiting closes its listeners first
                        # (gunicorn's arbiter when no worker boots): its exit
                        # is the better reason, when systemd has seen it
                        bad = check_admitted(host, admitted)
                        for _ in range(EXIT_WAIT_POLLS):
                            if bad:
                                break
                            clock.sleep(0.05)
                            bad = check_admitted(host, admitted)
                        why = bad[1] if bad else (f"{svc.name} {x} no longer holds a LISTEN "
                                                  f"socket on {', '.join(missing)}")
                        return fail(bad[0] if bad else x,
                                    f"{why}, {clock.monotonic() - t0:.1f}s into the bake "
                                    f"(min_ready {svc.min_ready:g}s)")
                    # by its count: which connections wait is known per port,
                    # and the old instances' listeners share the port (their
                    # queue moving says nothing of x's), so a count that never
                    # falls is a suspicion that the agent's own connections decide
                    w = ops.accept_queue([x]) if x in queues else None
                    if w is not None and queues[x].observe(Waiting(w.queued)):
                        stuck = queues[x].describe()
                        refuted = _accepts_trial(host, out, x, counted, stuck)
                        if refuted is None:
                            queues[x].reset()  # it accepts: a busy server
                        else:
                            return fail(x, f"{svc.name} {x} does not accept: on its own "
                                           f"listener {stuck}{refuted}, "
                                           f"{now - t0:.1f}s into the bake")
                if not share.settled(group):
                    try:
                        share.observe(ops.connection_sets(counted))
                    except OSError as e:  # the census is evidence, not a reason to fail
                        host.emit("warning", message=f"connection census failed: {e}")
            if now >= end:
                break
            # an exit or a restart of the group wakes it (systemd's news)
            wake = min(next_census, end, *(next_probe.values() if probing else ()))
            host.wait(list(admitted), wake - now)
        out.accepted = dict(share.accepted)
        # routed per instance (nat): nothing reaches the group before the bake
        # ends, so no share to judge; the agent's own connections to each
        # one's private port must all be accepted by it instead
        suspects, old_total = ([], 0) if mode.routes else share.idle(group, serving_olds)
        for x in group if mode.routes else []:
            bad_trial = _private_trial(host, out, x)
            if bad_trial:
                return fail(x, f"{bad_trial}, {clock.monotonic() - t0:.1f}s into the bake")
        if suspects and svc.min_ready > 0:
            bad = _trial(host, out, suspects, counted)
            if bad:
                t = out.trial or {}
                return fail(bad, f"{svc.name} {bad} accepted none of the {t.get('opened')} "
                                 f"connections the agent opened to {t.get('target')} (the "
                                 f"others accepted {sum(t.get('accepted', {}).values())}, "
                                 f"{t.get('unaccepted')} were never accepted), and the census "
                                 f"saw it take none in the {svc.min_ready:g}s bake while "
                                 f"{', '.join(serving_olds)} took {old_total}: it does not "
                                 "serve (is it calling accept()?)")
        for x in group:
            st = ops.status(x)
            took = (f", seen taking {share.accepted[x]} new connections"
                    if x in share.accepted and svc.min_ready > 0 else "")
            if out.trial is not None:
                took += (f", accepted {out.trial['accepted'].get(x, 0)} of the "
                         f"{out.trial['opened']} connections the agent opened")
            out.evidence.append(f"{x}: up {clock.monotonic() - t0:.1f}s beside "
                                f"{', '.join(serving_olds) or 'nothing'} (main PID "
                                f"{st.main_pid}, {st.restarts} restarts){took}")
        return out
    finally:
        out.seconds = clock.monotonic() - t0
        out.accepted = dict(share.accepted)


def _private_trial(host: Host, out: BakeOutcome, x: str) -> str | None:
    """Why `x` does not accept on its own port (None: it accepted every one
    of MIN_TRAFFIC connections the agent opened there)."""
    try:
        trial = host.ops.private_trial(x, MIN_TRAFFIC)
    except OSError as e:
        return f"{host.svc.name} {x}: the agent cannot connect to its private port: {e}"
    if trial is None:
        return None
    out.trial = trial.as_dict()
    host.emit("accept_trial", private=True, **out.trial)
    took = trial.accepted.get(x, 0)
    if took < trial.opened:
        return (f"{host.svc.name} {x} accepted {took} of the {trial.opened} connections the "
                f"agent opened to its private port {trial.target} ({trial.unaccepted} never "
                "accepted): it does not serve (is it calling accept()?)")
    out.evidence.append(f"{x}: accepted all {trial.opened} connections the agent opened to "
                        f"its private port {trial.target}")
    return None


def _run_trial(host: Host, out: BakeOutcome, counted: list[str],
               why: str) -> TrialResult | None:
    """The agent's own connections to the service (needed_traffic of them
    for `counted`), recorded in `out`; None when nothing can be told (a
    warning that says `why` the trial ran)."""
    want = needed_traffic(len(counted))
    try:
        trial = host.ops.accept_trial(counted, want)
    except OSError as e:
        host.emit("warning", message=f"{why}, and the agent could not check: {e}")
        return None
    out.trial = trial.as_dict()
    host.emit("accept_trial", **out.trial)
    if trial.opened < want:
        host.emit("warning", message=f"{why}; the agent opened only {trial.opened} of its "
                                     f"{want} connections in time: not judged")
        return None
    return trial


def _accepts_trial(host: Host, out: BakeOutcome, x: str, counted: list[str],
                   stuck: str) -> str | None:
    """After `x`'s own listener looked stuck: None when `x` accepted some of
    the agent's own connections (it serves, busy) or when that cannot be
    told (a warning; the settle after the drain judges its queue again,
    by content); else what the trial adds to the verdict."""
    trial = _run_trial(host, out, counted, f"{host.svc.name} {x}'s listener: {stuck}")
    if trial is None:
        return None
    took = trial.accepted.get(x, 0)
    if took or not trial.elsewhere(x):
        verdict = (f"it accepted {took} of the {trial.opened} connections the agent opened: "
                   "busy, not stuck" if took else
                   f"no instance accepted the {trial.opened} connections the agent opened: "
                   "not judged")
        host.emit("warning", message=f"{host.svc.name} {x}'s listener: {stuck}, but {verdict}")
        return None
    return (f", and it accepted none of the {trial.opened} connections the agent opened to "
            f"{trial.target} (the others accepted {trial.elsewhere(x)}, {trial.unaccepted} "
            "were never accepted)")


def _trial(host: Host, out: BakeOutcome, suspects: list[str], counted: list[str]) -> str | None:
    """The first suspect that accepted none of the agent's own connections
    while the others accepted some; None when every suspect took its share
    or nothing can be told (reported as a warning: unknown is no verdict)."""
    trial = _run_trial(host, out, counted,
                       f"the census saw {', '.join(suspects)} accept no connection")
    if trial is None:
        return None
    for x in suspects:
        if trial.accepted.get(x, 0) == 0 and trial.elsewhere(x) > 0:
            return x
    return None
