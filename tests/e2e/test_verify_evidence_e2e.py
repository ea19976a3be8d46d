"""`zdd-agent verify`'s evidence beyond failed requests, end to end: the
version that answers after each swap (--version-path, --version-header)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from test_verify_e2e import verify

from agent.demo.release import make_release

pytestmark = pytest.mark.e2e

CONFIG = """\
name: svc
command: {root}/releases/{{version}}/bin/api
listen: ["127.0.0.1:8080"]
ready: {{type: notify}}
drain: {{grace_period: 5s}}
"""


def write_config(site: Path) -> Path:
    path = site / "service.yaml"
    path.write_text(CONFIG.format(root=site))
    path.chmod(0o644)
    return path


def test_the_version_swapped_to_answers(site: Path) -> None:
    for v in ("v1", "v2"):
        make_release(site / "releases", v)
    code, r = verify(write_config(site), "--swaps", "2", "--clients", "8",
                     "--version-path", "/")  # the demo answers {"version": ..., "pid": ...}
    print(f"verify --version-path /: {r['verdict']} {r['reasons']}, "
          f"{[s['answered'] for s in r['swaps']]}")
    assert code == 0 and r["verdict"] == "pass", r["reasons"]
    assert [[a["version"] for a in s["answered"]] for s in r["swaps"]] == [["v2"] * 3,
                                                                         ["v1"] * 3]
    assert r["version_asked"] == "GET /"


def test_a_release_that_is_not_the_version_it_claims_fails(site: Path) -> None:
    make_release(site / "releases", "v1")
    shutil.copytree(site / "releases" / "v1", site / "releases" / "v2")  # v2 runs v1's code
    code, r = verify(write_config(site), "--swaps", "1", "--clients", "8",
                     "--version-path", "/")
    print(f"verify, v2 that is v1: exit {code}, {r['reasons']}")
    assert code == 9 and r["verdict"] == "fail"
    assert r["swaps"][0]["result"] == "ok"  # systemd and the probe were happy
    assert "after swap 1 to v2, 3 of 3 answers were not v2 (GET /): v1 x3" in r["reasons"]
