from __future__ import annotations

import http.client
from pathlib import Path

import pytest

from agent import hostready
from agent.commands import execute
from agent.config import load_agent_config
from agent.deploy import Paths
from agent.errors import ConfigError


def get(port: int, path: str = "/ready", method: str = "GET") -> tuple[int, str]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    c.request(method, path)
    r = c.getresponse()
    return r.status, r.read().decode()


def test_drain_and_undrain_flip_the_endpoint_and_persist(tmp_path: Path) -> None:
    server = hostready.ReadyServer("127.0.0.1", 0, tmp_path).start()
    try:
        assert get(server.port) == (200, "ready\n")
        out = hostready.set_drained(tmp_path, True, "kernel upgrade")
        assert out["changed"] and out["drained"]
        code, body = get(server.port)
        assert code == 503 and "kernel upgrade" in body
        assert get(server.port, method="HEAD")[0] == 503
        assert get(server.port, "/other")[0] == 404
        # the state is a file: a new server (a restarted daemon) still says 503
        again = hostready.ReadyServer("127.0.0.1", 0, tmp_path).start()
        assert get(again.port)[0] == 503
        again.stop()
        assert not hostready.set_drained(tmp_path, True)["changed"]
        assert hostready.set_drained(tmp_path, False)["changed"]
        assert get(server.port) == (200, "ready\n")
    finally:
        server.stop()


def test_unreadable_state_means_in_rotation_and_bad_reasons_are_refused(tmp_path: Path) -> None:
    (tmp_path / hostready.STATE_FILE).write_text("{not json")
    assert hostready.read(tmp_path)["drained"] is False
    with pytest.raises(ValueError):
        hostready.set_drained(tmp_path, True, "line\nbreak")
    with pytest.raises(ValueError):
        hostready.set_drained(tmp_path, True, "x" * 201)


def test_commands_and_agent_config(tmp_path: Path) -> None:
    agent_yaml = tmp_path / "agent.yaml"
    agent_yaml.write_text("host_ready:\n  listen: 0.0.0.0:9470\n")
    agent_yaml.chmod(0o644)
    tmp_path.chmod(0o755)
    assert load_agent_config(agent_yaml).host_ready_listen == "0.0.0.0:9470"
    paths = Paths(config_dir=tmp_path / "services", state_dir=tmp_path / "state",
                  agent_config=agent_yaml)
    _code, out = execute(paths, "drain-host", {"reason": "maintenance"})
    assert out["drained"] and out["endpoint"] == "http://0.0.0.0:9470/ready"
    assert execute(paths, "host-state", {})[1]["reason"] == "maintenance"
    assert not execute(paths, "undrain-host", {})[1]["drained"]
    with pytest.raises(ConfigError, match="--reason"):
        execute(paths, "drain-host", {"reason": "\x07"})
    agent_yaml.write_text("metrics:\n  listen: 127.0.0.1:9470\n"
                          "host_ready:\n  listen: 0.0.0.0:9470\n")
    with pytest.raises(ConfigError, match="port of metrics.listen"):
        load_agent_config(agent_yaml)
    agent_yaml.write_text("host_ready:\n  listen: somewhere\n")
    with pytest.raises(ConfigError, match="host_ready.listen"):
        load_agent_config(agent_yaml)
