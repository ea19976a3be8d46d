"""The bundled demo HTTP/1.1 API: a small service that drains the way
zdd-agent expects, used by `zdd-agent demo` and the end-to-end tests. Its
HTTP server is its own (plain asyncio streams); the systemd and drain parts
are the drain kit's (zdd_drain: listeners, READY=1, stop accepting).

- listeners inherited from systemd (LISTEN_FDS, sd_listen_fds(3)), or bound
  with --listen when run by hand;
- READY=1 to systemd (sd_notify(3)) once it accepts, and GET /ready on the
  instance's own port (ZDD_INSTANCE_PORT) for http readiness probes;
- on SIGTERM: stop accepting (its copy of the listener closes; the socket
  unit keeps the queue for the new instance), /ready turns 503, every
  keep-alive connection's next response carries `Connection: close` (closing
  an idle keep-alive connection races with the client's next request, node
  #60617), connections idle after that are closed, requests in flight finish,
  then it exits 0.

Endpoints: `/` (JSON with version and pid), `/slow?ms=N`, `/hold` (streams a
chunk a second until the client or the agent ends it).
Flags for failure tests: --fail-at-start, --never-ready, --abrupt (no drain).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from collections.abc import Coroutine
from typing import Any
from urllib.parse import parse_qs, urlsplit

from zdd_drain import instance_address, listeners, stop_accepting
from zdd_drain import notify as sd_notify

IDLE_AFTER_DRAIN = 1.0  # seconds an idle keep-alive connection may sit once draining


class Api:
    def __init__(self, version: str, never_ready: bool) -> None:
        self.version = version
        self.never_ready = never_ready
        self.draining = asyncio.Event()
        self.open_conns = 0
        self.idle: dict[asyncio.StreamWriter, float] = {}  # writer -> idle since
        self.servers: list[asyncio.Server] = []
        self.own_listeners = False  # SO_REUSEPORT sockets of this process (ZDD_LISTEN)
        self.drain_started = 0.0

    def response(self, status: int, body: bytes, close: bool,
                 ctype: str = "application/json") -> bytes:
        reason = {200: "OK", 404: "Not Found", 503: "Service Unavailable",
                  400: "Bad Request"}.get(status, "OK")
        head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\n")
        if close:
            head += "Connection: close\r\n"
        return head.encode() + b"\r\n" + body

    def accept(self, reader: asyncio.StreamReader,
               writer: asyncio.StreamWriter) -> Coroutine[Any, Any, None]:
        """Called synchronously when a connection is made: it counts as busy
        before its task first runs, so a drain cannot end in between and
        reset it."""
        self.open_conns += 1
        return self.serve_conn(reader, writer)

    async def serve_conn(self, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
        try:
            await self._serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            self.idle.pop(writer, None)
            writer.close()
            try:
                # Until the kernel has the last bytes: exiting with a response
                # still in the transport's buffer would cut it (EOF mid-response).
                await writer.wait_closed()
            except (ConnectionError, OSError):
                pass
            self.open_conns -= 1

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            self.idle[writer] = asyncio.get_running_loop().time()
            try:
                head = await self._read_head(reader)
            finally:
                self.idle.pop(writer, None)
            if head is None:
                return
            lines = head.decode("latin-1").split("\r\n")
            parts = lines[0].split(" ")
            if len(parts) != 3:
                writer.write(self.response(400, b'{"error":"bad request"}\n', True))
                await writer.drain()
                return
            method, target, proto = parts
            headers = {}
            for ln in lines[1:]:
                k, _, v = ln.partition(":")
                headers[k.strip().lower()] = v.strip()
            length = int(headers.get("content-length", "0") or 0)
            if length:
                await reader.readexactly(length)
            close = (proto == "HTTP/1.0" or headers.get("connection", "").lower() == "close")
            url = urlsplit(target)
            if url.path == "/hold":
                await self._hold(writer)
                return
            if url.path == "/info":  # what systemd gave this process (tests of unit settings)
                writer.write(self.response(200, info(parse_qs(url.query).get("w", [])), close))
                await writer.drain()
                if close:
                    return
                continue
            if url.path == "/slow":
                ms = int(parse_qs(url.query).get("ms", ["100"])[0])
                await asyncio.sleep(min(ms, 60000) / 1000)
            # Decided after the work: a request that began before the drain
            # signal still tells its client to reconnect elsewhere.
            close = close or self.draining.is_set()
            body = json.dumps({"version": self.version, "pid": os.getpid(),
                               "path": url.path}).encode() + b"\n"
            writer.write(self.response(200, body, close))
            await writer.drain()
            if close:
                return

    @staticmethod
    async def _read_head(reader: asyncio.StreamReader) -> bytes | None:
        try:
            return await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return None

    async def _hold(self, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        while True:  # a long-lived stream: ends only when the peer or SIGKILL does
            writer.write(b"5\r\nhold\n\r\n")
            await writer.drain()
            await asyncio.sleep(1)

    async def serve_ready(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            ok = not self.draining.is_set() and not self.never_ready
            writer.write(self.response(200 if ok else 503,
                                       b'{"ready":%s}\n' % (b"true" if ok else b"false"), True))
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    async def drain(self, keep_listener: float = 0.0) -> None:
        sd_notify("STOPPING=1")
        self.draining.set()
        self.drain_started = asyncio.get_running_loop().time()
        loop = asyncio.get_running_loop()
        # Stop accepting first, close the listener later (stop_accepting says why)
        stop_accepting(loop, [s.fileno() for server in self.servers for s in server.sockets],
                       self.own_listeners and not keep_listener)
        # --keep-listener: what Envoy (#8031) and hypercorn before PR #128 do:
        # no more accept(), but the listener stays open while work finishes
        await asyncio.sleep(0.1 + keep_listener)
        for server in self.servers:
            server.close()  # this process's copy of the listener; the socket unit keeps it
        while self.open_conns:
            # A connection idle since the signal gets IDLE_AFTER_DRAIN to send
            # its next request (answered with Connection: close); then it closes.
            for writer, since in list(self.idle.items()):
                if loop.time() - max(since, self.drain_started) >= IDLE_AFTER_DRAIN:
                    self.idle.pop(writer, None)
                    writer.close()
            await asyncio.sleep(0.05)


def info(paths: list[str]) -> bytes:
    """The process's credentials, working directory, APP_* environment,
    open-files limit and, for each path asked, whether it may write there
    (access(2): EROFS under ProtectSystem= counts as no)."""
    import resource

    return json.dumps({
        "uid": os.getuid(), "gid": os.getgid(), "groups": sorted(os.getgroups()),
        "cwd": os.getcwd(), "nofile": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        "env": {k: v for k, v in os.environ.items() if k.startswith("APP_")},
        "writable": {p: os.access(p, os.W_OK) for p in paths[:8]},
    }).encode() + b"\n"


async def main_async(args: argparse.Namespace) -> int:
    api = Api(args.version, args.never_ready)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    # systemd's (LISTEN_FDS), else SO_REUSEPORT ones for ZDD_LISTEN or --listen
    socks, api.own_listeners = listeners([args.listen] if args.listen else [])
    if not socks:
        print("no LISTEN_FDS from systemd, no ZDD_LISTEN and no --listen", file=sys.stderr)
        return 2
    for s in socks:
        s.setblocking(False)
        if args.never_accept:  # holds the listener, never calls accept()
            continue
        api.servers.append(await asyncio.start_server(api.accept, sock=s, backlog=4096))
    ready_server = None
    probe = instance_address()
    bound = {s.getsockname()[1] for s in socks}
    if probe and int(probe.rpartition(":")[2]) not in bound:
        # (under socket: nat the instance port is the one it serves on)
        host, _, port = probe.rpartition(":")
        ready_server = await asyncio.start_server(api.serve_ready, host, int(port))
    if not args.never_ready:
        sd_notify(f"READY=1\nSTATUS=serving {args.version}\nMAINPID={os.getpid()}")
    print(f"demo api {args.version} serving (pid {os.getpid()})", flush=True)
    if args.exit_after is not None:  # a release that said READY=1, then crashes
        try:
            await asyncio.wait_for(stop.wait(), args.exit_after)
        except TimeoutError:
            print(f"demo api {args.version}: crashing {args.exit_after:g}s after READY=1 as "
                  "asked", file=sys.stderr, flush=True)
            os._exit(1)
    await stop.wait()
    if args.abrupt:  # what a naive service does: every connection is reset
        print("Received SIGTERM; exiting at once (--abrupt).", flush=True)
        os._exit(0)
    print("Received SIGTERM; transition to drain mode.", flush=True)
    await api.drain(args.keep_listener)
    if ready_server is not None:
        ready_server.close()
    print("Drain complete. 0 active connections remaining.", flush=True)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description="zdd-agent's demo HTTP/1.1 API")
    ap.add_argument("--version", required=True)
    ap.add_argument("--listen", help="host:port to bind when not socket-activated")
    ap.add_argument("--fail-at-start", action="store_true", help="exit 1 at once")
    ap.add_argument("--never-ready", action="store_true", help="never report ready")
    ap.add_argument("--abrupt", action="store_true",
                    help="exit at once on SIGTERM, without draining (a naive service)")
    ap.add_argument("--exit-after", type=float, metavar="SECONDS",
                    help="send READY=1, then exit 1 this long after the start")
    ap.add_argument("--keep-listener", type=float, default=0.0, metavar="SECONDS",
                    help="at SIGTERM stop accepting but keep the listener open this long")
    ap.add_argument("--never-accept", action="store_true",
                    help="hold the listeners and say READY=1, but never accept() on them")
    ap.add_argument("--allocate", type=int, default=0, metavar="MIB",
                    help="allocate and touch this much memory at start-up, before READY=1")
    ap.add_argument("--fail-instance", metavar="INSTANCE",
                    help="exit 1 at once when ZDD_INSTANCE is INSTANCE (one replica fails)")
    args = ap.parse_args()
    if args.fail_instance and os.environ.get("ZDD_INSTANCE") == args.fail_instance:
        print(f"demo api {args.version}: instance {args.fail_instance} failing at start as "
              "asked", file=sys.stderr)
        return 1
    if args.fail_at_start:
        print(f"demo api {args.version}: failing at start as asked", file=sys.stderr)
        return 1
    held = []  # a release that needs memory at start-up (a cache, a model)
    for _ in range(args.allocate // 8):
        chunk = bytearray(8 << 20)
        chunk[::4096] = b"x" * len(range(0, len(chunk), 4096))  # touch every page
        held.append(chunk)
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
