"""zdd-agent's command line: a thin click layer. Library code raises typed
errors; only `main` turns them into one line on stderr and an exit code."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from .defaults import DEFAULT_AGENT_CONFIG, DEFAULT_CONFIG_DIR, DEFAULT_STATE_DIR
from .errors import Exit, SwapFailed, SystemdError, ZddError

if TYPE_CHECKING:
    from . import deploy, fastpath

EXIT_CODES = "\n".join(f"  {int(e):>3}  {e.name.lower()}" for e in Exit)

HELP = f"""Replace a systemd service's running version with a new one, with zero
failed requests: the new instance starts beside the old one on the same
listening socket (a socket unit shared through Sockets=, SO_REUSEPORT, or
its own port behind nftables NAT rules: socket: nat), is admitted once
ready, and the old one is drained with its stop signal while its live TCP
connections are counted through netlink. `adopt` takes over a service that
already runs under a unit of its own.

\b
Exit codes:
{EXIT_CODES}
"""


class Ctx:
    def __init__(self, config_dir: Path, state_dir: Path, agent_config: Path,
                 explicit_paths: bool, sent: fastpath.Sent | None = None) -> None:
        self._dirs = (config_dir, state_dir, agent_config)
        self.explicit_paths = explicit_paths
        self.sent = sent  # this call's request, sent before the command line loaded

    @property
    def paths(self) -> deploy.Paths:
        """Built when a command runs in this process: deploy.py imports all
        of the swap (pystemd, psutil, the census...), which a call to the
        daemon never needs (issue 16)."""
        from .deploy import Paths

        return Paths(*self._dirs)


def _out(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


def _fmt_time(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


class Progress:
    """Renders swap events: a live line on a terminal, plain lines otherwise,
    nothing with --json (one result object at the end instead).

    Rich, and with it whether stderr is a terminal, comes in at start(),
    which dispatch() calls once the request is on its way to the daemon (or
    before the command runs in-process): the daemon starts the swap while
    this process imports rich (about 30 ms of CPU), and a --json call never
    imports it (issue 16)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.console: Any = None
        self.live = False
        self.status: Any = None
        self.last_plain = 0.0

    def start(self) -> None:
        """Show the live line on a terminal, from "preflight" on; once."""
        if not self.enabled or self.console is not None:
            return
        from rich.console import Console

        self.console = Console(stderr=True)
        self.live = self.console.is_terminal
        if self.live:
            self.status = self.console.status("preflight")
            self.status.__enter__()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.status is not None:
            self.status.__exit__(*exc)

    def line(self, text: str, transient: bool = False) -> None:
        if not self.enabled:
            return
        self.start()
        if self.live:
            self.status.update(text)
            if not transient:
                self.console.print(text, highlight=False)
        elif not transient or time.monotonic() - self.last_plain >= 1.0:
            self.last_plain = time.monotonic()
            click.echo(text, err=True)

    def __call__(self, kind: str, d: dict[str, Any]) -> None:
        if kind == "phase":
            extra = f": {d['reason']}" if d.get("reason") else ""
            self.line(f"phase {d['phase']}{extra}")
        elif kind == "plan":
            if d["replicas"] > 1:
                self.line(f"plan: {d['replicas']} replicas in {d['batches']} batch(es): "
                          f"{d['plan']}")
            if d.get("headroom"):
                self.line(f"memory: {d['headroom']}")
        elif kind == "probe":
            self.line(f"  readiness check {d['checks']}: {'ok' if d['ok'] else 'not ready'} "
                      f"({d['detail']}) {d['successes']}/{d['needed']}", transient=not d["ok"])
        elif kind == "drain":
            held = f" ({', '.join(d['held'])})" if d.get("held") else ""
            self.line(f"  draining {d['version']}: {d['connections']} connections left{held}, "
                      f"{d['elapsed']:.1f}s of {d['grace']:g}s grace", transient=True)
        elif kind == "killed":
            held = f": {', '.join(d['held'])}" if d.get("held") else ""
            self.line(f"  {d['version']} killed at the grace period ({d['grace']:g}s) "
                      f"holding {d['connections']} connections{held}")
        elif kind in ("stray", "warning"):
            self.line(f"  warning: {d.get('message') or d}")
        elif kind == "hook":
            self.line(f"  hook {d['hook']}: {'ok' if d['ok'] else 'failed'} {d['detail']}")
        elif kind == "accept_trial":
            took = ", ".join(f"{x} {n}" for x, n in sorted(d["accepted"].items())) or "none"
            why = ("" if d.get("private") else
                   "the census saw a new instance take no connection: ")
            self.line(f"  {why}the agent opened {d['opened']} connections to {d['target']}; "
                      f"accepted by {took}"
                      + (f", {d['unaccepted']} never accepted" if d["unaccepted"] else ""))
        elif kind == "route":
            self.line(f"  nftables: new connections to port(s) "
                      f"{', '.join(map(str, d['after'])) or 'none'} (were "
                      f"{', '.join(map(str, d['before'])) or 'none'})")
        elif kind == "pre_stop":
            self.line(f"  holding {d['version']} {d['delay']:g}s before its drain signal")


def _tcp_note(r: dict[str, Any]) -> str:
    moved = {k: v for k, v in (r.get("tcp") or {}).items() if v}
    if not moved:
        return ""
    return "\nkernel TCP counters moved during the swap: " + ", ".join(
        f"{k} +{v}" for k, v in sorted(moved.items()))


