"""doctor's checks against real processes (no mocks: /proc is cheap)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from agent import doctor
from agent.config import Drain, Listen, ServiceConfig
from agent.swap import Memory


def svc(sig: str = "SIGTERM", socket: str = "inherit") -> ServiceConfig:
    return ServiceConfig(name="api", command=("/x",), listen=(Listen(None, 8080),),
                         path=Path("api.yaml"), socket=socket, drain=Drain(signal=sig))


@pytest.fixture
def procs() -> Iterator[dict[str, subprocess.Popen[bytes]]]:
    code = {
        "caught": "import signal,time; signal.signal(signal.SIGTERM, lambda *a: None); "
                  "print(1, flush=True); time.sleep(60)",
        "default": "import signal,time; signal.signal(signal.SIGTERM, signal.SIG_DFL); "
                   "print(1, flush=True); time.sleep(60)",
        "ignored": "import signal,time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                   "print(1, flush=True); time.sleep(60)",
    }
    ps = {k: subprocess.Popen([sys.executable, "-c", c], stdout=subprocess.PIPE)
          for k, c in code.items()}
    # a shell that runs the program as a child instead of exec'ing it
    ps["shell"] = subprocess.Popen(["/bin/sh", "-c", "sleep 60; true"],
                                   stdout=subprocess.DEVNULL, start_new_session=True)
    for k in ("caught", "default", "ignored"):
        assert ps[k].stdout is not None
        ps[k].stdout.readline()
    time.sleep(0.2)
    yield ps
    os.killpg(ps["shell"].pid, signal.SIGKILL)  # the shell and its sleep
    for p in ps.values():
        p.kill()
        p.communicate()


def test_signal_disposition(procs: dict[str, subprocess.Popen[bytes]]) -> None:
    for kind in ("caught", "default", "ignored"):
        assert doctor.handles(procs[kind].pid, signal.SIGTERM) == kind


def test_process_findings(procs: dict[str, subprocess.Popen[bytes]]) -> None:
    def levels(kind: str, sig: str = "SIGTERM") -> dict[str, str]:
        return {f.check: f.level for f in doctor.process_findings(svc(sig), procs[kind].pid)}

    assert levels("caught")["drain-signal"] == "ok"
    assert levels("default")["drain-signal"] == "fail"
    assert levels("ignored")["drain-signal"] == "warn"
    assert levels("caught", "SIGUSR2")["drain-signal"] == "fail"  # handles TERM, not USR2
    shell = doctor.process_findings(svc(), procs["shell"].pid)
    wrapper = [f for f in shell if f.check == "pid1-wrapper"]
    assert wrapper and wrapper[0].level == "fail" and "sleep" in wrapper[0].cause
    assert all(f.verify and f.fix for f in shell if f.level != "ok")


def test_open_files_and_memory(procs: dict[str, subprocess.Popen[bytes]]) -> None:
    limit = doctor.open_files_limit(procs["caught"].pid)
    assert limit is None or limit > 0

def test_memory_finding_is_the_swaps_own_headroom_decision() -> None:
    mib = 1024 * 1024
    one = svc()  # 1 replica, max_surge 1, max_unavailable 0
    ok = doctor.memory_findings(one, 1, Memory(100 * mib, 1000 * mib, "cgroup"))
    assert ok[0].level == "ok" and "100 MiB per instance (cgroup)" in ok[0].cause
    short = doctor.memory_findings(one, 1, Memory(100 * mib, 100 * mib, "rss"))
    assert short[0].level == "fail" and "100 MiB are available" in short[0].cause
    assert short[0].fix and short[0].verify
    four = replace(one, replicas=4, max_surge=2)
    narrowed = doctor.memory_findings(four, 4, Memory(100 * mib, 130 * mib, "cgroup"))
    assert narrowed[0].level == "warn" and "surge of 1" in narrowed[0].cause
    assert doctor.memory_findings(one, 1, None)[0].level == "warn"


def test_kernel_findings_depend_on_reuseport() -> None:
    inherit = doctor.kernel_findings([svc()])
    assert inherit[0].level == "ok"
    if doctor.MIGRATE_REQ.exists() and doctor.MIGRATE_REQ.read_text().strip() != "1":
        assert doctor.kernel_findings([svc(socket="reuseport")])[0].level == "fail"
