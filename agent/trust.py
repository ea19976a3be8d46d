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
import re
import shutil
import stat
from collections.abc import Mapping

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
    """untrusted() of a program and, for a script, of its #! line read as a
    command line (untrusted_argv: `#!/usr/bin/env X`, `#!/bin/sh /x`), up
    to the kernel's MAX_SHEBANG levels; deeper is refused, never assumed."""
    why = untrusted(path)
    if why is not None:
        return why
    real = os.path.realpath(path)
    if os.path.isdir(real):
        return f"{real} is a directory"
    try:
        with open(real, "rb") as f:
            head = f.read(256)
    except OSError as e:
        return f"{real}: {e.strerror}"
    if not head.startswith(b"#!"):
        return None
    if depth >= MAX_SHEBANG:
        return f"{real}: more than {MAX_SHEBANG} levels of #! interpreters to check"
    words = [w.decode(errors="replace") for w in head[2:].split(b"\n", 1)[0].split()]
    why = untrusted_argv(words, depth + 1) if words else None
    return None if why is None else f"its #! line {' '.join(words)}: {why}"


def _untrusted_tree(top: str) -> str | None:
    """untrusted() of everything under `top`, linked directories followed,
    at most MAX_TREE entries (more is refused: nothing is assumed)."""
    count = 0
    for dirpath, dirs, files in os.walk(top, followlinks=True):
        for name in dirs + files:
            count += 1
            if count > MAX_TREE:
                return (f"{top} holds more than {MAX_TREE} entries to check (give the "
                        "hook a directory of its own)")
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


def _program(argv0: str) -> str:
    """The program's name as the kernel finds it: python3 -> python3.11."""
    return os.path.basename(os.path.realpath(argv0))


def untrusted_argv(argv: list[str] | tuple[str, ...], depth: int = 0) -> str | None:
    """Why the command line `argv`, run as root, may run code another user
    can change, or None. Checked: the executable with its #! chain
    (untrusted_exec); through env(1), the program it runs; for an
    interpreter (INTERPRETERS), every argument that names a file or a
    directory as a path (absolute, or relative with a slash: transient
    units run in /), all that is under a directory, and for a script the
    directory it sits in (Python puts it first on sys.path). The arguments
    of other programs are their data (`curl -o /dev/null`, `find /etc`)."""
    if not argv:
        return None
    why = untrusted_exec(argv[0], depth)
    if why is not None:
        return why
    prog, rest = _program(argv[0]), list(argv[1:])
    if prog == "env":
        i = 0
        while i < len(rest) and (rest[i].startswith("-") or "=" in rest[i]):
            i += 1
        if i == len(rest):
            return None
        target = rest[i] if "/" in rest[i] else (shutil.which(rest[i]) or rest[i])
        return untrusted_argv([target, *rest[i + 1:]], depth)
    if not INTERPRETERS.fullmatch(prog):
        return None
    for arg in rest:
        path = arg if os.path.isabs(arg) else os.path.join("/", arg)
        if "/" not in arg or not os.path.lexists(path):
            continue
        try:
            st = os.stat(path)
        except OSError:
            st = None
        if st is not None and not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            continue  # /dev/null, a FIFO: not code
        why = untrusted(path)
        if why is None and st is not None:
            where = path if stat.S_ISDIR(st.st_mode) else os.path.dirname(
                os.path.realpath(path))
            why = _untrusted_tree(where)
        if why is not None:
            return f"{arg}: {why}"
    return None


# Programs whose arguments are code: a shell, Python, Perl, Ruby, Node, PHP, Lua.
INTERPRETERS = re.compile(r"(ba|da|z|k|mk|c|tc|fi)?sh|python[0-9.]*|pypy[0-9.]*|perl[0-9.]*"
                          r"|ruby[0-9.]*|node(js)?|php[0-9.]*|lua[0-9.]*|busybox")
MAX_SHEBANG = 5  # the kernel's #! recursion (fs/exec.c: bprm->interp_depth < 5)

# Variables that make a program load code from elsewhere: as root, the
# places they name must be root's alone too.
CODE_ENV = ("PATH", "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE",
            "PERL5LIB", "PERLLIB", "PERL5OPT", "RUBYLIB", "RUBYOPT", "NODE_PATH",
            "NODE_OPTIONS", "LD_PRELOAD", "LD_LIBRARY_PATH", "BASH_ENV", "ENV", "CLASSPATH")


def untrusted_env(env: Mapping[str, str]) -> tuple[str, str] | None:
    """(variable, why) for the first CODE_ENV variable that names a path
    another user can change (entries split at ':' and whitespace); None."""
    for key in CODE_ENV:
        value = env.get(key)
        if not value:
            continue
        for entry in re.split(r"[:\s]+", value):
            if entry.startswith("/") and os.path.lexists(entry):
                why = untrusted(entry)
                if why is not None:
                    return key, f"{entry}: {why}"
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
