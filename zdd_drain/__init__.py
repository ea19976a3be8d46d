"""zdd_drain: the service side of a zero-downtime swap, for Python services.

A swap is only as graceful as the program it stops. This module, standard
library only (it imports nothing of zdd-agent and may be copied alone into a
project), gives a service what the agent expects of it:

- `listeners()`: the sockets systemd passed (sd_listen_fds(3), with their
  names), else its own SO_REUSEPORT sockets for ZDD_LISTEN (`socket:
  reuseport`), else the addresses the caller gives;
- `notify()`: sd_notify(3), for READY=1 once the service really accepts;
- `Drain`: the drain itself. On the drain signal (SIGTERM, or the one the
  agent's config names) it stops accepting, marks the service draining (the
  readiness endpoint answers 503), lets every HTTP/1.1 keep-alive connection
  be told `Connection: close` with its next response instead of being closed
  while idle (closing an idle connection races with the client's next
  request: ECONNRESET, node #60617), closes WebSockets with 1012 (Service
  Restart) so clients reconnect to the new instance, runs the server's own
  hooks (an HTTP/2 GOAWAY), and says when the connections have settled, so
  the server's graceful shutdown can finish what is in flight and exit 0
  before the agent's deadline: the grace period it passes in ZDD_GRACE_PERIOD
  (seconds), minus a margin;
- `DrainMiddleware` (ASGI) and `DrainWSGI` (WSGI): the request side of it.

The adapters `zdd_drain.uvicorn`, `zdd_drain.hypercorn` and
`zdd_drain.gunicorn` wire it into those servers (docs/drain-kit.md).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Hashable, Iterable, Mapping
from typing import Any, NamedTuple

__all__ = ["Drain", "DrainMiddleware", "DrainWSGI", "Listener", "bind_reuseport",
           "drain_deadline", "grace_period", "instance_address", "listen_fds", "listeners",
           "notify", "stop_accepting"]

SD_LISTEN_FDS_START = 3
DEFAULT_GRACE = 30.0  # seconds, when ZDD_GRACE_PERIOD is unset (not run by the agent)
WS_SERVICE_RESTART = 1012  # RFC 6455 close code, IANA registry: "Service Restart"

# ---------------------------------------------------------------- systemd


def notify(message: str) -> bool:
    """Send a state string (READY=1, STOPPING=1, STATUS=...) to systemd;
    False when not run by systemd (no NOTIFY_SOCKET) or the socket is gone."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):  # abstract namespace
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        try:
            s.connect(addr)
            s.sendall(message.encode())
        except OSError:
            return False
    return True


class Listener(NamedTuple):
    name: str  # FileDescriptorName= of the socket unit; "unknown" when unnamed
    sock: socket.socket


def listen_fds(unset: bool = True) -> list[Listener]:
    """The sockets systemd passed to this process (LISTEN_PID, LISTEN_FDS,
    LISTEN_FDNAMES; sd_listen_fds_with_names(3)), from fd 3 on. The variables
    are removed (unless `unset` is False) so that child processes do not
    take the sockets for theirs."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    n = int(os.environ.get("LISTEN_FDS", "0") or 0)
    names = os.environ.get("LISTEN_FDNAMES", "").split(":") if n else []
    if unset:
        for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(var, None)
    names += ["unknown"] * (n - len(names))
    return [Listener(names[i] or "unknown", socket.socket(fileno=SD_LISTEN_FDS_START + i))
            for i in range(n)]


def instance_address(environ: Mapping[str, str] | None = None) -> str | None:
    """127.0.0.1:$ZDD_INSTANCE_PORT: where the agent's per-instance readiness
    probe asks this instance (never through the shared port); None when the
    agent gives no port (notify, tcp or exec readiness)."""
    port = (os.environ if environ is None else environ).get("ZDD_INSTANCE_PORT")
    return f"127.0.0.1:{int(port)}" if port else None


def bind_reuseport(address: str, backlog: int = 4096) -> socket.socket:
    """A listener of this process's own on host:port with SO_REUSEPORT, beside
    the other instances' (zdd-agent's `socket: reuseport`)."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"
    # IPPROTO_TCP, not 0: accepted sockets inherit it, and asyncio sets
    # TCP_NODELAY only on sockets whose proto says TCP. Without it a server
    # that writes head and body apart (uvicorn) waits for the client's delayed
    # ACK: 44 ms a request here.
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM,
                      socket.IPPROTO_TCP)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    # zdd-agent's fast_open (TCP Fast Open queue, RFC 7413): set before
    # listen(2), as tcp(7) asks; 0 or unset leaves it off
    qlen = int(os.environ.get("ZDD_FAST_OPEN", "0") or 0)
    if qlen > 0:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_FASTOPEN, qlen)
    s.bind((host, int(port)))
    s.listen(backlog)
    return s


