"""A fleet on one machine, for the Ansible tests.

Each host is a sandboxed systemd (agent/sandbox.py) in its own network
namespace, running sshd as a unit of that systemd, so an ssh session lands
where the host's agent, units and files are. A controller network namespace,
made by the test, holds one end of a veth pair per host (10.231.N.1 <->
10.231.N.2), HAProxy, the load client and ansible-playbook: they reach the
hosts the way they reach real ones, over TCP. Nothing listens on the
machine's own network; deleting the controller namespace and killing the
sandboxes' PID 1 removes everything.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from agent.demo.load import Load, wrk_argv, write_script
from agent.demo.run import DemoHost
from agent.sandbox import DEFAULT_ROOT, Sandbox
from debpkg import kit

REPO = Path(__file__).resolve().parents[2]
ANSIBLE = REPO / "ansible"
BIN = Path(sys.executable).parent
# The role installs the Debian package (scripts/build-deb) with apt: the
# package's command. Every write of dpkg lands in the sandbox's overlays
# (/usr, /etc, /var: agent/sandbox.py).
AGENT = "/usr/bin/zdd-agent"
# The role's pip path: its virtualenv on the sandbox's private /var (the
# machine's /opt is shared by every sandbox).
AGENT_VENV = "/var/lib/zdd-fleet/agent"
SERVICE_PORT = 8080
HOST_READY_PORT = 9470
LB_PORT = 8000
RECAP = re.compile(r"^(\S+)\s+:\s+ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)",
                   re.M)

SSHD_CONFIG = """\
ListenAddress {addr}
HostKey /etc/zdd-fleet/ssh_host_ed25519_key
AuthorizedKeysFile /etc/zdd-fleet/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
Subsystem sftp internal-sftp
"""

HAPROXY = """\
global
    maxconn 4096
    stats socket {stats} mode 600 level admin

defaults
    mode http
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    timeout http-keep-alive 10s

frontend api
    bind 127.0.0.1:{lb_port}
    default_backend api

