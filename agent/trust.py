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


def _bad(st: os.stat_result, path: str, what: str) -> str | None:
    if st.st_uid != 0:
        return f"{what} {path} is owned by uid {st.st_uid}, not root"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return (f"{what} {path} is writable by group or others "
                f"(mode {stat.S_IMODE(st.st_mode):04o})")
    return None


def untrusted(path: str) -> str | None:
    try:
        return _untrusted(path)
    except OSError as e:  # readlink of /proc/1/cwd and the like: a reason, not a crash
        return f"{path}: {e.strerror or e}"


def _untrusted(path: str) -> str | None:
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
    command line (untrusted_argv: `#!/usr/bin/env X`, `#!/bin/sh -e`), up
    to the kernel's MAX_SHEBANG levels; deeper is refused, never assumed."""
    why = untrusted(path)
    if why is not None:
        return why
    real = os.path.realpath(path)
    if os.path.isdir(real):
        main = os.path.join(real, "__main__.py")  # python3 DIR runs DIR/__main__.py
        return untrusted(main) if os.path.lexists(main) else f"{real} is a directory"
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


# Programs whose file arguments are code: shells, Python, Perl, Ruby, Node,
# PHP, Lua, Tcl, awk, busybox, by the name of the file they resolve to.
INTERPRETERS = re.compile(
    r"(?:ba|da|z|k|mk|lk|c|bsd-c|tc|fi|ya|a|po|r|rba)?sh(?:[0-9.]*|-static)?|ksh93|busybox"
    r"|(?:python|pypy|perl|ruby|node|nodejs|php|php-cgi|lua|luajit|tclsh|wish|[gm]?awk)"
    r"[0-9.]*(?:[-_][0-9a-z._-]+)?[dmu]?")
MAX_SHEBANG = 5  # the kernel's #! recursion (fs/exec.c: bprm->interp_depth < 5)
# What systemd gives a unit without Environment=PATH (path-lookup.h, DEFAULT_PATH)
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
ENV_FLAGS = ("-i", "--ignore-environment", "-", "--")


def _program(argv0: str) -> str:
    """The program's name as the kernel finds it: python3 -> python3.11."""
    return os.path.basename(os.path.realpath(argv0))


def _as_path(arg: str) -> str | None:
    """The path an argument names (relative ones from /, where transient
    units run), or None for a word, an option, a URL."""
    if "/" not in arg or arg.startswith("-") or "://" in arg:
        return None
    return arg if os.path.isabs(arg) else os.path.join("/", arg)


def untrusted_argv(argv: list[str] | tuple[str, ...], depth: int = 0,
                   path_env: str = DEFAULT_PATH) -> str | None:
    """Why the command line `argv`, run as root, may run code another user
    can change, or None. Checked, each along its whole path (untrusted()):
    the executable and its #! chain; through env(1), the program it runs
    (found on `path_env`; env options other than -i are refused, -S and -u
    would hide it); for an interpreter (INTERPRETERS), every argument that
    names a regular file or a Python directory, or a file yet to come in a
    directory others may write. Not followed: wrappers (timeout, nice,
    flock), `-c` strings, `--opt=/path` values, what a script imports."""
    if not argv:
        return None
    why = untrusted_exec(argv[0], depth)
    if why is not None:
        return why
    prog, rest = _program(argv[0]), list(argv[1:])
    if prog == "env":
        i = 0
        while i < len(rest) and (rest[i] in ENV_FLAGS or
                                 (not rest[i].startswith("-") and "=" in rest[i])):
            i += 1
        if i < len(rest) and rest[i].startswith("-"):
            return (f"env option {rest[i]!r}: only -i is followed (-S, -u, -C hide the "
                    "program env runs); name the program directly")
        if i == len(rest):
            return None
        target = rest[i] if "/" in rest[i] else (shutil.which(rest[i], path=path_env)
                                                 or rest[i])
        return untrusted_argv([target, *rest[i + 1:]], depth, path_env)
    if not INTERPRETERS.fullmatch(prog):
        return None  # the arguments of other programs are their data
    for arg in rest:
        path = _as_path(arg)
        if path is None:
            continue
        try:
            st = os.stat(path)
        except OSError:
            parent = os.path.dirname(path.rstrip("/")) or "/"
            why = untrusted(parent) if os.path.isdir(parent) else None
            if why is not None:  # another user could put a script there in time
                return f"{arg} (not there yet): {why}"
            continue
        if stat.S_ISREG(st.st_mode):
            why = untrusted(path)
        elif stat.S_ISDIR(st.st_mode) and os.path.lexists(os.path.join(path, "__main__.py")):
            why = untrusted(os.path.join(path, "__main__.py"))
        else:
            continue  # a directory of data, /dev/null, a FIFO
        if why is not None:
            return f"{arg}: {why}"
    return None


# Variables that make a program load code from elsewhere: as root, the
# places they name must be root's alone too.
CODE_ENV = ("PATH", "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE",
            "PERL5LIB", "PERLLIB", "RUBYLIB", "NODE_PATH", "LUA_PATH", "LUA_CPATH",
            "LD_PRELOAD", "LD_LIBRARY_PATH", "LD_AUDIT", "GCONV_PATH", "BASH_ENV", "ENV",
            "CLASSPATH")
# Variables whose value holds options that may load code: refused as root.
CODE_OPTIONS = ("PERL5OPT", "RUBYOPT", "NODE_OPTIONS", "PYTHONINSPECT", "LUA_INIT")


def untrusted_env(env: Mapping[str, str]) -> tuple[str, str] | None:
    """(variable, why) for the first CODE_ENV variable that names a place
    another user can change (entries split at ':' and whitespace, relative
    ones from /; the places themselves, not what is inside them), or a
    CODE_OPTIONS variable that is set at all; None."""
    for key in CODE_OPTIONS:
        if env.get(key):
            return key, "it can make the program load code from anywhere; not allowed as root"
    for key in CODE_ENV:
        for entry in re.split(r"[:\s]+", env.get(key) or ""):
            path = entry if entry.startswith("/") else (f"/{entry}" if entry else "")
            if path and os.path.lexists(path):
                why = untrusted(path)
                if why is not None:
                    return key, f"{entry}: {why}"
    return None


def check_root_argv(argv: list[str] | tuple[str, ...], key: str, file: str,
                    path_env: str = DEFAULT_PATH) -> None:
    """ConfigError (exit 2) naming the path and the fix when something
    `argv` runs as root could be changed by another user."""
    why = untrusted_argv(argv, path_env=path_env)
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
