"""The kernel's own TCP counters of a network namespace (/proc/net/netstat,
/proc/net/snmp), read before and after a swap: a swap that made the kernel
drop or reset connections says so, whatever the clients report."""

from __future__ import annotations

from pathlib import Path

WATCHED = {
    "TcpExt": ("ListenOverflows", "ListenDrops", "TCPAbortOnClose", "TCPAbortOnData"),
    "Tcp": ("EstabResets", "OutRsts"),
}


def parse(text: str, watched: dict[str, tuple[str, ...]] = WATCHED) -> dict[str, int]:
    """The 'Prefix: names' / 'Prefix: values' line pairs of netstat/snmp:
    the counters `watched` names, by prefix."""
    out: dict[str, int] = {}
    lines = text.splitlines()
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        prefix, _, keys = names.partition(":")
        vprefix, _, nums = values.partition(":")
        if prefix != vprefix or prefix not in watched:
            continue
        for key, num in zip(keys.split(), nums.split(), strict=False):
            if key in watched[prefix]:
                out[key] = int(num)
    return out


def read(pid: int | None = None,
         watched: dict[str, tuple[str, ...]] = WATCHED) -> dict[str, int]:
    """Counters of the namespace of `pid` (default: ours)."""
    base = Path(f"/proc/{pid}/net" if pid else "/proc/net")
    counters: dict[str, int] = {}
    for name in ("netstat", "snmp"):
        try:
            counters.update(parse((base / name).read_text(), watched))
        except OSError:
            pass
    return counters

