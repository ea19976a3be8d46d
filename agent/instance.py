"""What every phase of a swap shares (pure): an instance's state as systemd
reports it, the host operations a swap needs (`InstanceOps`), the clock, and
`Host`, the bundle the phase modules (gate, bake, drain, revert) are given.

Every side effect comes in through `InstanceOps` and `Clock`, so a swap can be
replayed in a test as a sequence of events with a fake clock and a fake host.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from .config import ServiceConfig


@dataclass(frozen=True)
class InstanceStatus:
    active: str  # systemd ActiveState
    sub: str  # systemd SubState
    result: str  # systemd Result of the service (timeout = killed at TimeoutStopSec)
    restarts: int = 0  # NRestarts
    job: str = ""  # queued systemd job: start, stop, restart, ... or ""
    exit: str = ""  # how its main process last ended: "exited 0", "killed by SIGTERM", ...
    main_pid: int = 0  # MainPID: the process systemd watches (0: none)

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

    @property
    def up(self) -> bool:
        """Running as systemd sees it: active, not stopping, no restart pending."""
        return self.active in ("active", "reloading") and self.job not in ("stop", "restart")

    def describe(self) -> str:
        text = f"{self.active}/{self.sub}, result {self.result}"
        return text + (f", {self.exit}" if self.exit else "")


class InstanceOps(Protocol):
    """What the swap needs from the host, per instance of one service."""

    def instances(self, version: str) -> list[str]: ...  # a version's active instances
    def prepare(self, instance: str, version: str,
                keep: bool = False) -> None: ...  # its drop-in, reload; keep: a rollback
    #   restarting an old instance keeps the drop-in it ran with
    def start(self, instance: str) -> None: ...  # start job queued (returns at once)
    def stop(self, instance: str) -> None: ...  # stop job queued: the drain signal
    def status(self, instance: str) -> InstanceStatus: ...
    # sleeps up to `seconds`, woken early when systemd announces a change of
    # one of `instances` (its start, READY=1, exit, restart): not a poll.
    # True when it did (or may have), False at the timeout
    def wait(self, instances: list[str], seconds: float) -> bool: ...
    def probe(self, instance: str) -> tuple[bool, str]: ...  # http/tcp/grpc/exec readiness
    def pids(self, instance: str) -> list[int]: ...
    def connections(self, pids: list[int]) -> int: ...  # census; OSError: unknown
    def peers(self, pids: list[int]) -> list[str]: ...  # their connections' peers
    def enable(self, instance: str) -> None: ...
    def disable(self, instance: str) -> None: ...
    def cleanup(self, instance: str) -> None: ...  # drop-in and failed state gone
    def journal(self, instance: str) -> list[str]: ...
    def restore_units(self) -> list[str]: ...  # the unit files as before this swap, at a
    #   rollback (the old instances restart from them); the files put back
    def tcp_counters(self) -> dict[str, int]: ...  # the kernel's, in the service's netns
    def run_hook(self, hook: str, env: dict[str, str],
                 instance: str | None = None) -> tuple[bool, str] | None: ...
    def memory(self, olds: list[str]) -> Any: ...  # swap.Memory; None: not measurable
    # Evidence from the kernel (the socket mode decides what applies):
    def missing_listeners(self, instance: str) -> list[str] | None: ...  # listen addresses
    #   it does not hold a LISTEN socket for ([] = holds every one; None = unknown)
    def close_listeners(self, instance: str) -> int: ...  # its own listeners closed by
    #   the kernel (SOCK_DESTROY) at its drain signal; 0 where they are shared
    def connection_sets(self, instances: list[str]) -> dict[str, frozenset[int]]: ...
    #   each instance's established connections (socket inodes): new ones were accepted
    def close_watch(self, instances: list[str]) -> Any: ...  # closes.CloseWatch or None
    def accept_trial(self, instances: list[str], count: int) -> Any: ...  # trial.TrialResult:
    #   which instances accept connections the agent opens itself; OSError: unknown
    def accept_queue(self, instances: list[str]) -> Any: ...  # listeners.Waiting: what
    #   waits on the listeners they serve, how many and which (None: unknown)
    # Where the agent routes traffic (socket: nat); no-ops where the kernel shares a listener:
    def route(self, add: list[str], remove: list[str],
              only: list[str] | None = None) -> tuple[list[int], list[int]] | None: ...
    #   new connections to `add` and no longer to `remove` (or to exactly `only`), one
    #   transaction; (ports before, ports after), None where nothing is routed
    def quiesce(self, instances: list[str]) -> int: ...  # waits until nothing waits for
    #   them to accept it (withdrawn instances); how many still did at the limit
    def private_trial(self, instance: str, count: int) -> Any: ...  # trial.TrialResult of
    #   connections to its private port; None where traffic is not routed per instance


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


class Interrupted(Exception):
    """The operator asked the swap to stop (SIGINT/SIGTERM to a --local swap)."""


@dataclass
class Host:
    """The service and its host, as the phase modules see them."""

    svc: ServiceConfig
    ops: InstanceOps
    clock: Clock
    _emit: Emit
    # True once the operator asked to stop; checked at every poll (a signal
    # handler only sets a flag: the swap decides what stopping means now)
    interrupted: Callable[[], bool] = lambda: False

    def emit(self, kind: str, **data: Any) -> None:
        self._emit(kind, data)

    def route(self, add: list[str], remove: list[str],
              only: list[str] | None = None) -> tuple[list[int], list[int]] | None:
        """ops.route, told as a "route" event when the ports changed."""
        out = self.ops.route(add, remove, only)
        if out is not None and out[0] != out[1]:
            self.emit("route", before=out[0], after=out[1], add=add, remove=remove)
        return out

    def withdraw(self, instances: list[str]) -> None:
        """No new connections to `instances`, and none left waiting for them
        to accept: what comes before their drain signal or their stop. Never
        a reason to stop: a failure is said as a warning."""
        try:
            routed = self.route([], instances) is not None
        except Exception as e:  # nat.NatError, OSError
            self.emit("warning", message=f"cannot withdraw {', '.join(instances)} from the "
                                         f"NAT rules: {e}")
            return
        if routed:
            left = self.ops.quiesce(instances)
            if left:
                self.emit("warning", message=f"{', '.join(instances)} still had {left} "
                                             "connections waiting to be accepted after they "
                                             "were withdrawn: signalled anyway")

    def sleep(self, seconds: float) -> None:
        """Sleep; raise Interrupted if the operator asked to stop."""
        self.clock.sleep(seconds)
        if self.interrupted():
            raise Interrupted()

    def wait(self, instances: list[str], seconds: float) -> bool:
        """ops.wait: up to `seconds`, or until systemd tells of a change of one
        of `instances` (True); raise Interrupted if the operator asked to stop."""
        news = self.ops.wait(instances, max(0.0, seconds))
        if self.interrupted():
            raise Interrupted()
        return news
