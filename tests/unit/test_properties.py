"""Property tests (hypothesis) of everything that reads untrusted input: the
service and agent config parsers, the control protocol's decoder and the
command line. Each input either succeeds or is refused with the module's own
error type, in one line; no other exception escapes.

Bounded for the fast layer: MAX_EXAMPLES each, no deadline (a loaded CI
machine is slow, not wrong), no example database written to the checkout.
"""

from __future__ import annotations

import json
import re
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from agent import protocol
from agent.config import (ServiceConfig, load_agent_config, load_service, parse_service,
                          read_yaml)
from agent.errors import ConfigError, Exit

MAX_EXAMPLES = 200
bounded = settings(max_examples=MAX_EXAMPLES, deadline=None, database=None,
                   suppress_health_check=[HealthCheck.too_slow])

# --------------------------------------------------------------- values

# Strings that reach deep into the parsers, beside random text
WORDS = ["api", "/bin/x", "/opt/{version}/bin/api --port {instance_port}", "8080", "0",
         "65536", "127.0.0.1:8080", "[::1]:8081", "[fe80::1%eth0]:80", "1.2.3.4.5:80",
         "http://127.0.0.1:{instance_port}/ready", "http://127.0.0.1:99999/", "tcp://x:1",
         "grpc://[::1]:{instance_port}", "127.0.0.1:{instance_port}", "2s", "500ms", "1m", "1h",
         "0s", "25%", "100%", "101%", "1e400", "-1", "nan", "inf", "SIGTERM", "SIGKILL", "notify",
         "http", "grpc", "tcp", "exec", "inherit", "reuseport", "1.1", "2", "{instance_port}",
         "{version}", "a b 'c", "\x00", "\x7f", "\n", "é", "ZDD_X", "LISTEN_FDS", "x" * 300,
         "helloworld.Greeter", "somaxconn", "10240 65535", "1 2", "zdd-admin", "root"]
SCALARS = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(2**64), max_value=2**64),
    st.sampled_from([0, 1, 2, 64, 65, 65535, 65536, 2**31 - 1, 2**31, 2**63 - 1, -(2**63)]),
    st.floats(), st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e308, 0.5]),
    st.text(max_size=20), st.sampled_from(WORDS), st.binary(max_size=8), st.dates(),
)


def values(keys: list[str] | None = None) -> st.SearchStrategy[Any]:
    """Anything YAML can hold: scalars, lists, mappings (keys: these, or any)."""
    key = st.sampled_from(keys) if keys else st.one_of(st.sampled_from(WORDS), st.text(max_size=8))
    return st.recursive(SCALARS, lambda kids: st.one_of(
        st.lists(kids, max_size=4), st.dictionaries(key, kids, max_size=4)), max_leaves=12)


