"""Extract the uncompressed ELF `vmlinux` from an x86 bzImage (Firecracker boots only ELF kernels).

The boot protocol's setup header gives the compressed payload's place: `setup_sects` at 0x1F1,
the "HdrS" magic at 0x202, `payload_offset`/`payload_length` at 0x248 (relative to the start of
the protected-mode code, which follows the `(setup_sects or 4) + 1` sectors of real-mode code).
The payload is gzip, bzip2, lzma, xz, lz4 (legacy frames) or zstd; the kernel build appends the
uncompressed size as 4 little-endian bytes, which we use as a check.
"""

from __future__ import annotations

import bz2
import contextlib
import hashlib
import lzma
import os
import shutil
import struct
import subprocess
import tempfile
import zlib
from dataclasses import dataclass

from ..errors import AssetError

ELF_MAGIC = b"\x7fELF"
_HDRS_OFFSET = 0x202
_SETUP_SECTS_OFFSET = 0x1F1
_VERSION_OFFSET = 0x206
_PAYLOAD_OFFSET = 0x248
_LZ4_LEGACY_MAGIC = 0x184C2102
_LZ4_LEGACY_BLOCK = 8 << 20
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


@dataclass(frozen=True)
class Payload:
    """The compressed kernel inside a bzImage."""

    compression: str
    data: bytes


