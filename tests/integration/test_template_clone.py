"""Real QEMU (TCG) templates: clones answer, are independent, get a fresh identity, grow.

One template is made per module (about 5 s); each test clones it into its own run root,
which the leak check inspects afterwards.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from virtcontainers.agent import AgentClient
from virtcontainers.config import HypervisorConfig
from virtcontainers.factory import VM, Factory, TemplateInfo, TemplateStore
from virtcontainers.factory import tmpfs as tmpfs_mod
from virtcontainers.guest import default_kernel_params
from virtcontainers.hypervisor import VMState

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("leak_check")]

NAME = "base"


def base_config(guest_assets: Any, **kw: Any) -> HypervisorConfig:
    fields: dict[str, Any] = {
        "kernel_path": guest_assets.kernel,
        "initrd_path": guest_assets.initrd,
        "kernel_params": default_kernel_params(),
        "num_vcpus": 1,
        "memory_size": 256,
    }
    return HypervisorConfig(**{**fields, **kw})


@dataclass
class Made:
    root: str
    """Directory of the module: template store and the template VM's run root."""
    store_root: str
    info: TemplateInfo
    config: HypervisorConfig


def made_template(guest_assets: Any, **config: Any) -> Iterator[Made]:
    """Template `base` (1 vCPU, 256 MiB, unless `config` says otherwise) on its own tmpfs;
    removed, unmounted afterwards."""
    root = tempfile.mkdtemp(prefix="vctpl-", dir="/tmp")
    store = TemplateStore(os.path.join(root, "templates"), run_root=os.path.join(root, "rr"))
    cfg = base_config(guest_assets, **config)
    try:
        info = asyncio.run(store.create(NAME, cfg))
        yield Made(root, store.root, info, cfg)
    finally:
        for entry in store.list():
            store.remove(entry.name)
        assert tmpfs_mod.mounts_under(root) == []
        shutil.rmtree(root)


@pytest.fixture(scope="module")
def template(guest_assets: Any) -> Iterator[Made]:
    yield from made_template(guest_assets)


def store_for(made: Made, run_root: str) -> TemplateStore:
    """The module's template store, cloning into the test's run root."""
    return TemplateStore(made.store_root, run_root=run_root)


async def sh(vm: VM, script: str) -> str:
    res = await (await vm.agent()).exec(["/bin/sh", "-c", script])
    assert res.exit_code == 0, res
    return res.stdout.decode()


def file_digest(path: str) -> tuple[str, int]:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest(), os.stat(path).st_mtime_ns


async def test_template_files_live_on_their_own_tmpfs(template: Made) -> None:
    info = template.info
    assert info.tmpfs and os.path.ismount(info.directory)
    assert tmpfs_mod.free_bytes(info.directory) < (info.memory_mib + 64) << 20
    assert os.path.getsize(info.memory_path) == 256 << 20
    assert os.path.getsize(info.state_path) > 0
    assert info.qemu_version.startswith("QEMU emulator version")
    assert info.agent_version.startswith("vc-agent")


async def test_clone_answers_an_exec(template: Made, run_root: str) -> None:
    vm = await store_for(template, run_root).clone(NAME, template.config)
    try:
        assert vm.state is VMState.RUNNING and vm.origin == f"template:{NAME}"
        assert (await sh(vm, "echo hello from $(cat /proc/sys/kernel/hostname)")).startswith(
            "hello from"
        )
    finally:
        await vm.stop()
    assert not os.path.exists(vm.agent_endpoint.path)


async def test_two_clones_are_independent_and_the_template_is_untouched(
    template: Made, run_root: str
) -> None:
    info = template.info
    before = file_digest(info.memory_path), file_digest(info.state_path)
    store = store_for(template, run_root)
    a, b = await asyncio.gather(store.clone(NAME), store.clone(NAME))
    try:
        assert a.pid() != b.pid()
        await sh(a, "echo only-in-a > /tmp/marker && dd if=/dev/urandom of=/tmp/big bs=1M count=16")
        assert (await sh(a, "cat /tmp/marker")) == "only-in-a\n"
        res = await (await b.agent()).exec(["/bin/sh", "-c", "test -e /tmp/marker"])
        assert res.exit_code == 1, "a file written in clone A shows up in clone B"
        await sh(b, "echo only-in-b > /tmp/other")
        res = await (await a.agent()).exec(["/bin/sh", "-c", "test -e /tmp/other"])
        assert res.exit_code == 1
    finally:
        await a.stop()
        await b.stop()
    assert (file_digest(info.memory_path), file_digest(info.state_path)) == before


