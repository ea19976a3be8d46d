"""Swaps under real protocol clients: HTTP/2 (httpx over h2c), WebSocket
(websockets) and gRPC unary and server streaming (grpcio), against services
that people would write (hypercorn ASGI, a grpcio server) in a sandboxed
systemd.

Every request and short stream must succeed. The ASGI service drains with
the drain kit (zdd_drain): its WebSockets are closed with 1012 and reconnect
to the new version, none is left for the agent to cut. The gRPC service's
long-lived streams still open at the grace period are cut by the agent, and
the number it reports must be exactly the number the clients saw cut."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

import pytest

from agent.demo.run import RELEASES, DemoHost, swap_many

pytestmark = pytest.mark.e2e

GRACE = 3
ASGI_CONFIG = f"""\
name: web
command: {RELEASES}/{{version}}/bin/asgi
listen: ["127.0.0.1:8080"]
ready:
  type: http
  http_version: "2"
  url: http://127.0.0.1:{{instance_port}}/ready
  period: 1s
  deadline: 30s
drain:
  grace_period: {GRACE}s
"""

GRPC_GRACE = 6  # the demo gRPC service drains for ~2.7 s before grpcio's stop()
GRPC_CONFIG = f"""\
name: rpc
command: {RELEASES}/{{version}}/bin/grpc
listen: ["127.0.0.1:9090"]
socket: reuseport
ready:
  type: grpc
  url: 127.0.0.1:{{instance_port}}
  grpc_service: zdd.demo.Echo
  period: 1s
  deadline: 30s
drain:
  grace_period: {GRPC_GRACE}s
"""


def client(host: DemoHost, module: str, *args: str) -> subprocess.Popen[str]:
    """A load client (a module of agent.traffic) in the sandbox's network namespace."""
    return host.sb.popen([sys.executable, "-m", f"agent.traffic.{module}", *args], net_only=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def report(proc: subprocess.Popen[str], timeout: float = 60) -> dict[str, Any]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return dict(json.loads(out.strip().splitlines()[-1]))


def cut_at_grace(results: list[dict[str, Any]]) -> int:
    """Connections the agent reports it cut (the old instance's, at the kill)."""
    return sum(r["drain"]["connections_at_end"] for r in results
               if r["drain"] and r["drain"]["killed_at_grace"])


def test_http2_http1_and_websockets_across_swaps(host: DemoHost) -> None:
    for v in ("v1", "v2"):
        host.release(v, program="asgi")
    host.configure("web", text=ASGI_CONFIG)
    host.zdd("sysctl", "apply", check=True)
    code, first = host.zdd_json("swap", "web", "--version", "v1")
    assert code == 0, (first["reason"], first["journal"])
    seconds = 45  # 3 swaps of ~8 s each (5 s of them the default bake), with pauses
    h2 = client(host, "http_client", "--url", "http://127.0.0.1:8080/", "--protocol", "h2",
                "--connections", "8", "--streams", "4", "--seconds", str(seconds))
    ws = client(host, "ws_client", "--url", "ws://127.0.0.1:8080", "--clients", "8",
                "--hold", "3", "--seconds", str(seconds))
    wrk = host.load(16, seconds)
    time.sleep(1.5)
    results = swap_many(host, ["v2", "v1", "v2"], pause=1.5, name="web")
    h1 = wrk.stop(timeout=seconds + 30)
    h2r, wsr = report(h2, seconds + 30), report(ws, seconds + 30)
    for r in results:
        assert r["exit"] == 0 and r["result"] == "ok", (r["reason"], r["journal"])
    echo, hold = wsr["echo"], wsr["hold"]
    cut = cut_at_grace(results)
    print(f"h2c: {h2r['sent']} requests, {h2r['failed']} failed {h2r['errors']} "
          f"({h2r['refused_retried']} REFUSED_STREAM retried), versions "
          f"{h2r['versions']}; HTTP/1.1: {h1.requests} requests, {h1.failed} failed; "
          f"WebSocket: {echo['sent']} echoes, {echo['lost']} lost, {echo['connects']} "
          f"connects, closes {echo['closes']}, reconnect {echo['reconnect_ms']} ms; hold: "
          f"{hold['cut']} of 3 cut, {hold['moved']} moved; agent: {cut} "
          f"connections cut at grace in {[r['drain']['seconds'] for r in results]} s")
    assert h2r["failed"] == 0 and h2r["ok"] == h2r["sent"] > 0, h2r
    assert set(h2r["versions"]) == {"v1", "v2"}  # the client followed the swaps
    assert h1.failed == 0 and h1.requests > 0
    # The kit closes every WebSocket of the old instance with 1012 (Service
    # Restart) at the drain signal: each client reconnects, to the new one;
    # none is closed abnormally (1006) and the agent cuts nothing.
    assert cut == 0 and not any(r["drain"]["killed_at_grace"] for r in results)
    assert all(r["drain"]["seconds"] < GRACE for r in results)
    assert echo["abnormal_closes"] == 0 and hold["abnormal_closes"] == 0
    assert echo["closes"] == {"1012": 8 * 3}, echo["closes"]
    assert hold["cut"] == 0 and hold["moved"] == 3 * 3 and hold["closes"] == {"1012": 9}
    assert echo["connect_failures"] == 0 and echo["mismatched"] == 0
    # an echo in flight when its WebSocket was closed is lost (the client knows)
    assert echo["lost"] <= echo["closes"]["1012"]
    assert echo["echoed"] > 0 and set(echo["versions"]) == {"v1", "v2"}
    assert set(hold["versions"]) == {"v1", "v2"}


def test_grpc_unary_and_streams_across_swaps_in_reuseport_mode(host: DemoHost) -> None:
    for v in ("v1", "v2"):
        host.release(v, program="grpc")
    host.configure("rpc", text=GRPC_CONFIG)
    code, first = host.zdd_json("swap", "rpc", "--version", "v1")
    assert code == 0, (first["reason"], first["journal"])
    seconds = 50
    load = client(host, "grpc_client", "--target", "127.0.0.1:9090", "--clients", "8",
                  "--streams", "4", "--hold", "2", "--seconds", str(seconds))
    time.sleep(2)
    results = swap_many(host, ["v2", "v1", "v2"], pause=1.5, name="rpc")
    r = report(load, seconds + 60)
    for s in results:
        assert s["exit"] == 0 and s["result"] == "ok", (s["reason"], s["journal"])
    cut = cut_at_grace(results)
    print("drains:", [s["drain"] for s in results])
    unary, streams, hold = r["unary"], r["streams"], r["hold"]
    print(f"gRPC: {unary['sent']} unary calls, {unary['failed']} failed {unary['codes']}; "
          f"{streams['started']} server streams, {streams['failed']} failed, "
          f"{streams['messages']} messages; hold streams cut {hold['cut']} of 2 "
          f"{hold['codes']}; agent: {cut} connections cut at grace; drains "
          f"{[s['drain']['seconds'] for s in results]} s; p99 {r['p99_ms']} ms; "
          f"tcp {[s['tcp'] for s in results]}")
    assert unary["failed"] == 0 and unary["ok"] == unary["sent"] > 0, unary
    assert streams["failed"] == 0 and streams["completed"] > 0, streams
    assert set(r["versions"]) == {"v1", "v2"}
    # the two long streams outlive the first drain: cut by the agent's kill
    assert hold["cut"] == 2 == cut
    assert all(s["tcp"].get("ListenDrops", 0) == 0 for s in results)
    st = host.zdd_json("status", "rpc")[1]
    assert st[0]["serving"] == "v2" and st[0]["socket"]["mode"] == "reuseport"


