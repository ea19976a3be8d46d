"""The [Service] settings that production units carry, for each instance of a
service: parsing and validation, rendering as unit-file lines, and the one
line per setting that says what it does on this host (pure; the host's facts
are passed in).

Keys (a service config's top level; every one optional):

    working_directory: /srv/api/{version}       WorkingDirectory=
    group: api                                  Group=
    supplementary_groups: [ssl-cert]            SupplementaryGroups=
    environment_files: [/etc/api/env]           EnvironmentFile= (each must exist)
    limits: {nofile: 65536, nproc: 4096, core: 0}      LimitNOFILE= LimitNPROC= LimitCORE=
    resources: {memory_max: 2G, memory_high: 1536M,    MemoryMax= MemoryHigh=
                cpu_quota: 150%, tasks_max: 512}       CPUQuota= TasksMax=
    oom_score_adjust: 0                         OOMScoreAdjust=
    kill_mode: mixed                            KillMode= (control-group or mixed)
    hardening: {ProtectSystem: strict, ...}     an allow-list of sandboxing directives

Sources: systemd.exec(5) (working directory, credentials, environment files,
limits, OOMScoreAdjust=, sandboxing), systemd.resource-control(5) (MemoryMax=,
MemoryHigh=, CPUQuota=, TasksMax=), systemd.kill(5) (KillMode=),
setrlimit(2), capabilities(7), address_families(7).

Every value that reaches a unit file is validated against a narrow pattern
here (no whitespace, quotes, "%" specifiers or "$" references unless the
pattern allows them): nothing is escaped, so nothing can be smuggled.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import ConfigError
from .oom import SURGE_OOM_SCORE_ADJ

if TYPE_CHECKING:  # config imports this module; the checker is passed in
    from .config import _Checker

VERSION = "{version}"
GROUP_RE = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
# A path that reaches a unit file: absolute, normalised, and of characters
# that systemd's parser takes literally ({version} is replaced before).
_PATH_CHARS = re.compile(r"/[A-Za-z0-9._@+,:=/-]*")
# ASCII digits only: int() and float() take any Unicode digit, but a
# percentage is rendered as written and systemd reads ASCII
_SIZE_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?)(?:i?B)?")
_PERCENT_RE = re.compile(r"[0-9]{1,3}(?:\.[0-9]{1,2})?%")  # systemd: permyriad at most
MIN_MEMORY = 1024 * 1024  # below 1 MiB a memory limit is a typo (1 for 1G), not a limit
_SIZE_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
# fs.nr_open's ceiling (include/linux/fs.h: sysctl_nr_open_max, about 2^30)
NOFILE_MAX = 1073741816
# Per core, per the design's target (DESIGN.md): 10,000 active connections.
CONNECTIONS_PER_CORE = 10_000
# Descriptors per connection in the default: the client's, and one upstream
# (a proxy, a database pool) for each; plus what a process opens anyway.
FDS_PER_CONNECTION = 2
FDS_BASE = 1024
NOFILE_FLOOR = 65536
KILL_MODES = ("control-group", "mixed")

# capabilities(7), Linux 6.x
CAPABILITIES = frozenset("""
CAP_AUDIT_CONTROL CAP_AUDIT_READ CAP_AUDIT_WRITE CAP_BLOCK_SUSPEND CAP_BPF CAP_CHECKPOINT_RESTORE
CAP_CHOWN CAP_DAC_OVERRIDE CAP_DAC_READ_SEARCH CAP_FOWNER CAP_FSETID CAP_IPC_LOCK CAP_IPC_OWNER
CAP_KILL CAP_LEASE CAP_LINUX_IMMUTABLE CAP_MAC_ADMIN CAP_MAC_OVERRIDE CAP_MKNOD CAP_NET_ADMIN
CAP_NET_BIND_SERVICE CAP_NET_BROADCAST CAP_NET_RAW CAP_PERFMON CAP_SETFCAP CAP_SETGID CAP_SETPCAP
CAP_SETUID CAP_SYS_ADMIN CAP_SYS_BOOT CAP_SYS_CHROOT CAP_SYS_MODULE CAP_SYS_NICE CAP_SYS_PACCT
CAP_SYS_PTRACE CAP_SYS_RAWIO CAP_SYS_RESOURCE CAP_SYS_TIME CAP_SYS_TTY_CONFIG CAP_SYSLOG
CAP_WAKE_ALARM""".split())
# systemd.exec(5) "System Call Filtering", systemd 252
SYSCALL_GROUPS = frozenset("""
@aio @basic-io @chown @clock @cpu-emulation @debug @default @file-system @io-event @ipc @keyring
@known @memlock @module @mount @network-io @obsolete @pkey @privileged @process @raw-io @reboot
@resources @sandbox @setuid @signal @swap @sync @system-service @timer""".split())
NAMESPACES = ("cgroup", "ipc", "net", "mnt", "pid", "user", "uts")
_BOOL = ("yes", "no")

# directive -> (kind, allowed values for "choice"). Kinds: bool, choice,
# paths, caps, families, syscalls, namespaces, umask, word.
HARDENING: dict[str, tuple[str, tuple[str, ...]]] = {
    "NoNewPrivileges": ("bool", ()),
    "PrivateTmp": ("bool", ()),
    "PrivateDevices": ("bool", ()),
    "PrivateIPC": ("bool", ()),
    "PrivateMounts": ("bool", ()),
    "ProtectSystem": ("choice", ("yes", "no", "full", "strict")),
    "ProtectHome": ("choice", ("yes", "no", "read-only", "tmpfs")),
    "ProtectProc": ("choice", ("default", "noaccess", "invisible", "ptraceable")),
    "ProcSubset": ("choice", ("all", "pid")),
    "ProtectKernelTunables": ("bool", ()),
    "ProtectKernelModules": ("bool", ()),
    "ProtectKernelLogs": ("bool", ()),
    "ProtectControlGroups": ("bool", ()),
    "ProtectClock": ("bool", ()),
    "ProtectHostname": ("bool", ()),
    "RestrictRealtime": ("bool", ()),
    "RestrictSUIDSGID": ("bool", ()),
    "LockPersonality": ("bool", ()),
    "MemoryDenyWriteExecute": ("bool", ()),
    "RemoveIPC": ("bool", ()),
    "ReadWritePaths": ("paths", ()),
    "ReadOnlyPaths": ("paths", ()),
    "InaccessiblePaths": ("paths", ()),
    "ExecPaths": ("paths", ()),
    "NoExecPaths": ("paths", ()),
    "CapabilityBoundingSet": ("caps", ()),
    "AmbientCapabilities": ("caps", ()),
    "RestrictAddressFamilies": ("families", ()),
    "RestrictNamespaces": ("namespaces", ()),
    "SystemCallFilter": ("syscalls", ()),
    "SystemCallArchitectures": ("choice", ("native",)),
    "SystemCallErrorNumber": ("word", ()),
    "UMask": ("umask", ()),
}
# Directives operators carry that have a key of their own here, or that would
# break what the agent relies on: the refusal says which.
REDIRECTS = {
    "LimitNOFILE": "use limits.nofile", "LimitNPROC": "use limits.nproc",
    "LimitCORE": "use limits.core", "MemoryMax": "use resources.memory_max",
    "MemoryHigh": "use resources.memory_high", "CPUQuota": "use resources.cpu_quota",
    "TasksMax": "use resources.tasks_max", "OOMScoreAdjust": "use oom_score_adjust",
    "KillMode": "use kill_mode", "WorkingDirectory": "use working_directory",
    "User": "use user", "Group": "use group", "SupplementaryGroups": "use supplementary_groups",
    "EnvironmentFile": "use environment_files", "Environment": "use environment",
    "IPAddressAllow": "use allow_from", "IPAddressDeny": "use allow_from",
    "PrivateNetwork": "an instance in its own network namespace cannot be probed, counted "
                      "or reached on a port of its own",
    "DynamicUser": "the agent checks what runs as which user before it starts anything; "
                   "use user with a system account",
    "RootDirectory": "the agent checks the command and hooks on the host's file system",
    "RootImage": "the agent checks the command and hooks on the host's file system",
}


@dataclass(frozen=True)
class Limits:
    nofile: int | None = None  # None: default_nofile() of the host
    nproc: int | str | None = None  # a count or "infinity"; None: systemd's default
    core: int | str | None = None  # bytes or "infinity"; None: systemd's default


@dataclass(frozen=True)
class Resources:
    memory_max: int | str | None = None  # bytes, "N%" or "infinity"
    memory_high: int | str | None = None
    cpu_quota: int | None = None  # percent of one CPU (150: one and a half)
    tasks_max: int | str | None = None  # a count, "N%" or "infinity"


@dataclass(frozen=True)
class UnitSettings:
    working_directory: str | None = None  # may hold {version}
    group: str | None = None
    supplementary_groups: tuple[str, ...] = ()
    environment_files: tuple[str, ...] = ()  # may hold {version}
    limits: Limits = field(default_factory=Limits)
    resources: Resources = field(default_factory=Resources)
    oom_score_adjust: int | None = None  # once admitted; a surge starts at oom.SURGE_OOM_SCORE_ADJ
    kill_mode: str = "control-group"
    slice: Resources = field(default_factory=Resources)  # all instances together
    hardening: tuple[tuple[str, str], ...] = ()  # (directive, rendered value)

    @property
    def versioned(self) -> bool:
        """Whether a setting names the version (then it is per instance)."""
        return any(VERSION in p for p in (self.working_directory or "",
                                          *self.environment_files))

    def paths(self, version: str) -> list[tuple[str, str]]:
        """(key, path) of working_directory and environment_files for one
        version: what must exist before that version starts."""
        out = [("working_directory", self.working_directory)] if self.working_directory else []
        out += [("environment_files", p) for p in self.environment_files]
        return [(k, p.replace(VERSION, version)) for k, p in out]


KEYS = ("working_directory", "group", "supplementary_groups", "environment_files", "limits",
        "resources", "slice", "oom_score_adjust", "kill_mode", "hardening")


# ---------------------------------------------------------------- parsing


def parse(chk: _Checker, data: Mapping[str, Any]) -> UnitSettings:
    """The keys above from a service config's mapping; ConfigError (through
    `chk.fail`) naming the key and what is allowed."""
    group = data.get("group")
    if group is not None:
        group = _group(chk, "group", group)
    groups = data.get("supplementary_groups") or []
    if not isinstance(groups, list):
        raise chk.fail("supplementary_groups", f"{groups!r} must be a list of group names")
    sup = tuple(dict.fromkeys(_group(chk, "supplementary_groups", g) for g in groups))
    wd = data.get("working_directory")
    if wd is not None:
        wd = _path(chk, "working_directory", wd)
    files = data.get("environment_files") or []
    if isinstance(files, str):
        files = [files]
    if not isinstance(files, list):
        raise chk.fail("environment_files", f"{files!r} must be a list of absolute paths")
    env_files = tuple(dict.fromkeys(_path(chk, "environment_files", f) for f in files))
    oom = data.get("oom_score_adjust")
    if oom is not None:
        oom = chk.integer("oom_score_adjust", 0, -1000, 1000)
    kill_mode = data.get("kill_mode") or "control-group"
    if not isinstance(kill_mode, str) or kill_mode not in KILL_MODES:
        why = {"process": "only the main process would be stopped: a retired version's "
                          "other processes would keep serving its connections",
               "none": "no process would be stopped: a retired version would keep running"}
        raise chk.fail("kill_mode", f"{kill_mode!r} is not allowed"
                                    + (f" ({why[kill_mode]})" if isinstance(kill_mode, str)
                                       and kill_mode in why else "")
                                    + f" (allowed: {', '.join(KILL_MODES)})")
    return UnitSettings(
        working_directory=wd, group=group, supplementary_groups=sup,
        environment_files=env_files, limits=_limits(chk), resources=_resources(chk),
        slice=_resources(chk, "slice"), oom_score_adjust=oom, kill_mode=str(kill_mode),
        hardening=_hardening(chk))


def _group(chk: _Checker, key: str, value: Any) -> str:
    if not isinstance(value, str) or not GROUP_RE.fullmatch(value):
        raise chk.fail(key, f"{value!r} is not a group name (allowed: [a-z_][a-z0-9_-]{{0,31}})")
    return value


def _path(chk: _Checker, key: str, value: Any, version: bool = True) -> str:
    """An absolute, normalised path of safe characters; {version} allowed
    where `version` (substituted per instance)."""
    if not isinstance(value, str) or not value:
        raise chk.fail(key, f"{value!r:.80} must be an absolute path")
    if len(value) > 4096:
        raise chk.fail(key, f"{value[:40]!r}... is {len(value)} characters (allowed: a path "
                            "of at most 4096, PATH_MAX)")
    if not version and VERSION in value:
        raise chk.fail(key, f"{value!r}: {VERSION} is not substituted here (allowed: in "
                            "command, working_directory and environment_files)")
    bare = value.replace(VERSION, "v")
    if not bare.startswith("/"):
        raise chk.fail(key, f"{value!r} must be an absolute path")
    if not _PATH_CHARS.fullmatch(bare):
        bad = sorted({c for c in bare if not re.fullmatch(r"[A-Za-z0-9._@+,:=/-]", c)})
        raise chk.fail(key, f"{value!r} has characters a unit file would interpret "
                            f"({' '.join(repr(c) for c in bad)}; allowed: letters, digits, "
                            "._@+,:=-/ and {version})")
    parts = bare.split("/")[1:]
    if any(p in ("", ".", "..") for p in parts) and bare != "/":
        raise chk.fail(key, f"{value!r} is not a normalised path (no //, /./, /../ or "
                            "trailing /)")
    return value


def parse_size(value: Any, percent: bool = True) -> int | str:
    """systemd's memory sizes (systemd.resource-control(5)): bytes, K/M/G/T
    (base 1024, "512M", "1.5G"), "N%" of physical memory, or "infinity".
    ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError("a size, not a boolean")
    if isinstance(value, int):
        if value < 1:
            raise ValueError(f"{value} is not a positive size")
        return value
    if isinstance(value, str):
        text = value.strip()
        if text == "infinity":
            return text
        if percent and _PERCENT_RE.fullmatch(text) and 0 < float(text[:-1]) <= 100:
            return text
        m = _SIZE_RE.fullmatch(text)
        if m:
            size = int(float(m.group(1)) * _SIZE_UNITS[m.group(2)])
            if size >= 1 and size < 2**63:
                return size
    raise ValueError(f"{value!r} is not a size like 512M, 2G, 80% or infinity")


