"""Readiness probes of ONE instance (never through the shared port, where the
old instance may answer): HTTP GET (HTTP/1.1 or h2c), gRPC health check,
TCP connect, or a command (argv, no shell). `notify` readiness is systemd's
own (READY=1 -> ActiveState=active) and is read from the unit state by the
swap, not probed here."""

from __future__ import annotations

from collections.abc import Callable

import http.client
import os
import socket
import subprocess
from dataclasses import dataclass

from .config import INSTANCE_PORT, Ready


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    detail: str


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on now, for an instance's own readiness endpoint.

    The kernel picks it from the ephemeral range, which the agent keeps clear
    of service ports (ip_local_reserved_ports)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _split_hostport(hostport: str) -> tuple[str, int]:
    host, _, port = hostport.rpartition(":")
    return host.strip("[]"), int(port)


def probe_http(url: str, timeout: float) -> ProbeResult:
    rest = url[len("http://"):]
    hostport, _, path = rest.partition("/")
    host, port = _split_hostport(hostport)
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", "/" + path, headers={"User-Agent": "zdd-agent-probe",
                                                 "Connection": "close"})
        resp = conn.getresponse()
        resp.read(65536)
        ok = 200 <= resp.status < 400
        return ProbeResult(ok, f"HTTP {resp.status}")
    except (OSError, http.client.HTTPException) as e:
        return ProbeResult(False, f"{type(e).__name__}: {e}")
    finally:
        conn.close()


def probe_h2c(url: str, timeout: float) -> ProbeResult:
    """GET over HTTP/2 cleartext with prior knowledge (RFC 9113 3.3), with h2."""
    try:
        import h2.config
        import h2.connection
        import h2.events
        import h2.exceptions
    except ImportError:
        return ProbeResult(False, "HTTP/2 probes need h2 (Debian: apt install python3-h2; "
                                  "pip: h2)")

    rest = url[len("http://"):]
    hostport, _, path = rest.partition("/")
    host, port = _split_hostport(hostport)
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
            conn.initiate_connection()
            conn.send_headers(1, [(":method", "GET"), (":path", "/" + path),
                                  (":scheme", "http"), (":authority", hostport),
                                  ("user-agent", "zdd-agent-probe")], end_stream=True)
            s.sendall(conn.data_to_send())
            while True:
                data = s.recv(65536)
                if not data:
                    return ProbeResult(False, "h2c: connection closed before a response")
                for ev in conn.receive_data(data):
                    if isinstance(ev, h2.events.ResponseReceived):
                        status = int(dict(ev.headers).get(b":status", b"0"))
                        conn.close_connection()
                        s.sendall(conn.data_to_send())
                        return ProbeResult(200 <= status < 400, f"h2c {status}")
                    if isinstance(ev, (h2.events.StreamReset,
                                       h2.events.ConnectionTerminated)):
                        return ProbeResult(False, f"h2c: {type(ev).__name__}")
                s.sendall(conn.data_to_send())
    except (OSError, h2.exceptions.ProtocolError) as e:
        return ProbeResult(False, f"{type(e).__name__}: {e}")


# grpc.health.v1 (grpc/health/v1/health.proto), encoded by hand: the request
# is one string field and the reply one enum field, so the agent needs
# grpcio alone, not grpcio-health-checking (which Debian 12 does not package).
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
SERVING_STATUS = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def health_request(service: str) -> bytes:
    """HealthCheckRequest{service}: field 1, length-delimited (proto3 leaves
    an empty string out)."""
    raw = service.encode()
    return b"\x0a" + _varint(len(raw)) + raw if raw else b""


def health_status(reply: bytes) -> int:
    """HealthCheckResponse's status (field 1, varint); fields it does not
    know are skipped, as protobuf readers do. ValueError on a malformed one."""
    i, status = 0, 0

    def varint() -> int:
        nonlocal i
        n = shift = 0
        while True:
            if i >= len(reply) or shift > 63:
                raise ValueError("truncated varint")
            b = reply[i]
            i += 1
            n |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return n

    while i < len(reply):
        key = varint()
        field, wire = key >> 3, key & 7
        if wire == 0:
            value = varint()
            if field == 1:
                status = value
        elif wire == 2:
            length = varint()  # before the addition: varint() moves i
            i += length
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        else:
            raise ValueError(f"wire type {wire}")
    if i != len(reply):
        raise ValueError("truncated field")
    return status


def probe_grpc(target: str, service: str, timeout: float) -> ProbeResult:
    """grpc.health.v1.Health/Check of `service` ("" = the server as a whole)."""
    try:
        import grpc
    except ImportError:
        return ProbeResult(False, "gRPC probes need grpcio (Debian: apt install python3-grpcio; "
                                  "pip: grpcio)")

    with grpc.insecure_channel(target.removeprefix("grpc://")) as channel:
        check = channel.unary_unary(HEALTH_CHECK, request_serializer=health_request,
                                    response_deserializer=bytes)
        try:
            reply = check(service, timeout=timeout)
        except grpc.RpcError as e:
            return ProbeResult(False, f"gRPC {e.code().name}: {e.details()}")
    try:
        status = health_status(reply)
    except ValueError as e:
        return ProbeResult(False, f"gRPC: malformed HealthCheckResponse ({e})")
    return ProbeResult(status == 1, f"gRPC {SERVING_STATUS.get(status, str(status))}")


def probe_tcp(url: str, timeout: float) -> ProbeResult:
    host, port = _split_hostport(url.removeprefix("tcp://").split("/", 1)[0])
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return ProbeResult(True, "connected")
    except OSError as e:
        return ProbeResult(False, f"{type(e).__name__}: {e}")


def probe_exec(argv: list[str], timeout: float, env: dict[str, str]) -> ProbeResult:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, **env}, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return ProbeResult(False, f"timed out after {timeout:g}s")
    except OSError as e:
        return ProbeResult(False, f"cannot run {argv[0]}: {e.strerror}")
    tail = (r.stdout + r.stderr).strip().splitlines()[-1:] or [""]
    return ProbeResult(r.returncode == 0, f"exit {r.returncode} {tail[0]}".strip())


ExecRunner = Callable[[list[str], float, dict[str, str]], ProbeResult]


def probe(ready: Ready, instance_port: int | None, env: dict[str, str],
          run_exec: ExecRunner | None = None) -> ProbeResult:
    """One probe of an instance, per its `ready` config; an exec probe runs
    through `run_exec` (argv, timeout s, env) when given (deploy.py: as a
    transient unit with the service's user), else as a child process."""
    port = str(instance_port) if instance_port is not None else ""

    def sub(s: str) -> str:
        return s.replace(INSTANCE_PORT, port)

    if ready.type == "http":
        assert ready.url is not None
        if ready.http_version == "2":
            return probe_h2c(sub(ready.url), ready.timeout)
        return probe_http(sub(ready.url), ready.timeout)
    if ready.type == "grpc":
        assert ready.url is not None
        return probe_grpc(sub(ready.url), ready.grpc_service, ready.timeout)
    if ready.type == "tcp":
        assert ready.url is not None
        return probe_tcp(sub(ready.url), ready.timeout)
    if ready.type == "exec":
        assert ready.command is not None
        return (run_exec or probe_exec)([sub(a) for a in ready.command], ready.timeout, env)
    raise ValueError(f"readiness type {ready.type} is not probed")
