"""Guest assets cache: build kernel + initrd once per set of inputs, reuse them after.

An entry lives in `<cache>/<key>/` where the key hashes every input (kernel
package version, busybox binary, agent source, module list, builder version). It
is built in a temporary directory and renamed into place under an exclusive lock,
so concurrent builders (threads or processes) never see or leave half an entry.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

from ..errors import AssetError
from ..host import host_dir
from . import initrd as initrd_mod
from . import kernel as kernel_mod
from .vmlinux import extract_vmlinux

log = logging.getLogger(__name__)

BUILDER_VERSION = 3
"""Bump whenever the build recipe changes in a way the other inputs do not capture."""
KERNEL_FILE = "vmlinuz"
VMLINUX_FILE = "vmlinux"
INITRD_FILE = "initrd.img"
MANIFEST = "manifest.json"
LOCK_FILE = ".lock"
LOCK_TIMEOUT = 900.0
_ENTRY_NAME = re.compile(r"[0-9a-f]{24}|\.(build|old)-.+")
"""Directories the cache itself creates: entries (24 hex digits) and in-progress builds."""


@dataclass(frozen=True)
class GuestAssets:
    """A built kernel and initrd, ready to boot."""

    kernel: str
    """The kernel to boot: the ELF vmlinux when the kernel has a PVH entry point (QEMU,
    Firecracker and Cloud Hypervisor load it directly, skipping the decompressor), else the
    bzImage."""
    initrd: str
    kernel_version: str
    key: str
    directory: str
    kernel_package: str
    kernel_package_version: str
    modules: tuple[str, ...]
    """Module names the agent loads at boot (dependencies not listed)."""
    agent_version: str
    bzimage: str = ""
    """The compressed kernel as packaged (for VMMs that boot only bzImages)."""
    kernel_hz: int = 0
    """The kernel's CONFIG_HZ (0 if unknown)."""
    built: bool = False
    """True when this call built the assets, False when it reused the cache."""


def default_cache_dir() -> str:
    """`$VC_ASSETS_DIR`, else /var/cache/virtcontainers/assets as root, else ~/.cache/..."""
    return host_dir(
        "VC_ASSETS_DIR",
        "/var/cache/virtcontainers/assets",
        "XDG_CACHE_HOME",
        ".cache",
        "virtcontainers",
        "assets",
    )


def _agent_version() -> str:
    for line in initrd_mod.agent_source().decode().splitlines():
        if line.startswith("#define AGENT_VERSION"):
            return line.split('"')[1]
    return "unknown"


_hashes: dict[tuple[str, int, int, int, int], str] = {}
"""Hashes of input files by (path, inode, size, mtime, ctime): `ensure_assets` runs at every
sandbox's configuration (a shim's Create included); a zygote fills this before it forks."""


