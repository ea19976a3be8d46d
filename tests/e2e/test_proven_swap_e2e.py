""""ok" means proven: programs that lie about being ready, crash after they
said so, keep a listener they no longer serve, or close idle keep-alive
connections at SIGTERM, swapped under real load in a sandboxed systemd.
Each test counts failed requests and checks what the agent said."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from test_daemon_e2e import journal, wait_for
from test_verify_e2e import verify

from agent.demo.run import RELEASES, DemoHost, swap_many
from agent.errors import Exit
from agent.log import MESSAGE_IDS

pytestmark = pytest.mark.e2e

APPS = "/var/lib/zdd-demo/apps"
GOOD_APP = """\
import json, os

def app(environ, start_response):
    body = json.dumps({"version": os.environ["ZDD_VERSION"], "pid": os.getpid()}).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]
"""
BROKEN_APP = "import a_module_this_release_forgot_to_ship  # ImportError at import\n"


def demo_yaml(socket: str = "inherit", grace: str = "10s", min_ready: str = "1s",
              watch: str | None = None) -> str:
    """The demo API's config with the settings these tests vary."""
    strategy = f"min_ready: {min_ready}" + (f", watch: {watch}" if watch else "")
    return textwrap.dedent(f"""\
        name: demo
        command: {RELEASES}/{{version}}/bin/api
        socket: {socket}
        listen: ["127.0.0.1:8080"]
        ready: {{type: notify, deadline: 20s}}
        drain: {{grace_period: {grace}}}
        strategy: {{{strategy}}}
        """)


def gunicorn_config(grace: str = "10s") -> str:
    gunicorn = Path(sys.prefix) / "bin" / "gunicorn"
    return textwrap.dedent(f"""\
        name: gun
        command: {gunicorn} --chdir {APPS}/{{version}} --workers 2 app:app
        listen: ["127.0.0.1:8080"]
        ready: {{type: notify, deadline: 30s}}
        drain: {{grace_period: {grace}}}
        """)


def test_stock_gunicorn_whose_app_cannot_import_is_rolled_back(host: DemoHost) -> None:
    """gunicorn's arbiter sends READY=1 before any worker imported the app
    (gunicorn #2778): the default bake sees it die, v1 never gets a signal."""
    for version, app in (("v1", GOOD_APP), ("v2", BROKEN_APP)):
        d = host.sb.path(f"{APPS}/{version}")
        d.mkdir(parents=True, exist_ok=True)
        (d / "app.py").write_text(app)
    host.configure("gun", text=gunicorn_config())
    host.zdd("sysctl", "apply", check=True)
    code, first = host.zdd_json("swap", "gun", "--version", "v1")
    assert code == 0, (first.get("reason"), first.get("journal"))
    load = host.load(32, seconds=40, keepalive=False)
    try:
        time.sleep(1)
        t = time.monotonic()
        code, r = host.zdd_json("swap", "gun", "--version", "v2")
        took = time.monotonic() - t
        time.sleep(1)
    finally:
        res = load.stop(timeout=60)
    print(f"stock gunicorn, app cannot import: exit {code}, {r['result']} in {took:.1f}s: "
          f"{r['reason']}; {res.requests} requests, {res.failed} failed")
    assert code == int(Exit.ROLLED_BACK), r
    assert r["result"] == "rolled_back"
    assert "gun v2" in r["reason"] and ("bake" in r["reason"] or "start-up" in r["reason"])
    assert r["drain"] is None or r["drain"]["connections_at_start"] == 0  # v1 never drained
    assert res.requests > 500 and res.failed == 0, res
    assert host.get()["version"] == "v1"
    code, st = host.zdd_json("status", "gun")
    assert code == 0 and st[0]["serving"] == "v1" and not st[0]["down"]