def _swap_summary(r: dict[str, Any]) -> str:
    if r["result"] == "unchanged":
        return f"{r['service']}: {r['reason']}; nothing to do"
    text = (f"swapped {r['service']} {r['from_version'] or '(nothing)'} -> {r['to_version']} "
            f"in {r['seconds']:.2f}s (ready after {r['phases'].get('ready', 0):.2f}s, "
            f"{r['readiness_checks']} check{'s' if r['readiness_checks'] != 1 else ''}")
    if (r.get("bake") or {}).get("seconds"):
        text += f", baked {r['bake']['seconds']:.1f}s"
    d = r.get("drain")
    if d:
        drained = "an unknown number of" if d["connections_drained"] is None \
            else d["connections_drained"]
        text += f"; drained {drained} connections in {d['seconds']:.2f}s"
        if d.get("closed_idle"):
            text += f", {d['closed_idle']} closed idle"
        if d["killed_at_grace"]:
            text += f", {d['connections_at_end']} cut at the grace period"
    return text + ")" + _tcp_note(r)



class SafePath(click.Path):
    """click.Path that refuses a NUL byte as a usage error (exit 2): os.stat
    raises ValueError on one, which click lets through as a traceback."""

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> Any:
        if isinstance(value, (str, bytes)) and ("\x00" in value if isinstance(value, str)
                                                 else b"\x00" in value):
            self.fail(f"{value!r} contains a NUL byte", param, ctx)
        return super().convert(value, param, ctx)

def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    from .install import installed_package
    from .origin import describe
    from .units import data_dir

    click.echo(describe(installed_package(), data_dir("units").parent))
    ctx.exit()


@click.group(help=HELP, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--version", is_flag=True, expose_value=False, is_eager=True,
              callback=_print_version,
              help="Print the version and where the agent was installed from (the Debian "
                   "package, or pip / a checkout), then exit.")
@click.option("--config-dir", type=SafePath(path_type=Path), envvar="ZDD_CONFIG_DIR",
              default=DEFAULT_CONFIG_DIR, show_default=True,
              help="Directory of service configs, one NAME.yaml per service [env ZDD_CONFIG_DIR].")
@click.option("--state-dir", type=SafePath(path_type=Path), envvar="ZDD_STATE_DIR",
              default=DEFAULT_STATE_DIR, show_default=True,
              help="Where the agent records serving versions and history [env ZDD_STATE_DIR].")
@click.option("--agent-config", type=SafePath(path_type=Path), envvar="ZDD_AGENT_CONFIG",
              default=DEFAULT_AGENT_CONFIG, show_default=True,
              help="The agent's own config (sysctl overrides) [env ZDD_AGENT_CONFIG].")
@click.pass_context
def cli(ctx: click.Context, config_dir: Path, state_dir: Path, agent_config: Path) -> None:
    explicit = any(ctx.get_parameter_source(p) not in (click.core.ParameterSource.DEFAULT, None)
                   for p in ("config_dir", "state_dir", "agent_config"))
    ctx.obj = Ctx(config_dir, state_dir, agent_config, explicit, sent=ctx.obj)


json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
local_option = click.option("--local", is_flag=True,
                            help="Act in-process instead of through the daemon.")


def dispatch(ctx: Ctx, cmd: str, args: dict[str, Any], local: bool,
             progress: Progress | None = None) -> dict[str, Any]:
    """Run a command through the daemon when one answers, else in-process.
    Both give the same reply: {"result", "exit_code"} or {"error", ...}.
    `progress` gets the events, and is started once the request is sent."""
    from .defaults import CONTROL_SOCKET

    emit = progress or (lambda kind, data: None)
    start = progress.start if progress else (lambda: None)
    # The daemon uses its own config and state: explicit paths mean this host's
    # files as given, so they are acted on in-process. A request sent before
    # the command line loaded (fastpath.py) is this call's: its reply is read.
    if ctx.sent or (not local and not ctx.explicit_paths and CONTROL_SOCKET.exists()):
        from .client import DaemonUnavailable, call, interrupted

        try:
            conn = ctx.sent.claim(cmd, args) if ctx.sent else None
            return call(CONTROL_SOCKET, cmd, args, emit, start, conn)
        except DaemonUnavailable as e:
            click.echo(f"zdd-agent: {e}; acting in-process", err=True)
        except KeyboardInterrupt:
            note = interrupted(cmd, args)
            if note:
                click.echo(note, err=True)
            raise SystemExit(130) from None
    # In-process only: commands imports everything a command may do.
    from . import commands, protocol

    start()
    try:
        with _stop_requests(cmd in ("swap", "rollback") and not args.get("dry_run")) as asked:
            code, out = commands.execute(ctx.paths, cmd, args, emit, asked)
        return {"result": out, "exit_code": int(code)}
    except SwapFailed as e:
        res = e.details["result"].to_dict()  # type: ignore[attr-defined]
        return dict(json.loads(protocol.error(e, {"result": res})))
    except ZddError as e:
        return dict(json.loads(protocol.error(e)))
    except OSError as e:  # the OS refused: one line, never a traceback
        return dict(json.loads(protocol.error(os_refusal(cmd, e))))


