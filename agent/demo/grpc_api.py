"""The bundled demo gRPC API: a small service that drains the way zdd-agent
expects, for the gRPC end-to-end tests. No protoc: the methods are
registered with a generic handler and carry JSON as raw bytes.

- listens on every host:port of ZDD_LISTEN (or --listen) with SO_REUSEPORT,
  beside the other version's instance; also on 127.0.0.1:$ZDD_INSTANCE_PORT,
  where the agent's grpc.health.v1 probe reaches this instance only;
- grpc.health.v1 SERVING for "" and "zdd.demo.Echo" once started, READY=1 to
  systemd (sd_notify(3)) for notify readiness;
- on SIGTERM/SIGINT: health NOT_SERVING, then the drain below, then
  grpcio's server.stop(grace) and exit 0 once the last RPC is done. The
  grace is ZDD_GRACE_PERIOD + STOP_MARGIN so the service itself never
  cancels an RPC: whatever still runs when the agent SIGKILLs at the grace
  period is cut by the agent, which the tests count.

Why a drain before stop(): stop() closes the listeners and sends every
connection a GOAWAY (clients reconnect, to the other instance), but gRPC
core marks the server shut down *first*: an RPC already sent on an old
connection that reaches the server before the client has read the GOAWAY,
or that waits for the Python server to pick it up, is cancelled (the client
gets CANCELLED, which neither transparent retry nor wait_for_ready covers).
grpcio has no "GOAWAY without shutdown" call, but max_connection_age sends a
graceful GOAWAY with the server still serving. So: every connection gets
grpc.max_connection_age (--max-connection-age, default 2 s; 0 = plain
stop()); on SIGTERM this instance leaves the SO_REUSEPORT group at once
(shutdown(2) of its listening sockets: new connections go to the other
instance; with net.ipv4.tcp_migrate_req=1 its accept queue too), waits one
connection age so that every client has moved, and only then calls stop().
RPCs still running (streams) go on until they end or the SIGKILL.

Methods: /zdd.demo.Echo/Unary (any JSON in, {"version", "pid"} out) and
/zdd.demo.Echo/Stream (server streaming: {"count": n, "interval_ms": m} in,
n messages {"version", "pid", "seq"} m ms apart).
Flag for failure tests: --fail-at-start.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from zdd_drain import grace_period, instance_address
from zdd_drain import notify as sd_notify

SERVICE = "zdd.demo.Echo"
STOP_MARGIN = 30.0  # seconds past the agent's grace period: its SIGKILL comes first
AGE_JITTER = 0.1  # gRPC core spreads max_connection_age by +-10%
GOAWAY_MARGIN = 0.5  # seconds for a client to read the GOAWAY and answer its PING
MAX_COUNT = 1_000_000  # messages in one Stream call
MAX_INTERVAL_MS = 10_000
# Every RPC in progress (a stream included) holds a worker thread; the pool
# creates them on demand, so a generous bound costs nothing when idle.
WORKERS = 256


def _identity(data: bytes) -> bytes:
    return data


def _parse(request: bytes, context: grpc.ServicerContext) -> dict[str, Any]:
    """The request as a JSON object ({} when empty); INVALID_ARGUMENT otherwise."""
    try:
        value = json.loads(request or b"{}")
    except ValueError:
        value = None
    if not isinstance(value, dict):
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request must be a JSON object")
    return value


class Echo:
    def __init__(self, version: str) -> None:
        self.version = version

    def _reply(self, **extra: int) -> bytes:
        return json.dumps({"version": self.version, "pid": os.getpid(), **extra}).encode()

    def unary(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        try:
            json.loads(request or b"{}")
        except ValueError:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request must be JSON")
        return self._reply()

    def stream(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        req = _parse(request, context)
        try:
            count = min(max(int(req.get("count", 10)), 0), MAX_COUNT)
            interval = min(max(float(req.get("interval_ms", 100)), 0.0), MAX_INTERVAL_MS) / 1000
        except (TypeError, ValueError):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "count and interval_ms: numbers")
        ended = threading.Event()
        # Set when the RPC ends (client cancel, deadline, connection lost):
        # the worker thread is freed at once instead of at the next yield.
        context.add_callback(ended.set)
        for seq in range(count):
            if seq and ended.wait(interval):
                return
            yield self._reply(seq=seq)

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(SERVICE, {
            "Unary": grpc.unary_unary_rpc_method_handler(
                self.unary, request_deserializer=_identity, response_serializer=_identity),
            "Stream": grpc.unary_stream_rpc_method_handler(
                self.stream, request_deserializer=_identity, response_serializer=_identity),
        })


def listen_addresses(fallback: str | None) -> list[str]:
    """ZDD_LISTEN's space-separated host:port list, else --listen; an empty
    host (":8080") means every IPv4 address, as in the HTTP demo."""
    raw = os.environ.get("ZDD_LISTEN", "").split() or ([fallback] if fallback else [])
    return [("0.0.0.0" + a) if a.startswith(":") else a for a in raw]


def leave_reuseport_group(ports: set[int]) -> int:
    """shutdown(2) this process's TCP listening sockets on `ports`: each
    leaves its SO_REUSEPORT group, so the kernel hands new connections to
    the other instance; grpcio keeps serving the connections it has (its
    acceptor logs "Failed accept4: Invalid argument" and closes). grpcio
    gives no handle on its sockets, hence /proc/self/fd. Returns how many."""
    left = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            fd = os.dup(int(name))
        except OSError:  # the fd of the listdir itself, already closed
            continue
        try:
            sock = socket.socket(fileno=fd)
        except OSError:  # not a socket
            os.close(fd)
            continue
        with sock:  # closes our duplicate only
            try:
                if (sock.family in (socket.AF_INET, socket.AF_INET6)
                        and sock.type == socket.SOCK_STREAM
                        and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
                        and sock.getsockname()[1] in ports):
                    sock.shutdown(socket.SHUT_RDWR)
                    left += 1
            except OSError:
                pass
    return left


def serve(args: argparse.Namespace) -> int:
    addresses = listen_addresses(args.listen)
    if not addresses:
        print("no ZDD_LISTEN and no --listen", file=sys.stderr)
        return 2
    # grpc.so_reuseport is grpcio's default (1); explicit, since sharing the
    # port with the other version's instance is the point. It is server-wide,
    # so the (unique) instance port gets it too, which is harmless.
    options: list[tuple[str, int]] = [("grpc.so_reuseport", 1)]
    if args.max_connection_age > 0:
        # The GOAWAY this sends lets streams run on (max_connection_age_grace
        # is infinite by default): only new RPCs move to a new connection.
        options.append(("grpc.max_connection_age_ms", int(args.max_connection_age * 1000)))
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=WORKERS), options=options)
    server.add_generic_rpc_handlers((Echo(args.version).handler(),))
    healthz = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(healthz, server)
    shared_ports = {int(a.rpartition(":")[2]) for a in addresses}
    probe = instance_address()
    if probe:
        addresses.append(probe)
    for address in addresses:
        try:
            bound = server.add_insecure_port(address)
        except RuntimeError as e:  # grpcio raises on a failed bind; older ones return 0
            print(f"grpc api {args.version}: cannot listen on {address}: {e}", file=sys.stderr)
            return 1
        if not bound:
            print(f"grpc api {args.version}: cannot listen on {address}", file=sys.stderr)
            return 1

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    server.start()
    for name in ("", SERVICE):
        healthz.set(name, health_pb2.HealthCheckResponse.SERVING)
    sd_notify(f"READY=1\nSTATUS=serving {args.version}\nMAINPID={os.getpid()}")
    print(f"grpc api {args.version} serving (pid {os.getpid()})", flush=True)
    # A timed wait: a signal caught by one of grpc's threads only runs the
    # Python handler once the main thread executes bytecode again.
    while not stop.wait(0.2):
        pass
    print(f"grpc api {args.version}: signal received; draining", flush=True)
    sd_notify("STOPPING=1")
    healthz.enter_graceful_shutdown()  # every service NOT_SERVING, for good
    grace = grace_period()
    if args.max_connection_age > 0:
        leave_reuseport_group(shared_ports)
        # Every connection gets its max-age GOAWAY within this; capped so
        # that stop() still comes well before the agent's SIGKILL.
        wait = args.max_connection_age * (1 + AGE_JITTER) + GOAWAY_MARGIN
        time.sleep(min(wait, grace / 2))
    server.stop(grace + STOP_MARGIN).wait()
    print(f"grpc api {args.version}: drained, exiting", flush=True)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description="zdd-agent's demo gRPC API")
    ap.add_argument("--version", required=True)
    ap.add_argument("--listen", help="host:port to bind when ZDD_LISTEN is not set")
    ap.add_argument("--max-connection-age", type=float, default=2.0, metavar="SECONDS",
                    help="grpc.max_connection_age, and the drain before stop() on SIGTERM "
                         "(0: none, stop() at once; RPCs in its race are CANCELLED)")
    ap.add_argument("--fail-at-start", action="store_true", help="exit 1 at once")
    args = ap.parse_args()
    if args.fail_at_start:
        print(f"grpc api {args.version}: failing at start as asked", file=sys.stderr)
        return 1
    return serve(args)


if __name__ == "__main__":
    sys.exit(main())
