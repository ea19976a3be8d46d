"""`zdd-agent install` / `uninstall`: put the agent's units, its sysctl.d
file and a config skeleton in place on a real host, idempotently, saying
what changes. Uninstall keeps the operator's configs and the state.

Run from the Debian package (origin.package), the agent's units and the
sysctl.d file are the package's: install says so ("package" lines) and
writes only what the package cannot know, the sysctl.d file in /etc
carrying agent.yaml's overrides, and zdd.target (the serving instances'
target, which every swap writes too: it outlives the package, so a purge
leaves the services coming back at boot), and takes away the agent units
an earlier `zdd-agent install` from pip left in /etc/systemd/system (they
would shadow the package's). Uninstall is then apt's job."""

from __future__ import annotations

import grp
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from string import Template

from . import origin
from .defaults import DEFAULT_AGENT_CONFIG, DEFAULT_CONFIG_DIR, DEFAULT_STATE_DIR
from .errors import ConfigError
from .errors import SystemdError
from .fsutil import write_if_changed
from .systemd import UNIT_DIR, Systemd
from .sysctl import render_sysctl_d
from .units import TARGET, TEMPLATE_DIR, data_dir

SYSCTL_D = Path("/etc/sysctl.d/60-zdd-agent.conf")
AGENT_UNITS = ("zdd-agent.socket", "zdd-agent.service")
NAT_UNIT = "zdd-agent-nat.service"  # socket: nat's rules at boot (wanted by zdd.target)


@dataclass(frozen=True)
class Step:
    # create, update, unchanged, remove, run, enable, start, restart, keep,
    # package (left to the package manager)
    action: str
    target: str

    @property
    def changed(self) -> bool:
        return self.action not in ("unchanged", "keep", "package")

    def __str__(self) -> str:
        return f"{self.action:<9} {self.target}"


def executable() -> str:
    exe = Path(sys.prefix) / "bin" / "zdd-agent"
    found = exe if exe.exists() else shutil.which("zdd-agent")
    if found is None:
        raise SystemdError("cannot find the zdd-agent executable to put in ExecStart=")
    return str(Path(found).resolve() if not exe.exists() else exe)


def files(sysctl: Iterable[tuple[str, str | None]] = ()) -> dict[Path, tuple[str, int]]:
    """Installed path -> (content, mode); `sysctl`: agent.yaml's overrides."""
    service = Template((TEMPLATE_DIR / "zdd-agent.service.in").read_text()).substitute(
        exec=executable())
    return {
        UNIT_DIR / "zdd-agent.service": (service, 0o644),
        UNIT_DIR / "zdd-agent.socket": ((TEMPLATE_DIR / "zdd-agent.socket").read_text(), 0o644),
        UNIT_DIR / NAT_UNIT: (Template((TEMPLATE_DIR / f"{NAT_UNIT}.in").read_text()).substitute(
            exec=executable()), 0o644),
        UNIT_DIR / TARGET: ((TEMPLATE_DIR / TARGET).read_text(), 0o644),
        SYSCTL_D: (render_sysctl_d((data_dir("sysctl.d") / SYSCTL_D.name).read_text(), sysctl),
                   0o644),
    }


def _state(path: Path, content: str) -> str:
    if not path.exists():
        return "create"
    try:
        return "unchanged" if path.read_text() == content else "update"
    except OSError:
        return "update"


def _put(path: Path, content: str, dry_run: bool, label: str = "",
         mode: int = 0o644) -> Step:
    """Write `path` unless it holds `content` already (or dry_run); the step
    says which, `label` after the path."""
    action = _state(path, content)
    if not dry_run and action != "unchanged":
        write_if_changed(path, content, mode)
    return Step(action, f"{path}{label}")


# The first line of the files `zdd-agent install` writes (units/, sysctl.d/):
# what tells them from an operator's own override of the package's units.
WRITTEN_BY_AGENT = ("# Installed by `zdd-agent install`", "# Installed by zdd-agent")


def _written_by_agent(path: Path) -> bool:
    try:
        with path.open() as f:
            return f.readline().startswith(WRITTEN_BY_AGENT)
    except OSError:
        return False


def installed_package() -> origin.Package | None:
    return origin.package(data_dir("units").parent)


