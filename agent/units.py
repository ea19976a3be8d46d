"""Rendering of a service's systemd units from the templates in units/ (pure).

Values that reach a unit file are validated names, or are escaped for
systemd's own parser (systemd.syntax(7), systemd.service(5) "Command lines"):
no shell ever sees them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from string import Template

from .config import ServiceConfig, check_name, check_version, format_duration

TEMPLATE_DIR = Path(os.environ.get("ZDD_UNITS_DIR", Path(__file__).resolve().parents[1] / "units"))
TARGET = "zdd.target"
DROPIN_NAME = "zdd-instance.conf"


def socket_unit(name: str) -> str:
    return f"zdd-{check_name(name)}.socket"


def template_unit(name: str) -> str:
    return f"zdd-{check_name(name)}@.service"


def hold_unit(name: str) -> str:
    return f"zdd-{check_name(name)}-hold.service"


def instance_unit(name: str, version: str) -> str:
    return f"zdd-{check_name(name)}@{check_version(version)}.service"


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


def render_service(svc: ServiceConfig, backlog: int) -> UnitFiles:
    listen = "\n".join(f"ListenStream={lst}" for lst in svc.listen)
    common = {"name": svc.name, "config": str(svc.path)}
    env = "".join(f"Environment={escape_word(f'{k}={v}')}\n" for k, v in svc.environment)
    user = f"User={svc.user}\n" if svc.user else ""
    files = {
        socket_unit(svc.name): _template("zdd-service.socket.in").substitute(
            common, listen=listen, backlog=backlog),
        hold_unit(svc.name): _template("zdd-service-hold.service.in").substitute(common),
        template_unit(svc.name): _template("zdd-service@.service.in").substitute(
            common,
            service_type="notify" if svc.ready.type == "notify" else "exec",
            user=user, environment=env, kill_signal=svc.drain.signal,
            grace=format_duration(svc.drain.grace_period),
            start_timeout=format_duration(svc.ready.deadline + 10)),
        TARGET: (TEMPLATE_DIR / TARGET).read_text(),
    }
    return UnitFiles(files)


def render_instance_dropin(svc: ServiceConfig, version: str, instance_port: int | None) -> str:
    unit = instance_unit(svc.name, version)
    env = [f"ZDD_SERVICE={svc.name}", f"ZDD_VERSION={version}",
           f"ZDD_GRACE_PERIOD={svc.drain.grace_period:g}"]
    if instance_port is not None:
        env.append(f"ZDD_INSTANCE_PORT={instance_port}")
    return _template("zdd-instance.conf.in").substitute(
        unit=unit, environment=" ".join(escape_word(e) for e in env),
        exec_start=exec_start(svc.argv(version)))


def dropin_path(name: str, version: str) -> str:
    return f"{instance_unit(name, version)}.d/{DROPIN_NAME}"
