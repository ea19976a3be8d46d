"""The netlink census against real loopback sockets (no mocks: it is cheap)."""

from __future__ import annotations

import errno
import os
import resource
import socket
import struct
import subprocess
import sys
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.census import (
    INET_DIAG_BC_JMP,
    INET_DIAG_BC_S_EQ,
    SOCK_DIAG_BY_FAMILY,
    KERNEL,
    TCPDIAG_GETSOCK,
    Census,
    diag_dump,
    _keep_dumped,
    fd_inodes,
    inode_column,
    port_filter,
    port_match,
    walk_inodes,
)
from agent.netlink import NLMSG_DONE, NLMSG_ERROR, NLMSGHDR, RECV_SIZE, receive

NLM_F_MULTI = 0x2

HOLDER = r"""
import socket, sys
ls = socket.socket(); ls.bind(("127.0.0.1", 0)); ls.listen(64)
print(ls.getsockname()[1], flush=True)
n = int(sys.argv[1])
held = [ls.accept()[0] for _ in range(n)]
if sys.argv[2] == "close": ls.close()
print("ready", flush=True)
for line in sys.stdin:   # "drop" closes one connection
    held.pop().close()
    print("dropped", flush=True)
"""


def test_port_filter_bytecode() -> None:
    code = port_filter([8080])
    assert struct.unpack("=BBHBBH", code) == (INET_DIAG_BC_S_EQ, 8, 12, 0, 0, 8080)
    two = port_filter([9090, 8080])
    ops = [struct.unpack_from("=BBH", two, i) for i in range(0, len(two), 4)]
    # a match lands on the JMP, which jumps to the end (accept); a mismatch
    # goes to the next test; the last one jumps past the end (reject)
    assert ops == [(INET_DIAG_BC_S_EQ, 8, 12), (0, 0, 8080), (INET_DIAG_BC_JMP, 4, 12),
                   (INET_DIAG_BC_S_EQ, 8, 12), (0, 0, 9090)]


def test_one_port_is_matched_by_the_request_itself_several_by_bytecode() -> None:
    est, bound_only = 1 << 1, 1 << 13
    assert port_match([8080], est) == (b"", 8080)
    assert port_match([8080, 9090], est) == (port_filter([8080, 9090]), 0)
    assert port_match([], est) == (b"", 0)  # every port
    assert port_match([0], est) == (port_filter([0]), 0)  # idiag_sport 0 would mean any
    # the kernel's walk of bound-only sockets does not look at idiag_sport
    assert port_match([8080], est | bound_only) == (port_filter([8080]), 0)


def test_the_kernel_keeps_only_our_port_for_one_port_and_for_several() -> None:
    """Listeners and connections on two ports: a census of one port sees that
    port's listener and connections only (idiag_sport in the request), a
    census of both sees both (bytecode)."""
    socks: list[socket.socket] = []
    listeners = []
    accepted: dict[int, set[int]] = {}
    try:
        for _ in range(2):
            lst = socket.socket()
            lst.bind(("127.0.0.1", 0))
            lst.listen(8)
            socks.append(lst)
            listeners.append(lst)
            port = lst.getsockname()[1]
            accepted[port] = set()
            for _ in range(3):
                socks.append(socket.create_connection(("127.0.0.1", port)))
                conn = lst.accept()[0]
                socks.append(conn)
                accepted[port].add(os.fstat(conn.fileno()).st_ino)
        a, b = accepted  # the two ports

        def ino(s: socket.socket) -> int:
            return os.fstat(s.fileno()).st_ino

        one = Census.for_listen([("127.0.0.1", a)])
        assert one.listener_inodes() == {ino(listeners[0])}
        assert one.established_inodes() == accepted[a]
        assert one.count([os.getpid()]) == 3
        both = Census.for_listen([("127.0.0.1", a), ("127.0.0.1", b)])
        assert both.listener_inodes() == {ino(lst) for lst in listeners}
        assert both.established_inodes() == accepted[a] | accepted[b]
    finally:
        for s in socks:
            s.close()


def test_fd_inodes_lists_the_sockets_of_a_process() -> None:
    sock = socket.socket()
    r, w = os.pipe()
    try:
        found = fd_inodes(os.getpid())
        assert found[str(sock.fileno())] == os.fstat(sock.fileno()).st_ino
        assert str(r) not in found and str(w) not in found  # a pipe is no socket
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        assert fd_inodes(dead.pid) == {}  # gone (and reaped)
    finally:
        sock.close()
        os.close(r)
        os.close(w)