def _limits(chk: _Checker) -> Limits:
    lchk = chk.section("limits")
    lchk.reject_unknown(("nofile", "nproc", "core"))
    nofile = lchk.get("nofile")
    if nofile is not None:
        nofile = lchk.integer("nofile", 0, 1024, NOFILE_MAX)
    nproc = lchk.get("nproc")
    if nproc is not None and nproc != "infinity":
        nproc = lchk.integer("nproc", 0, 1, 4194304)
    core = lchk.get("core")
    if core is not None:
        if core in (0, "0") and not isinstance(core, (bool, float)):
            core = 0
        else:
            try:
                core = parse_size(core, percent=False)
            except ValueError as e:
                raise lchk.fail("core", f"{e} (allowed: bytes, a size like 1G, 0 for no core "
                                        "dumps, or infinity)") from None
    return Limits(nofile=nofile, nproc=nproc, core=core)


def _resources(chk: _Checker, key: str = "resources") -> Resources:
    rchk = chk.section(key)
    rchk.reject_unknown(("memory_max", "memory_high", "cpu_quota", "tasks_max"))
    sizes: dict[str, int | str | None] = {}
    for key in ("memory_max", "memory_high"):
        raw = rchk.get(key)
        try:
            sizes[key] = None if raw is None else parse_size(raw)
        except ValueError as e:
            raise rchk.fail(key, f"{e} (allowed: bytes, K/M/G/T, N% or infinity)") from None
        value = sizes[key]
        if isinstance(value, int) and value < MIN_MEMORY:
            raise rchk.fail(key, f"{raw!r} is {value} bytes: too small to run anything "
                                 "(allowed: at least 1M; sizes without a unit are bytes, "
                                 "write 1G for a gibibyte)")
    hi, mx = sizes["memory_high"], sizes["memory_max"]
    if _above(hi, mx):
        raise rchk.fail("memory_high", f"{rchk.get('memory_high')!r} is above memory_max "
                                       f"{rchk.get('memory_max')!r}: throttling would never "
                                       "start before the OOM killer (allowed: below memory_max)")
    quota = rchk.get("cpu_quota")
    if quota is not None:
        text = str(quota).strip()
        m = re.fullmatch(r"([0-9]{1,6})%?", text) if not isinstance(quota, bool) else None
        if not m or not 1 <= int(m.group(1)) <= 100000:
            raise rchk.fail("cpu_quota", f"{quota!r} is not a CPU quota (allowed: 1%..100000%, "
                                         "percent of one CPU, e.g. 150% for one and a half)")
        quota = int(m.group(1))
    tasks = rchk.get("tasks_max")
    if isinstance(tasks, str) and tasks.isascii() and tasks.isdigit():
        tasks = int(tasks)
    if tasks is not None and tasks != "infinity":
        if isinstance(tasks, str) and re.fullmatch(r"[0-9]{1,3}%", tasks) and \
                0 < int(tasks[:-1]) <= 100:
            pass
        elif isinstance(tasks, bool) or not isinstance(tasks, int) or not 1 <= tasks <= 4194304:
            raise rchk.fail("tasks_max", f"{tasks!r} is not allowed (allowed: a count "
                                         "1..4194304, 1%..100%, or infinity)")
    return Resources(memory_max=mx, memory_high=hi, cpu_quota=quota, tasks_max=tasks)


