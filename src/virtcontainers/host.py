"""Host facts: memory, CPU flags, vCPU limits, socket paths, vsock CIDs, the KVM probe."""

from __future__ import annotations

import os
import platform


def max_qemu_vcpus() -> int:
    """The most vCPUs QEMU may be given on this architecture (govmm's MaxVCPUs)."""
    machine = platform.machine()
    if machine in ("aarch64", "arm64"):
        return os.cpu_count() or 1
    if machine in ("ppc64le", "ppc64"):
        return 128
    if machine == "s390x":
        return 248
    return 240
