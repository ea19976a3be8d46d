"""Census benchmark: one count of a process's established connections on a
port, by zdd-agent's netlink census, by `ss` as a subprocess, and by psutil.

    .venv/bin/python bench/census.py [--sizes 1000,10000] [--repeat 15]

A holder process accepts and keeps N real loopback connections; this process
opens them (client and server apart: the hard open-files limit is 20,000 per
process). Prints the median and best time of each method and checks that all
three agree on the count.
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil  # noqa: E402

from agent.census import Census  # noqa: E402

HOLDER = r"""
import os, resource, socket, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
n = int(sys.argv[1])
ls = socket.socket(); ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind(("127.0.0.1", 0)); ls.listen(4096)
print(ls.getsockname()[1], flush=True)
held = [ls.accept()[0] for _ in range(n)]
ls.close()  # like an instance that got its drain signal
print("ready", flush=True)
sys.stdin.read()
"""


def timed(fn, repeat: int) -> tuple[list[float], object]:
    times, result = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
    return times, result


def run(n: int, repeat: int) -> dict[str, object]:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(n)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdin is not None
    port = int(holder.stdout.readline())
    clients = []
    for _ in range(n):
        c = socket.socket()
        c.connect(("127.0.0.1", port))
        clients.append(c)
    assert holder.stdout.readline().strip() == "ready"
    census = Census.for_listen([("127.0.0.1", port)])

    def by_ss() -> int:
        out = subprocess.run(["ss", "-Htn", "state", "established", f"( sport = :{port} )"],
                             capture_output=True, text=True, check=True).stdout
        return len(out.splitlines())

    proc = psutil.Process(holder.pid)

    def by_psutil() -> int:
        return sum(1 for c in proc.net_connections(kind="tcp")
                   if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port)

    results: dict[str, object] = {"connections": n}
    # Cold: a fresh Census must walk /proc/PID/fd; warm: what each drain poll costs.
    cold = lambda: Census.for_listen([("127.0.0.1", port)]).count([holder.pid])  # noqa: E731
    for label, fn, reps in (("cold census", cold, max(3, repeat // 3)),
                            ("census", lambda: census.count([holder.pid]), repeat),
                            ("ss", by_ss, repeat),
                            ("psutil", by_psutil, max(3, repeat // 3))):
        times, count = timed(fn, reps)
        results[label] = (statistics.median(times), min(times), count)
    holder.stdin.close()
    holder.wait()
    for c in clients:
        c.close()
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1000,10000")
    ap.add_argument("--repeat", type=int, default=15)
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    print(f"census benchmark: {os.cpu_count()} cores, kernel {os.uname().release}, "
          f"median (best) of {args.repeat} runs")
    labels = ("census", "ss", "psutil", "cold census")
    print(f"{'connections':>11}  {'census (poll)':>17}  {'ss subprocess':>17}  {'psutil':>17}  "
          f"{'first census':>17}  {'census/ss':>9}  counts")
    ok = True
    for n in (int(s) for s in args.sizes.split(",")):
        r = run(n, args.repeat)
        cells, counts = [], []
        for label in labels:
            med, best, count = r[label]  # type: ignore[misc]
            cells.append(f"{med * 1000:8.2f} ({best * 1000:6.2f})")
            counts.append(count)
        ratio = r["census"][0] / r["ss"][0]  # type: ignore[index]
        agree = len(set(counts)) == 1 and counts[0] == n
        ok &= agree
        print(f"{n:>11}  {cells[0]:>17}  {cells[1]:>17}  {cells[2]:>17}  {cells[3]:>17}  "
              f"{ratio:>9.2f}  "
              f"{'/'.join(map(str, counts))}{'' if agree else '  MISMATCH'}")
    print("times in ms; census (poll): one count as each poll of a drain runs it; first census:"
          " a fresh Census that also walks /proc/PID/fd")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
