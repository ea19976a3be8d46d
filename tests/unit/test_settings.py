"""The unit's own settings (agent/settings.py): parsing with one clear error
per bad value, rendering into the template or the instance drop-in, the
host-sized open-files default and the explanations."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent import deploy, settings, units
from agent.config import parse_service
from agent.errors import ConfigError

BASE = {"name": "api", "command": "/usr/bin/python3 -m app", "listen": ["127.0.0.1:8080"]}
HOST = settings.Host(cpus=2, nr_open=1048576, manager_nofile=None, mem_total=8 * 1024**3)


def parse(**extra: Any) -> Any:
    return parse_service(Path("/etc/zdd-agent/services/api.yaml"), {**BASE, **extra})


def template(svc: Any, nofile: int = 65536) -> str:
    return units.render_service(svc, 4096, nofile=nofile).files["zdd-api@.service"]


PRODUCTION = yaml.safe_load("""
working_directory: /srv/api/{version}
group: api
supplementary_groups: [ssl-cert]
environment_files: [/etc/api/env, "/srv/api/{version}/.env"]
limits: {nofile: 131072, nproc: 4096, core: 0}
resources: {memory_max: 2G, memory_high: 1536M, cpu_quota: 150%, tasks_max: 512}
oom_score_adjust: -100
kill_mode: mixed
hardening:
  ProtectSystem: strict
  ProtectHome: true
  PrivateTmp: true
  NoNewPrivileges: true
  ReadWritePaths: [/var/lib/api, -/var/cache/api]
  CapabilityBoundingSet: []
  AmbientCapabilities: [CAP_NET_BIND_SERVICE]
  RestrictAddressFamilies: [AF_UNIX, AF_INET, AF_INET6]
  SystemCallFilter: ["~@privileged", "@resources"]
  RestrictNamespaces: true
  UMask: "0027"
