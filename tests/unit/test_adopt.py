"""agent/adopt.py: the service config written for a legacy unit (pure), and
the unit name check that runs before anything reaches D-Bus.

Every config to_config returns is loaded by parse_service, as the file the
agent would read, and its YAML text by the config loader itself."""

from __future__ import annotations

import datetime
import re
import signal
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.adopt import (
    INFINITY,
    Adoption,
    ExecCommand,
    LegacySocket,
    LegacyUnit,
    _config_value,
    check_unit_name,
    listening_addresses,
    read_legacy,
    socket_addresses,
    to_config,
)
from agent.config import ConfigLoader, ServiceConfig, parse_service
from agent.errors import ConfigError

TODAY = datetime.date(2025, 3, 14)


def adopt(legacy: LegacyUnit, listen: list[str] | None = None, name: str = "api",
          version: str | None = None) -> tuple[Adoption, ServiceConfig]:
    """to_config, checked the way the agent will read its output."""
    if listen is None:
        assert legacy.socket is not None
        listen = socket_addresses(legacy.socket)
    a = to_config(legacy, name, listen, version, today=TODAY)
    cfg = parse_service(Path(f"/etc/zdd-agent/services/{name}.yaml"), a.data,
                         expected_name=name)
    assert yaml.load(a.text, Loader=ConfigLoader) == a.data
    assert a.text.startswith(f"# Written by `zdd-agent adopt {legacy.name}` on 2025-03-14")
    for note in a.not_carried:
        assert f"# - {note}" in a.text
    return a, cfg


def unit(argv: list[str], **kw: Any) -> LegacyUnit:
    kw.setdefault("restart", "on-failure")
    return LegacyUnit(name=kw.pop("name", "legacy.service"),
                      exec_start=(ExecCommand(argv[0], tuple(argv)),), **kw)


def notes_matching(a: Adoption, text: str) -> list[str]:
    return [n for n in a.not_carried if text in n]


GUNICORN = "/srv/app/venv/bin/gunicorn"


# ------------------------------------------------------------ listeners


def test_gunicorn_socket_activated_tcp() -> None:
    legacy = unit([GUNICORN, "--workers", "3", "app.wsgi:application"], type="notify",
                  user="www-data", group="www-data", name="gunicorn.service",
                  environment=("DJANGO_SETTINGS_MODULE=app.settings",),
                  fragment_path="/etc/systemd/system/gunicorn.service",
                  socket=LegacySocket("gunicorn.socket", (("Stream", "[::]:8000"),)))
    a, cfg = adopt(legacy)
    assert a.data["listen"] == ["8000"]  # [::] without V6ONLY: every address
    assert cfg.socket == "nat" and not a.unix
    assert a.data["command"] == [GUNICORN, "--workers", "3", "app.wsgi:application"]
    assert a.data["ready"] == {"type": "notify"}
    assert a.data["user"] == "www-data" and a.data["group"] == "www-data"
    assert a.not_carried == [
        "nothing in the command or environment names port 8000: it got its listener from "
        "gunicorn.socket (LISTEN_FDS), and under socket: nat each instance binds the port it "
        "is told: add --bind [::]:{instance_port} to command"]
    assert "from /etc/systemd/system/gunicorn.service and gunicorn.socket." in a.text


def test_gunicorn_that_names_its_bind() -> None:
    legacy = unit([GUNICORN, "--bind", "0.0.0.0:8000", "-b", "[::1]:8000", "app:app"],
                  socket=LegacySocket("gunicorn.socket", (("Stream", "0.0.0.0:8000"),)))
    a, cfg = adopt(legacy)
    assert a.data["command"] == [GUNICORN, "--bind", "0.0.0.0:{instance_port}",
                                 "-b", "[::1]:{instance_port}", "app:app"]
    assert a.data["listen"] == ["0.0.0.0:8000"]
    assert a.data["ready"] == {"type": "tcp", "url": "[::1]:{instance_port}"}
    assert cfg.needs_instance_port
    assert a.not_carried == []


def test_uvicorn_gets_its_own_flag() -> None:
    legacy = unit(["/srv/venv/bin/python", "-m", "uvicorn", "app:app"],
                  socket=LegacySocket("api.socket", (("Stream", "127.0.0.1:9000"),)))
    a, _ = adopt(legacy)
    assert notes_matching(a, "add --port {instance_port} to command")


