"""The systemd boundary: unit files on disk and the manager over D-Bus (pystemd).

As root the manager's private socket (/run/systemd/private) is used, as
systemctl does: it needs no D-Bus daemon, which a sandboxed systemd (and a
minimal host) lacks. systemctl/journalctl are run only where D-Bus offers
nothing: the journal.
"""

from __future__ import annotations

import errno
import functools
import math
import os
import select
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from .errors import SystemdError
from .fsutil import fsync_dir, write_if_changed

PRIVATE_SOCKET = Path("/run/systemd/private")
UNIT_DIR = Path(os.environ.get("ZDD_UNIT_DIR", "/etc/systemd/system"))


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class UnitState:
    name: str
    load: str  # loaded, not-found, bad-setting, ...
    active: str  # active, activating, deactivating, inactive, failed
    sub: str  # running, auto-restart, dead, ...
    result: str  # success, exit-code, signal, timeout, ...
    main_pid: int
    restarts: int
    since_us: int  # realtime usec of the last active-state change
    job: str = ""  # type of the queued job (start, stop, ...), "" when none
    exit: str = ""  # how the main process last ended (exit_description), "" if never


def exit_description(code: int, status: int) -> str:
    """ExecMainCode/ExecMainStatus in words: the code is waitid(2)'s si_code
    (CLD_EXITED 1, CLD_KILLED 2, CLD_DUMPED 3), the status an exit status or
    a signal number."""
    if code == 1:
        return f"exited {status}"
    if code in (2, 3):
        try:
            name = signal.Signals(status).name
        except ValueError:
            name = f"signal {status}"
        return f"killed by {name}" + (" (core dumped)" if code == 3 else "")
    return ""


_BUS_CLASSES: dict[str, type] = {}

# how a call fails when systemd closed the connection (daemon-reexec, a package
# upgrade's reexec) or does not listen yet: pystemd's class for the D-Bus error
# name sd-bus gives a dropped connection, or for a bare errno (negative; only
# pystemd's base class: a reply's error, e.g. NoSuchUnit, carries an errno too)
_GONE_CLASSES = frozenset({"DBusDisconnectedError", "DBusConnectionRefusedError"})
_GONE_ERRNOS = frozenset(-e for e in (errno.ECONNRESET, errno.ENOTCONN, errno.EPIPE,
                                      errno.ESHUTDOWN, errno.ECONNREFUSED))
# methods whose second sending is a second action, not the same one:
# StartTransientUnit in mode "fail" (the unit exists after the first),
# KillUnit (two signals). RestartUnit is resent: a second restart of a unit
# the first one already restarted (zdd-agent's own, at install) is harmless.
NOT_RESENT = frozenset({b"StartTransientUnit", b"KillUnit"})
# how long a re-executing systemd may take to listen again; sd_bus_call's
# own default timeout is 25 s
RECONNECT_S = 30.0
# How long a read of a stopped, watched unit that reads as never run waits
# for the PropertiesChanged with its exit: systemd may collect the unit
# (and answer the read from a fresh one) before it sends that signal
EXIT_SIGNAL_WAIT = 0.2

# org.freedesktop.systemd1(5): the names and D-Bus signatures the agent reads
# and calls without introspecting the objects first (pystemd's objects ask
# each one for its XML, about 10 ms of CPU a unit on every new connection)
DEST = b"org.freedesktop.systemd1"
MANAGER_PATH = b"/org/freedesktop/systemd1"
MANAGER = b"org.freedesktop.systemd1.Manager"
UNIT, SERVICE, SLICE = (b"org.freedesktop.systemd1.Unit", b"org.freedesktop.systemd1.Service",
                        b"org.freedesktop.systemd1.Slice")
