"""TCP Fast Open through a swapped service, measured by the kernel.

Two services in one sandbox: `demo` with fast_open, `ctl` without (the
control). TFO clients (sendto with MSG_FASTOPEN) run inside the sandbox's
network namespace and read its TcpExt counters before and after: a SYN
whose data the listener took is TCPFastOpenPassive; a SYN asking for a
cookie is TCPFastOpenCookieReqd (net/ipv4/tcp_fastopen.c)."""

from __future__ import annotations

import json
import sys

from agent.demo.run import DEMO_CONFIG, NOTIFY_READY, RELEASES, DemoHost

# Runs inside the sandbox's network namespace: N HTTP requests, each sent
# with the SYN when the client holds a cookie, and the namespace's counters
# around them (/proc/net is the reading process's namespace).
CLIENT = r"""
import json, socket, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
from agent import tcpstats
KEYS = ("TCPFastOpenPassive", "TCPFastOpenCookieReqd", "TCPFastOpenPassiveFail")
def counters():  # of this process's network namespace
    return tcpstats.read(watched={"TcpExt": KEYS})
before = counters()
answers = []
for _ in range(n):
    c = socket.socket()  # blocking for the connect: with a timeout it would be EINPROGRESS
    c.sendto(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n", socket.MSG_FASTOPEN,
             ("127.0.0.1", port))
    c.settimeout(5)
    data = b""
    while chunk := c.recv(65536):
        data += chunk
    c.close()
    head, _, body = data.partition(b"\r\n\r\n")
    answers.append([head.split(b"\r\n")[0].decode(), json.loads(body)["version"]])
after = counters()
print(json.dumps({"delta": {k: after[k] - before[k] for k in KEYS}, "answers": answers}))
"""


def tfo_clients(host: DemoHost, port: int, n: int) -> dict:
    r = host.sb.run([sys.executable, "-c", CLIENT, str(port), str(n)], capture=True,
                    net_only=True)
    return dict(json.loads(r.stdout))


def sysctl(host: DemoHost) -> str:
    return host.sb.run(["cat", "/proc/sys/net/ipv4/tcp_fastopen"], capture=True,
                       net_only=True).stdout.strip()


def configure(host: DemoHost, name: str, port: int, extra: str = "") -> None:
    host.configure(name=name, port=port, text=DEMO_CONFIG.format(
        name=name, releases=RELEASES, port=port, grace="10s",
        ready=NOTIFY_READY.format(deadline="20s")) + extra)


def swap(host: DemoHost, name: str, version: str) -> dict:
    code, r = host.zdd_json("swap", name, "--version", version)
    assert code == 0 and r["result"] == "ok", r
    return r


def fast_open_finding(host: DemoHost, name: str) -> dict:
    _code, report = host.zdd_json("doctor")
    return {f["subject"]: f for f in report["findings"]
            if f["check"] == "fast-open"}.get(name, {})


def test_tfo_clients_send_their_request_in_the_syn_after_swaps(host: DemoHost) -> None:
    configure(host, "ctl", 8081)
    configure(host, "demo", 8080, "fast_open: 16\n")
    assert sysctl(host) == "1"  # a fresh namespace: client side only
    # the control: deployed and swapped, fast_open not set
    swap(host, "ctl", "v1")
    swap(host, "ctl", "v2")
    assert sysctl(host) == "1"  # a service without fast_open leaves the sysctl alone
    first = swap(host, "demo", "v1")
    # the swap of a fast_open service turns the server bit on, as `sysctl apply` would
    assert sysctl(host) == "3"
    assert any("set net.ipv4.tcp_fastopen = 3 (was 1)" in w for w in first["warnings"]), first
    swap(host, "demo", "v2")
    host.zdd("sysctl", "apply", check=True)
    assert sysctl(host) == "3"

    # the control first: a client never gets a cookie from it, so it caches none
    ctl = tfo_clients(host, 8081, 4)
    on = tfo_clients(host, 8080, 4)
    print(f"\n4 TFO clients each: fast_open 16 {on['delta']}; control {ctl['delta']}")
    assert on["answers"] == [["HTTP/1.1 200 OK", "v2"]] * 4
    assert ctl["answers"] == [["HTTP/1.1 200 OK", "v2"]] * 4
    # the first asks for a cookie; the next three carry their request in the SYN
    assert on["delta"] == {"TCPFastOpenPassive": 3, "TCPFastOpenCookieReqd": 1,
                           "TCPFastOpenPassiveFail": 0}
    # without a queue the kernel counts every cookie request and answers none
    assert ctl["delta"] == {"TCPFastOpenPassive": 0, "TCPFastOpenCookieReqd": 4,
                            "TCPFastOpenPassiveFail": 0}

    finding = fast_open_finding(host, "demo")
    assert finding["level"] == "ok" and finding["cause"] == "TFO queue 16 on 127.0.0.1:8080"
    assert fast_open_finding(host, "ctl") == {}  # off, and the listener agrees
    host_finding = fast_open_finding(host, "host")
    assert host_finding["level"] == "ok", host_finding

    # the queue lost (as after a restart of the socket unit: new sockets have
    # none): doctor says so, and the next swap sets it again
    host.sb.run([sys.executable, "-c", "from agent import fastopen; "
                 "fastopen.ensure([8080], [1], 0)"], capture=True)
    finding = fast_open_finding(host, "demo")
    assert finding["level"] == "warn" and "TFO queue 0, wanted 16" in finding["cause"]
    assert "zdd-agent swap demo --version v2" in finding["fix"]
    # doctor's fix: a swap to the serving version, which changes nothing else
    code, r = host.zdd_json("swap", "demo", "--version", "v2")
    assert code == 0 and r["result"] == "unchanged", r
    again = tfo_clients(host, 8080, 3)
    print(f"after the queue was lost and a swap to the serving version: {again['delta']}")
    # the client holds its cookie now: every request rides in the SYN
    assert again["delta"]["TCPFastOpenPassive"] == 3, again
    assert again["answers"] == [["HTTP/1.1 200 OK", "v2"]] * 3
    assert fast_open_finding(host, "demo")["level"] == "ok"

    # fast_open taken out of the config: the next swap turns the queue off
    # again (the agent marked that it set one), and a swap after that has
    # nothing to undo
    configure(host, "demo", 8080)
    swap(host, "demo", "v1")
    qlens = host.sb.run([sys.executable, "-c", "from agent import fastopen; "
                         "print([x.qlen for x in fastopen.read([8080], [1])])"], capture=True)
    assert qlens.stdout.strip() == "[0]", qlens.stdout
    assert fast_open_finding(host, "demo") == {}
    swap(host, "demo", "v2")
    assert fast_open_finding(host, "demo") == {}
