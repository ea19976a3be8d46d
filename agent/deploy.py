"""Swap, rollback and status of one service on this host: the glue between
config, unit rendering, systemd, the census, the probes and the state file.
The decisions themselves are in swap.py."""

from __future__ import annotations

import dataclasses
import grp
import os
import pwd
import secrets
import stat

import psutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import oom, rollout, tcpstats, units
from .census import Census
from .config import (ServiceConfig, check_name, check_version, load_agent_config, load_all,
                     load_service, parse_service)
from .defaults import DEFAULT_AGENT_CONFIG, DEFAULT_CONFIG_DIR, DEFAULT_STATE_DIR
from .errors import (ConfigError, NoHistoryError, StateError, SwapFailed, SystemdError,
                     ZddError)
from .probes import ProbeResult, free_port, probe
from .state import ServiceState, StateStore
from .modes import mode_for, until_quiet
from .swap import (Emit, InstanceStatus, Memory, Swap, SwapResult, SystemClock, fitted_plan,
                   instance_ids)
from .sysctl import DEFAULTS, Change, Sysctl
from .trust import (DEFAULT_PATH, cannot_execute, check_root_argv, runs_as_root, untrusted,
                    untrusted_argv, untrusted_env)
from .systemd import Systemd, journal_tail


@dataclass(frozen=True)
class Paths:
    config_dir: Path = DEFAULT_CONFIG_DIR
    state_dir: Path = DEFAULT_STATE_DIR
    agent_config: Path = DEFAULT_AGENT_CONFIG


