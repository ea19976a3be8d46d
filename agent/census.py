"""Connection census: how many ESTABLISHED TCP connections on a service's
ports (and accepted connections of its unix: listeners, unixdiag.py) a set
of processes holds, through NETLINK_SOCK_DIAG (sock_diag(7)).

Sockets are attributed to processes by socket inode (the inode in each
inet_diag_msg, matched against the targets of /proc/PID/fd/*): accepted
sockets carry the cgroup of the listener, which for a socket unit is PID 1's,
so cgroup ids cannot tell two instances apart (SANDBOX.md).

The census runs at every poll of a drain, so it is written for speed: the
kernel filters by local port (the request's idiag_sport for one port, an
inet_diag bytecode program for several: port_match), and only the
two fields needed (local port, inode) are decoded from each message, at fixed
offsets. pyroute2's generic parser needs over a second for 10k sockets.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from . import unixdiag
from .netlink import NLMSG_DONE, NLMSG_ERROR, messages, receive
from .netlink import NLMSGHDR as _NLMSGHDR

NETLINK_SOCK_DIAG = 4
TCPDIAG_GETSOCK = 18  # linux/inet_diag.h: the request from before sock_diag
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_DUMP = 0x300
INET_DIAG_REQ_BYTECODE = 1
INET_DIAG_BC_JMP = 1
INET_DIAG_BC_S_EQ = 11  # linux/inet_diag.h: source (local) port equals
TCP_ESTABLISHED = 1
TCP_CLOSE_WAIT = 8
TCP_LISTEN = 10
TCP_NEW_SYN_RECV = 12  # a request socket: a handshake in progress on a listener
TCP_BOUND_INACTIVE = 13  # a pseudo-state: bound, not listening nor connected (6.8+)

# struct inet_diag_req_v2: family, protocol, ext, pad, states, inet_diag_sockid
_REQ = struct.Struct("=BBBxI48s")
# struct inet_diag_req (TCPDIAG_GETSOCK): family, src_len, dst_len, ext,
# inet_diag_sockid, states, dbs
_REQ_V1 = struct.Struct("=BBBB48sII")
_OP = struct.Struct("=BBH")
_NLATTR = struct.Struct("=HH")
# In struct inet_diag_msg after the 16-byte nlmsghdr: id.idiag_sport at +4
# (network order), idiag_inode at +68.
_SPORT = struct.Struct("!H")
_INODE = struct.Struct("=I")
_COOKIE = struct.Struct("=II")  # idiag_cookie at +44 of the message, low word first
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


def port_match(ports: Iterable[int], states: int) -> tuple[bytes, int]:
    """How a dump of sockets in `states` keeps only those on `ports`:
    (bytecode, sport) for _request. One port goes in the request's own
    inet_diag_sockid: the kernel compares idiag_sport with each socket's
    port in its walks of the listening and established tables before it
    runs any bytecode (net/ipv4/tcp_diag.c, tcp_diag_dump; on older kernels
    inet_diag.c, inet_diag_dump_icsk), which spares the bytecode interpreter
    on every other socket of the host (1-1.5 ms a dump at 40,000 sockets).
    Several ports need the bytecode, and so does the walk of bound-only
    sockets (TCP_BOUND_INACTIVE), which does not look at idiag_sport. No
    ports: all of them (0 in idiag_sport means any)."""
    ports = frozenset(ports)
    if len(ports) == 1 and 0 not in ports and not states & (1 << TCP_BOUND_INACTIVE):
        return b"", next(iter(ports))
    return (port_filter(ports) if ports else b""), 0


def _request(family: int, bytecode: bytes, seq: int, states: int, ext: int = 0,
             sport: int = 0) -> bytes:
    """A SOCK_DIAG_BY_FAMILY dump request (struct inet_diag_req_v2, with the
    bytecode as its INET_DIAG_REQ_BYTECODE attribute, and `sport`, if not
    0, as id.idiag_sport: only sockets on that local port). `ext` asks for
    extra attributes: bit (INET_DIAG_x - 1), e.g. 1 << (INET_DIAG_INFO - 1)
    for struct tcp_info."""
    req = _REQ.pack(family, socket.IPPROTO_TCP, ext, states,
                    struct.pack("!H", sport) + b"\0" * 46)
    attr = _NLATTR.pack(4 + len(bytecode), INET_DIAG_REQ_BYTECODE) + bytecode if bytecode else b""
    body = req + attr
    return _NLMSGHDR.pack(16 + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP,
                          seq, 0) + body


def fd_inodes(pid: int, known: Mapping[str, int] | None = None,
              stale: set[int] | frozenset[int] = frozenset()) -> dict[str, int]:
    """fd -> socket inode for one process (threads share the table); {} for a
    process that is gone or not ours to read. Each link is read relative to
    the open fd directory (readlinkat): the kernel then looks up one name,
    not /proc, the pid and fd again for every descriptor (12% of a walk).

    `known` (fd -> inode, from an earlier walk) spares the readlink of a
    descriptor still listed whose socket is not in `stale`: the caller has
    just seen that socket alive (an established connection in a dump), and
    a descriptor number is reused only after its close, which a socket
    still established and held by this one descriptor has not had. (A
    program that dup2()s another socket over it, or hands it on and closes
    it, keeps it alive elsewhere: the census may then credit this process
    with it until the caller marks it stale.)"""
    try:
        fd_dir = os.open(f"/proc/{pid}/fd", os.O_RDONLY | os.O_DIRECTORY)
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return {}
    found: dict[str, int] = {}
    readlink = os.readlink
    try:
        try:
            names = os.listdir(fd_dir)
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            return {}
        for fd in names:
            if known is not None:
                ino = known.get(fd)
                if ino is not None and ino not in stale:
                    found[fd] = ino
                    continue
            try:
                target = readlink(fd, dir_fd=fd_dir)
            except OSError:
                continue  # closed since listdir
            if target.startswith("socket:["):
                found[fd] = int(target[8:-1])
    finally:
        os.close(fd_dir)
    return found


@dataclass(frozen=True)
class DiagMsg:
    """One struct inet_diag_msg fully decoded (include/uapi/linux/inet_diag.h),
    with its attributes (INET_DIAG_*: raw payloads, by type). `sockid` is the
    raw 48-byte struct inet_diag_sockid, for an exact request about this
    socket (SOCK_DESTROY, or SOCK_DIAG_BY_FAMILY without NLM_F_DUMP)."""

    family: int
    state: int
    sport: int
    dport: int
    src: str  # local address text
    dst: str  # peer address text ("0.0.0.0" / "::" for a listener)
    ifindex: int
    cookie: int  # idiag_cookie as one u64, as SO_COOKIE reports it
    rqueue: int
    wqueue: int
    inode: int
    sockid: bytes
    attrs: dict[int, bytes]

    @classmethod
    def decode(cls, buf: bytes, off: int, length: int) -> DiagMsg:
        """The message whose nlmsghdr starts at `off` (length from the header)."""
        body = off + 16
        fam, state = buf[body], buf[body + 1]
        sport, dport = struct.unpack_from("!HH", buf, body + 4)
        width = 4 if fam == socket.AF_INET else 16
        src = socket.inet_ntop(fam, bytes(buf[body + 8:body + 8 + width]))
        dst = socket.inet_ntop(fam, bytes(buf[body + 24:body + 24 + width]))
        ifindex, lo, hi = struct.unpack_from("=III", buf, body + 40)
        cookie = lo | hi << 32  # idiag_cookie[2]: low word first (sock_diag_save_cookie)
        rqueue, wqueue, _uid, inode = struct.unpack_from("=IIII", buf, body + 56)
        attrs: dict[int, bytes] = {}
        a, end = body + 72, off + length
        while a + 4 <= end:
            alen, atype = _NLATTR.unpack_from(buf, a)
            if alen < 4:
                break
            attrs[atype & 0x3FFF] = bytes(buf[a + 4:a + alen])
            a += (alen + 3) & ~3
        return cls(fam, state, sport, dport, src, dst, ifindex, cookie, rqueue, wqueue, inode,
                   bytes(buf[body + 4:body + 52]), attrs)


def sockid(family: int, src: str, sport: int, dst: str | None = None, dport: int = 0,
           ifindex: int = 0, cookie: int | None = None) -> bytes:
    """struct inet_diag_sockid for an exact request: ports in network order,
    addresses in 16-byte fields (an IPv4 address in the first 4), cookie as
    two u32, low word first; cookie None is INET_DIAG_NOCOOKIE (any)."""
    def addr(text: str | None) -> bytes:
        raw = socket.inet_pton(family, text) if text else b""
        return raw.ljust(16, b"\0")
    lo, hi = (0xFFFFFFFF, 0xFFFFFFFF) if cookie is None else (cookie & 0xFFFFFFFF, cookie >> 32)
    return struct.pack("!HH", sport, dport) + addr(src) + addr(dst) + struct.pack(
        "=III", ifindex, lo, hi)


def msg_cookie(buf: bytes, off: int) -> int:
    """idiag_cookie of the message whose nlmsghdr starts at `off`."""
    lo, hi = _COOKIE.unpack_from(buf, off + 60)
    return lo | hi << 32


def _request_both(bytecode: bytes, seq: int, states: int, ext: int = 0, sport: int = 0) -> bytes:
    """A TCPDIAG_GETSOCK dump request (struct inet_diag_req, from before
    sock_diag): the kernel dumps it as AF_UNSPEC (net/ipv4/inet_diag.c,
    inet_diag_dump_compat), AF_INET and AF_INET6 sockets in one walk of its
    tables. Its replies carry its type."""
    req = _REQ_V1.pack(0, 0, 0, ext, struct.pack("!H", sport) + b"\0" * 46, states, 0)
    attr = _NLATTR.pack(4 + len(bytecode), INET_DIAG_REQ_BYTECODE) + bytecode if bytecode else b""
    body = req + attr
    return _NLMSGHDR.pack(16 + len(body), TCPDIAG_GETSOCK, NLM_F_REQUEST | NLM_F_DUMP,
                          seq, 0) + body


@dataclass
class _Support:
    """What the running kernel was found to refuse, for the rest of the process."""

    both_in_one: bool = True  # one TCPDIAG_GETSOCK dump for AF_INET and AF_INET6


KERNEL = _Support()


def dump_requests(families: Iterable[int], states: int, ports: Iterable[int] = (),
                  ext: int = 0, seq: int = 1) -> list[tuple[bytes, int]]:
    """The requests of a dump of the TCP sockets of `families` in `states` on
    `ports` (port_match), each with its replies' message type: one request
    for both families where the kernel takes it (_request_both), else one
    SOCK_DIAG_BY_FAMILY request per family. Every dump walks the kernel's
    whole established table, whatever it keeps (2 ms empty and 0.25 us a
    socket here), so a dump per family cost a walk per family."""
    bytecode, sport = port_match(ports, states)
    families = tuple(families)
    if KERNEL.both_in_one and set(families) == {socket.AF_INET, socket.AF_INET6}:
        return [(_request_both(bytecode, seq, states, ext, sport), TCPDIAG_GETSOCK)]
    return [(_request(family, bytecode, seq + i, states, ext, sport), SOCK_DIAG_BY_FAMILY)
            for i, family in enumerate(families)]


def refused(buf: bytes, reply: int) -> bool:
    """Whether `buf`, the first reply to a request of `reply`'s type, is the
    kernel refusing TCPDIAG_GETSOCK: EOPNOTSUPP (net/core/sock_diag.c,
    sock_diag_rcv_msg, without inet_diag's compat handler) or EINVAL (a type
    it does not know). Every dump then asks per family (KERNEL)."""
    if reply != TCPDIAG_GETSOCK or len(buf) < 20 or _NLMSGHDR.unpack_from(buf, 0)[1] != NLMSG_ERROR:
        return False
    if -struct.unpack_from("=i", buf, 16)[0] not in (errno.EOPNOTSUPP, errno.EINVAL):
        return False
    KERNEL.both_in_one = False
    return True


def diag_raw(families: Iterable[int], states: int, ports: Iterable[int] = (), ext: int = 0,
             inodes: set[int] | None = None, cookies: set[int] | None = None,
             nl: socket.socket | None = None) -> Iterator[tuple[bytes, int, int]]:
    """The messages of a sock_diag dump (sock_diag(7)), undecoded:
    (buffer, offset of the nlmsghdr, length) for each TCP socket of
    `families` in the `states` bitmask (1 << TCP_x) whose local port is in
    `ports` (all ports if empty), optionally only those whose inode is in
    `inodes` or whose cookie is in `cookies` (read at their fixed offsets).
    One dump for both families, or one per family (dump_requests), on `nl`
    or a socket of its own. Raises OSError with the kernel's errno on
    NLMSG_ERROR (a shared `nl` may then hold the rest of that dump: discard
    it)."""
    own = nl is None
    s = nl or socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG)
    try:
        for request, reply in dump_requests(families, states, ports, ext):
            s.send(request)
            first, done = True, False
            while not done:
                buf = receive(s, "sock_diag dump")
                if first and refused(buf, reply):
                    yield from diag_raw(families, states, ports, ext, inodes, cookies, s)
                    return
                first = False
                for off, length, mtype in messages(buf, "sock_diag dump"):
                    if mtype == NLMSG_DONE:
                        done = True
                    elif mtype == reply and length >= _MSG_MIN and (
                            inodes is None or _INODE.unpack_from(buf, off + 84)[0] in inodes) \
                            and (cookies is None or msg_cookie(buf, off) in cookies):
                        yield buf, off, length
    finally:
        if own:
            s.close()


def diag_dump(families: Iterable[int], states: int, ports: Iterable[int] = (), ext: int = 0,
              inodes: set[int] | None = None, cookies: set[int] | None = None,
              nl: socket.socket | None = None) -> list[DiagMsg]:
    """`diag_raw`, each message fully decoded (DiagMsg)."""
    return [DiagMsg.decode(buf, off, length)
            for buf, off, length in diag_raw(families, states, ports, ext, inodes, cookies, nl)]


def exact_request(nl: socket.socket, mtype: int, family: int, sid: bytes, seq: int,
                  reply: list[bytes] | None = None) -> int:
    """One exact (non-dump) request about one socket, with NLM_F_ACK:
    SOCK_DIAG_BY_FAMILY (is it there?) or SOCK_DESTROY (sock_diag(7)). The
    kernel finds it by the 4-tuple in `sid` (see `sockid`) and checks the
    cookie (net/ipv4/inet_diag.c: inet_diag_find_one_icsk); a timewait
    socket is found too (it keeps the cookie). Returns the kernel's errno:
    0 done/found, ENOENT no such socket. The reply of a SOCK_DIAG_BY_FAMILY
    (sent before the ack) is appended to `reply` if given, as the raw
    message from its nlmsghdr on (DiagMsg.decode(raw, 0, len(raw)))."""
    body = _REQ.pack(family, socket.IPPROTO_TCP, 0, 0xFFFFFFFF, sid)
    nl.send(_NLMSGHDR.pack(16 + len(body), mtype, NLM_F_REQUEST | NLM_F_ACK, seq, 0) + body)
    while True:
        buf = nl.recv(65536)
        off = 0
        while off + 16 <= len(buf):
            length, rtype, _flags, rseq = _NLMSGHDR.unpack_from(buf, off)[:4]
            if rtype == NLMSG_ERROR and rseq == seq:
                return -struct.unpack_from("=i", buf, off + 16)[0]
            if length < 16:
                raise OSError("sock_diag: malformed reply")
            if rtype == SOCK_DIAG_BY_FAMILY and rseq == seq and reply is not None \
                    and length >= _MSG_MIN:
                reply.append(bytes(buf[off:off + length]))
            off += (length + 3) & ~3


_HEAD = struct.Struct("=II")  # nlmsg_len, then nlmsg_type | nlmsg_flags << 16
_INODE_WORD = 21  # idiag_inode, the 22nd u32 of a message (offset 84)


def inode_column(buf: bytes, mtype: int) -> memoryview | None:
    """The idiag_inode of every message in `buf`, as a strided view of it
    (read in C, no Python per message), when the buffer holds nothing but
    messages of type `mtype` that all have the first one's length and
    flags: the usual buffer of a dump, where the kernel sends the same
    attributes for every socket. Checked, not assumed: each header's first
    8 bytes are compared with the first message's. None for any other
    buffer (NLMSG_DONE or NLMSG_ERROR in it, messages of several lengths):
    walk_inodes reads it message by message."""
    if len(buf) < _MSG_MIN:
        return None
    length, head = _HEAD.unpack_from(buf, 0)
    if head & 0xFFFF != mtype or length < _MSG_MIN or length % 4 or len(buf) % length:
        return None
    words = memoryview(buf).cast("I")
    step = length // 4
    count = len(buf) // length
    if words[0::step].tobytes() != words[0:1].tobytes() * count \
            or words[1::step].tobytes() != words[1:2].tobytes() * count:
        return None
    return words[_INODE_WORD::step]


def walk_inodes(buf: bytes, mtype: int, ports: frozenset[int]) -> tuple[set[int], bool]:
    """The inodes (not 0: still in an accept queue) of the messages of type
    `mtype` in `buf` whose local port is in `ports`, one message at a time,
    and whether the buffer ended the dump (NLMSG_DONE). OSError with the
    kernel's errno on NLMSG_ERROR."""
    found: set[int] = set()
    for off, length, kind in messages(buf, "sock_diag"):
        if kind == NLMSG_DONE:
            return found, True
        if kind == mtype and length >= _MSG_MIN \
                and _SPORT.unpack_from(buf, off + 20)[0] in ports:
            ino = _INODE.unpack_from(buf, off + 84)[0]
            if ino:
                found.add(ino)
    return found, False