def section(keys: list[str], plausible: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """A mapping of mostly known keys with plausible or arbitrary values, or
    anything at all in its place."""
    value = st.one_of(plausible, values())
    return st.one_of(st.dictionaries(st.one_of(st.sampled_from(keys), st.text(max_size=6)),
                                     value, max_size=len(keys)),
                     values())


READY_KEYS = ["type", "url", "command", "period", "timeout", "failure_threshold",
              "success_threshold", "initial_delay", "deadline", "http_version", "grpc_service"]
PLAUSIBLE = st.one_of(st.sampled_from(WORDS), SCALARS, st.lists(st.sampled_from(WORDS),
                                                                   max_size=3))
SERVICES = st.fixed_dictionaries(
    {"name": st.one_of(st.just("api"), values()),
     "command": st.one_of(st.sampled_from(WORDS[1:3]), values()),
     "listen": st.one_of(st.lists(st.sampled_from(WORDS[3:9]), max_size=3), values())},
    optional={
        "socket": PLAUSIBLE, "user": PLAUSIBLE, "replicas": PLAUSIBLE,
        "environment": st.one_of(st.dictionaries(st.sampled_from(WORDS), PLAUSIBLE,
                                                 max_size=3), values()),
        "ready": section(READY_KEYS, PLAUSIBLE),
        "drain": section(["grace_period", "signal", "pre_stop_delay"], PLAUSIBLE),
        "hooks": section(["pre_swap", "post_start", "post_swap", "on_rollback"],
                         section(["command", "timeout"], PLAUSIBLE)),
        "strategy": section(["max_surge", "max_unavailable", "min_ready", "watch"], PLAUSIBLE),
        "unknown": values(),
    })
# A valid config with one to three of its keys (at any depth) set to another
# value or removed: reaches the checks behind the first ones.
VALID = {"name": "api", "command": "/opt/api/{version}/bin/api --port 8080",
         "listen": ["127.0.0.1:8080", "[::1]:8081"], "socket": "inherit", "user": None,
         "replicas": 4, "environment": {"LOG": "info", "N": 2},
         "ready": {"type": "http", "url": "http://127.0.0.1:{instance_port}/ready",
                   "period": "2s", "timeout": "1s", "failure_threshold": 3,
                   "success_threshold": 1, "initial_delay": "0s", "deadline": "60s",
                   "http_version": "1.1"},
         "drain": {"grace_period": "30s", "signal": "SIGTERM", "pre_stop_delay": "0s"},
         "hooks": {"pre_swap": {"command": "/bin/m", "timeout": "5m"},
                   "post_start": {"command": ["/bin/w", "http://127.0.0.1:{instance_port}/"]}},
         "strategy": {"max_surge": "25%", "max_unavailable": 1, "min_ready": "5s",
                      "watch": "60s"},
         "working_directory": "/srv/api/{version}", "group": "api",
         "supplementary_groups": ["ssl-cert"], "environment_files": ["/etc/api/env"],
         "limits": {"nofile": 131072, "nproc": 4096, "core": 0},
         "resources": {"memory_max": "2G", "memory_high": "1536M", "cpu_quota": "150%",
                       "tasks_max": 512},
         "slice": {"memory_max": "4G"}, "oom_score_adjust": -100, "kill_mode": "mixed",
         "hardening": {"ProtectSystem": "strict", "NoNewPrivileges": True,
                       "ReadWritePaths": ["/var/lib/api"],
                       "RestrictAddressFamilies": ["AF_UNIX", "AF_INET", "AF_INET6"],
                       "SystemCallFilter": ["@system-service"], "UMask": "0027"}}
SETTINGS_SECTIONS = {
    "limits": ["nofile", "nproc", "core"],
    "resources": ["memory_max", "memory_high", "cpu_quota", "tasks_max"],
    "slice": ["memory_max", "memory_high", "cpu_quota", "tasks_max"],
    "hardening": ["ProtectSystem", "NoNewPrivileges", "ReadWritePaths",
                  "RestrictAddressFamilies", "SystemCallFilter", "UMask",
                  "CapabilityBoundingSet", "RestrictNamespaces", "PrivateNetwork"]}
KEYS = [(k,) for k in [*VALID, "other"]] + [
    (section_, k) for section_, ks in SETTINGS_SECTIONS.items() for k in [*ks, "other"]] + [
    ("ready", k) for k in [*READY_KEYS, "command", "grpc_service", "other"]] + [
    ("drain", k) for k in ["grace_period", "signal", "pre_stop_delay", "other"]] + [
    ("strategy", k) for k in ["max_surge", "max_unavailable", "min_ready", "watch"]] + [
    ("hooks", h, k) for h in ["pre_swap", "post_start", "post_swap", "on_rollback"]
    for k in ["command", "timeout", "other"]] + [("environment", k) for k in WORDS[:12]]
GONE = object()  # the key is removed


def mutated(base: dict[str, Any], changes: list[tuple[tuple[str, ...], Any]]) -> Any:
    data = json.loads(json.dumps(base))
    for path, value in changes:
        d = data
        for k in path[:-1]:
            d = d.setdefault(k, {}) if isinstance(d, dict) else {}
        if isinstance(d, dict):
            if value is GONE:
                d.pop(path[-1], None)
            else:
                d[path[-1]] = value
    return data


def near(base: dict[str, Any], keys: list[tuple[str, ...]]) -> st.SearchStrategy[Any]:
    change = st.tuples(st.sampled_from(keys), st.one_of(st.just(GONE), PLAUSIBLE, values()))
    return st.lists(change, min_size=1, max_size=3).map(lambda c: mutated(base, c))


SERVICES = st.one_of(near(VALID, KEYS), near(VALID, KEYS), SERVICES)
VALID_AGENT = {"admin_group": "zdd-admin",
               "sysctl": {"net.core.somaxconn": 4096,
                          "net.ipv4.ip_local_port_range": "10240 65535"},
               "metrics": {"listen": "127.0.0.1:9469"}, "host_ready": {"listen": "0.0.0.0:9470"}}
AGENT_KEYS = [("admin_group",), ("sysctl",), ("metrics",), ("host_ready",), ("other",),
              ("metrics", "listen"), ("host_ready", "listen"), ("metrics", "other")] + [
    ("sysctl", k) for k in ["net.core.somaxconn", "net.ipv4.ip_local_port_range",
                            "net.ipv4.tcp_migrate_req", "somaxconn"]]
AGENTS = st.one_of(near(VALID_AGENT, AGENT_KEYS), st.one_of(
    st.fixed_dictionaries({}, optional={
        "admin_group": PLAUSIBLE,
        "sysctl": section(["net.core.somaxconn", "net.ipv4.ip_local_port_range",
                           "net.ipv4.tcp_fastopen", "somaxconn"], PLAUSIBLE),
        "metrics": section(["listen"], PLAUSIBLE),
        "host_ready": section(["listen"], PLAUSIBLE),
        "other": values()}),
    values()))


def one_line(e: Exception) -> bool:
    return "\n" not in str(e) and str(e) != ""


@pytest.fixture(scope="module")
def config_dir() -> Iterator[Path]:
    """A directory the config checks accept (root's, 0755); hypothesis runs
    many examples per test, so not the function-scoped tmp_path."""
    with tempfile.TemporaryDirectory() as d:
        os.chmod(d, 0o755)
        yield Path(d)


def write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text)
    os.chmod(path, 0o644)
    return path


