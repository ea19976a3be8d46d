"""Service and agent configuration: parsing and validation (pure, no OS binding
beyond reading the files and their permissions).

Every error names the file, the key and what is allowed, so that an operator
can fix it without reading code. Nothing here changes the host.
"""

from __future__ import annotations

import copy
import errno
import ipaddress
import os
import re
import shlex
import signal
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .trust import untrusted
from .errors import ConfigError
from .settings import GROUP_RE, KEYS as SETTINGS_KEYS, UnitSettings, families_needed
from .settings import parse as parse_settings

NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,47}")
VERSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
INSTANCE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}(?:-[0-9]{1,2})?")
USER_RE = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
ENV_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
# A literal port in any URL-like string (scheme://[user@]host:port): every one
# is checked against 1..65535, wherever in a config it appears.
_URL_PORT_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://(?:[^/@\s]*@)?"
                          r"(?:\[[0-9A-Fa-f:.]*\]|[^/\[\]:@\s?#]*):(\d+)(?=$|[/?#\s])")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
# Signals a service may ask to be drained with; SIGKILL/SIGSTOP cannot drain.
DRAIN_SIGNALS = ("SIGTERM", "SIGINT", "SIGQUIT", "SIGHUP", "SIGUSR1", "SIGUSR2", "SIGWINCH")
READY_TYPES = ("notify", "http", "grpc", "tcp", "exec")
SOCKET_MODES = ("inherit", "reuseport", "nat")
INSTANCE_PORT = "{instance_port}"
# A config file larger than this is refused before YAML parses it: a service
# config is a few hundred bytes, and yaml.safe_load of a huge or deeply nested
# file would hold the root daemon for as long as it takes.
MAX_CONFIG_BYTES = 1024 * 1024

# YAML nesting deeper than this is refused: a service config nests four deep
# (hooks.post_start.command), and PyYAML composes nodes recursively, so a file
# of 5,000 "[" ended in RecursionError instead of a ConfigError.
MAX_YAML_DEPTH = 32
# An integer in a config is a port, a count or a sysctl value; bigger ones
# (YAML's hex, octal and base-60 forms reach thousands of digits without
# Python's 4,300-digit limit on int(str)) are refused before they exist.
MAX_YAML_INT = 2**63 - 1


def check_name(name: object, where: str = "name") -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ConfigError(f"{where}: invalid service name {name!r} "
                          "(allowed: [a-z0-9][a-z0-9-]{0,47})")
    return name


def check_version(version: object, where: str = "version") -> str:
    if not isinstance(version, str) or not VERSION_RE.fullmatch(version):
        raise ConfigError(f"{where}: invalid version {version!r} "
                          "(allowed: [A-Za-z0-9][A-Za-z0-9._-]{0,63})")
    return version


def check_instance(instance: object) -> str:
    """A version, or VERSION-N for one of several replicas."""
    if not isinstance(instance, str) or not INSTANCE_RE.fullmatch(instance):
        raise ConfigError(f"invalid instance {instance!r} (allowed: VERSION or VERSION-N)")
    return instance


def parse_duration(value: object) -> float:
    """'2s', '500ms', '1m', '1h', or a number of seconds -> seconds."""
    if isinstance(value, bool):
        raise ValueError("a duration, not a boolean")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        m = _DURATION_RE.fullmatch(value.strip())
        if m:
            return float(m.group(1)) * _UNITS[m.group(2)]
    raise ValueError(f"{value!r} is not a duration like 500ms, 2s, 1m or 1h")


def format_duration(seconds: float) -> str:
    if seconds == 0:
        return "0s"
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    return f"{seconds:g}s"


@dataclass(frozen=True)
class Listen:
    host: str | None  # None: all addresses
    port: int  # 0 for a Unix-domain listener
    path: str | None = None  # "unix:PATH": a Unix-domain stream socket, owned by the socket unit

    @property
    def unix(self) -> bool:
        return self.path is not None

    def __str__(self) -> str:
        if self.path is not None:
            return UNIX_PREFIX + self.path
        if self.host is None:
            return str(self.port)
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Ready:
    type: str = "notify"
    url: str | None = None
    command: tuple[str, ...] | None = None
    period: float = 2.0
    timeout: float = 1.0
    failure_threshold: int = 3
    success_threshold: int = 1
    initial_delay: float = 0.0
    deadline: float = 60.0
    http_version: str = "1.1"  # http: 1.1, or 2 (h2c, prior knowledge)
    grpc_service: str = ""  # grpc: the service name asked about ("" = the whole server)

    @property
    def needs_instance_port(self) -> bool:
        return any(INSTANCE_PORT in s for s in (self.url or "", *(self.command or ())))


@dataclass(frozen=True)
class Drain:
    grace_period: float = 30.0
    signal: str = "SIGTERM"
    pre_stop_delay: float = 0.0  # between the new one's admission and the old one's signal


@dataclass(frozen=True)
class Hook:
    command: tuple[str, ...]
    timeout: float = 60.0


# post_start runs once per new instance, after it is admitted and baked
# (strategy.min_ready) and before any old instance gets its drain signal; it
# must succeed (e.g. a warm-up request). Its argv alone may use {instance_port}
# and {version}: the swap engine substitutes them per new instance (ZDD_INSTANCE_PORT
# and ZDD_VERSION in its environment too); config only validates them.
HOOKS = ("pre_swap", "post_start", "post_swap", "on_rollback")
PER_INSTANCE_HOOKS = ("post_start",)

# strategy.min_ready (Kubernetes minReadySeconds, Nomad min_healthy_time): how
# long each admitted new instance must stay up beside the old ones before any
# old one is signalled. strategy.watch (Nomad auto_revert): how long the daemon
# keeps watching the new version after a swap and reverts by itself.
#
# Why 5 s (docs/proven-swap.md; bench/gunicorn_ready.py, sandboxed systemd
# 252, 2 vCPUs): stock gunicorn 27 sends READY=1 from its arbiter before any
# worker imports the app (gunicorn #2778), so a release whose app cannot import
# is "active" and then exits. READY=1 -> exit, systemd's own timestamps, app
# that raises at once: 1 worker 0.11/0.14/0.16 s (min/median/max of 12),
# 4 workers 0.26/0.32/0.37 s. The app's import time adds to it: importing
# matplotlib.pyplot (~0.6 s) first gave 0.90/1.06/1.59 s with 1 worker and
# 2.6/3.0/3.3 s with 4 (on 2 cores). 3x the bare max would be 2 s, which a
# 1 s import with 4 workers already outlasts; 5 s is 13x the bare max, 3x the
# 1-worker slow-import max, 1.5x its 4-worker max, and costs 5 s per batch.
DEFAULT_MIN_READY = 5.0
# Why 60 s: health checks come every 2-10 s (DESIGN.md), so a load balancer's
# first three checks of the new version span up to 30 s; a release that dies
# "a few seconds" after READY=1 (above: up to 3.3 s; a lazy import or the
# first real request) does so well inside 60 s. Later failures (leaks, OOM
# after hours) are monitoring's, not a swap's.
DEFAULT_WATCH = 60.0


