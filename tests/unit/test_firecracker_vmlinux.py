"""vmlinux extraction from bzImages: synthetic images for every compression, and the real
Debian cloud kernel when the guest assets can be had."""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import struct
from pathlib import Path

import lz4.block  # type: ignore[import-untyped]
import pytest

from virtcontainers.errors import AssetError
from virtcontainers.guest.vmlinux import (
    ELF_MAGIC,
    ensure_vmlinux,
    extract_vmlinux,
    find_payload,
    is_elf,
)


def _elf(size: int) -> bytes:
    body = bytes((i * 7 + (i >> 9)) & 0xFF for i in range(size - 16))
    return ELF_MAGIC + b"\x02\x01\x01" + b"\0" * 9 + body


def _lz4_legacy(data: bytes) -> bytes:
    out = bytearray(struct.pack("<I", 0x184C2102))
    for i in range(0, len(data), 8 << 20):
        block = lz4.block.compress(data[i : i + (8 << 20)], store_size=False)
        out += struct.pack("<I", len(block)) + block
    return bytes(out)


COMPRESSORS = {
    "gzip": gzip.compress,
    "bzip2": bz2.compress,
    "xz": lambda d: lzma.compress(d, format=lzma.FORMAT_XZ),
    "lzma": lambda d: lzma.compress(d, format=lzma.FORMAT_ALONE),
    "lz4": _lz4_legacy,
}


def bzimage(payload: bytes, uncompressed: int, *, version: int = 0x020F) -> bytes:
    """A bzImage-shaped blob: setup header with 1 setup sector, payload 0x100 into the kernel."""
    setup = bytearray(2 * 512)
    setup[0x1F1] = 1
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, version)
    full = payload + struct.pack("<I", uncompressed)
    struct.pack_into("<II", setup, 0x248, 0x100, len(full))
    return bytes(setup) + b"\0" * 0x100 + full + b"\0" * 64


@pytest.mark.parametrize("kind", sorted(COMPRESSORS))
def test_extracts_each_compression(kind: str, tmp_path: Path) -> None:
    elf = _elf(300_000)
    image = tmp_path / "bzImage"
    image.write_bytes(bzimage(COMPRESSORS[kind](elf), len(elf)))
    assert find_payload(image.read_bytes()).compression == kind
    out = extract_vmlinux(str(image), str(tmp_path / "vmlinux"))
    assert Path(out).read_bytes() == elf
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".vmlinux-")]


def test_lz4_legacy_with_several_blocks(tmp_path: Path) -> None:
    elf = _elf(9 << 20)  # more than one 8 MiB legacy block
    image = tmp_path / "bzImage"
    image.write_bytes(bzimage(_lz4_legacy(elf), len(elf)))
    assert Path(extract_vmlinux(str(image), str(tmp_path / "vmlinux"))).read_bytes() == elf


def test_size_mismatch_is_refused(tmp_path: Path) -> None:
    elf = _elf(10_000)
    image = tmp_path / "bzImage"
    image.write_bytes(bzimage(gzip.compress(elf), len(elf) + 1))
    with pytest.raises(AssetError, match="image says"):
        extract_vmlinux(str(image), str(tmp_path / "vmlinux"))


def test_not_an_elf_payload_is_refused(tmp_path: Path) -> None:
    image = tmp_path / "bzImage"
    image.write_bytes(bzimage(gzip.compress(b"MZ not elf" * 100), 1000))
    with pytest.raises(AssetError, match="not an ELF"):
        extract_vmlinux(str(image), str(tmp_path / "vmlinux"))
    assert not (tmp_path / "vmlinux").exists()


@pytest.mark.parametrize(
    ("blob", "message"),
    [
        (b"\0" * 4096, "not a bzImage"),
        (bzimage(b"????garbage", 10), "unknown kernel payload compression"),
        (bzimage(gzip.compress(b"x"), 1, version=0x0206), "boot protocol 2.6"),
    ],
)
def test_bad_images(blob: bytes, message: str) -> None:
    with pytest.raises(AssetError, match=message):
        find_payload(blob, "img")


def test_payload_outside_file() -> None:
    blob = bytearray(bzimage(gzip.compress(b"x"), 1))
    struct.pack_into("<I", blob, 0x24C, 10**6)
    with pytest.raises(AssetError, match="outside"):
        find_payload(bytes(blob), "img")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(AssetError, match="cannot read kernel"):
        ensure_vmlinux(str(tmp_path / "nope"), str(tmp_path))


def test_ensure_vmlinux_caches_and_passes_elf_through(tmp_path: Path) -> None:
    elf = _elf(50_000)
    image = tmp_path / "bzImage"
    image.write_bytes(bzimage(gzip.compress(elf), len(elf)))
    cache = tmp_path / "cache"
    first = ensure_vmlinux(str(image), str(cache))
    mtime = os.stat(first).st_mtime_ns
    assert ensure_vmlinux(str(image), str(cache)) == first
    assert os.stat(first).st_mtime_ns == mtime  # reused, not rewritten
    assert ensure_vmlinux(first, str(cache)) == first  # already ELF
    image.write_bytes(bzimage(gzip.compress(elf + b"!"), len(elf) + 1))
    assert ensure_vmlinux(str(image), str(cache)) != first  # keyed by content


def test_real_debian_kernel(tmp_path: Path) -> None:
    try:
        from virtcontainers.guest import ensure_assets

        kernel = str(ensure_assets().bzimage)
    except Exception as e:  # the distribution kernel cannot be fetched here
        pytest.skip(f"guest kernel unavailable: {e}")
    data = Path(kernel).read_bytes()
    payload = find_payload(data, kernel)
    out = Path(extract_vmlinux(kernel, str(tmp_path / "vmlinux")))
    elf = out.read_bytes()
    assert is_elf(str(out))
    assert struct.unpack_from("<H", elf, 18)[0] == 0x3E  # e_machine x86-64
    assert len(elf) == struct.unpack("<I", payload.data[-4:])[0]
    assert b"Linux version" in elf
