"""The commands the CLI runs in-process and the daemon runs for its clients:
one function, so that both give the same answers. Each returns
(exit code, JSON-able result) or raises a ZddError."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import deploy
from .config import load_agent_config, load_all
from .errors import ConfigError, Exit
from .state import StateStore
from .swap import Emit
from .sysctl import Change, Sysctl

HISTORY_DEFAULT = 20


def _changes(changes: list[Change]) -> list[dict[str, Any]]:
    return [{"key": c.key, "old": c.old, "new": c.new} for c in changes]


def sysctl_plan(paths: deploy.Paths) -> tuple[Sysctl, list[Change]]:
    agent = load_agent_config(paths.agent_config)
    ports = [p for svc in load_all(paths.config_dir) for p in svc.ports]
    s = Sysctl(paths.state_dir)
    return s, s.plan(agent.sysctl, ports)


def history(paths: deploy.Paths, service: str | None, limit: int) -> list[dict[str, Any]]:
    store = StateStore(paths.state_dir)
    names = [service] if service else store.names()
    rows: list[dict[str, Any]] = []
    for name in names:
        for h in store.load(name).history:
            drain = h.get("drain") or {}
            rows.append({
                "service": name, "at": h.get("started_at"), "from": h.get("from_version"),
                "to": h.get("to_version"), "seconds": h.get("seconds"),
                "result": h.get("result"), "reason": h.get("reason", ""),
                "drained": drain.get("connections_drained", 0),
                "killed_at_grace": drain.get("killed_at_grace", False),
                "cut": drain.get("connections_at_end", 0) if drain.get("killed_at_grace") else 0,
            })
    rows.sort(key=lambda r: r["at"] or 0)
    return rows[-limit:]


def execute(paths: deploy.Paths, cmd: str, args: dict[str, Any],
            emit: Emit | None = None, interrupted: Callable[[], bool] | None = None,
            watched: bool = False) -> tuple[int, Any]:
    """One command. `interrupted` is polled by a swap (the CLI's signals when
    it swaps in-process); `watched`: the daemon watches after the swap."""
    if cmd == "ping":
        return Exit.OK, {"pong": True}
    if cmd == "status":
        rows = deploy.status(paths, args.get("service"))
        return (Exit.DOWN if any(r["down"] for r in rows) else Exit.OK), rows
    if cmd == "history":
        return Exit.OK, history(paths, args.get("service"), args.get("limit", HISTORY_DEFAULT))
    if cmd == "swap" and args.get("dry_run"):
        return Exit.OK, deploy.plan(paths, args["service"], args["version"])
    if cmd == "swap":
        return Exit.OK, deploy.swap(paths, args["service"], args["version"], emit,
                                    interrupted, watched).to_dict()
    if cmd == "rollback":
        return Exit.OK, deploy.rollback(paths, args["service"], emit, interrupted,
                                        watched).to_dict()
    if cmd == "sysctl-check":
        _s, plan = sysctl_plan(paths)
        differ = [c for c in plan if c.differs]
        out = {"ok": not differ,
               "differ": [{"key": c.key, "running": c.old, "wanted": c.new} for c in differ],
               "missing": [c.key for c in plan if c.old is None]}
        return (Exit.DRIFT if differ else Exit.OK), out
    if cmd == "sysctl-apply":
        s, plan = sysctl_plan(paths)
        return Exit.OK, {"changed": _changes(s.apply(plan)),
                         "missing": [c.key for c in plan if c.old is None]}
    if cmd == "sysctl-restore":
        return Exit.OK, {"restored": _changes(Sysctl(paths.state_dir).restore())}
    if cmd in ("drain-host", "undrain-host", "host-state"):
        return Exit.OK, host_state(paths, cmd, str(args.get("reason", "")))
    if cmd == "nat-restore":
        return Exit.OK, deploy.nat_restore(paths)
    if cmd == "adopt":
        from . import takeover

        unit, name = str(args["unit"]), args.get("name")
        if args.get("undo"):
            return Exit.OK, {"undo": takeover.undo(paths, unit, name, emit)}
        if args.get("takeover"):
            out = takeover.takeover(paths, unit, str(args["takeover"]), name, emit)
            return (Exit.SYSTEMD if out["legacy"].get("error") else Exit.OK), {"takeover": out}
        return Exit.OK, {"adopt": takeover.adopt(paths.config_dir, unit, name,
                                                 force=bool(args.get("force")))}
    raise ValueError(f"unknown command {cmd}")


def host_state(paths: deploy.Paths, cmd: str, reason: str) -> dict[str, Any]:
    from . import hostready

    agent = load_agent_config(paths.agent_config)
    listen = agent.host_ready_listen
    scheme = "https" if agent.host_ready_tls else "http"
    if cmd == "host-state":
        out = {**hostready.read(paths.state_dir), "changed": False}
    else:
        try:
            paths.state_dir.mkdir(parents=True, exist_ok=True)
            out = hostready.set_drained(paths.state_dir, cmd == "drain-host", reason)
        except ValueError as e:
            raise ConfigError(f"--reason: {e}") from None
    out["endpoint"] = f"{scheme}://{listen}/ready" if listen else None
    return out
