"""agent/systemd.py's pure parts (the rest needs a systemd: tests/e2e)."""

from __future__ import annotations

import pytest

from agent.systemd import exit_description


@pytest.mark.parametrize(("code", "status", "words"), [
    (1, 0, "exited 0"), (1, 3, "exited 3"), (2, 15, "killed by SIGTERM"),
    (2, 9, "killed by SIGKILL"), (3, 6, "killed by SIGABRT (core dumped)"), (0, 0, "")])
def test_exit_description_from_exec_main_code_and_status(code: int, status: int,
                                                         words: str) -> None:
    assert exit_description(code, status) == words


def _slow_peer(path: str, delay: float) -> int:
    """A D-Bus peer on a Unix socket at `path`, in a child process (pystemd
    holds the GIL inside sd_bus_call): it takes the client's SASL EXTERNAL
    handshake, answers the first method call with an empty method return
    `delay` seconds later (D-Bus specification, "Message Format"), and
    exits. Returns its PID."""
    import os
    import socket
    import struct
    import time

    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(1)
    pid = os.fork()
    if pid:
        srv.close()
        return pid
    try:
        conn, _ = srv.accept()
        conn.settimeout(10)
        buf = b""
        while b"BEGIN\r\n" not in buf:  # sd-bus sends its lines at once
            buf += conn.recv(4096)
        for line in buf.split(b"BEGIN\r\n")[0].lstrip(b"\0").split(b"\r\n"):
            if line == b"AUTH EXTERNAL":  # no initial response: the DATA line has it
                conn.sendall(b"DATA\r\n")
            elif line.startswith((b"AUTH EXTERNAL ", b"DATA")):
                conn.sendall(b"OK " + b"0" * 32 + b"\r\n")
            elif line == b"NEGOTIATE_UNIX_FD":
                conn.sendall(b"AGREE_UNIX_FD\r\n")
        msg = buf.split(b"BEGIN\r\n", 1)[1]
        while len(msg) < 16:
            msg += conn.recv(4096)
        serial = struct.unpack_from("<I", msg, 8)[0]
        time.sleep(delay)
        # header field REPLY_SERIAL (5), variant of signature "u"
        fields = struct.pack("<BBBBI", 5, 1, ord("u"), 0, serial)
        reply = struct.pack("<ccBBIII", b"l", b"\x02", 0, 1, 0, 1, len(fields)) + fields
        conn.sendall(reply + b"\0" * (-len(reply) % 8))
        time.sleep(1)
    finally:
        os._exit(0)


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
    pid = _slow_peer(path, delay=0.5)
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
