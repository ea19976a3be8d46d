"""Issue 13: what the agent runs runs with the service's privileges, and
what it runs as root is root's alone; in a sandboxed systemd."""

from __future__ import annotations

import json
import os
import textwrap
import time

import pytest

from agent.demo.run import RELEASES, DemoHost

pytestmark = pytest.mark.e2e

HOOK = """\
#!/bin/sh
# what a hook sees: its user, the service's environment, the swap's
echo "$ZDD_PHASE $(id -un) $GREETING $ZDD_TO_VERSION" >> /var/lib/zdd-demo/out/hook.log
echo "hook $ZDD_PHASE ran"  # to the journal
if [ "$ZDD_PHASE" = post_swap ] && [ "$ZDD_TO_VERSION" = v2 ]; then
    sleep 300 &  # a child left behind: the timeout ends the whole cgroup
    echo "lingering $!" >> /var/lib/zdd-demo/out/hook.log
    sleep 60
fi
"""
PROBE = """\
#!/bin/sh
id -un > /var/lib/zdd-demo/out/probe.user
exec /usr/bin/curl -sf -o /dev/null "http://127.0.0.1:$1/ready"
"""


USER_APP = "/var/lib/zdd-demo/userapp"
# A release a non-root user can run: the machine's python3 (the virtualenv's
# interpreter may live under /root) and copies of the stdlib-only demo API
# and drain kit.
USER_RELEASE = """\
#!/usr/bin/python3
import sys
sys.path.insert(0, "{lib}")
from demo_api import main
sys.argv = [sys.argv[0], "--version", "{version}", *sys.argv[1:]]
sys.exit(main())
"""


def user_releases(host: DemoHost) -> str:
    """v1 and v2 of the demo API under USER_APP, readable by everyone."""
    import shutil

    import agent.demo.api
    import zdd_drain

    lib = host.sb.path(f"{USER_APP}/lib")
    (lib / "zdd_drain").mkdir(parents=True)
    shutil.copy(zdd_drain.__file__, lib / "zdd_drain" / "__init__.py")
    shutil.copy(agent.demo.api.__file__, lib / "demo_api.py")
    for version in ("v1", "v2"):
        script(host, f"{USER_APP}/{version}/bin/api",
               USER_RELEASE.format(lib=f"{USER_APP}/lib", version=version))
    host.sb.run(["chmod", "-R", "a+rX", USER_APP])
    return f"{USER_APP}/{{version}}/bin/api"


def config(user: str | None, hook: str = "/var/lib/zdd-demo/hook",
           command: str = f"{RELEASES}/{{version}}/bin/api") -> str:
    return textwrap.dedent(f"""\
        name: demo
        command: {command}
        listen: ["127.0.0.1:8080"]
        environment: {{GREETING: hello}}
        ready: {{type: exec, command: [/var/lib/zdd-demo/probe, "{{instance_port}}"],
                 period: 1s, timeout: 1s, deadline: 20s}}
        drain: {{grace_period: 10s}}
        strategy: {{min_ready: 1s}}
        hooks:
          pre_swap: {{command: {hook}, timeout: 5s}}
          post_swap: {{command: {hook}, timeout: 2s}}
        """) + (f"user: {user}\n" if user else "")


def script(host: DemoHost, path: str, text: str, mode: int = 0o755) -> None:
    p = host.sb.path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    os.chown(p, 0, 0)
    os.chmod(p, mode)


def test_hooks_and_exec_probes_run_as_the_services_user(host: DemoHost) -> None:
    host.sb.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                 "zddapp"])
    uid = int(host.sb.run(["id", "-u", "zddapp"], capture=True).stdout)
    command = user_releases(host)
    out = host.sb.path("/var/lib/zdd-demo/out")
    out.mkdir(parents=True)
    os.chown(out, uid, uid)
    script(host, "/var/lib/zdd-demo/hook", HOOK)
    script(host, "/var/lib/zdd-demo/probe", PROBE)
    host.configure(text=config("zddapp", command=command))
    code, r = host.zdd_json("swap", "demo", "--version", "v1")
    assert code == 0 and r["hooks"] == {"pre_swap": "ok: exit 0 hook pre_swap ran",
                                        "post_swap": "ok: exit 0 hook post_swap ran"}, \
        "\n".join([r["reason"], str(r["hooks"]), *r["journal"]])
    t = time.monotonic()
    code, r = host.zdd_json("swap", "demo", "--version", "v2")
    took = time.monotonic() - t
    assert code == 0 and r["result"] == "ok", r
    # post_swap overran its 2 s: killed with its child, reported, the swap stands
    assert r["hooks"]["post_swap"] == "failed: timed out after 2s", r["hooks"]
    log = (out / "hook.log").read_text().splitlines()
    print(f"hooks as zddapp: {log}; probe ran as "
          f"{(out / 'probe.user').read_text().strip()}; swap with the timed-out hook "
          f"{took:.1f}s")
    assert log[:4] == ["pre_swap zddapp hello v1", "post_swap zddapp hello v1",
                       "pre_swap zddapp hello v2", "post_swap zddapp hello v2"]
    child = int(log[4].split()[1])
    assert not host.sb.path(f"/proc/{child}").exists()  # the whole cgroup went
    assert (out / "probe.user").read_text().strip() == "zddapp"
    assert took < 20
    # their output is in the journal, under units named for them
    lines = host.sb.run(["journalctl", "--no-pager", "-o", "json", "MESSAGE=hook post_swap ran"],
                        capture=True).stdout.splitlines()
    units = [json.loads(line).get("_SYSTEMD_UNIT", "") for line in lines]
    assert len(units) == 2 and all(u.startswith("zdd-post-swap-demo-") for u in units), units


