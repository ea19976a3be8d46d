"""LISTEN sockets as evidence, against real loopback sockets (no mocks).

The SOCK_DESTROY measurement runs in a network namespace of its own
(`unshare -n`), so that net.ipv4.tcp_migrate_req can be set there without
touching the machine's value (sysctls under net/ are per namespace)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from agent import listeners
from agent.listeners import ListenSocket, covers

ROOT = Path(__file__).resolve().parents[2]


def listener(host: str = "127.0.0.1", port: int = 0, family: int = socket.AF_INET,
             reuseport: bool = False, v6only: bool | None = None) -> socket.socket:
    s = socket.socket(family)
    if reuseport:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if v6only is not None:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
    s.bind((host, port))
    s.listen(16)
    return s


def test_listening_reports_address_queue_backlog_cookie_and_v6only() -> None:
    a = listener()
    port = a.getsockname()[1]
    b = listener("::", port, socket.AF_INET6, v6only=True)
    client = socket.create_connection(("127.0.0.1", port))
    try:
        found = {s.family: s for s in listeners.listening([port])}
        v4, v6 = found[socket.AF_INET], found[socket.AF_INET6]
        assert (v4.host, v4.port, v4.backlog, v4.v6only) == ("127.0.0.1", port, 16, None)
        assert v4.queued == 1  # the client, not accepted yet
        assert (v6.host, v6.v6only, v6.queued, v6.address) == ("::", True, 0, f"[::]:{port}")
        cookie = int.from_bytes(a.getsockopt(socket.SOL_SOCKET, 57, 8), sys.byteorder)  # SO_COOKIE
        assert v4.cookie == cookie
        assert v4.inode == os.fstat(a.fileno()).st_ino
        assert listeners.held_by([os.getpid()], found.values()) == {
            v4.inode: {os.getpid()}, v6.inode: {os.getpid()}}
        assert listeners.held_by([1], found.values()) == {}
        assert listeners.listening([]) == []
    finally:
        for s in (client, a, b):
            s.close()


def test_unaccepted_names_what_waits_in_the_accept_queue_first_in_first_out() -> None:
    """listeners.unaccepted: the cookies of the connections no process has
    accepted (inode 0), a client that gave up (CLOSE_WAIT) included; each
    accept() takes the oldest (FIFO) and it leaves the set. The accept
    queue's content, where idiag_rqueue only counts it."""
    import time

    from agent.census import DiagMsg, diag_dump

    a = listener()
    port = a.getsockname()[1]
    clients = []
    try:
        seen: list[frozenset[int]] = []
        for _ in range(3):
            clients.append(socket.create_connection(("127.0.0.1", port)))
            time.sleep(0.01)
            seen.append(listeners.unaccepted([port]))
        assert [len(x) for x in seen] == [1, 2, 3] and seen[0] < seen[1] < seen[2]
        first = next(iter(seen[0]))
        clients[0].close()  # gave up before anyone accepted: CLOSE_WAIT, still queued
        time.sleep(0.01)
        assert listeners.unaccepted([port]) == seen[2]
        conn, _ = a.accept()
        took: DiagMsg = next(m for m in diag_dump([socket.AF_INET], 0xFFF, [port])
                             if m.inode == os.fstat(conn.fileno()).st_ino)
        assert took.cookie == first  # the oldest
        assert listeners.unaccepted([port]) == seen[2] - {first}
        assert listeners.unaccepted([]) == frozenset()
        conn.close()
    finally:
        for s in (a, *clients):
            s.close()


