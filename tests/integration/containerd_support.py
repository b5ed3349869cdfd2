"""A private containerd for tests: its own root, state and sockets, run inside a network
namespace the test creates, driven with `ctr -a SOCKET`. Nothing of the host's containerd (if
any) is touched; everything is removed afterwards."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from images_support import config_doc, docker_archive, layer
from leaks import kill_all, processes_mentioning

CONTAINERD = shutil.which("containerd") or "/usr/bin/containerd"
CTR = shutil.which("ctr") or "/usr/bin/ctr"
#: The venv's bin directory: the shim's console script is there.
VENV_BIN = os.path.dirname(sys.executable)
NAMESPACE = "vctest"
RUNTIME = "io.containerd.virtc.v2"


@dataclass
class Containerd:
    dir: str
    netns: str
    proc: subprocess.Popen[bytes] | None
    log_path: str
    #: The run root of the shims' VMs (VC_RUN_ROOT given to containerd), if any.
    vm_root: str = ""
    env: dict[str, str] | None = None
    #: Shim and VM processes still running once containerd stopped (then killed).
    left_at_stop: list[tuple[int, str]] = field(default_factory=list)

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                # nsenter, not `ip netns exec`: that remounts /sys and hides the cgroup mounts.
                [
                    "nsenter",
                    f"--net=/run/netns/{self.netns}",
                    CONTAINERD,
                    "--config",
                    os.path.join(self.dir, "config.toml"),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
            )
        deadline = time.monotonic() + 30
        while not os.path.exists(self.address) or not os.path.exists(self.ttrpc_address):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"containerd did not start:\n{self.log_tail()}")
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop containerd (SIGTERM); its shims keep running."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for sock in (self.address, self.ttrpc_address):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(sock)

    @property
    def address(self) -> str:
        return os.path.join(self.dir, "c.sock")

    @property
    def ttrpc_address(self) -> str:
        return self.address + ".ttrpc"

    @property
    def state(self) -> str:
        return os.path.join(self.dir, "state")

    @property
    def fifo_dir(self) -> str:
        """Where ctr makes a task's FIFOs (its default is the host's /run/containerd/fifo)."""
        return os.path.join(self.dir, "fifo")

    def ctr_argv(self, namespace: str = NAMESPACE) -> list[str]:
        """`ctr` talking to this containerd in `namespace` (for a Popen)."""
        return [CTR, "-a", self.address, "-n", namespace]

    def ctr(
        self,
        *args: str,
        check: bool = True,
        timeout: float = 120,
        input: bytes | None = None,
        namespace: str = NAMESPACE,
    ) -> subprocess.CompletedProcess[bytes]:
        """Run `ctr -a SOCKET -n NAMESPACE ARGS` (a client: it needs no network)."""
        cmd = self.ctr_argv(namespace)
        # ctr copies its stdin into the task's: give it an empty one (EOF, then CloseIO).
        cp = subprocess.run(
            [*cmd, *args], capture_output=True, timeout=timeout, input=input or b"", check=False
        )
        if check and cp.returncode != 0:
            raise AssertionError(
                f"ctr {' '.join(args)} exited {cp.returncode}\nstdout: {cp.stdout!r}\n"
                f"stderr: {cp.stderr!r}\ncontainerd log tail:\n{self.log_tail()}"
            )
        return cp

    def run(
        self,
        image: str,
        cid: str,
        *argv: str,
        detach: bool = False,
        options: Sequence[str] = (),
        check: bool = True,
        timeout: float = 240,
        input: bytes | None = None,
    ) -> subprocess.CompletedProcess[bytes]:
        """`ctr run` of `argv` in a new container `cid` on this shim's runtime: detached
        (`-d`) or removed once it ends (`--rm`); `options` go before the image."""
        args = self.run_args(image, cid, *argv, detach=detach, options=options)
        return self.ctr(*args, check=check, timeout=timeout, input=input)

    def run_args(
        self, image: str, cid: str, *argv: str, detach: bool = False, options: Sequence[str] = ()
    ) -> list[str]:
        """The arguments of `ctr` for `run` (for a `ctr` run with Popen: after `ctr_argv`)."""
        mode = "-d" if detach else "--rm"
        return [
            "run", mode, "--fifo-dir", self.fifo_dir, "--runtime", RUNTIME, *options,
            image, cid, *argv,
        ]  # fmt: skip

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(Path(self.log_path).read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def _config(d: str, cri: str) -> str:
    disabled = ["io.containerd.internal.v1.tracing", "io.containerd.tracing.processor.v1.otlp"]
    if not cri:
        disabled.append("io.containerd.grpc.v1.cri")
    return f"""version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = {json.dumps(disabled)}
[grpc]
  address = "{d}/c.sock"
[ttrpc]
  address = "{d}/c.sock.ttrpc"
