"""The control socket's select loop against real Unix sockets (no daemon)."""

from __future__ import annotations

import selectors
import socket
from pathlib import Path

import pytest

from agent import daemon


def test_a_client_evicted_in_the_same_round_is_skipped(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(daemon, "MAX_CLIENTS", 2)
    lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lst.bind(str(tmp_path / "c.sock"))
    lst.listen(16)
    got: list[bytes] = []
    server = daemon.ControlServer(lst, lambda conn, peer, line: got.append(line))
    lst.setblocking(False)
    server.sel.register(lst, selectors.EVENT_READ)
    clients = [socket.socket(socket.AF_UNIX) for _ in range(3)]
    try:
        for c in clients[:2]:
            c.connect(str(tmp_path / "c.sock"))
        server.handle([(server.sel.get_key(lst), selectors.EVENT_READ)])
        oldest = min(server.clients.values(), key=lambda c: c.deadline)
        stale = server.sel.get_key(oldest.conn)
        clients[0].sendall(b'{"v":1,"cmd":"status"}\n')
        clients[2].connect(str(tmp_path / "c.sock"))
        # one round: the listener first (a third client evicts the oldest),
        # then the evicted client's own event
        server.handle([(server.sel.get_key(lst), selectors.EVENT_READ),
                       (stale, selectors.EVENT_READ)])
        assert len(server.clients) == 2 and oldest not in server.clients.values()
        assert got == []  # the evicted client's request was not read
    finally:
        for x in list(server.clients.values()):
            server._drop(x)
        for c in clients:
            c.close()
        server.sel.close()
        lst.close()


def test_other_users_never_take_the_admins_slots() -> None:
    b = daemon.Budget()
    # one local user: at most MAX_WORKERS_PER_UID at once
    taken = [b.take(1000, admin=False) for _ in range(daemon.MAX_WORKERS_PER_UID + 1)]
    assert taken[:-1] == [None] * daemon.MAX_WORKERS_PER_UID
    assert taken[-1] is not None and "uid 1000" in taken[-1]
    # many users: MAX_OTHER_WORKERS between them
    uid = 2000
    while b.take(uid, admin=False) is None:
        uid += 1
    assert sum(b.others.values()) == daemon.MAX_OTHER_WORKERS
    assert "other users" in (b.take(99999, admin=False) or "")
    # the admins' slots are all still there
    assert [b.take(0, admin=True) for _ in range(daemon.MAX_ADMIN_WORKERS)] == \
        [None] * daemon.MAX_ADMIN_WORKERS
    assert "admin group" in (b.take(0, admin=True) or "")
    b.give(0, admin=True)
    assert b.take(0, admin=True) is None
    for _ in range(daemon.MAX_WORKERS_PER_UID):
        b.give(1000, admin=False)
    assert 1000 not in b.others and b.take(1000, admin=False) is None


def test_refusals_are_logged_once_per_user_and_kind_per_period(
        monkeypatch: pytest.MonkeyPatch) -> None:
    lines: list[str] = []
    monkeypatch.setattr(daemon, "log", lambda kind, msg, prio, **kw: lines.append(msg))
    now = [100.0]
    t = daemon.Throttle(every=10.0, clock=lambda: now[0])
    storm, admin = daemon.Peer(7, 1000, 1000), daemon.Peer(8, 0, 0)
    logged = [t.log(storm, "busy", "busy", 4) for _ in range(500)]
    assert logged.count(True) == 1 and lines == ["busy"]
    assert t.log(storm, "bad", "bad request", 4)  # another kind: its own line
    assert t.log(admin, "busy", "root busy", 4)  # another user: its own line
    now[0] += 10.0
    assert t.log(storm, "busy", "busy again", 4)
    assert lines[-1] == "busy again (499 more like it from uid 1000 not logged)"


def test_one_users_burst_evicts_its_own_connections_not_anothers(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(daemon, "MAX_CLIENTS", 10)
    monkeypatch.setattr(daemon, "MAX_CLIENTS_PER_UID", 6)
    lst = socket.socket(socket.AF_UNIX)
    server = daemon.ControlServer(lst, lambda *a: None)
    pairs = []

    def client(uid: int, deadline: float) -> daemon._Client:
        a, b = socket.socketpair()
        pairs.append((a, b))
        c = daemon._Client(a, daemon.Peer(1, uid, uid), deadline)
        server.clients[a.fileno()] = c
        return c

    try:
        admin = client(0, 1.0)  # the oldest of all
        storm = [client(1000, 2.0 + i) for i in range(6)]
        # the storming user at its own cap: its own oldest goes, not root's
        assert server._victim(1000) is storm[0]
        others = [client(2000 + i, 10.0 + i) for i in range(3)]
        assert len(server.clients) == 10
        # all full: a new root client displaces the biggest holder's oldest
        assert server._victim(0) is storm[0]
        assert server._victim(3000) is storm[0]
        assert admin not in (server._victim(0), server._victim(1000))
        assert all(server._victim(0) is not o for o in others)
    finally:
        for a, b in pairs:
            a.close()
            b.close()
        server.sel.close()
        lst.close()


def test_other_users_get_no_swap_reason_in_status() -> None:
    """A reason may quote a hook's output ("pre_swap hook failed: ...")."""
    rows = [{"service": "api", "last_swap": {"result": "aborted", "to_version": "v3",
                                             "reason": "pre_swap hook failed: secret=hunter2"}},
            {"service": "web", "last_swap": {"result": "ok", "reason": ""}},
            {"service": "new", "last_swap": None}]
    out = daemon.redact("status", rows)
    assert "hunter2" not in repr(out)
    assert out[0]["last_swap"]["result"] == "aborted" and out[0]["last_swap"]["to_version"] == "v3"
    assert "zdd-agent history" in out[0]["last_swap"]["reason"]
    assert out[1]["last_swap"]["reason"] == "" and out[2]["last_swap"] is None
    assert daemon.redact("doctor", {"x": 1}) == {"x": 1}


def test_recovery_may_last_as_long_as_the_services_limits(tmp_path: Path) -> None:
    """Review of issue 13: a grace period of up to 1 h was accepted while
    recovery's extension of the start timeout stopped at 15 min."""
    from agent.config import load_agent_config
    from agent.deploy import Paths

    tmp_path.chmod(0o755)
    services = tmp_path / "services"
    services.mkdir(mode=0o755)
    agent_yaml = tmp_path / "agent.yaml"
    agent_yaml.write_text("{}\n")
    agent_yaml.chmod(0o644)
    d = daemon.Daemon(Paths(config_dir=services, state_dir=tmp_path / "state",
                            agent_config=agent_yaml), load_agent_config(agent_yaml))
    assert d.recovery_limit() == daemon.RECOVERY_LIMIT  # no service: the floor
    cfg = services / "api.yaml"
    cfg.write_text("name: api\ncommand: /bin/true\nlisten: ['127.0.0.1:8080']\n"
                   "replicas: 2\nready: {type: notify, deadline: 60s}\n"
                   "drain: {grace_period: 1h, pre_stop_delay: 10s}\n"
                   "strategy: {min_ready: 5s}\n")
    cfg.chmod(0o644)
    assert d.recovery_limit() == 2 * (60 + 5 + 10 + 3600) + 60


def test_a_stopping_daemon_serves_whom_it_accepted_and_leaves_the_rest_queued(
        tmp_path: Path) -> None:
    """A restart (an upgrade: systemd keeps the socket) must fail no command:
    a client accepted before the stop still has its request read and
    dispatched; one that connects after it waits in the socket's queue for
    the next daemon, unread (it was reset when the daemon closed it)."""
    import threading
    import time

    path = str(tmp_path / "c.sock")
    lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lst.bind(path)
    lst.listen(16)
    got: list[bytes] = []
    server = daemon.ControlServer(lst, lambda conn, peer, line: (got.append(line), conn.close()))
    thread = threading.Thread(target=server.run, daemon=True)
    early, late = socket.socket(socket.AF_UNIX), socket.socket(socket.AF_UNIX)
    try:
        thread.start()
        early.connect(path)
        deadline = time.monotonic() + 5
        while not server.clients and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(server.clients) == 1  # accepted, its request not sent yet
        server.stopping.set()
        time.sleep(0.6)  # the loop has seen it: it accepts no more
        late.connect(path)
        late.sendall(b'{"v":1,"cmd":"status"}\n')
        early.sendall(b'{"v":1,"cmd":"host-state"}\n')
        thread.join(timeout=daemon.STOP_GRACE + 2)
        assert not thread.is_alive()
        assert got == [b'{"v":1,"cmd":"host-state"}']
        # the late one is still queued, whole, for the next daemon
        lst.setblocking(True)
        lst.settimeout(1)
        conn, _ = lst.accept()
        with conn:
            assert conn.recv(100) == b'{"v":1,"cmd":"status"}\n'
    finally:
        server.stopping.set()
        early.close()
        late.close()
        server.sel.close()
        lst.close()
