"""gunicorn: replacing a running service with gunicorn's USR2 re-exec
("Upgrading to a new binary on the fly"), under systemd, under wrk load.

    .venv/bin/python bench/gunicorn_usr2.py [--swaps 10] [--clients 32]
        [--workers 2] [--worker-class sync|gthread] [--threads 1] [--gunicorn PATH]
        [--connection keep-alive|close|both] [--no-handover]

The status quo this benchmark measures: the demo API as a WSGI app
(agent/demo/wsgi_api.py) under gunicorn with its default sync workers, bound
to 127.0.0.1:8080 by gunicorn itself, in a systemd unit shaped like the one in
gunicorn's deploy docs (Type=notify, NotifyAccess=main, KillMode=mixed), in a
sandboxed systemd. One replacement is the documented sequence: deploy the
release (here: the version file gunicorn.conf.py reads), USR2 to the master
(it forks and execs a new master, which writes `<pidfile>.2`, inherits the
listening socket and spawns new workers), wait for the new workers to answer,
TERM to the old master (graceful: its workers finish their request, up to
graceful_timeout), wait for it to exit and for the new master to promote
itself (it renames `<pidfile>.2` to `<pidfile>`; until then it ignores USR2).

systemd: gunicorn sends no MAINPID= on re-exec (benoitc/gunicorn#2856, closed
unfixed; #3285 open), so when the old master, the unit's main process, exits,
systemd takes the service for finished and kills what is left of its cgroup:
the new master and its workers. PIDFile= alone does not save it: systemd
reads it when the main process exits, but the old master has just unlinked
it, and the new master renames `.2` over it only up to a second later. The
unit therefore keeps the settings of gunicorn's deploy docs, adds PIDFile=,
and the config adds one gunicorn server hook, `on_exit`, in which the old
master writes the new master's PID into the pid file just before it exits;
systemd then adopts the new master as main process ("New main PID ... belongs
to service"), as its own child (it was reparented to PID 1), so a later
`systemctl stop` is graceful again. (A MAINPID= notification from the old
master also keeps the unit alive, but systemd then flags the new main PID as
"not our child" and `systemctl stop` goes straight to SIGKILL under
KillMode=mixed.) --no-handover runs one replacement without the hook and
prints what systemd did.

Prints requests and failures under load and the seconds each replacement
took (USR2 to new master promoted), and checks after each one that every
answer comes from the new version and that systemd's MainPID is the new
master. Needs root (it boots a sandboxed systemd).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.demo.run import PORT, DemoHost  # noqa: E402

T = TypeVar("T")

UNIT = "gunicorn-demo.service"
CONF_DIR = "/etc/gunicorn-demo"
RUN_DIR = "/run/gunicorn-demo"  # the unit's RuntimeDirectory=
GUNICORN = str(Path(sys.prefix) / "bin" / "gunicorn")

UNIT_TEXT = """\
[Unit]
Description=demo API under gunicorn (USR2 re-exec benchmark)

[Service]
# gunicorn's deploy docs: Type=notify (gunicorn sends READY=1 once it
# listens), NotifyAccess=main, KillMode=mixed (TERM to the master only, KILL
# to what is left after TimeoutStopSec), no --daemon under a process monitor.
# PIDFile=: when the main process exits, systemd reads it and adopts the PID
# in it as the new main process if that one is alive and in the unit.
Type=notify
NotifyAccess=main
PIDFile={run_dir}/gunicorn.pid
RuntimeDirectory=gunicorn-demo
WorkingDirectory={root}
ExecStart={gunicorn} --config {conf_dir}/gunicorn.conf.py agent.demo.wsgi_api:app
ExecReload=/bin/kill -s HUP $MAINPID
KillMode=mixed
TimeoutStopSec=5
PrivateTmp=true
"""

CONF_TEXT = """\
# gunicorn settings of the demo API (bench/gunicorn_usr2.py). USR2 execs a
# fresh master with the same argv and environment; it reads this file, and
# the release file below, again: that is how a new master gets a new release.
from pathlib import Path

bind = ["127.0.0.1:{port}"]
workers = {workers}
worker_class = "{worker_class}"  # sync is the default
threads = {threads}  # gthread only
pidfile = "{run_dir}/gunicorn.pid"  # the new master writes <pidfile>.2
# The default, $HOME/.gunicorn/gunicorn.ctl, is outside the service's own dirs.
control_socket = "{run_dir}/gunicorn.ctl"
# The release this master serves: a deploy writes the file, then sends USR2.
raw_env = ["ZDD_VERSION=" + Path("{conf_dir}/release").read_text().strip()]
"""

HANDOVER_HOOK = """

