"""The swap state machine, replayed against a fake clock and a fake host whose
instances follow scripted timelines (no sleeps, no systemd)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.config import Drain, Listen, Ready, ServiceConfig
from agent.errors import SwapFailed
from agent.swap import (HEADROOM, InstanceStatus, Memory, ReadinessGate, Swap, fit_plan,
                        peak_extra)
from agent.rollout import Batch, describe, plan


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return 1_700_000_000.0 + self.now

    def sleep(self, seconds: float) -> None:
        assert seconds > 0
        self.now += seconds


@dataclass
class Script:
    """How one fake instance behaves, in seconds after its start/stop."""

    ready_after: float | None = 0.5  # notify: active after this; None: never
    exits_after: float | None = None  # dies during start-up
    probe: Callable[[float], bool] = lambda t: t >= 0.5  # http-style readiness by age
    drain_connections: list[int] = field(default_factory=lambda: [3, 1, 0])
    drain_seconds: float = 0.6  # exits this long after its stop signal
    connections: int = 3
    dies_after: float | None = None  # exits this long after its start, once up
    listens_after: float = 0.0  # holds its LISTEN sockets this long after its start
    accepts: bool = True  # takes new connections while it runs


class FakeHost:
    def __init__(self, clock: FakeClock, grace: float, scripts: dict[str, Script],
                 running: tuple[str, ...] = ()) -> None:
        self.clock, self.grace, self.scripts = clock, grace, scripts
        self.calls: list[tuple[str, str]] = []
        self.started: dict[str, float] = {v: clock.now - 100 for v in running}
        self.stopped: dict[str, float] = {}
        self.probes: list[float] = []
        self.counter_reads = 0
        self.hooks: dict[str, bool] = {}
        self.mem: Memory | None = None
        self.trials: list = []
        self.trial_error: OSError | None = None
        self.nat = False  # socket: nat: the agent routes traffic to instances
        self.routed: list[str] = list(running)
        self.routes: list[list[str]] = []  # the routed set after each transaction

    def _log(self, what: str, version: str) -> None:
        self.calls.append((what, version))

    def instances(self, version: str) -> list[str]:
        return [v for v in self.started if v == version or v.startswith(version + "-")]

    def prepare(self, instance: str, version: str, keep: bool = False) -> None:
        self._log("prepare", instance)

    def start(self, version: str) -> None:
        self._log("start", version)
        self.started[version] = self.clock.now
        self.stopped.pop(version, None)

    def stop(self, version: str) -> None:
        self._log("stop", version)
        self.stopped[version] = self.clock.now

    def status(self, version: str) -> InstanceStatus:
        sc = self.scripts[version]
        if version in self.stopped:
            dt = self.clock.now - self.stopped[version]
            if dt >= min(sc.drain_seconds, self.grace):
                killed = sc.drain_seconds >= self.grace
                return InstanceStatus("failed" if killed else "inactive", "dead",
                                      "timeout" if killed else "success",
                                      exit="killed by SIGKILL" if killed else "exited 0")
            return InstanceStatus("deactivating", "stop-sigterm", "success")
        if version not in self.started:
            return InstanceStatus("inactive", "dead", "success")
        age = self.clock.now - self.started[version]
        if sc.exits_after is not None and age >= sc.exits_after:
            return InstanceStatus("failed", "failed", "exit-code")
        if sc.dies_after is not None and age >= sc.dies_after:
            return InstanceStatus("failed", "failed", "exit-code", exit="exited 1")
        if sc.ready_after is not None and age >= sc.ready_after:
            return InstanceStatus("active", "running", "success", main_pid=self.pids(version)[0])
        return InstanceStatus("activating", "start", "success")

    def wait(self, instances: list[str], seconds: float) -> bool:
        """systemd's news comes within 50 ms of a change: the fake's status
        changes with its clock, so that is how long it sleeps at most, and
        it always says something may have changed."""
        self.clock.sleep(min(seconds, 0.05))
        return True

    def missing_listeners(self, version: str) -> list[str]:
        age = self.clock.now - self.started.get(version, self.clock.now)
        return [] if age >= self.scripts[version].listens_after else ["127.0.0.1:8080"]

    def close_listeners(self, version: str) -> int:
        return 0

    def connection_sets(self, instances: list[str]) -> dict[str, frozenset[int]]:
        """Each running instance that accepts gets one new connection per
        0.25 s of the fake clock (inodes numbered by time)."""
        out = {}
        for x in instances:
            if x in self.stopped or x not in self.started:
                out[x] = frozenset()
                continue
            tick = int(self.clock.now * 4)
            base = (hash(x) % 1000) * 10**7
            out[x] = frozenset({base + tick}) if self.scripts[x].accepts else frozenset()
        return out

    def close_watch(self, instances: list[str]) -> None:
        return None

    def accept_queue(self, instances: list[str]) -> Any:
        """Connections pile up when none of `instances` accepts (0.25 s a
        connection since the first look, numbered by arrival)."""
        from agent.listeners import Waiting

        if any(self.scripts[x].accepts for x in instances):
            return Waiting(0, frozenset())
        self.stuck_since = getattr(self, "stuck_since", self.clock.now)
        n = 1 + int((self.clock.now - self.stuck_since) * 4)
        return Waiting(n, frozenset(range(n)))

    def accept_trial(self, instances: list[str], count: int) -> Any:
        """The agent's own connections go round-robin to the running
        instances that accept; none taken stay unaccepted."""
        from agent.trial import TrialResult

        if self.trial_error is not None:
            raise self.trial_error
        takers = [x for x in instances if x in self.started and x not in self.stopped
                  and self.scripts[x].accepts]
        res = TrialResult(target="127.0.0.1:8080", opened=count)
        for i in range(count):
            if takers:
                x = takers[i % len(takers)]
                res.accepted[x] = res.accepted.get(x, 0) + 1
            else:
                res.unaccepted += 1
        self.trials.append(res)
        return res

    def route(self, add: list[str], remove: list[str],
              only: list[str] | None = None) -> tuple[list[int], list[int]] | None:
        """socket: nat: one transaction per change; ports are fake (by name)."""
        if not self.nat:
            return None
        before = list(self.routed)
        after = (list(only) if only is not None else
                 [x for x in before if x not in remove]
                 + [x for x in add if x not in before and x not in remove])
        if after != before:
            self.routed = after
            self.routes.append(list(after))
            self._log("route", ",".join(after))
        port = {x: 40000 + i for i, x in enumerate(sorted({*self.scripts, *before}))}
        return [port[x] for x in before], [port[x] for x in after]

    def quiesce(self, instances: list[str]) -> int:
        self._log("quiesce", ",".join(instances))
        return 0

    def private_trial(self, instance: str, count: int) -> Any:
        from agent.trial import TrialResult

        if not self.nat:
            return None
        res = TrialResult(target="127.0.0.1:40000", opened=count)
        if self.scripts[instance].accepts:
            res.accepted[instance] = count
        else:
            res.unaccepted = count
        return res

    def probe(self, version: str) -> tuple[bool, str]:
        self.probes.append(self.clock.now - self.started[version])
        ok = self.scripts[version].probe(self.clock.now - self.started[version])
        return ok, "HTTP 200" if ok else "HTTP 503"

    def pids(self, version: str) -> list[int]:
        return [hash(version) % 30000 + 2]

    def connections(self, pids: list[int]) -> int:
        for version, sc in self.scripts.items():
            if pids == self.pids(version):
                if version not in self.stopped:
                    return sc.connections
                polls = int((self.clock.now - self.stopped[version]) / 0.25)
                seq = sc.drain_connections
                return seq[min(polls, len(seq) - 1)]
        return 0

    def peers(self, pids: list[int]) -> list[str]:
        return [f"peer-{i}:5000" for i in range(self.connections(pids))]

    def enable(self, version: str) -> None:
        self._log("enable", version)

    def disable(self, version: str) -> None:
        self._log("disable", version)

    def cleanup(self, version: str) -> None:
        self._log("cleanup", version)

    def journal(self, version: str) -> list[str]:
        return [f"{version}: something went wrong"]

    def restore_units(self) -> list[str]:
        self._log("restore_units", "")
        return []

    def tcp_counters(self) -> dict[str, int]:
        self.counter_reads += 1
        return {"EstabResets": 10 * self.counter_reads}

    def memory(self, olds: list[str]) -> Memory | None:
        return self.mem

    def run_hook(self, hook: str, env: dict[str, str],
                 instance: str | None = None) -> tuple[bool, str] | None:
        if hook not in self.hooks:
            return None
        self._log(hook, instance or env["ZDD_TO_VERSION"])
        return self.hooks[hook], "exit 0" if self.hooks[hook] else "exit 1"


def service(ready: Ready | None = None, grace: float = 5.0) -> ServiceConfig:
    return ServiceConfig(name="api", command=("/opt/api/{version}/bin/api",),
                         listen=(Listen("127.0.0.1", 8080),), path=Path("api.yaml"),
                         ready=ready or Ready(type="notify", deadline=10.0),
                         drain=Drain(grace_period=grace))


def run(scripts: dict[str, Script], old: str | None, new: str, ready: Ready | None = None,
        grace: float = 5.0) -> tuple[FakeHost, FakeClock, list[tuple[str, dict]], object]:
    clock = FakeClock()
    host = FakeHost(clock, grace, scripts, running=(old,) if old else ())
    events: list[tuple[str, dict]] = []
    swap = Swap(service(ready, grace), host, clock, lambda k, d: events.append((k, d)))
    try:
        result: object = swap.run(old, new)
    except SwapFailed as e:
        result = e
    return host, clock, events, result


def test_first_deploy_starts_gates_and_enables() -> None:
    host, clock, events, res = run({"v1": Script(ready_after=1.5)}, None, "v1")
    assert not isinstance(res, SwapFailed)
    assert res.result == "ok" and res.drain is None
    assert host.calls == [("prepare", "v1"), ("start", "v1"), ("enable", "v1")]
    assert 1.5 <= res.phases["ready"] < 1.7
    assert events[-1][0] == "done"


def test_swap_drains_old_after_new_is_ready() -> None:
    scripts = {"v1": Script(drain_connections=[3, 2, 1, 0], drain_seconds=1.0),
               "v2": Script(ready_after=0.3)}
    host, clock, events, res = run(scripts, "v1", "v2")
    assert res.result == "ok"
    # the old one is stopped only after the new one is up and enabled
    assert host.calls == [("prepare", "v2"), ("start", "v2"), ("enable", "v2"),
                          ("stop", "v1"), ("disable", "v1"), ("cleanup", "v1")]
    assert res.drain.connections_at_start == 3
    assert res.drain.connections_at_end == 0 and not res.drain.killed_at_grace
    assert res.drain.exits == ["exited 0"]
    assert 1.0 <= res.drain.seconds <= 1.3
    drains = [d["connections"] for k, d in events if k == "drain"]
    assert drains[0] == 3 and drains == sorted(drains, reverse=True)
    assert res.to_dict()["drain"]["connections_drained"] == 3


def test_old_that_holds_past_grace_is_reported_killed() -> None:
    scripts = {"v1": Script(drain_connections=[4, 2, 2], drain_seconds=999),
               "v2": Script()}
    host, clock, events, res = run(scripts, "v1", "v2", grace=3.0)
    assert res.result == "ok"
    assert res.drain.killed_at_grace and res.drain.exits == ["killed by SIGKILL"]
    assert res.drain.connections_at_end == 2
    assert res.drain.held == ["peer-0:5000", "peer-1:5000"]  # listed while draining
    assert 3.0 <= res.drain.seconds <= 3.3
    assert any(k == "killed" and d["connections"] == 2 for k, d in events)


def test_new_that_exits_at_start_is_rolled_back_and_old_untouched() -> None:
    scripts = {"v1": Script(), "v2": Script(ready_after=None, exits_after=0.2)}
    host, clock, events, res = run(scripts, "v1", "v2")
    assert isinstance(res, SwapFailed)
    result = res.details["result"]
    assert result.result == "rolled_back" and "exited during start-up" in result.reason
    assert result.journal == ["v2: something went wrong"]
    assert ("stop", "v1") not in host.calls and ("disable", "v1") not in host.calls
    assert host.calls[-3:] == [("stop", "v2"), ("disable", "v2"), ("cleanup", "v2")]
    assert ("enable", "v2") not in host.calls


def test_new_that_never_gets_ready_fails_at_the_deadline() -> None:
    scripts = {"v1": Script(), "v2": Script(ready_after=None)}
    host, clock, events, res = run(scripts, "v1", "v2", ready=Ready(deadline=4.0))
    assert isinstance(res, SwapFailed)
    result = res.details["result"]
    assert "not ready within the deadline of 4s" in result.reason
    assert 4.0 <= result.phases["ready"] < 4.2
    assert ("stop", "v1") not in host.calls


def test_http_gate_waits_initial_delay_and_probes_each_period() -> None:
    ready = Ready(type="http", url="http://127.0.0.1:{instance_port}/ready", period=1.0,
                  timeout=0.5, initial_delay=2.0, success_threshold=2, deadline=30.0)
    scripts = {"v2": Script(probe=lambda t: t >= 4.0)}
    host, clock, events, res = run(scripts, None, "v2", ready=ready)
    assert res.result == "ok"
    gate = host.probes[:res.readiness_checks]  # then the bake goes on probing
    assert gate[0] >= 2.0
    gaps = [b - a for a, b in zip(host.probes, host.probes[1:])]
    assert all(0.99 <= g <= 1.11 for g in gaps), gaps
    # two consecutive successes needed: first success at >=4s, ready at the next
    assert sum(1 for t in gate if t >= 4.0) == 2
    assert len(host.probes) > len(gate)  # the bake probed it too


def test_flapping_after_first_success_fails_at_failure_threshold() -> None:
    ready = Ready(type="http", url="http://127.0.0.1:{instance_port}/ready", period=1.0,
                  timeout=0.5, success_threshold=3, failure_threshold=2, deadline=30.0)
    scripts = {"v1": Script(), "v2": Script(probe=lambda t: 1.0 <= t < 2.0)}
    host, clock, events, res = run(scripts, "v1", "v2", ready=ready)
    assert isinstance(res, SwapFailed)
    assert "failed 2 readiness checks in a row" in res.details["result"].reason


def test_same_version_is_unchanged() -> None:
    host, clock, events, res = run({"v1": Script()}, "v1", "v1")
    assert res.result == "unchanged" and host.calls == []


def test_gate_failures_before_first_success_are_start_up() -> None:
    gate = ReadinessGate(Ready(type="http", url="x", failure_threshold=1), started=0.0)
    assert gate.observe(False, "refused") == "pending"
    assert gate.observe(False, "refused") == "pending"
    assert gate.observe(True, "200") == "ready"
    assert gate.checks == 3


def test_stray_new_instance_is_stopped_before_start() -> None:
    scripts = {"v1": Script(), "v2": Script(drain_seconds=0.3)}
    clock = FakeClock()
    host = FakeHost(clock, 5.0, scripts, running=("v1", "v2"))
    events: list[tuple[str, dict]] = []
    res = Swap(service(), host, clock, lambda k, d: events.append((k, d))).run("v1", "v2")
    assert res.result == "ok"
    assert host.calls[:3] == [("stop", "v2"), ("prepare", "v2"), ("start", "v2")]
    assert any(k == "stray" for k, _ in events)


@pytest.mark.parametrize("ready_after", [0.1, 2.0, 7.5])
def test_ready_phase_duration_follows_the_instance(ready_after: float) -> None:
    host, clock, events, res = run({"v1": Script(ready_after=ready_after)}, None, "v1")
    assert ready_after <= res.phases["ready"] <= ready_after + 0.2


def test_interrupt_before_admission_rolls_back() -> None:
    scripts = {"v1": Script(), "v2": Script(ready_after=None)}
    clock = FakeClock()
    host = FakeHost(clock, 5.0, scripts, running=("v1",))

    def interrupted(version: str) -> tuple[bool, str]:
        raise KeyboardInterrupt

    host.probe = interrupted  # type: ignore[method-assign]
    ready = Ready(type="http", url="http://127.0.0.1:{instance_port}/ready")
    with pytest.raises(SwapFailed, match="interrupted before v1 was signalled: rolled back"):
        Swap(service(ready), host, clock).run("v1", "v2")
    assert ("stop", "v1") not in host.calls and host.calls[-1] == ("cleanup", "v2")


# ------------------------------------------------------------------ recovery

from agent.swap import plan_recovery  # noqa: E402


@pytest.mark.parametrize("phase,old_serving,new_active,had_old,action", [
    ("start", True, False, True, "revert"),
    ("ready", True, True, True, "revert"),  # not admitted: the old one keeps serving
    ("rollback", True, True, True, "revert"),
    ("drain", False, True, True, "finish"),  # admitted: the old one's stop is under way
    ("retire", False, True, True, "finish"),
    ("ready", False, True, True, "finish"),  # nothing else serves: keep the new one
    ("ready", False, False, True, "restore"),
    ("start", False, False, False, "abandon"),
    ("ready", False, True, False, "finish"),
    # a drain whose new version is down: start the old one again, never "finish"
    ("drain", False, False, True, "restore"),
    ("drain", True, False, True, "restore"),
    ("retire", False, False, True, "restore"),
])
def test_plan_recovery(phase: str, old_serving: bool, new_active: bool, had_old: bool,
                       action: str) -> None:
    assert plan_recovery(phase, old_serving, new_active, had_old) == action


def recover(scripts: dict[str, Script], running: tuple[str, ...], old: str | None, new: str,
            phase: str, stopping: tuple[str, ...] = ()) -> tuple[FakeHost, object, list]:
    clock = FakeClock()
    host = FakeHost(clock, 5.0, scripts, running=running)
    for v in stopping:
        host.stopped[v] = clock.now
    phases: list[tuple[str | None, str, str]] = []
    res = Swap(service(), host, clock, intent=lambda o, n, p, x: phases.append((o, n, p))) \
        .recover({"from": old, "to": new, "phase": phase})
    return host, res, phases


def test_recover_reverts_an_unadmitted_new_version() -> None:
    host, res, phases = recover({"v1": Script(), "v2": Script()}, ("v1", "v2"), "v1", "v2",
                                "ready")
    assert res.result == "rolled_back" and "interrupted in ready" in res.reason
    assert host.calls == [("stop", "v2"), ("disable", "v2"), ("cleanup", "v2")]
    assert phases == [("v1", "v2", "rollback")]


def test_recover_finishes_an_interrupted_drain() -> None:
    scripts = {"v1": Script(drain_connections=[2, 1, 0], drain_seconds=0.6), "v2": Script()}
    host, res, phases = recover(scripts, ("v1", "v2"), "v1", "v2", "drain", stopping=("v1",))
    assert res.result == "ok" and "finished a swap interrupted in drain" in res.reason
    assert host.calls == [("enable", "v2"), ("stop", "v1"), ("disable", "v1"),
                          ("cleanup", "v1")]
    assert [p for _, _, p in phases] == ["drain", "retire"]


def test_recover_restores_the_old_version_when_nothing_serves() -> None:
    scripts = {"v1": Script(), "v2": Script(ready_after=None, exits_after=0.0)}
    host, res, _ = recover(scripts, ("v2",), "v1", "v2", "ready")
    assert res.result == "rolled_back" and "(restore)" in res.reason
    assert host.calls[-3:] == [("prepare", "v1"), ("start", "v1"), ("enable", "v1")]


# ------------------------------------------------------- hooks, delays, counters

def run_with(host_setup: Callable[[FakeHost], None], svc: ServiceConfig,
             old: str | None, new: str) -> tuple[FakeHost, object]:
    clock = FakeClock()
    host = FakeHost(clock, svc.drain.grace_period,
                    {"v1": Script(), "v2": Script(), "v3": Script(ready_after=None,
                                                              exits_after=0.1)},
                    running=(old,) if old else ())
    host_setup(host)
    try:
        res: object = Swap(svc, host, clock).run(old, new)
    except SwapFailed as e:
        res = e
    return host, res


def test_failing_pre_swap_hook_aborts_before_anything_starts() -> None:
    host, res = run_with(lambda h: h.hooks.update(pre_swap=False), service(), "v1", "v2")
    assert isinstance(res, SwapFailed)
    r = res.details["result"]
    assert r.result == "aborted" and "pre_swap hook failed: failed: exit 1" in r.reason
    # nothing started; the unit files the new config wrote are put back
    assert host.calls == [("pre_swap", "v2"), ("restore_units", "")]


def test_a_rollback_survives_unit_files_that_cannot_be_put_back() -> None:
    def broken(h: Any) -> None:
        def fail() -> list[str]:
            raise OSError(30, "Read-only file system")
        h.restore_units = fail
    host, res = run_with(broken, service(), "v1", "v3")  # v3 exits at start
    assert isinstance(res, SwapFailed)
    r = res.details["result"]
    assert r.result == "rolled_back", r.reason
    assert any("cannot put the unit files back" in w for w in r.warnings), r.warnings


def test_hooks_run_around_a_swap_and_a_rollback() -> None:
    both = {"pre_swap": True, "post_swap": True, "on_rollback": True}
    host, res = run_with(lambda h: h.hooks.update(both), service(), "v1", "v2")
    assert res.result == "ok"
    assert host.calls[0] == ("pre_swap", "v2") and host.calls[-1] == ("post_swap", "v2")
    assert res.hooks == {"pre_swap": "ok: exit 0", "post_swap": "ok: exit 0"}
    host, res = run_with(lambda h: h.hooks.update(both), service(), "v1", "v3")
    assert isinstance(res, SwapFailed)
    assert host.calls[-1] == ("on_rollback", "v3")


def test_pre_stop_delay_holds_the_old_one_before_its_signal() -> None:
    svc = ServiceConfig(name="api", command=("/x",), listen=(Listen(None, 1),),
                        ready=Ready(deadline=10.0), drain=Drain(grace_period=5.0,
                                                                pre_stop_delay=3.0))
    clock = FakeClock()
    host = FakeHost(clock, 5.0, {"v1": Script(), "v2": Script()}, running=("v1",))
    times: dict[str, float] = {}
    orig_enable, orig_stop = host.enable, host.stop

    def enable(v: str) -> None:
        times["enable"] = clock.now
        orig_enable(v)

    def stop(v: str) -> None:
        times["stop"] = clock.now
        orig_stop(v)

    host.enable, host.stop = enable, stop  # type: ignore[method-assign]
    events: list[tuple[str, dict]] = []
    res = Swap(svc, host, clock, lambda k, d: events.append((k, d))).run("v1", "v2")
    assert res.result == "ok"
    assert times["stop"] - times["enable"] >= 3.0
    assert ("pre_stop", {"version": "v1", "delay": 3.0}) in events


def test_kernel_counter_deltas_are_reported() -> None:
    host, res = run_with(lambda h: None, service(), "v1", "v2")
    assert res.tcp == {"EstabResets": 10}  # read once before, once after


# -------------------------------------------------------------------- replicas

def replicated(n: int, surge: int, unavailable: int) -> ServiceConfig:
    return ServiceConfig(name="api", command=("/x",), listen=(Listen(None, 8080),),
                         ready=Ready(deadline=10.0), drain=Drain(grace_period=5.0),
                         replicas=n, max_surge=surge, max_unavailable=unavailable)


def rolling(n: int, surge: int, unavailable: int, broken: str | None = None
            ) -> tuple[FakeHost, object, list[tuple[str, dict]]]:
    olds = [f"v1-{i}" for i in range(1, n + 1)]
    news = [f"v2-{i}" for i in range(1, n + 1)]
    scripts = {x: Script(drain_seconds=0.3) for x in olds + news}
    if broken:
        scripts[broken] = Script(ready_after=None, exits_after=0.2)
    clock = FakeClock()
    host = FakeHost(clock, 5.0, scripts, running=tuple(olds))
    events: list[tuple[str, dict]] = []
    try:
        res: object = Swap(replicated(n, surge, unavailable), host, clock,
                           lambda k, d: events.append((k, d))).run("v1", "v2")
    except SwapFailed as e:
        res = e
    return host, res, events


def running_over_time(host: FakeHost, n: int) -> list[int]:
    """How many instances run after each start/stop call, replayed from the log."""
    up = {f"v1-{i}" for i in range(1, n + 1)}
    counts = []
    for what, x in host.calls:
        if what == "start":
            up.add(x)
        elif what == "stop":
            up.discard(x)
        else:
            continue
        counts.append(len(up))
    return counts


def test_four_replicas_surge_one_never_exceed_five_or_drop_below_four() -> None:
    host, res, events = rolling(4, 1, 0)
    assert res.result == "ok" and res.plan == "+1 -1, +1 -1, +1 -1, +1 -1"
    counts = running_over_time(host, 4)
    assert max(counts) == 5 and min(counts) == 4
    starts = [x for what, x in host.calls if what == "start"]
    assert starts == ["v2-1", "v2-2", "v2-3", "v2-4"]
    # each old one is stopped only after a new one was enabled
    for i in range(1, 5):
        assert host.calls.index(("enable", f"v2-{i}")) < host.calls.index(("stop", f"v1-{i}"))
    assert res.drain.connections_at_start == 4 * 3  # each old held 3
    assert events[0] == ("plan", {"plan": "+1 -1, +1 -1, +1 -1, +1 -1", "replicas": 4,
                                  "batches": 4, "headroom": ""})


def test_max_unavailable_replaces_in_place() -> None:
    host, res, _ = rolling(4, 0, 2)
    assert res.result == "ok"
    counts = running_over_time(host, 4)
    assert max(counts) == 4 and min(counts) == 2


def test_failing_batch_rolls_the_whole_service_back() -> None:
    host, res, events = rolling(4, 1, 0, broken="v2-2")
    assert isinstance(res, SwapFailed)
    r = res.details["result"]
    assert r.result == "rolled_back" and "v2-2 exited during start-up" in r.reason
    # batch 1 had replaced v1-1; the rollback discards v2-2 (never admitted),
    # brings v1-1 back and gates it, and only then drains v2-1
    tail = host.calls[host.calls.index(("stop", "v2-2")):]
    assert tail == [("stop", "v2-2"), ("disable", "v2-2"), ("cleanup", "v2-2"),
                    ("prepare", "v1-1"), ("start", "v1-1"), ("enable", "v1-1"),
                    ("stop", "v2-1"), ("disable", "v2-1"), ("cleanup", "v2-1")]
    assert not any(what == "stop" and x in ("v1-2", "v1-3", "v1-4") for what, x in host.calls)


MIB = 1024 * 1024


def peak_running(host: FakeHost, olds: list[str]) -> int:
    """The most instances running at once over the host's calls."""
    running, peak = set(olds), len(olds)
    for what, x in host.calls:
        if what == "start":
            running.add(x)
        elif what == "stop":
            running.discard(x)
        peak = max(peak, len(running))
    return peak


