"""The agent's own records: which version serves (intent), the previous one
(for rollback) and the history of swaps, one JSON file per service, written
atomically. systemd's unit states stay the source of truth for what runs.

A lock file per service keeps two swaps of one service from interleaving.

The records hold the services' journal lines and hook output, so the state
directory is private: root owns it, its group (the admin group, set at
daemon start by secure_state_dir) may read it. Directories are 0750, files
0640, or 0600 when the group is root's own (no admin group on this host).
"""

from __future__ import annotations

import fcntl
import grp
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import check_name
from .errors import LockedError, StateDenied, StateError
from .fsutil import atomic_write, tighten

HISTORY_LIMIT = 100
DIR_MODE = 0o750


def file_mode(gid: int) -> int:
    """A state file's permission bits: its group reads it unless that group is
    root's own (gid 0: no admin group), then root alone."""
    return 0o640 if gid != 0 else 0o600


def secure_state_dir(root: Path, admin_group: str) -> list[str]:
    """At daemon start: create `root` if missing and make it and everything
    under it owned by the agent's user (root) and group `admin_group` (or the
    agent's own group when no such group exists), directories at most 0750,
    files at most file_mode(gid). Symbolic links and special files are left
    alone. Returns one line per path it changed or could not change, for the
    log (a path it cannot change does not stop the others); OSError when the
    directory itself cannot be made."""
    try:
        gid = grp.getgrnam(admin_group).gr_gid
    except KeyError:
        gid = os.getegid()
    owner = (os.geteuid(), gid)
    root.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    changes: list[str | None] = []

    def one(path: Path, mode: int) -> None:
        try:
            changes.append(tighten(path, mode, owner))
        except OSError as e:
            changes.append(f"{path}: cannot tighten: {e.strerror}")

    for dirpath, _dirs, files in os.walk(root):  # does not descend into linked directories
        one(Path(dirpath), DIR_MODE)
        for f in files:
            one(Path(dirpath, f), file_mode(gid))
    return [c for c in changes if c is not None]


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
    # A legacy unit this service took over (`adopt --takeover`), for `adopt
    # --undo`: {"unit", "socket", "enabled": [units that were enabled]}.
    adopted: dict[str, Any] | None = None

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
        # each history entry as written last: id -> (the entry, its JSON). A
        # swap writes its intent before every phase, and encoding the whole
        # history each time cost a swap tens of ms of CPU (issue 16)
        self._encoded: dict[int, tuple[dict[str, Any], str]] = {}

    def _parse(self, text: str) -> Any:
        """The state file's JSON. Laid out as save() writes it (one history
        entry a line), each entry is parsed alone and remembered with the
        text it was read from, which is what save() writes for it: a swap's
        first write then encodes no entry again (9 ms of CPU at 100
        entries). Any other layout is parsed whole (its entries are encoded
        at the first write). ValueError as json.loads."""
        mark = '\n"history": ['
        at = text.find(mark)
        if at >= 0:
            decoder, i, found = json.JSONDecoder(), at + len(mark), []
            try:
                while text[i:i + 1] not in ("]", ""):
                    entry, end = decoder.raw_decode(text, i)
                    found.append((entry, text[i:end]))
                    i = end + 2 if text.startswith(",\n", end) else end
                rest = json.loads(text[:at + len(mark)] + text[i:])
            except ValueError:
                rest = None
            if isinstance(rest, dict) and rest.get("history") == []:
                rest["history"] = [e for e, _ in found]
                self._encoded = {id(e): (e, t) for e, t in found}
                return rest
        return json.loads(text)

    def _history_json(self, history: list[dict[str, Any]]) -> str:
        """The history as a JSON array, one entry a line; an entry already
        written by this store (the same object) is not encoded again."""
        keep: dict[int, tuple[dict[str, Any], str]] = {}
        lines = []
        for entry in history:
            hit = self._encoded.get(id(entry))
            if hit is None or hit[0] is not entry:
                hit = (entry, json.dumps(entry, sort_keys=True))
            keep[id(entry)] = hit
            lines.append(hit[1])
        self._encoded = keep
        return "[" + ",\n".join(lines) + "]"

    def _path(self, name: str) -> Path:
        return self.root / "services" / f"{check_name(name)}.json"

    def _dir(self, sub: str) -> tuple[Path, int]:
        """root/sub for a write, created 0750 (the root too) and tightened to
        it if found more open; and the state directory's group, the group of
        the files written there."""
        self.root.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
        d = self.root / sub
        d.mkdir(exist_ok=True, mode=DIR_MODE)
        tighten(self.root, DIR_MODE)
        gid = os.stat(self.root).st_gid
        tighten(d, DIR_MODE, (os.geteuid(), gid))  # the admin group reads what is in it
        return d, gid

    def _denied(self, path: Path) -> StateDenied:
        return StateDenied(f"{path}: permission denied: the state is readable by root and "
                           "the admin group only (ask the daemon: run without --local)")

    def load(self, name: str) -> ServiceState:
        path = self._path(name)
        try:
            text = path.read_text()
            data = self._parse(text)
        except FileNotFoundError:
            return ServiceState(name)
        except PermissionError:
            raise self._denied(path) from None
        except (ValueError, UnicodeDecodeError) as e:
            # Kept aside for a human, never silently dropped.
            aside = path.with_suffix(f".corrupt.{int(os.stat(path).st_mtime)}")
            os.replace(path, aside)
            raise StateError(f"{path}: unreadable state ({e}); moved to {aside}") from e
        return ServiceState(name=name, serving=data.get("serving"),
                            previous=data.get("previous"), since=data.get("since"),
                            history=list(data.get("history", [])), intent=data.get("intent"),
                            watch=data.get("watch"), adopted=data.get("adopted"))

    def save(self, st: ServiceState) -> None:
        _d, gid = self._dir("services")
        fields = {"serving": st.serving, "previous": st.previous, "since": st.since,
                  "intent": st.intent, "watch": st.watch, "adopted": st.adopted}
        parts = {k: json.dumps(v, sort_keys=True) for k, v in fields.items()}
        parts["history"] = self._history_json(st.history)
        text = "{" + ",\n".join(f"{json.dumps(k)}: {parts[k]}" for k in sorted(parts)) + "}\n"
        atomic_write(self._path(st.name), text, mode=file_mode(gid), group=gid)

    def names(self) -> list[str]:
        d = self.root / "services"
        try:
            entries = os.listdir(d)
        except (FileNotFoundError, NotADirectoryError):
            return []
        except PermissionError:
            raise self._denied(d) from None
        return sorted(e[:-len(".json")] for e in entries
                      if e.endswith(".json") and not e.startswith("."))

    @contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """Exclusive per service, refused at once when held (flock(2): released
        by the kernel when the holder dies, so a crash leaves no stale lock)."""
        d, _gid = self._dir("locks")
        fd = os.open(d / f"{check_name(name)}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
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
