"""Kernel tuning through /proc/sys: plan (pure), apply with read-back, check,
restore. Networking sysctls are per network namespace (a sandbox's writes do
not reach the machine's own values)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .errors import ZddError
from .fsutil import atomic_write

PROC_SYS = Path("/proc/sys")
RESERVED = "net.ipv4.ip_local_reserved_ports"
DEFAULTS: dict[str, str] = {
    "net.core.somaxconn": "65535",
    "net.ipv4.tcp_max_syn_backlog": "65535",
    "net.ipv4.ip_local_port_range": "10240 65535",
    "net.ipv4.tcp_fastopen": "3",
    "net.ipv4.tcp_migrate_req": "1",  # Linux 5.14+
}
RESTORE_FILE = "sysctl-restore.json"


def parse_ports(text: str) -> set[int]:
    """'8080,9000-9002' -> {8080, 9000, 9001, 9002}"""
    ports: set[int] = set()
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        ports.update(range(int(lo), int(hi or lo) + 1))
    return ports


def format_ports(ports: Iterable[int]) -> str:
    out: list[str] = []
    ordered = sorted(set(ports))
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        out.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(out)


def normalize(key: str, value: str) -> str:
    if key == RESERVED:
        return format_ports(parse_ports(value))
    return " ".join(value.split())


def render_sysctl_d(template: str, overrides: Iterable[tuple[str, str | None]]) -> str:
    """The sysctl.d file for boot with the operator's overrides in place of
    the defaults (pure): a key set to null is commented out, left alone."""
    wanted_values = dict(overrides)
    out = []
    for line in template.splitlines():
        key, eq, _ = line.lstrip("-").partition("=")
        key = key.strip()
        if eq and not line.startswith("#") and key in wanted_values:
            value = wanted_values[key]
            if value is None:
                line = f"# {key}: left alone (null in agent.yaml)"
            else:
                line = f"{line[:len(line) - len(line.lstrip('-'))]}{key} = {value}"
        out.append(line)
    return "\n".join(out) + "\n"


@dataclass(frozen=True)
class Change:
    key: str
    old: str | None  # None: the kernel lacks the key
    new: str

    @property
    def differs(self) -> bool:
        return self.old is not None and normalize(self.key, self.old) != normalize(self.key,
                                                                                   self.new)


def wanted(overrides: Iterable[tuple[str, str | None]], service_ports: Iterable[int],
           current_reserved: str) -> dict[str, str]:
    """The values the agent wants (pure): defaults, the operator's overrides,
    and the service ports added to the reserved ports already set."""
    values: dict[str, str | None] = dict(DEFAULTS)
    values.update(dict(overrides))
    out = {k: v for k, v in values.items() if v is not None}
    ports = set(service_ports)
    if ports:
        out[RESERVED] = format_ports(parse_ports(current_reserved) | ports)
    return out


class Sysctl:
    def __init__(self, state_dir: Path, root: Path = PROC_SYS) -> None:
        self.root, self.state_dir = root, state_dir

    def _path(self, key: str) -> Path:
        return self.root / key.replace(".", "/")

    def read(self, key: str) -> str | None:
        try:
            return " ".join(self._path(key).read_text().split())
        except FileNotFoundError:
            return None

    def plan(self, overrides: Iterable[tuple[str, str | None]],
             service_ports: Iterable[int]) -> list[Change]:
        want = wanted(overrides, service_ports, self.read(RESERVED) or "")
        return [Change(k, self.read(k), v) for k, v in want.items()]

    def apply(self, changes: list[Change]) -> list[Change]:
        """Write what differs, read it back, record the first old values."""
        todo = [c for c in changes if c.differs]
        restore_path = self.state_dir / RESTORE_FILE
        recorded: dict[str, str] = {}
        if restore_path.exists():
            recorded = json.loads(restore_path.read_text())
        for c in todo:
            recorded.setdefault(c.key, c.old or "")
        if todo:  # in the state directory: root and its group, like the other state files
            parent = restore_path.parent
            group = parent.stat().st_gid if parent.is_dir() else None
            atomic_write(restore_path, json.dumps(recorded, indent=1, sort_keys=True) + "\n",
                         0o640, group)
        for c in todo:
            self._write(c.key, c.new)
        return todo

    def _write(self, key: str, value: str) -> None:
        try:
            self._path(key).write_text(value + "\n")
        except OSError as e:
            raise ZddError(f"cannot set {key} = {value}: {e.strerror}") from e
        back = self.read(key)
        if back is None or normalize(key, back) != normalize(key, value):
            raise ZddError(f"{key}: wrote {value!r} but the kernel reads back {back!r}")

    def restore(self) -> list[Change]:
        restore_path = self.state_dir / RESTORE_FILE
        if not restore_path.exists():
            return []
        recorded: dict[str, str] = json.loads(restore_path.read_text())
        done = []
        for key, old in recorded.items():
            cur = self.read(key)
            if cur is not None and normalize(key, cur) != normalize(key, old):
                self._write(key, old)
                done.append(Change(key, cur, old))
        restore_path.unlink()
        return done
