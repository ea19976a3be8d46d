from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import Listen, Ready, ServiceConfig
from agent.errors import ConfigError
from agent.traffic.series import Series
from agent.verify import (DEFAULT_MAX_P99_RATIO, IDLE_FIX, Options, answered_version, check,
                          client_argv, client_outcome, render, stalled, summarize, version_argv)


def svc() -> ServiceConfig:
    return ServiceConfig(name="api", command=("/opt/api/{version}/bin/api",),
                         listen=(Listen("127.0.0.1", 8080),), path=Path("api.yaml"),
                         ready=Ready(type="grpc", url="127.0.0.1:9", grpc_service="x.Y"))


def swap(t: float, seconds: float, result: str = "ok", cut: int = 0, **extra: object) -> dict:
    return {"from_version": "v1", "to_version": "v2", "result": result, "reason": "",
            "started_at": t, "seconds": seconds,
            "phases": {"start": seconds / 4, "ready": seconds / 4, "drain": seconds / 2},
            "drain": {"seconds": seconds / 2, "connections_drained": 10 - cut,
                      "connections_at_end": cut, "killed_at_grace": bool(cut),
                      **({"closed_idle": extra.pop("closed_idle")} if "closed_idle" in extra
                         else {})},
            "tcp": {"EstabResets": 1}, **extra}


def load(failed_at: float | None = None, steady_ms: float = 1.0,
         during_ms: float = 30.0) -> dict:
    s = Series(t0=100.0)
    for i in range(100):  # 10 s of requests, steady_ms, and during_ms during [103, 104)
        t = 100.0 + i / 10
        s.record(True, (during_ms if 103.0 <= t < 104.0 else steady_ms) / 1000, end=t)
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
    assert 30 <= r["latency_ms"]["during_swaps"]["p99"] < 32
    assert r["latency_ms"]["p99_ratio"] > 5  # over the ratio, but not 50 ms above steady
    assert r["warnings"] == [] and r["swaps"][0]["closed_idle"] is None
    assert r["swaps"][0]["answered"] is None and r["version_asked"] is None
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


STALLS = [
    # (name, steady p99 ms, during p99 ms, max ratio, stalled)
    ("a little slower during swaps", 20.0, 30.0, 5.0, False),
    ("over the ratio, within the slack (tiny steady p99)", 2.0, 40.0, 5.0, False),
    ("over the ratio and past the slack", 2.0, 60.0, 5.0, True),
    ("past the slack, under the ratio", 30.0, 140.0, 5.0, False),
    ("past both", 30.0, 160.0, 5.0, True),
    ("exactly the ratio is allowed", 20.0, 100.0, 5.0, False),
    ("a stricter ratio", 30.0, 100.0, 2.0, True),
    ("no steady samples: nothing to compare", 0.0, 500.0, 5.0, False),
]


@pytest.mark.parametrize("name,steady,during,ratio,expected", STALLS, ids=[c[0] for c in STALLS])
def test_stall_rule(name: str, steady: float, during: float, ratio: float,
                    expected: bool) -> None:
    assert stalled(steady, during, ratio) is expected


def test_a_stall_fails_the_verdict_and_names_both_limits() -> None:
    r = summarize(opts(swaps=1), svc(), load(steady_ms=20, during_ms=300), [swap(103.0, 1.0)],
                  100.0)
    assert r["verdict"] == "fail"
    [reason] = r["reasons"]
    assert reason.startswith("the service stalled during swaps: p99 ")
    assert "allowed: up to 5x, or up to 50 ms above steady" in reason
    relaxed = summarize(opts(swaps=1, max_p99_ratio=20.0), svc(),
                        load(steady_ms=20, during_ms=300), [swap(103.0, 1.0)], 100.0)
    assert relaxed["verdict"] == "pass" and relaxed["latency_ms"]["max_p99_ratio"] == 20.0


def asked(*versions: str | None) -> list[dict]:
    return [{"version": v, "status": 200 if v else None} for v in versions]


VERSIONS = [
    # (name, swaps, options, reasons expected (words), verdict)
    ("every answer from the new version", [swap(103.0, 1.0, answered=asked("v2", "v2", "v2"))],
     {"version_path": "/version"}, [], "pass"),
    ("one answer from the old version", [swap(103.0, 1.0, answered=asked("v2", "v1", "v2"))],
     {"version_path": "/version"},
     ["after swap 1 to v2, 1 of 3 answers were not v2 (GET /version): v2 x2, v1 x1"], "fail"),
    ("no version in the answers", [swap(103.0, 1.0, answered=asked(None, None, None))],
     {"version_header": "X-Version"},
     ["3 of 3 answers were not v2 (header X-Version): no version x3"], "fail"),
    ("a swap that rolled back is judged by its result",
     [swap(103.0, 1.0, "rolled_back", answered=asked("v1", "v1", "v1"))],
     {"version_path": "/"}, ["1 of 1 swaps did not succeed"], "fail"),
    ("not asked: no evidence either way", [swap(103.0, 1.0)], {}, [], "pass"),
]


