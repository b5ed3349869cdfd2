"""How the conformance suite runs each driver: real QEMU, real or fake Firecracker, fake Cloud
Hypervisor and ACRN, and the mock."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from fakes.clh.launcher import write_launcher
from fakes.firecracker.launcher import write_fake_binary, write_tiny_kernel
from fakes.firecracker_binary import real_binaries
from virtcontainers.config import HypervisorConfig
from virtcontainers.types import HypervisorType


@dataclass
class Backend:
    """One driver under test and how to configure a VM for it."""

    name: str
    kind: HypervisorType
    make_config: Callable[[str], HypervisorConfig]  # scratch dir -> config
    real_process: bool = True  # a VMM process (real or fake) runs
    guest_runs: bool = False  # a guest OS really runs (in-guest checks possible)
    no_hotplug_check: set[str] = field(default_factory=set)  # claimed but not checkable here
    vcpu_threads: bool = True  # vCPUs are host threads of the VMM
    vm_cache: bool = True  # to_grpc/from_grpc hand a running VM to another process


def _file(directory: str, name: str, size: int = 4096) -> str:
    path = os.path.join(directory, name)
    with open(path, "wb") as f:
        f.write(b"\0" * size)
    return path


def qemu(machine: str) -> Backend:
    def make(tmp: str) -> HypervisorConfig:
        from virtcontainers.guest import default_kernel_params, ensure_assets

        assets = ensure_assets()
        return HypervisorConfig(
            kernel_path=str(assets.kernel),
            initrd_path=str(assets.initrd),
            kernel_params=default_kernel_params(),
            hypervisor_machine_type=machine,
            num_vcpus=1,
            default_max_vcpus=4,
            memory_size=256,
            mem_slots=4,
        )

    # No VFIO device exists on this host: the QMP sequence is tested against the fake QMP server.
    # vhost-user needs a backend and shared guest memory: tests/integration/
    # test_qemu_hotplug_devices.py checks it with qemu-storage-daemon. QEMU 7.2 under TCG
    # cannot unplug vCPUs (the driver refuses: it would corrupt QEMU), only add them.
    return Backend(
        f"qemu-{machine}",
        HypervisorType.QEMU,
        make,
        guest_runs=True,
        no_hotplug_check={"vfio", "vhost_user", "cpu_remove"},
    )


def firecracker(real: bool) -> Backend:
    def make(tmp: str) -> HypervisorConfig:
        if real:
            bins = real_binaries()
            if isinstance(bins, str):
                pytest.skip(f"real Firecracker unavailable: {bins}")
            binary = bins.firecracker
        else:
            binary = write_fake_binary(tmp)
        return HypervisorConfig(
            kernel_path=write_tiny_kernel(os.path.join(tmp, "vmlinux")),
            initrd_path=_file(tmp, "initrd.img"),
            hypervisor_path=binary,
            num_vcpus=1,
            memory_size=128,
            block_device_driver="virtio-mmio",
            use_vsock=True,
        )

    return Backend(
        "firecracker-real" if real else "firecracker-fake", HypervisorType.FIRECRACKER, make
    )


def clh() -> Backend:
    def make(tmp: str) -> HypervisorConfig:
        return HypervisorConfig(
            kernel_path=_file(tmp, "vmlinux"),
            initrd_path=_file(tmp, "initrd.img"),
            hypervisor_path=write_launcher(
                os.path.join(tmp, "cloud-hypervisor"), "tests.fakes.clh"
            ),
            num_vcpus=1,
            default_max_vcpus=4,
            memory_size=256,
            shared_fs="virtio-fs",
        )

    # Like the real server, the fake opens the VFIO device in sysfs: none exists on this host.
    return Backend("clh-fake", HypervisorType.CLH, make, no_hotplug_check={"vfio"})


def acrn() -> Backend:
    def make(tmp: str) -> HypervisorConfig:
        records = os.path.join(tmp, "records")
        os.makedirs(records, exist_ok=True)
        env = {"FAKE_ACRN_DIR": records}
        return HypervisorConfig(
            kernel_path=_file(tmp, "vmlinuz"),
            image_path=_file(tmp, "rootfs.img"),
            hypervisor_path=write_launcher(
                os.path.join(tmp, "acrn-dm"), "tests.fakes.acrn.acrn_dm", env=env
            ),
            hypervisor_ctl_path=write_launcher(
                os.path.join(tmp, "acrnctl"), "tests.fakes.acrn.acrnctl", env=env
            ),
            num_vcpus=1,
            default_max_vcpus=4,
            memory_size=256,
            block_device_driver="virtio-blk",
        )

    # ACRN runs vCPUs in the hypervisor itself: there are no host threads to report.
    # ACRN, as in Kata, is not supported by the VM cache.
    return Backend("acrn-fake", HypervisorType.ACRN, make, vcpu_threads=False, vm_cache=False)


def mock() -> Backend:
    def make(tmp: str) -> HypervisorConfig:
        return HypervisorConfig(
            kernel_path="/boot/vmlinuz", initrd_path="/boot/initrd.img", default_max_vcpus=4
        )

    return Backend("mock", HypervisorType.MOCK, make, real_process=False, vm_cache=False)


BACKENDS = [
    qemu("q35"),
    qemu("microvm"),
    firecracker(real=False),
    firecracker(real=True),
    clh(),
    acrn(),
    mock(),
]
