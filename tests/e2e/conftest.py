"""End-to-end layer: a real systemd booted in a sandbox (agent/sandbox.py),
the real agent CLI run inside it, the demo API under real wrk load.

Every test here is marked `e2e`; `pytest -m "not e2e"` runs the fast layer
alone. Without root they cannot run and are skipped with that reason; CI runs
as root, where a skip would be a failure to investigate.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.demo.run import DemoHost


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture
def host() -> Iterator[DemoHost]:
    if os.geteuid() != 0:
        pytest.skip("the sandbox needs root")
    for tool in ("wrk", "curl", "unshare", "nsenter"):
        assert shutil.which(tool), f"{tool} is not installed (.ci/run installs it)"
    h = DemoHost().boot()
    try:
        h.release("v1")
        h.release("v2")
        yield h
    finally:
        h.close()


@pytest.fixture
def site() -> Iterator[Path]:
    """Releases where an operator keeps them: not under /tmp, which the
    sandbox replaces with its own."""
    root = Path("/srv") / f"zdd-verify-{uuid.uuid4().hex[:8]}"
    root.mkdir(mode=0o755)
    try:
        yield root
    finally:
        shutil.rmtree(root)
