"""agent/systemd.py's pure parts (the rest needs a systemd: tests/e2e)."""

from __future__ import annotations

import os

import pytest

from agent.systemd import exit_description, unit_path


@pytest.mark.parametrize(("code", "status", "words"), [
    (1, 0, "exited 0"), (1, 3, "exited 3"), (2, 15, "killed by SIGTERM"),
    (2, 9, "killed by SIGKILL"), (3, 6, "killed by SIGABRT (core dumped)"), (0, 0, "")])
def test_exit_description_from_exec_main_code_and_status(code: int, status: int,
                                                         words: str) -> None:
    assert exit_description(code, status) == words


# what systemd 252's LoadUnit answered for these names (a sandbox, 2026-12-01):
# the agent reads properties on the path it computes, without a LoadUnit
@pytest.mark.parametrize(("unit", "path"), [
    ("zdd-api@v1.service", "zdd_2dapi_40v1_2eservice"),
    ("zdd-api@v1-2.1_x.service", "zdd_2dapi_40v1_2d2_2e1_5fx_2eservice"),
    ("systemd-journald.service", "systemd_2djournald_2eservice"),
    ("9foo.socket", "_39foo_2esocket"), ("a\\x2db.service", "a_5cx2db_2eservice")])
def test_a_units_object_path_is_the_one_systemd_gives(unit: str, path: str) -> None:
    assert unit_path(unit) == b"/org/freedesktop/systemd1/unit/" + path.encode()


def _peer(path: str, *acts: tuple[str, float]) -> int:
    """A D-Bus peer on a Unix socket at `path`, in a child process (pystemd
    holds the GIL inside sd_bus_call). For each act in turn:
    ("reply", s): accept a connection, take the client's SASL EXTERNAL
    handshake, answer its first method call with an empty method return s
    seconds later (D-Bus specification, "Message Format"); ("drop", 0): the
    same, but close the connection instead of answering (systemd
    re-executing); ("gone", s): remove the socket for s seconds (systemd
    not listening yet). Each call it read is appended to `path`.log.
    Returns its PID."""
    import os
    import socket
    import struct
    import time

    def listen() -> socket.socket:
        srv = socket.socket(socket.AF_UNIX)
        srv.bind(path)
        srv.listen(4)
        return srv

    srv = listen()
    pid = os.fork()
    if pid:
        srv.close()
        return pid
    try:
        conn, msg = None, b""
        for act, s in acts:
            if act == "gone":
                srv.close()
                os.unlink(path)
                time.sleep(s)
                srv = listen()
                continue
            if conn is None:
                conn, _ = srv.accept()
                conn.settimeout(10)
                buf = b""
                while b"BEGIN\r\n" not in buf:  # sd-bus sends its lines at once
                    buf += conn.recv(4096)
                for line in buf.split(b"BEGIN\r\n")[0].lstrip(b"\0").split(b"\r\n"):
                    if line == b"AUTH EXTERNAL":  # no initial response: DATA has it
                        conn.sendall(b"DATA\r\n")
                    elif line.startswith((b"AUTH EXTERNAL ", b"DATA")):
                        conn.sendall(b"OK " + b"0" * 32 + b"\r\n")
                    elif line == b"NEGOTIATE_UNIX_FD":
                        conn.sendall(b"AGREE_UNIX_FD\r\n")
                msg = buf.split(b"BEGIN\r\n", 1)[1]
            while len(msg) < 16 or len(msg) < 16 + struct.unpack_from("<I", msg, 12)[0]:
                msg += conn.recv(4096)
            # fixed header, fields array (its length at byte 12, padded to 8), body
            fields_end = 16 + struct.unpack_from("<I", msg, 12)[0]
            end = fields_end + (-fields_end % 8) + struct.unpack_from("<I", msg, 4)[0]
            while len(msg) < end:
                msg += conn.recv(4096)
            with open(f"{path}.log", "ab") as log:
                log.write(msg[:end] + b"\n")
            serial = struct.unpack_from("<I", msg, 8)[0]
            msg = msg[end:]
            if act == "drop":
                conn.close()
                conn, msg = None, b""
                continue
            time.sleep(s)
            # header field REPLY_SERIAL (5), variant of signature "u"
            fields = struct.pack("<BBBBI", 5, 1, ord("u"), 0, serial)
            reply = struct.pack("<ccBBIII", b"l", b"\x02", 0, 1, 0, 1, len(fields)) + fields
            conn.sendall(reply + b"\0" * (-len(reply) % 8))
        time.sleep(1)
    finally:
        os._exit(0)