# Manager methods by their in-signature; a method not listed goes through
# pystemd's introspected Manager (StartTransientUnit: its a(sv) properties)
MANAGER_METHODS = {
    "Reload": "", "StartUnit": "ss", "RestartUnit": "ss", "StopUnit": "ss", "GetUnit": "s",
    "LoadUnit": "s", "ResetFailedUnit": "s", "EnableUnitFiles": "asbb",
    "DisableUnitFiles": "asb", "GetUnitFileState": "s", "ListJobs": "",
    "ListUnitsByPatterns": "asas", "KillUnit": "ssi", "Subscribe": ""}


@functools.lru_cache(maxsize=1024)
def unit_path(unit: str) -> bytes:
    """The unit's D-Bus object path (systemd's unit_dbus_path(): each byte
    but ASCII letters, and digits after the first, as _xx in hex). A Get on
    it loads the unit as LoadUnit would (systemd's find_unit)."""
    out = []
    for i, b in enumerate(unit.encode()):
        if (65 <= b <= 90) or (97 <= b <= 122) or (i > 0 and 48 <= b <= 57):
            out.append(chr(b))
        else:
            out.append(f"_{b:02x}")
    return b"/org/freedesktop/systemd1/unit/" + "".join(out or ["_"]).encode()


def _gone(e: BaseException, opening: bool = False) -> bool:
    """Whether `e` says the connection is gone (not what systemd answered);
    opening: also a socket that is not there (ENOENT while systemd binds it
    again), which only connecting can meet."""
    name = type(e).__name__
    return (name in _GONE_CLASSES
            or (name == "DBusBaseError" and getattr(e, "errno", None) in _GONE_ERRNOS)
            or (opening and name == "DBusFileNotFoundError"))


def bus_class(name: str) -> type:
    """pystemd.dbuslib's `name` (DBus, DBusAddress) whose method calls,
    property reads and signal matches (on the system bus an AddMatch call)

    - hold the agent's signals back until the reply came
      (signals.deferred): sd_bus_call would otherwise fail with EINTR when
      one arrives, after systemd got the request;
    - survive systemd re-executing: it closes every connection of its
      private socket and listens again when it has deserialized its state
      (systemctl daemon-reexec, the upgrade of the systemd package). The
      call is sent again on a new connection, opened within RECONNECT_S
      seconds; reads and jobs in mode "replace" are the same request twice,
      the calls in NOT_RESENT are not sent again.
    Errors: pystemd's DBus*Error."""
    if name not in _BUS_CLASSES:
        from pystemd import dbuslib

        from . import signals

        base = getattr(dbuslib, name)

        def call_once(method: Any, self: Any, args: tuple, kwargs: dict) -> Any:
            previous = signals.block()
            try:
                return method(self, *args, **kwargs)
            finally:
                signals.restore(previous)

        def open_(self: Any) -> None:
            # signal matches belong to a connection: Systemd._watch adds
            # them again when this count moved
            self.opens = getattr(self, "opens", 0) + 1
            if base is dbuslib.DBusAddress:
                # sd_bus_new() stored the new object before the connection
                # could fail: it is this instance's to free
                self._live = True
                call_once(base.open, self, (), {})
            else:
                # sd_bus_open_system() frees its object when it fails and
                # leaves the field as it was (freed by the last close())
                call_once(base.open, self, (), {})
                self._live = True

        def close(self: Any) -> None:
            """sd_bus_close + unref once per open(): pystemd keeps the freed
            pointer, and a second unref would free it again."""
            if getattr(self, "_live", False):
                self._live = False
                base.close(self)

        def reopen(self: Any, deadline: float) -> None:
            """A new connection in place of the broken one, tried until the
            deadline (time.monotonic())."""
            while True:
                close(self)
                try:
                    open_(self)
                    return
                except Exception as e:
                    if not _gone(e, opening=True) or time.monotonic() > deadline:
                        raise
                time.sleep(0.05)

        def surviving(method: Any, resend: Any) -> Any:
            def call(self: Any, *args: Any, **kwargs: Any) -> Any:
                deadline = time.monotonic() + RECONNECT_S
                while True:
                    try:
                        return call_once(method, self, args, kwargs)
                    except Exception as e:
                        if not _gone(e) or not resend(args) or time.monotonic() > deadline:
                            raise
                    reopen(self, deadline)
            return call

        Bus = type(f"Deferring{name}", (base,), {
            "open": open_, "close": close,
            # no resend: a match belongs to the connection; Systemd._watch
            # adds them all again on a new one
            "match_signal": lambda self, *a, **kw: call_once(base.match_signal, self, a, kw),
            "call_method": surviving(base.call_method, lambda a: a[3] not in NOT_RESENT),
            "get_property": surviving(base.get_property, lambda a: True)})
        _BUS_CLASSES[name] = Bus
    return _BUS_CLASSES[name]


