"""Unix-domain stream sockets through NETLINK_SOCK_DIAG (unix_diag,
sock_diag(7); include/uapi/linux/unix_diag.h, net/unix/diag.c): the unix:
listeners' counterpart of census.py's inet_diag code.

What the kernel reports, checked on Linux 6.x: an accepted (server-side)
socket carries its listener's address, so UNIX_DIAG_NAME is the listener's
path (net/unix/af_unix.c, unix_stream_connect copies otheru->addr into the
new socket); the client side has no name unless it bound one, and its
UNIX_DIAG_PEER is the server-side socket's inode (and the other way round).
A connection still in the accept queue has no inode yet (0: owned by no
process) and counts in the listener's UNIX_DIAG_RQLEN. Inodes are the ones
/proc/PID/fd shows ("socket:[N]"), so attribution to processes is the TCP
census's, by inode.

There is no kernel-side filter by name, so a dump lists every Unix socket of
the states asked for in the network namespace; only each message's type,
inode and first attribute (the name, sent first: sk_diag_fill) are read in
the fast path. pyroute2 has unix_diag too, but its generic parser costs
about 0.15 ms a message (SANDBOX.md: 1.3 s for 9,000 TCP sockets).
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from .netlink import NLMSG_DONE, NLMSG_ERROR, messages, receive
from .netlink import NLMSGHDR as _NLMSGHDR

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
# udiag_show bits and attribute types (linux/unix_diag.h)
UDIAG_SHOW_NAME = 0x01
UDIAG_SHOW_VFS = 0x02
UDIAG_SHOW_PEER = 0x04
UDIAG_SHOW_ICONS = 0x08
UDIAG_SHOW_RQLEN = 0x10
UNIX_DIAG_NAME = 0
UNIX_DIAG_VFS = 1
UNIX_DIAG_PEER = 2
UNIX_DIAG_ICONS = 3
UNIX_DIAG_RQLEN = 4
# socket states as unix sockets use them (the TCP numbers, net/unix/af_unix.c)
ESTABLISHED = 1
LISTEN = 10

# struct unix_diag_req: family, protocol, pad, states, ino, show, cookie[2]
_REQ = struct.Struct("=BBHIIIII")
_NLATTR = struct.Struct("=HH")
_U32 = struct.Struct("=I")
_PAIR = struct.Struct("=II")
# struct unix_diag_msg after the 16-byte nlmsghdr: family, type, state, pad,
# ino (u32 at +4), cookie[2]; attributes from +16
_MSG_LEN = 16 + 16


def request(states: int, show: int, seq: int = 1) -> bytes:
    """A dump request for the Unix sockets in `states` (a bitmask, 1 << state),
    with the attributes in `show` (UDIAG_SHOW_*)."""
    body = _REQ.pack(socket.AF_UNIX, 0, 0, states, 0, show, 0xFFFFFFFF, 0xFFFFFFFF)
    return _NLMSGHDR.pack(16 + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP,
                          seq, 0) + body


def _dump(states: int, show: int) -> Iterator[bytes]:
    """The receive buffers of one dump, each made of whole messages, up to
    NLMSG_DONE. OSError with the kernel's errno on NLMSG_ERROR (ENOENT: a
    kernel without unix_diag, CONFIG_UNIX_DIAG)."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as nl:
        nl.send(request(states, show))
        while True:
            buf = receive(nl, "unix_diag")
            if len(buf) < 16:
                raise OSError("unix_diag: short read")
            # a dump's last buffer ends with NLMSG_DONE or holds the error alone
            length, mtype = _NLMSGHDR.unpack_from(buf, 0)[:2]
            if mtype == NLMSG_ERROR:
                (err,) = struct.unpack_from("=i", buf, 16)
                raise OSError(-err, f"unix_diag: {os.strerror(-err)}")
            yield buf
            # NLMSG_DONE (16 + 4 bytes) ends the last buffer: look there
            # first, and walk the headers only to confirm it
            if len(buf) >= 20 and _NLMSGHDR.unpack_from(buf, len(buf) - 20)[:2] == (
                    20, NLMSG_DONE) and _ends(buf):
                return


