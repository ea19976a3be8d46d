"""Which instances accept: connections the agent opens itself.

The census samples established sockets every half second, so it sees a
connection with a chance that grows with its life: an instance that answers
fast (a new one, with no keep-alive clients yet) can be seen taking none of
its share while a busy old one is seen taking dozens (measured in CI: 0 seen
against 117 for an instance that served). Bytes moved do not settle it
either: /proc/PID/io counts read(2)/write(2), not recv(2)/send(2), which is
what asyncio and most servers use.

So when the census suggests that a new instance does not accept, the bake
asks the kernel directly: the agent opens connections, one at a time, to
the service's listen address, and finds which instance's processes hold the
server side of each (sock_diag ESTABLISHED dump, peer port matched to the
client socket's port, inode matched to /proc/PID/fd). To a unix: listener
the connections are AF_UNIX ones, matched by inode: unix_diag gives each
accepted socket's peer, the inode of the agent's client socket. The agent's connections
stay open until they are attributed, so every one is seen: no lifetime bias.
They carry no data and are closed with a FIN (a server sees a client that
left before sending a request).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from .census import Census
from .config import Listen

TRIAL_POLL = 0.01  # seconds between two looks for who accepted a connection, at most
# the first wait after a connect: a server that accepts takes a fraction of a
# millisecond on loopback, so the looks start close together and space out
TRIAL_POLL_FIRST = 0.001
TRIAL_WAIT = 0.25  # seconds one connection may wait to be accepted
TRIAL_BUDGET = 10.0  # seconds for the whole trial, whatever the count


@dataclass
class TrialResult:
    """What became of the connections the agent opened to `target`."""

    target: str
    opened: int = 0
    accepted: dict[str, int] = field(default_factory=dict)  # by instance
    unaccepted: int = 0  # still in an accept queue when the trial ended

    def elsewhere(self, instance: str) -> int:
        return sum(n for x, n in self.accepted.items() if x != instance)

    def as_dict(self) -> dict[str, object]:
        return {"target": self.target, "opened": self.opened,
                "accepted": dict(self.accepted), "unaccepted": self.unaccepted}


def connect_address(lst: Listen) -> tuple[int, tuple[str, int] | str]:
    """Where the agent connects for a listen address: the address itself, or
    loopback for a wildcard one (systemd binds [::] dual-stack, so IPv4
    loopback reaches it too); a unix: listener's path."""
    if lst.path is not None:
        return socket.AF_UNIX, lst.path
    host = lst.host
    if host in (None, "", "0.0.0.0"):
        return socket.AF_INET, ("127.0.0.1", lst.port)
    if host == "::":
        return socket.AF_INET6, ("::1", lst.port)
    return (socket.AF_INET6 if ":" in host else socket.AF_INET), (host, lst.port)


def _holders(census: Census, groups: Mapping[str, list[int]], unix: bool) -> dict[int, str]:
    """client port (unix: the client socket's inode) -> the group whose
    processes hold the server side."""
    sets = census.inodes_many(groups)
    owner = {ino: name for name, inodes in sets.items() for ino in inodes}
    if unix:
        return {client: owner[ino] for ino, client in census.unix_peers(set(owner)).items()}
    out: dict[int, str] = {}
    for ino, peer in census.peers(set(owner)).items():
        if not peer.startswith("unix:"):
            out[int(peer.rsplit(":", 1)[1])] = owner[ino]
    return out


def _target(family: int, addr: tuple[str, int] | str) -> str:
    if family == socket.AF_UNIX:
        return f"unix:{addr}"
    assert isinstance(addr, tuple)
    return f"{addr[0]}:{addr[1]}" if family == socket.AF_INET else f"[{addr[0]}]:{addr[1]}"


def accept_trial(census: Census, groups: Callable[[], Mapping[str, list[int]]],
                 target: Listen, count: int,
                 monotonic: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep,
                 close_each: bool = False) -> TrialResult:
    """Open `count` connections (TCP; AF_UNIX to a unix: listener) to
    `target`, one at a time, each waiting up to TRIAL_WAIT until some group
    of processes holds its server side; count them per group. `groups()`
    gives each instance's PIDs (asked again at every look: a process may
    fork or exit meanwhile). `close_each`: close each connection once it
    was accepted (a server with one worker per connection, gunicorn's sync
    workers, has no worker left for the next while it waits for a request
    on the last).

    OSError when the address cannot be reached (connect refused, timeout)
    or the census fails: then nothing is known."""
    family, addr = connect_address(target)
    unix = family == socket.AF_UNIX
    res = TrialResult(target=_target(family, addr))
    mine: dict[int, socket.socket] = {}
    seen: dict[int, str] = {}
    end = monotonic() + TRIAL_BUDGET
    try:
        for _ in range(count):
            if monotonic() >= end:
                break
            s = socket.socket(family, socket.SOCK_STREAM)
            try:
                s.settimeout(TRIAL_WAIT * 4)
                s.connect(addr)
            except OSError:
                s.close()
                raise
            # what names this connection in the server side's peer: its
            # port, or (AF_UNIX) its socket's inode
            port = os.fstat(s.fileno()).st_ino if unix else s.getsockname()[1]
            mine[port] = s
            res.opened += 1
            wait_end = min(end, monotonic() + TRIAL_WAIT)
            delay = TRIAL_POLL_FIRST
            while True:
                seen.update({p: g for p, g in _holders(census, groups(), unix).items()
                             if p in mine})
                if port in seen or monotonic() >= wait_end:
                    break
                sleep(delay)
                delay = min(TRIAL_POLL, delay * 2)
            if close_each and port in seen:
                mine.pop(port).close()
        # a last look: late accepts count too
        seen.update({p: g for p, g in _holders(census, groups(), unix).items() if p in mine})
    finally:
        for s in mine.values():
            s.close()
    for g in seen.values():
        res.accepted[g] = res.accepted.get(g, 0) + 1
    res.unaccepted = res.opened - len(seen)
    return res
