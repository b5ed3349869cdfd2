"""tmpfs mounts for template files: mount sized to the guest plus headroom, lazy unmount."""

from __future__ import annotations

import ctypes
import os

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong]
_libc.mount.argtypes += [ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]

MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MNT_DETACH = 0x2
TMPFS_MAGIC = 0x01021994


def mount_tmpfs(path: str, size_bytes: int, mode: int = 0o700) -> None:
    """Mount a new tmpfs of `size_bytes` on the existing directory `path` (needs root)."""
    opts = f"size={size_bytes},mode={mode:o}".encode()
    flags = MS_NOSUID | MS_NODEV | MS_NOEXEC
    if _libc.mount(b"tmpfs", os.fsencode(path), b"tmpfs", flags, opts) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount tmpfs: {os.strerror(err)}", path)


def unmount(path: str) -> None:
    """Detach the mount on `path`; its memory is freed once no process maps its files."""
    if _libc.umount2(os.fsencode(path), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"umount: {os.strerror(err)}", path)


def is_mountpoint(path: str) -> bool:
    return os.path.ismount(path)


def free_bytes(path: str) -> int:
    """Bytes an unprivileged writer may still use on the filesystem holding `path`."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def mounts_under(prefix: str) -> list[str]:
    """Mount points at or below `prefix` (from /proc/self/mountinfo)."""
    prefix = os.path.realpath(prefix)
    found: list[str] = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
        for line in f:
            fields = line.split()
            if len(fields) < 5:
                continue
            point = fields[4].replace("\\040", " ")
            if point == prefix or point.startswith(prefix.rstrip("/") + "/"):
                found.append(point)
    return found