def mem(per_mib: int, fits: float) -> Memory:
    """Memory where `fits` new instances (with the margin) fit."""
    return Memory(per_mib * MIB, int(per_mib * MIB * HEADROOM * fits), "cgroup")


def test_headroom_shortfall_refuses_before_anything_starts() -> None:
    clock = FakeClock()
    host = FakeHost(clock, 5.0, {"v1-1": Script(), "v1-2": Script(), "v2-1": Script(),
                                 "v2-2": Script()}, running=("v1-1", "v1-2"))
    host.mem = mem(300, 0.5)  # not even one new instance fits; max_unavailable 0
    with pytest.raises(SwapFailed, match="not enough memory") as e:
        Swap(replicated(2, 1, 0), host, clock).run("v1", "v2")
    res = e.value.details["result"]
    assert res.result == "aborted"
    assert "300 MiB (cgroup)" in res.reason and "max_unavailable" in res.reason
    assert not any(what in ("start", "stop") for what, _ in host.calls)


def test_headroom_narrows_the_surge_to_what_fits() -> None:
    olds = [f"v1-{i}" for i in range(1, 5)]
    clock = FakeClock()
    host = FakeHost(clock, 5.0, {x: Script() for x in olds + [f"v2-{i}" for i in range(1, 5)]},
                    running=tuple(olds))
    host.mem = mem(100, 1.5)  # room for one new instance, the config allows two at once
    res = Swap(replicated(4, 2, 0), host, clock).run("v1", "v2")
    assert res.result == "ok" and res.plan == "+1 -1, +1 -1, +1 -1, +1 -1"
    assert "replacing with a surge of 1" in res.headroom
    assert peak_running(host, olds) == 5


