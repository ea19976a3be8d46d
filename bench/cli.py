"""CPU cost of the `zdd-agent` command line on its way to the daemon (issue 16).

    .venv/bin/python bench/cli.py [--runs 15] [--checkout DIR ...] [--json FILE]

Starts a fake daemon on a temporary control socket (ZDD_CONTROL_SOCKET) and
runs the console script (.venv/bin/zdd-agent, the checkout on PYTHONPATH)
against it. For each command it prints the median over --runs of two CPU
times, user+sys, in milliseconds:

- to request: what the CLI process had spent when its request arrived,
  read by the fake daemon from /proc/PID/task/*/schedstat (the first field,
  nanoseconds on a CPU: Documentation/scheduler/sched-stats.rst), the PID
  from SO_PEERCRED: the cost of the path to the daemon;
- whole: the process from fork to exit, the loading of the command line
  and the rendering of the fake reply included (getrusage(RUSAGE_CHILDREN)
  before and after, microseconds).

Each command runs two ways: in .venv as it is (an editable install: its
import finder, a .pth file, costs every Python start in it about 25 ms
here), and as from a regular install (`pip install .`): the same
interpreter and packages through a throwaway venv whose one .pth names
.venv's site-packages. Then the same for commands that never reach the
daemon (--help), the interpreter alone (`python -c pass`: the floor no
change to zdd-agent goes under), and the import of the heavy modules one by
one in a fresh interpreter (time.process_time around the import).

--checkout (repeatable; default: this one) measures other copies of the
code, e.g. one of main made with `git archive main | tar -x -C /tmp/main`,
their runs interleaved with this one's so that a change of the machine's
load touches all alike. Nothing is asserted: figures depend on the machine
and its load. Bytecode: the children run without PYTHONDONTWRITEBYTECODE
and the first run of each command is not counted, so the checkout's .pyc
files exist as they do after `pip install`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CLI = Path(sys.executable).parent / "zdd-agent"

# Commands that go to the daemon; the fake daemon's reply is enough for the
# CLI to render its usual output. The last two go through click before they
# connect (agent/fastpath.py leaves them to it).
DAEMON_COMMANDS = [
    ["status"],
    ["status", "api", "--json"],
    ["history"],
    ["swap", "api", "--version", "v2"],
    ["swap", "api", "--version", "v2", "--json"],
    ["swap", "api", "--version", "v2", "--dry-run"],
    ["rollback", "api"],
    ["host-state"],
    ["sysctl", "check"],
    ["swap", "api", "--version=v2", "--json"],
    ["sysctl", "apply"],
]
LOCAL_COMMANDS = [["--help"], ["swap", "--help"]]
MODULES = ["click", "yaml", "rich.console", "psutil", "pyroute2", "pystemd.systemd1",
           "agent.config", "agent.protocol", "agent.client", "agent.fastpath", "agent.deploy",
           "agent.daemon", "agent.cli"]

SWAP_RESULT = {"service": "api", "from_version": "v1", "to_version": "v2", "result": "ok",
               "reason": "", "seconds": 5.4, "readiness_checks": 1,
               "phases": {"start": 0.02, "ready": 0.13, "bake": 5.0},
               "bake": {"seconds": 5.0}, "drain": None, "warnings": [], "journal": [],
               "watch": {"seconds": 60, "version": "v2", "previous": "v1"}}
RESULTS: dict[str, Any] = {
    "status": [], "history": [], "swap": SWAP_RESULT, "rollback": SWAP_RESULT,
    "host-state": {"drained": False, "reason": "", "changed": False, "endpoint": None},
    "sysctl-check": {"ok": True, "differ": [], "missing": []},
    "sysctl-apply": {"changed": [], "missing": []},
}
PLAN = {"service": "api", "from_version": "v1", "to_version": "v2", "replicas": 1,
        "max_surge": 1, "max_unavailable": 0, "batches": [
            {"stop_first": 0, "start": 1, "drain": 1}]}


def cpu_ns(pid: int) -> int:
    """Nanoseconds on a CPU of all threads of PID, from /proc/PID/task/*/schedstat."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        total += int((task / "schedstat").read_text().split()[0])
    return total


class FakeDaemon:
    """Answers each request on PATH like the daemon would, after reading the
    client's CPU time; keeps those times (ns) in `seen`."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(16)
        self.seen: list[int] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            conn, _ = self.sock.accept()
            with conn, contextlib.suppress(OSError, ValueError, KeyError):  # next one
                cred = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                       struct.calcsize("3i"))
                pid = struct.unpack("3i", cred)[0]
                line = conn.makefile("rb").readline()
                self.seen.append(cpu_ns(pid))
                req = json.loads(line)
                cmd, args = req["cmd"], req["args"]
                result = PLAN if args.get("dry_run") else RESULTS[cmd]
                out = b""
                if cmd in ("swap", "rollback") and not args.get("dry_run"):
                    out += json.dumps({"v": 1, "event": "phase",
                                       "data": {"phase": "start"}}).encode() + b"\n"
                out += json.dumps({"v": 1, "result": result, "exit_code": 0}).encode() + b"\n"
                conn.sendall(out)


class Variant:
    """One way to run the CLI: a checkout, an interpreter, an environment."""

    def __init__(self, label: str, python: str, checkout: Path, control: Path) -> None:
        self.label, self.python = label, python
        self.env = {k: v for k, v in os.environ.items()
                    if k not in ("ZDD_CONFIG_DIR", "ZDD_STATE_DIR", "ZDD_AGENT_CONFIG",
                                 "PYTHONDONTWRITEBYTECODE")}  # explicit paths: in-process
        self.env["ZDD_CONTROL_SOCKET"] = str(control)
        self.env["PYTHONPATH"] = str(checkout)

    def cli(self, args: list[str]) -> list[str]:
        return [self.python, str(CLI), *args]


def regular_install(tmp: Path) -> str:
    """The python of a venv that sees .venv's packages without its .pth files
    (the editable install's finder): a regular install's start-up."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp)], check=True)
    site = next(p for p in sys.path if p.endswith("site-packages") and sys.prefix in p)
    (next(tmp.glob("lib/python*/site-packages")) / "zdd-venv.pth").write_text(site + "\n")
    return str(tmp / "bin" / "python")