def on_exit(server):
    # Called by a master on its way out, after its workers are gone and it
    # unlinked its pid file. After a USR2, reexec_pid is the new master: put
    # its PID in the unit's PIDFile=, which systemd reads when the main
    # process exits, or systemd takes the service for finished and kills the
    # rest of the cgroup, new master included.
    if server.reexec_pid and server.cfg.pidfile:
        import os

        tmp = server.cfg.pidfile + ".handover"
        with open(tmp, "w") as f:
            f.write("%d\\n" % server.reexec_pid)
        os.rename(tmp, server.cfg.pidfile)
"""


class ReplaceError(RuntimeError):
    pass


class GunicornUsr2:
    """gunicorn in a systemd unit of a DemoHost's sandbox, replaced with USR2."""

    def __init__(self, host: DemoHost, port: int = PORT, workers: int = 2,
                 handover: bool = True, timeout: float = 60.0, worker_class: str = "sync",
                 threads: int = 1, gunicorn: str = GUNICORN) -> None:
        self.host = host
        self.gunicorn = gunicorn
        self.port = port
        self.workers = workers
        self.worker_class = worker_class
        self.threads = threads
        self.handover = handover
        self.timeout = timeout  # seconds a setup or one replacement may take
        self.pidfile = f"{RUN_DIR}/gunicorn.pid"
        self.phases: list[dict[str, float]] = []  # per replacement, see replace()

    # -- inside the sandbox -------------------------------------------------

    def _systemctl(self, *args: str, check: bool = True) -> str:
        r = self.host.sb.run(["systemctl", *args], check=check, capture=True, timeout=60)
        return r.stdout.strip()

    def _journal(self, lines: int = 25) -> str:
        r = self.host.sb.run(["journalctl", "-u", UNIT, "-n", str(lines), "--no-pager",
                              "-o", "short-monotonic"], check=False, capture=True, timeout=30)
        return r.stdout

    def _read_pid(self, path: str) -> int:
        """The PID in a pid file (0 if absent, empty or not a number)."""
        try:
            return int(self.host.sb.path(path).read_text().strip() or 0)
        except (OSError, ValueError):
            return 0

    def _alive(self, pid: int) -> bool:
        """A process of the sandbox's PID namespace exists and is not a zombie."""
        try:
            stat = self.host.sb.path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")

    def _children(self, pid: int) -> set[int]:
        try:
            text = self.host.sb.path(f"/proc/{pid}/task/{pid}/children").read_text()
        except OSError:
            return set()
        return {int(p) for p in text.split()}

    def _signal(self, sig: str, pid: int) -> None:
        self.host.sb.run(["kill", "-s", sig, str(pid)], timeout=10)

    def get(self) -> dict[str, Any] | None:
        """One GET / from inside the sandbox's netns; None on any failure."""
        try:
            r = self.host.sb.run(["curl", "-sS", "--max-time", "2",
                                  f"http://127.0.0.1:{self.port}/"],
                                 check=False, capture=True, net_only=True, timeout=10)
            return dict(json.loads(r.stdout)) if r.returncode == 0 else None
        except (ValueError, subprocess.TimeoutExpired):
            return None

    def main_pid(self) -> int:
        return int(self._systemctl("show", "-p", "MainPID", "--value", UNIT) or 0)

    def _until(self, what: str, deadline: float, probe: Callable[[], T | None],
               period: float = 0.02) -> T:
        """Poll `probe` until it returns a truthy value; bounded by `deadline`."""
        while True:
            value = probe()
            if value:
                return value
            if time.monotonic() > deadline:
                raise ReplaceError(f"timed out waiting for {what}; journal:\n{self._journal()}")
            time.sleep(period)

    def _workers_answer(self, master: int, version: str, deadline: float) -> set[int]:
        """Wait until `master` has all its workers and each answered a GET
        with `version` (old workers share the listener meanwhile)."""
        seen: set[int] = set()

        def probe() -> set[int] | None:
            if not self._alive(master):
                raise ReplaceError(f"master {master} died; journal:\n{self._journal()}")
            kids = self._children(master)
            answer = self.get()
            if answer is not None and answer.get("pid") in kids:
                if answer.get("version") != version:
                    raise ReplaceError(f"worker {answer['pid']} of master {master} serves "
                                       f"{answer.get('version')}, not {version}")
                seen.add(int(answer["pid"]))
            return kids if len(kids) == self.workers and kids <= seen else None

        return self._until(f"the {self.workers} workers of master {master} to answer "
                           f"{version}", deadline, probe)

    # -- the service --------------------------------------------------------

    def setup(self) -> None:
        sb = self.host.sb
        conf_dir = sb.path(CONF_DIR)
        conf_dir.mkdir(parents=True, exist_ok=True)
        conf_dir.chmod(0o755)
        (conf_dir / "release").write_text("v1\n")
        conf = CONF_TEXT.format(port=self.port, workers=self.workers, run_dir=RUN_DIR,
                                conf_dir=CONF_DIR, worker_class=self.worker_class,
                                threads=self.threads)
        (conf_dir / "gunicorn.conf.py").write_text(conf + (HANDOVER_HOOK if self.handover
                                                           else ""))
        unit = sb.path(f"/etc/systemd/system/{UNIT}")
        unit.write_text(UNIT_TEXT.format(root=ROOT, gunicorn=self.gunicorn, conf_dir=CONF_DIR,
                                         run_dir=RUN_DIR))
        unit.chmod(0o644)
        self._systemctl("daemon-reload")
        self._systemctl("start", UNIT)  # Type=notify: returns once gunicorn listens
        deadline = time.monotonic() + self.timeout
        master = self._until("the pid file", deadline, lambda: self._read_pid(self.pidfile))
        self._workers_answer(master, "v1", deadline)

    def replace(self, version: str) -> float:
        """One USR2 replacement to `version`; seconds from USR2 to the new
        master promoted (old master gone, pid file renamed, MainPID moved)."""
        t0 = time.monotonic()
        deadline = t0 + self.timeout
        old = self._read_pid(self.pidfile)
        if not old or not self._alive(old):
            raise ReplaceError(f"no running master in {self.pidfile}")
        if self.main_pid() != old:
            raise ReplaceError(f"systemd's MainPID {self.main_pid()} is not the master {old}")
        # Deploy the release the new master will read, then re-exec.
        release = self.host.sb.path(f"{CONF_DIR}/release")
        release.write_text(f"{version}\n")
        self._signal("USR2", old)
        new = self._until(f"{self.pidfile}.2", deadline,
                          lambda: self._read_pid(f"{self.pidfile}.2"))
        t_master = time.monotonic()
        self._workers_answer(new, version, deadline)
        t_ready = time.monotonic()
        # Graceful stop of the old master: it closes its copy of the listener
        # (the socket lives on in the new master), TERMs its workers, waits for
        # them up to graceful_timeout, runs on_exit and exits.
        self._signal("TERM", old)
        self._until(f"old master {old} to exit", deadline, lambda: not self._alive(old))
        t_gone = time.monotonic()

        def promoted() -> bool:
            if not self._alive(new):
                state = self._systemctl("show", "-p", "ActiveState,SubState,Result", UNIT,
                                        check=False)
                raise ReplaceError(f"new master {new} died after the old master {old} exited "
                                   f"(unit: {' '.join(state.split())}); journal:\n"
                                   f"{self._journal(40)}")
            return (self._read_pid(self.pidfile) == new
                    and not self.host.sb.path(f"{self.pidfile}.2").exists())

        self._until(f"new master {new} to promote itself", deadline, promoted)
        t_done = time.monotonic()
        main = self.main_pid()
        active = self._systemctl("is-active", UNIT, check=False)
        if main != new or active != "active":
            raise ReplaceError(f"after the replacement systemd has MainPID {main} ({active}), "
                               f"the new master is {new}")
        self.phases.append({"new_master": t_master - t0, "workers_ready": t_ready - t0,
                            "old_gone": t_gone - t_ready, "promoted": t_done - t_gone,
                            "total": t_done - t0})
        return t_done - t0

    def teardown(self) -> None:
        self._systemctl("stop", UNIT, check=False)