def listeners(fallback: Iterable[str] = ()) -> tuple[list[socket.socket], bool]:
    """The sockets to serve: systemd's (LISTEN_FDS), else SO_REUSEPORT ones of
    this process for ZDD_LISTEN, else for `fallback` (host:port each). The
    flag is True when they are this process's own (reuseport), not systemd's."""
    inherited = listen_fds()
    if inherited:
        return [x.sock for x in inherited], False
    addresses = os.environ.get("ZDD_LISTEN", "").split() or list(fallback)
    return [bind_reuseport(a) for a in addresses], True


def stop_accepting(loop: asyncio.AbstractEventLoop, socks: Iterable[socket.socket | int],
                   own: bool) -> None:
    """Stop taking connections from the listeners, on an asyncio selector loop.

    Not Server.close(): in Python 3.11 it makes the accept tasks still setting
    up connections the kernel already handed over fail (Server._attach
    asserts the server is open), and those orphaned sockets are reset when
    the process exits. Removing the reader stops the accept loop first; the
    server can close later. A socket unit's listener stays open for the next
    instance (this process only stops reading it); an own SO_REUSEPORT socket
    leaves its group too (shutdown, as close would), or the kernel would keep
    queueing connections on it that nobody accepts; with
    net.ipv4.tcp_migrate_req=1 those already queued move to another instance.
    """
    for s in socks:
        fd = s if isinstance(s, int) else s.fileno()
        if fd < 0:
            continue
        loop.remove_reader(fd)
        if own:
            with socket.socket(fileno=os.dup(fd)) as dup:
                try:
                    dup.shutdown(socket.SHUT_RD)
                except OSError:
                    pass


# ---------------------------------------------------------------- the drain


def grace_period(environ: Mapping[str, str] | None = None) -> float:
    """The agent's grace period (ZDD_GRACE_PERIOD, seconds): systemd SIGKILLs
    the instance that long after the drain signal (TimeoutStopSec=)."""
    raw = (os.environ if environ is None else environ).get("ZDD_GRACE_PERIOD", "")
    try:
        value = float(raw)
    except ValueError:
        return DEFAULT_GRACE
    return value if value > 0 else DEFAULT_GRACE


def drain_deadline(grace: float) -> float:
    """Seconds after the drain signal by which the service must have exited:
    the grace period minus a margin (a fifth, at most 2 s) for the process to
    wind down, so the kill at the grace period never comes."""
    return grace - min(2.0, grace / 5)


