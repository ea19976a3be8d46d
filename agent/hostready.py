"""Whole-host drain for load balancers: `zdd-agent drain-host` and
`undrain-host` flip a readiness endpoint that the daemon serves (GET /ready:
200 "ready", or 503 "draining"), so an upstream HAProxy, NGINX or cloud load
balancer health check takes the host out of rotation before maintenance and
puts it back after.

The state is a file in the state directory, written atomically and read by
the endpoint on each request: it survives a daemon restart or a reboot (a
host drained for maintenance stays out until someone undrains it), and a
`--local` CLI that writes it is seen at once."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from .fsutil import atomic_write

STATE_FILE = "host.json"
MAX_REASON = 200


def read(state_dir: Path) -> dict[str, Any]:
    """{"drained": bool, "since": epoch or None, "reason": str}; a missing or
    unreadable file means in rotation (the safe default after a fresh install)."""
    try:
        data = json.loads((state_dir / STATE_FILE).read_text())
        return {"drained": bool(data["drained"]), "since": data.get("since"),
                "reason": str(data.get("reason", ""))}
    except (OSError, ValueError, KeyError, TypeError):
        return {"drained": False, "since": None, "reason": ""}


def set_drained(state_dir: Path, drained: bool, reason: str = "") -> dict[str, Any]:
    """Drain or undrain; the result says whether anything changed."""
    if len(reason) > MAX_REASON or not reason.isprintable():
        raise ValueError(f"the reason must be printable and at most {MAX_REASON} characters")
    before = read(state_dir)
    if before["drained"] == drained:
        return {**before, "changed": False}
    now = {"drained": drained, "since": round(time.time(), 3), "reason": reason}
    atomic_write(state_dir / STATE_FILE, json.dumps(now) + "\n", 0o644)
    return {**now, "changed": True}


class _Handler(BaseHTTPRequestHandler):
    server_version = "zdd-agent"
    state_dir: Path  # set on the subclass the server makes

    def _answer(self, body: bool) -> None:
        if self.path.split("?")[0] not in ("/ready", "/"):
            code, text = 404, "not found: GET /ready\n"
        else:
            st = read(self.state_dir)
            if st["drained"]:
                reason = f": {st['reason']}" if st["reason"] else ""
                code, text = 503, f"draining since {st['since']}{reason}\n"
            else:
                code, text = 200, "ready\n"
        data = text.encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if body:
            self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._answer(True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._answer(False)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass  # health checks every second would flood the journal


class _Server6(ThreadingHTTPServer):
    address_family = socket.AF_INET6


class ReadyServer:
    """GET /ready on `address`, in a thread; stop() closes it."""

    def __init__(self, host: str, port: int, state_dir: Path) -> None:
        handler = type("Handler", (_Handler,), {"state_dir": state_dir})
        server = _Server6 if ":" in host else ThreadingHTTPServer
        self.httpd = server((host, port), handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="host-ready",
                                       daemon=True)

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def start(self) -> ReadyServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