@pytest.mark.parametrize("name,swaps,kw,words,verdict", VERSIONS, ids=[c[0] for c in VERSIONS])
def test_the_version_that_answers_after_each_swap(name: str, swaps: list, kw: dict,
                                                   words: list[str], verdict: str) -> None:
    r = summarize(opts(swaps=1, **kw), svc(), load(), swaps, 100.0)
    assert r["verdict"] == verdict, r["reasons"]
    assert len(r["reasons"]) == len(words), r["reasons"]
    for w, reason in zip(words, r["reasons"]):
        assert w in reason, reason
    assert "\n".join(render(r))  # the human report renders every case


RESPONSES = [
    # (name, options, curl -i output, version found)
    ("header", {"version_header": "X-Version"},
     "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-Version: v2\r\n\r\nhello", "v2"),
    ("header name in any case, h2", {"version_header": "X-Version"},
     "HTTP/2 200\r\nx-version:  v1 \r\n\r\n", "v1"),
    ("header missing", {"version_header": "X-Version"}, "HTTP/1.1 200 OK\r\n\r\nv2", None),
    ("JSON field", {"version_path": "/"},
     'HTTP/1.1 200 OK\r\n\r\n{"version": "v2", "pid": 7}', "v2"),
    ("JSON field names another version", {"version_path": "/"},
     'HTTP/1.1 200 OK\r\n\r\n{"version": "v3"}', "v3"),
    ("text naming one version", {"version_path": "/"}, "HTTP/1.1 200 OK\r\n\r\nserving v1\n",
     "v1"),
    ("text naming both", {"version_path": "/"}, "HTTP/1.1 200 OK\r\n\r\nv2 (was v1)", None),
    ("a longer version is not this one", {"version_path": "/"},
     "HTTP/1.1 200 OK\r\n\r\nserving v21", None),
]


@pytest.mark.parametrize("name,kw,raw,version", RESPONSES, ids=[c[0] for c in RESPONSES])
def test_which_version_an_answer_names(name: str, kw: dict, raw: str,
                                       version: str | None) -> None:
    assert answered_version(opts(**kw), raw)["version"] == version


def test_version_request_goes_to_the_first_listen_address() -> None:
    argv = version_argv(opts(version_path="/version"), svc())
    assert argv[0] == "curl" and argv[-1] == "http://127.0.0.1:8080/version"
    h2 = version_argv(opts(protocol="h2", version_header="X-Version", path="/x"), svc())
    assert "--http2-prior-knowledge" in h2 and h2[-1] == "http://127.0.0.1:8080/x"


IDLE = [
    # (name, closed_idle per swap (None: not reported), warned)
    ("not reported by the engine", [None, None], False),
    ("none closed", [0, 0], False),
    ("closed idle ones", [3, 0], True),
]


@pytest.mark.parametrize("name,idle,warned", IDLE, ids=[c[0] for c in IDLE])
def test_idle_connections_closed_after_the_drain_signal_warn(name: str, idle: list,
                                                              warned: bool) -> None:
    swaps = [swap(103.0 + 2 * i, 1.0, **({} if n is None else {"closed_idle": n}))
             for i, n in enumerate(idle)]
    r = summarize(opts(swaps=2), svc(), load(), swaps, 100.0)
    assert r["verdict"] == "pass"  # a warning, not a failure
    assert [s["closed_idle"] for s in r["swaps"]] == idle
    if not warned:
        assert r["warnings"] == []
        return
    [w] = r["warnings"]
    assert w.startswith("3 idle keep-alive connections were closed by the old instance")
    assert "(swap 1: 3)" in w and w.endswith(f"fix: {IDLE_FIX}")
    text = "\n".join(render(r))
    assert f"warning: {w}" in text and "3 closed idle" in text


@pytest.mark.parametrize("kw, message", [
    ({"max_p99_ratio": 0.5}, "--max-p99-ratio"),
    ({"version_header": "X Version"}, "--version-header 'X Version' is not a header name"),
    ({"version_path": "version"}, "--version-path 'version' must start with /"),
    ({"version_header": "X-Version", "version_path": "/v"}, "give one"),
    ({"version_header": "X-Version", "protocol": "grpc"}, "not --protocol grpc")])
def test_bad_evidence_options_are_refused(kw: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        check(opts(**kw))


def test_cli_default_ratio_is_the_library_default() -> None:
    from agent.cli import verify as command

    [option] = [p for p in command.params if p.name == "max_p99_ratio"]
    assert option.default == DEFAULT_MAX_P99_RATIO
