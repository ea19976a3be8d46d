"""Issue 14: the settings production units carry reach each instance, read
back from systemd over D-Bus and from the process itself; the open-files
limit holds thousands of concurrent connections. In a sandboxed systemd."""

from __future__ import annotations

import json
import os
import sys
import textwrap
import time

import pytest

from agent.demo.run import RELEASES, DemoHost
from test_security_e2e import script, user_releases

pytestmark = pytest.mark.e2e

# 3,000 clients at once, each asking for an answer that takes 3 s (the
# issue's case). Prints: answered within the deadline, errors, and the time
# of the last answer. Bounded: every connection has the deadline.
CLIENT = r"""
import asyncio, json, resource, sys, time
N, MS, DEADLINE = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

async def one(t0):
    try:
        r, w = await asyncio.open_connection("127.0.0.1", 8080)
        w.write(f"GET /slow?ms={MS} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = await r.read()
        w.close()
        return ("ok", time.monotonic() - t0) if data.startswith(b"HTTP/1.1 200") else ("bad", 0)
    except OSError as e:
        return (type(e).__name__, 0)

async def main():
    t0 = time.monotonic()
    tasks = [asyncio.create_task(asyncio.wait_for(one(t0), DEADLINE)) for _ in range(N)]
    done = await asyncio.gather(*tasks, return_exceptions=True)
    ok = [t for k, t in (d for d in done if isinstance(d, tuple)) if k == "ok"]
    kinds = {}
    for d in done:
        k = d[0] if isinstance(d, tuple) else type(d).__name__
        kinds[k] = kinds.get(k, 0) + 1
    print(json.dumps({"answered": len(ok), "kinds": kinds, "last": max(ok, default=0)}))

asyncio.run(main())
"""


def demo_config(*extra: str, grace: str = "10s", deadline: str = "20s",
                strategy: str = "min_ready: 1s") -> str:
    """The demo API on 127.0.0.1:8080 with notify readiness, `extra` lines
    appended."""
    return textwrap.dedent(f"""\
        name: demo
        command: {RELEASES}/{{version}}/bin/api
        listen: ["127.0.0.1:8080"]
        ready: {{type: notify, deadline: {deadline}}}
        drain: {{grace_period: {grace}}}
        strategy: {{{strategy}}}
        """) + "".join(f"{line}\n" for line in extra)


def concurrent(host: DemoHost, n: int, ms: int, deadline: float) -> dict[str, object]:
    path = host.sb.root / "client.py"  # net_only: the machine's file system
    path.write_text(CLIENT)
    r = host.sb.run([sys.executable, str(path), str(n), str(ms),
                     str(deadline)], capture=True, net_only=True)
    return dict(json.loads(r.stdout))


def show(host: DemoHost, unit: str, *props: str) -> dict[str, str]:
    """systemctl show: the unit's properties as systemd holds them (over D-Bus)."""
    out = host.sb.run(["systemctl", "show", unit, *(f"-p{p}" for p in props)],
                      capture=True).stdout
    props: dict[str, str] = {}
    for line in out.splitlines():  # a list property comes as one line per entry
        key, _, value = line.partition("=")
        props[key] = f"{props[key]} {value}" if key in props else value
    return props


def main_pid(host: DemoHost, unit: str) -> int:
    return int(show(host, unit, "MainPID")["MainPID"])


def test_open_files_default_holds_3000_concurrent_connections(host: DemoHost) -> None:
    """With 1,024 open files (systemd's default soft limit) most of 3,000
    concurrent clients wait; with the agent's default all are answered."""
    for v in ("v1", "v2"):
        host.release(v)
    base = demo_config()
    host.configure(text=base + "limits: {nofile: 1024}\n")
    code, r = host.zdd_json("swap", "demo", "--version", "v1")
    assert code == 0, r
    low = concurrent(host, 3000, 3000, 8.0)
    limit1 = show(host, "zdd-demo@v1.service", "LimitNOFILESoft")["LimitNOFILESoft"]
    host.configure(text=base)
    code, r = host.zdd_json("swap", "demo", "--version", "v2")
    assert code == 0 and r["result"] == "ok", r
    props = show(host, "zdd-demo@v2.service", "LimitNOFILE", "LimitNOFILESoft")
    pid = main_pid(host, "zdd-demo@v2.service")
    soft = int(next(ln for ln in host.sb.path(f"/proc/{pid}/limits").read_text().splitlines()
                    if ln.startswith("Max open files")).split()[3])
    high = concurrent(host, 3000, 3000, 8.0)
    explained = host.zdd("check-config", "/etc/zdd-agent/services/demo.yaml")
    print(f"3,000 clients x 3 s answers: nofile {limit1}: {low}; default "
          f"(LimitNOFILE={props['LimitNOFILE']}, the process got {soft}): {high}; "
          f"check-config: {explained.stdout.strip()} {explained.stderr.strip()}")
    assert limit1 == "1024"
    assert low["answered"] < 3000  # the control: the limit is what made clients wait
    assert high["answered"] == 3000 and high["kinds"] == {"ok": 3000}, high
    assert props["LimitNOFILE"] == props["LimitNOFILESoft"] == "65536"
    # systemd gives the closest it may: the sandbox's manager is held to 20,000
    pid1 = next(ln for ln in host.sb.path("/proc/1/limits").read_text().splitlines()
                if ln.startswith("Max open files")).split()[4]
    assert soft == min(65536, int(pid1)) >= 3000
    assert f"instances get {soft}" in explained.stderr or soft == 65536


