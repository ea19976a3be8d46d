"""Services that drain with the drain kit (zdd_drain), swapped under load in
a sandboxed systemd: an ASGI app under uvicorn (keep-alive HTTP/1.1 and
WebSockets) and a WSGI app under gunicorn (gthread workers). Every request
must succeed, no WebSocket may close abnormally (1006), and each old
instance must exit 0 on its own, well within the grace period.

(hypercorn with h2c, HTTP/1.1 and WebSockets through the kit:
test_protocols_e2e.py.)"""

from __future__ import annotations

import time

import pytest
from test_protocols_e2e import client, report

from agent.demo.run import RELEASES, DemoHost, swap_many

pytestmark = pytest.mark.e2e

GRACE = 5
SWAPS = ["v2", "v1", "v2"]
CONFIG = f"""\
name: web
command: {RELEASES}/{{version}}/bin/{{program}}
listen: ["127.0.0.1:8080"]
ready:
{{ready}}
drain:
  grace_period: {GRACE}s
"""
HTTP_READY = ("  type: http\n  url: http://127.0.0.1:{instance_port}/ready\n"
              "  period: 1s\n  deadline: 30s")
NOTIFY_READY = "  type: notify\n  deadline: 30s"


def deploy(host: DemoHost, program: str, flags: tuple[str, ...], ready: str) -> None:
    for v in ("v1", "v2"):
        host.release(v, *flags, program=program)
    host.configure("web", text=CONFIG.replace("{program}", program).replace("{ready}", ready))
    host.zdd("sysctl", "apply", check=True)
    code, first = host.zdd_json("swap", "web", "--version", "v1")
    assert code == 0, (first["reason"], first["journal"])


def test_uvicorn_keepalive_and_websockets_across_swaps(host: DemoHost) -> None:
    deploy(host, "asgi", ("--server", "uvicorn"), HTTP_READY)
    seconds = 40  # 3 swaps of ~8 s each (5 s of them the default bake), with pauses
    ws = client(host, "ws_client", "--url", "ws://127.0.0.1:8080", "--clients", "50",
                "--hold", "5", "--pause", "0.1", "--seconds", str(seconds))
    wrk = host.load(32, seconds)
    time.sleep(1.5)
    results = swap_many(host, SWAPS, pause=1.5, name="web")
    h1 = wrk.stop(timeout=seconds + 30)
    wsr = report(ws, seconds + 30)
    echo, hold = wsr["echo"], wsr["hold"]
    drains = [round(r["drain"]["seconds"], 2) for r in results]
    ended = [x for r in results for x in r["drain"]["exits"]]
    print(f"uvicorn + kit: HTTP/1.1 keep-alive {h1.requests} requests, {h1.failed} failed; "
          f"WebSocket {echo['sent']} echoes, {echo['lost']} lost, closes {echo['closes']}, "
          f"reconnect {echo['reconnect_ms']} ms; hold closes {hold['closes']}; drains "
          f"{drains} s (grace {GRACE} s); old instances ended {ended}; "
          f"connections at drain start {[r['drain']['connections_at_start'] for r in results]}")
    for r in results:
        assert r["exit"] == 0 and r["result"] == "ok", (r["reason"], r["journal"])
        assert not r["drain"]["killed_at_grace"] and r["drain"]["seconds"] < GRACE / 2
    assert h1.requests > 1000 and h1.failed == 0, h1
    assert echo["abnormal_closes"] == 0 and hold["abnormal_closes"] == 0
    assert echo["closes"] == {"1012": 50 * len(SWAPS)}, echo["closes"]
    assert hold["moved"] == 5 * len(SWAPS) and hold["cut"] == 0
    assert echo["connect_failures"] == 0 and echo["lost"] <= echo["closes"]["1012"]
    assert set(echo["versions"]) == {"v1", "v2"}
    # each old instance exited 0 by itself (stock uvicorn dies of the SIGTERM
    # it re-raises)
    assert ended == ["exited 0"] * len(SWAPS)


def test_gunicorn_ready_after_its_workers_and_swaps_under_load(host: DemoHost) -> None:
    deploy(host, "wsgi", (), NOTIFY_READY)
    # READY=1 came from the kit, once both workers had said they accept
    # (gunicorn's own, at arbiter boot, is held back)
    status = host.sb.run(["systemctl", "show", "-p", "StatusText", "--value",
                          "zdd-web@v1.service"], capture=True).stdout.strip()
    assert status == "serving with 2 worker(s)"
    seconds = 35
    keep = host.load(32, seconds)
    fresh = host.load(16, seconds, keepalive=False)
    time.sleep(1)
    results = swap_many(host, SWAPS, pause=1.0, name="web")
    k, f = keep.stop(timeout=seconds + 30), fresh.stop(timeout=seconds + 30)
    drains = [round(r["drain"]["seconds"], 2) for r in results]
    ended = [x for r in results for x in r["drain"]["exits"]]
    print(f"gunicorn + kit: keep-alive {k.requests} requests, {k.failed} failed; "
          f"Connection: close {f.requests} requests, {f.failed} failed; drains {drains} s; "
          f"ready after {[r['phases']['ready'] for r in results]} s; ended {ended}")
    for r in results:
        assert r["exit"] == 0 and r["result"] == "ok", (r["reason"], r["journal"])
        assert not r["drain"]["killed_at_grace"]
    assert k.requests > 1000 and k.failed == 0, k
    assert f.requests > 100 and f.failed == 0, f
    # (no exit status to check: systemd 252 keeps none for gunicorn's arbiter,
    # ExecMainPID reads 0 once it stopped, with or without the kit)