def test_headroom_replaces_in_place_when_unavailability_allows() -> None:
    clock = FakeClock()
    host = FakeHost(clock, 5.0, {"v1-1": Script(), "v1-2": Script(), "v2-1": Script(),
                                 "v2-2": Script()}, running=("v1-1", "v1-2"))
    host.mem = mem(100, 0.2)
    res = Swap(replicated(2, 1, 1), host, clock).run("v1", "v2")
    assert res.result == "ok" and "in place (surge 0)" in res.headroom
    assert res.plan == describe(plan(2, 0, 1))
    assert peak_running(host, ["v1-1", "v1-2"]) == 2  # never more than the two replicas


def test_fit_plan_keeps_the_configured_plan_when_it_fits() -> None:
    svc = replicated(4, 2, 1)
    batches, note = fit_plan(svc, 4, mem(100, 2))
    assert note == "" and peak_extra(batches, 4) == 2
    assert peak_extra([Batch(1, 2, 1), Batch(0, 1, 2)], 3) == 1


def test_first_deploy_of_replicas_starts_them_all() -> None:
    clock = FakeClock()
    host = FakeHost(clock, 5.0, {f"v1-{i}": Script() for i in (1, 2, 3)})
    res = Swap(replicated(3, 1, 0), host, clock).run(None, "v1")
    assert res.result == "ok" and res.plan == "+3"
    assert [x for what, x in host.calls if what == "enable"] == ["v1-1", "v1-2", "v1-3"]


