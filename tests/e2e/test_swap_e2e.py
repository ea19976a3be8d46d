"""Swaps against a real systemd under real load, counting failed requests."""

from __future__ import annotations

import json
import subprocess
import threading
import time

from agent.demo.load import LoadResult
from agent.demo.run import CONFIG_DIR, DemoHost, swap_many

SWAPS = ["v2", "v1", "v2", "v1", "v2"]


def first_deploy(host: DemoHost, version: str = "v1") -> dict:
    code, r = host.zdd_json("swap", "demo", "--version", version)
    assert code == 0, r
    assert r["result"] == "ok" and r["from_version"] is None
    assert host.get()["version"] == version
    return r


def swaps_under_mixed_load(host: DemoHost, versions: list[str], seconds: float = 60,
                           pause: float = 1.0) -> tuple[list[dict], LoadResult, LoadResult]:
    """Swap through `versions` under 32 keep-alive and 32 Connection: close clients."""
    keep = host.load(clients=32, seconds=seconds, keepalive=True)
    fresh = host.load(clients=32, seconds=seconds, keepalive=False)
    try:
        results = swap_many(host, versions, pause=pause)
        time.sleep(0.5)
    finally:
        keep_res, fresh_res = keep.stop(), fresh.stop()
    return results, keep_res, fresh_res


def test_five_swaps_under_load_keepalive_and_not(host: DemoHost) -> None:
    host.configure(ready="notify")
    first_deploy(host)
    results, keep_res, fresh_res = swaps_under_mixed_load(host, SWAPS)
    for r, want in zip(results, SWAPS):
        assert r["exit"] == 0 and r["result"] == "ok", r
        assert r["to_version"] == want
        assert r["drain"]["killed_at_grace"] is False
    # keep-alive clients sit on the old instance until it answers them with
    # Connection: close, so every drain started with connections to drain
    assert all(r["drain"]["connections_at_start"] > 0 for r in results)
    print(f"5 swaps: keep-alive {keep_res.requests} requests {keep_res.failed} failed; "
          f"Connection: close {fresh_res.requests} requests {fresh_res.failed} failed; "
          f"swap seconds {[round(r['seconds'], 2) for r in results]}; drained "
          f"{[r['drain']['connections_drained'] for r in results]}")
    assert keep_res.requests > 1000 and fresh_res.requests > 1000
    assert keep_res.failed == 0, keep_res
    assert fresh_res.failed == 0, fresh_res
    assert host.get()["version"] == SWAPS[-1]


def test_swaps_with_http_readiness_under_load(host: DemoHost) -> None:
    host.configure(ready="http")
    first_deploy(host)
    load = host.load(clients=32, seconds=60)
    try:
        results = swap_many(host, SWAPS, pause=0.5)
    finally:
        res = load.stop()
    print(f"5 swaps, http readiness: {res.requests} requests {res.failed} failed")
    assert [r["result"] for r in results] == ["ok"] * len(SWAPS), \
        [(r["result"], r["reason"]) for r in results]
    assert all(r["readiness_checks"] >= 1 for r in results)
    assert res.requests > 1000 and res.failed == 0, res


def test_new_version_that_exits_at_start_is_rolled_back(host: DemoHost) -> None:
    host.release("v3", "--fail-at-start")
    host.configure()
    first_deploy(host)
    load = host.load(clients=32, seconds=60)
    try:
        time.sleep(0.5)
        code, r = host.zdd_json("swap", "demo", "--version", "v3")
        time.sleep(0.5)
    finally:
        res = load.stop()
    print(f"exit at start: {res.requests} requests {res.failed} failed")
    assert code == 4, r
    assert r["result"] == "rolled_back" and "exited during start-up" in r["reason"]
    assert any("failing at start" in ln for ln in r["journal"]), r["journal"]
    assert res.failed == 0, res
    assert host.get()["version"] == "v1"
    code, st = host.zdd_json("status", "demo")
    assert code == 0 and st[0]["serving"] == "v1"
    # the failed instance is stopped, disabled and cleaned up: status lists v1 alone
    assert [i["version"] for i in st[0]["instances"]] == ["v1"]
    # the human output names the reason and the journal
    r2 = host.zdd("swap", "demo", "--version", "v3")
    assert r2.returncode == 4
    assert "v1 still serving" in r2.stderr and "last lines of zdd-demo@v3.service" in r2.stderr


