"""How a draining instance ended its connections, from the kernel's own
record of each one: for the drain result.

The census (census.py) says how many connections an instance still holds;
this says how each one that went away ended (Closes):

- answered: the program sent data on it after begin() (a response to a
  request that came after the signal, or one in flight at it), then it was
  closed, by either side, with no sign of a lost request;
- closed_idle: the program closed it without sending anything after the
  signal, and the peer did not write into it afterwards (it closed too, or
  has not written yet). A keep-alive client may still do so: uvicorn closes
  idle connections at SIGTERM (uvicorn #2757; node #60617). An abortive
  close (SO_LINGER 0: tcp_disconnect zeroes tcp_info) is counted here;
- refused: the program closed it, and then the peer's next request reached
  the closed socket and was answered with RST: a failed request, seen on our
  side;
- unanswered: a request was accepted by the kernel (after the signal, or
  waiting unread at it) and the connection was closed with nothing sent
  back: a failed request;
- client_closed: the peer closed first (its FIN or RST reached our socket
  before we closed), with nothing sent after the signal;
- open: still held by the program when finish() ran (the caller's "cut" if
  that is at the end of the grace period);
- unknown: closed but not seen (notification buffer overrun, no
  notifications at all), or not decidable.

How: before the signal, a NETLINK_SOCK_DIAG socket joins the multicast
groups SKNLGRP_INET_TCP_DESTROY / SKNLGRP_INET6_TCP_DESTROY
(include/uapi/linux/sock_diag.h). Joining needs no privilege: the kernel
socket is created with NL_CFG_F_NONROOT_RECV (net/core/sock_diag.c,
diag_net_init; measured: works without CAP_NET_ADMIN). When the kernel frees
a TCP socket (__sk_free -> sock_diag_broadcast_destroy, from a workqueue) it
broadcasts an inet_diag_msg with the socket's 4-tuple, cookie and
INET_DIAG_INFO (struct tcp_info, include/uapi/linux/tcp.h) as it was at the
end (inet_diag_handler_get_info, net/ipv4/inet_diag.c). A classic BPF filter
on our socket keeps only our local ports. A baseline dump (INET_DIAG_INFO)
of the draining instance's sockets, by inode, records each one's cookie,
counters and unread bytes; a notification is matched by cookie (the inode
dies with the fd, the cookie does not) and the counters' deltas decide
(`classify`, `refine`), with these kernel facts, measured on 6.18
(tests/unit/test_closes.py):

- tcpi_data_segs_in/out count segments carrying data, in and out (counted on
  arrival, tcp_segs_in); tcpi_bytes_received / tcpi_bytes_acked count
  sequence space accepted / acked, so a FIN counts as one byte
  (tcp_rcv_nxt_update, tcp_snd_una_update in net/ipv4/tcp_input.c);
- data reaching a socket the program already closed is counted in
  data_segs_in but not in bytes_received, and gets RST (TCPAbortOnData);
- a program that closes first: its FIN is acked and the socket is freed as
  it becomes a FIN_WAIT2 timewait socket, before the peer's FIN; that
  timewait socket keeps the cookie (exact SOCK_DIAG_BY_FAMILY lookup by
  4-tuple and cookie finds it), becomes TIME_WAIT if the peer closes, and is
  gone at once if the peer writes into it (tcp_timewait_state_process:
  TCP_TW_RST). So "gone early" = refused. A peer that closes first: its FIN
  reached the full socket (bytes_received +1), and no timewait socket is ours.

Measured against clients (tests/unit/test_closes.py: 40 keep-alive clients,
half of them checking for a close before each write, a server that closes
them all at SIGTERM; 10 runs each, twice): with a request per connection
every ms, refused + unanswered equalled the clients' failed requests in 18
of 20 runs and missed 3 (of about 38) in the other two; with one every
20 ms, 0-8 of about 20-28 failures per run (median 1) stayed hidden among
"answered": the peer acked our answer with a pure ACK, so its refused
request was not its only kind of segment and no timewait socket was left
to see. Never more failures reported than the clients saw.

Approximations: "after the signal" is after begin() (call it just before the
signal); a 1-byte request is not told from a FIN; an answered connection
whose next request is refused counts as refused only when the last segment
from the peer was that data, or its timewait socket was seen and is gone
before net.ipv4.tcp_fin_timeout (checked at finish(); a drain longer than
that leaves it as it was); a client that resets a connection we closed
(SO_LINGER 0) counts as refused. Call finish() before the program is killed:
after the kill the kernel closes its connections, which then look like
closes by the program.
"""

