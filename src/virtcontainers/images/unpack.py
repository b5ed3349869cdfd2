"""Apply OCI image layers to a directory: whiteouts, opaque directories, hardlinks, symlinks,
ownership; device nodes skipped.

Every entry is placed by resolving its parent inside the root the way the container will see
it (absolute symlinks restart at the root); an entry with an absolute path or `..`, a symlink
that leads above the root, or a hardlink to outside fails with `ImageError` naming the layer
and the entry. Nothing is ever written through a symlink: an existing entry is replaced.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import stat
import tarfile
import tempfile
import zlib
from typing import IO

from ..errors import ImageError
from .archive import LayerDecoder, is_zstd

log = logging.getLogger(__name__)

WHITEOUT_PREFIX = ".wh."
OPAQUE = ".wh..wh..opq"
MAX_SYMLINK_HOPS = 40
_COPY_CHUNK = 1 << 20


def _parts(name: str, what: str) -> list[str]:
    """The path components of a layer entry name; refuses absolute names and `..`."""
    if name.startswith("/"):
        raise ImageError(f"{what}: entry {name!r} has an absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ImageError(f"{what}: entry {name!r} has '..' in its path")
    return parts


def resolve_in_root(root: str, parts: list[str], what: str, *, create: bool) -> str | None:
    """The host path of the directory `parts` names inside `root`, following symlinks as the
    container would; missing directories are created (`create`) or give None."""
    pending = list(parts)
    done: list[str] = []
    hops = 0
    via = ""
    while pending:
        part = pending.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            if not done:
                raise ImageError(f"{what}: symlink {via} on its path leads outside the image root")
            done.pop()
            continue
        path = os.path.join(root, *done, part)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            if not create:
                return None
            os.mkdir(path, 0o755)
            done.append(part)
            continue
        if stat.S_ISLNK(st.st_mode):
            hops += 1
            if hops > MAX_SYMLINK_HOPS:
                raise ImageError(f"{what}: too many levels of symlinks")
            target = os.readlink(path)
            via = f"{'/'.join([*done, part])!r} -> {target!r}"
            if target.startswith("/"):
                done = []
            pending = target.split("/") + pending
            continue
        if not stat.S_ISDIR(st.st_mode):
            shown = "/".join([*done, part])
            raise ImageError(f"{what}: {shown!r} on its path is not a directory")
        done.append(part)
    return os.path.join(root, *done)


def _remove(path: str) -> None:
    """Remove a file, symlink or directory tree (a symlink itself, never its target)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def _clear_dir(path: str) -> None:
    for name in os.listdir(path):
        _remove(os.path.join(path, name))


def _set_owner(path: str, member: tarfile.TarInfo, chown: bool) -> None:
    if chown:
        os.lchown(path, member.uid, member.gid)


def _apply_xattrs(path: str, member: tarfile.TarInfo, chown: bool) -> None:
    """File capabilities and user xattrs recorded in the entry's PAX headers (root only)."""
    if not chown:
        return
    for key, value in member.pax_headers.items():
        if not key.startswith("SCHILY.xattr."):
            continue
        attr = key[len("SCHILY.xattr.") :]
        if attr == "security.capability" or attr.startswith("user."):
            with contextlib.suppress(OSError):
                os.setxattr(path, attr, value.encode("utf-8", "surrogateescape"))


def _zstd_to_tar(layer: IO[bytes], what: str, stack: contextlib.ExitStack) -> IO[bytes]:
    """A zstd layer decompressed into a temporary file (tarfile reads gzip itself, not zstd,
    and the layer is read twice: whiteouts first); any other stream as it is."""
    if not layer.seekable():
        return layer
    start = layer.tell()
    head = layer.read(4)
    layer.seek(start)
    if not is_zstd(head):
        return layer
    decoder = LayerDecoder("zstd", what)
    plain = stack.enter_context(tempfile.TemporaryFile())  # noqa: SIM115 (the stack closes it)
    while chunk := layer.read(_COPY_CHUNK):
        plain.write(decoder.feed(chunk))
    plain.write(decoder.finish())
    plain.seek(0)
    return plain


