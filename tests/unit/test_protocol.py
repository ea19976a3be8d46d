"""Control protocol decoding and caller checks (pure)."""

from __future__ import annotations

import json
import os

import pytest

from agent import protocol
from agent.daemon import Peer, may_change
from agent.errors import SwapFailed


def req(**kw: object) -> bytes:
    return json.dumps({"v": 1, **kw}).encode()


def test_good_requests() -> None:
    r = protocol.decode_request(req(cmd="swap", args={"service": "api", "version": "v2"}))
    assert r.cmd == "swap" and r.admin_only and r.args == {"service": "api", "version": "v2"}
    assert not protocol.decode_request(req(cmd="status")).admin_only
    # its reasons carry hook output and journal lines: not for everyone who can connect
    assert protocol.decode_request(req(cmd="history")).admin_only
    assert protocol.decode_request(protocol.request("history", service=None, limit=5).strip()) \
        .args == {"limit": 5}


@pytest.mark.parametrize("line,words", [
    (b"{not json", "not JSON"),
    (b"[1, 2]", "JSON object"),
    (req(cmd="swap", args={"service": "api"}), "missing argument(s) version"),
    (req(cmd="swap", args={"service": "api", "version": "v2", "force": True}),
     "unknown argument(s) 'force'"),
    (req(cmd="reboot"), "unknown command"),
    (json.dumps({"v": 2, "cmd": "status"}).encode(), "protocol version 2"),
    (req(cmd="swap", args={"service": "../x", "version": "v2"}), "invalid service name"),
    (req(cmd="swap", args={"service": "api", "version": "v2;rm"}), "invalid version"),
    (req(cmd="history", args={"limit": 10**6}), "limit must be"),
    (req(cmd="status", args=[]), "args must be"),
    (b"x" * (protocol.MAX_REQUEST + 1), "over the limit"),
    (b"[" * 60_000, "nested too deeply"),  # was RecursionError: killed the worker thread
    (b'{"v": 1, "cmd": []}', "unknown command []"),  # was TypeError (unhashable)
    (b'{"v": 1, "cmd": {"a": 1}}', "unknown command {'a': 1}"),
    (b"9" * 5000, "not JSON"),  # past Python's 4,300-digit int limit: a ValueError
    # review of issue 13: true and 1.0 passed for version 1; a null service
    # reached a swap (and its error handler reconciled every service)
    (b'{"v": true, "cmd": "status"}', "protocol version True"),
    (b'{"v": 1.0, "cmd": "status"}', "protocol version 1.0"),
    (req(cmd="swap", args={"service": None, "version": "v2"}), "invalid service name None"),
    (req(cmd="rollback", args={"service": None}), "invalid service name None"),
])
def test_bad_requests(line: bytes, words: str) -> None:
    with pytest.raises(protocol.ProtocolError, match=None) as e:
        protocol.decode_request(line)
    assert words in str(e.value)


def test_replies_roundtrip() -> None:
    assert json.loads(protocol.result({"a": 1}, 6)) == {"v": 1, "result": {"a": 1},
                                                        "exit_code": 6}
    err = json.loads(protocol.error(SwapFailed("boom"), {"result": {"x": 1}}))
    assert err == {"v": 1, "error": "boom", "exit_code": 4, "class": "rolled_back",
                   "result": {"x": 1}}
    assert protocol.event("drain", {"n": 3}).endswith(b"\n")


def test_who_may_change() -> None:
    assert may_change(Peer(1, 0, 0), "zdd-admin")
    assert not may_change(Peer(1, 65534, 65534), "no-such-group-here")
    # a user whose primary group is the admin group
    assert may_change(Peer(1, 4242, 0), "root")
    if os.geteuid() == 0:
        assert not may_change(Peer(1, 65534, 65534), "root")
