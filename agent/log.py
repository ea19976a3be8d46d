"""Logging to journald with structured fields (SERVICE, VERSION, PHASE,
CONNECTIONS and a MESSAGE_ID per kind of event), plus plain lines an operator
greps for. Outside journald (no socket), lines go to stderr."""

from __future__ import annotations

import os
import sys
import syslog
import threading
import time
from typing import Any

SYSLOG_IDENTIFIER = "zdd-agent"
JOURNAL_SOCKET = "/run/systemd/journal/socket"

# One MESSAGE_ID per kind of event (journalctl MESSAGE_ID=... finds them all).
MESSAGE_IDS = {
    "daemon": "9e1b3c2a5f0d4c6e8a7b1d2c3e4f5a60",
    "phase": "4f6c1a2b3d5e4f708192a3b4c5d6e7f1",
    "probe": "5a7b2c3d4e6f4a8192b3c4d5e6f7a802",
    "drain": "6b8c3d4e5f704b9283c4d5e6f7a8b903",
    "killed": "7c9d4e5f6a814c0394d5e6f7a8b9ca04",
    "done": "8dae5f6a7b924d14a5e6f7a8b9cadb05",
    "recover": "9ebf6a7b8ca34e25b6f7a8b9cadbec06",
    "refused": "afc07b8c9db44f36c7a8b9cadbecfd07",
    "sysctl": "b0d18c9daec54047d8b9cadbecfd0e08",
    "request": "c1e29daebfd64158e9cadbecfd0e1f09",
    # the daemon swapped a failing new version back by itself (strategy.watch)
    "auto_revert": "d2f3aebfc0e7426990dbecfd0e1f2a0a",
    "watch": "e3a4bfc0d1f84370a1ecfd0e1f2a3b0b",
}

_lock = threading.Lock()


def _journal_available() -> bool:
    return os.path.exists(JOURNAL_SOCKET)


def log(kind: str, message: str, priority: int = syslog.LOG_INFO, **fields: Any) -> None:
    """One event: structured to journald, a plain line elsewhere."""
    extra = {k.upper(): str(v) for k, v in fields.items() if v is not None}
    if _journal_available():
        try:
            from pystemd.journal import sendv

            sendv(MESSAGE=message, PRIORITY=str(priority),
                  SYSLOG_IDENTIFIER=SYSLOG_IDENTIFIER,
                  MESSAGE_ID=MESSAGE_IDS.get(kind, MESSAGE_IDS["daemon"]), **extra)
            return
        except Exception:
            pass  # fall through to stderr: a log line must never break a swap
    with _lock:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
        print(f"{stamp} {SYSLOG_IDENTIFIER}: {message}", file=sys.stderr, flush=True)


class SwapLogger:
    """An emit() for swap events that logs them, drains at most once a second."""

    def __init__(self, service: str, version: str) -> None:
        self.service, self.version = service, version
        self._last_drain = 0.0

    def __call__(self, kind: str, d: dict[str, Any]) -> None:
        svc = self.service
        if kind == "phase":
            reason = f": {d['reason']}" if d.get("reason") else ""
            log("phase", f"{svc}: swap to {self.version}: phase {d['phase']}{reason}",
                SERVICE=svc, VERSION=self.version, PHASE=d["phase"])
        elif kind == "probe" and not d["ok"]:
            log("probe", f"{svc}: {d['version']} not ready yet: {d['detail']}",
                syslog.LOG_DEBUG, SERVICE=svc, VERSION=d["version"], PHASE="ready")
        elif kind == "drain":
            now = time.monotonic()
            if d["elapsed"] == 0.0 or now - self._last_drain >= 1.0:
                self._last_drain = now
                held = f" Still connected: {', '.join(d['held'])}." if d.get("held") else ""
                log("drain", f"Draining zdd-{svc}@{d['version']}.service: "
                             f"{d['connections']} active connections remaining.{held}",
                    SERVICE=svc, VERSION=d["version"], PHASE="drain",
                    CONNECTIONS=d["connections"])
        elif kind == "killed":
            log("killed", f"Grace period of {d['grace']:g}s over: zdd-{svc}@{d['version']}"
                          f".service killed with {d['connections']} active connections.",
                syslog.LOG_WARNING, SERVICE=svc, VERSION=d["version"], PHASE="drain",
                CONNECTIONS=d["connections"])
        elif kind == "hook":
            log("phase", f"{svc}: hook {d['hook']} {'ok' if d['ok'] else 'failed'}: "
                         f"{d['detail']}", syslog.LOG_INFO if d["ok"] else syslog.LOG_ERR,
                SERVICE=svc, VERSION=self.version, PHASE=d["hook"])
        elif kind == "drained":
            log("drain", f"Drain complete. {d['connections']} active connections remaining.",
                SERVICE=svc, VERSION=d["version"], PHASE="drain", CONNECTIONS=d["connections"])
        elif kind in ("warning", "stray"):
            log("phase", f"{svc}: swap to {self.version}: warning: "
                         f"{d.get('message') or d}", syslog.LOG_WARNING, SERVICE=svc,
                VERSION=self.version)
        elif kind == "recover":
            log("recover", f"{svc}: found a swap to {d['version']} interrupted in "
                           f"{d['phase']}; action: {d['action']}", syslog.LOG_WARNING,
                SERVICE=svc, VERSION=d["version"], PHASE=d["phase"])
        elif kind == "done":
            prio = syslog.LOG_INFO if d["result"] in ("ok", "unchanged") else syslog.LOG_ERR
            reason = f": {d['reason']}" if d.get("reason") else ""
            log("done", f"{svc}: swap to {self.version} {d['result']}{reason}", prio,
                SERVICE=svc, VERSION=self.version, PHASE="done")

