"""`zdd-agent doctor`: what this host and each service need for a swap with
zero failed requests, checked on the live system. Each finding names the
symptom an operator would see, its cause, the command that verifies it and
the fix."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

from . import deploy, oom, units
from .config import ServiceConfig, load_all
from .errors import ZddError
from .servers import probe_blind, read_head
from .settings import Host, effective_nofile, explain, this_host
from .state import StateStore
from .swap import Memory, fit_plan

MIGRATE_REQ = Path("/proc/sys/net/ipv4/tcp_migrate_req")
SHELLS = {"sh", "bash", "dash", "zsh", "ash", "ksh"}
WRAPPERS = {"tini", "dumb-init", "catatonit"}
MIN_SYSTEMD = 243  # TimeoutAbortSec= in the agent's unit
MIN_NOFILE = 4096


@dataclass(frozen=True)
class Finding:
    level: str  # ok, warn, fail
    check: str
    subject: str  # "host" or a service name
    symptom: str = ""
    cause: str = ""
    verify: str = ""
    fix: str = ""

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def signal_mask(pid: int, field: str) -> int:
    """SigCgt (caught), SigIgn (ignored) or SigBlk of a process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1], 16)
    return 0


def handles(pid: int, signum: int) -> str:
    """'caught', 'ignored' or 'default' for one signal of one process."""
    bit = 1 << (signum - 1)
    if signal_mask(pid, "SigCgt") & bit:
        return "caught"
    if signal_mask(pid, "SigIgn") & bit:
        return "ignored"
    return "default"


def open_files_limit(pid: int) -> int | None:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft = line.split()[3]
            return None if soft == "unlimited" else int(soft)
    return None


def kernel_findings(services: list[ServiceConfig]) -> list[Finding]:
    release = os.uname().release
    reuseport = [s.name for s in services if s.socket == "reuseport"]
    if not MIGRATE_REQ.exists():
        return [Finding(
            "fail" if reuseport else "ok", "kernel", "host",
            symptom=("reset connections at every swap of " + ", ".join(reuseport)) if reuseport
            else "",
            cause=f"Linux {release} has no net.ipv4.tcp_migrate_req (5.14+): a closing "
                  "SO_REUSEPORT listener resets its queued connections",
            verify="sysctl net.ipv4.tcp_migrate_req",
            fix="socket: inherit (a shared socket unit), or a 5.14+ kernel")]
    value = MIGRATE_REQ.read_text().strip()
    if reuseport and value != "1":
        return [Finding("fail", "kernel", "host",
                        symptom="reset connections at every swap of " + ", ".join(reuseport),
                        cause=f"net.ipv4.tcp_migrate_req is {value}",
                        verify="sysctl net.ipv4.tcp_migrate_req",
                        fix="zdd-agent sysctl apply (the agent also sets it before a "
                            "reuseport swap)")]
    return [Finding("ok", "kernel", "host", cause=f"Linux {release}, tcp_migrate_req={value}")]


def nat_host_findings(services: list[ServiceConfig]) -> list[Finding]:
    """socket: nat needs nftables (reachable, with NAT, redirect, DNAT and
    numgen maps in the kernel) and connection tracking."""
    from . import nat

    users = [s.name for s in services if s.socket == "nat"]
    if not users:
        return []
    problems = nat.support_problems()
    if problems:
        return [Finding("fail", "nat", "host",
                        symptom="no new connection reaches " + ", ".join(users),
                        cause="; ".join(problems),
                        verify="nft list tables; ls /proc/sys/net/netfilter",
                        fix="apt-get install nftables python3-nftables; a kernel with "
                            "nf_tables, nft_nat, nft_redir, nft_numgen, nf_conntrack")]
    return [Finding("ok", "nat", "host", cause=f"nftables NAT and conntrack for "
                                               f"{', '.join(users)} ({nat.Nft().via})")]