""")


def test_production_settings_render_into_the_template() -> None:
    text = template(parse(**PRODUCTION))
    for line in ("Group=api", "SupplementaryGroups=ssl-cert", "LimitNOFILE=131072",
                 "LimitNPROC=4096", "LimitCORE=0", "MemoryMax=2147483648",
                 "MemoryHigh=1610612736", "CPUQuota=150%", "TasksMax=512",
                 "OOMScoreAdjust=1000", "Slice=zdd-api.slice", "KillMode=mixed",
                 "ProtectSystem=strict",
                 "ProtectHome=yes", "PrivateTmp=yes", "NoNewPrivileges=yes",
                 "ReadWritePaths=/var/lib/api -/var/cache/api", "CapabilityBoundingSet=",
                 "AmbientCapabilities=CAP_NET_BIND_SERVICE",
                 "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
                 "SystemCallFilter=~@privileged @resources", "RestrictNamespaces=yes",
                 "UMask=0027",
                 # one replica: %i is the version, so no drop-in and no daemon-reload
                 "WorkingDirectory=/srv/api/%i", "EnvironmentFile=/etc/api/env",
                 "EnvironmentFile=/srv/api/%i/.env"):
        assert f"\n{line}\n" in text, line


def test_defaults_render_the_host_sized_open_files_limit_and_nothing_else() -> None:
    svc = parse()
    text = template(svc, nofile=settings.default_nofile(8))
    assert "\nLimitNOFILE=262144\n" in text
    assert "\nKillMode=control-group\n" in text
    # every instance starts as the OOM killer's first pick (agent/oom.py)
    assert "\nOOMScoreAdjust=1000\n" in text and "\nSlice=zdd-api.slice\n" in text
    for directive in ("Group=", "WorkingDirectory=", "EnvironmentFile=", "MemoryMax=",
                      "ProtectSystem="):
        assert f"\n{directive}" not in text


@pytest.mark.parametrize("cpus,expected", [(1, 65536), (2, 65536), (4, 131072), (8, 262144),
                                           (64, 1048576), (512, 1048576)])
def test_default_nofile_holds_10000_connections_per_core(cpus: int, expected: int) -> None:
    got = settings.default_nofile(cpus)
    assert got == expected
    if got < 1048576:  # below the kernel's fs.nr_open default, the target fits
        assert got // settings.FDS_PER_CONNECTION >= cpus * settings.CONNECTIONS_PER_CORE
    assert settings.default_nofile(cpus, nr_open=50000) == 50000


def test_the_slice_holds_limits_for_all_instances_together() -> None:
    svc = parse(slice={"memory_max": "3G", "cpu_quota": "180%", "tasks_max": 1000})
    text = units.render_service(svc, 4096, nofile=65536).files["zdd-api.slice"]
    assert text.endswith("[Slice]\nMemoryMax=3221225472\nTasksMax=1000\nCPUQuota=180%\n")
    assert "MemoryMax" not in units.render_service(parse(), 4096, 65536).files["zdd-api.slice"]
    with pytest.raises(ConfigError, match=r"slice.memory_max: 'lots' is not a size"):
        parse(slice={"memory_max": "lots"})
    with pytest.raises(ConfigError, match=r"slice.cpu: unknown key"):
        parse(slice={"cpu": 1})


def test_versioned_paths_go_to_the_drop_in_with_replicas() -> None:
    svc = parse(replicas=2, working_directory="/srv/api/{version}",
                environment_files=["/etc/api/env", "/srv/api/{version}/env"])
    assert not units.version_in_template(svc)
    text = template(svc)
    assert "WorkingDirectory=" not in text and "EnvironmentFile=" not in text
    dropin = units.render_instance_dropin(svc, "v2", None, "v2-1")
    assert "\nWorkingDirectory=/srv/api/v2\n" in dropin
    # order kept: the later file overrides the earlier one
    assert dropin.index("EnvironmentFile=/etc/api/env\n") < dropin.index(
        "EnvironmentFile=/srv/api/v2/env\n")


def test_fixed_paths_stay_in_the_template_with_replicas() -> None:
    svc = parse(replicas=2, working_directory="/srv/api", environment_files=["/etc/api/env"])
    assert "\nWorkingDirectory=/srv/api\n" in template(svc)
    assert "WorkingDirectory" not in units.render_instance_dropin(svc, "v2", None, "v2-1")


BAD = [
    ({"working_directory": "srv/api"}, "working_directory", "absolute path"),
    ({"working_directory": "/srv/my api"}, "working_directory", "' '"),
    ({"working_directory": "/srv/%n"}, "working_directory", "'%'"),
    ({"working_directory": "/srv/$HOME"}, "working_directory", "'$'"),
    ({"working_directory": "/srv/../etc"}, "working_directory", "normalised"),
    ({"working_directory": "/srv/api/"}, "working_directory", "normalised"),
    ({"working_directory": "/srv\n[Service]"}, "working_directory", "characters"),
    ({"environment_files": "relative/env"}, "environment_files", "absolute path"),
    ({"environment_files": {"a": 1}}, "environment_files", "list"),
    ({"environment_files": ['/etc/"env']}, "environment_files", "characters"),
    ({"group": "Root"}, "group", "group name"),
    ({"group": "a b"}, "group", "group name"),
    ({"supplementary_groups": "wheel"}, "supplementary_groups", "list"),
    ({"supplementary_groups": ["ok", 7]}, "supplementary_groups", "group name"),
    ({"limits": {"nofile": 100}}, "limits.nofile", "1024.."),
    ({"limits": {"nofile": "lots"}}, "limits.nofile", "not an integer"),
    ({"limits": {"nofile": 2**31}}, "limits.nofile", "out of range"),
    ({"limits": {"nproc": -1}}, "limits.nproc", "out of range"),
    ({"limits": {"core": "huge"}}, "limits.core", "not a size"),
    ({"limits": {"stack": 1}}, "limits.stack", "unknown key"),
    ({"limits": [1]}, "limits", "mapping"),
    ({"resources": {"memory_max": "2 gigs"}}, "resources.memory_max", "not a size"),
    ({"resources": {"memory_max": 0}}, "resources.memory_max", "not a positive size"),
    ({"resources": {"memory_max": "150%"}}, "resources.memory_max", "not a size"),
    ({"resources": {"memory_max": True}}, "resources.memory_max", "boolean"),
    ({"resources": {"memory_max": "1G", "memory_high": "2G"}}, "resources.memory_high",
     "above memory_max"),
    ({"resources": {"cpu_quota": "fast"}}, "resources.cpu_quota", "CPU quota"),
    ({"resources": {"cpu_quota": "0%"}}, "resources.cpu_quota", "CPU quota"),
    ({"resources": {"tasks_max": 0}}, "resources.tasks_max", "a count 1..4194304, 1%..100%"),
    ({"resources": {"tasks_max": "50.5%"}}, "resources.tasks_max", "1%..100%, or infinity"),
    ({"resources": {"tasks_max": "\u0665\u0660%"}}, "resources.tasks_max", "not allowed"),
    ({"resources": {"memory_max": "\u0665\u0660%"}}, "resources.memory_max", "not a size"),
    ({"resources": {"memory_max": "50.12345%"}}, "resources.memory_max", "not a size"),
    ({"resources": {"memory_max": 1}}, "resources.memory_max", "write 1G for a gibibyte"),
    ({"resources": {"memory_high": "1.5"}}, "resources.memory_high", "at least 1M"),
    ({"limits": {"core": False}}, "limits.core", "boolean"),
    ({"limits": {"core": 0.0}}, "limits.core", "not a size"),
    ({"kill_mode": ["mixed"]}, "kill_mode", "control-group, mixed"),
    ({"kill_mode": {"a": 1}}, "kill_mode", "control-group, mixed"),
    ({"hardening": {"SystemCallErrorNumber": "EFOOBAR"}}, "hardening.SystemCallErrorNumber",
     "errno name"),
    ({"hardening": {"ReadWritePaths": ["/var/lib/{version}"]}}, "hardening.ReadWritePaths",
     "{version} is not substituted here"),
    ({"working_directory": "/" + "a" * 5000}, "working_directory", "at most 4096"),
    ({"resources": {"io_weight": 10}}, "resources.io_weight", "unknown key"),
    ({"oom_score_adjust": 1001}, "oom_score_adjust", "-1000..1000"),
    ({"oom_score_adjust": "low"}, "oom_score_adjust", "not an integer"),
    ({"kill_mode": "process"}, "kill_mode", "keep serving"),
    ({"kill_mode": "none"}, "kill_mode", "keep running"),
    ({"kill_mode": "all"}, "kill_mode", "control-group, mixed"),
    ({"hardening": {"PrivateNetwork": True}}, "hardening.PrivateNetwork", "cannot be probed"),
    ({"hardening": {"LimitNOFILE": 1}}, "hardening.LimitNOFILE", "use limits.nofile"),
    ({"hardening": {"IPAddressDeny": "any"}}, "hardening.IPAddressDeny", "use allow_from"),
    ({"hardening": {"ExecStartPre": "/bin/sh"}}, "hardening.ExecStartPre",
     "unknown directive (allowed: NoNewPrivileges"),
    ({"hardening": {"ProtectSystem": "very"}}, "hardening.ProtectSystem",
     "yes, no, full, strict"),
    ({"hardening": {"NoNewPrivileges": "maybe"}}, "hardening.NoNewPrivileges", "true, false"),
    ({"hardening": {"ReadWritePaths": ["var/lib"]}}, "hardening.ReadWritePaths",
     "absolute"),
    ({"hardening": {"ReadWritePaths": ["/var/lib /etc"]}}, "hardening.ReadWritePaths",
     "absolute"),
    ({"hardening": {"CapabilityBoundingSet": ["CAP_EVERYTHING"]}},
     "hardening.CapabilityBoundingSet", "capabilities(7)"),
    ({"hardening": {"RestrictAddressFamilies": ["AF_BOGUS"]}},
     "hardening.RestrictAddressFamilies", "not an address family"),
    ({"hardening": {"RestrictAddressFamilies": ["AF_INET", "AF_INET6"]}},
     "hardening.RestrictAddressFamilies", "denies AF_UNIX, but ready.type notify"),
    ({"hardening": {"RestrictAddressFamilies": ["~AF_UNIX"]}},
     "hardening.RestrictAddressFamilies", "denies AF_UNIX"),
    ({"hardening": {"RestrictNamespaces": ["net", "time"]}}, "hardening.RestrictNamespaces",
     "namespace type"),
    ({"hardening": {"SystemCallFilter": ["@everything"]}}, "hardening.SystemCallFilter",
     "system call set"),
    ({"hardening": {"SystemCallFilter": ["read;write"]}}, "hardening.SystemCallFilter",
     "system call name"),
    ({"hardening": {"UMask": 27}}, "hardening.UMask", "octal string"),
    ({"hardening": {"SystemCallErrorNumber": "EPERM\nUser=root"}},
     "hardening.SystemCallErrorNumber", "errno name"),
    ({"hardening": "strict"}, "hardening", "mapping"),
]


@pytest.mark.parametrize("extra,key,words", BAD, ids=[f"{k}:{i}" for i, (_, k, _w)
                                                       in enumerate(BAD)])
def test_bad_settings_name_the_key_and_what_is_allowed(extra: dict[str, Any], key: str,
                                                       words: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse(**extra)
    assert e.value.details["key"] == key, str(e.value)
    assert words in str(e.value)
    assert "\n" not in str(e.value)


def test_quoted_and_null_forms_an_operator_writes_are_taken() -> None:
    got = parse(limits={"core": "0"}, supplementary_groups=None, environment_files=None,
                hardening={"NoNewPrivileges": "true", "PrivateTmp": "false",
                           "SystemCallErrorNumber": "EPERM"},
                resources={"memory_max": "50.5%"}).settings
    assert got.limits.core == 0 and got.supplementary_groups == () == got.environment_files
    assert dict(got.hardening) == {"NoNewPrivileges": "yes", "PrivateTmp": "no",
                                   "SystemCallErrorNumber": "EPERM"}
    assert got.resources.memory_max == "50.5%"


def test_address_families_the_swap_needs_follow_the_mode() -> None:
    reuse = {"socket": "reuseport", "listen": ["[::1]:8080"],
             "ready": {"type": "http", "url": "http://127.0.0.1:{instance_port}/ready"}}
    with pytest.raises(ConfigError, match="denies AF_INET6, but socket: reuseport binds"):
        parse(**reuse, hardening={"RestrictAddressFamilies": ["AF_INET"]})
    with pytest.raises(ConfigError, match=r"denies AF_INET, but ready.url"):
        parse(**reuse, hardening={"RestrictAddressFamilies": ["AF_INET6"]})
    parse(**reuse, hardening={"RestrictAddressFamilies": ["AF_INET", "AF_INET6"]})
    # an exec probe under inherit needs no family of the instance's own
    parse(ready={"type": "exec", "command": "/bin/true"},
          hardening={"RestrictAddressFamilies": "none"})


def test_explain_says_what_nofile_holds_on_this_host() -> None:
    lines = dict((line.split(":")[0], (lvl, line)) for lvl, line
                 in settings.explain(parse().settings, HOST))
    lvl, line = lines["limits.nofile 65536 (default)"]
    assert lvl == "ok" and "32,768 connections per instance" in line and "20,000 on 2" in line
    capped = settings.Host(cpus=2, nr_open=1048576, manager_nofile=20000, mem_total=8 << 30)
    (lvl, line), = [x for x in settings.explain(parse().settings, capped)
                    if x[1].startswith("limits.nofile")]
    assert lvl == "warn" and "instances get 20000" in line and "10,000 connections" in line
    assert settings.effective_nofile(parse().settings, capped) == 20000


def test_explain_covers_every_setting_given() -> None:
    svc = parse(**PRODUCTION)
    text = "\n".join(line for _lvl, line in settings.explain(svc.settings, HOST))
    for key in ("limits.nofile 131072:", "limits.nproc 4096", "limits.core 0", "memory_max 2.0",
                "memory_high 1.5", "cpu_quota 150%: at most 1.5", "tasks_max 512",
                "oom_score_adjust -100", "kill_mode mixed", "working_directory /srv/api",
                "environment_files /etc/api/env", "group api, ssl-cert",
                "hardening ProtectSystem=strict"):
        assert key in text, key
    big = parse(resources={"memory_max": "64G", "cpu_quota": "400%"})
    warns = [line for lvl, line in settings.explain(big.settings, HOST) if lvl == "warn"]
    assert any("memory_max 64.0 GiB" in w for w in warns)
    assert any("cpu_quota 400%" in w for w in warns)


def test_preflight_refuses_what_systemd_would_fail(root_dir: Path) -> None:
    tmp_path = root_dir
    env = tmp_path / "env"
    env.write_text("A=1\n")
    (tmp_path / "v1").mkdir()
    ok = parse(working_directory=f"{tmp_path}/{{version}}", environment_files=[str(env)])
    deploy.check_settings(ok, "v1")
    with pytest.raises(ConfigError, match=r"working_directory: .*/v2: No such file"):
        deploy.check_settings(ok, "v2")
    with pytest.raises(ConfigError, match="is not a directory"):
        deploy.check_settings(parse(working_directory=str(env)), "v1")
    with pytest.raises(ConfigError, match=r"environment_files: .*/nope: No such file"):
        deploy.check_settings(parse(environment_files=[f"{tmp_path}/nope"]), "v1")
    with pytest.raises(ConfigError, match="no such group 'zdd-no-such-group'"):
        deploy.check_settings(parse(group="zdd-no-such-group"), "v1")
    with pytest.raises(ConfigError, match="supplementary_groups: no such group"):
        deploy.check_settings(parse(supplementary_groups=["zdd-no-such-group"]), "v1")


@pytest.mark.skipif(os.geteuid() != 0, reason="the root-service path check is root's")
def test_a_root_service_refuses_an_environment_file_others_can_change(root_dir: Path) -> None:
    tmp_path = root_dir
    env = tmp_path / "env"
    env.write_text("LD_PRELOAD=/tmp/evil.so\n")
    os.chmod(env, 0o666)
    with pytest.raises(ConfigError, match="runs as root"):
        deploy.check_settings(parse(environment_files=[str(env)]), "v1")
    os.chmod(env, 0o644)
    deploy.check_settings(parse(environment_files=[str(env)]), "v1")


def test_check_config_explains_each_setting(root_dir: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from agent.cli import cli

    monkeypatch.setattr(settings, "this_host", lambda: HOST)
    path = root_dir / "api.yaml"
    path.write_text(yaml.safe_dump({**BASE, **PRODUCTION, "fast_open": 16}))
    r = CliRunner().invoke(cli, ["check-config", str(path)])
    assert r.exit_code == 0, r.output
    out = r.stdout.splitlines()
    assert out[0] == f"{path}: a valid config of service api"
    for start in ("  limits.nofile 131072: up to 65,536 connections", "  resources.memory_max 2.0",
                  "  oom_score_adjust -100: a new instance starts at 1000", "  kill_mode mixed",
                  "  hardening ProtectSystem=strict", "  fast_open 16: up to 16 pending"):
        assert any(line.startswith(start) for line in out), (start, out)
    assert r.stderr == ""


def test_the_readme_production_config_is_valid() -> None:
    """README's production example parses and renders as it says."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    start = readme.index("# /etc/zdd-agent/services/shop.yaml")
    block = readme[start:readme.index("```", start)]
    svc = parse_service(Path("/etc/zdd-agent/services/shop.yaml"), yaml.safe_load(block), "shop")
    text = units.render_service(svc, 4096, nofile=65536).files["zdd-shop@.service"]
    assert "\nWorkingDirectory=/srv/shop/%i\n" in text and "\nLimitNOFILE=131072\n" in text
    assert "MemoryMax=8589934592" in units.render_service(svc, 4096, 65536).files[
        "zdd-shop.slice"]


def test_second_review_forms() -> None:
    got = parse(kill_mode=None, resources={"tasks_max": "512"},
                hardening={"ReadWritePaths": None, "SystemCallErrorNumber": "EWOULDBLOCK"})
    assert got.settings.kill_mode == "control-group" and got.settings.resources.tasks_max == 512
    assert dict(got.settings.hardening) == {"SystemCallErrorNumber": "EWOULDBLOCK"}
    with pytest.raises(ConfigError, match="above memory_max"):
        parse(resources={"memory_max": "50%", "memory_high": "60%"})
    with pytest.raises(ConfigError, match="at most 4096") as e:
        parse(hardening={"ReadWritePaths": ["/" + "a" * 5000]})
    assert len(str(e.value)) < 400
