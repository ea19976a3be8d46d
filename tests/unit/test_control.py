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