def nat_findings(svc: ServiceConfig, sd: deploy.Systemd) -> list[Finding]:
    """The rules send the public addresses to the serving instances' ports,
    and to nothing else (drift: a table changed by hand, lost, or left by
    an agent that died)."""
    from . import nat

    if svc.socket != "nat":
        return []
    try:
        routed = nat.routed(nat.Nft().table()).get(svc.name)
    except nat.NatError as e:
        return [Finding("fail", "nat", svc.name, cause=f"cannot read the NAT rules: {e}")]
    want = sorted(deploy.nat_ports(svc, sd, running=True))
    have = sorted(routed["ports"]) if routed else []
    verify = f"nft list chain inet {nat.TABLE} {nat.chain_name(svc.name, 'output')}"
    if routed is None or have != want:
        return [Finding("fail", "nat", svc.name,
                        symptom=(f"connections to {', '.join(map(str, svc.ports))} go to "
                                 f"port(s) {have or 'nowhere'}"),
                        cause=f"the rules differ from the serving instances' ports {want}",
                        verify=verify,
                        fix="zdd-agent nat restore (or the next swap sets them right)")]
    return [Finding("ok", "nat", svc.name,
                    cause=f"{', '.join(map(str, svc.ports))} -> {', '.join(map(str, have))}")]


def sysctl_findings(paths: deploy.Paths) -> list[Finding]:
    from .commands import sysctl_plan

    _s, plan = sysctl_plan(paths)
    differ = [c for c in plan if c.differs]
    if not differ:
        return [Finding("ok", "sysctl", "host", cause="every managed sysctl as wanted")]
    return [Finding("warn", "sysctl", "host",
                    symptom="SYN drops or refused connections in bursts while instances "
                            "start and stop; ephemeral ports colliding with service ports",
                    cause="; ".join(f"{c.key} is {c.old}, wanted {c.new}" for c in differ),
                    verify="zdd-agent sysctl check", fix="zdd-agent sysctl apply")]


FASTOPEN_SYSCTL = Path("/proc/sys/net/ipv4/tcp_fastopen")
FASTOPEN_VERIFY = "nstat -az TcpExtTCPFastOpenPassive TcpExtTCPFastOpenCookieReqd"


def fastopen_host_findings(services: list[ServiceConfig],
                           value: str | None = None) -> list[Finding]:
    """With a service's fast_open set: the namespace's tcp_fastopen must have
    the server bit (0x2), or no listener gives a cookie (ip-sysctl.rst)."""
    from . import fastopen

    users = [s.name for s in services if s.fast_open]
    if not users:
        return []
    if value is None:
        try:
            value = FASTOPEN_SYSCTL.read_text().strip()
        except OSError:
            value = None
    if not fastopen.server_enabled(value):
        return [Finding("fail", "fast-open", "host",
                        symptom="fast_open of " + ", ".join(users) + " has no effect: TFO "
                                "clients never get a cookie and send their data after the "
                                "handshake",
                        cause=f"net.ipv4.tcp_fastopen is {value}: no server bit (0x2)",
                        verify="sysctl net.ipv4.tcp_fastopen",
                        fix="zdd-agent sysctl apply (sets 3; a swap of a fast_open service "
                            "also sets the bit)")]
    return [Finding("ok", "fast-open", "host",
                    cause=f"net.ipv4.tcp_fastopen={value}: the server side is on")]


