"""The agent's own records: which version serves (intent), the previous one
(for rollback) and the history of swaps, one JSON file per service, written
atomically. systemd's unit states stay the source of truth for what runs.

A lock file per service keeps two swaps of one service from interleaving.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import check_name
from .errors import LockedError, StateError
from .fsutil import atomic_write

HISTORY_LIMIT = 100


@dataclass
class ServiceState:
    name: str
    serving: str | None = None
    previous: str | None = None
    since: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    # A swap in flight: {"from": old, "to": new, "phase": ..., "pid": ..., "at": ...},
    # written before each phase acts, cleared with the swap's record.
    intent: dict[str, Any] | None = None
    # The daemon's watch of the last swap's version (strategy.watch):
    # {"version", "previous", "until": epoch, "seconds", "by"}; None when nothing watches.
    watch: dict[str, Any] | None = None

    def record(self, result: dict[str, Any]) -> None:
        self.history.append(result)
        del self.history[:-HISTORY_LIMIT]
        if result.get("result") in ("ok", "auto_reverted"):
            if result.get("from_version") != result["to_version"]:
                self.previous = result.get("from_version") or self.previous
            self.serving = result["to_version"]
            self.since = result.get("started_at", 0.0) + result.get("seconds", 0.0)

    @property
    def last(self) -> dict[str, Any] | None:
        return self.history[-1] if self.history else None


class StateStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, name: str) -> Path:
        return self.root / "services" / f"{check_name(name)}.json"

    def load(self, name: str) -> ServiceState:
        path = self._path(name)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return ServiceState(name)
        except (ValueError, UnicodeDecodeError) as e:
            # Kept aside for a human, never silently dropped.
            aside = path.with_suffix(f".corrupt.{int(os.stat(path).st_mtime)}")
            os.replace(path, aside)
            raise StateError(f"{path}: unreadable state ({e}); moved to {aside}") from e
        return ServiceState(name=name, serving=data.get("serving"),
                            previous=data.get("previous"), since=data.get("since"),
                            history=list(data.get("history", [])), intent=data.get("intent"),
                            watch=data.get("watch"))

    def save(self, st: ServiceState) -> None:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o755)
        data = {"serving": st.serving, "previous": st.previous, "since": st.since,
                "history": st.history, "intent": st.intent, "watch": st.watch}
        atomic_write(self._path(st.name), json.dumps(data, indent=1, sort_keys=True) + "\n",
                     mode=0o644)

    def names(self) -> list[str]:
        d = self.root / "services"
        return sorted(p.stem for p in d.glob("*.json")) if d.is_dir() else []

    @contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """Exclusive per service, refused at once when held (flock(2): released
        by the kernel when the holder dies, so a crash leaves no stale lock)."""
        d = self.root / "locks"
        d.mkdir(parents=True, exist_ok=True, mode=0o755)
        fd = os.open(d / f"{check_name(name)}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
                raise LockedError(f"a swap of {name} is already running"
                                  f"{f' (pid {holder})' if holder else ''}; "
                                  "wait for it to finish") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            yield
        finally:
            os.close(fd)
