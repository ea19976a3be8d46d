"""TCP Fast Open on listeners held by another process (agent/fastopen.py),
against real loopback sockets (no mocks): the listener lives in this
process, the agent's side takes it with pidfd_getfd(2) on our own PID, and
getsockopt reads back what the kernel holds.

The TFO measurement runs in a network namespace of its own (`unshare -n`),
where net.ipv4.tcp_fastopen can be set and the TcpExt counters count only
this test's connections."""

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

from agent import fastopen
from agent.fastopen import FastOpenError

ROOT = Path(__file__).resolve().parents[2]


def listener(host: str = "127.0.0.1", family: int = socket.AF_INET) -> socket.socket:
    s = socket.socket(family)
    s.bind((host, 0))
    s.listen(16)
    return s


def test_pidfd_getfd_duplicates_a_socket_of_a_process() -> None:
    a = listener()
    try:
        dup = fastopen.pidfd_getfd(os.getpid(), a.fileno())
        try:
            assert dup != a.fileno()
            assert os.fstat(dup).st_ino == os.fstat(a.fileno()).st_ino
            assert os.get_inheritable(dup) is False  # pidfd_getfd sets close-on-exec
        finally:
            os.close(dup)
    finally:
        a.close()


def test_pidfd_getfd_errors_name_the_cause() -> None:
    with pytest.raises(FastOpenError, match="descriptor was closed") as e:
        fastopen.pidfd_getfd(os.getpid(), 100_000)
    assert e.value.errno == errno.EBADF
    with pytest.raises(FastOpenError, match=r"cannot open PID 999999999 \(pidfd_open\)"):
        fastopen.pidfd_getfd(999_999_999, 0)


def test_set_on_a_listening_socket_reads_back_through_every_descriptor() -> None:
    a = listener()
    try:
        assert a.getsockopt(socket.IPPROTO_TCP, socket.TCP_FASTOPEN) == 0
        dup = fastopen.pidfd_getfd(os.getpid(), a.fileno())
        try:
            fastopen.set_qlen(dup, 7)
            assert fastopen.get_qlen(dup) == 7
        finally:
            os.close(dup)
        # one socket: the holder's own descriptor sees it too
        assert a.getsockopt(socket.IPPROTO_TCP, socket.TCP_FASTOPEN) == 7
    finally:
        a.close()


def test_setsockopt_on_a_connected_socket_is_refused() -> None:
    a = listener()
    c = socket.create_connection(a.getsockname())
    try:
        with pytest.raises(FastOpenError, match="setsockopt TCP_FASTOPEN 5: Invalid argument"):
            fastopen.set_qlen(c.fileno(), 5)
    finally:
        c.close()
        a.close()


def test_ensure_sets_each_listener_once_and_is_idempotent() -> None:
    a = listener()
    port = a.getsockname()[1]
    b = socket.socket(socket.AF_INET6)
    b.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    b.bind(("::1", port))
    b.listen(8)
    other = listener()  # another port: left alone
    try:
        cap = fastopen.somaxconn()
        want = fastopen.effective(9, cap)
        found, changes = fastopen.ensure([port], [os.getpid()], 9)
        assert sorted(ln.address for ln in found) == sorted([f"127.0.0.1:{port}",
                                                             f"[::1]:{port}"])
        assert all(ln.qlen == want and ln.pid == os.getpid() for ln in found)
        assert sorted(c.old for c in changes) == [0, 0]
        assert a.getsockopt(socket.IPPROTO_TCP, socket.TCP_FASTOPEN) == want
        assert b.getsockopt(socket.IPPROTO_TCP, socket.TCP_FASTOPEN) == want
        assert other.getsockopt(socket.IPPROTO_TCP, socket.TCP_FASTOPEN) == 0
        again, changes = fastopen.ensure([port], [os.getpid()], 9)
        assert changes == [] and [ln.qlen for ln in again] == [want, want]
        # 0 turns it off again
        _, changes = fastopen.ensure([port], [os.getpid()], 0)
        assert [c.listener.qlen for c in changes] == [0, 0]
        assert [ln.qlen for ln in fastopen.read([port], [os.getpid()])] == [0, 0]
    finally:
        for s in (a, b, other):
            s.close()


def test_ensure_caps_at_somaxconn_like_the_kernel() -> None:
    a = listener()
    port = a.getsockname()[1]
    try:
        cap = fastopen.somaxconn()
        assert cap is not None
        found, _ = fastopen.ensure([port], [os.getpid()], fastopen.MAX_QLEN)
        assert [ln.qlen for ln in found] == [min(cap, fastopen.MAX_QLEN)]
        assert fastopen.ensure([port], [os.getpid()], fastopen.MAX_QLEN)[1] == []
        with pytest.raises(ValueError, match="out of range"):
            fastopen.ensure([port], [os.getpid()], fastopen.MAX_QLEN + 1)
    finally:
        a.close()


def test_nobody_holding_the_port_is_no_listener() -> None:
    a = listener()
    port = a.getsockname()[1]
    try:
        assert fastopen.read([port], [1 if os.getpid() != 1 else 2]) == []
        assert fastopen.ensure([port], [], 5) == ([], [])
    finally:
        a.close()


