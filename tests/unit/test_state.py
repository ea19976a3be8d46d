"""State file and lock."""

from __future__ import annotations

import grp
import json
import os
import stat
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.errors import LockedError, StateDenied, StateError
from agent.state import HISTORY_LIMIT, StateStore, secure_state_dir


def result(frm: str | None, to: str, outcome: str = "ok") -> dict:
    return {"from_version": frm, "to_version": to, "result": outcome, "started_at": 1.0,
            "seconds": 2.0}


def test_record_tracks_serving_and_previous(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    st = store.load("api")
    assert st.serving is None and st.history == []
    st.record(result(None, "v1"))
    st.record(result("v1", "v2"))
    st.record(result("v2", "v3", "rolled_back"))
    store.save(st)
    again = store.load("api")
    assert (again.serving, again.previous) == ("v2", "v1")
    assert [h["to_version"] for h in again.history] == ["v1", "v2", "v3"]
    assert again.last["result"] == "rolled_back"
    assert store.names() == ["api"]


def test_history_is_bounded(tmp_path: Path) -> None:
    st = StateStore(tmp_path).load("api")
    for i in range(HISTORY_LIMIT + 20):
        st.record(result(f"v{i}", f"v{i + 1}"))
    assert len(st.history) == HISTORY_LIMIT
    assert st.history[-1]["to_version"] == f"v{HISTORY_LIMIT + 20}"


def test_corrupt_state_is_kept_aside(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    (tmp_path / "services").mkdir()
    (tmp_path / "services" / "api.json").write_text('{"serving": "v1", ')
    with pytest.raises(StateError, match="moved to"):
        store.load("api")
    aside = list((tmp_path / "services").glob("api.corrupt.*"))
    assert len(aside) == 1 and aside[0].read_text() == '{"serving": "v1", '


def test_lock_refuses_a_second_holder(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    with store.lock("api"):
        with pytest.raises(LockedError, match="a swap of api is already running"):
            with store.lock("api"):
                pass
        with store.lock("other"):  # other services are independent
            pass
    with store.lock("api"):  # released
        pass


def test_save_is_json(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    st = store.load("api")
    st.record(result(None, "v1"))
    store.save(st)
    data = json.loads((tmp_path / "services" / "api.json").read_text())
    assert data["serving"] == "v1"


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["record", "intent", "save", "reload"]),
                          st.text(max_size=8)), max_size=40))
def test_every_save_reads_back_as_the_state_it_wrote(tmp_path_factory, steps) -> None:
    """The store encodes each history entry once (issue 16): whatever the
    order of records, intents, saves and reloads, the file reads back as
    exactly the state saved."""
    root = tmp_path_factory.mktemp("state")
    store = StateStore(root)
    state = store.load("api")
    for i, (step, text) in enumerate(steps):
        if step == "record":
            state.record({**result(state.serving, f"v{i}"), "reason": text,
                          "nested": {"k": [text, i]}})
        elif step == "intent":
            state.intent = {"from": state.serving, "to": text, "phase": "bake", "n": i}
        elif step == "reload":
            state = store.load("api") if (root / "services" / "api.json").exists() else state
            continue
        store.save(state)
        back = StateStore(root).load("api")
        assert (back.serving, back.previous, back.since, back.history, back.intent) == (
            state.serving, state.previous, state.since, state.history, state.intent)


def test_a_state_file_in_the_older_layout_still_loads(tmp_path: Path) -> None:
    """Before issue 16 the file was json.dumps(indent=1): it reads the same,
    and the next save writes the new layout, which reads back equal."""
    data = {"serving": "v2", "previous": "v1", "since": 3.0, "intent": None, "watch": None,
            "adopted": None, "history": [result(None, "v1"), result("v1", "v2")]}
    (tmp_path / "services").mkdir(mode=0o750)
    (tmp_path / "services" / "api.json").write_text(json.dumps(data, indent=1, sort_keys=True))
    store = StateStore(tmp_path)
    st = store.load("api")
    assert (st.serving, st.previous, st.history) == ("v2", "v1", data["history"])
    store.save(st)
    again = StateStore(tmp_path).load("api")
    assert (again.serving, again.previous, again.history) == ("v2", "v1", data["history"])