def _above(high: int | str | None, limit: int | str | None) -> bool:
    """Whether `high` is above `limit`, where both are bytes or both a
    percentage (other pairs are not comparable without the host)."""
    if isinstance(high, int) and isinstance(limit, int):
        return high > limit
    if isinstance(high, str) and isinstance(limit, str) and high.endswith("%") \
            and limit.endswith("%"):
        return float(high[:-1]) > float(limit[:-1])
    return False


def _words(hchk: _Checker, key: str, value: Any) -> list[str]:
    if isinstance(value, str):
        value = value.split()
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise hchk.fail(key, f"{value!r} must be a non-empty list of strings")
    return list(value)


def _inverted(words: list[str]) -> tuple[bool, list[str]]:
    """systemd's "~" before the first word turns an allow-list into a deny-list."""
    if words and words[0].startswith("~"):
        return True, [words[0][1:], *words[1:]]
    return False, words


def _hardening(chk: _Checker) -> tuple[tuple[str, str], ...]:
    hchk = chk.section("hardening")
    out: list[tuple[str, str]] = []
    for key, value in hchk.data.items():
        if value is None and key in HARDENING:
            continue  # null: not set, as for every other key
        if key not in HARDENING:
            redirect = REDIRECTS.get(str(key))
            raise hchk.fail(str(key), (f"not allowed here: {redirect}" if redirect else
                                       "unknown directive") +
                            f" (allowed: {', '.join(HARDENING)})")
        kind, choices = HARDENING[key]
        out.append((key, _hardening_value(hchk, key, kind, choices, value)))
    return tuple(out)


