"""The accept trial against real loopback sockets and real processes (no
mocks): which process accepts a connection is the kernel's answer."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

from agent.census import Census
from agent.config import Listen
from agent.trial import accept_trial, connect_address

# A server process: takes a listening socket (an inherited fd, or its own
# SO_REUSEPORT one on the port in argv), accepts and holds every connection,
# or never accepts ("idle"). It prints "up" once it listens.
SERVER = r"""
import socket, sys, time
mode, port = sys.argv[1], int(sys.argv[2])
if port:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", port))
    s.listen(64)
else:
    s = socket.socket(fileno=int(sys.argv[3]))
print("up", flush=True)
held = []
if mode == "idle":
    time.sleep(60)
while True:
    c, _ = s.accept()
    held.append(c)
"""


def server(mode: str, port: int = 0, inherit: socket.socket | None = None) -> subprocess.Popen:
    fd = inherit.fileno() if inherit is not None else -1
    p = subprocess.Popen([sys.executable, "-c", SERVER, mode, str(port), str(fd)],
                         stdout=subprocess.PIPE, text=True,
                         pass_fds=(fd,) if inherit is not None else ())
    assert p.stdout is not None and p.stdout.readline().strip() == "up"
    return p


@pytest.fixture
def procs():
    started: list[subprocess.Popen] = []
    yield started
    for p in started:
        p.kill()
        p.wait()
        assert p.stdout is not None
        p.stdout.close()


def reuseport_servers(procs: list[subprocess.Popen], *modes: str
                      ) -> tuple[int, list[subprocess.Popen]]:
    """A free port and one server per mode, each with its own SO_REUSEPORT
    listener on it (the port is held by a bound socket until they listen)."""
    with socket.socket() as hold:
        hold.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        hold.bind(("127.0.0.1", 0))
        port = hold.getsockname()[1]
        started = [server(mode, port) for mode in modes]
    procs += started
    return port, started


def trial(port: int, groups: dict[str, subprocess.Popen], count: int = 20):
    census = Census([port], [socket.AF_INET])
    return accept_trial(census, lambda: {x: [p.pid] for x, p in groups.items()},
                        Listen("127.0.0.1", port), count)


def test_a_shared_listener_one_accepting_one_not(procs) -> None:
    shared = socket.socket()
    shared.bind(("127.0.0.1", 0))
    shared.listen(64)
    port = shared.getsockname()[1]
    works, idle = server("accept", inherit=shared), server("idle", inherit=shared)
    procs += [works, idle]
    shared.close()
    res = trial(port, {"works": works, "idle": idle})
    assert res.opened == 20 and res.unaccepted == 0
    assert res.accepted == {"works": 20}
    assert res.elsewhere("idle") == 20 and res.target == f"127.0.0.1:{port}"


def test_two_reuseport_listeners_both_accepting_share_the_connections(procs) -> None:
    port, (a, b) = reuseport_servers(procs, "accept", "accept")
    res = trial(port, {"a": a, "b": b}, count=40)
    # the kernel hashes each connection's 4-tuple to a listener
    assert res.unaccepted == 0 and sum(res.accepted.values()) == 40
    assert res.accepted.get("a", 0) > 0 and res.accepted.get("b", 0) > 0, res


def test_a_reuseport_listener_that_never_accepts_keeps_its_share_queued(procs) -> None:
    port, (works, idle) = reuseport_servers(procs, "accept", "idle")
    t0 = time.monotonic()
    res = trial(port, {"works": works, "idle": idle})
    took = time.monotonic() - t0
    assert res.opened == 20 and "idle" not in res.accepted
    assert res.unaccepted > 0 and res.accepted["works"] == 20 - res.unaccepted
    print(f"\nreuseport, one listener never accepts: {res.as_dict()} in {took:.2f}s")


def test_nothing_listening_is_an_error_not_a_verdict() -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(ConnectionRefusedError):
        trial(port, {})


def test_wildcard_addresses_are_reached_on_loopback() -> None:
    assert connect_address(Listen(None, 80)) == (socket.AF_INET, ("127.0.0.1", 80))
    assert connect_address(Listen("0.0.0.0", 80)) == (socket.AF_INET, ("127.0.0.1", 80))
    assert connect_address(Listen("::", 80)) == (socket.AF_INET6, ("::1", 80))
    assert connect_address(Listen("10.1.2.3", 80)) == (socket.AF_INET, ("10.1.2.3", 80))


def test_the_looks_after_each_connect_start_close_together_and_space_out(procs) -> None:
    """A server that accepts does so within a millisecond on loopback: the
    first look after a connect comes TRIAL_POLL_FIRST later, and the waits
    double up to TRIAL_POLL while nobody has taken it (the nat private
    trial's eight connections took about 100 ms at a look every 10 ms)."""
    from agent import trial as trial_mod

    port, (idle,) = reuseport_servers(procs, "idle")
    waits: list[float] = []

    def sleep(s: float) -> None:
        waits.append(s)
        time.sleep(s)

    census = Census([port], [socket.AF_INET])
    res = accept_trial(census, lambda: {"idle": [idle.pid]}, Listen("127.0.0.1", port), 1,
                       sleep=sleep)
    assert res.unaccepted == 1
    assert waits[0] == trial_mod.TRIAL_POLL_FIRST < trial_mod.TRIAL_POLL
    assert waits[1] == 2 * waits[0] and max(waits) == trial_mod.TRIAL_POLL
    assert all(b >= a for a, b in zip(waits, waits[1:]))