@dataclass(frozen=True)
class ServiceConfig:
    name: str
    command: tuple[str, ...]
    listen: tuple[Listen, ...]
    path: Path = Path("<memory>")
    socket: str = "inherit"
    # the Unix-domain listeners' file (SocketUser=, SocketGroup=, SocketMode=):
    # who may connect, e.g. group www-data for nginx; None without unix: listeners
    socket_user: str | None = None
    socket_group: str | None = None
    socket_mode: str | None = None
    user: str | None = None
    environment: tuple[tuple[str, str], ...] = ()
    ready: Ready = field(default_factory=Ready)
    drain: Drain = field(default_factory=Drain)
    hooks: tuple[tuple[str, Hook], ...] = ()
    replicas: int = 1
    max_surge: int = 1  # resolved counts (rollout.resolve)
    max_unavailable: int = 0
    min_ready: float = DEFAULT_MIN_READY  # seconds; 0: admitted at the gate
    watch: float = DEFAULT_WATCH  # seconds after a swap; 0: nothing watches
    allow_from: tuple[str, ...] = ()  # peers allowed to reach the listeners (CIDRs); (): any
    settings: UnitSettings = field(default_factory=UnitSettings)  # settings.py: the unit's own
    fast_open: int = 0  # TCP Fast Open queue length (RFC 7413) of the listeners; 0: off

    def hook(self, name: str) -> Hook | None:
        return dict(self.hooks).get(name)

    def argv(self, version: str, instance_port: int | None = None) -> list[str]:
        """The instance's argv: split without a shell, {version} substituted,
        and {instance_port} (socket: nat) where the port is known."""
        check_version(version)
        out = [a.replace("{version}", version) for a in self.command]
        if instance_port is not None:
            out = [a.replace(INSTANCE_PORT, str(instance_port)) for a in out]
        return out

    @property
    def port_environment(self) -> tuple[tuple[str, str], ...]:
        """The environment entries that name {instance_port} (socket: nat):
        rendered per instance, in its drop-in."""
        return tuple((k, v) for k, v in self.environment if INSTANCE_PORT in v)

    @property
    def ports(self) -> tuple[int, ...]:
        """The TCP ports of the listen addresses (none for unix: listeners)."""
        return tuple(sorted({lst.port for lst in self.listen if not lst.unix}))

    @property
    def unix_paths(self) -> tuple[str, ...]:
        """The socket files of the unix: listeners, in config order."""
        return tuple(lst.path for lst in self.listen if lst.path is not None)

    @property
    def needs_instance_port(self) -> bool:
        """Whether each instance gets a private port of its own: it binds one
        (socket: nat), or its command, environment, readiness probe or
        post_start hook names {instance_port}."""
        hook = self.hook("post_start")
        named = any(INSTANCE_PORT in a for a in self.command) or bool(self.port_environment)
        return self.socket == "nat" or named or self.ready.needs_instance_port or (
            hook is not None and any(INSTANCE_PORT in a for a in hook.command))


# ---------------------------------------------------------------- validation


class _Checker:
    """Validates one mapping; every message names the file and the dotted key."""

    def __init__(self, path: Path, data: Mapping[str, Any], prefix: str = "") -> None:
        self.path, self.data, self.prefix = path, data, prefix

    def fail(self, key: str, msg: str) -> ConfigError:
        # the key may be the file's own (an unknown key): quoted when it holds a
        # newline or another unprintable character, so the message stays one line
        dotted = f"{self.prefix}{key}"
        shown = dotted if dotted.isprintable() else repr(dotted)
        return ConfigError(f"{self.path}: {shown}: {msg}", file=str(self.path), key=dotted)

    def reject_unknown(self, allowed: tuple[str, ...]) -> None:
        for key in self.data:
            if key not in allowed:
                raise self.fail(str(key), f"unknown key (allowed: {', '.join(allowed)})")

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    def duration(self, key: str, default: float, lo: float, hi: float) -> float:
        raw = self.data.get(key, default)
        try:
            value = parse_duration(raw)
        except ValueError as e:
            allowed = f"{format_duration(lo)}..{format_duration(hi)}"
            raise self.fail(key, f"{e} (allowed: {allowed})") from None
        if not lo <= value <= hi:
            raise self.fail(key, f"{raw!r} is out of range "
                                 f"(allowed: {format_duration(lo)}..{format_duration(hi)})")
        return value

    def integer(self, key: str, default: int, lo: int, hi: int) -> int:
        raw = self.data.get(key, default)
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise self.fail(key, f"{raw!r} is not an integer (allowed: {lo}..{hi})")
        if not lo <= raw <= hi:
            raise self.fail(key, f"{raw} is out of range (allowed: {lo}..{hi})")
        return raw

    def choice(self, key: str, default: str, allowed: tuple[str, ...]) -> str:
        raw = self.data.get(key, default)
        if raw not in allowed:
            raise self.fail(key, f"{raw!r} is not allowed (allowed: {', '.join(allowed)})")
        return str(raw)

    def section(self, key: str) -> _Checker:
        """The checker of the mapping under `key` (absent: empty), its
        messages prefixed with this one's dotted key."""
        return _Checker(self.path, self.mapping(key), f"{self.prefix}{key}.")

    def mapping(self, key: str) -> Mapping[str, Any]:
        raw = self.data.get(key)
        if raw is None:
            return {}
        if not isinstance(raw, Mapping):
            raise self.fail(key, f"must be a mapping, got {type(raw).__name__}")
        return raw

    def url_ports(self, key: str, texts: Iterable[str]) -> None:
        """Every literal port of a URL in these strings is a port (1..65535)."""
        for text in texts:
            for m in _URL_PORT_RE.finditer(text):
                if not 1 <= int(m.group(1)) <= 65535:
                    raise self.fail(key, f"port {m.group(1)} in {text!r} is out of range "
                                         "(allowed: 1..65535)")

    def argv(self, key: str, raw: Any) -> tuple[str, ...]:
        if isinstance(raw, str):
            try:
                parts = shlex.split(raw)
            except ValueError as e:
                raise self.fail(key, f"cannot split {raw!r} into arguments: {e}") from None
        elif isinstance(raw, list) and all(isinstance(a, str) for a in raw):
            parts = list(raw)
        else:
            raise self.fail(key, "must be a command line string or a list of strings")
        if not parts:
            raise self.fail(key, "must not be empty")
        for a in parts:
            if any(ord(c) < 32 or ord(c) == 127 for c in a):
                raise self.fail(key, f"argument {a!r} contains a control character")
        if not parts[0].startswith("/"):
            raise self.fail(key, f"executable {parts[0]!r} must be an absolute path")
        self.url_ports(key, parts)
        return tuple(parts)


