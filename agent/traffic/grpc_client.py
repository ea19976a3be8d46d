"""gRPC load against the demo gRPC API (agent.demo.grpc_api), or any
service with grpc.health.v1 (--health SERVICE: the unary call is
Health/Check), and its failure count, for the gRPC end-to-end tests and
`zdd-agent verify`:

    python -m agent.traffic.grpc_client --target 127.0.0.1:PORT --clients C \\
        --streams S --seconds D [--stream-count n --stream-interval-ms m] [--hold H]

- C threads loop unary calls, S threads loop server-streaming calls (n
  messages m ms apart), for D seconds;
- H "hold" streams start at once and run until D: a swap may only end them
  by killing the old instance at the grace period, so any that ends before D
  is counted as cut (and not retried).

Every thread has its own channel, and every channel its own connection
(grpc.use_local_subchannel_pool: by default grpcio shares one TCP connection
between channels to the same target), so a swap meets many connections in
every state. Calls are fail-fast (no wait_for_ready) with a per-call
timeout: an UNAVAILABLE while the channel reconnects counts as a failure,
as a real client would see it.

Prints one JSON object: {"unary": {"sent", "ok", "failed", "codes"},
"streams": {"started", "completed", "failed", "messages", "codes"},
"hold": {"started", "cut", "codes"}, "versions": {version: unary ok},
"p50_ms", "p99_ms", "series"} (unary calls over time, series.py).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from collections import Counter
from typing import Any

import grpc

from ..probes import health_request
from .series import Series, merge

UNARY = "/zdd.demo.Echo/Unary"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
STREAM = "/zdd.demo.Echo/Stream"
CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1)]
STOP = threading.Event()  # SIGINT/SIGTERM: start no more calls, end the held streams
FAILURE_PAUSE = 0.01  # after a failed call: a channel in backoff fails at once, don't spin


def _identity(data: bytes) -> bytes:
    return data


class Tally:
    """One thread's counts; merged after the threads end (no shared locks)."""

    def __init__(self, t0: float) -> None:
        self.series = Series(t0)
        self.counts: Counter[str] = Counter()
        self.codes: Counter[str] = Counter()
        self.versions: Counter[str] = Counter()
        self.latencies: list[float] = []


def _unary_loop(target: str, until: float, timeout: float, health: str | None,
                tally: Tally) -> None:
    """Unary calls in a loop: the demo's Echo/Unary, or Health/Check of the
    service `health` names (any answer, SERVING or not, is an answer)."""
    method, request = UNARY, b"{}"
    if health is not None:
        method = HEALTH_CHECK
        request = health_request(health)  # grpc.health.v1, as the probe sends it
    with grpc.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
        call = channel.unary_unary(method, request_serializer=_identity,
                                   response_deserializer=_identity)
        while time.monotonic() < until and not STOP.is_set():
            tally.counts["sent"] += 1
            start = time.monotonic()
            try:
                reply = call(request, timeout=timeout)
            except grpc.RpcError as e:
                tally.counts["failed"] += 1
                tally.codes[e.code().name] += 1
                tally.series.record(False, time.monotonic() - start)
                time.sleep(FAILURE_PAUSE)
                continue
            tally.latencies.append(time.monotonic() - start)
            tally.series.record(True, time.monotonic() - start)
            tally.counts["ok"] += 1
            version = "?" if health is not None else str(json.loads(reply).get("version"))
            tally.versions[version] += 1


def _stream_loop(target: str, until: float, count: int, interval_ms: int,
                 timeout: float, tally: Tally) -> None:
    request = json.dumps({"count": count, "interval_ms": interval_ms}).encode()
    # A stream's deadline covers its messages plus the per-call timeout.
    deadline = count * interval_ms / 1000 + timeout
    with grpc.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
        call = channel.unary_stream(STREAM, request_serializer=_identity,
                                    response_deserializer=_identity)
        while time.monotonic() < until and not STOP.is_set():
            tally.counts["started"] += 1
            try:
                for _ in call(request, timeout=deadline):
                    tally.counts["messages"] += 1
            except grpc.RpcError as e:
                tally.counts["failed"] += 1
                tally.codes[e.code().name] += 1
                time.sleep(FAILURE_PAUSE)
                continue
            tally.counts["completed"] += 1


