"""The bundled demo ASGI service: HTTP/1.1, h2c (HTTP/2 cleartext, prior
knowledge or Upgrade) and WebSocket on one listener, for the end-to-end tests
and benchmarks of the protocols zdd-agent swaps.

Served by hypercorn (default) or uvicorn (`--server uvicorn`: HTTP/1.1 and
WebSocket), through the drain kit (zdd_drain.hypercorn / zdd_drain.uvicorn):
listeners from systemd, READY=1 once they accept, 127.0.0.1:ZDD_INSTANCE_PORT
for the agent's readiness probe, and on SIGTERM the kit's drain (503 on
/ready, `Connection: close`, h2 GOAWAY, WebSockets closed with 1012, exit 0
within the grace period). docs/drain-kit.md has the details.

`--plain` serves the same app as the stock server does (the listeners and
READY=1 as above, nothing else of the kit): what the kit is measured against
(bench/drainkit.py).

Endpoints: `/` (JSON with version, pid and HTTP version), `/ready`,
WebSocket `/ws` (echoes each message as JSON {"version", "echo"}) and
WebSocket `/ws/hold` (sends {"version", "seq"} every 200 ms until closed).
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
from typing import Any

from zdd_drain import (Receive, Scope, Send, bind_reuseport, instance_address, listeners,
                       notify)

HOLD_INTERVAL = 0.2  # seconds between two /ws/hold messages
SERVERS = ("hypercorn", "uvicorn")


class App:
    """The ASGI application. Its /ready says 200 as long as it runs; under the
    kit, the kit's middleware answers /ready (503 once draining)."""

    def __init__(self, version: str) -> None:
        self.version = version

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
            status, doc = 200, {"ready": True}
        elif scope["path"] == "/":
            status, doc = 200, {"version": self.version, "pid": os.getpid(),
                                "http_version": scope["http_version"]}
        else:
            status, doc = 404, {"error": "not found"}
        body = json.dumps(doc).encode() + b"\n"
        headers = [(b"content-type", b"application/json"),
                   (b"content-length", b"%d" % len(body))]
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
        while True:  # /ws/hold: a long-lived stream, ended by the client or the drain
            await send({"type": "websocket.send",
                        "text": json.dumps({"version": self.version, "seq": seq})})
            seq += 1
            try:
                message = await asyncio.wait_for(receive(), HOLD_INTERVAL)
            except TimeoutError:
                continue
            if message["type"] == "websocket.disconnect":
                return


def plain_sockets(args: argparse.Namespace) -> list[socket.socket]:
    """The listeners as a stock deployment has them, plus the instance port."""
    socks, _own = listeners([args.listen] if args.listen else [])
    probe = instance_address()
    if socks and probe:
        socks.append(bind_reuseport(probe))
    return socks


async def plain_hypercorn(app: App, args: argparse.Namespace) -> int:
    """Stock hypercorn: its own SIGTERM handling and graceful shutdown. One
    setting differs from its defaults, as it is not about the drain:
    keep_alive_max_requests, at which hypercorn 0.18 fails the h2 streams in
    flight on a connection (after 1,000 requests) swap or no swap."""
    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    socks = plain_sockets(args)
    if not socks:
        return 2
    config = Config()
    config.bind = [f"fd://{s.detach()}" for s in socks]
    config.keep_alive_max_requests = 2**62
    if args.graceful_timeout is not None:
        config.graceful_timeout = args.graceful_timeout
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def trigger() -> None:
        notify(f"READY=1\nSTATUS=serving {args.version} (plain hypercorn)")
        await stop.wait()

    await serve(app, config, shutdown_trigger=trigger)  # type: ignore[arg-type]
    return 0


def plain_uvicorn(app: App, args: argparse.Namespace) -> int:
    """Stock uvicorn: its own SIGTERM handling and shutdown."""
    import uvicorn

    class Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if not self.should_exit:
                notify(f"READY=1\nSTATUS=serving {args.version} (plain uvicorn)")

    socks = plain_sockets(args)
    if not socks:
        return 2
    server = Server(uvicorn.Config(app, loop="asyncio", log_level="warning"))
    asyncio.run(server.serve(sockets=socks))
    return 0


def serve(args: argparse.Namespace) -> int:
    app = App(args.version)
    status = f"serving {args.version}"
    print(f"asgi api {args.version} ({args.server}{', plain' if args.plain else ''}) "
          f"starting (pid {os.getpid()})", flush=True)
    if args.server == "uvicorn":
        if args.plain:
            return plain_uvicorn(app, args)
        from zdd_drain.uvicorn import run

        return run(app, status=status, port=_port(args.listen), host=_host(args.listen),
                   log_level="warning")
    if args.plain:
        return asyncio.run(plain_hypercorn(app, args))
    from hypercorn.config import Config

    from zdd_drain.hypercorn import serve as kit_serve

    config = Config()
    config.bind = [args.listen] if args.listen else []
    return asyncio.run(kit_serve(app, config, status=status))


def _host(listen: str | None) -> str | None:
    return listen.rpartition(":")[0] if listen else None


def _port(listen: str | None) -> int | None:
    return int(listen.rpartition(":")[2]) if listen else None


def main() -> int:
    ap = argparse.ArgumentParser(description="zdd-agent's demo ASGI service")
    ap.add_argument("--version", required=True)
    ap.add_argument("--listen", help="host:port to bind when not socket-activated")
    ap.add_argument("--server", choices=SERVERS, default="hypercorn")
    ap.add_argument("--plain", action="store_true",
                    help="the stock server's own drain, without the kit (for comparison)")
    ap.add_argument("--graceful-timeout", type=float,
                    help="--plain hypercorn: its graceful_timeout (default 3 s); past the "
                         "grace period, the agent's kill ends the WebSockets it never closes")
    ap.add_argument("--fail-at-start", action="store_true", help="exit 1 at once")
    args = ap.parse_args()
    if args.fail_at_start:
        print(f"asgi api {args.version}: failing at start as asked", file=sys.stderr)
        return 1
    code = serve(args)
    if code == 2:
        print("no LISTEN_FDS from systemd, no ZDD_LISTEN and no --listen", file=sys.stderr)
    else:
        print("Drain complete.", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
