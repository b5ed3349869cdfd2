"""Fixtures shared by every test suite."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest


@pytest.fixture
def run_root(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A private, short run root (Unix socket paths must stay under 108 bytes)."""
    path = tempfile.mkdtemp(prefix="vct-", dir="/tmp")
    monkeypatch.setenv("VC_RUN_ROOT", path)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def guest_assets() -> Any:
    """Kernel and initrd for real VMs, built once (cached across runs by content hash)."""
    from virtcontainers.guest import ensure_assets

    return ensure_assets()


def pytest_report_header(config: pytest.Config) -> str:
    return f"virtcontainers tests; run as uid {os.getuid()}"