def test_unit_settings_reach_the_instance(host: DemoHost) -> None:
    for argv in (["groupadd", "--system", "zddgrp"], ["groupadd", "--system", "zddextra"],
                 ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                  "zddapp"]):
        host.sb.run(argv)
    ids = {n: int(host.sb.run(["getent", "group", n], capture=True).stdout.split(":")[2])
           for n in ("zddgrp", "zddextra")}
    uid = int(host.sb.run(["id", "-u", "zddapp"], capture=True).stdout)
    command = user_releases(host)
    app = "/var/lib/zdd-demo/app"
    for v, release in (("v1", "one"), ("v2", "two")):
        host.sb.path(f"{app}/{v}").mkdir(parents=True)
        host.sb.path(f"{app}/{v}/env").write_text(f"APP_RELEASE={release}\n")
    host.sb.path("/etc/demo").mkdir()
    host.sb.path("/etc/demo/env").write_text("APP_GREETING=from-file\nAPP_RELEASE=base\n")
    for d in ("data", "other"):
        host.sb.path(f"/var/lib/zdd-demo/{d}").mkdir()
        os.chown(host.sb.path(f"/var/lib/zdd-demo/{d}"), uid, ids["zddgrp"])
    host.configure(text=textwrap.dedent(f"""\
        name: demo
        command: {command}
        listen: ["127.0.0.1:8080"]
        user: zddapp
        group: zddgrp
        supplementary_groups: [zddextra]
        working_directory: {app}/{{version}}
        environment_files: [/etc/demo/env, "{app}/{{version}}/env"]
        limits: {{nofile: 4096, nproc: 512, core: 0}}
        resources: {{memory_max: 256M, memory_high: 200M, cpu_quota: 150%, tasks_max: 64}}
        oom_score_adjust: 100
        kill_mode: mixed
        hardening:
          ProtectSystem: strict
          ProtectHome: true
          PrivateTmp: true
          NoNewPrivileges: true
          ReadWritePaths: [/var/lib/zdd-demo/data]
          CapabilityBoundingSet: []
          RestrictAddressFamilies: [AF_UNIX, AF_INET, AF_INET6]
          RestrictNamespaces: true
          UMask: "0027"
        ready: {{type: notify, deadline: 20s}}
        drain: {{grace_period: 10s}}
        strategy: {{min_ready: 1s}}
        hooks: {{pre_swap: {{command: /var/lib/zdd-demo/hook, timeout: 10s}}}}
        """))
    # a hook shares the instances' group, environment files and directory
    script(host, "/var/lib/zdd-demo/hook", "#!/bin/sh\necho \"$ZDD_TO_VERSION $(id -gn) "
           "$APP_RELEASE $APP_GREETING $(pwd)\" >> /var/lib/zdd-demo/data/hook.log\n")
    seen = {}
    for v, release in (("v1", "one"), ("v2", "two")):
        code, r = host.zdd_json("swap", "demo", "--version", v)
        assert code == 0 and r["result"] == "ok", r
        seen[v] = host.get("/info?w=/var/lib/zdd-demo/data&w=/var/lib/zdd-demo/other")
        got = seen[v]
        assert got["uid"] == uid and got["gid"] == ids["zddgrp"]
        assert ids["zddextra"] in got["groups"]
        assert got["cwd"] == f"{app}/{v}"
        # the later file overrides the earlier one, {version} filled in
        assert got["env"] == {"APP_GREETING": "from-file", "APP_RELEASE": release}
        assert got["nofile"] == 4096
        # ProtectSystem=strict: read-only but for ReadWritePaths, though zddapp owns both
        assert got["writable"] == {"/var/lib/zdd-demo/data": True,
                                   "/var/lib/zdd-demo/other": False}
    unit = "zdd-demo@v2.service"
    props = show(host, unit, "User", "Group", "SupplementaryGroups", "WorkingDirectory",
                 "EnvironmentFiles", "LimitNOFILE", "LimitNPROC", "LimitCORE", "MemoryMax",
                 "MemoryHigh", "CPUQuotaPerSecUSec", "TasksMax", "OOMScoreAdjust", "KillMode",
                 "ProtectSystem", "ProtectHome", "PrivateTmp", "NoNewPrivileges",
                 "ReadWritePaths", "CapabilityBoundingSet", "RestrictAddressFamilies",
                 "RestrictNamespaces", "UMask")
    print(f"instance settings: /info v1 {seen['v1']}; systemd: {props}")
    expected = {"User": "zddapp", "Group": "zddgrp", "SupplementaryGroups": "zddextra",
                "WorkingDirectory": f"{app}/v2", "LimitNOFILE": "4096", "LimitNPROC": "512",
                "LimitCORE": "0", "MemoryMax": str(256 << 20), "MemoryHigh": str(200 << 20),
                "CPUQuotaPerSecUSec": "1.500000s", "TasksMax": "64",
                # the start value (a surge), lowered to 100 once admitted (below)
                "OOMScoreAdjust": "1000",
                "KillMode": "mixed", "ProtectSystem": "strict", "ProtectHome": "yes",
                "PrivateTmp": "yes", "NoNewPrivileges": "yes",
                "ReadWritePaths": "/var/lib/zdd-demo/data", "CapabilityBoundingSet": "",
                "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",  # systemd sorts
                "RestrictNamespaces": "yes", "UMask": "0027"}
    assert {k: props.get(k) for k in expected} == expected
    assert props["EnvironmentFiles"].split() == ["/etc/demo/env", "(ignore_errors=no)",
                                                 f"{app}/v2/env", "(ignore_errors=no)"]
    pid = main_pid(host, unit)
    assert host.sb.path(f"/proc/{pid}/oom_score_adj").read_text().strip() == "100"
    # the kernel holds the instance to memory_max (cgroup v1 here, v2 elsewhere)
    cg = show(host, unit, "ControlGroup")["ControlGroup"]
    limits = [host.sb.path(p) for p in (f"/sys/fs/cgroup{cg}/memory.max",
                                        f"/sys/fs/cgroup/memory{cg}/memory.limit_in_bytes")]
    assert [p.read_text().strip() for p in limits if p.exists()] == [str(256 << 20)]
    hook = host.sb.path("/var/lib/zdd-demo/data/hook.log").read_text().splitlines()
    assert hook == [f"v1 zddgrp one from-file {app}/v1", f"v2 zddgrp two from-file {app}/v2"]
    # a version whose environment file is missing is refused before anything starts
    host.sb.path(f"{app}/v3").mkdir()
    host.sb.run(["cp", "-a", "/var/lib/zdd-demo/userapp/v2", "/var/lib/zdd-demo/userapp/v3"])
    r3 = host.zdd("swap", "demo", "--version", "v3")
    assert r3.returncode == 2, (r3.stdout, r3.stderr)
    assert f"environment_files: {app}/v3/env: No such file or directory" in r3.stderr
    assert show(host, "zdd-demo@v3.service", "LoadState", "ActiveState")["ActiveState"] \
        == "inactive"
    assert host.get()["version"] == "v2" and main_pid(host, unit) == pid


