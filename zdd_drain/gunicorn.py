"""zdd_drain for gunicorn (27.0+; WSGI), as server hooks in gunicorn.conf.py:

    from zdd_drain.gunicorn import *  # noqa: F403 - the hooks and two settings below
    wsgi_app = "myapp:app"
    workers = 2

gunicorn already adopts systemd's listeners (LISTEN_FDS) and, on SIGTERM,
closes its copy, stops its workers gracefully within graceful_timeout and
exits 0; its gthread workers (27.0+) keep a kept-alive connection open
briefly after TERM and answer its next request with `Connection: close`.
What the kit adds:

- READY=1 only once every worker accepts: gunicorn sends it when its arbiter
  boots, before any worker has loaded the app (the shared accept queue holds
  the connections meanwhile, so nothing fails, but latency spikes). Each
  worker reports through a pipe after `post_worker_init`; the arbiter
  notifies when all `workers` have;
- `graceful_timeout` from the agent's grace period (ZDD_GRACE_PERIOD) minus
  a margin, so the workers finish before systemd's SIGKILL;
- `worker_class = "gthread"` (keep-alive; the sync worker closes after
  every response);
- `DrainWSGI` around the app in each worker: /ready answers 503 from the
  drain signal on.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

from . import Drain, DrainWSGI, drain_deadline, grace_period, notify

__all__ = ["graceful_timeout", "on_starting", "post_worker_init", "when_ready",
           "worker_class"]

graceful_timeout = int(drain_deadline(grace_period()))  # gunicorn takes whole seconds
worker_class = "gthread"

DRAIN = Drain()  # this worker's (each worker has its own copy after fork)
_ready_pipe: tuple[int, int] | None = None


def on_starting(server: Any) -> None:
    """Arbiter, before it binds: hold back gunicorn's own early READY=1."""
    global _ready_pipe
    import gunicorn.systemd

    sd_notify = gunicorn.systemd.sd_notify
    if getattr(sd_notify, "zdd_drain", False):
        return

    def held(state: str, logger: Any, unset_environment: bool = False) -> None:
        if not state.startswith("READY=1"):
            sd_notify(state, logger, unset_environment)

    held.zdd_drain = True  # type: ignore[attr-defined]
    gunicorn.systemd.sd_notify = held
    _ready_pipe = os.pipe()


def when_ready(server: Any) -> None:
    """Arbiter, listeners open: READY=1 once every worker said it accepts."""
    if _ready_pipe is None:
        return
    want = int(server.num_workers)
    read_end = _ready_pipe[0]

    def wait() -> None:
        seen = 0
        while seen < want:
            chunk = os.read(read_end, 64)
            if not chunk:
                return
            seen += len(chunk)
        notify(f"READY=1\nSTATUS=serving with {want} worker(s)\nMAINPID={os.getpid()}")

    threading.Thread(target=wait, name="zdd-drain-ready", daemon=True).start()


def post_worker_init(worker: Any) -> None:
    """Worker, app loaded, about to accept: the drain middleware, the drain
    signal, and word to the arbiter."""
    worker.wsgi = DrainWSGI(worker.wsgi, DRAIN)
    stop = worker.handle_exit

    def on_term(sig: int, frame: Any) -> None:
        DRAIN.draining = True  # /ready: 503
        stop(sig, frame)

    signal.signal(signal.SIGTERM, on_term)
    if _ready_pipe is not None:
        os.write(_ready_pipe[1], b"r")