@pytest.mark.parametrize("value,on", [("3", True), ("2", True), ("1", False), ("0", False),
                                      ("1027", True), ("0x402", True), ("", False), (None, False),
                                      ("x", False)])
def test_server_bit(value: str | None, on: bool) -> None:
    assert fastopen.server_enabled(value) is on


# Runs as its own process in a fresh network namespace: a listener, the
# agent's ensure() on it through pidfd_getfd, TFO clients (sendto with
# MSG_FASTOPEN), and the namespace's TcpExt counters before and after.
TFO = r"""
import json, os, socket, sys
from agent import fastopen
qlen, n = int(sys.argv[1]), int(sys.argv[2])
os.system("ip link set lo up")
open("/proc/sys/net/ipv4/tcp_fastopen", "w").write("3\n")
from agent import tcpstats
KEYS = ("TCPFastOpenPassive", "TCPFastOpenCookieReqd", "TCPFastOpenPassiveFail")
def counters():  # of this process's network namespace
    return tcpstats.read(watched={"TcpExt": KEYS})
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen(64)
port = srv.getsockname()[1]
fastopen.ensure([port], [os.getpid()], qlen)
before = counters()
got = []
for _ in range(n):
    c = socket.socket()
    c.sendto(b"ping", socket.MSG_FASTOPEN, ("127.0.0.1", port))
    conn, _ = srv.accept()
    got.append(conn.recv(16).decode())
    conn.close()
    c.close()
after = counters()
print(json.dumps({"delta": {k: after[k] - before[k] for k in KEYS}, "got": got}))
"""


def run_tfo(qlen: int, n: int) -> dict:
    cmd = ["unshare", "-n", sys.executable, "-c", TFO, str(qlen), str(n)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None
                    or shutil.which("ip") is None, reason="needs root, unshare and ip")
def test_tfo_clients_send_data_in_the_syn_only_once_the_listener_has_a_queue() -> None:
    on, off = run_tfo(16, 4), run_tfo(0, 4)
    print(f"\n4 TFO connects: qlen 16 {on['delta']}; qlen 0 {off['delta']}")
    assert on["got"] == off["got"] == ["ping"] * 4  # the data arrives either way
    # the first asks for a cookie, the next three carry their data in the SYN
    assert on["delta"] == {"TCPFastOpenPassive": 3, "TCPFastOpenCookieReqd": 1,
                           "TCPFastOpenPassiveFail": 0}
    # without a queue the kernel counts each cookie request and answers none
    assert off["delta"] == {"TCPFastOpenPassive": 0, "TCPFastOpenCookieReqd": 4,
                            "TCPFastOpenPassiveFail": 0}


# ------------------------------------------------------------ config, units, doctor

BASE = {"name": "api", "command": "/opt/api/{version}/bin/api", "listen": ["127.0.0.1:8080"]}


def test_fast_open_is_off_unless_given_a_queue_length() -> None:
    from agent.config import parse_service

    assert parse_service(Path("api.yaml"), BASE).fast_open == 0
    assert parse_service(Path("api.yaml"), {**BASE, "fast_open": 256}).fast_open == 256
    assert parse_service(Path("api.yaml"), {**BASE, "fast_open": 0}).fast_open == 0
    assert parse_service(Path("api.yaml"), {**BASE, "fast_open": 65535}).fast_open == 65535


@pytest.mark.parametrize("raw,words", [
    (-1, "fast_open: -1 is out of range (allowed: 0..65535)"),
    (65536, "fast_open: 65536 is out of range (allowed: 0..65535)"),
    (True, "fast_open: True is not an integer (allowed: 0..65535)"),
    ("16", "fast_open: '16' is not an integer (allowed: 0..65535)"),
    (1.5, "fast_open: 1.5 is not an integer (allowed: 0..65535)"),
    (None, "fast_open: None is not an integer (allowed: 0..65535)"),
])
def test_bad_fast_open_is_one_clear_error(raw: object, words: str) -> None:
    from agent.config import parse_service
    from agent.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        parse_service(Path("/etc/zdd-agent/services/api.yaml"), {**BASE, "fast_open": raw})
    assert str(e.value) == f"/etc/zdd-agent/services/api.yaml: {words}"
    assert e.value.details["key"] == "fast_open"


def test_reuseport_instances_are_told_the_queue_length() -> None:
    from agent import units
    from agent.config import parse_service

    def rendered(**extra: object) -> str:
        svc = parse_service(Path("api.yaml"), {**BASE, **extra})
        return "\n".join(units.render_service(svc, 4096).files.values())

    assert '"ZDD_FAST_OPEN=64"' in rendered(socket="reuseport", fast_open=64)
    assert "ZDD_FAST_OPEN" not in rendered(socket="reuseport")
    # inherit: the agent sets it on the socket unit's listeners, not the program
    assert "ZDD_FAST_OPEN" not in rendered(fast_open=64)
    # and no FastOpen= in the socket unit: systemd has no such option
    assert "FastOpen" not in rendered(fast_open=64)
    svc = parse_service(Path("api.yaml"), {**BASE, "socket": "reuseport", "fast_open": 8,
                                           "replicas": 2})
    assert '"ZDD_FAST_OPEN=8"' in units.render_instance_dropin(svc, "v1", None, "v1-1")


