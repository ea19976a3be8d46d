"""socket: reuseport with tcp_migrate_req on and off, side by side, in one run.

    .venv/bin/python bench/reuseport.py [--swaps 10] [--clients 32]

Each mode gets its own sandboxed systemd with the demo API in reuseport mode
(every instance binds 127.0.0.1:8080 itself with SO_REUSEPORT), wrk load
with and without keep-alive, and the same number of swaps. agent.yaml tells
the agent to leave tcp_migrate_req alone, and the bench sets it. Prints
requests and failures per mode; the shared socket unit (inherit) is the
baseline. Needs root.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.demo.run import DemoHost, swap_many  # noqa: E402


def run(mode: str, migrate: str, swaps: int, clients: int) -> dict[str, object]:
    with DemoHost() as h:
        h.release("v1")
        h.release("v2")
        cfg = h.configure()
        if mode == "reuseport":
            cfg.write_text(cfg.read_text().replace('listen: ["127.0.0.1:8080"]',
                                                   'listen: ["127.0.0.1:8080"]\nsocket: reuseport'))
        agent_yaml = h.sb.path("/etc/zdd-agent/agent.yaml")
        agent_yaml.write_text("sysctl:\n  net.ipv4.tcp_migrate_req: null\n")
        agent_yaml.chmod(0o644)
        h.sb.run(["sh", "-c", f"echo {migrate} > /proc/sys/net/ipv4/tcp_migrate_req"])
        code, r = h.zdd_json("swap", "demo", "--version", "v1")
        assert code == 0, r
        keep = h.load(clients, swaps * 3 + 20)
        fresh = h.load(clients, swaps * 3 + 20, keepalive=False)
        try:
            results = swap_many(h, ["v2", "v1"] * (swaps // 2) + ["v2"] * (swaps % 2), 0.5)
            time.sleep(0.5)
        finally:
            k, f = keep.stop(), fresh.stop()
        ok = sum(1 for x in results if x["result"] == "ok")
        return {"mode": mode, "migrate": migrate, "swaps_ok": ok, "swaps": swaps,
                "requests": k.requests + f.requests, "failed": k.failed + f.failed,
                "failed_keepalive": k.failed, "failed_close": f.failed,
                "p99_ms": max(k.p99_us, f.p99_us) / 1000}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--swaps", type=int, default=10)
    ap.add_argument("--clients", type=int, default=32)
    args = ap.parse_args()
    rows = [run("reuseport", "0", args.swaps, args.clients),
            run("reuseport", "1", args.swaps, args.clients),
            run("inherit", "0", args.swaps, args.clients)]
    print(f"{args.swaps} swaps per mode, wrk {args.clients} keep-alive + {args.clients} "
          "Connection: close clients, loopback, 2-core VM")
    print(f"{'mode':<10} {'tcp_migrate_req':>15} {'swaps ok':>9} {'requests':>9} "
          f"{'failed':>7} {'(keep-alive/close)':>18} {'per 1k swaps':>13} {'p99 ms':>7}")
    for r in rows:
        per_k = 1000 * int(r["failed"]) / max(1, int(r["swaps"]))  # type: ignore[call-overload]
        print(f"{r['mode']:<10} {r['migrate']:>15} {r['swaps_ok']:>9} {r['requests']:>9} "
              f"{r['failed']:>7} {str(r['failed_keepalive']) + '/' + str(r['failed_close']):>18} "
              f"{per_k:>13.0f} {r['p99_ms']:>7.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