def test_node_port_from_environment() -> None:
    legacy = unit(["/usr/bin/node", "/srv/web/server.js"],
                  environment=("PORT=3000", "BIND_ADDR=0.0.0.0:3000", "WORKERS=3000",
                               "UPSTREAM=http://db.internal:3000/", "NODE_ENV=production"))
    a, cfg = adopt(legacy, ["0.0.0.0:3000"])
    assert a.data["environment"] == {
        "PORT": "{instance_port}", "BIND_ADDR": "0.0.0.0:{instance_port}",
        "WORKERS": "3000",  # not named like a port
        "UPSTREAM": "http://db.internal:3000/",  # another host's port
        "NODE_ENV": "production"}
    assert a.data["ready"] == {"type": "tcp", "url": "127.0.0.1:{instance_port}"}
    assert dict(cfg.port_environment) == {"PORT": "{instance_port}",
                                          "BIND_ADDR": "0.0.0.0:{instance_port}"}
    assert a.not_carried == []


def test_go_binary_listen_flag_and_a_second_port() -> None:
    legacy = unit(["/usr/local/bin/api", "--listen=:8080", "--metrics=:9090"])
    a, _ = adopt(legacy, ["[::]:8080", "[::]:9090"])
    assert a.data["command"] == ["/usr/local/bin/api", "--listen=:{instance_port}",
                                 "--metrics=:9090"]
    assert a.data["listen"] == ["8080"]
    assert a.not_carried == [
        "port 9090 not carried: under socket: nat each instance binds one port of its own "
        "({instance_port}, for port 8080); if 9090 is the one clients use, put it in listen "
        "instead"]


def test_the_port_the_command_names_is_the_one_carried() -> None:
    legacy = unit(["/usr/local/bin/api", "--port", "8081"])
    a, _ = adopt(legacy, ["0.0.0.0:8080", "0.0.0.0:8081", "[::]:8081"])
    assert a.data["listen"] == ["8081"]
    assert a.data["command"] == ["/usr/local/bin/api", "--port", "{instance_port}"]
    assert notes_matching(a, "port 8080 not carried")


@pytest.mark.parametrize("args,want", [
    (["--port=8080"], ["--port={instance_port}"]),
    (["--http-port", "8080"], ["--http-port", "{instance_port}"]),
    (["-p", "8080"], ["-p", "{instance_port}"]),
    (["--bind", "localhost:8080"], ["--bind", "localhost:{instance_port}"]),
    (["--addr", "tcp://0.0.0.0:8080/"], ["--addr", "tcp://0.0.0.0:{instance_port}/"]),
    (["--workers", "8080"], ["--workers", "8080"]),  # not after a port flag
    (["--port=18080"], ["--port=18080"]),
    (["--upstream=backend:8080"], ["--upstream=backend:8080"]),  # a host name: elsewhere
    (["12:8080"], ["12:8080"]),
])
def test_port_substitution_forms(args: list[str], want: list[str]) -> None:
    a, _ = adopt(unit(["/usr/bin/srv", *args]), ["8080"])
    assert a.data["command"][1:] == want


def test_program_that_finds_its_port_elsewhere() -> None:
    a, _ = adopt(unit(["/usr/sbin/someserver", "-c", "/etc/someserver.conf"]), ["8443"])
    assert a.not_carried == [
        "nothing in the command or environment names port 8443: it finds the port elsewhere "
        "(a config file, a built-in default), and under socket: nat each instance binds the "
        "port it is told: add e.g. --bind [::]:{instance_port} to command (or read "
        "ZDD_INSTANCE_PORT)"]


