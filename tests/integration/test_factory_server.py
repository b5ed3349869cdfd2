"""Real QEMU (TCG) VM cache server: a daemon cloning a template, clients over gRPC, faults."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from test_template_clone import NAME, Made, made_template, sh

from leaks import vm_processes, vmm_processes
from virtcontainers import host
from virtcontainers.factory import (
    VM,
    CacheUnavailableError,
    DaemonSpec,
    Factory,
    daemon_status,
    paths,
    start_daemon,
    stop_daemon,
)
from virtcontainers.factory.daemon import read_pid_file
from virtcontainers.factory.rpc.client import RemoteCache
from virtcontainers.hypervisor import VMState

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("leak_check")]


@pytest.fixture(scope="module")
def template(guest_assets: Any) -> Iterator[Made]:
    yield from made_template(guest_assets)


@pytest.fixture(scope="module", autouse=True)
def grpc_warm() -> None:
    """gRPC keeps a few process-wide fds from its first use on: open them before the fd check."""

    async def touch() -> None:
        import grpc

        channel = grpc.aio.insecure_channel("unix:/nonexistent")
        await channel.close()

    asyncio.run(touch())


def spec(template: Made, size: int, **kw: Any) -> DaemonSpec:
    return DaemonSpec(size=size, template=NAME, template_root=template.store_root, **kw)


async def wait_ready(run_root: str, count: int, timeout: float = 60.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        st = await daemon_status(run_root)
        if len(st.vms) >= count:
            return
        assert loop.time() < deadline, f"pool has {len(st.vms)} of {count} VMs: {st}"
        await asyncio.sleep(0.1)


@pytest.fixture
async def daemon(template: Made, run_root: str) -> AsyncIterator[int]:
    """A cache server of 2 clones of the module's template; stopped and checked after."""
    pid = await start_daemon(spec(template, 2), run_root=run_root)
    _, _, watcher, watcher_start = read_pid_file(run_root)
    try:
        yield pid
    finally:
        await stop_daemon(run_root)
        assert not host.pid_is(pid, host.process_start_time(pid))
        assert not host.pid_is(watcher, watcher_start), "the watcher outlived the server"
        for path in (paths.socket_path(run_root), paths.pid_file(run_root)):
            assert not os.path.exists(path)


async def stop_all(vms: list[VM]) -> None:
    for vm in vms:
        await vm.stop()


async def test_distinct_vms_for_concurrent_clients_and_refill(daemon: int, run_root: str) -> None:
    await wait_ready(run_root, 2)
    remote = await RemoteCache.connect(run_root=run_root)
    vms: list[VM] = []
    try:
        results = await asyncio.gather(
            *(remote.get_base_vm(timeout=60) for _ in range(6)), return_exceptions=True
        )
        vms = [r for r in results if isinstance(r, VM)]
        assert len(vms) == 6, results
        assert len({vm.id for vm in vms}) == 6
        pids = {vm.pid() for vm in vms}
        assert len(pids) == 6 and daemon not in pids
        for vm in vms:
            assert vm.state is VMState.RUNNING  # resumed by the server as it hands it out
            assert (await sh(vm, f"echo {vm.id}")) == f"{vm.id}\n"
        await wait_ready(run_root, 2)
        st = await remote.status()
        assert st.handed_out == 6 and st.base == f"template:{NAME}"
        assert not {v.id for v in st.vms} & {vm.id for vm in vms}
    finally:
        await stop_all(vms)
        await remote.close()
    for vm in vms:
        assert not os.path.exists(os.path.dirname(vm.agent_endpoint.path))


async def test_vm_taken_over_from_the_server_pauses_grows_and_stops(
    daemon: int, run_root: str, template: Made
) -> None:
    async with await Factory.connect(run_root=run_root) as factory:
        want = template.config.copy()
        want.num_vcpus = 2
        vm = await factory.get_vm(want)
        try:
            assert vm.origin.startswith("cache:template") and vm.cpu == 2
            assert (await sh(vm, "grep -c ^processor /proc/cpuinfo")).strip() == "2"
            await vm.pause()
            await vm.hypervisor.check()
            await vm.resume()
            assert (await sh(vm, "echo alive")) == "alive\n"
            pid = vm.pid()
        finally:
            await vm.stop()
        assert not host.pid_is(pid, host.process_start_time(pid))


@contextlib.contextmanager
def template_broken(template: Made) -> Iterator[None]:
    """The template's device state is away: every clone (refill) fails until it is back."""
    state = template.info.state_path
    os.rename(state, state + ".away")
    try:
        yield
    finally:
        os.rename(state + ".away", state)