# ------------------------------------------------------------ permissions
# The records hold journal lines and hook output: root and the admin group only.

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to other users needs root")


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_a_first_write_makes_private_directories_and_files(tmp_path: Path) -> None:
    root = tmp_path / "state"
    store = StateStore(root)
    with store.lock("api"):  # the lock comes first in a swap: it must not make root 0755
        pass
    store.save(store.load("api"))
    assert [mode(p) for p in (root, root / "services", root / "locks")] == [0o750] * 3
    gid = os.stat(root).st_gid
    assert mode(root / "services" / "api.json") == (0o640 if gid else 0o600)
    assert mode(root / "locks" / "api.lock") == 0o600


@needs_root
def test_files_get_the_state_directory_group_and_too_open_ones_are_tightened(
        tmp_path: Path) -> None:
    root = tmp_path / "state"
    (root / "services").mkdir(parents=True)
    os.chmod(root, 0o777)
    os.chmod(root / "services", 0o755)
    os.chown(root, 0, 4242)  # the admin group, as the daemon left it
    store = StateStore(root)
    store.save(store.load("api"))
    assert mode(root) == 0o750 and mode(root / "services") == 0o750
    st = os.stat(root / "services" / "api.json")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 4242, 0o640)
    os.chown(root, 0, 0)  # no admin group: root alone reads the records
    store.save(store.load("api"))
    st = os.stat(root / "services" / "api.json")
    assert (st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0o600)


@needs_root
def test_secure_state_dir_tightens_the_tree_and_leaves_links_alone(tmp_path: Path) -> None:
    group = grp.getgrgid(1).gr_name  # "daemon" on Debian: any group other than root's
    root = tmp_path / "state"
    (root / "services").mkdir(parents=True)
    (root / "locks").mkdir()
    outside = tmp_path / "outside"
    outside.write_text("not the agent's")
    os.chmod(outside, 0o666)
    files = [root / "services" / "api.json", root / "services" / "api.corrupt.1",
             root / "host.json"]
    for f in files:
        f.write_text("{}")
        os.chmod(f, 0o666)
        os.chown(f, 65534, 65534)
    (root / "services" / "link.json").symlink_to(outside)
    os.mkfifo(root / "services" / "fifo.json")
    os.chmod(root / "services" / "fifo.json", 0o666)
    for d in (root, root / "services", root / "locks"):
        os.chmod(d, 0o777)
    changes = secure_state_dir(root, group)
    assert f"{root}: mode 0777 -> 0750, group 0 -> 1" in changes
    assert f"{files[0]}: mode 0666 -> 0640, owner 65534 -> 0, group 65534 -> 1" in changes
    assert len(changes) == 6
    for d in (root, root / "services", root / "locks"):
        assert (mode(d), os.stat(d).st_gid) == (0o750, 1)
    for f in files:
        assert (mode(f), os.stat(f).st_uid, os.stat(f).st_gid) == (0o640, 0, 1)
    assert mode(outside) == 0o666 and os.stat(outside).st_gid == 0  # through a link: untouched
    assert mode(root / "services" / "fifo.json") == 0o666
    assert secure_state_dir(root, group) == []  # idempotent
    # no such group on this host: root's own group, and files for root alone
    assert f"{files[0]}: mode 0640 -> 0600, group 1 -> 0" in secure_state_dir(root, "no-such-grp")


@needs_root
def test_a_local_read_by_someone_else_is_refused_in_one_line(tmp_path: Path) -> None:
    root = tmp_path / "state"
    store = StateStore(root)
    store.save(store.load("api"))
    os.chmod(tmp_path, 0o755)
    rd, wr = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: user nobody, no supplementary groups
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            lines = []
            for f in (store.names, lambda: store.load("api")):
                try:
                    f()
                except StateDenied as e:
                    lines.append(f"{int(e.exit_code)} {e}")
            os.write(wr, "\n".join(lines).encode())
        finally:
            os._exit(0)
    os.close(wr)
    with os.fdopen(rd) as f:
        out = f.read()
    os.waitpid(pid, 0)
    assert out.splitlines() == [
        f"2 {root / 'services'}: permission denied: the state is readable by root and the "
        "admin group only (ask the daemon: run without --local)",
        f"2 {root / 'services' / 'api.json'}: permission denied: the state is readable by "
        "root and the admin group only (ask the daemon: run without --local)"]
