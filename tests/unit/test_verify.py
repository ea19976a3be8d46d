from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import Listen, Ready, ServiceConfig
from agent.errors import ConfigError
from agent.traffic.series import Series
from agent.verify import Options, check, client_argv, client_outcome, summarize


def svc() -> ServiceConfig:
    return ServiceConfig(name="api", command=("/opt/api/{version}/bin/api",),
                         listen=(Listen("127.0.0.1", 8080),), path=Path("api.yaml"),
                         ready=Ready(type="grpc", url="127.0.0.1:9", grpc_service="x.Y"))


def swap(t: float, seconds: float, result: str = "ok", cut: int = 0) -> dict:
    return {"from_version": "v1", "to_version": "v2", "result": result, "reason": "",
            "started_at": t, "seconds": seconds,
            "phases": {"start": seconds / 4, "ready": seconds / 4, "drain": seconds / 2},
            "drain": {"seconds": seconds / 2, "connections_drained": 10 - cut,
                      "connections_at_end": cut, "killed_at_grace": bool(cut)},
            "tcp": {"EstabResets": 1}}


def load(failed_at: float | None = None) -> dict:
    s = Series(t0=100.0)
    for i in range(100):  # 10 s of requests, 1 ms, and 100 ms during [103, 104)
        t = 100.0 + i / 10
        s.record(True, 0.1 if 103.0 <= t < 104.0 else 0.001, end=t)
    if failed_at is not None:
        s.record(False, 0, end=failed_at)
    sent, failed = s.totals()
    return {"sent": sent + failed, "failed": failed, "errors": {"ECONNRESET": failed} if
            failed else {}, "series": s}


def opts(**kw: object) -> Options:
    return Options(Path("api.yaml"), "v1", "v2", **kw)  # type: ignore[arg-type]


def test_a_clean_run_passes_and_separates_steady_from_swap_latency() -> None:
    r = summarize(opts(swaps=1), svc(), load(), [swap(103.0, 1.0)], started=100.0)
    assert r["verdict"] == "pass" and r["reasons"] == []
    assert r["latency_ms"]["steady"]["p99"] < 1.1
    assert 100 <= r["latency_ms"]["during_swaps"]["p99"] < 106
    assert r["tcp"] == {"EstabResets": 1}
    assert r["slowest_phase"] == {"phase": "drain", "seconds": 0.5, "swap": 1}


def test_failures_cuts_and_failed_swaps_each_fail_the_verdict() -> None:
    failed = summarize(opts(swaps=1), svc(), load(failed_at=103.5), [swap(103.0, 1.0)], 100.0)
    assert failed["verdict"] == "fail" and "1 of 101 requests failed" in failed["reasons"][0]
    cut = summarize(opts(swaps=1), svc(), load(), [swap(103.0, 1.0, cut=3)], 100.0)
    assert cut["verdict"] == "fail" and "3 connections" in cut["reasons"][0]
    rolled = summarize(opts(swaps=2), svc(), load(), [swap(103.0, 1.0, "rolled_back")], 100.0)
    assert rolled["verdict"] == "fail" and len(rolled["reasons"]) == 2  # + only 1 of 2 ran


def test_client_per_protocol() -> None:
    grpc = client_argv(opts(protocol="grpc"), svc(), 10)
    assert grpc[grpc.index("--health") + 1] == "x.Y" and "127.0.0.1:8080" in grpc
    h2 = client_argv(opts(protocol="h2", clients=32), svc(), 10)
    assert h2[h2.index("--connections") + 1] == "8" and "http://127.0.0.1:8080/" in h2
    ws = client_argv(opts(protocol="ws", path="/chat"), svc(), 10)
    assert ws[ws.index("--path") + 1] == "/chat"
    out = client_outcome("ws", {"echo": {
        "sent": 10, "lost": 1, "abnormal_closes": 2, "connect_failures": 0,
        "closes": {"1006": 2, "1012": 1}, "series": Series(t0=1.0).to_dict()}})
    assert out["failed"] == 3 and out["errors"] == {"close 1006": 2, "close 1012": 1}


@pytest.mark.parametrize("kw, message", [
    ({"protocol": "smtp"}, "--protocol"), ({"swaps": 0}, "--swaps"),
    ({"clients": 5000}, "--clients"), ({"duration": 1.0}, "--duration"),
    ({"path": "no-slash"}, "--path")])
def test_bad_options_are_refused_before_anything(kw: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        check(opts(**kw))


def test_releases_in_the_sandbox_private_dirs_are_refused(tmp_path: Path) -> None:
    config = tmp_path / "api.yaml"
    config.write_text("name: api\ncommand: /tmp/rel/{version}/api\nlisten: ['127.0.0.1:8080']\n")
    config.chmod(0o644)
    tmp_path.chmod(0o755)
    with pytest.raises(ConfigError, match="sandbox replaces"):
        check(Options(config, "v1", "v2"))
