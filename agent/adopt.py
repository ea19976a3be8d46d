"""Adopting a legacy systemd service: what its unit runs (and its socket unit
passes it), read over D-Bus, and the zdd-agent service config that runs the
same program, with one sentence for each thing the config cannot carry.

`read_legacy` and `listening_addresses` read the host (pystemd; sock_diag and
/proc through agent/listeners.py); `to_config` is pure: the same LegacyUnit
gives the same config, which agent.config.parse_service accepts.

Sources: org.freedesktop.systemd1(5) (the properties read and their D-Bus
types), systemd.unit(5) (unit names), systemd.service(5) (Type=, Restart=,
ExecStart=), systemd.socket(5) (Listen), systemd.exec(5) (credentials,
environment, limits, sandboxing), systemd.kill(5) (KillSignal=,
TimeoutStopSec=), systemd.resource-control(5), capabilities(7),
clone(2) (the CLONE_NEW* flags of RestrictNamespaces=).
"""

from __future__ import annotations

import datetime
import errno
import ipaddress
import re
import signal
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from .config import (
    DRAIN_SIGNALS,
    INSTANCE_PORT,
    SUN_PATH_MAX,
    UNIX_PREFIX,
    check_name,
    check_version,
    format_duration,
    parse_service,
)
from .defaults import DEFAULT_CONFIG_DIR
from .errors import ConfigError
from .settings import HARDENING, NAMESPACES, NOFILE_MAX, REDIRECTS, VERSION

if TYPE_CHECKING:
    from .systemd import Systemd

# systemd.unit(5): letters, digits, ":-_.\" and one "@" before the suffix;
# UNIT_NAME_MAX is 256 with the NUL. Checked before the name reaches D-Bus.
UNIT_NAME_RE = re.compile(r"[A-Za-z0-9:_.\\-]+(?:@[A-Za-z0-9:_.\\-]*)?\.[a-z]+")
UNIT_NAME_MAX = 255
INFINITY = 2**64 - 1  # systemd's "infinity" for limits, sizes and times (UINT64_MAX)
RESERVED_ENV = ("ZDD_", "LISTEN_", "NOTIFY_SOCKET")  # config.parse_service refuses these
# capabilities(7) by number (include/uapi/linux/capability.h), Linux 6.x: the
# bit of each in CapabilityBoundingSet= and AmbientCapabilities= masks
CAP_NAMES = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID",
    "CAP_KILL", "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE", "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW",
    "CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE", "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE", "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE",
    "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL", "CAP_SETFCAP", "CAP_MAC_OVERRIDE", "CAP_MAC_ADMIN",
    "CAP_SYSLOG", "CAP_WAKE_ALARM", "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ", "CAP_PERFMON",
    "CAP_BPF", "CAP_CHECKPOINT_RESTORE")
# clone(2) flags of the namespace types settings.NAMESPACES names
CLONE_FLAGS = {"cgroup": 0x02000000, "ipc": 0x08000000, "net": 0x40000000, "mnt": 0x00020000,
               "pid": 0x20000000, "user": 0x10000000, "uts": 0x04000000}
# The choice-valued hardening directives' defaults (systemd.exec(5))
CHOICE_DEFAULTS = {"ProtectSystem": "no", "ProtectHome": "no", "ProtectProc": "default",
                   "ProcSubset": "all"}
# Service properties (org.freedesktop.systemd1.Service) that no config key
# carries, said when they differ from their defaults: (property, defaults).
EXTRAS: tuple[tuple[str, tuple[Any, ...]], ...] = (
    ("PIDFile", ("",)), ("BusName", ("",)), ("WatchdogUSec", (0,)),
    ("RuntimeMaxUSec", (INFINITY,)), ("FileDescriptorStoreMax", (0,)), ("Nice", (0,)),
    ("CPUAffinity", ([],)), ("CPUSchedulingPolicy", (0,)), ("RuntimeDirectory", ([],)),
    ("StateDirectory", ([],)), ("CacheDirectory", ([],)), ("LogsDirectory", ([],)),
    ("ConfigurationDirectory", ([],)), ("StandardOutput", ("journal", "inherit")),
    ("StandardError", ("journal", "inherit")), ("SyslogIdentifier", ("",)),
    ("PrivateNetwork", (False,)), ("PrivateUsers", (False,)), ("DynamicUser", (False,)),
    ("RootDirectory", ("",)), ("RootImage", ("",)), ("IPAddressAllow", ([],)),
    ("IPAddressDeny", ([],)), ("LoadCredential", ([],)), ("SetCredential", ([],)),
    ("BindPaths", ([],)), ("BindReadOnlyPaths", ([],)), ("TemporaryFileSystem", ([],)),
    ("DeviceAllow", ([],)), ("Delegate", (False,)), ("Slice", ("system.slice",)),
    ("CPUWeight", (INFINITY,)), ("IOWeight", (INFINITY,)),
)
OTHER_EXEC = ("ExecCondition", "ExecStartPre", "ExecStartPost", "ExecReload", "ExecStop",
              "ExecStopPost")
