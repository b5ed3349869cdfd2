"""Sandbox API on real QEMU: exec, files, concurrency, timeouts, pause, attach, hotplug."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest

from virtcontainers import Capabilities, ConfigError, StateError, UnsupportedError
from virtcontainers.sandbox import Sandbox

pytestmark = pytest.mark.integration


async def test_exec_files_and_concurrency(leak_check: str, tmp_path: object) -> None:
    async with Sandbox("sbx1", run_root=leak_check, memory_size=256, num_vcpus=2) as sb:
        r = await sb.exec(["sh", "-c", "echo out; echo err >&2; exit 4"])
        assert (r.exit_code, r.stdout, r.stderr) == (4, b"out\n", b"err\n")
        r = await sb.exec("cat", stdin=b"\x00\xffbinary\n")
        assert r.stdout == b"\x00\xffbinary\n"
        r = await sb.exec(["sh", "-c", "pwd; echo $FOO"], env={"FOO": "bar"}, cwd="/tmp")
        assert r.stdout == b"/tmp\nbar\n"

        results = await asyncio.gather(
            *(sb.exec(["sh", "-c", f"sleep 0.2; echo {i}"]) for i in range(8))
        )
        assert [x.stdout for x in results] == [f"{i}\n".encode() for i in range(8)]

        r = await sb.exec(["sleep", "30"], timeout=0.5)
        assert r.exit_code != 0
        assert r.timed_out
        r = await sb.exec(["sh", "-c", "pgrep -x sleep || echo none"])
        assert r.stdout == b"none\n"  # the timed-out process was killed in the guest

        host_file = os.path.join(leak_check, "in.bin")
        payload = os.urandom(300_000)
        with open(host_file, "wb") as f:
            f.write(payload)
        await sb.copy_in(host_file, "/tmp/in.bin")
        r = await sb.exec(["sh", "-c", "wc -c < /tmp/in.bin"])
        assert r.stdout.strip() == b"300000"
        out_file = os.path.join(leak_check, "out.bin")
        victim = os.path.join(leak_check, "victim")
        with open(victim, "wb") as f:
            f.write(b"host\n")
        os.symlink(victim, out_file + ".vc-tmp")  # planted: must not be written through
        await sb.copy_out("/tmp/in.bin", out_file)
        with open(out_file, "rb") as f:
            assert f.read() == payload
        with open(victim, "rb") as f:
            assert f.read() == b"host\n"
        for name in (host_file, out_file, out_file + ".vc-tmp", victim):
            os.unlink(name)

        await sb.pause()
        with pytest.raises(StateError, match="paused"):
            await sb.exec(["true"])
        await sb.resume()
        assert (await sb.exec(["true"])).exit_code == 0
    assert Sandbox.list(leak_check) == []


async def test_attach_from_another_process(leak_check: str) -> None:
    sb = Sandbox("sbx2", run_root=leak_check, memory_size=256)
    await sb.start()
    try:
        await sb.detach()
        code = (
            "import asyncio, sys\n"
            "from virtcontainers import Sandbox\n"
            "async def main():\n"
            "    sb = await Sandbox.attach('sbx2', run_root=sys.argv[1])\n"
            "    r = await sb.exec(['echo', 'attached'])\n"
            "    print(r.stdout.decode().strip(), [i.state for i in Sandbox.list(sys.argv[1])])\n"
            "    await sb.detach()\n"
            "asyncio.run(main())\n"
        )
        p = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-c", code, leak_check],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert p.returncode == 0, p.stderr
        assert p.stdout.strip() == "attached ['running']"
        r = await sb.exec(["echo", "still mine"])
        assert r.stdout == b"still mine\n"
    finally:
        await sb.stop()
    assert Sandbox.list(leak_check) == []


@pytest.mark.parametrize("machine", ["q35", "pc"])
async def test_disk_and_resize_follow_capabilities(leak_check: str, machine: str) -> None:
    """What `capabilities()` claims for each hotplugging machine type works on real QEMU."""
    disk = os.path.join(leak_check, "disk.img")
    with open(disk, "wb") as f:
        f.truncate(8 << 20)
    async with Sandbox(
        "sbx3",
        run_root=leak_check,
        memory_size=256,
        num_vcpus=1,
        hypervisor_machine_type=machine,
    ) as sb:
        caps = sb.capabilities()
        claimed = Capabilities.BLOCK_DEVICE_HOTPLUG | Capabilities.CPU_HOTPLUG
        assert claimed | Capabilities.MEMORY_HOTPLUG in caps
        if Capabilities.BLOCK_DEVICE_HOTPLUG in caps:
            before = (await sb.exec(["ls", "/sys/block"])).stdout.split()
            drive = await sb.add_disk(disk, "data")
            after = (await sb.exec(["ls", "/sys/block"])).stdout.split()
            assert len(after) == len(before) + 1
            with pytest.raises(ConfigError, match="already has a disk"):
                await sb.add_disk(disk, "data")
            await sb.remove_disk(drive)
        else:
            with pytest.raises(UnsupportedError, match="disk hotplug"):
                await sb.add_disk(disk, "data")
        if Capabilities.CPU_HOTPLUG in caps:
            await sb.resize(vcpus=2)
            r = await sb.exec(["nproc"])
            assert r.stdout == b"2\n"
        else:
            with pytest.raises(UnsupportedError, match="vCPU resize"):
                await sb.resize(vcpus=2)
        if Capabilities.MEMORY_HOTPLUG in caps:
            total = "awk '/MemTotal/ {print $2}' /proc/meminfo"
            before_kib = int((await sb.exec(["sh", "-c", total])).stdout)
            await sb.resize(memory_mb=384)
            grown = f"until [ $({total}) -ge {before_kib + 120 * 1024} ]; do sleep 0.1; done"
            assert (await sb.exec(["sh", "-c", grown], timeout=20)).exit_code == 0
        else:
            with pytest.raises(UnsupportedError, match="memory resize"):
                await sb.resize(memory_mb=384)
    os.unlink(disk)
