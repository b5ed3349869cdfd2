"""Everything the task service asks of the VM, in one interface (`PodVM`), and its
implementation on `Sandbox` and its `Container` (the bundle's root shared over virtio-fs, the
container made by vc-run in the guest).

Processes are the agent's streamed ones (`Container.start`, `Container.start_exec`): output
arrives as it is written, stdin is written as it comes, a terminal can be resized.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shlex
import signal as signals
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from ..agent import ExitStatus
    from ..containers import Container
    from .config import FactoryConfig

log = logging.getLogger(__name__)

POD_ROOT_PORTS = 8
"""PCIe root ports a CRI pod's VM gets (unless its configuration sets some): one for the root
of each container hot-added beside the sandbox's."""
UNLIMITED = 2**64 - 1
"""A cgroup limit of "max", as containerd's cgroups package reports it."""
CGROUP_VALUES = (
    "memory.current",
    "memory.max",
    "memory.swap.current",
    "memory.swap.max",
    "pids.current",
    "pids.max",
)
CGROUP_KEYED = ("memory.stat", "memory.events", "cpu.stat")


class VMError(Exception):
    """The VM could not do what the task asked; the message says what and why."""


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


class GuestProcess(Protocol):
    """A process running in the VM (the agent's `Process`): output streams as it is written."""

    @property
    def stdout(self) -> AsyncIterator[bytes]: ...

    @property
    def stderr(self) -> AsyncIterator[bytes]: ...

    async def write_stdin(self, data: bytes) -> None: ...

    async def close_stdin(self) -> None: ...

    async def signal(self, sig: int) -> None: ...

    async def resize(self, rows: int, cols: int) -> None: ...

    async def wait(self) -> ExitStatus: ...


class PodVM(Protocol):
    """The VM of one pod, as the task service uses it."""

    @property
    def pid(self) -> int:
        """The VMM's host pid (reported as the task's pid, as Kata does)."""
        ...

    async def start(self) -> None: ...

    async def add_container(self, container_id: str, bundle: str) -> None:
        """Make the container of `bundle` in the guest: the bundle the VM was made for, or
        another container of the same pod (its root shared into the running VM; namespaces
        its spec names by a task's path joined: `joined_namespaces`)."""
        ...

    def task_pid(self, container_id: str) -> int:
        """The pid the container's task is known by: the VMM's for the VM's first container
        (and for any before its first process runs), the guest pid of its first process for
        the others: distinct, so that /proc/<pid>/ns/<type> names one container's namespace
        (CRI's TARGET pid mode names the target's so)."""
        ...

    async def start_process(
        self, container_id: str, exec_id: str, process: ProcessSpec, rows: int, cols: int
    ) -> GuestProcess:
        """Start the container's first process (no `exec_id`) or an exec in it, with a
        terminal of rows x cols when `process.terminal`; returns once it runs (it can be
        signalled and joined) or has ended, or, for the VM's first container (whose task
        pid is the VMM's), once it is started: its kill, exec and ps wait until it runs."""
        ...

    async def kill(self, container_id: str, sig: int) -> None:
        """Send `sig` to the container's first process."""
        ...

    async def pids(self, container_id: str) -> list[int]:
        """Guest pids of the container's processes."""
        ...

    def oom_kills(self, container_id: str) -> AsyncIterator[int]:
        """The container cgroup's oom_kill count each time it grows (until the container is
        removed)."""
        ...

    async def remove_container(self, container_id: str) -> None: ...

    async def pause(self) -> None: ...

    async def resume(self) -> None: ...

    async def stats(self, container_id: str) -> dict[str, int]:
        """The container's cgroup v2 counters: "memory.current", "pids.max", ..., and each line
        of memory.stat, memory.events and cpu.stat as "memory.stat.anon", ...; a limit of
        "max" is `UNLIMITED`."""
        ...

    async def update(self, container_id: str, files: dict[str, str]) -> None:
        """Write cgroup v2 limits (file name -> value) into the container's cgroup."""
        ...

    async def resize(self, vcpus: int | None, memory_mb: int | None) -> None: ...

    async def stop(self, *, force: bool = False) -> None:
        """Stop the VM and clean up its host side; `force`: kill it at once (nothing in it
        is wanted any more) rather than shut it down."""
        ...


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