UNIX_PREFIX = "unix:"
# sun_path holds 108 bytes with the terminating NUL (unix(7)); systemd refuses longer
SUN_PATH_MAX = 107
_UNIX_PATH_RE = re.compile(r"(/[A-Za-z0-9_.+-]+)+")
# Where a unix: listener's file may not be. Directories other users may write
# (sticky /tmp and the like, a user's /run/user/UID): they may create the name
# first, or a link on the way, and systemd binds as root and unlinks whatever
# is at the path when bind(2) says EADDRINUSE; PrivateTmp= also gives each
# unit its own /tmp. The kernel's and the system's own places: a listener
# there would replace systemd's, D-Bus's or the agent's own sockets.
UNIX_SHARED_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock", "/var/lock", "/run/user")
UNIX_SYSTEM_DIRS = ("/proc", "/sys", "/dev", "/run/systemd", "/run/dbus", "/run/zdd-agent")


def _parse_unix(chk: _Checker, text: str) -> Listen:
    """"unix:/run/api/api.sock": an absolute, normalised path of safe
    characters, short enough for sun_path, outside UNIX_SHARED_DIRS and
    UNIX_SYSTEM_DIRS. (What is on the host is preflight's to check.)"""
    path = text[len(UNIX_PREFIX):]
    allowed = "(allowed: unix:/run/NAME/NAME.sock, an absolute path)"
    if path.startswith("@"):
        raise chk.fail("listen", f"{text!r}: abstract sockets are refused: they have no "
                                 "owner or mode, anyone in the network namespace may connect "
                                 f"{allowed}")
    if not path.startswith("/"):
        raise chk.fail("listen", f"{text!r}: the path must be absolute {allowed}")
    if os.path.normpath(path) != path or any(c in (".", "..") for c in path.split("/")):
        raise chk.fail("listen", f"{text!r}: the path is not normalised (write "
                                 f"{UNIX_PREFIX}{os.path.normpath(path)})")
    if not _UNIX_PATH_RE.fullmatch(path):
        raise chk.fail("listen", f"{text!r}: the path may hold only letters, digits, '_', '.', "
                                 f"'+', '-' and '/' between names {allowed}")
    if len(path.encode()) > SUN_PATH_MAX:
        raise chk.fail("listen", f"{text!r}: the path has {len(path.encode())} bytes "
                                 f"(allowed: at most {SUN_PATH_MAX}, sun_path in unix(7))")
    for dirs, why in ((UNIX_SHARED_DIRS, "other users may write there (create the name or a "
                                         "link on its way first)"),
                      (UNIX_SYSTEM_DIRS, "the system's own sockets live there")):
        for d in dirs:
            if path == d or path.startswith(d + "/"):
                raise chk.fail("listen", f"{text!r} is under {d}: {why} {allowed}")
    return Listen(None, 0, path)


def _parse_listen(chk: _Checker, raw: Any) -> tuple[Listen, ...]:
    if isinstance(raw, (str, int)) and not isinstance(raw, bool):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        raise chk.fail("listen", "must be a non-empty list of host:port or unix:PATH")
    out: list[Listen] = []
    for item in raw:
        text = str(item)
        host: str | None
        if text.startswith(UNIX_PREFIX):
            entry = _parse_unix(chk, text)
            if entry in out:
                raise chk.fail("listen", f"{text!r} is listed twice")
            out.append(entry)
            continue
        m = re.fullmatch(r"(?:\[([0-9A-Fa-f:.]+)\]:|([0-9.]+):)?(\d{1,5})", text)
        if not m:
            raise chk.fail("listen", f"{text!r} is not host:port "
                                     "(allowed: 127.0.0.1:8080, [::1]:8080, 8080 or "
                                     "unix:/run/NAME/NAME.sock)")
        host = m.group(1) or m.group(2)
        if host is not None:
            try:
                ipaddress.ip_address(host)
            except ValueError:
                raise chk.fail("listen", f"{host!r} in {text!r} is not an IP address") from None
        port = int(m.group(3))
        if not 1 <= port <= 65535:
            raise chk.fail("listen", f"port {port} in {text!r} is out of range (allowed: 1..65535)")
        entry = Listen(host, port)
        if entry in out:
            raise chk.fail("listen", f"{text!r} is listed twice")
        out.append(entry)
    return tuple(out)


SOCKET_FILE_KEYS = ("socket_user", "socket_group", "socket_mode")
SOCKET_KEYS = ("socket", *SOCKET_FILE_KEYS)
DEFAULT_SOCKET_MODE = "0660"  # owner and group; systemd's own default, 0666, lets anyone in


def _parse_socket_file(chk: _Checker, listen: tuple[Listen, ...],
                       mode: str) -> tuple[str | None, str | None, str | None]:
    """socket_user, socket_group, socket_mode: who owns the unix: listeners'
    file and who may connect (connect(2) needs write permission on it,
    unix(7)). Only with unix: listeners, which only socket: inherit can
    share: SO_REUSEPORT is for TCP and UDP, so two instances cannot bind one
    path (the second gets EADDRINUSE, or unlinks the first one's file)."""
    unix = [str(lst) for lst in listen if lst.unix]
    if unix and mode != "inherit":
        why = ("NAT rewrites TCP destinations, not socket paths" if mode == "nat" else
               "SO_REUSEPORT is for TCP; a second bind fails or takes the path over")
        raise chk.fail("socket", f"{mode!r} cannot serve {unix[0]}: instances cannot each bind "
                                 f"one Unix socket path ({why}) (allowed: inherit, whose socket "
                                 "unit owns the file)")
    ports = sorted({lst.port for lst in listen if not lst.unix})
    if mode == "nat" and len(ports) > 1:
        raise chk.fail("listen", f"socket: nat gives each instance one private port, and these "
                                 f"are {len(ports)} ports ({', '.join(map(str, ports))}): they "
                                 "would all reach it (allowed: one port, on as many addresses "
                                 "as needed; a second port is a second service)")
    if unix and len(unix) == len(listen) and chk.get("fast_open"):
        raise chk.fail("fast_open", "TCP Fast Open is for TCP listeners, and every listener "
                                    "here is a unix: socket (allowed: 0, or a host:port "
                                    "listener beside it)")
    if unix and len(unix) == len(listen) and chk.get("allow_from") is not None:
        raise chk.fail("allow_from", "applies to IP listeners, and every listener here is a "
                                     "unix: socket (allowed: socket_user, socket_group and "
                                     "socket_mode say who may connect to it)")
    given = [k for k in SOCKET_FILE_KEYS if chk.get(k) is not None]
    if given and not unix:
        raise chk.fail(given[0], "only for unix: listeners (allowed: with listen "
                                 "[\"unix:/run/NAME/NAME.sock\"])")
    if not unix:
        return None, None, None
    names = []
    for key in ("socket_user", "socket_group"):
        value = chk.get(key)
        if value is not None and (not isinstance(value, str) or not USER_RE.fullmatch(value)):
            raise chk.fail(key, f"{value!r} is not a {key[7:]} name "
                                "(allowed: [a-z_][a-z0-9_-]{0,31})")
        names.append(value)
    raw = chk.get("socket_mode", DEFAULT_SOCKET_MODE)
    if not isinstance(raw, str):
        hint = f" (YAML reads an unquoted 0{raw:o} as {raw}: quote it, '0{raw:o}')" \
            if isinstance(raw, int) and not isinstance(raw, bool) and 0 <= raw <= 0o777 else ""
        raise chk.fail("socket_mode", f"{raw!r} is not an octal mode string{hint} "
                                      "(allowed: a quoted octal mode, e.g. '0660')")
    if not re.fullmatch(r"0?[0-7]{3}", raw):
        raise chk.fail("socket_mode", f"{raw!r} is not an octal mode without special bits "
                                      "(allowed: '0200'..'0777', e.g. '0660')")
    if not int(raw, 8) & 0o200:
        raise chk.fail("socket_mode", f"{raw!r} leaves the owner without write permission, "
                                      "which connect(2) needs (allowed: a mode with the "
                                      "owner's write bit, e.g. '0660')")
    return names[0], names[1], "0" + raw[-3:]


