"""LISTEN sockets as evidence: which processes hold a listener on a service's
addresses, which addresses nobody of an instance covers, which listeners
belong to processes the agent does not know, and closing a listener from the
kernel side.

Everything here reads the kernel (NETLINK_SOCK_DIAG, sock_diag(7); struct
inet_diag_msg in include/uapi/linux/inet_diag.h) and /proc/PID/fd: what a
program says about its listeners is a claim, these are the facts.

`destroy` uses SOCK_DESTROY (net/ipv4/inet_diag.c: inet_diag_cmd_exact ->
tcp_diag_destroy -> sock_diag_destroy -> tcp_abort in net/ipv4/tcp.c). It
needs a kernel built with CONFIG_INET_DIAG_DESTROY and CAP_NET_ADMIN in the
socket's network namespace.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from . import unixdiag
from .census import (
    NETLINK_SOCK_DIAG,
    TCP_CLOSE_WAIT,
    TCP_ESTABLISHED,
    TCP_LISTEN,
    DiagMsg,
    diag_dump,
    diag_raw,
    exact_request,
    fd_inodes,
    msg_cookie,
    sockid,
)

SOCK_DESTROY = 21  # linux/sock_diag.h
INET_DIAG_SKV6ONLY = 11  # u8 attribute of AF_INET6 sockets in LISTEN or CLOSE (inet_diag.c)
FAMILIES = (socket.AF_INET, socket.AF_INET6)
WILDCARDS = {socket.AF_INET: "0.0.0.0", socket.AF_INET6: "::"}


@dataclass(frozen=True)
class ListenSocket:
    """One TCP socket in LISTEN, as the kernel reports it.

    `queued` is idiag_rqueue, the connections waiting in the accept queue
    (completed handshakes nobody accepted yet); `backlog` is idiag_wqueue,
    the accept queue's limit (listen(2)'s backlog capped by
    net.core.somaxconn), for a listener (net/ipv4/tcp_diag.c,
    tcp_diag_get_info). `cookie` is the kernel's 8-byte socket cookie
    (idiag_cookie, the value SO_COOKIE returns): it names this socket and no
    later one, unlike the address. `v6only` is INET_DIAG_SKV6ONLY for an
    AF_INET6 socket (None for AF_INET, or a kernel that does not send it).
    `ifindex` is the device it is bound to (SO_BINDTODEVICE), 0 if none."""

    inode: int
    family: int
    host: str
    port: int
    cookie: int
    queued: int
    backlog: int
    v6only: bool | None = None
    ifindex: int = 0

    @property
    def address(self) -> str:
        """"127.0.0.1:8080", "[::]:8080" (config.Listen's spelling)."""
        return _fmt(self.host, self.port)

    @property
    def wildcard(self) -> bool:
        return self.host == WILDCARDS.get(self.family)


def _fmt(host: str | None, port: int) -> str:
    if host is None:
        return str(port)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _from_msg(m: DiagMsg) -> ListenSocket:
    v6only = None
    if m.family == socket.AF_INET6 and INET_DIAG_SKV6ONLY in m.attrs:
        v6only = bool(m.attrs[INET_DIAG_SKV6ONLY][0])
    return ListenSocket(m.inode, m.family, m.src, m.sport, m.cookie, m.rqueue, m.wqueue,
                        v6only, m.ifindex)


def listening(ports: Iterable[int], families: Iterable[int] = FAMILIES) -> list[ListenSocket]:
    """All TCP sockets in LISTEN whose local port is in `ports`, AF_INET and
    AF_INET6: one sock_diag dump for both (census.dump_requests), filtered
    in the kernel by port (census.port_match). [] for no ports (an empty
    filter would mean every port). Raises OSError if netlink fails."""
    ports = set(ports)
    if not ports:
        return []
    return [_from_msg(m) for m in diag_dump(families, 1 << TCP_LISTEN, ports)]


# A connection in an accept queue is a full socket with no file yet
# (sk_socket NULL: sock_i_ino 0), ESTABLISHED, or CLOSE_WAIT once its client
# gave up; accept(2) gives it an inode, close(2) takes it out of both states.
UNACCEPTED_STATES = 1 << TCP_ESTABLISHED | 1 << TCP_CLOSE_WAIT


def unaccepted(ports: Iterable[int], families: Iterable[int] = FAMILIES) -> frozenset[int]:
    """The cookies (idiag_cookie) of the TCP connections on `ports` that no
    process has accepted: the accept queues' content, which idiag_rqueue
    only counts. One sock_diag dump filtered by port in the kernel, by
    inode 0 at its fixed offset here. accept(2) takes a queue's oldest
    connection (inet_csk_accept), so a queue none of whose connections
    left between two looks took nothing meanwhile (bake.AcceptQueue).
    Raises OSError if netlink fails."""
    ports = set(ports)
    if not ports:
        return frozenset()
    return frozenset(msg_cookie(buf, off) for buf, off, _ in
                     diag_raw(families, UNACCEPTED_STATES, ports, inodes={0}))


@dataclass(frozen=True)
class Waiting:
    """What waits in the accept queues of some listeners: `queued`
    connections (idiag_rqueue, UNIX_DIAG_RQLEN) and, when known, which
    (`ids`: TCP socket cookies, the client sockets' inodes for unix:
    listeners, UNIX_DIAG_ICONS); ids None: not known."""

    queued: int
    ids: frozenset[int] | None = None


def held_by(pids: Iterable[int], sockets: Iterable[ListenSocket]) -> dict[int, set[int]]:
    """inode -> the pids among `pids` holding that socket in their fd table
    (/proc/PID/fd, proc(5)); sockets none of them holds are absent. Several
    processes hold one inode when it was inherited (fork, LISTEN_FDS)."""
    wanted = {s.inode for s in sockets}
    out: dict[int, set[int]] = {}
    if not wanted:
        return out
    for pid in set(pids):
        for ino in fd_inodes(pid).values():
            if ino in wanted:
                out.setdefault(ino, set()).add(pid)
    return out


def _parse(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(host.strip("[]"))


def covers(sock: ListenSocket, host: str | None, port: int) -> bool:
    """Whether a connection to the configured address `host`:`port` can reach
    `sock` (host None: any address).

    - same port, and the same address, or `sock` bound to its family's
      wildcard (0.0.0.0 for IPv4 addresses, :: for IPv6 ones);
    - an AF_INET6 socket on :: that is not IPV6_V6ONLY also takes IPv4
      (ipv6(7)); if the kernel did not say (no INET_DIAG_SKV6ONLY), :: is
      taken to cover IPv4 too (the Linux default, net.ipv6.bindv6only=0);
    - an AF_INET6 socket bound to ::ffff:a.b.c.d takes IPv4 a.b.c.d;
    - host None is covered only by a wildcard socket, of either family (a
      program that binds 0.0.0.0 for "all addresses" is taken at its word:
      it then serves no IPv6 client).
    """
    if sock.port != port:
        return False
    if host is None:
        return sock.wildcard
    want = _parse(host)
    if isinstance(want, ipaddress.IPv6Address) and want.ipv4_mapped:
        want = want.ipv4_mapped
    have = _parse(sock.host)
    if isinstance(have, ipaddress.IPv6Address) and have.ipv4_mapped:
        have = have.ipv4_mapped  # an AF_INET6 socket bound to a v4-mapped address
    if have == want:
        return True
    if not sock.wildcard:
        return False
    if want.version == 4:
        return sock.family == socket.AF_INET or not sock.v6only
    return sock.family == socket.AF_INET6


def _overlaps(sock: ListenSocket, host: str | None, port: int) -> bool:
    """`sock` could take some connections meant for `host`:`port`: same port,
    and either side a wildcard, or the same address."""
    if sock.port != port:
        return False
    if host is None or sock.wildcard or _parse(host).is_unspecified:
        return True
    return covers(sock, host, port)


def missing(listen: Sequence[tuple[str | None, int]], pids: Iterable[int],
            sockets: Sequence[ListenSocket] | None = None) -> list[str]:
    """The configured listen addresses for which none of `pids` holds a
    LISTEN socket covering it (see `covers`), in config order, spelled like
    config.Listen ("127.0.0.1:8080", "[::1]:8080", "8080"). [] means every
    address is served by these processes: the evidence that admits a
    reuseport instance. `sockets` may pass a `listening` result to reuse."""
    entries = list(listen)
    if sockets is None:
        sockets = listening({port for _, port in entries})
    pids = set(pids)
    by_inode = {s.inode: s for s in sockets}

    def uncovered(mine: Iterable[ListenSocket]) -> list[str]:
        mine = list(mine)
        return [_fmt(host, port) for host, port in entries
                if not any(covers(s, host, port) for s in mine)]

    # The descriptors where these processes held our listeners last time,
    # read again (one readlink each): a baking or draining instance holds
    # thousands of connections, and a whole walk costs about 6 us a
    # descriptor. Only a full walk may say an address is missing.
    if not uncovered(by_inode[i] for i in _recheck(pids, by_inode)):
        return []
    found: dict[int, dict[int, str]] = {}
    for pid in pids:
        found[pid] = {ino: fd for fd, ino in fd_inodes(pid).items() if ino in by_inode}
    _remember(found)
    return uncovered(by_inode[i] for fds in found.values() for i in fds)


# pid -> {inode: fd} where `missing` last found our listeners; bounded
_LISTENER_FDS: dict[int, dict[int, str]] = {}
_LISTENER_FDS_MAX = 256


def _remember(found: dict[int, dict[int, str]]) -> None:
    for pid, fds in found.items():
        _LISTENER_FDS.pop(pid, None)
        if fds:
            _LISTENER_FDS[pid] = fds
    while len(_LISTENER_FDS) > _LISTENER_FDS_MAX:  # the oldest first (insertion order)
        del _LISTENER_FDS[next(iter(_LISTENER_FDS))]


def _recheck(pids: set[int], wanted: dict[int, ListenSocket]) -> set[int]:
    """The inodes in `wanted` that `pids` still hold at the descriptors
    where they were last found."""
    held: set[int] = set()
    for pid in pids:
        for ino, fd in _LISTENER_FDS.get(pid, {}).items():
            if ino in wanted and ino not in held:
                try:
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{ino}]":
                        held.add(ino)
                except OSError:
                    pass
    return held


def missing_unix(paths: Sequence[str], pids: Iterable[int],
                 sockets: Sequence[unixdiag.UnixSocket] | None = None) -> list[str]:
    """The unix: listen entries ("unix:/run/api/api.sock") for which none of
    `pids` holds a LISTEN socket bound to that path (unix_diag), in order."""
    if sockets is None:
        sockets = unixdiag.listening(paths)
    held: set[int] = set()
    wanted = {s.inode for s in sockets}
    for pid in set(pids):
        held.update(ino for ino in fd_inodes(pid).values() if ino in wanted)
    covered = {s.name for s in sockets if s.inode in held}
    return [f"unix:{p}" for p in paths if p not in covered]


def strays_unix(paths: Sequence[str], known_pids: set[int]) -> list[dict]:
    """`strays` for unix: listeners: LISTEN sockets bound to one of `paths`
    held by a process that is neither known nor PID 1 (which holds the
    socket unit's). Another listener on the path can only be one that
    unlinked the socket unit's file and bound its own: from then on every
    new connection goes to it."""
    socks = unixdiag.listening(paths)
    if not socks:
        return []
    wanted = {s.inode: s for s in socks}
    holders: dict[int, set[int]] = {}
    for pid in _all_pids():
        for ino in fd_inodes(pid).values():
            if ino in wanted:
                holders.setdefault(ino, set()).add(pid)
    out: list[dict] = []
    for s in socks:
        pids = holders.get(s.inode, set())
        for pid in sorted(pids - known_pids - {1}) if pids else [0]:
            out.append({"address": f"unix:{s.name}", "pid": pid,
                        "comm": _comm(pid) if pid else "", "inode": s.inode,
                        "queued": s.queued})
    return out


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def _all_pids() -> list[int]:
    return [int(n) for n in os.listdir("/proc") if n.isdigit()]


def strays(listen: Sequence[tuple[str | None, int]], known_pids: set[int]) -> list[dict]:
    """LISTEN sockets that could take the service's connections (same port,
    and an address overlapping a configured one) held by processes that are
    neither in `known_pids` nor PID 1 (systemd holds socket units'
    listeners): a forgotten process sharing the port through SO_REUSEPORT
    takes its share of new connections. One entry per (socket, stray
    process): {"address": "127.0.0.1:8080", "pid": 1234, "comm": "python3",
    "inode": 56789, "queued": 0}. A socket nobody could be found holding
    (a holder in a /proc we cannot read, or the kernel's own) is reported
    with pid 0 and comm "". Walks every process's fd table: for a check,
    not for a loop (about 6 us per descriptor on the host)."""
    entries = list(listen)
    socks = [s for s in listening({port for _, port in entries})
             if any(_overlaps(s, host, port) for host, port in entries)]
    if not socks:
        return []
    holders = held_by(_all_pids(), socks)
    out: list[dict] = []
    for s in socks:
        pids = holders.get(s.inode, set())
        others = sorted(pids - known_pids - {1})
        if not pids:
            others = [0]
        for pid in others:
            out.append({"address": s.address, "pid": pid, "comm": _comm(pid) if pid else "",
                        "inode": s.inode, "queued": s.queued})
    return out


def destroy(sockets: Iterable[ListenSocket]) -> int:
    """Close each listener from the kernel side (SOCK_DESTROY, sock_diag(7)):
    tcp_abort (net/ipv4/tcp.c) moves it to TCP_CLOSE and runs
    inet_csk_listen_stop, as if its last fd had been closed: the kernel stops
    hashing new connections to it, and with net.ipv4.tcp_migrate_req=1 the
    connections queued on it move to another listener of its SO_REUSEPORT
    group instead of being reset. The holder's fd stays open; accept(2) on it
    then fails with EINVAL.

    Why: a draining program may stop accepting yet keep its reuseport
    listener open (Envoy #8031, hypercorn PR #128); the kernel keeps sending
    it its share of new connections, which wait until they time out.

    The kernel finds the socket by address and then checks the cookie
    (inet_diag_find_one_icsk). For an SO_REUSEPORT listener that lookup
    picks one socket of the group by a hash of the remote address and port
    the request names (reuseport_select_sock without an skb), so the request
    is repeated with other remote ports (at most 64 + 32 per group member)
    until the hash lands on this socket. Measured on 6.18: 1 to 12 tries in
    a group of 8.

    Returns how many were destroyed. A socket already gone (ENOENT, and no
    longer listed) counts as not destroyed, without error. Raises OSError
    with the kernel's errno when it refuses: EOPNOTSUPP (kernel without
    CONFIG_INET_DIAG_DESTROY), EPERM (no CAP_NET_ADMIN)."""
    socks = list(sockets)
    if not socks:
        return 0
    destroyed = 0
    seq = 0
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as nl:
        for s in socks:
            group = None
            tries = 0
            limit = 1
            while tries < limit:
                seq += 1
                # the remote port varies the reuseport hash; remote address
                # 0.0.0.0/:: never matches an established socket first
                sid = sockid(s.family, s.host, s.port, None, tries, s.ifindex, s.cookie)
                err = exact_request(nl, SOCK_DESTROY, s.family, sid, seq)
                tries += 1
                if err == 0:
                    destroyed += 1
                    break
                if err == errno.EOPNOTSUPP:
                    raise OSError(err, "SOCK_DESTROY not supported: kernel built without "
                                       "CONFIG_INET_DIAG_DESTROY")
                if err == errno.EPERM:
                    raise OSError(err, "SOCK_DESTROY refused: needs CAP_NET_ADMIN")
                if err != errno.ENOENT:
                    raise OSError(err, f"SOCK_DESTROY {s.address}: {os.strerror(err)}")
                if group is None:  # still there? then it is a reuseport group: try others
                    group = [o for o in listening([s.port], [s.family])
                             if o.host == s.host]
                    if not any(o.cookie == s.cookie for o in group):
                        break  # gone already
                    limit = 64 + 32 * len(group)
    return destroyed
