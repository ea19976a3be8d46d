"""socket: nat end to end: programs that only bind the port they are told
(a stock Node 20 http server, Python's http.server), swapped under wrk load
from loopback (the output hook) and from another network namespace (the
prerouting hook), keep-alive and Connection: close; 0 failed requests."""

from __future__ import annotations

import subprocess
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from agent.demo.load import Load, LoadResult, wrk_argv, write_script
from agent.demo.run import DemoHost

APPS = "/var/lib/zdd-nat"
PORT = 8080

# Node 20's http module as shipped: server.listen(port) (no reusePort, no
# LISTEN_FDS). The drain most Node services have: once SIGTERM came, each
# response says Connection: close (a keep-alive client reconnects, and the
# NAT rules send it to the new instance), and the server closes a moment
# later (server.close() at once would reset the keep-alive connections whose
# next request is on its way: node #60617).
NODE_SERVER = """\
const http = require('http');
const port = Number(process.env.PORT);
let draining = false;
const server = http.createServer((req, res) => {
  if (draining) res.setHeader('Connection', 'close');
  res.setHeader('Content-Type', 'application/json');
  res.end(JSON.stringify({version: process.env.ZDD_VERSION || 'legacy', pid: process.pid}));
});
server.listen(port);
process.on('SIGTERM', () => {
  draining = true;
  setTimeout(() => server.close(() => process.exit(0)), 1000);
});
"""


def node_config(name: str) -> str:
    return textwrap.dedent(f"""\
        name: {name}
        command: /usr/bin/node {APPS}/node/server.js
        socket: nat
        listen: ["{PORT}"]
        environment: {{PORT: "{{instance_port}}"}}
        ready: {{type: http, url: "http://127.0.0.1:{{instance_port}}/", deadline: 20s}}
        drain: {{grace_period: 10s}}
        strategy: {{min_ready: 1s}}
        """)


def python_config(name: str) -> str:
    # python -m http.server: HTTP/1.0, one request per connection, and dies
    # of SIGTERM at once: the agent lets its connections finish first
    return textwrap.dedent(f"""\
        name: {name}
        command: >-
          /usr/bin/python3 -m http.server {{instance_port}}
          --directory {APPS}/static/{{version}}
        socket: nat
        listen: ["{PORT}"]
        ready: {{type: http, url: "http://127.0.0.1:{{instance_port}}/", deadline: 20s}}
        drain: {{grace_period: 10s}}
        strategy: {{min_ready: 1s}}
        """)


def install_apps(host: DemoHost) -> None:
    root = host.sb.path(APPS)
    (root / "node").mkdir(parents=True, exist_ok=True)
    (root / "node" / "server.js").write_text(NODE_SERVER)
    for v in ("v1", "v2"):
        (root / "static" / v).mkdir(parents=True, exist_ok=True)
        (root / "static" / v / "index.html").write_text(f'{{"version": "{v}"}}\n')
    for p in [root, *root.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)


@contextmanager
def client_netns(host: DemoHost, tag: str) -> Iterator[str]:
    """A network namespace the test makes, wired to the sandbox by a veth
    pair: 10.233.0.2 here, 10.233.0.1 in the sandbox. Yields its name."""
    netns = f"zdd-nat-{tag}"

    def run(argv: list[str]) -> None:
        subprocess.run(argv, check=True, capture_output=True, timeout=30)

    run(["ip", "netns", "add", netns])
    try:
        run(["ip", "-n", netns, "link", "set", "lo", "up"])
        run(["ip", "link", "add", "c0", "netns", netns, "type", "veth", "peer", "name", "eth0",
             "netns", str(host.sb.pid)])
        run(["ip", "-n", netns, "addr", "add", "10.233.0.2/24", "dev", "c0"])
        run(["ip", "-n", netns, "link", "set", "c0", "up"])
        host.sb.run(["ip", "addr", "add", "10.233.0.1/24", "dev", "eth0"], net_only=True)
        host.sb.run(["ip", "link", "set", "eth0", "up"], net_only=True)
        yield netns
    finally:
        subprocess.run(["ip", "netns", "del", netns], check=False, capture_output=True)


