"""A throwaway systemd, booted as PID 1 of fresh PID, mount and network namespaces.

Used by `zdd-agent demo` and the end-to-end tests. The facts it rests on are in
shared/SANDBOX.md: systemd 252 boots in container mode as PID 1 of a new PID
namespace; before it does, the mounts must be made private and /run, /tmp and
/var/tmp replaced by fresh tmpfs (systemd-tmpfiles once emptied the machine's
real /tmp), and /etc, /var and /usr must be overlays so that the agent's unit
files and state, and whatever dpkg or apt install inside (a package's files
under /usr, its conffiles in /etc, dpkg's database in /var/lib/dpkg, apt's
cache and logs in /var), stay inside the sandbox. Keeping the overlay's upper directories and
booting again over them is a "reboot" of that host.

The host side (`Sandbox`) only spawns, waits, runs commands inside with
nsenter, and kills PID 1 by its host PID. The namespace side (`_boot`, run as
`python -m agent.sandbox ROOT`) prepares the mounts and execs systemd.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

SYSTEMD = "/lib/systemd/systemd"
TARGET = "zdd.target"
# What the sandbox boots: its own target, in the namespace's /run, that wants
# zdd.target, whoever wrote that (`zdd-agent install`, a swap) and wherever,
# and boots on when there is none yet.
BOOT_TARGET = "zdd-sandbox.target"
# Sandboxes live outside /etc and /var (overlaid inside) and outside /tmp and
# /run (replaced by tmpfs inside).
DEFAULT_ROOT = Path(os.environ.get("ZDD_SANDBOX_ROOT", "/srv/zdd-sandbox"))

# What a sandbox overlays on the machine's own directories: its writes stay in
# ROOT/upper/NAME. dpkg writes nowhere else (/lib, /bin, /sbin are in /usr;
# where they are not, _boot overlays them too).
OVERLAID = ("etc", "var", "usr")

# Units of the machine that must not run in a sandbox: they write host-global
# kernel state (sysctl, binfmt, modules, clock) or clean directories.
MASKED = (
    "systemd-tmpfiles-setup.service",
    "systemd-tmpfiles-setup-dev.service",
    "systemd-tmpfiles-clean.service",
    "systemd-tmpfiles-clean.timer",
    "systemd-sysctl.service",
    "systemd-binfmt.service",
    "proc-sys-fs-binfmt_misc.automount",
    "systemd-modules-load.service",
    "systemd-timesyncd.service",
    "systemd-pstore.service",
    "systemd-firstboot.service",
    "systemd-repart.service",
    "systemd-machine-id-commit.service",
    "systemd-journal-flush.service",
    "systemd-udevd.service",
    "systemd-udev-trigger.service",
    "sys-kernel-debug.mount",
    "sys-kernel-tracing.mount",
    "sys-kernel-config.mount",
    "sys-fs-fuse-connections.mount",
    "dev-hugepages.mount",
)

# zdd.target, once the agent or its package installed it, starts the serving
# instances (a "reboot" of the host); before that, the want finds no unit and
# the boot goes on.
_BOOT_TARGET_UNIT = f"""\
[Unit]
Description=zdd sandbox boot target
Wants={TARGET}
"""


class SandboxError(RuntimeError):
    pass


def _run(argv: Sequence[str]) -> None:
    subprocess.run(list(argv), check=True)


def _bind_keep(paths: Sequence[str]) -> list[tuple[int, str]]:
    """Hold O_PATH fds to directories that a tmpfs is about to hide."""
    held = []
    for p in paths:
        if os.path.isdir(p):
            held.append((os.open(p, os.O_PATH | os.O_DIRECTORY), p))
    return held


def _boot(root: Path, keep: Sequence[str]) -> None:  # pragma: no cover - runs as PID 1
    """Namespace side: prepare mounts, bring lo up, exec systemd."""
    _run(["mount", "--make-rprivate", "/"])
    # /usr too: a package installed inside (the fleet's hosts install the
    # agent's .deb) writes there; /lib, /bin and /sbin are links into /usr on
    # a merged-/usr system (Debian 12), so this overlay covers them.
    unmerged = [n for n in ("bin", "sbin", "lib", "lib64")
                if os.path.isdir(f"/{n}") and not os.path.islink(f"/{n}")]
    for name in (*OVERLAID, *unmerged):
        upper, work = root / "upper" / name, root / "work" / name
        upper.mkdir(parents=True, exist_ok=True)
        work.mkdir(parents=True, exist_ok=True)
        _run(["mount", "-t", "overlay", "overlay", "-o",
              f"lowerdir=/{name},upperdir={upper},workdir={work}", f"/{name}"])
    held = _bind_keep([p for p in keep if p.startswith(("/tmp/", "/var/tmp/", "/run/"))])
    for d in ("/run", "/tmp", "/var/tmp"):
        _run(["mount", "-t", "tmpfs", "-o", "mode=1777" if d != "/run" else "mode=755",
              "tmpfs", d])
    for fd, p in held:  # a checkout under /tmp stays visible inside
        os.makedirs(p, exist_ok=True)
        _run(["mount", "--bind", f"/proc/{os.getpid()}/fd/{fd}", p])
        os.close(fd)
    unit_dir = Path("/run/systemd/system")
    unit_dir.mkdir(parents=True, exist_ok=True)
    for unit in MASKED:
        (unit_dir / unit).symlink_to("/dev/null")
    (unit_dir / BOOT_TARGET).write_text(_BOOT_TARGET_UNIT)
    # Journald in the sandbox keeps logs in memory only.
    conf = Path("/run/systemd/journald.conf.d")
    conf.mkdir(parents=True, exist_ok=True)
    (conf / "zdd-sandbox.conf").write_text("[Journal]\nStorage=volatile\n")
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
    env = {"container": "zdd-sandbox", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
           "LANG": "C.UTF-8"}
    os.execve(SYSTEMD, [SYSTEMD, "--system", f"--unit={BOOT_TARGET}", "--log-target=journal",
                        "--log-level=warning"], env)


@dataclass
class Sandbox:
    """A sandboxed systemd; `boot()` it, `run()` commands in it, `close()` it."""

    root: Path = field(default_factory=lambda: DEFAULT_ROOT / uuid.uuid4().hex[:12])
    keep: tuple[str, ...] = ()
    pid: int = 0  # host PID of the namespace's PID 1
    _proc: subprocess.Popen[bytes] | None = None

    def boot(self, timeout: float = 60.0) -> Sandbox:
        if os.geteuid() != 0:
            raise SandboxError("the sandbox needs root (it mounts and boots systemd)")
        if not Path(SYSTEMD).exists():
            raise SandboxError(f"{SYSTEMD} not found: install systemd")
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        keep = [str(Path(sys.prefix).resolve()), str(Path(__file__).resolve().parents[1]),
                *self.keep]
        log = open(self.root / "boot.log", "ab")
        argv = ["unshare", "--pid", "--fork", "--mount", "--mount-proc", "--net", "--uts",
                "--", sys.executable, "-m", "agent.sandbox", str(self.root), *keep]
        env = dict(os.environ)
        env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
        self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                      stderr=subprocess.STDOUT, start_new_session=True,
                                      env=env)
        log.close()
        deadline = time.monotonic() + timeout
        while not self.pid:
            self.pid = self._child_pid()
            self._check_alive(deadline)
            time.sleep(0.02)
        private = Path(f"/proc/{self.pid}/root/run/systemd/private")
        while not private.exists():
            self._check_alive(deadline)
            time.sleep(0.05)
        while True:
            r = self.run(["systemctl", "is-system-running"], check=False, capture=True)
            state = r.stdout.strip()
            if state in ("running", "degraded"):
                return self
            self._check_alive(deadline)
            time.sleep(0.1)

    def _child_pid(self) -> int:
        assert self._proc is not None
        try:
            kids = Path(f"/proc/{self._proc.pid}/task/{self._proc.pid}/children").read_text()
        except FileNotFoundError:
            return 0
        return int(kids.split()[0]) if kids.split() else 0

    def _check_alive(self, deadline: float) -> None:
        assert self._proc is not None
        if self._proc.poll() is not None:
            raise SandboxError(f"sandbox systemd exited: {self.boot_log()[-2000:]}")
        if time.monotonic() > deadline:
            self.close()
            raise SandboxError(f"sandbox did not boot in time: {self.boot_log()[-2000:]}")

    def boot_log(self) -> str:
        try:
            return (self.root / "boot.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def nsenter(self, argv: Sequence[str], net_only: bool = False) -> list[str]:
        flags = ["-n"] if net_only else ["-m", "-p", "-n", "-u"]
        return ["nsenter", "-t", str(self.pid), *flags, "--", *argv]

    def run(self, argv: Sequence[str], *, check: bool = True, capture: bool = False,
            env: Mapping[str, str] | None = None, timeout: float | None = 300,
            net_only: bool = False) -> subprocess.CompletedProcess[str]:
        full_env = dict(os.environ)
        full_env.update(env or {})
        r = subprocess.run(self.nsenter(argv, net_only), capture_output=capture, text=True,
                           env=full_env, timeout=timeout, stdin=subprocess.DEVNULL)
        if check and r.returncode != 0:
            raise SandboxError(f"{' '.join(argv)} exited {r.returncode}: "
                               f"{(r.stderr or '')[-2000:]}")
        return r

    def popen(self, argv: Sequence[str], *, net_only: bool = False,
              env: Mapping[str, str] | None = None, **kw: object) -> subprocess.Popen[str]:
        full_env = dict(os.environ)
        full_env.update(env or {})
        return subprocess.Popen(self.nsenter(argv, net_only), text=True, env=full_env,
                                stdin=subprocess.DEVNULL, **kw)  # type: ignore[call-overload]

    def path(self, inside: str) -> Path:
        """A path inside the sandbox, as seen from the host."""
        return Path(f"/proc/{self.pid}/root") / inside.lstrip("/")

    def shutdown(self) -> None:
        """Kill PID 1 (the kernel ends every process of the namespace); keep the disk."""
        if self._proc is None:
            return
        if self.pid:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._proc, self.pid = None, 0

    def reboot(self, timeout: float = 60.0) -> Sandbox:
        self.shutdown()
        return self.boot(timeout)

    def close(self) -> None:
        self.shutdown()
        # The overlays were private to the dead mount namespace: only files remain.
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Sandbox:
        return self.boot()

    def __exit__(self, *exc: object) -> None:
        self.close()


if __name__ == "__main__":  # pragma: no cover
    _boot(Path(sys.argv[1]), sys.argv[2:])