def fastopen_findings(svc: ServiceConfig, sd: deploy.Systemd, serving: str | None,
                      manager_pid: int = 1) -> list[Finding]:
    """Each listener's TFO queue (TCP_FASTOPEN read back through a duplicate of
    its descriptor, fastopen.py) against fast_open: the socket unit's
    (held by systemd, `manager_pid`) for inherit, each running instance's
    own for reuseport."""
    from . import fastopen

    name = svc.name
    want = fastopen.effective(svc.fast_open, fastopen.somaxconn())
    if svc.socket == "inherit":
        sock = units.socket_unit(name)
        if sd.state(sock).active != "active":
            return []
        groups = {sock: [manager_pid]}
    elif not svc.fast_open:
        return []  # the program's own business
    else:
        groups = {}
        for xs in deploy.instances_of(svc, sd).values():
            for x in xs:
                unit = units.instance_unit(name, x)
                try:
                    groups[unit] = sd.processes(unit)
                except ZddError:
                    continue
    out: list[Finding] = []
    seen = []
    for owner, pids in groups.items():
        try:
            found = fastopen.read(svc.ports, pids)
        except (ZddError, OSError) as e:
            if not svc.fast_open:
                return []  # nothing asked: a host that refuses the look is not a finding
            return [Finding("warn", "fast-open", name,
                            cause=f"cannot read TCP_FASTOPEN of {owner}'s listeners: {e}")]
        for ln in found:
            seen.append(ln)
            if ln.qlen == want:
                continue
            if svc.fast_open and svc.socket == "reuseport":
                out.append(Finding(
                    "warn", "fast-open", name,
                    symptom="TFO clients wait a round trip on connections this listener "
                            "takes: it accepts no data in a SYN",
                    cause=f"{ln.address} of {owner} (PID {ln.pid}) has TFO queue {ln.qlen}, "
                          f"fast_open is {svc.fast_open}: the program does not set "
                          "TCP_FASTOPEN",
                    verify=FASTOPEN_VERIFY,
                    fix="setsockopt(IPPROTO_TCP, TCP_FASTOPEN, $ZDD_FAST_OPEN) before "
                        "listen() (docs/fast-open.md)"))
            elif svc.fast_open:
                out.append(Finding(
                    "warn", "fast-open", name,
                    symptom="TFO clients wait a round trip: the listener accepts no data in "
                            "a SYN (TCPFastOpenCookieReqd rises, TCPFastOpenPassive does not)",
                    cause=f"{ln.address} of {owner} has TFO queue {ln.qlen}, wanted {want} "
                          "(fast_open): the socket unit was restarted since the last swap",
                    verify=FASTOPEN_VERIFY,
                    fix=f"zdd-agent swap {name} --version {serving or 'VERSION'} (sets it "
                        "again; a swap to the serving version changes nothing else)"))
            else:
                out.append(Finding(
                    "warn", "fast-open", name,
                    symptom="data in a SYN reaches the program though fast_open is off: a "
                            "first request may be replayed (RFC 7413 section 6.3.1)",
                    cause=f"{ln.address} of {owner} has TFO queue {ln.qlen}, fast_open is 0",
                    verify=FASTOPEN_VERIFY,
                    fix=f"zdd-agent swap {name} --version {serving or 'VERSION'} (turns it "
                        "off), or unset bit 0x400 of net.ipv4.tcp_fastopen (TFO on every "
                        "listener) and restart the socket unit"))
    if not out and svc.fast_open and seen:
        out.append(Finding("ok", "fast-open", name,
                           cause=f"TFO queue {want} on "
                                 + ", ".join(sorted({ln.address for ln in seen}))))
    return out


def systemd_findings(version: int | None) -> list[Finding]:
    if version is None:
        return [Finding("fail", "systemd", "host", symptom="nothing can be swapped",
                        cause="systemd does not answer", verify="systemctl --version",
                        fix="run on a host whose init is systemd, as root")]
    if version < MIN_SYSTEMD:
        return [Finding("warn", "systemd", "host",
                        symptom="the agent's unit fails to load (TimeoutAbortSec=)",
                        cause=f"systemd {version} is older than {MIN_SYSTEMD}",
                        verify="systemctl --version", fix="upgrade systemd")]
    return [Finding("ok", "systemd", "host", cause=f"systemd {version}")]


