"""A unix: listener behind nginx, as the most common Python deployment runs:
nginx (Debian's package, workers as www-data) proxies to the socket file the
socket unit owns, with keep-alive upstream connections; wrk loads nginx
while the agent swaps the demo API back and forth. Counted: wrk's non-2xx
responses and socket errors, nginx's own upstream errors (connect() refused,
a connection closed under a request), and what the census saw drain."""

from __future__ import annotations

import json
import os
import shutil
import stat
import time

import pytest

from agent.demo.run import RELEASES, DemoHost, swap_many

SOCK = "/run/demo/api.sock"
NGINX_PORT = 8081
SWAPS = ["v2", "v1", "v2", "v1"]

CONFIG = f"""\
name: demo
command: {RELEASES}/{{version}}/bin/api
listen: ["unix:{SOCK}"]
socket_group: www-data
socket_mode: "0660"
ready: {{type: notify, deadline: 20s}}
drain: {{grace_period: 10s}}
strategy: {{min_ready: 1s}}
"""

# Workers as www-data, which reaches the socket only through socket_group.
# keepalive: nginx holds up to 32 idle upstream connections per worker, so
# each old instance has connections to drain (it answers their next request
# with Connection: close).
NGINX_CONF = """\
user www-data;
worker_processes 2;
pid /run/e2e-nginx.pid;
error_log {root}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    upstream api {{
        server unix:{sock};
        keepalive 32;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://api;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""


def _start_nginx(host: DemoHost) -> str:
    conf = host.sb.root / "nginx.conf"
    conf.write_text(NGINX_CONF.format(root=host.sb.root, sock=SOCK, port=NGINX_PORT))
    host.sb.run(["systemd-run", "--unit=e2e-nginx", "--property=Type=simple",
                 shutil.which("nginx") or "/usr/sbin/nginx", "-c", str(conf),
                 "-g", "daemon off;"])
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        r = host.sb.run(["curl", "-sS", "--max-time", "2",
                         f"http://127.0.0.1:{NGINX_PORT}/"], check=False, capture=True,
                        net_only=True)
        if r.returncode == 0 and r.stdout.startswith("{"):
            return r.stdout
        time.sleep(0.2)
    raise AssertionError(f"nginx did not answer: {host.sb.boot_log()[-500:]}")


def _curl_as(host: DemoHost, user: str, group: str) -> int:
    """curl through the socket file as `user`: its exit code (7: could not
    connect, e.g. permission denied)."""
    return host.sb.run(["setpriv", f"--reuid={user}", f"--regid={group}", "--init-groups",
                        "curl", "-sS", "-o", "/dev/null", "--max-time", "3",
                        "--unix-socket", SOCK, "http://x/"], check=False, capture=True
                       ).returncode


def _worker_users(host: DemoHost) -> set[str]:
    r = host.sb.run(["ps", "-o", "user=,args=", "-C", "nginx"], capture=True)
    return {ln.split()[0] for ln in r.stdout.splitlines() if "worker process" in ln}


def test_nginx_to_unix_socket_across_swaps(host: DemoHost) -> None:
    if shutil.which("nginx") is None:
        pytest.fail("nginx is not installed (scripts/setup.sh installs it)")
    host.configure(text=CONFIG)
    code, first = host.zdd_json("swap", "demo", "--version", "v1")
    assert code == 0 and first["result"] == "ok", first
    st = os.lstat(host.sb.path(SOCK))
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
    assert host.sb.path(SOCK).group() == "www-data"

    # the file's access is what lets nginx in: www-data may connect, nobody may not
    assert _curl_as(host, "www-data", "www-data") == 0
    assert _curl_as(host, "nobody", "nogroup") == 7

    assert json.loads(_start_nginx(host))["version"] == "v1"
    assert _worker_users(host) == {"www-data"}

    load = host.load(clients=32, seconds=60, port=NGINX_PORT)
    try:
        time.sleep(1.0)
        code, status = host.zdd_json("status", "demo")
        results = swap_many(host, SWAPS, pause=1.0)
        time.sleep(0.5)
    finally:
        res = load.stop()
    log = host.sb.root / "nginx-error.log"
    errors = log.read_text() if log.exists() else ""
    upstream_errors = [ln for ln in errors.splitlines() if "upstream" in ln or "connect()" in ln]
    drains = [r["drain"] for r in results]
    print(f"nginx -> unix:{SOCK}, {len(SWAPS)} swaps: {res.requests} requests through nginx, "
          f"{res.status} non-2xx, {res.connect} connect / {res.read} read / {res.write} write / "
          f"{res.timeout} timeout errors; nginx upstream errors: {len(upstream_errors)}; "
          f"drained {[d['connections_drained'] for d in drains]} unix connections in "
          f"{[round(d['seconds'], 2) for d in drains]} s; swaps "
          f"{[round(r['seconds'], 2) for r in results]} s")

    # status saw the unix listener and the instance's unix connections
    assert code == 0, status
    row = status[0]
    [unix] = row["socket"]["unix"]
    assert unix["listening"] and unix["file"] == {"owner": "root", "group": "www-data",
                                                   "mode": "0660", "socket": True,
                                                   "bound": True}, unix
    assert sum(i["connections"] for i in row["instances"]) > 0, row["instances"]

    for r, want in zip(results, SWAPS):
        assert r["exit"] == 0 and r["result"] == "ok", r
        assert r["to_version"] == want
        # nginx's keep-alive connections sat on the old instance: the census
        # counted them through unix_diag and saw every one of them go
        assert r["drain"]["connections_at_start"] > 0, r["drain"]
        assert r["drain"]["connections_at_end"] == 0, r["drain"]
        assert r["drain"]["killed_at_grace"] is False
    assert res.requests > 1000, res
    assert res.status == 0 and res.failed == 0, res
    assert upstream_errors == [], upstream_errors[:5]

    # the socket file is the one the socket unit created: it survived every swap
    after = os.lstat(host.sb.path(SOCK))
    assert (after.st_ino, after.st_dev) == (st.st_ino, st.st_dev)
    code, doc = host.zdd_json("doctor")
    found = [f for f in doc["findings"] if f["check"] == "unix-socket"]
    assert [f["level"] for f in found] == ["ok"], found

    # a changed socket_mode reaches the live file at the next swap, without
    # restarting the socket unit (its file and queue stay)
    host.configure(text=CONFIG.replace('socket_mode: "0660"', 'socket_mode: "0666"'))
    code, r = host.zdd_json("swap", "demo", "--version", "v2")
    assert code == 0 and r["result"] == "ok", r
    assert any("0660 -> root:www-data 0666" in w for w in r["warnings"]), r["warnings"]
    again = os.lstat(host.sb.path(SOCK))
    assert stat.S_IMODE(again.st_mode) == 0o666 and again.st_ino == st.st_ino
    assert _curl_as(host, "nobody", "nogroup") == 0