def os_refusal(cmd: str, e: OSError) -> SystemdError:
    """An OSError that ended an in-process command, as one line (exit 5);
    a permission error says who may do it."""
    what = f"{e.strerror or e}" + (f": {e.filename}" if e.filename else "")
    if isinstance(e, PermissionError) and os.geteuid() != 0:
        return SystemdError(f"{cmd}: {what}: this changes or reads root's files; run it as "
                            "root, or without --local through the daemon (root and the "
                            "admin group may change things)")
    return SystemdError(f"{cmd}: {what}")


@contextlib.contextmanager
def _stop_requests(active: bool) -> Iterator[Callable[[], bool]]:
    """While a swap runs in-process, SIGINT and SIGTERM only ask it to stop
    (the swap decides: roll back before an old instance was signalled,
    finish after); outside a swap they keep their usual effect."""
    asked: list[int] = []
    if not active:
        yield lambda: False
        return

    def handler(signum: int, _frame: object) -> None:
        if not asked:
            click.echo(f"\n{signal.Signals(signum).name}: stopping the swap safely "
                       "(rolling back before the old version is signalled, finishing "
                       "after) ...", err=True)
        asked.append(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield lambda: bool(asked)
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)


def _finish(reply: dict[str, Any], as_json: bool, render: Any) -> None:
    """Print a reply; exit with its code. A failed swap's reply carries its
    result, which is printed like a successful one's."""
    code = int(reply.get("exit_code", 1))
    failed_without_result = "error" in reply and reply.get("result") is None
    if as_json:
        _out({k: v for k, v in reply.items() if k != "v"} if failed_without_result
             else reply["result"])
    elif failed_without_result:
        click.echo(f"zdd-agent: error: {reply['error']}", err=True)
    else:
        render(reply["result"], code)
    if code:
        raise SystemExit(code)


def _render_swap(r: dict[str, Any], code: int) -> None:
    if code in (int(Exit.ROLLED_BACK), int(Exit.FAILED)):
        what = "failed" if code == int(Exit.FAILED) else "rolled back"
        click.echo(f"swap of {r['service']} to {r['to_version']} {what}: {r['reason']}",
                   err=True)
        old = r["from_version"]
        if code == int(Exit.ROLLED_BACK):
            click.echo(f"{old} still serving, untouched" if old else
                       "nothing was serving before; nothing serves now", err=True)
        else:
            click.echo(f"{old} had been signalled already: requests may have failed "
                       f"(exit {int(Exit.FAILED)}); run `zdd-agent status {r['service']}`",
                       err=True)
        if r["journal"]:
            click.echo(f"last lines of zdd-{r['service']}@{r['to_version']}.service:", err=True)
            for ln in r["journal"]:
                click.echo(f"  {ln}", err=True)
        _render_warnings(r)
        return
    click.echo(_swap_summary(r))
    _render_warnings(r)
    w = r.get("watch") or {}
    if w.get("seconds"):
        click.echo(f"watching {w['version']} for {w['seconds']:g}s: the daemon reverts to "
                   f"{w['previous']} by itself if it exits, restarts or fails its probe")
    elif w.get("note") and r["result"] == "ok":
        click.echo(f"note: {w['note']}")


def _render_warnings(r: dict[str, Any]) -> None:
    for w in r.get("warnings") or []:
        click.echo(f"warning: {w}", err=True)


def _swap_cmd(ctx: Ctx, cmd: str, args: dict[str, Any], as_json: bool, local: bool) -> None:
    with Progress(not as_json) as progress:
        reply = dispatch(ctx, cmd, args, local, progress)
    _finish(reply, as_json, _render_swap)


@cli.command(help="Swap SERVICE to VERSION: start it beside the serving one, admit it once "
                  "ready, drain and retire the old one. Also the first deploy. On failure "
                  "the old version keeps serving and the exit code is 4.",
                  short_help="Swap SERVICE to VERSION; on failure the old one keeps serving.")
@click.argument("service")
@click.option("--version", "version", required=True, help="The version to serve.")
@click.option("--dry-run", is_flag=True, help="Print the plan (the batches) and change nothing.")
@json_option
@local_option
@click.pass_obj
def swap(ctx: Ctx, service: str, version: str, dry_run: bool, as_json: bool,
         local: bool) -> None:
    if dry_run:
        reply = dispatch(ctx, "swap", {"service": service, "version": version,
                                       "dry_run": True}, local)
        _finish(reply, as_json, _render_plan)
        return
    _swap_cmd(ctx, "swap", {"service": service, "version": version}, as_json, local)


def _render_plan(p: dict[str, Any], _code: int) -> None:
    if not p["batches"]:
        click.echo(f"{p['service']}: {p['to_version']} is already serving; nothing to do")
        return
    click.echo(f"{p['service']}: {p['from_version'] or '(nothing)'} -> {p['to_version']}, "
               f"{p['replicas']} replica(s), max_surge {p['max_surge']}, max_unavailable "
               f"{p['max_unavailable']}")
    if p.get("headroom"):
        click.echo(f"  memory: {p['headroom']}")
    for i, b in enumerate(p["batches"], 1):
        steps = []
        if b["stop_first"]:
            steps.append(f"drain {b['stop_first']} old")
        if b["start"]:
            steps.append(f"start {b['start']} new and wait until ready")
        if b["drain"]:
            steps.append(f"drain {b['drain']} old")
        click.echo(f"  batch {i}: " + ", then ".join(steps))


