"""Real guest asset builds: Debian kernel package, busybox, gcc, cpio, under a process lock."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import pytest

from virtcontainers.guest import asset_info, ensure_assets

pytestmark = pytest.mark.integration

BUILD = (
    "import json, sys\n"
    "from virtcontainers.guest import ensure_assets\n"
    "a = ensure_assets(sys.argv[1])\n"
    "print(json.dumps({'key': a.key, 'built': a.built, 'kernel': a.kernel, 'initrd': a.initrd}))\n"
)


@pytest.fixture
def cache_dir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="vc-assets-", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_two_processes_build_once_then_reuse(cache_dir: str) -> None:
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", BUILD, cache_dir], stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outs = []
    for proc in procs:
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0
        outs.append(json.loads(out))
    assert sorted(o["built"] for o in outs) == [False, True]
    assert outs[0]["key"] == outs[1]["key"]
    leftovers = [n for n in os.listdir(cache_dir) if n.startswith((".build-", ".old-"))]
    assert leftovers == []

    again = ensure_assets(cache_dir)
    assert not again.built and again.key == outs[0]["key"]
    with open(again.initrd, "rb") as f:
        assert f.read(4) in (b"\x02\x21\x4c\x18", b"\x1f\x8b\x08\x00")  # lz4 legacy or gzip
    with open(again.bzimage, "rb") as f:
        f.seek(0x202)
        assert f.read(4) == b"HdrS"  # a bzImage
    assert again.kernel_version and "virtio_console" in again.modules

    info = asset_info(cache_dir)
    assert info["status"] == "built" and info["key"] == again.key
    assert info["initrd_size"] == os.path.getsize(again.initrd)
    assert info["kernel_package"].startswith("linux-image-")


def _elf_notes(path: str) -> set[tuple[bytes, int]]:
    """(owner, type) of every note in the ELF file's PT_NOTE segments."""
    import struct

    with open(path, "rb") as f:
        data = f.read()
    (phoff,) = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    notes: set[tuple[bytes, int]] = set()
    for i in range(phnum):
        p_type, _flags, offset, _va, _pa, filesz = struct.unpack_from(
            "<IIQQQQ", data, phoff + i * phentsize
        )
        if p_type != 4:  # PT_NOTE
            continue
        pos, end = offset, offset + filesz
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", data, pos)
            name = data[pos + 12 : pos + 12 + namesz].rstrip(b"\0")
            notes.add((name, ntype))
            pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return notes


async def test_pvh_kernel_and_preset_lpj_in_a_real_guest(leak_check: str) -> None:
    from virtcontainers.guest.vmlinux import is_elf
    from virtcontainers.sandbox import Sandbox

    assets = ensure_assets()
    assert is_elf(assets.kernel) and not is_elf(assets.bzimage)
    assert (b"Xen", 18) in _elf_notes(assets.kernel)  # XEN_ELFNOTE_PHYS32_ENTRY: PVH entry
    assert assets.kernel_hz > 0
    sb = Sandbox("pvh1", run_root=leak_check, memory_size=256, num_vcpus=1, default_max_vcpus=2)
    async with sb:
        assert sb.config.kernel_path == assets.kernel
        lpj = [p.value for p in sb.config.kernel_params if p.key == "lpj"]
        assert lpj and int(lpj[0]) > 0
        cmdline = (await sb.exec(["cat", "/proc/cmdline"])).stdout.decode().split()
        assert f"lpj={lpj[0]}" in cmdline
        await sb.resize(vcpus=2)
        info = (await sb.exec(["cat", "/proc/cpuinfo"])).stdout.decode()
        bogomips = [line.split(":")[1].strip() for line in info.splitlines() if "bogomips" in line]
        # The hot-added vCPU took the preset instead of calibrating: both report its value.
        n, hz = int(lpj[0]), assets.kernel_hz
        expected = f"{n // (500000 // hz)}.{n // (5000 // hz) % 100:02d}"  # the kernel's rounding
        assert bogomips == [expected] * 2
