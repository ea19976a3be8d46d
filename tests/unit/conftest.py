"""Fixtures shared by the fast layer's tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def root_dir() -> Iterator[Path]:
    """A root-owned 0755 directory under /run (/tmp and /var/tmp are world-writable)."""
    base = Path("/run") / f"zdd-trust-{os.getpid()}"
    base.mkdir(mode=0o755)
    os.chmod(base, 0o755)
    yield base
    for p in sorted(base.rglob("*"), key=lambda p: -len(p.parts)):
        p.unlink() if not p.is_dir() or p.is_symlink() else p.rmdir()
    base.rmdir()
