"""Rendering of a service's systemd units from the templates in units/ (pure).

Values that reach a unit file are validated names, or are escaped for
systemd's own parser (systemd.syntax(7), systemd.service(5) "Command lines"):
no shell ever sees them.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from string import Template

from . import settings as unit_settings
from .config import (DEFAULT_SOCKET_MODE, ServiceConfig, check_instance, check_name,
                     check_version, format_duration)

def data_dir(name: str) -> Path:
    """units/ or sysctl.d/: beside the package in a checkout (and an editable
    install), under PREFIX/share/zdd-agent/ when installed from a wheel."""
    for base in (Path(__file__).resolve().parents[1], Path(sys.prefix) / "share" / "zdd-agent"):
        if (base / name).is_dir():
            return base / name
    raise FileNotFoundError(f"{name}/ is neither beside the agent package nor in "
                            f"{sys.prefix}/share/zdd-agent: a broken installation")


TEMPLATE_DIR = Path(os.environ.get("ZDD_UNITS_DIR") or data_dir("units"))
TARGET = "zdd.target"
DROPIN_NAME = "zdd-instance.conf"


def socket_unit(name: str) -> str:
    return f"zdd-{check_name(name)}.socket"


def template_unit(name: str) -> str:
    return f"zdd-{check_name(name)}@.service"


def slice_unit(name: str) -> str:
    """All instances of a service: systemd.slice(5); its "-" nest it under zdd.slice."""
    return f"zdd-{check_name(name)}.slice"


def hold_unit(name: str) -> str:
    return f"zdd-{check_name(name)}-hold.service"


def instance_unit(name: str, instance: str) -> str:
    """zdd-NAME@VERSION.service, or zdd-NAME@VERSION-N.service with replicas."""
    return f"zdd-{check_name(name)}@{check_instance(instance)}.service"


def version_of(name: str, unit: str) -> str | None:
    prefix, suffix = f"zdd-{name}@", ".service"
    if unit.startswith(prefix) and unit.endswith(suffix) and len(unit) > len(prefix + suffix):
        return unit[len(prefix):-len(suffix)]
    return None


def escape_word(word: str) -> str:
    """One argument for ExecStart=/Environment=: quoted, with specifiers and
    variable references made literal."""
    if any(ord(c) < 32 or ord(c) == 127 for c in word):
        raise ValueError(f"control character in {word!r}")
    s = word.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
    return f'"{s}"'


def exec_start(argv: list[str]) -> str:
    # "$" starts a variable reference in ExecStart=; "$$" is a literal dollar.
    return " ".join(escape_word(a).replace("$", "$$") for a in argv)


def _template(name: str) -> Template:
    return Template((TEMPLATE_DIR / name).read_text())


@dataclass(frozen=True)
class UnitFiles:
    """File name -> content, all relative to the unit directory."""

    files: dict[str, str]


INHERIT_UNIT = """\
# Sockets= alone neither starts nor orders the socket unit.
Requires=zdd-{name}.socket
After=zdd-{name}.socket
"""
INHERIT_SERVICE = """\
Sockets=zdd-{name}.socket
# Every instance shares the listener's open file description, and with it
# O_NONBLOCK. systemd sets that flag to NonBlocking= on each start; left at
# its default (no) it CLEARS the flag, and the old instance's non-blocking
# accept loop then blocks in accept(2) and stops serving (seen when a new
# version failed at start: the old one accepted a connection and hung).
NonBlocking=yes
"""
SLICE = """\
# Rendered by zdd-agent for service {name}: do not edit, change {config} instead.
# Every instance of {name}; its limits hold for all of them together.
[Unit]
Description=zdd-agent instances of {name}

