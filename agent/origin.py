"""Where this agent was installed from: the Debian package (debian/ in the
checkout), or pip / a checkout. `zdd-agent install` and `--version` ask.

The package installs the agent's own units into the system unit directory
and its sysctl.d file into /usr/lib/sysctl.d, and marks its data directory
(/usr/share/zdd-agent/packaged): those files are then dpkg's, and
`zdd-agent install` leaves them to it. Both the mark and the units must be
there: a mark without units is a broken or half-removed package, and the
agent then installs its own as from pip.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

DIST = "zdd-agent"
MARK = "packaged"
# Debian 12 installs packages' units in /lib/systemd/system (the same
# directory as /usr/lib/systemd/system on a merged-/usr system); later
# releases use /usr/lib/systemd/system.
PACKAGE_UNIT_DIRS = (Path("/lib/systemd/system"), Path("/usr/lib/systemd/system"))
PACKAGE_SYSCTL = Path("/usr/lib/sysctl.d/60-zdd-agent.conf")


@dataclass(frozen=True)
class Package:
    """The Debian package's files, as this host has them."""

    name: str
    unit_dir: Path
    sysctl: Path


def module_root() -> str:
    """The directory that holds the agent package: a child `python3 -m
    agent...` or a demo release script needs it on its path when the agent is
    in the package's private directory (/usr/share/zdd-agent), which Debian's
    python3 does not search."""
    return str(Path(__file__).resolve().parents[1])


def version() -> str:
    try:
        return metadata.version(DIST)
    except metadata.PackageNotFoundError:
        return "unknown"


def package(share: Path, unit_dirs: tuple[Path, ...] = PACKAGE_UNIT_DIRS,
            sysctl: Path = PACKAGE_SYSCTL) -> Package | None:
    """The package when this agent runs from it: `share` (the directory of
    units/ and sysctl.d/, agent.units.data_dir) holds the package's mark and
    a unit directory holds its zdd-agent.service; else None."""
    if not (share / MARK).is_file():
        return None
    for d in unit_dirs:
        if (d / "zdd-agent.service").is_file():
            return Package(DIST, d, sysctl)
    return None


def describe(pkg: Package | None, share: Path) -> str:
    """One line for --version."""
    if pkg is not None:
        return (f"zdd-agent {version()} (Debian package {pkg.name}; units in {pkg.unit_dir}, "
                f"data in {share})")
    return f"zdd-agent {version()} (pip or a checkout; data in {share})"