def package_steps(pkg: origin.Package, dry_run: bool,
                  sysctl: Iterable[tuple[str, str | None]] = ()) -> list[Step]:
    """The units and the sysctl.d file when the package installed them: left
    to it, save agent.yaml's sysctl overrides (an /etc/sysctl.d file of the
    same name replaces the package's, sysctl.d(5)) and the agent units an
    earlier install from pip wrote to /etc/systemd/system, which would
    shadow the package's (systemd.unit(5): /etc comes first)."""
    steps = []
    for unit in (*AGENT_UNITS, NAT_UNIT):
        steps.append(Step("package", f"{pkg.unit_dir / unit} (left to the package manager: "
                                     f"{pkg.name})"))
        shadow = UNIT_DIR / unit
        if shadow.exists() and _written_by_agent(shadow):
            steps.append(Step("remove", f"{shadow} (an earlier zdd-agent install's copy; it "
                                        "would shadow the package's unit)"))
            if not dry_run:
                shadow.unlink()
        elif shadow.exists():
            steps.append(Step("keep", f"{shadow} (not written by zdd-agent: it overrides the "
                                      "package's unit)"))
    # zdd.target is not the package's: it holds the serving instances of the
    # operator's services (every swap writes it, as here), so it stays, and
    # they come back at boot, when the package is purged
    steps.append(_put(UNIT_DIR / TARGET, (TEMPLATE_DIR / TARGET).read_text(), dry_run))
    stock = pkg.sysctl.read_text()
    content = render_sysctl_d(stock, sysctl)
    if content != stock:
        steps.append(_put(SYSCTL_D, content, dry_run, f" (agent.yaml's sysctl overrides, in "
                                                      f"place of {pkg.sysctl})"))
    else:
        steps.append(Step("package", f"{pkg.sysctl} (left to the package manager: {pkg.name}; "
                                     "agent.yaml has no sysctl overrides)"))
        if SYSCTL_D.exists() and _written_by_agent(SYSCTL_D):
            steps.append(Step("remove", f"{SYSCTL_D} (no overrides left: the package's file "
                                        "applies)"))
            if not dry_run:
                SYSCTL_D.unlink()
    return steps


def install(dry_run: bool, admin_group: str = "zdd-admin",
            sysctl: Iterable[tuple[str, str | None]] = (),
            pkg: origin.Package | None = None) -> list[Step]:
    """`pkg`: the Debian package this agent runs from (installed_package())."""
    steps: list[Step] = []
    if pkg is not None:
        steps += package_steps(pkg, dry_run, sysctl)
    else:
        steps += [_put(path, content, dry_run, mode=mode)
                  for path, (content, mode) in files(sysctl).items()]
    for d in (DEFAULT_CONFIG_DIR, DEFAULT_STATE_DIR):
        steps.append(Step("unchanged" if d.is_dir() else "create", f"{d}/"))
        if not dry_run:  # the state is private (state.py); the daemon sets its group
            d.mkdir(parents=True, exist_ok=True, mode=0o750 if d == DEFAULT_STATE_DIR else 0o755)
    example = (Path(__file__).parent / "agent.yaml.example").read_text()
    steps.append(Step("unchanged" if DEFAULT_AGENT_CONFIG.exists() else "create",
                      f"{DEFAULT_AGENT_CONFIG} (kept if present)"))
    if not dry_run and not DEFAULT_AGENT_CONFIG.exists():
        write_if_changed(DEFAULT_AGENT_CONFIG, example, 0o644)
    try:
        grp.getgrnam(admin_group)
        steps.append(Step("unchanged", f"group {admin_group}"))
    except KeyError:
        steps.append(Step("create", f"group {admin_group}"))
        if not dry_run:
            subprocess.run(["groupadd", "--system", admin_group], check=True)
    units_changed = any(st.changed for st in steps if st.target.startswith(str(UNIT_DIR)))
    try:
        with Systemd() as sd:
            steps += _activate(sd, dry_run, units_changed)
    except SystemdError:
        if not dry_run:
            raise
        steps.append(Step("run", "systemctl daemon-reload; enable and start the units "
                                 "(systemd not reachable: state unknown)"))
    return steps


def _activate(sd: Systemd, dry_run: bool, units_changed: bool) -> list[Step]:
    """daemon-reload when a unit file changed; enable and start what is not;
    restart a running daemon whose unit changed."""
    steps = []
    if units_changed:
        steps.append(Step("run", "systemctl daemon-reload"))
        if not dry_run:
            sd.reload()
    for unit in (TARGET, NAT_UNIT, *AGENT_UNITS):
        if sd.is_enabled(unit) != "enabled":
            steps.append(Step("enable", unit))
            if not dry_run:
                sd.enable(unit)
    for unit in AGENT_UNITS:
        if sd.state(unit).active != "active":
            steps.append(Step("start", unit))
            if not dry_run:
                sd.start(unit)
                _wait_active(sd, unit)
        elif units_changed and unit == "zdd-agent.service":
            steps.append(Step("restart", unit))
            if not dry_run:
                sd.restart(unit)
                _wait_active(sd, unit)
    return steps


