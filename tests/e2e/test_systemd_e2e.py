"""agent/systemd.py against a real systemd: the state read on a unit's
computed object path, and systemd's PropertiesChanged news that wakes the
gate, the bake and the drain (Systemd.wait_change), also across a
daemon-reexec."""

from __future__ import annotations

import json
import sys

from agent.demo.run import DemoHost

# Run inside the sandbox: the steps' outcomes as JSON on stdout.
SCRIPT = r'''
import json, os, subprocess, sys, time
from agent.systemd import Systemd

unit = "zdd-news.service"
out = {}
with Systemd() as sd:
    def systemctl(*args):
        return subprocess.run(["systemctl", *args], check=True, capture_output=True,
                              text=True).stdout

    def wait_for(pred, limit=20.0):
        """wait_change until pred(state) holds: how many wakes said True/False."""
        woke, slept = 0, 0
        deadline = time.monotonic() + limit
        while not pred(sd.state(unit)) and time.monotonic() < deadline:
            if sd.wait_change([unit], 10.0):
                woke += 1
            else:
                slept += 1
        return {"woke": woke, "timed_out": slept, "state": sd.state(unit).active}

    # nothing happens to a unit that is not there: the wait times out, and
    # the daemon's other threads run meanwhile (the GIL is not held)
    import threading
    def spin(seconds, wait):
        count, stop = [0], threading.Event()
        def other():
            while not stop.is_set():
                count[0] += 1
        t = threading.Thread(target=other)
        t.start()
        result = wait(seconds)
        stop.set()
        t.join()
        return result, count[0]
    out["idle"], during_wait = spin(0.5, lambda s: sd.wait_change([unit], s))
    _, during_sleep = spin(0.5, time.sleep)
    out["other_thread"] = during_wait / during_sleep
    subprocess.run(["systemd-run", "--no-block", "--unit", unit, "-p", "Type=notify",
                    "-p", "NotifyAccess=all", "/bin/sh", "-c",
                    "sleep 1; systemd-notify --ready; sleep 3; exit 3"], check=True)
    out["ready"] = wait_for(lambda st: st.active == "active")
    show = dict(line.split("=", 1) for line in systemctl(
        "show", "-p", "MainPID", "-p", "ActiveState", "-p", "SubState", "-p", "NRestarts",
        unit).split())
    st = sd.state(unit)
    out["same_as_systemctl"] = (str(st.main_pid), st.active, st.sub, str(st.restarts)) == (
        show["MainPID"], show["ActiveState"], show["SubState"], show["NRestarts"])
    systemctl("daemon-reexec")
    # the connection systemd closed is replaced (by this read), and its news
    # must go on coming on the new one
    out["after_reexec"] = sd.state(unit).active
    out["exit"] = wait_for(lambda st: st.active == "failed")
    out["exit_description"] = sd.state(unit).exit
    # a unit that ends well and that nothing refers to is collected by
    # systemd before it sends its last signal: the exit comes from the signal
    gone = "zdd-gone.service"
    trapped = "/run/zdd-gone.trapped"
    subprocess.run(["systemd-run", "--unit", gone, "/bin/sh", "-c",
                    f"trap 'exit 0' TERM; : > {trapped}; sleep 30 & wait"],
                   check=True, capture_output=True)
    # the SIGTERM must find the trap set, or the shell dies of it (a loaded
    # machine can take longer than any fixed pause to get there)
    deadline = time.monotonic() + 10
    while not os.path.exists(trapped) and time.monotonic() < deadline:
        time.sleep(0.01)
    sd.stop(gone)
    deadline = time.monotonic() + 10
    while sd.state(gone).active not in ("inactive", "failed") and time.monotonic() < deadline:
        sd.wait_change([gone], 0.25)
    out["collected_exit"] = sd.state(gone).exit
print(json.dumps(out))
'''


def test_systemd_announces_ready_and_exit_and_a_reexec_does_not_silence_it(
        host: DemoHost) -> None:
    r = host.sb.run([sys.executable, "-c", SCRIPT], capture=True)
    out = json.loads(r.stdout)
    print(out)
    assert out["idle"] is False  # no news: the wait ran to its timeout
    # another thread ran during the wait about as much as during a sleep
    # (pystemd's sd_bus_wait would have held the GIL: next to nothing)
    assert out["other_thread"] > 0.5
    # READY=1 came as news: every wake was systemd's, none a timeout of 10 s
    assert out["ready"]["state"] == "active" and out["ready"]["woke"] >= 1
    assert out["ready"]["timed_out"] == 0
    assert out["same_as_systemctl"] is True
    assert out["after_reexec"] == "active"
    assert out["exit"]["state"] == "failed" and out["exit"]["woke"] >= 1
    assert out["exit"]["timed_out"] == 0
    assert out["exit_description"] == "exited 3"
    assert out["collected_exit"] == "exited 0"