from __future__ import annotations

import ctypes
import errno
import socket
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import NamedTuple

from .census import (
    NETLINK_SOCK_DIAG,
    SOCK_DIAG_BY_FAMILY,
    diag_dump,
    diag_raw,
    exact_request,
    msg_cookie,
)

SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
SO_ATTACH_FILTER = 26
SO_RCVBUFFORCE = 33
SKNLGRP_INET_TCP_DESTROY = 1  # linux/sock_diag.h
SKNLGRP_INET6_TCP_DESTROY = 3
GROUPS = {socket.AF_INET: SKNLGRP_INET_TCP_DESTROY, socket.AF_INET6: SKNLGRP_INET6_TCP_DESTROY}
INET_DIAG_INFO = 2
EXT_INFO = 1 << (INET_DIAG_INFO - 1)

# TCP states (include/net/tcp_states.h)
ESTABLISHED, FIN_WAIT1, FIN_WAIT2, TIME_WAIT, CLOSE = 1, 4, 5, 6, 7
CLOSE_WAIT, LAST_ACK, CLOSING = 8, 9, 11
FULL_STATES = sum(1 << s for s in (ESTABLISHED, FIN_WAIT1, FIN_WAIT2, CLOSE, CLOSE_WAIT,
                                   LAST_ACK, CLOSING))
OURS_FIRST = {FIN_WAIT1, FIN_WAIT2, CLOSING}  # we sent FIN before the peer's
PEER_FIRST = {CLOSE_WAIT, LAST_ACK}

# struct tcp_info (include/uapi/linux/tcp.h), offsets checked with offsetof:
# bytes_acked 120, bytes_received 128 (u64); segs_out 136, segs_in 140,
# data_segs_in 152, data_segs_out 156 (u32).
_TI_U64 = struct.Struct("=QQ")
_TI_U32 = struct.Struct("=II8xII")
_TI_MIN = 160

POLL_BUDGET = 0.003  # seconds of reading per poll()
SETTLE = 0.1  # finish(): how long to wait for notifications still on their way

KINDS = ("answered", "closed_idle", "refused", "unanswered", "client_closed", "open", "unknown")


class Counters(NamedTuple):
    """The tcp_info counters the classification reads."""

    bytes_acked: int
    bytes_received: int
    segs_out: int
    segs_in: int
    data_segs_in: int
    data_segs_out: int

    @classmethod
    def from_info(cls, info: bytes | None) -> Counters | None:
        if info is None or len(info) < _TI_MIN:
            return None
        acked, received = _TI_U64.unpack_from(info, 120)
        segs_out, segs_in, dsi, dso = _TI_U32.unpack_from(info, 136)
        return cls(acked, received, segs_out, segs_in, dsi, dso)

    def minus(self, before: Counters) -> Counters:
        return Counters(*(a - b for a, b in zip(self, before)))


def _info(buf: bytes, off: int, length: int) -> bytes | None:
    """The INET_DIAG_INFO payload of the message at `off`, without decoding
    the rest (a destroy notification: INET_DIAG_PROTOCOL, maybe a pad, INFO)."""
    a, end = off + 16 + 72, off + length
    while a + 4 <= end:
        alen, atype = struct.unpack_from("=HH", buf, a)
        if alen < 4:
            return None
        if atype & 0x3FFF == INET_DIAG_INFO:
            return bytes(buf[a + 4:a + alen])
        a += (alen + 3) & ~3
    return None