# -- the benchmark ---------------------------------------------------------


def run(keepalive: bool, swaps: int, clients: int, workers: int, pause: float,
        worker_class: str = "sync", threads: int = 1,
        gunicorn: str = GUNICORN) -> dict[str, Any]:
    with DemoHost() as host:
        g = GunicornUsr2(host, workers=workers, worker_class=worker_class, threads=threads,
                         gunicorn=gunicorn)
        g.setup()
        first = g.get()
        assert first is not None and first["version"] == "v1", first
        load = host.load(clients, swaps * 10 + 30, keepalive=keepalive)
        times: list[float] = []
        checked: list[str] = []
        try:
            for i in range(swaps):
                time.sleep(pause)
                target = "v2" if i % 2 == 0 else "v1"
                times.append(g.replace(target))
                answers = {a["version"] if a else "no answer" for a in
                           (g.get() for _ in range(5))}
                if answers != {target}:
                    raise ReplaceError(f"after replacement {i + 1} to {target}, "
                                       f"answers: {answers}")
                checked.append(target)
            time.sleep(pause)
        finally:
            res = load.stop()
        final = g.get()
        g.teardown()
    return {"connection": "keep-alive" if keepalive else "close", "swaps": swaps,
            "swaps_ok": len(checked), "serving": final and final["version"],
            "times": times, "phases": g.phases, **res.to_dict()}


