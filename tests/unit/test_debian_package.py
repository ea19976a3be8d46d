"""The Debian package (debian/, built by scripts/build-deb): its files, its
metadata and its maintainer scripts, read from the built .deb; and what
`zdd-agent install` does when it runs from the package (origin.py,
install.package_steps) against directories that stand in for the host's."""

from __future__ import annotations

import re
import subprocess
import tarfile
import tomllib
from pathlib import Path

import pytest

from agent import install, origin
from agent.install import Step
from debpkg import REPO, field, kit, relations

# pyproject's runtime dependencies -> the Debian packages that provide them
DEBIAN_NAME = {"pystemd": "python3-pystemd", "psutil": "python3-psutil",
               "pyroute2": "python3-pyroute2", "PyYAML": "python3-yaml",
               "click": "python3-click", "rich": "python3-rich",
               "prometheus-client": "python3-prometheus-client",
               "grpcio": "python3-grpcio", "h2": "python3-h2"}


def members(deb: Path) -> dict[str, tarfile.TarInfo]:
    data = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], check=True,
                          capture_output=True).stdout
    import io

    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name.removeprefix("."): m for m in tar.getmembers()}


def content(deb: Path, path: str) -> str:
    return subprocess.run(["sh", "-c", 'dpkg-deb --fsys-tarfile "$1" | tar -xOf - ".$2"', "-",
                           str(deb), path], check=True, capture_output=True,
                          text=True).stdout


def control(deb: Path, name: str) -> str:
    return subprocess.run(["sh", "-c", 'dpkg-deb --ctrl-tarfile "$1" | tar -xOf - "./$2"', "-",
                           str(deb), name], check=True, capture_output=True,
                          text=True).stdout


def test_every_runtime_dependency_comes_from_debian(deb: Path) -> None:
    deps = relations(deb, "Depends")
    recommends = relations(deb, "Recommends")
    wanted = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for req in wanted:
        name = re.split(r"[<>=!~ \[]", req)[0]
        assert DEBIAN_NAME[name] in deps + recommends, (req, deps, recommends)
    # the probes' libraries are optional: a missing one is a clear probe error
    assert {"python3-grpcio", "python3-h2"} <= set(recommends)
    assert "systemd" in deps and "python3" in deps
    # no pip, no compiler, no -dev package on the host
    assert not [d for d in deps if d.endswith("-dev") or d in ("gcc", "python3-pip")], deps
    # each one but the drain kit (built beside it) is known to this machine's
    # apt (Debian 12 has them all)
    assert "python3-zdd-drain" in deps
    for pkg in [d for d in deps + recommends if d != "python3-zdd-drain"]:
        r = subprocess.run(["apt-cache", "policy", pkg], capture_output=True, text=True)
        assert "Candidate: (none)" not in r.stdout and r.stdout.strip(), pkg


def test_files_are_where_debian_puts_them(deb: Path) -> None:
    files = members(deb)
    for unit in ("zdd-agent.service", "zdd-agent.socket", "zdd-agent-nat.service"):
        assert files[f"/lib/systemd/system/{unit}"].mode == 0o644, unit
    # zdd.target is the agent's (install and every swap write it to /etc): a
    # purge must not take the serving instances' target away
    assert not [f for f in files if f.endswith("/zdd.target") and "/units/" not in f]
    service = content(deb, "/lib/systemd/system/zdd-agent.service")
    assert "ExecStart=/usr/bin/zdd-agent daemon" in service
    assert "ExecReload=/bin/kill -HUP $MAINPID" in service
    assert "${" not in service and "$$" not in service
    assert service.startswith("# Installed by the zdd-agent package")
    assert "ExecStart=/usr/bin/zdd-agent nat restore" in content(
        deb, "/lib/systemd/system/zdd-agent-nat.service")
    assert content(deb, "/usr/lib/sysctl.d/60-zdd-agent.conf") == (
        REPO / "sysctl.d" / "60-zdd-agent.conf").read_text()
    assert files["/usr/bin/zdd-agent"].mode == 0o755
    assert "/usr/share/zdd-agent" in content(deb, "/usr/bin/zdd-agent")
    assert "/usr/share/zdd-agent/packaged" in files
    assert "/usr/share/zdd-agent/agent/entry.py" in files
    assert "/usr/share/zdd-agent/units/zdd-service@.service.in" in files
    assert "/usr/share/man/man1/zdd-agent.1.gz" in files
    assert control(deb, "conffiles").split() == ["/etc/zdd-agent/agent.yaml"]
    assert "/etc/zdd-agent/services" in files
    # nothing in the shared dist-packages, nothing under /usr/local or /opt
    assert not [f for f in files if "dist-packages" in f or f.startswith(("/usr/local",
                                                                          "/opt"))]
    assert not [f for f in files if "zdd_drain" in f]  # python3-zdd-drain's