async def test_killed_server_fails_waiting_clients_and_leaves_no_vm(
    template: Made, run_root: str
) -> None:
    pid = await start_daemon(spec(template, 1), run_root=run_root)
    _, start, watcher, watcher_start = read_pid_file(run_root)
    remote = await RemoteCache.connect(run_root=run_root)
    held: list[VM] = []
    try:
        await wait_ready(run_root, 1)
        with template_broken(template):
            held.append(await remote.get_base_vm(timeout=60))
            waiting = [asyncio.create_task(remote.get_base_vm(timeout=60)) for _ in range(3)]
            for _ in range(200):
                if (await remote.status()).waiting == 3:
                    break
                await asyncio.sleep(0.02)
            assert (await remote.status()).waiting == 3
            os.kill(pid, signal.SIGKILL)
            results = await asyncio.wait_for(
                asyncio.gather(*waiting, return_exceptions=True), timeout=30
            )
        assert all(isinstance(r, CacheUnavailableError) for r in results), results
        # The watcher stops what the dead server owned; only the VM we hold remains.
        ours = {vm.pid() for vm in held}
        for _ in range(100):
            if {p for p, _ in vmm_processes(run_root)} == ours:
                break
            await asyncio.sleep(0.1)
        assert {p for p, _ in vmm_processes(run_root)} == ours
        assert (await sh(held[0], "echo mine")) == "mine\n"
        for _ in range(100):
            if not host.pid_is(watcher, watcher_start):
                break
            await asyncio.sleep(0.05)
        assert not host.pid_is(watcher, watcher_start)
        assert not os.path.exists(paths.socket_path(run_root))
        assert not os.path.exists(paths.pid_file(run_root))
        with pytest.raises(CacheUnavailableError):
            await remote.status()
    finally:
        await stop_all(held)
        await remote.close()
        await stop_daemon(run_root)
    assert not host.pid_is(pid, start)


CLIENT = textwrap.dedent(
    """
    import asyncio, sys
    from virtcontainers.factory.rpc.client import RemoteCache

    async def main():
        remote = await RemoteCache.connect(run_root=sys.argv[1])
        print("calling", flush=True)
        await remote.get_base_vm(timeout=120)
        print("got a VM", flush=True)

    asyncio.run(main())
    """
)


async def test_client_killed_mid_call_does_not_leak_a_vm(template: Made, run_root: str) -> None:
    await start_daemon(spec(template, 1), run_root=run_root)
    remote = await RemoteCache.connect(run_root=run_root)
    held: list[VM] = []
    client: subprocess.Popen[bytes] | None = None
    try:
        await wait_ready(run_root, 1)
        with template_broken(template):
            held.append(await remote.get_base_vm(timeout=60))  # the pool is empty now
            client = subprocess.Popen(
                [sys.executable, "-c", CLIENT, run_root], stdout=subprocess.PIPE
            )
            assert client.stdout is not None
            assert client.stdout.readline() == b"calling\n"
            for _ in range(500):
                if (await remote.status()).waiting == 1:
                    break
                await asyncio.sleep(0.01)
            assert (await remote.status()).waiting == 1, "the client's call did not arrive"
            client.kill()
            client.wait()
            for _ in range(500):
                if (await remote.status()).waiting == 0:
                    break
                await asyncio.sleep(0.01)
            assert (await remote.status()).waiting == 0, "the server still serves a dead client"
        # The template is back: a new caller is served, the pool refills.
        held.append(await remote.get_base_vm(timeout=60))
        await wait_ready(run_root, 1)
        st = await remote.status()
        assert st.handed_out == 2, "a VM was handed to the killed client"
        # Only the pool's VM and ours run: nothing made for the dead client was kept.
        for _ in range(50):
            if len(vmm_processes(run_root)) == 1 + len(held):
                break
            await asyncio.sleep(0.1)
        assert len(vmm_processes(run_root)) == 1 + len(held)
    finally:
        if client is not None and client.poll() is None:
            client.kill()
            client.wait()
        await stop_all(held)
        await remote.close()
        await stop_daemon(run_root)


async def test_in_process_cache_over_a_template(template: Made, run_root: str) -> None:
    from virtcontainers.factory import TemplateBase, TemplateStore

    store = TemplateStore(template.store_root, run_root=run_root)
    async with await Factory.cached(TemplateBase(store, NAME), 2, run_root=run_root) as factory:
        vms = await asyncio.gather(*(factory.get_vm() for _ in range(3)))
        try:
            assert len({vm.id for vm in vms}) == 3
            for vm in vms:
                assert vm.state is VMState.RUNNING
                assert (await sh(vm, "echo ok")) == "ok\n"
        finally:
            await stop_all(list(vms))


async def test_server_whose_socket_is_removed_quits_and_stops_its_vms(
    template: Made, run_root: str
) -> None:
    pid = await start_daemon(spec(template, 1), run_root=run_root)
    _, start, watcher, watcher_start = read_pid_file(run_root)
    try:
        await wait_ready(run_root, 1)
        assert len(vmm_processes(run_root)) == 1
        os.unlink(paths.socket_path(run_root))  # nobody can reach it any more
        for _ in range(200):
            if not host.pid_is(pid, start) and not host.pid_is(watcher, watcher_start):
                break
            await asyncio.sleep(0.05)
        assert not host.pid_is(pid, start), "an unreachable server kept running"
        assert not host.pid_is(watcher, watcher_start)
        assert vm_processes(run_root) == []
        assert not os.path.exists(paths.pid_file(run_root))
    finally:
        await stop_daemon(run_root)
