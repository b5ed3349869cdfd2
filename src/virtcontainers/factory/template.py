"""VM templates: boot a VM once, keep its memory and device state, clone it in about 0.1 s.

A template named N has its metadata in `<store root>/N/template.json` (written last: without
it a template is incomplete) and two files next to it, or in a directory the user names:

- `memory`: guest RAM. The template VM maps it shared (`memory-backend-file,share=on`); every
  clone maps it private (copy-on-write), so the template's pages are shared by all clones.
- `state`: QEMU's device state, saved with `x-ignore-shared` + `migrate fd:` (the file is
  opened here and passed to QEMU as an fd).

Run as root, the store mounts a tmpfs per template sized to the guest memory plus headroom.
A clone is refused with `TemplateMismatchError` when its QEMU, kernel, initrd or config is
not the one the template was made with.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from .. import persist
from ..agent.endpoint import plug_agent_channel
from ..config import HypervisorConfig
from ..errors import ConfigError, StateError, VCError
from ..hypervisor import new_hypervisor
from ..types import Capabilities, HypervisorType
from . import memcopy, paths, tmpfs
from .errors import TemplateError, TemplateMismatchError
from .vm import VM, new_vm_id, stop_quietly
from .vmconfig import VMConfig, config_hash, differences

log = logging.getLogger(__name__)

FORMAT = 1
METADATA_FILE = paths.TEMPLATE_METADATA
LOCATION_FILE = "location"
"""Where the files of a template in a user-named directory are (written before they exist,
so a template whose metadata is lost can still be removed)."""
MEMORY_FILE = paths.TEMPLATE_MEMORY
STATE_FILE = "state"
HEADROOM_MIB = 32
"""tmpfs space beyond guest memory: device state, metadata, slack."""
LOCK_TIMEOUT = 10.0
CREATE_TIMEOUT = 60.0
CLONE_TIMEOUT = 30.0
QEMU_BINARY = "qemu-system-x86_64"
_HASH_CHUNK = 1 << 20


class FileStamp(BaseModel):
    """Identity of a file: path, size, mtime, inode and (for assets) its sha256."""

    model_config = ConfigDict(extra="forbid", defer_build=True)

    path: str
    size: int
    mtime_ns: int
    ino: int
    sha256: str = ""

    @classmethod
    def of(cls, path: str, *, digest: bool = True) -> FileStamp:
        st = os.stat(path)
        return cls(
            path=path,
            size=st.st_size,
            mtime_ns=st.st_mtime_ns,
            ino=st.st_ino,
            sha256=sha256_file(path) if digest else "",
        )

    def unchanged(self, other: FileStamp) -> bool:
        """Same path, size, mtime and inode: the same file, not modified since."""
        return (self.path, self.size, self.mtime_ns, self.ino) == (
            other.path,
            other.size,
            other.mtime_ns,
            other.ino,
        )


class TemplateInfo(BaseModel):
    """The metadata file of a template."""

    model_config = ConfigDict(extra="forbid", defer_build=True)

    format: int
    name: str
    created_at: float
    hypervisor: str
    qemu: FileStamp
    qemu_version: str
    config: dict[str, Any]
    config_hash: str
    kernel: FileStamp
    initrd: FileStamp | None = None
    image: FileStamp | None = None
    num_vcpus: int
    memory_mib: int
    directory: str
    tmpfs: bool
    state_sha256: str
    boot_seconds: float
    agent_version: str = ""

    @property
    def memory_path(self) -> str:
        return os.path.join(self.directory, MEMORY_FILE)

    @property
    def state_path(self) -> str:
        return os.path.join(self.directory, STATE_FILE)

    def base_config(self) -> HypervisorConfig:
        """The config every clone is made from (template fields cleared)."""
        try:
            return HypervisorConfig.from_dict(self.config)
        except ConfigError as exc:
            raise TemplateError(f"template {self.name}: stored config is invalid: {exc}") from exc

    def clone_config(self) -> HypervisorConfig:
        cfg = self.base_config()
        cfg.boot_from_template = True
        cfg.memory_path = self.memory_path
        cfg.devices_state_path = self.state_path
        return cfg


@dataclass(frozen=True)
class TemplateEntry:
    """One template as `TemplateStore.list()` reports it: its metadata, or what is wrong."""

    name: str
    info: TemplateInfo | None
    problem: str = ""


# -- helpers ----------------------------------------------------------------------------------
def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


_version_cache: dict[tuple[str, int, int, int], str] = {}


def qemu_version(path: str) -> str:
    """First line of `<qemu> --version` (cached per binary identity)."""
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _version_cache:
        try:
            out = subprocess.run(
                [path, "--version"],
                capture_output=True,
                text=True,
                timeout=10,
                stdin=subprocess.DEVNULL,
                check=False,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise TemplateError(f"cannot run {path} --version: {exc}") from exc
        lines = [ln.strip() for ln in out.stdout.splitlines() if ln.strip()]
        if out.returncode != 0 or not lines:
            raise TemplateError(f"{path} --version failed (exit code {out.returncode})")
        _version_cache[key] = lines[0]
    return _version_cache[key]


def resolve_qemu(config: HypervisorConfig) -> str:
    """The QEMU binary a VM of `config` runs (real path)."""
    path = config.hypervisor_asset_path() or shutil.which(QEMU_BINARY) or ""
    if not path or not os.path.isfile(path):
        raise TemplateError(
            f"QEMU binary {path or QEMU_BINARY} not found (set hypervisor_path or install "
            "qemu-system-x86)"
        )
    return os.path.realpath(path)


def _stamp(name: str, path: str) -> FileStamp:
    try:
        return FileStamp.of(path)
    except OSError as exc:
        raise TemplateError(f"{name} {path}: {exc.strerror}") from exc


# -- the store --------------------------------------------------------------------------------
class TemplateStore:
    """Templates under one root directory (default `<run root>/templates`)."""

    def __init__(self, root: str | None = None, *, run_root: str | None = None) -> None:
        self.run_root = persist.run_root(run_root)
        self.root = os.path.abspath(root) if root else paths.templates_dir(self.run_root)

    def template_dir(self, name: str) -> str:
        return os.path.join(self.root, persist.validate_id(name, "template name"))

    def metadata_path(self, name: str) -> str:
        return os.path.join(self.template_dir(name), METADATA_FILE)

    def _lock_path(self, name: str) -> str:
        return os.path.join(self.root, f".{persist.validate_id(name, 'template name')}.lock")

    # -- locking ----------------------------------------------------------------------------
    def _open_lock(self, name: str) -> int:
        persist.ensure_dir(self.root)
        return os.open(self._lock_path(name), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def _busy(self, name: str, timeout: float) -> TemplateError:
        return TemplateError(
            f"template {name} is busy (being created, removed or cloned); "
            f"gave up after {timeout:g}s"
        )

    @contextlib.contextmanager
    def _lock(self, name: str, *, timeout: float) -> Iterator[None]:
        """Exclusive lock on template `name` (create, remove)."""
        fd = self._open_lock(name)
        try:
            deadline = time.monotonic() + timeout
            while not _try_flock(fd, fcntl.LOCK_EX):
                if time.monotonic() >= deadline:
                    raise self._busy(name, timeout)
                time.sleep(0.01)
            yield
        finally:
            os.close(fd)

    @contextlib.asynccontextmanager
    async def _shared_lock(self, name: str, *, timeout: float) -> AsyncIterator[None]:
        """Shared lock on template `name` (clones), waiting without blocking the loop."""
        fd = self._open_lock(name)
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            while not _try_flock(fd, fcntl.LOCK_SH):
                if loop.time() >= deadline:
                    raise self._busy(name, timeout)
                await asyncio.sleep(0.01)
            yield
        finally:
            os.close(fd)

    # -- reading ----------------------------------------------------------------------------
    def get(self, name: str) -> TemplateInfo:
        """The metadata of template `name`; `TemplateError` if missing or unreadable."""
        path = self.metadata_path(name)
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            if os.path.isdir(self.template_dir(name)):
                raise TemplateError(
                    f"template {name} is incomplete (no {METADATA_FILE}); "
                    f"remove it with `virtc template rm {name}` and create it again"
                ) from None
            raise TemplateError(f"no such template: {name} (in {self.root})") from None
        except OSError as exc:
            raise TemplateError(f"template {name}: cannot read {path}: {exc.strerror}") from exc
        try:
            info = TemplateInfo.model_validate_json(raw)
        except ValidationError as exc:
            first = exc.errors()[0] if exc.errors() else {"msg": str(exc)}
            raise TemplateError(
                f"template {name}: metadata file {path} is corrupt ({first.get('msg')}); "
                "remove the template and create it again"
            ) from None
        if info.format != FORMAT:
            raise TemplateError(
                f"template {name}: metadata format {info.format} is not {FORMAT}; recreate it"
            )
        if info.name != name:
            raise TemplateError(f"template {name}: metadata names another template {info.name!r}")
        return info

    def list(self) -> list[TemplateEntry]:
        """Every template under the root, broken ones with the reason."""
        try:
            names = sorted(os.listdir(self.root))
        except FileNotFoundError:
            return []
        out: list[TemplateEntry] = []
        for name in names:
            if name.startswith(".") or not os.path.isdir(os.path.join(self.root, name)):
                continue
            try:
                out.append(TemplateEntry(name, self.get(name)))
            except (TemplateError, ConfigError) as exc:
                out.append(TemplateEntry(name, None, str(exc)))
        return out

    def verify(self, info: TemplateInfo, config: HypervisorConfig | None = None) -> None:
        """Refuse a clone whose files are damaged or whose QEMU/assets/config differ."""
        name = info.name
        expected = info.memory_mib << 20
        try:
            size = os.stat(info.memory_path).st_size
        except OSError as exc:
            raise TemplateError(
                f"template {name}: memory file {info.memory_path}: {exc.strerror}"
            ) from exc
        if size != expected:
            raise TemplateError(
                f"template {name}: memory file {info.memory_path} has {size} bytes, expected "
                f"{expected} ({info.memory_mib} MiB); the template is corrupt, recreate it"
            )
        try:
            digest = sha256_file(info.state_path)
        except OSError as exc:
            raise TemplateError(
                f"template {name}: device state file {info.state_path}: {exc.strerror}"
            ) from exc
        if digest != info.state_sha256:
            raise TemplateError(
                f"template {name}: device state file {info.state_path} does not match its "
                "checksum; the template is corrupt, recreate it"
            )
        base = info.base_config()
        if config is not None:
            diff = differences(base, config)
            if diff:
                raise TemplateMismatchError(
                    f"template {name} was made with another config: {', '.join(diff)} differ"
                )
        self._verify_qemu(info, base)
        for what, stamp in (
            ("kernel", info.kernel),
            ("initrd", info.initrd),
            ("image", info.image),
        ):
            if stamp is not None:
                _verify_asset(name, what, stamp)

    def _verify_qemu(self, info: TemplateInfo, base: HypervisorConfig) -> None:
        path = resolve_qemu(base)
        try:
            now = FileStamp.of(path, digest=False)
        except OSError as exc:
            raise TemplateError(f"QEMU binary {path}: {exc.strerror}") from exc
        if now.unchanged(info.qemu):
            return
        version = qemu_version(path)
        if path != info.qemu.path or version != info.qemu_version:
            raise TemplateMismatchError(
                f"template {info.name} was made by {info.qemu_version} ({info.qemu.path}); "
                f"this clone would run {version} ({path}); recreate the template"
            )

    # -- create -----------------------------------------------------------------------------
    async def create(
        self,
        name: str,
        config: HypervisorConfig,
        *,
        directory: str | None = None,
        timeout: float = CREATE_TIMEOUT,
    ) -> TemplateInfo:
        """Boot a VM from `config`, wait for its agent, save it as template `name`, stop it.

        Files go on a new tmpfs at `<root>/<name>` (root only), or in `<directory>/<name>`.
        """
        tdir = self.template_dir(name)
        vmc = VMConfig.of(config, HypervisorType.QEMU)
        cfg = vmc.config
        _refuse_untemplatable(cfg)
        qemu = resolve_qemu(cfg)
        persist.ensure_dir(self.root)
        with self._lock(name, timeout=0):
            if os.path.exists(os.path.join(tdir, METADATA_FILE)):
                raise TemplateError(f"template {name} already exists (in {self.root})")
            if os.path.lexists(tdir):
                log.warning("template %s: removing what a failed creation left behind", name)
                self._remove_files(name)
            files = self._prepare_files(name, cfg.memory_size, directory)
            try:
                return await self._create(name, cfg, qemu, files, timeout)
            except BaseException:
                self._remove_files(name, files_dir=files)
                raise

    def _prepare_files(self, name: str, memory_mib: int, directory: str | None) -> str:
        """Make the directory the template's memory and state go to; return it."""
        tdir = self.template_dir(name)
        need = (memory_mib + HEADROOM_MIB) << 20
        if directory is None:
            if os.geteuid() != 0:
                raise TemplateError(
                    f"template {name}: mounting a tmpfs needs root; name a directory for the "
                    "template files instead (e.g. one on /dev/shm)"
                )
            persist.ensure_dir(tdir)
            try:
                tmpfs.mount_tmpfs(tdir, need)
            except OSError as exc:
                with contextlib.suppress(OSError):
                    os.rmdir(tdir)
                raise TemplateError(
                    f"template {name}: cannot mount a tmpfs on {tdir}: {exc}"
                ) from exc
            return tdir
        base = os.path.abspath(directory)
        if not os.path.isdir(base):
            raise TemplateError(f"template directory {base} does not exist")
        check_room(name, base, memory_mib)
        files = os.path.join(base, name)
        try:
            os.mkdir(files, 0o700)
        except FileExistsError:
            raise TemplateError(
                f"template {name}: {files} already exists; remove it or name another directory"
            ) from None
        except OSError as exc:
            raise TemplateError(f"template {name}: cannot create {files}: {exc.strerror}") from exc
        persist.ensure_dir(tdir)
        try:
            persist.atomic_write(os.path.join(tdir, LOCATION_FILE), files.encode())
        except StateError as exc:
            os.rmdir(files)
            raise TemplateError(f"template {name}: {exc}") from exc
        return files

    async def _create(
        self, name: str, cfg: HypervisorConfig, qemu: str, files: str, timeout: float
    ) -> TemplateInfo:
        tcfg = cfg.copy()
        tcfg.boot_to_be_template = True
        tcfg.memory_path = os.path.join(files, MEMORY_FILE)
        tcfg.devices_state_path = os.path.join(files, STATE_FILE)
        hv = new_hypervisor(HypervisorType.QEMU, self.run_root)
        vm: VM | None = None
        loop = asyncio.get_running_loop()
        start = loop.time()
        try:
            await hv.create_sandbox(new_vm_id("tpl"), None, tcfg)
            hv.require(
                Capabilities.TEMPLATE,
                f"VM templates (machine {cfg.hypervisor_machine_type or 'q35'})",
            )
            endpoint = await plug_agent_channel(hv, hv.id)
            await hv.start_sandbox(timeout)
            vm = VM(hv, endpoint, cpu=cfg.num_vcpus, memory_mb=cfg.memory_size, origin="template")
            await vm.wait_agent(max(0.1, start + timeout - loop.time()), booting=True)
            boot_seconds = loop.time() - start
            agent_version = (await vm.agent()).agent_version
            await vm.quiesce()
            await hv.save_sandbox()
            await vm.stop()
            vm = None
        except VCError as exc:
            await stop_quietly(vm, hv)
            raise TemplateError(
                f"creating template {name} failed{_space_hint(files)}: {exc}"
            ) from exc
        except BaseException:
            await stop_quietly(vm, hv)
            raise
        info = TemplateInfo(
            format=FORMAT,
            name=name,
            created_at=time.time(),
            hypervisor=str(HypervisorType.QEMU),
            qemu=FileStamp.of(qemu, digest=False),
            qemu_version=qemu_version(qemu),
            config=_base_dict(cfg),
            config_hash=config_hash(cfg),
            kernel=_stamp("kernel", cfg.kernel_asset_path()),
            initrd=_stamp("initrd", cfg.initrd_asset_path()) if cfg.initrd_asset_path() else None,
            image=_stamp("image", cfg.image_asset_path()) if cfg.image_asset_path() else None,
            num_vcpus=cfg.num_vcpus,
            memory_mib=cfg.memory_size,
            directory=files,
            tmpfs=files == self.template_dir(name),
            state_sha256=sha256_file(tcfg.devices_state_path),
            boot_seconds=round(boot_seconds, 3),
            agent_version=agent_version,
        )
        try:
            persist.atomic_write(self.metadata_path(name), info.model_dump_json(indent=2).encode())
        except StateError as exc:
            raise TemplateError(f"template {name}: {exc}") from exc
        return info

    # -- remove -----------------------------------------------------------------------------
    def remove(self, name: str) -> None:
        """Delete template `name`. Running clones keep working (their memory stays mapped)."""
        tdir = self.template_dir(name)
        if not os.path.lexists(tdir):
            raise TemplateError(f"no such template: {name} (in {self.root})")
        with self._lock(name, timeout=LOCK_TIMEOUT):
            self._remove_files(name)

    def _remove_files(self, name: str, files_dir: str | None = None) -> None:
        tdir = self.template_dir(name)
        if files_dir is None:
            with contextlib.suppress(TemplateError, OSError):
                files_dir = self.get(name).directory
        if files_dir is None:
            with (
                contextlib.suppress(OSError, UnicodeDecodeError),
                open(os.path.join(tdir, LOCATION_FILE), encoding="utf-8") as f,
            ):
                files_dir = f.read().strip() or None
        if files_dir and files_dir != tdir:
            for fname in (MEMORY_FILE, STATE_FILE):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(files_dir, fname))
            with contextlib.suppress(FileNotFoundError):
                os.rmdir(files_dir)
        if tmpfs.is_mountpoint(tdir):
            try:
                tmpfs.unmount(tdir)
            except OSError as exc:
                raise TemplateError(f"template {name}: cannot unmount {tdir}: {exc}") from exc
        shutil.rmtree(tdir, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._lock_path(name))

    # -- clone ------------------------------------------------------------------------------
    async def clone(
        self,
        name: str,
        config: HypervisorConfig | None = None,
        *,
        id: str | None = None,
        timeout: float = CLONE_TIMEOUT,
        fresh_identity: bool = True,
    ) -> VM:
        """A running VM restored from template `name`, with its own sockets and directory.

        `config`, when given, must match the template's (vCPUs and memory aside: the clone
        has the template's; the factory hot-adds more). With `fresh_identity` the clone's RNG
        is reseeded and its clock set through the agent before it is returned.
        """
        info = self.get(name)
        self.verify(info, config)
        cfg = info.clone_config()
        from ..drivers.qemu.driver import QemuHypervisor

        hv = new_hypervisor(HypervisorType.QEMU, self.run_root)
        assert isinstance(hv, QemuHypervisor)
        vm: VM | None = None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        memory = -1
        fill: asyncio.Future[None] | None = None
        try:
            vm_id = id or new_vm_id()
            async with self._shared_lock(name, timeout=LOCK_TIMEOUT):
                # QEMU opens the memory file (or it is copied) during start; removal waits.
                if not os.path.exists(self.metadata_path(name)):
                    raise TemplateError(f"template {name} was removed")
                if cfg.shared_fs == "virtio-fs":
                    # Filled while QEMU starts (or since the command began: memcopy): nothing
                    # reads guest memory before the incoming migration, which waits for it.
                    ahead = memcopy.take(info.memory_path)
                    if ahead is not None:
                        memory, fill = ahead[0], asyncio.wrap_future(ahead[1])
                    else:
                        memory = memcopy.private_memory(name, info.memory_mib << 20, vm_id)
                        fill = asyncio.ensure_future(
                            asyncio.to_thread(
                                memcopy.fill_private_memory, name, info.memory_path, memory
                            )
                        )
                    cfg.memory_path = f"/proc/{os.getpid()}/fd/{memory}"
                    hv.memory_ready = fill
                await hv.create_sandbox(vm_id, None, cfg)
                endpoint = await plug_agent_channel(hv, vm_id)
                await hv.start_sandbox(timeout)
            vm = VM(
                hv,
                endpoint,
                cpu=info.num_vcpus,
                memory_mb=info.memory_mib,
                origin=f"template:{name}",
            )
            if fresh_identity:
                await vm.wait_agent(max(0.1, deadline - loop.time()), fresh_identity=True)
        except VCError as exc:
            await stop_quietly(vm, hv)
            if isinstance(exc, TemplateError):
                raise
            raise TemplateError(f"cloning template {name} failed: {exc}") from exc
        except BaseException:
            await stop_quietly(vm, hv)
            raise
        finally:
            if fill is not None:
                # The copy cannot be interrupted: its fd stays open until it has ended.
                with contextlib.suppress(BaseException):
                    await asyncio.shield(fill)
            if memory >= 0:
                os.close(memory)  # QEMU has its own
        return vm