SHAREABLE = ("pid", "ipc", "uts")
"""The namespaces of a container in the guest another can join (the network one is the
guest's for all: the VM is the pod)."""
TASK_NAMESPACE = re.compile(r"/proc/([0-9]+)/ns/([a-z]+)")
PROC_NS = {"network": "net", "mount": "mnt"}
"""OCI namespace types named otherwise under /proc/<pid>/ns."""


def joined_namespaces(bundle: str, tasks: Mapping[int, str]) -> dict[str, str]:
    """The namespaces the bundle's spec joins by path, as kind -> the id of the container
    whose namespace that is in the guest: a path /proc/<pid>/ns/<kind> where pid is a task's
    (`tasks`: task pid -> container id). CRI names a pod's namespaces so: the sandbox
    container's, or, in TARGET pid mode, the target container's pid namespace. A network
    namespace is the VM's (a task's path: the guest's, which all containers share; the first
    container's, any: the pod's on the host). Any other path is refused, naming it."""
    spec = _spec(bundle)
    linux = spec.get("linux")
    namespaces = linux.get("namespaces") if isinstance(linux, dict) else None
    joined: dict[str, str] = {}
    for ns in namespaces or []:
        path = ns.get("path") if isinstance(ns, dict) else None
        if not path:
            continue
        kind = str(ns.get("type"))
        if kind == "network" and not tasks:
            continue
        match = TASK_NAMESPACE.fullmatch(str(path))
        owner = tasks.get(int(match[1])) if match and match[2] == PROC_NS.get(kind, kind) else None
        if owner is None:
            raise VMError(
                f"{bundle}: the {kind} namespace {path} is none of this pod's containers' "
                "(a namespace is joined by the path /proc/<pid>/ns/<type> of one of its tasks)"
            )
        if kind == "network":
            continue
        if kind not in SHAREABLE:
            raise VMError(
                f"{bundle}: joining the {kind} namespace of container {owner} ({path}) is "
                f"not supported (only {', '.join(SHAREABLE)})"
            )
        joined[kind] = owner
    return joined


def guest_bundle(bundle: str) -> str:
    """A copy of the bundle's spec for the guest (<bundle>/virtc/config.json): no network
    namespace of its own, none joined by path (host paths: in the guest, another container's,
    `joined_namespaces`), the root filesystem at its absolute path. containerd removes it
    with the bundle."""
    with open(os.path.join(bundle, "config.json"), "rb") as f:
        spec = json.load(f)
    linux = spec.setdefault("linux", {})
    if linux.get("namespaces") is not None:  # none listed: the runtime's defaults
        linux["namespaces"] = [
            ns for ns in linux["namespaces"] if ns.get("type") != "network" and not ns.get("path")
        ]
    root = spec.setdefault("root", {})
    root["path"] = os.path.join(bundle, root.get("path") or "rootfs")
    out = os.path.join(bundle, "virtc")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(spec, f)
    return out