OTHER_EXEC_WHY = {
    "ExecReload": "a new version is swapped in, not reloaded",
    "ExecStop": "an instance is stopped by its drain signal (drain.signal)",
    "ExecStopPost": "an instance is stopped by its drain signal; what must run after a "
                    "swap goes in hooks.post_swap",
}
LIMITS = (("nofile", "LimitNOFILE"), ("nproc", "LimitNPROC"), ("core", "LimitCORE"))
SOCKET_TYPES_CARRIED = ("Stream",)
# Programs whose flag for the port to bind is known, for the advice
BIND_FLAGS = {"gunicorn": "--bind [::]:{instance_port}", "uvicorn": "--port {instance_port}"}
_PORT_FLAG_RE = re.compile(r"-{1,2}[A-Za-z0-9-]*(?:port|bind|listen)[A-Za-z0-9-]*", re.I)
_PORT_KEY_RE = re.compile(r"PORT|LISTEN|BIND|ADDR", re.I)


@dataclass(frozen=True)
class ExecCommand:
    """One ExecStart= entry: the ExecStart property's a(sasbttttuii) holds
    the resolved executable (`path`), the argv as given (argv[0] may be a
    bare name, or another name with "@"), and whether a failure is ignored
    ("-" prefix)."""

    path: str
    argv: tuple[str, ...]
    ignore_failure: bool = False


@dataclass(frozen=True)
class LegacySocket:
    """The socket unit that passes the service its listeners (LISTEN_FDS).

    `listen`: its Listen property, a(ss): ("Stream", "0.0.0.0:8000"),
    ("Stream", "[::]:8000"), ("Stream", "/run/gunicorn.sock"), ("Datagram",
    ...). `socket_mode` is SocketMode= (octal bits, 0o666 by default)."""

    name: str
    listen: tuple[tuple[str, str], ...]
    accept: bool = False
    socket_user: str = ""
    socket_group: str = ""
    socket_mode: int = 0o666


@dataclass(frozen=True)
class LegacyUnit:
    """What zdd-agent can learn about a legacy .service unit from systemd.

    Values as systemd reports them (org.freedesktop.systemd1(5)), decoded;
    "" for an unset string. `limits`: (key, soft, hard) for those of
    nofile/nproc/core that differ from the manager's defaults (DefaultLimitX),
    INFINITY for infinity. `resources`: (settings key, value) of MemoryMax=,
    MemoryHigh= (bytes), TasksMax= (a count) and CPUQuota= (percent of one CPU)
    where set. `hardening`: (directive, value in the service config's form) for
    settings.HARDENING directives that differ from their defaults.
    `other_exec`: (directive, argv) of ExecStartPre= and the like. `extras`:
    (directive, value shown) of other non-default settings no config key
    carries (Nice=, PIDFile=, RuntimeDirectory=, a SystemCallFilter= as systemd
    expands it...)."""

    name: str
    exec_start: tuple[ExecCommand, ...]
    type: str = "simple"
    user: str = ""
    group: str = ""
    supplementary_groups: tuple[str, ...] = ()
    environment: tuple[str, ...] = ()  # "K=V"
    environment_files: tuple[tuple[str, bool], ...] = ()  # (path, optional: "-" prefix)
    working_directory: str = ""  # "~": the user's home; "!" prefix: may be missing
    limits: tuple[tuple[str, int, int], ...] = ()
    resources: tuple[tuple[str, int], ...] = ()
    oom_score_adjust: int = 0
    kill_mode: str = "control-group"
    kill_signal: int = signal.SIGTERM
    timeout_stop_usec: int = 90_000_000
    restart: str = "no"
    hardening: tuple[tuple[str, Any], ...] = ()
    other_exec: tuple[tuple[str, tuple[str, ...]], ...] = ()
    extras: tuple[tuple[str, str], ...] = ()
    fragment_path: str = ""
    unit_file_state: str = ""
    active_state: str = ""
    socket: LegacySocket | None = None


@dataclass(frozen=True)
class Adoption:
    """A service config for an adopted unit: `data` (the mapping that
    parse_service accepts), `text` (it as YAML, with a header and a comment
    per item not carried), `not_carried` (one sentence each: what, why, and
    what the operator does), `unix` (it listens on a Unix socket: the proxy in
    front must be moved to the new path)."""

    data: dict[str, Any]
    text: str
    not_carried: list[str] = field(default_factory=list)
    unix: bool = False


# ------------------------------------------------------------------ reading