def _keep_dumped(sets: list[set[int]], parts: Iterable[Iterable[int]]) -> None:
    """Drop from each of `sets`, in place, the inodes in none of `parts`.
    What went is found by striking each dumped inode off a copy of them all:
    one lookup per dumped inode whatever the number of sets, and no set of
    every dumped inode to build (new int objects inserted into a growing
    table: several times slower at 20,000)."""
    gone: set[int] = set().union(*sets)
    for part in parts:
        gone.difference_update(part)
    if gone:
        for inodes in sets:
            inodes -= gone


@dataclass
class _Holding:
    """What a group of processes held at its last fd walk."""

    inodes: set[int]  # established connections on our ports
    listener_fds: list[tuple[int, str]]  # (pid, fd) that held one of our listeners
    fds: dict[int, dict[str, int]] = field(default_factory=dict)  # pid -> fd -> socket inode


class Census:
    """Counts the established connections on `ports`, and the accepted
    connections of the Unix-socket listeners at `unix_paths`, held by given
    processes (socket inodes are unique across families: one set holds both).

    Walking /proc/PID/fd costs about 6 us per descriptor (readlink), more than
    the netlink dump itself, so a group's walk is kept and reused while none
    of its processes holds one of our listening sockets: a process without the
    listener cannot gain connections on our ports (short of SCM_RIGHTS), so
    its count can only fall, and the fresh dump tells which of its sockets
    are still established. A draining instance closes its listener first
    thing, so every poll of a drain after the first is one dump, read as
    columns of inodes (inode_column), and one lookup per dumped inode
    (_keep_dumped). A group that still listens is walked again at each count.
    """

    def __init__(self, ports: Iterable[int], families: Iterable[int] = (socket.AF_INET,
                                                                          socket.AF_INET6),
                 unix_paths: Iterable[str] = ()) -> None:
        self.ports = frozenset(ports)
        self.families = tuple(families) if self.ports else ()  # no ports: no TCP dump at all
        self.unix_paths = tuple(unix_paths)
        self.unix_inodes: set[int] = set()  # the unix connections of the last dump
        self._seq = 0
        self._held: dict[frozenset[int], _Holding] = {}

    def add_ports(self, ports: Iterable[int]) -> None:
        """Count these ports too (socket: nat: each instance's private port,
        known once it is given)."""
        more = frozenset(ports) - self.ports
        if not more:
            return
        self.ports |= more
        if not self.families:
            self.families = (socket.AF_INET, socket.AF_INET6)
        self._held = {}  # the listeners on our ports changed: walk again

    @classmethod
    def for_listen(cls, listen: Iterable[tuple[str | None, int]],
                   own_sockets: bool = False, unix_paths: Iterable[str] = ()) -> Census:
        """The socket unit's IPv4 listeners accept AF_INET sockets; IPv6 and
        any-address ones (systemd binds [::] dual-stack) AF_INET6 sockets
        only. A program that binds its own listener (socket: reuseport) may
        use either for an IPv4 address: gRPC, Java, Go and Node bind
        AF_INET6 and see IPv4 peers as ::ffff:a.b.c.d; both are counted."""
        entries = list(listen)
        fams = {socket.AF_INET if host and ":" not in host else socket.AF_INET6
                for host, _ in entries}
        if own_sockets and entries:
            fams = {socket.AF_INET, socket.AF_INET6}
        return cls({port for _, port in entries}, sorted(fams), unix_paths)

    def requests(self, states: int) -> list[tuple[bytes, int]]:
        """The dump requests of one look at our sockets in `states` (a bitmask
        of 1 << TCP_x), each with its replies' message type (dump_requests)."""
        self._seq += 2
        return dump_requests(self.families, states, self.ports, seq=self._seq)

    def _dump(self, states: int) -> list[Iterable[int]]:
        """The inodes of our sockets in `states`, in parts: one per receive
        buffer (0 for a socket still in an accept queue may be among them)."""
        parts: list[Iterable[int]] = []
        if not self.families:
            return parts
        with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as s:
            for request, reply in self.requests(states):
                s.send(request)
                if not self._collect(s, reply, parts):
                    return self._dump(states)  # refused: a dump per family from now on
        return parts

    def _established(self) -> list[Iterable[int]]:
        parts = self._dump(1 << TCP_ESTABLISHED)
        if self.unix_paths:
            self.unix_inodes = unixdiag.established(self.unix_paths)
            parts.append(self.unix_inodes)
        return parts

    def established_inodes(self) -> set[int]:
        """Inodes of ESTABLISHED TCP sockets whose local port is ours, and of
        the connections our unix: listeners accepted."""
        inodes: set[int] = set().union(*self._established())
        inodes.discard(0)  # 0: still in the accept queue, owned by no process
        return inodes

    def listener_inodes(self) -> set[int]:
        inodes: set[int] = set().union(*self._dump(1 << TCP_LISTEN))
        if self.unix_paths:
            inodes.update(s.inode for s in unixdiag.listening(self.unix_paths))
        return inodes

    def _collect(self, s: socket.socket, reply: int, parts: list[Iterable[int]]) -> bool:
        """Read one dump to its NLMSG_DONE, the inodes of each buffer's
        messages of type `reply` into `parts`; False if the kernel refused
        the request (refused)."""
        first = True
        while True:
            buf = receive(s, "sock_diag")
            if len(buf) < 16:
                raise OSError("sock_diag: short read")
            if first and refused(buf, reply):
                return False
            first = False
            column = inode_column(buf, reply)
            if column is not None:  # the kernel's filter already kept only our ports
                parts.append(column)
                continue
            found, done = walk_inodes(buf, reply, self.ports)
            parts.append(found)
            if done:
                return True

    def unix_peers(self, inodes: set[int]) -> dict[int, int]:
        """server-side inode -> client-side inode, for some of the connections
        our unix: listeners accepted."""
        return unixdiag.peers(self.unix_paths, inodes) if self.unix_paths and inodes else {}

    def peers(self, inodes: set[int]) -> dict[int, str]:
        """inode -> "peer-ip:port" for some established sockets (a full decode:
        for listing the few long-lived connections left in a drain); for a
        unix: connection "unix:PATH<-socket:[N]", N the client's inode (as
        `ss -xp` shows it, with the process that holds it)."""
        out: dict[int, str] = {}
        if self.unix_paths and inodes:
            for s in unixdiag.sockets(1 << unixdiag.ESTABLISHED, paths=self.unix_paths):
                if s.inode in inodes:
                    out[s.inode] = f"unix:{s.name}<-socket:[{s.peer}]"
        if not self.ports:
            return out
        for buf, off, _length in diag_raw(self.families, 1 << TCP_ESTABLISHED, self.ports,
                                          inodes=inodes):
            ino = _INODE.unpack_from(buf, off + 84)[0]
            fam = buf[off + 16]
            dport = _SPORT.unpack_from(buf, off + 22)[0]
            ip = socket.inet_ntop(fam, buf[off + 40:off + 40 + (4 if fam == socket.AF_INET
                                                                 else 16)])
            out[ino] = f"[{ip}]:{dport}" if fam == socket.AF_INET6 else f"{ip}:{dport}"
        return out

    def held_peers(self, pids: Iterable[int]) -> list[str]:
        """Peers of the connections `pids` hold (after a count of that group)."""
        held = self._held.get(frozenset(pids))
        if held is None or not held.inodes:
            return []
        return sorted(self.peers(held.inodes).values())

    @staticmethod
    def _fd_inodes(pid: int, known: Mapping[str, int] | None = None,
                   stale: set[int] | frozenset[int] = frozenset()) -> dict[str, int]:
        return fd_inodes(pid, known, stale)

    def _walk(self, pids: frozenset[int], before: _Holding | None = None,
              parts: list[Iterable[int]] = ()) -> _Holding:
        """The group's descriptor tables. With `before`, the group's last
        walk, and `parts`, this look's dump: a descriptor whose socket the
        dump still shows established keeps its inode without a readlink
        (fd_inodes), so a listening instance with thousands of connections
        costs a listing of its table and a readlink for each descriptor
        that is new or whose socket is no longer established."""
        listeners = self.listener_inodes()
        stale: set[int] = set()
        if before is not None:
            for fds in before.fds.values():
                stale.update(fds.values())
            for part in parts:
                stale.difference_update(part)
        inodes: set[int] = set()
        listener_fds: list[tuple[int, str]] = []
        tables: dict[int, dict[str, int]] = {}
        for pid in pids:
            known = before.fds.get(pid) if before is not None else None
            tables[pid] = table = self._fd_inodes(pid, known, stale)
            for fd, ino in table.items():
                inodes.add(ino)
                if ino in listeners:
                    listener_fds.append((pid, fd))
        return _Holding(inodes, listener_fds, tables)

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
        return {name: len(inodes) for name, inodes in self._holdings(groups).items()}

    def inodes_many(self, groups: Mapping[str, Iterable[int]]) -> dict[str, frozenset[int]]:
        """One netlink dump: the inodes of the ESTABLISHED sockets on our ports
        that each group of processes holds, by group name. The same caching
        rules as count_many (a group's fd walk is reused while it holds none of
        our listeners; groups not asked about are forgotten). Two results
        compared tell how many connections a group accepted in between:
        `len(now[g] - before[g])` (socket inodes come from a counter,
        get_next_ino in fs/inode.c, so a new connection has a new inode)."""
        return {name: frozenset(inodes) for name, inodes in self._holdings(groups).items()}

    def _holdings(self, groups: Mapping[str, Iterable[int]]) -> dict[str, set[int]]:
        """inodes_many's sets, the cache's own (count them or copy them)."""
        parts = self._established()
        keys = {name: frozenset(pids) for name, pids in groups.items()}
        live: dict[frozenset[int], _Holding] = {}
        for key in keys.values():
            if not key or key in live:
                continue
            held = self._held.get(key)
            if held is None or self._still_listens(held):
                held = self._walk(key, held, parts)
            live[key] = held
        _keep_dumped([held.inodes for held in live.values()], parts)
        out = {name: live[key].inodes if key else set() for name, key in keys.items()}
        self._held = live  # forget groups that are gone
        return out