def _file_sha256(path: str) -> str:
    """`initrd.file_sha256`, computed again only once the file has changed."""
    st = os.stat(path)
    key = (path, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    digest = _hashes.get(key)
    if digest is None:
        digest = _hashes[key] = initrd_mod.file_sha256(path)
    return digest


def _inputs(cache_dir: str) -> dict[str, Any]:
    pkg = kernel_mod.resolve_package(cache_dir)
    busybox = initrd_mod.busybox_path()
    return {
        "builder": BUILDER_VERSION,
        "kernel_package": pkg.name,
        "kernel_package_version": pkg.version,
        "busybox_sha256": _file_sha256(busybox),
        "agent_sha256": hashlib.sha256(initrd_mod.agent_source()).hexdigest(),
        "runner_sha256": hashlib.sha256(initrd_mod.runner_source()).hexdigest(),
        "cflags": list(initrd_mod.CFLAGS),
        "runner_libs": list(initrd_mod.RUNNER_LIBS),
        "libseccomp_sha256": (
            _file_sha256(initrd_mod.LIBSECCOMP_A) if os.path.exists(initrd_mod.LIBSECCOMP_A) else ""
        ),
        "required_modules": list(kernel_mod.REQUIRED_MODULES),
        "optional_modules": list(kernel_mod.OPTIONAL_MODULES),
        "compression": initrd_mod.default_compression(),
    }


def _key(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:24]


def _load(entry: str) -> GuestAssets | None:
    try:
        with open(os.path.join(entry, MANIFEST)) as f:
            doc = json.load(f)
        features = doc.get("kernel_features", {})
        vmlinux = os.path.join(entry, VMLINUX_FILE) if features.get("pvh") else ""
        assets = GuestAssets(
            kernel=vmlinux or os.path.join(entry, KERNEL_FILE),
            initrd=os.path.join(entry, INITRD_FILE),
            kernel_version=doc["kernel_version"],
            key=doc["key"],
            directory=entry,
            kernel_package=doc["inputs"]["kernel_package"],
            kernel_package_version=doc["inputs"]["kernel_package_version"],
            modules=tuple(doc["modules"]),
            agent_version=doc["agent_version"],
            bzimage=os.path.join(entry, KERNEL_FILE),
            kernel_hz=int(features.get("hz", 0)),
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if not all(os.path.isfile(p) for p in (assets.kernel, assets.bzimage, assets.initrd)):
        return None
    return assets


@contextlib.contextmanager
def _locked(cache_dir: str) -> Iterator[None]:
    path = os.path.join(cache_dir, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        deadline = time.monotonic() + LOCK_TIMEOUT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise AssetError(
                        f"another process has held {path} for {LOCK_TIMEOUT:g}s"
                    ) from None
                time.sleep(0.1)
        yield
    finally:
        os.close(fd)


def _ensure_dir(cache_dir: str) -> None:
    try:
        os.makedirs(cache_dir, exist_ok=True)
    except OSError as exc:
        raise AssetError(f"cannot create the assets cache {cache_dir}: {exc.strerror}") from None


def hash_inputs(cache_dir: str | None = None) -> str:
    """The cache key of the assets the inputs call for (hashing the input files now: a
    zygote calls this before it forks, so that its commands find the hashes done)."""
    return _key(_inputs(os.path.abspath(cache_dir or default_cache_dir())))


def ensure_assets(cache_dir: str | None = None) -> GuestAssets:
    """Kernel and initrd for the guest, from the cache or built now (first use)."""
    return build_assets(force=False, cache_dir=cache_dir)


def build_assets(force: bool = False, cache_dir: str | None = None) -> GuestAssets:
    """Build the assets unless a cached entry for the same inputs exists (or `force`)."""
    cache_dir = os.path.abspath(cache_dir or default_cache_dir())
    _ensure_dir(cache_dir)
    inputs = _inputs(cache_dir)
    key = _key(inputs)
    entry = os.path.join(cache_dir, key)
    if not force and (found := _load(entry)) is not None:
        return found
    with _locked(cache_dir):
        if not force and (found := _load(entry)) is not None:
            return found  # another process built it while we waited
        started = time.monotonic()
        log.info("building guest assets %s in %s", key, cache_dir)
        tmp = tempfile.mkdtemp(prefix=".build-", dir=cache_dir)
        try:
            _build(inputs, key, cache_dir, tmp)
            if os.path.isdir(entry):
                old = tempfile.mkdtemp(prefix=".old-", dir=cache_dir)
                os.rename(entry, os.path.join(old, "entry"))
                os.rename(os.path.join(tmp, "out"), entry)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(os.path.join(tmp, "out"), entry)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("guest assets built in %.1fs", time.monotonic() - started)
    built = _load(entry)
    if built is None:
        raise AssetError(f"guest assets in {entry} are incomplete right after building them")
    return GuestAssets(**{**asdict(built), "built": True})


@dataclass(frozen=True)
class StaleEntry:
    """A cache directory the current inputs no longer use."""

    name: str
    path: str
    size: int
    """Bytes its files take."""


def _tree_size(path: str) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def _stale(cache_dir: str, key: str) -> list[StaleEntry]:
    try:
        names = sorted(os.listdir(cache_dir))
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise AssetError(f"cannot list the assets cache {cache_dir}: {exc.strerror}") from None
    out = []
    for name in names:
        path = os.path.join(cache_dir, name)
        if name != key and _ENTRY_NAME.fullmatch(name) and os.path.isdir(path):
            out.append(StaleEntry(name, path, _tree_size(path)))
    return out


def prune_assets(cache_dir: str | None = None, dry_run: bool = False) -> list[StaleEntry]:
    """Remove cache entries built from other inputs (older kernels, agents, recipes).

    Keeps the entry the current inputs select and the downloaded kernel package; a build
    left half-done by a killed builder goes too. Sandboxes already running keep working
    (their VMM has the kernel and initrd loaded); another virtcontainers version sharing
    the cache rebuilds its entry on next use. With `dry_run`, only says what would go.
    """
    cache_dir = os.path.abspath(cache_dir or default_cache_dir())
    if not os.path.isdir(cache_dir):
        return []
    key = _key(_inputs(cache_dir))
    with _locked(cache_dir):
        stale = _stale(cache_dir, key)
        if dry_run:
            return stale
        for entry in stale:
            try:
                shutil.rmtree(entry.path)
            except OSError as exc:
                raise AssetError(
                    f"cannot remove the stale assets entry {entry.path}: {exc.strerror}"
                ) from None
            log.info("removed stale guest assets %s (%d bytes)", entry.name, entry.size)
    return stale


def _build(inputs: dict[str, Any], key: str, cache_dir: str, tmp: str) -> None:
    out = os.path.join(tmp, "out")
    os.makedirs(out)
    pkg = kernel_mod.KernelPackage(inputs["kernel_package"], inputs["kernel_package_version"])
    busybox = initrd_mod.busybox_path()
    initrd_mod.check_busybox_static(busybox)
    for tool, package in (("dpkg-deb", "dpkg"), ("depmod", "kmod"), ("cpio", "cpio")):
        if shutil.which(tool) is None:
            raise AssetError(f"{tool} not found: `apt-get install {package}`")
    agent_bin = os.path.join(tmp, "init")
    initrd_mod.compile_agent(agent_bin, tmp)
    runner_bin = os.path.join(tmp, "vc-run")
    initrd_mod.compile_runner(runner_bin, tmp)
    download = os.path.join(tmp, "download")
    os.makedirs(download)
    os.chmod(tmp, 0o755)
    deb = kernel_mod.fetch_deb(
        pkg,
        os.path.join(cache_dir, "debs"),
        download,
        search=[os.path.join(default_cache_dir(), "debs")],
    )
    kernel = kernel_mod.unpack(deb, os.path.join(tmp, "kernel"))
    plan = kernel_mod.plan_modules(kernel.modules_dir)
    root = os.path.join(tmp, "root")
    initrd_mod.populate(root, kernel, plan, busybox, agent_bin, runner_bin)
    initrd_mod.write_cpio(root, os.path.join(out, INITRD_FILE), inputs["compression"])
    shutil.copyfile(kernel.vmlinuz, os.path.join(out, KERNEL_FILE))
    features = kernel_mod.read_features(kernel)
    if features.pvh:
        extract_vmlinux(kernel.vmlinuz, os.path.join(out, VMLINUX_FILE))
    manifest = {
        "key": key,
        "inputs": inputs,
        "kernel_version": kernel.version,
        "modules": list(plan.wanted),
        "builtin_modules": list(plan.builtin),
        "absent_modules": list(plan.absent),
        "kernel_features": asdict(features),
        "module_files": list(plan.load_order),
        "agent_version": _agent_version(),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    with open(os.path.join(out, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def asset_info(cache_dir: str | None = None) -> dict[str, Any]:
    """What `virtc assets show` prints: cache dir, key, whether built, paths, sizes, versions.

    Builds nothing. JSON-safe.
    """
    cache_dir = os.path.abspath(cache_dir or default_cache_dir())
    info: dict[str, Any] = {"cache_dir": cache_dir, "agent_version": _agent_version()}
    try:
        _ensure_dir(cache_dir)
        inputs = _inputs(cache_dir)
    except AssetError as exc:
        info.update(status="unavailable", error=str(exc))
        return info
    key = _key(inputs)
    entry = os.path.join(cache_dir, key)
    stale = _stale(cache_dir, key)
    info.update(
        key=key,
        directory=entry,
        inputs=inputs,
        stale=[{"name": e.name, "size": e.size} for e in stale],
        stale_size=sum(e.size for e in stale),
    )
    found = _load(entry)
    if found is None:
        info["status"] = "not built"
        return info
    with open(os.path.join(entry, MANIFEST)) as f:
        manifest = json.load(f)
    info.update(
        status="built",
        kernel=found.kernel,
        kernel_size=os.path.getsize(found.kernel),
        bzimage=found.bzimage,
        kernel_hz=found.kernel_hz,
        initrd=found.initrd,
        initrd_size=os.path.getsize(found.initrd),
        kernel_version=found.kernel_version,
        kernel_package=f"{found.kernel_package} {found.kernel_package_version}",
        modules=list(found.modules),
        builtin_modules=manifest.get("builtin_modules", []),
        absent_modules=manifest.get("absent_modules", []),
        built_at=manifest.get("built_at", ""),
    )
    return info


show_assets = asset_info