def _executable(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def preflight(svc: ServiceConfig, version: str) -> None:
    """Everything that can be checked before the host is touched."""
    check_version(version)
    exe = svc.argv(version)[0]
    if not _executable(exe):
        what = "not found" if not os.path.exists(exe) else "not an executable file"
        unit = units.instance_unit(svc.name, version)
        raise ConfigError(f"{svc.path}: command: cannot start {unit}: {exe} {what}",
                          file=str(svc.path), key="command")
    _check_socket_files(svc)
    for key, argv in _agent_runs(svc, version):
        if not _executable(argv[0]):
            raise ConfigError(f"{svc.path}: {key}: {argv[0]} is not an executable file",
                              file=str(svc.path), key=key)
    if svc.user is not None:
        try:
            pwd.getpwnam(svc.user)
        except KeyError:
            raise ConfigError(f"{svc.path}: user: no such user {svc.user!r} on this host",
                              file=str(svc.path), key="user") from None
        # systemd would fail the start with 203/EXEC: say why before anything stops
        for key, argv in (("command", svc.argv(version)), *_agent_runs(svc, version)):
            why = cannot_execute(argv[0], svc.user)
            if why is not None:
                raise ConfigError(f"{svc.path}: {key}: {argv[0]} cannot run as user "
                                  f"{svc.user}: {why}", file=str(svc.path), key=key)
    check_settings(svc, version)
    # hooks and exec probes run as root: root's alone (trust.py)
    if os.geteuid() == 0 and runs_as_root(svc.user):
        path_env = dict(svc.environment).get("PATH", DEFAULT_PATH)
        for key, argv in _agent_runs(svc, version):
            check_root_argv(argv, key, str(svc.path), path_env)
        bad = untrusted_env(dict(svc.environment))
        if bad is not None:
            raise ConfigError(f"{svc.path}: environment.{bad[0]}: hooks and probes run as root "
                              f"with it, but {bad[1]}: only root may be able to change what "
                              "it names", file=str(svc.path), key=f"environment.{bad[0]}")


def unix_path_problem(path: str) -> str | None:
    """Why systemd (as root) should not create the unix: listener's file at
    `path`, or None. What is there must be a socket: when bind(2) says
    EADDRINUSE systemd unlinks whatever the path names and binds again
    (src/basic/socket-util.c), a regular file too. And the directories on
    its way that exist must be root's alone (trust.untrusted): whoever may
    write one can put a link there and have root create (or unlink) a file
    elsewhere. The missing ones systemd creates, 0755 (DirectoryMode=)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        return e.strerror or str(e)
    else:
        if not stat.S_ISSOCK(st.st_mode):
            return ("exists and is not a socket: systemd would unlink it to bind there "
                    "(remove or move it, or choose another path)")
    parent = os.path.dirname(path)
    while parent != "/" and not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    why = untrusted(parent)
    if why is not None:
        return (f"{why}: the directories on its way must be root's alone (systemd creates "
                "the socket as root; whoever may write there may put a link in its place)")
    return None


def _check_socket_files(svc: ServiceConfig) -> None:
    """unix: listeners: a path systemd may bind at, and a socket_user and
    socket_group that exist (systemd would fail the socket unit)."""
    for path in svc.unix_paths:
        why = unix_path_problem(path)
        if why is not None:
            raise ConfigError(f"{svc.path}: listen: unix:{path}: {why}", file=str(svc.path),
                              key="listen")
    _must_exist(svc, "socket_user", "user", svc.socket_user)
    _must_exist(svc, "socket_group", "group", svc.socket_group)


def _must_exist(svc: ServiceConfig, key: str, kind: str, name: str | None) -> None:
    """The user or group a config key names is on this host (systemd would
    fail the unit: 217/USER, 216/GROUP); None: nothing named."""
    if name is None:
        return
    try:
        (pwd.getpwnam if kind == "user" else grp.getgrnam)(name)
    except KeyError:
        raise ConfigError(f"{svc.path}: {key}: no such {kind} {name!r} on this host",
                          file=str(svc.path), key=key) from None


def check_settings(svc: ServiceConfig, version: str) -> None:
    """What systemd would fail a start for (216/GROUP, 200/CHDIR, "Failed to
    load environment files"), told before anything stops: the groups exist,
    working_directory is a directory and each of environment_files a file,
    {version} filled in. For a service that runs as root, those paths must
    be root's alone (trust.untrusted): an environment file sets LD_PRELOAD
    or PYTHONPATH for a root process, and `python -m` imports from its
    working directory."""
    s = svc.settings
    _must_exist(svc, "group", "group", s.group)
    for group in s.supplementary_groups:
        _must_exist(svc, "supplementary_groups", "group", group)
    root = runs_as_root(svc.user)
    for key, path in s.paths(version):
        want = "directory" if key == "working_directory" else "file"
        try:
            st = os.stat(path)
        except OSError as e:
            raise ConfigError(f"{svc.path}: {key}: {path}: {e.strerror} (an instance of "
                              f"{version} would fail to start)", file=str(svc.path),
                              key=key) from None
        if not (stat.S_ISDIR if want == "directory" else stat.S_ISREG)(st.st_mode):
            raise ConfigError(f"{svc.path}: {key}: {path} is not a {want}",
                              file=str(svc.path), key=key)
        why = untrusted(path) if root and os.geteuid() == 0 else None
        if why is not None:
            raise ConfigError(f"{svc.path}: {key}: {path}: {why}; the service runs as root "
                              "and this decides what it runs (allowed: root's alone along the "
                              "whole path, or a user for the service)", file=str(svc.path),
                              key=key)


def _agent_runs(svc: ServiceConfig, version: str) -> list[tuple[str, list[str]]]:
    """(config key, argv) of what the agent runs for a service: its hooks and
    its exec probe, {version} filled in as for this swap."""
    runs = [(f"hooks.{n}.command", list(h.command)) for n, h in svc.hooks]
    if svc.ready.command:
        runs.append(("ready.command", list(svc.ready.command)))
    return [(key, [a.replace("{version}", version) for a in argv]) for key, argv in runs]


def _listen_lines(text: str | None) -> list[str]:
    return sorted(ln for ln in (text or "").splitlines() if ln.startswith("ListenStream="))


def service_census(svc: ServiceConfig, sd: Systemd | None = None) -> Census:
    """The census of a service's ports, for the socket families its listeners
    use; with `sd`, where each instance binds its own port (nat), theirs too
    (from the drop-ins)."""
    mode = mode_for(svc)
    if mode.routes and sd is not None:
        for port in instance_ports(svc, sd).values():
            mode.track(port)
    return mode.census()


def instance_ports(svc: ServiceConfig, sd: Systemd) -> dict[str, int | None]:
    """Each loaded instance's private port, from its drop-in (None: none)."""
    out: dict[str, int | None] = {}
    for unit in sd.list_units(f"zdd-{svc.name}@*.service"):
        instance = units.version_of(svc.name, unit)
        if instance is not None:
            out[instance] = units.dropin_port(
                sd.read_unit_file(units.dropin_path(svc.name, instance)))
    return out


class SystemdOps:
    """InstanceOps on a real host: pystemd, netlink census, probes."""

    def __init__(self, svc: ServiceConfig, sd: Systemd,
                 backup: dict[str, str | None] | None = None) -> None:
        self.svc, self.sd = svc, sd
        self.backup = dict(backup or {})  # unit files this swap changed: what they held
        self.removed: dict[str, str] = {}  # instance -> the drop-in cleanup() removed
        self.mode = mode_for(svc)
        self.ports: dict[str, int | None] = {}
        self._ooms: dict[tuple[str, int], str | None] = {}
        if self.mode.routes:  # the census counts on the instances' own ports
            self.ports.update(instance_ports(svc, sd))
            for port in self.ports.values():
                self.mode.track(port)
        self.census = self.mode.census()

    def unit(self, version: str) -> str:
        return units.instance_unit(self.svc.name, version)

    def instances(self, version: str) -> list[str]:
        return instances_of(self.svc, self.sd).get(version, [])

    def prepare(self, instance: str, version: str, keep: bool = False) -> None:
        """What the instance runs: the template's own ExecStart (%i), or a
        drop-in (replicas, or a port per start), with a daemon-reload only
        if systemd had that instance loaded already (Systemd.reload_for).
        `keep`: a rollback starts an old instance again with the drop-in it
        ran with (on disk, or the one this swap's cleanup removed), not one
        rendered from the new config."""
        port = free_port() if self.svc.needs_instance_port else None
        self.ports[instance] = port
        self.mode.track(port)
        self.sd.reset_failed(self.unit(instance))
        path = units.dropin_path(self.svc.name, instance)
        kept = (self.sd.read_unit_file(path) or self.removed.get(instance)) if keep else None
        if kept is not None and units.dropin_version(kept) == version:
            # an old instance started again by a rollback: the drop-in it ran
            # with (its command, port, working directory), not the new config's
            self.ports[instance] = units.dropin_port(kept)
            self.mode.track(self.ports[instance])
            if self.sd.write_unit_files({path: kept}):
                self.sd.reload_for(self.unit(instance), path, present=True)
            return
        if units.version_in_template(self.svc) and instance == version:
            if self.sd.remove_unit_file(path):  # left from another config
                self.sd.reload_for(self.unit(instance), path, present=False)
            return
        dropin = units.render_instance_dropin(self.svc, version, port, instance)
        if self.sd.write_unit_files({path: dropin}):
            self.sd.reload_for(self.unit(instance), path, present=True)

    def port_of(self, instance: str) -> int | None:
        """The private port given to the instance: from this swap's prepare(),
        else from its drop-in (the daemon's watch, after the swap)."""
        if instance not in self.ports:
            text = self.sd.read_unit_file(units.dropin_path(self.svc.name, instance))
            self.ports[instance] = units.dropin_port(text)
            self.mode.track(self.ports[instance])
        return self.ports[instance]

    def start(self, version: str) -> None:
        self.sd.start(self.unit(version))

    def stop(self, version: str) -> None:
        self.sd.stop(self.unit(version))

    def wait(self, instances: list[str], seconds: float) -> bool:
        return self.sd.wait_change([self.unit(x) for x in instances], seconds)

    def status(self, version: str) -> InstanceStatus:
        st = self.sd.state(self.unit(version))
        return InstanceStatus(st.active, st.sub, st.result, st.restarts, st.job,
                              self._oom(st) or st.exit, st.main_pid)

    def _oom(self, st: Any) -> str | None:
        """How the OOM killer took the instance's main process, when it did:
        systemd's Result=oom-kill (cgroup v2), or on a legacy hierarchy a
        SIGKILL that the kernel's log attributes to the OOM killer. Read
        once per start of the instance (the log is read only on a SIGKILL)."""
        if st.result != "oom-kill" and not st.exit.startswith("killed by SIGKILL"):
            return None
        since = self.sd.main_start_monotonic(st.name)
        key = (st.name, since)
        if key not in self._ooms:
            found = oom.oom_kill(st.name, since)
            if found is None and st.result == "oom-kill":
                found = "systemd: Result=oom-kill"
            self._ooms[key] = f"killed by SIGKILL: {found}" if found else None
        return self._ooms[key]

    def probe(self, version: str) -> tuple[bool, str]:
        # `version` is the instance (VERSION-N with replicas): the probe is
        # told both, so {version} in its environment files is the version
        instance = version
        if self.svc.replicas > 1:
            version = instance_version(self.svc, self.sd, instance)
        port = self.port_of(instance)
        env = {"ZDD_SERVICE": self.svc.name, "ZDD_VERSION": version, "ZDD_INSTANCE": instance,
               "ZDD_MAIN_PID": str(self.sd.state(self.unit(instance)).main_pid)}
        if port is not None:
            env["ZDD_INSTANCE_PORT"] = str(port)
        r = probe(self.svc.ready, port, env, run_exec=lambda argv, timeout, e:
                  self.run_as_service("probe", argv, timeout, e))
        return r.ok, r.detail

    def run_as_service(self, kind: str, argv: list[str], timeout: float,
                       env: dict[str, str]) -> ProbeResult:
        """A hook or an exec probe: a transient unit (Systemd.run_transient)
        as the service's user, with its environment; output in the journal
        (unit zdd-KIND-SERVICE-RANDOM.service), the cgroup killed at timeout."""
        unit = f"zdd-{kind}-{self.svc.name}-{secrets.token_hex(4)}.service"
        full_env = {**dict(self.svc.environment), **env}
        if os.geteuid() == 0 and runs_as_root(self.svc.user):
            # checked again at each run: recovery and the watch run hooks and
            # probes with the config as it is now, without a preflight
            why = untrusted_argv(argv, path_env=full_env.get("PATH", DEFAULT_PATH))
            bad = untrusted_env(full_env)
            if why is None and bad is not None:
                why = f"environment {bad[0]}: {bad[1]}"
            if why is not None:
                return ProbeResult(False, f"refused to run {argv[0]} as root: {why}")
        try:
            version = env.get("ZDD_VERSION") or env.get("ZDD_TO_VERSION")
            ok, detail = self.sd.run_transient(
                unit, argv, user=self.svc.user, env=full_env,
                timeout=timeout, description=f"zdd-agent {kind} of {self.svc.name}",
                extra=transient_settings(self.svc, version))
        except SystemdError as e:
            return ProbeResult(False, str(e))
        return ProbeResult(ok, detail)

    def pids(self, version: str) -> list[int]:
        return self.sd.processes(self.unit(version))

    def connections(self, pids: list[int]) -> int:
        return self.census.count(pids)

    def peers(self, pids: list[int]) -> list[str]:
        return self.census.held_peers(pids)

    def enable(self, version: str) -> None:
        """The instance is admitted for good: enabled for boot, and no longer
        the OOM killer's first pick (oom.py): its processes get
        oom_score_adjust, or the service manager's own value."""
        unit = self.unit(version)
        self.sd.enable(unit)
        settle_oom_score(self.svc, self.sd, unit)

    def disable(self, version: str) -> None:
        self.sd.disable(self.unit(version))

    def cleanup(self, version: str) -> None:
        """After the instance stopped: its drop-in and failed state go, and
        what conntrack still maps to its port (nat)."""
        if self.mode.routes:
            self.mode.forget(self.port_of(version))
        path = units.dropin_path(self.svc.name, version)
        text = self.sd.read_unit_file(path)
        if text is not None:
            self.removed[version] = text  # for a rollback in this swap (prepare)
        self.sd.remove_unit_file(path)
        self.sd.reset_failed(self.unit(version))

    def journal(self, version: str) -> list[str]:
        return journal_tail(self.unit(version), 20)

    def restore_units(self) -> list[str]:
        """put_back_units for this swap's backup, once."""
        changed, self.backup = put_back_units(self.sd, self.backup), {}
        return changed

    def tcp_counters(self) -> dict[str, int]:
        return tcpstats.read()

    def memory(self, olds: list[str]) -> Memory | None:
        """instance_memory of the old instances, within the service's slice."""
        return instance_memory(self.sd, [self.unit(x) for x in olds],
                               units.slice_unit(self.svc.name))

    def run_hook(self, hook: str, env: dict[str, str],
                 instance: str | None = None) -> tuple[bool, str] | None:
        """A hook's argv (no shell); for one new instance (post_start) with
        {version} and {instance_port} substituted and ZDD_INSTANCE_PORT set."""
        h = self.svc.hook(hook)
        if h is None:
            return None
        argv = list(h.command)
        if instance is not None:
            port = self.port_of(instance)
            env = {**env, "ZDD_VERSION": env.get("ZDD_TO_VERSION", "")}
            if port is not None:
                env["ZDD_INSTANCE_PORT"] = str(port)
            argv = [a.replace("{version}", env["ZDD_VERSION"])
                    .replace("{instance_port}", str(port or "")) for a in argv]
        r = self.run_as_service(hook.replace("_", "-"), argv, h.timeout, env)
        return r.ok, r.detail

    def missing_listeners(self, instance: str) -> list[str] | None:
        """None when it cannot be told (systemd cannot list its processes)."""
        try:
            pids = self.pids(instance)
        except SystemdError:
            return None
        if not pids:
            return [str(lst) for lst in self.svc.listen]
        return self.mode.missing_listeners(pids, self.port_of(instance))

    def close_listeners(self, instance: str) -> int:
        try:
            pids = self.pids(instance)
        except SystemdError as e:
            raise OSError(str(e)) from e
        return self.mode.close_listeners(pids)

    def connection_sets(self, instances: list[str]) -> dict[str, frozenset[int]]:
        try:
            groups = {x: self.pids(x) for x in instances}
        except SystemdError as e:
            raise OSError(str(e)) from e
        return self.census.inodes_many(groups)

    def accept_queue(self, instances: list[str]) -> Any:
        """listeners.Waiting: what waits in the accept queues of the
        listeners that `instances` serve; None when it cannot be told."""
        try:
            pids = [p for x in instances for p in self.pids(x)]
            return self.mode.accept_queue(pids)
        except (SystemdError, OSError):
            return None

    def route(self, add: list[str], remove: list[str],
              only: list[str] | None = None) -> tuple[list[int], list[int]] | None:
        """SocketMode.route for instances (their private ports). NatError
        (nat.py) when nftables refuses: the caller decides what it means."""
        def ports(xs: list[str]) -> list[int]:
            return [p for p in (self.port_of(x) for x in xs) if p is not None]

        return self.mode.route(ports(add), ports(remove),
                               None if only is None else ports(only))

    def quiesce(self, instances: list[str]) -> int:
        """SocketMode.quiesce for the instances' processes (up to
        QUIESCE_LIMIT), then, where traffic is routed per instance (nat),
        their connections let finish by themselves before any signal
        (modes.until_quiet, within the grace period). A program
        that dies of its signal (python -m http.server, Node without a
        handler) then cuts nothing that was going to end anyway."""
        try:
            pids = [p for x in instances for p in self.pids(x)]
        except SystemdError:
            return 0
        if not pids:
            return 0
        left = self.mode.quiesce(pids, QUIESCE_LIMIT)
        if self.mode.routes:
            def look() -> int:  # queued, handshaking and established together
                return self.mode.quiesce(pids, 0) + self.census.count(pids)

            try:
                left = until_quiet(look, self.svc.drain.grace_period)
            except OSError:
                pass
        return left

    def private_trial(self, instance: str, count: int) -> Any:
        """accept_trial to the instance's own port, where traffic is routed
        per instance (nat); None elsewhere or without a port."""
        from .config import Listen
        from .trial import accept_trial

        port = self.port_of(instance)
        if not self.mode.routes or port is None:
            return None
        host = self.mode.required(port)[0][0]

        def groups() -> dict[str, list[int]]:
            try:
                return {instance: self.pids(instance)}
            except SystemdError as e:
                raise OSError(str(e)) from e

        return accept_trial(self.census, groups, Listen(host, port), count, close_each=True)

    def accept_trial(self, instances: list[str], count: int) -> Any:
        """trial.TrialResult for `count` connections the agent opens to the
        first listen address; None when it cannot be told (the error is
        the caller's to report: OSError)."""
        from .trial import accept_trial

        def groups() -> dict[str, list[int]]:
            try:
                return {x: self.pids(x) for x in instances}
            except SystemdError as e:
                raise OSError(str(e)) from e

        return accept_trial(self.census, groups, self.svc.listen[0], count)

    def close_watch(self, instances: list[str]) -> Any:
        """Follows how `instances` end their connections (closes.py), begun
        before their drain signal; None where the census knows none."""
        from .closes import CloseWatch

        sets = self.connection_sets(instances)
        inodes = set().union(*sets.values()) if sets else set()
        # TCP only: the kernel sends destroy notifications for inet sockets
        # alone, so how unix: connections end is not followed (the census
        # still counts them down)
        watch = CloseWatch(self.census.ports, self.census.families)
        watch.begin(inodes - self.census.unix_inodes)
        return watch


# How long an old instance's listener may keep connections waiting to be
# accepted after it was withdrawn (nat), before it gets its drain signal anyway.
QUIESCE_LIMIT = 5.0


def put_back_units(sd: Systemd, backup: dict[str, str | None]) -> list[str]:
    """Write back the unit files a swap changed (install_units' backup) and
    reload, so the old version restarts with the settings it ran with; the
    files written. A file the swap created stays (nothing ran from an older
    one)."""
    back = {rel: text for rel, text in backup.items() if text is not None}
    if not back:
        return []
    changed = sd.write_unit_files(back)
    if changed:
        sd.reload()
    return sorted(changed)


def transient_settings(svc: ServiceConfig, version: str | None) -> dict[bytes, Any]:
    """What a hook or an exec probe shares with the service's instances: its
    group and supplementary groups, and (with the version known, for
    {version}) its environment files, after `environment` as in the unit,
    and its working directory. Properties of StartTransientUnit
    (org.freedesktop.systemd1(5))."""
    s = svc.settings
    props: dict[bytes, Any] = {}
    if s.group:
        props[b"Group"] = s.group.encode()
    if s.supplementary_groups:
        props[b"SupplementaryGroups"] = [g.encode() for g in s.supplementary_groups]
    if version is not None:
        paths = s.paths(version)
        for key, path in paths:
            if key == "working_directory":
                props[b"WorkingDirectory"] = path.encode()
        files = [path for key, path in paths if key == "environment_files"]
        if files:
            props[b"EnvironmentFiles"] = [(path.encode(), False) for path in files]
    return props


def settle_oom_score(svc: ServiceConfig, sd: Systemd, unit: str) -> list[int]:
    """Write the admitted value of oom_score_adj to the unit's processes;
    the PIDs it could not be written to."""
    target = svc.settings.oom_score_adjust
    if target is None:
        target = oom.score(1) or 0  # what the manager gives a unit without the setting
    return oom.set_score(_processes_or_none(sd, unit), target)


def _processes_or_none(sd: Systemd, unit: str) -> list[int]:
    """The unit's processes, or none where systemd cannot list them (counts
    and sizes are then left out, never invented)."""
    try:
        return sd.processes(unit)
    except SystemdError:
        return []


def instance_memory(sd: Systemd, unit_names: list[str],
                    slice_unit: str | None = None) -> Memory | None:
    """The largest old instance's footprint: the most its cgroup has held
    (memory.peak, or memory.current where the peak cannot be read), else its
    processes' RSS; and what a new one may take: the host's MemAvailable,
    or less when the service's slice has a MemoryMax= (slice.memory_max)."""
    sizes, source = [], "cgroup"
    for unit in unit_names:
        size = sd.memory_current(unit)
        peak = sd.memory_peak(unit) if size is not None else None
        if peak is not None and size is not None and peak > size:
            size, source = peak, "cgroup peak"
        if size is None:
            source, size = "rss", 0
            for pid in _processes_or_none(sd, unit):
                try:
                    size += psutil.Process(pid).memory_info().rss
                except psutil.Error:
                    pass
        sizes.append(size)
    if not sizes or not max(sizes):
        return None
    available = psutil.virtual_memory().available
    room = sd.slice_room(slice_unit) if slice_unit else None
    if room is not None and room < available:
        available, source = room, f"{source}; room left in {slice_unit}"
    return Memory(max(sizes), available, source)


MIGRATE_REQ = "net.ipv4.tcp_migrate_req"


def ensure_migrate_req(paths: Paths, emit: Emit | None) -> None:
    """socket: reuseport needs tcp_migrate_req=1, or closing the old instance's
    listener resets the connections in its accept queue (nginx #1300)."""
    say = emit or (lambda kind, data: None)
    overrides = dict(load_agent_config(paths.agent_config).sysctl)
    s = Sysctl(paths.state_dir)
    current = s.read(MIGRATE_REQ)
    risk = ("connections queued on the old instance's listener are reset when it closes: "
            "expect failed requests at each swap under load (socket: inherit has no such risk)")
    if current is None:
        say("warning", {"message": f"Linux {os.uname().release} has no {MIGRATE_REQ} (5.14+); "
                                   + risk})
    elif current != "1" and MIGRATE_REQ in overrides and overrides[MIGRATE_REQ] is None:
        say("warning", {"message": f"{MIGRATE_REQ} is {current} and agent.yaml tells the agent "
                                   "to leave it alone; " + risk})
    elif current != "1":
        s.apply([Change(MIGRATE_REQ, current, "1")])
        say("warning", {"message": f"set {MIGRATE_REQ} = 1 (was {current}) for socket: "
                                   "reuseport"})


def ensure_fast_open(svc: ServiceConfig, sd: Systemd, paths: Paths,
                     emit: Emit | None) -> list[str]:
    """socket: inherit: TCP_FASTOPEN = fast_open on the socket unit's
    listeners (systemd has no FastOpen=; fastopen.py), started first if it
    is not running, with the sysctl's server bit. At every swap: a restarted
    socket unit has new sockets with no TFO queue. fast_open 0 turns a queue
    set earlier off again. Returns the warnings: TFO is an optimisation, a
    host that refuses it does not stop a swap. reuseport programs set it
    themselves (ZDD_FAST_OPEN)."""
    from . import fastopen

    if svc.socket != "inherit" and not svc.fast_open:
        return []
    sock = units.socket_unit(svc.name)
    # per service, the queue length the agent last left on its listeners
    # ("0" once it looked and found none or turned it off): with fast_open 0
    # and a "0", PID 1's descriptors are not read (issue 16); no mark (an
    # older agent may have set a queue): look once
    marks = paths.state_dir / "fastopen"
    mark = marks / check_name(svc.name)

    def left(qlen: int) -> None:
        marks.mkdir(mode=0o700, parents=True, exist_ok=True)
        mark.write_text(str(qlen))

    if not svc.fast_open:
        try:
            if mark.read_text() == "0":
                return []
        except OSError:
            pass
        if svc.socket == "inherit" and sd.state(sock).active == "active":
            try:  # nothing was asked: a host that refuses the look is not warned about
                fastopen.ensure(svc.ports, [1], 0)
            except (fastopen.FastOpenError, OSError):
                return []  # looked for again at the next swap
        left(0)
        return []
    running = svc.socket == "inherit" and sd.state(sock).active == "active"
    warnings = []
    # the server bit, for the socket unit's listeners and a reuseport
    # program's own alike
    s = Sysctl(paths.state_dir)
    value = s.read(fastopen.SYSCTL)
    if value is not None and not fastopen.server_enabled(value):
        overrides = dict(load_agent_config(paths.agent_config).sysctl)
        if fastopen.SYSCTL in overrides and overrides[fastopen.SYSCTL] is None:
            warnings.append(f"{fastopen.SYSCTL} is {value} (no server bit 0x2) and agent.yaml "
                            "tells the agent to leave it alone: fast_open has no effect")
        else:
            new = str(int(value, 0) | fastopen.SERVER_ENABLE)
            s.apply([Change(fastopen.SYSCTL, value, new)])
            warnings.append(f"set {fastopen.SYSCTL} = {new} (was {value}) for fast_open")
    if svc.socket != "inherit":
        return warnings  # the program sets TCP_FASTOPEN itself (ZDD_FAST_OPEN)
    if not running:
        sd.start(sock)  # what the first instance's Requires= would do a moment later
        deadline = time.monotonic() + 5.0
        while sd.state(sock).active != "active" and time.monotonic() < deadline:
            time.sleep(0.02)
    try:
        found, changes = fastopen.ensure(svc.ports, [1], svc.fast_open)
    except (fastopen.FastOpenError, OSError) as e:
        found, changes = [], []
        warnings.append(f"cannot enable TCP Fast Open on {sock}'s listeners: {e}; clients "
                        "fall back to a normal handshake")
    else:
        if not found:
            warnings.append(f"no listener of {sock} found held by PID 1 on ports "
                            f"{', '.join(map(str, svc.ports))}: TCP Fast Open not enabled")
        left(svc.fast_open)
    for c in changes:
        (emit or (lambda kind, data: None))(
            "fast_open", {"address": c.listener.address, "old": c.old,
                          "qlen": c.listener.qlen, "unit": sock})
    return warnings


def _backlog(paths: Paths) -> int:
    overrides = dict(load_agent_config(paths.agent_config).sysctl)
    value = overrides.get("net.core.somaxconn", DEFAULTS["net.core.somaxconn"])
    return int(value or DEFAULTS["net.core.somaxconn"])


def install_units(svc: ServiceConfig, sd: Systemd, backlog: int) -> dict[str, str | None]:
    """Render and write the service's units; refuse to move a running
    listener. Returns what the files that changed held before (None: new),
    for a rollback to put back (SystemdOps.restore_units)."""
    rendered = units.render_service(svc, backlog).files
    sock = units.socket_unit(svc.name)
    installed = sd.read_unit_file(sock)
    if installed is not None and _listen_lines(installed) != _listen_lines(rendered.get(sock)):
        if sd.state(sock).active in ("active", "activating"):
            raise ConfigError(
                f"{svc.path}: listen: differs from the running {sock} "
                f"({', '.join(_listen_lines(installed))}); moving a listener would drop its "
                f"queue. Stop every instance and {sock} first, then swap again.",
                file=str(svc.path), key="listen")
    template = units.template_unit(svc.name)
    if sd.read_unit_file(template) != rendered[template]:
        # Drop-ins written before the template had its own ExecStart= lack the
        # line that resets it: two ExecStart= would make their units unloadable.
        # Only when the template changes, not at every swap.
        for unit in sd.list_units(f"zdd-{svc.name}@*.service"):
            instance = units.version_of(svc.name, unit)
            rel = units.dropin_path(svc.name, instance) if instance else None
            text = sd.read_unit_file(rel) if rel else None
            if rel and text and "\nExecStart=\n" not in text:
                rendered[rel] = text.replace("\nExecStart=", "\nExecStart=\nExecStart=", 1)
    previous = {rel: sd.read_unit_file(rel) for rel in rendered}
    changed = sd.write_unit_files(rendered)
    if changed:
        sd.reload()
    if sd.is_enabled(units.TARGET) != "enabled":
        sd.enable(units.TARGET)
    return {rel: previous[rel] for rel in changed}


def instance_version(svc: ServiceConfig, sd: Systemd, instance: str) -> str:
    """The version an instance runs, from its drop-in (VERSION-N is ambiguous
    when versions themselves end in -N)."""
    return units.dropin_version(sd.read_unit_file(units.dropin_path(svc.name, instance))) \
        or instance


def instances_of(svc: ServiceConfig, sd: Systemd) -> dict[str, list[str]]:
    """version -> its instances that are running or starting."""
    out: dict[str, list[str]] = {}
    for unit in sd.list_units(f"zdd-{svc.name}@*.service"):
        instance = units.version_of(svc.name, unit)
        if instance is None:
            continue
        if sd.state(unit).active in ("active", "activating", "reloading"):
            out.setdefault(instance_version(svc, sd, instance), []).append(instance)
    return {v: sorted(xs) for v, xs in out.items()}


def active_versions(svc: ServiceConfig, sd: Systemd) -> list[str]:
    return sorted(instances_of(svc, sd))


def serving_version(svc: ServiceConfig, sd: Systemd, st: ServiceState,
                    exclude: str | None = None) -> str | None:
    """The instance serving now according to systemd, preferring the recorded one."""
    active = active_versions(svc, sd)
    if st.serving in active:
        return st.serving
    others = [v for v in active if v != exclude]
    if len(others) > 1:
        raise SystemdError(f"several instances of {svc.name} are active "
                           f"({', '.join(others)}) and none is recorded as serving; stop all "
                           "but one (systemctl stop zdd-NAME@VERSION.service), then swap again")
    return others[0] if others else None


def _serving_or_none(svc: ServiceConfig, sd: Systemd, st: ServiceState) -> str | None:
    try:
        return serving_version(svc, sd, st)
    except SystemdError:
        return None


def _runner(svc: ServiceConfig, sd: Systemd, store: StateStore, state: ServiceState,
            emit: Emit | None, interrupted: Callable[[], bool] | None = None,
            backup: dict[str, str | None] | None = None) -> Swap:
    def intent(old: str | None, new: str, phase: str, extra: dict[str, Any]) -> None:
        state.intent = {"from": old, "to": new, "phase": phase, "pid": os.getpid(),
                        "at": time.time(), **extra}
        store.save(state)

    return Swap(svc, SystemdOps(svc, sd, backup), SystemClock(), emit, intent, interrupted)


def _finish(store: StateStore, state: ServiceState, result: SwapResult) -> None:
    """Record the swap and clear its intent in one atomic write."""
    state.intent = None
    if result.result != "unchanged" or state.serving != result.to_version:
        state.record(result.to_dict())
    store.save(state)


def recover(svc: ServiceConfig, sd: Systemd, store: StateStore, state: ServiceState,
            emit: Emit | None = None) -> SwapResult | None:
    """Finish or revert a swap left behind by an agent that died (lock held)."""
    intent = state.intent
    if not intent:
        return None
    result = _runner(svc, sd, store, state, emit).recover(intent)
    _finish(store, state, result)
    return result


def plan(paths: Paths, name: str, version: str) -> dict[str, Any]:
    """What a swap would do, changing nothing (swap --dry-run)."""
    svc = load_service(paths.config_dir, name)
    preflight(svc, version)
    state = StateStore(paths.state_dir).load(name)
    with Systemd() as sd:
        old = serving_version(svc, sd, state, exclude=version)
        olds = instances_of(svc, sd).get(old, []) if old else []
        mem = instance_memory(sd, [units.instance_unit(name, x) for x in olds],
                              units.slice_unit(name))
    batches: list[rollout.Batch] = []
    headroom = ""
    if old != version:
        try:
            batches, headroom = fitted_plan(svc, olds, mem)
        except ValueError as e:
            raise SwapFailed(str(e)) from None
    return {"service": name, "from_version": old, "to_version": version,
            "replicas": svc.replicas, "max_surge": svc.max_surge,
            "max_unavailable": svc.max_unavailable, "old_instances": olds,
            "new_instances": instance_ids(version, svc.replicas) if batches else [],
            "plan": rollout.describe(batches), "headroom": headroom,
            "batches": [{"stop_first": b.stop_first, "start": b.start, "drain": b.drain}
                        for b in batches]}


def swap(paths: Paths, name: str, version: str, emit: Emit | None = None,
         interrupted: Callable[[], bool] | None = None,
         watched: bool = False, auto_revert: str | None = None) -> SwapResult:
    """Swap `name` to `version` under the service's lock. `interrupted` is
    polled by the swap (a --local CLI's SIGINT/SIGTERM); `watched` says
    that the daemon will watch the new version afterwards (strategy.watch);
    `auto_revert` is the watch's reason when it swaps back by itself (no
    bake: the version it returns to served until the last swap)."""
    cpu0 = time.thread_time()
    try:
        result = _swap(paths, name, version, emit, interrupted, watched, auto_revert)
    except SwapFailed as e:
        _command_cpu(e.details.get("result"), cpu0)
        raise
    _command_cpu(result, cpu0)
    return result


def _command_cpu(result: object, cpu0: float) -> None:
    """The swap command's CPU in this thread (ms) as result.cpu_ms["command"]."""
    if isinstance(result, SwapResult):
        result.cpu_ms["command"] = round((time.thread_time() - cpu0) * 1000, 1)


def _swap(paths: Paths, name: str, version: str, emit: Emit | None,
          interrupted: Callable[[], bool] | None, watched: bool,
          auto_revert: str | None) -> SwapResult:
    svc = load_service(paths.config_dir, name)
    if auto_revert is not None:
        svc = dataclasses.replace(svc, min_ready=0.0)
    preflight(svc, version)
    backlog = _backlog(paths)
    store = StateStore(paths.state_dir)
    with store.lock(name):
        state = store.load(name)
        if svc.socket == "reuseport":
            ensure_migrate_req(paths, emit)
        with Systemd() as sd:
            backup = install_units(svc, sd, backlog)
            try:
                return _swap_installed(svc, sd, store, state, paths, version, emit,
                                       interrupted, watched, auto_revert, backup)
            except SwapFailed:
                raise  # the swap put the units back itself
            except BaseException:
                put_back_units(sd, backup)
                raise


def _swap_installed(svc: ServiceConfig, sd: Systemd, store: StateStore, state: ServiceState,
                    paths: Paths, version: str, emit: Emit | None,
                    interrupted: Callable[[], bool] | None, watched: bool,
                    auto_revert: str | None, backup: dict[str, str | None]) -> SwapResult:
    """swap() once the units are written: under the lock, with systemd."""
    say = emit or (lambda kind, data: None)
    access = apply_socket_access(svc)
    recover(svc, sd, store, state, emit)
    old = serving_version(svc, sd, state, exclude=version)
    if old is None and version in active_versions(svc, sd):
        old = version  # it runs already (no record of it): nothing to do
    warnings = access + [
        f"a process outside zdd-agent listens on {s['address']} (pid {s['pid']} "
        f"{s['comm']}): it takes a share of new connections and no swap replaces it"
        for s in stray_listeners(svc, sd)]
    warnings += ensure_fast_open(svc, sd, paths, emit)
    for w in warnings:
        say("warning", {"message": w})
    state.watch = None  # a new swap ends any watch of the last one
    runner = _runner(svc, sd, store, state, emit, interrupted, backup)
    try:
        result = runner.run(old, version)
    except SwapFailed as e:
        res = e.details["result"]
        assert isinstance(res, SwapResult)
        res.warnings[:0] = warnings
        _finish(store, state, res)
        raise
    result.warnings[:0] = warnings
    if auto_revert is not None and result.result == "ok":
        result.result = "auto_reverted"
        result.reason = auto_revert
    if result.result == "unchanged":
        # nothing new started, so nothing proves new unit files: the serving
        # version keeps the ones it runs with until a swap to another version
        put_back = put_back_units(sd, backup)
        if put_back:
            result.warnings.append(f"{', '.join(put_back)} left as the serving version runs "
                                   "them: the config's changes take effect at the next swap "
                                   "to another version")
    if result.result in ("ok", "auto_reverted"):
        disable_others(svc, sd, set(instance_ids(version, svc.replicas)))
        result.watch = watch_note(svc, version, old, watched, time.time())
        if watched and svc.watch > 0:
            state.watch = dict(result.watch)
    _finish(store, state, result)
    return result


def watch_note(svc: ServiceConfig, version: str, old: str | None, watched: bool,
               now: float) -> dict[str, Any]:
    """Who watches `version` after its swap (strategy.watch), for the result."""
    if svc.watch <= 0:
        return {"seconds": 0, "note": "strategy.watch is 0: nothing watches the new version"}
    if old is None or old == version:
        return {"seconds": 0, "note": "a first deploy: there is no previous version to "
                                      "revert to"}
    if not watched:
        return {"seconds": 0, "note": f"swapped in-process (--local, or no daemon running): "
                                      f"nothing watches {version} and nothing reverts it by "
                                      "itself"}
    return {"seconds": svc.watch, "until": now + svc.watch, "version": version,
            "previous": old, "by": "daemon"}


def disable_others(svc: ServiceConfig, sd: Systemd, keep: set[str]) -> list[str]:
    """Disable every instance of the service enabled for boot but `keep`, even
    those not running (crashed, stopped by hand): after a reboot only the
    serving version may start on the socket."""
    wants = sd.unit_dir / f"{units.TARGET}.wants"
    out = []
    for link in sorted(wants.glob(f"zdd-{svc.name}@*.service")) if wants.is_dir() else []:
        instance = units.version_of(svc.name, link.name)
        if instance is None or instance in keep:
            continue
        if sd.state(link.name).active in ("active", "activating", "reloading"):
            continue  # running: the swap that owns it decides
        sd.disable(link.name)
        out.append(link.name)
    return out


def stray_listeners(svc: ServiceConfig, sd: Systemd) -> list[dict[str, Any]]:
    """LISTEN sockets on the service's ports that no instance the agent
    manages holds (a forgotten process sharing the port through SO_REUSEPORT)."""
    from . import listeners

    known: set[int] = set()
    for unit in sd.list_units(f"zdd-{svc.name}@*.service"):
        try:
            known.update(sd.processes(unit))
        except SystemdError:
            return []  # an instance's processes unknown: nothing can be called foreign
    try:
        tcp = [(lst.host, lst.port) for lst in svc.listen if not lst.unix]
        return ((listeners.strays(tcp, known) if tcp else [])
                + (listeners.strays_unix(svc.unix_paths, known) if svc.unix_paths else []))
    except OSError:
        return []


def unix_listeners(svc: ServiceConfig) -> list[dict[str, Any]]:
    """Each unix: listener as the host shows it: whether a socket listens at
    its path (unix_diag), its accept queue, and its file: owner, group, mode
    and whether the file is that listener's own (UNIX_DIAG_VFS: a file
    removed or replaced since the socket unit bound it leaves the listener
    unreachable, whatever systemd says)."""
    from . import unixdiag

    try:
        socks = unixdiag.listening(svc.unix_paths)
    except OSError:
        socks = []
    out: list[dict[str, Any]] = []
    for path in svc.unix_paths:
        mine = [x for x in socks if x.name == path]
        entry: dict[str, Any] = {"path": path, "listening": bool(mine),
                                 "queued": sum(x.queued for x in mine),
                                 "backlog": max((x.backlog for x in mine), default=0),
                                 "file": None}
        try:
            st = os.lstat(path)
        except OSError:
            out.append(entry)
            continue
        vfs = {x.file_id for x in mine if x.vfs}
        entry["file"] = {"owner": _user_name(st.st_uid), "group": _group_name(st.st_gid),
                         "mode": f"{stat.S_IMODE(st.st_mode):04o}",
                         "socket": stat.S_ISSOCK(st.st_mode),
                         "bound": (st.st_ino, st.st_dev) in vfs}
        out.append(entry)
    return out


def nat_ports(svc: ServiceConfig, sd: Systemd, running: bool) -> list[int]:
    """The private ports new connections should go to (socket: nat): those of
    the instances enabled for boot (the serving ones), and with `running`
    only those active now; from their drop-ins."""
    wants = sd.unit_dir / f"{units.TARGET}.wants"
    out = []
    for link in sorted(wants.glob(f"zdd-{svc.name}@*.service")) if wants.is_dir() else []:
        instance = units.version_of(svc.name, link.name)
        if instance is None:
            continue
        if running and sd.state(link.name).active not in ("active", "reloading"):
            continue
        port = units.dropin_port(sd.read_unit_file(units.dropin_path(svc.name, instance)))
        if port is not None:
            out.append(port)
    return out


def nat_restore(paths: Paths) -> list[dict[str, Any]]:
    """The agent's nftables table as the configs and the enabled instances
    say, in one transaction per service: at boot before the instances
    start (zdd-agent-nat.service), when the table was lost or changed by
    hand. Each config file on its own: one that does not parse (or one
    service nftables refuses) is reported and the others are restored; the
    chains of a service whose file does not parse are left as they are,
    those of services that are no longer socket: nat go. Raises NatError,
    after doing all it could, when anything failed."""
    from . import nat
    from .config import read_yaml

    nft = nat.Nft()
    out: list[dict[str, Any]] = []
    errors: list[str] = []
    keep: set[str] = set()
    files = sorted(paths.config_dir.glob("*.yaml")) if paths.config_dir.is_dir() else []
    with Systemd() as sd:
        for path in files:
            keep.add(path.stem)
            try:
                svc = parse_service(path, read_yaml(path), expected_name=path.stem)
            except ZddError as e:
                errors.append(str(e))
                out.append({"service": path.stem, "error": str(e)})
                continue
            if svc.socket != "nat":
                keep.discard(svc.name)
                continue
            try:
                ports = nat_ports(svc, sd, running=False)
                nft.apply(nat.Route(svc.name, tuple((lst.host, lst.port)
                                                    for lst in svc.listen), tuple(ports)))
            except (ZddError, OSError) as e:
                errors.append(f"{svc.name}: {e}")
                out.append({"service": svc.name, "error": str(e)})
                continue
            out.append({"service": svc.name, "ports": ports})
    for name in sorted(set(nat.routed(nft.table())) - keep):
        nft.remove(name)
        out.append({"service": name, "removed": True})
    if errors:
        raise nat.NatError("; ".join(errors), result=out)
    return out


def apply_socket_access(svc: ServiceConfig) -> list[str]:
    """socket_user, socket_group and socket_mode, applied to the live file of
    each unix: listener. systemd sets them when the socket unit binds
    (SocketUser=...), and the socket unit is never restarted by a swap (that
    would drop its queue), so a config changed since would otherwise wait
    for the next reboot. Only the listener's own file is changed (its inode
    is the one unix_diag reports for the listener, UNIX_DIAG_VFS), through
    an O_PATH descriptor opened without following a link. Returns what was
    changed, or why it could not be, one line each."""
    from . import unixdiag

    if not svc.unix_paths:
        return []
    try:
        uid = pwd.getpwnam(svc.socket_user or "root").pw_uid
        gid = grp.getgrnam(svc.socket_group or "root").gr_gid
        socks = unixdiag.listening(svc.unix_paths)
    except (KeyError, OSError):
        return []  # preflight names a missing user or group; no netlink, no change
    mode = int(svc.socket_mode or "0660", 8)
    out = []
    for path in svc.unix_paths:
        bound = {x.file_id for x in socks if x.name == path and x.vfs}
        try:
            fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue  # no file yet: the socket unit creates it as configured
        try:
            st = os.fstat(fd)
            if not stat.S_ISSOCK(st.st_mode) or (st.st_ino, st.st_dev) not in bound:
                continue  # not the listener's file: doctor says so, nothing to fix here
            have = (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode))
            if have == (uid, gid, mode):
                continue
            # chown/chmod of /proc/self/fd/N reach the inode the O_PATH fd holds
            os.chown(f"/proc/self/fd/{fd}", uid, gid)
            os.chmod(f"/proc/self/fd/{fd}", mode)
            out.append(f"{path}: {_user_name(have[0])}:{_group_name(have[1])} {have[2]:04o} -> "
                       f"{_user_name(uid)}:{_group_name(gid)} {mode:04o} as the config says "
                       "(the running socket unit keeps its file)")
        except OSError as e:
            out.append(f"{path}: cannot apply socket_user/socket_group/socket_mode: "
                       f"{e.strerror or e}")
        finally:
            os.close(fd)
    return out


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def rollback(paths: Paths, name: str, emit: Emit | None = None,
             interrupted: Callable[[], bool] | None = None,
             watched: bool = False) -> SwapResult:
    state = StateStore(paths.state_dir).load(name)
    if not state.previous:
        raise NoHistoryError(f"no previous version of {name} is recorded; nothing to roll "
                             "back to (use swap --version)")
    return swap(paths, name, state.previous, emit, interrupted, watched)


def status(paths: Paths, name: str | None = None) -> list[dict[str, Any]]:
    store = StateStore(paths.state_dir)
    if name is not None:
        svcs = [load_service(paths.config_dir, name)]
    else:
        svcs = load_all(paths.config_dir)
    out = []
    with Systemd() as sd:
        for svc in svcs:
            warning = None
            try:
                st = store.load(svc.name)
            except StateError as e:  # moved aside; systemd still knows what runs
                st, warning = ServiceState(svc.name), str(e)
            census = service_census(svc, sd)
            instances: list[dict[str, Any]] = []
            groups: dict[str, list[int]] = {}
            for unit in sd.list_units(f"zdd-{svc.name}@*.service"):
                instance = units.version_of(svc.name, unit)
                if instance is None:
                    continue
                us = sd.state(unit)
                enabled = sd.is_enabled(unit)
                if us.active == "inactive" and enabled != "enabled":
                    continue  # retired: systemd keeps it loaded until it collects it
                groups[instance] = _processes_or_none(sd, unit)
                instances.append({"instance": instance,
                                  "version": instance_version(svc, sd, instance),
                                  "unit": unit, "active": us.active,
                                  "sub": us.sub, "main_pid": us.main_pid,
                                  "enabled": enabled,
                                  "since": us.since_us / 1e6 if us.since_us else None})
            counts = census.count_many(groups) if groups else {}
            for inst in instances:
                inst["connections"] = counts.get(inst["instance"], 0)
            sock = units.socket_unit(svc.name)
            last = st.last
            running = [i for i in instances if i["active"] in ("active", "reloading")]
            watch_state = dict(st.watch) if st.watch else None
            if watch_state is not None:
                watch_state["active"] = float(watch_state.get("until", 0)) > time.time()
            out.append({
                "service": svc.name,
                # deployed once and nothing runs now: down must look down (exit 11);
                # a service configured but never deployed is not down, just not there yet
                "down": not running and bool(st.serving or st.history),
                "strays": stray_listeners(svc, sd),
                "watch": watch_state,
                "serving": _serving_or_none(svc, sd, st),
                "recorded_serving": st.serving,
                "previous": st.previous,
                "since": st.since,
                "socket": {"mode": svc.socket, "listen": [str(lst) for lst in svc.listen],
                           "unit": sock if svc.socket == "inherit" else None,
                           "active": sd.state(sock).active if svc.socket == "inherit" else None,
                           "unix": unix_listeners(svc),
                           "routed": _routed_ports(svc)},
                "instances": instances,
                "warning": warning,
                "last_swap": None if last is None else {
                    k: last.get(k) for k in ("from_version", "to_version", "result", "reason",
                                             "started_at", "seconds")},
            })
    return out


def _routed_ports(svc: ServiceConfig) -> list[int] | None:
    """socket: nat: the ports the kernel's rules send new connections to
    now ([] none; None for other modes, or when nftables cannot be read)."""
    if svc.socket != "nat":
        return None
    from . import nat

    try:
        return list((nat.routed(nat.Nft().table()).get(svc.name) or {}).get("ports", []))
    except nat.NatError:
        return None


def watch(paths: Paths, name: str, interval: float, seconds: float,
          out: Callable[[dict[str, Any]], None]) -> None:
    """Every `interval` for `seconds`: each running instance's established
    connections (the census a drain uses), as {"t": epoch, "connections":
    {instance: n}}. For `verify`'s plot and for watching a swap by hand."""
    svc = load_service(paths.config_dir, name)
    end = time.monotonic() + seconds
    with Systemd() as sd:
        census = service_census(svc, sd)
        while (now := time.monotonic()) < end:
            t = time.time()
            groups = {}
            for unit in sd.list_units(f"zdd-{svc.name}@*.service"):
                instance = units.version_of(svc.name, unit)
                pids = _processes_or_none(sd, unit) if instance is not None else []
                if instance is not None and pids:
                    groups[instance] = pids
            out({"t": round(t, 3), "connections": census.count_many(groups)})
            time.sleep(max(0.0, interval - (time.monotonic() - now)))