def _render_host(out: dict[str, Any], _code: int) -> None:
    state = "drained (out of rotation)" if out["drained"] else "in rotation"
    what = "" if out.get("changed", True) else " (already)"
    reason = f": {out['reason']}" if out.get("reason") else ""
    click.echo(f"host {state}{what}{reason}")
    if out.get("endpoint"):
        code = 503 if out["drained"] else 200
        click.echo(f"{out['endpoint']} answers {code}")
    else:
        click.echo("warning: no host_ready.listen in agent.yaml: no endpoint tells a load "
                   "balancer", err=True)


@cli.command(help="Bring a service that runs under a unit of its own (UNIT, e.g. api.service, "
                  "maybe triggered by api.socket) under zdd-agent. Alone: read UNIT over "
                  "D-Bus and write CONFIG_DIR/NAME.yaml with everything it can carry "
                  "(socket: nat for TCP), and list what it could not; nothing runs. "
                  "--takeover VERSION: start VERSION on a private port, gate and bake it, "
                  "redirect the public port to it (nftables), then stop and disable UNIT "
                  "once its connections are done: zero failed requests. Uses the config "
                  "as it is when it exists (review it first). --undo: start UNIT again, "
                  "remove the redirect, drain the zdd instances, set the config aside. "
                  "Nothing of UNIT is ever deleted. Runs in this process, as root.",
                  short_help="Write a config for a unit of its own; --takeover, --undo.")
@click.argument("unit")
@click.option("--name", default=None, help="The service's name under zdd-agent (default: "
                                           "UNIT without .service).")
@click.option("--takeover", "takeover_version", metavar="VERSION", default=None,
              help="Move serving from UNIT to zdd-agent, as VERSION.")
@click.option("--undo", is_flag=True, help="Give the service back to UNIT.")
@click.option("--force", is_flag=True, help="Replace an existing config (adopt alone).")
@json_option
@click.pass_obj
def adopt(ctx: Ctx, unit: str, name: str | None, takeover_version: str | None, undo: bool,
          force: bool, as_json: bool) -> None:
    if undo and takeover_version:
        raise click.UsageError("--undo and --takeover exclude each other")
    if force and (undo or takeover_version):
        raise click.UsageError("--force replaces a config written by adopt alone; with "
                               "--takeover the config on disk is used as it is")
    args = {"unit": unit, "name": name, "takeover": takeover_version, "undo": undo,
            "force": force}
    with Progress(not as_json) as progress:
        reply = dispatch(ctx, "adopt", args, True, progress)
    _finish(reply, as_json, _render_adopt)


def _render_adopt(out: dict[str, Any], code: int) -> None:
    if "adopt" in out:
        a = out["adopt"]
        where = f" (and {a['socket']})" if a["socket"] else ""
        click.echo(f"wrote {a['config']} from {a['unit']}{where}: listen "
                   f"{', '.join(a['listen']) or 'nothing'}")
        for line in a["not_carried"]:
            click.echo(f"  not carried: {line}")
        if not a["unix"]:
            click.echo(f"review it, then: zdd-agent adopt {a['unit']} --takeover VERSION")
        return
    if "takeover" in out:
        r = out["takeover"]
        _render_swap(r, code)
        lg = r.get("legacy") or {}
        if lg.get("error"):
            click.echo(f"zdd-agent serves {r['service']} {r['to_version']}, but {lg['unit']} "
                       f"could not be stopped and disabled: {lg['error']}; finish by hand: "
                       f"{lg['todo']}", err=True)
            return
        click.echo(f"{lg.get('unit')} stopped ({lg.get('exit')}) and disabled"
                   + (f" with {lg['socket']}" if lg.get("socket") else "")
                   + f"; {lg.get('open_at_stop', 0)} connections were open at its stop. "
                   f"Undo: zdd-agent adopt {lg.get('unit')} --undo")
        return
    u = out["undo"]
    click.echo(f"{u['unit']} serves {u['service']} again; zdd instances "
               f"{', '.join(u['stopped']) or '(none)'} drained and stopped; config set aside "
               f"as {u['config']}")


@cli.command("drain-host", help="Take this whole host out of its load balancers' rotation: "
                                "the daemon's GET /ready (host_ready.listen in agent.yaml) "
                                "answers 503 until undrain-host, across restarts and reboots. "
                                "--wait then gives the balancers' health checks time to "
                                "notice before maintenance starts.",
                                short_help="Make GET /ready answer 503: out of the balancers' "
                                           "rotation.")
@click.option("--reason", default="", help="Shown in the 503 body and in host-state.")
@click.option("--wait", "wait_s", type=click.FloatRange(0, 3600), default=0.0,
              help="Seconds to wait after draining (e.g. 2 x the balancer's check interval "
                   "x its fall count).")
@json_option
@local_option
@click.pass_obj
def drain_host(ctx: Ctx, reason: str, wait_s: float, as_json: bool, local: bool) -> None:
    reply = dispatch(ctx, "drain-host", {"reason": reason} if reason else {}, local)
    if wait_s and "error" not in reply:
        if not as_json:
            click.echo(f"waiting {wait_s:g}s for the load balancers to notice ...", err=True)
        time.sleep(wait_s)
    _finish(reply, as_json, _render_host)


