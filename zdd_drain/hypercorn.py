"""zdd_drain for hypercorn (0.18; asyncio worker): HTTP/1.1, h2c and
WebSocket that drain without a failed request.

    import asyncio
    from zdd_drain.hypercorn import serve
    asyncio.run(serve(app))            # or serve(app, config) with your Config

`serve` adopts the listeners (LISTEN_FDS, else ZDD_LISTEN with SO_REUSEPORT,
else config.bind), adds 127.0.0.1:$ZDD_INSTANCE_PORT for a per-instance
readiness probe, wraps the app in `DrainMiddleware` (/ready, `Connection:
close`, WebSocket 1012), sends READY=1 once every listener accepts, and on the
drain signal runs the `Drain`, then hypercorn's graceful shutdown within the
deadline (graceful_timeout). It also works around what hypercorn 0.18 does to
HTTP/2 streams (each measured by zdd-agent's end-to-end tests):

- after shutdown begins it answers each new stream with RST_STREAM (NO_ERROR,
  no response) and sends its own GOAWAY only once a connection is idle: the
  kit sends GOAWAY at the drain signal itself, followed by a PING, and waits
  for each client's PING ACK (which proves it read the GOAWAY) before
  hypercorn shuts down;
- it ends an h2 connection after keep_alive_max_requests (1,000) with a
  GOAWAY that covers the streams in flight, then cannot answer them: the
  limit is lifted;
- a client's own graceful GOAWAY (Node sends one when it closes a session)
  makes the h2 library refuse the responses to the streams it covers:
  `answer_after_client_goaway`.

Relies on hypercorn 0.18 and h2 4.x internals (H2Protocol.initiate, .send,
.closed, ._handle_events; H2ConnectionStateMachine._transitions).
"""

from __future__ import annotations

import asyncio
import os
import weakref
from typing import Any

from h2.connection import ConnectionInputs, ConnectionState, H2ConnectionStateMachine
from h2.errors import ErrorCodes
from h2.events import ConnectionTerminated, PingAckReceived
from h2.events import Event as H2Event
from hyperframe.frame import GoAwayFrame, PingFrame
from hypercorn.asyncio import serve as hypercorn_serve
from hypercorn.config import Config
from hypercorn.events import RawData
from hypercorn.protocol.h2 import H2Protocol

from . import ASGIApp, Drain, DrainMiddleware, instance_address, listeners, notify

__all__ = ["H2Goaway", "answer_after_client_goaway", "serve"]


class H2Goaway:
    """A GOAWAY with the largest stream id (RFC 9113 6.8: "open no new
    streams") and a PING to every h2 connection when the drain begins.

    hypercorn cannot announce it itself: after sending GOAWAY the h2 library's
    connection state is CLOSED and any frame received is a ProtocolError,
    which drops the connection and its streams. So these frames go to the
    socket beside the h2 state machine (whole frames, through hypercorn's
    send lock). A client answers frames in order, so its PING ACK proves it
    has read the GOAWAY and will open no stream here (as nghttp2 and gRPC
    do); a fixed delay instead lost streams on a loaded machine (24 of
    17,240 in one CI run)."""

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

    def all_acked(self) -> bool:
        """h2 clients that have not yet acknowledged the GOAWAY"""
        return not any(not p.closed and p not in self.acked for p in list(self.conns))

    def install(self) -> None:
        """Track every h2 connection hypercorn sets up (the prior-knowledge
        preface or an h2c Upgrade turns an HTTP/1.1 connection into one)."""
        # installed before (a second serve() in one process): wrap the original once
        initiate = getattr(H2Protocol.initiate, "zdd_drain", H2Protocol.initiate)

        async def tracked(proto: H2Protocol, *args: Any, **kwargs: Any) -> None:
            await initiate(proto, *args, **kwargs)
            self.conns.add(proto)
            if self.draining:
                await self.send(proto)

        tracked.zdd_drain = initiate  # type: ignore[attr-defined]
        H2Protocol.initiate = tracked  # type: ignore[method-assign, assignment]

    async def start(self) -> None:
        self.draining = True
        for proto in list(self.conns):
            await self.send(proto)

    async def send(self, proto: H2Protocol) -> None:
        if not proto.closed:
            await proto.send(RawData(data=self.FRAME))


def answer_after_client_goaway(goaway: H2Goaway) -> None:
    """Answer the streams in flight after a client's graceful GOAWAY.

    RFC 9113 6.8: the streams a GOAWAY covers still complete. The h2 library
    moves the whole connection to CLOSED on RECV_GOAWAY and refuses to send
    their responses, and hypercorn closes the connection on the
    ConnectionTerminated event: measured, every stream in flight on every
    GOAWAY'd connection failed (8-20 per swap with Node's client, 8
    connections x 4 streams). Here the server side stays open after a
    NO_ERROR GOAWAY; the client closes once its last stream is answered."""
    H2ConnectionStateMachine._transitions[
        (ConnectionState.SERVER_OPEN, ConnectionInputs.RECV_GOAWAY)] = (
        None, ConnectionState.SERVER_OPEN)
    handle = H2Protocol._handle_events
    handle = getattr(handle, "zdd_drain", handle)

    async def handle_events(proto: H2Protocol, events: list[H2Event]) -> None:
        goaway.saw(proto, events)
        await handle(proto, [e for e in events if not (
            isinstance(e, ConnectionTerminated) and e.error_code == ErrorCodes.NO_ERROR)])

    handle_events.zdd_drain = handle  # type: ignore[attr-defined]
    H2Protocol._handle_events = handle_events  # type: ignore[method-assign, assignment]


async def serve(app: ASGIApp, config: Config | None = None, *, drain: Drain | None = None,
                ready_path: str | None = "/ready", status: str = "serving") -> int:
    """Serve `app` with hypercorn until the drain signal, drain, return 0
    (2 when there is nothing to listen on)."""
    config = config or Config()
    drain = drain or Drain(keepalive_timeout=config.keep_alive_timeout)
    socks, own = listeners(config.bind)
    if not socks:
        return 2
    fds = [s.detach() for s in socks]  # hypercorn's "fd://N" sockets own them alone
    config.bind = [f"fd://{fd}" for fd in fds]
    probe = instance_address()
    if probe:
        config.bind.append(probe)
    config.graceful_timeout = drain.deadline
    config.keep_alive_max_requests = 2**62
    h2 = H2Goaway()
    h2.install()
    answer_after_client_goaway(h2)
    drain.hooks.append(h2.start)
    drain.conditions.append(h2.all_acked)
    loop = asyncio.get_running_loop()
    drain.install(loop)

    async def until_drained() -> None:
        """hypercorn's shutdown trigger: awaited once all its servers accept;
        its return starts hypercorn's graceful shutdown."""
        notify(f"READY=1\nSTATUS={status}\nMAINPID={os.getpid()}")
        await drain.run(loop, fds, own)
        config.graceful_timeout = drain.remaining()

    wrapped = DrainMiddleware(app, drain, ready_path)
    # the ignore: the middleware takes plain dicts, not hypercorn's ASGI TypedDicts
    await hypercorn_serve(wrapped, config, shutdown_trigger=until_drained)  # type: ignore[arg-type]
    return 0
