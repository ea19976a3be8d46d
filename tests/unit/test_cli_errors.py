"""What the OS refuses an in-process command is one line and exit 5, never
a traceback (a non-root `sysctl apply --local` once ended in PermissionError)."""

from __future__ import annotations

import sys

import pytest

from agent import cli, commands
from agent.errors import Exit


@pytest.mark.parametrize("argv", [["sysctl", "apply", "--local"], ["drain-host", "--local"],
                                  ["swap", "api", "--version", "v2", "--local"]])
def test_a_permission_error_is_one_line_saying_who_may(
        argv: list[str], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    def refuse(*a: object, **kw: object) -> None:
        raise PermissionError(13, "Permission denied", "/var/lib/zdd-agent")

    monkeypatch.setattr(commands, "execute", refuse)
    monkeypatch.setattr(cli.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(sys, "argv", ["zdd-agent", *argv])
    with pytest.raises(SystemExit) as e:
        cli.main()
    err = capsys.readouterr().err
    assert e.value.code == Exit.SYSTEMD
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "Permission denied: /var/lib/zdd-agent: this changes or reads root's files; run " \
           "it as root" in err


def test_any_other_os_error_is_one_line(monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    def full(*a: object, **kw: object) -> None:
        raise OSError(28, "No space left on device", "/var/lib/zdd-agent/services/api.json")

    monkeypatch.setattr(commands, "execute", full)
    monkeypatch.setattr(sys, "argv", ["zdd-agent", "drain-host", "--local"])
    with pytest.raises(SystemExit) as e:
        cli.main()
    err = capsys.readouterr().err
    assert e.value.code == Exit.SYSTEMD and err == (
        "zdd-agent: error: drain-host: No space left on device: "
        "/var/lib/zdd-agent/services/api.json\n")