def classify(base_state: int, before: Counters, after: Counters,
             timewait: Callable[[], int | None], end_state: int = CLOSE,
             unread: int = 0) -> str:
    """One ended connection's kind (see the module docstring) from its tcp_info
    counters at begin() and at the end. `timewait()` gives the state of our
    timewait socket for it (TIME_WAIT, or FIN_WAIT2 while the peer has not
    closed), 0 if there is none, None if it cannot tell; it is asked only when
    both FINs reached the full socket. `end_state` is the state the socket was
    last seen in: CLOSE for a freed one, or an orphan's live state at finish().
    `unread` is idiag_rqueue at begin(): request bytes already waiting then.
    "answered" and "closed_idle" may still turn out "refused" (`refine`)."""
    d = after.minus(before)
    if min(d) < 0:
        return "closed_idle"  # tcp_disconnect zeroed the counters: an abortive close
    if d.data_segs_out == 0 and unread > 0:
        return "unanswered"  # a request waited at the signal and got nothing
    if d.data_segs_in > 0 and d.bytes_received <= 1:
        return "refused"  # data came after our close: not accepted, answered by RST
    if d.data_segs_out > 0:
        return "answered"
    if d.data_segs_in > 0:
        return "unanswered"  # a request accepted, nothing sent back
    if base_state in PEER_FIRST or end_state in PEER_FIRST:
        return "client_closed"
    if base_state in OURS_FIRST or end_state in OURS_FIRST:
        return "closed_idle"
    if d.bytes_received == 0:  # no FIN from the peer reached the socket
        if d.bytes_acked > 0:
            return "closed_idle"  # ours did, and was acked
        if d.segs_in > 0 and d.segs_out == 0:
            return "client_closed"  # the peer's RST
        if d.segs_out > 0 and d.segs_in == 0:
            return "closed_idle"  # our RST (tcp_abort, e.g. ss -K)
        return "unknown"
    tw = timewait()  # both FINs: the first to close holds the TIME_WAIT
    if tw is None:
        return "unknown"
    return "closed_idle" if tw else "client_closed"


def refine(kind: str, before: Counters, after: Counters, tw: int | None) -> str:
    """A freed socket counted answered or closed_idle, given what our timewait
    socket for it is now (`tw`: TIME_WAIT, FIN_WAIT2, 0 none, None unknown):
    "refused" when the kernel shows the peer wrote after our close.

    - our FIN acked and nothing from the peer since begin() (no data, no FIN;
      answered: the response went to a request waiting at begin): the socket
      was freed as it became a FIN_WAIT2 timewait socket (tcp_rcv_state_process
      in net/ipv4/tcp_input.c, tcp_fin_timeout <= 60 s); that one gone already
      means the peer sent data or RST into it (tcp_timewait_state_process:
      TCP_TW_RST);
    - answered, every segment from the peer since begin() carried data (no
      lone FIN, no pure ACK) and no timewait socket: the peer's last segment
      was data that reached our socket after its FIN and got RST; a clean
      ending leaves a pure ACK or FIN from the peer, or our TIME_WAIT."""
    if tw != 0:
        return kind
    d = after.minus(before)
    if min(d) < 0:
        return kind
    if d.data_segs_in == 0 and d.bytes_received == 0 and d.bytes_acked > 0:
        return "refused"
    if kind == "answered" and d.segs_in == d.data_segs_in > 0:
        return "refused"
    return kind


@dataclass
class Closes:
    """How the baselined connections ended (counts), and why some are unknown."""

    answered: int = 0
    closed_idle: int = 0
    client_closed: int = 0
    open: int = 0
    unknown: int = 0
    unanswered: int = 0
    refused: int = 0
    note: str = ""

    def to_dict(self) -> dict:
        out: dict = {k: getattr(self, k) for k in KINDS}
        if self.note:
            out["note"] = self.note
        return out


@dataclass
class _Base:
    family: int
    sid: bytes  # inet_diag_sockid incl. cookie: for the exact timewait lookup
    state: int
    counters: Counters
    unread: int  # idiag_rqueue: bytes received, not yet read by the program