def test_a_release_that_crashes_after_the_swap_is_reverted_by_the_daemon(
        host: DemoHost) -> None:
    host.release("v3", "--exit-after", "6")
    host.configure(text=demo_yaml(min_ready="2s", watch="30s"))
    r = host.zdd("install")
    assert r.returncode == 0, r.stderr
    wait_for(lambda: host.sb.run(["systemctl", "is-active", "zdd-agent.service"],
                                 capture=True, check=False).stdout.strip() == "active",
             20, "zdd-agent.service active")
    code, first = host.zdd_json("swap", "demo", "--version", "v1")
    assert code == 0, first
    load = host.load(32, seconds=40)
    try:
        time.sleep(1)
        code, r = host.zdd_json("swap", "demo", "--version", "v3")
        assert code == 0 and r["result"] == "ok", r  # v3 stood its 2 s bake
        assert r["watch"]["seconds"] == 30 and r["watch"]["previous"] == "v1"
        code, st = host.zdd_json("status", "demo")
        assert st[0]["watch"]["active"] and st[0]["watch"]["version"] == "v3"

        def reverted() -> list[dict]:
            _c, hist = host.zdd_json("history", "demo")
            return [h for h in hist if h["result"] == "auto_reverted"]

        back = wait_for(reverted, 30, "the automatic revert")
        time.sleep(1)
    finally:
        res = load.stop(timeout=60)
    print(f"crash 6 s after READY=1: swap ok, then {back[-1]['reason']}; {res.requests} "
          f"requests, {res.failed} failed (those held by v3 when it crashed)")
    assert back[-1]["from"] == "v3" and back[-1]["to"] == "v1"
    assert "automatic revert" in back[-1]["reason"] and "v3" in back[-1]["reason"]
    assert host.get()["version"] == "v1"
    code, st = host.zdd_json("status", "demo")
    assert st[0]["serving"] == "v1" and not (st[0]["watch"] or {}).get("active")
    assert st[0]["last_swap"]["result"] == "auto_reverted"
    ids = {e.get("MESSAGE_ID") for e in journal(host)}
    assert MESSAGE_IDS["auto_revert"] in ids and MESSAGE_IDS["watch"] in ids
    # a crash resets what the crashed process held; nothing else may fail
    assert res.requests > 1000 and res.failed <= 32, res


def test_a_listener_kept_open_while_draining_gets_no_new_connections(host: DemoHost) -> None:
    """socket: reuseport and a program that stops accepting at SIGTERM but keeps
    its listener open 4 s (Envoy #8031): the agent closes it (SOCK_DESTROY)."""
    for v in ("v1", "v2"):
        host.release(v, "--keep-listener", "4")
    host.configure(text=demo_yaml(socket="reuseport"))
    host.zdd("sysctl", "apply", check=True)
    code, first = host.zdd_json("swap", "demo", "--version", "v1")
    assert code == 0, first
    fresh = host.load(32, seconds=30, keepalive=False)
    try:
        results = swap_many(host, ["v2", "v1", "v2"], pause=1.0)
        time.sleep(1)
    finally:
        res = fresh.stop(timeout=60)
    closed = [r["drain"]["listeners_closed"] for r in results]
    print(f"reuseport, listener kept open 4 s: {res.requests} Connection: close requests, "
          f"{res.failed} failed, max latency {res.max_us / 1000:.0f} ms; listeners closed by "
          f"the agent {closed}")
    for r in results:
        assert r["exit"] == 0 and r["result"] == "ok", r
        assert r["drain"]["listeners_closed"] >= 1
        assert any("closed by the agent" in e for e in r["evidence"])
    assert res.requests > 1000 and res.failed == 0, res
    assert res.max_us < 2_000_000, res  # nothing waited in the old queue for its 4 s


