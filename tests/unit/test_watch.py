"""The watch after a swap, replayed against the fake host of test_swap."""

from __future__ import annotations

import threading

from agent.config import Ready
from agent.instance import Host
from agent.watch import Watcher, run
from test_swap import FakeClock, FakeHost, Script, service


class ClockEvent(threading.Event):
    """stop.wait() advances the fake clock instead of sleeping."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__()
        self.clock = clock

    def wait(self, timeout: float | None = None) -> bool:
        self.clock.sleep(timeout or 0.01)
        return self.is_set()


def watch(script: Script, ready: Ready | None = None, seconds: float = 60.0
          ) -> tuple[str | None, list[str], float]:
    clock = FakeClock()
    host = FakeHost(clock, 5.0, {"v2": script})
    host.start("v2")
    clock.sleep(1.0)  # admitted and swapped a second ago
    t0 = clock.now
    reverted: list[str] = []
    reason = run(Watcher(Host(service(ready), host, clock, lambda k, d: None), ["v2"]),
                 seconds, ClockEvent(clock), reverted.append)
    return reason, reverted, clock.now - t0


def test_a_version_that_stands_its_watch_is_left_alone() -> None:
    reason, reverted, took = watch(Script())
    assert reason is None and reverted == [] and 60.0 <= took < 61.0


def test_a_version_that_dies_after_the_swap_is_reverted_within_a_poll() -> None:
    reason, reverted, took = watch(Script(dies_after=8.0))
    assert reverted == [reason] and "v2 is no longer running" in reason
    assert 7.0 <= took <= 7.6  # died 8 s after its start, 1 s before the watch began


def test_a_failing_probe_past_the_threshold_reverts() -> None:
    ready = Ready(type="http", url="http://127.0.0.1:{instance_port}/ready", period=2.0,
                  timeout=1.0, failure_threshold=3)
    reason, reverted, took = watch(Script(probe=lambda t: t < 10.0), ready)
    assert reverted and "failed 3 readiness checks in a row after the swap" in reason
    assert 12.0 <= took <= 17.0


def test_an_automatic_revert_is_counted_in_the_metrics_and_kept_as_serving() -> None:
    from agent.metrics import Metrics
    from agent.state import ServiceState

    m = Metrics()
    m.on_result({"service": "api", "result": "auto_reverted", "seconds": 1.2, "drain": None})
    m.on_result({"service": "api", "result": "ok", "seconds": 1.0, "drain": None})
    assert m.registry.get_sample_value("zdd_auto_reverts_total", {"service": "api"}) == 1
    assert m.registry.get_sample_value("zdd_swaps_total",
                                       {"service": "api", "result": "auto_reverted"}) == 1
    st = ServiceState("api", serving="v2", previous="v1")
    st.record({"result": "auto_reverted", "from_version": "v2", "to_version": "v1",
               "started_at": 10.0, "seconds": 1.0})
    assert (st.serving, st.previous) == ("v1", "v2")


def test_the_result_says_who_watches() -> None:
    from agent.deploy import watch_note

    svc = service()
    w = watch_note(svc, "v2", "v1", watched=True, now=100.0)
    assert w == {"seconds": svc.watch, "until": 100.0 + svc.watch, "version": "v2",
                 "previous": "v1", "by": "daemon"}
    assert "--local" in watch_note(svc, "v2", "v1", watched=False, now=0)["note"]
    assert "first deploy" in watch_note(svc, "v1", None, watched=True, now=0)["note"]
