"""Everything the task service asks of the VM, in one interface (`PodVM`), and its
implementation on `Sandbox` and its `Container` (the bundle's root shared over virtio-fs, the
container made by vc-run in the guest).

Processes run through the agent's buffered exec (`Container.run`, `Container.exec`): their
output reaches containerd when they end.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal as signals
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from ..containers import Container

log = logging.getLogger(__name__)

STARTED_POLLS = 200
STARTED_POLL_INTERVAL = 0.05
POD_ROOT_PORTS = 4
"""PCIe root ports a CRI pod's VM gets (unless its configuration sets some): one for the root
of each container hot-added beside the sandbox's."""


class VMError(Exception):
    """The VM could not do what the task asked; the message says what and why."""


@dataclass
class Exit:
    status: int


@dataclass
class ProcessSpec:
    """The OCI process of a container or exec: what runs, as whom, where."""

    args: list[str]
    env: list[str]
    cwd: str = "/"
    terminal: bool = False

    @classmethod
    def from_oci(cls, process: dict[str, Any]) -> ProcessSpec:
        args = process.get("args") or []
        if not isinstance(args, list) or not args or not all(isinstance(a, str) for a in args):
            raise VMError("the OCI process has no args")
        return cls(
            args=list(args),
            env=[str(e) for e in process.get("env") or []],
            cwd=str(process.get("cwd") or "/"),
            terminal=bool(process.get("terminal")),
        )


Output = Callable[[bytes, bytes], Awaitable[None]]


class PodVM(Protocol):
    """The VM of one pod, as the task service uses it."""

    @property
    def pid(self) -> int:
        """The VMM's host pid (reported as the task's pid, as Kata does)."""
        ...

    async def start(self) -> None: ...

    async def add_container(self, container_id: str, bundle: str) -> None:
        """Make the container of `bundle` in the guest: the bundle the VM was made for, or
        another container of the same pod (its root shared into the running VM)."""
        ...

    async def signal(self, container_id: str, exec_id: str, sig: int) -> bool:
        """Send `sig` to a process; False when only ending it is possible (the caller then
        cancels its `run`)."""
        ...

    async def pids(self, container_id: str) -> list[int]:
        """Guest pids of the container's processes."""
        ...

    async def run(
        self,
        container_id: str,
        exec_id: str,
        process: ProcessSpec,
        stdin: bytes,
        output: Output,
        started: asyncio.Event,
    ) -> int:
        """Run a process to its end, setting `started` once it runs; its output goes to
        `output(stdout, stderr)`. Returns the exit status; cancelling it stops the process."""
        ...

    async def remove_container(self, container_id: str) -> None: ...

    async def pause(self) -> None: ...

    async def resume(self) -> None: ...

    async def stats(self) -> dict[str, int]:
        """Memory (bytes) and CPU (ns) use of the guest: memory_usage, memory_limit,
        cpu_total, cpu_user, cpu_kernel."""
        ...

    async def resize(self, vcpus: int | None, memory_mb: int | None) -> None: ...

    async def stop(self) -> None: ...


def _spec(bundle: str) -> dict[str, Any]:
    """The bundle's OCI spec ({} when unreadable: the sandbox then reports what is wrong)."""
    try:
        with open(os.path.join(bundle, "config.json"), "rb") as f:
            spec = json.load(f)
    except (OSError, ValueError):
        return {}
    return spec if isinstance(spec, dict) else {}


def network_namespace(bundle: str) -> str:
    """The path of the network namespace the bundle's OCI spec joins ("" for none or a new
    one: the container then has no network but its loopback)."""
    try:
        namespaces = _spec(bundle).get("linux", {}).get("namespaces") or []
    except AttributeError:
        return ""
    for ns in namespaces:
        if isinstance(ns, dict) and ns.get("type") == "network":
            return str(ns.get("path") or "")
    return ""


def pod_sandbox(bundle: str) -> bool:
    """Whether the bundle is a CRI pod's sandbox container (its pod's containers follow)."""
    from .main import CONTAINER_TYPE

    annotations = _spec(bundle).get("annotations")
    return isinstance(annotations, dict) and annotations.get(CONTAINER_TYPE) == "sandbox"


def guest_bundle(bundle: str) -> str:
    """A copy of the bundle's spec for the guest (<bundle>/virtc/config.json): no network
    namespace of its own, none joined by path (a pod's namespaces on the host: in the VM,
    which is the pod, the guest's own), the root filesystem at its absolute path.
    containerd removes it with the bundle."""
    with open(os.path.join(bundle, "config.json"), "rb") as f:
        spec = json.load(f)
    linux = spec.setdefault("linux", {})
    linux["namespaces"] = [
        ns
        for ns in linux.get("namespaces") or []
        if ns.get("type") != "network" and not ns.get("path")
    ]
    root = spec.setdefault("root", {})
    root["path"] = os.path.join(bundle, root.get("path") or "rootfs")
    out = os.path.join(bundle, "virtc")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(spec, f)
    return out