def test_accept_queue_of_a_listener_that_stopped_accepting_and_of_one_that_takes() -> None:
    """modes' accept_queue over real sockets: the same connections wait at
    every look of a listener nobody accepts on; a busy one whose queue holds
    as many at each look shows new ones (bake.AcceptQueue tells them apart)."""
    import time

    from agent.bake import AcceptQueue
    from agent.config import parse_service
    from agent.modes import mode_for

    a = listener()
    port = a.getsockname()[1]
    svc = parse_service(Path("/etc/zdd-agent/services/api.yaml"), {
        "name": "api", "command": "/bin/true", "listen": [f"127.0.0.1:{port}"],
        "socket": "reuseport"})
    mode = mode_for(svc)
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]
    stuck, busy = AcceptQueue(0.01, 0.04), AcceptQueue(0.01, 0.04)
    held = []
    try:
        verdicts = []
        for _ in range(5):  # nobody accepts: 4 wait, the same 4
            time.sleep(0.01)
            verdicts.append(stuck.observe(mode.accept_queue([os.getpid()])))
        assert verdicts == [False] * 4 + [True] and not stuck.moved
        verdicts = []
        for _ in range(5):  # one taken, one more arrives: still 4 waiting
            held.append(a.accept()[0])
            clients.append(socket.create_connection(("127.0.0.1", port)))
            time.sleep(0.01)
            w = mode.accept_queue([os.getpid()])
            assert w.queued == 4
            verdicts.append(busy.observe(w))
        assert verdicts == [False] * 5 and busy.moved
        assert mode.accept_queue([1]).queued == 0  # PID 1 holds no listener on the port
    finally:
        for s in (a, *clients, *held):
            s.close()


def sock(host: str, family: int, v6only: bool | None = None, port: int = 80) -> ListenSocket:
    return ListenSocket(1, family, host, port, 1, 0, 16, v6only)


def test_coverage_rules() -> None:
    v4any, v4lo = sock("0.0.0.0", socket.AF_INET), sock("127.0.0.1", socket.AF_INET)
    dual, v6only = sock("::", socket.AF_INET6, False), sock("::", socket.AF_INET6, True)
    unknown = sock("::", socket.AF_INET6, None)
    v6lo, mapped = sock("::1", socket.AF_INET6, False), sock("::ffff:127.0.0.1", socket.AF_INET6)
    assert covers(v4lo, "127.0.0.1", 80) and not covers(v4lo, "127.0.0.1", 81)
    assert covers(v4any, "127.0.0.1", 80) and not covers(v4any, "::1", 80)
    assert covers(dual, "127.0.0.1", 80) and covers(dual, "::1", 80)
    assert not covers(v6only, "127.0.0.1", 80) and covers(v6only, "::1", 80)
    assert covers(unknown, "127.0.0.1", 80)  # cannot tell: the Linux default (dual stack)
    assert covers(v6lo, "[::1]", 80) and covers(v6lo, "0:0::1", 80)
    assert not covers(v6lo, "127.0.0.1", 80) and not covers(v4lo, "127.0.0.2", 80)
    assert covers(mapped, "127.0.0.1", 80)
    # "any address" only by a wildcard socket
    assert covers(v4any, None, 80) and covers(v6only, None, 80) and not covers(v4lo, None, 80)