def _parse_ready(path: Path, raw: Mapping[str, Any], listen: tuple[Listen, ...]) -> Ready:
    chk = _Checker(path, raw, "ready.")
    chk.reject_unknown(("type", "url", "command", "period", "timeout", "failure_threshold",
                        "success_threshold", "initial_delay", "deadline", "http_version",
                        "grpc_service"))
    rtype = chk.choice("type", "notify", READY_TYPES)
    url = chk.get("url")
    command = chk.get("command")
    http_version = str(chk.get("http_version", "1.1"))
    if http_version not in ("1.1", "2"):
        raise chk.fail("http_version", f"{http_version!r} is not allowed (allowed: 1.1, 2)")
    if "http_version" in raw and rtype != "http":
        raise chk.fail("http_version", f"only for type http, not {rtype}")
    grpc_service = chk.get("grpc_service", "")
    if not isinstance(grpc_service, str) or not re.fullmatch(r"[A-Za-z0-9_.]{0,200}",
                                                              grpc_service):
        raise chk.fail("grpc_service", f"{grpc_service!r} is not a gRPC service name "
                                       "(allowed: [A-Za-z0-9_.], e.g. helloworld.Greeter)")
    if "grpc_service" in raw and rtype != "grpc":
        raise chk.fail("grpc_service", f"only for type grpc, not {rtype}")
    if rtype in ("http", "tcp", "grpc"):
        if not isinstance(url, str) or not url:
            raise chk.fail("url", f"required for type {rtype} "
                                  f"(e.g. http://127.0.0.1:{INSTANCE_PORT}/ready)")
        _check_probe_url(chk, rtype, url, listen)
    elif url is not None:
        raise chk.fail("url", f"only for type http, grpc or tcp, not {rtype}")
    argv: tuple[str, ...] | None = None
    if rtype == "exec":
        if command is None:
            raise chk.fail("command", "required for type exec (an argv; exit 0 = ready)")
        argv = chk.argv("command", command)
        shared = {lst.port for lst in listen if not lst.unix}
        for a in argv:
            for m in re.finditer(r":([0-9]{1,5})(?![0-9])", a):
                if int(m.group(1)) in shared:
                    raise chk.fail("command", f"{a!r} names the shared listen port "
                                              f"{m.group(1)}, where the old instance may "
                                              f"answer during a swap (use {INSTANCE_PORT}, "
                                              "a port of this instance alone)")
    elif command is not None:
        raise chk.fail("command", f"only for type exec, not {rtype}")
    period = chk.duration("period", 2.0, 1.0, 60.0)
    timeout = chk.duration("timeout", 1.0, 0.1, 60.0)
    if timeout > period:
        raise chk.fail("timeout", f"{format_duration(timeout)} is longer than period "
                                  f"{format_duration(period)} (allowed: 100ms..period)")
    return Ready(
        type=rtype, url=url, command=argv, period=period, timeout=timeout,
        failure_threshold=chk.integer("failure_threshold", 3, 1, 100),
        success_threshold=chk.integer("success_threshold", 1, 1, 100),
        initial_delay=chk.duration("initial_delay", 0.0, 0.0, 3600.0),
        deadline=chk.duration("deadline", 60.0, 1.0, 3600.0),
        http_version=http_version, grpc_service=grpc_service,
    )


def _check_probe_url(chk: _Checker, rtype: str, url: str, listen: tuple[Listen, ...]) -> None:
    scheme = {"http": "http://", "tcp": "tcp://", "grpc": "grpc://"}[rtype]
    rest = url[len(scheme):] if url.startswith(scheme) else None
    if rtype in ("tcp", "grpc") and rest is None and "://" not in url:
        rest = url
    if rest is None:
        raise chk.fail("url", f"{url!r} must start with {scheme}")
    hostport = rest.split("/", 1)[0]
    m = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):(\{instance_port\}|\d+)", hostport)
    if not m:
        raise chk.fail("url", f"{url!r}: expected {scheme}HOST:{INSTANCE_PORT}/...")
    if m.group(2) == INSTANCE_PORT:
        return
    port = int(m.group(2))
    if not 1 <= port <= 65535:
        raise chk.fail("url", f"port {m.group(2)} in {url!r} is out of range "
                              f"(allowed: 1..65535, and here only {INSTANCE_PORT})")
    # Readiness is per instance (DESIGN.md): during a swap the old instance
    # still serves the service's ports (the shared listener, or its own
    # SO_REUSEPORT socket, or any fixed port the program binds), so a probe
    # there can pass for a new instance that is not ready at all.
    shared = " (the shared listen port)" if port in {lst.port for lst in listen} else ""
    raise chk.fail("url", f"{url!r} probes the fixed port {port}{shared}: during a swap the "
                          "old instance may answer it, so a new instance that is not ready "
                          f"would pass (allowed: {INSTANCE_PORT} as the port, e.g. "
                          f"{scheme if rtype == 'http' else ''}127.0.0.1:{INSTANCE_PORT}"
                          f"{'/ready' if rtype == 'http' else ''}: a port the agent picks for "
                          "each instance alone and passes as ZDD_INSTANCE_PORT; for a program "
                          "that cannot open a second port, ready.type notify or exec with "
                          "strategy.min_ready)")