def test_count_cut_at_grace_is_the_last_one_before_the_kill() -> None:
    """systemd kills at the grace period but reports the unit stopped a poll
    later; the census in between sees 0, which must not count as drained."""

    class LaggingHost(FakeHost):
        def status(self, version: str) -> InstanceStatus:
            if version in self.stopped and \
                    self.clock.now - self.stopped[version] < self.grace + 0.5:
                return InstanceStatus("deactivating", "stop-sigkill", "timeout")
            return super().status(version)

        def connections(self, pids: list[int]) -> int:
            if "v1" in self.stopped and self.clock.now - self.stopped["v1"] >= self.grace:
                return 0  # killed: the kernel closed its sockets
            return super().connections(pids)

    clock = FakeClock()
    host = LaggingHost(clock, 3.0, {"v1": Script(drain_connections=[2], drain_seconds=999),
                                    "v2": Script()}, running=("v1",))
    res = Swap(service(grace=3.0), host, clock).run("v1", "v2")
    assert res.drain.killed_at_grace and res.drain.connections_at_end == 2
    assert res.drain.held == ["peer-0:5000", "peer-1:5000"]


# ------------------------------------------------------- proven: bake, re-checks

from agent.errors import SwapBroken  # noqa: E402
from agent.swap import instance_ids  # noqa: E402


