"""The Debian package, built once per test session from this checkout with
the one documented command, scripts/build-deb (which also runs lintian and
fails on an error or warning no override explains)."""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUILD = REPO / "scripts" / "build-deb"


def build(out: Path) -> Path:
    """scripts/build-deb into `out`; the agent's .deb's path (the kit's is
    beside it: kit()). AssertionError with
    the build's and lintian's output when either fails."""
    r = subprocess.run([str(BUILD)], env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                                          "ZDD_DEB_OUT": str(out), "LANG": "C.UTF-8"},
                       capture_output=True, text=True, timeout=900, cwd=REPO)
    assert r.returncode == 0, f"scripts/build-deb exited {r.returncode}:\n{r.stderr[-6000:]}"
    deb = Path(r.stdout.strip().splitlines()[-1])
    assert deb.is_file() and deb.parent == out, r.stdout
    return deb


def kit(deb: Path) -> Path:
    """python3-zdd-drain's .deb, which scripts/build-deb puts beside the
    agent's `deb` (the agent depends on it)."""
    (found,) = deb.parent.glob("python3-zdd-drain_*_all.deb")
    return found


def field(deb: Path, name: str) -> str:
    return subprocess.run(["dpkg-deb", "-f", str(deb), name], check=True, capture_output=True,
                          text=True).stdout.strip()


def relations(deb: Path, name: str) -> list[str]:
    """Package names of a Depends-like field, versions and alternatives dropped."""
    out = []
    for part in field(deb, name).split(","):
        if part.strip():
            out.append(part.split("|")[0].split("(")[0].strip().split(":")[0])
    return out
