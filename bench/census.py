"""Census benchmark: one count of an instance's established connections on a
port, by zdd-agent's netlink census, by `ss` as a subprocess, and by psutil.

    .venv/bin/python bench/census.py [--sizes 1000,10000,20000] [--repeat 15]

An instance (a main process and as many forked workers as the connections
need) accepts and keeps N real loopback connections on one shared listener,
then closes it, like an instance that got its drain signal; client processes
open them. Both sides are split across processes because the hard open-files
limit is 20,000 per process here: a worker holds at most PER_PROCESS
connections. Prints the median and best time of each method, how much of a
census poll the kernel's dump alone takes (the same requests, read and
thrown away), and checks that all methods agree on the count.
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
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil  # noqa: E402

from agent.census import Census  # noqa: E402
from agent.netlink import receive  # noqa: E402

# Connections one process of the bench may hold, below the hard open-files
# limit with room for the listener, the pipes and the interpreter's own.
PER_PROCESS = min(10_000, resource.getrlimit(resource.RLIMIT_NOFILE)[1] - 64)

INSTANCE = r"""
import os, resource, socket, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
n, per = int(sys.argv[1]), int(sys.argv[2])
ls = socket.socket(); ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind(("127.0.0.1", 0)); ls.listen(4096)
print(ls.getsockname()[1], flush=True)
workers = []
for i in range(-(-n // per)):
    share = min(per, n - i * per)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        held = [ls.accept()[0] for _ in range(share)]
        ls.close()  # like an instance that got its drain signal
        os.write(w, b"ready\n")
        os.read(0, 1)  # until the parent's stdin closes
        os._exit(0)
    os.close(w)
    workers.append((pid, r))
ls.close()
for pid, r in workers:
    assert os.read(r, 6) == b"ready\n"
print(" ".join(str(pid) for pid, _ in workers), flush=True)
sys.stdin.read()
for pid, _ in workers:
    os.waitpid(pid, 0)
"""

# SO_LINGER 0: the clients end with RST, so no TIME_WAIT socket of one size
# stays in the kernel's table (60 s) to slow down the next size's dumps.
CLIENTS = r"""
import resource, socket, struct, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
port, n = int(sys.argv[1]), int(sys.argv[2])
held = [socket.create_connection(("127.0.0.1", port)) for _ in range(n)]
for c in held:
    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
print("connected", flush=True)
sys.stdin.read()
"""


def timed(fn: Callable[[], object], repeat: int) -> tuple[float, float, float, object]:
    """Median and best wall time, median CPU time of this thread (the kernel's
    dump runs in the recv calls, so it counts), and the last result. On a
    busy machine the wall time also holds the waits for a core; the CPU time
    does not."""
    wall, cpu, result = [], [], None
    for _ in range(repeat):
        t, c = time.perf_counter(), time.thread_time()
        result = fn()
        cpu.append(time.thread_time() - c)
        wall.append(time.perf_counter() - t)
    return statistics.median(wall), min(wall), statistics.median(cpu), result


def kernel_only(census: Census) -> Callable[[], int]:
    """The census's own dump requests, each reply read and thrown away: what
    a poll costs before any Python looks at a message."""
    def dump() -> int:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, 4) as s:
            for request, _reply in census.requests(1 << 1):  # TCP_ESTABLISHED
                s.send(request)
                while True:
                    buf = receive(s, "bench")
                    # a dump ends with NLMSG_DONE (type 3, 20 bytes), the last
                    # message of its buffer
                    if buf[-20:-14] == b"\x14\0\0\0\x03\0":
                        break
        return 0
    return dump


def run(n: int, repeat: int) -> dict[str, tuple[float, float, float, object]]:
    procs: list[subprocess.Popen[str]] = []

    def spawn(code: str, *args: object) -> subprocess.Popen[str]:
        p = subprocess.Popen([sys.executable, "-c", code, *map(str, args)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        procs.append(p)
        return p

    try:
        instance = spawn(INSTANCE, n, PER_PROCESS)
        assert instance.stdout is not None
        port = int(instance.stdout.readline())
        clients = [spawn(CLIENTS, port, min(PER_PROCESS, n - i))
                   for i in range(0, n, PER_PROCESS)]
        for c in clients:
            assert c.stdout is not None and c.stdout.readline().strip() == "connected"
        pids = [instance.pid] + [int(p) for p in instance.stdout.readline().split()]
        listen = [("127.0.0.1", port)]
        census = Census.for_listen(listen)
        both = Census.for_listen(listen, own_sockets=True)  # reuseport, nat: both families

        def by_ss() -> int:
            out = subprocess.run(["ss", "-Htn", "state", "established", f"( sport = :{port} )"],
                                 capture_output=True, text=True, check=True).stdout
            return len(out.splitlines())

        procs_ps = [psutil.Process(p) for p in pids]

        def by_psutil() -> int:
            return sum(1 for p in procs_ps for c in p.net_connections(kind="tcp")
                       if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port)

        def cold() -> int:  # a fresh Census walks /proc/PID/fd
            return Census.for_listen(listen).count(pids)

        census.count(pids)
        both.count(pids)
        results: dict[str, tuple[float, float, float, object]] = {}
        for label, fn, reps in (("cold census", cold, max(3, repeat // 3)),
                                ("census", lambda: census.count(pids), repeat),
                                ("kernel", kernel_only(census), repeat),
                                ("both", lambda: both.count(pids), repeat),
                                ("ss", by_ss, repeat),
                                ("psutil", by_psutil, max(3, repeat // 3))):
            results[label] = timed(fn, reps)
        return results
    finally:
        for p in procs[1:] + procs[:1]:  # the clients first: they reset
            assert p.stdin is not None and p.stdout is not None
            p.stdin.close()
            p.wait()
            p.stdout.close()


def tcp_sockets() -> str:
    """TCP sockets in the kernel, all network namespaces (/proc/slabinfo, root
    only): every dump walks them all, whichever namespace or port they are on."""
    try:
        lines = Path("/proc/slabinfo").read_text().splitlines()
    except OSError:
        return "unknown"
    kinds = ("TCP", "TCPv6", "tw_sock_TCP", "tw_sock_TCPv6", "request_sock_TCP",
             "request_sock_TCPv6")
    return str(sum(int(f[1]) for f in (ln.split() for ln in lines) if f and f[0] in kinds))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1000,10000,20000")
    ap.add_argument("--repeat", type=int, default=15)
    args = ap.parse_args()
    print(f"census benchmark: {os.cpu_count()} cores, kernel {os.uname().release}, "
          f"load {os.getloadavg()[0]:.1f}, median (best) [median CPU] of {args.repeat} runs")
    labels = ("census", "kernel", "both", "ss", "psutil", "cold census")
    heads = ("census (poll)", "its kernel dump", "both families", "ss subprocess", "psutil",
             "first census")
    print(f"{'connections':>11}  " + "  ".join(f"{h:>24}" for h in heads) + "  counts")
    ok = True
    for n in (int(s) for s in args.sizes.split(",")):
        before = tcp_sockets()
        r = run(n, args.repeat)
        cells = [f"{r[k][0] * 1000:.2f} ({r[k][1] * 1000:.2f}) [{r[k][2] * 1000:.2f}]"
                 for k in labels]
        counts = [r[k][3] for k in labels if k != "kernel"]
        agree = len(set(counts)) == 1 and counts[0] == n
        ok &= agree
        print(f"{n:>11}  " + "  ".join(f"{c:>24}" for c in cells) + "  "
              f"{'/'.join(map(str, counts))}{'' if agree else '  MISMATCH'}"
              f"  ({before} TCP sockets before)")
    print("times in ms; census (poll): one count as each poll of a drain runs it; its kernel "
          "dump: the same netlink requests with the replies read and dropped; both families: "
          "the poll of a census that also asks for AF_INET6 (socket: reuseport and nat); "
          "first census: a fresh Census that also walks /proc/PID/fd; [CPU]: of this "
          "process's thread (ss runs in a child: not counted)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