class SandboxVM:
    """PodVM on a `Sandbox` (QEMU by default) made for one OCI bundle; with `factory`, its VM
    comes from a template or the VM cache server (the bundle's root hot-added)."""

    def __init__(
        self,
        sandbox_id: str,
        bundle: str,
        hypervisor: str = "qemu",
        *,
        factory: FactoryConfig | None = None,
        **overrides: Any,
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
        self.factory = factory if factory is not None and factory.enabled else None
        joined_namespaces(bundle, {})  # the first container has none to join
        netns = network_namespace(bundle)
        if netns:
            # The pod's network namespace (CNI set it up): its interfaces are joined to the
            # VM (hot-added to one from the factory).
            overrides.setdefault("network", f"ns:{netns}")
        # The container uses the guest's network (the VM is the pod), as Kata's runtime has
        # its agent do; without a network the guest has its loopback only, as a namespace of
        # the container's own would, which costs its start 20-50 ms under TCG (6.6).
        bundle = guest_bundle(bundle)
        self.sandbox = Sandbox(sandbox_id, hypervisor, bundle=bundle, **overrides)
        self.containers: dict[str, Container] = {}
        self.first = ""
        """The id of the container of the VM's own bundle (its task pid is the VMM's)."""
        self.guest_pids: dict[str, int] = {}
        """Container id -> guest pid of the first process of the containers after the first."""
        self._unseen: dict[str, Container] = {}
        """Started containers whose first process may not have written its pid yet: the VM's
        first container's Start answers before that (`start_process`); what needs the pid
        waits for it (`_running`)."""
        self._seen: dict[str, asyncio.Task[None]] = {}

    @property
    def pid(self) -> int:
        try:
            pids = self.sandbox.hypervisor.get_pids()
        except Exception:
            return 0
        return pids[0] if pids else 0

    async def start(self) -> None:
        if self.factory is not None and await self._from_factory(self.factory):
            return
        await self.sandbox.start()

    async def _from_factory(self, factory: FactoryConfig) -> bool:
        """Take the VM from the factory; False (logged) when it cannot give one."""
        from ..errors import HypervisorError
        from ..factory import sandbox_from_factory
        from ..factory.errors import FactoryError, TemplateError
        from ..sandbox import build_config

        sb = self.sandbox
        cfg = build_config(sb.config_request, sb.overrides, sb.hypervisor_type)
        store, name = factory.template()
        try:
            self.sandbox = await sandbox_from_factory(
                cfg,
                template=name if factory.enable_template else None,
                templates=store,
                use_cache=factory.vm_cache_number > 0,
                cache_socket=factory.vm_cache_endpoint or None,
                run_root=sb.run_root,
                id=sb.id,
                timeout=sb.start_timeout,
                bundle=sb.bundle,
                network=sb.network_request,
            )
        except (TemplateError, FactoryError, HypervisorError) as e:
            # HypervisorError: the VM cannot take what is hot-added (e.g. more NICs than it
            # has free root ports); a booted VM gets them cold-plugged.
            log.warning("VM factory: %s; booting the VM instead", e)
            return False
        if self.sandbox.id != sb.id:  # a pooled VM has its own id: `delete` must find it
            from .main import SANDBOX_FILE

            path = os.path.join(self.bundle, SANDBOX_FILE)
            await asyncio.to_thread(Path(path).write_text, self.sandbox.id)
        return True

    async def add_container(self, container_id: str, bundle: str) -> None:
        if bundle == self.bundle:
            container = await self.sandbox.create_container(id=container_id)
            self.first = container_id
        else:
            tasks = {self.task_pid(cid): cid for cid in reversed(self.containers)}
            if self.first in self.containers:  # a guest pid equal to the VMM's: the first's
                tasks[self.pid] = self.first
            joined = joined_namespaces(bundle, tasks)
            await self._running(*joined.values())  # vc-run joins them by their pid files
            container = await self.sandbox.create_container(
                id=container_id, bundle=guest_bundle(bundle), share_with=joined or None
            )
        await container.setup()
        self.containers[container_id] = container

    def task_pid(self, container_id: str) -> int:
        return self.guest_pids.get(container_id) or self.pid

    def _container(self, container_id: str) -> Container:
        try:
            return self.containers[container_id]
        except KeyError:
            raise VMError(f"container {container_id} is not in sandbox {self.sandbox.id}") from None

    async def start_process(
        self, container_id: str, exec_id: str, process: ProcessSpec, rows: int, cols: int
    ) -> GuestProcess:
        c = self._container(container_id)
        tty = process.terminal
        if exec_id:
            await self._running(container_id)
            env = process.env or None
            return await c.start_exec(
                process.args, env=env, cwd=process.cwd, tty=tty, rows=rows, cols=cols
            )
        proc = await c.start(tty=tty, rows=rows, cols=cols)
        if container_id == self.first:
            # Its task pid is the VMM's: nothing to learn from the guest. Looking for its pid
            # file now would start a guest process beside the container's own start (one
            # vCPU under TCG); a kill, exec, ps or a later container that joins it waits.
            self._unseen[container_id] = c
            return proc
        await c.until_running()
        from ..errors import StateError

        with contextlib.suppress(StateError):  # ended already: it keeps the VMM's pid
            self.guest_pids[container_id] = await c.pid()
        return proc

    async def _running(self, *container_ids: str) -> None:
        """Until the first process of each of `container_ids` has written its pid (or ended)."""
        for cid in container_ids:
            c = self._unseen.pop(cid, None)
            if c is not None:
                self._seen[cid] = asyncio.get_running_loop().create_task(c.until_running())
            seen = self._seen.get(cid)
            if seen is not None:
                await asyncio.shield(seen)

    async def kill(self, container_id: str, sig: int) -> None:
        c = self._container(container_id)
        await self._running(container_id)
        await c.kill(sig)

    async def pids(self, container_id: str) -> list[int]:
        c = self._container(container_id)
        await self._running(container_id)
        return await c.pids()

    async def remove_container(self, container_id: str) -> None:
        from ..errors import VCError

        c = self.containers.pop(container_id, None)
        self.guest_pids.pop(container_id, None)
        self._unseen.pop(container_id, None)
        seen = self._seen.pop(container_id, None)
        if seen is not None:
            seen.cancel()
        if c is not None:
            try:
                await c.delete()
            except VCError as e:  # a dead VM has nothing left to clean
                log.warning("removing container %s from the VM: %s", container_id, e)

    async def pause(self) -> None:
        await self.sandbox.pause()

    async def resume(self) -> None:
        await self.sandbox.resume()

    async def oom_kills(self, container_id: str) -> AsyncIterator[int]:
        from ..containers.spec import RUNNER

        c = self._container(container_id)
        # vc-run sleeps on inotify until memory.events changes: no polling in the guest.
        proc = await self.sandbox.start_process([RUNNER, "--oom-events", c.cgroup])
        try:
            pending = b""
            async for chunk in proc.stdout:
                *lines, pending = (pending + chunk).split(b"\n")
                for line in lines:
                    if line.strip().isdigit():
                        yield int(line)
        finally:
            if not proc.done():
                with contextlib.suppress(Exception):
                    await proc.signal(SIGKILL)

    async def stats(self, container_id: str) -> dict[str, int]:
        c = self._container(container_id)
        script = (
            f"cd {c.cgroup} || exit 1; for f in {' '.join(CGROUP_VALUES)}; do "
            f"[ -f $f ] && echo $f $(cat $f); done; for f in {' '.join(CGROUP_KEYED)}; do "
            f'[ -f $f ] && sed "s/^/$f./" $f; done; true'
        )
        result = await self.sandbox.exec(["/bin/sh", "-c", script], timeout=30)
        if result.exit_code != 0:
            raise VMError(f"container {container_id} has no cgroup in the guest")
        values: dict[str, int] = {}
        for line in result.stdout.decode(errors="replace").splitlines():
            key, _, rest = line.partition(" ")
            value = rest.split()[0] if rest.split() else ""
            if value == "max":
                values[key] = UNLIMITED
            elif value.isdigit():
                values[key] = int(value)
        return values

    async def update(self, container_id: str, files: dict[str, str]) -> None:
        if not files:
            return
        c = self._container(container_id)
        q = shlex.quote
        script = " && ".join(f"echo {q(v)} > {q(f'{c.cgroup}/{k}')}" for k, v in files.items())
        result = await self.sandbox.exec(["/bin/sh", "-c", script], timeout=30)
        if result.exit_code != 0:
            raise VMError(
                f"container {container_id}: setting {', '.join(files)} of its cgroup: "
                f"{result.stderr.decode(errors='replace').strip()}"
            )

    async def resize(self, vcpus: int | None, memory_mb: int | None) -> None:
        # The VM grows to hold the container's limits; it never shrinks below its boot size
        # (Kata's hotplug adds, it does not take a booted VM's memory away).
        boot = self.sandbox.hypervisor.hypervisor_config()
        vcpus = vcpus if vcpus is not None and vcpus > boot.num_vcpus else None
        memory_mb = memory_mb if memory_mb is not None and memory_mb > boot.memory_size else None
        if vcpus is not None or memory_mb is not None:
            await self.sandbox.resize(vcpus=vcpus, memory_mb=memory_mb)

    async def stop(self, *, force: bool = False) -> None:
        for task in self._seen.values():
            task.cancel()
        self._seen.clear()
        self._unseen.clear()
        await self.sandbox.stop(force=force)


def signal_exit_status(sig: int) -> int:
    """The exit status of a process ended by `sig` (as a shell reports it)."""
    return 128 + sig


SIGKILL = int(signals.SIGKILL)
