"""The role's agent.yaml template, rendered by Ansible itself, is a config the
agent accepts: with and without the host endpoint's allow_from and TLS."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_lint import ANSIBLE, BIN, tool_env

from agent.config import load_agent_config
from agent.errors import ConfigError

ROLE = ANSIBLE / "collections/ansible_collections/zdd/agent/roles/zdd_agent"


def render(tmp_path: Path, **overrides: object) -> Path:
    import yaml

    variables = yaml.safe_load((ROLE / "defaults/main.yml").read_text())
    variables.update(overrides)
    (tmp_path / "vars.json").write_text(json.dumps(variables))
    out = tmp_path / "etc" / "agent.yaml"
    out.parent.mkdir(mode=0o755, exist_ok=True)
    os.chmod(out.parent, 0o755)
    p = subprocess.run([str(BIN / "ansible"), "localhost", "-c", "local", "-i", "localhost,",
                        "-m", "ansible.builtin.template", "-a",
                        f"src={ROLE / 'templates/agent.yaml.j2'} dest={out} mode=0644",
                        "-e", f"@{tmp_path / 'vars.json'}",
                        "-e", f"ansible_python_interpreter={sys.executable}"],
                       env=tool_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    return out


def test_defaults_render_a_valid_agent_config(tmp_path: Path) -> None:
    conf = load_agent_config(render(tmp_path))
    assert conf.host_ready_listen is None and conf.host_ready_allow_from == ()
    assert "allow_from" not in render(tmp_path).read_text()


def test_host_endpoint_allow_from_and_tls_reach_agent_yaml(tmp_path: Path) -> None:
    out = render(tmp_path, zdd_agent_host_ready_listen="0.0.0.0:9470",
                 zdd_agent_host_ready_allow_from=["10.0.0.0/24", "192.0.2.7"])
    conf = load_agent_config(out)
    assert [str(n) for n in conf.host_ready_allow_from] == ["10.0.0.0/24", "192.0.2.7/32"]
    out = render(tmp_path, zdd_agent_host_ready_listen="0.0.0.0:9470",
                 zdd_agent_host_ready_tls={"cert": "/nonexistent/ready.crt",
                                           "key": "/nonexistent/ready.key"})
    with pytest.raises(ConfigError) as e:  # rendered, then checked like any agent.yaml
        load_agent_config(out)
    assert "host_ready.tls" in str(e.value) and "/nonexistent/ready.crt" in str(e.value)
