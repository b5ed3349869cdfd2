"""A cold `run --image` start in a real QEMU guest (TCG): what the guest does while the host
waits on the container's first run, read from the agent's debug log on the console (guest
clock, ms)."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest

from virtcontainers import Sandbox
from virtcontainers.guest import AGENT_READY_MARKER
from virtcontainers.images import ImageStore
from virtcontainers.types import Param

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("leak_check")]


async def _console_until(sb: Sandbox, text: str, tries: int = 600) -> str:
    """The console log once `text` is in it (or after `tries` looks 0.1 s apart)."""
    path = Path(sb.hypervisor.console_log)  # type: ignore[attr-defined]
    log = ""
    for _ in range(tries):
        log = path.read_text(errors="replace")
        if text in log:
            break
        await asyncio.sleep(0.1)
    return log


async def test_background_drivers_wait_for_the_first_container(
    run_root: str, images: ImageStore
) -> None:
    """The drivers a start does not need (scsi_mod, virtio_scsi with its bus scan,
    filesystems: a few hundred ms of the one vCPU under TCG) load once the agent is idle:
    neither during the start's NETWORK request nor during the container's first run, which
    the host waits on (the hold's cap is set far away here, so only the idle rule releases
    it); they still all load, with no request to ask for them."""
    debug = [Param("vc.debug", "1"), Param("vc.loader_hold_ms", "60000")]
    async with Sandbox(
        network="none",
        image="busybox",
        image_store=images.root,
        run_root=run_root,
        kernel_params=debug,
    ) as sb:
        result = await (await sb.create_container(["sleep", "0.3"])).run()
        assert result.exit_code == 0, result
        log = await _console_until(sb, "all modules loaded")
    assert "all modules loaded" in log, log[-3000:]
    after_ready = log[log.index(AGENT_READY_MARKER) :]
    run = re.search(r"exec id=(\d+) pid=(\d+) /bin/sh", after_ready)
    assert run is not None, after_ready[-3000:]
    done = re.search(
        rf"process id={run[1]} pid={run[2]} done status=0x0(?: at (\d+))?", after_ready
    )
    assert done is not None, after_ready[-3000:]
    first = re.search(r"vc-agent: loaded (\S+) in (\d+) ms at (\d+)", after_ready)
    assert first is not None, after_ready[-3000:]
    assert first.start() > done.end(), f"{first[1]} loaded during the container's run"
    started = int(first[3]) - int(first[2])
    assert done[1] is not None and started >= int(done[1]), (
        f"{first[1]} loading from {started} ms, the container's run ended at {done[1]}"
    )
    released = re.search(r"background loading released at (\d+)", after_ready)
    assert released is not None and int(released[1]) >= int(done[1]), after_ready[-3000:]