def check_unit_name(unit: str) -> str:
    """`unit` as a service unit name: "api" -> "api.service"; "api.service"
    and instances "api@1.service" as they are. ConfigError for anything else
    (other characters, another unit type, a template "api@.service")."""
    if isinstance(unit, str) and unit and "." not in unit:
        unit = f"{unit}.service"
    if not isinstance(unit, str) or len(unit) > UNIT_NAME_MAX or \
            not UNIT_NAME_RE.fullmatch(unit):
        raise ConfigError(f"cannot adopt {unit!r}: not a unit name (allowed: letters, digits "
                          "and :-_.\\@, e.g. api.service)")
    if not unit.endswith(".service"):
        raise ConfigError(f"cannot adopt {unit}: not a .service unit (name the service, "
                          "and its socket unit is found through it)")
    if "@." in unit:
        raise ConfigError(f"cannot adopt {unit}: a template; name one of its instances "
                          "(e.g. api@1.service)")
    return unit


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _plain(value: Any) -> Any:
    """A pystemd value with bytes decoded, tuples and lists as lists."""
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def read_legacy(sd: Systemd, unit: str) -> LegacyUnit:
    """The legacy service `unit` (checked by check_unit_name first) and the
    socket unit that triggers it (TriggeredBy=), read over D-Bus.

    ConfigError when the name is refused, or systemd has no such unit
    (LoadState not-found), it is masked or its file does not load;
    SystemdError when systemd cannot be asked."""
    unit = check_unit_name(unit)
    u = sd._unit(unit)
    load = _s(u.Unit.LoadState)
    if load != "loaded":
        why = {"not-found": "no such unit", "masked": "masked"}.get(load, f"load state {load}")
        raise ConfigError(f"cannot adopt {unit}: {why} (systemctl status {unit})")
    name = _s(u.Unit.Id)  # an alias resolves to the unit itself
    svc = u.Service
    env_files = tuple((_s(p), bool(opt)) for p, opt in svc.EnvironmentFiles)
    limits = []
    for key, prop in LIMITS:
        soft, hard = int(getattr(svc, f"{prop}Soft")), int(getattr(svc, prop))
        if (soft, hard) != (int(sd.manager_property(f"Default{prop}Soft")),
                            int(sd.manager_property(f"Default{prop}"))):
            limits.append((key, soft, hard))
    sockets = [_s(n) for n in u.Unit.TriggeredBy if _s(n).endswith(".socket")]
    extras = _extras(svc)
    extras += [("TriggeredBy", n) for n in sockets[1:]]
    extras += [(dep, _s(n)) for dep in ("Requires", "Requisite", "BindsTo", "Wants")
               for n in getattr(u.Unit, dep) if _s(n).endswith(".service")]
    return LegacyUnit(
        name=name,
        exec_start=tuple(ExecCommand(_s(e[0]), tuple(_s(a) for a in e[1]), bool(e[2]))
                         for e in svc.ExecStart),
        type=_s(svc.Type), user=_s(svc.User), group=_s(svc.Group),
        supplementary_groups=tuple(_s(g) for g in svc.SupplementaryGroups),
        environment=tuple(_s(e) for e in svc.Environment), environment_files=env_files,
        working_directory=_s(svc.WorkingDirectory), limits=tuple(limits),
        resources=_resources(sd, svc), oom_score_adjust=int(svc.OOMScoreAdjust),
        kill_mode=_s(svc.KillMode), kill_signal=int(svc.KillSignal),
        timeout_stop_usec=int(svc.TimeoutStopUSec), restart=_s(svc.Restart),
        hardening=tuple(_hardening(svc, extras)),
        other_exec=tuple((d, tuple(_s(a) for a in e[1]))
                         for d in OTHER_EXEC for e in getattr(svc, d)),
        extras=tuple(extras), fragment_path=_s(u.Unit.FragmentPath),
        unit_file_state=_s(u.Unit.UnitFileState), active_state=_s(u.Unit.ActiveState),
        socket=_read_socket(sd, sockets[0]) if sockets else None)


def _read_socket(sd: Systemd, name: str) -> LegacySocket:
    sock = sd._unit(name).Socket
    return LegacySocket(
        name=name, listen=tuple((_s(t), _s(a)) for t, a in sock.Listen),
        accept=bool(sock.Accept), socket_user=_s(sock.SocketUser),
        socket_group=_s(sock.SocketGroup), socket_mode=int(sock.SocketMode))


def _extras(svc: Any) -> list[tuple[str, str]]:
    out = []
    for prop, defaults in EXTRAS:
        try:
            value = _plain(getattr(svc, prop))
        except Exception:  # a property this systemd does not have
            continue
        if value in defaults:
            continue
        if prop.startswith("IPAddress"):  # a(iayu): family, address bytes, prefix length
            value = [f"{ipaddress.ip_address(bytes(addr))}/{plen}" for _f, addr, plen in value]
        out.append((prop, " ".join(map(str, value)) if isinstance(value, list) else str(value)))
    return out