def process_findings(svc: ServiceConfig, pid: int) -> list[Finding]:
    """What the serving instance's main process will do with the drain."""
    out: list[Finding] = []
    name = svc.name
    try:
        proc = psutil.Process(pid)
        # A #! script's comm is the script's name; its exe is the interpreter.
        comm = os.path.basename(proc.exe()) or proc.name()
        children = proc.children()
    except psutil.Error:
        return [Finding("warn", "process", name, cause=f"cannot inspect PID {pid}")]
    sig = svc.drain.signal
    how = handles(pid, int(getattr(signal, sig)))
    if comm in SHELLS and children:
        out.append(Finding(
            "fail", "pid1-wrapper", name,
            symptom=f"the program never sees {sig}: no drain; killed at the grace period",
            cause=f"PID {pid} is {comm}, which started {children[0].name()} "
                  f"(PID {children[0].pid}) instead of exec'ing it",
            verify=f"ps --ppid {pid} -o pid,comm",
            fix="exec the program at the end of the script (exec /path/to/app), or run "
                "it under tini, which forwards signals"))
    elif comm in WRAPPERS:
        out.append(Finding("ok", "pid1-wrapper", name, cause=f"{comm} forwards signals"))
    if how == "default" and comm not in WRAPPERS and not (comm in SHELLS and children):
        out.append(Finding(
            "fail", "drain-signal", name,
            symptom="connections reset and requests cut at every swap",
            cause=f"PID {pid} ({comm}) does not handle {sig}: it dies at once instead of "
                  "closing its listener and finishing what it holds",
            verify=f"grep -E 'SigCgt|SigIgn' /proc/{pid}/status",
            fix=f"handle {sig} in the program (stop accepting, finish requests, exit), or "
                "set drain.signal to the one it drains on"))
    elif how == "ignored":
        out.append(Finding(
            "warn", "drain-signal", name,
            symptom=f"every drain lasts the whole grace period ({svc.drain.grace_period:g}s)",
            cause=f"PID {pid} ({comm}) ignores {sig}",
            verify=f"grep SigIgn /proc/{pid}/status",
            fix=f"handle {sig}, or set drain.signal to the one it drains on"))
    elif how == "caught":
        out.append(Finding("ok", "drain-signal", name, cause=f"PID {pid} ({comm}) handles {sig}"))
    out += open_files_findings(svc, pid, open_files_limit(pid), this_host())
    return out


def open_files_findings(svc: ServiceConfig, pid: int, limit: int | None,
                        host: Host) -> list[Finding]:
    """The serving process's soft open-files limit against what the config
    gives new instances (limits.nofile or the host's default)."""
    want = effective_nofile(svc.settings, host)
    if limit is None or limit >= want:
        return []
    low = limit < MIN_NOFILE
    return [Finding(
        "warn", "open-files", svc.name,
        symptom=(f"accept(2) fails with EMFILE beyond about {limit} connections: "
                 "connections wait or are reset") if low else "",
        cause=f"PID {pid} may open {limit} files; instances the config starts get {want}",
        verify=f"grep 'Max open files' /proc/{pid}/limits",
        fix=f"zdd-agent swap {svc.name} (the next instances start with {want})"
            + ("" if svc.settings.limits.nofile else
               ", or set limits.nofile in the config"))]


def settings_findings(svc: ServiceConfig, host: Host) -> list[Finding]:
    """What each of the unit's settings does on this host (settings.explain)."""
    return [Finding(level, "settings", svc.name, cause=line,
                    verify=f"systemctl show {units.template_unit(svc.name)}"
                    if level == "warn" else "")
            for level, line in explain(svc.settings, host, user=svc.user)]


def memory_findings(svc: ServiceConfig, olds: int, mem: Memory | None) -> list[Finding]:
    """What the swap's own headroom check (swap.fit_plan) would decide now."""
    if mem is None:
        return [Finding("warn", "memory", svc.name,
                        cause="the serving instances' memory cannot be measured (no cgroup "
                              "accounting, no processes): a swap will not check headroom")]
    mib = 1024 * 1024
    try:
        _batches, narrowed = fit_plan(svc, olds, mem)
    except ValueError as e:
        return [Finding(
            "fail", "memory", svc.name,
            symptom="a swap is refused (or, without the check, the OOM killer picks a process)",
            cause=str(e), verify="grep MemAvailable /proc/meminfo",
            fix="free memory, or set strategy.max_unavailable so instances are replaced in "
                "place")]
    if narrowed:
        return [Finding(
            "warn", "memory", svc.name, symptom="a swap runs with a smaller surge than "
                                                 "configured (slower rollout)",
            cause=narrowed, verify="grep MemAvailable /proc/meminfo",
            fix="free memory, or lower strategy.max_surge to what fits")]
    return [Finding("ok", "memory", svc.name,
                    cause=f"{mem.per_instance // mib} MiB per instance ({mem.source}), "
                          f"{mem.available // mib} MiB available")]


