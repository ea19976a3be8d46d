"""Connection census: how many ESTABLISHED TCP connections on a service's
ports a set of processes holds, through NETLINK_SOCK_DIAG (sock_diag(7)).

Sockets are attributed to processes by socket inode (the inode in each
inet_diag_msg, matched against the targets of /proc/PID/fd/*): accepted
sockets carry the cgroup of the listener, which for a socket unit is PID 1's,
so cgroup ids cannot tell two instances apart (SANDBOX.md).

The census runs at every poll of a drain, so it is written for speed: the
kernel filters by local port (an inet_diag bytecode program), and only the
two fields needed (local port, inode) are decoded from each message, at fixed
offsets. pyroute2's generic parser needs over a second for 10k sockets.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
NLMSG_ERROR = 2
NLMSG_DONE = 3
INET_DIAG_REQ_BYTECODE = 1
INET_DIAG_BC_JMP = 1
INET_DIAG_BC_S_EQ = 11  # linux/inet_diag.h: source (local) port equals
TCP_ESTABLISHED = 1
TCP_LISTEN = 10

_NLMSGHDR = struct.Struct("=IHHII")
# struct inet_diag_req_v2: family, protocol, ext, pad, states, inet_diag_sockid
_REQ = struct.Struct("=BBBxI48s")
_OP = struct.Struct("=BBH")
_NLATTR = struct.Struct("=HH")
# In struct inet_diag_msg after the 16-byte nlmsghdr: id.idiag_sport at +4
# (network order), idiag_inode at +68.
_SPORT = struct.Struct("!H")
_INODE = struct.Struct("=I")
_MSG_MIN = 16 + 72


def port_filter(ports: Iterable[int]) -> bytes:
    """inet_diag bytecode accepting sockets whose local port is in `ports`.

    An op is {code, yes, no}: the run jumps `yes` bytes on a match and `no`
    bytes otherwise; landing exactly on the end accepts, 4 bytes past it
    rejects. The kernel's audit (net/ipv4/inet_diag.c: inet_diag_bc_audit,
    valid_cc) only accepts `no` targets on the chain of `yes` jumps, so an OR
    is laid out as ss(8) does it: each port test is followed by a JMP whose
    `no` (a JMP always takes `no`) leads to the end:

        S_EQ(yes=8, no=12) PORT JMP(yes=4, no=->end) S_EQ ... PORT
    """
    ports = sorted(set(ports))
    length = 12 * len(ports) - 4
    out = b""
    for i, port in enumerate(ports):
        out += _OP.pack(INET_DIAG_BC_S_EQ, 8, 12) + _OP.pack(0, 0, port)
        if i < len(ports) - 1:
            out += _OP.pack(INET_DIAG_BC_JMP, 4, length - (12 * i + 8))
    return out


def _request(family: int, bytecode: bytes, seq: int, states: int) -> bytes:
    req = _REQ.pack(family, socket.IPPROTO_TCP, 0, states, b"\0" * 48)
    attr = _NLATTR.pack(4 + len(bytecode), INET_DIAG_REQ_BYTECODE) + bytecode if bytecode else b""
    body = req + attr
    return _NLMSGHDR.pack(16 + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP,
                          seq, 0) + body


@dataclass
class _Holding:
    """What a group of processes held at its last fd walk."""

    inodes: set[int]  # established connections on our ports
    listener_fds: list[tuple[int, str]]  # (pid, fd) that held one of our listeners


class Census:
    """Counts the established connections on `ports` held by given processes.

    Walking /proc/PID/fd costs about 6 us per descriptor (readlink), more than
    the netlink dump itself, so a group's walk is kept and reused while none
    of its processes holds one of our listening sockets: a process without the
    listener cannot gain connections on our ports (short of SCM_RIGHTS), so
    its count can only fall, and the fresh dump tells which of its sockets
    are still established. A draining instance closes its listener first
    thing, so every poll of a drain after the first is one dump and a set
    intersection. A group that still listens is walked again at each count.
    """

    def __init__(self, ports: Iterable[int], families: Iterable[int] = (socket.AF_INET,
                                                                          socket.AF_INET6)) -> None:
        self.ports = frozenset(ports)
        self.families = tuple(families)
        self._bytecode = port_filter(self.ports) if self.ports else b""
        self._seq = 0
        self._held: dict[frozenset[int], _Holding] = {}

    @classmethod
    def for_listen(cls, listen: Iterable[tuple[str | None, int]],
                   own_sockets: bool = False) -> Census:
        """The socket unit's IPv4 listeners accept AF_INET sockets; IPv6 and
        any-address ones (systemd binds [::] dual-stack) AF_INET6 sockets
        only. A program that binds its own listener (socket: reuseport) may
        use either for an IPv4 address: gRPC, Java, Go and Node bind
        AF_INET6 and see IPv4 peers as ::ffff:a.b.c.d; both are counted."""
        entries = list(listen)
        fams = {socket.AF_INET if host and ":" not in host else socket.AF_INET6
                for host, _ in entries}
        if own_sockets:
            fams = {socket.AF_INET, socket.AF_INET6}
        return cls({port for _, port in entries}, sorted(fams))

    def _dump(self, states: int) -> set[int]:
        inodes: set[int] = set()
        with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as s:
            for family in self.families:
                self._seq += 1
                s.send(_request(family, self._bytecode, self._seq, states))
                self._collect(s, inodes)
        return inodes

    def established_inodes(self) -> set[int]:
        """Inodes of ESTABLISHED TCP sockets whose local port is ours."""
        return self._dump(1 << TCP_ESTABLISHED)

    def listener_inodes(self) -> set[int]:
        return self._dump(1 << TCP_LISTEN)

    def _collect(self, s: socket.socket, inodes: set[int]) -> None:
        while True:
            buf = s.recv(1 << 20)
            if len(buf) < 16:
                raise OSError("sock_diag: short read")
            if not self._fast(buf, inodes) and self._slow(buf, inodes):
                return

    @staticmethod
    def _fast(buf: bytes, inodes: set[int]) -> bool:
        """A buffer of equal-sized diag messages (the usual case), decoded with
        strided memoryview slices, in C: idiag_inode is the 22nd u32 of each
        message. The kernel's bytecode already kept only our ports."""
        length, mtype = _NLMSGHDR.unpack_from(buf, 0)[:2]
        if mtype != SOCK_DIAG_BY_FAMILY or length < _MSG_MIN or length % 4 \
                or len(buf) % length:
            return False
        words = memoryview(buf).cast("I")
        halves = memoryview(buf).cast("H")
        step = length // 4
        if set(words[0::step]) != {length} or set(halves[2::2 * step]) != {mtype}:
            return False
        inodes.update(words[21::step])
        inodes.discard(0)  # 0: still in the accept queue, owned by no process
        return True

    def _slow(self, buf: bytes, inodes: set[int]) -> bool:
        """Walk one buffer message by message; True at NLMSG_DONE."""
        off, end = 0, len(buf)
        while off + 16 <= end:
            length, mtype = _NLMSGHDR.unpack_from(buf, off)[:2]
            if mtype == NLMSG_DONE:
                return True
            if mtype == NLMSG_ERROR:
                (err,) = struct.unpack_from("=i", buf, off + 16)
                raise OSError(-err, f"sock_diag: {os.strerror(-err)}")
            if length < 16:
                raise OSError("sock_diag: malformed message")
            if mtype == SOCK_DIAG_BY_FAMILY and length >= _MSG_MIN \
                    and _SPORT.unpack_from(buf, off + 20)[0] in self.ports:
                ino = _INODE.unpack_from(buf, off + 84)[0]
                if ino:  # 0: still in the accept queue, owned by no process
                    inodes.add(ino)
            off += (length + 3) & ~3
        return False

    def peers(self, inodes: set[int]) -> dict[int, str]:
        """inode -> "peer-ip:port" for some established sockets (a full decode:
        for listing the few long-lived connections left in a drain)."""
        out: dict[int, str] = {}
        with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as s:
            for family in self.families:
                self._seq += 1
                s.send(_request(family, self._bytecode, self._seq, 1 << TCP_ESTABLISHED))
                done = False
                while not done:
                    buf = s.recv(1 << 20)
                    off = 0
                    while off + 16 <= len(buf):
                        length, mtype = _NLMSGHDR.unpack_from(buf, off)[:2]
                        if mtype in (NLMSG_DONE, NLMSG_ERROR) or length < 16:
                            done = True
                            break
                        ino = _INODE.unpack_from(buf, off + 84)[0]
                        if ino in inodes:
                            fam = buf[off + 16]
                            dport = _SPORT.unpack_from(buf, off + 22)[0]
                            raw = buf[off + 40:off + 40 + (4 if fam == socket.AF_INET else 16)]
                            ip = socket.inet_ntop(fam, raw)
                            out[ino] = f"[{ip}]:{dport}" if fam == socket.AF_INET6 \
                                else f"{ip}:{dport}"
                        off += (length + 3) & ~3
        return out

    def held_peers(self, pids: Iterable[int]) -> list[str]:
        """Peers of the connections `pids` hold (after a count of that group)."""
        held = self._held.get(frozenset(pids))
        if held is None or not held.inodes:
            return []
        return sorted(self.peers(held.inodes).values())

    @staticmethod
    def _fd_inodes(pid: int) -> dict[str, int]:
        """fd -> socket inode for one process (threads share the table)."""
        base = f"/proc/{pid}/fd/"
        try:
            names = os.listdir(base)
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            return {}
        found: dict[str, int] = {}
        readlink = os.readlink
        for fd in names:
            try:
                target = readlink(base + fd)
            except OSError:
                continue  # closed since listdir
            if target.startswith("socket:["):
                found[fd] = int(target[8:-1])
        return found

    def _walk(self, pids: frozenset[int]) -> _Holding:
        listeners = self.listener_inodes()
        inodes: set[int] = set()
        listener_fds: list[tuple[int, str]] = []
        for pid in pids:
            for fd, ino in self._fd_inodes(pid).items():
                inodes.add(ino)
                if ino in listeners:
                    listener_fds.append((pid, fd))
        return _Holding(inodes, listener_fds)

    @staticmethod
    def _still_listens(held: _Holding) -> bool:
        for pid, fd in held.listener_fds:
            try:
                os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue  # closed: the usual first step of a drain
            return True  # the fd number may have been reused: walk again to be sure
        return False

    def count(self, pids: Iterable[int]) -> int:
        """Established connections on our ports held by `pids`."""
        return self.count_many({"": list(pids)})[""]

    def count_many(self, groups: Mapping[str, Iterable[int]]) -> dict[str, int]:
        """One netlink dump, counted per group of processes (e.g. per instance)."""
        established = self.established_inodes()
        counts: dict[str, int] = {}
        live: dict[frozenset[int], _Holding] = {}
        for name, pids in groups.items():
            key = frozenset(pids)
            if not key:
                counts[name] = 0
                continue
            held = self._held.get(key)
            if held is None or self._still_listens(held):
                held = self._walk(key)
            held.inodes &= established
            live[key] = held
            counts[name] = len(held.inodes)
        self._held = live  # forget groups that are gone
        return counts