def _hardening_value(hchk: _Checker, key: str, kind: str, choices: tuple[str, ...],
                     value: Any) -> str:
    if kind in ("bool", "choice") and isinstance(value, bool):
        if kind == "bool" or "yes" in choices:
            return "yes" if value else "no"
    if kind == "bool":
        if value in _BOOL or value in ("true", "false"):
            return {"true": "yes", "false": "no"}.get(str(value), str(value))
        raise hchk.fail(key, f"{value!r} is not allowed (allowed: true, false)")
    if kind == "choice":
        if value in choices:
            return str(value)
        raise hchk.fail(key, f"{value!r} is not allowed (allowed: {', '.join(choices)}"
                             + (", true, false" if "yes" in choices else "") + ")")
    if kind == "umask":
        if isinstance(value, str) and re.fullmatch(r"0?[0-7]{3}", value):
            return value.zfill(4)
        raise hchk.fail(key, f"{value!r} is not allowed (allowed: an octal string like "
                             "\"0027\"; quote it, or YAML reads 0027 as a number)")
    if kind == "word":
        import errno

        names = {n for n in dir(errno) if n.startswith("E") and n.isupper()}  # aliases too
        if isinstance(value, str) and (value in ("kill", "log") or value in names):
            return value
        raise hchk.fail(key, f"{value!r} is not allowed (allowed: an errno name like EPERM, "
                             "kill or log)")
    if kind == "namespaces" and isinstance(value, bool):
        return "yes" if value else "no"
    if kind == "caps" and value == []:
        return ""  # the empty assignment: no capabilities at all (systemd.exec(5))
    words = _words(hchk, key, value)
    inverted, names = _inverted(words)
    if kind == "paths":
        for p in words:
            bare = p[1:] if p[:1] in "-+" else p
            try:
                _path(hchk, key, bare, version=False)
            except ConfigError:
                if VERSION in bare or len(bare) > 4096:
                    raise  # its own message says why, without echoing all of it
                raise hchk.fail(key, f"{p!r:.120} is not an absolute, normalised path of "
                                     "letters, digits and ._@+,:=-/ (a leading - ignores a "
                                     "missing path)") from None
        return " ".join(words)
    if kind == "caps":
        bad = [n for n in names if n not in CAPABILITIES]
        if bad:
            raise hchk.fail(key, f"{bad[0]!r} is not a capability (allowed: names from "
                                 "capabilities(7) like CAP_NET_BIND_SERVICE, ~ before the "
                                 "first to drop them instead)")
    elif kind == "families":
        if names == ["none"] and not inverted:
            return "none"
        bad = [n for n in names if not (n.startswith("AF_") and hasattr(socket, n))]
        if bad:
            raise hchk.fail(key, f"{bad[0]!r} is not an address family (allowed: AF_UNIX, "
                                 "AF_INET, AF_INET6, AF_NETLINK..., ~ before the first to "
                                 "deny them instead, or none)")
    elif kind == "namespaces":
        bad = [n for n in names if n not in NAMESPACES]
        if bad:
            raise hchk.fail(key, f"{bad[0]!r} is not a namespace type (allowed: "
                                 f"{', '.join(NAMESPACES)}, ~ before the first, or a boolean)")
    elif kind == "syscalls":
        for n in names:
            if n.startswith("@") and n not in SYSCALL_GROUPS:
                raise hchk.fail(key, f"{n!r} is not a system call set (allowed: "
                                     f"{', '.join(sorted(SYSCALL_GROUPS))})")
            if not n.startswith("@") and not re.fullmatch(r"[a-z_][a-z0-9_]{0,63}", n):
                raise hchk.fail(key, f"{n!r} is not a system call name or @set")
    return " ".join(words)


