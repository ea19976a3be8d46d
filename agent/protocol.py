"""The control socket's protocol (pure): newline-delimited JSON, versioned.

Request, one line:  {"v": 1, "cmd": "swap", "args": {"service": "api", "version": "v2"}}
Replies, lines:     {"v": 1, "event": "phase", "data": {...}}          (zero or more)
                    {"v": 1, "result": {...}, "exit_code": 0}           (last)
                 or {"v": 1, "error": "...", "exit_code": 2, "class": "config"}

A request is at most MAX_REQUEST bytes and must arrive within the server's
read deadline; anything else gets an error reply or a closed connection.
"""

from __future__ import annotations

import json

from .errors import ConfigError, Exit, ZddError

# typing.TYPE_CHECKING without importing typing, which costs a call to the
# daemon 5 ms of CPU here (issue 16); type checkers know the name.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

VERSION = 1
MAX_REQUEST = 64 * 1024

# command -> (admin only, allowed argument names, required argument names).
# Admin only: just root and the admin group may run it, because it changes the
# host, or because its answer holds what the state directory keeps from them
# (history: hook output and the services' journal lines in its reasons).
COMMANDS: dict[str, tuple[bool, frozenset[str], frozenset[str]]] = {
    "ping": (False, frozenset(), frozenset()),
    "status": (False, frozenset({"service"}), frozenset()),
    "history": (True, frozenset({"service", "limit"}), frozenset()),
    "sysctl-check": (False, frozenset(), frozenset()),
    "swap": (True, frozenset({"service", "version", "dry_run"}),
             frozenset({"service", "version"})),
    "rollback": (True, frozenset({"service"}), frozenset({"service"})),
    "sysctl-apply": (True, frozenset(), frozenset()),
    "sysctl-restore": (True, frozenset(), frozenset()),
    "drain-host": (True, frozenset({"reason"}), frozenset()),
    "undrain-host": (True, frozenset(), frozenset()),
    "host-state": (False, frozenset(), frozenset()),
}


class ProtocolError(ZddError):
    exit_code = Exit.CONFIG


class PermissionDenied(ZddError):
    exit_code = Exit.CONFIG


class Request:
    """A request decode_request() accepted. A plain class, since a dataclass
    or a NamedTuple would import inspect or typing on every call to the
    daemon (issue 16)."""

    __slots__ = ("cmd", "args")

    def __init__(self, cmd: str, args: dict[str, Any]) -> None:
        self.cmd = cmd
        self.args = args

    @property
    def admin_only(self) -> bool:
        return COMMANDS[self.cmd][0]


def decode_request(line: bytes) -> Request:
    # Imported here: the CLI's side (request(), VERSION) runs on every call to
    # the daemon and needs none of config.py's imports (PyYAML...), issue 16.
    from .config import check_name, check_version

    if len(line) > MAX_REQUEST:
        raise ProtocolError(f"request of {len(line)} bytes is over the limit of {MAX_REQUEST}")
    try:
        msg = json.loads(line)
    except (ValueError, UnicodeDecodeError) as e:
        raise ProtocolError(f"request is not JSON: {e}") from None
    except RecursionError:  # the json module's parser recurses per array/object level
        raise ProtocolError("request is not JSON this agent reads: nested too deeply") from None
    if not isinstance(msg, dict):
        raise ProtocolError("request must be a JSON object")
    if type(msg.get("v")) is not int or msg.get("v") != VERSION:  # not true, not 1.0
        raise ProtocolError(f"protocol version {msg.get('v')!r} is not supported "
                            f"(this agent speaks {VERSION})")
    cmd = msg.get("cmd")
    if not isinstance(cmd, str) or cmd not in COMMANDS:  # a list or an object is unhashable
        raise ProtocolError(f"unknown command {cmd!r} (known: {', '.join(COMMANDS)})")
    args = msg.get("args", {})
    if not isinstance(args, dict):
        raise ProtocolError("args must be a JSON object")
    _, allowed, required = COMMANDS[cmd]
    unknown = set(args) - allowed
    if unknown:
        # as repr: a client's name goes into one line of the daemon's log
        raise ProtocolError(f"{cmd}: unknown argument(s) "
                            f"{', '.join(repr(a) for a in sorted(unknown))}")
    missing = required - set(args)
    if missing:
        raise ProtocolError(f"{cmd}: missing argument(s) {', '.join(sorted(missing))}")
    try:
        if args.get("service") is not None or "service" in required:
            check_name(args.get("service"), "service")  # null only where it is optional
        if "version" in args:
            check_version(args["version"])
    except ConfigError as e:
        raise ProtocolError(str(e)) from None
    if "dry_run" in args and not isinstance(args["dry_run"], bool):
        raise ProtocolError("swap: dry_run must be true or false")
    if "limit" in args and (not isinstance(args["limit"], int) or isinstance(args["limit"], bool)
                            or not 1 <= args["limit"] <= 1000):
        raise ProtocolError("history: limit must be an integer 1..1000")
    return Request(cmd, dict(args))


def encode(obj: dict[str, Any]) -> bytes:
    return json.dumps({"v": VERSION, **obj}, default=str, separators=(",", ":")).encode() + b"\n"


def request(cmd: str, **args: Any) -> bytes:
    return encode({"cmd": cmd, "args": {k: v for k, v in args.items() if v is not None}})


def event(kind: str, data: dict[str, Any]) -> bytes:
    return encode({"event": kind, "data": data})


def result(obj: Any, exit_code: int = 0) -> bytes:
    return encode({"result": obj, "exit_code": exit_code})


def error(e: ZddError, extra: dict[str, Any] | None = None) -> bytes:
    body: dict[str, Any] = {"error": str(e), "exit_code": int(e.exit_code),
                            "class": e.exit_code.name.lower()}
    body.update({k: v for k, v in e.details.items() if isinstance(v, (str, int))})
    body.update(extra or {})
    return encode(body)