def test_unix_socket_gunicorn() -> None:
    legacy = unit([GUNICORN, "--bind", "unix:/run/gunicorn.sock", "app:app"],
                  name="gunicorn.service", type="notify",
                  socket=LegacySocket("gunicorn.socket", (("Stream", "/run/gunicorn.sock"),),
                                      socket_user="www-data", socket_group="www-data",
                                      socket_mode=0o660))
    a, cfg = adopt(legacy)
    assert a.unix and cfg.socket == "inherit"
    assert a.data["listen"] == ["unix:/run/zdd-api/api.sock"]
    assert a.data["command"][1:] == ["--bind", "unix:/run/zdd-api/api.sock", "app:app"]
    assert (cfg.socket_user, cfg.socket_group, cfg.socket_mode) == ("www-data", "www-data",
                                                                    "0660")
    assert a.not_carried == [
        "gunicorn.socket listens on /run/gunicorn.sock and the config on "
        "/run/zdd-api/api.sock (two listeners cannot share a path while both exist): once "
        "the first instance runs, point the proxy in front at /run/zdd-api/api.sock (nginx: "
        "proxy_pass http://unix:/run/zdd-api/api.sock:) and reload nginx onto it, then stop "
        "and disable gunicorn.service and gunicorn.socket"]


def test_unix_socket_without_notify_is_told_about_readiness() -> None:
    legacy = unit([GUNICORN, "app:app"], socket=LegacySocket(
        "app.socket", (("Stream", "/run/app/app.sock"), ("Datagram", "/run/app/log.sock"))))
    a, cfg = adopt(legacy, name="agent")  # /run/zdd-agent is the agent's own
    assert a.data["listen"] == ["unix:/run/zdd-svc-agent/listen.sock"]
    assert cfg.ready.type == "notify"
    assert notes_matching(a, "Type=simple: readiness on a Unix socket")
    assert notes_matching(a, "app.socket: ListenDatagram=/run/app/log.sock not carried")


def test_no_listener_is_refused() -> None:
    with pytest.raises(ConfigError, match="no listen address"):
        to_config(unit(["/usr/bin/srv"]), "api", [], None)


# ---------------------------------------------------------------- command


def test_release_path_with_the_version() -> None:
    legacy = unit(["/srv/api/releases/v1.4.2/bin/api", "--config",
                   "/srv/api/releases/v1.4.2/etc/api.toml", "--port", "7000", "--retries=1"],
                  working_directory="/srv/api/releases/v1.4.2",
                  environment_files=(("/etc/api/v1.4.2.env", False),))
    a, cfg = adopt(legacy, ["7000"], version="v1.4.2")
    assert a.data["command"] == ["/srv/api/releases/{version}/bin/api", "--config",
                                 "/srv/api/releases/{version}/etc/api.toml", "--port",
                                 "{instance_port}", "--retries=1"]
    assert a.data["working_directory"] == "/srv/api/releases/{version}"
    assert a.data["environment_files"] == ["/etc/api/{version}.env"]
    assert cfg.argv("v1.5.0", 40001)[0] == "/srv/api/releases/v1.5.0/bin/api"
    assert len(a.not_carried) == 1, a.not_carried  # each replacement, for review
    assert a.not_carried[0].startswith("{version} put in place of v1.4.2")
    assert "/srv/api/releases/v1.4.2/bin/api -> /srv/api/releases/{version}/bin/api" \
        in a.not_carried[0]


def test_version_inside_a_name() -> None:
    a, _ = adopt(unit(["/opt/app-v1.4.2/run", "--port", "80", "--level", "11.4.2"]), ["80"],
                 version="1.4.2")
    assert a.data["command"] == ["/opt/app-v{version}/run", "--port", "{instance_port}",
                                 "--level", "11.4.2"]


def test_version_that_appears_nowhere() -> None:
    a, _ = adopt(unit(["/usr/bin/api", "--port", "80"]), ["80"], version="2.0.0")
    assert a.not_carried == [
        "version 2.0.0 appears nowhere in ExecStart, WorkingDirectory or EnvironmentFile: "
        "every version runs the same command: point {version} at the release path yourself"]


def test_resolved_path_replaces_a_bare_argv0() -> None:
    legacy = LegacyUnit(name="x.service", restart="always", exec_start=(
        ExecCommand("/usr/bin/python3", ("python3", "-m", "http.server", "8000")),))
    a, _ = adopt(legacy, ["8000"])
    assert a.data["command"] == ["/usr/bin/python3", "-m", "http.server", "8000"]
    assert notes_matching(a, "nothing in the command or environment names port 8000")


