"""The drain: old instances get their drain signal (systemd's KillSignal=,
SIGKILL at TimeoutStopSec=, the grace period: the grace period holds even if
the agent dies meanwhile) while the agent counts the connections they still
hold, lists the last long-lived ones, and keeps checking that the new
instances it relies on are still up.

Where instances bind their own listeners (socket: reuseport) the agent
closes the old instances' LISTEN sockets itself at the signal (SOCK_DESTROY),
so that they stop receiving new connections whatever the program does with
its listener; with tcp_migrate_req their queued connections move on.

How the old instance ended its connections comes from the kernel (closes.py):
answered and closed after a response, closed while idle with no request
since the signal (keep-alive clients may be writing on them), or cut at the
grace period.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .instance import Host

# How often a drain counts connections. That an old instance is gone, systemd
# announces (ops.wait wakes the drain): the drain ends as it exits. The close
# watch's notifications are read every WATCH_READ seconds meanwhile (each read
# is bounded: read seldom, a busy port's would overflow the socket's buffer).
DRAIN_POLL = 0.25
WATCH_READ = 0.05
# Below this many connections left, a drain lists their peers (long-lived ones:
# WebSockets, HTTP/2 and gRPC streams), at most once a second.
LIST_BELOW = 10


@dataclass
class DrainResult:
    connections_at_start: int | None = 0  # None: the census failed (unknown)
    connections_at_end: int | None = 0
    killed_at_grace: bool = False
    seconds: float = 0.0  # from the withdrawal (nat) or the signal to the exit
    # of it, withdrawn before the signal: socket: nat lets the connections
    # end by themselves first (Host.withdraw)
    before_signal: float = 0.0
    held: list[str] = field(default_factory=list)  # peers still connected at the last poll
    # how each old instance's main process ended: "exited 0" is a program
    # that drained and returned; "killed by SIGTERM" one that died of the
    # drain signal (a clean stop to systemd, but nothing was drained);
    # "killed by SIGKILL" the kill at the grace period
    exits: list[str] = field(default_factory=list)
    listeners_closed: int = 0  # old LISTEN sockets the agent closed (reuseport)
    # how the old instances ended their connections (closes.Closes.to_dict):
    # answered, closed_idle, client_closed, open, unknown
    closes: dict[str, Any] = field(default_factory=dict)
    closed_idle: int = 0  # closed by the program while idle since the signal
    census_errors: list[str] = field(default_factory=list)
    # what the census cost: counts taken, their wall time summed and the
    # longest (ms; a count is one sock_diag dump of the instance's ports and
    # the match against its processes' sockets)
    census_polls: int = 0
    census_ms_total: float = 0.0
    census_ms_max: float = 0.0

    def merge(self, other: DrainResult) -> DrainResult:
        """Several batches' drains as one."""
        closes = dict(self.closes)
        for k, v in other.closes.items():
            if isinstance(v, int) and isinstance(closes.get(k, 0), int):
                closes[k] = closes.get(k, 0) + v
            else:
                closes.setdefault(k, v)
        return DrainResult(
            connections_at_start=_add(self.connections_at_start, other.connections_at_start),
            connections_at_end=_add(self.connections_at_end, other.connections_at_end),
            killed_at_grace=self.killed_at_grace or other.killed_at_grace,
            seconds=self.seconds + other.seconds,
            before_signal=self.before_signal + other.before_signal,
            held=self.held + other.held, exits=self.exits + other.exits,
            listeners_closed=self.listeners_closed + other.listeners_closed, closes=closes,
            closed_idle=self.closed_idle + other.closed_idle,
            census_errors=self.census_errors + other.census_errors,
            census_polls=self.census_polls + other.census_polls,
            census_ms_total=round(self.census_ms_total + other.census_ms_total, 2),
            census_ms_max=max(self.census_ms_max, other.census_ms_max))

    @property
    def drained(self) -> int | None:
        if self.connections_at_start is None or self.connections_at_end is None:
            return None
        return self.connections_at_start - self.connections_at_end


def _add(a: int | None, b: int | None) -> int | None:
    return None if a is None or b is None else a + b


def _count(host: Host, pids: list[int] | None, d: DrainResult) -> int | None:
    """The census, or None (unknown) when it fails or the processes are not
    known: never a reason to stop a drain."""
    if pids is None:
        return None
    t0 = time.perf_counter()  # a measurement reported, not the drain's clock
    try:
        return host.ops.connections(pids)
    except OSError as e:
        if len(d.census_errors) < 5:
            d.census_errors.append(str(e))
            host.emit("warning", message=f"connection census failed: {e}; count unknown")
        return None
    finally:
        ms = 1000 * (time.perf_counter() - t0)
        d.census_polls += 1
        d.census_ms_total = round(d.census_ms_total + ms, 2)
        d.census_ms_max = round(max(d.census_ms_max, ms), 2)