def _resources(sd: Systemd, svc: Any) -> tuple[tuple[str, int], ...]:
    out = [(key, int(getattr(svc, prop))) for key, prop in
           (("memory_max", "MemoryMax"), ("memory_high", "MemoryHigh"))
           if int(getattr(svc, prop)) != INFINITY]
    tasks = int(svc.TasksMax)
    if tasks not in (INFINITY, int(sd.manager_property("DefaultTasksMax"))):
        out.append(("tasks_max", tasks))
    quota = int(svc.CPUQuotaPerSecUSec)  # CPU time per second: 1500000 is 150%
    if quota != INFINITY:
        out.append(("cpu_quota", max(1, quota // 10_000)))
    return tuple(out)


def _hardening(svc: Any, extras: list[tuple[str, str]]) -> list[tuple[str, Any]]:
    """(directive, config value) of settings.HARDENING's directives that
    differ from systemd's defaults; those this module cannot put in the
    config's form go to `extras` with their value."""
    out: list[tuple[str, Any]] = []
    for key, (kind, _choices) in HARDENING.items():
        try:
            raw = _plain(getattr(svc, key))
        except Exception:
            continue
        value = _config_value(key, kind, raw)
        if value is _UNSUPPORTED:
            extras.append((key, str(raw)))
        elif value is not None:
            out.append((key, value))
    return out


_UNSUPPORTED = object()


def _config_value(key: str, kind: str, raw: Any) -> Any:
    """The config's form of one hardening property's D-Bus value; None when
    it is systemd's default, _UNSUPPORTED when it has no config form."""
    if kind == "bool":
        return True if raw else None
    if kind == "paths":
        return list(raw) or None
    if key == "SystemCallArchitectures":
        return None if not raw else "native" if raw == ["native"] else _UNSUPPORTED
    if kind == "choice":
        return None if raw == CHOICE_DEFAULTS.get(key) else raw
    if kind == "caps":  # a bit mask; the bounding set is every capability by default
        names = [n for i, n in enumerate(CAP_NAMES) if raw >> i & 1]
        if key == "CapabilityBoundingSet":
            return None if len(names) == len(CAP_NAMES) else names
        return names or None
    if kind == "families":  # (allow-list?, names); (False, []): no restriction
        allow, names = raw
        if not allow and not names:
            return None
        return names or "none" if allow else ["~" + names[0], *names[1:]]
    if kind == "namespaces":  # the allowed CLONE_NEW* flags; all by default
        allowed = [n for n in NAMESPACES if raw & CLONE_FLAGS[n]]
        if len(allowed) == len(NAMESPACES):
            return None
        return allowed or True
    if kind == "syscalls":  # systemd reports @sets expanded into single calls
        return None if not raw[1] else _UNSUPPORTED
    if kind == "word":  # SystemCallErrorNumber: an errno, or kill (the default)
        return errno.errorcode.get(raw)
    if kind == "umask":
        return None if raw == 0o022 else f"{raw:04o}"
    return _UNSUPPORTED


def listening_addresses(pids: Iterable[int]) -> list[str]:
    """The TCP addresses `pids` hold a LISTEN socket on, "HOST:PORT" or
    "[V6]:PORT" ("0.0.0.0:3000", "[::]:8080"), sorted by port and without
    repeats: for a service that binds its own port. Reads sock_diag(7) and
    /proc/PID/fd (agent/listeners.py); OSError when netlink fails."""
    from .census import TCP_LISTEN, diag_dump, fd_inodes
    from .listeners import FAMILIES, held_by, listening

    pids = set(pids)
    inodes = {ino for pid in pids for ino in fd_inodes(pid).values()}
    if not inodes:
        return []
    ports = {m.sport for m in diag_dump(FAMILIES, 1 << TCP_LISTEN, inodes=inodes)}
    socks = listening(ports)
    held = held_by(pids, socks)
    found = {(s.port, s.address) for s in socks if s.inode in held}
    return [address for _port, address in sorted(found)]


def socket_addresses(sock: LegacySocket) -> list[str]:
    """The socket unit's stream listeners as `to_config` takes them:
    "HOST:PORT", "[V6]:PORT", "PORT", or a path ("/run/gunicorn.sock")."""
    return [address for kind, address in sock.listen if kind in SOCKET_TYPES_CARRIED]


# ---------------------------------------------------------------- the config


def to_config(legacy: LegacyUnit, name: str, listen: list[str], version: str | None, *,
              today: datetime.date | None = None) -> Adoption:
    """The service config `name` that runs what `legacy` runs.

    `listen`: what clients connect to: socket_addresses(legacy.socket), or for
    a service without a socket unit listening_addresses() of its processes.
    TCP addresses become `socket: nat` (it takes over a port the legacy unit
    still holds) with the port as {instance_port} in the command and
    environment; Unix socket paths become `socket: inherit` on a new path.
    `version`: the running version, replaced by {version} in the command and
    paths where it appears. ConfigError for a bad name or version, a unit
    without ExecStart or without a listener; whatever else cannot be carried
    is left out and said in `not_carried`."""
    name = check_name(name)
    if version is not None:
        check_version(version)
    path = DEFAULT_CONFIG_DIR / f"{name}.yaml"
    a = _Adopting(legacy, name, path)
    a.command(version)
    a.listen(listen)
    a.ready()
    a.settings(version)
    a.drain()
    a.leftovers()
    if a.versioned:
        a.note(f"{{version}} put in place of {version} (check each: the next swap runs the "
               f"release it names): {'; '.join(a.versioned)}")
    if version is not None and not a.version_used:
        a.note(f"version {version} appears nowhere in ExecStart, WorkingDirectory or "
               "EnvironmentFile: every version runs the same command: point {version} at "
               "the release path yourself")
    parse_service(path, a.data)  # what is written must load
    return Adoption(data=a.data, text=_text(a, today or datetime.date.today()),
                    not_carried=a.notes, unix=a.unix)


class _Adopting:
    """The config being built: `data` grows by items that parse_service
    accepts; each refused item becomes a line in `notes` instead."""

    def __init__(self, legacy: LegacyUnit, name: str, path: Path) -> None:
        self.legacy, self.name, self.path = legacy, name, path
        self.data: dict[str, Any] = {"name": name}
        self.notes: list[str] = []
        self.unix = False
        self.version_used = False
        self.versioned: list[str] = []  # "before -> after" of each {version} put in
        self.port: int | None = None  # the public TCP port (socket: nat)
        self.port_named = False  # the command or environment names it
        self.bind_host: str | None = None  # the host the program binds, from the command
        self.moved: tuple[str, str] | None = None  # a Unix socket path: (legacy, new)

    def note(self, text: str) -> None:
        self.notes.append(text)

    def carry(self, what: str, update: Mapping[str, Any]) -> bool:
        """Merge `update` (nested mappings merged) if the config then still
        parses; otherwise note why not, in the config's words."""
        trial = _merged(self.data, update)
        try:
            parse_service(self.path, trial)
        except ConfigError as e:
            why = str(e).removeprefix(f"{self.path}: ")
            self.note(f"{what} not carried: {why}")
            return False
        self.data = trial
        return True

    # ---------------------------------------------------------------- command

    def command(self, version: str | None) -> None:
        unit = self.legacy.name
        if not self.legacy.exec_start:
            raise ConfigError(f"cannot adopt {unit}: it has no ExecStart")
        first, *rest = self.legacy.exec_start
        if rest:
            self.note(f"ExecStart= has {len(self.legacy.exec_start)} commands (Type="
                      f"{self.legacy.type}); only the first is carried: a zdd-agent instance "
                      "runs one program; run the others from it, or as hooks")
        if not first.path.startswith("/"):
            raise ConfigError(f"cannot adopt {unit}: ExecStart {first.path!r} is not an "
                              "absolute path")
        argv = [first.path, *first.argv[1:]]
        if first.argv and first.argv[0] not in (first.path, first.path.rsplit("/", 1)[-1]):
            self.note(f"ExecStart=@ gave {first.path} the argv[0] {first.argv[0]!r}: the "
                      f"command runs it as {first.path}")
        if first.ignore_failure:
            self.note("ExecStart=- (a failing exit ignored) is not carried: an instance that "
                      "exits with an error has failed")
        for d, other in self.legacy.other_exec:
            self.note(f"{d}={' '.join(other)} not carried: " + OTHER_EXEC_WHY.get(
                d, "an instance runs its command alone; fold it into the command, or use "
                   "a hook (pre_swap, post_start, post_swap)"))
        if any(ord(c) < 32 or ord(c) == 127 for a in argv for c in a):
            raise ConfigError(f"cannot adopt {unit}: an ExecStart argument holds a control "
                              "character")
        if version is not None:
            argv = [self._versioned(a, version) for a in argv]
        refs = sorted({m.group(1) or m.group(2) for a in argv[1:]
                       for m in re.finditer(r"\$\{(\w+)\}|\$(\w+)", a)})
        if refs:
            # systemd expands $X in ExecStart= when it runs it; zdd-agent runs
            # the command as written (units.exec_start makes $ literal)
            self.note(f"ExecStart= refers to {', '.join('$' + r for r in refs)}, which systemd "
                      "expanded and zdd-agent does not: write the value into command (for the "
                      "port: {instance_port})")
        self.data["command"] = argv

    def _versioned(self, text: str, version: str) -> str:
        """The version as a path component or a delimited part of one
        (/releases/1.4.2/, /opt/app-1.4.2/, /opt/app-v1.4.2/), never a bare
        value (`-w 1` is a count) nor inside a word (python3, shard1).
        Each replacement is listed for the operator to review."""
        if "/" not in text:
            return text
        pattern = (rf"(?:(?<![A-Za-z0-9.])|(?<=[/_@=-][vV])){re.escape(version)}"
                   r"(?![A-Za-z0-9])(?!\.[0-9])")
        new = re.sub(pattern, VERSION, text)
        if new != text:
            self.version_used = True
            self.versioned.append(f"{text} -> {new}")
        return new

    # ----------------------------------------------------------------- listen

    def listen(self, listen: list[str]) -> None:
        tcp: list[tuple[str | None, int]] = []
        paths: list[str] = []
        for entry in listen:
            text = entry.removeprefix(UNIX_PREFIX)
            if text.startswith("/"):
                paths.append(text)
            elif (hp := _host_port(text)) is not None:
                tcp.append(hp)
            else:
                self.note(f"listener {entry} not carried: zdd-agent serves TCP host:port and "
                          "Unix socket paths")
        sock = self.legacy.socket
        if sock is not None:
            for kind, address in sock.listen:
                if kind not in SOCKET_TYPES_CARRIED:
                    self.note(f"{sock.name}: Listen{kind}={address} not carried: zdd-agent "
                              "serves stream sockets")
            if sock.accept:
                self.note(f"{sock.name}: Accept=yes (a process per connection) not carried: "
                          "zdd-agent runs long-lived instances that accept themselves")
        if tcp:
            self._tcp(tcp, paths)
        elif paths:
            self._unix(paths)
        else:
            raise ConfigError(f"cannot adopt {self.legacy.name}: no listen address (no socket "
                              "unit triggers it, and its processes hold no TCP listener: is "
                              "it running?)")

    def _tcp(self, tcp: list[tuple[str | None, int]], paths: list[str]) -> None:
        ports = list(dict.fromkeys(port for _h, port in tcp))
        # socket: nat gives each instance one private port: the port the
        # command or environment names is the one to carry
        named = [p for p in ports if self._names_port(p)]
        port = (named or ports)[0]
        for other in ports:
            if other != port:
                self.note(f"port {other} not carried: under socket: nat each instance binds "
                          f"one port of its own ({INSTANCE_PORT}, for port {port}); if {other} "
                          "is the one clients use, put it in listen instead")
        for p in paths:
            self.note(f"listener {p} not carried beside TCP port {port}: a Unix socket needs "
                      "socket: inherit, which cannot take over a port another unit holds")
        hosts = list(dict.fromkeys(h for h, p in tcp if p == port))
        if None in hosts or "::" in hosts:
            # "::" without IPV6_V6ONLY takes IPv4 too (ipv6(7)), as systemd's
            # ListenStream=PORT: every address
            entries = [str(port)]
        else:
            entries = [f"[{h}]:{port}" if ":" in h else f"{h}:{port}" for h in hosts if h]
        self.port = port
        self.data["listen"] = entries
        self.data["socket"] = "nat"
        self.data["command"] = [self.data["command"][0],
                                *_sub_argv(self.data["command"][1:], port)]
        self.port_named = INSTANCE_PORT in " ".join(self.data["command"])
        self.bind_host = _bound_host(self.data["command"])

    def _names_port(self, port: int) -> bool:
        argv = self.data["command"][1:]
        env = dict(_env_pairs(self.legacy.environment))
        return _sub_argv(argv, port) != argv or any(
            _sub_env(k, v, port) != v for k, v in env.items())

    def _unix(self, paths: list[str]) -> None:
        new = f"/run/zdd-{self.name}/{self.name}.sock"
        if self.name == "agent" or len(new) > SUN_PATH_MAX:
            new = f"/run/zdd-svc-{self.name}/listen.sock"
        if paths[0] == new:
            new = new.replace(".sock", "-new.sock")
        self.unix = True
        self.data["listen"] = [UNIX_PREFIX + new]
        self.data["socket"] = "inherit"
        old = paths[0]
        self.data["command"] = [a.replace(old, new) for a in self.data["command"]]
        self.moved = (old, new)
        for p in paths[1:]:
            self.note(f"listener {p} not carried: one Unix socket per adopted service; add "
                      "it to listen if clients use it")
        sock = self.legacy.socket
        what = sock.name if sock is not None else self.legacy.name
        units = self.legacy.name + (f" and {sock.name}" if sock is not None else "")
        self.note(f"{what} listens on {old} and the config on {new} (two listeners cannot "
                  f"share a path while both exist): once the first instance runs, point the "
                  f"proxy in front at {new} (nginx: proxy_pass http://unix:{new}:) and reload "
                  f"nginx onto it, then stop and disable {units}")
        if sock is not None:
            if sock.socket_user:
                self.carry(f"{sock.name}: SocketUser={sock.socket_user}",
                           {"socket_user": sock.socket_user})
            if sock.socket_group:
                self.carry(f"{sock.name}: SocketGroup={sock.socket_group}",
                           {"socket_group": sock.socket_group})
            self.carry(f"{sock.name}: SocketMode={sock.socket_mode:04o}",
                       {"socket_mode": f"{sock.socket_mode & 0o777:04o}"})

    # ------------------------------------------------------------------ ready

    def ready(self) -> None:
        kind = self.legacy.type
        if kind in ("notify", "notify-reload"):
            self.data["ready"] = {"type": "notify"}
        elif self.port is not None:
            host = self.bind_host or "127.0.0.1"
            self.data["ready"] = {"type": "tcp", "url": f"{host}:{INSTANCE_PORT}"}
        else:
            self.data["ready"] = {"type": "notify"}
            self.note(f"Type={kind}: readiness on a Unix socket it inherits can only be told "
                      "by the program (an instance has no port of its own to probe): ready.type "
                      "notify waits for its READY=1 (gunicorn sends it); a program that never "
                      "sends it never becomes ready: give ready.type exec with a check of "
                      "your own")
        if kind == "notify-reload":
            self.note("Type=notify-reload: the reload is not carried (a new version is "
                      "swapped in, not reloaded)")
        elif kind == "forking":
            self.note("Type=forking not carried: an instance runs its program in the "
                      "foreground (Type=exec or notify): start it without daemonizing (drop "
                      "its --daemon or fork option)")
        elif kind == "oneshot":
            self.note("Type=oneshot not carried: an instance is a long-running server")
        elif kind == "dbus":
            self.note("Type=dbus not carried: readiness comes from a probe, not a bus name")

    # --------------------------------------------------------------- settings

    def settings(self, version: str | None) -> None:
        lg = self.legacy
        if lg.user:
            self.carry(f"User={lg.user}", {"user": lg.user})
        if lg.group:
            self.carry(f"Group={lg.group}", {"group": lg.group})
        for g in lg.supplementary_groups:
            groups = [*self.data.get("supplementary_groups", []), g]
            self.carry(f"SupplementaryGroups={g}", {"supplementary_groups": groups})
        self._environment()
        for p, optional in lg.environment_files:
            value = self._versioned(p, version) if version else p
            files = [*self.data.get("environment_files", []), value]
            if self.carry(f"EnvironmentFile={'-' if optional else ''}{p}",
                          {"environment_files": files}) and optional:
                self.note(f"EnvironmentFile=-{p} is optional in the unit; environment_files "
                          "must exist before a swap: create it (empty will do) or remove it "
                          "from the config")
        wd = lg.working_directory
        if wd == "~" or wd.startswith("!~"):
            self.note(f"WorkingDirectory={wd} (the user's home) not carried: give "
                      "working_directory as a path")
        elif wd:
            bare = wd.removeprefix("!")  # D-Bus "!" is the unit file's "-": may be missing
            shown = wd if bare == wd else f"-{bare}"
            value = self._versioned(bare, version) if version else bare
            if self.carry(f"WorkingDirectory={shown}", {"working_directory": value}) and \
                    bare != wd:
                self.note(f"WorkingDirectory={shown} may be missing in the unit; "
                          "working_directory must exist before a swap")
        self._limits()
        for key, amount in lg.resources:
            self.carry(f"resources.{key} {amount}{'%' if key == 'cpu_quota' else ''}",
                       {"resources": {key: amount}})
        if lg.oom_score_adjust:
            self.carry(f"OOMScoreAdjust={lg.oom_score_adjust}",
                       {"oom_score_adjust": lg.oom_score_adjust})
        if lg.kill_mode != "control-group":
            self.carry(f"KillMode={lg.kill_mode}", {"kill_mode": lg.kill_mode})
        for key, value in lg.hardening:
            self.carry(f"{key}={_shown(value)}", {"hardening": {key: value}})

    def _environment(self) -> None:
        for key, value in _env_pairs(self.legacy.environment):
            if key.startswith(RESERVED_ENV):
                self.note(f"Environment={key} not carried: the agent and systemd set "
                          f"{key} for each instance")
                continue
            if self.port is not None:
                new = _sub_env(key, value, self.port)
                self.port_named |= new != value
                value = new
            if self.moved is not None:
                value = value.replace(*self.moved)
            env = {**self.data.get("environment", {}), key: value}
            self.carry(f"Environment={key}", {"environment": env})

    def _limits(self) -> None:
        for key, soft, hard in self.legacy.limits:
            # one value sets both (LimitX=N). nofile: the hard one, which
            # programs raise their soft limit to (systemd #25478); nproc and
            # core: the soft one, what the program ran with
            value = hard if key == "nofile" else soft
            shown = _limit(soft) if soft == hard else f"{_limit(soft)}:{_limit(hard)}"
            directive = dict(LIMITS)[key]
            if key == "nofile" and (value == INFINITY or value > NOFILE_MAX):
                value = soft
            carried = "infinity" if value == INFINITY else value
            if self.carry(f"{directive}={shown}", {"limits": {key: carried}}) and soft != hard:
                self.note(f"{directive}={shown}: limits.{key} sets soft and hard to one "
                          f"value; carried {_limit(value)}")

    # ------------------------------------------------------------------ drain

    def drain(self) -> None:
        lg = self.legacy
        try:
            sig = signal.Signals(lg.kill_signal).name
        except ValueError:
            sig = f"signal {lg.kill_signal}"
        drain: dict[str, Any] = {}
        if sig in DRAIN_SIGNALS:
            drain["signal"] = sig
        else:
            self.note(f"KillSignal={sig} not carried: it ends the program without a drain "
                      f"(allowed: {', '.join(DRAIN_SIGNALS)}); drain.signal stays SIGTERM: "
                      "check that the program finishes its requests on it")
        usec = lg.timeout_stop_usec
        seconds = min(max(usec / 1e6, 1.0), 3600.0)
        shown = "infinity" if usec == INFINITY else format_duration(usec / 1e6)
        if seconds != usec / 1e6:
            self.note(f"TimeoutStopSec={shown}: drain.grace_period is "
                      f"{format_duration(seconds)} (allowed: 1s..3600s)")
        drain["grace_period"] = format_duration(seconds)
        self.data["drain"] = drain

    # -------------------------------------------------------------- the rest

    def leftovers(self) -> None:
        lg = self.legacy
        if self.port is not None and not self.port_named:
            prog = next((b for b in (w.rsplit("/", 1)[-1] for w in self.data["command"])
                         if b in BIND_FLAGS), None)
            fix = (f"add {BIND_FLAGS[prog]} to command" if prog else
                   f"add e.g. --bind [::]:{INSTANCE_PORT} to command (or read "
                   "ZDD_INSTANCE_PORT)")
            how = (f"it got its listener from {lg.socket.name} (LISTEN_FDS)"
                   if lg.socket is not None else
                   "it finds the port elsewhere (a config file, a built-in default)")
            self.note(f"nothing in the command or environment names port {self.port}: "
                      f"{how}, and under socket: nat each instance binds the port it is "
                      f"told: {fix}")
        if lg.restart not in ("on-failure", "always"):
            self.note(f"Restart={lg.restart} not carried: instances restart on failure "
                      "(Restart=on-failure in the zdd-agent template)")
        for key, value in lg.extras:
            self.note(f"{key}={value} not carried: {_why(key, self.name)}")


# ---------------------------------------------------------------- helpers


def _why(key: str, name: str) -> str:
    if key in REDIRECTS:
        return REDIRECTS[key]
    if key in ("Requires", "Requisite", "BindsTo", "Wants"):
        return "an instance is ordered after network.target only; start that unit yourself"
    if key == "TriggeredBy":
        return "one socket unit per adopted service"
    if key == "SystemCallFilter":
        return ("systemd reports it with its @sets expanded; copy the unit file's "
                "SystemCallFilter= line into hardening.SystemCallFilter")
    if key in HARDENING:
        return "no config form for the value systemd reports; set it in hardening yourself"
    return (f"no service config key carries it; if it matters, a drop-in for "
            f"zdd-{name}@.service can")


def _merged(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merged(out.get(k, {}), v) if isinstance(v, Mapping) else v
    return out


def _limit(value: int) -> str:
    return "infinity" if value == INFINITY else str(value)


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    return " ".join(value) if isinstance(value, list) else str(value)


def _env_pairs(environment: Iterable[str]) -> list[tuple[str, str]]:
    return [(k, v) for k, _eq, v in (e.partition("=") for e in environment)]


def _host_port(text: str) -> tuple[str | None, int] | None:
    """"0.0.0.0:8000" -> ("0.0.0.0", 8000), "[::]:8000" -> ("::", 8000),
    "8000" -> (None, 8000); None for anything else."""
    m = re.fullmatch(r"(?:\[([0-9A-Fa-f:.]+)\]:|([0-9.]+):)?([0-9]{1,5})", text)
    if not m or not 1 <= int(m.group(3)) <= 65535:
        return None
    host = m.group(1) or m.group(2)
    if host is not None and not _is_ip(host):
        return None
    return host, int(m.group(3))


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _local_host(host: str) -> bool:
    """A host a program binds: none (":8080"), a wildcard, localhost or an IP
    address; a host name may be another machine ("db:5432")."""
    bare = host[1:-1] if host.startswith("[") else host
    return bare in ("", "*", "localhost") or _is_ip(bare)


def _sub_hostport(text: str, port: int) -> str:
    """HOST:PORT anywhere in `text` (after the start, "=", "/", "@", ",", ":"
    or a space) with a local HOST -> HOST:{instance_port}."""
    pattern = rf"(?<![^=/@,:\s])(\[[0-9A-Fa-f:.]*\]|[A-Za-z0-9.*-]*):{port}(?![0-9])"
    return re.sub(pattern, lambda m: f"{m.group(1)}:{INSTANCE_PORT}"
                  if _local_host(m.group(1)) else m.group(0), text)


def _sub_argv(argv: list[str], port: int) -> list[str]:
    """The arguments with the public `port` as {instance_port} where it is a
    port: HOST:PORT, --port=PORT (a flag naming port, bind or listen), and a
    lone PORT after such a flag or -p / -b."""
    out: list[str] = []
    for i, arg in enumerate(argv):
        prev = argv[i - 1] if i else ""
        if arg == str(port) and (prev in ("-p", "-b") or _PORT_FLAG_RE.fullmatch(prev)):
            out.append(INSTANCE_PORT)
            continue
        flag, eq, value = arg.partition("=")
        if eq and value == str(port) and _PORT_FLAG_RE.fullmatch(flag):
            out.append(f"{flag}={INSTANCE_PORT}")
            continue
        out.append(_sub_hostport(arg, port))
    return out


def _sub_env(key: str, value: str, port: int) -> str:
    """An environment value with the public `port` as {instance_port}: the
    whole value of a variable named like a port (PORT=3000), or HOST:PORT."""
    if value == str(port) and _PORT_KEY_RE.search(key):
        return INSTANCE_PORT
    return _sub_hostport(value, port)


def _bound_host(argv: list[str]) -> str | None:
    """The address the command binds {instance_port} on, as a probe names
    it ("10.0.0.5", "[::1]"); None for a wildcard or none named."""
    for arg in argv:
        m = re.search(r"(\[[0-9A-Fa-f:.]+\]|[0-9.]+):\{instance_port\}", arg)
        if m and _is_ip(m.group(1).strip("[]")) and \
                not ipaddress.ip_address(m.group(1).strip("[]")).is_unspecified:
            return m.group(1)
    return None


class _Dumper(yaml.SafeDumper):
    """No anchors or aliases: config.ConfigLoader refuses them."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _text(a: _Adopting, today: datetime.date) -> str:
    lg = a.legacy
    source = " and ".join(filter(None, [lg.fragment_path,
                                        lg.socket.name if lg.socket else ""]))
    lines = [f"# Written by `zdd-agent adopt {lg.name}` on {today.isoformat()}"
             + (f" from {source}" if source else "") + ".",
             f"# Not carried ({len(a.notes)}): review before the takeover."
             if a.notes else "# Everything the unit sets was carried."]
    lines += [f"# - {' '.join(n.split())}" for n in a.notes]
    body = yaml.dump(a.data, Dumper=_Dumper, sort_keys=False, default_flow_style=False,
                     allow_unicode=True, width=100)
    return "\n".join(lines) + "\n" + body
