"""The request sent before the command line loads (agent/fastpath.py) is
the one click's reading of the same argv sends, or none is sent; a call to
the daemon imports none of the heavy modules before its request (issue 16)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from agent import cli, defaults, fastpath

ROOT = Path(__file__).resolve().parents[2]


class Dispatched(Exception):
    pass


def click_reading(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> tuple[Any, ...] | None:
    """(ctx, cmd, args, local) of the dispatch() click's reading of argv
    makes, or None when it makes none (a usage error, --help)."""
    seen: list[tuple[Any, ...]] = []

    def dispatch(ctx: cli.Ctx, cmd: str, args: dict[str, Any], local: bool,
                 progress: object = None) -> dict[str, Any]:
        seen.append((ctx, cmd, args, local))
        raise Dispatched

    monkeypatch.setattr(cli, "dispatch", dispatch)
    try:
        cli.cli.main(args=argv, prog_name="zdd-agent", standalone_mode=False)
    except Dispatched:
        return seen[0]
    except Exception:  # click's usage errors and the like
        pass
    return None


@pytest.fixture
def plain_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in [*fastpath.PATH_ENV, "_ZDD_AGENT_COMPLETE"]:
        monkeypatch.delenv(k, raising=False)


WORDS = [list(w) for w in fastpath.CALLS] + [["sysctl", "apply"], ["drain-host"], ["adopt"]]
TOKENS = ["api", "v2", "--version", "--json", "--dry-run", "-n", "--limit", "--local", "--help",
          "-h", "--", "-", "", "1", "1001", "0", "05", "-5", "+5", "5_0", " 5", "--version=v2",
          "--limit=5", "-n5", "--js", "--json=1", "API", "a b", "api;x", "é", "\x00", "check",
          "status", "x" * 65, "--config-dir", "/tmp"]
VALUES = st.sampled_from(["api", "web-2", "v2", "v2.0-rc_1", "A", "9", "x" * 64, "x" * 65, "-v",
                          "", "a b"])
LIMITS = st.sampled_from(["1", "5", "20", "999", "1000", "1001", "0", "05", "-1", "x"])


@st.composite
def calls(draw: st.DrawFn) -> list[str]:
    """A call of one of fastpath.CALLS, its parts in any order; now and then
    with a token more: most are sent early, some just miss."""
    words = draw(st.sampled_from(list(fastpath.CALLS)))
    _cmd, service, values, flags = fastpath.CALLS[words]
    parts = [[f] for f in sorted(flags) if draw(st.booleans())]
    if service == "required" or (service and draw(st.booleans())):
        parts.append([draw(VALUES)])
    if "--version" in values:
        parts.append(["--version", draw(VALUES)])
    if "--limit" in values and draw(st.booleans()):
        parts.append([draw(st.sampled_from(["-n", "--limit"])), draw(LIMITS)])
    argv = [*words, *(w for p in draw(st.permutations(parts)) for w in p)]
    if draw(st.integers(0, 3)) == 0:
        argv.insert(draw(st.integers(0, len(argv))),
                    draw(st.one_of(st.sampled_from(TOKENS), st.text(max_size=4))))
    return argv


ARGV = st.one_of(calls(), st.tuples(st.sampled_from(WORDS), st.lists(
    st.one_of(st.sampled_from(TOKENS), st.text(max_size=5)), max_size=5)).map(
        lambda t: [*t[0], *t[1]]))


@settings(max_examples=400, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(ARGV)
@example(["swap", "api", "--version", "v2"])
@example(["swap", "--version", "v2", "api", "--dry-run", "--json"])
@example(["history", "web", "-n", "1000", "--json"])
@example(["history", "--limit", "5"])
@example(["status"])
@example(["sysctl", "check", "--json"])
def test_a_request_sent_early_is_the_one_click_sends(
        plain_env: None, monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> None:
    early = fastpath.read(argv)
    if early is None:
        return  # left to click, which connects as always
    reading = click_reading(argv, monkeypatch)
    assert reading is not None, f"{argv}: sent early, but click refuses it"
    ctx, cmd, args, local = reading
    assert not local and not ctx.explicit_paths and ctx.sent is None
    a, b = socket.socketpair()
    with a, b:
        assert fastpath.Sent(*early, a).claim(cmd, args) is a  # Misread otherwise


@pytest.mark.parametrize("argv", [
    ["swap", "api", "--version=v2"], ["swap", "api", "--version", "v2", "--local"],
    ["swap", "api", "--version", "v2", "--version", "v3"], ["swap", "--help"], ["--help"],
    ["swap", "api"], ["swap", "--version", "v2"], ["status", "a", "b"], ["status", "-h"],
    ["history", "-n", "0"], ["history", "-n5"], ["history", "-n", "1", "--limit", "2"],
    ["status", "api\n"], ["status", ""], ["sysctl", "apply"], ["drain-host"],
    ["--config-dir", "/etc", "status"], ["swap", "api", "--version", "--json"],
])
def test_anything_but_a_plain_call_is_left_to_click(argv: list[str]) -> None:
    assert fastpath.read(argv) is None


@pytest.mark.parametrize("var", [*fastpath.PATH_ENV, "_ZDD_AGENT_COMPLETE"])
def test_config_paths_or_completion_in_the_environment_send_nothing(
        plain_env: None, monkeypatch: pytest.MonkeyPatch, var: str) -> None:
    monkeypatch.setenv(var, "")
    monkeypatch.setenv(fastpath.SOCKET_ENV, "/nonexistent/control.sock")
    monkeypatch.setattr(fastpath.client, "send", lambda *a: pytest.fail("sent"))
    assert fastpath.send(["status"]) is None


def test_no_daemon_sends_nothing(plain_env: None, monkeypatch: pytest.MonkeyPatch,
                                 tmp_path: Path) -> None:
    monkeypatch.setenv(fastpath.SOCKET_ENV, str(tmp_path / "none.sock"))
    assert fastpath.send(["swap", "api", "--version", "v2"]) is None


def test_the_socket_is_the_daemons(monkeypatch: pytest.MonkeyPatch) -> None:
    path = os.environ.get(fastpath.SOCKET_ENV, fastpath.SOCKET_DEFAULT)
    assert Path(path) == defaults.CONTROL_SOCKET


def test_another_request_than_the_one_sent_is_a_bug_said_aloud() -> None:
    a, b = socket.socketpair()
    with a, b:
        sent = fastpath.Sent("swap", {"service": "api", "version": "v2"}, a)
        with pytest.raises(fastpath.Misread):
            sent.claim("swap", {"service": "api", "version": "v3"})
        assert "the daemon goes on with the swap of api" in sent.close()
        assert sent.close() == ""
        read_only = fastpath.Sent("status", {}, b)
        assert read_only.claim("status", {"service": None}) is b  # None: not sent
        assert read_only.close() == ""


# ------------------------------------------------ what a call imports

HEAVY = {"pystemd", "rich", "psutil", "pyroute2", "yaml", "prometheus_client", "grpc",
         "agent.config", "agent.deploy", "agent.daemon", "agent.swap", "agent.commands"}

CHILD = """
import json, os, sys
seen = []
def hook(event, args):
    if event == "socket.connect" and not seen:
        seen.append(sorted(sys.modules))
