"""The zdd_swap module, run the way Ansible runs it (a Python process given
its arguments as JSON), against a stand-in zdd-agent command at its edge.
The real agent behind it is exercised by the fleet test."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
COLLECTION = REPO / "ansible" / "collections" / "ansible_collections" / "zdd" / "agent"
MODULE = COLLECTION / "plugins" / "modules" / "zdd_swap.py"

FAKE = """#!{python}
import json, sys
from pathlib import Path
here = Path(__file__).parent
with open(here / "calls", "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
kind = "dry" if "--dry-run" in sys.argv else "swap"
reply = json.loads((here / kind).read_text())
print(json.dumps(reply["out"]))
sys.stderr.write(reply.get("err", ""))
sys.exit(reply["rc"])
"""


class Agent:
    """A stand-in zdd-agent: replies as told and records its argv."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.exe = root / "zdd-agent"
        self.exe.write_text(FAKE.format(python=sys.executable))
        self.exe.chmod(0o755)

    def reply(self, kind: str, out: Any, rc: int = 0, err: str = "") -> None:
        (self.root / kind).write_text(json.dumps({"out": out, "rc": rc, "err": err}))

    def calls(self) -> list[list[str]]:
        f = self.root / "calls"
        return [json.loads(x) for x in f.read_text().splitlines()] if f.exists() else []


@pytest.fixture
def agent(tmp_path: Path) -> Agent:
    return Agent(tmp_path)


def run(args: dict[str, Any], check_mode: bool = False, diff: bool = False) -> dict[str, Any]:
    full = dict(args, _ansible_check_mode=check_mode, _ansible_diff=diff)
    p = subprocess.run([sys.executable, str(MODULE)], input=json.dumps(
        {"ANSIBLE_MODULE_ARGS": full}), capture_output=True, text=True, timeout=60)
    return dict(json.loads(p.stdout))


PLAN = {"service": "api", "from_version": "v1", "to_version": "v2",
        "batches": [{"stop_first": 0, "start": 1, "drain": 1}], "plan": "+1 -1"}
RESULT = {"service": "api", "from_version": "v1", "to_version": "v2", "result": "ok",
          "reason": "", "seconds": 0.4}


def test_a_version_that_already_serves_is_no_change(agent: Agent) -> None:
    agent.reply("dry", dict(PLAN, from_version="v2", batches=[]))
    out = run({"service": "api", "version": "v2", "executable": str(agent.exe)})
    assert out["changed"] is False and "failed" not in out
    assert out["previous_version"] == "v2"
    assert agent.calls() == [["swap", "api", "--version", "v2", "--dry-run", "--json"]]


def test_a_swap_reports_changed_the_result_and_the_diff(agent: Agent) -> None:
    agent.reply("dry", PLAN)
    agent.reply("swap", RESULT)
    out = run({"service": "api", "version": "v2", "executable": str(agent.exe)}, diff=True)
    assert out["changed"] is True and "failed" not in out
    assert out["swap"] == RESULT and out["rc"] == 0
    assert out["diff"]["before"] == "version: v1\n" and out["diff"]["after"] == "version: v2\n"
    assert agent.calls()[-1] == ["swap", "api", "--version", "v2", "--json"]


def test_check_mode_plans_and_starts_nothing(agent: Agent) -> None:
    agent.reply("dry", PLAN)
    out = run({"service": "api", "version": "v2", "executable": str(agent.exe)},
              check_mode=True)
    assert out["changed"] is True and out["plan"]["plan"] == "+1 -1"
    assert "swap" not in out
    assert all("--dry-run" in c for c in agent.calls())


def test_a_rolled_back_swap_fails_with_the_agents_reason(agent: Agent) -> None:
    agent.reply("dry", PLAN)
    agent.reply("swap", dict(RESULT, result="rolled_back",
                             reason="v2 exited during start-up (exit-code 3)"), rc=4)
    out = run({"service": "api", "version": "v2", "executable": str(agent.exe)})
    assert out["failed"] is True and out["rc"] == 4
    assert out["msg"] == "swap of api to v2 failed: v2 exited during start-up (exit-code 3)"
    assert out["swap"]["result"] == "rolled_back"
    assert out["changed"] is False


def test_a_refused_request_fails_with_the_agents_error(agent: Agent) -> None:
    agent.reply("dry", {"error": "/etc/zdd-agent/services/web.yaml: no config for service "
                                 "'web'", "exit_code": 2}, rc=2)
    out = run({"service": "web", "version": "v2", "executable": str(agent.exe)})
    assert out["failed"] is True
    assert "no config for service 'web'" in out["msg"]
    assert len(agent.calls()) == 1


def test_output_that_is_not_json_fails_with_stderr(agent: Agent) -> None:
    agent.exe.write_text("#!/bin/sh\necho 'zdd-agent: error: daemon gone' >&2\nexit 5\n")
    out = run({"service": "api", "version": "v2", "executable": str(agent.exe)})
    assert out["failed"] is True and out["msg"] == "zdd-agent: error: daemon gone"


def test_a_missing_agent_fails_clearly(tmp_path: Path) -> None:
    out = run({"service": "api", "version": "v2", "executable": "no-such-zdd-agent"})
    assert out["failed"] is True and "no-such-zdd-agent" in out["msg"]


def test_documentation_matches_the_argument_spec() -> None:
    """What ansible-test's validate-modules checks first (it needs network
    to bootstrap here): the documented options are the accepted ones, with
    the same types, defaults and required flags; EXAMPLES and RETURN parse."""
    import importlib.util

    import yaml

    spec = importlib.util.spec_from_file_location("zdd_swap", MODULE)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    doc = yaml.safe_load(mod.DOCUMENTATION)
    assert doc["module"] == "zdd_swap"
    options = doc["options"]
    assert set(options) == set(mod.ARGUMENT_SPEC)
    for name, arg in mod.ARGUMENT_SPEC.items():
        assert options[name]["type"] == arg["type"], name
        assert options[name].get("required", False) == arg.get("required", False), name
        assert options[name].get("default") == arg.get("default"), name
    examples = yaml.safe_load(mod.EXAMPLES)
    assert all("zdd.agent.zdd_swap" in task or "ansible.builtin.debug" in task
               for task in examples)
    returned = yaml.safe_load(mod.RETURN)
    assert {"service", "version", "previous_version", "plan", "swap", "rc"} <= set(returned)