def _parse_hooks(path: Path, raw: Mapping[str, Any], ready: Ready) -> tuple[tuple[str, Hook], ...]:
    hchk = _Checker(path, raw, "hooks.")
    hchk.reject_unknown(HOOKS)
    hooks: list[tuple[str, Hook]] = []
    for hname in HOOKS:
        if hchk.get(hname) is None:
            continue
        one = hchk.section(hname)
        one.reject_unknown(("command", "timeout"))
        if one.get("command") is None:
            raise one.fail("command", "required (an argv, run without a shell)")
        argv = one.argv("command", one.get("command"))
        uses_port = any(INSTANCE_PORT in a for a in argv)
        if uses_port and hname not in PER_INSTANCE_HOOKS:
            raise one.fail("command", f"{INSTANCE_PORT} means nothing here: {hname} runs once "
                                      "per swap, not per instance (allowed: "
                                      f"{INSTANCE_PORT} in hooks.post_start only)")
        hooks.append((hname, Hook(argv, one.duration("timeout", 60.0, 1.0, 3600.0))))
    return tuple(hooks)


MAX_NETWORKS = 256


def parse_networks(chk: _Checker, key: str, value: Any) -> tuple[str, ...]:
    """A list of IP addresses or networks in CIDR form ("10.0.0.0/8",
    "2001:db8::/32", "192.0.2.10"), each normalised ("192.0.2.10/32");
    () when absent. Host bits set ("10.0.0.1/8") are refused: that is
    usually a typo for a host or for its network, and the fix names both."""
    if value is None:
        return ()
    if not isinstance(value, list) or not value:
        raise chk.fail(key, f"{value!r} must be a non-empty list of addresses or CIDRs "
                            "(e.g. [10.0.0.0/8, 192.0.2.10])")
    if len(value) > MAX_NETWORKS:
        raise chk.fail(key, f"{len(value)} entries (allowed: at most {MAX_NETWORKS})")
    out: list[str] = []
    for item in value:
        if not isinstance(item, str):
            raise chk.fail(key, f"{item!r} is not an address or CIDR (a string, e.g. "
                                "10.0.0.0/8)")
        try:
            net = ipaddress.ip_network(item, strict=True)
        except ValueError as e:
            try:
                loose = ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise chk.fail(key, f"{item!r} is not an address or CIDR ({e})") from None
            host = item.split("/")[0]
            raise chk.fail(key, f"{item!r} has host bits set: write {loose} for the "
                                f"network or {host} for the host") from None
        out.append(str(net))
    return tuple(dict.fromkeys(out))


def parse_service(path: Path, data: Any, expected_name: str | None = None) -> ServiceConfig:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: the file must hold a mapping of keys, "
                          f"got {type(data).__name__}", file=str(path), key="")
    chk = _Checker(path, data)
    chk.reject_unknown(("name", "command", "listen", *SOCKET_KEYS, "user", "environment",
                        "ready", "drain", "hooks", "replicas", "strategy", "allow_from",
                        "fast_open", *SETTINGS_KEYS))
    for required in ("name", "command", "listen"):
        if required not in data:
            raise chk.fail(required, "required key is missing")
    try:
        name = check_name(data["name"], "name")
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}", file=str(path), key="name") from None
    if expected_name is not None and name != expected_name:
        raise chk.fail("name", f"{name!r} differs from the file name {path.name!r} "
                               f"(expected {expected_name!r})")
    command = chk.argv("command", data["command"])
    listen = _parse_listen(chk, data["listen"])
    socket_mode = chk.choice("socket", "inherit", SOCKET_MODES)
    sock_user, sock_group, sock_mode = _parse_socket_file(chk, listen, socket_mode)
    user = data.get("user")
    if user is not None and (not isinstance(user, str) or not USER_RE.fullmatch(user)):
        raise chk.fail("user", f"{user!r} is not a user name (allowed: [a-z_][a-z0-9_-]{{0,31}}"
                               " or null for root)")
    env: list[tuple[str, str]] = []
    for key, value in chk.mapping("environment").items():
        if not isinstance(key, str) or not ENV_KEY_RE.fullmatch(key):
            raise chk.fail("environment", f"{key!r} is not a variable name "
                                          "(allowed: [A-Za-z_][A-Za-z0-9_]*)")
        if key.startswith(("ZDD_", "LISTEN_", "NOTIFY_SOCKET")):
            raise chk.fail(f"environment.{key}", "is set by the agent or systemd")
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise chk.fail(f"environment.{key}", f"{value!r} must be a string or a number")
        text = str(value)
        if any(ord(c) < 32 or ord(c) == 127 for c in text):
            raise chk.fail(f"environment.{key}", "contains a control character")
        chk.url_ports(f"environment.{key}", [text])
        env.append((key, text))
    allow_from = parse_networks(chk, "allow_from", data.get("allow_from"))
    ready = _parse_ready(path, chk.mapping("ready"), listen)
    dchk = chk.section("drain")
    dchk.reject_unknown(("grace_period", "signal", "pre_stop_delay"))
    drain = Drain(grace_period=dchk.duration("grace_period", 30.0, 1.0, 3600.0),
                  signal=dchk.choice("signal", "SIGTERM", DRAIN_SIGNALS),
                  pre_stop_delay=dchk.duration("pre_stop_delay", 0.0, 0.0, 300.0))
    hooks = _parse_hooks(path, chk.mapping("hooks"), ready)
    assert hasattr(signal, drain.signal)
    replicas = chk.integer("replicas", 1, 1, 64)
    # off by default: data in a SYN may be replayed (RFC 7413 section 6.3.1)
    fast_open = chk.integer("fast_open", 0, 0, 65535)
    schk = chk.section("strategy")
    schk.reject_unknown(("max_surge", "max_unavailable", "min_ready", "watch"))
    min_ready = schk.duration("min_ready", DEFAULT_MIN_READY, 0.0, 3600.0)
    watch = schk.duration("watch", DEFAULT_WATCH, 0.0, 86400.0)
    from .rollout import resolve

    counts = []
    for key, default, up in (("max_surge", "25%", True), ("max_unavailable", 0, False)):
        raw_value = schk.get(key, default)
        try:
            counts.append(resolve(raw_value, replicas, up))
        except ValueError as e:
            raise schk.fail(key, f"{e} (allowed: a count 0..{replicas} or 0%..100%)") from None
        if counts[-1] > replicas:
            raise schk.fail(key, f"{raw_value!r} is out of range for {replicas} replicas "
                                 f"(allowed: a count 0..{replicas} or 0%..100%)")
    if counts == [0, 0]:
        raise schk.fail("max_unavailable", f"max_surge and max_unavailable are both 0 for "
                                           f"{replicas} replicas (allowed: at least one > 0)")
    if socket_mode != "inherit" and counts[1] >= replicas:
        # no socket unit holds the port: with every instance stopped first,
        # nothing listens and connections are refused (inherit queues them)
        raise schk.fail("max_unavailable", f"{counts[1]} of {replicas} replicas may be stopped "
                                           f"at once, and with socket: {socket_mode} nothing "
                                           "then listens: connections are refused (allowed: "
                                           f"0..{replicas - 1} with {socket_mode}, or socket: "
                                           "inherit, whose socket unit keeps the queue)")
    settings = parse_settings(chk, data)
    _check_families(chk, settings, socket_mode, listen, ready)
    return ServiceConfig(name=name, command=command, listen=listen, path=path,
                         socket=socket_mode, socket_user=sock_user, socket_group=sock_group,
                         socket_mode=sock_mode, user=user, environment=tuple(env),
                         ready=ready, drain=drain, hooks=hooks, replicas=replicas,
                         allow_from=allow_from, max_surge=counts[0], max_unavailable=counts[1],
                         min_ready=min_ready, watch=watch, fast_open=fast_open,
                         settings=settings)


