"""`zdd-agent verify`: does this service swap with zero failed requests?

Boots a throwaway sandbox (a private systemd, network namespace and /run;
sandbox.py), deploys the operator's own service from their config there,
drives real load at its first listen address with the client for its
protocol (agent/traffic), swaps between the two versions N times, and
reports the evidence: requests sent and failed, the kernel's reset and drop
counters over the swaps, p50/p99 latency in steady state and during swaps,
each swap's and drain's duration and the slowest phase. The verdict fails
on evidence: a request failed, a swap did not succeed, a connection was cut at
the grace period, the service stalled during swaps (p99 beyond
--max-p99-ratio times steady p99 and P99_SLACK_MS above it), or, where the
service says which version it is (--version-header, --version-path), a
version other than the one swapped to answered after a swap. Old instances
that closed idle keep-alive connections after the drain signal are a warning.

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
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import ServiceConfig, check_version, parse_service, read_yaml
from .errors import ConfigError, ZddError
from .origin import module_root
from .traffic.series import Series

if TYPE_CHECKING:
    from .sandbox import Sandbox

PROTOCOLS = ("http1", "h2", "grpc", "ws")
STEADY = 3.0  # seconds of load before the first swap
PAUSE = 1.0  # seconds between two swaps
TAIL = 2.0  # seconds of load after the last swap
PRIVATE_DIRS = ("/tmp/", "/var/tmp/", "/run/")  # fresh tmpfs in the sandbox
# The stall rule: p99 during swaps over steady p99. docs/benchmarks.md (one
# run of bench/suite.py, 64 keep-alive clients) has the hand-made floors at
# 1.63 (two SO_REUSEPORT instances by hand), 1.98 (systemctl restart) and
# 4.77 (by hand with tcp_migrate_req=1), zdd-agent itself at 1.16 (inherit)
# and 1.55 (reuseport): 5 is 3x the agent's worst and above every hand-made
# row, so only a real stall (requests waiting on a swap) fails.
DEFAULT_MAX_P99_RATIO = 5.0
# ... and only when p99 during swaps is also this far above steady: with a
# steady p99 of 2 ms a ratio of 5 is 10 ms, noise on a shared machine, not a
# stall anyone would see.
P99_SLACK_MS = 50.0
VERSION_ASKS = 3  # requests after each swap asking which version answers
HEADER_RE = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,64}")  # an HTTP field name (RFC 9110)
IDLE_FIX = "answer the next request with Connection: close, as the drain kit does"


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
    max_p99_ratio: float = DEFAULT_MAX_P99_RATIO
    version_header: str | None = None  # a response header that carries the version
    version_path: str | None = None  # a GET whose body says the version

    @property
    def asks_version(self) -> bool:
        return self.version_header is not None or self.version_path is not None


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
    for flag, p in (("--path", opts.path), ("--version-path", opts.version_path)):
        if p is not None and not (p.startswith("/") and p.isprintable() and " " not in p):
            raise ConfigError(f"{flag} {p!r} must start with / and have no spaces")
    if not 1 <= opts.max_p99_ratio <= 1000:
        raise ConfigError(f"--max-p99-ratio {opts.max_p99_ratio:g} is out of range "
                          "(allowed: 1..1000)")
    if opts.version_header is not None and not HEADER_RE.fullmatch(opts.version_header):
        raise ConfigError(f"--version-header {opts.version_header!r} is not a header name "
                          "(allowed: letters, digits and -, e.g. X-Version)")
    if opts.version_header is not None and opts.version_path is not None:
        raise ConfigError("--version-header and --version-path: give one (the header is "
                          "read from a GET of --path)")
    if opts.asks_version and opts.protocol == "grpc":
        raise ConfigError("--version-header and --version-path ask over HTTP/1.1 or h2c, not "
                          "--protocol grpc")
    for v in (opts.from_version, opts.to_version):
        check_version(v)
    if opts.from_version == opts.to_version:
        raise ConfigError("--from and --to are the same version: nothing to swap")
    svc = parse_service(opts.config, read_yaml(opts.config))
    if not svc.ports:
        # the load clients (Node's http, websockets, grpcio) dial host:port
        raise ConfigError(f"{opts.config}: listen: verify drives its load at a TCP address, "
                          f"and {', '.join(str(lst) for lst in svc.listen)} has none "
                          "(allowed: add a host:port listener beside the unix: one, e.g. "
                          "127.0.0.1:8080, to verify through it)",
                          file=str(opts.config), key="listen")
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


def first_address(svc: ServiceConfig) -> str:
    """host:port of the first TCP listen address, as a client in the sandbox
    reaches it (check() refused a service without one)."""
    lst = next(x for x in svc.listen if not x.unix)
    host = lst.host if lst.host and lst.host not in ("0.0.0.0", "::") else "127.0.0.1"
    return f"[{host}]:{lst.port}" if ":" in host else f"{host}:{lst.port}"


def client_argv(opts: Options, svc: ServiceConfig, seconds: float) -> list[str]:
    addr = first_address(svc)
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


def version_argv(opts: Options, svc: ServiceConfig) -> list[str]:
    """curl (in the sandbox's network namespace) asking, through the first listen
    address, which version answers: headers and body on stdout (-i)."""
    argv = ["curl", "-sS", "-i", "--max-time", "3", "-H", "Connection: close"]
    if opts.protocol == "h2":
        argv.append("--http2-prior-knowledge")
    return [*argv, f"http://{first_address(svc)}{opts.version_path or opts.path or '/'}"]


def parse_response(raw: str) -> tuple[int | None, dict[str, str], str]:
    """Status, headers (lower-case names) and body of `curl -i` output."""
    head, _, body = raw.replace("\r\n", "\n").partition("\n\n")
    lines = head.split("\n")
    first = lines[0].split()
    status = int(first[1]) if len(first) > 1 and first[0].startswith("HTTP/") and \
        first[1].isdigit() else None
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return status, headers, body


def version_in_body(body: str, versions: tuple[str, ...]) -> str | None:
    """A JSON object's "version" field; else the one of `versions` the text
    names as a whole word (None when it names none or several)."""
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if isinstance(data, dict) and "version" in data:
        return str(data["version"])
    named = [v for v in versions
             if re.search(rf"(?<![A-Za-z0-9._-]){re.escape(v)}(?![A-Za-z0-9._-])", body)]
    return named[0] if len(named) == 1 else None


def answered_version(opts: Options, raw: str) -> dict[str, Any]:
    """What one answer says about the version that gave it."""
    status, headers, body = parse_response(raw)
    if opts.version_header is not None:
        version = headers.get(opts.version_header.lower()) or None
    else:
        version = version_in_body(body, (opts.from_version, opts.to_version))
    return {"version": version, "status": status}


def stalled(steady_p99: float, during_p99: float, max_ratio: float,
            slack_ms: float = P99_SLACK_MS) -> bool:
    """The service stalled during swaps: p99 beyond max_ratio times steady p99
    AND more than slack_ms above it (no steady samples: nothing to compare)."""
    return (steady_p99 > 0 and during_p99 > max_ratio * steady_p99
            and during_p99 > steady_p99 + slack_ms)


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
    # the bake is a wait the config asks for (strategy.min_ready), not a slow step
    slowest = max(((p, s, i + 1) for i, r in enumerate(swaps)
                   for p, s in (r.get("phases") or {}).items() if p != "bake"),
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
                     "tcp": r.get("tcp") or {},
                     # the engine's count of connections the old instance closed while
                     # idle after the drain signal (None: not reported)
                     "closed_idle": None if drain.get("closed_idle") is None
                     else int(drain["closed_idle"]),
                     "answered": r.get("answered")})
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
    steady_p99, during_p99 = series.percentile(99, steady), series.percentile(99, during)
    ratio = round(during_p99 / steady_p99, 2) if steady_p99 else None
    if stalled(steady_p99, during_p99, opts.max_p99_ratio):
        reasons.append(f"the service stalled during swaps: p99 {during_p99:.1f} ms against "
                       f"{steady_p99:.1f} ms steady, {ratio}x (allowed: up to "
                       f"{opts.max_p99_ratio:g}x, or up to {P99_SLACK_MS:g} ms above steady)")
    how = (f"header {opts.version_header}" if opts.version_header is not None
           else f"GET {opts.version_path}")
    for row in rows:
        answers = row["answered"]
        if row["result"] != "ok" or not answers:
            continue  # a failed swap has its own reason; nothing asked: no evidence
        wrong = [a for a in answers if a.get("version") != row["to"]]
        if wrong:
            seen = Counter(a.get("version") or "no version" for a in answers)
            reasons.append(f"after swap {row['n']} to {row['to']}, {len(wrong)} of "
                           f"{len(answers)} answers were not {row['to']} ({how}): "
                           + ", ".join(f"{v} x{n}" for v, n in seen.items()))
    warnings = []
    idle = [row for row in rows if row["closed_idle"]]
    if idle:
        warnings.append(
            f"{sum(row['closed_idle'] for row in idle)} idle keep-alive connections were "
            "closed by the old instance after its drain signal ("
            + ", ".join(f"swap {row['n']}: {row['closed_idle']}" for row in idle)
            + "): a client's next request on one races the close and can fail with "
            f"ECONNRESET; fix: {IDLE_FIX}")
    return {
        "service": svc.name, "protocol": opts.protocol, "clients": opts.clients,
        "from_version": opts.from_version, "to_version": opts.to_version,
        "verdict": "fail" if reasons else "pass", "reasons": reasons, "warnings": warnings,
        "requests": {"sent": load["sent"], "failed": load["failed"], "errors": load["errors"]},
        "tcp": tcp,
        "latency_ms": {
            "steady": {"p50": round(series.percentile(50, steady), 2),
                       "p99": round(steady_p99, 2)},
            "during_swaps": {"p50": round(series.percentile(50, during), 2),
                             "p99": round(during_p99, 2)},
            "p99_ratio": ratio, "max_p99_ratio": opts.max_p99_ratio,
            "p99_slack_ms": P99_SLACK_MS},
        "version_asked": how if opts.asks_version else None,
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


def ask_version(sb: Sandbox, opts: Options, svc: ServiceConfig) -> dict[str, Any]:
    """Ask the service once, from inside the sandbox, which version answers."""
    try:
        p = sb.run(version_argv(opts, svc), check=False, capture=True, net_only=True,
                   timeout=10)
    except (subprocess.TimeoutExpired, ValueError) as e:  # ValueError: not text
        return {"version": None, "error": str(e)[:200]}
    if p.returncode != 0:
        return {"version": None, "error": f"curl exited {p.returncode}: {p.stderr.strip()[:200]}"}
    return answered_version(opts, p.stdout)


def run(opts: Options, say: Callable[[str], None]) -> dict[str, Any]:
    svc = check(opts)
    from .demo.run import DemoHost

    budget = opts.duration or (STEADY + TAIL + opts.swaps * (
        PAUSE + svc.ready.deadline + svc.min_ready * svc.replicas  # a bake per batch at most
        + svc.drain.pre_stop_delay + svc.drain.grace_period + 10))
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
        # python3 -m agent.traffic...: from the Debian package the agent is in
        # a directory python3 does not search
        client = host.sb.popen(client_argv(opts, svc, budget), net_only=True,
                               env={"PYTHONPATH": module_root()},
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
                if opts.asks_version:
                    r["answered"] = [ask_version(host.sb, opts, svc)
                                     for _ in range(VERSION_ASKS)]
                swaps.append(r)
                drain = r.get("drain") or {}
                seconds, drained = float(r.get("seconds") or 0), float(drain.get("seconds") or 0)
                answered = ("; answered " + ", ".join(
                    str(a["version"]) for a in r["answered"])) if opts.asks_version else ""
                say(f"  swap {i + 1}/{opts.swaps}: -> {target} {r.get('result')} in "
                    f"{seconds:.2f}s (drain {drained:.2f}s, "
                    f"{drain.get('connections_drained', 0)} connections){answered}")
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
    lines += [f"warning: {w}" for w in r["warnings"]]
    lines.append(f"requests: {req['sent']} sent, {req['failed']} failed"
                 + (f" ({', '.join(f'{k}: {v}' for k, v in req['errors'].items())})"
                    if req["errors"] else ""))
    ratio = f"{lat['p99_ratio']}x" if lat["p99_ratio"] is not None else "no steady p99"
    lines.append(f"latency: steady p50 {lat['steady']['p50']} ms, p99 {lat['steady']['p99']} "
                 f"ms; during swaps p50 {lat['during_swaps']['p50']} ms, p99 "
                 f"{lat['during_swaps']['p99']} ms ({ratio}; a stall is over "
                 f"{lat['max_p99_ratio']:g}x and {lat['p99_slack_ms']:g} ms above steady)")
    tcp = ", ".join(f"{k} +{v}" for k, v in sorted(r["tcp"].items()) if v) or "no change"
    lines.append(f"kernel counters over the swaps: {tcp}")
    for s in r["swaps"]:
        cut = f", {s['cut_at_grace']} cut at grace" if s["cut_at_grace"] else ""
        idle = f", {s['closed_idle']} closed idle" if s["closed_idle"] else ""
        answered = ""
        if s["answered"]:
            seen = Counter(str(a.get("version") or "no version") for a in s["answered"])
            answered = "; answered " + ", ".join(f"{v} x{n}" for v, n in seen.items())
        lines.append(f"  swap {s['n']}: {s['from']} -> {s['to']} {s['result']} in "
                     f"{s['seconds']:.2f}s; drain {s['drain_seconds']:.2f}s, "
                     f"{s['connections_drained']} connections{cut}{idle}{answered}")
    if r["slowest_phase"]:
        p = r["slowest_phase"]
        lines.append(f"slowest phase: {p['phase']} {p['seconds']:.2f}s (swap {p['swap']})")
    if r.get("plot"):
        lines.append(f"plot: {r['plot']}")
    return lines