def config_findings(svc: ServiceConfig, version: str | None = None,
                    head: Callable[[str], bytes | None] = read_head) -> list[Finding]:
    """What the config asks that the program cannot do (no live process needed;
    `version`, when known, lets a start script under {version} be read)."""
    blind = probe_blind(svc, version, head)
    if blind is None:
        return []
    return [Finding("warn", "probe-port", svc.name, symptom=blind.symptom, cause=blind.cause,
                    verify=f"zdd-agent check-config {svc.path}; while a swap waits: "
                           "ss -Hltnp (only the socket unit's ports listen)",
                    fix=blind.fix)]


def run(paths: deploy.Paths) -> list[Finding]:
    services = load_all(paths.config_dir)
    findings = (kernel_findings(services) + sysctl_findings(paths)
                + fastopen_host_findings(services) + nat_host_findings(services))
    done: set[str] = set()
    try:
        with deploy.Systemd() as sd:
            findings += systemd_findings(sd.version())
            store = StateStore(paths.state_dir)
            for svc in services:
                findings += service_findings(svc, sd, store)
                done.add(svc.name)
    except ZddError:
        findings += systemd_findings(None)
    for svc in services:  # without systemd: from the config alone
        if svc.name not in done:
            findings += config_findings(svc) + settings_findings(svc, this_host())
    return findings


def service_findings(svc: ServiceConfig, sd: deploy.Systemd,
                     store: StateStore) -> list[Finding]:
    try:
        serving = deploy.serving_version(svc, sd, store.load(svc.name))
    except ZddError as e:
        return config_findings(svc) + [Finding("warn", "state", svc.name, cause=str(e))]
    return (config_findings(svc, serving) + settings_findings(svc, this_host())
            + _serving_findings(svc, sd, serving)
            + down_findings(svc, sd, store) + stray_findings(svc, deploy.stray_listeners(svc, sd))
            + fastopen_findings(svc, sd, serving) + nat_findings(svc, sd)
            + unix_findings(svc, deploy.unix_listeners(svc) if svc.unix_paths else []))


def unix_findings(svc: ServiceConfig, entries: list[dict[str, Any]]) -> list[Finding]:
    """The unix: listeners as deploy.unix_listeners found them: a socket
    unit's listener at each path, its file still its own, with the owner,
    group and mode the config asks for (clients such as nginx connect
    through the file: connect(2) needs write permission on it)."""
    out = []
    sock = units.socket_unit(svc.name)
    want = (svc.socket_user or "root", svc.socket_group or "root", svc.socket_mode)
    for u in entries:
        path, f = u["path"], u.get("file")
        verify = f"ls -l {path}; ss -xlp src {path}"
        restart = (f"stop every instance and {sock}, then swap again (the instances inherit "
                   "the listener the socket unit binds at its start)")
        if not u["listening"]:
            out.append(Finding("warn", "unix-socket", svc.name,
                               symptom=f"connections to unix:{path} are refused",
                               cause=f"nothing listens at {path} ({sock} not running?)",
                               verify=verify, fix=f"zdd-agent swap {svc.name} --version V "
                                                  f"(starts {sock})"))
        elif f is None or not f["socket"] or not f["bound"]:
            what = ("the file is gone" if f is None else "a file that is not a socket is there"
                    if not f["socket"] else "another file is there now")
            out.append(Finding("fail", "unix-socket", svc.name,
                               symptom=f"clients of unix:{path} fail (ENOENT or "
                                       "ECONNREFUSED; nginx: 502) while the service runs",
                               cause=f"{sock} still listens, but {what}: the listener cannot "
                                     "be reached by its path",
                               verify=verify, fix=restart))
        elif (f["owner"], f["group"], f["mode"]) != want:
            out.append(Finding("warn", "unix-socket", svc.name,
                               symptom=f"some clients of unix:{path} may be refused (EACCES) "
                                       "or others let in",
                               cause=f"{path} is {f['owner']}:{f['group']} {f['mode']}, the "
                                     f"config asks {want[0]}:{want[1]} {want[2]} (changed "
                                     f"since {sock} started)",
                               verify=verify, fix=restart))
        else:
            out.append(Finding("ok", "unix-socket", svc.name,
                               cause=f"unix:{path} {f['owner']}:{f['group']} {f['mode']}, "
                                     f"{sock}'s listener, {u['queued']} waiting to be "
                                     "accepted"))
    return out


