"""Unit rendering: names validated, values escaped for systemd's parser."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent import units
from agent.config import Drain, Listen, Ready, ServiceConfig
from agent.errors import ConfigError


def svc(**kw: object) -> ServiceConfig:
    base: dict[str, object] = dict(
        name="api", command=("/opt/api/{version}/bin/api", "--name", 'a "quoted" 100% $HOME'),
        listen=(Listen("127.0.0.1", 8080), Listen(None, 9090)), path=Path("/etc/x/api.yaml"),
        environment=(("GREETING", "hello world"), ("PCT", "50%")),
        ready=Ready(type="notify", deadline=20.0), drain=Drain(grace_period=12.0,
                                                               signal="SIGQUIT"))
    base.update(kw)
    return ServiceConfig(**base)  # type: ignore[arg-type]


def test_unit_names() -> None:
    assert units.socket_unit("api") == "zdd-api.socket"
    assert units.template_unit("api") == "zdd-api@.service"
    assert units.instance_unit("api", "v1.2") == "zdd-api@v1.2.service"
    assert units.version_of("api", "zdd-api@v1.2.service") == "v1.2"
    assert units.version_of("api", "zdd-api-x@v1.service") is None


@pytest.mark.parametrize("name,version", [("api", "v1/../../x"), ("api", "v1\n[Service]"),
                                          ("Api", "v1"), ("api;x", "v1"), ("api", "")])
def test_unsafe_names_never_reach_a_unit(name: str, version: str) -> None:
    with pytest.raises(ConfigError):
        units.instance_unit(name, version)


def test_escape_word() -> None:
    assert units.escape_word("plain") == '"plain"'
    assert units.escape_word('a "b" \\c 100%') == '"a \\"b\\" \\\\c 100%%"'
    with pytest.raises(ValueError):
        units.escape_word("line\nbreak")
    assert units.exec_start(["/bin/x", "$HOME"]) == '"/bin/x" "$$HOME"'


def test_service_units() -> None:
    files = units.render_service(svc(), backlog=4096).files
    assert set(files) == {"zdd-api.socket", "zdd-api@.service", "zdd-api-hold.service",
                          "zdd.target", "zdd-api.slice"}
    sock = files["zdd-api.socket"]
    assert "ListenStream=127.0.0.1:8080\nListenStream=9090\n" in sock
    assert "ReusePort=yes" in sock and "Backlog=4096" in sock
    assert "Service=zdd-api-hold.service" in sock
    tmpl = files["zdd-api@.service"]
    for line in ("Sockets=zdd-api.socket", "Requires=zdd-api.socket", "KillSignal=SIGQUIT",
                 "TimeoutStopSec=12s", "Type=notify", "StartLimitIntervalSec=0", "NonBlocking=yes",
                 "WantedBy=zdd.target", 'Environment="GREETING=hello world"',
                 'Environment="PCT=50%%"'):
        assert f"\n{line}\n" in tmpl, line
    assert "User=" not in tmpl
    assert "User=www\n" in units.render_service(svc(user="www"), 1).files["zdd-api@.service"]
    http = svc(ready=Ready(type="http", url="http://127.0.0.1:{instance_port}/r"))
    assert "Type=exec" in units.render_service(http, 1).files["zdd-api@.service"]


def test_instance_dropin() -> None:
    text = units.render_instance_dropin(svc(), "v7", instance_port=41000)
    assert ('ExecStart="/opt/api/v7/bin/api" "--name" "a \\"quoted\\" 100%% $$HOME"'
            in text)
    assert '"ZDD_VERSION=v7"' in text and '"ZDD_INSTANCE_PORT=41000"' in text
    assert '"ZDD_GRACE_PERIOD=12"' in text
    assert units.dropin_path("api", "v7") == "zdd-api@v7.service.d/zdd-instance.conf"
    assert "ZDD_INSTANCE_PORT" not in units.render_instance_dropin(svc(), "v7", None)


def test_reuseport_units_have_no_socket_unit() -> None:
    files = units.render_service(svc(socket="reuseport"), backlog=4096).files
    assert set(files) == {"zdd-api@.service", "zdd.target", "zdd-api.slice"}
    tmpl = files["zdd-api@.service"]
    assert "Sockets=" not in tmpl and "Requires=zdd-api.socket" not in tmpl
    assert "tcp_migrate_req" in tmpl
    dropin = units.render_instance_dropin(svc(socket="reuseport"), "v1", None)
    assert '"ZDD_LISTEN=127.0.0.1:8080 9090"' in dropin


def test_one_replica_runs_each_version_from_the_template_itself() -> None:
    """No drop-in per version, hence no daemon-reload in a swap: the
    template's ExecStart names the version by the instance (%i)."""
    tmpl = units.render_service(svc(), 1).files["zdd-api@.service"]
    assert 'ExecStart="/opt/api/%i/bin/api" "--name" "a \\"quoted\\" 100%% $$HOME"' in tmpl
    assert '"ZDD_VERSION=%i"' in tmpl and '"ZDD_INSTANCE=%i"' in tmpl
    assert units.version_in_template(svc())
    # replicas, or a readiness port per start: a drop-in per instance instead
    http = svc(ready=Ready(type="http", url="http://127.0.0.1:{instance_port}/r"))
    assert not units.version_in_template(http)
    assert "\nExecStart=" not in units.render_service(http, 1).files["zdd-api@.service"]
    # a drop-in resets the template's ExecStart= before its own
    assert "ExecStart=\nExecStart=" in units.render_instance_dropin(svc(), "v7", None)


def test_allow_from_is_the_socket_units_firewall_or_the_instances() -> None:
    nets = ("10.0.0.0/8", "2001:db8::/32", "192.0.2.10/32")
    files = units.render_service(svc(allow_from=nets), backlog=4096).files
    sock = files["zdd-api.socket"]
    assert ("IPAddressAllow=localhost 10.0.0.0/8 2001:db8::/32 192.0.2.10/32\n"
            "IPAddressDeny=any\n") in sock
    # inherit: the instances' own traffic (a database, say) is left alone
    assert "IPAddress" not in files["zdd-api@.service"]
    files = units.render_service(svc(allow_from=nets, socket="reuseport"), backlog=4096).files
    assert "IPAddressDeny=any\n" in files["zdd-api@.service"]
    assert "[Service]" in files["zdd-api@.service"].split("IPAddressDeny")[0]
    # none: no firewall lines anywhere
    for text in units.render_service(svc(), backlog=4096).files.values():
        assert "IPAddress" not in text
