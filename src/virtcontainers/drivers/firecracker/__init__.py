"""Firecracker driver: API client, command lines (plain and jailer), the `Firecracker` driver."""

from __future__ import annotations

from .api import FirecrackerAPI, FirecrackerAPIError
from .argv import JailerSpec, check_vm_id, firecracker_argv, kernel_command_line, resource_id
from .driver import Firecracker

__all__ = [
    "Firecracker",
    "FirecrackerAPI",
    "FirecrackerAPIError",
    "JailerSpec",
    "check_vm_id",
    "firecracker_argv",
    "kernel_command_line",
    "resource_id",
]
