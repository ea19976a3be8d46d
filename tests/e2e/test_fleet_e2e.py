"""The Ansible content against a fleet of three simulated hosts (fleet.py):
the role installs the agent's Debian package (scripts/build-deb) with apt
over ssh (no pip, no build on the hosts), rolling-deploy.yml rolls
v1 -> v2 with each host drained from HAProxy around its swap, then a broken
v3 stops the rollout at the first host, which the agent rolls back. Load
runs through HAProxy the whole time; the client must see 0 failed requests.

Marked `fleet` (slower): `pytest -m "not fleet"` leaves it out; .ci/run runs it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleet import AGENT, AGENT_VENV, SERVICE_PORT, Fleet, StateWatch

from agent.demo.run import RELEASES

pytestmark = pytest.mark.fleet

SERVICE = "api"
SERVICES = {SERVICE: {
    "command": f"{RELEASES}/{{version}}/bin/api",
    "listen": [f"0.0.0.0:{SERVICE_PORT}"],
    "ready": {"type": "notify", "deadline": "20s"},
    "drain": {"grace_period": "10s"},
}}


@pytest.fixture(scope="module")
def fleet(deb: Path) -> Iterator[Fleet]:
    if os.geteuid() != 0:
        pytest.skip("the fleet needs root")
    for tool in ("sshd", "ssh", "haproxy", "wrk", "ip", "curl"):
        assert shutil.which(tool) or os.path.exists(f"/usr/sbin/{tool}"), \
            f"{tool} is not installed (.ci/run installs it)"
    assert not os.path.lexists(AGENT), f"{AGENT} on the machine itself: the hosts must get theirs"
    f = Fleet(deb, 3)
    try:
        f.boot()
        for h in f.hosts:
            h.release("v1")
            h.release("v2")
            h.release("v3", "--fail-at-start")  # broken: exits before it is ready
        yield f
    finally:
        f.close()


def task_results(out: str, task: str) -> set[str]:
    """The per-host result lines ("changed: [host1]") of the role's task."""
    block = out.split(f"TASK [zdd.agent.zdd_agent : {task}]", 1)[1].split("TASK [", 1)[0]
    return {line.split("]")[0] + "]" for line in block.splitlines()
            if line.startswith(("ok: [", "changed: [", "skipping: [", "failed: [", "fatal: ["))}


def show(book: object) -> str:
    return getattr(book, "out", "")[-6000:]


