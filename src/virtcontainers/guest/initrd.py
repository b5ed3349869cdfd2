"""The initrd: busybox, the kernel modules the agent loads, and the agent itself as /init."""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import struct
import subprocess
from collections.abc import Sequence
from importlib import resources

from ..errors import AssetError
from .kernel import ModulePlan, UnpackedKernel, module_name, read_modules_dep

AGENT_SOURCE = "agent.c"
RUNNER_SOURCE = "vc-run.c"
RUNNER_PATH = "sbin/vc-run"
"""Inside the initrd: the program that starts a container process (guest/container/vc-run.c)."""
CFLAGS: tuple[str, ...] = ("-static", "-O2", "-Wall", "-Wextra", "-s")
RUNNER_LIBS: tuple[str, ...] = ("-lseccomp",)
"""vc-run applies seccomp profiles with libseccomp, linked statically (no libraries in the
initrd)."""
LIBSECCOMP_A = "/usr/lib/x86_64-linux-gnu/libseccomp.a"
SANITIZE_CFLAGS: tuple[str, ...] = (
    "-fsanitize=address,undefined",
    "-fno-sanitize-recover=all",
    "-fno-omit-frame-pointer",
    "-g",
    "-O1",
    "-Wall",
    "-Wextra",
)
"""A host build for tests: AddressSanitizer and UndefinedBehaviorSanitizer, dynamic (the
sanitizers' runtimes cannot be linked statically), stopping at the first error."""
LIBC_A = "/usr/lib/x86_64-linux-gnu/libc.a"
MODULE_LIST = "etc/vc-modules"
"""Inside the initrd: `name path deps` per module (path relative to lib/modules/<version>),
dependencies first. The agent loads the drivers of the devices present before it says
it is ready (a NIC's right after, first: the host's NETWORK request waits for the link),
and everything else right after, in the background."""


MODULE_SIG_MARKER = b"~Module signature appended~\n"
"""How a signed module ends: its PKCS#7 signature, a 12-byte `struct module_signature`
(the signature's length in its last 4 bytes, big-endian), then this marker."""


def default_compression() -> str:
    """lz4 (legacy frames) when the tool exists, else gzip.

    Measured here (q35, TCG, 15 boots to VC-AGENT-READY): lz4 2.05 s median, gzip
    2.08 s, uncompressed 2.10 s; lz4 is also 2.3x smaller than the raw cpio.
    """
    return "lz4" if shutil.which("lz4") else "gzip"


_DIRS = (
    "bin",
    "sbin",
    "usr/bin",
    "usr/sbin",
    "etc",
    "proc",
    "sys",
    "dev",
    "run",
    "tmp",
    "root",
    "mnt",
    "var",
    "var/tmp",
    "lib/modules",
)

_FILES = {
    "etc/passwd": "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
    "etc/group": "root:x:0:\ntty:x:5:\nnogroup:x:65534:\n",
    "etc/hostname": "sandbox\n",
    "etc/hosts": "127.0.0.1 localhost sandbox\n::1 localhost\n",
    "etc/nsswitch.conf": "passwd: files\ngroup: files\nhosts: files dns\n",
}


def agent_source() -> bytes:
    """The C source of the guest agent shipped in this package."""
    return resources.files(__package__).joinpath("agent", AGENT_SOURCE).read_bytes()


def busybox_path() -> str:
    """The static busybox to put in the initrd (`VC_BUSYBOX` overrides)."""
    path = os.environ.get("VC_BUSYBOX") or "/bin/busybox"
    if not os.path.isfile(path):
        raise AssetError(f"{path} not found: install it with `apt-get install busybox-static`")
    return path


def check_busybox_static(path: str) -> None:
    """A dynamically linked busybox would not run in the initrd (no libc there)."""
    with open(path, "rb") as f:
        head = f.read(4096)
    if not head.startswith(b"\x7fELF"):
        raise AssetError(f"{path} is not an ELF binary")
    if b"/lib64/ld-linux" in head or b"/lib/ld-linux" in head:
        raise AssetError(
            f"{path} is dynamically linked: install the static one with "
            "`apt-get install busybox-static`"
        )


