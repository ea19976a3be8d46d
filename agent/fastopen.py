"""TCP Fast Open (RFC 7413) on listeners the agent does not own.

A TFO server answers a client's SYN with a cookie; a client that holds one
sends its first request IN the SYN, and the server's program reads it one
round trip earlier. On Linux a listener does that only when both hold:

- net.ipv4.tcp_fastopen has the server bit 0x2 (TFO_SERVER_ENABLE), per
  network namespace (Documentation/networking/ip-sysctl.rst). The agent's
  default is 3 (client and server).
- the listening socket has a TFO queue: setsockopt(IPPROTO_TCP,
  TCP_FASTOPEN, qlen), qlen = how many TFO requests (SYNs with data whose
  handshake is not finished yet) may be pending at once, tcp(7). Without it
  the kernel counts the client's cookie request (TcpExt
  TCPFastOpenCookieReqd) but returns no cookie and never takes data from a
  SYN (net/ipv4/tcp_fastopen.c: tcp_try_fastopen, tcp_fastopen_queue_check).
  The sysctl bit 0x400 (TFO_SERVER_WO_SOCKOPT1) gives every listener of the
  namespace a queue of its backlog, but only at listen(2) time
  (net/ipv4/af_inet.c: __inet_listen_sk) and for every service at once.

systemd has no socket option for it (a FastOpen= was added and reverted in
2014: the setsockopt takes a queue length, not a boolean; systemd 252 warns
about an unknown key and ignores it). So the agent sets it itself on
the socket unit's listeners, after the unit bound them: setsockopt is allowed
on a socket in LISTEN (net/ipv4/tcp.c: do_tcp_setsockopt, TCP_FASTOPEN:
state CLOSE or LISTEN, val >= 0), and it acts on the socket, not on a file
descriptor: the agent takes a duplicate of the descriptor PID 1 holds with
pidfd_getfd(2) and sets the option on that. Every instance inherits the same
socket, so one call holds for all of them and for every swap, until the
socket unit is restarted (a new socket, queue 0): hence `ensure` at every
swap, cheap when nothing changed (a sock_diag dump, PID 1's /proc/PID/fd,
one getsockopt per listener).

Shapes and units:
- qlen: int, the maximum number of pending TFO requests (RFC 7413 section 5.1,
  "server-side TFO queue"), 0 = off. The kernel caps it at net.core.somaxconn
  when it is set (include/net/request_sock.h, fastopen_queue_tune), and
  getsockopt(TCP_FASTOPEN) reads back the capped value: `effective`.
- Listener: one LISTEN socket, named by its address, socket inode, and the
  (pid, fd) it was found under; `qlen` as the kernel reads it back.

Errors: FastOpenError (exit code 5, "the OS refused"), its message naming the
call, the process and the cause: pidfd_getfd needs Linux 5.6+ (ENOSYS) and
ptrace access to the holder, PTRACE_MODE_ATTACH_REALCREDS (EPERM: root with
CAP_SYS_PTRACE, which the agent's unit keeps); ESRCH/EBADF when the holder or
its descriptor is gone (a race with a restart: the caller may retry).

Sources: pidfd_getfd(2), pidfd_open(2), tcp(7) TCP_FASTOPEN, RFC 7413,
Documentation/networking/ip-sysctl.rst (tcp_fastopen),
net/ipv4/tcp.c, net/ipv4/tcp_fastopen.c, net/ipv4/af_inet.c.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .census import fd_inodes
from .errors import Exit, ZddError
from .listeners import ListenSocket, listening

# pidfd_getfd is 438 on every architecture but alpha: from Linux 5.1 on, new
# system calls share one number everywhere (scripts/syscall.tbl).
SYS_PIDFD_GETFD = 438
TCP_FASTOPEN = getattr(socket, "TCP_FASTOPEN", 23)  # include/uapi/linux/tcp.h
SERVER_ENABLE = 0x2  # TFO_SERVER_ENABLE, include/net/tcp.h
SERVER_WO_SOCKOPT = 0x400  # TFO_SERVER_WO_SOCKOPT1: every listener, qlen = backlog
MAX_QLEN = 65535  # the config's bound: net.core.somaxconn's default maximum here
SYSCTL = "net.ipv4.tcp_fastopen"

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.getsockopt.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                             ctypes.c_void_p]
_libc.setsockopt.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                             ctypes.c_uint32]


class FastOpenError(ZddError):
    exit_code = Exit.SYSTEMD

    def __init__(self, message: str, errno_: int = 0) -> None:
        super().__init__(message, errno=errno_)
        self.errno = errno_


_GETFD_WHY = {
    errno.ENOSYS: "the kernel has no pidfd_getfd (Linux 5.6+), or a seccomp filter "
                  "refuses it",
    errno.EPERM: "no ptrace access to that process (root with CAP_SYS_PTRACE needed; "
                 "Yama ptrace_scope 3 forbids it to everyone)",
    errno.ESRCH: "the process is gone",
    errno.EBADF: "the descriptor was closed",
}


def pidfd_getfd(pid: int, fd: int) -> int:
    """A duplicate, in this process, of descriptor `fd` of process `pid`
    (close-on-exec; the caller closes it). It refers to the same open file
    description: options set on a socket through it hold for every holder."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError as e:
        raise FastOpenError(f"cannot open PID {pid} (pidfd_open): {e.strerror}",
                            e.errno or 0) from None
    try:
        new = _libc.syscall(SYS_PIDFD_GETFD, ctypes.c_int(pidfd), ctypes.c_int(fd),
                            ctypes.c_uint(0))
        if new < 0:
            err = ctypes.get_errno()
            why = _GETFD_WHY.get(err, os.strerror(err))
            raise FastOpenError(f"cannot take descriptor {fd} of PID {pid} (pidfd_getfd): "
                                f"{why}", err)
        return int(new)
    finally:
        os.close(pidfd)