def _check_families(chk: _Checker, settings: UnitSettings, socket_mode: str,
                    listen: tuple[Listen, ...], ready: Ready) -> None:
    """hardening.RestrictAddressFamilies must leave the instance the socket
    families the swap needs from it: AF_UNIX for sd_notify(3) (ready.type
    notify), the listen addresses' families when it binds them itself
    (reuseport), and the probe address's for a port of its own."""
    needed: dict[str, str] = {}
    if ready.type == "notify":
        needed["AF_UNIX"] = "ready.type notify sends READY=1 over an AF_UNIX socket"
    if socket_mode != "inherit":
        for lst in listen:
            fam = "AF_INET6" if lst.host and ":" in lst.host else "AF_INET"
            what = "binds it" if socket_mode == "reuseport" else "binds a private port for it"
            needed.setdefault(fam, f"socket: {socket_mode} {what} ({lst}) itself")
    if ready.needs_instance_port and ready.url:
        fam = "AF_INET6" if "[" in ready.url else "AF_INET"
        needed.setdefault(fam, f"ready.url {ready.url} is a port the instance binds")
    denied = families_needed(set(needed), settings.hardening)
    if denied:
        raise chk.fail("hardening.RestrictAddressFamilies",
                       f"denies {denied[0]}, but {needed[denied[0]]} (allowed: a list that "
                       f"keeps {', '.join(sorted(needed))})")


# ------------------------------------------------------------------- loading


# os.open(2) flags of a config read. O_NOFOLLOW: a symbolic link as the last
# component fails with ELOOP instead of being followed, so the file whose
# owner and mode were checked is the file that is read (open(2)). O_NONBLOCK:
# opening a FIFO for reading returns at once instead of waiting for a writer
# (fifo(7)); fstat then refuses anything but a regular file.
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


def check_not_writable_by_others(path: Path, st: os.stat_result | None = None) -> None:
    """Root must not act on config that someone else can change.

    `st`: fstat(2) of the open descriptor of `path` (the file or its
    directory), so the decision is about what is read, not about a name
    (read_yaml). None: stat(2) of `path` by name, following links, for a file
    that a library then opens by name itself (the host endpoint's TLS files,
    which ssl loads): that leaves the window between check and open.
    Allowed: owner root or the effective uid, no write bit for group or
    others. Raises ConfigError naming `path`, the mode or owner and the fix.
    """
    if st is None:
        try:
            st = path.stat()
        except FileNotFoundError:
            raise ConfigError(f"{path}: not found", file=str(path), key="") from None
        except OSError as e:  # ELOOP, ENOTDIR, ENAMETOOLONG...: one line, exit 2
            raise ConfigError(f"{path}: {e.strerror or e}", file=str(path), key="") from None
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigError(f"{path}: writable by group or others "
                          f"(mode {stat.S_IMODE(st.st_mode):04o}; allowed: 0644 or stricter, "
                          f"e.g. chmod go-w {path})", file=str(path), key="")
    if st.st_uid not in (0, os.geteuid()):
        raise ConfigError(f"{path}: owned by uid {st.st_uid}, not by root "
                          f"(allowed: owner root; chown root {path})", file=str(path), key="")


def _open_nofollow(path: Path, flags: int, dir_fd: int | None = None) -> int:
    """os.open of `path` (relative to `dir_fd` when given) without following a
    symbolic link as its last component; a descriptor, or ConfigError."""
    try:
        return os.open(path.name if dir_fd is not None else path, flags, dir_fd=dir_fd)
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found", file=str(path), key="") from None
    except OSError as e:
        # ELOOP, or ENOTDIR with O_DIRECTORY (open(2)); the name only words the message
        if e.errno in (errno.ELOOP, errno.ENOTDIR) and os.path.islink(path):
            fix = ("name the real directory instead" if flags & os.O_DIRECTORY
                   else "put the real file in its place (copy it)")
            raise ConfigError(f"{path}: a symbolic link, refused: config is read without "
                              f"following links, so that what was checked is what is read; "
                              f"{fix}", file=str(path), key="") from None
        raise ConfigError(f"{path}: cannot open: {e.strerror}", file=str(path), key="") from None


