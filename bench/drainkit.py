"""The drain kit (zdd_drain) against the same app served plainly, side by
side in one run: each row is its own sandboxed systemd, zdd-agent swapping
the service under load (socket unit, `inherit`); the two variants differ only
in what the program does on SIGTERM.

  http1  keep-alive HTTP/1.1 under wrk (CLIENTS connections), SWAPS swaps:
         the ASGI demo under uvicorn and under hypercorn, the WSGI demo under
         gunicorn (gthread). Failed requests per swap.
  ws     WS_CLIENTS WebSocket echo clients (one message a second each, the
         demo's /ws; they reconnect after any close) across one swap, under
         uvicorn and hypercorn: closes by code (1006 = abnormal, no close
         frame), time from a close to the client's next connect (to the new
         version), the old instance's drain against the grace period.
  h2     Node's http2 client, H2_CONNECTIONS connections x H2_STREAMS
         concurrent streams, across SWAPS swaps under hypercorn.

"plain" is the stock server with the listeners from systemd and READY=1
(agent/demo/asgi_api.py --plain, gunicorn without the kit's hooks), so that
only the drain differs; "kit" is the same app through zdd_drain's adapter.

    .venv/bin/python bench/drainkit.py [--swaps 5] [--clients 64] [--ws-clients 500]
        [--grace 10] [--only http1,ws,h2] [--json results.json]

Needs root, wrk and node. About 5 minutes at the defaults on a 2-core VM.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.demo.run import RELEASES, DemoHost, swap_many  # noqa: E402
from agent.traffic.http_client import argv as http_argv  # noqa: E402
from agent.traffic.http_client import summary  # noqa: E402

PORT = 8080
CONFIG = """\
name: web
command: {releases}/{{version}}/bin/{program}
listen: ["127.0.0.1:{port}"]
ready:
  type: http
  url: http://127.0.0.1:{{instance_port}}/ready
  period: 1s
  deadline: 30s
drain:
  grace_period: {grace}s
"""
NOTIFY_CONFIG = """\
name: web
command: {releases}/{{version}}/bin/{program}
listen: ["127.0.0.1:{port}"]
ready: {{type: notify, deadline: 30s}}
drain:
  grace_period: {grace}s
"""

# (server, program, flags with the kit, flags without, readiness)
SERVERS = {
    "uvicorn": ("asgi", ("--server", "uvicorn"), ("--server", "uvicorn", "--plain"), "http"),
    "hypercorn": ("asgi", ("--server", "hypercorn"), ("--server", "hypercorn", "--plain"),
                  "http"),
    "gunicorn": ("wsgi", (), ("--plain",), "notify"),
}


def deploy(host: DemoHost, server: str, kit: bool, grace: float,
           extra: tuple[str, ...] = ()) -> None:
    program, with_kit, plain, ready = SERVERS[server]
    for v in ("v1", "v2"):
        host.release(v, *(with_kit if kit else plain), *extra, program=program)
    template = CONFIG if ready == "http" else NOTIFY_CONFIG
    host.configure("web", text=template.format(releases=RELEASES, program=program, port=PORT,
                                               grace=f"{grace:g}"))
    host.zdd("sysctl", "apply", check=True)
    code, r = host.zdd_json("swap", "web", "--version", "v1")
    if code != 0:
        raise RuntimeError(f"first deploy of {server} failed: {r.get('reason')} "
                           f"{r.get('journal')}")


def versions(n: int) -> list[str]:
    return ["v2" if i % 2 == 0 else "v1" for i in range(n)]


def drains(results: list[dict[str, Any]], grace: float) -> dict[str, Any]:
    for r in results:
        if r.get("result") != "ok":
            raise RuntimeError(f"swap failed: {r.get('reason')} {r.get('journal')}")
    secs = [float(r["drain"]["seconds"]) for r in results]
    return {"grace_s": grace, "drain_median_s": round(statistics.median(secs), 2),
            "drain_max_s": round(max(secs), 2),
            "killed_at_grace": sum(1 for r in results if r["drain"]["killed_at_grace"]),
            "cut_at_grace": sum(r["drain"]["connections_at_end"] for r in results
                                if r["drain"]["killed_at_grace"]),
            "old_instance_ended": sorted({x for r in results for x in r["drain"]["exits"]})}


def http1(server: str, kit: bool, swaps: int, clients: int, grace: float) -> dict[str, Any]:
    with DemoHost() as host:
        deploy(host, server, kit, grace)
        load = host.load(clients, swaps * 6 + 10)
        try:
            time.sleep(1.5)
            results = swap_many(host, versions(swaps), pause=1.5, name="web")
            time.sleep(1.0)
        finally:
            res = load.stop(timeout=120)
    return {"test": "http1", "server": server, "variant": "kit" if kit else "plain",
            "swaps": swaps, "clients": clients, "requests": res.requests,
            "failed": res.failed, "failed_per_swap": round(res.failed / swaps, 1),
            "errors": {"connect": res.connect, "read": res.read, "write": res.write,
                       "status": res.status, "timeout": res.timeout}, **drains(results, grace)}


def swaps_under(host: DemoHost, client: list[str], before: float, swaps: list[str],
                pause: float, after: float) -> tuple[str, list[dict[str, Any]]]:
    """Run a load client (argv) in the sandbox's network, swap through
    `swaps`, stop the client (SIGINT: it reports); its output and the swaps'."""
    proc = host.sb.popen(client, net_only=True, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    try:
        time.sleep(before)
        results = swap_many(host, swaps, pause=pause, name="web")
        time.sleep(after)
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"{client[:3]}: {err[-2000:]}")
    return out, results


