"""Service config validation: every bad input names the file, the key and
what is allowed; good input comes out typed."""

from __future__ import annotations

import os
import re
import threading
import time
import tracemalloc
from pathlib import Path

import pytest

from agent.config import (DEFAULT_MIN_READY, DEFAULT_WATCH, MAX_CONFIG_BYTES, load_agent_config,
                          load_all, load_service, parse_duration, parse_service, read_yaml)
from agent.errors import ConfigError, Exit

GOOD = """\
name: api
command: /opt/api/{version}/bin/api --workers 2 "--label=a b"
listen: ["127.0.0.1:8080", "[::1]:8081"]
socket: inherit
user: null
environment: {LOG_LEVEL: info, WORKERS: 2}
ready:
  type: http
  url: http://127.0.0.1:{instance_port}/ready
  period: 2s
  timeout: 1s
  failure_threshold: 3
  success_threshold: 1
  initial_delay: 0s
  deadline: 60s
drain:
  grace_period: 30s
  signal: SIGTERM
"""


def write(tmp_path: Path, text: str, name: str = "api") -> Path:
    d = tmp_path / "services"
    d.mkdir(exist_ok=True, mode=0o755)
    os.chmod(d, 0o755)
    p = d / f"{name}.yaml"
    p.write_text(text)
    os.chmod(p, 0o644)
    return p


def test_good_config_parses(tmp_path: Path) -> None:
    p = write(tmp_path, GOOD)
    svc = load_service(p.parent, "api")
    assert svc.name == "api"
    assert svc.argv("v2") == ["/opt/api/v2/bin/api", "--workers", "2", "--label=a b"]
    assert [str(lst) for lst in svc.listen] == ["127.0.0.1:8080", "[::1]:8081"]
    assert svc.ports == (8080, 8081)
    assert dict(svc.environment) == {"LOG_LEVEL": "info", "WORKERS": "2"}
    assert svc.ready.type == "http" and svc.ready.needs_instance_port
    assert (svc.ready.period, svc.ready.timeout, svc.ready.deadline) == (2.0, 1.0, 60.0)
    assert svc.drain.grace_period == 30.0 and svc.drain.signal == "SIGTERM"


def test_defaults(tmp_path: Path) -> None:
    p = write(tmp_path, "name: api\ncommand: /bin/api\nlisten: [8080]\n")
    svc = load_service(p.parent, "api")
    assert svc.ready.type == "notify" and svc.ready.deadline == 60.0
    assert svc.listen[0].host is None and str(svc.listen[0]) == "8080"
    assert svc.drain.grace_period == 30.0


@pytest.mark.parametrize("value,seconds", [("500ms", 0.5), ("2s", 2.0), ("1m", 60.0),
                                           ("1h", 3600.0), (3, 3.0), ("1.5s", 1.5)])