@cli.command("undrain-host", help="Put this host back into rotation: GET /ready answers 200.")
@json_option
@local_option
@click.pass_obj
def undrain_host(ctx: Ctx, as_json: bool, local: bool) -> None:
    _finish(dispatch(ctx, "undrain-host", {}, local), as_json, _render_host)


@cli.command("host-state", help="Whether this host is drained (drain-host) or in rotation.")
@json_option
@local_option
@click.pass_obj
def host_state(ctx: Ctx, as_json: bool, local: bool) -> None:
    _finish(dispatch(ctx, "host-state", {}, local), as_json, _render_host)


@cli.command(help="Swap SERVICE back to the version that served before the last swap.",
             short_help="Swap SERVICE back to the version before the last swap.")
@click.argument("service")
@json_option
@local_option
@click.pass_obj
def rollback(ctx: Ctx, service: str, as_json: bool, local: bool) -> None:
    _swap_cmd(ctx, "rollback", {"service": service}, as_json, local)


def _unix_state(u: dict[str, Any]) -> str:
    """A unix: listener's line in `status`: its file's access, and whether
    the socket unit's listener is there to take connections."""
    f = u.get("file")
    if f is None:
        where = "no file (clients get ENOENT)"
    elif not f["socket"]:
        where = "not a socket file"
    else:
        where = f"{f['owner']}:{f['group']} {f['mode']}"
        if u["listening"] and not f["bound"]:
            where += " (not the listener's file: replaced since it was bound)"
    if not u["listening"]:
        return f"{where}, nothing listens"
    return f"{where}, listening, {u['queued']} waiting to be accepted"


def _render_status(rows: list[dict[str, Any]], _code: int) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    for col in ("SERVICE", "SERVING", "INSTANCE", "STATE", "CONNS", "SINCE", "LAST SWAP"):
        table.add_column(col)
    for row in rows:
        last = row["last_swap"]
        last_text = "-" if last is None else (
            f"{last['from_version'] or '-'} -> {last['to_version']} {last['result']} "
            f"{_fmt_time((last['started_at'] or 0) + (last['seconds'] or 0))}")
        insts = row["instances"] or [None]
        serving = "DOWN" if row.get("down") else (row["serving"] or "-")
        for i, inst in enumerate(insts):
            table.add_row(
                row["service"] if i == 0 else "", serving if i == 0 else "",
                inst["instance"] if inst else "-",
                f"{inst['active']} ({inst['sub']}), {inst['enabled']}" if inst else "-",
                str(inst["connections"]) if inst else "-",
                _fmt_time(inst["since"]) if inst else "-",
                last_text if i == 0 else "")
    Console(width=200).print(table)
    for row in rows:
        for u in (row.get("socket") or {}).get("unix") or []:
            click.echo(f"{row['service']}: unix:{u['path']} {_unix_state(u)}")
        sock = row.get("socket") or {}
        if sock.get("mode") == "nat":
            routed = sock.get("routed")
            click.echo(f"{row['service']}: nat: {', '.join(sock['listen'])} -> "
                       + ("(rules unreadable)" if routed is None else
                          f"port(s) {', '.join(map(str, routed))}" if routed else "nothing"))
        if row.get("down"):
            click.echo(f"{row['service']} is DOWN: no instance runs (exit "
                       f"{int(Exit.DOWN)}); `zdd-agent doctor` says why", err=True)
        for st in row.get("strays") or []:
            click.echo(f"warning: {row['service']}: a process outside zdd-agent listens on "
                       f"{st['address']} (pid {st['pid']} {st['comm']}): it takes a share of "
                       "new connections", err=True)
        w = row.get("watch")
        if w and w.get("active"):
            click.echo(f"{row['service']}: watching {w['version']} until "
                       f"{_fmt_time(w['until'])}; reverts to {w['previous']} by itself if it "
                       "fails")


@cli.command(help="Show each service (or SERVICE): serving version, instances, their "
                  "states and connections, the last swap, the daemon's watch of it, and "
                  "listeners on its ports that no instance owns. Exit 11 when a service "
                  "has no running instance (DOWN).",
                  short_help="Serving versions, instances, connections, last swaps.")
@click.argument("service", required=False)
@json_option
@local_option
@click.pass_obj
def status(ctx: Ctx, service: str | None, as_json: bool, local: bool) -> None:
    _finish(dispatch(ctx, "status", {"service": service} if service else {}, local),
            as_json, _render_status)


@cli.command(help="Prove zero downtime before production: boot a throwaway sandbox, deploy "
                  "the service of CONFIG there (its own executables, from --from), drive real "
                  "load at its first listen address while swapping --swaps times between "
                  "--from and --to, and print a verdict with its evidence: requests sent and "
                  "failed, kernel reset and drop counters, p50/p99 latency in steady state and "
                  "during swaps, each swap's and drain's duration, the slowest phase. Exits 9 "
                  "when a request failed, a connection was cut at the grace period, a swap "
                  "did not succeed, the service stalled during swaps (--max-p99-ratio) or, "
                  "with --version-header/--version-path, another version than the one swapped "
                  "to answered after a swap. Warns when an old instance closed idle "
                  "keep-alive connections after its drain signal. Needs root. Load: http1/h2 "
                  "with Node's http clients, grpc "
                  "with grpc.health.v1 Check (the config's ready.grpc_service), ws with "
                  "echo clients on --path.",
                  short_help="Prove zero downtime in a throwaway sandbox under load.")
