"""Everything the task service asks of the VM, in one interface (`PodVM`), and its
implementation on `Sandbox`.

The sandbox runs each container's processes in the guest with the agent's exec, chrooted into
the container's root filesystem (copied into the guest as a tar) until shared directories and
the agent's streaming processes take over; output therefore reaches containerd when the process
ends, and a signal ends the process the way the signal would (exit status 128 + signal).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import shlex
import signal as signals
import tarfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

log = logging.getLogger(__name__)

#: Where containers' root filesystems are unpacked in the guest.
GUEST_ROOT = "/run/vc/containers"
#: Largest root filesystem that is copied into the guest (the agent's frame limit is 64 MiB).
MAX_ROOTFS_COPY = 48 << 20


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

    async def add_container(self, container_id: str, rootfs: str) -> None:
        """Make the root filesystem at host path `rootfs` the container's, in the guest."""
        ...

    async def run(
        self, container_id: str, exec_id: str, process: ProcessSpec, stdin: bytes, output: Output
    ) -> int:
        """Run a process to its end; its output goes to `output(stdout, stderr)`. Returns the
        exit status; cancelling it stops the process."""
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


def _tar_rootfs(rootfs: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name in sorted(os.listdir(rootfs)):
            tf.add(os.path.join(rootfs, name), arcname=name)
            if buf.tell() > MAX_ROOTFS_COPY:
                raise VMError(
                    f"root filesystem {rootfs} is larger than {MAX_ROOTFS_COPY >> 20} MiB: "
                    "too large to copy into the VM"
                )
    return buf.getvalue()


class SandboxVM:
    """PodVM on a `Sandbox` (QEMU by default)."""

    def __init__(self, sandbox_id: str, hypervisor: str = "qemu", **overrides: Any) -> None:
        from ..sandbox import Sandbox

        self.sandbox = Sandbox(sandbox_id, hypervisor, **overrides)

    @property
    def pid(self) -> int:
        try:
            pids = self.sandbox.hypervisor.get_pids()
        except Exception:
            return 0
        return pids[0] if pids else 0

    async def start(self) -> None:
        await self.sandbox.start()

    async def add_container(self, container_id: str, rootfs: str) -> None:
        data = await asyncio.to_thread(_tar_rootfs, rootfs)
        guest = f"{GUEST_ROOT}/{container_id}"
        archive = f"{guest}.tar"
        await self._sh(f"mkdir -p {shlex.quote(guest)}")
        await self.sandbox.write_file(archive, data, 0o600)
        quoted = shlex.quote(guest)
        await self._sh(
            f"tar -xf {shlex.quote(archive)} -C {quoted} && rm -f {shlex.quote(archive)} && "
            f"mkdir -p {quoted}/proc {quoted}/dev {quoted}/sys {quoted}/tmp && "
            f"mount -t proc proc {quoted}/proc && mount --rbind /dev {quoted}/dev && "
            f"mount --rbind /sys {quoted}/sys"
        )

    async def _sh(self, script: str) -> None:
        result = await self.sandbox.exec(["/bin/sh", "-c", script], timeout=60)
        if result.exit_code != 0:
            raise VMError(
                f"guest command failed ({result.exit_code}): {script}: "
                f"{result.stderr.decode(errors='replace').strip()}"
            )

    async def run(
        self, container_id: str, exec_id: str, process: ProcessSpec, stdin: bytes, output: Output
    ) -> int:
        root = f"{GUEST_ROOT}/{container_id}"
        env = dict(e.partition("=")[::2] for e in process.env)
        argv = [
            "/bin/busybox",
            "chroot",
            root,
            "/bin/sh",
            "-c",
            'cd "$0" && exec "$@"',
            process.cwd,
        ]
        result = await self.sandbox.exec(
            [*argv, *process.args], stdin=stdin, env=env or {"PATH": "/usr/bin:/bin"}
        )
        await output(result.stdout, result.stderr)
        return result.exit_code

    async def remove_container(self, container_id: str) -> None:
        root = shlex.quote(f"{GUEST_ROOT}/{container_id}")
        with contextlib.suppress(Exception):
            await self._sh(
                f"umount -l {root}/sys {root}/dev {root}/proc 2>/dev/null; rm -rf {root}"
            )

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
