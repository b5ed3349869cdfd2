"""A virtio-fs clone's own copy of its template's memory (see factory.template), and that copy
made ahead: `virtc run --from-template` starts it first thing, so that it is filled while the
command is still importing what the clone needs (a thread; the copy is the kernel's work).

Standard library only: importing this costs nothing on the command's critical path.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import json
import os
import threading

from .errors import TemplateError
from .paths import TEMPLATE_MEMORY, TEMPLATE_METADATA

_ahead: dict[str, tuple[tuple[int, int, int], int, concurrent.futures.Future[None]]] = {}
"""memory file path -> (its identity when copied, the memfd, the copy)."""
_lock = threading.Lock()


def private_memory(name: str, size: int, label: str) -> int:
    """An empty memfd of `size` bytes for a copy of template `name`'s memory.

    A clone of a template made for virtio-fs maps this copy shared, as vhost-user devices
    need: virtiofsd then sees the clone's memory, and nothing it writes reaches the template.
    """
    fd = os.memfd_create(f"vc-{label}", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
    except OSError as exc:
        os.close(fd)
        raise TemplateError(f"template {name}: cannot make a clone's memory: {exc}") from exc
    return fd


def fill_private_memory(name: str, memory_path: str, fd: int) -> None:
    """Copy template `name`'s memory file into a clone's memfd `fd` (its data only: holes
    stay holes)."""
    try:
        with open(memory_path, "rb") as src:
            copy_data(src.fileno(), fd, os.fstat(src.fileno()).st_size)
    except OSError as exc:
        raise TemplateError(f"template {name}: cannot copy its memory for a clone: {exc}") from exc


def copy_data(src: int, dst: int, size: int) -> None:
    """Copy the data extents of file `src` to the same offsets of `dst` (holes skipped)."""
    offset = 0
    while offset < size:
        try:
            start = os.lseek(src, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data after offset
                return
            raise
        end = os.lseek(src, start, os.SEEK_HOLE)
        os.lseek(dst, start, os.SEEK_SET)
        while start < end:
            sent = os.sendfile(dst, src, start, end - start)
            if sent == 0:
                raise OSError(errno.EIO, "short read copying template memory")
            start += sent
        offset = end


def _identity(st: os.stat_result) -> tuple[int, int, int]:
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def copy_ahead(template_dir: str) -> None:
    """Start copying the memory of the template whose metadata is in `template_dir`, when it
    is made for virtio-fs, for `take` to hand to its next clone. Best effort: whatever is
    wrong is left for the clone to find and report."""
    try:
        with open(os.path.join(template_dir, TEMPLATE_METADATA), "rb") as f:
            meta = json.load(f)
        if meta.get("config", {}).get("shared_fs") != "virtio-fs":
            return
        name, path = str(meta["name"]), os.path.join(str(meta["directory"]), TEMPLATE_MEMORY)
        size = int(meta["memory_mib"]) << 20
        identity = _identity(os.stat(path))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return
    with _lock:
        if path in _ahead:
            return
        try:
            fd = private_memory(name, size, name)
        except TemplateError:
            return
        future: concurrent.futures.Future[None] = concurrent.futures.Future()
        _ahead[path] = (identity, fd, future)

    def fill() -> None:
        try:
            fill_private_memory(name, path, fd)
        except BaseException as exc:
            future.set_exception(exc)
        else:
            future.set_result(None)

    threading.Thread(target=fill, name="vc-memcopy", daemon=True).start()


def take(memory_path: str) -> tuple[int, concurrent.futures.Future[None]] | None:
    """The memfd and copy `copy_ahead` started for `memory_path` (the caller owns the fd),
    if the file is still the one it copies; None otherwise (a stale copy is dropped)."""
    with _lock:
        entry = _ahead.pop(memory_path, None)
    if entry is None:
        return None
    identity, fd, future = entry
    try:
        current = _identity(os.stat(memory_path))
    except OSError:
        current = None
    if current != identity:
        future.add_done_callback(lambda _f: _close(fd))  # once the copy has let go of it
        return None
    return fd, future


def _close(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)