def families_needed(needed: set[str], hardening: tuple[tuple[str, str], ...]) -> list[str]:
    """The address families in `needed` that RestrictAddressFamilies= denies."""
    value = dict(hardening).get("RestrictAddressFamilies")
    if value is None:
        return []
    words = value.split()
    inverted, names = _inverted(words)
    if inverted:
        return sorted(f for f in needed if f in names)
    return sorted(f for f in needed if f not in names)


# -------------------------------------------------------------- rendering


def default_nofile(cpus: int, nr_open: int = 1048576) -> int:
    """LimitNOFILE= when limits.nofile is not set: CONNECTIONS_PER_CORE
    connections per core, FDS_PER_CONNECTION descriptors each, plus FDS_BASE,
    rounded up to a power of two, at least NOFILE_FLOOR and at most the
    kernel's fs.nr_open (setrlimit(2) fails above it)."""
    need = max(1, cpus) * CONNECTIONS_PER_CORE * FDS_PER_CONNECTION + FDS_BASE
    size = NOFILE_FLOOR
    while size < need:
        size *= 2
    return min(size, nr_open)


def _value(v: int | str) -> str:
    return str(v)


def fixed_lines(s: UnitSettings, nofile: int) -> list[str]:
    """[Service] lines that are the same for every version."""
    lines = []
    if s.group:
        lines.append(f"Group={s.group}")
    if s.supplementary_groups:
        lines.append(f"SupplementaryGroups={' '.join(s.supplementary_groups)}")
    lines.append(f"LimitNOFILE={s.limits.nofile or nofile}")
    if s.limits.nproc is not None:
        lines.append(f"LimitNPROC={s.limits.nproc}")
    if s.limits.core is not None:
        lines.append(f"LimitCORE={s.limits.core}")
    lines += resource_lines(s.resources)
    # Every instance starts as the OOM killer's first pick, so that during a
    # surge it takes a new instance, never a serving one; once admitted the
    # agent writes oom_score_adjust (or the manager's own) to its processes
    # (agent/oom.py).
    lines.append(f"OOMScoreAdjust={SURGE_OOM_SCORE_ADJ}")
    lines.append(f"KillMode={s.kill_mode}")
    lines += [f"{k}={v}" for k, v in s.hardening]
    return lines