def _verify_asset(name: str, what: str, stamp: FileStamp) -> None:
    try:
        now = FileStamp.of(stamp.path, digest=False)
    except OSError as exc:
        raise TemplateMismatchError(
            f"template {name}: its {what} {stamp.path} is gone ({exc.strerror})"
        ) from exc
    if now.unchanged(stamp):
        return
    if sha256_file(stamp.path) != stamp.sha256:
        raise TemplateMismatchError(
            f"template {name}: its {what} {stamp.path} changed since the template was made; "
            "recreate the template"
        )


def _base_dict(cfg: HypervisorConfig) -> dict[str, Any]:
    base = cfg.copy()
    base.boot_to_be_template = base.boot_from_template = False
    base.memory_path = base.devices_state_path = ""
    return base.to_dict()


def _refuse_untemplatable(cfg: HypervisorConfig) -> None:
    if cfg.huge_pages or cfg.file_backed_mem_root_dir:
        raise ConfigError(
            "huge_pages / file_backed_mem_root_dir: a template's memory is its own file; "
            "these settings cannot be combined with VM templates"
        )
    if cfg.boot_to_be_template or cfg.boot_from_template:
        raise ConfigError(
            "boot_to_be_template / boot_from_template are set by the template store; "
            "pass a plain config"
        )


def check_room(name: str, directory: str, memory_mib: int) -> None:
    """Refuse a directory without room for a template of a `memory_mib` VM: a guest whose
    memory file cannot grow dies of SIGBUS."""
    need = (memory_mib + HEADROOM_MIB) << 20
    free = tmpfs.free_bytes(directory)
    if free < need:
        raise TemplateError(
            f"template {name}: {directory} has {free >> 20} MiB free, but a template of a "
            f"{memory_mib} MiB VM needs {need >> 20} MiB (guest memory + "
            f"{HEADROOM_MIB} MiB headroom)"
        )


def _space_hint(files: str) -> str:
    """When the template's filesystem is (nearly) full, say so: QEMU dies of SIGBUS then."""
    try:
        free = tmpfs.free_bytes(files)
    except OSError:
        return ""
    if free < (4 << 20):
        return f" (the filesystem of {files} is full: {free >> 20} MiB free)"
    return ""


def _try_flock(fd: int, mode: int) -> bool:
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True
