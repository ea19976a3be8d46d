"""What the agent knows about particular server programs, read from a
service's command line: today, which ones cannot open a private probe port
when systemd hands them their listeners.

gunicorn, started with LISTEN_FDS set (socket: inherit), serves the inherited
sockets and ignores every --bind it was given (gunicorn/arbiter.py passes the
systemd fds to sock.create_sockets instead of the configured addresses;
benoitc/gunicorn#2104). Stock uvicorn serves exactly one listener: with --fd,
the way it takes systemd's socket, it binds nothing else (uvicorn/server.py,
`startup`: fd, uds and host:port are alternatives). A readiness probe on
{instance_port} then finds nothing listening: every swap waits out
ready.deadline and rolls back.
What works instead: ready: {type: notify} (gunicorn's arbiter sends READY=1;
uvicorn does through the drain kit), or type: exec, plus the bake
(strategy.min_ready), since gunicorn's READY=1 comes before its workers have
imported the app (gunicorn #2778).

The command is recognised, simply and on purpose (a warning, not a refusal):
  1. argv[0]'s base name is gunicorn or uvicorn (a virtualenv's bin/ script);
  2. `-m gunicorn` or `-m uvicorn` (or a submodule) anywhere in argv;
  3. argv[0] is a script (#!) whose first 4 KiB mention gunicorn or uvicorn
     (a start script that execs it). A script that mentions zdd_drain is not
     taken for uvicorn: the drain kit's uvicorn adapter opens 127.0.0.1:
     $ZDD_INSTANCE_PORT itself. A path with {version} in it is read only when
     the version is known (doctor: the serving one; check-config: never).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .config import ServiceConfig

PROBE_BLIND = ("gunicorn", "uvicorn")
PORT_PROBES = ("http", "tcp", "grpc")
SCRIPT_HEAD = 4096  # bytes of a start script read to find the server it runs


def read_head(path: str) -> bytes | None:
    """The first SCRIPT_HEAD bytes of a regular file, or None."""
    try:
        if not os.path.isfile(path):
            return None
        with open(path, "rb") as f:
            return f.read(SCRIPT_HEAD)
    except OSError:
        return None


def server_in(argv: Sequence[str],
              head: Callable[[str], bytes | None] = read_head) -> tuple[str, str] | None:
    """(server, how it was recognised) when argv runs gunicorn or uvicorn."""
    if not argv:
        return None
    exe = os.path.basename(argv[0])
    if exe in PROBE_BLIND:
        return exe, f"the command runs {argv[0]}"
    for i, arg in enumerate(argv):
        module = argv[i + 1] if arg == "-m" and i + 1 < len(argv) else \
            arg[2:] if arg.startswith("-m") and len(arg) > 2 else ""
        if module.split(".")[0] in PROBE_BLIND:
            return module.split(".")[0], f"the command runs -m {module}"
    if "{" in argv[0]:  # a placeholder not substituted: nothing to read
        return None
    text = head(argv[0])
    if not text or not text.startswith(b"#!"):
        return None
    for name in PROBE_BLIND:
        if name.encode() in text and not (name == "uvicorn" and b"zdd_drain" in text):
            return name, f"the start script {argv[0]} mentions {name} in its first 4 KiB"
    return None


@dataclass(frozen=True)
class ProbeBlind:
    """A probe on {instance_port} that the server will never answer."""

    svc: ServiceConfig
    server: str
    evidence: str

    @property
    def symptom(self) -> str:
        return (f"every swap waits ready.deadline ({self.svc.ready.deadline:g}s) and rolls "
                f"back: nothing answers the {self.svc.ready.type} probe on the instance port")

    @property
    def cause(self) -> str:
        return (f"socket: inherit with ready.type {self.svc.ready.type}, and {self.evidence}: "
                f"{self.server}, given its listener by systemd, opens no other port (gunicorn "
                "ignores --bind under LISTEN_FDS, gunicorn #2104; uvicorn --fd binds nothing "
                "else), so nothing listens on {instance_port}")

    @property
    def fix(self) -> str:
        return ("ready: {type: notify} (gunicorn sends READY=1, uvicorn does with the drain "
                "kit), or type: exec; either way keep the bake, strategy.min_ready "
                f"({self.svc.min_ready:g}s now), since gunicorn's READY=1 comes before its "
                "workers have imported the app")

    def line(self) -> str:
        """One line for check-config's stderr."""
        return f"{self.svc.path}: ready.type: {self.cause}; {self.symptom}; fix: {self.fix}"


def probe_blind(svc: ServiceConfig, version: str | None = None,
                head: Callable[[str], bytes | None] = read_head) -> ProbeBlind | None:
    """The config asks a port probe of a server that cannot open the port."""
    if svc.socket != "inherit" or svc.ready.type not in PORT_PROBES:
        return None
    argv = svc.argv(version) if version is not None else list(svc.command)
    found = server_in(argv, head)
    return ProbeBlind(svc, *found) if found else None
