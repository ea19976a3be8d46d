"""sd_notify(3) and sd_listen_fds(3) for the daemon: the drain kit's
(zdd_drain, standard library only), which services import too."""

from __future__ import annotations

import socket

from zdd_drain import SD_LISTEN_FDS_START, notify
from zdd_drain import listen_fds as listen_fds_with_names

__all__ = ["SD_LISTEN_FDS_START", "listen_fds", "notify"]


def listen_fds() -> list[socket.socket]:
    """The sockets systemd passed to this process (LISTEN_PID/LISTEN_FDS),
    starting at fd 3; the variables are removed so children do not take them."""
    return [x.sock for x in listen_fds_with_names()]