def test_fleet_install_roll_out_and_stop_at_a_broken_version(fleet: Fleet) -> None:
    inv = fleet.inventory(SERVICES)
    names = [h.name for h in fleet.hosts]

    # The role installs the agent on every host; a second run changes nothing.
    site = fleet.playbook("site.yml", inv)
    assert site.code == 0, show(site)
    assert all(site.recap[n]["changed"] > 0 for n in names), site.recap
    again = fleet.playbook("site.yml", inv)
    assert again.code == 0, show(again)
    assert again.changed() == dict.fromkeys(names, 0), show(again)
    for h in fleet.hosts:
        assert h.zdd_json("host-state")[1]["drained"] is False
        # from the package, by apt: Debian's python3 and libraries, no virtualenv
        for pkg in ("zdd-agent", "python3-zdd-drain"):
            status = h.sb.run(["dpkg-query", "-W", "-f=${Status} ${Version}", pkg],
                              capture=True).stdout
            assert status.startswith("install ok installed "), (pkg, status)
        version = h.zdd("--version").stdout
        assert "(Debian package zdd-agent; units in /lib/systemd/system" in version, version
        assert h.sb.run(["head", "-1", AGENT], capture=True).stdout.startswith(
            "#!/usr/bin/python3")
        pips = h.sb.run(["find", "/opt", "/var/lib", "/usr/local", "-name", "pyvenv.cfg"],
                        capture=True, check=False).stdout
        assert not pips.strip(), pips
    assert task_results(site.out, "Install the zdd-agent package files with apt") == {
        f"changed: [{n}]" for n in names}
    for pip_task in ("Install the system packages the virtualenv needs",
                     "Install zdd-agent into its virtualenv"):
        assert task_results(site.out, pip_task) == {f"skipping: [{n}]" for n in names}
    assert not os.path.lexists(AGENT)  # dpkg wrote into the hosts' overlays only

    # First deploy of v1 everywhere; rolling it again is no change.
    first = fleet.playbook("rolling-deploy.yml", inv, "-e", "zdd_service=api",
                           "-e", "zdd_version=v1")
    assert first.code == 0, show(first)
    assert [h.serving(SERVICE) for h in fleet.hosts] == ["v1"] * 3
    same = fleet.playbook("rolling-deploy.yml", inv, "-e", "zdd_service=api",
                          "-e", "zdd_version=v1")
    assert same.code == 0 and same.changed() == dict.fromkeys(names, 0), show(same)

    # Check mode: every host would change, none does.
    dry = fleet.playbook("rolling-deploy.yml", inv, "-e", "zdd_service=api",
                         "-e", "zdd_version=v2", "--check", "--diff")
    assert dry.code == 0 and dry.changed() == dict.fromkeys(names, 1), show(dry)
    assert dry.out.count("+version: v2") == 3, show(dry)
    assert [h.serving(SERVICE) for h in fleet.hosts] == ["v1"] * 3

    fleet.start_haproxy()
    load = fleet.load(clients=32, seconds=600)
    try:
        # v1 -> v2, one host per batch (25% of 3), each drained from HAProxy
        # (its health check sees the host's /ready turn 503) around its swap.
        with StateWatch(fleet) as watch:
            v2 = fleet.playbook("rolling-deploy.yml", inv, "-e", "zdd_service=api",
                                "-e", "zdd_version=v2", "-e", "zdd_drain_host=true",
                                "-e", "zdd_drain_delay=2")
        assert v2.code == 0, show(v2)
        assert [h.serving(SERVICE) for h in fleet.hosts] == ["v2"] * 3
        assert v2.out.count("PLAY [Roll a service") == 3  # a batch a host
        assert v2.out.count("TASK [Swap the service to v2]") == 3
        for n in names:
            assert "DOWN" in watch.seen[n] and "UP" in watch.seen[n], watch.seen
        assert fleet.server_states() == dict.fromkeys(names, "UP")

        # v3 fails to start: host1's agent rolls it back to v2, the play stops
        # (max_fail_percentage 0) before host2 and host3.
        before = {h.name: len(h.history(SERVICE)) for h in fleet.hosts}
        v3 = fleet.playbook("rolling-deploy.yml", inv, "-e", "zdd_service=api",
                            "-e", "zdd_version=v3")
        assert v3.code != 0, show(v3)
        assert "swap of api to v3 failed" in v3.out, show(v3)
        assert v3.recap["host1"]["failed"] == 1, v3.recap
        assert "host2" not in v3.recap and "host3" not in v3.recap, v3.recap
        assert [h.serving(SERVICE) for h in fleet.hosts] == ["v2"] * 3
        h1 = fleet.hosts[0].history(SERVICE)
        assert len(h1) == before["host1"] + 1
        assert (h1[-1]["to"], h1[-1]["result"]) == ("v3", "rolled_back")
        for h in fleet.hosts[1:]:
            assert len(h.history(SERVICE)) == before[h.name]  # never touched
        answered = {n: int(r["hrsp_2xx"]) for n, r in fleet.server_stats().items()}
    finally:
        res = load.stop()
    for h in fleet.hosts:
        swaps = [f"{r['from']}->{r['to']} {r['result']} {r['seconds']:.2f}s drained {r['drained']}"
                 for r in h.history(SERVICE)]
        print(f"{h.name}: {answered[h.name]} responses through HAProxy; {'; '.join(swaps)}")
    print(f"\nfleet through HAProxy: {res.requests} requests, {res.failed} failed "
          f"(connect {res.connect}, read {res.read}, write {res.write}, status {res.status}, "
          f"timeout {res.timeout}); p99 {res.p99_us / 1000:.1f} ms")
    assert res.requests > 1000
    assert res.failed == 0
    assert all(n > 0 for n in answered.values()), answered  # every host served the load
    assert '"version": "v2"' in fleet.get()


def test_the_roles_pip_path_installs_a_virtualenv_that_deploys(deb: Path) -> None:
    """zdd_agent_install_method: pip, on one host: the agent in a virtualenv
    filled from wheels (--no-index, as on an air-gapped host), its units
    running the virtualenv's command, a second run changing nothing, and a
    first deploy through rolling-deploy.yml, which picks the same command."""
    if os.geteuid() != 0:
        pytest.skip("the fleet needs root")
    f = Fleet(deb, 1)
    try:
        wheels = f.build_wheels()
        f.boot()
        (h,) = f.hosts
        h.release("v1")
        inv = f.inventory(SERVICES, f.pip_install(wheels))
        site = f.playbook("site.yml", inv)
        assert site.code == 0, show(site)
        assert site.recap[h.name]["changed"] > 0, site.recap
        for task in ("Install the system packages the virtualenv needs",
                     "Install zdd-agent into its virtualenv"):
            assert task_results(site.out, task) != {f"skipping: [{h.name}]"}, task
        for task in ("Install the zdd-agent package files with apt",
                     "Install the zdd-agent packages from the host's apt sources"):
            assert task_results(site.out, task) == {f"skipping: [{h.name}]"}, task
        again = f.playbook("site.yml", inv)
        assert again.code == 0 and again.changed() == {h.name: 0}, show(again)

        version = h.zdd("--version").stdout
        assert "Debian package" not in version, version
        unit = h.sb.run(["systemctl", "cat", "zdd-agent.service"], capture=True).stdout
        assert f"{AGENT_VENV}/bin/zdd-agent" in unit, unit
        assert h.sb.run(["systemctl", "is-active", "zdd-agent.service"],
                        capture=True, check=False).stdout.strip() == "active"
        dpkg = h.sb.run(["dpkg-query", "-W", "zdd-agent"], capture=True, check=False)
        assert dpkg.returncode != 0, dpkg.stdout  # apt was never asked
        assert not os.path.lexists(AGENT_VENV)  # the virtualenv is the host's

        first = f.playbook("rolling-deploy.yml", inv, "-e", "zdd_service=api",
                           "-e", "zdd_version=v1")
        assert first.code == 0, show(first)
        assert h.serving(SERVICE) == "v1"
        print(f"pip path: site.yml {site.recap[h.name]}; {version.strip()}")
    finally:
        f.close()
