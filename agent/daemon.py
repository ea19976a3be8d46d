"""`zdd-agent daemon`: the long-running root agent.

- Type=notify: READY=1 once the control socket serves; WATCHDOG=1 from the
  main loop, only while the control loop is alive too (a hung control loop
  stops the pings and systemd restarts the daemon).
- At start: reconcile every service's state with systemd (finish or revert a
  swap a dead agent left behind), then apply the configured sysctls.
- The control socket (inherited from zdd-agent.socket, or bound) speaks
  protocol.py. One selector thread reads requests with a size limit and a
  deadline, so a slow, idle, oversized or malformed client costs a buffer and
  never blocks it; each complete request runs in a worker thread. Callers are
  identified by SO_PEERCRED: root and members of the admin group may change
  things and read the history, anyone who can connect may ask for status.
  Every refusal is logged.
- Signal handlers only queue the signal; the main loop acts on it.
"""

from __future__ import annotations

import dataclasses
import gc
import grp
import os
import pwd
import queue
import selectors
import signal
import socket
import struct
import syslog
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import commands, deploy, protocol, units
from .config import AgentConfig, load_agent_config, load_all
from .defaults import CONTROL_SOCKET
from .errors import LockedError, SwapFailed, ZddError
from .log import SwapLogger, log
from .metrics import Metrics, parse_listen
from .sd import listen_fds
from .sd import notify as sd_notify
from .state import StateStore, secure_state_dir
from .errors import StateError

READ_DEADLINE = 5.0  # seconds a client has to send its whole request
STOP_GRACE = 2.0  # seconds the accepted clients have to send theirs when the daemon stops
MAX_CLIENTS = 256  # connections being read at once; beyond it the oldest is closed
MAX_CLIENTS_PER_UID = 64  # of those, one user's; beyond it that user's oldest is closed
# Requests being executed at once; more get a "busy" error. Root and the
# admin group have slots of their own: other local users (read-only: status,
# ping...) share theirs, at most MAX_WORKERS_PER_UID each, and can never
# take an admin's.
MAX_ADMIN_WORKERS = 16
MAX_OTHER_WORKERS = 16
MAX_WORKERS_PER_UID = 4
# Recovery of interrupted swaps runs before READY=1 (a half-done swap is
# finished or reverted before new requests come) and may wait out a drain's
# grace period, longer than the unit's start timeout: while it runs, the
# daemon asks systemd for more time (EXTEND_TIMEOUT_USEC, sd_notify(3)),
# EXTEND_BY at a time every EXTEND_EVERY, for as long as the services' own
# limits allow (recovery_limit), at least RECOVERY_LIMIT.
EXTEND_BY = 30.0
EXTEND_EVERY = 5.0
RECOVERY_LIMIT = 900.0
GC_EVERY = 10.0  # seconds between two full collections after other users' requests
ADMIN_CACHE = 30.0  # seconds a caller's admin-group membership is remembered
REFUSAL_LOG_EVERY = 10.0  # seconds: one refusal line per user and kind, the rest counted
WRITE_TIMEOUT = 10.0  # a client that stops reading is dropped (the work goes on)
REFRESH = 15.0  # seconds between metric refreshes (connections, sysctl drift)


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int

    @property
    def user(self) -> str:
        try:
            return pwd.getpwuid(self.uid).pw_name
        except KeyError:
            return str(self.uid)


def peer_of(conn: socket.socket) -> Peer:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", creds)
    return Peer(pid, uid, gid)


def may_change(peer: Peer, admin_group: str) -> bool:
    """Root, or a member of the admin group (primary or supplementary)."""
    if peer.uid == 0:
        return True
    try:
        gid = grp.getgrnam(admin_group).gr_gid
    except KeyError:
        return False  # no such group on this host: root only
    if peer.gid == gid:
        return True
    try:
        pw = pwd.getpwuid(peer.uid)
    except KeyError:
        return False
    return gid in os.getgrouplist(pw.pw_name, pw.pw_gid)


