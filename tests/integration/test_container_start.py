"""A cold `run --image` start in a real QEMU guest (TCG): what the guest does while the host
waits on the container's first run, read from the agent's debug log on the console (guest
clock, ms)."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest

from virtcontainers import Sandbox
from virtcontainers.containers.spec import READ_AHEAD_KIB, RUNNER
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
    it); they still all load, with no request to ask for them. The container's start is one
    process, vc-run (no set-up shell), which mounts the root share reading ahead."""
    debug = [Param("vc.debug", "1"), Param("vc.loader_hold_ms", "60000")]
    async with Sandbox(
        network="none",
        image="busybox",
        image_store=images.root,
        run_root=run_root,
        kernel_params=debug,
    ) as sb:
        c = await sb.create_container(["sleep", "0.3"])
        result = await c.run()
        assert result.exit_code == 0, result
        # vc-run mounted the root share itself, reading ahead READ_AHEAD_KIB (FUSE: 128).
        bdi = f"cat /sys/class/bdi/$(awk '$5 == \"{c.rootfs}\" {{print $3}}' /proc/self/mountinfo)"
        ahead = await sb.exec(["/bin/sh", "-c", f"{bdi}/read_ahead_kb"])
        assert ahead.stdout == f"{READ_AHEAD_KIB}\n".encode(), ahead
        log = await _console_until(sb, "all modules loaded")
    assert "all modules loaded" in log, log[-3000:]
    after_ready = log[log.index(AGENT_READY_MARKER) :]
    run = re.search(r"exec id=(\d+) pid=(\d+) (\S+)", after_ready)
    assert run is not None, after_ready[-3000:]
    assert run[3] == RUNNER, f"the container's start ran {run[3]}, not vc-run alone"
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
