"""Release directories for the demo API, laid out like real deployments:
ROOT/VERSION/bin/api, an executable that runs agent.demo.api as VERSION."""

from __future__ import annotations

import sys
from pathlib import Path

from ..config import check_version

_SCRIPT = """#!{python}
# zdd-agent demo release {version}
import sys
from agent.demo.api import main
sys.argv = [sys.argv[0], "--version", {version!r}, *{flags!r}, *sys.argv[1:]]
sys.exit(main())
"""


def make_release(root: Path, version: str, flags: tuple[str, ...] = ()) -> Path:
    check_version(version)
    exe = root / version / "bin" / "api"
    exe.parent.mkdir(parents=True, exist_ok=True)
    exe.write_text(_SCRIPT.format(python=sys.executable, version=version, flags=list(flags)))
    exe.chmod(0o755)
    return exe