[Slice]
"""
REUSEPORT_SERVICE = """\
# socket: reuseport. Each instance binds ZDD_LISTEN itself with SO_REUSEPORT;
# net.ipv4.tcp_migrate_req=1 (Linux 5.14+) moves the connections queued on a
# closing listener to the others instead of resetting them.
"""


NAT_UNIT = "After=zdd-agent-nat.service\n"  # the rules are back before it serves
NAT_SERVICE = """\
# socket: nat. Each instance binds its own private port (ZDD_INSTANCE_PORT, in
# its drop-in); nftables (table inet zdd-agent, restored at boot by
# zdd-agent-nat.service) sends the public addresses to the serving ones.
"""


# Stands for the version while a command line is escaped, then becomes %i.
_VERSION = "ZDD.VERSION.PLACEHOLDER.7f3a"


def version_in_template(svc: ServiceConfig) -> bool:
    """Whether the template itself runs each version: one replica (instance
    name = version) and no per-start port. Then ExecStart= names the version
    by the instance (%i) and a new version needs no drop-in, hence no
    daemon-reload, which was half of the agent's own time in a swap (~170 ms
    of ~320, bench/suite.py); with replicas or an instance port, each
    instance gets a drop-in (render_instance_dropin)."""
    return svc.replicas == 1 and not svc.needs_instance_port


def _instance_lines(svc: ServiceConfig, version: str, instance: str,
                    instance_port: int | None) -> tuple[str, str]:
    """(Environment= value, ExecStart= value) for one instance."""
    env = [f"ZDD_SERVICE={svc.name}", f"ZDD_VERSION={version}",
           f"ZDD_INSTANCE={instance}", f"ZDD_GRACE_PERIOD={svc.drain.grace_period:g}"]
    if instance_port is not None:
        env.append(f"ZDD_INSTANCE_PORT={instance_port}")
    if svc.socket == "reuseport":
        env.append("ZDD_LISTEN=" + " ".join(str(lst) for lst in svc.listen))
    if svc.socket != "inherit" and svc.fast_open:
        # the program's own setsockopt(TCP_FASTOPEN) before listen()
        env.append(f"ZDD_FAST_OPEN={svc.fast_open}")
    if instance_port is not None:  # the port the program binds (socket: nat), by any name
        env += [f"{k}={v.replace('{instance_port}', str(instance_port))}"
                for k, v in svc.port_environment]
    return " ".join(escape_word(e) for e in env), exec_start(svc.argv(version, instance_port))


def _lines(lines: list[str]) -> str:
    return "".join(f"{ln}\n" for ln in lines)


def render_service(svc: ServiceConfig, backlog: int, nofile: int | None = None) -> UnitFiles:
    """The service's units. `nofile`: LimitNOFILE= where limits.nofile is
    not set (default: settings.default_nofile for this host)."""
    common = {"name": svc.name, "config": str(svc.path)}
    per_instance = set(svc.port_environment)  # in each instance's drop-in
    env = "".join(f"Environment={escape_word(f'{k}={v}')}\n" for k, v in svc.environment
                  if (k, v) not in per_instance)
    s = svc.settings
    if nofile is None:
        nofile = unit_settings.this_host().default_nofile
    env += f"Slice={slice_unit(svc.name)}\n" + _lines(unit_settings.fixed_lines(s, nofile))
    if version_in_template(svc):
        environment, command = _instance_lines(svc, _VERSION, _VERSION, None)
        env += (f"Environment={environment}\nExecStart={command}\n").replace(_VERSION, "%i")
        # %i is the instance name, which is the version here (no replicas)
        env += _lines(unit_settings.version_lines(s, "%i"))
    elif not s.versioned:
        env += _lines(unit_settings.version_lines(s, ""))
    user = f"User={svc.user}\n" if svc.user else ""
    inherit = svc.socket == "inherit"
    access = ip_access(svc)
    files = {
        template_unit(svc.name): _template("zdd-service@.service.in").substitute(
            common,
            unit_socket=(INHERIT_UNIT.format(name=svc.name) if inherit
                         else NAT_UNIT if svc.socket == "nat" else ""),
            service_socket=(INHERIT_SERVICE.format(name=svc.name) if inherit
                            else NAT_SERVICE if svc.socket == "nat" else REUSEPORT_SERVICE),
            service_type="notify" if svc.ready.type == "notify" else "exec",
            user=user, ip_access="" if inherit else access, environment=env,
            kill_signal=svc.drain.signal,
            grace=format_duration(svc.drain.grace_period),
            start_timeout=format_duration(svc.ready.deadline + 10)),
        TARGET: (TEMPLATE_DIR / TARGET).read_text(),
        slice_unit(svc.name): SLICE.format(name=svc.name, config=svc.path) + _lines(
            unit_settings.resource_lines(s.slice)),
    }
    if inherit:
        files[socket_unit(svc.name)] = _template("zdd-service.socket.in").substitute(
            common, listen=socket_listen(svc), backlog=backlog, ip_access=access)
        files[hold_unit(svc.name)] = _template("zdd-service-hold.service.in").substitute(common)
    return UnitFiles(files)


UNIX_SOCKET_FILE = """\
# The socket file belongs to this unit: created (with its directories) when it
# starts, left in place when it stops (RemoveOnStop=no), and never touched by a
# swap: clients such as nginx keep connecting to the same file throughout.
SocketUser={user}
SocketGroup={group}
SocketMode={mode}
DirectoryMode=0755
RemoveOnStop=no
"""


def socket_listen(svc: ServiceConfig) -> str:
    """The [Socket] lines for the listen entries: ListenStream= each (a unix:
    listener by its path), ReusePort=yes where there is a TCP one (the kernel
    refuses SO_REUSEPORT on a Unix socket, EOPNOTSUPP, and systemd logs it),
    and who owns a unix: listener's file. The path and the names were
    validated by config (letters, digits, _.+-/ only: nothing to escape)."""
    lines = [f"ListenStream={lst.path if lst.path is not None else lst}" for lst in svc.listen]
    if svc.ports:
        lines.append("ReusePort=yes")
    text = "\n".join(lines)
    if svc.unix_paths:
        text += "\n" + UNIX_SOCKET_FILE.format(user=svc.socket_user or "root",
                                               group=svc.socket_group or "root",
                                               mode=svc.socket_mode or DEFAULT_SOCKET_MODE)
        text = text.rstrip("\n")
    return text


def ip_access(svc: ServiceConfig) -> str:
    """allow_from as systemd's cgroup BPF firewall (IPAddressAllow= and
    IPAddressDeny=any, systemd.resource-control(5)): on the socket unit, it
    applies to the listener and the connections it accepts; on instances
    that bind their own listeners (reuseport), to all of their IP traffic,
    outgoing too. Loopback stays allowed: the agent's probes and trials, and
    the host's own clients. "" without allow_from."""
    if not svc.allow_from:
        return ""
    return f"IPAddressAllow=localhost {' '.join(svc.allow_from)}\nIPAddressDeny=any\n"


def render_instance_dropin(svc: ServiceConfig, version: str, instance_port: int | None,
                           instance: str | None = None) -> str:
    check_version(version)
    unit = instance_unit(svc.name, instance or version)
    environment, command = _instance_lines(svc, version, instance or version, instance_port)
    versioned = svc.settings.versioned and not version_in_template(svc)
    return _template("zdd-instance.conf.in").substitute(
        unit=unit, environment=environment, exec_start=command,
        settings=_lines(unit_settings.version_lines(svc.settings, version)) if versioned else "")


def dropin_path(name: str, instance: str) -> str:
    return f"{instance_unit(name, instance)}.d/{DROPIN_NAME}"


def dropin_port(text: str | None) -> int | None:
    """The instance's private port, from its drop-in ("ZDD_INSTANCE_PORT=...")."""
    import re

    m = re.search(r'"ZDD_INSTANCE_PORT=([0-9]{1,5})"', text or "")
    return int(m.group(1)) if m else None


def dropin_version(text: str | None) -> str | None:
    """The version an instance runs, from its drop-in ("ZDD_VERSION=...")."""
    import re

    m = re.search(r'"ZDD_VERSION=([A-Za-z0-9._-]+)"', text or "")
    return m.group(1) if m else None
