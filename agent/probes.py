"""Readiness probes of ONE instance (never through the shared port, where the
old instance may answer): HTTP GET, TCP connect, or a command (argv, no
shell). `notify` readiness is systemd's own (READY=1 -> ActiveState=active)
and is read from the unit state by the swap, not probed here."""

from __future__ import annotations

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


def probe(ready: Ready, instance_port: int | None, env: dict[str, str]) -> ProbeResult:
    """One probe of an instance, per its `ready` config."""
    port = str(instance_port) if instance_port is not None else ""

    def sub(s: str) -> str:
        return s.replace(INSTANCE_PORT, port)

    if ready.type == "http":
        assert ready.url is not None
        return probe_http(sub(ready.url), ready.timeout)
    if ready.type == "tcp":
        assert ready.url is not None
        return probe_tcp(sub(ready.url), ready.timeout)
    if ready.type == "exec":
        assert ready.command is not None
        return probe_exec([sub(a) for a in ready.command], ready.timeout, env)
    raise ValueError(f"readiness type {ready.type} is not probed")