@pytest.mark.parametrize("socket", ["inherit", "reuseport"])
def test_a_release_that_listens_but_never_accepts_is_rolled_back(host: DemoHost,
                                                                  socket: str) -> None:
    """READY=1, the listener held, no accept(): under keep-alive and fresh
    load the bake fails it before v1 gets its signal. inherit: the census
    sees v1 take connections and v2 none, then v2 takes none of the
    connections the agent opens itself; reuseport: v2's own listener queues
    what the kernel hashes to it and the same connections wait there for
    2 s, then v2 takes none of the agent's own."""
    host.release("v1")
    host.release("v2", "--never-accept")
    host.configure(text=demo_yaml(socket=socket, min_ready="5s"))
    host.zdd("sysctl", "apply", check=True)
    code, first = host.zdd_json("swap", "demo", "--version", "v1")
    assert code == 0, first
    keep = host.load(16, seconds=30)
    fresh = host.load(16, seconds=30, keepalive=False)
    try:
        time.sleep(1)
        code, r = host.zdd_json("swap", "demo", "--version", "v2")
        time.sleep(1)
    finally:
        k, f = keep.stop(timeout=60), fresh.stop(timeout=60)
    print(f"{socket}, v2 never accepts: {k.requests} + {f.requests} requests, "
          f"{k.failed} + {f.failed} failed, max latency {f.max_us / 1000:.0f} ms; "
          f"{r['result']}: {r['reason']}; bake {r['bake']}")
    assert code == Exit.ROLLED_BACK and r["result"] == "rolled_back", r
    if socket == "inherit":
        assert "v2 accepted none of the 20 connections the agent opened" in r["reason"]
        trial = r["bake"]["trials"][0]
        assert trial["opened"] == 20 and trial["accepted"] == {"v1": 20}, trial
    else:
        assert "v2 does not accept: on its own listener" in r["reason"], r["reason"]
        assert "and it accepted none of the 20 connections the agent opened" in r["reason"]
        trial = r["bake"]["trials"][0]
        assert trial["opened"] == 20 and "v2" not in trial["accepted"], trial
    assert k.failed == 0 and f.failed == 0 and f.requests > 1000, (k, f)
    assert host.get()["version"] == "v1"


