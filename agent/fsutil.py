"""Atomic file writes: a reader (or a power cut) sees the old file or the new
one, never half of either (rename(2) within one directory, fsync of file and
directory). And the tightening of a private directory tree's owner and modes."""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from pathlib import Path


def atomic_write(path: Path, content: str | bytes, mode: int = 0o644,
                 group: int | None = None) -> None:
    """Write `content` to `path` with permission bits `mode` and, when given,
    group `group` (a gid); both are set on the temporary file before it is
    renamed into place, so the file is never visible with looser ones."""
    data = content.encode() if isinstance(content, str) else content
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        if group is not None and os.fstat(fd).st_gid != group:
            os.fchown(fd, -1, group)
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_if_changed(path: Path, content: str, mode: int = 0o644) -> bool:
    """Write only when the content differs; True when it wrote."""
    try:
        if path.read_text() == content:
            return False
    except (FileNotFoundError, UnicodeDecodeError):
        pass
    atomic_write(path, content, mode)
    return True


def tighten(path: Path, mode: int, owner: tuple[int, int] | None = None) -> str | None:
    """Clear every permission bit of `path` that `mode` does not grant and,
    when `owner` (uid, gid) is given, chown it to them. Acts on a descriptor
    opened with O_NOFOLLOW|O_NONBLOCK, so what was looked at is what changes;
    a symbolic link (ELOOP), a FIFO, a device or a path that is gone is left
    alone. Returns what changed ("/var/lib/zdd-agent: mode 0755 -> 0750,
    group 0 -> 998") or None; raises OSError (EPERM) when not allowed."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            return None
        raise
    try:
        st = os.fstat(fd)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            return None
        changes = []
        old_mode = stat.S_IMODE(st.st_mode)
        if old_mode & ~mode:  # first: fewer readers even if the chown below is refused
            os.fchmod(fd, old_mode & mode)
            changes.append(f"mode {old_mode:04o} -> {old_mode & mode:04o}")
        if owner is not None and (st.st_uid, st.st_gid) != owner:
            os.fchown(fd, *owner)
            changes += [f"{what} {old} -> {new}" for what, old, new in
                        (("owner", st.st_uid, owner[0]), ("group", st.st_gid, owner[1]))
                        if old != new]
        return f"{path}: {', '.join(changes)}" if changes else None
    finally:
        os.close(fd)