def swap_with(scripts: dict[str, Script], svc: ServiceConfig, old: str | None, new: str,
              setup: Callable[[FakeHost], None] = lambda h: None,
              interrupted: Callable[[], bool] | None = None,
              ) -> tuple[FakeHost, object, list[tuple[str, dict]]]:
    clock = FakeClock()
    host = FakeHost(clock, svc.drain.grace_period, scripts, running=(old,) if old else ())
    setup(host)
    events: list[tuple[str, dict]] = []
    try:
        res: object = Swap(svc, host, clock, lambda k, d: events.append((k, d)),
                           interrupted=interrupted).run(old, new)
    except (SwapFailed, SwapBroken) as e:
        res = e
    return host, res, events


def baked(min_ready: float = 5.0, **kw: object) -> ServiceConfig:
    base = service()
    return ServiceConfig(**{**base.__dict__, "min_ready": min_ready, **kw})  # type: ignore[arg-type]


def census_counting(host: FakeHost) -> list[list[str]]:
    """The bake's censuses (connection_sets calls) of `host`, as they come."""
    calls: list[list[str]] = []
    real = host.connection_sets

    def counted(instances: list[str]) -> dict[str, frozenset[int]]:
        calls.append(list(instances))
        return real(instances)

    host.connection_sets = counted  # type: ignore[method-assign]
    return calls


def test_the_bake_stops_counting_once_every_new_instance_was_seen_accepting() -> None:
    """Each census walks the listening instances' descriptor tables (thousands
    of connections under load): once the new instance was seen taking a
    connection nothing can make it suspect, so the census stops; one that
    takes none keeps being counted to the end of the bake."""
    seen: dict[str, list[list[str]]] = {}

    def count(name: str) -> Callable[[FakeHost], None]:
        return lambda h: seen.__setitem__(name, census_counting(h))

    _, res, _ = swap_with({"v1": Script(), "v2": Script()}, baked(5.0), "v1", "v2",
                          setup=count("accepts"))
    assert res.result == "ok" and res.bake["accepted"]["v2"] > 0
    # the baseline and the look that saw v2 accept
    assert 2 <= len(seen["accepts"]) <= 3, seen
    swap_with({"v1": Script(), "v2": Script(accepts=False)}, baked(5.0), "v1", "v2",
              setup=count("idle"))
    assert len(seen["idle"]) >= 10, seen  # every 0.5 s of the bake


def test_ready_then_dies_during_the_bake_rolls_back_before_the_old_is_signalled() -> None:
    # gunicorn's arbiter: READY=1 at 0.3 s, its workers cannot import the app, exit at 1.2 s
    scripts = {"v1": Script(), "v2": Script(ready_after=0.3, dies_after=1.2)}
    host, res, _ = swap_with(scripts, baked(5.0), "v1", "v2")
    assert isinstance(res, SwapFailed) and not isinstance(res, SwapBroken)
    r = res.details["result"]
    assert r.result == "rolled_back"
    assert "v2 is no longer running" in r.reason and "into the bake (min_ready 5s)" in r.reason
    assert ("stop", "v1") not in host.calls and ("enable", "v2") not in host.calls


def test_a_healthy_bake_is_evidence_in_the_result() -> None:
    host, res, _ = swap_with({"v1": Script(), "v2": Script()}, baked(2.0), "v1", "v2")
    assert res.result == "ok"
    assert 2.0 <= res.bake["seconds"] < 2.3 and res.phases["bake"] >= 2.0
    assert res.bake["accepted"]["v2"] > 0 and res.bake["accepted"]["v1"] > 0
    assert any(e.startswith("v2: READY=1") for e in res.evidence)
    assert any(e.startswith("v2: up 2.0s beside v1") for e in res.evidence)
    # the old one is signalled only after the whole bake
    assert host.calls.index(("enable", "v2")) < host.calls.index(("stop", "v1"))


