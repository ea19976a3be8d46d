"""The examples/ run as documented: each serves on loopback (ZDD_LISTEN, or
gunicorn's --bind), and on SIGTERM answers a kept-alive connection's next
request (/ready: 503) with `Connection: close`, then exits 0.

Real processes and loopback sockets, no systemd (the swaps under load are
in tests/e2e/test_drain_kit_e2e.py); a few seconds in all."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def argv(example: str, port: int) -> list[str]:
    if example == "gunicorn-wsgi":
        return [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py",
                "--bind", f"127.0.0.1:{port}", "app:app"]
    return [sys.executable, "serve.py"]


def connect(port: int, deadline: float) -> http.client.HTTPConnection:
    while True:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            conn.request("GET", "/")
            return conn
        except ConnectionRefusedError:
            conn.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@pytest.mark.parametrize("example", ["uvicorn-asgi", "hypercorn-asgi", "gunicorn-wsgi"])
def test_example_drains_a_keepalive_connection_and_exits_0(example: str) -> None:
    port = free_port()
    env = {**os.environ, "ZDD_LISTEN": f"127.0.0.1:{port}", "ZDD_GRACE_PERIOD": "5",
           "ZDD_VERSION": "v7", "PYTHONPATH": f"{EXAMPLES / example}{os.pathsep}{ROOT}"}
    proc = subprocess.Popen(argv(example, port), cwd=EXAMPLES / example, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        conn = connect(port, time.monotonic() + 15)
        first = conn.getresponse()
        assert first.status == 200 and b'"version": "v7"' in first.read()
        assert (first.getheader("connection") or "").lower() != "close"
        conn.request("GET", "/ready")
        ready = conn.getresponse()
        assert (ready.status, ready.read()) == (200, b'{"ready": true}\n')
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)  # the drain has begun; the connection sat idle meanwhile
        conn.request("GET", "/ready")
        last = conn.getresponse()
        assert last.status == 503 and last.read() == b'{"ready": false}\n'
        assert (last.getheader("connection") or "").lower() == "close"
        conn.close()
        _out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err[-2000:]