[debug]
  level = "debug"
{cri}"""


@contextlib.contextmanager
def running_containerd(
    extra_path: Sequence[str] = (VENV_BIN,),
    env: dict[str, str] | None = None,
    cri: Callable[[str], str] | None = None,
) -> Iterator[Containerd]:
    """Start containerd in a new network namespace (its shims inherit `env` and find their
    binaries on `extra_path`); stop it and remove everything after. `cri(dir)` gives the CRI
    plugin's configuration (TOML) for containerd's directory `dir`: the plugin is disabled
    without it."""
    d = tempfile.mkdtemp(prefix="vcctd-", dir="/tmp")
    netns = f"vcshim-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    Path(d, "config.toml").write_text(_config(d, cri(d) if cri else ""))
    env = {**os.environ, **(env or {})}
    env["PATH"] = os.pathsep.join([*extra_path, env.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")])
    c = Containerd(d, netns, None, os.path.join(d, "containerd.log"), env.get("VC_RUN_ROOT", ""))
    c.env = env
    try:
        c.start()
        c.ctr("version")
        yield c
    finally:
        _stop(c)


def _stop(c: Containerd) -> None:
    c.stop()
    # A failed test's shims and VMs: kept for the caller's check, not left for the next test.
    c.left_at_stop = processes_mentioning(c.dir)
    if c.vm_root:
        c.left_at_stop += processes_mentioning(c.vm_root)
    kill_all(c.left_at_stop)
    # Snapshot mounts containerd left (it unmounts its own on a clean run).
    for line in reversed(Path("/proc/self/mounts").read_text().splitlines()):
        target = line.split()[1]
        if target.startswith(c.dir + "/"):
            subprocess.run(["umount", "-l", target], check=False)
    subprocess.run(["ip", "netns", "delete", c.netns], check=False)
    shutil.rmtree(c.dir, ignore_errors=True)


def leftovers(c: Containerd, *ids: str) -> list[str]:
    """What finished containers (or pods) `ids` may have left: shim or VM processes, the shims'
    socket directory entries, the bundles, mounts under containerd's dirs."""
    vm_root = c.vm_root
    found = [
        f"process {pid}: {cmd}"
        for pid, cmd in processes_mentioning(c.dir) + processes_mentioning(vm_root)
        if not cmd.startswith(("/usr/bin/containerd --config", "nsenter"))
    ]
    # The VMs' directories and persisted state (the sandbox is named after the container).
    found += [
        os.path.join(vm_root, sub, cid)
        for sub in ("vm", "sbs")
        for cid in ids
        if os.path.exists(os.path.join(vm_root, sub, cid))
    ]
    sockets = os.path.join(c.dir, "s")
    found += [f"socket {n}" for n in os.listdir(sockets)] if os.path.isdir(sockets) else []
    tasks = os.path.join(c.state, "io.containerd.runtime.v2.task")
    for dirpath, dirnames, _ in os.walk(tasks):
        found += [os.path.join(dirpath, d) for d in dirnames if d in ids]
    mounts = Path("/proc/self/mounts").read_text().splitlines()
    found += [m for m in mounts if f"{c.dir}/" in m.split()[1] and "/rootfs" in m.split()[1]]
    return found


def settled(c: Containerd, *ids: str, timeout: float = 15) -> list[str]:
    """leftovers() once the shim had time to exit (ctr returns as the shim shuts down)."""
    deadline = time.monotonic() + timeout
    while (found := leftovers(c, *ids)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return found


BUSYBOX_APPLETS = (
    "sh", "echo", "true", "false", "cat", "sleep", "ls", "ps", "hostname", "id", "tr", "ip",
    "ping",
)  # fmt: skip


def busybox_layer() -> bytes:
    """A layer with the host's static busybox at /bin/busybox and a few applet links."""
    return layer(
        [
            *(("dir", d) for d in ("bin", "etc", "proc", "sys", "dev", "tmp")),
            ("file", "bin/busybox", Path("/bin/busybox").read_bytes(), 0o755),
            *(("sym", f"bin/{applet}", "busybox") for applet in BUSYBOX_APPLETS),
        ]
    )


def import_image(
    c: Containerd, ref: str, layers: list[bytes], namespace: str = NAMESPACE, **config: Any
) -> str:
    """Import an image of `layers` and image `config` as `ref` (through a docker archive)."""
    archive = os.path.join(c.dir, "image.tar")
    docker_archive(archive, layers, [ref], config_doc(layers, **config))
    c.ctr("image", "import", archive, namespace=namespace)
    os.unlink(archive)
    return ref


def import_busybox(
    c: Containerd, ref: str = "docker.io/vctest/busybox:1", namespace: str = NAMESPACE
) -> str:
    return import_image(c, ref, [busybox_layer()], namespace, Cmd=["sh"], Env=["PATH=/bin"])