@click.option("--config", "config_file", required=True,
              type=SafePath(exists=True, dir_okay=False, path_type=Path),
              help="The service's config (the same YAML as in /etc/zdd-agent/services).")
@click.option("--from", "from_version", required=True, help="The version deployed first.")
@click.option("--to", "to_version", required=True, help="The version swapped to (and back).")
@click.option("--swaps", type=click.IntRange(1, 1000), default=4, show_default=True)
@click.option("--clients", type=click.IntRange(1, 2000), default=32, show_default=True,
              help="Concurrent clients (h2: 4 streams on each of clients/4 connections).")
@click.option("--duration", type=click.FloatRange(5, 86400),
              help="Seconds of load at most (default: as long as the swaps take).")
@click.option("--protocol", type=click.Choice(["http1", "h2", "grpc", "ws"]), default="http1",
              show_default=True)
@click.option("--path", help="Request path (http: /, ws: /ws).")
@click.option("--plot", type=SafePath(dir_okay=False, path_type=Path),
              help="Write a PNG of the run over time: requests/s, failures, latency, "
                   "connections per instance, the swaps' phases.")
@click.option("--max-p99-ratio", type=click.FloatRange(1, 1000), default=5.0,
              show_default=True,
              help="Fail as a stall when p99 latency during swaps exceeds this many times "
                   "the steady p99 AND is more than 50 ms above it.")
@click.option("--version-header", metavar="NAME",
              help="A response header that carries the serving version: after each swap, "
                   "GET --path a few times and fail unless it says the version swapped to.")
@click.option("--version-path", metavar="PATH",
              help="A path whose GET answers the serving version (a JSON field \"version\", "
                   "or the version named in the body): checked after each swap like "
                   "--version-header.")
@json_option
def verify(config_file: Path, from_version: str, to_version: str, swaps: int, clients: int,
           duration: float | None, protocol: str, path: str | None, plot: Path | None,
           max_p99_ratio: float, version_header: str | None, version_path: str | None,
           as_json: bool) -> None:
    from . import verify as v

    opts = v.Options(config_file, from_version, to_version, swaps, clients, duration,
                     protocol, path, plot, max_p99_ratio, version_header, version_path)
    report = v.run(opts, (lambda s: None) if as_json else click.echo)
    if as_json:
        _out(report)
    else:
        for line in v.render(report):
            click.echo(line)
    sys.exit(int(Exit.OK if report["verdict"] == "pass" else Exit.NOT_ZERO_DOWNTIME))


@cli.command(help="Print SERVICE's connections per running instance every INTERVAL, as JSON "
                  "lines ({\"t\": epoch, \"connections\": {instance: n}}), for SECONDS "
                  "or until interrupted. Runs here, not through the daemon.",
                  short_help="Print SERVICE's connections per instance over time.")
@click.argument("service")
@click.option("--interval", type=click.FloatRange(0.05, 60), default=1.0, show_default=True,
              help="Seconds between two counts.")
@click.option("--seconds", type=click.FloatRange(0.1, 86400), default=3600, show_default=True,
              help="Stop after this long.")
@click.pass_obj
def watch(ctx: Ctx, service: str, interval: float, seconds: float) -> None:
    from . import deploy

    def out(d: dict[str, Any]) -> None:
        click.echo(json.dumps(d))
        sys.stdout.flush()

    try:
        deploy.watch(ctx.paths, service, interval, seconds, out)
    except KeyboardInterrupt:
        pass


def _render_history(rows: list[dict[str, Any]], _code: int) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    for col in ("WHEN", "SERVICE", "FROM", "TO", "SECONDS", "RESULT", "DRAINED", "CUT AT GRACE"):
        table.add_column(col)
    for r in rows:
        table.add_row(_fmt_time(r["at"]), r["service"], r["from"] or "-", r["to"],
                      f"{r['seconds']:.2f}" if r["seconds"] is not None else "-",
                      r["result"] + (f" ({r['reason']})" if r["reason"] else ""),
                      str(r["drained"]), str(r["cut"]) if r["killed_at_grace"] else "-")
    Console(width=240).print(table)


@cli.command(help="List past swaps (all services, or SERVICE), oldest first: when, from, "
                  "to, duration, result, connections drained and cut at the grace period.",
                  short_help="List past swaps, oldest first.")
@click.argument("service", required=False)
@click.option("-n", "--limit", default=20, show_default=True, type=click.IntRange(1, 1000))
@json_option
@local_option
@click.pass_obj
def history(ctx: Ctx, service: str | None, limit: int, as_json: bool, local: bool) -> None:
    args: dict[str, Any] = {"limit": limit}
    if service:
        args["service"] = service
    _finish(dispatch(ctx, "history", args, local), as_json, _render_history)


@cli.group(help="The NAT rules of socket: nat services (nftables table inet zdd-agent).",
           short_help="The NAT rules of socket: nat services.")
def nat() -> None:
    pass


@nat.command("restore", help="Write the rules as the configs and the instances enabled for "
                             "boot say, one transaction per service; remove the chains of "
                             "services no longer socket: nat. Run at boot by "
                             "zdd-agent-nat.service; by hand after the table was lost.",
                             short_help="Write the NAT rules of socket: nat services again.")