def _port_filter_bpf(ports: Iterable[int]) -> bytes | None:
    """A classic BPF program (socket(7) SO_ATTACH_FILTER) accepting netlink
    messages whose inet_diag_msg idiag_sport (network order, at byte 20: the
    16-byte nlmsghdr, then family, state, timer, retrans) is one of `ports`."""
    ports = sorted(set(ports))
    if not ports or len(ports) > 200:
        return None
    n = len(ports)
    ins = [struct.pack("=HBBI", 0x28, 0, 0, 20)]  # ldh [20]
    for i, p in enumerate(ports):
        ins.append(struct.pack("=HBBI", 0x15, n - i, 0, p))  # jeq #p, accept
    ins.append(struct.pack("=HBBI", 0x06, 0, 0, 0))  # ret 0: drop
    ins.append(struct.pack("=HBBI", 0x06, 0, 0, 0xFFFFFFFF))  # accept: whole message
    return b"".join(ins)


def _attach(s: socket.socket, prog: bytes) -> None:
    buf = ctypes.create_string_buffer(prog)
    fprog = struct.pack("@HP", len(prog) // 8, ctypes.addressof(buf))  # struct sock_fprog
    s.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


def _fin_timeout() -> float:
    """How long a FIN_WAIT2 timewait socket lives (net.ipv4.tcp_fin_timeout)."""
    try:
        with open("/proc/sys/net/ipv4/tcp_fin_timeout") as f:
            return float(f.read())
    except (OSError, ValueError):
        return 60.0


class CloseWatch:
    """Watches how the sockets of a draining instance end (module docstring).

        watch = CloseWatch(ports, families)
        watch.begin(inodes)   # the instance's ESTABLISHED sockets, before the signal
        ...signal...; while draining: watch.poll()
        closes = watch.finish()  # before the kill

    Never raises into the drain: a failure is recorded in `note` and the
    sockets it leaves undecided are counted as unknown. Memory is
    proportional to the baselined sockets (their baseline, and a netlink
    receive buffer of about 2 KiB each, 1-64 MiB); poll() reads for at most
    POLL_BUDGET seconds, about 30 us per notification of ours (an exact
    lookup of its timewait socket). bench/closewatch.py, 8,000 connections
    closed at once: begin 85 ms, 87 polls of 3 ms, finish 140 ms, all 8,000
    closed_idle."""

    def __init__(self, ports: Iterable[int],
                 families: Iterable[int] = (socket.AF_INET, socket.AF_INET6)) -> None:
        self.ports = frozenset(ports)
        self.families = tuple(families)
        self.note = ""
        self.overruns = 0  # ENOBUFS: notifications the kernel had to drop
        self._nl: socket.socket | None = None  # the multicast listener
        self._q: socket.socket | None = None  # dumps and exact lookups
        self._seq = 0
        self._base: dict[int, _Base] = {}  # cookie -> baseline
        self._ended: dict[int, str] = {}  # cookie -> kind
        self._fate: dict[int, float] = {}  # cookie -> when its FIN_WAIT2 timewait was seen
        self._asked = 0
        self._begun = False
        self._fin_timeout = 60.0

    def _fail(self, why: str) -> None:
        if not self.note:
            self.note = why
        self._close()

    def _close(self) -> None:
        for s in (self._nl, self._q):
            if s is not None:
                s.close()
        self._nl = self._q = None

    def begin(self, inodes: set[int]) -> None:
        """Subscribe, then baseline the sockets with these inodes (on our
        ports). Call just before the drain signal."""
        try:
            self._begin(set(inodes))
        except Exception as e:  # never into the drain
            self._fail(f"begin failed: {e!r}")

    def _begin(self, inodes: set[int]) -> None:
        self._begun = True
        self._asked = len(inodes)
        if not inodes or not self.ports:
            return
        try:
            self._subscribe(len(inodes))
        except OSError as e:
            why = "needs CAP_NET_ADMIN" if e.errno == errno.EPERM else e.strerror
            self._fail(f"cannot join the TCP destroy notifications ({why})")
            return
        self._fin_timeout = _fin_timeout()
        try:
            self._q = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG)
            for buf, off, length in diag_raw(self.families, FULL_STATES, self.ports, EXT_INFO,
                                             inodes, nl=self._q):
                c = Counters.from_info(_info(buf, off, length))
                if c is None:
                    self._fail("the kernel sent no struct tcp_info (INET_DIAG_INFO)")
                    self._base.clear()
                    return
                body = off + 16
                unread = struct.unpack_from("=I", buf, body + 56)[0]  # idiag_rqueue
                self._base[msg_cookie(buf, off)] = _Base(
                    buf[body], bytes(buf[body + 4:body + 52]), buf[body + 1], c, unread)
        except OSError as e:
            self._fail(f"baseline dump failed: {e}")
            self._base.clear()
            return
        self._asked = len(self._base)  # closed before the baseline: not counted

    def _subscribe(self, n: int) -> None:
        nl = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG)
        self._nl = nl
        nl.bind((0, 0))
        for fam in self.families:
            nl.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, GROUPS[fam])
        size = min(64 << 20, max(1 << 20, 2048 * n))
        for opt in (SO_RCVBUFFORCE, socket.SO_RCVBUF):
            try:
                nl.setsockopt(socket.SOL_SOCKET, opt, size)
                break
            except OSError:
                continue
        prog = _port_filter_bpf(self.ports)
        if prog is not None:
            try:
                _attach(nl, prog)
            except OSError:
                pass  # unfiltered: _handle skips the sockets it does not know
        nl.setblocking(False)

    def poll(self) -> None:
        """Read the notifications waiting (non-blocking, at most POLL_BUDGET s)."""
        self._read(POLL_BUDGET)

    def _read(self, budget: float) -> bool:
        """Read notifications for up to `budget` seconds; True if it stopped
        on the budget (more may be waiting), False once none is left."""
        nl = self._nl
        if nl is None:
            return False
        deadline = time.monotonic() + budget
        try:
            while time.monotonic() < deadline:
                try:
                    buf = nl.recv(65536)
                except BlockingIOError:
                    return False
                except OSError as e:
                    if e.errno != errno.ENOBUFS:
                        raise
                    self.overruns += 1  # the kernel dropped some: they end as unknown
                    continue
                self._handle(buf)
        except Exception as e:  # never into the drain
            self._fail(f"reading the notifications failed: {e!r}")
            return False
        return True

    def _handle(self, buf: bytes) -> None:
        off = 0
        while off + 16 <= len(buf):
            length, mtype = struct.unpack_from("=IH", buf, off)
            if length < 16:
                return
            if mtype == SOCK_DIAG_BY_FAMILY and length >= 16 + 72:
                cookie = msg_cookie(buf, off)
                if cookie in self._base and cookie not in self._ended:
                    # idiag_rqueue (rcv_nxt - copied_seq): bytes the program never
                    # read; tcp_close drops them without moving copied_seq and
                    # answers with RST (TCPAbortOnClose): a request unanswered
                    unread = struct.unpack_from("=I", buf, off + 16 + 56)[0]
                    self._ended[cookie] = self._ending(cookie, _info(buf, off, length), CLOSE,
                                                       unread)
            off += (length + 3) & ~3

    def _ending(self, cookie: int, info: bytes | None, end_state: int,
                end_unread: int = 0) -> str:
        base = self._base[cookie]
        after = Counters.from_info(info)
        if after is None:
            return "unknown"
        if end_unread > 1 and end_state == CLOSE:
            # closed with request bytes it never read (a peer's FIN alone
            # leaves 1: it takes a sequence number and is never "read")
            return "unanswered"
        seen: list[int | None] = []

        def timewait() -> int | None:
            if not seen:
                seen.append(self._timewait(base))
            return seen[0]
        kind = classify(base.state, base.counters, after, timewait, end_state, base.unread)
        if kind in ("answered", "closed_idle") and end_state == CLOSE:
            # Did the peer write after our close? A FIN_WAIT2 timewait socket
            # answers that with RST and is gone (tcp_timewait_state_process).
            tw = timewait()
            if tw == FIN_WAIT2:
                self._fate[cookie] = time.monotonic()  # decided at finish()
            kind = refine(kind, base.counters, after, tw)
        return kind

    def _timewait(self, base: _Base) -> int | None:
        """The state of our timewait socket with this 4-tuple and cookie
        (TIME_WAIT or FIN_WAIT2), 0 if none, None if the lookup failed."""
        if self._q is None:
            return None
        self._seq += 1
        reply: list[bytes] = []
        try:
            err = exact_request(self._q, SOCK_DIAG_BY_FAMILY, base.family, base.sid, self._seq,
                                reply)
        except OSError:
            return None
        if err == errno.ENOENT:
            return 0
        if err or not reply:
            return None
        state = reply[0][17]  # idiag_state (a timewait socket's substate)
        return state if state in (TIME_WAIT, FIN_WAIT2) else 0

    def finish(self) -> Closes:
        """Read what is left, and count. Call before the program is killed."""
        try:
            return self._finish()
        except Exception as e:  # never into the drain
            self.note = self.note or f"finish failed: {e!r}"
            return Closes(unknown=self._asked, note=self.note)
        finally:
            self._close()

    def _finish(self) -> Closes:
        out = Closes()
        if not self._begun:
            out.note = "begin() was not called"
            return out
        if self._nl is None and not self._ended:
            out.unknown = self._asked
            out.note = self.note
            return out
        self._drain_socket()
        held: set[int] = set()
        if set(self._base) - set(self._ended) and self._q is not None:
            held = self._still_there(set(self._base) - set(self._ended))
            deadline = time.monotonic() + SETTLE
            while set(self._base) - set(self._ended) - held and time.monotonic() < deadline:
                time.sleep(0.005)  # freed; its notification still in the kernel's workqueue
                self._drain_socket()
        self._decide_fates()
        for kind in self._ended.values():
            setattr(out, kind, getattr(out, kind) + 1)
        rest = set(self._base) - set(self._ended)
        out.open = len(rest & held)
        out.unknown += len(rest - held)
        notes = [self.note] if self.note else []
        if self.overruns:
            notes.append(f"{self.overruns} notification overruns (ENOBUFS)")
        if out.unknown and not notes:
            notes.append(f"{out.unknown} closes not seen")
        out.note = "; ".join(notes)
        return out

    def _drain_socket(self) -> None:
        for _ in range(1000):  # bounded: at most 1000 budgets
            if not self._read(POLL_BUDGET):
                return

    def _still_there(self, pending: set[int]) -> set[int]:
        """Of the pending cookies: those a process still holds (open). Orphans
        (fd closed, the kernel still finishing: FIN_WAIT1, CLOSING, LAST_ACK)
        are classified from their live tcp_info and state; freed ones are
        left to the notifications."""
        held: set[int] = set()
        assert self._q is not None
        for m in diag_dump(self.families, FULL_STATES, self.ports, EXT_INFO, cookies=pending,
                           nl=self._q):
            if m.inode:
                held.add(m.cookie)
            elif INET_DIAG_INFO in m.attrs:  # not a timewait socket (freed, notified)
                self._ended[m.cookie] = self._ending(m.cookie, m.attrs[INET_DIAG_INFO], m.state)
        return held

    def _decide_fates(self) -> None:
        """Closes of ours whose FIN_WAIT2 timewait socket was seen: if it is gone
        before its timeout, the peer wrote (or reset) after our close."""
        if not self._fate or self._q is None:
            return
        # only the cookies: a full decode of each message (addresses as text)
        # was most of this look's time at 10,000 closes
        present = {msg_cookie(buf, off) for buf, off, _length in diag_raw(
            self.families, (1 << TIME_WAIT) | (1 << FIN_WAIT2), self.ports,
            cookies=set(self._fate), nl=self._q)}
        now = time.monotonic()
        for cookie, seen in self._fate.items():
            if cookie not in present and now - seen < self._fin_timeout - 1:
                self._ended[cookie] = "refused"
