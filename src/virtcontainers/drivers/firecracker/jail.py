"""The host side of a VM's root directory: the jailer's chroot, or the VM directory when not jailed.

Firecracker is given paths relative to this root (its working directory, or the chroot), so a
snapshot taken in one VM resolves to the clone's own files when loaded in another.
Files from elsewhere are brought in by hard link (same filesystem), else a bind mount for
files that must stay shared (disks, memory), else a copy (kernel, initrd); their owner is
set to the jail's uid/gid. The jailer never cleans up: `remove()` does.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess

from ... import persist
from ...errors import HypervisorError

CGROUP_ROOT = "/sys/fs/cgroup"


class VMRoot:
    """One VM's root directory on the host (`path`), and what was put into it."""

    def __init__(self, path: str, uid: int = -1, gid: int = -1, jailed: bool = False) -> None:
        self.path = path
        self.uid = uid
        self.gid = gid
        self.jailed = jailed
        self.mounts: list[str] = []

    def host(self, rel: str) -> str:
        """Host path of a root-relative path."""
        return os.path.join(self.path, rel.lstrip("/"))

    def create(self) -> None:
        """Make the root, private (0700) to the VMM's user."""
        persist.ensure_dir(self.path)  # 0700 from the top, whatever the umask
        self._own(self.path)

    def _own(self, path: str) -> None:
        if self.jailed and (self.uid, self.gid) != (os.geteuid(), os.getegid()):
            os.chown(path, self.uid, self.gid)

    def touch(self, rel: str, mode: int = 0o600) -> str:
        """Create an empty file (or truncate it) owned by the jail user; its host path."""
        dest = self.host(rel)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
        try:
            os.fchmod(fd, mode)  # exactly `mode`, whatever the umask
        finally:
            os.close(fd)
        self._own(dest)
        return dest

    def bring(self, source: str, rel: str, *, shared: bool) -> str:
        """Make `source` visible at `rel` inside the root; returns `rel`.

        `shared` files (disks, guest memory) must be the same inode: hard link or bind mount;
        others may be copied when linking is impossible.
        """
        dest = self.host(rel)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(dest)
        try:
            os.link(source, dest)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                raise HypervisorError(f"cannot link {source} into {self.path}: {e.strerror}") from e
            if shared:
                self._bind(source, dest)
            else:
                shutil.copy2(source, dest)
        if self.jailed and self.uid != 0 and os.stat(dest).st_uid != self.uid:
            os.chown(dest, self.uid, self.gid)
        return rel

    def _bind(self, source: str, dest: str) -> None:
        with open(dest, "a"):
            pass
        res = subprocess.run(
            ["mount", "--bind", source, dest], capture_output=True, text=True, check=False
        )
        if res.returncode != 0:
            with contextlib.suppress(OSError):
                os.unlink(dest)
            raise HypervisorError(
                f"cannot bind-mount {source} at {dest}: {res.stderr.strip() or res.returncode}"
            )
        self.mounts.append(dest)

    def release(self, rel: str) -> None:
        """Remove what `bring()` put at `rel` (unmounting a bind mount)."""
        dest = self.host(rel)
        if dest in self.mounts:
            subprocess.run(["umount", dest], capture_output=True, check=False)
            self.mounts.remove(dest)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(dest)

    def remove(self, top: str | None = None) -> None:
        """Unmount everything, then delete `top` (default: the root) recursively."""
        for dest in reversed(self.mounts):
            subprocess.run(["umount", "-l", dest], capture_output=True, check=False)
        self.mounts.clear()
        shutil.rmtree(top or self.path, ignore_errors=True)


def remove_cgroups(parent: str, vm_id: str, root: str = CGROUP_ROOT) -> None:
    """Delete the cgroups the jailer made for `vm_id` (v1: one per controller; v2: one)."""
    candidates = [os.path.join(root, parent, vm_id)]
    with contextlib.suppress(OSError):
        for controller in os.listdir(root):
            candidates.append(os.path.join(root, controller, parent, vm_id))
    for path in candidates:
        with contextlib.suppress(OSError):
            os.rmdir(path)
        with contextlib.suppress(OSError):
            os.rmdir(os.path.dirname(path))  # the parent, when no other VM uses it


def cgroup_version(root: str = CGROUP_ROOT) -> int:
    """2 on a unified hierarchy, else 1."""
    return 2 if os.path.exists(os.path.join(root, "cgroup.controllers")) else 1
