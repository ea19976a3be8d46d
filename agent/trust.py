"""What the agent executes as root must be root's alone (sshd's StrictModes).

A hook or an exec probe runs with the agent's privileges. If anyone but root
can change the file, or any directory on the way to it (rename or replace an
entry there), that user can run code as root at the next swap. So the file
and every directory up to / must be owned by root and not writable by group
or others, after symbolic links are resolved (each link's target is checked
the same way, since the real path is what runs).
"""

from __future__ import annotations

import os
import stat

from .errors import ConfigError


MAX_LINKS = 40  # symbolic links followed in one path, as the kernel's ELOOP limit
MAX_TREE = 10_000  # entries checked under a directory argument


def _bad(st: os.stat_result, path: str, what: str) -> str | None:
    if st.st_uid != 0:
        return f"{what} {path} is owned by uid {st.st_uid}, not root"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return (f"{what} {path} is writable by group or others "
                f"(mode {stat.S_IMODE(st.st_mode):04o})")
    return None


def untrusted(path: str) -> str | None:
    """Why `path` may be changed by someone other than root, or None.

    Resolves the path one component at a time from /, as the kernel does,
    and checks every directory it passes through, including those that hold
    a symbolic link on the way (whoever may write there may re-point the
    link), and the file it ends at: owner uid 0 and no write bit for group
    or others (a sticky directory such as /tmp is refused too: another user
    may own an entry's name before root does)."""
    st = os.stat("/")
    why = _bad(st, "/", "directory")
    if why is not None:
        return why
    todo = [c for c in path.split("/") if c]
    cur, links = "/", 0
    while todo:
        comp = todo.pop(0)
        if comp == ".":
            continue
        if comp == "..":
            cur = os.path.dirname(cur) or "/"
            continue
        nxt = os.path.join(cur, comp)
        try:
            st = os.lstat(nxt)
        except OSError as e:
            return f"{path if not todo else nxt}: {e.strerror}"
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > MAX_LINKS:
                return f"{path}: too many levels of symbolic links"
            target = os.readlink(nxt)
            todo = [c for c in target.split("/") if c] + todo
            if target.startswith("/"):
                cur = "/"
            continue
        final_file = not todo and not stat.S_ISDIR(st.st_mode)
        why = _bad(st, nxt, "the file" if final_file else "directory")
        if why is not None:
            return why
        cur = nxt
    return None


def untrusted_exec(path: str, depth: int = 0) -> str | None:
    """untrusted() of a program and, for a script (#!), of its interpreter,
    in turn (four levels at most); a directory (python3 /opt/pkg runs its
    __main__.py): every entry under it, at most MAX_TREE."""
    why = untrusted(path)
    if why is not None:
        return why
    real = os.path.realpath(path)
    if os.path.isdir(real):
        return _untrusted_tree(real)
    try:
        with open(real, "rb") as f:
            head = f.read(256)
    except OSError as e:
        return f"{real}: {e.strerror}"
    if head.startswith(b"#!") and depth < 4:
        words = head[2:].split(b"\n", 1)[0].split()
        if words:
            interp = words[0].decode(errors="replace")
            why = untrusted_exec(interp, depth + 1)
            if why is not None:
                return f"its interpreter {interp}: {why}"
    return None


def _untrusted_tree(top: str) -> str | None:
    count = 0
    for dirpath, dirs, files in os.walk(top):
        for name in dirs + files:
            count += 1
            if count > MAX_TREE:
                return f"{top} holds more than {MAX_TREE} entries to check"
            why = untrusted(os.path.join(dirpath, name))
            if why is not None:
                return why
    return None


def runs_as_root(user: str | None) -> bool:
    """Whether a service's hooks and probes run as uid 0: no user, or a user
    whose uid is 0 (`user: root`, or another name for uid 0)."""
    if user is None:
        return True
    import pwd

    try:
        return pwd.getpwnam(user).pw_uid == 0
    except KeyError:
        return False  # refused elsewhere: no such user


def untrusted_argv(argv: list[str] | tuple[str, ...]) -> str | None:
    """untrusted() of the executable and of every argument that names an
    existing file as a path (absolute, or relative with a slash: transient
    units run in /), i.e. what an interpreter would run (`/bin/sh
    /opt/hooks/x.sh`, `env python3 hooks/x.py`); the first reason, or None."""
    for i, arg in enumerate(argv):
        path = arg if os.path.isabs(arg) else os.path.join("/", arg)
        if i == 0 or ("/" in arg and os.path.lexists(path)):
            why = untrusted_exec(path if i else arg)
            if why is not None:
                return f"{arg}: {why}" if i else why
    return None


def check_root_argv(argv: list[str] | tuple[str, ...], key: str, file: str) -> None:
    """ConfigError (exit 2) naming the path and the fix when something
    `argv` runs as root could be changed by another user."""
    why = untrusted_argv(argv)
    if why is not None:
        raise ConfigError(f"{file}: {key}: {argv[0]} runs as root, but {why}: only root may "
                          f"be able to change it (chown root; chmod go-w; as sshd's "
                          f"StrictModes)", file=file, key=key)


def _may(st: os.stat_result, uid: int, gids: set[int], bit: int) -> bool:
    """Whether the mode bits give `bit` (4 r, 2 w, 1 x) to uid/gids (ACLs and
    capabilities aside: root bypasses these checks and is not asked about)."""
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid == uid:
        return bool(mode & (bit << 6))
    if st.st_gid in gids:
        return bool(mode & (bit << 3))
    return bool(mode & bit)


def cannot_execute(path: str, user: str) -> str | None:
    """Why `user` cannot run `path`, or None: every directory on the way
    searchable, the file executable, and for a script (#!) readable, with its
    interpreter checked the same way. Mode bits only (execve(2) would also
    apply ACLs and mount options): a start that systemd would fail with
    203/EXEC, told before anything is stopped."""
    import grp
    import pwd

    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        return f"no such user {user!r}"
    if pw.pw_uid == 0:
        return None
    gids = {pw.pw_gid, *(g.gr_gid for g in grp.getgrall() if user in g.gr_mem)}
    seen: set[str] = set()
    while path not in seen:
        seen.add(path)
        real = os.path.realpath(path)
        parts = real.split("/")
        for i in range(1, len(parts) - 1):
            d = "/".join(parts[:i + 1]) or "/"
            try:
                if not _may(os.stat(d), pw.pw_uid, gids, 1):
                    return f"directory {d} is not searchable by {user}"
            except OSError as e:
                return f"{d}: {e.strerror}"
        try:
            st = os.stat(real)
            with open(real, "rb") as f:
                head = f.read(256)
        except OSError as e:
            return f"{real}: {e.strerror}"
        if not _may(st, pw.pw_uid, gids, 1):
            return f"{real} is not executable by {user}"
        if not head.startswith(b"#!"):
            return None
        if not _may(st, pw.pw_uid, gids, 4):
            return f"{real} is a script {user} cannot read"
        words = head[2:].split(b"\n", 1)[0].split()
        if not words:
            return None
        path = words[0].decode(errors="replace")  # the interpreter, checked in turn
    return None
