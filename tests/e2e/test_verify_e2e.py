"""`zdd-agent verify` end to end: it boots its own sandbox, so these tests
make only the operator's side: releases in a host directory and a config."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from agent.demo.release import make_release

pytestmark = pytest.mark.e2e

AGENT = str(Path(sys.prefix) / "bin" / "zdd-agent")
CONFIG = """\
name: {name}
command: {root}/releases/{{version}}/bin/{program}
listen: ["127.0.0.1:{port}"]
{extra}ready:
{ready}
drain:
  grace_period: 5s
"""


def verify(config: Path, *args: str) -> tuple[int, dict]:
    r = subprocess.run([AGENT, "verify", "--config", str(config), "--from", "v1", "--to", "v2",
                        *args, "--json"], capture_output=True, text=True, timeout=600)
    try:
        return r.returncode, json.loads(r.stdout)
    except ValueError:
        raise AssertionError(f"verify exited {r.returncode}: {r.stdout[-2000:]} "
                             f"{r.stderr[-3000:]}") from None


def write_config(site: Path, program: str = "api", port: int = 8080, extra: str = "",
                 ready: str = "  type: notify") -> Path:
    path = site / "service.yaml"
    path.write_text(CONFIG.format(name="svc", root=site, program=program, port=port,
                                  extra=extra, ready=ready))
    path.chmod(0o644)
    return path


def test_verify_passes_a_service_that_drains_and_plots_the_run(site: Path) -> None:
    for v in ("v1", "v2"):
        make_release(site / "releases", v)
    png = site / "run.png"
    code, r = verify(write_config(site), "--swaps", "3", "--clients", "32", "--plot", str(png))
    print(f"verify, draining service: {r['verdict']}, {r['requests']}, latency "
          f"{r['latency_ms']}, swaps {[(s['seconds'], s['drain_seconds']) for s in r['swaps']]}")
    assert code == 0 and r["verdict"] == "pass", r["reasons"]
    assert r["requests"]["sent"] > 1000 and r["requests"]["failed"] == 0
    assert [s["to"] for s in r["swaps"]] == ["v2", "v1", "v2"]
    assert all(s["result"] == "ok" and s["connections_drained"] > 0 for s in r["swaps"])
    assert r["latency_ms"]["steady"]["p99"] > 0 and r["latency_ms"]["during_swaps"]["p99"] > 0
    assert r["slowest_phase"]["phase"] in ("start", "ready", "drain", "retire")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000


def test_verify_fails_a_service_that_exits_on_sigterm(site: Path) -> None:
    for v in ("v1", "v2"):
        make_release(site / "releases", v, ("--abrupt",))
    code, r = verify(write_config(site), "--swaps", "2", "--clients", "32")
    print(f"verify, abrupt service: exit {code}, {r['verdict']}: {r['reasons']}")
    assert code == 9 and r["verdict"] == "fail"
    assert r["requests"]["failed"] > 0 and "requests failed" in r["reasons"][0]
    assert sum(r["tcp"].values()) > 0  # the resets show in the kernel's counters too


def test_verify_grpc_through_the_health_service(site: Path) -> None:
    for v in ("v1", "v2"):
        make_release(site / "releases", v, program="grpc")
    config = write_config(site, program="grpc", port=9090, extra="socket: reuseport\n",
                          ready="  type: grpc\n  url: 127.0.0.1:{instance_port}\n"
                                "  grpc_service: zdd.demo.Echo")
    code, r = verify(config, "--protocol", "grpc", "--swaps", "2", "--clients", "8")
    print(f"verify, gRPC: {r['verdict']}, {r['requests']}, {r['latency_ms']}")
    assert code == 0 and r["verdict"] == "pass", r["reasons"]
    assert r["requests"]["sent"] > 500 and r["requests"]["failed"] == 0


def test_verify_refuses_bad_input_before_booting(site: Path) -> None:
    make_release(site / "releases", "v1")
    config = write_config(site)
    r = subprocess.run([AGENT, "verify", "--config", str(config), "--from", "v1", "--to",
                        "v2"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "v2/bin/api not found" in r.stderr
    r = subprocess.run([AGENT, "verify", "--config", str(config), "--from", "v1", "--to",
                        "v1"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "same version" in r.stderr
    config.chmod(0o666)
    r = subprocess.run([AGENT, "verify", "--config", str(config), "--from", "v1", "--to",
                        "v2"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "writable" in r.stderr
