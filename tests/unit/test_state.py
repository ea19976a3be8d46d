"""State file and lock."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.errors import LockedError, StateError
from agent.state import HISTORY_LIMIT, StateStore


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
