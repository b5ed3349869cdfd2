"""Firecracker and jailer command lines, id rules and the guest kernel command line."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from ...errors import ConfigError
from ...types import Param, join_params

VM_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,63}$")
RESOURCE_ID_RE = re.compile(r"^[A-Za-z0-9_]{1,64}$")
MAX_VCPUS = 32
JAIL_API_SOCKET = "/run/firecracker.socket"

# Kata's Firecracker guest parameters: serial console, reboot via keyboard controller off,
# no PCI probing (virtio-mmio), the i8042 probing that otherwise costs boot time.
DEFAULT_KERNEL_PARAMS: tuple[Param, ...] = (
    Param("console", "ttyS0"),
    Param("reboot", "k"),
    Param("panic", "1"),
    Param("pci", "off"),
    Param("i8042.noaux", ""),
    Param("i8042.nomux", ""),
    Param("i8042.nopnp", ""),
    Param("i8042.dumbkbd", ""),
    Param("tsc", "reliable"),
    Param("no_timer_check", ""),
    Param("rcupdate.rcu_expedited", "1"),
    Param("cryptomgr.notests", ""),
    Param("net.ifnames", "0"),
)


def check_vm_id(vm_id: str) -> str:
    """Firecracker's and the jailer's `--id`: 1-64 letters, digits or '-'."""
    if not VM_ID_RE.match(vm_id):
        raise ConfigError(
            f"firecracker: invalid VM id {vm_id!r} "
            "(1-64 letters, digits and '-', not starting with '-')"
        )
    return vm_id


def resource_id(name: str) -> str:
    """An API resource id (drive, interface) from a device id: `[A-Za-z0-9_]` only.

    Other characters become '_'; an empty or over-long result is refused.
    """
    sanitized = re.sub(r"[^A-Za-z0-9_]", "_", name)
    if not RESOURCE_ID_RE.match(sanitized):
        raise ConfigError(
            f"firecracker: device id {name!r} cannot be an API resource id "
            "(1-64 characters of letters, digits and '_')"
        )
    return sanitized


def kernel_command_line(
    user: Sequence[Param], defaults: Iterable[Param] = DEFAULT_KERNEL_PARAMS
) -> str:
    """Defaults first, then the user's params; a user param replaces a default with its key."""
    user_keys = {p.key for p in user if p.key}
    merged = [p for p in defaults if p.key not in user_keys]
    merged.extend(user)
    return join_params(merged)


def firecracker_argv(
    binary: str, api_socket: str, vm_id: str, extra: Sequence[str] = ()
) -> list[str]:
    """`firecracker --api-sock <path> --id <id> [extra...]`."""
    check_vm_id(vm_id)
    if not api_socket:
        raise ConfigError("firecracker: empty API socket path")
    return [binary, "--api-sock", api_socket, "--id", vm_id, *extra]


@dataclass
class JailerSpec:
    """How to run Firecracker under the jailer."""

    jailer: str
    exec_file: str
    chroot_base_dir: str
    uid: int = 0
    gid: int = 0
    cgroup_version: int = 1
    netns: str = ""
    parent_cgroup: str = ""
    cgroups: list[str] = field(default_factory=list)  # "<file>=<value>", e.g. cpu.shares=512
    resource_limits: list[str] = field(default_factory=list)  # "no-file=1024", "fsize=..."
    daemonize: bool = False
    new_pid_ns: bool = False

    def __post_init__(self) -> None:
        for name in ("jailer", "exec_file", "chroot_base_dir"):
            value = getattr(self, name)
            if not value or not os.path.isabs(value):
                raise ConfigError(f"jailer: {name} must be an absolute path, got {value!r}")
        if self.netns and not os.path.isabs(self.netns):
            raise ConfigError(f"jailer: netns must be an absolute path, got {self.netns!r}")
        if self.cgroup_version not in (1, 2):
            raise ConfigError(f"jailer: cgroup_version must be 1 or 2, got {self.cgroup_version}")
        if self.uid < 0 or self.gid < 0:
            raise ConfigError(f"jailer: uid/gid must be >= 0, got {self.uid}/{self.gid}")
        for item in [*self.cgroups, *self.resource_limits]:
            key, sep, value = item.partition("=")
            if not sep or not key or not value:
                raise ConfigError(f"jailer: {item!r} must be <name>=<value>")
        for item in self.resource_limits:
            if item.partition("=")[0] not in ("no-file", "fsize"):
                raise ConfigError(f"jailer: unknown resource limit {item!r} (no-file, fsize)")

    def jail_dir(self, vm_id: str) -> str:
        """`<base>/<exec-file name>/<id>`: the directory the jailer owns for this VM."""
        return os.path.join(self.chroot_base_dir, os.path.basename(self.exec_file), vm_id)

    def root(self, vm_id: str) -> str:
        """`<base>/<exec-file name>/<id>/root`: the chroot."""
        return os.path.join(self.jail_dir(vm_id), "root")

    def host_path(self, vm_id: str, jail_path: str) -> str:
        """The host path of a path as seen inside the jail."""
        return os.path.join(self.root(vm_id), jail_path.lstrip("/"))

    def argv(self, vm_id: str, firecracker_args: Sequence[str] = ()) -> list[str]:
        """The jailer command line; `firecracker_args` follow `--` (the jailer adds `--id`)."""
        check_vm_id(vm_id)
        out = [
            self.jailer,
            "--id", vm_id,
            "--exec-file", self.exec_file,
            "--uid", str(self.uid),
            "--gid", str(self.gid),
            "--chroot-base-dir", self.chroot_base_dir,
            "--cgroup-version", str(self.cgroup_version),
        ]  # fmt: skip
        if self.netns:
            out += ["--netns", self.netns]
        if self.parent_cgroup:
            out += ["--parent-cgroup", self.parent_cgroup]
        for c in self.cgroups:
            out += ["--cgroup", c]
        for r in self.resource_limits:
            out += ["--resource-limit", r]
        if self.new_pid_ns:
            out.append("--new-pid-ns")
        if self.daemonize:
            out.append("--daemonize")
        return [*out, "--", "--api-sock", JAIL_API_SOCKET, *firecracker_args]