def _calls(path: str, member: bytes) -> int:
    with open(f"{path}.log", "rb") as log:
        return log.read().count(member)


@pytest.mark.parametrize("deferring", [True, False])
def test_a_signal_during_a_dbus_call_waits_for_the_reply(tmp_path, deferring: bool) -> None:
    """A handled signal arriving while sd_bus_call waits for systemd's reply
    made the call fail with EINTR after systemd had the request (a --local
    swap's SIGINT rolled back on "DBusInterruptedError" instead of saying it
    was interrupted). The agent's bus holds such signals back until the
    reply is in, then runs the handler; pystemd's own bus shows the fault."""
    import os
    import signal
    import time

    from pystemd import dbuslib

    from agent.systemd import bus_class

    path = str(tmp_path / "bus")
    pid = _peer(path, ("reply", 0.5))
    seen: list[float] = []
    previous = signal.signal(signal.SIGALRM, lambda *_: seen.append(time.monotonic()))
    try:
        cls = bus_class("DBusAddress") if deferring else dbuslib.DBusAddress
        bus = cls(f"unix:path={path}".encode(), peer_to_peer=True)
        bus.open()
        signal.setitimer(signal.ITIMER_REAL, 0.1)
        start = time.monotonic()
        if deferring:
            bus.call_method(b"org.example", b"/", b"org.example.I", b"Ping", [])
            assert time.monotonic() - start >= 0.4  # the reply came, after the signal
            assert len(seen) == 1 and seen[0] - start >= 0.4  # its handler ran after
        else:
            with pytest.raises(InterruptedError):
                bus.call_method(b"org.example", b"/", b"org.example.I", b"Ping", [])
            assert len(seen) == 1
        bus.close()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


@pytest.mark.parametrize("gone", [0.0, 0.4])
def test_a_call_survives_systemd_reexecuting(tmp_path, gone: float) -> None:
    """systemd closes its private socket's connections when it re-executes
    (daemon-reexec, a package upgrade) and listens again once it has
    deserialized its state: a swap in its bake rolled back on
    "DBusDisconnectedError: Connection reset by peer". The agent's bus sends
    the call again on a new connection, waiting while the socket is gone;
    pystemd's own bus shows the fault."""
    import os
    import signal
    import time

    from pystemd import dbuslib

    from agent.systemd import bus_class

    for cls in (bus_class("DBusAddress"), dbuslib.DBusAddress):
        path = str(tmp_path / cls.__name__)
        pid = _peer(path, ("reply", 0), ("drop", 0), ("gone", gone), ("reply", 0))
        try:
            bus = cls(f"unix:path={path}".encode(), peer_to_peer=True)
            bus.open()
            bus.call_method(b"org.example", b"/", b"org.example.I", b"First", [])
            start = time.monotonic()
            if cls is dbuslib.DBusAddress:
                with pytest.raises(Exception, match="Connection reset|Disconnected"):
                    bus.call_method(b"org.example", b"/", b"org.example.I", b"Again", [])
                bus.close()
                continue
            bus.call_method(b"org.example", b"/", b"org.example.I", b"Again", [])
            assert time.monotonic() - start >= gone  # it waited for the socket
            assert _calls(path, b"Again") == 2  # sent on the dropped and the new connection
            bus.close()
            bus.close()  # a second close frees nothing twice
        finally:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


