"""Sandbox networking: namespaces, endpoints joined to the VM (Kata's tcfilter model),
a bridge with NAT and published ports, QEMU user-mode networking, and the guest's side."""

from .guest import configure_guest_network
from .model import (
    Address,
    GuestNetwork,
    Interface,
    Neighbour,
    NetworkConfig,
    PortMapping,
    Route,
)
from .sandbox_net import SandboxNetwork

__all__ = [
    "Address",
    "GuestNetwork",
    "Interface",
    "Neighbour",
    "NetworkConfig",
    "PortMapping",
    "Route",
    "SandboxNetwork",
    "configure_guest_network",
]