def test_a_hook_run_as_root_that_others_can_change_is_refused(host: DemoHost) -> None:
    script(host, "/var/lib/zdd-demo/probe", PROBE)
    script(host, "/var/lib/zdd-demo/hook", HOOK, mode=0o775)
    host.sb.path("/var/lib/zdd-demo/out").mkdir(parents=True)
    host.configure(text=config(None))
    r = host.zdd("swap", "demo", "--version", "v1")
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert ("hooks.pre_swap.command: /var/lib/zdd-demo/hook runs as root, but the file "
            "/var/lib/zdd-demo/hook is writable by group or others (mode 0775)") in r.stderr
    assert not host.sb.path("/var/lib/zdd-demo/out/hook.log").exists()  # nothing ran
    os.chmod(host.sb.path("/var/lib/zdd-demo/hook"), 0o755)
    code, res = host.zdd_json("swap", "demo", "--version", "v1")
    assert code == 0 and res["result"] == "ok", res
    log = host.sb.path("/var/lib/zdd-demo/out/hook.log").read_text().splitlines()
    assert log == ["pre_swap root hello v1", "post_swap root hello v1"]


def test_allow_from_serves_one_peer_and_refuses_another(host: DemoHost) -> None:
    """Two addresses of a network namespace the test makes, beside the
    sandbox: allow_from lists one. systemd's cgroup BPF firewall on the
    socket unit serves it and drops the other, across swaps under load."""
    import subprocess

    netns = f"zdd-allow-{os.getpid()}"

    def run(argv: list[str]) -> None:
        subprocess.run(argv, check=True, capture_output=True, timeout=30)

    def curl(source: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", netns, "curl", "-s", "--max-time", "2",
                               "--interface", source, "http://10.232.0.1:8080/"],
                              capture_output=True, text=True, timeout=30)

    run(["ip", "netns", "add", netns])
    try:
        run(["ip", "-n", netns, "link", "set", "lo", "up"])
        run(["ip", "link", "add", "c0", "netns", netns, "type", "veth", "peer", "name", "eth0",
             "netns", str(host.sb.pid)])
        for a in ("10.232.0.2/24", "10.232.0.3/24"):
            run(["ip", "-n", netns, "addr", "add", a, "dev", "c0"])
        run(["ip", "-n", netns, "link", "set", "c0", "up"])
        host.sb.run(["ip", "addr", "add", "10.232.0.1/24", "dev", "eth0"], net_only=True)
        host.sb.run(["ip", "link", "set", "eth0", "up"], net_only=True)
        host.configure(text=textwrap.dedent(f"""\
            name: demo
            command: {RELEASES}/{{version}}/bin/api
            listen: ["8080"]
            allow_from: [10.232.0.2]
            ready: {{type: notify, deadline: 20s}}
            drain: {{grace_period: 10s}}
            strategy: {{min_ready: 1s}}
            """))
        code, r = host.zdd_json("swap", "demo", "--version", "v1")
        assert code == 0, r
        sock = host.sb.path("/etc/systemd/system/zdd-demo.socket").read_text()
        assert "IPAddressAllow=localhost 10.232.0.2/32\nIPAddressDeny=any" in sock
        load = host.load(16, seconds=20)
        try:
            seen = []
            for version in ("v2", "v1"):
                allowed, refused = curl("10.232.0.2"), curl("10.232.0.3")
                seen.append((allowed.returncode, allowed.stdout.strip()[:40],
                             refused.returncode))
                code, r = host.zdd_json("swap", "demo", "--version", version)
                assert code == 0 and r["result"] == "ok", r
            allowed, refused = curl("10.232.0.2"), curl("10.232.0.3")
            seen.append((allowed.returncode, allowed.stdout.strip()[:40], refused.returncode))
        finally:
            res = load.stop(timeout=60)
        print(f"allow_from 10.232.0.2: (curl exit, body, the other's curl exit) {seen}; "
              f"loopback load {res.requests} requests, {res.failed} failed")
        for (ok_code, body, refused_code), version in zip(seen, ("v1", "v2", "v1")):
            assert ok_code == 0 and f'"version": "{version}"' in body, seen
            assert refused_code == 28, seen  # curl: timed out; the SYN was dropped
        assert res.failed == 0 and res.requests > 1000, res
    finally:
        subprocess.run(["ip", "netns", "del", netns], check=False, capture_output=True)