def test_a_call_that_is_not_the_same_twice_is_not_resent(tmp_path) -> None:
    """StartTransientUnit in mode "fail" (and KillUnit) sent again would be a
    second action: its disconnection is the caller's error."""
    import os
    import signal

    from agent.systemd import NOT_RESENT, bus_class

    path = str(tmp_path / "bus")
    pid = _peer(path, ("drop", 0), ("reply", 0))
    try:
        bus = bus_class("DBusAddress")(f"unix:path={path}".encode(), peer_to_peer=True)
        bus.open()
        assert b"StartTransientUnit" in NOT_RESENT
        with pytest.raises(Exception, match="Connection reset|Disconnected"):
            bus.call_method(b"org.freedesktop.systemd1", b"/org/freedesktop/systemd1",
                            b"org.freedesktop.systemd1.Manager", b"StartTransientUnit", [])
        assert _calls(path, b"StartTransientUnit") == 1
        bus.close()
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


@pytest.mark.parametrize(("errno_", "name", "opening", "gone"), [
    (-104, b"org.freedesktop.DBus.Error.Disconnected", False, True),
    (-104, None, False, True), (-107, None, False, True), (-32, None, False, True),
    (-111, None, False, True), (-2, None, True, True),
    # systemd's answers, never a reason to send again: a unit it has not
    # loaded carries ENOENT too (ResetFailedUnit was resent for 30 s)
    (-2, b"org.freedesktop.systemd1.NoSuchUnit", False, False),
    (-2, None, False, False), (-2, b"org.freedesktop.DBus.Error.FileNotFound", False, False),
    (-22, b"org.freedesktop.DBus.Error.InvalidArgs", False, False),
    (-110, None, False, False), (-4, None, False, False)])
def test_only_a_lost_connection_is_gone(errno_: int, name: bytes | None, opening: bool,
                                        gone: bool) -> None:
    from pystemd.dbusexc import DBusError

    from agent.systemd import _gone

    assert _gone(DBusError(errno_, name, b"message"), opening=opening) is gone


@pytest.mark.parametrize(("need", "listed", "present", "reloads"), [
    (False, ["zdd-api@v2.service.d/zdd.conf"], True, False),  # loaded with it: none
    (True, ["zdd-api@v2.service.d/zdd.conf"], True, True),  # changed since it was loaded
    # loaded without the drop-in just written, and systemd does not say so
    # (a stale drop-in directory cache, or systemd#31752): reload
    (False, [], True, True),
    (False, ["zdd-api@v2.service.d/zdd.conf"], False, True),  # removed, still applied
    (False, [], False, False),
])
def test_a_drop_in_is_reloaded_for_only_when_systemd_lacks_it(
        tmp_path, need: bool, listed: list[str], present: bool, reloads: bool) -> None:
    from agent.systemd import Systemd

    sd = Systemd(unit_dir=tmp_path)
    props = {"NeedDaemonReload": need,
             "DropInPaths": [str(tmp_path / p).encode() for p in listed]}
    sd._get = lambda unit, iface, prop, sig: props[prop]  # type: ignore[method-assign]
    calls: list[str] = []
    sd.reload = lambda: calls.append("reload")  # type: ignore[method-assign]
    assert sd.reload_for("zdd-api@v2.service", "zdd-api@v2.service.d/zdd.conf",
                         present) is reloads
    assert calls == (["reload"] if reloads else [])


class _LateSignalBus:
    """A bus whose PropertiesChanged with the exit arrives `after` seconds
    after the read (systemd collected the unit before it sent the signal):
    its fd turns readable then, and process() dispatches it."""

    def __init__(self, sd, path: bytes, after: float) -> None:
        import threading

        self.sd, self.path = sd, path
        self.r, self.w = os.pipe()
        self.pending = False
        self.timer = threading.Timer(after, lambda: os.write(self.w, b"x"))
        self.timer.start()

    def get_fd(self) -> int:
        return self.r

    def process(self):
        import select
        from types import SimpleNamespace

        ready = bool(select.select([self.r], [], [], 0)[0])
        if ready:
            os.read(self.r, 1)
            msg = SimpleNamespace(
                process_reply=lambda _raw: None, get_path=lambda: self.path,
                body=(b"org.freedesktop.systemd1.Service",
                      {b"ExecMainCode": 1, b"ExecMainStatus": 0}, []))
            self.sd._on_change(msg)
        return SimpleNamespace(is_empty=lambda: not ready)


