"""What `zdd-agent install` writes (pure parts) and `check-config`."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from agent import install, units
from agent.cli import cli
from agent.sysctl import DEFAULTS, render_sysctl_d

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = (REPO / "sysctl.d" / "60-zdd-agent.conf").read_text()


def settings(text: str) -> dict[str, str]:
    found = {}
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.lstrip("-").partition("=")
            found[key.strip()] = " ".join(value.split())
    return found


def test_sysctl_d_without_overrides_is_the_shipped_file() -> None:
    assert render_sysctl_d(TEMPLATE, ()) == TEMPLATE
    assert settings(TEMPLATE) == DEFAULTS


def test_sysctl_d_carries_overrides_and_leaves_null_keys_alone() -> None:
    text = render_sysctl_d(TEMPLATE, [("net.core.somaxconn", "4096"),
                                      ("net.ipv4.tcp_migrate_req", None)])
    want = dict(DEFAULTS, **{"net.core.somaxconn": "4096"})
    del want["net.ipv4.tcp_migrate_req"]
    assert settings(text) == want
    assert "# net.ipv4.tcp_migrate_req: left alone" in text


def test_sysctl_d_keeps_the_dash_of_optional_keys() -> None:
    text = render_sysctl_d(TEMPLATE, [("net.ipv4.tcp_migrate_req", "0")])
    assert "-net.ipv4.tcp_migrate_req = 0" in text.splitlines()


def test_install_files_render_the_overrides() -> None:
    files = install.files([("net.core.somaxconn", "1024")])
    assert settings(files[install.SYSCTL_D][0])["net.core.somaxconn"] == "1024"


def test_data_dir_found_in_a_wheel_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Installed from a wheel, units/ is under PREFIX/share/zdd-agent, not
    beside the package."""
    assert units.data_dir("units") == REPO / "units"
    share = tmp_path / "share" / "zdd-agent" / "sysctl.d"
    share.mkdir(parents=True)
    monkeypatch.setattr(sys, "prefix", str(tmp_path))
    monkeypatch.setattr(units, "__file__", str(tmp_path / "site" / "agent" / "units.py"))
    assert units.data_dir("sysctl.d") == share
    with pytest.raises(FileNotFoundError, match="broken installation"):
        units.data_dir("units")


SERVICE = """\
name: api
command: ["/srv/api/{version}/bin/api"]
listen: ["127.0.0.1:8080"]
"""


def test_check_config_accepts_a_valid_service(tmp_path: Path) -> None:
    f = tmp_path / "api.yaml"
    f.write_text(SERVICE)
    r = CliRunner().invoke(cli, ["check-config", str(f)])
    assert r.exit_code == 0, r.output
    assert "a valid config of service api" in r.output


def test_check_config_refuses_a_name_that_is_not_the_file_it_becomes(tmp_path: Path) -> None:
    f = tmp_path / "source"
    f.write_text(SERVICE)
    r = CliRunner().invoke(cli, ["check-config", "--name", "web", str(f)])
    assert r.exit_code == 2
    assert "web" in r.output


def test_check_config_refuses_unknown_keys_and_bad_agent_config(tmp_path: Path) -> None:
    f = tmp_path / "api.yaml"
    f.write_text(SERVICE + "colour: blue\n")
    r = CliRunner().invoke(cli, ["check-config", str(f)])
    assert r.exit_code == 2 and "colour" in r.output
    a = tmp_path / "agent.yaml"
    a.write_text("sysctl:\n  kernel.panic: 1\n")
    r = CliRunner().invoke(cli, ["check-config", "--agent", str(a)])
    assert r.exit_code == 2 and "kernel.panic" in r.output
    a.write_text("sysctl:\n  net.core.somaxconn: 4096\n")
    assert CliRunner().invoke(cli, ["check-config", "--agent", str(a)]).exit_code == 0


def test_install_waits_for_the_daemon_it_starts() -> None:
    """A start job still queued reads "inactive": install returns once the
    unit is active (the next command finds the daemon answering), and says
    so when the start fails, as `systemctl start` would."""
    import pytest

    from agent import install
    from agent.errors import SystemdError
    from agent.systemd import UnitState

    def state(active: str, job: str = "", exit: str = "") -> UnitState:
        return UnitState("zdd-agent.service", "loaded", active, "x", "exit-code", 0, 0, 0,
                         job=job, exit=exit)

    class Sd:
        def __init__(self, states: list[UnitState]) -> None:
            self.states, self.waits = states, 0

        def state(self, unit: str) -> UnitState:
            return self.states.pop(0) if len(self.states) > 1 else self.states[0]

        def wait_change(self, units: list[str], timeout: float) -> bool:
            self.waits += 1
            return False

    sd = Sd([state("inactive", "start"), state("activating", "start"), state("active")])
    install._wait_active(sd, "zdd-agent.service")  # type: ignore[arg-type]
    assert sd.waits == 2
    sd = Sd([state("inactive", "start"), state("failed", exit="exited 1")])
    with pytest.raises(SystemdError, match="did not start: failed .*exited 1"):
        install._wait_active(sd, "zdd-agent.service")  # type: ignore[arg-type]
    sd = Sd([state("activating", "start")])
    with pytest.raises(SystemdError, match="did not start: activating"):
        install._wait_active(sd, "zdd-agent.service", timeout=0.0)  # type: ignore[arg-type]
