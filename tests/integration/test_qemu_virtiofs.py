"""virtio-fs on real QEMU (q35, TCG): virtiofsd started and stopped with the VM and with a
hotplugged share, host directories readable and writable from the guest and back."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest
from qemu_hotplug_support import VM, booted, make_config

from virtcontainers.config import VIRTIOFSD_FLAG_OPTIONS
from virtcontainers.devices import SharedFS
from virtcontainers.drivers.qemu import QemuHypervisor
from virtcontainers.errors import LaunchError, StateError

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("leak_check")]


def cmdline_of(pid: int) -> list[bytes]:
    """A running process's argv ([] once it has exited, zombies included)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a for a in f.read().split(b"\0") if a]
    except OSError:
        return []


async def check_share(vm: VM, tag: str, mnt: str, host_dir: Path) -> None:
    """Mount `tag` at `mnt` in the guest and move files both ways."""
    (host_dir / "from-host.txt").write_text("written on the host\n")
    # A hotplugged device is probed by the guest a moment after device_add: retry the mount.
    await vm.wait_for(f"mkdir -p {mnt} && mount -t virtiofs {tag} {mnt} && echo mounted", "mounted")
    assert await vm.sh(f"cat {mnt}/from-host.txt") == "written on the host\n"
    await vm.sh(f"echo written in the guest > {mnt}/from-guest.txt && sync")
    assert (host_dir / "from-guest.txt").read_text() == "written in the guest\n"
    (host_dir / "from-host.txt").write_text("changed on the host\n")
    assert await vm.sh(f"cat {mnt}/from-host.txt") == "changed on the host\n"


async def test_cold_and_hotplugged_virtio_fs(
    run_root: str, guest_assets: Any, tmp_path: Path
) -> None:
    cold_dir = tmp_path / "cold"
    hot_dir = tmp_path / "hot"
    cold_dir.mkdir()
    hot_dir.mkdir()
    cold = SharedFS(id="share0", source=str(cold_dir), mount_tag="cold")
    # Every option the virtio_fs_extra_args allowlist takes: the real daemon accepts them all.
    extra = ["--thread-pool-size=2", "--rlimit-nofile=4096", "--syslog", "-o"]
    extra.append(",".join(sorted(VIRTIOFSD_FLAG_OPTIONS)))
    extra += ["-o", "log_level=warn,max_idle_threads=4,timeout=5"]
    cfg = make_config(
        guest_assets, shared_fs="virtio-fs", pcie_root_port=1, virtio_fs_extra_args=extra
    )
    async with booted(run_root, cfg, devices=(cold,)) as vm:
        drv = vm.drv
        pids = drv.get_pids()
        [fsd] = drv.helpers.pids("virtiofsd")
        assert len(pids) == 3 and fsd in pids  # QEMU, virtiofsd, the console log keeper
        assert cmdline_of(fsd)[0].endswith(b"virtiofsd")
        # The extra arguments come first, the project's own options last.
        assert cmdline_of(fsd)[1 : 1 + len(extra)] == [a.encode() for a in extra]
        assert cmdline_of(fsd)[-4:] == [b"-o", f"source={cold_dir}".encode(), b"-o", b"cache=auto"]
        assert drv.save().virtiofsd_pid == fsd
        assert any("memory-backend-memfd" in a and "share=on" in a for a in drv.argv)
        await check_share(vm, "cold", "/mnt/cold", cold_dir)

        # A second share hotplugged: its own virtiofsd and vhost-user-fs-pci on a root port.
        hot = SharedFS(id="share1", source=str(hot_dir), mount_tag="hot")
        assert await drv.hotplug_add_device(hot) is hot
        hot_pids = drv.get_pids()
        [hot_fsd] = set(drv.helpers.pids("virtiofsd")) - {fsd}
        assert len(hot_pids) == 4 and hot_pids[:3] == pids
        assert f"source={hot_dir}".encode() in cmdline_of(hot_fsd)
        await check_share(vm, "hot", "/mnt/hot", hot_dir)

        # Unmount and hot-remove it: its virtiofsd goes; the cold share keeps working.
        await vm.sh("umount /mnt/hot")
        await drv.hotplug_remove_device(hot)
        assert drv.get_pids() == pids
        assert not cmdline_of(hot_fsd)
        await vm.wait_for("grep -c ' virtiofs ' /proc/mounts", "1")
        with pytest.raises(StateError, match=r"share1 .*never hot-added"):
            await drv.hotplug_remove_device(hot)
        assert (await vm.sh("cat /mnt/cold/from-guest.txt")) == "written in the guest\n"

        # An add cancelled while QEMU's reply to device_add is on its way (QEMU made the
        # device): the rollback removes the device before the chardev it holds, stops the
        # share's virtiofsd, and the caller sees the cancellation.
        real = drv.hotplug._execute

        async def cancelled_after_device_add(command: str, args: dict[str, Any]) -> Any:
            reply = await real(command, args)
            if command == "device_add":
                task = asyncio.current_task()
                assert task is not None
                task.cancel()
                await asyncio.sleep(0)
            return reply

        drv.hotplug._execute = cancelled_after_device_add
        adding = asyncio.create_task(drv.hotplug_add_device(hot))
        with pytest.raises(asyncio.CancelledError):
            await adding
        drv.hotplug._execute = real
        assert drv.get_pids() == pids and drv.hotplug.plugged == {}
        assert not await drv.hotplug.in_peripherals("fs-share1")
        chardevs = [c["label"] for c in await drv._execute("query-chardev")]
        assert "char-fs-share1" not in chardevs

        # Hotplug again, then let another process stop the VM from its persisted state: it
        # stops QEMU, both daemons and the console log keeper.
        await drv.hotplug_add_device(hot)
        await check_share(vm, "hot", "/mnt/hot2", hot_dir)
        all_pids = drv.get_pids()
        assert len(all_pids) == 4
        state = drv.save()
        await vm.agent.close()
        await drv.disconnect()
        other = QemuHypervisor(run_root=run_root)
        other.load(state)
        assert other.get_pids() == all_pids
        await other.stop_sandbox()
        assert other.get_pids() == []
        for pid in all_pids:
            assert not cmdline_of(pid)
        assert not os.path.exists(state.vm_dir)


async def test_a_virtiofsd_that_cannot_start_fails_the_launch_with_its_log(
    run_root: str, guest_assets: Any, tmp_path: Path
) -> None:
    """QEMU starts beside virtiofsd (on a socket already listening): when virtiofsd dies
    first (here: the overlay of an image root whose lower directory is gone), the launch fails
    with virtiofsd's own error, and nothing is left."""
    upper = tmp_path / "upper"
    upper.mkdir()
    share = SharedFS(id="ctr", source=str(upper), mount_tag="ctr", lower=str(tmp_path / "gone"))
    cfg = make_config(guest_assets, shared_fs="virtio-fs")
    drv = QemuHypervisor(run_root=run_root)
    await drv.create_sandbox("vfail", None, cfg)
    await drv.add_device(share)
    with pytest.raises(LaunchError) as err:
        await drv.start_sandbox(60)
    assert "virtiofsd for fs-ctr exited" in err.value.log_tail
    assert "mount: " in err.value.log_tail  # its wrapper's failing overlay mount
    await drv.stop_sandbox()
    assert drv.get_pids() == []
