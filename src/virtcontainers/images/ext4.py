"""A directory as an ext4 image file, built without mounting (`mke2fs -d`): a container's
root for VMMs that have no virtio-fs (Firecracker), attached as a block device."""

from __future__ import annotations

import os
import shutil
import subprocess

from ..errors import ImageError

SLACK_BYTES = 64 << 20
"""Free space left in the image for the container's writes (and the file system's own)."""


def tree_bytes(root: str) -> int:
    total = 0
    for dirpath, dirs, files in os.walk(root):
        for name in files + dirs:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
            except OSError:
                continue
    return total


def build_ext4(root: str, path: str) -> None:
    """Write `path`: an ext4 file system holding a copy of `root` (owners and modes kept)."""
    mke2fs = shutil.which("mke2fs") or shutil.which("mkfs.ext4")
    if mke2fs is None:
        raise ImageError("mke2fs not found: apt-get install e2fsprogs")
    size_mib = (tree_bytes(root) * 5 // 4 + SLACK_BYTES) // (1 << 20) + 1
    argv = [mke2fs, "-q", "-F", "-t", "ext4", "-d", root, "-L", "vc-root", path, f"{size_mib}M"]
    done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=600)
    if done.returncode != 0:
        raise ImageError(f"mke2fs of {root} failed: {done.stderr.strip()[-2000:]}")
