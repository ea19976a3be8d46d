"""Release directories for the demo services, laid out like real deployments:
ROOT/VERSION/bin/PROGRAM, an executable that runs the program as VERSION.

Programs: api (the HTTP/1.1 demo, agent.demo.api), asgi (HTTP/1.1, h2c and
WebSocket under hypercorn or uvicorn, agent.demo.asgi_api), wsgi (the WSGI
app under gunicorn, agent.demo.wsgi_api), grpc (unary and server streaming
with grpc.health.v1, agent.demo.grpc_api). The services but grpc drain with
the drain kit (zdd_drain) unless given --plain."""

from __future__ import annotations

import sys
from pathlib import Path

from ..config import check_version
from ..origin import module_root

PROGRAMS = {"api": "agent.demo.api", "asgi": "agent.demo.asgi_api",
            "wsgi": "agent.demo.wsgi_api", "grpc": "agent.demo.grpc_api"}

_SCRIPT = """#!{python}
# zdd-agent demo release {version}
import sys
sys.path.insert(0, {root!r})  # the Debian package's private directory, or a checkout
from {module} import main
sys.argv = [sys.argv[0], "--version", {version!r}, *{flags!r}, *sys.argv[1:]]
sys.exit(main())
"""


def make_release(root: Path, version: str, flags: tuple[str, ...] = (),
                 program: str = "api") -> Path:
    check_version(version)
    exe = root / version / "bin" / program
    exe.parent.mkdir(parents=True, exist_ok=True)
    exe.write_text(_SCRIPT.format(python=sys.executable, root=module_root(), version=version,
                                  flags=list(flags),
                                  module=PROGRAMS[program]))
    exe.chmod(0o755)
    return exe
