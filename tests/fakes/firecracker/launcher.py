"""Helpers for tests: an executable that runs the fake Firecracker, and a tiny ELF "kernel".

The driver launches `hypervisor_path` as a binary, so the fake gets a small shell wrapper that
`exec`s this interpreter on `-m fakes.firecracker` (same pid, so signals and thread names
behave as with the real binary).
"""

from __future__ import annotations

import os
import shlex
import struct
import sys
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parents[2]


def write_fake_binary(directory: str | os.PathLike[str], extra_args: str = "") -> str:
    """Write `<directory>/firecracker`, a wrapper running the fake; return its path."""
    path = Path(directory) / "firecracker"
    path.write_text(
        "#!/bin/sh\n"
        f"PYTHONPATH={shlex.quote(str(TESTS_DIR))} "
        f'exec {shlex.quote(sys.executable)} -m fakes.firecracker {extra_args} "$@"\n'
    )
    path.chmod(0o755)
    return str(path)


def write_tiny_kernel(path: str | os.PathLike[str]) -> str:
    """An x86-64 ELF executable whose one segment (loaded at 16 MiB) is `hlt; jmp .-1`.

    Firecracker loads it like a vmlinux; the guest it makes never prints anything.
    """
    code = b"\xf4\xeb\xfd"
    load = 0x1000000
    ehsize, phsize = 64, 56
    offset = 0x1000
    header = struct.pack(
        "<4sBBBBB7xHHIQQQIHHHHHH",
        b"\x7fELF", 2, 1, 1, 0, 0,  # 64-bit, little endian, version 1, SysV ABI
        2, 0x3E, 1,  # ET_EXEC, x86-64, version
        load, ehsize, 0,  # entry, program headers offset, section headers offset
        0, ehsize, phsize, 1, 64, 0, 0,
    )  # fmt: skip
    phdr = struct.pack(
        "<IIQQQQQQ",
        1, 5,  # PT_LOAD, R+X
        offset, load, load, len(code), len(code), 0x1000,
    )  # fmt: skip
    blob = header + phdr
    blob += b"\0" * (offset - len(blob)) + code
    Path(path).write_bytes(blob)
    return str(path)