@pytest.mark.parametrize("after, job, expect", [
    (0.05, "", "exited 0"),  # the signal comes: the exit is the signal's
    (5.0, "", ""),  # it does not come in time: unknown, and the read is not held long
    (0.05, "start", ""),  # a unit with a job is starting, not collected: no wait
])
def test_a_collected_units_exit_waits_briefly_for_its_signal(
        tmp_path, after: float, job: str, expect: str) -> None:
    import time

    from agent import systemd
    from agent.systemd import Systemd, unit_path

    unit = "zdd-api@v1.service"
    sd = Systemd(unit_dir=tmp_path)
    sd._bus = bus = _LateSignalBus(sd, unit_path(unit), after)
    sd._watched.add(unit_path(unit))
    t0 = time.monotonic()
    try:
        assert sd._exit(unit, "inactive", job, "") == expect
        took = time.monotonic() - t0
        assert took < systemd.EXIT_SIGNAL_WAIT + 0.1
        if job:
            assert took < 0.02
    finally:
        bus.timer.cancel()
        bus.timer.join()
        os.close(bus.r)
        os.close(bus.w)


class _RecordingBus:
    """A bus that records, in order, the signal matches added and the
    manager methods called; `opens` counts its connections, as bus_class's
    does; nothing ever comes on it."""

    opens = 1

    def __init__(self) -> None:
        self.log: list[tuple[str, bytes]] = []
        self.r, self.w = os.pipe()

    def get_fd(self) -> int:
        return self.r

    def process(self):
        from types import SimpleNamespace

        return SimpleNamespace(is_empty=lambda: True)

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)

    def match_signal(self, _sender, path: bytes, _iface, _member, _cb) -> None:
        self.log.append(("match", path))

    def call_method(self, _dest, _path, _iface, method: bytes, _args):
        from types import SimpleNamespace

        self.log.append(("call", method))
        return SimpleNamespace(body=b"/org/freedesktop/systemd1/unit/x")


@pytest.mark.parametrize("action, method", [
    ("start", b"StartUnit"), ("restart", b"RestartUnit"), ("stop", b"StopUnit")])
def test_a_unit_is_watched_before_it_is_started_or_stopped(
        tmp_path, action: str, method: bytes) -> None:
    """An instance that ends at once and that nothing refers to is collected
    by systemd with its exit: the match for its PropertiesChanged must be in
    place before the job is queued, not at the next wait (an e2e run read
    the exit of a stopped unit as unknown 2 times in 8 without it)."""
    from agent.systemd import Systemd, unit_path

    unit = "zdd-api@v1.service"
    sd = Systemd(unit_dir=tmp_path)
    sd._bus = bus = _RecordingBus()
    sd._private = True
    try:
        getattr(sd, action)(unit)
        matches = [i for i, (kind, _) in enumerate(bus.log) if kind == "match"]
        assert [bus.log[i][1] for i in matches] == [unit_path(unit)]
        assert matches[0] < bus.log.index(("call", method))
        getattr(sd, action)(unit)  # once per unit and connection
        assert sum(kind == "match" for kind, _ in bus.log) == 1
    finally:
        bus.close()


def test_a_connection_replaced_under_a_start_or_stop_is_news_once(tmp_path) -> None:
    """The signals sent while the connection was being replaced are lost: the
    next wait_change says something may have changed (True at once), and only
    that one; the matches are added again on the new connection."""
    from agent.systemd import Systemd

    unit = "zdd-api@v1.service"
    sd = Systemd(unit_dir=tmp_path)
    sd._bus = bus = _RecordingBus()
    sd._private = True
    try:
        sd.start(unit)
        assert sd.wait_change([unit], 0) is False  # first connection: no news
        bus.opens = 2  # a call reconnected underneath (systemd re-executed)
        sd.stop(unit)
        assert sum(kind == "match" for kind, _ in bus.log) == 2
        assert sd.wait_change([unit], 0) is True
        assert sd.wait_change([unit], 0) is False
    finally:
        bus.close()
