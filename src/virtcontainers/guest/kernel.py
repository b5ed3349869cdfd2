"""The guest kernel: Debian's cloud kernel package, resolved, downloaded and unpacked.

Virtio drivers are modules on that kernel, so this module also works out which
module files (with their dependencies, in load order) the initrd must carry.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..errors import AssetError

META_PACKAGE = "linux-image-cloud-amd64"
APT_LISTS = "/var/lib/apt/lists"
APT_ARCHIVES = "/var/cache/apt/archives"

REQUIRED_MODULES: tuple[str, ...] = (
    "virtio_pci",
    "virtio_mmio",
    "virtio_console",
    "virtio_blk",
    "virtio_scsi",
    "sd_mod",
    "virtio_net",
    "vmw_vsock_virtio_transport",
    "virtiofs",
    "virtio_rng",
)
"""Drivers the agent loads at boot; the build fails if one is missing from the kernel."""

OPTIONAL_MODULES: tuple[str, ...] = (
    "virtio_mem",
    "virtio_balloon",
    "virtio_pmem",
    "nd_pmem",
    "nfit",
    "overlay",
    "9pnet_virtio",
    "9p",
)
"""Loaded at boot when this kernel has them (as modules or built in)."""


@dataclass(frozen=True)
class KernelPackage:
    """A resolved kernel package: its name and version as apt knows them."""

    name: str
    version: str

    @property
    def deb_name(self) -> str:
        """The file name apt gives the package (epoch colon escaped)."""
        return f"{self.name}_{self.version.replace(':', '%3a')}_amd64.deb"


def norm(name: str) -> str:
    """Module names treat '-' and '_' alike; use '_'."""
    return name.replace("-", "_")


def _run(argv: Sequence[str], what: str, cwd: str | None = None) -> str:
    try:
        res = subprocess.run(
            list(argv), cwd=cwd, capture_output=True, text=True, check=False, timeout=600
        )
    except FileNotFoundError:
        raise AssetError(f"{what}: {argv[0]} not found") from None
    except subprocess.TimeoutExpired:
        raise AssetError(f"{what}: {' '.join(argv)} timed out") from None
    if res.returncode != 0:
        tail = (res.stderr or res.stdout).strip().splitlines()[-5:]
        raise AssetError(
            f"{what}: `{' '.join(argv)}` failed with exit code {res.returncode}: "
            + " / ".join(tail)
        )
    return res.stdout


def _lists_stamp() -> str:
    """Changes whenever `apt-get update` changes the package lists."""
    try:
        entries = sorted(
            (e.name, e.stat().st_mtime_ns, e.stat().st_size)
            for e in os.scandir(APT_LISTS)
            if e.is_file()
        )
    except OSError:
        return ""
    return json.dumps(entries)


def resolve_package(state_dir: str) -> KernelPackage:
    """The concrete package `linux-image-cloud-amd64` depends on, and its candidate version.

    `VC_KERNEL_DEB` (a local .deb) overrides apt. apt-cache takes about a second, so
    its answer is remembered in `state_dir` until the package lists change.
    """
    local = os.environ.get("VC_KERNEL_DEB")
    if local:
        if not os.path.isfile(local):
            raise AssetError(f"VC_KERNEL_DEB={local}: no such file")
        out = _run(["dpkg-deb", "-f", local, "Package", "Version"], f"reading {local}")
        info = dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)
        return KernelPackage(info.get("Package", ""), info.get("Version", ""))
    if shutil.which("apt-cache") is None:
        raise AssetError(
            "apt-cache not found: the guest kernel comes from Debian's "
            f"{META_PACKAGE} package (or set VC_KERNEL_DEB to a kernel .deb)"
        )
    stamp = _lists_stamp()
    memo = os.path.join(state_dir, "kernel-package.json")
    try:
        with open(memo) as f:
            saved = json.load(f)
        if saved.get("stamp") == stamp and stamp:
            return KernelPackage(saved["name"], saved["version"])
    except (OSError, ValueError, KeyError):
        pass
    hint = f"run `apt-get update` (the package lists may be missing {META_PACKAGE})"
    out = _run(["apt-cache", "depends", META_PACKAGE], f"resolving {META_PACKAGE}; {hint}")
    names = re.findall(r"^\s*\|?Depends:\s*(linux-image-\S+)", out, re.M)
    names = [n for n in names if not n.startswith("<")]
    if not names:
        raise AssetError(f"{META_PACKAGE} depends on no linux-image package; {hint}")
    name = names[0]
    out = _run(["apt-cache", "policy", name], f"resolving {name}; {hint}")
    m = re.search(r"Candidate:\s*(\S+)", out)
    if not m or m.group(1) == "(none)":
        raise AssetError(f"no installable version of {name}; {hint}")
    pkg = KernelPackage(name, m.group(1))
    if stamp:
        os.makedirs(state_dir, exist_ok=True)
        tmp = f"{memo}.{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump({"stamp": stamp, "name": pkg.name, "version": pkg.version}, f)
        os.replace(tmp, memo)
    return pkg


def fetch_deb(pkg: KernelPackage, debs_dir: str, work_dir: str, search: Sequence[str] = ()) -> str:
    """Path of the package's .deb: kept in `debs_dir`, downloaded with apt-get if absent.

    `search` names more directories that may already hold it (another cache, apt's).
    """
    local = os.environ.get("VC_KERNEL_DEB")
    if local:
        return local
    os.makedirs(debs_dir, exist_ok=True)
    kept = os.path.join(debs_dir, pkg.deb_name)
    if os.path.isfile(kept):
        return kept
    for d in (*search, APT_ARCHIVES):
        candidate = os.path.join(d, pkg.deb_name)
        if os.path.isfile(candidate):
            return candidate
    if shutil.which("apt-get") is None:
        raise AssetError(f"apt-get not found: cannot download {pkg.name}")
    argv = ["apt-get", "download", "-q", f"{pkg.name}={pkg.version}"]
    if os.geteuid() == 0:
        argv[1:1] = ["-o", "APT::Sandbox::User=root"]
    _run(argv, f"downloading {pkg.name} {pkg.version} (run `apt-get update` first?)", work_dir)
    got = glob.glob(os.path.join(work_dir, f"{pkg.name}_*.deb"))
    if not got:
        raise AssetError(f"apt-get download {pkg.name} produced no .deb in {work_dir}")
    for old in glob.glob(os.path.join(debs_dir, "*.deb")):
        os.unlink(old)
    tmp = kept + ".part"
    shutil.copyfile(got[0], tmp)
    os.replace(tmp, kept)
    return kept


@dataclass(frozen=True)
class UnpackedKernel:
    """A kernel package unpacked into a directory."""

    root: str
    version: str
    vmlinuz: str

    @property
    def modules_dir(self) -> str:
        """`lib/modules/<version>` inside the unpacked tree."""
        return os.path.join(self.root, "lib", "modules", self.version)


def unpack(deb: str, dest: str) -> UnpackedKernel:
    """Extract the package and index its modules (the package ships no modules.dep)."""
    _run(["dpkg-deb", "-x", deb, dest], f"unpacking {deb}")
    kernels = sorted(glob.glob(os.path.join(dest, "boot", "vmlinuz-*")))
    if len(kernels) != 1:
        raise AssetError(f"{deb} holds {len(kernels)} boot/vmlinuz-* files, expected 1")
    version = os.path.basename(kernels[0])[len("vmlinuz-") :]
    kernel = UnpackedKernel(dest, version, kernels[0])
    if not os.path.isdir(kernel.modules_dir):
        raise AssetError(f"{deb} has no lib/modules/{version}")
    _run(["depmod", "-b", dest, version], f"indexing the modules of {version}")
    return kernel


@dataclass(frozen=True)
class KernelFeatures:
    """What the host side needs to know about a kernel's build configuration."""

    hz: int
    """CONFIG_HZ, 0 if unknown: with the TSC rate it gives the loops-per-jiffy value."""
    pvh: bool
    """CONFIG_PVH: the ELF vmlinux boots directly (QEMU, Cloud Hypervisor), no decompressor."""


def read_features(kernel: UnpackedKernel) -> KernelFeatures:
    """Read the package's boot/config-<version>; a missing file means nothing is known."""
    values: dict[str, str] = {}
    path = os.path.join(kernel.root, "boot", f"config-{kernel.version}")
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, sep, value = line.strip().partition("=")
                if sep and key in ("CONFIG_HZ", "CONFIG_PVH"):
                    values[key] = value
    except FileNotFoundError:
        pass
    except OSError as e:
        raise AssetError(f"cannot read the kernel configuration {path}: {e.strerror}") from e
    hz = values.get("CONFIG_HZ", "0")
    return KernelFeatures(hz=int(hz) if hz.isdigit() else 0, pvh=values.get("CONFIG_PVH") == "y")


def read_modules_dep(modules_dir: str) -> dict[str, tuple[str, list[str]]]:
    """Module name -> (relative path, relative paths of its dependencies)."""
    out: dict[str, tuple[str, list[str]]] = {}
    with open(os.path.join(modules_dir, "modules.dep")) as f:
        for line in f:
            path, sep, deps = line.partition(":")
            if not sep:
                continue
            out[module_name(path)] = (path, deps.split())
    return out


def read_builtin(modules_dir: str) -> set[str]:
    """Names of modules compiled into the kernel."""
    try:
        with open(os.path.join(modules_dir, "modules.builtin")) as f:
            return {module_name(line.strip()) for line in f if line.strip()}
    except FileNotFoundError:
        return set()


def module_name(path: str) -> str:
    """`kernel/drivers/char/virtio_console.ko[.xz]` -> `virtio_console`."""
    base = os.path.basename(path)
    return norm(base.split(".ko")[0])


@dataclass(frozen=True)
class ModulePlan:
    """What the initrd carries: module files in load order, and what was skipped."""

    load_order: tuple[str, ...]
    """Relative paths under lib/modules/<version>, dependencies first."""
    wanted: tuple[str, ...]
    """Requested module names that are loadable modules."""
    builtin: tuple[str, ...]
    """Requested names compiled into the kernel (nothing to load)."""
    absent: tuple[str, ...]
    """Optional names this kernel does not have at all."""


def plan_modules(
    modules_dir: str,
    required: Iterable[str] = REQUIRED_MODULES,
    optional: Iterable[str] = OPTIONAL_MODULES,
) -> ModulePlan:
    """Resolve requested modules to files in dependency order; missing required -> AssetError."""
    deps = read_modules_dep(modules_dir)
    builtin = read_builtin(modules_dir)
    order: list[str] = []
    seen: set[str] = set()

    def visit(name: str, trail: tuple[str, ...]) -> None:
        if name in seen or name in builtin:
            return
        if name in trail:
            raise AssetError(f"module dependency cycle: {' -> '.join((*trail, name))}")
        path, dep_paths = deps[name]
        for dep in dep_paths:
            visit(module_name(dep), (*trail, name))
        seen.add(name)
        order.append(path)

    wanted: list[str] = []
    found_builtin: list[str] = []
    absent: list[str] = []
    for raw, must in [(m, True) for m in required] + [(m, False) for m in optional]:
        name = norm(raw)
        if name in builtin:
            found_builtin.append(name)
        elif name in deps:
            wanted.append(name)
            visit(name, ())
        elif must:
            raise AssetError(
                f"kernel module {name} is neither a module nor built into {modules_dir}"
            )
        else:
            absent.append(name)
    return ModulePlan(tuple(order), tuple(wanted), tuple(found_builtin), tuple(absent))
