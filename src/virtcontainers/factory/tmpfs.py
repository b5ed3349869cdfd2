"""Host mounts the factory makes (needs root): tmpfs for template files (sized to the guest plus
headroom), and the binds and overlays of a pooled VM's staged share (see `poolshare`)."""

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
MS_BIND = 0x1000
MS_REC = 0x4000
MS_SHARED = 1 << 20
MNT_DETACH = 0x2
TMPFS_MAGIC = 0x01021994
# The new mount API (Linux 5.12+; the same numbers on every architecture but alpha/mips/ia64).
SYS_OPEN_TREE = 428
SYS_MOVE_MOUNT = 429
SYS_MOUNT_SETATTR = 442
OPEN_TREE_CLONE = 0x1
AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOUNT_ATTR_RDONLY = 0x1
_libc.syscall.restype = ctypes.c_long


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def _check(ret: int, what: str, path: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}", path)
    return ret


def mount_tmpfs(path: str, size_bytes: int, mode: int = 0o700) -> None:
    """Mount a new tmpfs of `size_bytes` on the existing directory `path` (needs root)."""
    opts = f"size={size_bytes},mode={mode:o}".encode()
    flags = MS_NOSUID | MS_NODEV | MS_NOEXEC
    if _libc.mount(b"tmpfs", os.fsencode(path), b"tmpfs", flags, opts) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount tmpfs: {os.strerror(err)}", path)


def make_shared(path: str) -> None:
    """Bind the directory `path` onto itself and make that mount shared: what is mounted
    below it later also appears in the mount namespaces copied from it meanwhile (as slaves,
    such as virtiofsd's), and goes from them when unmounted here."""
    target = os.fsencode(path)
    _check(_libc.mount(target, target, None, MS_BIND, None), "bind mount", path)
    _check(_libc.mount(None, target, None, MS_SHARED, None), "make shared", path)


def bind(source: str, target: str, *, read_only: bool = False) -> None:
    """Mount a recursive copy of the tree at `source` on the directory `target`, read-only
    from the moment it is attached when `read_only` (a remount afterwards would not reach
    the copies propagated to other mount namespaces)."""
    fd = _check(
        _libc.syscall(
            SYS_OPEN_TREE,
            AT_FDCWD,
            os.fsencode(source),
            OPEN_TREE_CLONE | AT_RECURSIVE | os.O_CLOEXEC,
        ),
        "open_tree",
        source,
    )
    try:
        if read_only:
            attr = _MountAttr(MOUNT_ATTR_RDONLY, 0, 0, 0)
            flags = AT_EMPTY_PATH | AT_RECURSIVE
            ret = _libc.syscall(
                SYS_MOUNT_SETATTR, fd, b"", flags, ctypes.byref(attr), ctypes.sizeof(attr)
            )
            _check(ret, "mount_setattr(read-only)", source)
        ret = _libc.syscall(
            SYS_MOVE_MOUNT, fd, b"", AT_FDCWD, os.fsencode(target), MOVE_MOUNT_F_EMPTY_PATH
        )
        _check(ret, "move_mount", target)
    finally:
        os.close(fd)


def mount_overlay(lower: str, upper: str, work: str, target: str) -> None:
    """An overlay of `lower` under the writable `upper` (`work`: its work directory, on the
    same filesystem) on `target`."""
    for path in (lower, upper, work):
        if any(c in path for c in ",:\n"):
            raise OSError(22, "overlay: a path contains ',' ':' or a newline", path)
    opts = f"lowerdir={lower},upperdir={upper},workdir={work}".encode()
    ret = _libc.mount(b"overlay", os.fsencode(target), b"overlay", 0, opts)
    _check(ret, "mount overlay", target)


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