def test_the_drain_kit_is_its_own_package_for_debians_python3(deb: Path) -> None:
    """Services import zdd_drain: from Debian's python3 with no PYTHONPATH,
    so it is a public module, packaged as python3-<module> (Debian Python
    Policy), of the agent's version, and the agent depends on that version
    or a later one."""
    k = kit(deb)
    files = members(k)
    dist = "/usr/lib/python3/dist-packages/zdd_drain"
    shipped = {f.removeprefix(dist + "/") for f in files if f.startswith(dist + "/")}
    assert shipped == {p.name for p in (REPO / "zdd_drain").glob("*.py")}
    assert not [f for f, m in files.items() if m.isfile() and not f.startswith(
        (dist, "/usr/share/doc/python3-zdd-drain/"))], sorted(files)
    assert field(k, "Version") == field(deb, "Version")
    # at least its own version: an exact pin broke the role's upgrade, which
    # installs the files one apt run each (the new kit "breaks" the old agent)
    assert f"python3-zdd-drain (>= {field(deb, 'Version')})" in field(deb, "Depends")
    # standard library only: it needs python3 and nothing else
    assert relations(k, "Depends") == ["python3"]
    assert "py3compile -p python3-zdd-drain" in control(k, "postinst")


def test_maintainer_scripts_follow_policy(deb: Path) -> None:
    postinst = control(deb, "postinst")
    # enabled on install, never started: no "start" action, a try-restart on
    # upgrade only ($2 set), and only when systemd runs
    assert "deb-systemd-helper enable 'zdd-agent.service'" in postinst
    assert "zdd.target" not in postinst and "zdd.target" not in control(deb, "postrm")
    assert not re.search(r"deb-systemd-invoke (start|restart)\b", postinst), postinst
    assert re.search(r'\[ -d /run/systemd/system \]; then\s+systemctl --system daemon-reload'
                     r'[^\n]*\n\s+if \[ -n "\$2" \]; then\s+deb-systemd-invoke try-restart '
                     r"zdd-agent.service >", postinst), postinst
    # the control socket stays open through an upgrade: only the daemon restarts
    # (and the one stop in prerm is on remove: below)
    assert not re.search(r"deb-systemd-invoke [a-z-]*(stop|restart)[^\n]*zdd-agent.socket",
                         postinst), postinst
    assert control(deb, "prerm").count("deb-systemd-invoke") == 1
    assert "systemd-sysusers" in postinst and "zdd-agent.conf" in postinst
    prerm = control(deb, "prerm")
    assert re.search(r'"\$1" = remove \] && \[ -d /run/systemd/system \]; then\s+'
                     r"deb-systemd-invoke stop zdd-agent.service zdd-agent.socket", prerm)
    postrm = control(deb, "postrm")
    purge = postrm[postrm.index('if [ "$1" = "purge" ]'):]
    assert "rm -rf /var/lib/zdd-agent" in purge
    assert "deb-systemd-helper purge" in postrm
    # purge never deletes the operator's service configs
    assert "services/*" not in postrm and "rm -rf /etc/zdd-agent" not in postrm


def test_version_and_dependencies_match_pyproject(deb: Path) -> None:
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert subprocess.run(["dpkg-deb", "-f", str(deb), "Version"], capture_output=True,
                          text=True, check=True).stdout.strip() == version


# ---------------------------------------------------- install from the package


@pytest.fixture
def pkg_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> origin.Package:
    share, lib, etc = tmp_path / "share", tmp_path / "lib", tmp_path / "etc"
    for d in (share, lib, etc / "systemd", etc / "sysctl.d"):
        d.mkdir(parents=True)
    (share / origin.MARK).write_text("zdd-agent Debian package\n")
    (lib / "zdd-agent.service").write_text("# Installed by the zdd-agent package\n")
    sysctl = tmp_path / "usr-lib-sysctl.d.conf"
    sysctl.write_text((REPO / "sysctl.d" / "60-zdd-agent.conf").read_text())
    monkeypatch.setattr(install, "UNIT_DIR", etc / "systemd")
    monkeypatch.setattr(install, "SYSCTL_D", etc / "sysctl.d" / "60-zdd-agent.conf")
    pkg = origin.package(share, (tmp_path / "nowhere", lib), sysctl)
    assert pkg == origin.Package("zdd-agent", lib, sysctl)
    return pkg