def remote_load(host: DemoHost, netns: str, clients: int, seconds: float,
                keepalive: bool) -> Load:
    script = write_script(host.sb.root)
    argv = wrk_argv(f"http://10.233.0.1:{PORT}/", clients, seconds, script, keepalive)
    proc = subprocess.Popen(["ip", "netns", "exec", netns, *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    return Load(proc)


# python -m http.server listens with a backlog of 5 (socketserver's
# request_queue_size) and answers HTTP/1.0, one connection per request: 64
# clients overflow its accept queue without any swap (measured: 7 requests
# over wrk's 10 s timeout in 45 s, SYNs dropped and sent again after 1, 3,
# 7 s), so it gets the load it serves without failing; Node gets 64.
CLIENTS = {"node": 32, "python": 8}  # per side: loopback, and the other namespace


def swaps_under_load(host: DemoHost, netns: str, name: str, count: int, keepalive: bool,
                     clients: int) -> tuple[list[dict], LoadResult, LoadResult]:
    local = host.load(clients, seconds=count * 12 + 20, keepalive=keepalive, port=PORT)
    remote = remote_load(host, netns, clients, count * 12 + 20, keepalive)
    time.sleep(0.5)
    results = []
    try:
        for i in range(count):
            time.sleep(0.5)
            code, r = host.zdd_json("swap", name, "--version", "v2" if i % 2 == 0 else "v1")
            results.append({"exit": code, **r})
            if code != 0:
                break
        time.sleep(0.5)
    finally:
        a, b = local.stop(timeout=60), remote.stop(timeout=60)
    return results, a, b


@pytest.mark.parametrize("program", ["node", "python"])
def test_nat_swaps_a_program_that_binds_only_its_port(host: DemoHost, program: str) -> None:
    """20 swaps (10 keep-alive, 10 Connection: close), wrk clients on
    loopback and from another network namespace (32 + 32 for Node, 8 + 8
    for http.server: CLIENTS): 0 failed requests."""
    install_apps(host)
    name = f"nat-{program}"
    host.configure(name=name, text=(node_config if program == "node" else python_config)(name))
    host.zdd("sysctl", "apply", check=True)
    code, first = host.zdd_json("swap", name, "--version", "v1")
    assert code == 0 and first["result"] == "ok", first
    assert any("private port" in e for e in first["evidence"]), first["evidence"]
    rules = host.sb.run(["nft", "-j", "list", "table", "inet", "zdd-agent"], capture=True,
                        net_only=True).stdout
    assert f'"{name}-prerouting"' in rules and f'"{name}-output"' in rules
    tag = f"{program[:2]}{host.sb.pid % 100000}"
    with client_netns(host, tag) as netns:
        done = []
        for keepalive in (True, False):
            swaps, local, remote = swaps_under_load(host, netns, name, 10, keepalive,
                                                    CLIENTS[program])
            done.append((keepalive, swaps, local, remote))
        reached = subprocess.run(["ip", "netns", "exec", netns, "curl", "-s", "--max-time", "5",
                                  f"http://10.233.0.1:{PORT}/"], capture_output=True, text=True,
                                 timeout=30).stdout
    for keepalive, swaps, local, remote in done:
        kind = "keep-alive" if keepalive else "Connection: close"
        print(f"{program} {kind}: {len(swaps)} swaps "
              f"{[s.get('result') for s in swaps]} "
              f"{[round(s.get('seconds') or 0, 2) for s in swaps]} s; loopback "
              f"{local.requests} requests {local.failed} failed (p99 {local.p99_us / 1000:.1f} "
              f"ms); other netns {remote.requests} requests {remote.failed} failed (p99 "
              f"{remote.p99_us / 1000:.1f} ms)")
        assert [s["exit"] for s in swaps] == [0] * 10, [s.get("reason") for s in swaps]
        assert local.failed == 0 and remote.failed == 0, (kind, local, remote)
        assert local.requests > 1000 and remote.requests > 1000, (local, remote)
        assert all(s["result"] == "ok" for s in swaps)
    assert '"version": "v1"' in reached or '"version":"v1"' in reached, reached
    # the rules name the serving instance's port, and nothing else
    code, st = host.zdd_json("status", name)
    serving = [i for i in st[0]["instances"] if i["active"] == "active"]
    assert len(serving) == 1 and serving[0]["version"] == "v1", st
    assert len(st[0]["socket"]["routed"]) == 1, st[0]["socket"]


def test_nat_rules_come_back_at_boot_and_go_with_uninstall(host: DemoHost) -> None:
    """A fresh kernel has no rules: zdd-agent-nat.service (wanted by
    zdd.target, before the instances) writes them from the configs and the
    instances enabled for boot. doctor sees them match; uninstall removes
    the table."""
    install_apps(host)
    host.configure(name="web", text=node_config("web"))
    r = host.zdd("install")
    assert r.returncode == 0, r.stderr
    code, first = host.zdd_json("swap", "web", "--version", "v1")
    assert code == 0, first
    assert host.get(port=PORT)["version"] == "v1"
    host.sb.reboot()
    answered = ""
    for _ in range(300):
        r = host.sb.run(["curl", "-sS", "--max-time", "2", f"http://127.0.0.1:{PORT}/"],
                        capture=True, net_only=True, check=False)
        answered = r.stdout
        if '"version":"v1"' in answered:
            break
        time.sleep(0.1)
    state = host.sb.run(["systemctl", "show", "-p", "ActiveState", "--value",
                         "zdd-agent-nat.service"], capture=True).stdout.strip()
    print(f"after the reboot: zdd-agent-nat.service {state}; GET / -> {answered.strip()}")
    assert '"version":"v1"' in answered, answered
    assert state == "active"
    _code, report = host.zdd_json("doctor")
    nat_rows = [f for f in report["findings"] if f["check"] == "nat"]
    assert nat_rows and all(f["level"] == "ok" for f in nat_rows), nat_rows
    refused = host.zdd("uninstall")  # web is served through the rules
    assert refused.returncode == 2 and "--remove-nat" in refused.stderr, refused
    assert host.sb.run(["nft", "list", "table", "inet", "zdd-agent"], capture=True,
                       net_only=True, check=False).returncode == 0
    r = host.zdd("uninstall", "--remove-nat")
    assert r.returncode == 0, r.stderr
    assert "web no longer reached" in r.stdout, r.stdout
    gone = host.sb.run(["nft", "list", "table", "inet", "zdd-agent"], capture=True,
                       net_only=True, check=False)
    assert gone.returncode != 0