class ConfigLoader(yaml.SafeLoader):
    """yaml.SafeLoader for config files, with bounds.

    - Aliases (*name) are refused: PyYAML shares an aliased node, so a
      "billion laughs" file of a few hundred bytes loads at once into lists
      that every walk over them (a repr in an error message, json.dumps)
      expands to 10^9 items; `&a [*a]` makes a list that contains itself.
      No documented config uses anchors.
    - Nesting deeper than MAX_YAML_DEPTH is refused.
    - Integers beyond +-MAX_YAML_INT, and integer text over 100 characters, are
      refused (base-60 "1:2:3:..." is a quadratic big-number product).
    - A value a constructor cannot build is a ConstructorError at its line:
      SafeConstructor raises what its parsing happens to raise ("2001-02-30"
      ValueError, an empty "!!int" IndexError, "!!timestamp" AttributeError,
      "!!bool" KeyError).
    Every refusal is a yaml.MarkedYAMLError naming the line and column.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, f"alias *{event.anchor} refused: anchors and aliases are not allowed "
                "in a config (write the value out)", event.start_mark)
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise yaml.composer.ComposerError(
                    None, None, f"nested deeper than {MAX_YAML_DEPTH} levels",
                    self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_object(self, node: Any, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except yaml.YAMLError:
            raise
        except Exception as e:  # SafeConstructor's own, on any text (see above)
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read {node.value!r:.60}: {e}", node.start_mark) from None

    def construct_yaml_int(self, node: Any) -> int:
        if len(str(node.value)) > 100:
            raise yaml.constructor.ConstructorError(
                None, None, f"an integer of {len(node.value)} characters (allowed: "
                f"-{MAX_YAML_INT}..{MAX_YAML_INT})", node.start_mark)
        value = super().construct_yaml_int(node)
        if not -MAX_YAML_INT <= value <= MAX_YAML_INT:
            raise yaml.constructor.ConstructorError(
                None, None, f"{node.value} is out of range (allowed: an integer "
                f"-{MAX_YAML_INT}..{MAX_YAML_INT})", node.start_mark)
        return value


    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        """A key given twice is refused at its second line: YAML's last-wins
        would let `ProtectSystem: "no"` below `ProtectSystem: strict` pass
        unseen in review."""
        seen: dict[Any, Any] = {}
        for key_node, _value in node.value:
            if isinstance(key_node, yaml.ScalarNode) and \
                    key_node.tag != "tag:yaml.org,2002:merge":
                key = self.construct_object(key_node, deep=False)
                try:
                    if key in seen:
                        raise yaml.constructor.ConstructorError(
                            None, None, f"key {key!r:.60} given twice (first at line "
                            f"{seen[key].line + 1}): write it once", key_node.start_mark)
                    seen[key] = key_node.start_mark
                except TypeError:  # an unhashable key: SafeConstructor says so
                    pass
        return super().construct_mapping(node, deep)


ConfigLoader.add_constructor("tag:yaml.org,2002:int", ConfigLoader.construct_yaml_int)


def read_yaml(path: Path) -> Any:
    """The YAML document in `path` (a service config or agent.yaml), read
    without a window to swap what is read for something else.

    The directory `path.parent` is opened first (O_DIRECTORY|O_NOFOLLOW),
    checked through fstat (owner root or the euid, not writable by group or
    others), and the file is opened relative to that descriptor (openat(2)),
    so the checked directory is the one read from. The file is opened with
    O_NOFOLLOW|O_NONBLOCK and must be a regular file with the same owner and
    mode rules; at most MAX_CONFIG_BYTES are read from that descriptor.

    Symbolic links: O_NOFOLLOW applies to the last component only. A config
    file that is a link, or a config directory that is a link, is refused
    (ConfigError naming the path and the fix); links among the directory's
    ancestors (/etc itself, say) are followed, as they are owned by root
    like /etc. The YAML is read by ConfigLoader (no aliases, bounded depth
    and integers). Raises ConfigError, one line naming `path`, for every
    refusal and for a file that is not UTF-8 or not valid YAML.
    """
    dir_fd = _open_nofollow(path.parent, _OPEN_FLAGS | os.O_DIRECTORY)
    try:
        check_not_writable_by_others(path.parent, os.fstat(dir_fd))
        fd = _open_nofollow(path, _OPEN_FLAGS, dir_fd=dir_fd)
    finally:
        os.close(dir_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{path}: not a regular file (allowed: a YAML file)",
                              file=str(path), key="")
        check_not_writable_by_others(path, st)
        with open(fd, "rb", closefd=False) as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}", file=str(path), key="") from None
    finally:
        os.close(fd)
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES // 1024} KiB (allowed: "
                          f"up to {MAX_CONFIG_BYTES} bytes; a service config is a few "
                          "hundred)", file=str(path), key="")
    try:
        text = data.decode()
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: cannot read: {e}", file=str(path), key="") from None
    hit = _PARSED.get(str(path))
    if hit is not None and hit[0] == data:
        return copy.deepcopy(hit[1])
    try:
        doc = yaml.load(text, Loader=ConfigLoader)  # a SafeLoader subclass
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}",
                          file=str(path), key="") from None
    if len(_PARSED) >= 256:
        _PARSED.clear()
    _PARSED[str(path)] = (data, copy.deepcopy(doc))
    return doc


# path -> (the bytes last read there, their document): the daemon reads a
# service's config and agent.yaml at every swap, and PyYAML's pure-Python
# parser cost a few ms of CPU each time (issue 16). Keyed by the content,
# read and checked as always above, so a changed file is parsed again.
_PARSED: dict[str, tuple[bytes, Any]] = {}


def service_path(config_dir: Path, name: str) -> Path:
    return config_dir / f"{check_name(name)}.yaml"


def load_service(config_dir: Path, name: str) -> ServiceConfig:
    path = service_path(config_dir, name)
    if not path.exists():
        raise ConfigError(f"{path}: no config for service {name!r}", file=str(path), key="")
    return parse_service(path, read_yaml(path), expected_name=name)


def load_all(config_dir: Path) -> list[ServiceConfig]:
    if not config_dir.is_dir():
        return []
    services = [parse_service(p, read_yaml(p), expected_name=p.stem)
                for p in sorted(config_dir.glob("*.yaml"))]
    seen: dict[int | str, str] = {}
    for svc in services:
        for where in (*svc.ports, *svc.unix_paths):
            what = f"port {where}" if isinstance(where, int) else UNIX_PREFIX + where
            if where in seen:
                raise ConfigError(f"{svc.path}: listen: {what} is also used by service "
                                  f"{seen[where]!r}", file=str(svc.path), key="listen")
            seen[where] = svc.name
    return services




@dataclass(frozen=True)
class AgentConfig:
    path: Path | None = None
    sysctl: tuple[tuple[str, str | None], ...] = ()  # overrides; None: leave that key alone
    admin_group: str = "zdd-admin"  # members may change things through the control socket
    metrics_listen: str | None = None  # loopback host:port of the Prometheus endpoint
    host_ready_listen: str | None = None  # host:port of GET /ready for load balancers
    host_ready_tls: HostReadyTLS | None = None  # serve /ready over TLS (mTLS with client_ca)
    # the peers /ready answers (empty: any); others are closed unanswered
    host_ready_allow_from: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()


@dataclass(frozen=True)
class HostReadyTLS:
    """host_ready.tls: absolute paths of PEM files, checked by load_agent_config."""

    cert: str  # the server's certificate chain
    key: str  # its private key: root's alone (mode 0600 or stricter)
    client_ca: str | None = None  # set: a client must show a certificate this CA signed


def load_agent_config(path: Path) -> AgentConfig:
    if not path.exists():
        return AgentConfig()
    data = read_yaml(path) or {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: the file must hold a mapping of keys", file=str(path), key="")
    chk = _Checker(path, data)
    chk.reject_unknown(("sysctl", "admin_group", "metrics", "host_ready"))
    group = data.get("admin_group", "zdd-admin")
    if not isinstance(group, str) or not GROUP_RE.fullmatch(group):
        raise chk.fail("admin_group", f"{group!r} is not a group name "
                                      "(allowed: [a-z_][a-z0-9_-]{0,31})")
    mchk = chk.section("metrics")
    mchk.reject_unknown(("listen",))
    metrics_listen = mchk.get("listen")
    if metrics_listen is not None:
        from .metrics import parse_listen

        parse_listen(str(metrics_listen), f"{path}: metrics.listen")
    hchk = chk.section("host_ready")
    hchk.reject_unknown(("listen", "tls", "allow_from"))
    host_ready = hchk.get("listen")
    if host_ready is not None:
        from .metrics import parse_listen

        # any address: the load balancers that ask are elsewhere; it tells only 200 or 503
        _host, port = parse_listen(str(host_ready), f"{path}: host_ready.listen",
                                   loopback=False)
        if metrics_listen is not None and \
                port == parse_listen(str(metrics_listen), f"{path}: metrics.listen")[1]:
            raise hchk.fail("listen", f"{host_ready} uses the port of metrics.listen "
                                      f"({metrics_listen})")
    ready_tls = _host_ready_tls(hchk.section("tls"))
    allow_from = _allow_from(hchk)
    from .sysctl import DEFAULTS  # the keys the agent manages

    overrides: list[tuple[str, str | None]] = []
    for key, value in chk.mapping("sysctl").items():
        if key not in DEFAULTS:
            raise chk.fail(f"sysctl.{key}", f"not a key the agent manages "
                                            f"(allowed: {', '.join(DEFAULTS)})")
        if value is None:
            overrides.append((key, None))
        elif isinstance(value, bool) or not isinstance(value, (int, str)):
            raise chk.fail(f"sysctl.{key}", f"{value!r} must be an integer, a string or null")
        elif not re.fullmatch(r"[0-9]+(?:[ \t]+[0-9]+)*", str(value).strip()):
            raise chk.fail(f"sysctl.{key}", f"{value!r} must be numbers separated by spaces")
        else:
            words = [int(w) for w in str(value).split()]
            want = len(DEFAULTS[key].split())  # e.g. "10240 65535" for a port range
            if len(words) != want:
                raise chk.fail(f"sysctl.{key}", f"{value!r} must be {want} number"
                                                f"{'s' if want > 1 else ''} (like "
                                                f"{DEFAULTS[key]!r})")
            if any(w > 2**31 - 1 for w in words) or (
                    want == 2 and not 1 <= words[0] <= words[1] <= 65535):
                raise chk.fail(f"sysctl.{key}", f"{value!r} is out of range (allowed: like "
                                                f"{DEFAULTS[key]!r}"
                                                + (", LOW <= HIGH in 1..65535)" if want == 2
                                                   else ", 0..2147483647)"))
            overrides.append((key, " ".join(str(w) for w in words)))
    return AgentConfig(path=path, sysctl=tuple(overrides), admin_group=group,
                       metrics_listen=None if metrics_listen is None else str(metrics_listen),
                       host_ready_listen=None if host_ready is None else str(host_ready),
                       host_ready_tls=ready_tls, host_ready_allow_from=allow_from)


def _allow_from(hchk: _Checker) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """host_ready.allow_from: parse_networks' list, as network objects; (): any peer."""
    return tuple(ipaddress.ip_network(n)
                 for n in parse_networks(hchk, "allow_from", hchk.get("allow_from")))


