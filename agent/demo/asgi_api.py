"""The bundled demo ASGI service: HTTP/1.1, h2c (HTTP/2 cleartext, prior
knowledge or Upgrade) and WebSocket on one listener, served by hypercorn, for
the end-to-end tests and benchmarks of the protocols zdd-agent swaps.

- listeners inherited from systemd (LISTEN_FDS, sd_listen_fds(3)), else
  ZDD_LISTEN bound with SO_REUSEPORT, else --listen; hypercorn gets them as
  "fd://N". ZDD_INSTANCE_PORT adds 127.0.0.1:PORT, which reaches only this
  instance, for the agent's http readiness probe (GET /ready);
- READY=1 to systemd once every listener accepts: hypercorn calls the
  shutdown trigger only after it started all its servers (the ASGI lifespan
  startup runs before it even creates the sockets: too early);
- the drain is hypercorn's graceful shutdown plus only what HTTP/1.1 and h2
  requests need to see no failure (`until_drain`, `H2Goaway`). Open WebSockets
  are left to hypercorn, which does not close them: it waits for them up to
  graceful_timeout, set past the agent's grace period (ZDD_GRACE_PERIOD + 30
  seconds), so that the agent's SIGKILL is what cuts them (at its own
  graceful_timeout hypercorn would cancel them with a 1011 close frame).

Endpoints: `/` (JSON with version, pid and HTTP version), `/ready`,
WebSocket `/ws` (echoes each message as JSON {"version", "echo"}) and
WebSocket `/ws/hold` (sends {"version", "seq"} every 200 ms until cut).
Flag for failure tests: --fail-at-start.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import sys
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

from h2.connection import ConnectionInputs, ConnectionState, H2ConnectionStateMachine
from h2.errors import ErrorCodes
from h2.events import ConnectionTerminated, PingAckReceived
from h2.events import Event as H2Event
from hyperframe.frame import GoAwayFrame, PingFrame
from hypercorn.asyncio import serve
from hypercorn.config import Config
from hypercorn.events import RawData
from hypercorn.protocol.h2 import H2Protocol

from agent.demo.api import bind_reuseport
from agent.sd import listen_fds
from agent.sd import notify as sd_notify

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

HOLD_INTERVAL = 0.2  # seconds between two /ws/hold messages
DEFAULT_GRACE = 30.0  # ZDD_GRACE_PERIOD when unset (the agent sets it)
# Seconds from the drain signal to hypercorn's shutdown, which closes every
# connection it deems idle at once: a keep-alive client whose request is on
# its way, or a connection accepted whose first request is not read yet,
# would fail. Meanwhile each HTTP/1.1 client gets `Connection: close` with its
# next response, and each h2 client a GOAWAY.
DRAIN_DELAY = 1.0


class App:
    """The ASGI application; `draining` is set at the drain signal."""

    def __init__(self, version: str) -> None:
        self.version = version
        self.draining = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self.http(scope, receive, send)
        elif scope["type"] == "websocket":
            await self.websocket(scope, receive, send)
        elif scope["type"] == "lifespan":
            while True:  # nothing to set up: answered so hypercorn does not warn
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        while (await receive()).get("more_body"):  # a request body is ignored
            pass
        doc: dict[str, Any]
        if scope["path"] == "/ready":
            status, doc = (503, {"ready": False}) if self.draining else (200, {"ready": True})
        elif scope["path"] == "/":
            status, doc = 200, {"version": self.version, "pid": os.getpid(),
                                "http_version": scope["http_version"]}
        else:
            status, doc = 404, {"error": "not found"}
        body = json.dumps(doc).encode() + b"\n"
        headers = [(b"content-type", b"application/json"),
                   (b"content-length", b"%d" % len(body))]
        if self.draining and scope["http_version"].startswith("1."):
            # Once shut down, hypercorn closes the connection after the
            # response without saying so: the client's next request, maybe
            # already sent, fails. Said here, the client reconnects instead
            # (h11 closes after it). Not for h2, which forbids the header.
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (await receive())["type"] != "websocket.connect":
            return
        if scope["path"] not in ("/ws", "/ws/hold"):
            await send({"type": "websocket.close", "code": 1008})  # before accept: HTTP 403
            return
        await send({"type": "websocket.accept"})
        if scope["path"] == "/ws":
            while (message := await receive())["type"] == "websocket.receive":
                text = message.get("text")
                if text is None:
                    text = (message.get("bytes") or b"").decode("utf-8", "replace")
                await send({"type": "websocket.send",
                            "text": json.dumps({"version": self.version, "echo": text})})
            return  # websocket.disconnect
        seq = 0
        while True:  # /ws/hold: a long-lived stream, ended by the client or SIGKILL
            await send({"type": "websocket.send",
                        "text": json.dumps({"version": self.version, "seq": seq})})
            seq += 1
            try:
                message = await asyncio.wait_for(receive(), HOLD_INTERVAL)
            except TimeoutError:
                continue
            if message["type"] == "websocket.disconnect":
                return


class H2Goaway:
    """A GOAWAY with the largest stream id (RFC 9113 6.8: "open no new
    streams") to every h2 connection at the drain signal.

    hypercorn, once shut down, answers each new stream with RST_STREAM
    (NO_ERROR, no response: a failed request) and SETTINGS_MAX_CONCURRENT_
    STREAMS=0, and sends its own GOAWAY only when a connection has no stream
    left, then closes it. It cannot announce earlier: after sending GOAWAY the
    h2 library's connection state is CLOSED and any frame received is a
    ProtocolError, which drops the connection and its streams. So this GOAWAY
    goes to the socket beside the h2 state machine (whole frames, through
    hypercorn's send lock); clients finish their streams and open no more.

    A PING follows the GOAWAY, as nghttp2 and gRPC do: a client answers
    frames in order, so its PING ACK proves it has read the GOAWAY and will
    open no stream here. The drain lets hypercorn shut down (which resets any
    new stream) only once every connection acknowledged, or at a time limit:
    a fixed delay lost streams when the machine was loaded (24 of 17,240 in
    one CI run, each RST_STREAM'd by the shut-down hypercorn).

    Relies on hypercorn 0.18 internals: H2Protocol.initiate, .send, .closed,
    ._handle_events (see answer_after_client_goaway).
    """

    OPAQUE = b"zdrain!!"
    FRAME = (GoAwayFrame(0, last_stream_id=2**31 - 1).serialize()
             + PingFrame(0, opaque_data=OPAQUE).serialize())

    def __init__(self) -> None:
        self.conns: weakref.WeakSet[H2Protocol] = weakref.WeakSet()
        self.acked: weakref.WeakSet[H2Protocol] = weakref.WeakSet()
        self.draining = False

    def saw(self, proto: H2Protocol, events: list[H2Event]) -> None:
        """Note a connection's PING ACK to our drain PING."""
        if any(isinstance(e, PingAckReceived) and e.ping_data == self.OPAQUE for e in events):
            self.acked.add(proto)

    async def all_acked(self, limit: float) -> None:
        """Until every open h2 connection acknowledged the drain PING, or `limit` s."""
        loop = asyncio.get_running_loop()
        end = loop.time() + limit
        while loop.time() < end and any(
                not p.closed and p not in self.acked for p in list(self.conns)):
            await asyncio.sleep(0.02)

    def install(self) -> None:
        """Track every h2 connection hypercorn sets up (the prior-knowledge
        preface or an h2c Upgrade turns an HTTP/1.1 connection into one)."""
        initiate = H2Protocol.initiate

        async def tracked(proto: H2Protocol, *args: Any, **kwargs: Any) -> None:
            await initiate(proto, *args, **kwargs)
            self.conns.add(proto)
            if self.draining:
                await self.send(proto)

        H2Protocol.initiate = tracked  # type: ignore[method-assign, assignment]

    async def start(self) -> None:
        self.draining = True
        for proto in list(self.conns):
            await self.send(proto)

    async def send(self, proto: H2Protocol) -> None:
        if not proto.closed:
            await proto.send(RawData(data=self.FRAME))


def answer_after_client_goaway(goaway: H2Goaway) -> None:
    """Answer the streams in flight after a client's GOAWAY.

    A client that receives our GOAWAY answers with its own (Node's http2
    does, on session.close()). RFC 9113 6.8: the streams it covers still
    complete. But the h2 library moves the whole connection to CLOSED on
    RECV_GOAWAY and refuses to send the responses, and hypercorn closes the
    connection on the ConnectionTerminated event: the client sees its
    requests in flight cancelled (measured: every stream in flight on every
    GOAWAY'd connection, 8-20 per swap with 8 connections x 4 streams).
    Here the server side stays open after a graceful (NO_ERROR) GOAWAY; the
    client closes the connection once its last stream is answered.
    Relies on h2 4.x and hypercorn 0.18 internals."""
    H2ConnectionStateMachine._transitions[
        (ConnectionState.SERVER_OPEN, ConnectionInputs.RECV_GOAWAY)] = (
        None, ConnectionState.SERVER_OPEN)
    handle = H2Protocol._handle_events

    async def handle_events(proto: H2Protocol, events: list[H2Event]) -> None:
        goaway.saw(proto, events)
        await handle(proto, [e for e in events if not (
            isinstance(e, ConnectionTerminated) and e.error_code == ErrorCodes.NO_ERROR)])

    H2Protocol._handle_events = handle_events  # type: ignore[method-assign, assignment]


def listeners(args: argparse.Namespace) -> tuple[list[int], bool]:
    """The listeners' file descriptors, detached from their Python objects so
    that hypercorn's ("fd://N") own them alone; True if they are this
    process's own SO_REUSEPORT sockets rather than systemd's."""
    socks = listen_fds()
    if socks:
        return [s.detach() for s in socks], False
    addresses = os.environ.get("ZDD_LISTEN", "").split() or ([args.listen] if args.listen else [])
    return [bind_reuseport(a).detach() for a in addresses], True


def stop_accepting(fds: list[int], own: bool) -> None:
    """Stop accepting now, keep hypercorn's Server objects for its shutdown.

    A socket unit's listener stays open for the next instance: this process
    only stops taking connections from it. An own SO_REUSEPORT socket leaves
    its group too (shutdown, as close would), or the kernel would keep
    handing it connections nobody accepts; those queued then move to another
    instance with net.ipv4.tcp_migrate_req=1, else they are reset.
    """
    loop = asyncio.get_running_loop()
    for fd in fds:
        loop.remove_reader(fd)
        if own:
            with socket.socket(fileno=os.dup(fd)) as s:
                s.shutdown(socket.SHUT_RD)


async def main_async(args: argparse.Namespace) -> int:
    fds, own = listeners(args)
    if not fds:
        print("no LISTEN_FDS from systemd, no ZDD_LISTEN and no --listen", file=sys.stderr)
        return 2
    app = App(args.version)
    h2 = H2Goaway()
    h2.install()
    answer_after_client_goaway(h2)
    config = Config()
    config.bind = [f"fd://{fd}" for fd in fds]
    port = os.environ.get("ZDD_INSTANCE_PORT")
    if port:
        config.bind.append(f"127.0.0.1:{int(port)}")
    config.graceful_timeout = float(os.environ.get("ZDD_GRACE_PERIOD") or DEFAULT_GRACE) + 30
    # hypercorn ends an h2 connection after keep_alive_max_requests (1000) with
    # a GOAWAY that covers the streams in flight, then cannot answer them (the
    # h2 library's connection is CLOSED once it sent GOAWAY): the client sees
    # them cancelled, swap or no swap. Measured: 4 failed requests per 1,000
    # per connection with Node's http2 client. Off here.
    config.keep_alive_max_requests = 2**62

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)

    async def until_drain() -> None:
        """hypercorn's shutdown trigger: awaited once all its servers accept;
        its return starts hypercorn's graceful shutdown."""
        sd_notify(f"READY=1\nSTATUS=serving {args.version}\nMAINPID={os.getpid()}")
        print(f"asgi api {args.version} serving (pid {os.getpid()})", flush=True)
        await stop.wait()
        print("Received SIGTERM; transition to drain mode.", flush=True)
        sd_notify("STOPPING=1")
        app.draining = True
        stop_accepting(fds, own)
        await h2.start()
        t = loop.time()
        await h2.all_acked(max(DRAIN_DELAY, config.graceful_timeout - 30) / 2)
        await asyncio.sleep(max(0.0, DRAIN_DELAY - (loop.time() - t)))

    # the ignore: App takes plain dicts, not hypercorn's ASGI TypedDicts
    await serve(app, config, shutdown_trigger=until_drain)  # type: ignore[arg-type]
    print("Drain complete.", flush=True)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description="zdd-agent's demo ASGI service (hypercorn)")
    ap.add_argument("--version", required=True)
    ap.add_argument("--listen", help="host:port to bind when not socket-activated")
    ap.add_argument("--fail-at-start", action="store_true", help="exit 1 at once")
    args = ap.parse_args()
    if args.fail_at_start:
        print(f"asgi api {args.version}: failing at start as asked", file=sys.stderr)
        return 1
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
