"""`agent.waiting.wait_watched`: a wait on the guest that a failing VM check cuts short."""

from __future__ import annotations

import asyncio

import pytest

from virtcontainers.agent.waiting import wait_watched
from virtcontainers.errors import VMExitedError


async def test_returns_the_result_and_checks_meanwhile() -> None:
    checks: list[int] = []
    discarded: list[str] = []

    async def slow() -> str:
        await asyncio.sleep(0.2)
        return "agent"

    async def check() -> None:
        checks.append(1)

    async def discard(value: str) -> None:
        discarded.append(value)

    assert await wait_watched(slow(), check, 0.01, discard=discard) == "agent"
    assert checks
    assert discarded == []


async def test_a_failing_check_cancels_the_wait() -> None:
    cancelled = asyncio.Event()

    async def forever() -> str:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "never"

    async def dead() -> None:
        raise VMExitedError("VM is gone")

    with pytest.raises(VMExitedError, match="VM is gone"):
        await wait_watched(forever(), dead, 0.01)
    assert cancelled.is_set()


async def test_a_result_that_arrives_during_a_failing_check_is_discarded() -> None:
    finished = asyncio.Event()
    discarded: list[str] = []

    async def connect() -> str:
        await asyncio.sleep(0.05)
        finished.set()
        return "late connection"

    async def dies_once_connected() -> None:
        await finished.wait()
        raise VMExitedError("VM died")

    async def discard(value: str) -> None:
        discarded.append(value)

    with pytest.raises(VMExitedError):
        await wait_watched(connect(), dies_once_connected, 0.01, discard=discard)
    assert discarded == ["late connection"]
