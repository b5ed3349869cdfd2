"""A pooled VM's staged shares: two virtio-fs shares attached while the VM waits in the pool,
through which its container's root and its volumes reach the guest at hand-out, without
hotplug.

vhost-user-fs cannot be in a template (QEMU cannot migrate it), so a clone would have to
hot-add its container's shares, and the guest's handling of that PCI hotplug (under TCG) is
most of a hand-out. Instead the cache server makes `<run root>/pool/<vm id>/share` and
`.../volumes` shared bind mounts, hot-adds a share of each (each served by its own
virtiofsd) and mounts them in the guest at `GUEST_POOL` and `GUEST_POOL_VOLUMES`, all before
the VM is pooled. At hand-out the container's root (an overlay of its image under an upper
directory next to the shares, or a bundle's root) is mounted under `share/`, its volumes
under `volumes/`, on the host: each virtiofsd's mount namespace holds a slave of its shared
mount, so they appear in what it serves. The roots' share is served with `ROOT_CACHE` (the
guest keeps what it read), the volumes' with the config's mode (`auto`: a file the host
rewrites is seen). Each pooled VM is used once, with its own directory and daemons: a
container sees only its own files.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
from typing import TYPE_CHECKING

from .. import persist
from ..containers.container import (
    GUEST_MOUNTED,
    GUEST_POOL,
    GUEST_POOL_VOLUMES,
    POOL_CGROUP,
    cgroup_script,
    mount_virtiofs,
    read_ahead,
    warm_up_script,
)
from ..devices import SharedFS
from ..drivers.virtiofsd import ROOT_CACHE
from ..types import HypervisorType
from . import tmpfs

if TYPE_CHECKING:
    from .vmconfig import VMConfig

log = logging.getLogger(__name__)

SHARE_ID = "pool"
"""The roots' share's id (its virtiofsd's key and socket name)."""
TAG = "vc-pool"
VOLUMES_ID = "poolv"
"""The volumes' share's id."""
VOLUMES_TAG = "vc-poolv"
ROOT = "ctr"
"""Where a container's root goes in the roots' share."""


def wanted(config: VMConfig) -> bool:
    """Whether pooled VMs of `config` get staged shares: QEMU VMs made for containers."""
    return config.hypervisor is HypervisorType.QEMU and config.config.shared_fs == "virtio-fs"


def share_dir(run_root: str | None, vm_id: str) -> str:
    """The staging area of VM `vm_id`: the served `share/` and `volumes/`, and the roots'
    upper directories."""
    return os.path.join(persist.run_root(run_root), "pool", vm_id)


def served(directory: str) -> str:
    """The roots' served directory in staging area `directory`."""
    return os.path.join(directory, "share")


def served_volumes(directory: str) -> str:
    """The volumes' served directory in staging area `directory`."""
    return os.path.join(directory, "volumes")


def prepare(directory: str) -> list[SharedFS]:
    """Make the (new) staging area's served directories shared mounts, before their
    virtiofsd start; the shares to hot-add (the roots', the volumes'). Nothing is left
    behind on failure."""
    roots, volumes = served(directory), served_volumes(directory)
    try:
        for path in (roots, volumes):
            os.makedirs(path, mode=0o700)
            tmpfs.make_shared(path)
    except BaseException:
        release(directory)
        raise
    return [
        SharedFS(id=SHARE_ID, source=roots, mount_tag=TAG, cache=ROOT_CACHE),
        SharedFS(id=VOLUMES_ID, source=volumes, mount_tag=VOLUMES_TAG),
    ]


def guest_script() -> str:
    """Shell run in the guest of a pooled VM: mount the shares (retried while the guest probes
    them), and do now what a container's set-up would do after hand-out: the cgroup
    hierarchy (vc-run then makes the container's cgroup and directory itself, and enters
    its root in the share: `Container.setup_script`), the roots' share's read-ahead
    (`READ_AHEAD_KIB`); then start and end one throwaway
    container, so that the first real one finds the guest's code warm (`warm_up_script`),
    and make the cgroup the first real one takes (`POOL_CGROUP`)."""
    return " && ".join(
        [
            GUEST_MOUNTED,
            f"mkdir -p {GUEST_POOL} {GUEST_POOL_VOLUMES}",
            mount_virtiofs(TAG, GUEST_POOL),
            read_ahead(GUEST_POOL),
            mount_virtiofs(VOLUMES_TAG, GUEST_POOL_VOLUMES),
            cgroup_script(),
            warm_up_script(),
            f"mkdir -p {POOL_CGROUP}",
        ]
    )


def _target(served_dir: str, name: str) -> str:
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"bad staged share entry name {name!r}")
    target = os.path.join(served_dir, name)
    os.mkdir(target, 0o755)  # a new name: the guest has never looked it up
    return target


def stage_root(directory: str, *, lower: str = "", root: str = "", name: str = ROOT) -> str:
    """Mount a container's root in the roots' share as `name`: over an image (`lower`), an
    overlay with a writable upper directory of its own; else a bundle's `root`, writable.
    Returns its path in the guest."""
    target = _target(served(directory), name)
    if lower:
        upper = os.path.join(directory, f"{name}.upper")
        work = os.path.join(directory, f"{name}.work")
        os.mkdir(upper, 0o755)
        os.mkdir(work, 0o700)
        tmpfs.mount_overlay(lower, upper, work, target)
    else:
        tmpfs.bind(root, target)
    return f"{GUEST_POOL}/{name}"


def stage_volume(directory: str, name: str, source: str, read_only: bool) -> str:
    """Mount the host directory `source` in the volumes' share as `name` (read-only from
    the start when `read_only`); returns its path in the guest."""
    if not os.path.isdir(source):
        raise NotADirectoryError(errno.ENOTDIR, "volume source is not a directory", source)
    tmpfs.bind(source, _target(served_volumes(directory), name), read_only=read_only)
    return f"{GUEST_POOL_VOLUMES}/{name}"


def _unmount_all(path: str) -> None:
    """Detach every mount at or below `path`, deepest first; `OSError` if any is left."""
    for point in sorted(tmpfs.mounts_under(path), key=len, reverse=True):
        try:
            tmpfs.unmount(point)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.ENOENT):
                raise
    left = tmpfs.mounts_under(path)
    if left:
        raise OSError(errno.EBUSY, f"still mounted, not removed: {left}", path)


def unstage(directory: str, name: str) -> None:
    """Take entry `name` (a later container's root or volume) out of its share: unmount it,
    remove its mount point and a root's upper and work directories."""
    for target in (
        os.path.join(served(directory), name),
        os.path.join(served_volumes(directory), name),
    ):
        if os.path.lexists(target):
            _unmount_all(target)
            os.rmdir(target)
    for extra in (f"{name}.upper", f"{name}.work"):
        shutil.rmtree(os.path.join(directory, extra), ignore_errors=True)


def release(directory: str) -> None:
    """Unmount everything in a staging area (deepest first) and remove it. The files are
    removed only once nothing is mounted there any more: never through a volume's bind."""
    if not os.path.lexists(directory):
        return
    _unmount_all(directory)
    shutil.rmtree(directory)
    with contextlib.suppress(OSError):
        os.rmdir(os.path.dirname(directory))  # the run root's pool/ once it is empty


def release_quietly(directory: str) -> None:
    """`release`, logging instead of raising (clean-up paths)."""
    try:
        release(directory)
    except OSError as exc:
        log.error("staged share %s: %s", directory, exc)
