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

# the asynchronous signals a Python program may catch; never the synchronous
# ones (SIGSEGV, SIGBUS, ...), whose blocking the kernel overrides
DEFERRED = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT,
                      signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM, signal.SIGCHLD,
                      signal.SIGWINCH})


@contextmanager
def deferred() -> Iterator[None]:
    """Block DEFERRED in this thread for the body; a signal that came
    meanwhile is delivered (its handler runs) as the block ends."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, DEFERRED)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