def resource_lines(r: Resources) -> list[str]:
    """systemd.resource-control(5) lines of a service or a slice."""
    lines = [f"{directive}={_value(v)}" for directive, v in (
        ("MemoryMax", r.memory_max), ("MemoryHigh", r.memory_high), ("TasksMax", r.tasks_max))
        if v is not None]
    if r.cpu_quota is not None:
        lines.append(f"CPUQuota={r.cpu_quota}%")
    return lines


def version_lines(s: UnitSettings, version: str) -> list[str]:
    """WorkingDirectory= and EnvironmentFile= lines for one version (the
    template passes "%i", the instance name, when it runs versions itself).
    The files keep the order given: a later file overrides an earlier one."""
    lines = []
    if s.working_directory:
        lines.append(f"WorkingDirectory={s.working_directory.replace(VERSION, version)}")
    lines += [f"EnvironmentFile={p.replace(VERSION, version)}" for p in s.environment_files]
    return lines


# ------------------------------------------------------------- explaining


@dataclass(frozen=True)
class Host:
    """What the explanations depend on: this host's facts."""

    cpus: int
    nr_open: int  # /proc/sys/fs/nr_open
    manager_nofile: int | None  # the service manager's hard RLIMIT_NOFILE (/proc/1/limits)
    mem_total: int  # bytes


    @property
    def default_nofile(self) -> int:
        return default_nofile(self.cpus, self.nr_open)