def _hold(target: str, until: float, interval_ms: int, tally: Tally) -> None:
    """One long stream; whatever ends it before `until` cut it."""
    request = json.dumps({"count": 1_000_000, "interval_ms": interval_ms}).encode()
    with grpc.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
        call = channel.unary_stream(STREAM, request_serializer=_identity,
                                    response_deserializer=_identity)
        tally.counts["started"] += 1
        # The deadline ends it at `until`: DEADLINE_EXCEEDED then is the normal end.
        responses = call(request, timeout=max(until - time.monotonic(), 0.001))
        stopper = threading.Thread(target=lambda: STOP.wait() and responses.cancel(),
                                   daemon=True)
        stopper.start()
        try:
            for _ in responses:
                pass
        except grpc.RpcError as e:
            if e.code() is grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() >= until:
                return
            if e.code() is grpc.StatusCode.CANCELLED and STOP.is_set():
                return  # stopped early by us
            tally.codes[e.code().name] += 1
        tally.counts["cut"] += 1  # an error, or a stream that ended by itself early


def _percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    i = min(len(sorted_values) - 1, int(q * len(sorted_values)))
    return round(sorted_values[i] * 1000, 2)


def run(target: str, clients: int, streams: int, seconds: float, stream_count: int = 20,
        stream_interval_ms: int = 50, hold: int = 0, hold_interval_ms: int = 200,
        timeout: float = 5.0, health: str | None = None) -> dict[str, Any]:
    """Run the load for `seconds` and return the counts (see the module doc).
    Every thread stops starting calls at `seconds`; the last call ends within
    its timeout (a stream's: its length plus `timeout`)."""
    until = time.monotonic() + seconds
    t0 = time.time()
    jobs: list[tuple[str, Tally, threading.Thread]] = []

    def add(kind: str, fn: Any, *args: Any) -> None:
        tally = Tally(t0)
        jobs.append((kind, tally, threading.Thread(target=fn, args=(*args, tally), daemon=True,
                                                   name=f"grpc-load-{kind}-{len(jobs)}")))

    for _ in range(hold):
        add("hold", _hold, target, until, hold_interval_ms)
    for _ in range(clients):
        add("unary", _unary_loop, target, until, timeout, health)
    for _ in range(streams):
        add("streams", _stream_loop, target, until, stream_count, stream_interval_ms, timeout)
    for _, _, thread in jobs:
        thread.start()
    longest = stream_count * stream_interval_ms / 1000 + timeout if streams else timeout
    for _, _, thread in jobs:
        thread.join(timeout=max(until - time.monotonic(), 0) + longest + 5)

    totals: dict[str, Counter[str]] = {k: Counter() for k in ("unary", "streams", "hold")}
    codes: dict[str, Counter[str]] = {k: Counter() for k in ("unary", "streams", "hold")}
    versions: Counter[str] = Counter()
    latencies: list[float] = []
    for kind, tally, _ in jobs:
        totals[kind].update(tally.counts)
        codes[kind].update(tally.codes)
        versions.update(tally.versions)
        latencies.extend(tally.latencies)
    latencies.sort()
    fields = {"unary": ("sent", "ok", "failed"),
              "streams": ("started", "completed", "failed", "messages"),
              "hold": ("started", "cut")}
    result: dict[str, Any] = {
        kind: {**{f: totals[kind][f] for f in names}, "codes": dict(codes[kind])}
        for kind, names in fields.items()}
    result["unfinished_threads"] = sum(t.is_alive() for _, _, t in jobs)
    result["versions"] = dict(versions)
    result["p50_ms"] = _percentile(latencies, 0.50)
    result["p99_ms"] = _percentile(latencies, 0.99)
    result["series"] = merge(t.series for _, t, _ in jobs).to_dict()
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description="gRPC load: the demo gRPC API, or any service's "
                                             "grpc.health.v1")
    ap.add_argument("--target", required=True, help="host:port")
    ap.add_argument("--clients", type=int, default=8, help="unary-call threads")
    ap.add_argument("--streams", type=int, default=0, help="server-streaming threads")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--stream-count", type=int, default=20, help="messages per stream")
    ap.add_argument("--stream-interval-ms", type=int, default=50)
    ap.add_argument("--hold", type=int, default=0, help="long streams held until the end")
    ap.add_argument("--timeout", type=float, default=5.0, help="per-call timeout, seconds")
    ap.add_argument("--health", metavar="SERVICE",
                    help="call grpc.health.v1 Health/Check for SERVICE instead of the demo's "
                         "Echo (any service with health checking); no streams then")
    args = ap.parse_args()
    for sig in (signal.SIGINT, signal.SIGTERM):  # stop early, still report
        signal.signal(sig, lambda *_: STOP.set())
    if args.health is not None and (args.streams or args.hold):
        ap.error("--health takes no --streams or --hold")
    result = run(args.target, args.clients, args.streams, args.seconds, args.stream_count,
                 args.stream_interval_ms, args.hold, timeout=args.timeout, health=args.health)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
