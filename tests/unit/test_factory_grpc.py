"""The VM cache gRPC server and client, in-process over a fake hypervisor."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest
import test_factory_fakes
from test_factory_fakes import FakeHV, fake_config

from virtcontainers.factory import (
    CacheUnavailableError,
    DirectBase,
    Factory,
    FactoryError,
    VMCache,
    VMConfig,
)
from virtcontainers.factory.errors import CacheMismatchError
from virtcontainers.factory.rpc import cache_pb2 as pb
from virtcontainers.factory.rpc import cache_pb2_grpc
from virtcontainers.factory.rpc.client import RemoteCache, channel_target, vm_from_message
from virtcontainers.factory.rpc.server import CacheServer, CacheServicer
from virtcontainers.hypervisor import VMState

fake_hv = test_factory_fakes.fake_hv


@dataclass
class Served:
    cache: VMCache
    server: CacheServer
    socket: str


async def serve(run_root: str, size: int = 2, delay: float = 0.0) -> Served:
    base = DirectBase(VMConfig.of(fake_config(), "mock"), run_root=run_root)
    if delay:
        from test_factory_cache import SlowBase

        cache = VMCache(SlowBase(base, delay), size)
    else:
        cache = VMCache(base, size)
    sock = os.path.join(run_root, "cache.sock")
    server = CacheServer(cache, sock)
    await server.start()
    await cache.start()
    return Served(cache, server, sock)


@pytest.fixture
async def served(fake_hv: type[FakeHV], run_root: str) -> AsyncIterator[Served]:
    s = await serve(run_root)
    try:
        yield s
    finally:
        await s.server.stop()
        await s.cache.close()


async def test_config_status_and_distinct_vms_for_concurrent_clients(
    served: Served, run_root: str
) -> None:
    remote = await RemoteCache.connect(served.socket, run_root=run_root)
    try:
        assert remote.config().config.to_dict() == served.cache.config().config.to_dict()
        await served.cache.wait_full(5)
        vms = await asyncio.gather(*(remote.get_base_vm(timeout=10) for _ in range(5)))
        try:
            assert len({vm.id for vm in vms}) == 5
            for vm in vms:
                # Paused in the pool, resumed by the server as it hands the VM out.
                assert vm.state is VMState.RUNNING
                assert vm.origin == "cache:direct"
                res = await (await vm.agent()).exec(["echo", vm.id])
                assert res.stdout == f"{vm.id}\n".encode()
        finally:
            for vm in vms:
                await vm.stop()
        await served.cache.wait_full(5)
        st = await remote.status()
        assert st.size == 2 and len(st.vms) == 2 and st.handed_out == 5
        assert st.pid == os.getpid() and st.base == "direct"
        assert not {v.id for v in st.vms} & {vm.id for vm in vms}
    finally:
        await remote.close()


async def test_factory_over_the_server_prepares_vms(served: Served, run_root: str) -> None:
    async with await Factory.connect(served.socket, run_root=run_root) as factory:
        vm = await factory.get_vm(fake_config(num_vcpus=2))
        try:
            assert vm.state is VMState.RUNNING and vm.cpu == 2
            assert vm.origin == "cache:direct"
        finally:
            await vm.stop()


def count_config_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the server's `Config` calls."""
    calls: list[int] = []
    plain = CacheServicer.Config

    async def counted(self: CacheServicer, request: pb.Empty, context: object) -> pb.GrpcVMConfig:
        calls.append(1)
        return await plain(self, request, context)

    monkeypatch.setattr(CacheServicer, "Config", counted)
    return calls


