"""Reliability suite fixtures: the shared leak check and a running QEMU sandbox."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from rel_support import sandbox_kw

from leaks import leak_check
from virtcontainers.sandbox import Sandbox

__all__ = ["leak_check"]


@pytest.fixture
async def sandbox(leak_check: str, guest_assets: Any) -> AsyncIterator[Sandbox]:
    """A running QEMU sandbox "sb1" in the test's run root (stopped afterwards)."""
    sb = Sandbox("sb1", "qemu", run_root=leak_check, **sandbox_kw(guest_assets))
    await sb.start()
    try:
        yield sb
    finally:
        await sb.stop()
