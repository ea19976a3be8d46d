"""`zdd-agent demo` and the host the end-to-end tests drive: a sandboxed
systemd with the demo API's releases and config, the agent's CLI run inside
it, and wrk load from inside its network namespace."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..sandbox import Sandbox
from .load import Load, LoadResult, wrk_argv, wrk_path, write_script
from .release import make_release

RELEASES = "/var/lib/zdd-demo/releases"
CONFIG_DIR = "/etc/zdd-agent/services"
PORT = 8080

DEMO_CONFIG = """\
name: {name}
command: {releases}/{{version}}/bin/api
listen: ["127.0.0.1:{port}"]
ready:
{ready}
drain:
  grace_period: {grace}
"""
NOTIFY_READY = "  type: notify\n  deadline: {deadline}"
HTTP_READY = ("  type: http\n  url: http://127.0.0.1:{{instance_port}}/ready\n"
              "  period: 1s\n  timeout: 500ms\n  deadline: {deadline}")


class DemoHost:
    """A sandbox host with the demo API under zdd-agent."""

    def __init__(self, sandbox: Sandbox | None = None) -> None:
        self.sb = sandbox or Sandbox()
        self.agent = [str(Path(sys.prefix) / "bin" / "zdd-agent")]

    def boot(self) -> DemoHost:
        self.sb.boot()
        return self

    def close(self) -> None:
        self.sb.close()

    def __enter__(self) -> DemoHost:
        return self.boot()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def release(self, version: str, *flags: str, program: str = "api") -> None:
        make_release(self.sb.path(RELEASES), version, tuple(flags), program)

    def configure(self, name: str = "demo", port: int = PORT, ready: str = "notify",
                  deadline: str = "20s", grace: str = "10s", text: str | None = None) -> Path:
        cfg = self.sb.path(CONFIG_DIR)
        cfg.mkdir(parents=True, exist_ok=True)
        cfg.chmod(0o755)
        template = NOTIFY_READY if ready == "notify" else HTTP_READY
        content = text if text is not None else DEMO_CONFIG.format(
            name=name, releases=RELEASES, port=port, grace=grace,
            ready=template.format(deadline=deadline))
        path = cfg / f"{name}.yaml"
        path.write_text(content)
        path.chmod(0o644)
        return path

    def zdd(self, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        return self.sb.run([*self.agent, *args], check=check, capture=True)

    def zdd_json(self, *args: str) -> tuple[int, Any]:
        r = self.zdd(*args, "--json")
        try:
            return r.returncode, json.loads(r.stdout)
        except ValueError:
            raise RuntimeError(f"zdd-agent {' '.join(args)} exited {r.returncode} without "
                               f"JSON: {r.stdout[-1000:]} {r.stderr[-2000:]}") from None

    def get(self, path: str = "/", port: int = PORT) -> dict[str, Any]:
        r = self.sb.run(["curl", "-sS", "--max-time", "5", f"http://127.0.0.1:{port}{path}"],
                        capture=True, net_only=True)
        return dict(json.loads(r.stdout))

    def load(self, clients: int, seconds: float, keepalive: bool = True,
             port: int = PORT) -> Load:
        script = write_script(self.sb.root)
        argv = wrk_argv(f"http://127.0.0.1:{port}/", clients, seconds, script, keepalive)
        proc = self.sb.popen(argv, net_only=True, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT)
        time.sleep(0.5)  # let wrk connect before the first swap
        return Load(proc)


def run_demo(swaps: int = 4, clients: int = 32,
             echo: Callable[[str], None] | None = None) -> dict[str, Any]:
    say = echo or (lambda s: None)
    wrk_path()  # fail before booting anything
    versions = ["v1", "v2"]
    report: dict[str, Any] = {"swaps": [], "clients": clients}
    say("booting a throwaway systemd sandbox ...")
    with DemoHost() as host:
        for v in versions:
            host.release(v)
        host.configure()
        host.zdd("sysctl", "apply", check=True)
        code, first = host.zdd_json("swap", "demo", "--version", "v1")
        if code != 0:
            raise RuntimeError(f"first deploy failed: {first.get('reason')}")
        say(f"deployed demo v1 (first deploy, {first['seconds']:.2f}s); "
            f"answering: {host.get()['version']}")
        say(f"load: wrk, {clients} keep-alive clients; swapping {swaps} times ...")
        load = host.load(clients, seconds=swaps * 8 + 10)
        results: list[LoadResult] = []
        try:
            for i in range(swaps):
                time.sleep(1.0)
                target = versions[(i + 1) % 2]
                code, r = host.zdd_json("swap", "demo", "--version", target)
                drain = r.get("drain") or {}
                entry = {"from": r.get("from_version"), "to": target, "exit": code,
                         "result": r.get("result"), "seconds": r.get("seconds"),
                         "drained": drain.get("connections_drained", 0),
                         "drain_seconds": drain.get("seconds", 0.0)}
                report["swaps"].append(entry)
                say(f"  swap {i + 1}: {entry['from']} -> {target} {entry['result']} in "
                    f"{entry['seconds']:.2f}s, drained {entry['drained']} connections in "
                    f"{entry['drain_seconds']:.2f}s")
            time.sleep(1.0)
        finally:
            results.append(load.stop())
        res = results[0]
        report.update(res.to_dict())
        report["serving"] = host.get()["version"]
    ok_swaps = sum(1 for s in report["swaps"] if s["result"] == "ok")
    say(f"requests sent: {res.requests}, failed: {res.failed} "
        f"(connect {res.connect}, read {res.read}, write {res.write}, status {res.status}, "
        f"timeout {res.timeout}); p50 {res.p50_us / 1000:.1f} ms, p99 {res.p99_us / 1000:.1f} ms")
    say(f"swaps: {ok_swaps}/{swaps} ok; now serving {report['serving']}; sandbox removed")
    report["ok"] = res.failed == 0 and ok_swaps == swaps
    return report


def swap_many(host: DemoHost, versions: Sequence[str], pause: float = 0.5,
              name: str = "demo") -> list[dict[str, Any]]:
    """Swap through `versions` in order; each swap's JSON result."""
    out = []
    for v in versions:
        time.sleep(pause)
        code, r = host.zdd_json("swap", name, "--version", v)
        r["exit"] = code
        out.append(r)
    return out
