"""`virtc cp`: copy files and directories into and out of a container, on the host.

A container's root is what its virtiofsd serves (the image's overlay), reached as that
daemon's root directory (`/proc/<pid>/root`); a path under a volume goes to the volume's
host directory. Every copy runs in a forked child chrooted into that directory, so no path
or symlink the guest controls (changed even while the copy runs) can lead outside it; the
unpacker places entries as for image layers (`images.unpack`). As with docker cp, what is
copied in belongs to the container's root (its mapped ids in a user namespace), what is
copied out to the user copying.
"""

from __future__ import annotations

import os
import tarfile
import tempfile
from collections.abc import Callable

from ..errors import ConfigError, StateError
from ..images.unpack import apply_layer, resolve_in_root


def share_root(vm_dir: str, share_id: str = "ctr") -> str:
    """The root directory of the virtiofsd serving a sandbox's container share: the one
    named after the share's socket (`--socket-path`), or holding that listening socket (one
    handed to it as `--fd`)."""
    from ..drivers.virtiofsd import socket_path

    path = socket_path(vm_dir, share_id)
    marker = f"--socket-path={path}".encode()
    held = {f"socket:[{inode}]" for inode in _unix_socket_inodes(path)}
    host_root = os.stat("/")
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            if marker not in argv and not (b"virtiofsd" in argv[0] and _holds(name, held)):
                continue
            st = os.stat(f"/proc/{name}/root")
        except OSError:
            continue
        # virtiofsd's worker has entered the shared directory; its monitor has not.
        if (st.st_dev, st.st_ino) != (host_root.st_dev, host_root.st_ino):
            return f"/proc/{name}/root"
    raise StateError(f"no file server for the container of {vm_dir}: is the sandbox running?")


def _unix_socket_inodes(path: str) -> list[str]:
    """Inodes of the Unix sockets bound at `path` (this network namespace's /proc/net/unix)."""
    try:
        with open("/proc/net/unix") as f:
            lines = f.read().splitlines()[1:]
    except OSError:
        return []
    return [f[6] for f in (line.split() for line in lines) if len(f) >= 8 and f[7] == path]


def _holds(pid: str, targets: set[str]) -> bool:
    """Whether process `pid` has an fd open on one of `targets` ("socket:[inode]")."""
    if not targets:
        return False
    fds = f"/proc/{pid}/fd"
    for fd in os.listdir(fds):
        try:
            if os.readlink(f"{fds}/{fd}") in targets:
                return True
        except OSError:
            continue
    return False


def _parts(path: str) -> list[str]:
    if not path.startswith("/"):
        raise ConfigError(f"container path {path!r} must be absolute")
    return [p for p in path.split("/") if p not in ("", ".")]


def _in_child(root: str, work: object, *args: object) -> None:
    """Run `work(*args)` in a forked child chrooted into `root`; raise what it reported."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(r)
        code = 0
        try:
            os.chroot(root)
            os.chdir("/")
            work(*args)  # type: ignore[operator]
        except BaseException as e:
            os.write(w, str(e).encode(errors="replace")[:4000] or type(e).__name__.encode())
            code = 1
        os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        message = f.read().decode(errors="replace")
    _, status = os.waitpid(pid, 0)
    if status != 0:
        raise ConfigError(message or f"copy failed (status {status})")


def _target(parts: list[str], name: str) -> str:
    """Inside the chroot: `parts` if it does not name a directory, else parts/name."""
    parent = resolve_in_root("/", parts[:-1], "copy", create=False) if parts else "/"
    if parts and parent is not None:
        full = os.path.join(parent, parts[-1])
        if os.path.isdir(full) and not os.path.islink(full):
            return "/".join([*parts, name])
        return "/".join(parts)
    return "/".join([*parts, name])


def copy_in(root: str, host_src: str, container_path: str, owner: tuple[int, int] = (0, 0)) -> None:
    """Copy a host file or directory to `container_path` under `root` (docker cp rules: into
    an existing directory, else as that name; owned by the container's root, whose host ids
    are `owner`)."""
    if not os.path.lexists(host_src):
        raise ConfigError(f"cp: {host_src}: no such file or directory")
    parts = _parts(container_path)
    with tempfile.TemporaryFile() as tmp, tempfile.TemporaryFile() as renamed:
        name = os.path.basename(os.path.normpath(host_src))
        with tarfile.open(fileobj=tmp, mode="w", format=tarfile.PAX_FORMAT) as tf:
            tf.add(host_src, arcname=name)
        tmp.flush()
        _in_child(root, _extract_renamed, tmp.fileno(), renamed.fileno(), parts, name, owner)


def _owned(owner: tuple[int, int]) -> Callable[[tarfile.TarInfo], tarfile.TarInfo]:
    """A tar filter giving every entry the ids `owner` (no names: they would be looked up)."""

    def give(m: tarfile.TarInfo) -> tarfile.TarInfo:
        m.uid, m.gid = owner
        m.uname = m.gname = ""
        return m

    return give


def _extract_renamed(
    tar_fd: int, out_fd: int, parts: list[str], name: str, owner: tuple[int, int]
) -> None:
    """Inside the chroot: rename the tar's top entry `name` to its destination (written to
    `out_fd`, a host temp file) and give it `owner`, unpack."""
    dest = _target(parts, name)
    os.lseek(tar_fd, 0, os.SEEK_SET)
    with (
        os.fdopen(os.dup(tar_fd), "rb") as f,
        tarfile.open(fileobj=f, mode="r:") as src,
        os.fdopen(os.dup(out_fd), "w+b") as renamed,
    ):
        with tarfile.open(fileobj=renamed, mode="w", format=tarfile.PAX_FORMAT) as out:
            for m in map(_owned(owner), src.getmembers()):
                rel = m.name[len(name) :] if m.name != name else ""
                m.name = dest + rel
                if m.islnk() and (m.linkname == name or m.linkname.startswith(name + "/")):
                    m.linkname = dest + m.linkname[len(name) :]
                out.addfile(m, src.extractfile(m) if m.isreg() else None)
        renamed.seek(0)
        apply_layer("/", renamed, f"copy to /{dest}", whiteouts=False)


def copy_out(root: str, container_path: str, host_dst: str) -> None:
    """Copy `container_path` under `root` to the host: into `host_dst` if it is a
    directory, else as `host_dst`; owned by the user copying (docker cp's rule)."""
    parts = _parts(container_path)
    if not parts:
        raise ConfigError("cp: copying the whole root out is not supported; name a path")
    if os.path.isdir(host_dst):
        dest_dir, name = host_dst, parts[-1]
    else:
        dest_dir, name = os.path.dirname(os.path.abspath(host_dst)), os.path.basename(host_dst)
        if not os.path.isdir(dest_dir):
            raise ConfigError(f"cp: {dest_dir} is not a directory")
    with tempfile.TemporaryFile() as tmp:
        _in_child(root, _pack, tmp.fileno(), parts, name, (os.getuid(), os.getgid()))
        tmp.seek(0)
        apply_layer(dest_dir, tmp, f"copy from {container_path}", whiteouts=False)


def _pack(tar_fd: int, parts: list[str], name: str, owner: tuple[int, int]) -> None:
    parent = resolve_in_root("/", parts[:-1], "cp", create=False)
    src = os.path.join(parent, parts[-1]) if parent is not None else ""
    if not src or not os.path.lexists(src):
        raise ConfigError(f"cp: /{'/'.join(parts)}: no such file or directory in the container")
    with (
        os.fdopen(os.dup(tar_fd), "wb") as f,
        tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tf,
    ):
        tf.add(src, arcname=name, filter=_owned(owner))
