"""A call for the daemon, sent before the command line loads (issue 16).

click and the command tree cost more CPU than all the rest of a call to the
daemon (a 2-core VM: 40 ms of about 100), so main() hands argv to send()
first: a plain call of a command the daemon runs goes out at once, and the
command line loads while the daemon works on it. click then reads argv as
always, so every message, exit code and --help stays its own, and
dispatch() takes the reply from this connection when the request it would
send is this very one (Sent.claim).

Only plain command lines are read here; anything else is left to click,
which connects as always: --help and anything not in CALLS, --opt=value,
an option given twice, a value that is not a plain name, version or count,
--local, config paths from the environment (the call then runs
in-process), shell completion (_ZDD_AGENT_COMPLETE). The commands that
change the host besides swap and rollback are left to click too: their
request is never sent before the command line has read them.

Imports: os, re and client.py's (socket, json); never pathlib or click.
"""

from __future__ import annotations

import os
import re
import socket

from . import client, protocol
from .errors import Exit, ZddError

# typing.TYPE_CHECKING without importing typing, which costs a call to the
# daemon 5 ms of CPU here (issue 16); type checkers know the name.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

# defaults.CONTROL_SOCKET, read without importing pathlib (test_fastpath.py
# checks that the two agree).
SOCKET_ENV, SOCKET_DEFAULT = "ZDD_CONTROL_SOCKET", "/run/zdd-agent/control.sock"
# Config paths click reads from the environment: given, the call runs in-process.
PATH_ENV = ("ZDD_CONFIG_DIR", "ZDD_STATE_DIR", "ZDD_AGENT_CONFIG")

JSON = frozenset({"--json"})
# argv words -> (protocol command, SERVICE: None, "optional" or "required",
# options that take a value (-> the option's long name), flags). Arguments are
# built as cli.py's commands build them; test_fastpath.py checks the two
# readings against each other.
CALLS: dict[tuple[str, ...], tuple[str, str | None, dict[str, str], frozenset[str]]] = {
    ("status",): ("status", "optional", {}, JSON),
    ("history",): ("history", "optional", {"-n": "--limit", "--limit": "--limit"}, JSON),
    ("swap",): ("swap", "required", {"--version": "--version"}, JSON | {"--dry-run"}),
    ("rollback",): ("rollback", "required", {}, JSON),
    ("host-state",): ("host-state", None, {}, JSON),
    ("sysctl", "check"): ("sysctl-check", None, {}, JSON),
}
# A service name or a version (what the daemon may accept), never an option.
PLAIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
LIMIT = re.compile(r"[1-9][0-9]{0,2}|1000")  # history -n: click's IntRange(1, 1000)
HISTORY_DEFAULT = "20"  # cli.py's history --limit default


class Misread(ZddError):
    """The command line claims another request than the one sent: a bug."""

    exit_code = Exit.INTERNAL


def read(argv: list[str]) -> tuple[str, dict[str, Any]] | None:
    """The protocol command and arguments of argv, when argv is a plain
    call of one of CALLS; None for anything else."""
    words = next((w for w in CALLS if tuple(argv[:len(w)]) == w), None)
    if words is None:
        return None
    cmd, service, values, flags = CALLS[words]
    given: dict[str, str] = {}
    plain: list[str] = []
    rest = iter(argv[len(words):])
    for word in rest:
        if word in flags:
            option, value = word, ""
        elif word in values:
            option, value = values[word], next(rest, "")
            if not PLAIN.fullmatch(value):
                return None
        elif PLAIN.fullmatch(word):
            plain.append(word)
            continue
        else:
            return None
        if option in given:  # click takes the last one; leave that to click
            return None
        given[option] = value
    if len(plain) > (0 if service is None else 1) or (service == "required" and not plain):
        return None
    args: dict[str, Any] = {}
    if cmd == "history":
        limit = given.get("--limit", HISTORY_DEFAULT)
        if not LIMIT.fullmatch(limit):
            return None
        args["limit"] = int(limit)
    if plain:
        args["service"] = plain[0]
    if cmd == "swap":
        if "--version" not in given:
            return None
        args["version"] = given["--version"]
        if "--dry-run" in given:
            args["dry_run"] = True
    return cmd, args


class Sent:
    """A request on its way to the daemon, until dispatch() claims its
    connection to read the reply."""

    def __init__(self, cmd: str, args: dict[str, Any], conn: socket.socket) -> None:
        self.cmd, self.args = cmd, args
        self.conn: socket.socket | None = conn

    def claim(self, cmd: str, args: dict[str, Any]) -> socket.socket:
        """The connection, if (cmd, args) is what was sent."""
        args = {k: v for k, v in args.items() if v is not None}  # as protocol.request()
        if self.conn is None or (cmd, args) != (self.cmd, self.args):
            raise Misread(f"sent {self.cmd} {self.args} to the daemon before the command "
                          f"line loaded, which then asked for {cmd} {args}")
        conn, self.conn = self.conn, None
        return conn

    def close(self) -> str:
        """Close an unclaimed connection; what to tell the user then (a
        swap goes on in the daemon), or ""."""
        if self.conn is None:
            return ""
        self.conn.close()
        self.conn = None
        return client.interrupted(self.cmd, self.args)


def send(argv: list[str]) -> Sent | None:
    """argv's request, sent, when argv is a plain call for the daemon and
    the daemon answers the connection; else None, and nothing was sent."""
    if any(k in os.environ for k in PATH_ENV) or any(
            k.startswith("_") and k.endswith("_COMPLETE") for k in os.environ):
        return None
    call = read(argv)
    if call is None:
        return None
    cmd, args = call
    path = os.environ.get(SOCKET_ENV, SOCKET_DEFAULT)
    try:
        return Sent(cmd, args, client.send(path, protocol.request(cmd, **args)))
    except (client.DaemonUnavailable, OSError):  # click's way says why, as always
        return None