@json_option
@click.pass_obj
def nat_restore(ctx: Ctx, as_json: bool) -> None:
    def render(out: list[dict[str, Any]], _code: int) -> None:
        for r in out:
            click.echo(f"{r['service']}: removed" if r.get("removed") else
                       f"{r['service']}: -> port(s) {', '.join(map(str, r['ports'])) or 'none'}")
        if not out:
            click.echo("no socket: nat service")

    _finish(dispatch(ctx, "nat-restore", {}, True), as_json, render)


@cli.group(help="Kernel settings for zero-downtime swaps (per network namespace).",
           short_help="Kernel settings for zero-downtime swaps.")
def sysctl() -> None:
    pass


def _render_changes(key: str, verb: str) -> Any:
    def render(out: dict[str, Any], _code: int) -> None:
        if not out[key]:
            click.echo(f"nothing to {verb}: every value is as wanted")
        for c in out[key]:
            click.echo(f"{c['key']}: {c['old']} -> {c['new']}")
        for k in out.get("missing", []):
            click.echo(f"warning: {k}: not in this kernel ({_kernel()}); skipped", err=True)
    return render


@sysctl.command("apply", help="Write the wanted values to /proc/sys, read them back, and "
                              "record the old ones for `restore`.",
                              short_help="Write the wanted kernel settings; record the old ones.")
@json_option
@local_option
@click.pass_obj
def sysctl_apply(ctx: Ctx, as_json: bool, local: bool) -> None:
    _finish(dispatch(ctx, "sysctl-apply", {}, local), as_json, _render_changes("changed", "change"))


def _render_check(out: dict[str, Any], _code: int) -> None:
    for c in out["differ"]:
        click.echo(f"{c['key']}: running {c['running']!r}, wanted {c['wanted']!r}")
    for k in out["missing"]:
        click.echo(f"{k}: not in this kernel ({_kernel()})", err=True)
    if out["ok"]:
        click.echo("all sysctls as wanted")


@sysctl.command("check", help="Compare the running values with the wanted ones; exit 6 and "
                              "list the differences when any differ.",
                              short_help="Compare running kernel settings with the wanted ones.")
@json_option
@local_option
@click.pass_obj
def sysctl_check(ctx: Ctx, as_json: bool, local: bool) -> None:
    _finish(dispatch(ctx, "sysctl-check", {}, local), as_json, _render_check)


@sysctl.command("restore", help="Put back the values recorded by the first `apply`.")
@json_option
@local_option
@click.pass_obj
def sysctl_restore(ctx: Ctx, as_json: bool, local: bool) -> None:
    _finish(dispatch(ctx, "sysctl-restore", {}, local), as_json,
            _render_changes("restored", "restore"))


def _kernel() -> str:
    import os

    return f"Linux {os.uname().release}"


@cli.command(help="Check this host and each service against what a zero-downtime swap "
                  "needs: kernel, sysctls, systemd, the drain signal versus what the program "
                  "handles, PID-1 wrappers, open-file limits, memory headroom. Each finding "
                  "says the symptom, the cause, how to verify and the fix. Exit 8 when "
                  "anything needs attention.",
                  short_help="Check this host and each service for zero-downtime swaps.")
@json_option
@click.pass_obj
def doctor(ctx: Ctx, as_json: bool) -> None:
    from . import doctor as doc

    findings = doc.run(ctx.paths)
    if as_json:
        _out(doc.summary(findings))
    else:
        for f in findings:
            head = f"[{f.level}]".ljust(7) + f"{f.subject}: {f.check}"
            if f.level == "ok":
                click.echo(f"{head}: {f.cause}")
                continue
            click.echo(head)
            for label in ("symptom", "cause", "verify", "fix"):
                if getattr(f, label):
                    click.echo(f"        {label + ':':<9}{getattr(f, label)}")
    if any(f.level != "ok" for f in findings):
        raise SystemExit(int(Exit.PROBLEMS))


@cli.command(help="Run the long-running root agent (started by zdd-agent.service): the "
                  "control socket, crash recovery of interrupted swaps, sysctls, metrics.",
                  short_help="Run the root agent (started by zdd-agent.service).")
@click.pass_obj
def daemon(ctx: Ctx) -> None:
    from .daemon import run

    raise SystemExit(run(ctx.paths))


@cli.command("check-config", help="Check a service config FILE (or, with --agent, an "
                                    "agent.yaml) without installing it: exit 0 when valid, 2 "
                                    "with the reason. For Ansible's `validate:` and for CI. "
                                    "A valid config that cannot work (a port probe of "
                                    "gunicorn or uvicorn under socket: inherit) gets a "
                                    "warning line on stderr; the exit stays 0.",
                                    short_help="Check a service config (or agent.yaml) "
                                               "without installing it.")
@click.argument("file", type=SafePath(exists=True, dir_okay=False, path_type=Path))
@click.option("--name", help="The service the file will be installed as (default: the file's "
                             "name without .yaml).")