def _read_int(path: str, default: int) -> int:
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return default


def manager_nofile(pid: int = 1) -> int | None:
    """The hard RLIMIT_NOFILE of the service manager (PID 1), from
    /proc/1/limits ("Max open files  SOFT  HARD  files"); None unreadable."""
    try:
        with open(f"/proc/{pid}/limits") as f:
            for line in f:
                if line.startswith("Max open files"):
                    hard = line.split()[4]
                    return None if hard == "unlimited" else int(hard)
    except (OSError, ValueError, IndexError):
        pass
    return None


def this_host() -> Host:
    """This host's Host: CPUs the agent may use, fs.nr_open, PID 1's hard
    open-files limit and MemTotal (proc(5))."""
    import os

    mem = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return Host(cpus=len(os.sched_getaffinity(0)) or os.cpu_count() or 1,
                nr_open=_read_int("/proc/sys/fs/nr_open", 1048576),
                manager_nofile=manager_nofile(), mem_total=mem)


def effective_nofile(s: UnitSettings, host: Host) -> int:
    """What an instance gets: systemd sets the closest value it may (setrlimit
    beyond its own hard limit fails without CAP_SYS_RESOURCE, and systemd then
    keeps the nearest it can: src/basic/rlimit-util.c setrlimit_closest)."""
    asked = s.limits.nofile or default_nofile(host.cpus, host.nr_open)
    cap = min(host.nr_open, host.manager_nofile or host.nr_open)
    return min(asked, cap)


def _mib(n: int) -> str:
    return f"{n / 1024**3:.1f} GiB" if n >= 1024**3 else f"{n // 1024**2} MiB"


