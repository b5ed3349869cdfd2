"""The shim's VM (`SandboxVM`) on a real QEMU guest, below containerd: OOM kills reported
from inotify (nothing in the guest polls), a terminal of its own for a container without a
pid namespace."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import uuid
from pathlib import Path
from typing import Any

import pytest

from virtcontainers.images import ImageStore
from virtcontainers.images.build import busybox_image
from virtcontainers.shim.vm import GuestProcess, ProcessSpec, SandboxVM

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("leak_check")]

ENV = ["PATH=/bin"]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> ImageStore:
    s = ImageStore(str(tmp_path_factory.mktemp("images")))
    s.import_archive(busybox_image())
    return s


def bundle(store: ImageStore, path: Path, args: list[str], **linux: Any) -> str:
    """An OCI bundle of the busybox image running `args`, with `linux` as its spec's."""
    path.mkdir()
    shutil.copytree(store.rootfs(store.get("busybox")), path / "rootfs", symlinks=True)
    config = {
        "ociVersion": "1.0.2",
        "process": {"args": args, "env": ENV, "cwd": "/"},
        "root": {"path": "rootfs"},
        "linux": linux,
    }
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


async def output(proc: GuestProcess) -> bytes:
    return b"".join([chunk async for chunk in proc.stdout])


async def wakeups(vm: SandboxVM) -> dict[int, int]:
    """Guest pid -> voluntary context switches (how often it has slept and woken)."""
    result = await vm.sandbox.exec(
        ["/bin/sh", "-c", "grep -H ^voluntary_ctxt_switches /proc/[0-9]*/status; true"]
    )
    out = {}
    for line in result.stdout.decode().splitlines():
        path, _, count = line.partition(":voluntary_ctxt_switches:")
        out[int(path.split("/")[2])] = int(count)
    return out


async def test_oom_kills_come_from_inotify_without_polling(
    run_root: str, store: ImageStore, tmp_path: Path
) -> None:
    """The OOM watcher sleeps until memory.events changes: across seconds of nothing its
    process never wakes and nothing is spawned (the former watcher was a shell loop waking
    every second); an OOM kill in the container's cgroup is reported."""
    limit = {"resources": {"memory": {"limit": 32 << 20}}}
    b = bundle(store, tmp_path / "b", ["sleep", "600"], **limit)
    vm = SandboxVM(f"oom-{uuid.uuid4().hex[:6]}", b, run_root=run_root)
    await vm.start()
    kills: asyncio.Queue[int] = asyncio.Queue()

    async def watch() -> None:
        async for n in vm.oom_kills("c"):
            kills.put_nowait(n)

    watcher = None
    try:
        await vm.add_container("c", b)
        await vm.start_process("c", "", ProcessSpec(["sleep", "600"], ENV), 24, 80)
        before = await wakeups(vm)
        watcher = asyncio.get_running_loop().create_task(watch())
        # The watcher's processes: those that appeared since and stay.
        for _ in range(100):
            await asyncio.sleep(0.5)
            first = await wakeups(vm)
            second = await wakeups(vm)
            mine = set(first) & set(second) - set(before)
            if mine:
                break
        assert mine, "no watcher process started in the guest"
        await asyncio.sleep(1)
        settled = await wakeups(vm)
        await asyncio.sleep(3)
        later = await wakeups(vm)
        assert {p: settled.get(p) for p in mine} == {p: later.get(p) for p in mine}
        # Nothing else new lives on either (no poller's children between the two looks).
        assert set(settled) & set(later) - set(before) == mine
        assert kills.empty()
        hog = ProcessSpec(["sh", "-c", "dd if=/dev/zero of=/dev/null bs=64M count=1"], ENV)
        proc = await vm.start_process("c", "hog", hog, 24, 80)
        status = await proc.wait()
        assert status.signal == 9 or status.exit_code != 0, status
        assert await asyncio.wait_for(kills.get(), 60) >= 1
    finally:
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(BaseException):
                await watcher
        await vm.remove_container("c")
        await vm.stop()


async def test_terminal_of_its_own_without_a_pid_namespace(
    run_root: str, store: ImageStore, tmp_path: Path
) -> None:
    """A container sharing the guest's pid namespace (none in its spec) still gets a
    terminal of its container's devpts, which `tty` names, sized as asked."""
    namespaces = [{"type": "mount"}, {"type": "uts"}, {"type": "ipc"}]
    script = "tty; stty size; exit 3"
    b = bundle(store, tmp_path / "b", ["sh", "-c", script], namespaces=namespaces)
    vm = SandboxVM(f"tty-{uuid.uuid4().hex[:6]}", b, run_root=run_root)
    await vm.start()
    try:
        await vm.add_container("t", b)
        spec = ProcessSpec(["sh", "-c", script], ENV, terminal=True)
        proc = await vm.start_process("t", "", spec, 33, 111)
        out = await output(proc)
        assert (await proc.wait()).exit_code == 3
        assert out.replace(b"\r", b"").splitlines() == [b"/dev/pts/0", b"33 111"], out
    finally:
        await vm.remove_container("t")
        await vm.stop()