def run_drain(host: Host, olds: list[str],
              check: Callable[[], str | None] = lambda: None) -> tuple[DrainResult, str | None]:
    """Signal `olds` and follow them until they are gone. `check` runs at
    every poll: a reason from it (a new instance died) ends the wait at once
    and is returned beside the result, so that the old version can be
    restarted without waiting for its drain to finish."""
    svc, ops, clock = host.svc, host.ops, host.clock
    grace = svc.drain.grace_period
    label = ", ".join(olds)
    t_withdraw = clock.monotonic()
    host.withdraw(olds)  # socket: nat: nothing new reaches them, nothing left queued
    d = DrainResult()
    d.before_signal = clock.monotonic() - t_withdraw
    try:
        pids: list[int] | None = sorted({p for x in olds for p in ops.pids(x)})
    except Exception as e:  # the census is evidence: unknown, the drain goes on
        pids = None
        d.census_errors.append(str(e))
    d.connections_at_start = _count(host, pids, d)
    watch = None
    try:
        watch = ops.close_watch(olds)
    except Exception as e:  # evidence never breaks a drain
        host.emit("warning", message=f"cannot follow how {label} closes its connections: {e}")
    t = clock.monotonic()
    for x in olds:
        ops.stop(x)
    for x in olds:
        try:
            d.listeners_closed += ops.close_listeners(x)
        except Exception as e:
            host.emit("warning", message=f"cannot close the listeners of {x}: {e}; new "
                                         "connections may still reach it while it drains")
    host.emit("drain", version=label, connections=d.connections_at_start, elapsed=0.0,
              grace=grace)
    last = d.connections_at_start
    listed_at = -1.0
    counted_at = 0.0
    broken: str | None = None
    while True:
        left = max(0.0, counted_at + DRAIN_POLL - (clock.monotonic() - t))
        news = ops.wait(olds, min(left, WATCH_READ) if watch is not None else left)
        host.interrupted()  # the signal is out: a request to stop is noted, the drain goes on
        if watch is not None:
            try:
                watch.poll()
            except Exception as e:
                host.emit("warning", message=f"following the closes failed: {e}")
                watch = None
        elapsed = clock.monotonic() - t
        census = elapsed - counted_at >= DRAIN_POLL
        if not news and not census:
            continue  # nothing from systemd, no census due: the state is as read
        states = [ops.status(x) for x in olds]
        if all(st.stopped for st in states):
            d.exits = [st.exit for st in states]
            d.killed_at_grace = any(st.result == "timeout" for st in states)
            d.connections_at_end = last if d.killed_at_grace else 0
            if not d.killed_at_grace:
                d.held = []
            break
        if not census:
            continue
        counted_at = elapsed
        broken = check()
        if broken:
            d.connections_at_end = last
            break
        now_count = _count(host, pids, d)
        # Past the grace period systemd is killing them: what falls now was
        # cut, so the count at the last poll before it is what the kill cut.
        if elapsed < grace and now_count is not None:
            last = now_count
        held: list[str] | None = None
        if last and 0 < last <= LIST_BELOW and elapsed - listed_at >= 1.0 and elapsed < grace:
            listed_at = elapsed
            try:
                held = d.held = ops.peers(pids or [])
            except OSError:
                held = None
        elif last == 0:
            d.held = []
        host.emit("drain", version=label, connections=now_count, elapsed=elapsed, grace=grace,
                  **({"held": held} if held is not None else {}))
        if elapsed > grace + 30:  # systemd should have killed them long ago
            d.connections_at_end = last
            host.emit("warning", message=f"{label} still running {elapsed:.0f}s after the "
                                         f"drain signal (grace period {grace:g}s)")
            break
    d.seconds = clock.monotonic() - t_withdraw
    if watch is not None:
        try:
            closes = watch.finish()
            d.closes = closes.to_dict()
            # closed while idle since the signal, those whose client then
            # wrote into the closed socket (refused: a failed request), and
            # those closed with a request unanswered (a failed request too)
            d.closed_idle = sum(int(getattr(closes, k, 0) or 0)
                                for k in ("closed_idle", "refused", "unanswered"))
        except Exception as e:  # evidence never breaks a drain
            d.closes = {"note": f"unknown: {e}"}
    if d.killed_at_grace:
        host.emit("killed", version=label, connections=d.connections_at_end, grace=grace,
                  held=d.held)
    host.emit("drained", version=label, connections=d.connections_at_end, seconds=d.seconds,
              closed_idle=d.closed_idle)
    return d, broken
