"""Netlink message framing, shared by the sock_diag readers (census.py for
TCP, unixdiag.py for Unix sockets): netlink(7), include/uapi/linux/netlink.h."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator

NLMSG_ERROR = 2
NLMSG_DONE = 3
NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid


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
