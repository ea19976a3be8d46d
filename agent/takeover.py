"""`zdd-agent adopt`: a service that already runs under a unit of its own
(the legacy unit, e.g. api.service, maybe with api.socket) comes under
zdd-agent without a failed request, and can be given back.

- adopt: the legacy unit is read over D-Bus (adopt.py) and the service's
  config written, with what could not be carried listed. Nothing runs.
- takeover: the first zdd instance starts on its private port (socket: nat),
  is gated and baked like any new version, and the public port is redirected
  to it (one nftables transaction: the legacy listener keeps the connections
  it has and gets no new ones). Then the legacy listener's queue is let
  empty and its connections finish, and the legacy units are stopped (their
  own KillSignal= and TimeoutStopSec=) and disabled. Nothing of them is
  deleted.
- undo: the legacy units are enabled and started again, the NAT rules go
  (new connections reach the legacy listener), the zdd instances drain and
  stop, and the config is set aside (NAME.yaml.undone).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import adopt as legacy_mod
from .census import Census
from .config import load_service
from .errors import ConfigError, SystemdError, ZddError
from .fsutil import atomic_write
from .state import StateStore
from .systemd import Systemd

Emit = Callable[[str, dict[str, Any]], None]
QUEUE_LIMIT = 5.0  # seconds for the legacy listener's queues to empty


def _name(unit: str, name: str | None) -> str:
    from .config import check_name

    base = legacy_mod.check_unit_name(unit).rsplit(".", 1)[0]
    if name is None:
        try:
            return check_name(base, "UNIT")
        except ConfigError as e:
            raise ConfigError(f"{e}: {unit}'s name is not a zdd-agent service name; give one "
                              "with --name NAME") from None
    return check_name(name, "--name")


def _listen(sd: Systemd, legacy: legacy_mod.LegacyUnit, unit: str) -> list[str]:
    if legacy.socket is not None:
        return legacy_mod.socket_addresses(legacy.socket)
    try:
        pids = sd.processes(unit)
    except SystemdError:
        pids = []
    return legacy_mod.listening_addresses(pids)


def adopt(config_dir: Path, unit: str, name: str | None = None, version: str | None = None,
          force: bool = False) -> dict[str, Any]:
    """Write the config for the legacy `unit`; what was written and what was
    not carried. ConfigError when the file exists (unless `force`)."""
    unit = legacy_mod.check_unit_name(unit)
    name = _name(unit, name)
    path = config_dir / f"{name}.yaml"
    if path.exists() and not force:
        raise ConfigError(f"{path} exists: adopt writes a new config (use --force to replace "
                          "it, or --takeover to use it as it is)", file=str(path), key="")
    with Systemd() as sd:
        legacy = legacy_mod.read_legacy(sd, unit)
        listen = _listen(sd, legacy, unit)
    adoption = legacy_mod.to_config(legacy, name, listen, version)
    config_dir.mkdir(parents=True, exist_ok=True, mode=0o755)
    atomic_write(path, adoption.text, mode=0o644)
    return {"unit": unit, "service": name, "config": str(path),
            "socket": legacy.socket.name if legacy.socket else None,
            "listen": listen, "not_carried": adoption.not_carried, "unix": adoption.unix}


def takeover(paths: Any, unit: str, version: str, name: str | None = None,
             emit: Emit | None = None) -> dict[str, Any]:
    """Move serving from the legacy `unit` to `version` under zdd-agent
    (module docstring). SwapFailed when the first instance does not pass
    (the legacy unit keeps serving, untouched)."""
    from . import deploy

    say = emit or (lambda kind, data: None)
    unit = legacy_mod.check_unit_name(unit)
    name = _name(unit, name)
    path = paths.config_dir / f"{name}.yaml"
    written = None
    if not path.exists():
        written = adopt(paths.config_dir, unit, name, version)
        say("warning", {"message": f"wrote {path} from {unit}; not carried: "
                                   + ("; ".join(written["not_carried"]) or "nothing")})
    svc = load_service(paths.config_dir, name)
    if svc.socket != "nat":
        raise ConfigError(f"{path}: socket: {svc.socket}: a takeover moves the public port "
                          "with NAT rules (socket: nat); a unix: listener cannot be moved: "
                          "switch the proxy in front to the new socket path instead",
                          file=str(path), key="socket")
    store = StateStore(paths.state_dir)
    with Systemd() as sd:
        legacy = legacy_mod.read_legacy(sd, unit)
        if legacy.active_state not in ("active", "reloading"):
            raise ConfigError(f"{unit} is {legacy.active_state}: nothing to take over "
                              f"(start it, or deploy with `zdd-agent swap {name} --version "
                              f"{version}`)", file=str(path), key="")
        sock = legacy.socket.name if legacy.socket else None
        enabled = [u for u in (unit, sock) if u and sd.is_enabled(u) == "enabled"]
        held = {int(a.rsplit(":", 1)[-1]) for a in _listen(sd, legacy, unit)
                if not a.startswith("/") and a.rsplit(":", 1)[-1].isdigit()}  # TCP ones
    if not set(svc.ports) <= held:
        raise ConfigError(f"{path}: listen: port(s) {', '.join(map(str, svc.ports))}, but "
                          f"{unit} listens on {', '.join(map(str, sorted(held))) or 'nothing'}: "
                          "a takeover redirects the ports the legacy unit serves (fix listen, "
                          "or check that the unit is up)", file=str(path), key="listen")
    with store.lock(name):
        state = store.load(name)
        if state.serving:
            raise ConfigError(f"{name} is already deployed by zdd-agent ({state.serving}): "
                              "nothing to take over", file=str(path), key="")
        state.adopted = {"unit": unit, "socket": sock, "enabled": enabled}
        store.save(state)
    try:
        result = deploy.swap(paths, name, version, emit)
    except BaseException:  # nothing was taken over: the legacy unit serves, untouched
        with store.lock(name):
            state = store.load(name)
            state.adopted = None
            store.save(state)
        raise
    out = result.to_dict()
    try:
        out["legacy"] = retire_legacy(svc, unit, sock, enabled, legacy.timeout_stop_usec, say)
    except (ZddError, OSError) as e:
        # zdd-agent serves; the legacy unit may still run beside it, unreached
        out["legacy"] = {"unit": unit, "socket": sock, "error": str(e),
                         "todo": f"systemctl stop {' '.join(u for u in (sock, unit) if u)}; "
                                 f"systemctl disable {' '.join(enabled) or unit}"}
    if written is not None:
        out["adopted_config"] = written
    return out


def _legacy_quiet(svc: Any, pids: list[int], limit: float) -> int:
    """Until the legacy listeners on the public ports hold no connection
    waiting to be accepted, and the legacy processes none established
    (modes.until_quiet), within `limit`;
    the connections still open then."""
    from . import nat
    from .modes import until_quiet, waiting

    try:  # SYNs the legacy listener's full queue dropped: sent again, they are NATed
        nat.forget(svc.ports, unanswered=True)
    except Exception:
        pass
    end = time.monotonic() + QUEUE_LIMIT
    while waiting(svc.ports) and time.monotonic() < end:
        time.sleep(0.02)
    census = Census.for_listen([(lst.host, lst.port) for lst in svc.listen], own_sockets=True)
    return until_quiet(lambda: census.count(pids), limit)


def retire_legacy(svc: Any, unit: str, sock: str | None, enabled: list[str],
                  timeout_usec: int, say: Emit) -> dict[str, Any]:
    """Stop and disable the legacy units once nothing new reaches them."""
    from . import nat

    timeout = min(timeout_usec / 1e6 if timeout_usec else 90.0, 3600.0)
    with Systemd() as sd:
        try:
            pids = sd.processes(unit)
        except SystemdError:
            pids = []
        left = _legacy_quiet(svc, pids, min(timeout, svc.drain.grace_period))
        say("phase", {"phase": "retire legacy", "reason": f"{unit}: {left} connections open"})
        for u in (sock, unit):  # the socket first: nothing may start the service again
            if u:
                sd.stop(u)
        stopped = sd.wait_stopped(unit, timeout + 5)
        for u in enabled:
            sd.disable(u)
        st = sd.state(unit)
    try:
        nat.forget(svc.ports)  # what conntrack still maps to the legacy listener
    except Exception:
        pass
    return {"unit": unit, "socket": sock, "stopped": stopped, "exit": st.exit,
            "open_at_stop": left, "disabled": enabled}


def undo(paths: Any, unit: str, name: str | None = None,
         emit: Emit | None = None) -> dict[str, Any]:
    """Give the service back to its legacy unit (module docstring)."""
    from . import nat
    from .deploy import SystemdOps, instances_of
    from .drain import run_drain
    from .instance import Host
    from .revert import retire
    from .swap import SystemClock

    say = emit or (lambda kind, data: None)
    unit = legacy_mod.check_unit_name(unit)
    name = _name(unit, name)
    store = StateStore(paths.state_dir)
    svc = load_service(paths.config_dir, name)
    with store.lock(name):
        state = store.load(name)
        if state.adopted is None:
            raise ConfigError(f"{name} was not taken over from {unit} by `zdd-agent adopt "
                              "--takeover` (no record in the state): nothing to give back",
                              file=str(svc.path), key="")
        adopted = state.adopted
        if adopted["unit"] != unit:
            raise ConfigError(f"{name} was taken over from {adopted['unit']}, not {unit}",
                              file=str(svc.path), key="")
        with Systemd() as sd:
            sock = adopted.get("socket")
            for u in (sock, unit):
                if u:
                    sd.start(u)
            deadline = time.monotonic() + 90
            from . import listeners

            while time.monotonic() < deadline:
                if sd.state(unit).active == "active" and listeners.listening(svc.ports):
                    break
                if sd.state(unit).active == "failed":
                    raise SystemdError(f"{unit} failed to start again: {sd.state(unit).exit}; "
                                       f"{name} keeps serving under zdd-agent")
                time.sleep(0.1)
            else:
                raise SystemdError(f"{unit} did not come back listening on "
                                   f"{', '.join(map(str, svc.ports))} within 90s; {name} "
                                   "keeps serving under zdd-agent")
            for u in adopted.get("enabled", []):  # only once it came back
                sd.enable(u)
            say("phase", {"phase": "give back", "reason": f"{unit} listens again"})
            ops = SystemdOps(svc, sd)
            host = Host(svc, ops, SystemClock(), lambda k, d: say(k, d))
            running = [x for xs in instances_of(svc, sd).values() for x in xs]
            ops.route([], [], only=[])  # new connections: to the legacy listener
            drain = run_drain(host, running)[0] if running else None
            retire(host, running)
        nat.Nft().remove(name)
        state.adopted = None
        state.serving = None
        store.save(state)
    aside = svc.path.with_name(svc.path.name + ".undone")
    os.replace(svc.path, aside)
    return {"service": name, "unit": unit, "socket": sock, "stopped": running,
            "drain": dataclasses.asdict(drain) if drain else None, "config": str(aside)}


