"""The daemon, started from the real units in units/ (installed by
`zdd-agent install` inside the sandbox), driven through its control socket."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest

from agent.demo.run import DemoHost
from agent.log import MESSAGE_IDS

STATE = "/var/lib/zdd-agent/services/demo.json"
SOCK = "/run/zdd-agent/control.sock"

# A client with nothing but the standard library, for users who cannot run
# the agent's virtualenv: sends one request, prints the last reply line.
RAW_CLIENT = r"""
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.sendall(sys.argv[2].encode() + b"\n")
last = b""
for line in s.makefile("rb"):
    last = line
print(last.decode().strip())
"""


def wait_for(pred, timeout: float, what: str, step: float = 0.05):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(step)


def main_pid(host: DemoHost) -> int:
    r = host.sb.run(["systemctl", "show", "-p", "MainPID", "--value", "zdd-agent.service"],
                    capture=True)
    return int(r.stdout.strip() or 0)


def daemon_active(host: DemoHost) -> int:
    r = host.sb.run(["systemctl", "is-active", "zdd-agent.service"], capture=True, check=False)
    return main_pid(host) if r.stdout.strip() == "active" else 0


@pytest.fixture
def dhost(host: DemoHost) -> Iterator[DemoHost]:
    host.configure()
    r = host.zdd("install")
    assert r.returncode == 0, r.stderr
    wait_for(lambda: daemon_active(host), 20, "zdd-agent.service active")
    yield host


def journal(host: DemoHost, *match: str) -> list[dict]:
    r = host.sb.run(["journalctl", "--no-pager", "-o", "json", "-u", "zdd-agent", *match],
                    capture=True)
    return [json.loads(line) for line in r.stdout.splitlines() if line.strip()]


def test_install_is_idempotent_and_dry_run_changes_nothing(dhost: DemoHost) -> None:
    again = dhost.zdd("install")
    assert again.returncode == 0
    assert "create" not in again.stdout and "update" not in again.stdout, again.stdout
    dry = dhost.zdd("uninstall", "--dry-run")
    assert "would remove" in dry.stdout and daemon_active(dhost)
    code, r = dhost.zdd_json("swap", "demo", "--version", "v1")
    assert code == 0
    gone = dhost.zdd("uninstall")
    assert gone.returncode == 0, gone.stderr
    assert not daemon_active(dhost)
    assert not dhost.sb.path("/etc/systemd/system/zdd-agent.service").exists()
    assert not dhost.sb.path(SOCK).exists()
    assert dhost.sb.path("/etc/zdd-agent/services/demo.yaml").exists()  # configs kept
    # the service keeps serving, and the CLI acts in-process, silently
    r2 = dhost.zdd("status")
    assert r2.returncode == 0 and "acting in-process" not in r2.stderr
    assert dhost.get()["version"] == "v1"


def test_cli_goes_through_the_daemon_and_logs_structured_events(dhost: DemoHost) -> None:
    pid = daemon_active(dhost)
    code, r = dhost.zdd_json("swap", "demo", "--version", "v1")
    assert code == 0 and r["result"] == "ok", r
    # a plan through the daemon (Ansible's zdd_swap asks for one first)
    code, plan = dhost.zdd_json("swap", "demo", "--version", "v2", "--dry-run")
    assert code == 0 and plan["from_version"] == "v1" and plan["batches"], plan
    code, r = dhost.zdd_json("swap", "demo", "--version", "v2")
    assert code == 0 and r["result"] == "ok", r
    assert dhost.get()["version"] == "v2"
    # the daemon ran them: its journal has the request and the swap's events
    entries = journal(dhost)
    assert any("control socket: swap" in e["MESSAGE"] for e in entries)
    drains = [e for e in entries if e.get("MESSAGE_ID") == MESSAGE_IDS["drain"]]
    assert any(e["MESSAGE"] == "Drain complete. 0 active connections remaining." for e in drains)
    assert all(e["SERVICE"] == "demo" and e["PHASE"] == "drain" and "CONNECTIONS" in e
               for e in drains)
    phases = [e["PHASE"] for e in entries if e.get("MESSAGE_ID") == MESSAGE_IDS["phase"]]
    assert phases[-5:] == ["start", "ready", "bake", "drain", "retire"]
    code, hist = dhost.zdd_json("history", "demo")
    assert [(h["from"], h["to"], h["result"]) for h in hist] == [(None, "v1", "ok"),
                                                                 ("v1", "v2", "ok")]
    # --local acts in-process and sees the same state
    code, st = dhost.zdd_json("status", "demo", "--local")
    assert code == 0 and st[0]["serving"] == "v2"
    assert daemon_active(dhost) == pid  # no restart on the way


def test_non_root_may_read_but_not_change_unless_in_the_group(dhost: DemoHost) -> None:
    dhost.zdd_json("swap", "demo", "--version", "v1")
    for user in ("zddreader", "zddadmin"):
        dhost.sb.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", user])
    dhost.sb.run(["usermod", "-aG", "zdd-admin", "zddadmin"])

    def as_user(user: str, cmd: str, **args: object) -> dict:
        line = json.dumps({"v": 1, "cmd": cmd, "args": args})
        r = dhost.sb.run(["runuser", "-u", user, "--", "/usr/bin/python3", "-c", RAW_CLIENT,
                          SOCK, line], capture=True)
        return dict(json.loads(r.stdout))

    refused = as_user("zddreader", "swap", service="demo", version="v2")
    assert refused["exit_code"] == 2 and "swap refused for user zddreader" in refused["error"]
    status = as_user("zddreader", "status")
    assert status["exit_code"] == 0 and status["result"][0]["serving"] == "v1"
    # the history's reasons hold hook output and journal lines: admins only
    history = as_user("zddreader", "history")
    assert history["exit_code"] == 2 and "history refused for user zddreader" in history["error"]
    assert as_user("zddadmin", "history")["exit_code"] == 0
    assert dhost.get()["version"] == "v1"
    refusals = [e for e in journal(dhost) if e.get("MESSAGE_ID") == MESSAGE_IDS["refused"]]
    assert any("zddreader" in e["MESSAGE"] for e in refusals)
    allowed = as_user("zddadmin", "swap", service="demo", version="v2")
    assert allowed["exit_code"] == 0 and allowed["result"]["to_version"] == "v2", allowed
    assert dhost.get()["version"] == "v2"


def test_the_state_directory_is_root_and_the_admin_groups_under_the_real_unit(
        dhost: DemoHost) -> None:
    """Review of issue 13: under the shipped unit (its capability bounding
    set, StateDirectoryMode=) the daemon could not hand the state to the
    admin group, and systemd reopened the directory to everyone at each
    start. A file left world-readable by an older version is tightened at
    the next start."""
    code, r = dhost.zdd_json("swap", "demo", "--version", "v1")
    assert code == 0, r

    def mode(path: str) -> str:
        return dhost.sb.run(["stat", "-c", "%a %U:%G", path], capture=True).stdout.strip()

    # the first writes already: a new subdirectory gets the admin group
    first = {p: mode(p) for p in ("/var/lib/zdd-agent/services", STATE)}
    assert first == {"/var/lib/zdd-agent/services": "750 root:zdd-admin",
                     STATE: "640 root:zdd-admin"}, first
    loose = dhost.sb.path("/var/lib/zdd-agent/services/old.json")
    loose.write_text("{}")
    loose.chmod(0o666)
    pid = daemon_active(dhost)
    dhost.sb.run(["systemctl", "restart", "zdd-agent.service"])
    wait_for(lambda: daemon_active(dhost) not in (0, pid), 30, "the restarted daemon")

    found = {p: mode(p) for p in ("/var/lib/zdd-agent", "/var/lib/zdd-agent/services",
                                  STATE, "/var/lib/zdd-agent/services/old.json")}
    print(f"state directory under the real unit: {found}")
    assert found == {"/var/lib/zdd-agent": "750 root:zdd-admin",
                     "/var/lib/zdd-agent/services": "750 root:zdd-admin",
                     STATE: "640 root:zdd-admin",
                     "/var/lib/zdd-agent/services/old.json": "640 root:zdd-admin"}, found
    assert not [e["MESSAGE"] for e in journal(dhost) if "cannot" in e.get("MESSAGE", "")
                and "state directory" in e.get("MESSAGE", "")]


def test_bad_clients_never_stop_the_daemon(dhost: DemoHost) -> None:
    pid = daemon_active(dhost)
    path = str(dhost.sb.path(SOCK))

    def exchange(data: bytes) -> bytes:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(path)
            try:
                s.sendall(data)
                return s.recv(65536)
            except OSError:
                return b""  # closed on us: an acceptable answer too

    assert b'"class":"config"' in exchange(b"{not json\n")
    assert b"unknown command" in exchange(b'{"v":1,"cmd":"reboot"}\n')
    assert b"protocol version" in exchange(b'{"v":9,"cmd":"status"}\n')
    assert b"over" in exchange(b"x" * 200_000) or True  # may be cut before the reply
    # a burst of idle connections, more than the daemon reads at once
    idle = []
    try:
        for _ in range(400):
            s = socket.socket(socket.AF_UNIX)
            s.connect(path)
            idle.append(s)
        t = time.monotonic()
        code, st = dhost.zdd_json("status")
        assert code == 0 and time.monotonic() - t < 5
    finally:
        for s in idle:
            s.close()
    code, r = dhost.zdd_json("swap", "demo", "--version", "v1")
    assert code == 0 and r["result"] == "ok"
    assert daemon_active(dhost) == pid


# A local user's storm, with nothing but the standard library: 24 threads
# asking `status` as fast as answers come, one thread holding up to 300 idle
# connections and one sending garbage; for argv[2] seconds. Prints its counts.
STORM = r"""
import json, socket, sys, threading, time
path, seconds = sys.argv[1], float(sys.argv[2])
end = time.monotonic() + seconds
counts = {"busy": 0, "answered": 0, "closed": 0, "idle_opened": 0, "garbage": 0}
lock = threading.Lock()
def ask(line):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(15)
    try:
        s.connect(path)
        s.sendall(line)
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return data
            data += chunk
    except OSError:
        return b""
    finally:
        s.close()
