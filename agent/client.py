"""The CLI's side of the control socket: send one request, stream events,
return the final reply."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import protocol
from .errors import ZddError


class DaemonUnavailable(Exception):
    """No daemon answers: the caller acts in-process instead."""


class DaemonLost(ZddError):
    """The daemon took the request and went away before answering."""


def call(path: Path, cmd: str, args: dict[str, Any],
         on_event: Callable[[str, dict[str, Any]], None],
         on_sent: Callable[[], None] = lambda: None) -> dict[str, Any]:
    """The final reply: {"result": ..., "exit_code": n} or {"error": ..., ...}.
    on_sent() runs once the request is sent, while the daemon acts on it."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        s.settimeout(5)
        try:
            s.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError, TimeoutError) as e:
            raise DaemonUnavailable(f"no daemon answers at {path} ({e.strerror or e})") from e
        s.sendall(protocol.request(cmd, **args))
        on_sent()
        s.settimeout(None)  # a swap streams for as long as it takes
        with s.makefile("rb") as f:
            for line in f:
                msg = json.loads(line)
                if "event" in msg:
                    on_event(msg["event"], msg.get("data", {}))
                    continue
                if msg.get("v") != protocol.VERSION:
                    raise DaemonUnavailable(f"the daemon at {path} speaks protocol "
                                            f"{msg.get('v')}, this CLI {protocol.VERSION}")
                return dict(msg)
        raise DaemonLost(f"the daemon at {path} closed the connection before answering "
                         f"{cmd}; a swap it was running is finished or reverted when it "
                         "restarts (see zdd-agent status and history)")
    finally:
        s.close()