def ws(server: str, kit: bool, clients: int, grace: float, patient: bool = False
       ) -> dict[str, Any]:
    """`patient`: hypercorn without the kit, its graceful_timeout past the
    grace period (as zdd-agent's demo had it before the kit): it never tells
    its WebSockets to leave, and the agent's kill ends them."""
    ramp = 5.0
    extra = ("--graceful-timeout", f"{grace + 30:g}") if patient else ()
    with DemoHost() as host:
        deploy(host, server, kit, grace, extra)
        client = [sys.executable, "-m", "agent.traffic.ws_client", "--url",
                  f"ws://127.0.0.1:{PORT}", "--clients", str(clients), "--pause", "1.0",
                  "--ramp", str(ramp), "--seconds", str(ramp + 3 + grace + 8)]
        out, results = swaps_under(host, client, ramp + 3, ["v2"], 0, 4)
    echo = json.loads(out.strip().splitlines()[-1])["echo"]
    closes = {int(k): n for k, n in echo["closes"].items()}
    return {"test": "ws", "server": server,
            "variant": "kit" if kit else "plain, graceful_timeout > grace" if patient else "plain",
            "clients": clients, "connects": echo["connects"],
            "connect_failures": echo["connect_failures"], "echoes": echo["echoed"],
            "lost": echo["lost"], "closes": echo["closes"], "abnormal_1006": closes.get(1006, 0),
            "reconnect_ms": echo["reconnect_ms"], **drains(results, grace)}


def h2(kit: bool, swaps: int, connections: int, streams: int, grace: float) -> dict[str, Any]:
    with DemoHost() as host:
        deploy(host, "hypercorn", kit, grace)
        client = http_argv(f"http://127.0.0.1:{PORT}/", "h2", connections, streams,
                           swaps * 6 + 30)
        out, results = swaps_under(host, client, 1.5, versions(swaps), 1.5, 1.0)
    s = summary(out)
    return {"test": "h2", "server": "hypercorn", "variant": "kit" if kit else "plain",
            "swaps": swaps, "connections": connections, "streams": streams,
            "requests": s["sent"], "failed": s["failed"], "errors": s["errors"],
            "refused_retried": s["refused_retried"], "goaways": s["goaways"],
            "failed_per_swap": round(s["failed"] / swaps, 1), **drains(results, grace)}


def table(rows: list[dict[str, Any]]) -> list[str]:
    out = []
    for r in rows:
        head = f"{r['test']:<5} {r['server']:<9} {r['variant']}"
        drain = (f"drain {r['drain_median_s']:.2f}/{r['drain_max_s']:.2f} s (grace "
                 f"{r['grace_s']:g} s) killed {r['killed_at_grace']}, "
                 f"ended {r['old_instance_ended']}")
        if r["test"] == "ws":
            rc = r["reconnect_ms"]
            out.append(f"{head} {r['clients']} clients: 1006 {r['abnormal_1006']}, closes "
                       f"{r['closes']}, reconnect median {rc['median']} p99 {rc['p99']} max "
                       f"{rc['max']} ms, connect failures {r['connect_failures']}, echoes "
                       f"{r['echoes']}, lost {r['lost']}; {drain}")
        else:
            out.append(f"{head} {r['requests']} requests, {r['failed']} failed "
                       f"({r['failed_per_swap']} per swap; {r['errors']}); {drain}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--swaps", type=int, default=5)
    ap.add_argument("--clients", type=int, default=64, help="wrk keep-alive connections")
    ap.add_argument("--ws-clients", type=int, default=500)
    ap.add_argument("--h2-connections", type=int, default=8)
    ap.add_argument("--h2-streams", type=int, default=8)
    ap.add_argument("--grace", type=float, default=10.0, help="drain.grace_period, seconds")
    ap.add_argument("--only", default="http1,ws,h2")
    ap.add_argument("--servers", default="uvicorn,hypercorn,gunicorn", help="for http1")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/drainkit.py boots sandboxed systemds: run it as root", file=sys.stderr)
        return 2
    only = set(args.only.split(","))
    rows: list[dict[str, Any]] = []

    def add(row: dict[str, Any]) -> None:
        rows.append(row)
        print(table([row])[0], flush=True)

    for kit in (False, True):  # without the kit first, then with: one run, same machine
        if "http1" in only:
            for server in args.servers.split(","):
                add(http1(server, kit, args.swaps, args.clients, args.grace))
        if "ws" in only:
            for server in ("uvicorn", "hypercorn"):
                add(ws(server, kit, args.ws_clients, args.grace))
            if not kit:
                add(ws("hypercorn", kit, args.ws_clients, args.grace, patient=True))
        if "h2" in only:
            add(h2(kit, args.swaps, args.h2_connections, args.h2_streams, args.grace))
    rows.sort(key=lambda r: (["http1", "ws", "h2"].index(r["test"]), r["server"], r["variant"]))
    print(f"\n{os.cpu_count()} cores, kernel {os.uname().release}; grace period "
          f"{args.grace:g} s; {args.swaps} swaps (ws: 1)")
    for line in table(rows):
        print(line)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
