"""The CLI's side of the control socket: send one request, stream events,
return the final reply.

It imports only what sending needs (socket, json, protocol.py), since
fastpath.py sends a request with it before the command line loads (issue 16).
"""

from __future__ import annotations

import json
import socket

from . import protocol
from .errors import ZddError

# Names for type checkers only: typing and pathlib would cost a call to the
# daemon about 13 ms of CPU here (issue 16). TYPE_CHECKING is typing's, without
# importing typing; type checkers know the name.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path
    from typing import Any


class DaemonUnavailable(Exception):
    """No daemon answers: the caller acts in-process instead."""


class DaemonLost(ZddError):
    """The daemon took the request and went away before answering."""


def interrupted(cmd: str, args: dict[str, Any]) -> str:
    """What to say when the CLI stops while the daemon has its request: a
    swap goes on there (""; nothing to say for other commands)."""
    if cmd not in ("swap", "rollback") or args.get("dry_run"):
        return ""
    return (f"\ninterrupted: the daemon goes on with the {cmd} of {args['service']} (it "
            f"rolls back or finishes, never stops half-way); see `zdd-agent status "
            f"{args['service']}` and `zdd-agent history`")


def send(path: str | Path, request: bytes) -> socket.socket:
    """A connection to the daemon at path that carries request (one line
    from protocol.request()); DaemonUnavailable when no daemon listens."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        s.settimeout(5)
        try:
            s.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError, TimeoutError) as e:
            raise DaemonUnavailable(f"no daemon answers at {path} ({e.strerror or e})") from e
        s.sendall(request)
    except BaseException:
        s.close()
        raise
    s.settimeout(None)  # a swap streams for as long as it takes
    return s


def receive(s: socket.socket, path: str | Path, cmd: str,
            on_event: Callable[[str, dict[str, Any]], None]) -> dict[str, Any]:
    """The final reply on s, after passing each event to on_event; closes s."""
    with s, s.makefile("rb") as f:
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


def call(path: Path, cmd: str, args: dict[str, Any],
         on_event: Callable[[str, dict[str, Any]], None],
         on_sent: Callable[[], None] = lambda: None,
         conn: socket.socket | None = None) -> dict[str, Any]:
    """The final reply: {"result": ..., "exit_code": n} or {"error": ..., ...}.
    on_sent() runs once the request is sent, while the daemon acts on it;
    conn: a connection that carries the request already (fastpath.py)."""
    s = conn or send(path, protocol.request(cmd, **args))
    try:
        on_sent()
    except BaseException:
        s.close()
        raise
    return receive(s, path, cmd, on_event)
