"""`zdd-agent verify`: does this service swap with zero failed requests?

Boots a throwaway sandbox (a private systemd, network namespace and /run;
sandbox.py), deploys the operator's own service from their config there,
drives real load at its first listen address with the client for its
protocol (agent/traffic), swaps between the two versions N times, and
reports the evidence: requests sent and failed, the kernel's reset and drop
counters over the swaps, p50/p99 latency in steady state and during swaps,
each swap's and drain's duration and the slowest phase. The verdict fails
when any request failed or any swap did not succeed.

Load runs STEADY seconds before the first swap and TAIL seconds after the
last, so steady state is measured in the same run as the swaps."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import ServiceConfig, check_version, parse_service, read_yaml
from .errors import ConfigError, ZddError
from .traffic.series import Series

PROTOCOLS = ("http1", "h2", "grpc", "ws")
STEADY = 3.0  # seconds of load before the first swap
PAUSE = 1.0  # seconds between two swaps
TAIL = 2.0  # seconds of load after the last swap
PRIVATE_DIRS = ("/tmp/", "/var/tmp/", "/run/")  # fresh tmpfs in the sandbox


class VerifyError(ZddError):
    pass


@dataclass
class Options:
    config: Path
    from_version: str
    to_version: str
    swaps: int = 4
    clients: int = 32
    duration: float | None = None  # None: as long as the swaps take
    protocol: str = "http1"
    path: str | None = None  # http: "/", ws: "/ws"
    plot: Path | None = None


def check(opts: Options) -> ServiceConfig:
    """Everything that can be refused before a sandbox boots."""
    if opts.protocol not in PROTOCOLS:
        raise ConfigError(f"--protocol {opts.protocol!r} is not one of {', '.join(PROTOCOLS)}")
    if not 1 <= opts.swaps <= 1000:
        raise ConfigError(f"--swaps {opts.swaps} is out of range (allowed: 1..1000)")
    if not 1 <= opts.clients <= 2000:
        raise ConfigError(f"--clients {opts.clients} is out of range (allowed: 1..2000)")
    if opts.duration is not None and not 5 <= opts.duration <= 86400:
        raise ConfigError(f"--duration {opts.duration} is out of range (allowed: 5..86400)")
    if opts.path is not None and not (opts.path.startswith("/") and opts.path.isprintable()
                                      and " " not in opts.path):
        raise ConfigError(f"--path {opts.path!r} must start with / and have no spaces")
    for v in (opts.from_version, opts.to_version):
        check_version(v)
    if opts.from_version == opts.to_version:
        raise ConfigError("--from and --to are the same version: nothing to swap")
    svc = parse_service(opts.config, read_yaml(opts.config))
    for v in (opts.from_version, opts.to_version):
        exe = svc.argv(v)[0]
        if any(exe.startswith(d) for d in PRIVATE_DIRS):
            raise ConfigError(f"{opts.config}: command: {exe} is under "
                              f"{next(d for d in PRIVATE_DIRS if exe.startswith(d))}, which "
                              "the sandbox replaces with its own: keep releases elsewhere")
    from .deploy import preflight

    for v in (opts.from_version, opts.to_version):
        preflight(svc, v)
    if opts.protocol in ("http1", "h2") and not (shutil.which("node")
                                                 or shutil.which("nodejs")):
        raise VerifyError("the HTTP load client runs on Node.js: apt-get install nodejs")
    if os.geteuid() != 0:
        raise VerifyError("verify boots a throwaway systemd sandbox: run it as root")
    return svc


def client_argv(opts: Options, svc: ServiceConfig, seconds: float) -> list[str]:
    lst = svc.listen[0]
    host = lst.host if lst.host and lst.host not in ("0.0.0.0", "::") else "127.0.0.1"
    addr = f"[{host}]:{lst.port}" if ":" in host else f"{host}:{lst.port}"
    py = [sys.executable, "-m"]
    n = str(opts.clients)
    if opts.protocol in ("http1", "h2"):
        h2 = opts.protocol == "h2"
        conns = str(max(1, opts.clients // 4)) if h2 else n
        return [*py, "agent.traffic.http_client", "--url", f"http://{addr}{opts.path or '/'}",
                "--protocol", opts.protocol, "--connections", conns,
                "--streams", "4" if h2 else "1", "--seconds", f"{seconds:g}"]
    if opts.protocol == "grpc":
        return [*py, "agent.traffic.grpc_client", "--target", addr, "--clients", n,
                "--health", svc.ready.grpc_service, "--seconds", f"{seconds:g}"]
    return [*py, "agent.traffic.ws_client", "--url", f"ws://{addr}", "--path",
            opts.path or "/ws", "--clients", n, "--seconds", f"{seconds:g}"]


def client_outcome(protocol: str, d: dict[str, Any]) -> dict[str, Any]:
    """Sent, failed and the series, whatever the client."""
    if protocol in ("http1", "h2"):
        return {"sent": d["sent"], "failed": d["failed"], "errors": d["errors"],
                "series": Series.from_dict(d["series"])}
    if protocol == "grpc":
        u = d["unary"]
        return {"sent": u["sent"], "failed": u["failed"], "errors": u["codes"],
                "series": Series.from_dict(d["series"])}
    e = d["echo"]
    errors = {f"close {code}": n for code, n in e["closes"].items() if code != "1000"}
    if e["connect_failures"]:
        errors["connect failed"] = e["connect_failures"]
    # a WebSocket message is sent and echoed; lost ones and abnormal closes fail
    return {"sent": e["sent"], "failed": e["lost"] + e["abnormal_closes"]
            + e["connect_failures"], "errors": errors,
            "series": Series.from_dict(e["series"])}


def summarize(opts: Options, svc: ServiceConfig, load: dict[str, Any],
              swaps: list[dict[str, Any]], started: float) -> dict[str, Any]:
    """The verdict and its evidence (pure: tested without a sandbox)."""
    series: Series = load["series"]
    windows = [(float(r["started_at"]), float(r["started_at"]) + float(r["seconds"]))
               for r in swaps if r.get("started_at")]
    steady, during = series.steady_and_during(windows, started)
    tcp: dict[str, int] = {}
    for r in swaps:
        for k, v in (r.get("tcp") or {}).items():
            tcp[k] = tcp.get(k, 0) + int(v)
    slowest = max(((p, s, i + 1) for i, r in enumerate(swaps)
                   for p, s in (r.get("phases") or {}).items()),
                  key=lambda x: x[1], default=None)
    rows = []
    for i, r in enumerate(swaps):
        drain = r.get("drain") or {}
        rows.append({"n": i + 1, "from": r.get("from_version"), "to": r.get("to_version"),
                     "result": r.get("result"), "reason": r.get("reason", ""),
                     "seconds": round(float(r.get("seconds") or 0), 3),
                     "drain_seconds": round(float(drain.get("seconds") or 0), 3),
                     "connections_drained": drain.get("connections_drained", 0),
                     "cut_at_grace": drain.get("connections_at_end", 0)
                     if drain.get("killed_at_grace") else 0,
                     "phases": {k: round(v, 3) for k, v in (r.get("phases") or {}).items()},
                     "tcp": r.get("tcp") or {}})
    reasons = []
    if load["failed"]:
        reasons.append(f"{load['failed']} of {load['sent']} requests failed "
                       f"({', '.join(f'{k}: {v}' for k, v in load['errors'].items())})")
    bad = [row for row in rows if row["result"] != "ok"]
    if bad:
        reasons.append(f"{len(bad)} of {len(rows)} swaps did not succeed: "
                       + "; ".join(f"swap {b['n']} {b['result']}: {b['reason']}" for b in bad))
    if len(rows) < opts.swaps:
        reasons.append(f"only {len(rows)} of {opts.swaps} swaps ran")
    if load["sent"] == 0:
        reasons.append("no request was sent: is the service listening where its config says?")
    cut = sum(row["cut_at_grace"] for row in rows)
    if cut:
        reasons.append(f"{cut} connections were still open at the grace period and cut")
    return {
        "service": svc.name, "protocol": opts.protocol, "clients": opts.clients,
        "from_version": opts.from_version, "to_version": opts.to_version,
        "verdict": "fail" if reasons else "pass", "reasons": reasons,
        "requests": {"sent": load["sent"], "failed": load["failed"], "errors": load["errors"]},
        "tcp": tcp,
        "latency_ms": {
            "steady": {"p50": round(series.percentile(50, steady), 2),
                       "p99": round(series.percentile(99, steady), 2)},
            "during_swaps": {"p50": round(series.percentile(50, during), 2),
                             "p99": round(series.percentile(99, during), 2)}},
        "swaps": rows,
        "slowest_phase": ({"phase": slowest[0], "seconds": round(slowest[1], 3),
                           "swap": slowest[2]} if slowest else None),
    }


class _Lines(threading.Thread):
    """Collects a process's JSON lines as they come (the watch never ends by
    itself before the sandbox does)."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        super().__init__(daemon=True)
        self.proc = proc
        self.lines: list[dict[str, Any]] = []
        self.start()

    def run(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.lines.append(json.loads(line))
            except ValueError:
                continue


def run(opts: Options, say: Callable[[str], None]) -> dict[str, Any]:
    svc = check(opts)
    from .demo.run import DemoHost

    budget = opts.duration or (STEADY + TAIL + opts.swaps * (
        PAUSE + svc.ready.deadline + svc.drain.pre_stop_delay + svc.drain.grace_period + 10))
    say(f"verify {svc.name}: {opts.protocol} load from {opts.clients} clients, {opts.swaps} "
        f"swaps between {opts.from_version} and {opts.to_version}; booting a sandbox ...")
    with DemoHost() as host:
        host.configure(svc.name, text=opts.config.read_text())
        host.zdd("sysctl", "apply", check=True)
        code, first = host.zdd_json("swap", svc.name, "--version", opts.from_version)
        if code != 0:
            raise VerifyError(f"the first deploy of {opts.from_version} failed: "
                              f"{first.get('reason')} {' | '.join(first.get('journal') or [])}")
        say(f"deployed {opts.from_version} in the sandbox ({first['seconds']:.2f}s)")
        watcher = host.sb.popen([*host.agent, "watch", svc.name, "--interval", "0.1",
                                 "--seconds", f"{budget + 30:g}"],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        watch = _Lines(watcher)
        started = time.time()
        client = host.sb.popen(client_argv(opts, svc, budget), net_only=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        swaps: list[dict[str, Any]] = []
        try:
            time.sleep(STEADY)
            for i in range(opts.swaps):
                if opts.duration and time.time() - started > opts.duration - TAIL:
                    say(f"--duration {opts.duration:g}s is up after {i} swaps")
                    break
                target = opts.to_version if i % 2 == 0 else opts.from_version
                code, r = host.zdd_json("swap", svc.name, "--version", target)
                swaps.append(r)
                drain = r.get("drain") or {}
                seconds, drained = float(r.get("seconds") or 0), float(drain.get("seconds") or 0)
                say(f"  swap {i + 1}/{opts.swaps}: -> {target} {r.get('result')} in "
                    f"{seconds:.2f}s (drain {drained:.2f}s, "
                    f"{drain.get('connections_drained', 0)} connections)")
                time.sleep(PAUSE)
            time.sleep(max(0.0, TAIL - PAUSE))
        finally:
            client.send_signal(signal.SIGINT)
            out, err = client.communicate(timeout=60)
            watcher.kill()
        if client.returncode != 0:
            raise VerifyError(f"the load client failed: {err[-1500:]}")
        load = client_outcome(opts.protocol, json.loads(out.strip().splitlines()[-1]))
    report = summarize(opts, svc, load, swaps, started)
    if opts.plot is not None:
        from . import plot

        plot.write(opts.plot, load["series"], watch.lines, swaps,
                   f"zdd-agent verify {svc.name}: {opts.protocol}, {opts.clients} clients, "
                   f"{len(swaps)} swaps")
        report["plot"] = str(opts.plot)
    return report


def render(r: dict[str, Any]) -> list[str]:
    lat = r["latency_ms"]
    req = r["requests"]
    lines = [f"{r['verdict'].upper()}: {r['service']} ({r['protocol']}, {r['clients']} clients)"]
    lines += [f"  - {reason}" for reason in r["reasons"]]
    lines.append(f"requests: {req['sent']} sent, {req['failed']} failed"
                 + (f" ({', '.join(f'{k}: {v}' for k, v in req['errors'].items())})"
                    if req["errors"] else ""))
    lines.append(f"latency: steady p50 {lat['steady']['p50']} ms, p99 {lat['steady']['p99']} "
                 f"ms; during swaps p50 {lat['during_swaps']['p50']} ms, p99 "
                 f"{lat['during_swaps']['p99']} ms")
    tcp = ", ".join(f"{k} +{v}" for k, v in sorted(r["tcp"].items()) if v) or "no change"
    lines.append(f"kernel counters over the swaps: {tcp}")
    for s in r["swaps"]:
        cut = f", {s['cut_at_grace']} cut at grace" if s["cut_at_grace"] else ""
        lines.append(f"  swap {s['n']}: {s['from']} -> {s['to']} {s['result']} in "
                     f"{s['seconds']:.2f}s; drain {s['drain_seconds']:.2f}s, "
                     f"{s['connections_drained']} connections{cut}")
    if r["slowest_phase"]:
        p = r["slowest_phase"]
        lines.append(f"slowest phase: {p['phase']} {p['seconds']:.2f}s (swap {p['swap']})")
    if r.get("plot"):
        lines.append(f"plot: {r['plot']}")
    return lines
