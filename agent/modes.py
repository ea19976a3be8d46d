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
- nat: each instance binds a private port (ZDD_INSTANCE_PORT) and nftables
  sends the public addresses to the serving instances' ports (nat.py).
  Traffic reaches an instance only once the agent routes it (`routes`):
  after its bake, in one transaction that also takes out the old instances
  about to drain. Evidence: its processes hold a LISTEN socket on its port
  (for each public address, its host: a wildcard one for a wildcard) and
  accept connections
  the agent opens to it. Before an old instance gets its drain signal, the
  agent waits until its listener holds no connection waiting to be accepted
  nor a handshake in progress (`quiesce`): conntrack keeps established
  flows where they are, so those are the last it will get.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .census import TCP_NEW_SYN_RECV, Census
from .config import ServiceConfig

if TYPE_CHECKING:
    from .listeners import Waiting


class SocketMode:
    name = ""
    own_listeners = False  # each instance binds its own
    routes = False  # traffic reaches an instance only once the agent routes it

    def route(self, add: list[int], remove: list[int],
              only: list[int] | None = None) -> tuple[list[int], list[int]] | None:
        """Send new connections to the instance ports `add` and no longer to
        `remove` (or to exactly `only`); (before, after), or None where the
        mode has nothing to route (the kernel shares one listener)."""
        return None

    def track(self, port: int | None) -> None:
        """An instance port the census and the listener checks must know."""

    def forget(self, port: int | None) -> None:
        """The instance on `port` has stopped: what the kernel still maps to
        it (conntrack) goes."""

    def quiesce(self, pids: list[int], limit: float) -> int:
        """Wait (up to `limit` seconds) until no connection waits for `pids`
        to accept it; how many still did. Only where routing decides."""
        return 0

    def __init__(self, svc: ServiceConfig) -> None:
        self.svc = svc
        self.addresses = [(lst.host, lst.port) for lst in svc.listen if not lst.unix]
        self.unix_paths = list(svc.unix_paths)  # inherit only (config refuses the others)

    def census(self) -> Census:
        return Census.for_listen(self.addresses, own_sockets=self.own_listeners,
                                 unix_paths=self.unix_paths)

    def required(self, port: int) -> list[tuple[str | None, int]]:
        """What an instance binds on its own `port` (socket: nat): each public address's
        host with its port. A loopback address's local clients arrive on
        loopback, another address's on itself (DNAT), a wildcard's on the
        interface they came in on (redirect, nat.py): a wildcard listener."""
        return list(dict.fromkeys((host, port) for host, _ in self.addresses))

    def missing_listeners(self, pids: list[int], port: int | None = None) -> list[str]:
        """Listen addresses none of `pids` holds a LISTEN socket for (`port`:
        the instance's private port, where it binds one)."""
        from . import listeners

        missing = listeners.missing(self.addresses, pids) if self.addresses else []
        if self.unix_paths:
            missing += listeners.missing_unix(self.unix_paths, pids)
        return missing

    def close_listeners(self, pids: list[int]) -> int:
        return 0

    def accept_queue(self, pids: list[int]) -> Waiting:
        """What waits to be accepted on the listeners that serve `pids`
        (listeners.Waiting): idiag_rqueue of their LISTEN sockets
        (sock_diag(7)) and UNIX_DIAG_RQLEN of unix: ones, and which
        connections those are (listeners.unaccepted, UNIX_DIAG_ICONS),
        looked up only when some wait. Raises OSError if netlink fails."""
        from . import listeners, unixdiag

        socks = self._serving(pids)
        queued = sum(s.queued for s in socks)
        ids: frozenset[int] = frozenset()
        if queued:
            ids = listeners.unaccepted({s.port for s in socks if s.queued})
        if self.unix_paths:
            held = unixdiag.listening(self.unix_paths, waiting=True)
            queued += sum(s.queued for s in held)
            ids |= {ino for s in held for ino in s.waiting}
        return listeners.Waiting(queued, ids)

    def _serving(self, pids: list[int]) -> list[Any]:
        """The TCP listeners whose queues `pids` serve: every one on the
        service's ports, where the instances share them."""
        from . import listeners

        return listeners.listening(self.svc.ports)


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
        mine = held_listeners(self.svc.ports, pids)
        return listeners.destroy(mine) if mine else 0


    def _serving(self, pids: list[int]) -> list[Any]:
        """Only the listeners these processes hold: each instance has its own."""
        return held_listeners(self.svc.ports, pids)


def held_listeners(ports: set[int] | tuple[int, ...], pids: list[int]) -> list[Any]:
    """The LISTEN sockets on `ports` that `pids` hold (listeners.ListenSocket)."""
    from . import listeners

    socks = listeners.listening(ports)
    holders = listeners.held_by(pids, socks)
    return [s for s in socks if s.inode in holders]


