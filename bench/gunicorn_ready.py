"""gunicorn: how long a release that cannot import its app looks "ready" to
systemd before it dies (the measurement behind config.DEFAULT_MIN_READY).

    .venv/bin/python bench/gunicorn_ready.py [--runs 10] [--workers 1,4]
        [--prelude "import matplotlib.pyplot"] [--json out.json]

Stock gunicorn (sync workers, no drain kit) sends READY=1 from its arbiter
before any worker has imported the app (gunicorn/arbiter.py, `sd_notify` in
`start()`; benoitc/gunicorn#2778, #2504). A release whose app raises at import
therefore turns the unit active, then each worker exits 3 (WORKER_BOOT_ERROR)
and the arbiter halts with exit 3. A readiness gate on READY=1 alone admits
it; the bake (strategy.min_ready) has to outlast this interval.

What runs: a sandboxed systemd (agent.sandbox.Sandbox: private mounts, its own
PID and network namespaces), a template unit `gready@N.service` (N = workers)

    Type=notify, NotifyAccess=main, Restart=on-failure, RestartSec=1s,
    StartLimitIntervalSec=0 (so repeated runs do not hit the start limit),
    ExecStart=<this venv>/bin/gunicorn -w N -b 127.0.0.1:8099 --chdir APPDIR app:app

and `app.py` that raises ImportError (after PRELUDE, to show how the app's
own import time adds to the interval). Each run: reset-failed, `systemctl
start` (returns at READY=1), then read systemd's own timestamps with
`systemctl show -p ExecMainStartTimestampMonotonic,ActiveEnterTimestampMonotonic,
ExecMainExitTimestampMonotonic,...` until the main process has exited, then
`systemctl stop`. Reported per worker count: exec -> READY=1 (ActiveEnter minus
ExecMainStart) and READY=1 -> main process exit (ExecMainExit minus
ActiveEnter), min/median/max, in seconds. Needs root.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.sandbox import Sandbox  # noqa: E402

UNIT = """\
[Unit]
Description=stock gunicorn with %i workers, app that cannot import
StartLimitIntervalSec=0

[Service]
Type=notify
NotifyAccess=main
ExecStart={gunicorn} -w %i -b 127.0.0.1:8099 --chdir {app} app:app
Restart=on-failure
RestartSec=1s
"""
APP = '{prelude}\nraise ImportError("gunicorn_ready: this release cannot import its app")\n'
PROPS = ("ExecMainStartTimestampMonotonic", "ActiveEnterTimestampMonotonic",
         "ExecMainExitTimestampMonotonic", "ExecMainCode", "ExecMainStatus", "NRestarts")
RUN_TIMEOUT = 60.0  # seconds a run may take before it counts as "never exited"


def show(sb: Sandbox, unit: str) -> dict[str, str]:
    r = sb.run(["systemctl", "show", unit, *(f"-p{p}" for p in PROPS)], capture=True)
    return dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)


def one_run(sb: Sandbox, unit: str) -> dict[str, Any]:
    before = int(show(sb, unit).get("ExecMainStartTimestampMonotonic") or 0)
    sb.run(["systemctl", "reset-failed", unit], check=False, capture=True)  # may be unloaded
    started = sb.run(["systemctl", "start", unit], check=False, capture=True)
    deadline = time.monotonic() + RUN_TIMEOUT
    try:
        while True:
            p = show(sb, unit)
            start = int(p["ExecMainStartTimestampMonotonic"] or 0)
            active = int(p["ActiveEnterTimestampMonotonic"] or 0)
            exited = int(p["ExecMainExitTimestampMonotonic"] or 0)
            if start > before and exited > start:
                break
            if time.monotonic() > deadline:
                return {"error": f"main process still running {RUN_TIMEOUT:g}s after start"}
            time.sleep(0.02)
    finally:
        sb.run(["systemctl", "stop", unit], check=False)
    how = {"1": "exited", "2": "killed by signal", "3": "dumped core"}.get(p["ExecMainCode"], "?")
    out: dict[str, Any] = {"exit": f"{how} {p['ExecMainStatus']}",
                           "start_returned": started.returncode}
    if active > start:  # READY=1 came before the exit
        out["exec_to_ready"] = (active - start) / 1e6
        out["ready_to_exit"] = (exited - active) / 1e6
    else:  # died before READY=1: a readiness gate on notify would refuse it anyway
        out["exec_to_exit_before_ready"] = (exited - start) / 1e6
    return out


def stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    return {"min": round(min(values), 3), "median": round(statistics.median(values), 3),
            "max": round(max(values), 3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--workers", default="1,4")
    ap.add_argument("--prelude", default="", help="Python run by app.py before it raises, "
                                                  "e.g. 'import matplotlib.pyplot'")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if not 1 <= args.runs <= 200:
        ap.error("--runs: 1..200")
    gunicorn = Path(sys.prefix) / "bin" / "gunicorn"
    if not gunicorn.exists():
        ap.error(f"{gunicorn} not found: run scripts/setup.sh")
    report: dict[str, Any] = {"gunicorn": str(gunicorn), "prelude": args.prelude, "runs": {}}
    with Sandbox() as sb:
        app = sb.root / "app"  # under /srv: visible inside (not /tmp, which is replaced)
        app.mkdir()
        (app / "app.py").write_text(APP.format(prelude=args.prelude))
        unit_dir = sb.path("/run/systemd/system")
        (unit_dir / "gready@.service").write_text(UNIT.format(gunicorn=gunicorn, app=app))
        sb.run(["systemctl", "daemon-reload"])
        for n in (int(w) for w in args.workers.split(",")):
            unit = f"gready@{n}.service"
            runs = []
            for i in range(args.runs):
                r = one_run(sb, unit)
                runs.append(r)
                print(f"workers={n} run {i + 1}: {json.dumps(r)}", flush=True)
            journal = sb.run(["journalctl", "-u", unit, "--no-pager", "-o", "cat", "-n", "40"],
                             check=False, capture=True).stdout.splitlines()
            report["runs"][n] = {
                "journal": journal,  # the last runs' own words: why the arbiter exited
                "exec_to_ready": stats([r["exec_to_ready"] for r in runs
                                        if "exec_to_ready" in r]),
                "ready_to_exit": stats([r["ready_to_exit"] for r in runs
                                        if "ready_to_exit" in r]),
                "died_before_ready": sum(1 for r in runs if "exec_to_exit_before_ready" in r),
                "never_exited": sum(1 for r in runs if "error" in r),
                "exits": sorted({r.get("exit", "?") for r in runs}),
                "all": runs}
    print()
    for n, r in report["runs"].items():
        print(f"workers={n}: READY=1 -> exit {r['ready_to_exit']} s; exec -> READY=1 "
              f"{r['exec_to_ready']} s; died before READY=1: {r['died_before_ready']}; "
              f"exits {r['exits']}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
