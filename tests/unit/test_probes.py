"""Readiness probes against real servers on loopback: HTTP/1.1, h2c, gRPC
health, TCP, exec."""

from __future__ import annotations

import http.server
import socket
import threading
from collections.abc import Iterator
from concurrent import futures

import pytest

from agent import probes
from agent.config import Ready


@pytest.fixture
def http1() -> Iterator[int]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200 if self.path == "/ready" else 503)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *a: object) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def h2c() -> Iterator[int]:
    """A minimal HTTP/2 cleartext server (prior knowledge) built on h2."""
    import h2.config
    import h2.connection
    import h2.events

    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(8)
    stop = threading.Event()

    def serve() -> None:
        ls.settimeout(0.2)
        while not stop.is_set():
            try:
                c, _ = ls.accept()
            except OSError:
                continue
            with c:
                conn = h2.connection.H2Connection(
                    h2.config.H2Configuration(client_side=False))
                conn.initiate_connection()
                c.sendall(conn.data_to_send())
                done = False
                while not done:
                    data = c.recv(65536)
                    if not data:
                        break
                    for ev in conn.receive_data(data):
                        if isinstance(ev, h2.events.RequestReceived):
                            path = dict(ev.headers)[b":path"]
                            status = b"200" if path == b"/ready" else b"503"
                            conn.send_headers(ev.stream_id, [(b":status", status)],
                                              end_stream=True)
                        if isinstance(ev, h2.events.ConnectionTerminated):
                            done = True
                    c.sendall(conn.data_to_send())

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield ls.getsockname()[1]
    stop.set()
    t.join()
    ls.close()


@pytest.fixture
def grpc_health() -> Iterator[tuple[int, object]]:
    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    servicer.set("demo.Api", health_pb2.HealthCheckResponse.NOT_SERVING)
    yield port, servicer
    server.stop(grace=None).wait()


def test_http1(http1: int) -> None:
    ready = Ready(type="http", url="http://127.0.0.1:{instance_port}/ready", timeout=1.0)
    assert probes.probe(ready, http1, {}) == probes.ProbeResult(True, "HTTP 200")
    bad = Ready(type="http", url="http://127.0.0.1:{instance_port}/other", timeout=1.0)
    assert probes.probe(bad, http1, {}) == probes.ProbeResult(False, "HTTP 503")


def test_h2c(h2c: int) -> None:
    ready = Ready(type="http", url="http://127.0.0.1:{instance_port}/ready", timeout=2.0,
                  http_version="2")
    assert probes.probe(ready, h2c, {}) == probes.ProbeResult(True, "h2c 200")
    bad = Ready(type="http", url="http://127.0.0.1:{instance_port}/x", timeout=2.0,
                http_version="2")
    assert probes.probe(bad, h2c, {}) == probes.ProbeResult(False, "h2c 503")


def test_grpc_health(grpc_health: tuple[int, object]) -> None:
    from grpc_health.v1 import health_pb2

    port, servicer = grpc_health
    whole = Ready(type="grpc", url="127.0.0.1:{instance_port}", timeout=2.0)
    assert probes.probe(whole, port, {}) == probes.ProbeResult(True, "gRPC SERVING")
    svc = Ready(type="grpc", url="grpc://127.0.0.1:{instance_port}", timeout=2.0,
                grpc_service="demo.Api")
    assert probes.probe(svc, port, {}) == probes.ProbeResult(False, "gRPC NOT_SERVING")
    servicer.set("demo.Api", health_pb2.HealthCheckResponse.SERVING)  # type: ignore[attr-defined]
    assert probes.probe(svc, port, {}).ok
    unknown = Ready(type="grpc", url="127.0.0.1:{instance_port}", timeout=2.0,
                    grpc_service="no.Such")
    r = probes.probe(unknown, port, {})
    assert not r.ok and "NOT_FOUND" in r.detail


def test_tcp_and_refused(http1: int) -> None:
    assert probes.probe(Ready(type="tcp", url="127.0.0.1:{instance_port}"), http1, {}).ok
    free = probes.free_port()
    r = probes.probe(Ready(type="tcp", url="tcp://127.0.0.1:{instance_port}"), free, {})
    assert not r.ok and "ConnectionRefused" in r.detail


def test_exec_gets_pid_and_port() -> None:
    ready = Ready(type="exec", command=("/bin/sh", "-c",
                                        'test "$ZDD_MAIN_PID" = 42 && test "$1" = 9999',
                                        "sh", "{instance_port}"), timeout=2.0)
    assert probes.probe(ready, 9999, {"ZDD_MAIN_PID": "42"}).ok
    assert not probes.probe(ready, 9999, {"ZDD_MAIN_PID": "43"}).ok
    slow = Ready(type="exec", command=("/bin/sleep", "5"), timeout=0.2)
    assert probes.probe(slow, None, {}) == probes.ProbeResult(False, "timed out after 0.2s")


def test_the_grpc_probe_and_load_client_need_grpcio_alone() -> None:
    """Debian 12 packages grpcio but not grpcio-health-checking: the probe
    and `verify --protocol grpc`'s load client encode grpc.health.v1
    themselves, so both import with grpc_health out of reach."""
    import subprocess
    import sys

    code = ("import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] == 'grpc_health':\n"
            "            raise ModuleNotFoundError(name)\n"
            "sys.meta_path.insert(0, Block())\n"
            "import agent.probes, agent.traffic.grpc_client\n"
            "assert agent.probes.health_request('x') == b'\\n\\x01x'\n"
            "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