def test_multiple_exec_start_and_pre_post() -> None:
    legacy = LegacyUnit(
        name="x.service", restart="on-failure",
        exec_start=(ExecCommand("/usr/bin/a", ("/usr/bin/a", "--port=80")),
                    ExecCommand("/usr/bin/b", ("/usr/bin/b",))),
        other_exec=(("ExecStartPre", ("/usr/bin/migrate", "--yes")),
                    ("ExecReload", ("/bin/kill", "-HUP", "$MAINPID"))))
    a, _ = adopt(legacy, ["80"])
    assert a.data["command"] == ["/usr/bin/a", "--port={instance_port}"]
    assert a.not_carried == [
        "ExecStart= has 2 commands (Type=simple); only the first is carried: a zdd-agent "
        "instance runs one program; run the others from it, or as hooks",
        "ExecStartPre=/usr/bin/migrate --yes not carried: an instance runs its command alone; "
        "fold it into the command, or use a hook (pre_swap, post_start, post_swap)",
        "ExecReload=/bin/kill -HUP $MAINPID not carried: a new version is swapped in, not "
        "reloaded"]


def test_without_exec_start_is_refused() -> None:
    with pytest.raises(ConfigError, match="has no ExecStart"):
        to_config(LegacyUnit(name="x.service", exec_start=()), "api", ["80"], None)


# ------------------------------------------------------------ environment


def test_reserved_environment_names() -> None:
    legacy = unit(["/usr/bin/api", "--port=80"],
                  environment=("ZDD_VERSION=1", "LISTEN_FDS=1", "NOTIFY_SOCKET=/run/x",
                               "OK=yes", "BAD-NAME=1"))
    a, _ = adopt(legacy, ["80"])
    assert a.data["environment"] == {"OK": "yes"}
    assert a.not_carried == [
        "Environment=ZDD_VERSION not carried: the agent and systemd set ZDD_VERSION for each "
        "instance",
        "Environment=LISTEN_FDS not carried: the agent and systemd set LISTEN_FDS for each "
        "instance",
        "Environment=NOTIFY_SOCKET not carried: the agent and systemd set NOTIFY_SOCKET for "
        "each instance",
        "Environment=BAD-NAME not carried: environment: 'BAD-NAME' is not a variable name "
        "(allowed: [A-Za-z_][A-Za-z0-9_]*)"]


def test_working_directory_that_may_be_missing() -> None:
    a, _ = adopt(unit(["/usr/bin/api", "--port=80"], working_directory="!/srv/api"), ["80"])
    assert a.data["working_directory"] == "/srv/api"
    assert a.not_carried == ["WorkingDirectory=-/srv/api may be missing in the unit; "
                             "working_directory must exist before a swap"]


def test_optional_environment_file_and_home_directory() -> None:
    legacy = unit(["/usr/bin/api", "--port=80"], working_directory="~",
                  environment_files=(("/etc/default/api", True), ("/etc/api env", False)))
    a, _ = adopt(legacy, ["80"])
    assert a.data["environment_files"] == ["/etc/default/api"]
    assert "working_directory" not in a.data
    assert notes_matching(a, "EnvironmentFile=-/etc/default/api is optional in the unit")
    assert notes_matching(a, "EnvironmentFile=/etc/api env not carried: environment_files: "
                             "'/etc/api env' has characters a unit file would interpret")
    assert notes_matching(a, "WorkingDirectory=~ (the user's home) not carried")


# ----------------------------------------------------- settings and drain


def test_limits_and_resources() -> None:
    legacy = unit(["/usr/bin/api", "--port=80"],
                  limits=(("nofile", 65536, 65536), ("nproc", INFINITY, INFINITY),
                          ("core", 0, INFINITY)),
                  resources=(("memory_max", 2 * 1024**3), ("cpu_quota", 150)),
                  oom_score_adjust=-100, kill_mode="mixed")
    a, cfg = adopt(legacy, ["80"])
    assert a.data["limits"] == {"nofile": 65536, "nproc": "infinity", "core": 0}
    assert a.data["resources"] == {"memory_max": 2 * 1024**3, "cpu_quota": 150}
    assert cfg.settings.oom_score_adjust == -100 and cfg.settings.kill_mode == "mixed"
    assert a.not_carried == ["LimitCORE=0:infinity: limits.core sets soft and hard to one "
                             "value; carried 0"]