class Systemd:
    """A connection to the system manager; use as a context manager."""

    def __init__(self, unit_dir: Path = UNIT_DIR) -> None:
        self.unit_dir = unit_dir
        self._bus: Any = None
        self._manager: Any = None  # pystemd's Manager, introspected on first use
        self._version = ""
        self._private = False  # systemd's private socket (root), else the system bus
        # _watch: the object paths whose PropertiesChanged are matched on
        # this connection (before a start or a stop, or at wait_change), the
        # connection's open count they belong to, and a count of the signals
        # seen (pystemd keeps no reference to the callback: this object
        # holds it)
        self._watched: set[bytes] = set()
        self._watch_opens = 0
        self._reconnected = False  # _watch saw a new connection: wait_change's news
        self._changes = 0
        # object path -> how its main process last ended, as the signal told
        # it: systemd collects a stopped instance nothing refers to before it
        # sends the signal, and a read after that finds a fresh unit
        self._exits: dict[bytes, str] = {}

        def on_change(msg: Any, error: Any = None, userdata: Any = None) -> None:
            self._changes += 1
            try:
                msg.process_reply(False)
                _iface, changed, _gone_props = msg.body
                code = changed.get(b"ExecMainCode")
                if code:
                    self._exits[msg.get_path()] = exit_description(
                        int(code), int(changed.get(b"ExecMainStatus", 0)))
            except Exception:  # a wake-up all the same
                pass

        self._on_change = on_change
        self._units: dict[str, Any] = {}  # name -> pystemd Unit, introspected once

    def __enter__(self) -> Systemd:
        try:
            self._private = os.geteuid() == 0 and PRIVATE_SOCKET.exists()
            if self._private:
                self._bus = bus_class("DBusAddress")(f"unix:path={PRIVATE_SOCKET}".encode(),
                                                     peer_to_peer=True)
            else:
                self._bus = bus_class("DBus")()
            self._bus.open()
            # one round trip proves the connection (and the version is cheap)
            self._version = _s(self._bus.get_property(DEST, MANAGER_PATH, MANAGER,
                                                      b"Version", b"s"))
        except Exception as e:
            if self._bus is not None:
                self._bus.close()  # once per open(): bus_class
                self._bus = None
            hint = "" if PRIVATE_SOCKET.exists() else (
                f" (no {PRIVATE_SOCKET}: is systemd this host's init, and are you root?)")
            raise SystemdError(f"cannot connect to systemd: {e}{hint}") from e
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._bus is not None:
            self._bus.close()
            self._bus = None
            self._units.clear()
            self._manager = None
            self._watched.clear()
            self._watch_opens = 0
            self._reconnected = False

    @property
    def manager(self) -> Any:
        """pystemd's Manager object, introspected once per connection: for
        the methods MANAGER_METHODS does not list and the manager's
        properties by name."""
        if self._manager is None:
            from pystemd.systemd1 import Manager

            m = Manager(bus=self._bus)
            m.load()
            self._manager = m
        return self._manager

    def _method(self, name: str, *args: Any) -> Any:
        """A Manager method's reply body, called with the signature
        MANAGER_METHODS gives (strings as str or bytes)."""
        from pystemd.dbuslib import apply_signature

        sig = MANAGER_METHODS.get(name)
        if sig is None:
            return getattr(self.manager.Manager, name)(*args)
        return self._bus.call_method(DEST, MANAGER_PATH, MANAGER, name.encode(),
                                     apply_signature(sig.encode(), list(args))).body

    def _call(self, what: str, fn: Any, *args: Any) -> Any:
        """fn(*args), a Manager method given by name or a callable; its
        error as SystemdError("what: ..."). (A connection systemd closed
        as it re-executed is replaced underneath: bus_class.)"""
        try:
            return self._method(fn, *args) if isinstance(fn, str) else fn(*args)
        except Exception as e:
            msg = _s(getattr(e, "args", [e])[0]) if e.args else e
            raise SystemdError(f"{what}: {msg}") from e

    def wait_change(self, units: list[str], timeout: float) -> bool:
        """Wait up to `timeout` seconds for systemd to announce a change of
        one of `units` (PropertiesChanged on its object path,
        org.freedesktop.systemd1(5): systemd sends its signals to every
        connection of its private socket). True when one came or may have
        (the connection was replaced, a signal interrupted the wait), False
        at the timeout. A wake-up: the caller reads the state again, as the
        signal is sent after systemd's own dispatch; only a main process's
        exit is kept from it (state(): systemd may have collected the unit
        by then). The signals about other units are read and dropped on the
        way: left unread they would pile up on the connection."""
        deadline = time.monotonic() + timeout
        try:
            self._watch(units)
            changed, self._reconnected = self._reconnected, False
            changed = self._read_signals() or changed
            if not changed:
                changed = self._pump(deadline, lambda news: news)
        except Exception as e:
            if not _gone(e) and getattr(e, "errno", None) != -errno.EINTR:
                raise
            self._reconnected = False  # this True says it
            return True  # the next read reconnects (bus_class)
        return changed

    def _watch(self, units: list[str]) -> None:
        """Match the PropertiesChanged signals of `units` on this connection
        (once per unit and connection), so that a change from now on is
        seen, an exit too (state()). Before a start or a stop, not after:
        a unit that ends at once and that nothing refers to is collected
        with its exit. A replaced connection lost its matches and the
        signals sent meanwhile: noted for wait_change as news."""
        bus = self._bus
        if getattr(bus, "opens", 0) != self._watch_opens:
            self._watched.clear()
            if not self._private:
                # on the system bus systemd signals only its subscribers
                # (its private socket's connections get every signal)
                try:
                    self._method("Subscribe")
                except Exception:  # AlreadySubscribed; else the waits time out
                    pass
            # after Subscribe, which may itself have reconnected: the
            # matches below belong to this connection
            self._watch_opens = getattr(bus, "opens", 0)
            self._reconnected = self._reconnected or self._watch_opens > 1
        for unit in units:
            path = unit_path(unit)
            if path not in self._watched:
                bus.match_signal(None, path, b"org.freedesktop.DBus.Properties",
                                 b"PropertiesChanged", self._on_change)
                self._watched.add(path)

    def _pump(self, deadline: float, done: Callable[[bool], bool]) -> bool:
        """Read the signals that come until done(news so far) or the
        monotonic deadline; whether a watched unit changed (or may have:
        True at once when the connection closed, a re-exec: the next read
        reconnects). poll(2) on the connection's socket, not pystemd's
        sd_bus_wait, which keeps the GIL (the daemon's other threads) for
        the wait; the queue is read before, so what comes next is on the
        socket. Other units' signals wake it too: it waits on."""
        poller = select.poll()
        poller.register(self._bus.get_fd(), select.POLLIN)
        news = False
        while not done(news) and (left := deadline - time.monotonic()) > 0:
            events = poller.poll(max(1, math.ceil(left * 1000)))
            news = self._read_signals() or news
            if any(ev & (select.POLLHUP | select.POLLERR) for _fd, ev in events):
                return True
        return news

    def _read_signals(self) -> bool:
        """Process what the connection holds (sd_bus_process); True if a
        watched unit changed. Bounded: a storm of signals is read at the
        next wait."""
        before = self._changes
        for _ in range(4096):
            seen = self._changes
            if self._bus.process().is_empty() and self._changes == seen:
                break
        else:
            return True  # more queued than read: one of them may be ours
        return self._changes != before

    def _get(self, unit: str, iface: bytes, prop: str, sig: bytes) -> Any:
        """One property of the unit's object (org.freedesktop.systemd1(5)
        gives each one's signature); SystemdError when it cannot be read."""
        try:
            return self._bus.get_property(DEST, unit_path(unit), iface, prop.encode(), sig)
        except Exception as e:
            msg = _s(e.args[0]) if e.args else e
            raise SystemdError(f"cannot read {prop} of {unit}: {msg}") from e

    # ------------------------------------------------------------ unit files

    def write_unit_files(self, files: dict[str, str]) -> list[str]:
        """Write the files that changed; return their names (relative paths)."""
        changed = [rel for rel, content in files.items()
                   if write_if_changed(self.unit_dir / rel, content)]
        return changed

    def remove_unit_file(self, rel: str) -> bool:
        path = self.unit_dir / rel
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        try:
            path.parent.rmdir() if path.parent != self.unit_dir else None
        except OSError:
            pass
        fsync_dir(self.unit_dir)
        return True

    def read_unit_file(self, rel: str) -> str | None:
        try:
            return (self.unit_dir / rel).read_text()
        except FileNotFoundError:
            return None

    # --------------------------------------------------------------- manager

    def reload(self) -> None:
        self._call("daemon-reload", "Reload")

    def reload_for(self, unit: str, dropin: str, present: bool) -> bool:
        """daemon-reload only if `unit` needs it after the agent wrote
        (`present`) or removed its drop-in `dropin` (relative to unit_dir).
        A unit systemd has not loaded is loaded now, from the files as they
        are, and needs none: a new instance's drop-in thus costs no reload
        of every unit on the host (100-250 ms here, issue 16). Reloaded
        when systemd says the unit needs it (NeedDaemonReload: a drop-in
        changed since it was loaded) or when its DropInPaths disagree with
        the disk: systemd finds drop-in directories through a cache rebuilt
        when its unit directories' mtimes change, and two directories made
        within one coarse timestamp tick would leave the second unseen; on
        systemd < 257 NeedDaemonReload also misses a new drop-in directory
        of a loaded unit (systemd#31752). Whether it reloaded."""
        path = str(self.unit_dir / dropin)
        need = bool(self._get(unit, UNIT, "NeedDaemonReload", b"b"))
        listed = {_s(p) for p in self._get(unit, UNIT, "DropInPaths", b"as")}
        if not need and (path in listed) == present:
            return False
        self.reload()
        return True

    def start(self, unit: str) -> None:
        self._starting(unit)
        self._call(f"cannot start {unit}", "StartUnit",
                   unit.encode(), b"replace")

    def restart(self, unit: str) -> None:
        self._starting(unit)
        self._call(f"cannot restart {unit}", "RestartUnit",
                   unit.encode(), b"replace")

    def _starting(self, unit: str) -> None:
        self._exits.pop(unit_path(unit), None)  # an earlier life's exit is not this one's
        self._watch_quietly(unit)

    def _watch_quietly(self, unit: str) -> None:
        """_watch(unit), if the connection allows; a wait_change later
        tries again and says why it cannot."""
        try:
            self._watch([unit])
        except Exception:
            pass

    def stop(self, unit: str) -> None:
        """Queue a stop job; a unit systemd has not loaded is not running."""
        try:
            self._method("GetUnit", unit)
        except Exception:
            return  # NoSuchUnit: never loaded (e.g. its drop-in was never written)
        self._watch_quietly(unit)
        self._call(f"cannot stop {unit}", "StopUnit",
                   unit.encode(), b"replace")

    def wait_stopped(self, unit: str, timeout: float) -> bool:
        """Until the unit is inactive or failed with no job queued."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.state(unit)
            if st.active in ("inactive", "failed") and not st.job:
                return True
            time.sleep(0.1)
        return False

    def reset_failed(self, unit: str) -> None:
        try:
            self._method("ResetFailedUnit", unit)
        except Exception:
            pass  # not loaded or not failed: nothing to reset

    def enable(self, unit: str) -> None:
        self._call(f"cannot enable {unit}", "EnableUnitFiles",
                   [unit.encode()], False, True)

    def disable(self, unit: str) -> None:
        self._call(f"cannot disable {unit}", "DisableUnitFiles",
                   [unit.encode()], False)

    def is_enabled(self, unit: str) -> str:
        try:
            return _s(self._method("GetUnitFileState", unit))
        except Exception:
            return "not-found"

    def _unit(self, unit: str) -> Any:
        """The unit's D-Bus object. LoadUnit each time (systemd may have
        collected it since); the introspection, which costs ~10 ms a unit,
        once per connection (a unit's interfaces do not change)."""
        from pystemd.systemd1 import Unit

        path = self._call(f"cannot load {unit}", "LoadUnit", unit.encode())
        u = self._units.get(unit)
        if u is None or u.path != path:
            u = Unit(unit.encode(), bus=self._bus)
            u.path = path
            self._call(f"cannot introspect {unit}", u.load)
            self._units[unit] = u
        return u

    def state(self, unit: str) -> UnitState:
        """The unit's state in ten property reads on its object path."""
        get = self._get
        # The job first, then the state: read the other way round, a start
        # job that ends in between (Type=exec starts in a few ms) looks like
        # "inactive, no job": an instance that exited during start-up.
        job = self._job_type(unit) if get(unit, UNIT, "Job", b"(uo)")[0] else ""
        load = _s(get(unit, UNIT, "LoadState", b"s"))
        svc = unit.endswith(".service") and load == "loaded"
        active = _s(get(unit, UNIT, "ActiveState", b"s"))
        return UnitState(
            name=unit, load=load, active=active, sub=_s(get(unit, UNIT, "SubState", b"s")),
            result=_s(get(unit, SERVICE, "Result", b"s")) if svc else "",
            main_pid=int(get(unit, SERVICE, "MainPID", b"u")) if svc else 0,
            restarts=int(get(unit, SERVICE, "NRestarts", b"u")) if svc else 0,
            since_us=int(get(unit, UNIT, "StateChangeTimestamp", b"t")), job=job,
            exit=self._exit(unit, active, job, exit_description(
                int(get(unit, SERVICE, "ExecMainCode", b"i")),
                int(get(unit, SERVICE, "ExecMainStatus", b"i"))) if svc else ""))

    def _exit(self, unit: str, active: str, job: str, read: str) -> str:
        """How the main process last ended: as read, or, for a stopped unit
        with no job that reads as never run (or not found: a transient one),
        as its last PropertiesChanged said (_watch): systemd had
        collected it before the agent read it. systemd collects a unit before
        it sends the signal that carries the exit (measured: a read can be
        answered by the fresh unit first), so a watched unit's read waits for
        that signal, EXIT_SIGNAL_WAIT at most."""
        if read or job or active not in ("inactive", "failed") \
                or not unit.endswith(".service"):
            return read
        path = unit_path(unit)
        if path in self._watched and path not in self._exits:
            deadline = time.monotonic() + EXIT_SIGNAL_WAIT
            try:
                self._read_signals()  # it may have come during this read
                self._pump(deadline, lambda _news: path in self._exits)
            except Exception:  # the exit stays unknown
                pass
        return self._exits.get(path, "")

    def _job_type(self, unit: str) -> str:
        for _id, name, jtype, _state, _job, _unit in self._call(
                "cannot list jobs", "ListJobs"):
            if _s(name) == unit:
                return _s(jtype)
        return ""

    def run_transient(self, unit: str, argv: list[str], *, user: str | None,
                      env: dict[str, str], timeout: float,
                      description: str = "",
                      extra: dict[bytes, Any] | None = None) -> tuple[bool, str]:
        """Run `argv` as a transient Type=oneshot service (systemd-run
        --wait; StartTransientUnit, org.freedesktop.systemd1(5)) and wait:
        as `user` (None: root), with `env`, its output in the journal under
        the unit's name, and the whole cgroup killed at `timeout` seconds
        (TimeoutStartSec of a oneshot). (ok, "exit N <last output line>") or
        (False, "timed out after Ns"); the unit is gone afterwards.
        SystemdError when systemd refuses to start it."""
        from pystemd.utils import x2cmdlist

        props: dict[bytes, Any] = {
            b"Description": (description or f"zdd-agent: {argv[0]}").encode(),
            b"Type": b"oneshot",
            b"RemainAfterExit": True,  # keeps ExecMainStatus until we read it
            b"ExecStart": x2cmdlist(argv, False),
            b"Environment": [f"{k}={v}".encode() for k, v in env.items()],
            b"TimeoutStartUSec": max(1, int(timeout * 1e6)),
            b"StandardInput": b"null",
            b"StandardOutput": b"journal",
            b"StandardError": b"journal",
        }
        if user is not None:
            props[b"User"] = user.encode()
        props.update(extra or {})  # Group, EnvironmentFiles, WorkingDirectory...
        deadline = time.monotonic() + timeout + 10
        try:
            # inside the try: a connection lost after systemd took the call
            # (re-executing) leaves a unit that the finally stops
            self._call(f"cannot start {unit}", "StartTransientUnit", unit.encode(), b"fail",
                       props)
            while True:
                active = _s(self._get(unit, UNIT, "ActiveState", b"s"))
                if (active in ("active", "failed", "inactive")
                        and not self._get(unit, UNIT, "Job", b"(uo)")[0]):
                    break
                if time.monotonic() > deadline:
                    return False, f"timed out after {timeout:g}s (systemd did not end it)"
                time.sleep(0.02)
            result = _s(self._get(unit, SERVICE, "Result", b"s"))
            code = int(self._get(unit, SERVICE, "ExecMainStatus", b"i"))
            tail = journal_tail(unit, 1, own=True) or [""]
            if result == "timeout":
                return False, f"timed out after {timeout:g}s"
            ok = active == "active" and result == "success" and code == 0
            return ok, f"exit {code} {tail[0]}".strip()
        finally:
            try:
                self._method("StopUnit", unit, "replace")
            except Exception:
                pass
            self.reset_failed(unit)

    def processes(self, unit: str) -> list[int]:
        """The PIDs in the unit's cgroup ([] when it is not running).

        systemd's GetProcesses fails (EIO) when the cgroup also holds
        processes outside this PID namespace (cgroup.procs lists them as 0:
        seen with several sandboxed systemds sharing one cgroup hierarchy);
        the cgroup's own cgroup.procs is read then, without those.
        SystemdError when neither tells: an instance whose processes cannot
        be listed is not an instance without processes."""
        if _s(self._get(unit, UNIT, "ActiveState", b"s")) in ("inactive", "failed"):
            return []
        try:
            procs = self._bus.call_method(DEST, unit_path(unit), SERVICE, b"GetProcesses",
                                          []).body
            return sorted({int(pid) for _cg, pid, _cmd in procs})
        except Exception as e:
            pids = _cgroup_pids(_s(self._get(unit, SERVICE, "ControlGroup", b"s")))
            if pids is None:
                raise SystemdError(f"cannot list the processes of {unit}: {e}") from e
            return pids

    def memory_current(self, unit: str) -> int | None:
        """The unit's cgroup memory (page cache included, as the OOM killer
        counts it); None without memory accounting."""
        try:
            value = int(self._get(unit, SERVICE, "MemoryCurrent", b"t"))
        except Exception:
            return None
        return None if value >= 2**64 - 1 else value

    def memory_peak(self, unit: str) -> int | None:
        """The most memory the unit's cgroup has held since it started
        (cgroup v2 memory.peak, Linux 5.19+; v1 memory.max_usage_in_bytes):
        an instance's start-up peak, which memory.current no longer shows.
        None where neither can be read."""
        try:
            cg = _s(self._get(unit, SERVICE, "ControlGroup", b"s"))
        except Exception:
            return None
        return cgroup_memory(cg, "memory.peak", "memory.max_usage_in_bytes")

    def slice_room(self, unit: str) -> int | None:
        """Bytes a slice may still take before its MemoryMax= (MemoryMax
        minus MemoryCurrent); None without a limit or accounting."""
        try:
            limit = int(self._get(unit, SLICE, "MemoryMax", b"t"))
            current = int(self._get(unit, SLICE, "MemoryCurrent", b"t"))
        except Exception:
            return None
        if limit >= 2**64 - 1 or current >= 2**64 - 1:
            return None
        return max(0, limit - current)

    def main_start_monotonic(self, unit: str) -> int:
        """CLOCK_MONOTONIC microseconds when the unit's main process last started."""
        try:
            return int(self._get(unit, SERVICE, "ExecMainStartTimestampMonotonic", b"t"))
        except Exception:
            return 0

    def version(self) -> int | None:
        """systemd's major version ("252.38-1~deb12u1" -> 252)."""
        import re

        m = re.match(r"\d+", self._version)
        return int(m.group()) if m else None

    def list_units(self, pattern: str) -> list[str]:
        """Loaded units matching a glob, e.g. 'zdd-api@*.service'."""
        units = self._call("cannot list units", "ListUnitsByPatterns",
                           [], [pattern.encode()])
        return sorted(_s(u[0]) for u in units)

    def manager_property(self, name: str) -> Any:
        """A property of the manager (org.freedesktop.systemd1.Manager,
        org.freedesktop.systemd1(5)), e.g. "DefaultLimitNOFILE", as pystemd
        decodes it (bytes for strings). SystemdError when it cannot be read."""
        try:
            return getattr(self.manager.Manager, name)
        except Exception as e:
            raise SystemdError(f"cannot read the manager's {name}: {e}") from e



def _cgroup_pids(path: str) -> list[int] | None:
    """The processes in a cgroup of systemd's hierarchy (v2, or v1 name=systemd),
    those of other PID namespaces (0) left out; None if it cannot be read."""
    if not path:
        return None
    for base in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified", "/sys/fs/cgroup/systemd"):
        try:
            with open(f"{base}{path}/cgroup.procs") as f:
                return sorted({int(x) for x in f.read().split() if int(x)})
        except (OSError, ValueError):
            continue
    return None


def cgroup_memory(path: str, v2: str, v1: str) -> int | None:
    """A memory controller file of a cgroup of systemd's hierarchy: `v2` on
    the unified hierarchy, `v1` on the legacy memory controller (hybrid
    hosts: systemd.special(7)); None if neither can be read."""
    if not path:
        return None
    for name in (f"/sys/fs/cgroup{path}/{v2}", f"/sys/fs/cgroup/memory{path}/{v1}"):
        try:
            with open(name) as f:
                return int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return None


def journal_tail(unit: str, lines: int = 20, own: bool = False) -> list[str]:
    """The unit's last log lines (journalctl: the journal has no D-Bus API);
    `own`: only what its processes wrote, not systemd's lines about it."""
    match = [f"_SYSTEMD_UNIT={unit}"] if own else ["-u", unit]
    try:
        r = subprocess.run(["journalctl", "--no-pager", "-o", "cat", "-n", str(lines), *match],
                           capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [ln for ln in r.stdout.splitlines() if ln.strip()][-lines:]
