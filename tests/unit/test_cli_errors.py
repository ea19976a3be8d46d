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


def test_ctrl_c_while_the_command_line_loads_is_exit_130_not_a_traceback(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.abc

    from agent import entry

    class Interrupted(importlib.abc.MetaPathFinder):
        def find_spec(self, name: str, path: object, target: object = None) -> None:
            if name == "agent.cli":
                raise KeyboardInterrupt  # what SIGINT does in the middle of an import

    monkeypatch.delitem(sys.modules, "agent.cli")
    monkeypatch.setattr(sys, "meta_path", [Interrupted(), *sys.meta_path])
    with pytest.raises(SystemExit) as e:
        entry.main()
    assert e.value.code == 130 and capsys.readouterr().err == "interrupted\n"


def test_the_installed_command_goes_through_the_entry_point() -> None:
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="console_scripts") if e.name == "zdd-agent"]
    assert ep.value == "agent.entry:main"


def test_a_nul_byte_in_a_path_is_a_usage_error_not_a_traceback() -> None:
    from click.testing import CliRunner

    from agent.cli import cli

    for argv in (["check-config", "a\x00b"], ["--config-dir", "/etc\x00", "status"]):
        r = CliRunner().invoke(cli, argv)
        assert r.exit_code == 2 and "contains a NUL byte" in r.output, (argv, r.output)
