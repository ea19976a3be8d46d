"""Cost of the kernel-side drain evidence at scale: CloseWatch (begin, poll,
finish) while a holder closes N idle connections at once, plus one
`listeners.listening` and one `Census.inodes_many`.

    .venv/bin/python bench/closewatch.py [--n 8000] [--poll 0.01]

A holder process accepts N loopback connections and keeps them; this process
opens them (client and server apart: the hard open-files limit is 20,000 per
process). On "close" the holder closes them all (an idle close, as uvicorn
does at SIGTERM); this process polls the CloseWatch every --poll seconds, as a
drain's census loop would, then calls finish(). Prints the times and the
counts (all N should be closed_idle).
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

from agent import listeners  # noqa: E402
from agent.census import Census  # noqa: E402
from agent.closes import CloseWatch  # noqa: E402

HOLDER = r"""
import resource, socket, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
n = int(sys.argv[1])
ls = socket.socket(); ls.bind(("127.0.0.1", 0)); ls.listen(4096)
print(ls.getsockname()[1], flush=True)
held = [ls.accept()[0] for _ in range(n)]
print("ready", flush=True)
sys.stdin.readline()
for s in held:
    s.close()
print("closed", flush=True)
sys.stdin.readline()
"""


def ms(t: float) -> str:
    return f"{t * 1000:.1f} ms"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=8000)
    ap.add_argument("--poll", type=float, default=0.01)
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(args.n)], text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    clients: list[socket.socket] = []
    try:
        assert holder.stdin is not None and holder.stdout is not None
        port = int(holder.stdout.readline())
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(args.n)]
        assert holder.stdout.readline().strip() == "ready"

        t = time.perf_counter()
        found = listeners.listening([port])
        print(f"listening([port]): {ms(time.perf_counter() - t)} ({len(found)} socket)")
        census = Census.for_listen([("127.0.0.1", port)])
        t = time.perf_counter()
        inodes = census.inodes_many({"holder": [holder.pid]})["holder"]
        print(f"Census.inodes_many: {ms(time.perf_counter() - t)} ({len(inodes)} inodes, "
              "with the fd walk)")

        watch = CloseWatch([port], [socket.AF_INET])
        t = time.perf_counter()
        watch.begin(set(inodes))
        print(f"CloseWatch.begin: {ms(time.perf_counter() - t)} (subscribe + baseline dump "
              f"with tcp_info) {watch.note}")

        holder.stdin.write("close\n")
        holder.stdin.flush()
        polls: list[float] = []
        deadline = time.monotonic() + 5
        while len(watch._ended) < len(inodes) and time.monotonic() < deadline:
            time.sleep(args.poll)
            t = time.perf_counter()
            watch.poll()
            polls.append(time.perf_counter() - t)
        print(f"poll: {len(polls)} polls, median {ms(statistics.median(polls))}, "
              f"max {ms(max(polls))}, overruns {watch.overruns}")
        t = time.perf_counter()
        closes = watch.finish()
        print(f"CloseWatch.finish: {ms(time.perf_counter() - t)}: {closes.to_dict()}")
        holder.stdin.write("exit\n")
        holder.stdin.flush()
    finally:
        holder.kill()
        holder.communicate()
        for c in clients:
            c.close()
        os.sched_yield()


if __name__ == "__main__":
    main()