async def test_clones_have_their_own_sockets_and_fresh_identity(
    template: Made, run_root: str
) -> None:
    store = store_for(template, run_root)
    a, b = await asyncio.gather(store.clone(NAME), store.clone(NAME))
    try:
        for vm in (a, b):
            vm_dir = os.path.dirname(vm.agent_endpoint.path)
            assert vm_dir == os.path.join(run_root, "vm", vm.id)
            console = await vm.hypervisor.get_sandbox_console(vm.id)
            assert os.path.dirname(console) == vm_dir
            assert os.path.exists(os.path.join(vm_dir, "qmp.sock"))
        assert a.agent_endpoint.path != b.agent_endpoint.path
        # Reseeded: the two guests, restored from the same RNG state, now differ.
        ua = await sh(a, "head -c 32 /dev/urandom | od -An -tx1")
        ub = await sh(b, "head -c 32 /dev/urandom | od -An -tx1")
        assert ua != ub
    finally:
        await a.stop()
        await b.stop()


async def test_clock_is_set_on_clone(template: Made, run_root: str) -> None:
    store = store_for(template, run_root)
    age = time.time() - template.info.created_at
    if age < 5:
        await asyncio.sleep(5 - age)  # the template's clock must be visibly stale
    stale = await store.clone(NAME, fresh_identity=False)
    fresh = await store.clone(NAME)
    try:
        await stale.wait_agent(30)
        stale_now = int(await sh(stale, "date +%s"))
        fresh_now = int(await sh(fresh, "date +%s"))
        host_now = time.time()
        assert host_now - stale_now > 3, "a clone without a clock update should lag"
        assert abs(host_now - fresh_now) < 2
    finally:
        await stale.stop()
        await fresh.stop()


async def test_agent_of_a_clone_takes_a_new_connection(template: Made, run_root: str) -> None:
    vm = await store_for(template, run_root).clone(NAME)
    try:
        await vm.close_agent()
        again = await AgentClient.connect(vm.agent_endpoint.path, 10)
        try:
            assert (await again.exec(["echo", "again"])).stdout == b"again\n"
        finally:
            await again.close()
    finally:
        await vm.stop()


async def test_many_concurrent_clones(template: Made, run_root: str) -> None:
    store = store_for(template, run_root)
    vms = await asyncio.gather(*(store.clone(NAME) for _ in range(4)))
    try:
        assert len({vm.id for vm in vms}) == 4
        outs = await asyncio.gather(*(sh(vm, "echo $$") for vm in vms))
        assert all(o.strip().isdigit() for o in outs)
    finally:
        for vm in vms:
            await vm.stop()


async def test_factory_grows_a_clone_by_hotplug(template: Made, run_root: str) -> None:
    factory = Factory.from_template(NAME, store=store_for(template, run_root))
    want = template.config.copy()
    want.num_vcpus, want.memory_size = 2, 512
    vm = await factory.get_vm(want)
    try:
        assert vm.origin == f"template:{NAME}"  # grown, not booted directly
        assert (vm.cpu, vm.memory_mb) == (2, 512)
        assert (await sh(vm, "grep -c ^processor /proc/cpuinfo")).strip() == "2"
        mem_kib = int((await sh(vm, "grep MemTotal /proc/meminfo")).split()[1])
        assert mem_kib > 400 << 10
    finally:
        await vm.stop()


async def test_removing_a_template_leaves_running_clones_working(
    guest_assets: Any, run_root: str
) -> None:
    root = tempfile.mkdtemp(prefix="vctpl-", dir="/tmp")
    try:
        store = TemplateStore(os.path.join(root, "templates"), run_root=run_root)
        cfg = base_config(guest_assets, memory_size=192)
        await store.create("short-lived", cfg)
        vm = await store.clone("short-lived")
        try:
            store.remove("short-lived")
            assert store.list() == []
            assert tmpfs_mod.mounts_under(root) == []  # detached; freed with the last clone
            assert (await sh(vm, "echo still here")) == "still here\n"
        finally:
            await vm.stop()
    finally:
        shutil.rmtree(root)