def file_sha256(path: str) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def runner_source() -> bytes:
    """The C source of vc-run, which starts container processes in the guest."""
    return resources.files(__package__).joinpath("container", RUNNER_SOURCE).read_bytes()


def compile_runner(out_path: str, work_dir: str) -> None:
    """Build vc-run with `gcc -static`, libseccomp linked in."""
    if not os.path.exists(LIBSECCOMP_A):
        raise AssetError(
            f"{LIBSECCOMP_A} not found: vc-run links libseccomp statically; "
            "`apt-get install libseccomp-dev`"
        )
    compile_c(runner_source(), RUNNER_SOURCE, out_path, work_dir, "vc-run", libs=RUNNER_LIBS)


def compile_agent(out_path: str, work_dir: str, *, sanitize: bool = False) -> None:
    """Build the agent with `gcc -static` (or, with `sanitize`, the ASan/UBSan host build of
    `SANITIZE_CFLAGS` for tests); AssetError names the missing package."""
    flags = SANITIZE_CFLAGS if sanitize else CFLAGS
    compile_c(agent_source(), AGENT_SOURCE, out_path, work_dir, "the guest agent", flags)


def compile_c(
    source: bytes,
    name: str,
    out_path: str,
    work_dir: str,
    what: str,
    flags: Sequence[str] = CFLAGS,
    libs: Sequence[str] = (),
) -> None:
    """Build one static guest program; AssetError names the missing package."""
    if shutil.which("gcc") is None:
        raise AssetError("gcc not found: the guest agent is built from C; `apt-get install gcc`")
    if not os.path.exists(LIBC_A):
        raise AssetError(
            f"{LIBC_A} not found: static linking needs glibc's libc.a; `apt-get install libc6-dev`"
        )
    src = os.path.join(work_dir, name)
    with open(src, "wb") as f:
        f.write(source)
    res = subprocess.run(
        ["gcc", *flags, "-o", out_path, src, *libs],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    if res.returncode != 0:
        raise AssetError(f"compiling {what} failed:\n{res.stderr.strip()[-2000:]}")


def _applets(busybox: str) -> list[str]:
    res = subprocess.run(
        [busybox, "--list-full"], capture_output=True, text=True, check=False, timeout=60
    )
    if res.returncode != 0:
        raise AssetError(f"{busybox} --list-full failed: {res.stderr.strip()}")
    return [line.strip() for line in res.stdout.splitlines() if line.strip()]


def copy_unsigned_module(src: str, dst: str) -> None:
    """Copy module `src` to `dst` without its appended signature.

    The guest kernel does not enforce signatures (CONFIG_MODULE_SIG_FORCE is off, no
    lockdown): it loads an unsigned module (marking itself tainted) instead of checking a
    sha256 and an RSA-4096 signature for each one, which under TCG took ~5 ms a module
    (~70 ms of every boot, ~15 of them for a NIC's three modules; docs/architecture.md).
    """
    with open(src, "rb") as f:
        data = f.read()
    if data.endswith(MODULE_SIG_MARKER):
        end = len(data) - len(MODULE_SIG_MARKER)
        if end < 12:
            raise AssetError(f"module {src}: truncated signature")
        (sig_len,) = struct.unpack(">I", data[end - 4 : end])
        start = end - 12 - sig_len
        if start <= 0:
            raise AssetError(f"module {src}: signature length {sig_len} exceeds the file")
        data = data[:start]
    with open(dst, "wb") as f:
        f.write(data)


def populate(
    root: str,
    kernel: UnpackedKernel,
    plan: ModulePlan,
    busybox: str,
    agent_binary: str,
    runner_binary: str | None = None,
) -> None:
    """Lay out the initrd tree under `root`."""
    for d in _DIRS:
        os.makedirs(os.path.join(root, d), exist_ok=True)
    os.chmod(os.path.join(root, "tmp"), 0o1777)
    os.chmod(os.path.join(root, "root"), 0o700)
    for rel, text in _FILES.items():
        with open(os.path.join(root, rel), "w") as f:
            f.write(text)
    shutil.copyfile(busybox, os.path.join(root, "bin", "busybox"))
    os.chmod(os.path.join(root, "bin", "busybox"), 0o755)
    for applet in _applets(busybox):
        rel = applet.lstrip("/")
        if rel in ("bin/busybox", "linuxrc") or ".." in rel.split("/"):
            continue
        link = os.path.join(root, rel)
        os.makedirs(os.path.dirname(link), exist_ok=True)
        if not os.path.lexists(link):
            os.symlink("/bin/busybox", link)
    shutil.copyfile(agent_binary, os.path.join(root, "init"))
    os.chmod(os.path.join(root, "init"), 0o755)
    if runner_binary is not None:
        shutil.copyfile(runner_binary, os.path.join(root, RUNNER_PATH))
        os.chmod(os.path.join(root, RUNNER_PATH), 0o755)

    mod_root = os.path.join(root, "lib", "modules", kernel.version)
    os.makedirs(mod_root, exist_ok=True)
    for rel in plan.load_order:
        dst = os.path.join(mod_root, rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        copy_unsigned_module(os.path.join(kernel.modules_dir, rel), dst)
    for meta in ("modules.builtin", "modules.builtin.modinfo", "modules.order"):
        src = os.path.join(kernel.modules_dir, meta)
        if os.path.exists(src):
            shutil.copyfile(src, os.path.join(mod_root, meta))
    deps = {path: dep_paths for path, dep_paths in read_modules_dep(kernel.modules_dir).values()}
    with open(os.path.join(root, MODULE_LIST), "w") as f:
        f.write("# name path dependencies (comma-separated names), dependencies first\n")
        for rel in plan.load_order:
            dep_names = ",".join(module_name(d) for d in deps.get(rel, [])) or "-"
            f.write(f"{module_name(rel)} {rel} {dep_names}\n")
    res = subprocess.run(
        ["depmod", "-b", root, kernel.version],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    if res.returncode != 0:
        raise AssetError(f"depmod for the initrd failed: {res.stderr.strip()}")


def write_cpio(root: str, out_path: str, compression: str = "gzip") -> None:
    """Pack `root` as a newc cpio archive owned by root:root, optionally gzip-compressed."""
    if shutil.which("cpio") is None:
        raise AssetError("cpio not found: `apt-get install cpio`")
    names: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, root)
        for name in sorted(dirnames + filenames):
            names.append(os.path.normpath(os.path.join(rel_dir, name)))
    listing = "".join(f"{n}\0" for n in sorted(names)).encode()
    raw = out_path + ".cpio"
    with open(raw, "wb") as out:
        res = subprocess.run(
            ["cpio", "--null", "-o", "-H", "newc", "-R", "0:0", "--reproducible", "--quiet"],
            cwd=root,
            input=listing,
            stdout=out,
            stderr=subprocess.PIPE,
            check=False,
            timeout=300,
        )
    if res.returncode != 0:
        raise AssetError(f"cpio failed: {res.stderr.decode(errors='replace').strip()}")
    _compress(raw, out_path, compression)


def _compress(raw: str, out_path: str, compression: str) -> None:
    if compression == "none":
        os.replace(raw, out_path)
        return
    if compression == "gzip":
        with open(raw, "rb") as src, gzip.GzipFile(out_path, "wb", 6, mtime=0) as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        os.unlink(raw)
        return
    if compression == "lz4":
        argv: Sequence[str] = ["lz4", "-l", "-9", "-q", "-f", raw, out_path]
        if shutil.which("lz4") is None:
            raise AssetError("lz4 not found: `apt-get install lz4`")
        res = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=300)
        if res.returncode != 0:
            raise AssetError(f"lz4 failed: {res.stderr.strip()}")
        os.unlink(raw)
        return
    raise AssetError(f"unknown initrd compression {compression!r} (none, gzip, lz4)")
