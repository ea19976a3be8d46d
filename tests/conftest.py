"""Fixtures shared by every layer."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from debpkg import build


@pytest.fixture(scope="session")
def deb() -> Iterator[Path]:
    """dist/zdd-agent_VERSION_all.deb as scripts/build-deb makes it from this
    checkout (lintian clean, or failing the tests), under /srv: a sandboxed
    host sees it there (its /tmp is its own)."""
    out = Path("/srv") / f"zdd-deb-{uuid.uuid4().hex[:8]}"
    out.mkdir(mode=0o755, exist_ok=True)
    try:
        yield build(out)
    finally:
        for f in out.iterdir():
            f.unlink()
        out.rmdir()