def test_a_new_instance_the_oom_killer_takes_rolls_back_and_the_old_one_serves(
        host: DemoHost) -> None:
    """slice.memory_max holds v1 and a small surge, not a v2 that allocates
    300 MiB at start-up: the OOM killer takes v2 (it starts at
    oom_score_adj 1000), the swap rolls back saying so, v1 serves on at
    its admitted score; under load, no request fails."""
    host.release("v1", "--allocate", "32")
    host.release("v2", "--allocate", "304")
    host.release("v3", "--allocate", "32")
    host.configure(text=demo_config("slice: {memory_max: 192M}", "oom_score_adjust: 0",
                                    deadline="30s", strategy="min_ready: 2s"))
    code, r = host.zdd_json("swap", "demo", "--version", "v1")
    assert code == 0, r
    v1 = main_pid(host, "zdd-demo@v1.service")
    assert host.sb.path(f"/proc/{v1}/oom_score_adj").read_text().strip() == "0"
    load = host.load(16, seconds=40)
    try:
        code, r = host.zdd_json("swap", "demo", "--version", "v2")
        after_v2 = host.get()["version"]
        code3, r3 = host.zdd_json("swap", "demo", "--version", "v3")
    finally:
        res = load.stop(timeout=60)
    v3 = main_pid(host, "zdd-demo@v3.service") if code3 == 0 else 0
    kmsg = [ln for ln in host.sb.run(["dmesg"], capture=True, check=False).stdout.splitlines()
            if "zdd-demo@v2.service" in ln or "Killed process" in ln][-2:]
    print(f"OOM surge: v2 {r['result']}: {r['reason']}; then v3 {r3.get('result')}; load "
          f"{res.requests} requests, {res.failed} failed; kernel: {kmsg}")
    assert code == 4 and r["result"] == "rolled_back", r
    assert "the OOM killer took" in r["reason"] and "zdd-demo.slice" in r["reason"], r["reason"]
    assert after_v2 == "v1" and main_pid(host, "zdd-demo@v1.service") in (v1, 0)
    assert res.requests > 0 and res.failed == 0, res
    # the next version that fits swaps in, and is no longer the first pick once admitted
    assert code3 == 0 and r3["result"] == "ok", r3
    assert show(host, "zdd-demo@v3.service", "OOMScoreAdjust")["OOMScoreAdjust"] == "1000"
    assert host.sb.path(f"/proc/{v3}/oom_score_adj").read_text().strip() == "0"


