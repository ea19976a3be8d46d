"""`zdd-agent adopt`: services that already run under units of their own
are taken over under load with 0 failed requests, then swapped, then given
back: a legacy gunicorn.service + gunicorn.socket on TCP (socket-activated),
and a legacy Node service that binds its own port."""

from __future__ import annotations

import sys
import textwrap
import time
from pathlib import Path

import pytest

from agent.demo.run import DemoHost
from test_nat_e2e import APPS, install_apps

GUNICORN = str(Path(sys.prefix) / "bin" / "gunicorn")
LEGACY = {
    # gunicorn's systemd recipe: the socket unit holds the port, gunicorn takes
    # it through LISTEN_FDS (its --bind is then ignored; the adopted config
    # turns it into the private port each zdd instance binds)
    "gunicorn": {
        "port": 8090,
        "units": {
            "gunicorn.socket": """\
                [Unit]
                Description=legacy gunicorn socket
                [Socket]
                ListenStream=8090
                [Install]
                WantedBy=sockets.target
                """,
            "gunicorn.service": f"""\
                [Unit]
                Description=legacy gunicorn
                Requires=gunicorn.socket
                After=gunicorn.socket
                [Service]
                Type=exec
                Environment=ZDD_VERSION=legacy
                ExecStart={GUNICORN} --bind 0.0.0.0:8090 --workers 2 agent.demo.wsgi_api:app
                KillSignal=SIGTERM
                TimeoutStopSec=20
                [Install]
                WantedBy=multi-user.target
                """,
        },
    },
    "node": {
        "port": 8091,
        "units": {
            "nodeapi.service": f"""\
                [Unit]
                Description=legacy node api
                [Service]
                Environment=PORT=8091
                ExecStart=/usr/bin/node {APPS}/node/server.js
                TimeoutStopSec=15
                [Install]
                WantedBy=multi-user.target
                """,
        },
    },
}


def curl(host: DemoHost, port: int) -> str:
    return host.sb.run(["curl", "-sS", "--max-time", "5", f"http://127.0.0.1:{port}/"],
                       capture=True, net_only=True, check=False).stdout


@pytest.mark.parametrize("kind", ["gunicorn", "node"])
def test_adopt_takes_over_under_load_then_swaps_then_gives_back(host: DemoHost,
                                                                kind: str) -> None:
    spec = LEGACY[kind]
    port = int(spec["port"])  # type: ignore[arg-type]
    unit_files: dict[str, str] = spec["units"]  # type: ignore[assignment]
    install_apps(host)
    for unit, text in unit_files.items():
        path = host.sb.path(f"/etc/systemd/system/{unit}")
        path.write_text(textwrap.dedent(text))
        path.chmod(0o644)
    service = [u for u in unit_files if u.endswith(".service")][0]
    name = service.removesuffix(".service")
    host.sb.run(["systemctl", "daemon-reload"])
    host.sb.run(["systemctl", "enable", "--now", *unit_files])
    for _ in range(100):
        if '"version"' in curl(host, port):
            break
        time.sleep(0.1)
    assert "legacy" in curl(host, port), curl(host, port)
    host.zdd("sysctl", "apply", check=True)

    code, out = host.zdd_json("adopt", service)
    assert code == 0, out
    written = out["adopt"]
    config = host.sb.path(f"/etc/zdd-agent/services/{name}.yaml").read_text()
    print(f"adopt {service}: {written['listen']}; not carried: {written['not_carried']}\n"
          f"{config}")
    assert "socket: nat" in config and "{instance_port}" in config, config
    if kind == "gunicorn":
        assert written["socket"] == "gunicorn.socket"
        assert any("ZDD_VERSION" in line for line in written["not_carried"])

    load = host.load(32, seconds=90, port=port)
    try:
        time.sleep(1.0)
        code, out = host.zdd_json("adopt", service, "--takeover", "v1")
        assert code == 0, out
        taken = out["takeover"]
        assert taken["result"] == "ok" and taken["legacy"]["stopped"], taken
        state = host.sb.run(["systemctl", "is-active", service], capture=True, check=False)
        enabled = host.sb.run(["systemctl", "is-enabled", service], capture=True, check=False)
        assert state.stdout.strip() == "inactive", state.stdout
        assert enabled.stdout.strip() == "disabled", enabled.stdout
        time.sleep(1.0)
        served_v1 = curl(host, port)
        code, swapped = host.zdd_json("swap", name, "--version", "v2")
        assert code == 0 and swapped["result"] == "ok", swapped
        time.sleep(1.0)
        served_v2 = curl(host, port)
    finally:
        res = load.stop(timeout=90)
    print(f"{kind}: takeover in {taken['seconds']:.2f}s ({taken['legacy']}), swap to v2 in "
          f"{swapped['seconds']:.2f}s {swapped['phases']}; {res.requests} requests, "
          f"{res.failed} failed "
          f"(connect {res.connect}, read {res.read}, write {res.write}, timeout {res.timeout}); "
          f"p99 {res.p99_us / 1000:.1f} ms")
    assert '"v1"' in served_v1 and '"v2"' in served_v2, (served_v1, served_v2)
    assert res.failed == 0 and res.requests > 1000, res

    code, out = host.zdd_json("adopt", service, "--undo")
    assert code == 0, out
    back = curl(host, port)
    assert '"v2"' not in back and '"version"' in back, back
    active = host.sb.run(["systemctl", "is-active", service], capture=True, check=False)
    assert active.stdout.strip() == "active"
    assert not host.sb.path(f"/etc/zdd-agent/services/{name}.yaml").exists()
    rules = host.sb.run(["nft", "-j", "list", "table", "inet", "zdd-agent"], capture=True,
                        net_only=True, check=False).stdout
    assert f'"{name}-output"' not in rules, rules