QUIESCE_POLL = 0.02  # seconds between two looks at a withdrawn listener's queues


class Nat(SocketMode):
    name = "nat"
    own_listeners = True
    routes = True

    def __init__(self, svc: ServiceConfig) -> None:
        super().__init__(svc)
        self.instance_ports: set[int] = set()
        self._census: Census | None = None

    def census(self) -> Census:
        self._census = Census.for_listen(self.addresses, own_sockets=True)
        self._census.add_ports(self.instance_ports)
        return self._census

    def track(self, port: int | None) -> None:
        if port is None or port in self.instance_ports:
            return
        self.instance_ports.add(port)
        if self._census is not None:
            self._census.add_ports([port])

    def missing_listeners(self, pids: list[int], port: int | None = None) -> list[str]:
        from . import listeners

        if port is None:
            return [f"{lst} (no private port known)" for lst in self.svc.listen]
        return listeners.missing(self.required(port), pids)

    def _serving(self, pids: list[int]) -> list[Any]:
        return held_listeners(self.instance_ports, pids)

    def route(self, add: list[int], remove: list[int],
              only: list[int] | None = None) -> tuple[list[int], list[int]]:
        """One nftables transaction, when the ports change (nat.py). The
        kernel's table is where the current ports are read from."""
        from . import nat

        nft = nat.Nft()
        have = nat.routed(nft.table()).get(self.svc.name)
        before = list(have["ports"]) if have else []
        if only is not None:
            after = list(dict.fromkeys(only))
        else:
            after = [p for p in before if p not in remove]
            after += [p for p in dict.fromkeys(add) if p not in after and p not in remove]
        if have is None or after != before or sorted(have["chains"]) != sorted(nat.HOOKS):
            nft.apply(nat.Route(self.svc.name, tuple(self.addresses), tuple(after)))
        gone = [p for p in before if p not in after]
        if gone:
            # the SYNs their full accept queues dropped: sent again, they go to
            # the new ports, not by conntrack to the ones being withdrawn
            try:
                nat.forget(gone, unanswered=True)
            except Exception:  # no conntrack access: doctor says so
                pass
        return before, after

    def forget(self, port: int | None) -> None:
        from . import nat

        if port is not None:
            try:
                nat.forget([port])
            except Exception:  # no conntrack access: said by doctor, never a reason to fail
                pass

    def quiesce(self, pids: list[int], limit: float) -> int:
        """Until the listeners `pids` hold have an empty accept queue and no
        handshake in progress (`waiting`), at one look; what was still
        waiting at the limit (limit 0: one look)."""
        end = time.monotonic() + limit
        while True:
            left = waiting(self.instance_ports, pids)
            if left == 0 or time.monotonic() >= end:
                return left
            time.sleep(QUIESCE_POLL)


def waiting(ports: set[int] | tuple[int, ...], pids: list[int] | None = None) -> int:
    """Connections waiting on the LISTEN sockets on `ports` (those `pids`
    hold, or all): completed handshakes nobody accepted yet (idiag_rqueue)
    and handshakes in progress (TCP_NEW_SYN_RECV request sockets), through
    sock_diag."""
    from . import listeners
    from .census import diag_dump

    socks = listeners.listening(ports) if pids is None else held_listeners(ports, pids)
    mine = {s.port for s in socks}
    total = sum(s.queued for s in socks)
    if mine:
        total += len(diag_dump(listeners.FAMILIES, 1 << TCP_NEW_SYN_RECV, mine))
    return total


QUIET_SETTLE = 1.0  # seconds a count may stay flat before it is taken as final
# seconds between two looks: each look is sock_diag dumps, and each dump
# walks the kernel's whole established hash (2.3 ms for its 262,144 empty
# buckets here, plus 0.25 us for every TCP socket of the host, any network
# namespace: docs/benchmarks.md), so 50 ms polls kept a core busy for the wait
QUIET_POLL = 0.2


def until_quiet(look: Callable[[], int], limit: float, settle: float = QUIET_SETTLE,
                poll: float = QUIET_POLL) -> int:
    """Poll `look` (every `poll` seconds) until it counts 0, or has not
    fallen for `settle` seconds (keep-alive clients that stay), or `limit`
    seconds passed; the last count. A withdrawn instance's connections end
    by themselves this way before any signal."""
    end = time.monotonic() + limit
    best, since, n = None, time.monotonic(), 0
    while time.monotonic() < end:
        n = look()
        if n == 0:
            return 0
        if best is None or n < best:
            best, since = n, time.monotonic()
        elif time.monotonic() - since >= settle:
            break
        time.sleep(poll)
    return n


MODES: dict[str, type[SocketMode]] = {"inherit": Inherit, "reuseport": ReusePort, "nat": Nat}


def mode_for(svc: ServiceConfig) -> SocketMode:
    return MODES[svc.socket](svc)