def test_restart_by_systemd_during_the_bake_fails_it() -> None:
    class Restarting(FakeHost):
        def status(self, version: str) -> InstanceStatus:
            st = super().status(version)
            if version == "v2" and st.active == "active" and \
                    self.clock.now - self.started["v2"] > 1.0:
                return InstanceStatus("active", "running", "success", restarts=1,
                                      main_pid=4242)
            return st

    clock = FakeClock()
    host = Restarting(clock, 5.0, {"v1": Script(), "v2": Script()}, running=("v1",))
    with pytest.raises(SwapFailed, match="was restarted by systemd"):
        Swap(baked(3.0), host, clock).run("v1", "v2")
    assert ("stop", "v1") not in host.calls


def test_an_instance_that_never_accepts_while_the_old_does_fails_the_bake() -> None:
    scripts = {"v1": Script(), "v2": Script(accepts=False)}
    host, res, _ = swap_with(scripts, baked(10.0), "v1", "v2")
    assert isinstance(res, SwapFailed)
    reason = res.details["result"].reason
    assert "v2 accepted none of the 20 connections the agent opened" in reason, reason
    assert "the others accepted 20" in reason and "saw it take none in the 10s bake" in reason
    assert res.details["result"].bake["trials"][0]["accepted"] == {"v1": 20}
    assert ("stop", "v1") not in host.calls


def test_the_census_raises_a_suspicion_the_agents_own_connections_decide() -> None:
    from agent.bake import AcceptShare, needed_traffic

    # no traffic seen at all: no suspicion, no trial, the bake passes it;
    # what catches it is the accept queue once v1 is gone
    def quiet(h: FakeHost) -> None:
        h.connection_sets = lambda xs: {x: frozenset() for x in xs}  # type: ignore
    host, res, _ = swap_with({"v1": Script(), "v2": Script(accepts=False)}, baked(3.0),
                             "v1", "v2", setup=quiet)
    assert isinstance(res, SwapBroken) and "do not accept" in res.details["result"].reason
    assert res.details["result"].bake["accepted"]["v2"] == 0 and host.trials == []

    # the census never saw its connections (they are short: a fast instance),
    # but it accepts the agent's own connections: it serves
    def unseen(h: FakeHost) -> None:
        orig = h.connection_sets
        h.connection_sets = lambda xs: {x: (frozenset() if x == "v2" else s)  # type: ignore
                                        for x, s in orig(xs).items()}
    host, res, _ = swap_with({"v1": Script(), "v2": Script()}, baked(10.0), "v1", "v2",
                             setup=unseen)
    assert res.result == "ok" and res.bake["accepted"]["v2"] == 0
    assert res.bake["trials"][0]["accepted"] == {"v1": 10, "v2": 10}
    assert "accepted 10 of the 20 connections the agent opened" in " ".join(res.evidence)

    # the agent cannot connect: unknown is no verdict, and it is said
    def unreachable(h: FakeHost) -> None:
        unseen(h)
        h.trial_error = ConnectionRefusedError(111, "Connection refused")
    host, res, events = swap_with({"v1": Script(), "v2": Script()}, baked(10.0), "v1", "v2",
                                  setup=unreachable)
    assert res.result == "ok" and "trials" not in res.bake
    assert any(k == "warning" and "could not check" in d["message"] for k, d in events)

    # the trial's size: a fair share would have shown with chance > 1 - 1e-6
    assert [needed_traffic(n) for n in (2, 5, 9)] == [20, 62, 118]
    assert needed_traffic(2, 0.5) == 8  # never fewer than MIN_TRAFFIC
    share = AcceptShare()
    share.observe({"a": frozenset(), "b": frozenset(), "n": frozenset()})
    share.observe({"a": frozenset(range(12)), "b": frozenset(), "n": frozenset()})
    assert share.idle(["n"], ["a", "b"]) == (["n"], 12)
    assert share.idle(["n", "b"], ["a"]) == (["n", "b"], 12)
    assert share.idle(["n", "a"], ["b"]) == ([], 0)  # nothing seen elsewhere: no suspicion


def test_ready_claim_without_a_listener_is_not_admission() -> None:
    scripts = {"v1": Script(), "v2": Script(ready_after=0.2, listens_after=2.0)}
    host, res, _ = swap_with(scripts, baked(0.0), "v1", "v2")
    assert res.result == "ok" and res.phases["ready"] >= 2.0  # waited for the LISTEN socket
    scripts = {"v1": Script(), "v2": Script(ready_after=0.2, listens_after=999)}
    host, res, _ = swap_with(scripts, baked(0.0), "v1", "v2")
    assert isinstance(res, SwapFailed)
    assert "said it was ready (READY=1" in res.details["result"].reason
    assert "no LISTEN socket on 127.0.0.1:8080" in res.details["result"].reason


def test_new_instance_dying_during_pre_stop_delay_keeps_the_old_one() -> None:
    svc = baked(1.0, drain=Drain(grace_period=5.0, pre_stop_delay=5.0))
    scripts = {"v1": Script(), "v2": Script(ready_after=0.3, dies_after=3.0)}
    host, res, _ = swap_with(scripts, svc, "v1", "v2")
    assert isinstance(res, SwapFailed) and not isinstance(res, SwapBroken)
    r = res.details["result"]
    assert r.result == "rolled_back" and "before v1 was signalled" in r.reason
    assert ("stop", "v1") not in host.calls


def test_new_instance_dying_after_the_signal_restarts_the_old_version() -> None:
    scripts = {"v1": Script(drain_seconds=2.0, drain_connections=[3, 3, 2, 2, 1]),
               "v2": Script(ready_after=0.3, dies_after=2.0)}
    host, res, events = swap_with(scripts, baked(1.0), "v1", "v2")
    assert isinstance(res, SwapBroken)
    r = res.details["result"]
    assert r.result == "failed" and "after v1 got the drain signal" in r.reason
    assert "v1 restarted and serving again" in r.reason
    stop_v1 = host.calls.index(("stop", "v1"))
    restart = host.calls.index(("start", "v1"), stop_v1)
    assert ("stop", "v2") in host.calls[stop_v1 + 1:restart]  # dead: it serves nothing
    assert ("enable", "v1") in host.calls[restart:]


def test_post_start_hook_runs_per_instance_before_the_signal() -> None:
    host, res, _ = swap_with({"v1": Script(), "v2": Script()}, baked(0.5), "v1", "v2",
                             setup=lambda h: h.hooks.update(post_start=True))
    assert res.result == "ok"
    assert host.calls.index(("post_start", "v2")) < host.calls.index(("stop", "v1"))
    host, res, _ = swap_with({"v1": Script(), "v2": Script()}, baked(0.5), "v1", "v2",
                             setup=lambda h: h.hooks.update(post_start=False))
    assert isinstance(res, SwapFailed)
    assert "post_start hook failed for api v2" in res.details["result"].reason
    assert ("stop", "v1") not in host.calls