sys.addaudithook(hook)
sys.argv = ["zdd-agent", *sys.argv[1:]]
from agent.entry import main
try:
    main()
finally:
    with open(os.environ["MODULES_OUT"], "w") as f:
        json.dump(seen[0] if seen else None, f)
"""


def modules_at_request(argv: list[str], tmp_path: Path) -> set[str]:
    """The modules a zdd-agent process had imported when it connected to
    the daemon (a fake one, which answers with an error)."""
    path = tmp_path / "control.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)

    def answer() -> None:
        conn, _ = server.accept()
        with conn:
            conn.makefile("rb").readline()
            conn.sendall(b'{"v":1,"error":"fake daemon","exit_code":2,"class":"config"}\n')

    t = threading.Thread(target=answer, daemon=True)
    t.start()
    env = {k: v for k, v in os.environ.items() if k not in fastpath.PATH_ENV}
    env.update(ZDD_CONTROL_SOCKET=str(path), PYTHONPATH=str(ROOT),
               MODULES_OUT=str(tmp_path / "modules.json"))
    r = subprocess.run([sys.executable, "-c", CHILD, *argv], env=env, capture_output=True,
                       text=True, timeout=60)
    server.close()
    assert r.returncode == 2 and "fake daemon" in r.stdout + r.stderr, r.stderr
    modules = json.loads((tmp_path / "modules.json").read_text())
    assert modules is not None, "never connected"
    return {m for m in modules if not m.startswith("_")}


@pytest.mark.parametrize("argv", [["status", "--json"], ["swap", "api", "--version", "v2"],
                                  ["history", "-n", "5"]])
def test_a_plain_call_sends_before_click_and_the_heavy_modules(argv: list[str],
                                                               tmp_path: Path) -> None:
    modules = modules_at_request(argv, tmp_path)
    assert not modules & (HEAVY | {"click", "agent.cli"}), sorted(modules)


@pytest.mark.parametrize("argv", [["swap", "api", "--version=v2"],
                                  ["status", "api", "--json", "--json"]])
def test_a_call_through_click_imports_none_of_the_heavy_modules(argv: list[str],
                                                                tmp_path: Path) -> None:
    modules = modules_at_request(argv, tmp_path)
    assert "click" in modules and not modules & HEAVY, sorted(modules & HEAVY)