def test_nofile_below_the_floor_and_kill_mode_process() -> None:
    legacy = unit(["/usr/bin/api", "--port=80"], limits=(("nofile", 512, 512),),
                  kill_mode="process")
    a, _ = adopt(legacy, ["80"])
    assert "limits" not in a.data and "kill_mode" not in a.data
    assert notes_matching(a, "LimitNOFILE=512 not carried: limits.nofile: 512 is out of "
                             "range (allowed: 1024..")
    assert notes_matching(a, "KillMode=process not carried: kill_mode: 'process' is not "
                             "allowed (only the main process would be stopped")


def test_nofile_soft_and_hard_carry_the_hard() -> None:
    a, _ = adopt(unit(["/usr/bin/api", "--port=80"], limits=(("nofile", 1024, 65536),)),
                 ["80"])
    assert a.data["limits"] == {"nofile": 65536}
    assert a.not_carried == ["LimitNOFILE=1024:65536: limits.nofile sets soft and hard to "
                             "one value; carried 65536"]


def test_hardening_carried_and_refused() -> None:
    legacy = unit(
        ["/usr/bin/api", "--port=80"],
        hardening=(("NoNewPrivileges", True), ("ProtectSystem", "strict"),
                   ("ReadWritePaths", ["/var/lib/api", "-/var/cache/api"]),
                   ("CapabilityBoundingSet", ["CAP_NET_BIND_SERVICE"]),
                   ("RestrictAddressFamilies", ["AF_UNIX"]), ("UMask", "0027")),
        extras=(("PrivateNetwork", "True"), ("SystemCallFilter", "['accept', ...]"),
                ("Nice", "5")))
    a, cfg = adopt(legacy, ["80"])
    assert a.data["hardening"] == {
        "NoNewPrivileges": True, "ProtectSystem": "strict",
        "ReadWritePaths": ["/var/lib/api", "-/var/cache/api"],
        "CapabilityBoundingSet": ["CAP_NET_BIND_SERVICE"], "UMask": "0027"}
    assert dict(cfg.settings.hardening)["NoNewPrivileges"] == "yes"
    assert a.not_carried == [
        "RestrictAddressFamilies=AF_UNIX not carried: hardening.RestrictAddressFamilies: "
        "denies AF_INET, but socket: nat binds a private port for it (80) itself (allowed: a "
        "list that keeps AF_INET)",
        "PrivateNetwork=True not carried: an instance in its own network namespace cannot be "
        "probed, counted or reached on a port of its own",
        "SystemCallFilter=['accept', ...] not carried: systemd reports it with its @sets "
        "expanded; copy the unit file's SystemCallFilter= line into "
        "hardening.SystemCallFilter",
        "Nice=5 not carried: no service config key carries it; if it matters, a drop-in for "
        "zdd-api@.service can"]


@pytest.mark.parametrize("key,kind,raw,want", [
    ("PrivateTmp", "bool", False, None),
    ("PrivateTmp", "bool", True, True),
    ("ProtectHome", "choice", "no", None),
    ("ProtectHome", "choice", "read-only", "read-only"),
    ("CapabilityBoundingSet", "caps", 2**41 - 1, None),
    ("CapabilityBoundingSet", "caps", 2**64 - 1, None),
    ("CapabilityBoundingSet", "caps", 1 << 10 | 1 << 12, ["CAP_NET_BIND_SERVICE",
                                                          "CAP_NET_ADMIN"]),
    ("CapabilityBoundingSet", "caps", 0, []),
    ("AmbientCapabilities", "caps", 0, None),
    ("AmbientCapabilities", "caps", 1 << 10, ["CAP_NET_BIND_SERVICE"]),
    ("RestrictAddressFamilies", "families", [False, []], None),
    ("RestrictAddressFamilies", "families", [True, ["AF_INET", "AF_UNIX"]],
     ["AF_INET", "AF_UNIX"]),
    ("RestrictAddressFamilies", "families", [False, ["AF_PACKET"]], ["~AF_PACKET"]),
    ("RestrictAddressFamilies", "families", [True, []], "none"),
    ("RestrictNamespaces", "namespaces", 0x7E020000 | 0x80, None),
    ("RestrictNamespaces", "namespaces", 0, True),
    ("RestrictNamespaces", "namespaces", 0x40000000, ["net"]),
    ("SystemCallFilter", "syscalls", [False, []], None),
    ("SystemCallArchitectures", "choice", ["native"], "native"),
    ("UMask", "umask", 0o022, None),
    ("UMask", "umask", 0o077, "0077"),
    ("SystemCallErrorNumber", "word", 1, "EPERM"),
])
def test_hardening_values_from_dbus(key: str, kind: str, raw: Any, want: Any) -> None:
    assert _config_value(key, kind, raw) == want