def test_interrupt_after_the_signal_finishes_the_swap() -> None:
    asked: list[bool] = []

    def interrupted() -> bool:
        return bool(asked)

    class Asking(FakeHost):
        def stop(self, version: str) -> None:
            super().stop(version)
            asked.append(True)  # the operator presses Ctrl-C as v1 starts draining

    clock = FakeClock()
    host = Asking(clock, 5.0, {"v1": Script(), "v2": Script()}, running=("v1",))
    events: list[tuple[str, dict]] = []
    res = Swap(baked(0.5), host, clock, lambda k, d: events.append((k, d)),
               interrupted=interrupted).run("v1", "v2")
    assert res.result == "ok"
    assert "interrupted after v1 was signalled: finishing the swap to v2" in res.warnings
    assert ("disable", "v1") in host.calls and ("stop", "v2") not in host.calls


def test_interrupt_before_the_signal_rolls_back_without_stopping_the_old() -> None:
    scripts = {"v1": Script(), "v2": Script()}
    host, res, _ = swap_with(scripts, baked(5.0), "v1", "v2", interrupted=lambda: True)
    assert isinstance(res, SwapFailed)
    assert res.details["result"].reason == "interrupted before v1 was signalled: rolled back"
    assert ("stop", "v1") not in host.calls and ("stop", "v2") in host.calls


def test_an_error_before_the_signal_rolls_back_and_after_it_finishes() -> None:
    def broken_enable(h: FakeHost) -> None:
        def enable(v: str) -> None:
            raise OSError("D-Bus connection closed")
        h.enable = enable  # type: ignore[method-assign]

    host, res, _ = swap_with({"v1": Script(), "v2": Script()}, baked(0.5), "v1", "v2",
                             setup=broken_enable)
    assert isinstance(res, SwapFailed)
    assert "OSError: D-Bus connection closed before v1 was signalled" in \
        res.details["result"].reason
    assert ("stop", "v1") not in host.calls

    def flaky_disable(h: FakeHost) -> None:
        orig, fails = h.disable, [1]

        def disable(v: str) -> None:
            if fails:
                fails.pop()
                raise OSError("systemd is re-executing")
            orig(v)
        h.disable = disable  # type: ignore[method-assign]

    host, res, _ = swap_with({"v1": Script(), "v2": Script()}, baked(0.5), "v1", "v2",
                             setup=flaky_disable)
    assert res.result == "ok"
    assert any("systemd is re-executing after v1 was signalled: finishing the swap" in w
               for w in res.warnings)
    assert ("disable", "v1") in host.calls


def test_census_error_makes_the_count_unknown_and_never_aborts_the_drain() -> None:
    def failing_census(h: FakeHost) -> None:
        def connections(pids: list[int]) -> int:
            raise OSError("sock_diag: short read")
        h.connections = connections  # type: ignore[method-assign]

    host, res, events = swap_with({"v1": Script(), "v2": Script()}, baked(0.5), "v1", "v2",
                                  setup=failing_census)
    assert res.result == "ok" and ("disable", "v1") in host.calls
    assert res.drain.connections_at_start is None and res.to_dict()["drain"][
        "connections_drained"] is None
    assert res.drain.census_errors and "count unknown" in str(events)


# -------------------------------------- the rollback never goes below the promise

class Counting(FakeHost):
    """Checks after every call and tick that at least `floor` instances other
    than the broken one are ready (active and not stopping)."""

    def __init__(self, *a: object, floor: int, broken: str, **kw: object) -> None:
        super().__init__(*a, **kw)  # type: ignore[arg-type]
        self.floor, self.broken, self.low = floor, broken, 10**6
        orig = self.clock.sleep

        def sleep(seconds: float) -> None:
            orig(seconds)
            self.look()
        self.clock.sleep = sleep  # type: ignore[method-assign]

    def look(self) -> None:
        ready = sum(1 for x in self.scripts if x != self.broken
                    and (x in self.started or x in self.stopped)
                    and self.status(x).active == "active")
        self.low = min(self.low, ready)

    def stop(self, version: str) -> None:
        super().stop(version)
        self.look()


def rollback_cases() -> list[tuple[int, int, int]]:
    return [(n, s, u) for n in range(1, 13) for s in range(0, n + 1) for u in range(0, n + 1)
            if (s, u) != (0, 0)]


@pytest.mark.parametrize("n,surge,unavailable", rollback_cases())
def test_rollback_keeps_replicas_minus_max_unavailable_ready(n: int, surge: int,
                                                             unavailable: int) -> None:
    batches = plan(n, surge, unavailable)
    news, olds = instance_ids("v2", n), instance_ids("v1", n)
    firsts = [sum(b.start for b in batches[:i]) for i in range(len(batches))]
    # a failure in every batch that starts something: at the gate, then in the bake
    for i, first in enumerate(firsts):
        if not batches[i].start:
            continue
        for how in ("gate", "bake"):
            broken = news[first]
            scripts = {x: Script(drain_seconds=0.3) for x in olds + news}
            scripts[broken] = (Script(ready_after=None, exits_after=0.2) if how == "gate"
                               else Script(ready_after=0.2, dies_after=0.6))
            clock = FakeClock()
            host = Counting(clock, 5.0, scripts, running=tuple(olds), floor=n - unavailable,
                            broken=broken)
            svc = ServiceConfig(name="api", command=("/x",), listen=(Listen(None, 8080),),
                                ready=Ready(deadline=10.0), drain=Drain(grace_period=5.0),
                                replicas=n, max_surge=surge, max_unavailable=unavailable,
                                min_ready=1.0)
            with pytest.raises(SwapFailed) as e:
                Swap(svc, host, clock).run("v1", "v2")
            r = e.value.details["result"]
            assert r.result == "rolled_back", (i, how, r.reason)
            assert host.low >= n - unavailable, (i, how, host.low)
            # the end: every old instance serves, no new one does
            assert all(host.status(x).active == "active" for x in olds), (i, how)
            assert not any(host.status(x).active == "active" for x in news), (i, how)


def test_recover_an_interrupted_drain_whose_new_version_died_restores_the_old() -> None:
    scripts = {"v1": Script(drain_seconds=0.3), "v2": Script(ready_after=None,
                                                             exits_after=0.0)}
    host, res, _ = recover(scripts, ("v1", "v2"), "v1", "v2", "drain", stopping=("v1",))
    host.clock.sleep(1.0)
    assert res.result == "failed" and "(restore)" in res.reason
    assert ("start", "v1") in host.calls and ("enable", "v1") in host.calls
    assert ("enable", "v2") not in host.calls


def test_a_missing_old_replica_does_not_stop_the_swap() -> None:
    clock = FakeClock()
    olds, news = ["v1-1", "v1-3"], ["v2-1", "v2-2", "v2-3"]  # v1-2 was stopped by hand
    host = FakeHost(clock, 5.0, {x: Script(drain_seconds=0.3) for x in olds + news + ["v1-2"]},
                    running=tuple(olds))
    res = Swap(replicated(3, 1, 0), host, clock).run("v1", "v2")
    assert res.result == "ok"
    assert [x for what, x in host.calls if what == "enable"] == news
    assert {x for what, x in host.calls if what == "disable"} == set(olds)