def test_the_serving_set_stays_true(host: DemoHost) -> None:
    host.configure(text=demo_yaml(socket="reuseport", grace="5s"))
    host.zdd("sysctl", "apply", check=True)
    code, r = host.zdd_json("swap", "demo", "--version", "v1")
    assert code == 0, r
    # a lost state file: swapping to the version that runs changes nothing
    host.sb.path("/var/lib/zdd-agent/services/demo.json").unlink()
    pid = host.sb.run(["systemctl", "show", "-p", "MainPID", "--value", "zdd-demo@v1.service"],
                      capture=True).stdout.strip()
    code, r = host.zdd_json("swap", "demo", "--version", "v1")
    assert code == 0 and r["result"] == "unchanged", r
    assert host.sb.run(["systemctl", "show", "-p", "MainPID", "--value",
                        "zdd-demo@v1.service"], capture=True).stdout.strip() == pid
    # a forgotten process shares the port through SO_REUSEPORT: reported
    stray = host.sb.popen([sys.executable, "-c", STRAY], net_only=False,
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    stray_pid = "0"
    try:
        assert stray.stdout is not None
        stray_pid = stray.stdout.readline().split()[-1]  # "listening PID" (in the sandbox)
        code, st = host.zdd_json("status", "demo")
        assert [s["address"] for s in st[0]["strays"]] == ["127.0.0.1:8080"], st[0]
        code, r = host.zdd_json("swap", "demo", "--version", "v2")
        assert code == 0 and any("outside zdd-agent listens on 127.0.0.1:8080" in w
                                 for w in r["warnings"]), r
        doc = host.zdd("doctor")
        assert "127.0.0.1:8080" in doc.stdout and "outside zdd-agent" in doc.stdout, doc.stdout
    finally:
        host.sb.run(["kill", "-9", stray_pid], check=False)
        stray.communicate(timeout=30)
    # v1 stopped by hand while v2 serves... then a swap back and forth: the
    # version that does not serve is never left enabled for the next boot
    host.sb.run(["systemctl", "stop", "zdd-demo@v2.service"])
    code, st = host.zdd_json("status", "demo")
    assert code == int(Exit.DOWN) and st[0]["down"], st
    human = host.zdd("status", "demo")
    assert human.returncode == int(Exit.DOWN) and "DOWN" in human.stdout + human.stderr
    code, r = host.zdd_json("swap", "demo", "--version", "v1")
    assert code == 0 and r["result"] == "ok", r
    enabled = host.sb.run(["systemctl", "is-enabled", "zdd-demo@v2.service"], capture=True,
                          check=False).stdout.strip()
    assert enabled != "enabled", enabled
    code, st = host.zdd_json("status", "demo")
    assert code == 0 and st[0]["serving"] == "v1" and not st[0]["down"]


STRAY = """
import os, socket, sys, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
s.bind(("127.0.0.1", 8080)); s.listen(16)
print("listening", os.getpid(), flush=True)
time.sleep(120)
"""


def test_stock_uvicorn_idle_closes_are_reported(host: DemoHost) -> None:
    """Stock uvicorn closes idle keep-alive connections at SIGTERM (uvicorn
    #2757): the swap still succeeds, and its result says what clients lost."""
    for v in ("v1", "v2"):
        host.release(v, "--server", "uvicorn", "--plain", program="asgi")
    host.configure("web", text=textwrap.dedent(f"""\
        name: web
        command: {RELEASES}/{{version}}/bin/asgi
        listen: ["127.0.0.1:8080"]
        ready: {{type: notify, deadline: 30s}}
        drain: {{grace_period: 5s}}
        strategy: {{min_ready: 1s}}
        """))
    host.zdd("sysctl", "apply", check=True)
    code, first = host.zdd_json("swap", "web", "--version", "v1")
    assert code == 0, first
    load = host.load(32, seconds=25)
    try:
        time.sleep(1)
        results = swap_many(host, ["v2", "v1"], pause=1.5, name="web")
        time.sleep(1)
    finally:
        res = load.stop(timeout=60)
    idle = [r["drain"]["closed_idle"] for r in results]
    print(f"stock uvicorn: {res.requests} keep-alive requests, {res.failed} failed "
          f"(read {res.read}, write {res.write}); closed idle per swap {idle}; "
          f"closes {[r['drain']['closes'] for r in results]}")
    for r in results:
        assert r["exit"] == 0 and r["result"] == "ok", r
        assert any("closed" in w and "idle" in w and "Connection: close" in w
                   for w in r["warnings"]), r["warnings"]
    assert sum(idle) > 0
    # what the clients lost is no more than what the agent reported closed idle
    assert res.failed <= sum(idle), (res, idle)
    human = host.zdd("history", "web")
    assert human.returncode == 0


def _demo(host: DemoHost, min_ready: str, grace: str = "10s") -> None:
    host.configure(text=demo_yaml(grace=grace, min_ready=min_ready))
    host.zdd("sysctl", "apply", check=True)
    code, first = host.zdd_json("swap", "demo", "--version", "v1")
    assert code == 0, first


def _swap_then_interrupt(host: DemoHost, at: str) -> tuple[int, str]:
    """`swap --local` to v2; SIGINT to the CLI once its progress shows `at`."""
    proc = host.sb.popen(["sh", "-c", 'echo "$$"; exec "$0" "$@"', *host.agent, "swap", "demo",
                          "--version", "v2", "--local"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    pid = proc.stdout.readline().strip()  # the CLI's PID inside the sandbox
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if line.strip() == at:
            host.sb.run(["kill", "-INT", pid])
            break
    out, err = proc.communicate(timeout=60)
    return proc.returncode, "".join(seen) + err + out


def test_interrupting_a_local_swap_rolls_back_before_the_signal_and_finishes_after(
        host: DemoHost) -> None:
    _demo(host, min_ready="4s")
    load = host.load(32, seconds=60)
    try:
        time.sleep(1)
        code, text = _swap_then_interrupt(host, "phase bake")
        assert code == int(Exit.ROLLED_BACK), text
        assert "interrupted before v1 was signalled: rolled back" in text, text
        assert host.get()["version"] == "v1"
        # a request held across the drain keeps v1 draining for ~3 s
        slow = host.sb.popen(["curl", "-s", "--max-time", "20",
                              "http://127.0.0.1:8080/slow?ms=3000"], net_only=True,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        time.sleep(0.3)
        code2, text2 = _swap_then_interrupt(host, "phase drain")
        body, _ = slow.communicate(timeout=30)
        time.sleep(0.5)
    finally:
        res = load.stop(timeout=60)
    print(f"Ctrl-C in the bake: exit {code}; Ctrl-C in the drain: exit {code2}; "
          f"{res.requests} keep-alive requests, {res.failed} failed")
    assert code2 == 0, text2
    assert "interrupted after v1 was signalled: finishing the swap to v2" in text2, text2
    assert "swapped demo v1 -> v2" in text2
    assert host.get()["version"] == "v2" and "v1" in body  # the held request was answered
    code, st = host.zdd_json("status", "demo")
    assert [i["version"] for i in st[0]["instances"]] == ["v2"], st
    assert res.requests > 1000 and res.failed == 0, res


def test_systemd_reexecuting_during_a_swap_does_not_break_it(host: DemoHost) -> None:
    """systemd closes every connection of its private socket when it
    re-executes (daemon-reexec, the systemd package's upgrade); a swap whose
    call met that rolled back on "DBusDisconnectedError: Connection reset
    by peer". Re-executed five times from the start to late in the bake,
    each call in flight is sent again on a new connection."""
    _demo(host, min_ready="5s")
    state = host.sb.path("/var/lib/zdd-agent/services/demo.json")
    load = host.load(32, seconds=40)
    out: dict = {}
    try:
        swap = threading.Thread(target=lambda: out.update(
            zip(("code", "r"), host.zdd_json("swap", "demo", "--version", "v2"))))
        swap.start()

        def started() -> bool:
            try:
                intent = json.loads(state.read_text()).get("intent") or {}
            except (OSError, ValueError):
                return False
            return intent.get("to") == "v2"

        wait_for(started, 30, "the swap's start", step=0.01)
        for pause in (0.0, 0.2, 0.5, 1.0, 1.5):  # start, ready, the bake
            time.sleep(pause)
            host.sb.run(["systemctl", "daemon-reexec"])
        swap.join(timeout=60)
    finally:
        res = load.stop(timeout=60)
    print(f"daemon-reexec x5 during the swap: {out['r']['result']} {out['r'].get('reason')!r} "
          f"in {out['r'].get('phases')}; {res.requests} requests, {res.failed} failed")
    assert out["code"] == 0 and out["r"]["result"] == "ok", (out["r"].get("reason"), out)
    assert host.get()["version"] == "v2"
    assert res.requests > 1000 and res.failed == 0, res


def test_verify_fails_a_gunicorn_release_that_cannot_import(site: Path) -> None:
    """What verify printed PASS for before: now every swap to v2 is rolled back
    and the verdict says so (exit 9)."""
    for version, app in (("v1", GOOD_APP), ("v2", BROKEN_APP)):
        (site / version).mkdir()
        (site / version / "app.py").write_text(app)
    cfg = site / "gun.yaml"
    cfg.write_text(gunicorn_config().replace(APPS, str(site)))
    cfg.chmod(0o644)
    code, report = verify(cfg, "--swaps", "2")
    print(f"verify, gunicorn v2 cannot import: exit {code}, {report['verdict']}: "
          f"{report['reasons']}")
    assert code == int(Exit.NOT_ZERO_DOWNTIME), report
    assert report["verdict"] == "fail"
    assert any("did not succeed" in x and "rolled_back" in x for x in report["reasons"])
    assert report["requests"]["failed"] == 0