def _host_ready_tls(tchk: _Checker) -> HostReadyTLS | None:
    """host_ready.tls: {cert, key, client_ca?}; None when absent. Each is an
    absolute path to a readable file that root owns and only root may change
    (whoever can replace client_ca chooses who may connect); the key also only
    root may read. The certificate must load with the key, client_ca as CAs."""
    if not tchk.data:
        return None
    tchk.reject_unknown(("cert", "key", "client_ca"))
    for name in ("cert", "key"):
        if tchk.get(name) is None:
            raise tchk.fail(name, "required with host_ready.tls (the path of a PEM file)")
    cert, key = _tls_file(tchk, "cert"), _tls_file(tchk, "key", secret=True)
    client_ca = _tls_file(tchk, "client_ca") if tchk.get("client_ca") is not None else None
    import ssl

    from .hostready import server_context

    try:
        ctx = server_context(cert, key)
    except (ssl.SSLError, OSError) as e:
        raise tchk.fail("cert", f"{cert} does not load with key {key}: "
                                f"{_ssl_reason(e)}") from None
    if client_ca is not None:
        try:
            ctx.load_verify_locations(cafile=client_ca)
        except (ssl.SSLError, OSError) as e:
            raise tchk.fail("client_ca", f"{client_ca} holds no CA certificate that loads: "
                                         f"{_ssl_reason(e)}") from None
    return HostReadyTLS(cert=cert, key=key, client_ca=client_ca)


def _tls_file(tchk: _Checker, name: str, secret: bool = False) -> str:
    raw = tchk.get(name)
    if not isinstance(raw, str) or not raw.startswith("/"):
        raise tchk.fail(name, f"{raw!r} must be an absolute path to a PEM file")
    try:
        check_not_writable_by_others(Path(raw))
    except ConfigError as e:
        raise tchk.fail(name, str(e)) from None
    # ssl opens it by name: whoever can replace it (or a directory on its
    # way, or what a link points at) chooses who may connect
    why = untrusted(raw)
    if why is not None:
        raise tchk.fail(name, f"{raw}: {why} (allowed: root's alone along the whole path, "
                              "as sshd's StrictModes)")
    try:
        st = os.stat(raw)
    except OSError as e:
        raise tchk.fail(name, f"{raw}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise tchk.fail(name, f"{raw}: not a regular file")
    if secret and st.st_mode & (stat.S_IRGRP | stat.S_IROTH):
        raise tchk.fail(name, f"{raw}: readable by group or others (mode "
                              f"{stat.S_IMODE(st.st_mode):04o}; allowed: 0600 or stricter, "
                              f"e.g. chmod go-rwx {raw})")
    try:
        with open(raw, "rb"):
            pass
    except OSError as e:
        raise tchk.fail(name, f"{raw}: cannot read: {e.strerror}") from None
    return raw


def _ssl_reason(e: OSError) -> str:
    """One line: "[X509: KEY_VALUES_MISMATCH] key values mismatch" without the
    "(_ssl.c:NNNN)" tail, or an OSError's strerror."""
    import ssl

    text = str(e) if isinstance(e, ssl.SSLError) else (e.strerror or str(e))
    return re.sub(r"\s*\(_ssl\.c:\d+\)", "", text).replace("\n", " ")