def down_findings(svc: ServiceConfig, sd: deploy.Systemd, store: StateStore) -> list[Finding]:
    """A service that served once and has no running instance now is down."""
    if deploy.active_versions(svc, sd) or not store.load(svc.name).serving:
        return []
    last = store.load(svc.name).serving
    unit = units.instance_unit(svc.name, last) if last else f"zdd-{svc.name}@*.service"
    return [Finding("fail", "down", svc.name,
                    symptom=f"no instance of {svc.name} runs: its port answers nothing (or "
                            "only what a stray listener answers)",
                    cause=f"{unit} is not running (crashed past its restarts, or stopped by "
                          "hand)",
                    verify=f"systemctl status {unit}; journalctl -u {unit} -n 50",
                    fix=f"zdd-agent swap {svc.name} --version {last or 'VERSION'}")]


def stray_findings(svc: ServiceConfig, strays: list[dict[str, Any]]) -> list[Finding]:
    """Listeners on the service's ports that no instance the agent manages holds."""
    return [Finding("warn", "stray-listener", svc.name,
                    symptom=f"some new connections to {s['address']} reach a process "
                            "outside zdd-agent, which no swap replaces or drains",
                    cause=f"pid {s['pid']} ({s['comm']}) listens on {s['address']} outside "
                          "zdd-agent (SO_REUSEPORT shares the port with it)",
                    verify=f"ss -ltnp 'sport = :{s['address'].rpartition(':')[2]}'",
                    fix=f"stop pid {s['pid']} (a forgotten process of an earlier deploy?)")
            for s in strays]


def _serving_findings(svc: ServiceConfig, sd: deploy.Systemd,
                      serving: str | None) -> list[Finding]:
    if serving is None:
        return [Finding("ok", "serving", svc.name, cause="nothing serves yet: nothing to check "
                                                        "on a live process")]
    olds = deploy.instances_of(svc, sd).get(serving, [serving])
    unit = units.instance_unit(svc.name, olds[0])
    pid = sd.state(unit).main_pid
    if not pid:
        return [Finding("warn", "serving", svc.name, cause=f"{unit} has no main process")]
    mem = deploy.instance_memory(sd, [units.instance_unit(svc.name, x) for x in olds],
                                 units.slice_unit(svc.name))
    return (process_findings(svc, pid) + memory_findings(svc, len(olds), mem)
            + oom_findings(svc, pid, oom.score(pid)))


def oom_findings(svc: ServiceConfig, pid: int, score: int | None) -> list[Finding]:
    """A serving process still at the surge's oom_score_adj (oom.py): started
    outside a swap (systemd restarted it, or the daemon was not running at
    boot), it is the OOM killer's first pick."""
    if score != oom.SURGE_OOM_SCORE_ADJ or svc.settings.oom_score_adjust == score:
        return []
    return [Finding("warn", "oom-score", svc.name,
                    symptom="when memory runs out, the OOM killer ends the serving instance "
                            "first",
                    cause=f"PID {pid} has oom_score_adj {score}, the value new instances start "
                          "with until a swap admits them: it started outside a swap (a restart "
                          "by systemd, or a boot without the daemon)",
                    verify=f"cat /proc/{pid}/oom_score_adj",
                    fix="systemctl restart zdd-agent (its start gives serving instances their "
                        "admitted value)")]


def summary(findings: list[Finding]) -> dict[str, Any]:
    counts = {lvl: sum(1 for f in findings if f.level == lvl) for lvl in ("ok", "warn", "fail")}
    return {"findings": [f.to_dict() for f in findings], **counts}

