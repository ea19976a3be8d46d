"""Where the agent's files and control socket are unless told otherwise.

Apart from config.py, so that the command line reads them (its option
defaults, the daemon's socket) without importing the config parser and
what it imports (PyYAML, the unit settings): a call that goes to the daemon
needs none of that (issue 16)."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_CONFIG_DIR = Path("/etc/zdd-agent/services")
DEFAULT_AGENT_CONFIG = Path("/etc/zdd-agent/agent.yaml")
DEFAULT_STATE_DIR = Path("/var/lib/zdd-agent")
CONTROL_SOCKET = Path(os.environ.get("ZDD_CONTROL_SOCKET", "/run/zdd-agent/control.sock"))