def _ends(buf: bytes) -> bool:
    """Whether the buffer holds NLMSG_DONE (a walk over the headers only)."""
    return any(mtype == NLMSG_DONE for _off, _length, mtype in messages(buf, "unix_diag"))


def _messages(states: int, show: int) -> Iterator[tuple[bytes, int, int]]:
    """(buffer, offset of the nlmsghdr, length) of each SOCK_STREAM socket of
    one dump."""
    for buf in _dump(states, show):
        for off, length, mtype in messages(buf, "unix_diag"):
            if mtype == NLMSG_DONE:
                return
            if mtype == SOCK_DIAG_BY_FAMILY and length >= _MSG_LEN \
                    and buf[off + 17] == socket.SOCK_STREAM:
                yield buf, off, length


def _name_attr(path: str) -> bytes:
    """UNIX_DIAG_NAME as the kernel sends it for a path bound with bind(2):
    sun_path with its terminating NUL (unix_mkname_bsd counts it)."""
    raw = path.encode() + b"\0"
    return _NLATTR.pack(4 + len(raw), UNIX_DIAG_NAME) + raw


@dataclass(frozen=True)
class UnixSocket:
    """One Unix stream socket as unix_diag reports it. `queued` and
    `backlog` are UNIX_DIAG_RQLEN: for a listener, the connections waiting
    to be accepted and its listen(2) backlog; for a connection, the bytes
    unread and 0. `waiting`: a listener's UNIX_DIAG_ICONS, the inodes of the
    client sockets whose connections wait in its accept queue, oldest first
    (net/unix/diag.c, sk_diag_dump_icons), when asked for."""

    inode: int
    state: int
    name: str | None  # the bound (or, accepted, the listener's) path; None: unnamed
    peer: int = 0  # the other end's inode (0: none, or not asked)
    queued: int = 0
    backlog: int = 0
    vfs: tuple[int, int] | None = None  # (inode, dev) of the socket file
    waiting: tuple[int, ...] = ()

    @property
    def file_id(self) -> tuple[int, int] | None:
        """(st_ino, st_dev) of the socket file, as os.stat reports it: the
        kernel sends the device in its internal encoding (MAJOR << 20 |
        MINOR, include/linux/kdev_t.h), not the one stat(2) returns."""
        if self.vfs is None:
            return None
        ino, dev = self.vfs
        return ino, os.makedev(dev >> 20, dev & 0xFFFFF)

    @classmethod
    def decode(cls, buf: bytes, off: int, length: int) -> UnixSocket:
        state = buf[off + 18]
        (inode,) = _U32.unpack_from(buf, off + 20)
        name: str | None = None
        peer = queued = backlog = 0
        vfs = None
        waiting: tuple[int, ...] = ()
        a, end = off + _MSG_LEN, off + length
        while a + 4 <= end:
            alen, atype = _NLATTR.unpack_from(buf, a)
            if alen < 4:
                break
            payload = bytes(buf[a + 4:a + alen])
            atype &= 0x3FFF
            if atype == UNIX_DIAG_NAME and payload:
                # a path ends in NUL; an abstract name starts with one ("@name" in ss)
                name = ("@" + payload[1:].decode(errors="replace") if payload[0] == 0
                        else payload.rstrip(b"\0").decode(errors="replace"))
            elif atype == UNIX_DIAG_PEER and len(payload) >= 4:
                (peer,) = _U32.unpack_from(payload)
            elif atype == UNIX_DIAG_RQLEN and len(payload) >= 8:
                queued, backlog = _PAIR.unpack_from(payload)
            elif atype == UNIX_DIAG_VFS and len(payload) >= 8:
                vfs = _PAIR.unpack_from(payload)
            elif atype == UNIX_DIAG_ICONS:
                waiting = struct.unpack(f"={len(payload) // 4}I", payload[:len(payload) // 4 * 4])
            a += (alen + 3) & ~3
        return cls(inode, state, name, peer, queued, backlog, vfs, waiting)


def sockets(states: int, show: int = UDIAG_SHOW_NAME | UDIAG_SHOW_PEER | UDIAG_SHOW_RQLEN,
            paths: Iterable[str] | None = None) -> list[UnixSocket]:
    """Every Unix stream socket in `states`, fully decoded; only those named
    one of `paths` when given (UDIAG_SHOW_NAME is then asked for)."""
    wanted = None if paths is None else set(paths)
    if wanted is not None:
        show |= UDIAG_SHOW_NAME
    out = []
    for buf, off, length in _messages(states, show):
        s = UnixSocket.decode(buf, off, length)
        if wanted is None or s.name in wanted:
            out.append(s)
    return out


def established(paths: Iterable[str]) -> set[int]:
    """Inodes of the accepted (server-side) connections of the listeners at
    `paths`: ESTABLISHED stream sockets whose name is one of them.

    The fast path, as the census polls it during a drain: the dump lists
    every ESTABLISHED Unix socket (the clients' sides too), so rather than
    walking each message in Python, each receive buffer is searched (in C,
    bytes.find) for the name attribute's exact bytes, which the kernel puts
    first, right after the 16-byte unix_diag_msg. A hit is taken only when
    the header 32 bytes before it is a stream socket's SOCK_DIAG_BY_FAMILY
    message long enough to hold it. The needle holds NUL bytes (the
    attribute's type 0, and the name's end), which no path contains, so it
    cannot start inside another socket's name."""
    needles = [_name_attr(p) for p in set(paths)]
    out: set[int] = set()
    if not needles:
        return out
    hdr, u32 = _NLMSGHDR.unpack_from, _U32.unpack_from
    for buf in _dump(1 << ESTABLISHED, UDIAG_SHOW_NAME):
        for needle in needles:
            at = buf.find(needle)
            while at >= _MSG_LEN:
                off = at - _MSG_LEN
                length, mtype = hdr(buf, off)[:2]
                if mtype == SOCK_DIAG_BY_FAMILY and length >= _MSG_LEN + len(needle) \
                        and buf[off + 16] == socket.AF_UNIX \
                        and buf[off + 17] == socket.SOCK_STREAM:
                    ino = u32(buf, off + 20)[0]
                    if ino:  # 0: not accepted yet
                        out.add(ino)
                at = buf.find(needle, at + len(needle))
    return out


def listening(paths: Iterable[str], waiting: bool = False) -> list[UnixSocket]:
    """The LISTEN sockets bound to `paths`, with their accept queues' length;
    `waiting`: which connections wait too (UnixSocket.waiting, 4 bytes a
    connection in the listener's message)."""
    return sockets(1 << LISTEN, UDIAG_SHOW_NAME | UDIAG_SHOW_RQLEN | UDIAG_SHOW_VFS
                   | (UDIAG_SHOW_ICONS if waiting else 0), paths)


def peers(paths: Iterable[str], inodes: set[int] | None = None) -> dict[int, int]:
    """server-side inode -> client-side inode, for the accepted connections
    of the listeners at `paths` (only those in `inodes` when given: the
    others are skipped by their inode, before any decoding)."""
    wanted = set(paths)
    out: dict[int, int] = {}
    for buf, off, length in _messages(1 << ESTABLISHED, UDIAG_SHOW_NAME | UDIAG_SHOW_PEER):
        ino = _U32.unpack_from(buf, off + 20)[0]
        if not ino or (inodes is not None and ino not in inodes):
            continue
        s = UnixSocket.decode(buf, off, length)
        if s.name in wanted:
            out[s.inode] = s.peer
    return out
