"""The Ansible content passes ansible-lint (production profile) and the
playbooks pass ansible-playbook's syntax check."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ANSIBLE = REPO / "ansible"
BIN = Path(sys.executable).parent


def tool_env() -> dict[str, str]:
    return dict(os.environ, PATH=f"{BIN}:{os.environ.get('PATH', '')}",
                ANSIBLE_CONFIG=str(ANSIBLE / "ansible.cfg"), ANSIBLE_HOME="/tmp/zdd-ansible-home",
                ANSIBLE_LOCAL_TEMP="/tmp/zdd-ansible-lint", NO_COLOR="1")


def test_ansible_lint_production_profile() -> None:
    p = subprocess.run([str(BIN / "ansible-lint"), "--offline", "--profile", "production",
                        "--nocolor"], cwd=ANSIBLE, env=tool_env(), capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]


def test_playbooks_syntax() -> None:
    for book in ("site.yml", "rolling-deploy.yml"):
        p = subprocess.run([str(BIN / "ansible-playbook"), "--syntax-check", "-i", "localhost,",
                            book], cwd=ANSIBLE, env=tool_env(), capture_output=True, text=True,
                           timeout=300)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
