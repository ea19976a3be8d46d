"""zdd_drain for uvicorn (one process per instance: run replicas with the
agent, not uvicorn's --workers).

    from zdd_drain.uvicorn import run
    sys.exit(run(app))                 # any uvicorn.Config keyword: run(app, log_level="info")

`run` adopts the listeners (LISTEN_FDS, else ZDD_LISTEN with SO_REUSEPORT,
else --host/--port as given), adds 127.0.0.1:$ZDD_INSTANCE_PORT for a
per-instance readiness probe, wraps the app in `DrainMiddleware` (/ready,
`Connection: close`, WebSocket 1012), sends READY=1 once uvicorn accepts,
and on the drain signal runs the `Drain` before uvicorn's own shutdown.

What stock uvicorn does on SIGTERM, and why the kit steps in first: it
closes its servers (Server.close(): in Python 3.11 connections whose accept
task is still running are orphaned and reset), then at once closes every
keep-alive connection that is idle at that instant (a client's next request,
maybe on its way, fails with ECONNRESET: measured, each of 64 wrk connections
at every swap), closes WebSockets with 1012, and afterwards re-raises
SIGTERM so the process dies of it instead of exiting 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Iterator
from typing import Any

import uvicorn

from . import (ASGIApp, Drain, DrainMiddleware, bind_reuseport, instance_address, listeners,
               notify)

__all__ = ["DrainServer", "run"]


class DrainServer(uvicorn.Server):
    """uvicorn.Server whose SIGTERM/SIGINT start a `Drain`; it sets
    should_exit (uvicorn's shutdown: requests in flight finish within what is
    left of the deadline) once the drain settled."""

    def __init__(self, config: uvicorn.Config, drain: Drain, listeners: list[socket.socket],
                 own: bool, status: str = "serving") -> None:
        super().__init__(config)
        self.drain = drain
        self.listeners = listeners
        self.own = own
        self.status = status
        self._drainer: asyncio.Task[None] | None = None

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn's would set should_exit at the signal and re-raise it at
        # the end; the drain's handlers take the signal on the loop instead.
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.should_exit:
            return
        loop = asyncio.get_running_loop()
        self.drain.install(loop)
        self._drainer = loop.create_task(self._drain(loop))
        notify(f"READY=1\nSTATUS={self.status}\nMAINPID={os.getpid()}")

    async def _drain(self, loop: asyncio.AbstractEventLoop) -> None:
        await self.drain.run(loop, self.listeners, self.own)
        # a float is fine: uvicorn passes it to asyncio.wait_for
        self.config.timeout_graceful_shutdown = max(0.1, self.drain.remaining())  # type: ignore[assignment]
        self.should_exit = True


def run(app: ASGIApp, *, drain: Drain | None = None, ready_path: str | None = "/ready",
        status: str = "serving", **kwargs: Any) -> int:
    """Serve `app` with uvicorn until the drain signal, drain, return 0 (2
    when there is nothing to listen on). `kwargs` go to uvicorn.Config
    (host/port are bound only when neither systemd nor ZDD_LISTEN gives
    listeners)."""
    host, port = kwargs.pop("host", None), kwargs.pop("port", None)
    fallback = [f"{host or '127.0.0.1'}:{port}"] if port else []
    socks, own = listeners(fallback)
    if not socks:
        return 2
    probe = instance_address()
    served = socks + ([bind_reuseport(probe)] if probe else [])
    drain = drain or Drain(keepalive_timeout=kwargs.get("timeout_keep_alive", 5))
    # loop: the selector event loop, whose accept loop stop_accepting can stop
    config = uvicorn.Config(DrainMiddleware(app, drain, ready_path),
                            **{**kwargs, "loop": "asyncio"})
    server = DrainServer(config, drain, socks, own, status)
    asyncio.run(server.serve(sockets=served))
    return 0
