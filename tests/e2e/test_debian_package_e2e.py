"""The Debian packages in a fresh sandboxed host: apt installs the .debs that
scripts/build-deb made, the agent and python3-zdd-drain, the drain kit
(their dependencies are Debian's, already on the machine: no pip, no
compiler, no network), the units are enabled and not started, `zdd-agent
install` says what it leaves to the package manager and
starts the daemon on Debian's python3 and pystemd, then apt purges it and
nothing is left but the file the operator wrote. Everything dpkg writes
lands in the sandbox's overlays (agent/sandbox.py): the machine's own /usr,
/etc and /var never see the package."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.demo.release import make_release
from agent.sandbox import Sandbox
from debpkg import field, kit

OPERATOR_FILE = "/etc/zdd-agent/services/api.yaml"
# The operator's releases, inside the sandbox's /var overlay: the demo API of
# this checkout (agent/demo/release.py), which outlives the package
RELEASES = "/var/lib/e2e-api"
OPERATOR_CONFIG = f"""\
name: api
command: {RELEASES}/{{version}}/bin/api
listen: ["127.0.0.1:8080"]
"""
# Files of the package and of what it starts, on the machine: none may appear.
MACHINE_PATHS = ("/usr/bin/zdd-agent", "/usr/share/zdd-agent", "/lib/systemd/system/zdd.target",
                 "/var/lib/dpkg/info/zdd-agent.list", "/etc/zdd-agent/agent.yaml",
                 "/usr/lib/python3/dist-packages/zdd_drain")
APT_ENV = {"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}


@pytest.fixture
def fresh() -> Iterator[Sandbox]:
    if os.geteuid() != 0:
        pytest.skip("the sandbox needs root")
    assert shutil.which("apt-get") and shutil.which("dpkg")
    present = [p for p in MACHINE_PATHS if os.path.lexists(p)]
    assert not present, f"the machine itself has the package's files: {present}"
    sb = Sandbox().boot()
    try:
        # The machine's /usr/sbin/policy-rc.d (a container image's "exit 101")
        # forbids every service action of maintainer scripts, the prerm's stop
        # too; a real host has none. Removed in the sandbox's /usr overlay only.
        if sb.path("/usr/sbin/policy-rc.d").exists():
            sb.run(["rm", "/usr/sbin/policy-rc.d"])
        yield sb
    finally:
        sb.close()


def run(sb: Sandbox, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = sb.run(list(argv), capture=True, check=False, env=APT_ENV)
    if check:
        assert r.returncode == 0, f"{' '.join(argv)}: exit {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r


def wait_active(sb: Sandbox) -> None:
    """Type=notify: active once the daemon said READY=1."""
    deadline = time.monotonic() + 30
    while (state := run(sb, "systemctl", "is-active", "zdd-agent.service",
                        check=False).stdout.strip()) == "activating":
        assert time.monotonic() < deadline, "zdd-agent.service still activating after 30s"
        time.sleep(0.2)
    assert state == "active", run(sb, "journalctl", "-u", "zdd-agent.service", "--no-pager",
                                  check=False).stdout[-3000:]


def answer(sb: Sandbox) -> str | None:
    """The version the service on 127.0.0.1:8080 says it is (None: no answer)."""
    r = run(sb, "curl", "-s", "-m", "2", "http://127.0.0.1:8080/", check=False)
    try:
        return json.loads(r.stdout)["version"]
    except (ValueError, KeyError):
        return None


def later(deb: Path, out: Path, version: str) -> Path:
    """`deb` as a later build would be: the same files under `version`, its
    drain kit dependency (>= this version, as debian/control writes it)
    raised along; written into `out`."""
    tree = out / f"tree-{deb.name}"
    subprocess.run(["dpkg-deb", "-R", str(deb), str(tree)], check=True)
    control = tree / "DEBIAN" / "control"
    old = field(deb, "Version")
    text = control.read_text().replace(f"Version: {old}\n", f"Version: {version}\n")
    control.write_text(text.replace(f"python3-zdd-drain (>= {old})",
                                    f"python3-zdd-drain (>= {version})"))
    built = out / deb.name.replace(f"_{old}_", f"_{version}_")
    subprocess.run(["dpkg-deb", "--root-owner-group", "-b", str(tree), str(built)], check=True,
                   capture_output=True)
    shutil.rmtree(tree)
    return built


def zdd_files(upper: Path) -> set[str]:
    """Paths under the sandbox's overlay upper directories that say zdd:
    what the package, dpkg and the agent wrote and left."""
    return {str(p.relative_to(upper)) for p in upper.rglob("*")
            if "zdd" in str(p.relative_to(upper)).lower()}


def test_deb_installs_enabled_not_started_and_purges_clean(fresh: Sandbox, deb: Path) -> None:
    sb = fresh
    assert not zdd_files(sb.root / "upper")

    out = run(sb, "apt-get", "install", "-y", "--no-install-recommends", str(kit(deb)),
              str(deb)).stdout
    print(out[-1500:])
    assert "Setting up zdd-agent" in out and "Setting up python3-zdd-drain" in out
    # the two packages alone: their dependencies are Debian's, already in place
    assert "0 upgraded, 2 newly installed, 0 to remove" in out
    status = run(sb, "dpkg-query", "-W", "-f=${Status} ${Version}", "zdd-agent").stdout
    assert status.startswith("install ok installed ")

    # dpkg wrote into the sandbox's overlays, never into the machine
    assert (sb.root / "upper" / "usr" / "bin" / "zdd-agent").is_file()
    assert not [p for p in MACHINE_PATHS if os.path.lexists(p)]

    # Debian's python3 and the private module directory: no virtualenv
    version = run(sb, "zdd-agent", "--version").stdout.strip()
    print(version)
    assert version.startswith("zdd-agent 0.1.0 (Debian package zdd-agent; units in "
                              "/lib/systemd/system, data in /usr/share/zdd-agent)"), version
    assert run(sb, "head", "-1", "/usr/bin/zdd-agent").stdout.startswith("#!/usr/bin/python3")
    # a service on Debian's python3 imports the drain kit as it is (-I: no
    # PYTHONPATH, no user site)
    assert run(sb, "python3", "-I", "-c", "import zdd_drain; print(zdd_drain.__file__)"
               ).stdout.strip() == "/usr/lib/python3/dist-packages/zdd_drain/__init__.py"
    for unit in ("zdd-agent.service", "zdd-agent.socket"):
        assert run(sb, "systemctl", "is-enabled", unit, check=False).stdout.strip() == "enabled"
        assert run(sb, "systemctl", "is-active", unit, check=False).stdout.strip() == "inactive"
    assert run(sb, "getent", "group", "zdd-admin").stdout.startswith("zdd-admin:")
    assert not sb.path("/etc/sysctl.d/60-zdd-agent.conf").exists()

    # `zdd-agent install` leaves the units and sysctl.d file to the package
    # and starts the daemon
    first = run(sb, "zdd-agent", "install").stdout
    print(first)
    assert first.startswith("zdd-agent runs from the Debian package zdd-agent: its units and "
                            "sysctl.d file are left to the package manager")
    for path in ("/lib/systemd/system/zdd-agent.service",
                 "/usr/lib/sysctl.d/60-zdd-agent.conf"):
        assert f"package   {path} (left to the package manager: zdd-agent" in first, path
    # zdd.target is the agent's, as every swap writes it: it outlives the package
    assert "create    /etc/systemd/system/zdd.target" in first
    assert "enable    zdd.target" in first and "start     zdd-agent.service" in first
    assert not list(sb.path("/etc/systemd/system").glob("zdd-agent*"))  # nothing shadows them
    wait_active(sb)
    again = json.loads(run(sb, "zdd-agent", "install", "--json").stdout)
    assert again["changed"] is False and again["package"] == "zdd-agent", again
    state = json.loads(run(sb, "zdd-agent", "host-state", "--json").stdout)
    assert state["drained"] is False  # answered by the daemon: Debian's pystemd drives it
    # An upgrade, one apt run a file as the Ansible role installs them, the
    # kit first (the new kit must not break the old agent): it restarts the
    # running daemon (postinst: daemon-reload, try-restart) and leaves it
    # running; its control socket stays open throughout (commands wait in its
    # backlog).
    def show(unit: str, prop: str) -> str:
        return run(sb, "systemctl", "show", "-P", prop, unit).stdout.strip()

    up = Path(tempfile.mkdtemp(prefix="zdd-deb-up-", dir="/srv"))
    os.chmod(up, 0o755)
    newer = [later(kit(deb), up, "0.1.0+up1"), later(deb, up, "0.1.0+up1")]

    pid = show("zdd-agent.service", "MainPID")
    socket_since = show("zdd-agent.socket", "ActiveEnterTimestampMonotonic")
    # commands through the daemon all along the upgrade (bounded: 600 calls,
    # until the stop file)
    asking = sb.popen(["sh", "-c", "n=0; f=0; while [ $n -lt 600 ] && [ ! -e /run/zdd-e2e.stop ]; "
                       "do zdd-agent host-state >/dev/null 2>>/run/zdd-e2e.err || f=$((f+1)); "
                       "n=$((n+1)); "
                       "done; echo $n $f"], stdout=subprocess.PIPE, env=APT_ENV)
    try:
        time.sleep(1)
        for file in newer:
            out = run(sb, "apt-get", "install", "-y", "--no-install-recommends", str(file)).stdout
            assert "1 upgraded, 0 newly installed, 0 to remove" in out, out[-1500:]
        wait_active(sb)
        time.sleep(1)
    finally:
        sb.path("/run/zdd-e2e.stop").touch()
        asked, failed = map(int, asking.communicate(timeout=120)[0].split())
        shutil.rmtree(up)
    for pkg in ("zdd-agent", "python3-zdd-drain"):
        assert run(sb, "dpkg-query", "-W", "-f=${Version}", pkg).stdout == "0.1.0+up1"
    errors = [line for line in sb.path("/run/zdd-e2e.err").read_text().splitlines()
              if "no host_ready.listen" not in line]
    print(f"during the upgrade: {asked} commands, {failed} failed {errors}")
    assert asked >= 3 and failed == 0, (asked, failed, errors)
    again_pid = show("zdd-agent.service", "MainPID")
    assert pid != "0" and again_pid not in ("0", pid), (pid, again_pid)
    assert show("zdd-agent.socket", "ActiveEnterTimestampMonotonic") == socket_since
    assert show("zdd-agent.socket", "ActiveState") == "active"
    r = run(sb, "zdd-agent", "uninstall", check=False)
    assert r.returncode != 0 and "apt purge zdd-agent" in r.stderr, r.stderr

    # the operator deploys a service; `install` after a swap changes nothing
    for v in ("v1", "v2"):
        make_release(sb.path(RELEASES), v)
    sb.path(OPERATOR_FILE).write_text(OPERATOR_CONFIG)
    run(sb, "zdd-agent", "swap", "api", "--version", "v1")
    run(sb, "zdd-agent", "swap", "api", "--version", "v2")
    assert answer(sb) == "v2"
    again = json.loads(run(sb, "zdd-agent", "install", "--json").stdout)
    assert again["changed"] is False, again

    # purge keeps the operator's config and the service, which still serves
    # and comes back at boot (zdd.target and its units are not the package's)
    out = run(sb, "apt-get", "purge", "-y", "zdd-agent", "python3-zdd-drain").stdout
    print(out[-1500:])
    for pkg in ("zdd-agent", "python3-zdd-drain"):
        assert run(sb, "dpkg-query", "-W", "-f=${Status}", pkg,
                   check=False).stdout.strip() in ("", "unknown ok not-installed"), pkg
    assert run(sb, "systemctl", "is-active", "zdd-agent.service",
               check=False).stdout.strip() == "inactive"
    assert sb.path(OPERATOR_FILE).read_text() == OPERATOR_CONFIG
    assert answer(sb) == "v2"
    left = zdd_files(sb.root / "upper")
    print("left after purge:", sorted(left))
    assert {x for x in left if not x.startswith("etc/systemd/system/")} == {
        "etc/zdd-agent", "etc/zdd-agent/services", "etc/zdd-agent/services/api.yaml"}, left
    assert not [x for x in left if "zdd-agent" in x.removeprefix("etc/zdd-agent")], left
    sb.reboot()
    deadline = time.monotonic() + 30
    while (got := answer(sb)) != "v2" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert got == "v2", run(sb, "systemctl", "list-units", "--all", "zdd*", check=False).stdout
    assert not [p for p in MACHINE_PATHS if os.path.lexists(p)]
