"""The drain kit (zdd_drain): what a service imports, its drain decisions
with a fake clock, and its ASGI/WSGI middleware driven with plain ASGI
messages (no server, no socket)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import zdd_drain
from zdd_drain import Drain, DrainMiddleware, DrainWSGI, drain_deadline, grace_period

ROOT = Path(__file__).resolve().parents[2]


def test_importing_the_kit_loads_none_of_the_agents_dependencies() -> None:
    code = ("import sys, zdd_drain\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in "
            "('agent', 'pystemd', 'pyroute2', 'psutil', 'yaml', 'click', 'rich', 'grpc')]\n"
            "print(','.join(sorted(bad)))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=ROOT, check=True)
    assert r.stdout.strip() == ""


def test_the_kit_works_as_one_copied_file(tmp_path: Path) -> None:
    # Copied alone into a project (as drain.py), the core still imports and
    # needs nothing beside the standard library.
    (tmp_path / "drain.py").write_text((ROOT / "zdd_drain" / "__init__.py").read_text())
    r = subprocess.run([sys.executable, "-S", "-c",  # -S: no site-packages at all
                        "import drain; print(drain.drain_deadline(10.0))"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "8.0"


def test_listen_fds_with_names_only_for_this_pid() -> None:
    # A child whose fd 3 is a listening socket, as systemd would pass it.
    code = ("import os, zdd_drain\n"
            "os.dup2(int(os.environ['FD']), 3)\n"
            "os.environ['LISTEN_PID'] = str(os.getpid())\n"
            "got = zdd_drain.listen_fds()\n"
            "print([(x.name, x.sock.fileno(), x.sock.type == 1) for x in got],"
            " 'LISTEN_FDS' in os.environ)\n")
    with socket.socket() as lst:
        lst.bind(("127.0.0.1", 0))
        lst.listen()
        env = {**os.environ, "LISTEN_FDS": "1", "LISTEN_FDNAMES": "web",
               "FD": str(lst.fileno())}
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env=env, cwd=ROOT, pass_fds=(lst.fileno(),))
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["[('web',", "3,", "True)]", "False"]
    # another process's LISTEN_PID: nothing, and the variables stay
    os.environ.update(LISTEN_PID="1", LISTEN_FDS="1")
    try:
        assert zdd_drain.listen_fds() == []
        assert os.environ["LISTEN_FDS"] == "1"
    finally:
        del os.environ["LISTEN_PID"], os.environ["LISTEN_FDS"]


@pytest.mark.parametrize(("raw", "grace", "deadline"), [
    ("10", 10.0, 8.0), ("3", 3.0, 2.4), ("60", 60.0, 58.0), ("", 30.0, 28.0),
    ("soon", 30.0, 28.0), ("0", 30.0, 28.0)])
def test_grace_period_and_deadline(raw: str, grace: float, deadline: float) -> None:
    assert grace_period({"ZDD_GRACE_PERIOD": raw}) == grace
    assert drain_deadline(grace) == pytest.approx(deadline)


def test_instance_address_is_loopback_on_the_agents_port() -> None:
    assert zdd_drain.instance_address({"ZDD_INSTANCE_PORT": "41234"}) == "127.0.0.1:41234"
    assert zdd_drain.instance_address({}) is None
    with pytest.raises(ValueError):
        zdd_drain.instance_address({"ZDD_INSTANCE_PORT": "80; rm"})


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_drain_waits_for_keepalive_connections_to_be_told_or_idle() -> None:
    clock = Clock()
    d = Drain(10.0, idle_window=1.0, min_window=0.5, clock=clock)
    assert d.unsettled() == ["not draining"] and not d.settled()
    for port in (1, 2, 3):
        d.request_started()
        d.request_finished(("127.0.0.1", port), keepalive=True)
    clock.t += 0.2
    d.request_started()
    d.request_finished(("127.0.0.1", 4), keepalive=False)  # its response closed it
    d.begin()
    assert d.draining and d.remaining() == pytest.approx(8.0)
    assert d.unsettled() == ["the minimum window",
                             "3 keep-alive connection(s) not yet told to close"]
    clock.t += 0.6
    for port in (1, 2):  # their next requests, answered with Connection: close
        d.request_started()
        d.request_finished(("127.0.0.1", port), keepalive=False)
    assert d.unsettled() == ["1 keep-alive connection(s) not yet told to close"]
    clock.t += 0.41  # connection 3: idle a whole window since the signal
    assert d.unsettled() == [] and d.settled() and d.in_flight == 0


def test_drain_settles_at_half_the_deadline_whatever_is_left() -> None:
    clock = Clock()
    d = Drain(10.0, clock=clock)
    d.conditions.append(lambda: False)
    d.begin()
    clock.t += 3.9
    assert not d.settled()
    clock.t += 0.1  # half of the 8 s deadline
    assert d.settled() and d.remaining() == pytest.approx(4.0)


def test_keepalive_connections_past_the_servers_timeout_are_forgotten() -> None:
    clock = Clock()
    d = Drain(10.0, keepalive_timeout=5.0, clock=clock)
    d.request_started()
    d.request_finished(("a", 1), keepalive=True)
    clock.t += 5.5  # the server closed it by now
    d.begin()
    clock.t += 0.5
    assert d.unsettled() == []


async def call(app: Any, scope: dict[str, Any], incoming: list[dict[str, Any]]
               ) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []
    queue = list(incoming)

    async def receive() -> dict[str, Any]:
        if queue:
            return queue.pop(0)
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


async def hello(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"x", b"y")]})
    await send({"type": "http.response.body", "body": b"hi"})


def http_scope(path: str = "/", version: str = "1.1", port: int = 5) -> dict[str, Any]:
    return {"type": "http", "path": path, "http_version": version, "headers": [],
            "client": ("127.0.0.1", port)}


def test_middleware_says_connection_close_on_http1_only_once_draining() -> None:
    d = Drain(10.0)
    app = DrainMiddleware(hello, d)
    before = asyncio.run(call(app, http_scope(), []))
    assert before[0]["headers"] == [(b"x", b"y")]
    assert d.keepalive.keys() == {("127.0.0.1", 5)}
    d.draining = True
    d.started = d.clock()
    after = asyncio.run(call(app, http_scope(), []))
    assert after[0]["headers"] == [(b"x", b"y"), (b"connection", b"close")]
    assert d.keepalive == {}  # told: nothing left to wait for
    h2 = asyncio.run(call(app, http_scope(version="2"), []))
    assert h2[0]["headers"] == [(b"x", b"y")]  # h2 forbids the header: GOAWAY instead


def test_middleware_readiness_turns_503_when_draining() -> None:
    d = Drain(10.0)
    app = DrainMiddleware(hello, d)
    ok = asyncio.run(call(app, http_scope("/ready"), []))
    d.draining = True
    gone = asyncio.run(call(app, http_scope("/ready"), []))
    assert (ok[0]["status"], json.loads(ok[1]["body"])) == (200, {"ready": True})
    assert (gone[0]["status"], json.loads(gone[1]["body"])) == (503, {"ready": False})
    wsgi = DrainWSGI(lambda e, sr: [b"app"], d)
    seen: list[str] = []
    body = wsgi({"PATH_INFO": "/ready"}, lambda status, headers: seen.append(status))
    assert seen == ["503 Service Unavailable"] and json.loads(b"".join(body)) == {"ready": False}
    assert list(wsgi({"PATH_INFO": "/"}, lambda s, h: None)) == [b"app"]


def test_websockets_are_closed_with_1012_when_the_drain_begins() -> None:
    async def scenario() -> tuple[list[dict[str, Any]], list[str]]:
        d = Drain(10.0)
        events: list[str] = []
        disconnect = asyncio.Event()

        async def echo(scope: dict[str, Any], receive: Any, send: Any) -> None:
            await receive()
            await send({"type": "websocket.accept"})
            message = await receive()  # a message, then waiting for the next
            await asyncio.sleep(0.05)  # working on its reply as the drain begins
            await send({"type": "websocket.send", "text": message["text"]})
            await receive()  # the client's answer to the close
            await send({"type": "websocket.send", "text": "late"})  # dropped: closed
            events.append("app done")

        sent: list[dict[str, Any]] = []

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        incoming = [{"type": "websocket.connect"}, {"type": "websocket.receive", "text": "hi"}]

        async def receive() -> dict[str, Any]:
            if incoming:
                return incoming.pop(0)
            await disconnect.wait()
            return {"type": "websocket.disconnect", "code": 1012}

        app = DrainMiddleware(echo, d)
        task = asyncio.ensure_future(app({"type": "websocket", "path": "/ws"}, receive, send))
        await asyncio.sleep(0.01)
        assert len(d.websockets) == 1
        d.begin()
        await asyncio.sleep(0.1)  # the app replied and waits again: closed
        assert [m["type"] for m in sent][-1] == "websocket.close"
        assert "1 WebSocket(s) closing" in d.unsettled()  # until the app ends
        disconnect.set()
        await task
        assert d.websockets == set()
        return sent, events

    sent, events = asyncio.run(scenario())
    # the reply in the works went out before the close
    assert [m["type"] for m in sent] == ["websocket.accept", "websocket.send", "websocket.close"]
    assert sent[1]["text"] == "hi" and sent[2]["code"] == 1012
    assert events == ["app done"]
