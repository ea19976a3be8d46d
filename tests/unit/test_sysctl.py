"""sysctl planning (pure) and apply/check/restore against a /proc/sys-shaped
directory."""

from __future__ import annotations

from pathlib import Path

from agent.sysctl import RESERVED, Sysctl, format_ports, parse_ports, wanted



def test_ports_roundtrip() -> None:
    assert parse_ports("8080,9000-9002, 22") == {22, 8080, 9000, 9001, 9002}
    assert format_ports({9002, 9000, 9001, 8080, 22}) == "22,8080,9000-9002"
    assert parse_ports("") == set() and format_ports([]) == ""


def test_wanted_merges_reserved_ports_and_overrides() -> None:
    w = wanted([("net.core.somaxconn", "4096"), ("net.ipv4.tcp_migrate_req", None)],
               [8080, 8081], current_reserved="22")
    assert w["net.core.somaxconn"] == "4096"
    assert "net.ipv4.tcp_migrate_req" not in w
    assert w[RESERVED] == "22,8080-8081"
    assert wanted([], [], "")["net.ipv4.ip_local_port_range"] == "10240 65535"


def fake_proc(tmp_path: Path, values: dict[str, str]) -> Path:
    root = tmp_path / "proc-sys"
    for key, value in values.items():
        p = root / key.replace(".", "/")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(value + "\n")
    return root


def test_apply_check_restore(tmp_path: Path) -> None:
    before = {"net.core.somaxconn": "4096", "net.ipv4.tcp_max_syn_backlog": "512",
              "net.ipv4.ip_local_port_range": "32768\t60999", "net.ipv4.tcp_fastopen": "1",
              RESERVED: ""}  # no tcp_migrate_req: an old kernel
    root = fake_proc(tmp_path, before)
    s = Sysctl(tmp_path / "state", root)
    plan = s.plan([], [8080])
    missing = [c.key for c in plan if c.old is None]
    assert missing == ["net.ipv4.tcp_migrate_req"]
    done = s.apply(plan)
    assert {c.key for c in done} == {"net.core.somaxconn", "net.ipv4.tcp_max_syn_backlog",
                                     "net.ipv4.ip_local_port_range", "net.ipv4.tcp_fastopen",
                                     RESERVED}
    assert s.read("net.ipv4.ip_local_port_range") == "10240 65535"
    assert s.read(RESERVED) == "8080"
    assert not [c for c in s.plan([], [8080]) if c.differs]
    # a second apply changes nothing and keeps the first recorded values
    assert s.apply(s.plan([], [8080])) == []
    restored = s.restore()
    assert {c.key for c in restored} == {c.key for c in done}
    for key, value in before.items():
        assert s.read(key) == " ".join(value.split())
    assert s.restore() == []