def no_handover(gunicorn: str = GUNICORN) -> str:
    """One replacement without the on_exit hook: what systemd does."""
    with DemoHost() as host:
        g = GunicornUsr2(host, handover=False, timeout=20.0, gunicorn=gunicorn)
        g.setup()
        try:
            g.replace("v2")
        except ReplaceError as e:
            out = str(e)
        else:
            out = "replacement succeeded without the hand-over"
        state = g._systemctl("show", "-p", "ActiveState,SubState,Result,MainPID", UNIT,
                             check=False)
        answer = g.get()
    return (f"{out}\nunit now: {' '.join(state.split())}; "
            f"GET / -> {answer if answer else 'no answer'}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--swaps", type=int, default=10)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--worker-class", choices=["sync", "gthread"], default="sync")
    ap.add_argument("--threads", type=int, default=1, help="threads per gthread worker")
    ap.add_argument("--gunicorn", default=GUNICORN, help="the gunicorn script to run")
    ap.add_argument("--pause", type=float, default=0.5,
                    help="seconds between two replacements")
    ap.add_argument("--connection", choices=["keep-alive", "close", "both"],
                    default="keep-alive", help="wrk clients' HTTP connection mode")
    ap.add_argument("--no-handover", action="store_true",
                    help="one replacement without the MAINPID hand-over hook, no load")
    args = ap.parse_args()
    if args.no_handover:
        print(no_handover(args.gunicorn))
        return 0
    modes = {"keep-alive": [True], "close": [False], "both": [True, False]}[args.connection]
    rows = [run(k, args.swaps, args.clients, args.workers, args.pause, args.worker_class,
                args.threads, args.gunicorn) for k in modes]
    version = subprocess.run([args.gunicorn, "--version"], capture_output=True, text=True,
                             timeout=30).stdout.strip()
    threads = f" x {args.threads} threads" if args.worker_class == "gthread" else ""
    print(f"{version} USR2 re-exec under systemd: {args.swaps} replacements per run "
          f"(v2/v1 alternating), {args.workers} {args.worker_class} workers{threads}, "
          f"wrk {args.clients} clients, loopback, sandboxed systemd")
    print(f"{'connection':<11} {'ok':>5} {'requests':>9} {'req/s':>6} {'failed':>7} "
          f"{'(conn/read/write/status/timeout)':>33} {'p99 ms':>7} {'max ms':>7} "
          f"{'serving':>8}")
    for r in rows:
        detail = f"{r['connect']}/{r['read']}/{r['write']}/{r['status']}/{r['timeout']}"
        print(f"{r['connection']:<11} {str(r['swaps_ok']) + '/' + str(r['swaps']):>5} "
              f"{r['requests']:>9} {r['requests'] * 1e6 / max(1, r['duration_us']):>6.0f} "
              f"{r['failed']:>7} {detail:>33} {r['p99_us'] / 1000:>7.1f} "
              f"{r['max_us'] / 1000:>7.1f} {r['serving']:>8}")
    for r in rows:
        times = r["times"]
        print(f"{r['connection']}: replacement seconds "
              f"{' '.join(f'{t:.2f}' for t in times)} (median {statistics.median(times):.2f}, "
              f"max {max(times):.2f})")
        for key in ("new_master", "workers_ready", "old_gone", "promoted"):
            vals = [p[key] for p in r["phases"]]
            print(f"  {key:<14} median {statistics.median(vals):.2f}s max {max(vals):.2f}s")
    return 0 if all(r["failed"] == 0 and r["swaps_ok"] == r["swaps"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