def test_package_needs_its_mark_and_its_units(tmp_path: Path) -> None:
    (tmp_path / "lib").mkdir()
    assert origin.package(tmp_path, (tmp_path / "lib",)) is None  # pip: no mark
    (tmp_path / origin.MARK).write_text("")
    assert origin.package(tmp_path, (tmp_path / "lib",)) is None  # units gone
    (tmp_path / "lib" / "zdd-agent.service").write_text("")
    assert origin.package(tmp_path, (tmp_path / "lib",)) is not None


def test_install_leaves_units_and_sysctl_to_the_package(pkg_host: origin.Package) -> None:
    steps = install.package_steps(pkg_host, dry_run=False)
    package = [s for s in steps if s.action == "package"]
    assert len(package) == 4, steps  # 3 units and the sysctl.d file
    assert all("left to the package manager: zdd-agent" in s.target for s in package)
    # zdd.target is the agent's (every swap writes it, a purge leaves it)
    target = install.UNIT_DIR / "zdd.target"
    assert [s for s in steps if s.changed] == [Step("create", str(target))]
    assert "WantedBy=multi-user.target" in target.read_text()
    assert not install.SYSCTL_D.exists() and list(install.UNIT_DIR.iterdir()) == [target]
    assert not any(s.changed for s in install.package_steps(pkg_host, dry_run=False))
    assert not Step("package", "x").changed


def test_install_removes_an_earlier_pip_install_s_units(pkg_host: origin.Package) -> None:
    mine = install.UNIT_DIR / "zdd-agent.service"
    mine.write_text("# Installed by `zdd-agent install`: the zdd-agent daemon.\n[Unit]\n")
    theirs = install.UNIT_DIR / "zdd-agent.socket"
    theirs.write_text("[Socket]\nListenStream=/run/other.sock\n")  # the operator's own
    dry = install.package_steps(pkg_host, dry_run=True)
    assert mine.exists() and Step("remove", f"{mine} (an earlier zdd-agent install's copy; "
                                            "it would shadow the package's unit)") in dry
    steps = install.package_steps(pkg_host, dry_run=False)
    assert not mine.exists() and theirs.exists()
    assert [s.action for s in steps if str(theirs) in s.target] == ["keep"]
    assert install.package_steps(pkg_host, dry_run=False) == [
        s if s.action != "create" else Step("unchanged", s.target)
        for s in steps if s.action != "remove"]  # idempotent


def test_install_writes_only_sysctl_overrides(pkg_host: origin.Package) -> None:
    over = [("net.core.somaxconn", "4096")]
    steps = install.package_steps(pkg_host, dry_run=False, sysctl=over)
    assert [s.action for s in steps if str(install.SYSCTL_D) in s.target] == ["create"]
    assert "net.core.somaxconn = 4096" in install.SYSCTL_D.read_text()
    again = install.package_steps(pkg_host, dry_run=False, sysctl=over)
    assert not any(s.changed for s in again)
    # the overrides gone from agent.yaml: the agent's /etc copy goes too
    gone = install.package_steps(pkg_host, dry_run=False)
    assert not install.SYSCTL_D.exists()
    assert [s.action for s in gone if str(install.SYSCTL_D) in s.target] == ["remove"]


def test_uninstall_from_the_package_points_at_apt(pkg_host: origin.Package) -> None:
    from agent.errors import ConfigError

    with pytest.raises(ConfigError, match="apt purge zdd-agent"):
        install.uninstall(True, pkg=pkg_host)


def test_grpc_health_messages_round_trip() -> None:
    from agent import probes

    assert probes.health_request("") == b""
    assert probes.health_request("demo.Api") == b"\x0a\x08demo.Api"
    assert probes.health_status(b"") == 0
    assert probes.health_status(b"\x08\x01") == 1
    # unknown fields (a string, a fixed64) are skipped
    assert probes.health_status(b"\x12\x02hi\x19" + bytes(8) + b"\x08\x02") == 2
    for bad in (b"\x08", b"\x12\x05ab", b"\x0b"):
        with pytest.raises(ValueError):
            probes.health_status(bad)


def test_the_man_page_spells_the_default_paths_right(deb: Path) -> None:
    """help2man joins a line click wrapped after the hyphen of
    /etc/zdd-agent/... as a hyphenated word: debian/rules mends it."""
    page = subprocess.run(["sh", "-c", 'dpkg-deb --fsys-tarfile "$1" | tar -xOf - '
                           '"./usr/share/man/man1/zdd-agent.1.gz" | zcat', "-", str(deb)],
                          check=True, capture_output=True, text=True).stdout
    assert "zddagent" not in page
    assert "[default: /etc/zdd\\-agent/services]" in page
    assert ".SH DESCRIPTION" in page and "swap" in page