backend api
    balance roundrobin
    # The hosts' own readiness: zdd-agent drain-host turns it to 503.
    option httpchk GET /ready
    http-check expect status 200
    default-server check port {ready_port} inter 200ms fall 2 rise 2
{servers}
"""


def run(argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), check=True, text=True, capture_output=True,
                          timeout=kw.pop("timeout", 120), **kw)


class Host(DemoHost):
    """One host of the fleet: a DemoHost (releases, the agent's CLI run
    inside) whose agent is the one the role installed."""

    def __init__(self, name: str, index: int, root: Path) -> None:
        super().__init__(Sandbox(root=root))
        self.name, self.index = name, index
        self.agent = [AGENT]

    @property
    def addr(self) -> str:
        return f"10.231.{self.index}.2"

    def serving(self, service: str) -> str | None:
        return self.zdd_json("status", service)[1][0]["serving"]

    def history(self, service: str) -> list[dict[str, Any]]:
        return list(self.zdd_json("history", service)[1])


@dataclass
class Playbook:
    code: int
    out: str
    recap: dict[str, dict[str, int]] = field(default_factory=dict)

    def changed(self) -> dict[str, int]:
        return {h: r["changed"] for h, r in self.recap.items()}


class Fleet:
    def __init__(self, deb: Path, size: int = 3) -> None:
        tag = uuid.uuid4().hex[:8]
        self.deb = deb  # under /srv: each host sees the machine's files there
        self.root = DEFAULT_ROOT / f"fleet-{tag}"
        self.netns = f"zdd-fleet-{tag}"
        self.hosts = [Host(f"host{i}", i, self.root / f"host{i}") for i in range(1, size + 1)]
        self.key = self.root / "ssh" / "id_ed25519"
        self.haproxy: subprocess.Popen[str] | None = None
        self._netns_made = False

    # ------------------------------------------------------------ lifecycle

    def boot(self) -> Fleet:
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        run(["ip", "netns", "add", self.netns])
        self._netns_made = True
        run(["ip", "-n", self.netns, "link", "set", "lo", "up"])
        self.key.parent.mkdir(parents=True, exist_ok=True)
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "zdd-fleet", "-f",
             str(self.key)])
        for h in self.hosts:
            h.sb.boot()
            self._wire(h)
            self._sshd(h)
        return self

    def _wire(self, h: Host) -> None:
        """A veth pair: hN in the controller namespace, eth0 in the host's."""
        run(["ip", "link", "add", f"h{h.index}", "netns", self.netns, "type", "veth",
             "peer", "name", "eth0", "netns", str(h.sb.pid)])
        run(["ip", "-n", self.netns, "addr", "add", f"10.231.{h.index}.1/24", "dev",
             f"h{h.index}"])
        run(["ip", "-n", self.netns, "link", "set", f"h{h.index}", "up"])
        h.sb.run(["ip", "addr", "add", f"{h.addr}/24", "dev", "eth0"], net_only=True)
        h.sb.run(["ip", "link", "set", "eth0", "up"], net_only=True)

    def _sshd(self, h: Host) -> None:
        etc = h.sb.path("/etc/zdd-fleet")
        etc.mkdir(parents=True, exist_ok=True)
        etc.chmod(0o755)
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
             str(etc / "ssh_host_ed25519_key")])
        keys = etc / "authorized_keys"
        keys.write_text(self.key.with_suffix(".pub").read_text())
        keys.chmod(0o600)
        (etc / "sshd_config").write_text(SSHD_CONFIG.format(addr=h.addr))
        h.sb.run(["systemd-run", "--unit=zdd-fleet-sshd", "-p", "RuntimeDirectory=sshd",
                  "/usr/sbin/sshd", "-D", "-e", "-f", "/etc/zdd-fleet/sshd_config"])
        self._wait_listening(h, 22)

    def _wait_listening(self, h: Host, port: int, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = h.sb.run(["ss", "-Hltn", f"sport = :{port}"], net_only=True, capture=True)
            if r.stdout.strip():
                return
            time.sleep(0.1)
        raise RuntimeError(f"{h.name}: nothing listens on port {port} after {timeout}s")

    def close(self) -> None:
        if self.haproxy is not None and self.haproxy.poll() is None:
            self.haproxy.kill()
            self.haproxy.wait()
        for h in self.hosts:
            h.sb.close()
        if self._netns_made:
            subprocess.run(["ip", "netns", "del", self.netns], check=False)
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Fleet:
        return self.boot()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ controller

    def in_ctrl(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *argv]

    def build_wheels(self) -> Path:
        """The agent and its dependencies as wheels, for the role's pip path:
        the hosts install from them with --no-index (they have no network),
        as air-gapped fleets do."""
        wheels = self.root / "wheels"
        run([str(BIN / "pip"), "wheel", "-q", "--disable-pip-version-check", "--wheel-dir",
             str(wheels), str(REPO)], timeout=900)
        return wheels

    def pip_install(self, wheels: Path) -> dict[str, Any]:
        """The inventory's install variables for the role's pip path; the
        hosts' agent is then the virtualenv's."""
        for h in self.hosts:
            h.agent = [f"{AGENT_VENV}/bin/zdd-agent"]
        return {"zdd_agent_install_method": "pip", "zdd_agent_venv": AGENT_VENV,
                "zdd_agent_pip_spec": "zdd-agent",
                "zdd_agent_pip_extra_args": ["--no-index", "--find-links", str(wheels)]}

    def inventory(self, services: dict[str, Any], install: dict[str, Any] | None = None) -> Path:
        """The fleet's inventory; `install`: the role's install variables
        (default: the .deb with apt)."""
        inv = {"zdd_fleet": {
            "hosts": {h.name: {"ansible_host": h.addr} for h in self.hosts},
            "vars": {
                "ansible_user": "root",
                "ansible_python_interpreter": "/usr/bin/python3",
                **(install or {"zdd_agent_install_method": "deb",
                               "zdd_agent_deb": [str(kit(self.deb)), str(self.deb)]}),
                "zdd_agent_host_ready_listen": f"0.0.0.0:{HOST_READY_PORT}",
                "zdd_agent_services": services,
            }}}
        path = self.root / "inventory.yml"
        path.write_text(yaml.safe_dump(inv, sort_keys=False))
        return path

    def playbook(self, book: str, inventory: Path, *extra: str,
                 timeout: float = 900) -> Playbook:
        env = dict(os.environ)
        env.update({
            "PATH": f"{BIN}:{env.get('PATH', '/usr/bin:/bin')}",
            "ANSIBLE_CONFIG": str(ANSIBLE / "ansible.cfg"),
            "ANSIBLE_HOME": str(self.root / "ansible-home"),
            "ANSIBLE_LOCAL_TEMP": str(self.root / "ansible-tmp"),
            "ANSIBLE_REMOTE_TMP": "/tmp/.ansible-remote",  # the sandbox's own /tmp
            "ANSIBLE_PRIVATE_KEY_FILE": str(self.key),
            "ANSIBLE_HOST_KEY_CHECKING": "False",
            "ANSIBLE_SSH_CONTROL_PATH_DIR": str(self.root / "cp"),
            "ANSIBLE_SSH_ARGS": "-o ControlMaster=auto -o ControlPersist=60s "
                                "-o ServerAliveInterval=5 -o ServerAliveCountMax=2 "
                                "-o UserKnownHostsFile=/dev/null",
            "ANSIBLE_PIPELINING": "True",
            "ANSIBLE_FORKS": "5",
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_RETRY_FILES_ENABLED": "False",
        })
        t0 = time.monotonic()
        p = subprocess.run(self.in_ctrl([str(BIN / "ansible-playbook"), "-i", str(inventory),
                                         book, *extra]),
                           cwd=ANSIBLE, env=env, text=True, capture_output=True,
                           timeout=timeout, stdin=subprocess.DEVNULL)
        print(f"ansible-playbook {book} {' '.join(extra)}: exit {p.returncode} in "
              f"{time.monotonic() - t0:.1f}s")
        out = p.stdout + p.stderr
        recap = {m[0]: {"ok": int(m[1]), "changed": int(m[2]), "unreachable": int(m[3]),
                        "failed": int(m[4])} for m in RECAP.findall(out)}
        return Playbook(p.returncode, out, recap)

    def start_haproxy(self) -> None:
        servers = "\n".join(f"    server {h.name} {h.addr}:{SERVICE_PORT}" for h in self.hosts)
        cfg = self.root / "haproxy.cfg"
        cfg.write_text(HAPROXY.format(stats=self.stats_socket, lb_port=LB_PORT,
                                      ready_port=HOST_READY_PORT, servers=servers))
        log = open(self.root / "haproxy.log", "w")
        self.haproxy = subprocess.Popen(self.in_ctrl(["haproxy", "-db", "-f", str(cfg)]),
                                        stdout=log, stderr=subprocess.STDOUT, text=True,
                                        stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + 20
        while set(self.server_states().values()) != {"UP"}:
            if self.haproxy.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"haproxy did not see every host UP: {self.server_states()} "
                                   f"{(self.root / 'haproxy.log').read_text()[-2000:]}")
            time.sleep(0.1)

    @property
    def stats_socket(self) -> Path:
        return self.root / "haproxy.sock"

    def server_stats(self) -> dict[str, dict[str, str]]:
        """HAProxy's `show stat` for the backend's servers: name -> columns."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(2)
                s.connect(str(self.stats_socket))
                s.sendall(b"show stat\n")
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
        except OSError:
            return {}
        lines = data.decode().splitlines()
        if not lines or not lines[0].startswith("# "):
            return {}
        cols = lines[0][2:].split(",")
        rows = (dict(zip(cols, line.split(","))) for line in lines[1:])
        return {r["svname"]: r for r in rows
                if r.get("pxname") == "api" and r.get("svname") not in ("FRONTEND", "BACKEND")}

    def server_states(self) -> dict[str, str]:
        """server -> UP, DOWN, ... as HAProxy's health checks see it."""
        return {name: r["status"].split(" ")[0] for name, r in self.server_stats().items()}

    def load(self, clients: int, seconds: float) -> Load:
        """wrk with keep-alive clients through HAProxy, from the controller."""
        argv = wrk_argv(f"http://127.0.0.1:{LB_PORT}/", clients, seconds,
                        write_script(self.root))
        return Load(subprocess.Popen(self.in_ctrl(argv), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True,
                                     stdin=subprocess.DEVNULL))

    def get(self, path: str = "/") -> str:
        r = run(self.in_ctrl(["curl", "-sS", "--max-time", "5",
                              f"http://127.0.0.1:{LB_PORT}{path}"]))
        return r.stdout


class StateWatch:
    """Records every state HAProxy reports for each server, while it runs."""

    def __init__(self, fleet: Fleet, period: float = 0.05) -> None:
        self.fleet, self.period = fleet, period
        self.seen: dict[str, set[str]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            for server, state in self.fleet.server_states().items():
                self.seen.setdefault(server, set()).add(state)

    def __enter__(self) -> StateWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