START_WAIT = 30.0  # seconds a start of the daemon (Type=notify: READY=1) may take


def _wait_active(sd: Systemd, unit: str, timeout: float = START_WAIT) -> None:
    """Until the start job queued for `unit` is done and the unit active, as
    `systemctl start` waits (a job still queued reads "inactive"); the
    daemon then answers the next command. SystemdError when it ends
    otherwise or takes longer than `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        st = sd.state(unit)
        if st.active == "active" and not st.job:
            return
        if (st.active in ("inactive", "failed") and not st.job) \
                or time.monotonic() > deadline:
            why = f", its main process {st.exit}" if st.exit else ""
            raise SystemdError(f"{unit} did not start: {st.active} ({st.sub}, result "
                               f"{st.result}{why}); see journalctl -u {unit}")
        sd.wait_change([unit], min(0.25, max(0.0, deadline - time.monotonic())))


def _remove_nat(dry_run: bool, force: bool) -> list[Step]:
    """The agent's nftables table goes with it: socket: nat services then
    get no new connection on their public ports, so that is refused
    (ConfigError, before anything changed) while any has rules, unless
    `force`."""
    from . import nat

    try:
        nft = nat.Nft()
        routed = nat.routed(nft.table())
    except nat.NatError:
        return [Step("unchanged", f"nftables table inet {nat.TABLE} (nftables absent)")]
    if not routed:
        return [Step("unchanged", f"nftables table inet {nat.TABLE} (absent or empty)")]
    names = ", ".join(sorted(routed))
    serving = sorted(n for n, r in routed.items() if r["ports"])
    if serving and not force:
        raise ConfigError(f"socket: nat service(s) {', '.join(serving)} are reached through the "
                          f"agent's NAT rules: uninstalling removes them and their public ports "
                          "stop answering. Give them back first (zdd-agent adopt UNIT --undo), "
                          "or stop their instances (systemctl stop 'zdd-NAME@*.service'), or "
                          "pass --remove-nat")
    step = Step("remove", f"nftables table inet {nat.TABLE}: {names} no longer reached on "
                          "their public ports (give them back first: zdd-agent adopt UNIT "
                          "--undo)")
    if not dry_run:
        nft.run([{"delete": {"table": {"family": nat.FAMILY, "name": nat.TABLE}}}])
    return [step]


def uninstall(dry_run: bool, remove_nat: bool = False,
              pkg: origin.Package | None = None) -> list[Step]:
    if pkg is not None:
        raise ConfigError(f"zdd-agent was installed from the Debian package {pkg.name}: its "
                          f"units and sysctl.d file are the package manager's. Remove it with "
                          f"`apt remove {pkg.name}` (keeps the configs) or `apt purge {pkg.name}` "
                          "(keeps only the service configs you wrote)")
    nat_steps = _remove_nat(True, remove_nat)  # refuses before anything changes
    steps = [Step("run", "systemctl stop zdd-agent.service zdd-agent.socket; disable them")]
    if not dry_run:
        with Systemd() as sd:
            for unit in ("zdd-agent.service", "zdd-agent.socket"):
                sd.stop(unit)
                # the daemon lets a running swap finish (TimeoutStopSec=90s)
                if not sd.wait_stopped(unit, 100):
                    raise SystemdError(f"{unit} did not stop within 100s")
                sd.disable(unit)
            if sd.is_enabled(NAT_UNIT) == "enabled":
                sd.disable(NAT_UNIT)
    steps += nat_steps if dry_run else _remove_nat(False, True)
    for path in (UNIT_DIR / "zdd-agent.service", UNIT_DIR / "zdd-agent.socket",
                 UNIT_DIR / NAT_UNIT, SYSCTL_D):
        if path.exists():
            steps.append(Step("remove", str(path)))
            if not dry_run:
                path.unlink()
        else:
            steps.append(Step("unchanged", f"{path} (absent)"))
    steps.append(Step("keep", f"{DEFAULT_CONFIG_DIR.parent}/ and {DEFAULT_STATE_DIR}/, "
                              f"{TARGET} and the services' units"))
    if not dry_run:
        with Systemd() as sd:
            sd.reload()
    return steps