def dump(data: Any) -> str:
    """YAML text of `data` as an operator could write it (dates and bytes too)."""
    return yaml.safe_dump(data, allow_unicode=True)


# ------------------------------------------------------- service configs


@bounded
@given(SERVICES)
def test_parse_service_accepts_or_raises_config_error(data: dict[str, Any]) -> None:
    try:
        svc = parse_service(Path("x.yaml"), data)
    except ConfigError as e:
        assert one_line(e) and str(e).startswith("x.yaml: "), e
    else:
        assert isinstance(svc, ServiceConfig)
        # what is accepted renders, and every line of it is one directive,
        # a section header or a comment: no value reached a second line
        from agent import units

        for text in units.render_service(svc, 4096, nofile=65536).files.values():
            for line in text.splitlines():
                assert line == "" or line.startswith(("#", "[")) or \
                    re.fullmatch(r"[A-Za-z]+=.*", line), line


@bounded
@given(SERVICES)
def test_a_service_config_file_loads_or_raises_config_error(config_dir: Path,
                                                            data: dict[str, Any]) -> None:
    write(config_dir / "api.yaml", dump(data))
    try:
        load_service(config_dir, "api")
    except ConfigError as e:
        assert one_line(e) and str(e).startswith(f"{config_dir / 'api.yaml'}: "), e


@bounded
@given(st.one_of(st.text(max_size=200),
                 st.lists(st.sampled_from(["a:", " ", "\n", "- ", "[", "]", "{", "}", "&a ",
                                           "*a", "!!int ", "!!binary ", "!!timestamp ", "0x",
                                           "9" * 30, "2001-02-30", ":", "'", '"', "#", "|",
                                           "\t", "\x00", "\ufeff", "%YAML 1.1\n", "---\n",
                                           "<<: ", "? ", ",", "1:2:3"]),
                          max_size=40).map("".join),
                 st.binary(max_size=100)))