def start_holder(n: int, mode: str) -> tuple[subprocess.Popen[str], int, list[socket.socket]]:
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(n), mode], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    port = int(p.stdout.readline())
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(n)]
    assert p.stdout.readline().strip() == "ready"
    return p, port, clients


def stop_holder(p: subprocess.Popen[str]) -> None:
    p.kill()
    p.communicate()  # reaps it and closes its pipes


def test_counts_only_the_holders_connections() -> None:
    p, port, clients = start_holder(25, "keep")
    other, other_port, other_clients = start_holder(5, "keep")
    try:
        census = Census.for_listen([("127.0.0.1", port)])
        assert census.count([p.pid]) == 25
        assert census.count([other.pid]) == 0  # other port
        assert census.count([]) == 0
        assert census.count_many({"a": [p.pid], "b": [other.pid]}) == {"a": 25, "b": 0}
        both = Census.for_listen([("127.0.0.1", port), ("127.0.0.1", other_port)])
        assert both.count_many({"a": [p.pid], "b": [other.pid]}) == {"a": 25, "b": 5}
        three = Census.for_listen([("127.0.0.1", 1), ("127.0.0.1", port),
                                   ("127.0.0.1", other_port)])
        assert three.count_many({"a": [p.pid], "b": [other.pid]}) == {"a": 25, "b": 5}
    finally:
        for proc in (p, other):
            stop_holder(proc)
        for c in clients + other_clients:
            c.close()


def test_count_falls_as_a_draining_holder_closes() -> None:
    p, port, clients = start_holder(10, "close")
    assert p.stdin is not None and p.stdout is not None
    try:
        census = Census.for_listen([("127.0.0.1", port)])
        assert census.count([p.pid]) == 10
        for expected in (9, 8, 7):
            p.stdin.write("drop\n")
            p.stdin.flush()
            assert p.stdout.readline().strip() == "dropped"
            deadline = time.monotonic() + 5
            while census.count([p.pid]) != expected and time.monotonic() < deadline:
                time.sleep(0.01)
            assert census.count([p.pid]) == expected
        # a fresh census agrees with the reused walk
        assert Census.for_listen([("127.0.0.1", port)]).count([p.pid]) == 7
        # the peers of what is left are the client sockets still open here
        peers = census.held_peers([p.pid])
        mine = {f"127.0.0.1:{c.getsockname()[1]}" for c in clients}
        assert len(peers) == 7 and set(peers) <= mine
    finally:
        stop_holder(p)
        for c in clients:
            c.close()


def test_ipv6_family_for_any_address() -> None:
    c = Census.for_listen([(None, 8080)])
    assert c.families == (socket.AF_INET6,)
    c = Census.for_listen([("127.0.0.1", 8080), ("::1", 8080)])
    assert set(c.families) == {socket.AF_INET, socket.AF_INET6}


def test_dual_stack_listener_of_a_program_binding_its_own() -> None:
    """gRPC, Java, Go and Node bind AF_INET6 sockets and take IPv4 clients
    as ::ffff:127.0.0.1: their connections are AF_INET6 sockets."""
    lst = socket.socket(socket.AF_INET6)
    lst.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    lst.bind(("::", 0))
    lst.listen(16)
    port = lst.getsockname()[1]
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
    accepted = [lst.accept()[0] for _ in clients]
    try:
        assert accepted[0].family == socket.AF_INET6
        assert Census.for_listen([("127.0.0.1", port)], own_sockets=True).count(
            [os.getpid()]) == 3
        # a socket unit's 127.0.0.1 listener is AF_INET: only that is asked for
        assert Census.for_listen([("127.0.0.1", port)]).count([os.getpid()]) == 0
    finally:
        for s in clients + accepted + [lst]:
            s.close()


def dual_stack_pairs(v4: int, v6: int) -> tuple[int, list[socket.socket], set[int]]:
    """Listeners on 127.0.0.1:P and [::1]:P, with v4 and v6 connections
    accepted here: (P, every socket, the accepted sockets' inodes)."""
    l4 = socket.socket()
    l4.bind(("127.0.0.1", 0))
    port = l4.getsockname()[1]
    l6 = socket.socket(socket.AF_INET6)
    l6.bind(("::1", port))
    socks = [l4, l6]
    mine = set()
    for lst, host, n in ((l4, "127.0.0.1", v4), (l6, "::1", v6)):
        lst.listen(8)
        for _ in range(n):
            socks.append(socket.create_connection((host, port)))
            conn = lst.accept()[0]
            socks.append(conn)
            mine.add(os.fstat(conn.fileno()).st_ino)
    return port, socks, mine


