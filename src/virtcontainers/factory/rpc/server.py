"""The VM cache server: a `VMCache` served over gRPC (grpc.aio) on a Unix socket.

A VM handed out by `GetBaseVM` stays listed as ours until the call has completed: if the
client went away before that (the call was cancelled), the VM is stopped, never leaked.
A request that names the config it wants is checked before a VM is taken (the client then
needs no `Config` call first). A pooled VM waits paused; `GetBaseVM` resumes it before
answering, so that the guest wakes while the answer travels and the client attaches to it.
Handed-out VMs are still our child processes; a reaper collects them when they exit, and
frees their guest memory then (`ChildReaper`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from typing import Any

import grpc

from ...errors import VCError
from ...hypervisor import VMState
from ..base import FactoryStatus
from ..cache import DEFAULT_GET_TIMEOUT, VMCache
from ..errors import FactoryError
from ..vm import VM
from ..vmconfig import BaseCheck
from . import cache_pb2 as pb
from . import cache_pb2_grpc
from .client import channel_target

log = logging.getLogger(__name__)


async def vm_to_message(vm: VM) -> pb.GrpcVM:
    """Everything another process needs to take `vm` over."""
    hv = vm.hypervisor
    return pb.GrpcVM(
        id=vm.id,
        hypervisor=str(hv.hypervisor_type),
        data=await hv.to_grpc(),
        config=json.dumps(hv.hypervisor_config().to_dict()).encode(),
        agent_socket=vm.agent_endpoint.path,
        agent_vsock_port=vm.agent_endpoint.port,
        cpu=vm.cpu,
        memory_mb=vm.memory_mb,
        created_at=vm.created_at,
        origin=vm.origin,
        share_dir=vm.share_dir,
    )


def status_to_message(st: FactoryStatus) -> pb.GrpcStatus:
    return pb.GrpcStatus(
        pid=st.pid,
        vms=[
            pb.GrpcVMStatus(
                id=v.id,
                pid=v.pid,
                cpu=v.cpu,
                memory_mb=v.memory_mb,
                state=v.state,
                created_at=v.created_at,
            )
            for v in st.vms
        ],
        size=st.size,
        booting=st.booting,
        handed_out=st.handed_out,
        waiting=st.waiting,
        base=st.base,
        last_error=st.last_error,
    )


class ChildReaper:
    """Collects handed-out VMM processes (still our children) when they exit.

    It also holds the memfds a handed-out VMM has open (a clone's copy of its template's
    memory, 100+ MiB of pages) until that VMM exits, then closes them in a thread: the kernel
    frees those pages here, after the VMM's end, instead of in the dying VMM, whose end its
    owner waits for (the shim's Delete: freeing them was most of a killed VMM's exit).
    """

    def __init__(self) -> None:
        self._fds: dict[int, tuple[int, list[int]]] = {}

    def watch(self, pid: int) -> None:
        if pid <= 0 or pid in self._fds:
            return
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            return
        self._fds[pid] = (fd, memfds_of(pid))
        asyncio.get_running_loop().add_reader(fd, self._reap, pid)

    def _reap(self, pid: int) -> None:
        fd, memory = self._fds.pop(pid, (-1, []))
        if fd < 0:
            return
        loop = asyncio.get_running_loop()
        loop.remove_reader(fd)
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitid(os.P_PIDFD, fd, os.WEXITED | os.WNOHANG)
        os.close(fd)
        if memory:
            loop.run_in_executor(None, _close_all, memory)

    def held(self, pid: int) -> int:
        """How many memfds of VMM `pid` are held (0 once it has exited)."""
        return len(self._fds.get(pid, (-1, []))[1])

    def close(self) -> None:
        """Stop watching (processes still running are left to run; init adopts them)."""
        loop = asyncio.get_running_loop()
        for fd, memory in self._fds.values():
            loop.remove_reader(fd)
            os.close(fd)
            _close_all(memory)
        self._fds.clear()


def memfds_of(pid: int) -> list[int]:
    """New fds of this process on the memfds process `pid` has open (none if it is gone)."""
    held: list[int] = []
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return held
    for name in names:
        path = f"/proc/{pid}/fd/{name}"
        with contextlib.suppress(OSError):
            if os.readlink(path).startswith("/memfd:"):
                held.append(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
    return held


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


class CacheServicer:
    """The `CacheService` methods (registered by name on the gRPC server)."""

    def __init__(self, cache: VMCache, server: CacheServer) -> None:
        self.cache = cache
        self.server = server
        self.check = BaseCheck(cache.config())

    async def Config(self, request: pb.Empty, context: Any) -> pb.GrpcVMConfig:
        cfg = self.cache.config()
        return pb.GrpcVMConfig(
            hypervisor=str(cfg.hypervisor), config=json.dumps(cfg.config.to_dict()).encode()
        )

    async def GetBaseVM(self, request: pb.GetBaseVMRequest, context: Any) -> pb.GrpcVM:
        if request.HasField("want"):
            try:
                reason = self.check.why_not(request.want.hypervisor, request.want.config)
            except VCError as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"GetBaseVM's want: {exc}")
                raise
            if reason:
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, reason)
        timeout = request.timeout_ms / 1000 if request.timeout_ms else DEFAULT_GET_TIMEOUT
        remaining = context.time_remaining()
        if remaining is not None:
            timeout = max(0.001, min(timeout, remaining))
        try:
            vm = await self.cache.take(timeout)
        except FactoryError as exc:
            code = (
                grpc.StatusCode.UNAVAILABLE
                if self.server.quitting
                else grpc.StatusCode.RESOURCE_EXHAUSTED
            )
            await context.abort(code, str(exc))
            raise  # abort raises; this keeps type checkers informed
        try:
            if vm.state is VMState.PAUSED:
                # The guest wakes while the answer travels and the client attaches to it.
                await vm.resume()
            msg = await vm_to_message(vm)
        except BaseException as exc:
            await self.cache.discard(vm)
            if isinstance(exc, VCError):
                await context.abort(grpc.StatusCode.INTERNAL, f"VM {vm.id}: {exc}")
            raise
        self.server.settle_later(vm, context)
        return msg

    async def Status(self, request: pb.Empty, context: Any) -> pb.GrpcStatus:
        return status_to_message(await self.cache.status())

    async def Quit(self, request: pb.Empty, context: Any) -> pb.Empty:
        self.server.request_quit()
        return pb.Empty()


class CacheServer:
    """Serve `cache` on `socket_path` until `request_quit()` (or `stop()`)."""

    def __init__(self, cache: VMCache, socket_path: str) -> None:
        self.cache = cache
        self.socket_path = socket_path
        self.reaper = ChildReaper()
        self.quitting = False
        self._quit = asyncio.Event()
        self._server: grpc.aio.Server | None = None
        self._settling: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Bind the socket (replacing a stale one) and start serving."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
        server = grpc.aio.server()
        cache_pb2_grpc.add_CacheServiceServicer_to_server(  # type: ignore[no-untyped-call]
            CacheServicer(self.cache, self), server
        )
        if server.add_insecure_port(channel_target(self.socket_path)) == 0:
            raise FactoryError(f"VM cache server: cannot listen on {self.socket_path}")
        await server.start()
        os.chmod(self.socket_path, 0o600)
        self._server = server

    def request_quit(self) -> None:
        self.quitting = True
        self._quit.set()

    async def wait_quit(self) -> None:
        await self._quit.wait()

    def settle_later(self, vm: VM, context: Any) -> None:
        """When the call ends: hand the VM off, or stop it if the client went away."""
        loop = asyncio.get_running_loop()

        def done(ctx: Any) -> None:
            cancelled = bool(ctx.cancelled())
            loop.call_soon_threadsafe(self._settle, vm, cancelled)

        context.add_done_callback(done)

    def _settle(self, vm: VM, cancelled: bool) -> None:
        task = asyncio.get_running_loop().create_task(self._finish(vm, cancelled))
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    async def _finish(self, vm: VM, cancelled: bool) -> None:
        if cancelled:
            log.warning("VM cache: the client of VM %s went away; stopping the VM", vm.id)
            await self.cache.discard(vm)
            return
        pid = vm.pid()
        try:
            await vm.release()
        except VCError as exc:
            log.warning("VM cache: releasing VM %s: %s", vm.id, exc)
        self.cache.handed_off(vm)
        self.reaper.watch(pid)

    async def stop(self, grace: float = 2.0) -> None:
        """Stop serving (in-flight calls get `grace` seconds), settle hand-outs, unbind."""
        self.request_quit()
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        for _ in range(100):
            if not self._settling:
                break
            await asyncio.gather(*list(self._settling), return_exceptions=True)
        self.reaper.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