def test_new_version_never_ready_misses_deadline(host: DemoHost) -> None:
    host.release("v3", "--never-ready")
    host.configure(deadline="3s")
    first_deploy(host)
    load = host.load(clients=32, seconds=60)
    try:
        t = time.monotonic()
        code, r = host.zdd_json("swap", "demo", "--version", "v3")
        took = time.monotonic() - t
    finally:
        res = load.stop()
    print(f"never ready: {res.requests} requests {res.failed} failed, swap took {took:.1f}s")
    assert code == 4, r
    assert "not ready within the deadline of 3s" in r["reason"]
    assert 3.0 <= took < 20
    assert res.failed == 0, res
    assert host.get()["version"] == "v1"


def test_connection_held_past_grace_is_killed_and_reported(host: DemoHost) -> None:
    host.configure(grace="2s")
    first_deploy(host)
    hold = host.sb.popen(["curl", "-sN", "--max-time", "30", "http://127.0.0.1:8080/hold"],
                         net_only=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert hold.stdout is not None
    assert hold.stdout.readline().strip() == "hold"  # the stream is open on v1
    try:
        code, r = host.zdd_json("swap", "demo", "--version", "v2")
    finally:
        hold.kill()
        hold.communicate()
    print(f"held past grace: {r['drain']}")
    assert code == 0, r
    d = r["drain"]
    assert d["killed_at_grace"] is True
    assert d["connections_at_start"] >= 1 and d["connections_at_end"] >= 1
    assert d["held"] and all(p.startswith("127.0.0.1:") for p in d["held"]), d
    assert 2.0 <= d["seconds"] < 6.0
    assert host.get()["version"] == "v2"


def test_reboot_serves_the_new_version(host: DemoHost) -> None:
    host.configure()
    first_deploy(host)
    code, r = host.zdd_json("swap", "demo", "--version", "v2")
    assert code == 0, r
    host.sb.reboot()
    deadline = time.monotonic() + 30
    while True:
        try:
            assert host.get()["version"] == "v2"
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    code, st = host.zdd_json("status", "demo")
    assert st[0]["serving"] == "v2"
    inst = {i["version"]: i for i in st[0]["instances"]}
    assert inst["v2"]["enabled"] == "enabled" and inst["v2"]["active"] == "active"
    assert "v1" not in inst or inst["v1"]["enabled"] != "enabled"


def test_rollback_returns_to_the_previous_version(host: DemoHost) -> None:
    host.configure()
    code, r = host.zdd_json("rollback", "demo")
    assert code == 7 and r["class"] == "no_history" and "no previous version" in r["error"]
    first_deploy(host)
    host.zdd_json("swap", "demo", "--version", "v2")
    code, r = host.zdd_json("rollback", "demo")
    assert code == 0 and r["to_version"] == "v1" and r["from_version"] == "v2", r
    assert host.get()["version"] == "v1"
    code, r = host.zdd_json("swap", "demo", "--version", "v1")
    assert code == 0 and r["result"] == "unchanged"


def test_second_swap_while_one_runs_is_refused(host: DemoHost) -> None:
    host.release("v3", "--never-ready")
    host.configure(deadline="4s")
    first_deploy(host)
    slow: dict = {}
    t = threading.Thread(target=lambda: slow.update(
        r=host.zdd_json("swap", "demo", "--version", "v3")))
    t.start()
    time.sleep(1.5)
    r = host.zdd("swap", "demo", "--version", "v2")
    t.join(timeout=60)
    assert r.returncode == 3, (r.stdout, r.stderr)
    assert "a swap of demo is already running" in r.stderr
    assert slow["r"][0] == 4
    assert host.get()["version"] == "v1"


def test_status_counts_connections_per_instance(host: DemoHost) -> None:
    host.configure()
    first_deploy(host)
    load = host.load(clients=16, seconds=30)
    try:
        time.sleep(1)
        code, st = host.zdd_json("status")
        table = host.zdd("status")
    finally:
        load.stop()
    assert code == 0
    inst = {i["version"]: i for i in st[0]["instances"]}
    assert inst["v1"]["connections"] == 16
    assert st[0]["socket"]["active"] == "active"
    assert "demo" in table.stdout and "v1" in table.stdout and "active (running)" in table.stdout


def test_bad_input_is_refused_and_nothing_changes(host: DemoHost) -> None:
    unit_dir = host.sb.path("/etc/systemd/system")
    state_dir = host.sb.path("/var/lib/zdd-agent")
    before = sorted(p.name for p in unit_dir.iterdir())
    good = host.configure()
    good_text = good.read_text()
    cases = [
        (good_text.replace("grace_period: 10s", "grace_period: 0s"), "drain.grace_period"),
        (good_text + "colour: blue\n", "colour"),
        (good_text.replace("name: demo", "name: Demo"), "name"),
        (good_text.replace("command: /", "command: "), "command"),
        ("name: demo\ncommand: [unclosed\n", "not valid YAML"),
    ]
    for text, key in cases:
        host.configure(text=text)
        r = host.zdd("swap", "demo", "--version", "v1")
        assert r.returncode == 2, (text, r.stderr)
        assert f"{CONFIG_DIR}/demo.yaml" in r.stderr and key in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr  # one clear line
    code, err = host.zdd_json("swap", "demo", "--version", "v1")
    assert code == 2 and err["class"] == "config" and err["file"].endswith("demo.yaml")
    host.configure(text=good_text)
    good.chmod(0o666)
    r = host.zdd("swap", "demo", "--version", "v1")
    assert r.returncode == 2 and "writable by group or others" in r.stderr
    good.chmod(0o644)
    for version, words in (("v9", "/var/lib/zdd-demo/releases/v9/bin/api not found"),
                           ("../v1", "invalid version")):
        r = host.zdd("swap", "demo", "--version", version)
        assert r.returncode == 2 and words in r.stderr, r.stderr
    assert sorted(p.name for p in unit_dir.iterdir()) == before
    assert not state_dir.exists() or not any((state_dir / "services").glob("*"))


def test_sysctl_apply_check_restore_in_the_sandbox_netns(host: DemoHost) -> None:
    host.configure()
    r = host.zdd("sysctl", "check")
    assert r.returncode == 6 and "net.core.somaxconn" in r.stdout
    code, out = host.zdd_json("sysctl", "apply")
    applied = out["changed"]
    assert code == 0 and {c["key"] for c in applied} >= {"net.core.somaxconn",
                                                         "net.ipv4.ip_local_reserved_ports"}
    assert out["missing"] == []  # this kernel has tcp_migrate_req
    read = host.sb.run(["cat", "/proc/sys/net/core/somaxconn",
                        "/proc/sys/net/ipv4/ip_local_reserved_ports"], capture=True).stdout
    assert read.split() == ["65535", "8080"]
    code, check = host.zdd_json("sysctl", "check")
    assert code == 0 and check["ok"] is True
    code, out = host.zdd_json("sysctl", "restore")
    assert code == 0 and {c["key"] for c in out["restored"]} == {c["key"] for c in applied}
    assert host.zdd("sysctl", "check").returncode == 6


def test_demo_command_reports_zero_failures() -> None:
    import os

    if os.geteuid() != 0:
        import pytest

        pytest.skip("the demo needs root")
    from agent.demo.run import run_demo

    report = run_demo(swaps=2, clients=32)
    assert report["ok"] and report["failed"] == 0 and report["requests"] > 1000
    assert [s["result"] for s in report["swaps"]] == ["ok", "ok"]
    json.dumps(report)


def test_reuseport_mode_swaps_under_load(host: DemoHost) -> None:
    cfg = host.configure()
    cfg.write_text(cfg.read_text().replace('listen: ["127.0.0.1:8080"]',
                                           'listen: ["127.0.0.1:8080"]\nsocket: reuseport'))
    host.sb.run(["sh", "-c", "echo 0 > /proc/sys/net/ipv4/tcp_migrate_req"])
    first = host.zdd("swap", "demo", "--version", "v1")
    assert first.returncode == 0, first.stderr
    assert "set net.ipv4.tcp_migrate_req = 1 (was 0)" in first.stderr
    assert host.sb.run(["cat", "/proc/sys/net/ipv4/tcp_migrate_req"],
                       capture=True).stdout.strip() == "1"
    assert not host.sb.path("/etc/systemd/system/zdd-demo.socket").exists()
    results, k, f = swaps_under_mixed_load(host, SWAPS)
    print(f"reuseport, 5 swaps: {k.requests} + {f.requests} requests, "
          f"{k.failed} + {f.failed} failed")
    assert [r["result"] for r in results] == ["ok"] * len(SWAPS), \
        [(r["result"], r["reason"]) for r in results]
    assert all(r["drain"]["connections_at_start"] > 0 for r in results)
    assert k.failed == 0 and f.failed == 0, (k, f)
    code, st = host.zdd_json("status", "demo")
    assert st[0]["socket"]["mode"] == "reuseport" and st[0]["serving"] == SWAPS[-1]


def test_hooks_run_with_the_swap_environment(host: DemoHost) -> None:
    hook = host.sb.path("/var/lib/zdd-demo/hook")
    hook.write_text("#!/bin/sh\necho \"$ZDD_PHASE $ZDD_SERVICE $ZDD_FROM_VERSION->$ZDD_TO_VERSION\""
                    " >> /var/lib/zdd-demo/hook.log\n"
                    "[ \"$ZDD_TO_VERSION\" != v3 ] || [ \"$ZDD_PHASE\" != pre_swap ]\n")
    hook.chmod(0o755)
    cfg = host.configure()
    cfg.write_text(cfg.read_text() + "hooks:\n"
                   "  pre_swap: {command: /var/lib/zdd-demo/hook, timeout: 5s}\n"
                   "  post_swap: {command: /var/lib/zdd-demo/hook}\n")
    host.release("v3")
    first_deploy(host)
    code, r = host.zdd_json("swap", "demo", "--version", "v2")
    assert code == 0 and r["hooks"] == {"pre_swap": "ok: exit 0", "post_swap": "ok: exit 0"}
    code, r = host.zdd_json("swap", "demo", "--version", "v3")  # pre_swap refuses v3
    assert code == 4 and r["result"] == "aborted", r
    assert host.get()["version"] == "v2"
    code, st = host.zdd_json("status", "demo")
    assert [i["version"] for i in st[0]["instances"]] == ["v2"]  # v3 never started
    log = host.sb.path("/var/lib/zdd-demo/hook.log").read_text().splitlines()
    assert log == ["pre_swap demo ->v1", "post_swap demo ->v1", "pre_swap demo v1->v2",
                   "post_swap demo v1->v2", "pre_swap demo v2->v3"]


def test_doctor_on_a_live_service(host: DemoHost) -> None:
    host.configure(ready="http")
    host.zdd("sysctl", "apply", check=True)
    first_deploy(host)
    code, report = host.zdd_json("doctor")
    checks = {(f["subject"], f["check"]): f for f in report["findings"]}
    assert checks[("demo", "drain-signal")]["level"] == "ok"  # the demo API handles SIGTERM
    assert checks[("host", "sysctl")]["level"] == "ok"
    assert checks[("host", "systemd")]["level"] == "ok"
    memory = checks[("demo", "memory")]
    print("doctor, memory:", memory["cause"])
    assert memory["level"] == "ok" and "MiB per instance" in memory["cause"]
    # a release whose start script runs the program without exec: SIGTERM
    # reaches the shell only (the inner sh passes the listener on with the
    # right LISTEN_PID, so the program itself still serves)
    wrapper = host.sb.path("/var/lib/zdd-demo/releases/v9/bin/api")
    wrapper.parent.mkdir(parents=True)
    real = host.sb.path("/var/lib/zdd-demo/releases/v2/bin/api")
    python = real.read_text().splitlines()[0][2:]
    wrapper.write_text("#!/bin/sh\n/bin/sh -c 'export LISTEN_PID=$$; exec "
                       f"{python} /var/lib/zdd-demo/releases/v2/bin/api'\n")
    wrapper.chmod(0o755)
    code, r = host.zdd_json("swap", "demo", "--version", "v9")
    assert code == 0, (r["reason"], r["journal"])
    code, report = host.zdd_json("doctor")
    assert code == 8
    bad = {f["check"]: f for f in report["findings"] if f["subject"] == "demo"}
    assert "pid1-wrapper" in bad, (report, host.sb.run(["ps", "-ef"], capture=True).stdout)
    assert bad["pid1-wrapper"]["level"] == "fail" and "exec" in bad["pid1-wrapper"]["fix"]
    human = host.zdd("doctor")
    assert human.returncode == 8 and "symptom:" in human.stdout and "fix:" in human.stdout


def test_four_replicas_roll_with_surge_under_load_and_a_failing_batch_rolls_back(
        host: DemoHost) -> None:
    cfg = host.configure()
    cfg.write_text(cfg.read_text() + "replicas: 4\nstrategy:\n  max_surge: 25%\n"
                                     "  max_unavailable: 0\n")
    host.release("v3", "--fail-instance", "v3-2")
    code, r = host.zdd_json("swap", "demo", "--version", "v1")
    assert code == 0 and r["plan"] == "+4", r

    def serving() -> list[str]:
        _code, st = host.zdd_json("status", "demo")
        return sorted(i["instance"] for i in st[0]["instances"] if i["active"] == "active")

    assert serving() == ["v1-1", "v1-2", "v1-3", "v1-4"]
    code, plan = host.zdd_json("swap", "demo", "--version", "v2", "--dry-run")
    assert code == 0 and plan["plan"] == "+1 -1, +1 -1, +1 -1, +1 -1"
    assert plan["old_instances"] == ["v1-1", "v1-2", "v1-3", "v1-4"]
    assert serving() == ["v1-1", "v1-2", "v1-3", "v1-4"]  # a dry run changes nothing
    keep = host.load(clients=32, seconds=90)
    fresh = host.load(clients=32, seconds=90, keepalive=False)
    try:
        results = swap_many(host, ["v2", "v1"], pause=1.0)
        time.sleep(0.5)
        code, failed = host.zdd_json("swap", "demo", "--version", "v3")
        time.sleep(0.5)
    finally:
        k, f = keep.stop(), fresh.stop()
    print(f"4 replicas, 2 rolling swaps + 1 rolled back: {k.requests} + {f.requests} requests, "
          f"{k.failed} + {f.failed} failed; plans {[r['plan'] for r in results]}")
    assert [r["result"] for r in results] == ["ok", "ok"], \
        [(r["result"], r["reason"]) for r in results]
    assert all(r["plan"] == "+1 -1, +1 -1, +1 -1, +1 -1" for r in results)
    assert code == 4 and "v3-2 exited during start-up" in failed["reason"], failed
    # v1-1 had been replaced by v3-1 in batch 1; the rollback brought it back
    assert serving() == ["v1-1", "v1-2", "v1-3", "v1-4"]
    assert k.failed == 0 and f.failed == 0, (k, f)
