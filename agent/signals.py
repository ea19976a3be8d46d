"""Signals held back while the agent waits on a peer that already has its request.

The agent's own handlers (a --local swap's SIGINT/SIGTERM, the daemon's
SIGTERM/SIGHUP) only set a flag, but the signal still interrupts the system
call the process is blocked in. Python retries its own calls (PEP 475); C
libraries do not: sd_bus_call(3) returns -EINTR (pystemd's
DBusInterruptedError) after its message was sent, and libnftables reports a
failure for a batch the kernel may have committed. Neither can simply be sent
again (KillUnit twice is two signals), so these signals are blocked for the
call's length (pthread_sigmask(2)) and delivered the moment it returns.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager

# signal.pthread_sigmask's C function: the wrapper turns each returned mask
# into a set of Signals enums, 8 us where this takes 1.7 (a swap makes
# hundreds of D-Bus calls)
from _signal import pthread_sigmask as _sigmask

# the asynchronous signals a Python program may catch; never the synchronous
# ones (SIGSEGV, SIGBUS, ...), whose blocking the kernel overrides
DEFERRED = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT,
                      signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM, signal.SIGCHLD,
                      signal.SIGWINCH})


def block() -> set[int]:
    """Block DEFERRED in this thread; the mask before, for restore()."""
    return _sigmask(signal.SIG_BLOCK, DEFERRED)


def restore(previous: set[int]) -> None:
    """Put back the mask block() returned; a signal that came meanwhile is
    delivered (its handler runs) now."""
    _sigmask(signal.SIG_SETMASK, previous)


@contextmanager
def deferred() -> Iterator[None]:
    """block() for the body, restore() after it."""
    previous = block()
    try:
        yield
    finally:
        restore(previous)
