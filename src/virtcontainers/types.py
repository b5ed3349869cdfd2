"""Core value types shared by every layer: hypervisor kinds, parameters, capabilities, assets."""

from __future__ import annotations

import enum
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .errors import ConfigError


class HypervisorType(enum.StrEnum):
    """The hypervisors virtcontainers can drive."""

    QEMU = "qemu"
    FIRECRACKER = "firecracker"
    ACRN = "acrn"
    CLH = "clh"
    MOCK = "mock"

    @classmethod
    def parse(cls, value: str | HypervisorType) -> HypervisorType:
        """Return the member named by `value`, or raise `ConfigError` as the seed does."""
        if isinstance(value, HypervisorType):
            return value
        for member in cls:
            if member.value == value:
                return member
        raise ConfigError(f"Unknown hypervisor type {value}")


AGENT_VSOCK_PORT = 1024
"""The vsock port the guest agent listens on (Kata's); `agent.endpoint.AGENT_PORT`."""


class VMState(enum.StrEnum):
    """Lifecycle of one VM: created -> running <-> paused -> stopped."""

    NEW = "new"
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"


@dataclass(frozen=True)
class Param:
    """A key/value pair for kernel or hypervisor parameters."""

    key: str
    value: str = ""


def serialize_params(params: Iterable[Param], delim: str) -> list[str]:
    """Turn params into strings: `key<delim>value`, or key / value alone when the other is empty."""
    out: list[str] = []
    for p in params:
        if not p.key and not p.value:
            continue
        if not p.key:
            out.append(p.value)
        elif not p.value:
            out.append(p.key)
        elif not delim:
            out.extend((p.key, p.value))
        else:
            out.append(f"{p.key}{delim}{p.value}")
    return out


def deserialize_params(strings: Iterable[str]) -> list[Param]:
    """Parse `key=value` strings (split on the first `=`); empty strings are skipped."""
    out: list[Param] = []
    for s in strings:
        if not s:
            continue
        key, sep, value = s.partition("=")
        out.append(Param(key, value if sep else ""))
    return out


def params_from_string(text: str) -> list[Param]:
    """Parse a space-separated kernel command line (`a=b c`) into params."""
    return deserialize_params(text.split())


class Capabilities(enum.Flag):
    """What a hypervisor (for its configured machine) can do."""

    NONE = 0
    BLOCK_DEVICE = enum.auto()
    BLOCK_DEVICE_HOTPLUG = enum.auto()
    MULTI_QUEUE = enum.auto()
    FS_SHARING = enum.auto()
    NET_DEVICE_HOTPLUG = enum.auto()
    CPU_HOTPLUG = enum.auto()
    MEMORY_HOTPLUG = enum.auto()
    VIRTIO_MEM = enum.auto()
    VFIO_HOTPLUG = enum.auto()
    VHOST_USER_HOTPLUG = enum.auto()
    PAUSE = enum.auto()
    TEMPLATE = enum.auto()
    HYBRID_VSOCK = enum.auto()
    VSOCK = enum.auto()

    def names(self) -> list[str]:
        """The lower-case names of the set flags, for reports."""
        return [m.name.lower() for m in Capabilities if m.name and m.value and m in self]


class DeviceType(enum.IntEnum):
    """Kinds of virtual devices, in the seed's order."""

    IMG = 0
    FS = 1
    NET = 2
    BLOCK = 3
    SERIAL_PORT = 4
    VSOCK_PCI = 5
    VFIO = 6
    VHOST_USER = 7
    CPU = 8
    MEMORY = 9
    HYBRID_VSOCK = 10


class AssetType(enum.StrEnum):
    """Kinds of assets a VM needs from the host."""

    KERNEL = "kernel"
    IMAGE = "image"
    INITRD = "initrd"
    HYPERVISOR = "hypervisor"
    HYPERVISOR_CTL = "hypervisorctl"
    JAILER = "jailer"
    FIRMWARE = "firmware"

    def __str__(self) -> str:
        return str(self.value)


def sha512_file(path: str) -> str:
    """Hex sha512 digest of a file's contents."""
    import hashlib  # where used: OpenSSL's start-up is not free

    h = hashlib.sha512()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class Asset:
    """A host file a VM uses, optionally pinned by its sha512 digest."""

    type: AssetType
    path: str
    hash: str | None = None

    def valid(self) -> bool:
        """True when the path is absolute and, if a hash is given, the file matches it."""
        if not self.path or not os.path.isabs(self.path):
            return False
        if self.hash:
            try:
                return sha512_file(self.path) == self.hash.lower()
            except OSError:
                return False
        return True


@dataclass(frozen=True)
class Socket:
    """A host Unix socket backing a guest serial channel (the agent channel)."""

    device_id: str
    id: str
    host_path: str
    name: str


@dataclass(frozen=True)
class VSock:
    """A vhost-vsock endpoint: the fd that holds the guest CID, the CID and the agent port."""

    vhost_fd: int
    context_id: int
    port: int


@dataclass(frozen=True)
class MemoryDevice:
    """A hot-added memory device as reported back to the caller."""

    slot: int
    size_mb: int
    addr: int = 0
    probe: bool = False


def join_params(params: Sequence[Param]) -> str:
    """Render params as a kernel command line."""
    return " ".join(serialize_params(params, "="))
