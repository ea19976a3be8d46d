"""Netlink message framing, shared by the sock_diag readers (census.py for
TCP, unixdiag.py for Unix sockets): netlink(7), include/uapi/linux/netlink.h."""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterator

NLMSG_ERROR = 2
NLMSG_DONE = 3
NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
# A dump's datagrams are at most 32 KiB: the kernel sizes them after the
# largest read so far, capped at SKB_WITH_OVERHEAD(32768) (net/netlink/
# af_netlink.c, netlink_recvmsg and netlink_dump). A read of 64 KiB holds any
# of them, and stays below glibc's mmap threshold (128 KiB): a 1 MiB read
# buffer is mapped and its pages faulted in anew at every read, which cost
# 5 ms of a 40 ms census at 20,000 sockets.
RECV_SIZE = 1 << 16


def receive(nl: socket.socket, what: str) -> bytes:
    """The next datagram of a netlink socket. OSError (EMSGSIZE) if it did not
    fit in RECV_SIZE: a dump cut short must fail, not lose sockets."""
    data, _ancillary, flags, _address = nl.recvmsg(RECV_SIZE)
    if flags & socket.MSG_TRUNC:
        raise OSError(errno.EMSGSIZE, f"{what}: a datagram over {RECV_SIZE} bytes was cut short")
    return data


def messages(buf: bytes, what: str) -> Iterator[tuple[int, int, int]]:
    """(offset, length, type) of each message in one receive buffer, up to
    and including NLMSG_DONE when the buffer holds it. OSError with the
    kernel's errno on NLMSG_ERROR, and on a header shorter than itself (the
    walk would never end); `what` names the reader in the message."""
    off, end = 0, len(buf)
    while off + 16 <= end:
        length, mtype = NLMSGHDR.unpack_from(buf, off)[:2]
        if mtype == NLMSG_ERROR:
            (err,) = struct.unpack_from("=i", buf, off + 16)
            raise OSError(-err, f"{what}: {os.strerror(-err)}")
        if length < 16:
            raise OSError(f"{what}: malformed message")
        yield off, length, mtype
        if mtype == NLMSG_DONE:
            return
        off += (length + 3) & ~3