class Throttle:
    """Refusals logged at most once per `every` seconds per (user, kind); the
    line after a quiet spell says how many were not logged. A local user who
    storms the socket cannot flood the journal."""

    def __init__(self, every: float = REFUSAL_LOG_EVERY,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.every, self.clock = every, clock
        self.last: dict[tuple[int, str], float] = {}
        self.skipped: dict[tuple[int, str], int] = {}
        self.lock = threading.Lock()

    def log(self, peer: Peer, kind: str, message: str, priority: int) -> bool:
        """True when the line was logged."""
        key = (peer.uid, kind)
        with self.lock:
            now = self.clock()
            if now - self.last.get(key, -self.every) < self.every:
                self.skipped[key] = self.skipped.get(key, 0) + 1
                return False
            self.last[key] = now
            more = self.skipped.pop(key, 0)
            if len(self.last) > 4096:  # forget quiet users; bounded memory
                self.last = {k: t for k, t in self.last.items() if now - t < self.every}
        if more:
            message += f" ({more} more like it from uid {peer.uid} not logged)"
        log("refused", message, priority, USER=peer.user)
        return True


class Budget:
    """Execution slots: MAX_ADMIN_WORKERS for root and the admin group,
    MAX_OTHER_WORKERS shared by other users, MAX_WORKERS_PER_UID each."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.admin = 0
        self.others: dict[int, int] = {}

    def take(self, uid: int, admin: bool) -> str | None:
        """None when a slot was taken (give it back with `give`), else why not."""
        with self.lock:
            if admin:
                if self.admin >= MAX_ADMIN_WORKERS:
                    return f"{MAX_ADMIN_WORKERS} requests of root and the admin group are running"
                self.admin += 1
                return None
            if self.others.get(uid, 0) >= MAX_WORKERS_PER_UID:
                return f"{MAX_WORKERS_PER_UID} requests of uid {uid} are running"
            if sum(self.others.values()) >= MAX_OTHER_WORKERS:
                return f"{MAX_OTHER_WORKERS} requests of other users are running"
            self.others[uid] = self.others.get(uid, 0) + 1
            return None

    def give(self, uid: int, admin: bool) -> None:
        with self.lock:
            if admin:
                self.admin -= 1
            elif self.others.get(uid, 0) > 1:
                self.others[uid] -= 1
            else:
                self.others.pop(uid, None)


def redact(cmd: str, out: Any) -> Any:
    """What a caller outside root and the admin group gets of a read-only
    answer: a swap's reason may quote a hook's output or a service's journal
    (the state directory keeps them from other users, and `history` is
    admin-only): `status` keeps the last swap's result, versions and times."""
    if cmd != "status" or not isinstance(out, list):
        return out
    for row in out:
        last = row.get("last_swap") if isinstance(row, dict) else None
        if isinstance(last, dict) and last.get("reason"):
            last["reason"] = "(root and the admin group may read it: zdd-agent history)"
    return out


def bind_socket(path: Path) -> socket.socket:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    s.bind(str(path))
    os.chmod(path, 0o666)  # anyone may connect; SO_PEERCRED decides what they may do
    s.listen(128)
    return s


@dataclass
class _Client:
    conn: socket.socket
    peer: Peer
    deadline: float
    buf: bytearray = field(default_factory=bytearray)


class ControlServer:
    """Reads requests without ever blocking; hands complete ones to `dispatch`."""

    def __init__(self, sock: socket.socket,
                 dispatch: Callable[[socket.socket, Peer, bytes], None],
                 throttle: Throttle | None = None) -> None:
        self.sock = sock
        self.dispatch = dispatch
        self.throttle = throttle or Throttle()
        self.sel = selectors.DefaultSelector()
        self.clients: dict[int, _Client] = {}
        self.heartbeat = time.monotonic()
        self.stopping = threading.Event()

    def run(self) -> None:
        """Serve until `stopping`; then accept no more (the connections that
        come wait in the socket's queue, which systemd holds, for the next
        daemon) and serve the clients already accepted, STOP_GRACE seconds at
        most: closed unread, a request sent during a restart (an upgrade)
        was reset."""
        self.sock.setblocking(False)
        self.sel.register(self.sock, selectors.EVENT_READ)
        while not self.stopping.is_set():
            self.heartbeat = time.monotonic()
            self.handle(self.sel.select(timeout=0.5))
            self._expire()
        self.sel.unregister(self.sock)
        end = time.monotonic() + STOP_GRACE
        while self.clients and (left := end - time.monotonic()) > 0:
            self.handle(self.sel.select(timeout=min(left, 0.5)))
            self._expire()
        for c in list(self.clients.values()):
            self._drop(c)

    def _expire(self) -> None:
        now = time.monotonic()
        for c in [c for c in self.clients.values() if c.deadline < now]:
            self._refuse(c, "request not received within "
                            f"{READ_DEADLINE:g}s", quiet=True)

    def handle(self, events: list[tuple[selectors.SelectorKey, int]]) -> None:
        """One select round. A client evicted by _accept earlier in the same
        round is gone from `clients`: its event is stale and skipped (a
        KeyError here once killed the control thread, and the watchdog then
        the daemon: any local user could do it)."""
        for key, _ in events:
            if key.fileobj is self.sock:
                self._accept()
                continue
            c = self.clients.get(key.fd)
            if c is not None and c.conn is key.fileobj:
                self._read(c)

    def _accept(self) -> None:
        for _ in range(64):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log("refused", f"control socket: accept failed: {e}", syslog.LOG_WARNING)
                return
            peer = peer_of(conn)
            victim = self._victim(peer.uid)
            if victim is not None:
                # Evict the client that has waited longest, of the user that
                # holds the most (or of this one, at its own cap): a burst of
                # idle connections cannot lock out one that sends its request
                # now, nor one user's burst another user's request.
                self._refuse(victim, f"{MAX_CLIENTS} clients connected, or "
                                     f"{MAX_CLIENTS_PER_UID} of uid {victim.peer.uid}; its "
                                     "longest idle one is closed", quiet=True)
            conn.setblocking(False)
            c = _Client(conn, peer, time.monotonic() + READ_DEADLINE)
            self.clients[conn.fileno()] = c
            self.sel.register(conn, selectors.EVENT_READ)

    def _victim(self, uid: int) -> _Client | None:
        """Whom a new client of `uid` displaces: None while there is room."""
        mine = [c for c in self.clients.values() if c.peer.uid == uid]
        if len(mine) >= MAX_CLIENTS_PER_UID:
            return min(mine, key=lambda c: c.deadline)
        if len(self.clients) < MAX_CLIENTS:
            return None
        held: dict[int, list[_Client]] = {}
        for c in self.clients.values():
            held.setdefault(c.peer.uid, []).append(c)
        return min(max(held.values(), key=len), key=lambda c: c.deadline)

    def _read(self, c: _Client) -> None:
        try:
            data = c.conn.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop(c)
            return
        c.buf += data
        line, nl, _rest = bytes(c.buf).partition(b"\n")
        if nl:
            self._unregister(c)
            self.dispatch(c.conn, c.peer, line)
        elif len(c.buf) > protocol.MAX_REQUEST:
            self._refuse(c, f"request over {protocol.MAX_REQUEST} bytes")

    def _refuse(self, c: _Client, why: str, quiet: bool = False) -> None:
        self.throttle.log(c.peer, "read", f"control socket: refused pid {c.peer.pid} "
                          f"uid {c.peer.uid}: {why}",
                          syslog.LOG_INFO if quiet else syslog.LOG_WARNING)
        try:
            c.conn.send(protocol.error(protocol.ProtocolError(why)))
        except OSError:
            pass
        self._drop(c)

    def _unregister(self, c: _Client) -> None:
        self.sel.unregister(c.conn)
        del self.clients[c.conn.fileno()]

    def _drop(self, c: _Client) -> None:
        self._unregister(c)
        c.conn.close()


class Daemon:
    def __init__(self, paths: deploy.Paths, agent: AgentConfig) -> None:
        self.paths, self.agent = paths, agent
        self.metrics = Metrics()
        self.ready_server: Any = None  # hostready.ReadyServer when host_ready.listen is set
        self.signals: queue.SimpleQueue[int] = queue.SimpleQueue()
        self.wake = threading.Event()
        self.budget = Budget()
        self.last_gc = 0.0
        self.admins: dict[tuple[int, int], tuple[float, bool]] = {}
        self.throttle = Throttle()
        self.running: set[threading.Thread] = set()
        self.server: ControlServer | None = None
        self.watches: dict[str, threading.Event] = {}  # service -> its watch's stop
        self.watch_lock = threading.Lock()

    # ---------------------------------------------------------------- start

    def reconcile(self, only: str | None = None) -> None:
        """Finish or revert the swaps that a dead agent (or a swap that ended
        in an error, `only` that service) left behind."""
        store = StateStore(self.paths.state_dir)
        for name in [only] if only else store.names():
            try:
                state = store.load(name)
            except StateError as e:  # kept aside by load(): report, go on
                log("daemon", f"{name}: {e}", syslog.LOG_ERR, SERVICE=name)
                continue
            if not state.intent:
                continue
            try:
                svc = deploy.load_service(self.paths.config_dir, name)
                with store.lock(name):
                    state = store.load(name)
                    if not state.intent:
                        continue  # recovered meanwhile by another agent
                    with deploy.Systemd() as sd:
                        res = deploy.recover(svc, sd, store, state,
                                             SwapLogger(name, state.intent["to"]))
                if res is not None:
                    self.metrics.on_result(res.to_dict())
            except (ZddError, OSError) as e:
                log("recover", f"{name}: cannot recover the interrupted swap: {e}",
                    syslog.LOG_ERR, SERVICE=name)

    def recover_at_start(self) -> None:
        """reconcile() before READY=1, with the start timeout extended while
        it runs (and the watchdog fed): recovery that waits out a long drain
        never makes systemd kill the daemon and restart-loop it."""
        done = threading.Event()
        t0 = time.monotonic()
        limit = self.recovery_limit()

        def extend() -> None:
            while time.monotonic() - t0 < limit:
                sd_notify(f"EXTEND_TIMEOUT_USEC={int(EXTEND_BY * 1e6)}\nWATCHDOG=1\n"
                          f"STATUS=recovering interrupted swaps "
                          f"({time.monotonic() - t0:.0f}s)")
                if done.wait(EXTEND_EVERY):
                    return

        ticker = threading.Thread(target=extend, name="extend-start", daemon=True)
        ticker.start()
        try:
            self.reconcile()
            self.settle_at_start()
        finally:
            done.set()
            ticker.join()

    def settle_at_start(self) -> None:
        """What no swap does for instances started at boot (by zdd.target):
        their admitted oom_score_adj (they start as the OOM killer's first
        pick, like every new instance: oom.py), and TCP Fast Open on the
        socket units' new listeners (fastopen.py)."""
        store = StateStore(self.paths.state_dir)
        try:
            services = load_all(self.paths.config_dir)
        except ZddError:
            return  # reported by reconcile and by every command
        try:
            with deploy.Systemd() as sd:
                for svc in services:
                    state = store.load(svc.name)
                    if state.intent or not state.serving:
                        continue
                    for instance in deploy.instances_of(svc, sd).get(state.serving, []):
                        deploy.settle_oom_score(svc, sd, units.instance_unit(svc.name,
                                                                             instance))
                    if svc.fast_open and \
                            sd.state(units.socket_unit(svc.name)).active == "active":
                        for w in deploy.ensure_fast_open(svc, sd, self.paths, None):
                            log("daemon", f"{svc.name}: {w}", syslog.LOG_WARNING,
                                SERVICE=svc.name)
        except (ZddError, OSError) as e:
            log("daemon", f"cannot settle the serving instances at start: {e}",
                syslog.LOG_WARNING)

    def recovery_limit(self) -> float:
        """Seconds recovery may take at most: for every service, each replica
        gated, baked, held and drained one after another (a bound, not an
        estimate), and never under RECOVERY_LIMIT. A recovery past it is
        hung: systemd's start timeout then ends it."""
        try:
            services = load_all(self.paths.config_dir)
        except (ZddError, OSError):
            return RECOVERY_LIMIT
        bound = sum(s.replicas * (s.ready.deadline + s.min_ready + s.drain.pre_stop_delay
                                  + s.drain.grace_period) + 60 for s in services)
        return max(RECOVERY_LIMIT, bound)

    def recover_later(self, name: str, delay: float = 2.0) -> None:
        """A swap that ended in an error leaves its intent: recover it now,
        not at the next restart (a few seconds later: systemd may have been
        re-executing)."""
        def run() -> None:
            time.sleep(delay)
            self.reconcile(only=name)
        threading.Thread(target=run, name=f"recover-{name}", daemon=True).start()
    def apply_sysctls(self) -> None:
        try:
            _code, out = commands.execute(self.paths, "sysctl-apply", {})
        except (ZddError, OSError) as e:
            log("sysctl", f"cannot apply sysctls: {e}", syslog.LOG_ERR)
            return
        for c in out["changed"]:
            log("sysctl", f"sysctl {c['key']}: {c['old']} -> {c['new']}")
        for key in out["missing"]:
            log("sysctl", f"sysctl {key}: not in this kernel ({os.uname().release}); skipped",
                syslog.LOG_WARNING)

    # -------------------------------------------------------------- requests

    def is_admin(self, peer: Peer) -> bool:
        """may_change, remembered ADMIN_CACHE seconds per (uid, gid): it runs
        in the control thread, and a group lookup may be slow (NSS)."""
        now = time.monotonic()
        hit = self.admins.get((peer.uid, peer.gid))
        if hit is not None and now - hit[0] < ADMIN_CACHE:
            return hit[1]
        if len(self.admins) > 4096:
            self.admins.clear()
        admin = may_change(peer, self.agent.admin_group)
        self.admins[(peer.uid, peer.gid)] = (now, admin)
        return admin

    def dispatch(self, conn: socket.socket, peer: Peer, line: bytes) -> None:
        admin = self.is_admin(peer)
        busy = self.budget.take(peer.uid, admin)
        if busy is not None:
            self.throttle.log(peer, "busy", f"control socket: busy for pid {peer.pid} uid "
                              f"{peer.uid}: {busy}", syslog.LOG_WARNING)
            self._send(conn, protocol.error(protocol.ProtocolError(
                f"busy: {busy}; try again")))
            conn.close()
            return
        t = threading.Thread(target=self._work, args=(conn, peer, line, admin), daemon=True,
                             name=f"request-{peer.pid}")
        self.running.add(t)
        t.start()

    def _send(self, conn: socket.socket, data: bytes) -> bool:
        try:
            conn.sendall(data)
            return True
        except OSError:
            return False  # the client went away or stopped reading: the work goes on

    def _work(self, conn: socket.socket, peer: Peer, line: bytes, admin: bool) -> None:
        try:
            conn.setblocking(True)
            conn.settimeout(WRITE_TIMEOUT)
            try:
                req = protocol.decode_request(line)
            except protocol.ProtocolError as e:
                self.throttle.log(peer, "bad", f"control socket: bad request from pid "
                                  f"{peer.pid} uid {peer.uid}: {e}", syslog.LOG_WARNING)
                self._send(conn, protocol.error(e))
                return
            if req.admin_only and not admin:
                denied = protocol.PermissionDenied(
                    f"{req.cmd} refused for user {peer.user} (uid {peer.uid}): only root and "
                    f"members of group {self.agent.admin_group} may run it")
                self.throttle.log(peer, "denied", f"control socket: {denied}",
                                  syslog.LOG_WARNING)
                self._send(conn, protocol.error(denied))
                return
            if req.admin_only:  # what changes the host is logged; reads are not
                log("request", f"control socket: {req.cmd} {req.args} from {peer.user} "
                               f"(pid {peer.pid})", syslog.LOG_INFO)
            self._execute(conn, req, admin)
        finally:
            try:
                conn.close()
            except OSError:
                pass
            # pystemd builds a class per D-Bus interface of every unit it
            # loads; they sit in reference cycles until the cyclic collector's
            # oldest generation runs, and the RSS grew ~3 MiB a swap up to
            # ~60 MiB before it did. Collected here, once the client has
            # its reply: the daemon stays at its idle size. After what changes
            # the host, or at most every GC_EVERY seconds: any local user may
            # send reads, and a full collection each time was theirs to order.
            if admin or time.monotonic() - self.last_gc >= GC_EVERY:
                self.last_gc = time.monotonic()
                gc.collect()
            self.running.discard(threading.current_thread())
            self.budget.give(peer.uid, admin)

    def _execute(self, conn: socket.socket, req: protocol.Request, admin: bool = True) -> None:
        alive = [True]

        def to_client(kind: str, d: dict[str, Any]) -> None:
            if alive[0]:
                alive[0] = self._send(conn, protocol.event(kind, d))

        emit = to_client
        # swap --dry-run is a plan: nothing to log as a swap or count.
        real_swap = req.cmd in ("swap", "rollback") and not req.args.get("dry_run")
        if real_swap:
            name = req.args["service"]
            self.stop_watch(name)  # a new swap supersedes the watch of the last one
            logger = SwapLogger(name, req.args.get("version", "previous"))
            on_metric = self.metrics.on_event(name)

            def emit(kind: str, d: dict[str, Any]) -> None:
                logger(kind, d)
                on_metric(kind, d)
                to_client(kind, d)

        try:
            code, out = commands.execute(self.paths, req.cmd, req.args, emit,
                                         watched=real_swap)
            if real_swap:
                self.metrics.on_result(out)
                if (out.get("watch") or {}).get("seconds"):
                    self.start_watch(name, out["watch"])
        except SwapFailed as e:
            res = e.details["result"].to_dict()  # type: ignore[attr-defined]
            self.metrics.on_result(res)
            self._send(conn, protocol.error(e, {"result": res}))
            return
        except ZddError as e:
            if real_swap and not isinstance(e, LockedError):
                self.recover_later(name)  # nothing to do unless it left an intent
            self._send(conn, protocol.error(e))
            return
        except Exception as e:  # a bug: answer, log, keep serving
            log("daemon", f"{req.cmd} failed: {type(e).__name__}: {e}", syslog.LOG_ERR)
            if real_swap:
                self.recover_later(name)
            err = ZddError(f"internal error in {req.cmd}: {type(e).__name__}: {e}")
            self._send(conn, protocol.error(err))
            return
        if not admin:
            out = redact(req.cmd, out)
        self._send(conn, protocol.result(out, int(code)))

    # --------------------------------------------------------------- watches

    def stop_watch(self, name: str) -> None:
        with self.watch_lock:
            ev = self.watches.pop(name, None)
        if ev is not None:
            ev.set()

    def start_watch(self, name: str, w: dict[str, Any]) -> None:
        """Watch `name`'s new version until w["until"]; revert by itself on failure."""
        seconds = float(w["until"]) - time.time()
        if seconds <= 0:
            return
        stop = threading.Event()
        with self.watch_lock:
            old = self.watches.pop(name, None)
            if old is not None:
                old.set()
            self.watches[name] = stop
        self.metrics.watching.labels(name).set(1)
        log("watch", f"{name}: watching {w['version']} for {seconds:.0f}s; reverting to "
                     f"{w['previous']} by itself if it fails", SERVICE=name,
            VERSION=w["version"])
        threading.Thread(target=self._watch, args=(name, w, seconds, stop), daemon=True,
                         name=f"watch-{name}").start()

    def _watch(self, name: str, w: dict[str, Any], seconds: float,
               stop: threading.Event) -> None:
        from . import watch as watching
        from .instance import Host

        try:
            svc = deploy.load_service(self.paths.config_dir, name)
            with deploy.Systemd() as sd:
                ops = deploy.SystemdOps(svc, sd)
                host = Host(svc, ops, deploy.SystemClock(), lambda k, d: None)
                watcher = watching.Watcher(host, deploy.instance_ids(w["version"],
                                                                     svc.replicas))
                reason = watching.run(watcher, seconds, stop,
                                      lambda why: None)
            if reason and not stop.is_set():
                self._auto_revert(name, w, reason)
            elif not stop.is_set():
                log("watch", f"{name}: {w['version']} stood its watch of {seconds:.0f}s",
                    SERVICE=name, VERSION=w["version"])
        except Exception as e:  # a watch that fails must say so, never die silently
            log("watch", f"{name}: the watch of {w['version']} ended: {type(e).__name__}: {e}",
                syslog.LOG_ERR, SERVICE=name)
        finally:
            with self.watch_lock:
                if self.watches.get(name) is stop:
                    del self.watches[name]
                    self.metrics.watching.labels(name).set(0)

    def _auto_revert(self, name: str, w: dict[str, Any], reason: str) -> None:
        why = f"automatic revert: {reason}; reverted to {w['previous']}"
        log("auto_revert", f"{name}: {w['version']} failed during its watch: {reason}; "
                           f"reverting to {w['previous']}", syslog.LOG_ERR, SERVICE=name,
            VERSION=w["version"])
        try:
            res = deploy.swap(self.paths, name, w["previous"],
                              SwapLogger(name, w["previous"]), auto_revert=why).to_dict()
        except SwapFailed as e:
            res = e.details["result"].to_dict()  # type: ignore[attr-defined]
        except ZddError as e:  # e.g. a swap by hand holds the lock: it decides
            log("auto_revert", f"{name}: automatic revert to {w['previous']} not done: {e}",
                syslog.LOG_ERR, SERVICE=name)
            return
        self.metrics.on_result(res)
        log("auto_revert", f"{name}: automatic revert to {w['previous']}: {res['result']}"
                           f"{': ' + res['reason'] if res.get('reason') else ''}",
            syslog.LOG_WARNING if res["result"] == "auto_reverted" else syslog.LOG_ERR,
            SERVICE=name, VERSION=w["previous"])

    def resume_watches(self) -> None:
        """A daemon restarted within a watch goes on watching until its end."""
        store = StateStore(self.paths.state_dir)
        for name in store.names():
            try:
                w = store.load(name).watch
            except StateError:
                continue
            if w and float(w.get("until", 0)) > time.time():
                self.start_watch(name, w)

    # ------------------------------------------------------------ main loop

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self.signals.put(signum)  # only queue it; the main loop acts
        self.wake.set()

    def refresh_metrics(self) -> None:
        try:
            self.metrics.on_status(deploy.status(self.paths))
            _s, plan = commands.sysctl_plan(self.paths)
            self.metrics.on_sysctl({c.key: c.differs for c in plan if c.old is not None})
        except (ZddError, OSError) as e:
            log("daemon", f"metrics refresh failed: {e}", syslog.LOG_WARNING)

    def serve(self, sock: socket.socket) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        self.recover_at_start()
        self.apply_sysctls()
        self.resume_watches()
        if self.agent.metrics_listen:
            host, port = parse_listen(self.agent.metrics_listen, "metrics.listen")
            self.metrics.serve(host, port)
            log("daemon", f"metrics on http://{self.agent.metrics_listen}/metrics")
        self.start_ready_server()
        self.server = ControlServer(sock, self.dispatch, self.throttle)
        server_thread = threading.Thread(target=self.server.run, name="control", daemon=True)
        server_thread.start()
        usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
        ping_every = usec / 2e6 if usec else 5.0
        sd_notify(f"READY=1\nSTATUS=serving {CONTROL_SOCKET}\nMAINPID={os.getpid()}")
        log("daemon", f"zdd-agent daemon ready (pid {os.getpid()}); control socket "
                      f"{CONTROL_SOCKET}")
        next_refresh = 0.0
        while True:
            self.wake.wait(timeout=min(ping_every, 1.0))
            self.wake.clear()
            stop = self._handle_signals()
            if stop:
                break
            if usec and time.monotonic() - self.server.heartbeat < ping_every * 2:
                sd_notify("WATCHDOG=1")
            if self.agent.metrics_listen and time.monotonic() >= next_refresh:
                next_refresh = time.monotonic() + REFRESH
                self.refresh_metrics()
        return self._shutdown(server_thread)

    def _handle_signals(self) -> bool:
        stop = False
        while not self.signals.empty():
            signum = self.signals.get()
            if signum in (signal.SIGTERM, signal.SIGINT):
                log("daemon", f"Received {signal.Signals(signum).name}; transition to drain "
                              "mode.")
                stop = True
            elif signum == signal.SIGHUP:
                self.reload()
        return stop

    def start_ready_server(self) -> None:
        """The host endpoint per self.agent (none without host_ready.listen)."""
        if not self.agent.host_ready_listen:
            return
        from . import hostready

        self.ready_server = hostready.from_config(self.agent, self.paths.state_dir).start()
        scheme = "https" if self.agent.host_ready_tls else "http"
        log("daemon", f"host readiness on {scheme}://{self.agent.host_ready_listen}/ready "
                      "(zdd-agent drain-host / undrain-host)")

    def reload(self) -> None:
        """SIGHUP (systemctl reload): agent.yaml and the service configs read
        again, all or nothing. The host endpoint is rebuilt (its listen
        address, allow_from, and TLS files: certificates are rotated this
        way); if the new one cannot start, the old settings serve again. The
        admin group's membership is looked up afresh, the state directory
        tightened for it."""
        try:
            agent = load_agent_config(self.paths.agent_config)
            load_all(self.paths.config_dir)
        except (ZddError, OSError) as e:
            log("daemon", f"configuration not reloaded: {e}", syslog.LOG_ERR)
            return
        old, self.agent = self.agent, agent
        self.admins.clear()
        secure_state(self.paths.state_dir, agent.admin_group)
        if self.ready_server is not None:
            self.ready_server.stop()
            self.ready_server = None
        try:
            self.start_ready_server()
        except (ZddError, OSError) as e:
            log("daemon", f"host readiness endpoint not restarted with the new settings: {e}; "
                          "keeping the previous ones", syslog.LOG_ERR)
            self.agent = dataclasses.replace(agent, **{
                k: getattr(old, k) for k in ("host_ready_listen", "host_ready_tls",
                                             "host_ready_allow_from")})
            try:
                self.start_ready_server()
            except (ZddError, OSError) as e2:
                log("daemon", f"host readiness endpoint down: {e2}", syslog.LOG_ERR)
        log("daemon", "configuration reloaded")

    def _shutdown(self, server_thread: threading.Thread) -> int:
        """Stop taking requests; let the running ones finish (a swap killed
        here would be recovered at the next start, but finishing is kinder)."""
        sd_notify("STOPPING=1")
        assert self.server is not None
        self.server.stopping.set()
        server_thread.join(timeout=5)
        deadline = time.monotonic() + 60
        while self.running and time.monotonic() < deadline:
            time.sleep(0.1)
        log("daemon", f"Drain complete. {len(self.running)} active connections remaining.")
        if self.ready_server is not None:
            self.ready_server.stop()
        return 0


def secure_state(state_dir: Path, admin_group: str) -> None:
    """state.secure_state_dir, logged: the history holds journal lines and
    hook output, for root and the admin group only (at start and reload)."""
    try:
        for change in secure_state_dir(state_dir, admin_group):
            log("daemon", f"state directory tightened: {change}", syslog.LOG_WARNING)
    except OSError as e:
        log("daemon", f"cannot secure the state directory: {e}", syslog.LOG_ERR)


def run(paths: deploy.Paths) -> int:
    agent = load_agent_config(paths.agent_config)
    secure_state(paths.state_dir, agent.admin_group)
    inherited = listen_fds()
    sock = inherited[0] if inherited else bind_socket(CONTROL_SOCKET)
    return Daemon(paths, agent).serve(sock)