def explain(s: UnitSettings, host: Host, *, user: str | None = None) -> list[tuple[str, str]]:
    """(level, line) per setting: "ok" or "warn", what the setting does to
    each instance on this host. The nofile line is always there: it decides
    how many connections an instance can hold."""
    out: list[tuple[str, str]] = []
    asked = s.limits.nofile or default_nofile(host.cpus, host.nr_open)
    got = effective_nofile(s, host)
    target = host.cpus * CONNECTIONS_PER_CORE
    fits = got // FDS_PER_CONNECTION
    source = "" if s.limits.nofile else " (default)"
    text = (f"limits.nofile {asked}{source}: up to {fits:,} connections per instance at "
            f"{FDS_PER_CONNECTION} descriptors each; the target is {CONNECTIONS_PER_CORE:,} per "
            f"core, {target:,} on {host.cpus} cores")
    level = "ok" if fits >= target else "warn"
    if got < asked:
        text += (f"; instances get {got}: the service manager's hard limit is "
                 f"{host.manager_nofile} (systemd sets the closest it may)")
    out.append((level, text))
    if s.limits.nproc is not None:
        out.append(("ok", f"limits.nproc {s.limits.nproc}: processes of the user "
                          f"{user or 'root'} beyond it fail to fork"))
    if s.limits.core is not None:
        out.append(("ok", "limits.core 0: no core dumps" if s.limits.core == 0 else
                    f"limits.core {s.limits.core}: core dumps up to that size"))
    r = s.resources
    if isinstance(r.memory_max, int):
        level = "warn" if r.memory_max > host.mem_total else "ok"
        out.append((level, f"resources.memory_max {_mib(r.memory_max)}: the OOM killer ends an "
                           f"instance beyond it (this host has {_mib(host.mem_total)}); a swap "
                           "runs old and new side by side, each with its own limit"))
    elif r.memory_max is not None:
        out.append(("ok", f"resources.memory_max {r.memory_max}: per instance"))
    if r.memory_high is not None:
        shown = _mib(r.memory_high) if isinstance(r.memory_high, int) else r.memory_high
        out.append(("ok", f"resources.memory_high {shown}: the kernel reclaims and throttles "
                          "an instance above it"))
    if r.cpu_quota is not None:
        level = "warn" if r.cpu_quota > host.cpus * 100 else "ok"
        out.append((level, f"resources.cpu_quota {r.cpu_quota}%: at most {r.cpu_quota / 100:g} "
                           f"of this host's {host.cpus} CPUs per instance"))
    if r.tasks_max is not None:
        out.append(("ok", f"resources.tasks_max {r.tasks_max}: fork and thread creation fail "
                          "beyond it, per instance"))
    sl = s.slice
    if isinstance(sl.memory_max, int):
        level = "warn" if sl.memory_max > host.mem_total else "ok"
        out.append((level, f"slice.memory_max {_mib(sl.memory_max)}: all instances together; "
                           "a swap starts new ones only where they fit beside the serving "
                           "ones, and the OOM killer takes a new one first"))
    for key, v in (("memory_max", None if isinstance(sl.memory_max, int) else sl.memory_max),
                   ("memory_high", sl.memory_high), ("cpu_quota", sl.cpu_quota),
                   ("tasks_max", sl.tasks_max)):
        if v is not None:
            shown = _mib(v) if isinstance(v, int) and "memory" in key else str(v)
            unit = "%" if key == "cpu_quota" else ""
            out.append(("ok", f"slice.{key} {shown}{unit}: all instances together"))
    adj = s.oom_score_adjust
    out.append(("ok", f"oom_score_adjust {adj if adj is not None else 'unset'}: a new instance "
                      f"starts at {SURGE_OOM_SCORE_ADJ} (the OOM killer's first pick during "
                      "the surge) and gets "
                      + (f"{adj}" if adj is not None else "the service manager's value")
                      + " once admitted"))
    if s.kill_mode == "mixed":
        out.append(("ok", "kill_mode mixed: the drain signal goes to the main process alone; "
                          "when it exits, whatever remains of the instance gets SIGKILL"))
    if s.working_directory:
        out.append(("ok", f"working_directory {s.working_directory}: must exist when an "
                          "instance starts (checked before a swap)"))
    for p in s.environment_files:
        out.append(("ok", f"environment_files {p}: read by systemd at each start, overrides "
                          "environment (checked before a swap)"))
    if s.group or s.supplementary_groups:
        out.append(("ok", "group " + ", ".join(filter(None, [s.group,
                                                              *s.supplementary_groups]))))
    for k, v in s.hardening:
        out.append(("ok", f"hardening {k}={v}"))
    return out