@example("x: " + "[" * 100)
@example("a: &a [*a]")
def test_read_yaml_reads_any_text_or_raises_config_error(config_dir: Path,
                                                         text: str | bytes) -> None:
    path = write(config_dir / "any.yaml", text)
    try:
        read_yaml(path)
    except ConfigError as e:
        assert one_line(e) and str(e).startswith(f"{path}: "), e


# --------------------------------------------------------- agent config


@bounded
@given(AGENTS)
@example({"\n": None})  # an unknown key holding a newline split the message
@example({"sysctl": {"a\nb": 1}})
@example({"host_ready": {"listen": "[::1%x\ny]:80"}})  # an IPv6 scope id holds anything
@example({"metrics": {"listen": "[fe80::1%x\ny]:80"}})
def test_agent_config_loads_or_raises_config_error(config_dir: Path, data: Any) -> None:
    path = write(config_dir / "agent.yaml", dump(data))
    try:
        load_agent_config(path)
    except ConfigError as e:
        assert one_line(e) and str(e).startswith(f"{path}: "), e


# ------------------------------------------------------- control protocol

JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
              st.text(max_size=20), st.sampled_from(list(protocol.COMMANDS))),
    lambda kids: st.one_of(st.lists(kids, max_size=4),
                           st.dictionaries(st.text(max_size=8), kids, max_size=4)),
    max_leaves=12)
REQUESTS = st.fixed_dictionaries(
    {}, optional={"v": st.one_of(st.just(1), JSON), "cmd": st.one_of(
        st.sampled_from(list(protocol.COMMANDS)), JSON),
        "args": st.one_of(st.dictionaries(
            st.sampled_from(["service", "version", "dry_run", "limit", "reason", "x"]),
            st.one_of(st.sampled_from(["api", "v1", "../x", "", "A", "v" * 70]),
                      st.integers(min_value=-2, max_value=2000), JSON), max_size=4), JSON)})


@bounded
@given(st.one_of(st.binary(max_size=300),
                 JSON.map(lambda v: json.dumps(v).encode()),
                 REQUESTS.map(lambda v: json.dumps(v).encode())))
@example(b"[" * 60_000)
@example(b'{"v": 1, "cmd": []}')
@example(b'{"v": 1, "cmd": {}}')
@example(b'{"v": 1, "cmd": "status", "args": {"service": []}}')
@example(b"9" * 5000)
@example(b'{"v":1,"cmd":"ping","args":{"\\n":null}}')  # once a two-line error
def test_decode_request_accepts_or_raises_protocol_error(line: bytes) -> None:
    try:
        req = protocol.decode_request(line)
    except protocol.ProtocolError as e:
        assert one_line(e), e
    else:
        assert req.cmd in protocol.COMMANDS


# ----------------------------------------------------------- command line

EXIT_CODES = {int(e) for e in Exit} | {130}  # 130: interrupted (SIGINT's shell convention)
GOOD_SERVICE = ("name: api\ncommand: /nonexistent/{version}/bin/api\nlisten: [18080]\n"
                "ready: {type: notify}\n")


@pytest.fixture(scope="module")
def cli_paths(config_dir: Path) -> list[str]:
    """Explicit paths, so the CLI acts in-process on these (never a daemon);
    the service's executable does not exist: nothing can start."""
    services = config_dir / "services"
    services.mkdir(mode=0o755, exist_ok=True)
    os.chmod(services, 0o755)
    write(services / "api.yaml", GOOD_SERVICE)
    write(config_dir / "agent-cli.yaml", "admin_group: zdd-admin\n")
    return ["--config-dir", str(services), "--state-dir", str(config_dir / "state"),
            "--agent-config", str(config_dir / "agent-cli.yaml")]


# Commands that only read, or refuse before touching the host (no executable);
# never sysctl apply/restore, install, daemon, demo: they change this machine.
COMMANDS = [["swap"], ["status"], ["rollback"], ["check-config"], ["sysctl", "check"],
            ["history"]]
