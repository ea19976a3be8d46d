"""agent/systemd.py's pure parts (the rest needs a systemd: tests/e2e)."""

from __future__ import annotations

import pytest

from agent.systemd import exit_description


@pytest.mark.parametrize(("code", "status", "words"), [
    (1, 0, "exited 0"), (1, 3, "exited 3"), (2, 15, "killed by SIGTERM"),
    (2, 9, "killed by SIGKILL"), (3, 6, "killed by SIGABRT (core dumped)"), (0, 0, "")])
def test_exit_description_from_exec_main_code_and_status(code: int, status: int,
                                                         words: str) -> None:
    assert exit_description(code, status) == words