def run_once(argv: list[str], env: dict[str, str]) -> float:
    """CPU ms (user+sys) of one child process, fork to exit."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   cwd="/", check=False)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return 1000 * (after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)


def measure(args: list[str] | None, variants: list[Variant], runs: int,
            daemon: FakeDaemon | None) -> list[dict[str, Any]]:
    """Median CPU ms of the CLI with args (None: `python -c pass`) in each
    variant, runs interleaved."""
    argvs = [v.cli(args) if args is not None else [v.python, "-c", "pass"] for v in variants]
    for argv, v in zip(argvs, variants):
        run_once(argv, v.env)  # writes the .pyc files; not counted
    whole: list[list[float]] = [[] for _ in variants]
    to_request: list[list[float]] = [[] for _ in variants]
    for _ in range(runs):
        for i, (argv, v) in enumerate(zip(argvs, variants)):
            n = len(daemon.seen) if daemon else 0
            whole[i].append(run_once(argv, v.env))
            if daemon and len(daemon.seen) > n:
                to_request[i].append(daemon.seen[-1] / 1e6)
    return [{"whole_ms": statistics.median(w),
             "to_request_ms": statistics.median(t) if t else None}
            for w, t in zip(whole, to_request)]


def import_ms(module: str, variants: list[Variant], runs: int) -> list[float]:
    """Median CPU ms of `import module` in a fresh interpreter, per variant."""
    code = (f"import time; t = time.process_time(); import {module}; "
            "print(time.process_time() - t)")
    out: list[list[float]] = [[] for _ in variants]
    for _ in range(runs + 1):  # the first writes the .pyc files; not counted
        for i, v in enumerate(variants):
            # in /: `python -c` imports from its working directory before PYTHONPATH
            r = subprocess.run([v.python, "-c", code], env=v.env, capture_output=True,
                               cwd="/", text=True, check=False)
            out[i].append(1000 * float(r.stdout) if r.returncode == 0 else float("nan"))
    return [statistics.median(ms[1:]) for ms in out]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--checkout", type=Path, action="append",
                    help="A copy of the code to measure (repeatable; default: this one).")
    ap.add_argument("--json", type=Path, help="Also write the figures here.")
    a = ap.parse_args()
    checkouts = [c.resolve() for c in a.checkout or [ROOT]]
    with tempfile.TemporaryDirectory() as tmp:
        control = Path(tmp) / "control.sock"
        daemon = FakeDaemon(control)
        regular = regular_install(Path(tmp) / "venv")
        variants = [Variant(f"{c} ({layout})", python, c, control)
                    for layout, python in (("editable .venv", sys.executable),
                                           ("regular install", regular))
                    for c in checkouts]
        rows = [(" ".join(c), measure(c, variants, a.runs, daemon)) for c in DAEMON_COMMANDS]
        rows += [(" ".join(c), measure(c, variants, a.runs, None)) for c in LOCAL_COMMANDS]
        rows.append(("(python -c pass)", measure(None, variants, a.runs, None)))
        imports = {m: import_ms(m, variants, a.runs) for m in MODULES}
    print(f"CPU ms (user+sys), median of {a.runs} runs; python {sys.version.split()[0]}")
    for i, v in enumerate(variants):
        print(f"  [{i}] {v.label}")
    print(" ".join(f"{f'to req [{i}]':>11} {f'whole [{i}]':>9}" for i in range(len(variants)))
          + "  zdd-agent ...")
    for name, per in rows:
        cells = []
        for r in per:
            to_req = "-" if r["to_request_ms"] is None else f"{r['to_request_ms']:.0f}"
            cells.append(f"{to_req:>11} {r['whole_ms']:>9.0f}")
        print(" ".join(cells) + f"  {name}")
    print("\nimport alone (with what it imports), CPU ms, median:")
    for m, per_ms in imports.items():
        print(" ".join(f"{ms:>9.0f}" for ms in per_ms) + f"  {m}")
    if a.json:
        a.json.write_text(json.dumps({
            "runs": a.runs, "variants": [v.label for v in variants],
            "commands": [{"args": name, "per_variant": per} for name, per in rows],
            "imports": imports}, indent=2))


if __name__ == "__main__":
    main()
