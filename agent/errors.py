"""Typed errors and the exit code of each failure class.

Library code raises; only the CLI entry point turns an error into one line and
its exit code (documented in README.md and `zdd-agent --help`).
"""

from __future__ import annotations

from enum import IntEnum


class Exit(IntEnum):
    OK = 0
    INTERNAL = 1  # a bug: an unexpected exception
    CONFIG = 2  # bad config, bad name or version, bad command-line input
    LOCKED = 3  # another swap of the same service is running
    ROLLED_BACK = 4  # the new version failed; the old one still serves
    SYSTEMD = 5  # systemd or the OS refused an operation
    DRIFT = 6  # `sysctl check`: the running values differ from the wanted ones
    NO_HISTORY = 7  # `rollback`: no previous version to go back to
    PROBLEMS = 8  # `doctor`: something needs attention
    NOT_ZERO_DOWNTIME = 9  # `verify`: a request failed or a swap did not succeed
    FAILED = 10  # the new version failed after an old instance was signalled: the old
    #              version was restarted (or could not be); requests may have failed
    DOWN = 11  # `status`: a service has no running instance


class ZddError(Exception):
    exit_code = Exit.INTERNAL

    def __init__(self, message: str, **details: object) -> None:
        super().__init__(message)
        self.details = details


class ConfigError(ZddError):
    exit_code = Exit.CONFIG


class LockedError(ZddError):
    exit_code = Exit.LOCKED


class SwapFailed(ZddError):
    exit_code = Exit.ROLLED_BACK


class SwapBroken(SwapFailed):
    """The new version failed after an old instance got its drain signal."""

    exit_code = Exit.FAILED


class SystemdError(ZddError):
    exit_code = Exit.SYSTEMD


class DriftError(ZddError):
    exit_code = Exit.DRIFT


class NoHistoryError(ZddError):
    exit_code = Exit.NO_HISTORY


class StateError(ZddError):
    """A state file could not be read; it was moved aside for a human."""

    exit_code = Exit.INTERNAL


class StateDenied(StateError):
    """The caller may not read the state (not root, not in the admin group)."""

    exit_code = Exit.CONFIG