def test_a_new_version_that_never_accepts_is_caught_once_the_old_one_is_gone() -> None:
    """READY=1, its listener held, and no accept(): with keep-alive clients
    the bake cannot tell; once the old instance drained, the accept queue
    fills and never shrinks: the old version comes back (failed, exit 10)."""
    scripts = {"v1": Script(drain_seconds=0.6), "v2": Script(accepts=False)}

    def keepalive_only(h: FakeHost) -> None:  # no new connection seen during the bake
        h.connection_sets = lambda xs: {x: frozenset() for x in xs}  # type: ignore
    host, res, events = swap_with(scripts, baked(2.0), "v1", "v2", setup=keepalive_only)
    assert isinstance(res, SwapBroken), res
    r = res.details["result"]
    assert "do not accept" in r.reason and "none was accepted for 5s" in r.reason
    assert "v1 restarted and serving again" in r.reason
    restart = host.calls.index(("start", "v1"))
    assert ("enable", "v1") in host.calls[restart:]


def test_accept_queue_by_count_when_its_content_is_unknown() -> None:
    from agent.bake import AcceptQueue
    from agent.listeners import Waiting

    def w(n: int | None) -> Waiting | None:
        return None if n is None else Waiting(n)

    q = AcceptQueue(0.5)  # 11 looks span 5 s
    assert not any(q.observe(w(n)) for n in [3, 5, 2, 6, 0, 4, 4, 9, 3, None, 5, 1] * 3)
    q = AcceptQueue(0.5)
    assert not any(q.observe(w(n)) for n in [9] * 10)
    assert q.observe(w(10))  # the eleventh look, 5 s after the first, never falling


def test_a_steady_count_whose_connections_move_is_not_stuck() -> None:
    """CI: a healthy instance beside 64 clients had 6 waiting at each of
    five looks in 2 s and was rolled back: its queue's content moved."""
    from agent.bake import AcceptQueue
    from agent.listeners import Waiting

    q = AcceptQueue(0.5, 2.0)
    looks = [Waiting(6, frozenset(range(i, i + 6))) for i in range(0, 60, 3)]
    assert not any(q.observe(x) for x in looks)
    assert q.moved
    q = AcceptQueue(0.5, 2.0)  # nothing leaves, more arrive: stuck at the fifth look
    grows = [Waiting(3 + i, frozenset(range(3 + i))) for i in range(5)]
    assert [q.observe(x) for x in grows] == [False] * 4 + [True] and not q.moved
    # a queue of 200 refilled as fast as its server takes 20 a second: the
    # oldest connections leave at every look, whatever stays behind them
    q = AcceptQueue(0.5)
    full = [Waiting(200, frozenset(range(10 * i, 10 * i + 200))) for i in range(20)]
    assert not any(q.observe(x) for x in full) and q.moved


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.none(), st.tuples(st.frozensets(st.integers(0, 6), max_size=5),
                                               st.integers(0, 2))),
                min_size=1, max_size=30),
       st.integers(2, 6))
def test_accept_queue_is_stuck_exactly_when_nothing_was_taken_for_the_span(
        looks: list[tuple[frozenset[int], int] | None], needed: int) -> None:
    """Stuck at a look iff at each of the last `needed` looks (the unknown
    ones skipped) connections waited, their count never fell, and every
    connection of a look still waited at the next (accept takes the oldest:
    any taken leaves); `extra` waiting connections the dump does not show
    (a client's reset). The reference is the brute force over windows."""
    from agent.bake import AcceptQueue
    from agent.listeners import Waiting

    q = AcceptQueue(1.0, float(needed - 1))
    assert q.needed == needed
    known: list[tuple[int, frozenset[int]]] = []
    for look in looks:
        got = q.observe(None if look is None else Waiting(len(look[0]) + look[1], look[0]))
        if look is None:
            assert got is False
            continue
        known.append((len(look[0]) + look[1], look[0]))
        window = known[-needed:]
        want = (len(window) == needed and all(n > 0 for n, _ in window)
                and all(n1 <= n2 and a <= b for (n1, a), (n2, b) in zip(window, window[1:])))
        assert got == want, (known, needed)


def test_own_listener_that_holds_connections_fails_the_bake_within_seconds() -> None:
    # socket: reuseport: the kernel hashes connections to the new instance's
    # own listener; if it never accepts they wait there, so the bake does
    # not wait for its end (nor for the census) to fail it; the agent's own
    # connections confirm it (the queue's content is known per port)
    scripts = {"v1": Script(), "v2": Script(accepts=False)}
    host, res, _ = swap_with(scripts, baked(10.0, socket="reuseport"), "v1", "v2")
    assert isinstance(res, SwapFailed) and not isinstance(res, SwapBroken)
    r = res.details["result"]
    assert r.result == "rolled_back" and "v2 does not accept: on its own listener" in r.reason
    assert "none was accepted for 2s" in r.reason and r.bake["seconds"] < 3.0, r.bake
    assert "accepted none of the 20 connections the agent opened" in r.reason, r.reason
    assert [t.accepted for t in host.trials] == [{"v1": 20}]
    assert ("stop", "v1") not in host.calls


def test_a_busy_instance_whose_listener_looks_stuck_is_judged_by_the_agents_connections(
        ) -> None:
    """A listener whose queue held the same connection for 2 s (or whose
    port's queue did: old and new listeners share it) is a suspicion in the
    bake; the instance that accepts the agent's own connections serves."""
    from agent.listeners import Waiting

    def looks_stuck(h: FakeHost) -> None:
        h.accept_queue = lambda xs: (  # type: ignore
            Waiting(0) if "v1" in h.stopped else Waiting(4, frozenset({1, 2, 3, 4})))

    scripts = {"v1": Script(), "v2": Script()}
    host, res, events = swap_with(scripts, baked(5.0, socket="reuseport"), "v1", "v2",
                                  setup=looks_stuck)
    assert getattr(res, "result", None) == "ok", res
    assert len(host.trials) >= 2 and all(t.accepted.get("v2") for t in host.trials)
    assert any(k == "warning" and "busy, not stuck" in d["message"] for k, d in events), events


def test_a_stuck_looking_listener_is_not_failed_when_the_trial_cannot_tell() -> None:
    """Its count is a suspicion only; a trial that cannot be made (here the
    agent cannot connect) is a warning, and the settle after the drain
    judges the queue again by its content."""
    from agent.listeners import Waiting

    def looks_stuck(h: FakeHost) -> None:
        h.trial_error = OSError("connection refused")
        h.accept_queue = lambda xs: (  # type: ignore
            Waiting(0) if "v1" in h.stopped else Waiting(4, frozenset({1, 2, 3, 4})))

    scripts = {"v1": Script(), "v2": Script()}
    host, res, events = swap_with(scripts, baked(5.0, socket="reuseport"), "v1", "v2",
                                  setup=looks_stuck)
    assert getattr(res, "result", None) == "ok", res
    assert any(k == "warning" and "could not check: connection refused" in d["message"]
               for k, d in events), events
