"""Request bodies for the Firecracker API, built from our config and device specs.

Only fields that Firecracker v1.12 already knows are sent by default; newer ones (e.g.
`vsock_override`, v1.16) only when the caller says the server has them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ...errors import ConfigError
from .argv import MAX_VCPUS, resource_id

if TYPE_CHECKING:
    from ...config import HypervisorConfig

GUEST_CID = 3


def logger(log_path: str, debug: bool) -> dict[str, Any]:
    return {
        "log_path": log_path,
        "level": "Debug" if debug else "Warning",
        "show_level": True,
        "show_log_origin": debug,
    }


def metrics(metrics_path: str) -> dict[str, Any]:
    return {"metrics_path": metrics_path}


def machine_config(config: HypervisorConfig) -> dict[str, Any]:
    """vCPUs and memory; Firecracker takes 1-32 vCPUs."""
    vcpus = config.num_vcpus or 1
    if not 1 <= vcpus <= MAX_VCPUS:
        raise ConfigError(f"firecracker: num_vcpus must be 1..{MAX_VCPUS}, got {vcpus}")
    memory = config.memory_size or 2048
    body: dict[str, Any] = {
        "vcpu_count": vcpus,
        "mem_size_mib": memory,
        "smt": False,
        "track_dirty_pages": False,
    }
    if config.huge_pages:
        if memory % 2:
            raise ConfigError(
                f"firecracker: memory_size {memory} MiB must be even with huge_pages (2 MiB pages)"
            )
        body["huge_pages"] = "2M"
    return body


def boot_source(kernel: str, initrd: str, boot_args: str) -> dict[str, Any]:
    body: dict[str, Any] = {"kernel_image_path": kernel, "boot_args": boot_args}
    if initrd:
        body["initrd_path"] = initrd
    return body


def drive(
    drive_id: str, path: str, *, read_only: bool, root: bool = False, cache_type: str = "Unsafe"
) -> dict[str, Any]:
    if cache_type not in ("Unsafe", "Writeback"):
        raise ConfigError(f"firecracker: drive {drive_id}: cache_type {cache_type!r}")
    return {
        "drive_id": resource_id(drive_id),
        "path_on_host": path,
        "is_root_device": root,
        "is_read_only": read_only,
        "cache_type": cache_type,
    }


def drive_patch(drive_id: str, path: str) -> dict[str, Any]:
    return {"drive_id": resource_id(drive_id), "path_on_host": path}


def network_interface(iface_id: str, tap: str, mac: str = "") -> dict[str, Any]:
    body: dict[str, Any] = {"iface_id": resource_id(iface_id), "host_dev_name": tap}
    if mac:
        body["guest_mac"] = mac
    return body


def vsock(uds_path: str, guest_cid: int = GUEST_CID) -> dict[str, Any]:
    if guest_cid < 3:
        raise ConfigError(f"firecracker: vsock guest CID must be >= 3, got {guest_cid}")
    return {"guest_cid": guest_cid, "uds_path": uds_path}


def action(action_type: str) -> dict[str, Any]:
    return {"action_type": action_type}


def vm_state(paused: bool) -> dict[str, Any]:
    return {"state": "Paused" if paused else "Resumed"}


def snapshot_create(snapshot_path: str, mem_file_path: str) -> dict[str, Any]:
    return {"snapshot_path": snapshot_path, "mem_file_path": mem_file_path, "snapshot_type": "Full"}


def snapshot_load(
    snapshot_path: str,
    mem_file_path: str,
    *,
    resume: bool,
    vsock_override: str = "",
    network_overrides: Sequence[tuple[str, str]] = (),
) -> dict[str, Any]:
    """Load a snapshot; memory is mapped privately from the file (copy-on-write)."""
    body: dict[str, Any] = {
        "snapshot_path": snapshot_path,
        "mem_backend": {"backend_type": "File", "backend_path": mem_file_path},
        "resume_vm": resume,
    }
    if network_overrides:
        body["network_overrides"] = [
            {"iface_id": resource_id(i), "host_dev_name": tap} for i, tap in network_overrides
        ]
    if vsock_override:
        body["vsock_override"] = {"uds_path": vsock_override}
    return body
