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
import yaml

from agent import doctor, servers
from agent.config import Drain, Listen, ServiceConfig, parse_service
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


def web(command: str, ready: dict | None = None, socket: str = "inherit") -> ServiceConfig:
    return parse_service(Path("/etc/zdd-agent/services/web.yaml"), {
        "name": "web", "command": command, "listen": ["127.0.0.1:8080"], "socket": socket,
        "ready": ready or {"type": "http", "url": "http://127.0.0.1:{instance_port}/ready"}})


TCP = {"type": "tcp", "url": "127.0.0.1:{instance_port}"}
SCRIPTS = {  # what read_head returns per path, instead of files
    "/opt/web/start": b"#!/bin/sh\nexec /opt/venv/bin/gunicorn -c /opt/web/conf.py app:app\n",
    "/opt/web/v2/start": b"#!/bin/sh\nexec /opt/venv/bin/uvicorn --fd 3 app:app\n",
    "/opt/web/serve.py": b"#!/opt/venv/bin/python\nfrom zdd_drain.uvicorn import run\n",
    "/opt/web/elf": b"\x7fELF\x02\x01\x01 gunicorn",
}
PROBE_PORT = [
    # (name, command, ready, socket, version, server flagged or None)
    ("gunicorn from a virtualenv", "/opt/venv/bin/gunicorn -b 127.0.0.1:{instance_port} app:app",
     None, "inherit", None, "gunicorn"),
    ("uvicorn with --fd", "/opt/venv/bin/uvicorn --fd 3 app:app", TCP, "inherit", None,
     "uvicorn"),
    ("python -m gunicorn", "/usr/bin/python3 -m gunicorn app:app", None, "inherit", None,
     "gunicorn"),
    ("python -muvicorn.main", "/usr/bin/python3 -muvicorn.main app:app", None, "inherit", None,
     "uvicorn"),
    ("a start script that execs gunicorn", "/opt/web/start", None, "inherit", None, "gunicorn"),
    ("a start script under {version}, version known", "/opt/web/{version}/start", None,
     "inherit", "v2", "uvicorn"),
    ("a start script under {version}, version unknown", "/opt/web/{version}/start", None,
     "inherit", None, None),
    ("the drain kit's uvicorn opens the instance port", "/opt/web/serve.py", None, "inherit",
     None, None),
    ("a binary that happens to contain the word", "/opt/web/elf", None, "inherit", None, None),
    ("notify readiness", "/opt/venv/bin/gunicorn app:app", {"type": "notify"}, "inherit", None,
     None),
    ("exec readiness", "/opt/venv/bin/gunicorn app:app", {"type": "exec", "command": "/bin/c"},
     "inherit", None, None),
    ("reuseport binds what it is told", "/opt/venv/bin/gunicorn app:app", None, "reuseport",
     None, None),
    ("another server", "/opt/venv/bin/hypercorn app:app", None, "inherit", None, None),
]


@pytest.mark.parametrize("name,command,ready,socket,version,server", PROBE_PORT,
                         ids=[c[0] for c in PROBE_PORT])
def test_probe_port_a_server_cannot_open(name: str, command: str, ready: dict | None,
                                         socket: str, version: str | None,
                                         server: str | None) -> None:
    found = doctor.config_findings(web(command, ready, socket), version, SCRIPTS.get)
    if server is None:
        assert found == []
        return
    [f] = found
    assert (f.level, f.check, f.subject) == ("warn", "probe-port", "web")
    assert f"{server}, given its listener by systemd, opens no other port" in f.cause
    assert "rolls back" in f.symptom and f.verify
    assert "ready: {type: notify}" in f.fix and "strategy.min_ready" in f.fix


def test_the_examples_are_not_flagged() -> None:
    examples = Path(__file__).resolve().parents[2] / "examples"
    configs = sorted(examples.glob("*/api.yaml"))
    assert len(configs) >= 3
    for path in configs:
        svc = parse_service(path, yaml.safe_load(path.read_text()))
        assert doctor.config_findings(svc, "v1") == [], path


def test_read_head_reads_a_real_script(tmp_path: Path) -> None:
    script = tmp_path / "start"
    script.write_text("#!/bin/sh\n" + "#\n" * 100 + "exec gunicorn app:app\n")
    assert servers.server_in([str(script)]) == (
        "gunicorn", f"the start script {script} mentions gunicorn in its first 4 KiB")
    script.write_text("#!/bin/sh\n" + "#" * servers.SCRIPT_HEAD + "\nexec gunicorn app:app\n")
    assert servers.server_in([str(script)]) is None  # past the first 4 KiB
    assert servers.read_head(str(tmp_path / "missing")) is None
    assert servers.read_head(str(tmp_path)) is None  # a directory


def test_a_foreign_listener_is_a_finding_with_its_pid() -> None:
    from agent.doctor import stray_findings

    svc = ServiceConfig(name="api", command=("/x",), listen=(Listen("127.0.0.1", 8080),))
    (f,) = stray_findings(svc, [{"address": "127.0.0.1:8080", "pid": 4321, "comm": "python3",
                                 "inode": 1}])
    assert f.level == "warn" and f.check == "stray-listener"
    assert "pid 4321 (python3) listens on 127.0.0.1:8080 outside zdd-agent" in f.cause
    assert stray_findings(svc, []) == []


def test_open_files_of_the_serving_process_against_what_new_instances_get() -> None:
    from agent import settings

    host = settings.Host(cpus=2, nr_open=1048576, manager_nofile=None, mem_total=8 << 30)
    svc = parse_service(Path("/etc/zdd-agent/services/api.yaml"),
                        {"name": "api", "command": "/bin/x", "listen": 8080}, "api")
    [f] = doctor.open_files_findings(svc, 42, 1024, host)
    assert f.level == "warn" and "EMFILE beyond about 1024" in f.symptom
    assert "instances the config starts get 65536" in f.cause and "limits.nofile" in f.fix
    assert doctor.open_files_findings(svc, 42, 65536, host) == []
    capped = settings.Host(cpus=2, nr_open=1048576, manager_nofile=20000, mem_total=8 << 30)
    assert doctor.open_files_findings(svc, 42, 20000, capped) == []
    [s] = [f for f in doctor.settings_findings(svc, capped) if "nofile" in f.cause]
    assert s.level == "warn" and "instances get 20000" in s.cause


def test_a_serving_process_at_the_surge_score_is_flagged() -> None:
    svc = parse_service(Path("/etc/zdd-agent/services/api.yaml"),
                        {"name": "api", "command": "/bin/x", "listen": 8080}, "api")
    [f] = doctor.oom_findings(svc, 42, 1000)
    assert f.level == "warn" and "first" in f.symptom and "restart zdd-agent" in f.fix
    assert doctor.oom_findings(svc, 42, 0) == [] and doctor.oom_findings(svc, 42, None) == []
    chosen = replace(svc, settings=replace(svc.settings, oom_score_adjust=1000))
    assert doctor.oom_findings(chosen, 42, 1000) == []  # what the operator asked for