TOKENS = ["api", "web", "v1", "--version", "--local", "--json", "--dry-run", "--name", "--agent",
          "-n", "--limit", "0", "-1", "1001", "99999999999999999999999", "", "\x00", "--",
          "-h", "/nonexistent", "..", "é", "../../etc/passwd", "--version=v2", "-x", "\n"]
NAMES = st.one_of(st.sampled_from(["api", "web", "../api", "", "API", "a" * 49, "\x00", "-x",
                                   "v1", "api\n"]), st.text(max_size=8))
VERSIONS = st.one_of(st.sampled_from(["v1", "v2.0-rc_1", "../v1", "", "v" * 65, "-v", "v1\n",
                                      "v1;rm"]), st.text(max_size=8))
LIMITS = st.one_of(st.integers(min_value=-5, max_value=2000).map(str), st.text(max_size=4))


def opt(*parts: st.SearchStrategy[list[str]]) -> st.SearchStrategy[list[str]]:
    return st.tuples(*parts).map(lambda ps: [a for p in ps for a in p])


# Each command with plausible arguments, or random words after any of them
ARGV = st.one_of(
    opt(st.just(["swap"]), NAMES.map(lambda n: [n]), VERSIONS.map(lambda v: ["--version", v]),
        st.lists(st.sampled_from(["--json", "--dry-run"]), max_size=2, unique=True)),
    opt(st.just(["status"]), st.lists(NAMES, max_size=1), st.lists(st.just("--json"), max_size=1)),
    opt(st.just(["rollback"]), NAMES.map(lambda n: [n]), st.lists(st.just("--json"), max_size=1)),
    opt(st.just(["history"]), st.lists(NAMES, max_size=1), LIMITS.map(lambda n: ["-n", n]),
        st.lists(st.just("--json"), max_size=1)),
    opt(st.just(["sysctl", "check"]), st.lists(st.just("--json"), max_size=1)),
    opt(st.just(["check-config"]), st.one_of(st.just([]), NAMES.map(lambda n: ["--name", n])),
        st.lists(st.just("--agent"), max_size=1)),
    opt(st.sampled_from(COMMANDS), st.lists(st.one_of(st.sampled_from(TOKENS),
                                                      st.text(max_size=6)), max_size=6)),
)


def run_main(argv: list[str]) -> tuple[int, str]:
    """agent.cli.main (the real entry point) with this argv, its output
    captured by click's test runner; an exception other than SystemExit
    escapes to the test."""
    from agent.cli import main

    runner = CliRunner()
    with runner.isolation() as (_out, _err, output), \
            mock.patch.object(sys, "argv", ["zdd-agent", *argv]):
        try:
            main()
            code: Any = 0
        except SystemExit as e:
            code = e.code
    return code, output.getvalue().decode(errors="replace")


@bounded
@given(ARGV)
def test_the_cli_exits_with_a_named_code_and_no_traceback(cli_paths: list[str],
                                                          argv: list[str]) -> None:
    if argv[0] == "check-config":  # FILE last; no --local: it never asks the daemon
        argv = [*argv, cli_paths[5] if "--agent" in argv else cli_paths[1] + "/api.yaml"]
    else:
        words = 2 if argv[0] == "sysctl" else 1
        argv = [*argv[:words], "--local", *argv[words:]]
    code, output = run_main([*cli_paths, *argv])
    assert code in EXIT_CODES, (code, output)
    assert "Traceback" not in output, output


@pytest.mark.parametrize("argv,code", [
    (["swap", "api", "--version", "v1"], Exit.CONFIG),  # /nonexistent/v1/bin/api not found
    (["swap", "api", "--version", "../v1"], Exit.CONFIG),
    (["rollback", "api"], Exit.NO_HISTORY),
    (["history", "-n", "0"], Exit.CONFIG),
    (["status", "nope"], Exit.CONFIG),
])
def test_cli_examples(cli_paths: list[str], argv: list[str], code: int) -> None:
    got, output = run_main([*cli_paths, *argv[:1], "--local", *argv[1:]])
    assert got == code, output
    assert "Traceback" not in output