def status_loop():
    while time.monotonic() < end:
        data = ask(b'{"v":1,"cmd":"status"}\n')
        key = "busy" if b"busy" in data else ("answered" if data else "closed")
        with lock:
            counts[key] += 1
def garbage_loop():
    while time.monotonic() < end:
        ask(b"\x00{not json\n")
        with lock:
            counts["garbage"] += 1
idle = []
def idle_loop():
    while time.monotonic() < end:
        try:
            s = socket.socket(socket.AF_UNIX)
            s.connect(path)
            idle.append(s)
            with lock:
                counts["idle_opened"] += 1
        except OSError:
            time.sleep(0.01)
        if len(idle) > 300:
            idle.pop(0).close()
        time.sleep(0.002)
threads = [threading.Thread(target=status_loop) for _ in range(24)]
threads += [threading.Thread(target=idle_loop), threading.Thread(target=garbage_loop)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(json.dumps(counts))
"""


def test_a_local_users_storm_never_starves_an_admin_swap(dhost: DemoHost) -> None:
    """Issue 13: a non-root user storms the real control socket (idle
    connections, status as fast as it is answered, garbage) while root swaps
    under load: root's requests have slots of their own, the user's are
    capped per uid, its refusals are logged a few times, not thousands."""
    code, first = dhost.zdd_json("swap", "demo", "--version", "v1")
    assert code == 0, first
    pid = daemon_active(dhost)
    dhost.sb.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", "zddstorm"])
    uid = dhost.sb.run(["id", "-u", "zddstorm"], capture=True).stdout.strip()
    since = dhost.sb.run(["date", "+%Y-%m-%d %H:%M:%S"], capture=True).stdout.strip()
    storm = dhost.sb.popen(["runuser", "-u", "zddstorm", "--", "/usr/bin/python3", "-c", STORM,
                            SOCK, "20"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    load = dhost.load(16, seconds=25)
    try:
        time.sleep(3)  # the storm is on
        t = time.monotonic()
        code, st = dhost.zdd_json("status", "demo")
        status_s = time.monotonic() - t
        assert code == 0 and st[0]["serving"] == "v1"
        t = time.monotonic()
        code, r = dhost.zdd_json("swap", "demo", "--version", "v2")
        swap_s = time.monotonic() - t
        assert code == 0 and r["result"] == "ok", r
    finally:
        out, err = storm.communicate(timeout=60)
        res = load.stop(timeout=60)
    counts = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
    entries = journal(dhost, "--since", since)
    refusals = [e for e in entries
                if e.get("MESSAGE_ID") == MESSAGE_IDS["refused"] and e.get("USER") == "zddstorm"]
    # all the storm wrote to the journal: the refusals, not a line per request
    theirs = [e for e in entries if e.get("USER") == "zddstorm"
              or "zddstorm" in str(e.get("MESSAGE", ""))]
    print(f"storm by uid {uid}: {counts}; root status in {status_s:.2f}s, swap in {swap_s:.2f}s; "
          f"{len(refusals)} refusal lines logged; load {res.requests} requests, "
          f"{res.failed} failed")
    assert storm.returncode == 0, err
    assert counts["busy"] > 0 and counts["answered"] > 0, counts  # capped, not shut out
    assert counts["idle_opened"] > 300 and counts["garbage"] > 0, counts
    assert status_s < 5.0
    # one line per kind (read, busy, bad) per 10 s at most, over a 20 s storm
    assert 0 < len(refusals) <= 3 * 3, [e["MESSAGE"] for e in refusals]
    assert any("not logged" in e["MESSAGE"] for e in refusals)
    assert len(theirs) == len(refusals), [e["MESSAGE"] for e in theirs][:20]
    assert res.failed == 0 and res.requests > 1000, res
    assert daemon_active(dhost) == pid  # the daemon kept its PID


def test_daemon_sigkilled_in_each_phase_recovers_with_no_failed_request(
        dhost: DemoHost) -> None:
    # http readiness with an initial delay, and a slow request held across each
    # drain, so that every phase lasts long enough to be hit
    cfg = dhost.sb.path("/etc/zdd-agent/services/demo.yaml")
    cfg.write_text(cfg.read_text().replace(
        "  type: notify\n  deadline: 20s",
        "  type: http\n  url: http://127.0.0.1:{instance_port}/ready\n  period: 1s\n"
        "  timeout: 500ms\n  initial_delay: 1s\n  deadline: 20s"))
    code, r = dhost.zdd_json("swap", "demo", "--version", "v1")
    assert code == 0, r
    state_file = dhost.sb.path(STATE)
    outcomes = []
    load = dhost.load(clients=32, seconds=120)
    try:
        for phase in ("start", "ready", "drain", "retire"):
            target = "v1" if dhost.get()["version"] == "v2" else "v2"
            pid = wait_for(lambda: daemon_active(dhost), 30, "the daemon")
            host_pid = _host_pid(dhost, pid)
            slow = dhost.sb.popen(["curl", "-s", "--max-time", "20",
                                   "http://127.0.0.1:8080/slow?ms=2500"], net_only=True,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            client = threading.Thread(target=dhost.zdd, args=("swap", "demo", "--version",
                                                              target))
            client.start()
            def at_phase(phase: str = phase, target: str = target) -> bool:
                try:
                    intent = json.loads(state_file.read_text()).get("intent") or {}
                except (OSError, ValueError):
                    return False
                return intent.get("phase") == phase and intent.get("to") == target

            wait_for(at_phase, 30, f"phase {phase}", step=0.001)
            os.kill(host_pid, signal.SIGKILL)
            client.join(timeout=60)
            slow.wait(timeout=30)
            # restarted by systemd; it finishes or reverts the swap at start
            wait_for(lambda pid=pid: daemon_active(dhost) not in (0, pid), 30, "a new daemon")
            wait_for(lambda: not json.loads(state_file.read_text()).get("intent"), 60,
                     "the interrupted swap to be recovered")
            code, st = dhost.zdd_json("status", "demo")
            active = [x["version"] for x in st[0]["instances"] if x["active"] == "active"]
            served = dhost.get()["version"]
            last = json.loads(state_file.read_text())["history"][-1]
            outcomes.append((phase, target, last["result"], last["reason"], active, served))
            assert len(active) == 1 and active == [served] == [st[0]["serving"]], st
    finally:
        res = load.stop()
    for o in outcomes:
        print("killed in {}: swap to {} -> {} ({}); serving {}".format(*o[:4], o[5]))
    print(f"load across the kills: {res.requests} requests, {res.failed} failed")
    assert res.requests > 1000 and res.failed == 0, res
    # admitted swaps are finished, unadmitted ones reverted
    assert [o[2] for o in outcomes] == ["rolled_back", "rolled_back", "ok", "ok"], outcomes


def test_a_recovery_longer_than_the_start_timeout_is_not_killed(dhost: DemoHost) -> None:
    """Issue 13: the daemon is killed in a drain that a slow request (16 s,
    begun before the 5 s bake) keeps going; its unit's start timeout is 3 s. The new daemon finishes
    the swap before READY=1, asking systemd for more time while it does:
    one restart (the kill), no start timeout, the swap finished."""
    dropin = dhost.sb.path("/etc/systemd/system/zdd-agent.service.d/10-timeout.conf")
    dropin.parent.mkdir(parents=True, exist_ok=True)
    dropin.write_text("[Service]\nTimeoutStartSec=3s\n")
    dhost.sb.run(["systemctl", "daemon-reload"])
    dhost.sb.run(["systemctl", "restart", "zdd-agent.service"])
    dhost.configure(grace="30s")
    pid = wait_for(lambda: daemon_active(dhost), 30, "the daemon")
    code, r = dhost.zdd_json("swap", "demo", "--version", "v1")
    assert code == 0, r
    state_file = dhost.sb.path(STATE)

    def restarts() -> int:
        return int(dhost.sb.run(["systemctl", "show", "-p", "NRestarts", "--value",
                                 "zdd-agent.service"], capture=True).stdout.strip())

    before = restarts()
    slow = dhost.sb.popen(["curl", "-s", "--max-time", "40",
                           "http://127.0.0.1:8080/slow?ms=16000"], net_only=True,
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    client = threading.Thread(target=dhost.zdd, args=("swap", "demo", "--version", "v2"))
    client.start()
    wait_for(lambda: (json.loads(state_file.read_text()).get("intent") or {}).get("phase")
             == "drain", 30, "the drain", step=0.01)
    time.sleep(0.5)
    os.kill(_host_pid(dhost, pid), signal.SIGKILL)
    client.join(timeout=60)
    t = time.monotonic()
    new = wait_for(lambda: daemon_active(dhost) not in (0, pid) and daemon_active(dhost), 60,
                   "a new daemon")
    took = time.monotonic() - t
    out, _ = slow.communicate(timeout=40)
    last = json.loads(state_file.read_text())["history"][-1]
    timeouts = [e["MESSAGE"] for e in journal(dhost)
                if "timed out" in e.get("MESSAGE", "").lower()]
    print(f"recovery of a long drain with TimeoutStartSec=3s: the new daemon ({new}) ready "
          f"after {took:.1f}s, restarts {before} -> {restarts()}, swap {last['result']}")
    assert not json.loads(state_file.read_text()).get("intent")
    assert last["result"] == "ok" and last["to_version"] == "v2", last
    assert took > 5.0  # it did outlast the 3 s start timeout
    assert restarts() == before + 1, timeouts  # the kill; no start timeout after it
    assert not timeouts, timeouts
    assert '"version": "v1"' in out or '"version":"v1"' in out  # the slow request was answered
    assert dhost.get()["version"] == "v2"


def _host_pid(host: DemoHost, ns_pid: int) -> int:
    """The host PID of a process the sandbox knows as `ns_pid`."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                status = f.read()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("NSpid:"):
                ids = line.split()[1:]
                if len(ids) >= 2 and ids[-1] == str(ns_pid) and \
                        os.readlink(f"/proc/{entry}/ns/pid") == \
                        os.readlink(f"/proc/{host.sb.pid}/ns/pid"):
                    return int(entry)
    raise AssertionError(f"no host process for sandbox pid {ns_pid}")


def test_watchdog_restarts_a_hung_daemon(dhost: DemoHost) -> None:
    dropin = dhost.sb.path("/etc/systemd/system/zdd-agent.service.d/watchdog.conf")
    dropin.parent.mkdir(parents=True, exist_ok=True)
    dropin.write_text("[Service]\nWatchdogSec=3s\nTimeoutAbortSec=2s\n")
    dhost.sb.run(["systemctl", "daemon-reload"])
    dhost.sb.run(["systemctl", "restart", "zdd-agent.service"])
    pid = wait_for(lambda: daemon_active(dhost), 20, "the daemon")
    time.sleep(4)  # pings keep it alive past one watchdog period
    assert daemon_active(dhost) == pid
    os.kill(_host_pid(dhost, pid), signal.SIGSTOP)  # the whole main loop hangs
    new = wait_for(lambda: daemon_active(dhost) not in (0, pid) and daemon_active(dhost), 30,
                   "a restart by the watchdog", step=0.2)
    assert new != pid
    r = dhost.sb.run(["journalctl", "--no-pager", "-u", "zdd-agent"], capture=True)
    assert "Watchdog timeout" in r.stdout, r.stdout[-2000:]
    code, st = dhost.zdd_json("status")
    assert code == 0


def test_metrics_endpoint_on_loopback(dhost: DemoHost) -> None:
    agent_yaml = dhost.sb.path("/etc/zdd-agent/agent.yaml")
    agent_yaml.write_text(agent_yaml.read_text().replace("metrics:\n  listen: null",
                                                         "metrics:\n  listen: 127.0.0.1:9469"))
    dhost.sb.run(["systemctl", "restart", "zdd-agent.service"])
    wait_for(lambda: daemon_active(dhost), 20, "the daemon")
    for v in ("v1", "v2"):
        code, r = dhost.zdd_json("swap", "demo", "--version", v)
        assert code == 0, r
    r = dhost.sb.run(["curl", "-s", "http://127.0.0.1:9469/metrics"], capture=True,
                     net_only=True)
    text = r.stdout
    assert 'zdd_swaps_total{result="ok",service="demo"} 2.0' in text, text[:3000]
    assert 'zdd_swap_duration_seconds_count{service="demo"} 2.0' in text
    assert 'zdd_drain_duration_seconds_count{service="demo"} 1.0' in text
    assert 'zdd_sysctl_drift{key="net.core.somaxconn"} 0.0' in text


def test_corrupt_state_is_kept_aside_and_the_daemon_starts(dhost: DemoHost) -> None:
    code, r = dhost.zdd_json("swap", "demo", "--version", "v1")
    assert code == 0
    state = dhost.sb.path(STATE)
    state.write_text(state.read_text()[:40])  # a torn write
    dhost.sb.run(["systemctl", "restart", "zdd-agent.service"])
    wait_for(lambda: daemon_active(dhost), 20, "the daemon")
    aside = list(state.parent.glob("demo.corrupt.*"))
    assert len(aside) == 1 and not state.exists()
    msgs = [e["MESSAGE"] for e in journal(dhost)]
    assert any("unreadable state" in m and "moved to" in m for m in msgs), msgs[-10:]
    assert dhost.get()["version"] == "v1"  # the service itself never noticed
    code, st = dhost.zdd_json("status", "demo")
    assert code == 0 and st[0]["serving"] == "v1"


def test_drain_host_flips_the_readiness_endpoint_across_restarts(host: DemoHost) -> None:
    agent_yaml = host.sb.path("/etc/zdd-agent/agent.yaml")
    agent_yaml.parent.mkdir(parents=True, exist_ok=True)
    agent_yaml.write_text("host_ready:\n  listen: 127.0.0.1:9470\n")
    agent_yaml.chmod(0o644)
    host.configure()
    assert host.zdd("install").returncode == 0
    wait_for(lambda: daemon_active(host), 20, "zdd-agent.service active")

    def ready() -> tuple[int, str]:
        r = host.sb.run(["curl", "-s", "-o", "/dev/stdout", "-w", "\n%{http_code}",
                         "--max-time", "5", "http://127.0.0.1:9470/ready"],
                        capture=True, net_only=True, check=False)
        body, _, code = r.stdout.rpartition("\n")
        return int(code or 0), body

    wait_for(lambda: ready()[0] == 200, 10, "GET /ready 200")
    r = host.zdd("drain-host", "--reason", "kernel upgrade", "--wait", "0.5")
    assert r.returncode == 0 and "drained" in r.stdout and "answers 503" in r.stdout
    code, body = ready()
    assert code == 503 and "kernel upgrade" in body
    before = main_pid(host)
    host.sb.run(["systemctl", "restart", "zdd-agent.service"])
    wait_for(lambda: daemon_active(host) not in (0, before), 20, "a new daemon")
    wait_for(lambda: ready()[0] == 503, 10, "still 503 after the restart")
    code, state = host.zdd_json("host-state")
    assert state["drained"] and state["reason"] == "kernel upgrade"
    assert "already" in host.zdd("drain-host").stdout
    assert host.zdd("undrain-host").returncode == 0
    assert ready()[0] == 200


def test_after_a_reboot_the_daemon_gives_serving_instances_their_admitted_oom_score(
        dhost: DemoHost) -> None:
    """Instances start at OOMScoreAdjust=1000 (the surge's first pick); at
    boot zdd.target starts the serving one with no swap to admit it: the
    daemon's start does."""
    code, r = dhost.zdd_json("swap", "demo", "--version", "v1")
    assert code == 0, r

    def score() -> str:
        out = dhost.sb.run(["systemctl", "show", "-pMainPID", "zdd-demo@v1.service"],
                           capture=True).stdout
        pid = int(out.strip().split("=")[1])
        try:
            return dhost.sb.path(f"/proc/{pid}/oom_score_adj").read_text().strip() if pid else ""
        except OSError:  # between a restart's PIDs
            return ""

    before = score()
    dhost.sb.reboot()
    # the sandbox boots zdd.target (SANDBOX.md); a host's multi-user.target
    # starts the daemon too
    wait_for(lambda: score() == "1000", 30, "the serving instance started by zdd.target")
    dhost.sb.run(["systemctl", "start", "zdd-agent.service"])
    wait_for(lambda: daemon_active(dhost), 30, "zdd-agent.service active after the reboot")
    wait_for(lambda: score() == "0", 20, "the serving instance at oom_score_adj 0")
    print(f"oom_score_adj of the serving instance: {before} after its swap, 1000 when "
          "zdd.target started it at boot, 0 once the daemon started")
    assert before == "0"