def test_kill_signal_sigkill_and_short_stop_timeout() -> None:
    legacy = unit(["/usr/bin/api", "--port=80"], kill_signal=signal.SIGKILL,
                  timeout_stop_usec=200_000)
    a, cfg = adopt(legacy, ["80"])
    assert a.data["drain"] == {"grace_period": "1s"}
    assert cfg.drain.signal == "SIGTERM"
    assert a.not_carried == [
        "KillSignal=SIGKILL not carried: it ends the program without a drain (allowed: "
        "SIGTERM, SIGINT, SIGQUIT, SIGHUP, SIGUSR1, SIGUSR2, SIGWINCH); drain.signal stays "
        "SIGTERM: check that the program finishes its requests on it",
        "TimeoutStopSec=200ms: drain.grace_period is 1s (allowed: 1s..3600s)"]


def test_drain_signal_and_grace_carried() -> None:
    a, cfg = adopt(unit(["/usr/bin/api", "--port=80"], kill_signal=signal.SIGQUIT,
                        timeout_stop_usec=45_000_000), ["80"])
    assert (cfg.drain.signal, cfg.drain.grace_period) == ("SIGQUIT", 45.0)


def test_type_forking_restart_no_and_users() -> None:
    legacy = unit(["/usr/sbin/daemon", "--port", "80"], type="forking", restart="no",
                  user="1000", supplementary_groups=("ssl-cert",),
                  other_exec=(), extras=(("PIDFile", "/run/daemon.pid"),))
    a, cfg = adopt(legacy, ["80"])
    assert cfg.user is None and cfg.settings.supplementary_groups == ("ssl-cert",)
    assert a.data["ready"] == {"type": "tcp", "url": "127.0.0.1:{instance_port}"}
    assert [n.split(":")[0] for n in a.not_carried] == [
        "Type=forking not carried", "User=1000 not carried", "Restart=no not carried",
        "PIDFile=/run/daemon.pid not carried"]


def test_bad_name_and_version_refused() -> None:
    with pytest.raises(ConfigError, match="invalid service name"):
        to_config(unit(["/usr/bin/api"]), "Api_1", ["80"], None)
    with pytest.raises(ConfigError, match="invalid version"):
        to_config(unit(["/usr/bin/api"]), "api", ["80"], "../x")


# ------------------------------------------------------------- unit names


@pytest.mark.parametrize("name,want", [
    ("gunicorn", "gunicorn.service"), ("gunicorn.service", "gunicorn.service"),
    ("api@blue.service", "api@blue.service"), (r"srv-a\x2db.service", r"srv-a\x2db.service"),
])
def test_unit_names_accepted(name: str, want: str) -> None:
    assert check_unit_name(name) == want


@pytest.mark.parametrize("name,why", [
    ("api@.service", "a template"), ("gunicorn.socket", "not a .service"),
    ("a b.service", "not a unit name"), ("../x.service", "not a unit name"),
    ("x.service\n", "not a unit name"), ("", "not a unit name"),
    ("a" * 250 + ".service", "not a unit name"), ("api;reboot", "not a unit name"),
])
def test_unit_names_refused(name: str, why: str) -> None:
    with pytest.raises(ConfigError, match=why):
        check_unit_name(name)