async def test_factory_wanting_a_config_is_checked_at_hand_out_without_config_call(
    served: Served, run_root: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = count_config_calls(monkeypatch)
    want = VMConfig.of(fake_config(num_vcpus=2), "mock")
    async with await Factory.connect(served.socket, run_root=run_root, want=want) as factory:
        vm = await factory.get_vm(want)
        try:
            assert vm.origin == "cache:direct" and vm.cpu == 2
            # The base's size is the server's VMs' (1 vCPU), known from the VM handed out.
            assert factory.config().config.num_vcpus == 1
        finally:
            await vm.stop()
    assert calls == []
    assert served.cache.handed_out == 1


async def test_server_refuses_a_wanted_config_it_cannot_serve_before_taking_a_vm(
    served: Served, run_root: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    await served.cache.wait_full(5)
    calls = count_config_calls(monkeypatch)
    other = VMConfig.of(fake_config(initrd_path="/fake/other.img"), "mock")
    remote = await RemoteCache.connect(served.socket, run_root=run_root, want=other)
    try:
        with pytest.raises(CacheMismatchError, match="initrd_path"):
            await remote.get_base_vm(timeout=5)
    finally:
        await remote.close()
    assert served.cache.handed_out == 0 and len((await served.cache.status()).vms) == 2
    # A factory falls back to a direct boot, the pool untouched.
    async with await Factory.connect(served.socket, run_root=run_root, want=other) as factory:
        vm = await factory.get_vm(other)
        try:
            assert vm.origin == "direct (fallback)"
        finally:
            await vm.stop()
    assert served.cache.handed_out == 0 and calls == []


async def test_server_refuses_a_malformed_wanted_config(served: Served) -> None:
    channel = grpc.aio.insecure_channel(channel_target(served.socket))
    try:
        stub = cache_pb2_grpc.CacheServiceStub(channel)  # type: ignore[no-untyped-call]
        req = pb.GetBaseVMRequest(
            timeout_ms=5000, want=pb.GrpcVMConfig(hypervisor="mock", config=b"{")
        )
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.GetBaseVM(req)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "want" in (err.value.details() or "")
    finally:
        await channel.close()
    assert served.cache.handed_out == 0


async def test_client_that_gives_up_mid_call_does_not_leak_a_vm(
    fake_hv: type[FakeHV], run_root: str
) -> None:
    s = await serve(run_root, size=1, delay=0.3)
    remote = await RemoteCache.connect(s.socket, run_root=run_root)
    try:
        call = asyncio.create_task(remote.get_base_vm(timeout=10))
        await asyncio.sleep(0.1)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await s.cache.wait_full(5)
        st = await remote.status()
        assert len(st.vms) == 1 and st.handed_out == 0 and st.waiting == 0
        assert set(fake_hv.running) == {st.vms[0].id}
    finally:
        await remote.close()
        await s.server.stop()
        await s.cache.close()
    assert fake_hv.running == {}


async def test_server_cancelled_hand_out_stops_the_vm(served: Served) -> None:
    await served.cache.wait_full(5)
    vm = await served.cache.take(1)

    class Ctx:
        def add_done_callback(self, cb: object) -> None:
            self.cb = cb

        def cancelled(self) -> bool:
            return True

    ctx = Ctx()
    served.server.settle_later(vm, ctx)
    ctx.cb(ctx)  # type: ignore[operator]
    for _ in range(100):
        if vm.id not in FakeHV.running:
            break
        await asyncio.sleep(0.01)
    assert vm.id not in FakeHV.running
    assert served.cache.handed_out == 0


async def test_timeout_reports_the_refill_failure(fake_hv: type[FakeHV], run_root: str) -> None:
    fake_hv.fail_start = 1000
    s = await serve(run_root, size=1)
    remote = await RemoteCache.connect(s.socket, run_root=run_root)
    try:
        with pytest.raises(FactoryError, match=r"no VM became ready.*failed to launch"):
            await remote.get_base_vm(timeout=0.5)
    finally:
        await remote.close()
        await s.server.stop()
        await s.cache.close()


async def test_server_going_away_while_a_client_waits(fake_hv: type[FakeHV], run_root: str) -> None:
    s = await serve(run_root, size=1, delay=5.0)
    remote = await RemoteCache.connect(s.socket, run_root=run_root)
    try:
        call = asyncio.create_task(remote.get_base_vm(timeout=30))
        await asyncio.sleep(0.2)
        s.server.request_quit()
        await s.server.stop(grace=0.2)
        await s.cache.close()
        with pytest.raises(CacheUnavailableError, match="not available"):
            await asyncio.wait_for(call, 10)
        with pytest.raises(CacheUnavailableError):
            await remote.status()
    finally:
        await remote.close()
    assert fake_hv.running == {}
    assert not os.path.exists(s.socket)


async def test_quit_asks_the_server_to_stop(served: Served, run_root: str) -> None:
    remote = await RemoteCache.connect(served.socket, run_root=run_root)
    try:
        await remote.quit()
        await asyncio.wait_for(served.server.wait_quit(), 5)
        assert served.server.quitting
    finally:
        await remote.close()


async def test_connect_errors_are_clear(run_root: str) -> None:
    missing = os.path.join(run_root, "none.sock")
    with pytest.raises(CacheUnavailableError, match="virtc factory init"):
        await RemoteCache.connect(missing)
    dead = os.path.join(run_root, "dead.sock")
    import socket

    s = socket.socket(socket.AF_UNIX)
    s.bind(dead)
    s.close()  # a socket file nobody listens on
    with pytest.raises(CacheUnavailableError, match="not available"):
        await RemoteCache.connect(dead, timeout=2)
    with pytest.raises(CacheUnavailableError):
        await Factory.connect(missing)


async def test_unusable_vm_descriptions_are_factory_errors(fake_hv: type[FakeHV]) -> None:
    cfg = fake_config().to_dict()
    import json

    bad_type = pb.GrpcVM(id="x", hypervisor="vmware", config=json.dumps(cfg).encode())
    with pytest.raises(FactoryError, match="unusable"):
        await vm_from_message(bad_type)
    bad_cfg = pb.GrpcVM(id="x", hypervisor="mock", config=b"{")
    with pytest.raises(FactoryError, match="unusable"):
        await vm_from_message(bad_cfg)
    gone = pb.GrpcVM(
        id="x", hypervisor="mock", config=json.dumps(cfg).encode(), data=b'{"id": "ghost"}'
    )
    with pytest.raises(FactoryError, match="cannot take over VM x"):
        await vm_from_message(gone)


async def test_rpc_status_codes_map_to_errors() -> None:
    from virtcontainers.factory.rpc.client import rpc_error

    class E(grpc.aio.AioRpcError):
        def __init__(self, code: grpc.StatusCode) -> None:
            super().__init__(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details="d")

    assert isinstance(rpc_error(E(grpc.StatusCode.UNAVAILABLE), "s", "c"), CacheUnavailableError)
    assert "timed out" in str(rpc_error(E(grpc.StatusCode.DEADLINE_EXCEEDED), "s", "c"))
    other = rpc_error(E(grpc.StatusCode.RESOURCE_EXHAUSTED), "s", "GetBaseVM")
    assert type(other) is FactoryError and "GetBaseVM failed: d" in str(other)


async def test_the_reaper_frees_a_handed_out_vmms_memory_after_its_exit() -> None:
    """A handed-out VMM's memfds (a clone's copy of its template's memory) are held by the
    server's reaper while it runs and closed once it has exited: the pages are freed in the
    server, not in the dying VMM whose end a shim waits for."""
    import contextlib
    import signal
    import subprocess
    import sys

    from virtcontainers.factory.rpc.server import ChildReaper

    code = (
        "import os, sys, time; fd = os.memfd_create('vc-reaped'); os.write(fd, b'x' * 4096); "
        "print(flush=True); time.sleep(60)"
    )
    vmm = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)

    def ours() -> list[str]:
        links = []
        for n in os.listdir("/proc/self/fd"):
            with contextlib.suppress(FileNotFoundError):  # the listing's own fd
                links.append(os.readlink(f"/proc/self/fd/{n}"))
        return [link for link in links if link.startswith("/memfd:vc-reaped")]

    reaper = ChildReaper()
    try:
        assert vmm.stdout is not None and vmm.stdout.readline() == b"\n"  # made its memfd
        reaper.watch(vmm.pid)
        assert reaper.held(vmm.pid) == 1 and len(ours()) == 1
        vmm.send_signal(signal.SIGKILL)
        for _ in range(500):
            if not ours():
                break
            await asyncio.sleep(0.01)
        assert (reaper.held(vmm.pid), ours()) == (0, [])
        assert not os.path.exists(f"/proc/{vmm.pid}")  # reaped by the reaper, no zombie left
    finally:
        reaper.close()
        vmm.kill()
        vmm.wait()