def get_qlen(fd: int) -> int:
    """getsockopt(fd, IPPROTO_TCP, TCP_FASTOPEN): the listener's TFO queue
    length, 0 = off. Called through libc rather than socket.socket(fileno=)
    so that nothing touches the shared description's flags."""
    val, size = ctypes.c_int(0), ctypes.c_uint32(ctypes.sizeof(ctypes.c_int))
    if _libc.getsockopt(fd, socket.IPPROTO_TCP, TCP_FASTOPEN, ctypes.byref(val),
                        ctypes.byref(size)) != 0:
        err = ctypes.get_errno()
        raise FastOpenError(f"getsockopt TCP_FASTOPEN: {os.strerror(err)}", err)
    return val.value


def set_qlen(fd: int, qlen: int) -> None:
    """setsockopt(fd, IPPROTO_TCP, TCP_FASTOPEN, qlen): EINVAL unless the socket
    is TCP in CLOSE or LISTEN and qlen >= 0."""
    val = ctypes.c_int(qlen)
    if _libc.setsockopt(fd, socket.IPPROTO_TCP, TCP_FASTOPEN, ctypes.byref(val),
                        ctypes.sizeof(val)) != 0:
        err = ctypes.get_errno()
        raise FastOpenError(f"setsockopt TCP_FASTOPEN {qlen}: {os.strerror(err)}", err)


def somaxconn(root: Path = Path("/proc/sys")) -> int | None:
    try:
        return int((root / "net/core/somaxconn").read_text())
    except (OSError, ValueError):
        return None


def effective(qlen: int, cap: int | None) -> int:
    """What getsockopt reads back after setsockopt(qlen): capped at
    net.core.somaxconn (fastopen_queue_tune)."""
    return qlen if cap is None else min(qlen, cap)


def server_enabled(value: str | None) -> bool:
    """Whether a net.ipv4.tcp_fastopen value has the server bit (0x2)."""
    try:
        return value is not None and bool(int(value.split()[0], 0) & SERVER_ENABLE)
    except (ValueError, IndexError):
        return False


@dataclass(frozen=True)
class Listener:
    address: str  # "127.0.0.1:8080", "[::]:8080"
    inode: int
    pid: int  # the process it was found in, and its descriptor there
    fd: int
    qlen: int  # TCP_FASTOPEN read back: pending TFO requests allowed, 0 = off


@dataclass(frozen=True)
class Change:
    listener: Listener  # as read back after the change
    old: int


def _held(ports: Iterable[int], pids: Iterable[int]) -> list[tuple[ListenSocket, int, int]]:
    """(ListenSocket, pid, fd) for each LISTEN socket on `ports` that one of
    `pids` holds, the first of `pids` in order that holds it."""
    socks = {s.inode: s for s in listening(ports)}
    out: list[tuple[ListenSocket, int, int]] = []
    seen: set[int] = set()
    for pid in pids:
        for fd, ino in fd_inodes(pid).items():
            if ino in socks and ino not in seen:
                seen.add(ino)
                out.append((socks[ino], pid, int(fd)))
    return out


def _on(sock: ListenSocket, pid: int, fd: int,
        target: tuple[int, int] | None = None) -> tuple[Listener, int] | None:
    """Read one listener through a duplicate of its descriptor and, with
    `target` (qlen to set, the capped value it reads back as), set it where
    it reads otherwise. (the listener as now, the value before); None when
    the descriptor now names another file (closed and reused since)."""
    ino = sock.inode
    dup = pidfd_getfd(pid, fd)
    try:
        if os.fstat(dup).st_ino != ino:
            return None
        old = now = get_qlen(dup)
        if target is not None and old != target[1]:
            set_qlen(dup, target[0])
            now = get_qlen(dup)
    finally:
        os.close(dup)
    return Listener(sock.address, ino, pid, fd, now), old


def read(ports: Iterable[int], pids: Iterable[int]) -> list[Listener]:
    """The TCP listeners on `ports` that `pids` hold, with their TFO queue
    length as the kernel reads it back. Raises FastOpenError, OSError
    (netlink)."""
    out = []
    for sock, pid, fd in _held(ports, pids):
        got = _on(sock, pid, fd)
        if got is not None:
            out.append(got[0])
    return out


def ensure(ports: Iterable[int], pids: Iterable[int], qlen: int) -> tuple[list[Listener],
                                                                          list[Change]]:
    """Set TCP_FASTOPEN to `qlen` on every TCP listener on `ports` that `pids`
    hold, where it differs (idempotent: a listener already at the capped
    value is only read). Returns (every listener as now, the changes). A
    read-back that differs from the capped qlen raises FastOpenError."""
    if not 0 <= qlen <= MAX_QLEN:
        raise ValueError(f"qlen {qlen} is out of range (allowed: 0..{MAX_QLEN})")
    want = effective(qlen, somaxconn())
    listeners, changes = [], []
    for sock, pid, fd in _held(ports, pids):
        got = _on(sock, pid, fd, (qlen, want))
        if got is None:
            continue
        ln, old = got
        if ln.qlen != want:
            raise FastOpenError(f"TCP_FASTOPEN on {ln.address}: set {qlen}, the kernel reads "
                                f"back {ln.qlen} (wanted {want})")
        listeners.append(ln)
        if old != ln.qlen:
            changes.append(Change(ln, old))
    return listeners, changes