def test_missing_names_the_addresses_no_process_of_ours_serves() -> None:
    a = listener()
    port = a.getsockname()[1]
    other = subprocess.Popen([sys.executable, "-c", "import sys, socket\n"
                              f"s = socket.socket(socket.AF_INET6); s.bind(('::1', {port}))\n"
                              "s.listen(); print('ok', flush=True); sys.stdin.read()"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout is not None and other.stdout.readline().strip() == "ok"
        want = [("127.0.0.1", port), ("::1", port), (None, port)]
        me = [os.getpid()]
        assert listeners.missing(want, me) == [f"[::1]:{port}", str(port)]
        assert listeners.missing(want, [other.pid]) == [f"127.0.0.1:{port}", str(port)]
        assert listeners.missing(want, me + [other.pid]) == [str(port)]
        assert listeners.missing(want, []) == [f"127.0.0.1:{port}", f"[::1]:{port}", str(port)]
        # the strays: the other process, not us (known) and not PID 1
        found = listeners.strays(want, {os.getpid()})
        comm = Path(f"/proc/{other.pid}/comm").read_text().strip()
        assert [(s["address"], s["pid"], s["comm"]) for s in found] == [
            (f"[::1]:{port}", other.pid, comm)]
        assert listeners.strays(want, {os.getpid(), other.pid}) == []
        assert listeners.strays([("127.0.0.2", port)], set()) == []  # no overlap
    finally:
        other.kill()
        other.communicate()
        a.close()


def test_missing_rereads_where_the_listener_was_and_walks_again_only_when_it_moved(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A baking instance is asked at every look whether it still holds its
    listener: the second look reads the descriptor found the first time
    (no walk of a table of thousands of connections); a listener closed
    (its descriptor number now another socket) is found missing by a walk."""
    walks: list[int] = []
    real = listeners.fd_inodes

    def counted(pid: int) -> dict[str, int]:
        walks.append(pid)
        return real(pid)

    monkeypatch.setattr(listeners, "fd_inodes", counted)
    a = listener()
    port = a.getsockname()[1]
    want, me = [("127.0.0.1", port)], [os.getpid()]
    try:
        assert listeners.missing(want, me) == [] and walks == [os.getpid()]
        assert listeners.missing(want, me) == [] and len(walks) == 1  # reread, no walk
        # the listener's descriptor now names another socket (dup2 closes the listener)
        other = socket.socket()
        fd = a.detach()
        os.dup2(other.fileno(), fd)
        try:
            assert listeners.missing(want, me) == [f"127.0.0.1:{port}"] and len(walks) == 2
            assert listeners.missing(want, me) == [f"127.0.0.1:{port}"] and len(walks) == 3
        finally:
            os.close(fd)
            other.close()
    finally:
        a.close()


def test_destroy_closes_a_listener_and_is_quiet_when_it_is_gone() -> None:
    a = listener()
    port = a.getsockname()[1]
    try:
        found = listeners.listening([port])
        assert listeners.destroy(found) == 1
        assert listeners.listening([port]) == []
        with pytest.raises(OSError) as err:
            a.accept()  # the fd is still open, the socket no longer listens
        assert err.value.errno == errno.EINVAL
        assert listeners.destroy(found) == 0  # ENOENT: already gone
        assert listeners.destroy([]) == 0
    finally:
        a.close()


def test_destroy_finds_each_member_of_a_reuseport_group() -> None:
    """The kernel's lookup picks one socket of a reuseport group by a hash of
    the request's remote port: destroy varies it until the cookie matches."""
    first = listener(reuseport=True)
    port = first.getsockname()[1]
    group = [first] + [listener(port=port, reuseport=True) for _ in range(5)]
    try:
        found = listeners.listening([port])
        assert len(found) == 6
        for i, s in enumerate(sorted(found, key=lambda s: s.cookie, reverse=True)):
            assert listeners.destroy([s]) == 1
            assert len(listeners.listening([port])) == 5 - i
    finally:
        for s in group:
            s.close()


NO_NET_ADMIN = ["setpriv", "--bounding-set", "-net_admin", "--inh-caps", "-net_admin"]


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)")
def test_destroy_without_cap_net_admin_raises_eperm() -> None:
    code = ("import socket\nfrom agent import listeners\n"
            "s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen()\n"
            "try:\n    listeners.destroy(listeners.listening([s.getsockname()[1]]))\n"
            "except OSError as e:\n    print(e.errno, e.strerror)\n")
    out = subprocess.run(NO_NET_ADMIN + [sys.executable, "-c", code], cwd=ROOT,
                         capture_output=True, text=True, timeout=20, check=True).stdout
    assert out.startswith(f"{errno.EPERM} ") and "CAP_NET_ADMIN" in out


# Two SO_REUSEPORT listeners A and B on one port in a fresh network namespace.
# A never accepts but keeps its fd; clients connect, the kernel hashes about
# half of them to A, where they wait in its accept queue. A is destroyed with
# listeners.destroy; B accepts what it can; then more clients connect. Every
# client sends its number and waits for the echo: an echo is a served client,
# a reset or EOF a failed one.
MIGRATE = r"""
import json, socket, subprocess, sys, time
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
with open("/proc/sys/net/ipv4/tcp_migrate_req", "w") as f:
    f.write(sys.argv[1])
from agent import listeners

def mk(port=0):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", port))
    s.listen(128)
    return s

N, M = int(sys.argv[2]), int(sys.argv[3])
a = mk(); port = a.getsockname()[1]; b = mk(port); b.setblocking(False)
cookie = lambda s: int.from_bytes(s.getsockopt(socket.SOL_SOCKET, 57, 8), sys.byteorder)
clients = []
def connect(k):
    for i in range(k):
        c = socket.create_connection(("127.0.0.1", port)); c.sendall(b"%4d" % len(clients))
        clients.append(c)
served_by_b = []
def accept_b(want, deadline):
    while len(served_by_b) < want and time.monotonic() < deadline:
        try:
            conn, _ = b.accept()
        except BlockingIOError:
            time.sleep(0.001); continue
        conn.setblocking(True); conn.sendall(conn.recv(4)); served_by_b.append(conn)
def queues():
    q = {s.cookie: s.queued for s in listeners.listening([port])}
    return q.get(cookie(a), 0), q.get(cookie(b), 0)

connect(N)
deadline = time.monotonic() + 2
while sum(queues()) < N and time.monotonic() < deadline:
    time.sleep(0.001)
queued_a, queued_b = queues()
accept_b(queued_b, time.monotonic() + 2)           # B serves its own share
mine = [s for s in listeners.listening([port]) if s.cookie == cookie(a)]
t0 = time.perf_counter()
destroyed = listeners.destroy(mine)
destroy_ms = (time.perf_counter() - t0) * 1000
after = {s.cookie for s in listeners.listening([port])}
# inet_csk_listen_stop moved (or reset) A's queue within the destroy call
accept_b(N, time.monotonic() + 0.1 if queues()[1] == 0 else time.monotonic() + 2)
migrated = len(served_by_b) - queued_b
connect(M)
accept_b(queued_b + migrated + M, time.monotonic() + 2)
served = failed = 0
for c in clients:
    c.settimeout(1)
    try:
        ok = c.recv(4) != b""
    except OSError:
        ok = False
    served += ok; failed += not ok
print(json.dumps(dict(queued_a=queued_a, queued_b=queued_b, destroyed=destroyed,
                      a_listed_after=cookie(a) in after, migrated_to_b=migrated,
                      new_to_b=len(served_by_b) - queued_b - migrated, served=served,
                      failed=failed, destroy_ms=round(destroy_ms, 2))))
"""


def run_migrate(migrate_req: int, n: int, m: int) -> dict:
    cmd = ["unshare", "-n", sys.executable, "-c", MIGRATE, str(migrate_req), str(n), str(m)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.skipif(shutil.which("unshare") is None or shutil.which("ip") is None,
                    reason="needs unshare and ip")
def test_destroying_a_listener_that_stopped_accepting_moves_its_queue() -> None:
    n, m = 40, 20
    moved = run_migrate(1, n, m)
    reset = run_migrate(0, n, m)
    print(f"\nSO_REUSEPORT A (never accepts) + B, {n} clients then destroy(A) then {m} more:")
    print(f"  tcp_migrate_req=1: {moved}")
    print(f"  tcp_migrate_req=0: {reset}")
    for r in (moved, reset):
        assert r["queued_a"] > 0 and r["queued_a"] + r["queued_b"] == n  # the kernel split them
        assert r["destroyed"] == 1 and not r["a_listed_after"]
        assert r["new_to_b"] == m  # after the destroy, new connections all go to B
    # with migration, A's queued connections are accepted by B: nobody fails
    assert moved["migrated_to_b"] == moved["queued_a"]
    assert (moved["served"], moved["failed"]) == (n + m, 0)
    # without it, they are reset (what closing a reuseport listener does)
    assert reset["migrated_to_b"] == 0 and reset["failed"] == reset["queued_a"]