def test_doctor_host_finding_needs_the_server_bit() -> None:
    from agent import doctor
    from agent.config import parse_service

    on = parse_service(Path("api.yaml"), {**BASE, "fast_open": 16})
    off = parse_service(Path("api.yaml"), BASE)
    assert doctor.fastopen_host_findings([off], "1") == []
    [f] = doctor.fastopen_host_findings([on, off], "1")
    assert (f.level, f.check) == ("fail", "fast-open")
    assert "no server bit (0x2)" in f.cause and "api" in f.symptom
    assert [f.level for f in doctor.fastopen_host_findings([on], "3")] == ["ok"]


class FakeSd:
    """The two calls fastopen_findings makes of systemd for an inherit
    service: the socket unit's state."""

    def __init__(self, active: str) -> None:
        self.active = active

    def state(self, unit: str) -> object:
        class S:
            active = self.active
        return S()


def test_doctor_reads_the_socket_units_queue_back() -> None:
    from agent import doctor
    from agent.config import parse_service

    a = listener()
    port = a.getsockname()[1]
    svc = parse_service(Path("api.yaml"), {**BASE, "listen": [f"127.0.0.1:{port}"],
                                           "fast_open": 16})
    me = os.getpid()
    try:
        sd: object = FakeSd("active")
        [f] = doctor.fastopen_findings(svc, sd, "v1", manager_pid=me)  # type: ignore[arg-type]
        assert f.level == "warn" and "TFO queue 0, wanted 16" in f.cause
        assert f.fix.startswith("zdd-agent swap api --version v1")
        fastopen.ensure([port], [me], 16)
        [f] = doctor.fastopen_findings(svc, sd, "v1", manager_pid=me)  # type: ignore[arg-type]
        assert f.level == "ok" and f.cause == f"TFO queue 16 on 127.0.0.1:{port}"
        # the config turned it off but the listener still takes SYN data
        off = parse_service(Path("api.yaml"), {**BASE, "listen": [f"127.0.0.1:{port}"]})
        [f] = doctor.fastopen_findings(off, sd, "v1", manager_pid=me)  # type: ignore[arg-type]
        assert f.level == "warn" and "replayed" in f.symptom
        # the socket unit not running: nothing to read
        assert doctor.fastopen_findings(svc, FakeSd("inactive"), "v1",  # type: ignore[arg-type]
                                        manager_pid=me) == []
    finally:
        a.close()


class FakeInstanceSd:
    """What fastopen_findings asks of systemd for a reuseport service: its
    running instances and their processes (this one)."""

    def list_units(self, pattern: str) -> list[str]:
        return ["zdd-api@v1.service"]

    def state(self, unit: str) -> object:
        class S:
            active = "active"
        return S()

    def read_unit_file(self, rel: str) -> None:
        return None

    def processes(self, unit: str) -> list[int]:
        return [os.getpid()]


def test_doctor_reads_each_reuseport_instances_own_listener() -> None:
    from agent import doctor
    from agent.config import parse_service

    a = listener()
    port = a.getsockname()[1]
    svc = parse_service(Path("api.yaml"), {**BASE, "listen": [f"127.0.0.1:{port}"],
                                           "socket": "reuseport", "fast_open": 16})
    sd: object = FakeInstanceSd()
    try:
        [f] = doctor.fastopen_findings(svc, sd, "v1")  # type: ignore[arg-type]
        assert f.level == "warn" and "the program does not set TCP_FASTOPEN" in f.cause
        assert f"(PID {os.getpid()})" in f.cause and "ZDD_FAST_OPEN" in f.fix
        # what the docs tell the program to do, before listen() or after
        a.setsockopt(socket.IPPROTO_TCP, socket.TCP_FASTOPEN, 16)
        [f] = doctor.fastopen_findings(svc, sd, "v1")  # type: ignore[arg-type]
        assert f.level == "ok"
        off = parse_service(Path("api.yaml"), {**BASE, "listen": [f"127.0.0.1:{port}"],
                                               "socket": "reuseport"})
        assert doctor.fastopen_findings(off, sd, "v1") == []  # type: ignore[arg-type]
    finally:
        a.close()


def test_the_drain_kit_sets_the_queue_from_zdd_fast_open(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket as so

    import zdd_drain

    monkeypatch.setenv("ZDD_FAST_OPEN", "32")
    s = zdd_drain.bind_reuseport("127.0.0.1:0")
    try:
        assert s.getsockopt(so.IPPROTO_TCP, so.TCP_FASTOPEN) == 32
    finally:
        s.close()
    monkeypatch.delenv("ZDD_FAST_OPEN")
    s = zdd_drain.bind_reuseport("127.0.0.1:0")
    try:
        assert s.getsockopt(so.IPPROTO_TCP, so.TCP_FASTOPEN) == 0
    finally:
        s.close()
