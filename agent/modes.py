"""Socket modes: how an instance gets its listener and what the kernel must
show before it is admitted and when it drains. One object per mode, picked
once per service (`mode_for`); the swap does not care which.

- inherit: the socket unit (zdd-NAME.socket) owns the listener; every
  instance inherits the same socket through LISTEN_FDS. Evidence: the
  instance's processes hold that LISTEN socket. Its listener is shared: the
  agent never closes it.
- reuseport: each instance binds its own SO_REUSEPORT listener. Evidence: its
  own processes hold a LISTEN socket on every listen address. At its drain
  signal the agent closes the old instance's listeners from the kernel side
  (SOCK_DESTROY): a program that stops accepting but keeps its listener open
  (Envoy #8031, hypercorn PR #128) would otherwise keep receiving new
  connections, which wait in its queue; with tcp_migrate_req=1 the queued ones
  move to the new listeners (inet_csk_listen_stop).
"""

from __future__ import annotations

from .census import Census
from .config import ServiceConfig


class SocketMode:
    name = ""
    own_listeners = False  # each instance binds its own

    def __init__(self, svc: ServiceConfig) -> None:
        self.svc = svc
        self.addresses = [(lst.host, lst.port) for lst in svc.listen if not lst.unix]
        self.unix_paths = list(svc.unix_paths)  # inherit only (config refuses the others)

    def census(self) -> Census:
        return Census.for_listen(self.addresses, own_sockets=self.own_listeners,
                                 unix_paths=self.unix_paths)

    def missing_listeners(self, pids: list[int]) -> list[str]:
        """Listen addresses none of `pids` holds a LISTEN socket for."""
        from . import listeners

        missing = listeners.missing(self.addresses, pids) if self.addresses else []
        if self.unix_paths:
            missing += listeners.missing_unix(self.unix_paths, pids)
        return missing

    def close_listeners(self, pids: list[int]) -> int:
        return 0

    def accept_queue(self, pids: list[int]) -> int:
        """Connections waiting to be accepted on the listeners that serve
        `pids` (idiag_rqueue of LISTEN sockets, sock_diag(7))."""
        from . import listeners, unixdiag

        queued = sum(s.queued for s in listeners.listening(self.svc.ports))
        if self.unix_paths:  # UNIX_DIAG_RQLEN of a listener: connections not yet accepted
            queued += sum(s.queued for s in unixdiag.listening(self.unix_paths))
        return queued


class Inherit(SocketMode):
    name = "inherit"


class ReusePort(SocketMode):
    name = "reuseport"
    own_listeners = True

    def close_listeners(self, pids: list[int]) -> int:
        """SOCK_DESTROY the LISTEN sockets on our ports that `pids` hold (and
        only they: a socket shared with a process outside them stays)."""
        from . import listeners

        if not pids:
            return 0
        socks = listeners.listening(self.svc.ports)
        holders = listeners.held_by(pids, socks)
        mine = [s for s in socks if s.inode in holders]
        return listeners.destroy(mine) if mine else 0


    def accept_queue(self, pids: list[int]) -> int:
        """Only the listeners these processes hold: each instance has its own."""
        from . import listeners

        socks = listeners.listening(self.svc.ports)
        holders = listeners.held_by(pids, socks)
        return sum(s.queued for s in socks if s.inode in holders)


MODES: dict[str, type[SocketMode]] = {"inherit": Inherit, "reuseport": ReusePort}


def mode_for(svc: ServiceConfig) -> SocketMode:
    return MODES[svc.socket](svc)
