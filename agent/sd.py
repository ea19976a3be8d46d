"""sd_notify(3) and sd_listen_fds(3) with the standard library only, for the
daemon and for services (the demo API) that must not pull in the agent's
dependencies."""

from __future__ import annotations

import os
import socket

SD_LISTEN_FDS_START = 3


def notify(message: str) -> bool:
    """Send a state string (READY=1, STOPPING=1, WATCHDOG=1, ...) to systemd;
    False when not run by systemd or the socket is gone."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):  # abstract namespace
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        try:
            s.connect(addr)
            s.sendall(message.encode())
        except OSError:
            return False
    return True


def listen_fds() -> list[socket.socket]:
    """The sockets systemd passed to this process (LISTEN_PID/LISTEN_FDS),
    starting at fd 3; the variables are removed so children do not take them."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    n = int(os.environ.get("LISTEN_FDS", "0") or 0)
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)
    return [socket.socket(fileno=SD_LISTEN_FDS_START + i) for i in range(n)]
