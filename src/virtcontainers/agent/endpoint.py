"""Where the host reaches a VM's guest agent, and the one way the agent channel is plugged.

The channel is a virtio-serial port (QEMU, ACRN, mock: a host Unix socket), a hybrid vsock
(Firecracker, Cloud Hypervisor: the VMM's Unix socket, `CONNECT <port>`) or AF_VSOCK
(QEMU with vhost-vsock-pci). `Sandbox` and the factory both plug it with
`plug_agent_channel` and keep the `AgentEndpoint` it returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from ..errors import StateError
from ..types import AGENT_VSOCK_PORT

if TYPE_CHECKING:
    from ..hypervisor import Hypervisor
    from .client import HybridVsock, VsockAddress

AGENT_PORT = AGENT_VSOCK_PORT
"""The guest agent's vsock port (defined once, in `types`, for the layers below too)."""
HYBRID_VSOCK_SOCKET = "agent-vsock.sock"
"""The hybrid vsock Unix socket plugged for the agent, in the VM directory."""

Kind = Literal["unix", "hybrid", "vsock"]


@dataclass(frozen=True)
class AgentEndpoint:
    """A VM's agent channel: `unix` (virtio-serial port socket `path`), `hybrid` (the VMM's
    Unix socket `path` and guest `port`) or `vsock` (guest `cid` and `port`)."""

    kind: Kind
    path: str = ""
    port: int = 0
    cid: int = 0

    @classmethod
    def unix(cls, path: str) -> AgentEndpoint:
        return cls("unix", path)

    @classmethod
    def hybrid(cls, path: str, port: int = AGENT_PORT) -> AgentEndpoint:
        return cls("hybrid", path, port)

    @classmethod
    def vsock(cls, cid: int, port: int = AGENT_PORT) -> AgentEndpoint:
        return cls("vsock", "", port, cid)

    def target(self) -> str | HybridVsock | VsockAddress:
        """What `AgentClient.connect` dials."""
        from .client import HybridVsock, VsockAddress

        if self.kind == "hybrid":
            return HybridVsock(self.path, self.port)
        if self.kind == "vsock":
            return VsockAddress(self.cid, self.port)
        return self.path

    def to_doc(self) -> list[str | int]:
        """The persisted form: `[kind, path or cid, port]`."""
        return [self.kind, self.cid if self.kind == "vsock" else self.path, self.port]

    @classmethod
    def from_doc(cls, doc: Any) -> AgentEndpoint:
        """Read `to_doc()`'s form back; `StateError` naming it when it is not one."""
        try:
            kind, where, port = doc
            if kind == "vsock":
                return cls.vsock(int(where), int(port))
            if kind in ("unix", "hybrid") and isinstance(where, str):
                return cls(kind, where, int(port) if kind == "hybrid" else 0)
        except (TypeError, ValueError):
            pass
        raise StateError(
            f"unreadable agent endpoint {doc!r}: want [unix|hybrid|vsock, where, port]"
        )

    def __str__(self) -> str:
        return str(self.target())


async def plug_agent_channel(
    hv: Hypervisor, vm_id: str, *, use_vsock: bool = False
) -> AgentEndpoint:
    """Cold-plug the agent channel into a created VM and say where it is: hybrid vsock when
    the VMM has it, else the driver's `generate_socket` (virtio-serial port, or vhost-vsock
    when `use_vsock`)."""
    from .. import persist
    from ..devices import HybridVSockDevice, SerialPort, VSockDevice
    from ..host import build_socket_path
    from ..types import Capabilities, Socket, VSock

    if Capabilities.HYBRID_VSOCK in hv.capabilities():
        uds = build_socket_path(persist.vm_dir(vm_id, hv.run_root), HYBRID_VSOCK_SOCKET)
        await hv.add_device(HybridVSockDevice(uds_path=uds, port=AGENT_PORT))
        return AgentEndpoint.hybrid(uds, AGENT_PORT)
    sock = hv.generate_socket(vm_id, use_vsock)
    if isinstance(sock, VSock):
        await hv.add_device(VSockDevice(sock))
        return AgentEndpoint.vsock(sock.context_id, sock.port)
    assert isinstance(sock, Socket)
    await hv.add_device(SerialPort(sock))
    return AgentEndpoint.unix(sock.host_path)
