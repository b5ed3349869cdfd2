"""Shared helpers for the Firecracker integration tests: backends, kernels, leak checks."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fakes.firecracker.launcher import write_fake_binary, write_tiny_kernel
from fakes.firecracker_binary import real_binaries
from virtcontainers.config import HypervisorConfig


@dataclass
class Backend:
    """Which Firecracker a test drives: the real v1.12.1 binary or the fake."""

    name: str
    firecracker: str
    jailer: str = ""


def real_backend() -> Backend:
    bins = real_binaries()
    if isinstance(bins, str):
        pytest.skip(f"real Firecracker unavailable: {bins}")
    return Backend("real", bins.firecracker, bins.jailer)


def fake_backend(directory: str, extra_args: str = "") -> Backend:
    return Backend("fake", write_fake_binary(directory, extra_args))


@pytest.fixture(scope="session")
def fc_kernel() -> Iterator[tuple[str, str]]:
    """(kernel, initrd): the project's guest assets when they can be built, else a tiny ELF
    kernel and a dummy initrd (the guest cannot run here either way)."""
    try:
        from virtcontainers.guest import ensure_assets

        assets = ensure_assets()
        yield str(assets.kernel), str(assets.initrd)
        return
    except Exception:  # assets not buildable on this machine: fall back, the VMM part still runs
        pass
    d = tempfile.mkdtemp(prefix="fc-kernel-")
    try:
        kernel = write_tiny_kernel(os.path.join(d, "vmlinux"))
        initrd = os.path.join(d, "initrd.img")
        Path(initrd).write_bytes(b"070701" + b"0" * 500)
        yield kernel, initrd
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def short_tmp() -> Iterator[str]:
    """A short private directory (Unix socket paths must stay under 108 bytes)."""
    path = tempfile.mkdtemp(prefix="fct-", dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def make_config(backend: Backend, kernel: tuple[str, str], **overrides: object) -> HypervisorConfig:
    cfg = HypervisorConfig(
        kernel_path=kernel[0],
        initrd_path=kernel[1],
        hypervisor_path=backend.firecracker,
        num_vcpus=2,
        memory_size=128,
        block_device_driver="virtio-mmio",
        use_vsock=True,
    )
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def open_fds() -> set[str]:
    """This process's open fds, as targets (sockets and files), for leak checks."""
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.add(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            continue
    return out
