"""Watch after the swap (Nomad auto_revert): for `strategy.watch` seconds
after a successful swap through the daemon, the new version stays under
watch; when one of its instances exits, is restarted by systemd, changes its
main PID or fails its readiness probe failure_threshold times in a row, the
daemon swaps back to the previous version by itself (its release is still
there), with the same proven swap, and records an automatic revert.

`Watcher` decides (pure, replayable with a fake host and clock); `run` is
the daemon thread's loop around it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .bake import AcceptQueue, Baseline, check_admitted
from .instance import Host

WATCH_POLL = 0.5  # seconds between two looks at systemd's state


@dataclass
class Watcher:
    """Whether the watched instances still stand; the first reason they do not."""

    host: Host
    instances: list[str]
    baseline: dict[str, Baseline] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)
    next_probe: float = 0.0
    queue: AcceptQueue = field(default_factory=lambda: AcceptQueue(WATCH_POLL))

    def begin(self) -> None:
        for x in self.instances:
            st = self.host.ops.status(x)
            self.baseline[x] = Baseline(st.main_pid, st.restarts)
        self.next_probe = self.host.clock.monotonic() + self.host.svc.ready.period

    def check(self) -> str | None:
        bad = check_admitted(self.host, self.baseline)
        if bad:
            return bad[1]
        for x in self.instances:
            missing = self.host.ops.missing_listeners(x)  # None: unknown this time
            if missing:
                return (f"{self.host.svc.name} {x} no longer holds a LISTEN socket on "
                        f"{', '.join(missing)} after the swap")
        if self.queue.observe(self.host.ops.accept_queue(self.instances)):
            return (f"{self.host.svc.name} {', '.join(self.instances)} do not accept after the "
                    f"swap: {self.queue.describe()}")
        svc, now = self.host.svc, self.host.clock.monotonic()
        if svc.ready.type == "notify" or now < self.next_probe:
            return None
        self.next_probe = now + svc.ready.period
        for x in self.instances:
            ok, detail = self.host.ops.probe(x)
            self.failures[x] = 0 if ok else self.failures.get(x, 0) + 1
            if self.failures[x] >= svc.ready.failure_threshold:
                return (f"{svc.name} {x} failed {self.failures[x]} readiness checks in a row "
                        f"after the swap: {detail}")
        return None


def run(watcher: Watcher, seconds: float, stop: threading.Event,
        revert: Callable[[str], Any]) -> str | None:
    """Watch for `seconds` (or until `stop`); on a failure call revert(reason)
    and return the reason; None when the watch ended quietly."""
    clock = watcher.host.clock
    end = clock.monotonic() + seconds
    watcher.begin()
    while clock.monotonic() < end and not stop.is_set():
        reason = watcher.check()
        if reason:
            revert(reason)
            return reason
        stop.wait(min(WATCH_POLL, max(0.0, end - clock.monotonic())))
    return None