class _Untouchable:
    """A Systemd stand-in that fails the test if anything reaches it."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"D-Bus touched: {name}")


@pytest.mark.parametrize("name", ["api;rm -rf /", "x@.service", "gunicorn.socket", "a/b"])
def test_read_legacy_refuses_a_bad_name_before_dbus(name: str) -> None:
    with pytest.raises(ConfigError):
        read_legacy(_Untouchable(), name)  # type: ignore[arg-type]


# --------------------------------------------------------------- property

PORTS = st.integers(min_value=1, max_value=65535)
WORD = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=1,
               max_size=12)
HOSTS = st.sampled_from(["", "0.0.0.0", "127.0.0.1", "[::]", "[::1]", "localhost", "*",
                         "10.1.2.3"])


@st.composite
def port_forms(draw: Any, port: int) -> list[str]:
    """One place a program is told its port: the argument(s), port spelled in."""
    kind = draw(st.sampled_from(["hostport", "flag=", "flag", "url"]))
    if kind == "hostport":
        return [draw(st.sampled_from(["--bind", "-b", "--listen"])), f"{draw(HOSTS)}:{port}"]
    if kind == "flag=":
        return [f"{draw(st.sampled_from(['--port', '--http-port', '--listen']))}={port}"]
    if kind == "flag":
        return [draw(st.sampled_from(["-p", "--port", "--bind"])), str(port)]
    return [f"--url=http://{draw(HOSTS) or 'localhost'}:{port}/"]


@settings(max_examples=200, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(port=PORTS, data=st.data(), words=st.lists(WORD, max_size=6),
       host=st.sampled_from([None, "0.0.0.0", "::", "127.0.0.1"]),
       notify=st.booleans(), env_port=st.booleans())
def test_output_always_parses_and_the_port_is_substituted(
        port: int, data: Any, words: list[str], host: str | None, notify: bool,
        env_port: bool) -> None:
    forms = data.draw(st.lists(port_forms(port), max_size=3))
    argv = ["/usr/bin/srv", *words]
    for form in forms:
        argv += form
    listen = str(port) if host is None else (f"[{host}]:{port}" if ":" in host
                                             else f"{host}:{port}")
    legacy = unit(argv, type="notify" if notify else "exec",
                  environment=(f"PORT={port}",) if env_port else ())
    a, cfg = adopt(legacy, [listen])
    assert cfg.socket == "nat" and cfg.ports == (port,)
    out = a.data["command"]
    assert out[:1 + len(words)] == argv[:1 + len(words)]  # other words as they were
    for arg in out[1 + len(words):]:  # where the port was, only {instance_port}
        bare = re.sub(r"\[[0-9a-f:.]*\]", "[host]", arg)  # "[::1]:" is no port 1
        assert not re.search(rf"(?:^|[:=]){port}(?![0-9])", bare), (arg, out)
    named = bool(forms) or env_port
    assert any("{instance_port}" in x for x in [*out, *a.data.get("environment", {}).values()]) \
        == named
    assert bool([n for n in a.not_carried if "names port" in n]) != named


def test_listening_addresses_of_this_process() -> None:
    """Real loopback listeners of this process are found by its pid."""
    import os
    import socket

    with socket.create_server(("127.0.0.1", 0)) as mine, \
            socket.create_server(("::1", 0), family=socket.AF_INET6) as mine6:
        port, port6 = mine.getsockname()[1], mine6.getsockname()[1]
        found = listening_addresses([os.getpid()])
        assert f"127.0.0.1:{port}" in found and f"[::1]:{port6}" in found
        assert listening_addresses([]) == []


def test_the_version_inside_a_word_is_not_the_version() -> None:
    a, _ = adopt(unit(["/usr/bin/python3", "/srv/shard3/app.py", "--port", "80"]), ["80"],
                 version="3")
    assert a.data["command"][:2] == ["/usr/bin/python3", "/srv/shard3/app.py"]


def test_a_count_equal_to_the_version_is_not_the_version() -> None:
    """--takeover 1: `-w 1` and `--retries=1` are counts; only the release
    path carries the version."""
    a, cfg = adopt(unit(["/opt/app-1/bin/gunicorn", "-w", "1", "--retries=1", "--bind",
                         "0.0.0.0:8000", "app:app"]), ["8000"], version="1")
    assert a.data["command"] == ["/opt/app-{version}/bin/gunicorn", "-w", "1", "--retries=1",
                                 "--bind", "0.0.0.0:{instance_port}", "app:app"]
    assert cfg.argv("2", 40001)[:3] == ["/opt/app-2/bin/gunicorn", "-w", "1"]


def test_variables_systemd_expanded_are_said() -> None:
    a, _ = adopt(unit(["/usr/bin/node", "/srv/web/server.js", "--port", "${PORT}"],
                      environment=("PORT=3000",)), ["3000"])
    assert notes_matching(a, "$PORT, which systemd expanded"), a.not_carried
