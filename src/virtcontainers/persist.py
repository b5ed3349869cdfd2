"""Where VM files live, and sandbox state persisted atomically under an flock.

Layout under the run root: `vm/<id>/` holds one VM's sockets, pid and log; `sbs/<id>/`
holds `persist.json` (the state document) and `lock` (the flock target).

Writes go to a temp file in the same directory and are renamed over the old file, so a
reader sees the old or the new document, never a torn one. State documents are not fsynced:
they describe running VMs, which a host crash ends too (and /run is a tmpfs), while a killed
writer's data is safe in the page cache; so the rename is all the atomicity they need, and a
pause or hotplug does not wait for a disk. A writer killed mid-write
leaves its temp file (`.persist.json.tmp.<pid>.<start time>.<token>`); the next `write` to
that sandbox removes every temp file whose writer process is gone.

A running VM's pause state changes often and is all that changes then: it lives apart, as one
byte (`runstate`, R or P) overwritten in place, which a reader sees whole, old or new, and
which needs no new disk space (a pause cannot fail on a full disk).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import stat
import time
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

from .errors import ConfigError, StateError

# Imported where used: listing sandboxes (`inventory`) reads state files and must stay cheap
# (asyncio, secrets, shutil, tempfile, threading and `host` cost more than the reading).
if TYPE_CHECKING:
    import asyncio
    import threading
    from concurrent.futures import Future

    # Re-exported (`X as X`): `persist.HypervisorState` resolves through `__getattr__`.
    from .hypervisor_state import Bridge as Bridge  # noqa: PLC0414
    from .hypervisor_state import DriverState as DriverState  # noqa: PLC0414
    from .hypervisor_state import HotpluggedVCPU as HotpluggedVCPU  # noqa: PLC0414
    from .hypervisor_state import HypervisorState as HypervisorState  # noqa: PLC0414

_MODELS = ("Bridge", "DriverState", "HotpluggedVCPU", "HypervisorState")

DEFAULT_ROOT_RUN_ROOT = "/run/vc"
RUN_ROOT_ENV = "VC_RUN_ROOT"
STATE_FILE = "persist.json"
LOCK_FILE = "lock"
DELETE_TRIES = 50
"""How often `delete` removes a directory that lock waiters keep re-populating."""
RUNSTATE_FILE = "runstate"
_RUNSTATE_CODES = {"running": b"R", "paused": b"P"}
_RUNSTATE_NAMES = {code: name for name, code in _RUNSTATE_CODES.items()}
TEMP_PREFIX = f".{STATE_FILE}.tmp."
ID_MAX_LEN = 128
DIR_MODE = 0o700
FILE_MODE = 0o600

_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


# -- paths ------------------------------------------------------------------------------------
def validate_id(id: str, what: str = "sandbox id") -> str:
    """Return `id` if it is safe as one path component, else raise `ConfigError` naming it."""
    if not isinstance(id, str) or not id:
        raise ConfigError(f"{what} must be a non-empty string, got {id!r}")
    if len(id) > ID_MAX_LEN:
        raise ConfigError(f"{what} {id[:32]!r}... is {len(id)} characters long (max {ID_MAX_LEN})")
    if "/" in id or ".." in id or not _ID_RE.fullmatch(id):
        raise ConfigError(
            f"invalid {what} {id!r}: use letters, digits, '_', '.', '-', starting with a letter "
            "or digit, without '/' or '..'"
        )
    return id


def run_root(override: str | None = None) -> str:
    """The run root: `override` > env `VC_RUN_ROOT` > `/run/vc` as root > `$XDG_RUNTIME_DIR/vc`
    > `/run/user/<uid>/vc` (when that directory is the user's) > `<tmpdir>/vc-<uid>`.

    The root is checked on every call (`check_run_root`): one another user controls is refused.
    """
    path = _run_root_path(override)
    check_run_root(path)
    return path


USER_RUNTIME_BASE = "/run/user"
"""Where the login manager makes each user's private runtime directory."""


def _run_root_path(override: str | None) -> str:
    if override:
        source, path = "run root", override
    elif os.environ.get(RUN_ROOT_ENV):
        source, path = RUN_ROOT_ENV, os.environ[RUN_ROOT_ENV]
    elif os.geteuid() == 0:
        return DEFAULT_ROOT_RUN_ROOT
    elif os.environ.get("XDG_RUNTIME_DIR"):
        source, path = "XDG_RUNTIME_DIR", os.path.join(os.environ["XDG_RUNTIME_DIR"], "vc")
    else:
        user_dir = os.path.join(USER_RUNTIME_BASE, str(os.geteuid()))
        with contextlib.suppress(OSError):
            if os.stat(user_dir).st_uid == os.geteuid():
                return os.path.join(user_dir, "vc")
        import tempfile

        return os.path.join(tempfile.gettempdir(), f"vc-{os.geteuid()}")
    if not os.path.isabs(path):
        raise ConfigError(f"{source} must be an absolute path, got {path!r}")
    return os.path.normpath(path)


_checked_roots: dict[str, tuple[int, int]] = {}
"""Run roots found safe in this process, with the (device, inode) they had then."""


def check_run_root(path: str) -> None:
    """Refuse (`ConfigError`) a run root that another user could control.

    Its state files name the binaries later launched and its sockets are trusted, so the
    root must be a real directory (not a symbolic link) owned by this user and writable by
    no one else, under directories only root or this user can change (or sticky ones, like
    /tmp). A missing root whose parent others can write (a predictable name in /tmp) is
    created here and now (0700), before another user can make it first.
    """
    try:
        st: os.stat_result | None = os.lstat(path)
    except FileNotFoundError:
        st = None
    except OSError:
        return  # no directory can be there (ENOTDIR...): using it fails, naming the path
    if st is not None and _checked_roots.get(path) == (st.st_dev, st.st_ino):
        return
    _check_ancestors(path)
    if st is None:
        if not _others_can_create(path):
            return  # only this user or root can create it: nothing to trust yet
        try:
            ensure_dir(path)
            st = os.lstat(path)
        except OSError as e:
            raise ConfigError(f"cannot create the run root {path}: {e.strerror or e}") from e
    problem = _unsafe_root(st)
    if problem:
        raise ConfigError(
            f"unsafe run root {path}: {problem}; another user could plant state, sockets or "
            "binaries there (remove it, or choose another with VC_RUN_ROOT)"
        )
    _checked_roots[path] = (st.st_dev, st.st_ino)


def _unsafe_root(st: os.stat_result) -> str | None:
    if stat.S_ISLNK(st.st_mode):
        return "it is a symbolic link"
    if not stat.S_ISDIR(st.st_mode):
        return "it is not a directory"
    if st.st_uid != os.geteuid():
        return f"it is owned by uid {st.st_uid}, not {os.geteuid()}"
    if st.st_mode & 0o022:
        return f"it is writable by others (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def _untrusted(st: os.stat_result) -> str | None:
    """Why a directory (or symbolic link) on the way to private files is not safe, or None."""
    if st.st_uid not in (0, os.geteuid()):
        return f"is owned by uid {st.st_uid}"
    sticky = stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX
    if not stat.S_ISLNK(st.st_mode) and st.st_mode & 0o022 and not sticky:
        return f"is writable by others (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def _check_ancestors(path: str) -> None:
    """Every existing directory above `path` (and what its links point to) is trusted."""
    chains = [os.path.dirname(path)]
    real = os.path.realpath(chains[0])
    if real != chains[0]:
        chains.append(real)
    for start in chains:
        current = start
        while True:
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                problem = _untrusted(os.lstat(current))
                if problem:
                    raise ConfigError(
                        f"unsafe run root {path}: {current} {problem}, so another user could "
                        "replace what is under it (choose another with VC_RUN_ROOT)"
                    )
            parent = os.path.dirname(current)
            if parent == current:
                break
            current = parent


def _others_can_create(path: str) -> bool:
    """True when the deepest existing directory above `path` is writable by group or others."""
    current = os.path.dirname(path)
    while True:
        try:
            return bool(os.stat(current).st_mode & 0o022)
        except (FileNotFoundError, NotADirectoryError):
            parent = os.path.dirname(current)
            if parent == current:
                return False
            current = parent


def vm_root(run_root: str | None = None) -> str:
    """`<run_root>/vm`: the parent of every VM directory."""
    return os.path.join(_resolve_root(run_root), "vm")


def vm_dir(id: str, run_root: str | None = None) -> str:
    """`<run_root>/vm/<id>`: one VM's sockets, pid and log."""
    return os.path.join(vm_root(run_root), validate_id(id, "VM id"))


def sandbox_state_dir(id: str, run_root: str | None = None) -> str:
    """`<run_root>/sbs/<id>`: one sandbox's persisted state and lock file."""
    return os.path.join(_resolve_root(run_root), "sbs", validate_id(id))


_resolve_root = run_root


def __getattr__(name: str) -> Any:
    """The state models, defined in `hypervisor_state` (pydantic) and imported on first use."""
    if name in _MODELS:
        from . import hypervisor_state

        return getattr(hypervisor_state, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def ensure_dir(path: str, mode: int = DIR_MODE) -> None:
    """Create `path` and missing parents with exactly `mode` (whatever the umask).

    An existing directory it builds on must be trusted (owned by root or this user, not
    writable by others unless sticky): `OSError` (EPERM) naming it otherwise.
    """
    missing: list[str] = []
    current = os.path.abspath(path)
    while not os.path.isdir(current):
        missing.append(current)
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    _require_trusted(current)
    for d in reversed(missing):
        try:
            os.mkdir(d, mode)
        except FileExistsError:
            _require_trusted(d)  # made meanwhile: by whom?
            if not os.path.isdir(d):
                raise
            continue
        os.chmod(d, mode)


def _require_trusted(path: str) -> None:
    problem = _untrusted(os.lstat(path))
    if problem:
        raise PermissionError(errno.EPERM, f"untrusted directory: {path} {problem}", path)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_own_start: tuple[int, int | None] | None = None


def _own_start_time() -> int | None:
    """This process's start time, recomputed after a fork."""
    global _own_start
    pid = os.getpid()
    if _own_start is None or _own_start[0] != pid:
        from .host import process_start_time

        _own_start = (pid, process_start_time(pid))
    return _own_start[1]


def temp_name(final_name: str) -> str:
    """A temp file name for `final_name` naming this writer (pid and start time)."""
    import secrets

    return f".{final_name}.tmp.{os.getpid()}.{_own_start_time() or 0}.{secrets.token_hex(4)}"


def remove_stale_temps(directory: str, final_name: str = STATE_FILE) -> list[str]:
    """Remove temp files for `final_name` whose writer process is gone; return their names."""
    from .host import pid_is

    prefix = f".{final_name}.tmp."
    removed: list[str] = []
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return removed
    for name in names:
        if not name.startswith(prefix):
            continue
        parts = name[len(prefix) :].split(".")
        try:
            pid, start = int(parts[0]), int(parts[1])
        except (IndexError, ValueError):
            pid, start = 0, 0
        if pid > 0 and pid_is(pid, start):
            continue  # its writer is still running
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(directory, name))
            removed.append(name)
    return removed


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    """What changes whenever a file is replaced by a rename or rewritten."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def atomic_write(
    path: str, data: bytes, mode: int = FILE_MODE, *, durable: bool = True
) -> os.stat_result:
    """Replace `path` with `data` atomically (and, if `durable`, surviving power loss); on
    failure the old file is intact.

    Temp file in the same directory, write, fsync, rename, fsync the directory (the fsyncs
    only if `durable`). Returns the new file's stat. Errors (ENOSPC, EACCES, ...) raise
    `StateError` naming the path; the temp file is removed.
    """
    directory, name = os.path.split(path)
    tmp = os.path.join(directory, temp_name(name))
    fd = -1
    try:
        ensure_dir(directory)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        if durable:
            os.fsync(fd)
        st = os.fstat(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
        if durable:
            _fsync_dir(directory)
        return st
    except OSError as e:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise StateError(f"cannot write {path}: {e.strerror or e}") from e


# -- the store --------------------------------------------------------------------------------
class StateStore:
    """Sandbox state documents under `<run_root>/sbs/<id>/`, written atomically.

    `lock(id)` / `alock(id)` serialise processes (flock); they are not reentrant. Hold one
    around read-modify-write sequences (`save_hypervisor`) that may race with another writer.
    """

    def __init__(self, run_root: str | None = None) -> None:
        self.run_root = _resolve_root(run_root)
        self.sbs_root = os.path.join(self.run_root, "sbs")
        self._written: dict[str, tuple[int, int, int, int]] = {}

    def dir(self, id: str) -> str:
        """`<run_root>/sbs/<id>`."""
        return os.path.join(self.sbs_root, validate_id(id))

    def path(self, id: str) -> str:
        """The state file of sandbox `id`."""
        return os.path.join(self.dir(id), STATE_FILE)

    def write(self, id: str, doc: dict[str, Any]) -> None:
        """Atomically replace the state of `id` with `doc` (a JSON-safe dict)."""
        path = self.path(id)
        if not isinstance(doc, dict):
            raise StateError(f"state of sandbox {id!r} must be a dict, got {type(doc).__name__}")
        try:
            data = json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()
        except (TypeError, ValueError) as e:
            raise StateError(f"state of sandbox {id!r} is not JSON-serialisable: {e}") from e
        remove_stale_temps(os.path.dirname(path))
        st = atomic_write(path, data + b"\n", durable=False)  # see the module docstring
        self._written[id] = _identity(st)

    def unchanged_since_write(self, id: str) -> bool:
        """True while the state file of `id` is still the one this store last wrote (no other
        process has replaced it since): a cheap stat instead of reading and parsing it."""
        known = self._written.get(id)
        try:
            return known is not None and _identity(os.stat(self.path(id))) == known
        except OSError:
            return False

    def read(self, id: str) -> dict[str, Any]:
        """The state document of `id`; `StateError` when missing or corrupt."""
        path = self.path(id)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise StateError(f"no persisted state for sandbox {id!r} ({path})") from None
        except OSError as e:
            raise StateError(f"cannot read {path}: {e.strerror or e}") from e
        try:
            doc = json.loads(data)
        except ValueError as e:
            raise StateError(f"corrupt state file {path}: {e}") from e
        if not isinstance(doc, dict):
            raise StateError(f"corrupt state file {path}: top level is {type(doc).__name__}")
        return doc

    def exists(self, id: str) -> bool:
        """True when sandbox `id` has a state file."""
        return os.path.isfile(self.path(id))

    def delete(self, id: str) -> None:
        """Remove the sandbox directory (state, lock, temp files); a no-op when absent."""
        import shutil

        directory = self.dir(id)
        self._written.pop(id, None)
        for attempt in range(DELETE_TRIES):
            try:
                shutil.rmtree(directory)
                return
            except FileNotFoundError:
                return
            except OSError as e:
                # A process waiting for the lock re-creates its lock file between rmtree's
                # unlink and rmdir: remove the directory again.
                if e.errno == errno.ENOTEMPTY and attempt + 1 < DELETE_TRIES:
                    continue
                raise StateError(f"cannot delete {directory}: {e.strerror or e}") from e

    def list(self) -> list[str]:
        """Sorted ids of the sandboxes that have a state file."""
        try:
            names = os.listdir(self.sbs_root)
        except FileNotFoundError:
            return []
        except OSError as e:
            raise StateError(f"cannot list {self.sbs_root}: {e.strerror or e}") from e
        return sorted(
            n
            for n in names
            if _ID_RE.fullmatch(n)
            and ".." not in n
            and len(n) <= ID_MAX_LEN
            and os.path.isfile(os.path.join(self.sbs_root, n, STATE_FILE))
        )

    # -- locking ----------------------------------------------------------------------------
    def lock_path(self, id: str) -> str:
        """The flock target of sandbox `id`."""
        return os.path.join(self.dir(id), LOCK_FILE)

    def set_runstate(self, id: str, state: str) -> None:
        """Record that the VM of `id` is "running" or "paused" (one byte, written in place)."""
        code = _RUNSTATE_CODES.get(state)
        if code is None:
            raise StateError(f"sandbox {id!r}: run state must be running or paused, not {state!r}")
        path = os.path.join(self.dir(id), RUNSTATE_FILE)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
            try:
                os.pwrite(fd, code, 0)
            finally:
                os.close(fd)
        except OSError as e:
            raise StateError(f"cannot write {path}: {e.strerror or e}") from e

    def runstate(self, id: str) -> str | None:
        """ "running" or "paused" as last recorded by `set_runstate`; None if never recorded."""
        path = os.path.join(self.dir(id), RUNSTATE_FILE)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StateError(f"cannot read {path}: {e.strerror or e}") from e
        try:
            return _RUNSTATE_NAMES.get(os.pread(fd, 1, 0))
        finally:
            os.close(fd)

    def _acquire(self, id: str, timeout: float, cancel: threading.Event | None = None) -> int:
        """Take the exclusive flock of `id`, polling until `timeout`; return the locked fd."""
        path = self.lock_path(id)
        deadline = time.monotonic() + timeout
        delay = 0.002
        while True:
            fd = _try_flock(path)
            if fd is not None:
                return fd
            if cancel is not None and cancel.is_set():
                raise StateError(f"gave up waiting for the lock of sandbox {id!r}: cancelled")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise StateError(
                    f"timed out after {timeout:g} s waiting for the lock of sandbox {id!r} "
                    f"({path}): another process holds it"
                )
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, 0.05)

    @contextlib.contextmanager
    def lock(self, id: str, timeout: float = 30.0) -> Iterator[None]:
        """Hold the exclusive lock of sandbox `id` (waits at most `timeout` seconds)."""
        fd = self._acquire(id, timeout)
        try:
            yield
        finally:
            os.close(fd)

    @contextlib.asynccontextmanager
    async def alock(self, id: str, timeout: float = 30.0) -> AsyncIterator[None]:
        """`lock` for async code: a free lock is taken at once; waiting for a busy one happens
        in a worker thread."""
        import asyncio
        import threading

        validate_id(id)
        fd = _try_flock(self.lock_path(id))
        if fd is None:
            cancel = threading.Event()
            loop = asyncio.get_running_loop()
            fut = loop.run_in_executor(None, self._acquire, id, timeout, cancel)
            try:
                fd = await asyncio.shield(fut)
            except asyncio.CancelledError:
                cancel.set()
                fut.add_done_callback(_close_acquired)
                raise
        try:
            yield
        finally:
            os.close(fd)

    # -- hypervisor state -------------------------------------------------------------------
    def save_hypervisor(self, id: str, state: HypervisorState) -> None:
        """Store `state` under the document's `"hypervisor"` key, keeping the other keys."""
        doc = self.read(id) if self.exists(id) else {}
        doc["hypervisor"] = state.model_dump(mode="json")
        self.write(id, doc)

    def load_hypervisor(self, id: str) -> HypervisorState:
        """The `HypervisorState` saved for `id`; `StateError` when absent or invalid."""
        from pydantic import ValidationError

        from .hypervisor_state import HypervisorState

        doc = self.read(id)
        if "hypervisor" not in doc:
            raise StateError(f"state of sandbox {id!r} ({self.path(id)}) has no hypervisor state")
        try:
            return HypervisorState.model_validate(doc["hypervisor"])
        except ValidationError as e:
            raise StateError(
                f"invalid hypervisor state for sandbox {id!r} in {self.path(id)}: {e}"
            ) from e


def _try_flock(path: str) -> int | None:
    """The fd of `path` locked exclusively, or None when busy (or deleted meanwhile)."""
    try:
        ensure_dir(os.path.dirname(path))
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    except FileNotFoundError:
        return None  # the directory was deleted between creating it and opening the file
    except OSError as e:
        raise StateError(f"cannot open lock file {path}: {e.strerror or e}") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return None
        raise StateError(f"cannot lock {path}: {e.strerror or e}") from e
    if not _same_file(fd, path):
        os.close(fd)  # `delete` removed the file we locked: lock the new one
        return None
    if os.fstat(fd).st_mode & 0o777 != FILE_MODE:
        with contextlib.suppress(PermissionError):
            os.fchmod(fd, FILE_MODE)
    return fd


def _same_file(fd: int, path: str) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    fst = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino)


def _close_acquired(fut: asyncio.Future[int] | Future[int]) -> None:
    """Release a lock whose waiter was cancelled after the worker thread had taken it."""
    if not fut.cancelled() and fut.exception() is None:
        os.close(fut.result())
