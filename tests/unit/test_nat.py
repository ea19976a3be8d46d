"""socket: nat: the rules nat.py writes (pure), what the config accepts, and
when the swap routes traffic (the state machine against a fake host)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent import nat, units
from agent.config import Drain, Listen, Ready, ServiceConfig, parse_service
from agent.errors import ConfigError, SwapFailed
from agent.listeners import Waiting
from agent.swap import Swap
from test_swap import FakeClock, FakeHost, Script

# ------------------------------------------------------------------ nat.py


def test_one_port_is_a_redirect_and_several_a_numgen_map() -> None:
    one = nat.rule("api", "output", None, 8080, [41001])
    assert one["expr"][-1] == {"redirect": {"port": 41001}}
    two = nat.rule("api", "prerouting", None, 8080, [41001, 41002])
    target = two["expr"][-1]["redirect"]["port"]["map"]
    assert target["key"] == {"numgen": {"mode": "inc", "mod": 2, "offset": 0}}
    assert target["data"]["set"] == [[0, 41001], [1, 41002]]
    # only traffic for this host, never what it forwards or sends elsewhere
    assert two["expr"][0]["match"]["left"] == {"fib": {"result": "type", "flags": ["daddr"]}}


@pytest.mark.parametrize("host,match,verb", [
    (None, None, "redirect"),  # every address, both families
    ("0.0.0.0", {"meta": {"key": "nfproto"}}, "redirect"),  # IPv4 alone
    ("::", None, "redirect"),
    # a specific address, loopback too, is DNATed to itself: redirect would
    # send local clients of 127.0.0.2 to 127.0.0.1
    ("127.0.0.1", {"payload": {"protocol": "ip", "field": "daddr"}}, "dnat"),
    ("127.0.0.2", {"payload": {"protocol": "ip", "field": "daddr"}}, "dnat"),
    ("::1", {"payload": {"protocol": "ip6", "field": "daddr"}}, "dnat"),
    # IPv4 clients of an IPv4-mapped address send IPv4 packets
    ("::ffff:127.0.0.1", {"payload": {"protocol": "ip", "field": "daddr"}}, "dnat"),
    ("192.0.2.7", {"payload": {"protocol": "ip", "field": "daddr"}}, "dnat"),
    ("2001:db8::7", {"payload": {"protocol": "ip6", "field": "daddr"}}, "dnat"),
])
def test_the_address_decides_match_and_verb(host: str | None, match: dict | None,
                                            verb: str) -> None:
    expr = nat.rule("api", "prerouting", host, 8080, [41001])["expr"]
    lefts = [e["match"]["left"] for e in expr if "match" in e]
    assert lefts[-1] == {"payload": {"protocol": "tcp", "field": "dport"}}
    # the opening SYN only (test_a_connection_older_than_the_rules_...)
    assert lefts[-2] == {"&": [{"payload": {"protocol": "tcp", "field": "flags"}},
                               ["fin", "syn", "rst", "ack"]]}
    if match is None:
        assert len(lefts) == 3  # fib, flags, dport
    else:
        assert lefts[1] == match
    assert verb in expr[-1]
    if verb == "dnat":  # to itself, on the instance's port
        assert expr[-1]["dnat"]["addr"] == (host or "").replace("::ffff:", "")


def test_a_transaction_replaces_the_services_rules_and_nothing_else() -> None:
    route = nat.Route("api", ((None, 8080), ("127.0.0.1", 9090)), (41001,))
    cmds = nat.commands(route)
    assert cmds[0] == {"add": {"table": {"family": "inet", "name": "zdd-agent"}}}
    flushed = [c["flush"]["chain"]["name"] for c in cmds if "flush" in c]
    assert flushed == ["api-prerouting", "api-output"]
    rules = [c["add"]["rule"] for c in cmds if "rule" in c.get("add", {})]
    assert len(rules) == 4  # 2 addresses x 2 hooks
    assert all(r["chain"].startswith("api-") for r in rules)
    # no port: the chains stay, empty (nothing serves)
    empty = nat.commands(dataclasses.replace(route, ports=()))
    assert not [c for c in empty if "rule" in c.get("add", {})]


def test_routed_reads_back_what_commands_wrote() -> None:
    objs: list[dict] = []
    for route in (nat.Route("api", ((None, 8080),), (41001, 41002)),
                  nat.Route("web-2", (("127.0.0.1", 80),), (42000,))):
        for c in nat.commands(route):
            add = c.get("add", {})
            if "chain" in add:
                objs.append({"chain": add["chain"]})
            if "rule" in add:
                objs.append({"rule": add["rule"]})
    got = nat.routed(objs)
    assert got["api"]["ports"] == [41001, 41002] and got["api"]["listen"] == [8080]
    assert got["web-2"]["ports"] == [42000]
    assert sorted(got["web-2"]["chains"]) == ["output", "prerouting"]


def test_removal_deletes_only_the_services_chains() -> None:
    cmds = nat.removal("api")
    deleted = [c["delete"]["chain"]["name"] for c in cmds if "delete" in c]
    assert deleted == ["api-prerouting", "api-output"]
    assert not any("table" in c.get("delete", {}) for c in cmds)


NETNS = os.geteuid() == 0 and os.path.exists("/usr/bin/unshare")


@pytest.mark.skipif(not NETNS, reason="needs root for a network namespace")
def test_the_kernel_takes_the_rules_and_connections_follow_them() -> None:
    """In a network namespace of its own: a connection to the public port
    reaches the routed instance port; after a change, the other one; the
    table reads back as written."""
    script = r'''
import socket, sys
from agent import nat
n = nat.Nft()
assert not nat.support_problems(), nat.support_problems()
srvs = {}
for p in (41001, 41002):
    s = socket.socket(socket.AF_INET6)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", p)); s.listen(); s.settimeout(1); srvs[p] = s
def reached(host, port):
    c = socket.create_connection((host, port), timeout=1)
    got = [p for p, s in srvs.items() if _accepts(s)]
    c.close()
    return got
def _accepts(s):
    s.settimeout(0.2)
    try:
        a, _ = s.accept(); a.close(); return True
    except socket.timeout:
        return False
n.apply(nat.Route("api", ((None, 8080),), (41001,)))
assert reached("127.0.0.1", 8080) == [41001]
assert reached("::1", 8080) == [41001]
n.apply(nat.Route("api", ((None, 8080),), (41002,)))
assert reached("127.0.0.1", 8080) == [41002]
lo2 = socket.socket(); lo2.bind(("127.0.0.2", 41003)); lo2.listen()
n.apply(nat.Route("lo2", (("127.0.0.2", 8082),), (41003,)))
c = socket.create_connection(("127.0.0.2", 8082), timeout=1)
assert _accepts(lo2), "127.0.0.2 must reach the instance bound to 127.0.0.2"
c.close()
# someone else's rule in the agent's chain is not the agent's to count
n.run([{"add": {"rule": {"family": "inet", "table": "zdd-agent", "chain": "api-output",
        "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "tcp",
        "field": "dport"}}, "right": 22}}, {"redirect": {"port": 6000}}]}}}])
assert nat.routed(n.table())["api"]["ports"] == [41002], nat.routed(n.table())
# conntrack: a listener whose accept queue is full drops the next SYNs
# (SYN_SENT, unanswered); forget(unanswered) deletes those and never the
# answered one, whose next packet would be NATed afresh and reset
import time
from pyroute2 import Conntrack
full = socket.socket(); full.bind(("127.0.0.1", 41004)); full.listen(0)
pending = []
for _ in range(4):
    p = socket.socket(); p.setblocking(False); p.connect_ex(("127.0.0.1", 41004))
    pending.append(p)
time.sleep(0.3)
def states(port):
    with Conntrack() as ct:
        return sorted(e.protoinfo.state_name() for e in ct.dump_entries()
                      if getattr(e.tuple_reply, "sport", None) == port)
before = states(41004)
assert "ESTABLISHED" in before and "SYN_SENT" in before, before
nat.forget([41004], unanswered=True)
assert states(41004) == [s for s in before if s != "SYN_SENT"], (before, states(41004))
for p in pending:  # before a SYN is sent again (1 s)
    p.close()
full.close()
# every entry on the instance ports, IPv4 and IPv6, goes in the flush
c6 = socket.create_connection(("::1", 8080), timeout=1)
assert _accepts(srvs[41002])
with Conntrack() as ct:
    assert ct.count() > 0
nat.forget([41001, 41002, 41003, 41004])
with Conntrack() as ct:
    assert ct.count() == 0, ct.count()
c6.close()
assert nat.routed(n.table())["api"]["ports"] == [41002]
n.remove("api")
assert "api" not in nat.routed(n.table())
print("ok")
'''
    out = subprocess.run(["unshare", "-n", "sh", "-c",
                          f'ip link set lo up && exec "{sys.executable}" -c "$0"', script],
                         capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@pytest.mark.skipif(not NETNS, reason="needs root for a network namespace")
def test_a_connection_older_than_the_rules_stays_with_its_server() -> None:
    """A takeover redirects a port that a legacy program serves, in a
    namespace where nothing tracked connections before the agent's table
    (nf_conntrack starts with the first NAT chain). conntrack then picks up
    a running connection at its next packet as if it were new
    (nf_conntrack_tcp_loose); a rule that NATed it would send the rest of
    that connection to a port that never saw its handshake (a reset: a
    failed request, seen in the adopt e2e test). Only a connection's
    opening SYN is NATed."""
    script = r'''
import socket
from agent import nat
legacy = socket.socket(); legacy.bind(("127.0.0.1", 8091)); legacy.listen()
new = socket.socket(); new.bind(("127.0.0.1", 41005)); new.listen()
c = socket.create_connection(("127.0.0.1", 8091), timeout=2)
a, _ = legacy.accept()
c.sendall(b"one"); assert a.recv(3) == b"one"
nat.Nft().apply(nat.Route("api", ((None, 8091),), (41005,)))
c.sendall(b"two")  # its first packet conntrack sees
a.settimeout(2)
assert a.recv(3) == b"two", "the old connection lost its server"
a.sendall(b"ack"); assert c.recv(3) == b"ack"
# a new connection goes where the rule says
c2 = socket.create_connection(("127.0.0.1", 8091), timeout=2)
new.settimeout(2); b, _ = new.accept(); c2.sendall(b"new"); assert b.recv(3) == b"new"
print("ok")
'''
    out = subprocess.run(["unshare", "-n", "sh", "-c",
                          f'ip link set lo up && exec "{sys.executable}" -c "$0"', script],
                         capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


# ------------------------------------------------------------------ config


def load(**over: object) -> ServiceConfig:
    data = {"name": "api", "command": "/usr/bin/node /srv/api/{version}/server.js "
                                      "--port {instance_port}",
            "listen": ["8080"], "socket": "nat", **over}
    return parse_service(Path("/etc/zdd-agent/services/api.yaml"), data)


def test_nat_gives_every_instance_a_port_and_substitutes_it() -> None:
    svc = load(environment={"PORT": "{instance_port}", "NODE_ENV": "production"})
    assert svc.needs_instance_port
    assert svc.argv("v2", 41001)[-1] == "41001"
    files = units.render_service(svc, 4096, nofile=65536).files
    template = files[units.template_unit("api")]
    assert "After=zdd-agent-nat.service" in template
    assert "NODE_ENV=production" in template and "PORT=" not in template
    assert units.socket_unit("api") not in files  # no socket unit holds the port
    dropin = units.render_instance_dropin(svc, "v2", 41001)
    assert '"PORT=41001"' in dropin and '"ZDD_INSTANCE_PORT=41001"' in dropin
    assert '"--port" "41001"' in dropin
    assert units.dropin_port(dropin) == 41001


def test_instance_port_in_the_command_is_substituted_in_every_mode() -> None:
    """A probe port the program opens beside an inherited listener: it got
    the text '{instance_port}' before."""
    svc = load(socket="inherit", command="/opt/venv/bin/hypercorn --bind fd://3 "
                                         "--bind 127.0.0.1:{instance_port} app:app",
               ready={"type": "http", "url": "http://127.0.0.1:{instance_port}/ready"})
    assert svc.needs_instance_port
    assert "127.0.0.1:41001" in units.render_instance_dropin(svc, "v2", 41001)


def test_nat_refuses_every_replica_unavailable_at_once() -> None:
    with pytest.raises(ConfigError, match="socket: nat nothing then listens"):
        load(replicas=2, strategy={"max_unavailable": 2, "max_surge": 0})


def test_nat_refuses_unix_listeners() -> None:
    with pytest.raises(ConfigError, match="cannot serve"):
        load(listen=["unix:/run/api/api.sock"])


# ------------------------------------------------------- the swap's routing


def nat_service(replicas: int = 1, surge: int = 1, unavailable: int = 0) -> ServiceConfig:
    return ServiceConfig(name="api", command=("/x", "{instance_port}"),
                         listen=(Listen(None, 8080),), socket="nat",
                         ready=Ready(type="notify", deadline=10.0),
                         drain=Drain(grace_period=5.0), replicas=replicas,
                         max_surge=surge, max_unavailable=unavailable)


def nat_run(scripts: dict[str, Script], olds: tuple[str, ...], new: str,
            svc: ServiceConfig | None = None) -> tuple[FakeHost, object]:
    clock = FakeClock()
    host = FakeHost(clock, 5.0, scripts, running=olds)
    host.nat = True
    old = olds[0].rsplit("-", 1)[0] if olds and "-" in olds[0] else (olds[0] if olds else None)
    try:
        res: object = Swap(svc or nat_service(), host, clock).run(old, new)
    except SwapFailed as e:
        res = e
    return host, res


def test_one_transaction_moves_new_connections_before_the_drain_signal() -> None:
    host, res = nat_run({"v1": Script(), "v2": Script()}, ("v1",), "v2")
    assert getattr(res, "result", None) == "ok", res
    # never both, never none: v1 -> v2 in one transaction
    assert host.routes == [["v2"]]
    calls = host.calls
    assert calls.index(("route", "v2")) > calls.index(("enable", "v2"))
    assert calls.index(("route", "v2")) < calls.index(("quiesce", "v1")) \
        < calls.index(("stop", "v1"))


def test_a_first_deploy_is_routed_once_admitted() -> None:
    host, res = nat_run({"v1": Script()}, (), "v1")
    assert getattr(res, "result", None) == "ok", res
    assert host.routes == [["v1"]]
    assert host.calls.index(("route", "v1")) > host.calls.index(("enable", "v1"))


def test_an_instance_that_does_not_accept_on_its_port_never_gets_traffic() -> None:
    host, res = nat_run({"v1": Script(), "v2": Script(accepts=False)}, ("v1",), "v2")
    assert isinstance(res, SwapFailed)
    r = res.details["result"]
    assert r.result == "rolled_back" and "private port" in r.reason
    assert all("v2" not in routed for routed in host.routes)
    assert host.routed == ["v1"]


def test_a_new_version_that_dies_after_the_switch_gives_traffic_back() -> None:
    scripts = {"v1": Script(drain_seconds=2.0, drain_connections=[3, 3, 3, 3, 3, 3, 0]),
               "v2": Script(dies_after=1.5)}
    host, res = nat_run(scripts, ("v1",), "v2", dataclasses.replace(nat_service(),
                                                                     min_ready=0.5))
    assert isinstance(res, SwapFailed)
    assert host.routes[0] == ["v2"]
    assert host.routed == ["v1"]  # the old version serves again, the dead one gets nothing


def test_replicas_are_withdrawn_and_added_batch_by_batch_never_empty() -> None:
    olds = ("v1-1", "v1-2", "v1-3")
    news = ("v2-1", "v2-2", "v2-3")
    host, res = nat_run({x: Script(drain_seconds=0.3) for x in olds + news}, olds, "v2",
                        nat_service(replicas=3, surge=1))
    assert getattr(res, "result", None) == "ok", res
    assert all(host.routes) and len(host.routes[-1]) == 3
    assert sorted(host.routes[-1]) == list(news)
    for routed in host.routes:  # never more than replicas + surge, never fewer than replicas
        assert len(routed) == 3


def test_drifted_rules_are_set_right_before_the_swap_and_said() -> None:
    clock = FakeClock()
    host = FakeHost(clock, 5.0, {"v1": Script(), "v2": Script()}, running=("v1",))
    host.nat, host.routed = True, ["v0"]
    res = Swap(nat_service(), host, clock).run("v1", "v2")
    assert res.result == "ok"
    assert host.routes[0] == ["v1"] and host.routed == ["v2"]
    assert any("set right" in w for w in res.warnings)


def test_a_busy_queue_that_shrinks_ends_the_settle_at_once() -> None:
    """A busy server's accept queue is seldom empty (gunicorn's 2 sync
    workers under 32 clients: a settle waiting for 0 took 68 s); one that
    shrinks between two looks is being served."""

    class Busy(FakeHost):
        looks = 0

        def accept_queue(self, instances: list[str]) -> Waiting | None:
            self.looks += 1
            return Waiting(5 if self.looks % 2 else 3)

    clock = FakeClock()
    host = Busy(clock, 5.0, {"v1": Script(), "v2": Script()}, running=("v1",))
    res = Swap(nat_service(), host, clock).run("v1", "v2")
    assert res.result == "ok"
    assert res.seconds < 10, res.seconds


def test_a_steady_queue_whose_connections_are_taken_is_served() -> None:
    """A busy server's queue can hold the same count at every look while it
    takes connections (CI: 6 at five looks, a healthy instance rolled back):
    the content moves, so somebody accepts."""

    class Steady(FakeHost):
        looks = 0

        def accept_queue(self, instances: list[str]) -> Waiting | None:
            if "v1" not in self.stopped:
                return Waiting(0)
            self.looks += 1  # 6 waiting, each taken 6 looks after it came
            return Waiting(6, frozenset(range(self.looks, self.looks + 6)))

    clock = FakeClock()
    host = Steady(clock, 5.0, {"v1": Script(), "v2": Script()}, running=("v1",))
    res = Swap(nat_service(), host, clock).run("v1", "v2")
    assert res.result == "ok", res.reason


def test_a_queue_that_never_shrinks_after_the_drain_brings_the_old_version_back() -> None:
    class Stuck(FakeHost):
        def accept_queue(self, instances: list[str]) -> Waiting | None:
            return Waiting(7, frozenset(range(7))) if "v1" in self.stopped else Waiting(0)

    clock = FakeClock()
    host = Stuck(clock, 5.0, {"v1": Script(), "v2": Script()}, running=("v1",))
    try:
        Swap(nat_service(), host, clock).run("v1", "v2")
    except SwapFailed as e:
        assert "do not accept" in e.details["result"].reason
    else:
        raise AssertionError("a stuck queue passed")


def test_until_quiet_ends_at_zero_or_when_the_count_stops_falling(monkeypatch) -> None:
    from agent import modes

    now = [0.0]
    monkeypatch.setattr(modes.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(modes.time, "sleep", lambda s: now.__setitem__(0, now[0] + s))
    falling = iter([5, 3, 2, 1, 0, 7])
    assert modes.until_quiet(lambda: next(falling), limit=30) == 0
    assert now[0] < 1  # no wait past the zero
    now[0] = 0.0
    assert modes.until_quiet(lambda: 4, limit=30, settle=1.0) == 4  # keep-alive clients stay
    assert 1.0 <= now[0] < 1.0 + modes.QUIET_POLL + 0.01
    now[0] = 0.0
    slow = iter(range(1000, 0, -1))  # always falling: the limit ends it
    assert modes.until_quiet(lambda: next(slow), limit=2.0) > 0
    assert 2.0 <= now[0] < 2.0 + modes.QUIET_POLL + 0.01
