"""A VM made by the factory: its hypervisor, its agent endpoint, and what a hand-out does to it.

`boot_vm` is the plain ("direct") way to make one: create, plug the agent channel, start,
wait for the agent. Templates and the VM cache produce the same `VM` type.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from types import TracebackType

from ..agent import AgentClient
from ..agent.endpoint import AgentEndpoint, plug_agent_channel
from ..agent.waiting import wait_watched
from ..errors import AgentError, ConfigError, VCError, VMTimeoutError
from ..hypervisor import Hypervisor, VMState, new_hypervisor
from ..types import Capabilities
from .vmconfig import VMConfig

log = logging.getLogger(__name__)

DEFAULT_BOOT_TIMEOUT = 60.0
MEMORY_BLOCK_MIB = 128
ONLINE_POLL = 0.05
AGENT_CHECK_INTERVAL = 1.0
AGENT_SETTLE = 0.3
"""Time the guest agent gets to notice the host hung up before the VM is frozen: the agent
rechecks a disconnected port every 200 ms and discards what it reads while handling the
hang-up, so a new host that connects before that would lose its first frames."""


def new_vm_id(prefix: str = "fvm") -> str:
    """A fresh VM id (also the name of its directory under the run root)."""
    return f"{prefix}-{secrets.token_hex(6)}"


class VM:
    """A running (or paused) VM with a guest agent, as the factory hands it out.

    Stop it with `await vm.stop()` (or use it as an async context manager).
    """

    def __init__(
        self,
        hypervisor: Hypervisor,
        agent: AgentEndpoint,
        *,
        cpu: int,
        memory_mb: int,
        created_at: float | None = None,
        origin: str = "direct",
    ) -> None:
        self.hypervisor = hypervisor
        self.agent_endpoint = agent
        self.cpu = cpu
        self.memory_mb = memory_mb
        self.created_at = time.time() if created_at is None else created_at
        self.origin = origin
        """How the VM was made: "direct", "template:<name>" or "cache" (+ its base)."""
        self.share_dir = ""
        """The host staging area of its staged share (see `stage_share`), if it has one."""
        self._agent: AgentClient | None = None

    @property
    def id(self) -> str:
        return self.hypervisor.id

    @property
    def state(self) -> VMState:
        return self.hypervisor.state

    def pid(self) -> int:
        """The VMM's pid (0 if unknown)."""
        pids = self.hypervisor.get_pids()
        return pids[0] if pids else 0

    def __repr__(self) -> str:
        return (
            f"<VM {self.id} {self.state.value} {self.cpu} vCPU {self.memory_mb} MiB {self.origin}>"
        )

    # -- agent ------------------------------------------------------------------------------
    async def agent(self, timeout: float = 10.0, *, booting: bool = False) -> AgentClient:
        """The connected agent client (connecting on first use; `booting` as in
        `AgentClient.connect`)."""
        if self._agent is None or self._agent.closed:
            self._agent = await AgentClient.connect(
                self.agent_endpoint.target(), timeout, booting=booting
            )
        return self._agent

    async def wait_agent(
        self, timeout: float, *, booting: bool = False, fresh_identity: bool = False
    ) -> None:
        """Connect to the agent and ping it: the VM is ready for work. `booting`: the VM was
        just launched, its first connection is kept (no reconnects that answer it late).
        `fresh_identity`: also give the guest RNG new entropy and set its clock to the
        host's (clones of one template start from the same pool; a template or pooled VM was
        frozen a while), sent with the ping, so the agent answers all three in one round trip.

        While waiting, the VM's health is checked every `AGENT_CHECK_INTERVAL`, so a VMM that
        died (e.g. of SIGBUS on a full memory filesystem) fails this at once.
        """
        await wait_watched(
            self._agent_ping(timeout, booting, fresh_identity),
            self.hypervisor.check,
            AGENT_CHECK_INTERVAL,
        )

    async def _agent_ping(self, timeout: float, booting: bool, fresh_identity: bool) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        agent = await self.agent(timeout, booting=booting)
        ping = agent.ping(timeout=max(0.001, deadline - loop.time()))
        if fresh_identity:
            await asyncio.gather(ping, agent.add_entropy(), agent.set_time())
        else:
            await ping

    async def close_agent(self) -> None:
        agent, self._agent = self._agent, None
        if agent is not None:
            try:
                await agent.close()
            except VCError as exc:
                log.debug("closing the agent of VM %s: %s", self.id, exc)

    async def quiesce(self) -> None:
        """Hang up on the agent, let the guest notice, then pause: ready to be handed out."""
        await self.close_agent()
        await asyncio.sleep(AGENT_SETTLE)
        await self.pause()

    # -- fresh identity after a hand-out ----------------------------------------------------
    # -- lifecycle --------------------------------------------------------------------------
    async def pause(self) -> None:
        await self.hypervisor.pause_sandbox()

    async def resume(self) -> None:
        await self.hypervisor.resume_sandbox()

    async def add_cpus(self, count: int) -> None:
        """Hot-add `count` vCPUs (the guest brings them online with `online()`)."""
        if count <= 0:
            return
        self.hypervisor.require(Capabilities.CPU_HOTPLUG, "vCPU hotplug")
        _, new = await self.hypervisor.resize_vcpus(self.cpu + count)
        self.cpu = new

    async def add_memory(self, size_mb: int) -> None:
        """Hot-add at least `size_mb` MiB of memory (rounded up to the memory block size)."""
        if size_mb <= 0:
            return
        self.hypervisor.require(Capabilities.MEMORY_HOTPLUG, "memory hotplug")
        new, _ = await self.hypervisor.resize_memory(
            self.memory_mb + size_mb, MEMORY_BLOCK_MIB, False
        )
        self.memory_mb = new

    async def online(self) -> None:
        """Ask the guest to online hot-added CPUs and memory (once; see `wait_online`)."""
        await (await self.agent()).online()

    async def guest_resources(self) -> tuple[int, int]:
        """(online CPUs, MemTotal in KiB) as the guest sees them."""
        res = await (await self.agent()).exec(
            ["/bin/sh", "-c", "grep -c ^processor /proc/cpuinfo; grep ^MemTotal: /proc/meminfo"]
        )
        try:
            cpus, mem = res.stdout.decode().splitlines()[:2]
            return int(cpus), int(mem.split()[1])
        except (ValueError, IndexError):
            raise AgentError(
                f"VM {self.id}: cannot read the guest's CPUs and memory: {res.stdout[:200]!r} "
                f"{res.stderr[:200]!r}"
            ) from None

    async def wait_online(self, cpus: int, mem_kib: int, timeout: float) -> None:
        """Online hot-added CPUs and memory until the guest has `cpus` CPUs and at least
        `mem_kib` KiB (the guest sees hotplugged devices a moment after QEMU adds them)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        seen = (0, 0)
        while True:
            await self.online()
            seen = await self.guest_resources()
            if seen[0] >= cpus and seen[1] >= mem_kib:
                return
            if loop.time() >= deadline:
                raise VMTimeoutError(
                    f"VM {self.id}: the guest has {seen[0]} CPUs and {seen[1] >> 10} MiB online "
                    f"after {timeout:g}s, expected {cpus} CPUs and {mem_kib >> 10} MiB"
                )
            await asyncio.sleep(ONLINE_POLL)

    async def stage_share(self, run_root: str | None) -> None:
        """Attach the staged shares (see `poolshare`) that will carry a container's root and
        its volumes, and mount them in the guest: the hotplugs are paid before hand-out."""
        from . import poolshare

        directory = poolshare.share_dir(run_root, self.id)
        shares = await asyncio.to_thread(poolshare.prepare, directory)
        self.share_dir = directory  # released by `stop` from here on
        for share in shares:
            await self.hypervisor.hotplug_add_device(share)
        res = await (await self.agent()).exec(["/bin/sh", "-c", poolshare.guest_script()])
        if res.exit_code != 0:
            raise AgentError(
                f"VM {self.id}: the guest cannot mount its staged shares or start a container: "
                f"{res.stderr.decode(errors='replace').strip()}"
            )

    async def release(self) -> None:
        """Let go of a VM that another process takes over: drop connections, keep it running."""
        await self.close_agent()
        await self.hypervisor.disconnect()
        await self.hypervisor.cleanup()

    async def stop(self) -> None:
        """Stop the VM and remove everything it left on the host. Idempotent."""
        await self.close_agent()
        try:
            await self.hypervisor.stop_sandbox()
        finally:
            await self.hypervisor.cleanup()
            if self.share_dir:
                from .poolshare import release_quietly

                await asyncio.to_thread(release_quietly, self.share_dir)

    async def __aenter__(self) -> VM:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


async def stop_quietly(vm: VM | None, hv: Hypervisor | None = None) -> None:
    """Stop a VM (or a bare hypervisor) during error handling, logging instead of raising."""
    try:
        if vm is not None:
            await vm.stop()
        elif hv is not None:
            try:
                await hv.stop_sandbox()
            finally:
                await hv.cleanup()
    except Exception as exc:
        log.warning("stopping VM %s after a failure: %s", vm.id if vm else hv and hv.id, exc)


async def boot_vm(
    vm_config: VMConfig,
    *,
    id: str | None = None,
    run_root: str | None = None,
    timeout: float = DEFAULT_BOOT_TIMEOUT,
    origin: str = "direct",
) -> VM:
    """Boot a VM from `vm_config` and wait for its agent; nothing is left behind on failure."""
    if timeout <= 0:
        raise ConfigError(f"boot timeout must be positive, got {timeout}")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    vm_id = id or new_vm_id()
    hv = new_hypervisor(vm_config.hypervisor, run_root)
    cfg = vm_config.config.copy()
    vm: VM | None = None
    try:
        await hv.create_sandbox(vm_id, None, cfg)
        endpoint = await plug_agent_channel(hv, vm_id)
        await hv.start_sandbox(timeout)
        vm = VM(hv, endpoint, cpu=cfg.num_vcpus, memory_mb=cfg.memory_size, origin=origin)
        await vm.wait_agent(max(0.1, deadline - loop.time()), booting=True)
    except BaseException:
        await stop_quietly(vm, hv)
        raise
    return vm