def apply_layer(root: str, layer: IO[bytes], what: str, *, whiteouts: bool = True) -> None:
    """Apply one layer tar (plain, gzip or zstd) to `root`; `what` names the layer in errors.
    Without `whiteouts` (a copy, not a layer) `.wh.` names are ordinary files."""
    chown = os.geteuid() == 0
    try:
        with (
            contextlib.ExitStack() as stack,
            tarfile.open(fileobj=_zstd_to_tar(layer, what, stack), mode="r:*") as tf,
        ):
            members = tf.getmembers()
            # Whiteouts first: they delete what lower layers put there, never this layer's own.
            for m in members:
                parts = _parts(m.name, what)
                if whiteouts and parts and parts[-1].startswith(WHITEOUT_PREFIX):
                    _whiteout(root, parts, f"{what}: entry {m.name!r}")
            dirs: list[tuple[str, tarfile.TarInfo]] = []
            for m in members:
                parts = _parts(m.name, what)
                if not parts or (whiteouts and parts[-1].startswith(WHITEOUT_PREFIX)):
                    continue
                _extract(root, tf, m, parts, f"{what}: entry {m.name!r}", chown, dirs)
            # Directory modes last, so a read-only directory still receives its entries.
            for path, m in reversed(dirs):
                _set_owner(path, m, chown)
                os.chmod(path, m.mode & 0o7777)
                os.utime(path, (m.mtime, m.mtime))
    except ImageError:
        raise
    except (tarfile.TarError, EOFError, zlib.error) as e:
        raise ImageError(f"{what} is truncated or corrupt: {e}") from None
    except OSError as e:
        raise ImageError(f"{what}: cannot unpack: {e}") from None


def _whiteout(root: str, parts: list[str], what: str) -> None:
    parent = resolve_in_root(root, parts[:-1], what, create=False)
    if parent is None:
        return
    if parts[-1] == OPAQUE:
        _clear_dir(parent)
    else:
        _remove(os.path.join(parent, parts[-1][len(WHITEOUT_PREFIX) :]))


def _extract(
    root: str,
    tf: tarfile.TarFile,
    m: tarfile.TarInfo,
    parts: list[str],
    what: str,
    chown: bool,
    dirs: list[tuple[str, tarfile.TarInfo]],
) -> None:
    if m.ischr() or m.isblk():
        log.debug("%s: device node skipped", what)
        return
    parent = resolve_in_root(root, parts[:-1], what, create=True)
    assert parent is not None
    dest = os.path.join(parent, parts[-1])
    try:
        existing = os.lstat(dest)
    except FileNotFoundError:
        existing = None
    if m.isdir():
        if existing is None or not stat.S_ISDIR(existing.st_mode):
            _remove(dest)
            os.mkdir(dest, 0o700)
        dirs.append((dest, m))
        return
    if existing is not None:
        _remove(dest)
    if m.islnk():
        src_parts = [p for p in m.linkname.split("/") if p not in ("", ".")]
        if m.linkname.startswith("/") or ".." in src_parts or not src_parts:
            raise ImageError(f"{what}: hardlink to outside the image ({m.linkname!r})")
        src_dir = resolve_in_root(root, src_parts[:-1], what, create=False)
        src = os.path.join(src_dir, src_parts[-1]) if src_dir is not None else ""
        if not src or not os.path.lexists(src) or os.path.isdir(src):
            raise ImageError(f"{what}: hardlink target {m.linkname!r} is not a file in the image")
        os.link(src, dest, follow_symlinks=False)
        return
    if m.issym():
        os.symlink(m.linkname, dest)
        _set_owner(dest, m, chown)
        os.utime(dest, (m.mtime, m.mtime), follow_symlinks=False)
        return
    if m.isfifo():
        os.mkfifo(dest, 0o600)
    elif m.isreg():
        fd = os.open(
            dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
        with os.fdopen(fd, "wb") as out:
            src_file = tf.extractfile(m)
            assert src_file is not None
            shutil.copyfileobj(src_file, out, _COPY_CHUNK)
    else:
        log.debug("%s: entry type %r skipped", what, m.type)
        return
    _set_owner(dest, m, chown)
    os.chmod(dest, m.mode & 0o7777)
    _apply_xattrs(dest, m, chown)
    os.utime(dest, (m.mtime, m.mtime))
