"""Rolling back never goes below the promise: the old instances come back and
pass the gate first, then the new ones go, batch by batch, so that at no
moment fewer than replicas - max_unavailable instances are ready (the
invariant the rollout itself keeps, rollout.py).

- new instances that were never admitted serve nothing: they go first;
- each step restores k old instances (k fits the surge budget) and gates
  them, then drains k admitted new ones (they served: they get a drain);
- if an old instance cannot be restored, the admitted new ones that still
  run are kept: something serves, and the result says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .drain import DrainResult, run_drain
from .gate import run_gate
from .instance import Host

GONE_MARGIN = 5.0  # seconds past the grace period to wait for a stopped instance


@dataclass
class RevertOutcome:
    ok: bool = True
    detail: str = ""  # why the old version could not be restored
    checks: int = 0
    drain: DrainResult | None = None
    kept: list[str] = field(default_factory=list)  # new instances left serving


def wait_stopped(host: Host, instance: str, limit: float) -> None:
    end = host.clock.monotonic() + limit
    while not host.ops.status(instance).stopped and host.clock.monotonic() < end:
        host.clock.sleep(0.25)


def discard(host: Host, instances: list[str]) -> None:
    """Stop instances that do not serve (never admitted), forget them."""
    host.withdraw(instances)
    for x in instances:
        host.ops.stop(x)
    for x in instances:
        wait_stopped(host, x, host.svc.drain.grace_period + GONE_MARGIN)
        host.ops.disable(x)
        host.ops.cleanup(x)


def retire(host: Host, instances: list[str]) -> None:
    for x in instances:
        host.ops.disable(x)
        host.ops.cleanup(x)


def restore(host: Host, old: str, instances: list[str]) -> None:
    """Start old instances again (start jobs queue behind a running drain)."""
    host.emit("restore", version=old, instances=instances)
    for x in instances:
        host.ops.prepare(x, old, keep=True)
        host.ops.start(x)


def step_size(replicas: int, max_surge: int, serving: int) -> int:
    """How many old instances one restore step may start beside the `serving`
    ones within replicas + max_surge (at least one: the rollback must move)."""
    return max(1, replicas + max_surge - serving)


def restore_first(host: Host, old: str | None, drained: list[str], admitted: list[str],
                  unadmitted: list[str], serving_olds: int) -> RevertOutcome:
    """Back to `old`: discard `unadmitted`, then restore `drained` old
    instances step by step, each step gated before as many `admitted` new
    ones are drained."""
    out = RevertOutcome()
    discard(host, unadmitted)
    news = list(admitted)
    todo = list(drained) if old is not None else []
    svc = host.svc
    while todo:
        k = step_size(svc.replicas, svc.max_surge, serving_olds + len(news))
        step, todo = todo[:k], todo[k:]
        assert old is not None
        restore(host, old, step)
        # an old instance still draining starts again only once it has stopped
        gate = run_gate(host, step, extra_deadline=svc.drain.grace_period + GONE_MARGIN)
        out.checks += gate.checks
        if gate.verdict != "ready":
            out.ok, out.detail = False, gate.reason
            out.kept = news
            # an old instance that cannot come back is stopped, not left in
            # systemd's restart loop (Restart=on-failure, no start limit)
            if gate.failed is not None:
                discard(host, [gate.failed])
            return out
        for x in step:
            host.ops.enable(x)
        try:
            host.route(step, [])
        except Exception as e:  # socket: nat: up, and no connection reaches them
            out.ok, out.detail, out.kept = False, f"cannot route to {', '.join(step)}: {e}", news
            return out
        serving_olds += len(step)
        out.drain = _drain_news(host, news[:len(step)], out.drain)
        news = news[len(step):]
    out.drain = _drain_news(host, news, out.drain)
    return out


def _drain_news(host: Host, news: list[str], acc: DrainResult | None) -> DrainResult | None:
    if not news:
        return acc
    d, _ = run_drain(host, news)
    retire(host, news)
    return d if acc is None else acc.merge(d)