def test_both_families_in_one_dump_or_one_per_family(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(KERNEL, "both_in_one", True)
    port, socks, mine = dual_stack_pairs(3, 2)
    try:
        census = Census.for_listen([("127.0.0.1", port)], own_sockets=True)
        assert [reply for _, reply in census.requests(1 << 1)] == [TCPDIAG_GETSOCK]
        assert census.established_inodes() == mine
        assert census.count([os.getpid()]) == 5
        assert len(census.listener_inodes()) == 2  # of both families, in one dump
        both = diag_dump((socket.AF_INET, socket.AF_INET6), 1 << 1, [port])
        assert {m.inode for m in both} == mine and {m.family for m in both} == {
            socket.AF_INET, socket.AF_INET6}
        monkeypatch.setattr(KERNEL, "both_in_one", False)
        assert [reply for _, reply in census.requests(1 << 1)] == [SOCK_DIAG_BY_FAMILY] * 2
        assert census.established_inodes() == mine
        assert Census.for_listen([("127.0.0.1", port)], own_sockets=True).count(
            [os.getpid()]) == 5
        assert {m.inode for m in diag_dump((socket.AF_INET, socket.AF_INET6), 1 << 1,
                                           [port])} == {m.inode for m in both}
    finally:
        for s in socks:
            s.close()


def test_a_kernel_that_refuses_the_one_dump_gets_one_per_family(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A request type the kernel does not know is refused with EINVAL, as
    TCPDIAG_GETSOCK would be by a kernel without it: the census and
    diag_raw fall back to a dump per family, for good, and find the same."""
    import agent.census as census_module

    def unknown_type(bytecode: bytes, seq: int, states: int, ext: int = 0,
                     sport: int = 0) -> bytes:
        req = census_module._request(socket.AF_INET, bytecode, seq, states, ext, sport)
        return req[:4] + struct.pack("=H", 99) + req[6:]

    monkeypatch.setattr(census_module, "_request_both", unknown_type)
    port, socks, mine = dual_stack_pairs(2, 2)
    try:
        monkeypatch.setattr(KERNEL, "both_in_one", True)
        census = Census.for_listen([("127.0.0.1", port)], own_sockets=True)
        assert census.count([os.getpid()]) == 4
        assert KERNEL.both_in_one is False
        assert census.established_inodes() == mine
        monkeypatch.setattr(KERNEL, "both_in_one", True)
        found = diag_dump((socket.AF_INET, socket.AF_INET6), 1 << 1, [port])
        assert KERNEL.both_in_one is False
        assert {m.inode for m in found} == mine and len(found) == 4
    finally:
        for s in socks:
            s.close()


class Served:
    """A listener in this process and the connections it accepted from
    clients of this process (both ends held until close())."""

    def __init__(self, backlog: int = 64) -> None:
        self.lst = socket.socket()
        self.lst.bind(("127.0.0.1", 0))
        self.lst.listen(backlog)
        self.port = self.lst.getsockname()[1]
        self.clients: list[socket.socket] = []
        self.accepted: list[socket.socket] = []

    def connect(self, n: int) -> None:
        for _ in range(n):
            self.clients.append(socket.create_connection(("127.0.0.1", self.port)))
            self.accepted.append(self.lst.accept()[0])

    def close(self) -> None:
        for sk in self.clients + self.accepted + [self.lst]:
            sk.close()


def test_inodes_many_tells_which_connections_are_new() -> None:
    """inodes_many gives the socket inodes per group; the difference of two
    results is what a group accepted in between (count_many is its length)."""
    srv = Served(16)
    try:
        census = Census.for_listen([("127.0.0.1", srv.port)])
        srv.connect(2)
        before = census.inodes_many({"me": [os.getpid()], "none": []})
        assert before["none"] == frozenset()
        srv.connect(3)
        srv.accepted.pop(0).close()
        after = census.inodes_many({"me": [os.getpid()]})
        assert census.count_many({"me": [os.getpid()]}) == {"me": len(after["me"])}
        new = after["me"] - before["me"]
        assert new == {os.fstat(s.fileno()).st_ino for s in srv.accepted[-3:]}
        assert len(before["me"] - after["me"]) == 1  # the one closed
    finally:
        srv.close()


def test_a_listening_group_is_walked_again_reading_only_what_changed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A group that still listens is walked at every count (it may accept),
    but a descriptor whose socket the dump still shows established keeps
    its inode: the second walk reads the links of the few other
    descriptors, not of every connection. A connection closed and its
    descriptor number reused by a new one is found at once (its old socket
    is no longer in the dump), and the new one counts as new."""
    srv = Served(64)
    links: list[str] = []
    real = os.readlink

    def counted(path: str, *, dir_fd: int | None = None) -> str:
        links.append(path)
        return real(path, dir_fd=dir_fd)

    try:
        census = Census.for_listen([("127.0.0.1", srv.port)])
        me = {"me": [os.getpid()]}
        srv.connect(40)
        monkeypatch.setattr(os, "readlink", counted)
        first = census.inodes_many(me)["me"]
        assert len(first) == 40 and len(links) >= 80  # every descriptor (clients too)
        links.clear()
        again = census.inodes_many(me)["me"]
        # the server sides are kept; the client sides (not on our port) are
        # read again, as are the process's other descriptors
        assert again == first and len(links) < len(first) + 40, len(links)
        # close one server side; the next accepted connection reuses its number
        srv.clients.append(socket.create_connection(("127.0.0.1", srv.port)))  # queued
        gone = srv.accepted.pop(5)
        number, old_ino = gone.fileno(), os.fstat(gone.fileno()).st_ino
        gone.close()
        srv.accepted.append(srv.lst.accept()[0])
        assert srv.accepted[-1].fileno() == number
        links.clear()
        now = census.inodes_many(me)["me"]
        new_ino = os.fstat(srv.accepted[-1].fileno()).st_ino
        assert now - first == {new_ino} and first - now == {old_ino}
        assert census.count(me["me"]) == 40
    finally:
        srv.close()


# ------------------------------------------------ parsing synthetic buffers
# A dump's messages as the kernel lays them out (include/uapi/linux/inet_diag.h):
# nlmsghdr, then struct inet_diag_msg (idiag_sport at +4, network order;
# idiag_inode at +68), then attributes (zeros here), each message padded to 4.


def diag(inode: int, sport: int = 8080, length: int = 124, mtype: int = SOCK_DIAG_BY_FAMILY,
         flags: int = NLM_F_MULTI) -> bytes:
    body = bytearray(max(length, 88) - 16)
    body[0], body[1] = socket.AF_INET, 1
    struct.pack_into("!H", body, 4, sport)
    struct.pack_into("=I", body, 68, inode)
    msg = NLMSGHDR.pack(length, mtype, flags, 1, 0) + bytes(body)
    return msg.ljust((len(msg) + 3) & ~3, b"\0")


DONE = NLMSGHDR.pack(20, NLMSG_DONE, NLM_F_MULTI, 1, 0) + b"\0" * 4


def test_a_buffer_of_equal_messages_is_read_as_one_column() -> None:
    buf = b"".join(diag(ino) for ino in (7, 0, 9, 12))
    column = inode_column(buf, SOCK_DIAG_BY_FAMILY)
    assert column is not None and list(column) == [7, 0, 9, 12]
    # the kernel's filter kept only our ports, so the column is not checked
    # for them; the walk, which reads each message, is
    assert walk_inodes(buf, SOCK_DIAG_BY_FAMILY, frozenset({8080})) == ({7, 9, 12}, False)
    assert walk_inodes(buf, SOCK_DIAG_BY_FAMILY, frozenset({80})) == (set(), False)


@pytest.mark.parametrize("buf, why", [
    (diag(1) + diag(2, length=132) + diag(3), "lengths differ"),
    (diag(1) + diag(2, length=132), "lengths differ, yet the total divides by the first"),
    (diag(1) + diag(2) + DONE, "NLMSG_DONE at the end"),
    (diag(1) + diag(2, mtype=18), "another message type"),
    (diag(1) + diag(2, flags=0), "other flags"),
    (diag(1, length=123) + diag(2, length=123), "an unaligned length (padded)"),
    (DONE, "NLMSG_DONE alone"),
    (diag(1)[:100], "a short buffer"),
])
def test_any_other_buffer_is_walked_message_by_message(buf: bytes, why: str) -> None:
    assert inode_column(buf, SOCK_DIAG_BY_FAMILY) is None, why


def test_the_walk_ends_at_done_and_raises_the_kernels_error() -> None:
    assert walk_inodes(diag(4) + diag(5, length=132) + DONE, SOCK_DIAG_BY_FAMILY,
                       frozenset({8080})) == ({4, 5}, True)
    error = NLMSGHDR.pack(36, NLMSG_ERROR, 0, 1, 0) + struct.pack("=i", -errno.EPERM) + b"\0" * 16
    with pytest.raises(OSError) as e:
        walk_inodes(diag(4) + error, SOCK_DIAG_BY_FAMILY, frozenset({8080}))
    assert e.value.errno == errno.EPERM


MESSAGES = st.lists(st.tuples(
    st.integers(0, 2**32 - 1),                          # inode (0: in an accept queue)
    st.sampled_from([8080, 8080, 9090, 1]),             # local port
    st.sampled_from([124, 124, 124, 132, 88, 120, 123]),  # length: 123 is padded to 124
    st.sampled_from([SOCK_DIAG_BY_FAMILY] * 4 + [18]),  # type
    st.sampled_from([NLM_F_MULTI] * 4 + [0]),           # flags
), min_size=1, max_size=40)


@settings(max_examples=300, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(MESSAGES, st.booleans())
def test_the_column_is_taken_exactly_when_every_message_matches_the_first(
        msgs: list[tuple[int, int, int, int, int]], done: bool) -> None:
    """Over synthetic dump buffers: inode_column answers exactly for a buffer
    of messages that all share the first one's length, type and flags (with
    an aligned length and no NLMSG_DONE), and then gives each message's
    inode in order; on such a buffer whose messages are all on our ports
    (what the kernel's filter sends) it agrees with the message-by-message
    walk, 0 aside."""
    buf = b"".join(diag(*m) for m in msgs) + (DONE if done else b"")
    ports = frozenset({8080, 9090})
    column = inode_column(buf, SOCK_DIAG_BY_FAMILY)
    first = msgs[0][2:]
    uniform = not done and first[0] % 4 == 0 and first[1] == SOCK_DIAG_BY_FAMILY \
        and all(m[2:] == first for m in msgs)
    assert (column is not None) == uniform
    walked, ended = walk_inodes(buf, SOCK_DIAG_BY_FAMILY, ports)
    assert ended == done
    assert walked == {ino for ino, port, _length, mtype, _flags in msgs
                      if ino and port in ports and mtype == SOCK_DIAG_BY_FAMILY}
    if column is not None:
        assert list(column) == [m[0] for m in msgs]
        if all(m[1] in ports for m in msgs):
            assert set(column) - {0} == walked


def test_keep_dumped_strikes_what_the_dump_no_longer_lists() -> None:
    a, b, c = {1, 2, 3}, {3, 4}, {5}
    before_c = c
    _keep_dumped([a, b, c], [memoryview(struct.pack("=3I", 2, 3, 0)).cast("I"), {4, 99}])
    assert (a, b, c) == ({2, 3}, {3, 4}, set())
    assert c is before_c  # in place: the census's cached sets
    _keep_dumped([], [[1]])  # nothing held: nothing to do


def test_a_census_spanning_many_receive_buffers() -> None:
    """A dump of hundreds of sockets comes in several buffers (at most 32 KiB
    each), read as columns, and the last with NLMSG_DONE, walked."""
    n = 700
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 2 * n + 100:
        pytest.skip(f"the open-files limit ({hard}) is below {2 * n + 100}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    p, port, clients = start_holder(n, "close")
    assert p.stdin is not None and p.stdout is not None
    try:
        census = Census.for_listen([("127.0.0.1", port)])
        assert census.count([p.pid]) == n
        both = Census.for_listen([("127.0.0.1", port)], own_sockets=True)
        assert both.count_many({"holder": [p.pid], "me": [os.getpid()], "none": []}) == {
            "holder": n, "me": 0, "none": 0}
        for _ in range(3):
            p.stdin.write("drop\n")
            p.stdin.flush()
            assert p.stdout.readline().strip() == "dropped"
        deadline = time.monotonic() + 5
        while census.count([p.pid]) != n - 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert census.count([p.pid]) == n - 3
        assert len(census.inodes_many({"h": [p.pid]})["h"]) == n - 3
    finally:
        stop_holder(p)
        for c in clients:
            c.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_datagram_too_large_to_read_whole_is_an_error_not_a_loss() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with a, b:
        b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * RECV_SIZE)
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * RECV_SIZE)
        a.send(b"x" * RECV_SIZE)
        assert receive(b, "test") == b"x" * RECV_SIZE
        a.send(b"y" * (RECV_SIZE + 1))
        with pytest.raises(OSError) as e:
            receive(b, "test")
        assert e.value.errno == errno.EMSGSIZE