def is_elf(path: str) -> bool:
    """True when `path` starts with the ELF magic."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == ELF_MAGIC
    except OSError:
        return False


def find_payload(image: bytes, source: str = "<bytes>") -> Payload:
    """Locate and identify the compressed payload of a bzImage held in `image`."""
    if len(image) < _PAYLOAD_OFFSET + 8 or image[_HDRS_OFFSET : _HDRS_OFFSET + 4] != b"HdrS":
        raise AssetError(f"{source}: not a bzImage (no 'HdrS' setup header at 0x202)")
    (version,) = struct.unpack_from("<H", image, _VERSION_OFFSET)
    if version < 0x208:
        raise AssetError(
            f"{source}: boot protocol {version >> 8}.{version & 0xFF} has no payload fields "
            "(need >= 2.08)"
        )
    setup_sects = image[_SETUP_SECTS_OFFSET] or 4
    start = (setup_sects + 1) * 512
    offset, length = struct.unpack_from("<II", image, _PAYLOAD_OFFSET)
    begin, end = start + offset, start + offset + length
    if length == 0 or end > len(image):
        raise AssetError(
            f"{source}: payload [{begin}, {end}) lies outside the {len(image)}-byte file"
        )
    data = image[begin:end]
    return Payload(_identify(data, source), data)


def _identify(data: bytes, source: str) -> str:
    if data[:2] in (b"\x1f\x8b", b"\x1f\x9e"):
        return "gzip"
    if data[:3] == b"BZh":
        return "bzip2"
    if data[:6] == b"\xfd7zXZ\x00":
        return "xz"
    if data[:3] == b"\x5d\x00\x00":
        return "lzma"
    if len(data) >= 4 and struct.unpack_from("<I", data)[0] == _LZ4_LEGACY_MAGIC:
        return "lz4"
    if data[:4] == _ZSTD_MAGIC:
        return "zstd"
    if data[:4] == ELF_MAGIC:
        return "none"
    raise AssetError(f"{source}: unknown kernel payload compression (magic {data[:6].hex()})")


def decompress(payload: Payload, source: str = "<bytes>") -> bytes:
    """Decompress a bzImage payload; the result must be an ELF image."""
    data, kind = payload.data, payload.compression
    try:
        if kind == "none":
            out = data
        elif kind == "gzip":
            out = zlib.decompressobj(wbits=31).decompress(data)
        elif kind == "bzip2":
            out = bz2.BZ2Decompressor().decompress(data)
        elif kind == "xz":
            out = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data)
        elif kind == "lzma":
            out = lzma.LZMADecompressor(format=lzma.FORMAT_ALONE).decompress(data)
        elif kind == "lz4":
            out = _lz4_legacy(data, _expected_size(data))
        else:
            out = _zstd(data, source)
    except (OSError, ValueError, EOFError, zlib.error, lzma.LZMAError) as e:
        raise AssetError(f"{source}: cannot decompress the {kind} kernel payload: {e}") from e
    if out[:4] != ELF_MAGIC:
        raise AssetError(f"{source}: the decompressed {kind} payload is not an ELF image")
    expected = _expected_size(data)
    if kind != "none" and expected and expected != len(out):
        raise AssetError(f"{source}: decompressed {len(out)} bytes but the image says {expected}")
    return out


def _expected_size(data: bytes) -> int:
    """The uncompressed size the kernel build appends to the payload."""
    return int(struct.unpack_from("<I", data, len(data) - 4)[0]) if len(data) >= 8 else 0


def _lz4_legacy(data: bytes, expected: int) -> bytes:
    """Decode LZ4 legacy frames: magic, then blocks of `<u32 size><data>` of up to 8 MiB each."""
    import lz4.block  # type: ignore[import-untyped]

    out = bytearray()
    pos = 4
    while pos + 4 <= len(data):
        (size,) = struct.unpack_from("<I", data, pos)
        if size == _LZ4_LEGACY_MAGIC:  # a concatenated legacy stream
            pos += 4
            continue
        if pos + 4 + size > len(data):
            break  # the trailing uncompressed-size word, not a block
        block = data[pos + 4 : pos + 4 + size]
        out += lz4.block.decompress(block, uncompressed_size=_LZ4_LEGACY_BLOCK)
        pos += 4 + size
        if expected and len(out) >= expected:
            break
    return bytes(out)


def _zstd(data: bytes, source: str) -> bytes:
    try:
        import zstandard  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        zstd = shutil.which("zstd")
        if not zstd:
            raise AssetError(
                f"{source}: zstd-compressed kernel: install the 'zstandard' Python package "
                "or the zstd tool"
            ) from None
        res = subprocess.run([zstd, "-dc"], input=data[:-4], capture_output=True, check=False)
        if not res.stdout:
            err = res.stderr.decode(errors="replace")
            raise AssetError(f"{source}: zstd failed: {err}") from None
        return res.stdout
    out: bytes = zstandard.ZstdDecompressor().decompressobj().decompress(data)
    return out


def extract_vmlinux(bzimage: str, dest: str) -> str:
    """Write the ELF kernel inside `bzimage` to `dest` (atomically); return `dest`."""
    try:
        with open(bzimage, "rb") as f:
            image = f.read()
    except OSError as e:
        raise AssetError(f"cannot read kernel {bzimage}: {e.strerror}") from e
    elf = image if image[:4] == ELF_MAGIC else decompress(find_payload(image, bzimage), bzimage)
    parent = os.path.dirname(os.path.abspath(dest))
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".vmlinux-", dir=parent)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(elf)
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return dest


def default_cache_dir() -> str:
    """Where extracted kernels are kept: $VC_CACHE_DIR, /var/cache/virtcontainers as root, else
    $XDG_CACHE_HOME/virtcontainers."""
    env = os.environ.get("VC_CACHE_DIR")
    if env:
        return os.path.join(env, "vmlinux")
    if os.geteuid() == 0:
        return "/var/cache/virtcontainers/vmlinux"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(xdg, "virtcontainers", "vmlinux")


def ensure_vmlinux(kernel: str, cache_dir: str | None = None) -> str:
    """An ELF kernel for `kernel`: the path itself when already ELF, else a cached extraction
    keyed by the bzImage's content hash."""
    if is_elf(kernel):
        return kernel
    h = hashlib.sha256()
    try:
        with open(kernel, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError as e:
        raise AssetError(f"cannot read kernel {kernel}: {e.strerror}") from e
    dest = os.path.join(cache_dir or default_cache_dir(), f"vmlinux-{h.hexdigest()[:32]}")
    if is_elf(dest):
        return dest
    return extract_vmlinux(kernel, dest)