@click.option("--agent", "is_agent", is_flag=True, help="FILE is the agent's own agent.yaml.")
def check_config(file: Path, name: str | None, is_agent: bool) -> None:
    from .config import load_agent_config, parse_service, read_yaml
    from .servers import probe_blind

    try:
        if is_agent:
            load_agent_config(file)
            click.echo(f"{file}: a valid agent config")
        else:
            svc = parse_service(file, read_yaml(file), expected_name=name or file.stem)
            click.echo(f"{file}: a valid config of service {svc.name}")
            from .settings import explain, this_host

            # what each setting does to an instance on this host; a warning
            # (the instances cannot hold the connections asked for) on stderr
            lines = explain(svc.settings, this_host(), user=svc.user)
            if svc.fast_open:
                who = ("the agent sets it on the socket unit's listeners at each swap"
                       if svc.socket == "inherit" else
                       "the program must set TCP_FASTOPEN on its own listener (ZDD_FAST_OPEN)")
                lines.append(("ok", f"fast_open {svc.fast_open}: up to {svc.fast_open} "
                                    "pending TCP Fast Open connections per listener; "
                                    f"{who}; a first request may be replayed (RFC 7413)"))
            for level, line in lines:
                if level == "warn":
                    click.echo(f"zdd-agent: warning: {line}", err=True)
                else:
                    click.echo(f"  {line}")
            blind = probe_blind(svc)  # valid, but every swap would roll back: warn, exit 0
            if blind is not None:
                click.echo(f"zdd-agent: warning: {blind.line()}", err=True)
    except ZddError as e:
        click.echo(f"zdd-agent: error: {e}", err=True)
        raise SystemExit(2) from None


@cli.command(help="Put the agent's units (zdd-agent.service/.socket, zdd.target), "
                  "/etc/sysctl.d/60-zdd-agent.conf and a config skeleton in place, create "
                  "the admin group, enable and start the daemon. Idempotent. Run from the "
                  "Debian package, the units and the sysctl.d file are the package's: it says "
                  "so (\"package\" lines), writes only agent.yaml's sysctl overrides, and "
                  "enables and starts the daemon.",
                  short_help="Start the daemon with its units, sysctls and config in place.")
@click.option("--dry-run", is_flag=True, help="Print what would change; change nothing.")
@json_option
@click.pass_obj
def install(ctx: Ctx, dry_run: bool, as_json: bool) -> None:
    from .config import load_agent_config
    from .install import install as do_install
    from .install import installed_package

    conf = load_agent_config(ctx.paths.agent_config)
    pkg = installed_package()
    steps = do_install(dry_run, conf.admin_group, conf.sysctl, pkg)
    if as_json:
        _out({"changed": any(s.changed for s in steps), "dry_run": dry_run,
              "package": pkg.name if pkg else None,
              "steps": [{"action": s.action, "target": s.target} for s in steps]})
        return
    if pkg is not None:
        click.echo(f"zdd-agent runs from the Debian package {pkg.name}: its units and sysctl.d "
                   f"file are left to the package manager (apt upgrade, apt remove, apt purge)")
    for step in steps:
        click.echo(f"{'would ' if dry_run and step.changed else ''}{step}")


@cli.command(help="Stop and remove the daemon's units and the sysctl.d file; keep the "
                  "operator's configs, the state and the services' units. The NAT rules of "
                  "socket: nat services go too: refused while such a service has rules "
                  "(its public port would stop answering) unless --remove-nat. Refused when "
                  "installed from the Debian package: apt remove or purge it.",
                  short_help="Remove the daemon's units and sysctls; keep configs and state.")
@click.option("--dry-run", is_flag=True, help="Print what would change; change nothing.")
@click.option("--remove-nat", is_flag=True, help="Remove the NAT rules even though socket: nat "
                                                 "services are served through them.")
def uninstall(dry_run: bool, remove_nat: bool) -> None:
    from .install import installed_package
    from .install import uninstall as do_uninstall

    for step in do_uninstall(dry_run, remove_nat, installed_package()):
        click.echo(f"{'would ' if dry_run and step.changed else ''}{step}")


@cli.command(help="Boot a throwaway systemd sandbox, deploy the bundled demo API under the "
                  "agent, load it with concurrent clients, swap versions back and forth and "
                  "report requests sent and failed. Needs root.",
                  short_help="Swap the bundled demo API under load in a sandbox.")
@click.option("--swaps", default=4, show_default=True, type=click.IntRange(1, 50))
@click.option("--clients", default=32, show_default=True, type=click.IntRange(1, 1000))
@json_option
def demo(swaps: int, clients: int, as_json: bool) -> None:
    from .demo.run import run_demo

    report = run_demo(swaps=swaps, clients=clients, echo=None if as_json else click.echo)
    if as_json:
        _out(report)
    if not report["ok"]:
        raise SystemExit(int(Exit.INTERNAL))


def main(sent: fastpath.Sent | None = None) -> None:
    """The command line; `sent`: its request, when entry.py sent it already."""
    try:
        cli.main(standalone_mode=False, obj=sent, prog_name="zdd-agent")
    except ZddError as e:
        if "--json" in sys.argv[1:]:  # machines get the error as JSON too
            _out({"error": str(e), "exit_code": int(e.exit_code),
                  "class": e.exit_code.name.lower(),
                  **{k: v for k, v in e.details.items() if isinstance(v, (str, int))}})
        click.echo(f"zdd-agent: error: {e}", err=True)
        sys.exit(int(e.exit_code))
    except OSError as e:  # a command outside dispatch() the OS refused
        err = os_refusal(sys.argv[1] if len(sys.argv) > 1 else "zdd-agent", e)
        click.echo(f"zdd-agent: error: {err}", err=True)
        sys.exit(int(err.exit_code))
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(int(Exit.CONFIG))
    except SystemExit:
        raise
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
