"""Client of the VM cache server: `RemoteCache` is a `FactoryBase` whose VMs come over gRPC.

`GetBaseVM` returns the VM's `to_grpc()` bytes; `vm_from_message` rebuilds a working
`Hypervisor` with `from_grpc()`, which can pause, hotplug and stop it like any other.
"""

from __future__ import annotations

import json
import os
from typing import Any

import grpc

from ...agent.endpoint import AgentEndpoint
from ...config import HypervisorConfig
from ...errors import VCError
from ...hypervisor import new_hypervisor
from ...types import HypervisorType
from .. import paths
from ..base import FactoryBase, FactoryStatus, VMStatus
from ..errors import CacheMismatchError, CacheUnavailableError, FactoryError
from ..vm import VM, stop_quietly
from ..vmconfig import VMConfig
from . import cache_pb2 as pb
from . import cache_pb2_grpc

DEFAULT_GET_TIMEOUT = 60.0
RPC_MARGIN = 5.0
"""Extra client-side wait beyond the server-side wait for a VM."""


def channel_target(socket_path: str) -> str:
    return f"unix:{socket_path}"


def rpc_error(exc: grpc.aio.AioRpcError, where: str, call: str) -> FactoryError:
    """A `FactoryError` (or `CacheUnavailableError`) for a failed call."""
    code = exc.code()
    details = exc.details() or code.name
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
        return CacheUnavailableError(
            f"VM cache server at {where} is not available ({call}: {details}); "
            "is it running? (virtc factory status)"
        )
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return CacheMismatchError(f"VM cache server at {where}: {details}")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return FactoryError(f"VM cache server at {where}: {call} timed out")
    return FactoryError(f"VM cache server at {where}: {call} failed: {details}")


async def vm_from_message(msg: pb.GrpcVM, run_root: str | None = None) -> VM:
    """Take over the VM a `GrpcVM` describes (it is ours now: stopped if that fails)."""
    try:
        cfg = HypervisorConfig.from_dict(json.loads(msg.config))
        hv = new_hypervisor(HypervisorType.parse(msg.hypervisor), run_root)
    except (VCError, ValueError) as exc:
        raise FactoryError(f"VM {msg.id} from the cache is unusable: {exc}") from exc
    try:
        await hv.from_grpc(cfg, msg.data)
    except BaseException as exc:
        await stop_quietly(None, hv)
        if isinstance(exc, VCError):
            raise FactoryError(f"cannot take over VM {msg.id} from the cache: {exc}") from exc
        raise
    vm = VM(
        hv,
        AgentEndpoint.hybrid(msg.agent_socket, msg.agent_vsock_port)
        if msg.agent_vsock_port
        else AgentEndpoint.unix(msg.agent_socket),
        cpu=msg.cpu,
        memory_mb=msg.memory_mb,
        created_at=msg.created_at,
        origin=f"cache:{msg.origin}",
    )
    vm.share_dir = msg.share_dir
    return vm


def status_from_message(msg: pb.GrpcStatus) -> FactoryStatus:
    return FactoryStatus(
        base=msg.base,
        pid=msg.pid,
        size=msg.size,
        vms=[VMStatus(v.id, v.pid, v.cpu, v.memory_mb, v.state, v.created_at) for v in msg.vms],
        booting=msg.booting,
        handed_out=msg.handed_out,
        waiting=msg.waiting,
        last_error=msg.last_error,
    )


class RemoteCache(FactoryBase):
    """The VM cache server at a Unix socket, as a factory base."""

    def __init__(
        self,
        socket_path: str,
        channel: grpc.aio.Channel,
        config: VMConfig,
        run_root: str | None,
        *,
        checked: bool = False,
    ) -> None:
        self.socket_path = socket_path
        self.run_root = run_root
        self._channel = channel
        self._stub: Any = cache_pb2_grpc.CacheServiceStub(channel)  # type: ignore[no-untyped-call]
        self._config = config
        self._checked = checked

    @classmethod
    async def connect(
        cls,
        socket_path: str | None = None,
        *,
        run_root: str | None = None,
        timeout: float = 5.0,
        want: VMConfig | None = None,
    ) -> RemoteCache:
        """Connect and read the server's base config; `CacheUnavailableError` if it is not up.

        With `want` (the config the caller will ask for) nothing is read now: each GetBaseVM
        sends `want`, which the server checks before it takes a VM (one round trip less), and
        `config()` is `want`, with the sizes of the server's VMs once one has come.
        """
        path = socket_path or paths.socket_path(run_root)
        if not os.path.exists(path):
            raise CacheUnavailableError(
                f"no VM cache server at {path} (start one with `virtc factory init`)"
            )
        channel = grpc.aio.insecure_channel(channel_target(path))
        if want is not None:
            return cls(path, channel, want.copy(), run_root, checked=True)
        try:
            stub: Any = cache_pb2_grpc.CacheServiceStub(channel)  # type: ignore[no-untyped-call]
            msg = await stub.Config(pb.Empty(), timeout=timeout, wait_for_ready=False)
            config = VMConfig(
                HypervisorType.parse(msg.hypervisor),
                HypervisorConfig.from_dict(json.loads(msg.config)),
            )
        except grpc.aio.AioRpcError as exc:
            await channel.close()
            raise rpc_error(exc, path, "Config") from None
        except (VCError, ValueError) as exc:
            await channel.close()
            raise FactoryError(f"VM cache server at {path} sent a bad config: {exc}") from exc
        except BaseException:
            await channel.close()
            raise
        return cls(path, channel, config, run_root)

    @property
    def name(self) -> str:
        return f"cache server {self.socket_path}"

    def config(self) -> VMConfig:
        return self._config.copy()

    async def get_base_vm(
        self, *, id: str | None = None, timeout: float = DEFAULT_GET_TIMEOUT
    ) -> VM:
        """A VM from the server's pool (`id` is ignored: pooled VMs are already named);
        `CacheMismatchError` if the server refused the config connected with (`want`)."""
        req = pb.GetBaseVMRequest(timeout_ms=max(1, int(timeout * 1000)))
        if self._checked:
            req.want.hypervisor = str(self._config.hypervisor)
            req.want.config = json.dumps(self._config.config.to_dict()).encode()
        try:
            msg = await self._stub.GetBaseVM(req, timeout=timeout + RPC_MARGIN)
        except grpc.aio.AioRpcError as exc:
            raise rpc_error(exc, self.socket_path, "GetBaseVM") from None
        vm = await vm_from_message(msg, self.run_root)
        if self._checked:  # the server's VMs are `want` in all but their size: now known
            self._config.config.num_vcpus = vm.cpu
            self._config.config.memory_size = vm.memory_mb
        return vm

    async def status(self, timeout: float = 5.0) -> FactoryStatus:
        try:
            msg = await self._stub.Status(pb.Empty(), timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise rpc_error(exc, self.socket_path, "Status") from None
        return status_from_message(msg)

    async def quit(self, timeout: float = 30.0) -> None:
        """Ask the server to stop its pooled VMs and exit."""
        try:
            await self._stub.Quit(pb.Empty(), timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise rpc_error(exc, self.socket_path, "Quit") from None

    async def close(self) -> None:
        await self._channel.close()
