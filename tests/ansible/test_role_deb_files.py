"""The role's zdd_agent_deb, run by Ansible itself: null, one file or a list
of files installs them in order; anything else stops the play before apt
runs (an empty list or string would install nothing, a comma-separated
string would be one odd path). The role's own check and loop are run, taken
from its tasks file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_lint import BIN, tool_env
from test_agent_yaml_template import ROLE

TASKS = yaml.safe_load((ROLE / "tasks/main.yml").read_text())


def task(name: str) -> dict:
    (found,) = [t for t in TASKS if t["name"] == name]
    return found


def files_installed(tmp_path: Path, value: object) -> list[str] | None:
    """The items the role's apt task would get for zdd_agent_deb=value, in
    order; None when the role's check refused the value."""
    apt = task("Install the zdd-agent package files with apt")
    play = [{"hosts": "localhost", "gather_facts": False, "tasks": [
        task("Check the package files"),
        {"name": "Files", "ansible.builtin.debug": {"msg": "FILE={{ item }}"},
         "loop": apt["loop"], "when": apt["when"][1:]},
    ]}]
    book = tmp_path / "play.yml"
    book.write_text(yaml.safe_dump(play))
    p = subprocess.run([str(BIN / "ansible-playbook"), "-c", "local", "-i", "localhost,",
                        str(book), "-e", json.dumps({"zdd_agent_deb": value}),
                        "-e", f"ansible_python_interpreter={sys.executable}"],
                       env=tool_env(), capture_output=True, text=True, timeout=120)
    if "Check the package files" in p.stdout and "fatal:" in p.stdout:
        assert "zdd_agent_deb:" in p.stdout, p.stdout[-2000:]
        return None
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    return [line.split("FILE=", 1)[1].rstrip('"') for line in p.stdout.splitlines()
            if '"msg": "FILE=' in line]


@pytest.mark.parametrize("value, files", [
    (None, []),  # the repository's packages instead
    ("/srv/zdd-agent_0.1.0_all.deb", ["/srv/zdd-agent_0.1.0_all.deb"]),
    (["/srv/python3-zdd-drain_0.1.0_all.deb", "/srv/zdd-agent_0.1.0_all.deb"],
     ["/srv/python3-zdd-drain_0.1.0_all.deb", "/srv/zdd-agent_0.1.0_all.deb"]),
    ([], None), ("", None), (["/srv/a.deb", ""], None), ([1], None),
    ("/srv/a.deb,/srv/b.deb", None),
])
def test_zdd_agent_deb_is_null_one_file_or_files_in_order(
        tmp_path: Path, value: object, files: list[str] | None) -> None:
    assert files_installed(tmp_path, value) == files
