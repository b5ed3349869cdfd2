"""The shim's VM (`SandboxVM`) on a real QEMU guest, below containerd: OOM kills reported
from inotify (nothing in the guest polls), a terminal of its own for a container without a
pid namespace, namespaces named by a task's /proc path joined in the guest."""

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
from virtcontainers.shim.vm import GuestProcess, ProcessSpec, SandboxVM, VMError

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
    """Guest pid -> voluntary context switches (how often it has slept and woken) of the
    agent's children: what the shim runs in the guest (not kernel threads, made on demand)."""
    result = await vm.sandbox.exec(
        ["/bin/sh", "-c", "grep -H -e ^PPid -e ^voluntary_ctxt_switches /proc/[0-9]*/status"]
    )
    parents: dict[int, int] = {}
    counts: dict[int, int] = {}
    for line in result.stdout.decode().splitlines():
        path, key, value = line.split(":", 2)
        pid = int(path.split("/")[2])
        (parents if key == "PPid" else counts)[pid] = int(value)
    return {pid: n for pid, n in counts.items() if parents.get(pid) == 1}


async def test_oom_kills_come_from_inotify_without_polling(
    run_root: str, store: ImageStore, tmp_path: Path
) -> None:
    """The OOM watcher sleeps until memory.events changes: across seconds of nothing its
    process never wakes (the former watcher was a shell loop waking every second); an OOM
    kill in the container's cgroup is reported."""
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


async def ps(vm: SandboxVM, cid: str) -> dict[int, str]:
    """pid -> command line of what container `cid` sees."""
    spec = ProcessSpec(["ps", "-o", "pid,args"], ENV)
    proc = await vm.start_process(cid, f"ps-{uuid.uuid4().hex[:6]}", spec, 24, 80)
    out = (await output(proc)).decode()
    assert (await proc.wait()).exit_code == 0, out
    lines = [line.split(None, 1) for line in out.splitlines()[1:]]
    return {int(f[0]): f[1] for f in lines if len(f) == 2}


async def test_namespaces_named_by_a_tasks_path_are_that_containers(
    run_root: str, store: ImageStore, tmp_path: Path
) -> None:
    """A bundle naming a namespace /proc/<pid>/ns/<type> joins the namespace of the container
    whose task has that pid (CRI names the target container's pid namespace so in TARGET
    mode, the pod sandbox's ipc one): tasks after the VM's first are known by distinct pids;
    any other path is refused, naming it, and nothing is made for that container."""
    own = [{"type": "mount"}, {"type": "pid"}, {"type": "ipc"}]
    first = bundle(store, tmp_path / "first", ["sleep", "601"], namespaces=own)
    vm = SandboxVM(f"ns-{uuid.uuid4().hex[:6]}", first, run_root=run_root, pcie_root_port=3)
    await vm.start()
    target = bundle(store, tmp_path / "target", ["sleep", "602"], namespaces=own)
    added = []
    try:
        for cid, b, args in (("first", first, "601"), ("target", target, "602")):
            await vm.add_container(cid, b)
            added.append(cid)
            await vm.start_process(cid, "", ProcessSpec(["sleep", args], ENV), 24, 80)
        pids = {cid: vm.task_pid(cid) for cid in added}
        assert pids["first"] == vm.pid and pids["target"] not in (0, vm.pid), pids
        joining = [
            {"type": "mount"},
            {"type": "pid", "path": f"/proc/{pids['target']}/ns/pid"},
            {"type": "ipc", "path": f"/proc/{pids['first']}/ns/ipc"},
        ]
        debug = bundle(store, tmp_path / "debug", ["sleep", "603"], namespaces=joining)
        await vm.add_container("debug", debug)
        added.append("debug")
        await vm.start_process("debug", "", ProcessSpec(["sleep", "603"], ENV), 24, 80)
        # The target's pid namespace: its process is pid 1 there, the first's is not seen.
        seen = await ps(vm, "debug")
        assert seen.get(1) == "sleep 602" and "sleep 603" in seen.values(), seen
        assert "sleep 601" not in seen.values(), seen
        # The first container's ipc namespace, not the target's.
        ipc = {}
        for cid in ("first", "target", "debug"):
            p = await vm.start_process(
                cid, f"i{cid}", ProcessSpec(["sh", "-c", "readlink /proc/self/ns/ipc"], ENV), 24, 80
            )
            ipc[cid] = await output(p)
            await p.wait()
        assert ipc["debug"] == ipc["first"] != ipc["target"], ipc
        bad = [{"type": "mount"}, {"type": "pid", "path": "/proc/1/ns/pid"}]
        stray = bundle(store, tmp_path / "stray", ["true"], namespaces=bad)
        with pytest.raises(VMError, match=r"the pid namespace /proc/1/ns/pid is none of this"):
            await vm.add_container("stray", stray)
        assert "stray" not in vm.containers and "stray" not in vm.sandbox.containers
    finally:
        for cid in reversed(added):
            await vm.remove_container(cid)
        await vm.stop()