class Drain:
    """The drain state of one service process, shared by its server adapter
    and its middleware: bookkeeping and a clock (its only I/O: STOPPING=1).

    Timeline after the signal: `begin()` (draining; readiness 503; hooks:
    GOAWAY, WebSocket closes); `settled()` becomes true once every HTTP/1.1
    keep-alive connection seen was told `Connection: close` or sat idle
    `idle_window` s since the signal, no WebSocket is open, the hooks' own
    conditions hold, and at least `min_window` s passed (for a connection
    accepted just before the listener stopped, whose first request is on its
    way); at the latest half the deadline. Then the server shuts down,
    waiting for requests in flight at most `remaining()` s.
    """

    def __init__(self, grace: float | None = None, *, idle_window: float = 1.0,
                 min_window: float = 0.5, keepalive_timeout: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.grace = grace_period() if grace is None else grace
        self.deadline = drain_deadline(self.grace)
        self.idle_window = idle_window
        self.min_window = min_window
        self.keepalive_timeout = keepalive_timeout
        self.clock = clock
        self.draining = False
        self.started: float | None = None
        self.in_flight = 0
        # keep-alive HTTP/1.1 connection (client address) -> when its last
        # response ended, for those whose last response did not close them
        self.keepalive: dict[Hashable, float] = {}
        self.websockets: set[WebSocketSession] = set()
        self.hooks: list[Callable[[], Awaitable[None] | None]] = []
        self.conditions: list[Callable[[], bool]] = []
        self._signalled: asyncio.Event | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    # -- the signal
    def install(self, loop: asyncio.AbstractEventLoop,
                signals: Iterable[signal.Signals] = (signal.SIGTERM, signal.SIGINT)) -> None:
        """Handle the drain signals on `loop` (the handler only sets an event)."""
        self._signalled = asyncio.Event()
        for sig in signals:
            loop.add_signal_handler(sig, self._signalled.set)

    async def signalled(self) -> None:
        if self._signalled is None:
            raise RuntimeError("Drain.install(loop) first")
        await self._signalled.wait()

    # -- requests, from the middleware
    def request_started(self) -> None:
        self.in_flight += 1

    def request_finished(self, conn: Hashable | None, keepalive: bool) -> None:
        """A response ended; `keepalive`: the connection stays open for more."""
        self.in_flight -= 1
        if conn is None:
            return
        now = self.clock()
        if keepalive:
            self.keepalive[conn] = now
        else:
            self.keepalive.pop(conn, None)
        if len(self.keepalive) > 256:  # connections the server closed since
            for k, t in list(self.keepalive.items()):
                if now - t > self.keepalive_timeout:
                    del self.keepalive[k]

    # -- the drain
    def begin(self) -> None:
        """Start draining (idempotent): readiness turns 503, STOPPING=1, the
        hooks run and every open WebSocket is closed with 1012."""
        if self.draining:
            return
        self.draining = True
        self.started = self.clock()
        notify("STOPPING=1")
        for hook in self.hooks:
            result = hook()
            if result is not None:
                self._spawn(result)
        for ws in list(self.websockets):
            self._spawn(ws.close())

    def _spawn(self, aw: Awaitable[None]) -> None:
        task = asyncio.ensure_future(aw)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def remaining(self) -> float:
        """Seconds left until the deadline (the full deadline before the signal)."""
        if self.started is None:
            return self.deadline
        return max(0.0, self.deadline - (self.clock() - self.started))

    def unsettled(self) -> list[str]:
        """What the drain still waits for, in words; empty once settled."""
        if self.started is None:
            return ["not draining"]
        now = self.clock()
        waiting = []
        if now - self.started < self.min_window:
            waiting.append("the minimum window")
        idle = [c for c, t in self.keepalive.items()
                if now - max(t, self.started) < self.idle_window
                and now - t < self.keepalive_timeout]
        if idle:
            waiting.append(f"{len(idle)} keep-alive connection(s) not yet told to close")
        if self.websockets:
            waiting.append(f"{len(self.websockets)} WebSocket(s) closing")
        waiting += [getattr(c, "__doc__", None) or "a server condition"
                    for c in self.conditions if not c()]
        return waiting

    def settled(self) -> bool:
        return not self.unsettled() or self.remaining() <= self.deadline / 2

    async def until_settled(self, poll: float = 0.02) -> None:
        while not self.settled():
            await asyncio.sleep(poll)

    async def run(self, loop: asyncio.AbstractEventLoop, socks: Iterable[socket.socket | int],
                  own: bool) -> None:
        """The whole drain up to the server's shutdown: wait for the signal,
        stop accepting, begin, wait until settled."""
        await self.signalled()
        stop_accepting(loop, socks, own)
        self.begin()
        await self.until_settled()


# ---------------------------------------------------------------- ASGI

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class WebSocketSession:
    """One accepted WebSocket, closable by the drain while its app runs."""

    CLOSE_WAIT = 1.0  # seconds the close waits for the app to finish a reply

    def __init__(self, send: Send) -> None:
        self._send = send
        self._lock = asyncio.Lock()
        self.closed = False
        self._idle = asyncio.Event()  # the app waits for the client's next message

    async def receive(self, receive: Receive) -> Message:
        self._idle.set()
        try:
            return await receive()
        finally:
            self._idle.clear()

    async def send(self, message: Message) -> None:
        async with self._lock:
            if self.closed and message["type"] in ("websocket.send", "websocket.close"):
                return  # the drain closed it: the app's last words go nowhere
            if message["type"] == "websocket.close":
                self.closed = True
            await self._send(message)

    async def close(self) -> None:
        """Close with 1012 (Service Restart): the client reconnects, and
        reaches the new instance. Sent once the app waits for the next
        message (at most CLOSE_WAIT s): a reply the app is still working on
        goes out first instead of being dropped after the close."""
        try:
            await asyncio.wait_for(self._idle.wait(), self.CLOSE_WAIT)
        except TimeoutError:
            pass
        try:
            await self.send({"type": "websocket.close", "code": WS_SERVICE_RESTART,
                             "reason": "service restart"})
        except Exception:  # the connection may be gone already
            self.closed = True


def _ready_response(ready: bool) -> tuple[int, bytes]:
    return (200 if ready else 503), json.dumps({"ready": ready}).encode() + b"\n"


class DrainMiddleware:
    """ASGI middleware: the request side of a `Drain`.

    - `ready_path` (GET, default /ready): 200 while serving, 503 once draining;
    - HTTP/1.x responses started while draining carry `Connection: close`
      (the server closes after them; the client reconnects, to the new
      instance); h2 forbids the header, its clients get GOAWAY instead;
    - WebSockets are tracked and closed with 1012 when the drain begins
      (and at once if accepted while draining).
    """

    def __init__(self, app: ASGIApp, drain: Drain, ready_path: str | None = "/ready") -> None:
        self.app = app
        self.drain = drain
        self.ready_path = ready_path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self.http(scope, receive, send)
        elif scope["type"] == "websocket":
            await self.websocket(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def ready(self, scope: Scope, receive: Receive, send: Send) -> None:
        status, body = _ready_response(not self.drain.draining)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", b"%d" % len(body))]})
        await send({"type": "http.response.body", "body": body})

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        app = self.ready if scope["path"] == self.ready_path else self.app
        version = scope.get("http_version", "1.1")
        h1 = version.startswith("1.")
        asked_close = any(k.lower() == b"connection" and b"close" in v.lower()
                          for k, v in scope.get("headers", []))
        keepalive = h1 and version != "1.0" and not asked_close

        async def send_(message: Message) -> None:
            nonlocal keepalive
            if message["type"] == "http.response.start" and h1:
                headers = list(message.get("headers", []))
                if any(k.lower() == b"connection" and b"close" in v.lower() for k, v in headers):
                    keepalive = False
                elif self.drain.draining:
                    headers.append((b"connection", b"close"))
                    message = {**message, "headers": headers}
                    keepalive = False
            await send(message)

        client = scope.get("client")
        self.drain.request_started()
        try:
            await app(scope, receive, send_)
        finally:
            self.drain.request_finished(tuple(client) if client else None,
                                        keepalive and h1)

    async def websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        session = WebSocketSession(send)

        async def send_(message: Message) -> None:
            await session.send(message)
            if message["type"] == "websocket.accept":
                self.drain.websockets.add(session)
                if self.drain.draining:
                    await session.close()

        async def receive_() -> Message:
            return await session.receive(receive)

        try:
            await self.app(scope, receive_, send_)
        finally:
            self.drain.websockets.discard(session)


# ---------------------------------------------------------------- WSGI


class DrainWSGI:
    """WSGI middleware: `ready_path` answers 200, or 503 once draining; the
    rest goes to the app. (Keep-alive connections of a stopping gunicorn
    gthread worker are answered with `Connection: close` by gunicorn itself
    since 27.0: WSGI cannot set hop-by-hop headers.)"""

    def __init__(self, app: Callable[..., Iterable[bytes]], drain: Drain,
                 ready_path: str | None = "/ready") -> None:
        self.app = app
        self.drain = drain
        self.ready_path = ready_path

    def __call__(self, environ: dict[str, Any],
                 start_response: Callable[..., Any]) -> Iterable[bytes]:
        if self.ready_path is not None and environ.get("PATH_INFO") == self.ready_path:
            status, body = _ready_response(not self.drain.draining)
            start_response(f"{status} {'OK' if status == 200 else 'Service Unavailable'}",
                           [("Content-Type", "application/json"),
                            ("Content-Length", str(len(body)))])
            return [body]
        return self.app(environ, start_response)