def test_durations(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["2", "s", "-1s", "2 days", True, None, [1]])
def test_bad_durations(value: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(value)


BAD = [
    # (replace this, with that, key named in the message, words in the message)
    ("socket: inherit", "socket: inherit\ncolour: blue", "colour", "unknown key"),
    ("  period: 2s", "  period: 2s\n  perid: 3s", "ready.perid", "unknown key"),
    ("  period: 2s", "  period: 90s", "ready.period", "1s..60s"),
    ("  period: 2s", "  period: fast", "ready.period", "allowed"),
    ("  grace_period: 30s", "  grace_period: 0s", "drain.grace_period", "1s..3600s"),
    ("  grace_period: 30s", "  grace_period: 2h", "drain.grace_period", "1s..3600s"),
    ("  deadline: 60s", "  deadline: 500ms", "ready.deadline", "allowed"),
    ("  failure_threshold: 3", "  failure_threshold: three", "ready.failure_threshold",
     "not an integer"),
    ("  success_threshold: 1", "  success_threshold: 0", "ready.success_threshold", "1..100"),
    ("  timeout: 1s", "  timeout: 5s", "ready.timeout", "longer than period"),
    ("name: api", "name: API", "name", "[a-z0-9]"),
    ("name: api", "name: other", "name", "differs from the file name"),
    ("command: /opt/api/{version}/bin/api --workers 2 \"--label=a b\"",
     "command: bin/api", "command", "absolute path"),
    ("command: /opt/api/{version}/bin/api --workers 2 \"--label=a b\"",
     "command: 42", "command", "command line string or a list"),
    ("command: /opt/api/{version}/bin/api --workers 2 \"--label=a b\"",
     "command: '/bin/api \"unclosed'", "command", "cannot split"),
    ('listen: ["127.0.0.1:8080", "[::1]:8081"]', 'listen: ["localhost:8080"]', "listen",
     "not host:port"),
    ('listen: ["127.0.0.1:8080", "[::1]:8081"]', 'listen: ["127.0.0.1:70000"]', "listen",
     "1..65535"),
    ('listen: ["127.0.0.1:8080", "[::1]:8081"]', "listen: []", "listen", "non-empty"),
    ("socket: inherit", "socket: shared", "socket", "allowed: inherit, reuseport"),
    ("user: null", "user: 'root; rm -rf /'", "user", "not a user name"),
    ("environment: {LOG_LEVEL: info, WORKERS: 2}", "environment: {1BAD: x}", "environment",
     "not a variable name"),
    ("environment: {LOG_LEVEL: info, WORKERS: 2}", "environment: {ZDD_VERSION: x}",
     "environment.ZDD_VERSION", "set by the agent"),
    ("environment: {LOG_LEVEL: info, WORKERS: 2}", "environment: [a, b]", "environment",
     "must be a mapping"),
    ("  type: http", "  type: magic", "ready.type", "notify, http, grpc, tcp, exec"),
    ("  url: http://127.0.0.1:{instance_port}/ready", "  url: http://127.0.0.1:8080/ready",
     "ready.url", "shared listen port"),
    ("  url: http://127.0.0.1:{instance_port}/ready", "  url: ftp://x/ready", "ready.url",
     "must start with http://"),
    ("  signal: SIGTERM", "  signal: SIGKILL", "drain.signal", "SIGTERM"),
    # the bake and the watch
    ("socket: inherit", "socket: inherit\nstrategy: {min_ready: 2h}", "strategy.min_ready",
     "allowed: 0s..3600s"),
    ("socket: inherit", "socket: inherit\nstrategy: {min_ready: -1s}", "strategy.min_ready",
     "allowed: 0s..3600s"),
    ("socket: inherit", "socket: inherit\nstrategy: {watch: 2d}", "strategy.watch",
     "allowed: 0s..86400s"),
    ("socket: inherit", "socket: inherit\nstrategy: {watch: 25h}", "strategy.watch",
     "allowed: 0s..86400s"),
    # a probe another instance could answer
    ("  url: http://127.0.0.1:{instance_port}/ready", "  url: http://127.0.0.1:9000/ready",
     "ready.url", "fixed port 9000: during a swap the old instance may answer it"),
    ("  url: http://127.0.0.1:{instance_port}/ready", "  url: http://127.0.0.1:9000/ready",
     "ready.url", "allowed: {instance_port} as the port"),
    ("  url: http://127.0.0.1:{instance_port}/ready", "  url: http://127.0.0.1/ready",
     "ready.url", "expected http://HOST:{instance_port}/"),
    # every literal port is a port
    ("  url: http://127.0.0.1:{instance_port}/ready", "  url: http://127.0.0.1:0/ready",
     "ready.url", "port 0 in 'http://127.0.0.1:0/ready' is out of range (allowed: 1..65535"),
    ("  url: http://127.0.0.1:{instance_port}/ready", "  url: http://127.0.0.1:99999/ready",
     "ready.url", "port 99999"),
    ("environment: {LOG_LEVEL: info, WORKERS: 2}",
     "environment: {DB: 'postgres://u:p@db:99999/x'}", "environment.DB",
     "port 99999 in 'postgres://u:p@db:99999/x' is out of range (allowed: 1..65535)"),
    ("command: /opt/api/{version}/bin/api --workers 2 \"--label=a b\"",
     "command: /opt/api/{version}/bin/api --upstream http://10.0.0.1:0/", "command",
     "port 0 in 'http://10.0.0.1:0/' is out of range (allowed: 1..65535)"),
]


@pytest.mark.parametrize("old,new,key,words", BAD)
def test_bad_config_names_file_key_and_allowed(tmp_path: Path, old: str, new: str, key: str,
                                              words: str) -> None:
    assert old in GOOD
    p = write(tmp_path, GOOD.replace(old, new, 1))
    with pytest.raises(ConfigError) as e:
        load_service(p.parent, "api")
    msg = str(e.value)
    assert msg.startswith(f"{p}: {key}"), msg
    assert words in msg, msg
    assert e.value.exit_code == Exit.CONFIG == 2


def test_unparseable_yaml(tmp_path: Path) -> None:
    p = write(tmp_path, "name: api\ncommand: [unclosed\n")
    with pytest.raises(ConfigError, match=rf"{p}: not valid YAML"):
        load_service(p.parent, "api")


def test_not_a_mapping(tmp_path: Path) -> None:
    p = write(tmp_path, "- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_service(p.parent, "api")


def test_missing_required_key(tmp_path: Path) -> None:
    p = write(tmp_path, "name: api\nlisten: [8080]\n")
    with pytest.raises(ConfigError, match=rf"{p}: command: required key is missing"):
        load_service(p.parent, "api")


def test_exec_needs_command_and_http_needs_url(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="ready.command: required for type exec"):
        parse_service(Path("x.yaml"), {"name": "x", "command": "/bin/x", "listen": [1],
                                       "ready": {"type": "exec"}})
    with pytest.raises(ConfigError, match="ready.url: required for type http"):
        parse_service(Path("x.yaml"), {"name": "x", "command": "/bin/x", "listen": [1],
                                       "ready": {"type": "http"}})
    with pytest.raises(ConfigError, match="ready.url: only for type http, grpc or tcp"):
        parse_service(Path("x.yaml"), {"name": "x", "command": "/bin/x", "listen": [1],
                                       "ready": {"url": "http://127.0.0.1:1/"}})


@pytest.mark.parametrize("target", ["file", "dir"])
def test_writable_by_others_is_refused(tmp_path: Path, target: str) -> None:
    p = write(tmp_path, GOOD)
    victim = p if target == "file" else p.parent
    os.chmod(victim, 0o664 if target == "file" else 0o775)
    with pytest.raises(ConfigError, match=rf"{victim}: writable by group or others"):
        load_service(p.parent, "api")


def test_config_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("chown to another uid needs root")
    p = write(tmp_path, GOOD)
    os.chown(p, 65534, -1)
    with pytest.raises(ConfigError, match=rf"{p}: owned by uid 65534, not by root"):
        load_service(p.parent, "api")


def test_symlinked_config_file_is_refused(tmp_path: Path) -> None:
    real = write(tmp_path, GOOD, name="real")
    link = real.parent / "api.yaml"
    link.symlink_to(real)
    with pytest.raises(ConfigError) as e:
        load_service(link.parent, "api")
    assert str(e.value) == (f"{link}: a symbolic link, refused: config is read without "
                            "following links, so that what was checked is what is read; put "
                            "the real file in its place (copy it)")


def test_symlinked_config_dir_is_refused_but_ancestors_are_followed(tmp_path: Path) -> None:
    p = write(tmp_path, GOOD)
    (tmp_path / "link").symlink_to(p.parent)
    with pytest.raises(ConfigError, match=rf"{tmp_path / 'link'}: a symbolic link, refused: "
                                          ".* name the real directory instead"):
        load_service(tmp_path / "link", "api")
    # O_NOFOLLOW is about the last component: a link higher up is followed
    (tmp_path / "up").symlink_to(tmp_path)
    assert load_service(tmp_path / "up" / "services", "api").name == "api"


def test_a_fifo_or_a_directory_is_refused_without_blocking(tmp_path: Path) -> None:
    p = write(tmp_path, GOOD)
    p.unlink()
    os.mkfifo(p, 0o644)  # no writer: a blocking open(2) would wait forever
    outcome: list[Exception] = []
    t = threading.Thread(target=lambda: outcome.append(_raised(load_service, p.parent, "api")),
                         daemon=True)
    t.start()
    t.join(5)
    assert not t.is_alive(), "opening a FIFO blocked"
    assert re.fullmatch(rf"{p}: not a regular file \(allowed: a YAML file\)", str(outcome[0]))
    p.unlink()
    p.mkdir(mode=0o755)
    with pytest.raises(ConfigError, match=rf"{p}: not a regular file"):
        load_service(p.parent, "api")


def _raised(fn: object, *args: object) -> Exception:
    try:
        fn(*args)  # type: ignore[operator]
    except Exception as e:  # handed back to the test thread to assert on
        return e
    raise AssertionError("no error")


def test_checks_are_on_the_descriptor_that_is_read(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The owner and mode come from fstat of the open descriptor, never from a
    second lookup by name (a window in which the file could be swapped)."""
    p = write(tmp_path, GOOD)
    looked_up: list[object] = []
    real_stat = os.stat
    monkeypatch.setattr(os, "stat", lambda *a, **k: looked_up.append(a) or real_stat(*a, **k))
    monkeypatch.setattr(os, "lstat", lambda *a, **k: looked_up.append(a) or real_stat(*a, **k))
    assert read_yaml(p)["name"] == "api"
    assert looked_up == []


def test_a_file_read_again_is_checked_again_and_parsed_only_when_it_changed(
        tmp_path: Path) -> None:
    """read_yaml keeps the last document per path (issue 16): the same bytes
    give an equal document that the caller may change freely, other bytes
    are parsed afresh, and the owner and mode checks run at every read."""
    p = write(tmp_path, GOOD)
    first = read_yaml(p)
    first["name"] = "changed by the caller"
    assert read_yaml(p)["name"] == "api"
    p.write_text(GOOD.replace("name: api", "name: web"))
    assert read_yaml(p)["name"] == "web"
    p.chmod(0o666)
    with pytest.raises(ConfigError, match="writable"):
        read_yaml(p)


def test_bad_service_name_on_command_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="invalid service name"):
        load_service(tmp_path, "../etc/passwd")


def test_version_validation() -> None:
    svc = parse_service(Path("x.yaml"), {"name": "x", "command": "/r/{version}/x",
                                         "listen": [1]})
    assert svc.argv("v1.2.3-rc_1") == ["/r/v1.2.3-rc_1/x"]
    for bad in ("", "-v1", "v1/../../etc", "v1 v2", "v" * 65, "v1\n"):
        with pytest.raises(ConfigError, match="invalid version"):
            svc.argv(bad)


def test_load_all_rejects_shared_port(tmp_path: Path) -> None:
    write(tmp_path, "name: a\ncommand: /bin/a\nlisten: [8080]\n", "a")
    p = write(tmp_path, "name: b\ncommand: /bin/b\nlisten: ['127.0.0.1:8080']\n", "b")
    with pytest.raises(ConfigError, match=rf"{p}: listen: port 8080 is also used by service 'a'"):
        load_all(p.parent)


def test_agent_config(tmp_path: Path) -> None:
    p = tmp_path / "agent.yaml"
    p.write_text("sysctl:\n  net.core.somaxconn: 4096\n  net.ipv4.tcp_migrate_req: null\n")
    os.chmod(p, 0o644)
    os.chmod(tmp_path, 0o755)
    cfg = load_agent_config(p)
    assert dict(cfg.sysctl) == {"net.core.somaxconn": "4096", "net.ipv4.tcp_migrate_req": None}
    p.write_text("sysctl:\n  kernel.panic: 1\n")
    with pytest.raises(ConfigError, match=r"sysctl.kernel.panic: not a key the agent manages"):
        load_agent_config(p)
    assert load_agent_config(tmp_path / "missing.yaml").sysctl == ()


def test_hooks_and_pre_stop_delay(tmp_path: Path) -> None:
    text = GOOD.replace("  signal: SIGTERM", "  signal: SIGTERM\n  pre_stop_delay: 5s") + (
        "hooks:\n  pre_swap: {command: /usr/bin/migrate --expand, timeout: 2m}\n"
        "  on_rollback: {command: [/bin/notify, rollback]}\n")
    p = write(tmp_path, text)
    svc = load_service(p.parent, "api")
    assert svc.drain.pre_stop_delay == 5.0
    assert svc.hook("pre_swap").command == ("/usr/bin/migrate", "--expand")
    assert svc.hook("pre_swap").timeout == 120.0
    assert svc.hook("on_rollback").timeout == 60.0 and svc.hook("post_swap") is None
    for bad, key in (("hooks:\n  pre_deploy: {command: /x}\n", "hooks.pre_deploy"),
                     ("hooks:\n  pre_swap: {timeout: 1s}\n", "hooks.pre_swap.command"),
                     ("hooks:\n  pre_swap: {command: x}\n", "hooks.pre_swap.command")):
        p = write(tmp_path, GOOD + bad)
        with pytest.raises(ConfigError, match=rf"{p}: {key}"):
            load_service(p.parent, "api")


def test_grpc_and_h2c_readiness_keys(tmp_path: Path) -> None:
    base = {"name": "x", "command": "/bin/x", "listen": [8080]}
    svc = parse_service(Path("x.yaml"), {**base, "ready": {
        "type": "grpc", "url": "127.0.0.1:{instance_port}", "grpc_service": "demo.Api"}})
    assert svc.ready.grpc_service == "demo.Api" and svc.ready.needs_instance_port
    svc = parse_service(Path("x.yaml"), {**base, "ready": {
        "type": "http", "url": "http://127.0.0.1:{instance_port}/", "http_version": "2"}})
    assert svc.ready.http_version == "2"
    for ready, words in (({"type": "http", "url": "http://127.0.0.1:1/", "http_version": 3},
                          "ready.http_version: '3' is not allowed"),
                         ({"type": "tcp", "url": "127.0.0.1:1", "http_version": "2"},
                          "ready.http_version: only for type http"),
                         ({"type": "grpc", "url": "127.0.0.1:1", "grpc_service": "a b"},
                          "not a gRPC service name"),
                         ({"type": "grpc", "url": "127.0.0.1:8080"}, "shared listen port")):
        with pytest.raises(ConfigError, match=words):
            parse_service(Path("x.yaml"), {**base, "ready": ready})


def test_replicas_and_strategy(tmp_path: Path) -> None:
    base = {"name": "x", "command": "/bin/x", "listen": [8080]}
    svc = parse_service(Path("x.yaml"), {**base, "replicas": 4})
    assert (svc.replicas, svc.max_surge, svc.max_unavailable) == (4, 1, 0)  # 25%, 0
    svc = parse_service(Path("x.yaml"), {**base, "replicas": 10, "strategy": {
        "max_surge": "25%", "max_unavailable": "25%"}})
    assert (svc.max_surge, svc.max_unavailable) == (3, 2)  # surge up, unavailable down
    assert parse_service(Path("x.yaml"), base).replicas == 1
    for extra, words in (({"replicas": 0}, "replicas: 0 is out of range (allowed: 1..64)"),
                         ({"replicas": 4, "strategy": {"max_surge": 0}},
                          "both 0 for 4 replicas"),
                         ({"replicas": 3, "strategy": {"max_surge": "0%",
                                                       "max_unavailable": "10%"}},
                          "both 0 for 3 replicas"),
                         ({"strategy": {"max_surge": "150%"}}, "strategy.max_surge"),
                         ({"strategy": {"surge": 1}}, "strategy.surge: unknown key")):
        with pytest.raises(ConfigError, match=re.escape(words)):
            parse_service(Path("x.yaml"), {**base, **extra})


def test_min_ready_and_watch(tmp_path: Path) -> None:
    base = {"name": "x", "command": "/bin/x", "listen": [8080]}
    svc = parse_service(Path("x.yaml"), base)
    assert (svc.min_ready, svc.watch) == (DEFAULT_MIN_READY, DEFAULT_WATCH)
    svc = parse_service(Path("x.yaml"), {**base, "strategy": {"min_ready": "1500ms",
                                                               "watch": "5m"}})
    assert (svc.min_ready, svc.watch) == (1.5, 300.0)
    svc = parse_service(Path("x.yaml"), {**base, "strategy": {"min_ready": 0, "watch": "0s"}})
    assert (svc.min_ready, svc.watch) == (0.0, 0.0)  # admitted at the gate; nothing watches
    assert parse_service(Path("x.yaml"), {**base, "strategy": {"watch": "24h"}}).watch == 86400


PROBES = [
    # (name, ready, words in the error or None when it parses)
    ("http on the instance port", {"type": "http", "url": "http://127.0.0.1:{instance_port}/"},
     None),
    ("tcp bare on the instance port", {"type": "tcp", "url": "127.0.0.1:{instance_port}"}, None),
    ("tcp with scheme", {"type": "tcp", "url": "tcp://[::1]:{instance_port}"}, None),
    ("grpc on the instance port", {"type": "grpc", "url": "127.0.0.1:{instance_port}"}, None),
    ("http on the listen port", {"type": "http", "url": "http://127.0.0.1:8080/ready"},
     "fixed port 8080 (the shared listen port): during a swap the old instance may answer it"),
    ("http on another fixed port", {"type": "http", "url": "http://127.0.0.1:9100/health"},
     "fixed port 9100: during a swap"),
    ("tcp on a fixed port", {"type": "tcp", "url": "127.0.0.1:9100"},
     "e.g. 127.0.0.1:{instance_port}"),
    ("grpc on a fixed port", {"type": "grpc", "url": "grpc://127.0.0.1:9100"},
     "ready.type notify or exec with strategy.min_ready"),
    ("tcp port 0", {"type": "tcp", "url": "127.0.0.1:0"}, "port 0 in '127.0.0.1:0'"),
    ("http port 65536", {"type": "http", "url": "http://[::1]:65536/"}, "allowed: 1..65535"),
    ("exec on the shared port", {"type": "exec", "command": "/bin/check 127.0.0.1:8080"},
     "names the shared listen port 8080"),
    ("exec on another port of its own", {"type": "exec", "command": "/bin/check 127.0.0.1:9090"},
     None),
    ("exec URL port out of range", {"type": "exec",
                                    "command": ["/bin/curl", "http://127.0.0.1:70000/"]},
     "ready.command: port 70000"),
]


@pytest.mark.parametrize("name,ready,words", PROBES, ids=[c[0] for c in PROBES])
def test_probes_another_instance_could_answer_are_refused(name: str, ready: dict,
                                                         words: str | None) -> None:
    data = {"name": "x", "command": "/bin/x", "listen": ["127.0.0.1:8080"], "ready": ready}
    if words is None:
        assert parse_service(Path("x.yaml"), data).ready.type == ready["type"]
        return
    with pytest.raises(ConfigError) as e:
        parse_service(Path("x.yaml"), data)
    assert str(e.value).startswith("x.yaml: ready."), e.value
    assert words in str(e.value), e.value


HTTP = {"type": "http", "url": "http://127.0.0.1:{instance_port}/ready"}
POST_START = [
    # (name, ready, hooks, words in the error or None when it parses)
    ("warm-up on the instance port", HTTP,
     {"post_start": {"command": "/bin/curl -sf http://127.0.0.1:{instance_port}/warm?v={version}",
                     "timeout": "30s"}}, None),
    ("exec probe on the instance port", {"type": "exec", "command": "/bin/chk {instance_port}"},
     {"post_start": {"command": ["/bin/warm", "{instance_port}"]}}, None),
    ("no placeholder with notify", {"type": "notify"},
     {"post_start": {"command": "/bin/warm {version}"}}, None),
    ("instance port without a probe on it (the hook alone gets one)", {"type": "notify"},
     {"post_start": {"command": "/bin/warm {instance_port}"}}, None),
    ("instance port in a per-swap hook", HTTP,
     {"pre_swap": {"command": "/bin/migrate {instance_port}"}},
     "hooks.pre_swap.command: {instance_port} means nothing here"),
    ("missing command", HTTP, {"post_start": {"timeout": "5s"}},
     "hooks.post_start.command: required"),
    ("timeout out of range", HTTP, {"post_start": {"command": "/bin/w", "timeout": "2h"}},
     "hooks.post_start.timeout: '2h' is out of range (allowed: 1s..3600s)"),
    ("URL port out of range", HTTP,
     {"post_start": {"command": "/bin/curl http://127.0.0.1:0/warm"}},
     "hooks.post_start.command: port 0"),
]


@pytest.mark.parametrize("name,ready,hooks,words", POST_START, ids=[c[0] for c in POST_START])
def test_post_start_hook(name: str, ready: dict, hooks: dict, words: str | None) -> None:
    data = {"name": "x", "command": "/bin/x", "listen": [8080], "ready": ready, "hooks": hooks}
    if words is None:
        svc = parse_service(Path("x.yaml"), data)
        assert svc.hook("post_start") is not None
        assert svc.hook("post_start").timeout == (30.0 if "timeout" in hooks["post_start"]
                                                  else 60.0)
        return
    with pytest.raises(ConfigError) as e:
        parse_service(Path("x.yaml"), data)
    assert str(e.value).startswith(f"x.yaml: {words.split(':')[0]}"), e.value
    assert words in str(e.value), e.value


def test_post_start_argv_keeps_placeholders_for_the_engine() -> None:
    svc = parse_service(Path("x.yaml"), {"name": "x", "command": "/bin/x", "listen": [8080],
                                         "ready": HTTP, "hooks": {"post_start": {
                                             "command": "/bin/w {instance_port} {version}"}}})
    assert svc.hook("post_start").command == ("/bin/w", "{instance_port}", "{version}")


def test_oversized_config_is_refused_before_parsing(tmp_path: Path) -> None:
    p = write(tmp_path, GOOD + "#" * MAX_CONFIG_BYTES)
    with pytest.raises(ConfigError, match=rf"{p}: larger than 1024 KiB \(allowed: up to "
                                          rf"{MAX_CONFIG_BYTES} bytes"):
        load_service(p.parent, "api")
    p = write(tmp_path, GOOD + "#" * (MAX_CONFIG_BYTES - len(GOOD.encode())))
    assert load_service(p.parent, "api").name == "api"  # exactly the limit is fine


BILLION_LAUGHS = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi"))


def test_billion_laughs_is_refused_fast_in_bounded_memory(tmp_path: Path) -> None:
    """Nine levels of nine aliases: 9^9 (387 million) strings once expanded.
    PyYAML shares aliased nodes, so loading alone is quick; the first walk
    over the result (a repr in a message) would not end."""
    p = write(tmp_path, GOOD + BILLION_LAUGHS.replace("a:", "z:", 1).replace("*a", "*z"))
    tracemalloc.start()
    t0 = time.monotonic()
    try:
        with pytest.raises(ConfigError) as e:
            load_service(p.parent, "api")
        _size, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.monotonic() - t0 < 1.0
    assert peak < 4 * 1024 * 1024
    assert str(e.value).startswith(f"{p}: not valid YAML: alias *z refused: anchors and "
                                   "aliases are not allowed in a config (write the value out)")
    assert "line 20, column 8" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("text,words", [
    ("x: &a [*a]", "alias *a refused"),  # a list that contains itself
    ("x: &a {k: 1}\ny: {<<: *a}", "alias *a refused"),  # merge keys need an alias too
    ("x: " + "[" * 40 + "]" * 40, "nested deeper than 32 levels"),
    ("x: " + "[" * 100_000, "nested deeper than 32 levels"),  # was RecursionError
    ("x: 0x" + "f" * 5000, "an integer of 5002 characters"),  # past Python's int(str) limit
    ("x: " + "9" * 5000, "an integer of 5000 characters"),  # was ValueError
    ("x: " + "1:" * 100_000 + "1", "an integer of 200001 characters"),  # base 60: quadratic
    ("x: 0x8000000000000000", "0x8000000000000000 is out of range"),
    ("x: 2001-02-30", "cannot read '2001-02-30': day is out of range for month"),  # ValueError
    ("x: !!timestamp 2001-13-01", "cannot read '2001-13-01': month must be in 1..12"),
    ("x: !!float abc", "cannot read 'abc': could not convert string to float"),
    ("x: !!int abc", "cannot read 'abc': invalid literal for int()"),
    ("x: !!int", "cannot read '': string index out of range"),  # was IndexError
    ("x: !!timestamp", "cannot read '': 'NoneType' object has no attribute"),  # AttributeError
    ("x: !!bool maybe", "cannot read 'maybe': 'maybe'"),  # was KeyError
    ("x: !!python/object/apply:os.system [true]", "could not determine a constructor"),
])
def test_yaml_beyond_the_bounds_is_one_config_error(tmp_path: Path, text: str,
                                                    words: str) -> None:
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        read_yaml(p)
    assert str(e.value).startswith(f"{p}: not valid YAML: "), e.value
    assert words in str(e.value) and "\n" not in str(e.value), e.value


def test_yaml_within_the_bounds_loads(tmp_path: Path) -> None:
    p = write(tmp_path, "a: &unused 1\nb: 0x7fffffffffffffff\nc: 1:30\nd: {<<: {k: 1}}\n"
                        "e: " + "[" * 30 + "]" * 30)
    data = read_yaml(p)
    assert data["a"] == 1 and data["b"] == 2**63 - 1 and data["c"] == 90
    assert data["d"] == {"k": 1}


CHECK_CONFIG = [
    # (name, command, ready, warned)
    ("gunicorn with an http probe", "/opt/venv/bin/gunicorn app:app",
     "{type: http, url: 'http://127.0.0.1:{instance_port}/ready'}", True),
    ("gunicorn with notify", "/opt/venv/bin/gunicorn app:app", "{type: notify}", False),
    ("uvicorn -m with a tcp probe", "/usr/bin/python3 -m uvicorn --fd 3 app:app",
     "{type: tcp, url: '127.0.0.1:{instance_port}'}", True),
    ("the demo api with an http probe", "/opt/api/{version}/bin/api",
     "{type: http, url: 'http://127.0.0.1:{instance_port}/ready'}", False),
]


@pytest.mark.parametrize("name,command,ready,warned", CHECK_CONFIG,
                         ids=[c[0] for c in CHECK_CONFIG])
def test_check_config_warns_of_a_probe_the_server_cannot_answer(
        tmp_path: Path, name: str, command: str, ready: str, warned: bool,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from agent import settings
    from agent.cli import cli

    # a host whose instances get the open files they ask for: no warning of its own
    monkeypatch.setattr(settings, "this_host", lambda: settings.Host(2, 1048576, None, 8 << 30))

    p = write(tmp_path, f"name: api\ncommand: {command}\nlisten: [8080]\nready: {ready}\n")
    r = CliRunner().invoke(cli, ["check-config", str(p)])
    assert r.exit_code == 0, r.output
    assert r.stdout.splitlines()[:2] == [f"{p}: a valid config of service api",
                                     "  limits.nofile 65536 (default): up to 32,768 connections "
                                     "per instance at 2 descriptors each; the target is 10,000 "
                                     "per core, 20,000 on 2 cores"]
    if not warned:
        assert r.stderr == ""
        return
    [line] = r.stderr.splitlines()
    assert line.startswith(f"zdd-agent: warning: {p}: ready.type: socket: inherit with "
                           "ready.type "), line
    assert "gunicorn #2104" in line and "fix: ready: {type: notify}" in line, line
    assert "strategy.min_ready" in line, line


def test_a_post_start_hook_on_the_instance_port_gets_one_without_a_probe() -> None:
    from agent.config import parse_service

    svc = parse_service(Path("x.yaml"), {
        "name": "x", "command": "/bin/x", "listen": "8080", "ready": {"type": "notify"},
        "hooks": {"post_start": {"command": "/bin/warm {instance_port}"}}}, "x")
    assert svc.needs_instance_port and not svc.ready.needs_instance_port


@pytest.mark.parametrize("strategy,socket,words", [
    ({"max_surge": 5}, "inherit", "strategy.max_surge: 5 is out of range for 3 replicas"),
    ({"max_unavailable": 4}, "inherit", "strategy.max_unavailable: 4 is out of range"),
    ({"max_surge": 0, "max_unavailable": 3}, "reuseport",
     "3 of 3 replicas may be stopped at once, and with socket: reuseport nothing then listens"),
])
def test_strategy_counts_beyond_what_the_replicas_allow_are_refused(
        strategy: dict, socket: str, words: str) -> None:
    from agent.config import parse_service
    from agent.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        parse_service(Path("x.yaml"), {"name": "x", "command": "/bin/x", "listen": "8080",
                                       "socket": socket, "replicas": 3,
                                       "strategy": strategy}, "x")
    assert words in str(e.value), e.value



def test_an_exec_probe_on_the_shared_port_is_refused() -> None:
    from agent.config import parse_service
    from agent.errors import ConfigError

    data = {"name": "x", "command": "/bin/x", "listen": ["127.0.0.1:8080"],
            "ready": {"type": "exec", "command": "/usr/bin/curl -fsS http://127.0.0.1:8080/"}}
    with pytest.raises(ConfigError, match="names the shared listen port 8080"):
        parse_service(Path("x.yaml"), data, "x")
    data["ready"]["command"] = "/usr/bin/curl -fsS http://127.0.0.1:{instance_port}/ready"
    assert parse_service(Path("x.yaml"), data, "x").ready.needs_instance_port


@pytest.mark.parametrize("key,value,words", [
    ("net.core.somaxconn", "1 2", "must be 1 number (like '65535')"),
    ("net.ipv4.ip_local_port_range", "10240", "must be 2 numbers (like '10240 65535')"),
    ("net.ipv4.ip_local_port_range", "60000 1024", "LOW <= HIGH in 1..65535"),
    ("net.core.somaxconn", 99999999999, "0..2147483647"),
])
def test_agent_sysctl_overrides_have_the_kernel_shape(tmp_path: Path, key: str, value: object,
                                                      words: str) -> None:
    import yaml

    from agent.config import load_agent_config
    from agent.errors import ConfigError

    tmp_path.chmod(0o755)
    f = tmp_path / "agent.yaml"
    f.write_text(yaml.safe_dump({"sysctl": {key: value}}))
    f.chmod(0o644)
    with pytest.raises(ConfigError) as e:
        load_agent_config(f)
    assert f"sysctl.{key}" in str(e.value) and words in str(e.value), e.value


@pytest.mark.parametrize("text,words", [
    ("\"a\\nb\": 1\n", "'a\\nb': unknown key"),  # a key with a newline, quoted
    ("sysctl: {\"x\\ty\": 1}\n", "'sysctl.x\\ty': not a key the agent manages"),
    ("host_ready: {listen: \"[::1%x\\ny]:80\"}\n", "is not host:port"),  # an IPv6 scope id
    ("metrics: {listen: \"[fe80::1%x\\ny]:80\"}\n", "is not host:port"),
    ("metrics: {listen: \"127.0.0.1:80\\n\"}\n", "is not host:port"),  # int() strips it
])
def test_agent_config_errors_stay_on_one_line(tmp_path: Path, text: str, words: str) -> None:
    tmp_path.chmod(0o755)
    f = tmp_path / "agent.yaml"
    f.write_text(text)
    f.chmod(0o644)
    with pytest.raises(ConfigError) as e:
        load_agent_config(f)
    assert words in str(e.value) and "\n" not in str(e.value), e.value


def test_an_unknown_service_key_with_a_newline_is_quoted() -> None:
    with pytest.raises(ConfigError) as e:
        parse_service(Path("x.yaml"), {"name": "x", "command": "/bin/x", "listen": [1],
                                       "ready": {"a\nb": 1}})
    assert str(e.value).startswith("x.yaml: 'ready.a\\nb': unknown key (allowed: type,")


def test_a_del_character_in_an_environment_value_is_one_clear_error() -> None:
    from agent.config import parse_service
    from agent.errors import ConfigError

    with pytest.raises(ConfigError, match="environment.X: contains a control character"):
        parse_service(Path("x.yaml"), {"name": "x", "command": "/bin/x", "listen": "8080",
                                       "environment": {"X": "a\x7fb"}}, "x")


@pytest.mark.parametrize("value, error", [
    ("10.0.0.0/8", "must be a non-empty list"),
    ([], "must be a non-empty list"),
    ([10], "10 is not an address or CIDR (a string"),
    (["10.0.0.1/8"], "'10.0.0.1/8' has host bits set: write 10.0.0.0/8 for the network or "
                     "10.0.0.1 for the host"),
    (["10.0.0.0/33"], "'10.0.0.0/33' is not an address or CIDR"),
    (["example.com"], "'example.com' is not an address or CIDR"),
    (["10.0.0.0/8\nIPAddressAllow=any"], "is not an address or CIDR"),
    (["10.0.0.1"] * 300, "300 entries (allowed: at most 256)"),
])
def test_allow_from_is_a_list_of_addresses_or_networks(tmp_path: Path, value: object,
                                                       error: str) -> None:
    import yaml

    p = write(tmp_path, GOOD + yaml.safe_dump({"allow_from": value}))
    with pytest.raises(ConfigError) as e:
        load_service(p.parent, "api")
    assert f"{p}: allow_from: " in str(e.value) and error in str(e.value), str(e.value)


def test_allow_from_is_normalised(tmp_path: Path) -> None:
    p = write(tmp_path, GOOD + "allow_from: [10.0.0.0/8, 192.0.2.10, '2001:db8::/32', "
                               "192.0.2.10/32]\n")
    assert load_service(p.parent, "api").allow_from == ("10.0.0.0/8", "192.0.2.10/32",
                                                        "2001:db8::/32")


def test_a_key_given_twice_is_refused_at_its_line(tmp_path: Path) -> None:
    p = write(tmp_path, "name: api\ncommand: /bin/x\nlisten: [8080]\nhardening:\n"
                        "  ProtectSystem: strict\n  ProtectSystem: 'no'\n")
    with pytest.raises(ConfigError, match=r"key 'ProtectSystem' given twice \(first at line 5\)"
                                          r".*line 6"):
        read_yaml(p)
