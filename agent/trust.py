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


def untrusted(path: str) -> str | None:
    """Why `path` may be changed by someone other than root, or None.

    Checks the resolved file, then each ancestor directory to /: owner uid 0
    and no write bit for group or others (a sticky directory such as /tmp is
    refused too: another user may own the entry's name before root does)."""
    real = os.path.realpath(path)
    here = real
    while True:
        try:
            st = os.stat(here)
        except OSError as e:
            return f"{here}: {e.strerror}"
        what = "the file" if here == real else "directory"
        if st.st_uid != 0:
            return f"{what} {here} is owned by uid {st.st_uid}, not root"
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return (f"{what} {here} is writable by group or others "
                    f"(mode {stat.S_IMODE(st.st_mode):04o})")
        if here == "/":
            return None
        here = os.path.dirname(here)


def check_root_executable(path: str, key: str, file: str) -> None:
    """ConfigError (exit 2) naming `path` and the fix when `path`, run as
    root, could be changed by another user."""
    why = untrusted(path)
    if why is not None:
        raise ConfigError(f"{file}: {key}: {path} runs as root, but {why}: only root may "
                          f"be able to change it (chown root; chmod go-w; as sshd's "
                          f"StrictModes)", file=file, key=key)