class SandboxVM:
    """PodVM on a `Sandbox` (QEMU by default) made for one OCI bundle."""

    def __init__(
        self, sandbox_id: str, bundle: str, hypervisor: str = "qemu", **overrides: Any
    ) -> None:
        from ..sandbox import Sandbox

        config = overrides.get("config")
        if config is None or not config.shared_fs:
            overrides.setdefault("shared_fs", "virtio-fs")
        self.bundle = bundle
        if pod_sandbox(bundle) and (
            config is None
            or (not config.pcie_root_port and config.hypervisor_machine_type in ("", "q35"))
        ):
            overrides.setdefault("pcie_root_port", POD_ROOT_PORTS)
        netns = network_namespace(bundle)
        if netns:
            # The pod's network namespace (CNI set it up): its interfaces move to the VM, and
            # the container uses the guest's network (the VM is the pod).
            overrides.setdefault("network", f"ns:{netns}")
            bundle = guest_bundle(bundle)
        self.sandbox = Sandbox(sandbox_id, hypervisor, bundle=bundle, **overrides)
        self.containers: dict[str, Container] = {}

    @property
    def pid(self) -> int:
        try:
            pids = self.sandbox.hypervisor.get_pids()
        except Exception:
            return 0
        return pids[0] if pids else 0

    async def start(self) -> None:
        await self.sandbox.start()

    async def add_container(self, container_id: str, bundle: str) -> None:
        if bundle == self.bundle:
            container = await self.sandbox.create_container(id=container_id)
        else:
            own = guest_bundle(bundle)
            container = await self.sandbox.create_container(id=container_id, bundle=own)
        await container.setup()
        self.containers[container_id] = container

    def _container(self, container_id: str) -> Container:
        try:
            return self.containers[container_id]
        except KeyError:
            raise VMError(f"container {container_id} is not in sandbox {self.sandbox.id}") from None

    async def run(
        self,
        container_id: str,
        exec_id: str,
        process: ProcessSpec,
        stdin: bytes,
        output: Output,
        started: asyncio.Event,
    ) -> int:
        c = self._container(container_id)
        if exec_id:
            env = process.env or None
            running = asyncio.ensure_future(
                c.exec(process.args, env=env, cwd=process.cwd, stdin=stdin)
            )
            started.set()
        else:
            running = asyncio.ensure_future(c.run(stdin=stdin))
            await self._until_running(c, running)
            started.set()
        result = await running
        await output(result.stdout, result.stderr)
        return signal_exit_status(result.signal) if result.signal else result.exit_code

    @staticmethod
    async def _until_running(c: Container, running: asyncio.Future[Any]) -> None:
        """Until the container's first process has its pid (it can be joined and signalled),
        or has ended already."""
        from ..errors import StateError

        for _ in range(STARTED_POLLS):
            if running.done():
                return
            try:
                await c.pids()
                return
            except StateError:
                await asyncio.sleep(STARTED_POLL_INTERVAL)

    async def signal(self, container_id: str, exec_id: str, sig: int) -> bool:
        if exec_id:
            return False
        await self._container(container_id).kill(sig)
        return True

    async def pids(self, container_id: str) -> list[int]:
        return await self._container(container_id).pids()

    async def remove_container(self, container_id: str) -> None:
        from ..errors import VCError

        c = self.containers.pop(container_id, None)
        if c is not None:
            try:
                await c.delete()
            except VCError as e:  # a dead VM has nothing left to clean
                log.warning("removing container %s from the VM: %s", container_id, e)

    async def pause(self) -> None:
        await self.sandbox.pause()

    async def resume(self) -> None:
        await self.sandbox.resume()

    async def stats(self) -> dict[str, int]:
        result = await self.sandbox.exec(["cat", "/proc/meminfo", "/proc/stat"], timeout=30)
        info: dict[str, int] = {}
        for line in result.stdout.decode(errors="replace").splitlines():
            key, _, rest = line.partition(":")
            fields = rest.split()
            if key in ("MemTotal", "MemAvailable") and fields:
                info[key] = int(fields[0]) * 1024
            elif line.startswith("cpu "):
                ticks = [int(x) for x in line.split()[1:]]
                hz = os.sysconf("SC_CLK_TCK")
                user, kernel = ticks[0] + ticks[1], ticks[2]
                info["cpu_user"] = user * 1_000_000_000 // hz
                info["cpu_kernel"] = kernel * 1_000_000_000 // hz
                info["cpu_total"] = info["cpu_user"] + info["cpu_kernel"]
        total = info.pop("MemTotal", 0)
        info["memory_limit"] = total
        info["memory_usage"] = total - info.pop("MemAvailable", total)
        return info

    async def resize(self, vcpus: int | None, memory_mb: int | None) -> None:
        await self.sandbox.resize(vcpus=vcpus, memory_mb=memory_mb)

    async def stop(self) -> None:
        await self.sandbox.stop()


def signal_exit_status(sig: int) -> int:
    """The exit status of a process ended by `sig` (as a shell reports it)."""
    return 128 + sig


SIGKILL = int(signals.SIGKILL)
