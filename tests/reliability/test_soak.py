"""Soak and load: many lifecycles in a row and many sandboxes at once leak nothing and keep
the control plane's memory flat. Sized for CI; `VC_SOAK_CYCLES=200` runs the full soak."""

from __future__ import annotations

import asyncio
import gc
import os
from typing import Any

import pytest
from rel_support import assert_clean, sandbox_kw

from leaks import fd_targets, new_fds, open_fds
from virtcontainers.sandbox import Sandbox

pytestmark = [pytest.mark.slow, pytest.mark.integration]

QEMU_CYCLES = int(os.environ.get("VC_SOAK_CYCLES", "30"))
MOCK_CYCLES = 200
CONCURRENT = 8
RSS_GROWTH_LIMIT_KIB = 64 * 1024  # generous: a leak per cycle would blow far past it
MOCK_CFG = {"kernel_path": "/boot/vmlinuz", "initrd_path": "/boot/initrd.img"}


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def thread_count() -> int:
    return len(os.listdir("/proc/self/task"))


async def test_mock_lifecycle_soak(run_root: str) -> None:
    fds = open_fds()
    for i in range(MOCK_CYCLES):
        sb = Sandbox(f"m{i % 7}", "mock", run_root=run_root, **MOCK_CFG)
        await sb.start()
        await sb.pause()
        await sb.resume()
        assert [s.id for s in Sandbox.list(run_root)] == [sb.id]
        await sb.stop()
    gc.collect()
    extra = fd_targets(await new_fds(fds))
    assert not extra, f"fds left open: {extra}"
    assert_clean(run_root)


async def test_qemu_lifecycle_soak(leak_check: str, guest_assets: Any) -> None:
    kw = sandbox_kw(guest_assets)
    fds = open_fds()
    rss_at_10 = 0
    for i in range(QEMU_CYCLES):
        async with Sandbox(f"soak{i % 3}", "qemu", run_root=leak_check, **kw) as sb:
            res = await asyncio.wait_for(sb.exec(["echo", str(i)]), 60)
            assert res.stdout == f"{i}\n".encode()
        assert_clean(leak_check)
        if i == 9:
            gc.collect()
            rss_at_10 = rss_kib()
    gc.collect()
    rss_end = rss_kib()
    print(f"\nsoak: {QEMU_CYCLES} cycles; RSS at cycle 10 {rss_at_10} KiB, at end {rss_end} KiB")
    extra = fd_targets(await new_fds(fds))
    assert not extra, f"fds left open: {extra}"
    if QEMU_CYCLES > 10:
        assert rss_end - rss_at_10 < RSS_GROWTH_LIMIT_KIB


async def test_concurrent_sandboxes(leak_check: str, guest_assets: Any) -> None:
    kw = sandbox_kw(guest_assets)
    fds, threads = open_fds(), thread_count()
    sbs = [
        Sandbox(f"c{i}", "qemu", run_root=leak_check, start_timeout=180, **kw)
        for i in range(CONCURRENT)
    ]
    try:
        await asyncio.gather(*(sb.start() for sb in sbs))
        assert len({sb.hypervisor.get_pids()[0] for sb in sbs}) == CONCURRENT
        results = await asyncio.gather(
            *(asyncio.wait_for(sb.exec(["echo", sb.id]), 120) for sb in sbs)
        )
        assert [r.stdout for r in results] == [f"{sb.id}\n".encode() for sb in sbs]
        assert {i.id for i in Sandbox.list(leak_check)} == {sb.id for sb in sbs}
    finally:
        await asyncio.gather(*(sb.stop() for sb in sbs), return_exceptions=True)
    gc.collect()
    assert_clean(leak_check)
    extra = fd_targets(await new_fds(fds))
    assert not extra, f"fds left open: {extra}"
    assert thread_count() <= threads + 8  # the default executor's idle workers at most
