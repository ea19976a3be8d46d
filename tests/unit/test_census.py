"""The netlink census against real loopback sockets (no mocks: it is cheap)."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import time

from agent.census import INET_DIAG_BC_JMP, INET_DIAG_BC_S_EQ, Census, port_filter

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


def test_inodes_many_tells_which_connections_are_new() -> None:
    """inodes_many gives the socket inodes per group; the difference of two
    results is what a group accepted in between (count_many is its length)."""
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(16)
    port = lst.getsockname()[1]
    clients: list[socket.socket] = []
    accepted: list[socket.socket] = []

    def connect(n: int) -> None:
        for _ in range(n):
            clients.append(socket.create_connection(("127.0.0.1", port)))
            accepted.append(lst.accept()[0])
    try:
        census = Census.for_listen([("127.0.0.1", port)])
        connect(2)
        before = census.inodes_many({"me": [os.getpid()], "none": []})
        assert before["none"] == frozenset()
        connect(3)
        accepted.pop(0).close()
        after = census.inodes_many({"me": [os.getpid()]})
        assert census.count_many({"me": [os.getpid()]}) == {"me": len(after["me"])}
        new = after["me"] - before["me"]
        assert new == {os.fstat(s.fileno()).st_ino for s in accepted[-3:]}
        assert len(before["me"] - after["me"]) == 1  # the one closed
    finally:
        for s in clients + accepted + [lst]:
            s.close()