def test_a_rollback_puts_the_old_versions_unit_files_back(host: DemoHost) -> None:
    """A config whose hardening kills v2 rolls back; v1 must restart (a
    crash, a reboot) with the unit it ran with, not the rejected one."""
    for v in ("v1", "v2"):
        host.release(v)
    base = demo_config(grace="5s")
    host.configure(text=base)
    code, r = host.zdd_json("swap", "demo", "--version", "v1")
    assert code == 0, r
    template = host.sb.path("/etc/systemd/system/zdd-demo@.service")
    before = template.read_text()
    host.configure(text=base + 'hardening: {SystemCallFilter: ["~@network-io"]}\n')
    code, r = host.zdd_json("swap", "demo", "--version", "v2")
    assert code == 4 and r["result"] == "rolled_back", r
    assert "SIGSYS" in r["reason"], r["reason"]
    assert template.read_text() == before
    assert any("unit files put back" in w for w in r["warnings"]), r["warnings"]
    pid = main_pid(host, "zdd-demo@v1.service")
    host.sb.run(["kill", "-9", str(pid)])  # v1 crashes: systemd restarts it from its unit
    deadline = time.monotonic() + 20
    while True:
        st = show(host, "zdd-demo@v1.service", "MainPID", "NRestarts", "ActiveState")
        if st["ActiveState"] == "active" and st["MainPID"] not in ("0", str(pid)):
            try:
                if host.get()["version"] == "v1":
                    break
            except Exception:
                pass
        assert time.monotonic() < deadline, st
        time.sleep(0.2)
    print(f"rollback of a v2 its hardening kills: {r['reason']}; unit files put back; v1 "
          f"restarted after a SIGKILL ({st}) and serves")


def test_a_rollback_restarts_old_replicas_from_their_own_drop_ins(host: DemoHost) -> None:
    """replicas 2, stop-first (max_surge 0): v1-1 is drained before v2-1
    starts; v2-1 fails, and the rollback starts v1-1 again with the drop-in
    it ran with, not one rendered from the new config's command. A swap the
    pre_swap hook aborts puts the template back too."""
    for v in ("v1", "v2"):
        host.release(v)
    bad = host.sb.path(f"{RELEASES}/v2/bin/api2")
    bad.write_text("#!/bin/sh\nexit 1\n")
    bad.chmod(0o755)
    base = demo_config("replicas: 2", grace="5s",
                       strategy="min_ready: 1s, max_surge: 0, max_unavailable: 1")
    host.configure(text=base)
    code, r = host.zdd_json("swap", "demo", "--version", "v1")
    assert code == 0, r
    dropin = host.sb.path("/etc/systemd/system/zdd-demo@v1-1.service.d/zdd-instance.conf")
    before = dropin.read_text()
    host.configure(text=base.replace("/bin/api\n", "/bin/api2\n"))
    load = host.load(8, seconds=30)
    try:
        code, r = host.zdd_json("swap", "demo", "--version", "v2")
    finally:
        res = load.stop(timeout=60)
    assert code == 4 and r["result"] == "rolled_back", r
    assert dropin.read_text() == before
    states = {x: show(host, f"zdd-demo@{x}.service", "ActiveState")["ActiveState"]
              for x in ("v1-1", "v1-2", "v2-1")}
    assert states == {"v1-1": "active", "v1-2": "active", "v2-1": "inactive"}, states
    # an abort (pre_swap fails) after the new units were written
    template = host.sb.path("/etc/systemd/system/zdd-demo@.service").read_text()
    host.configure(text=base + 'hardening: {PrivateTmp: true}\n'
                   "hooks: {pre_swap: {command: /bin/false}}\n")
    code, ra = host.zdd_json("swap", "demo", "--version", "v2")
    assert code != 0 and ra["result"] == "aborted", ra
    assert host.sb.path("/etc/systemd/system/zdd-demo@.service").read_text() == template
    print(f"stop-first rollback: {r['reason']}; v1-1's drop-in kept; {states}; load "
          f"{res.requests} requests, {res.failed} failed; abort: {ra['warnings']}")
    assert res.failed == 0, res
