"""containerd-shim-virtc-v2 under a real containerd (Debian's 1.6.20), driven with `ctr`: the
task runs in a QEMU VM, in the image's root filesystem; afterwards nothing is left."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from containerd_support import Containerd, import_busybox, running_containerd

from leaks import processes_mentioning

pytestmark = pytest.mark.integration

RUNTIME = "io.containerd.virtc.v2"
SHIM_CONFIG = """[hypervisor.qemu]
default_memory = 256
default_vcpus = 1
"""


@pytest.fixture(scope="module")
def containerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Containerd, str]]:
    run_root = str(tmp_path_factory.mktemp("shimrr"))
    config = os.path.join(run_root, "configuration.toml")
    Path(config).write_text(SHIM_CONFIG)
    env = {"VC_RUN_ROOT": run_root, "VC_SHIM_CONFIG": config}
    with running_containerd(env=env) as c:
        yield c, import_busybox(c)
    assert not processes_mentioning(run_root)


def leftovers(c: Containerd, cid: str) -> list[str]:
    """What a finished container may have left: shim or VM processes, the shim's socket
    directory entries, the bundle, mounts under containerd's dirs."""
    found = [
        f"process {pid}: {cmd}"
        for pid, cmd in processes_mentioning(c.dir)
        if not cmd.startswith(("/usr/bin/containerd --config", "nsenter"))
    ]
    sockets = os.path.join(c.dir, "s")
    found += [f"socket {n}" for n in os.listdir(sockets)] if os.path.isdir(sockets) else []
    tasks = os.path.join(c.state, "io.containerd.runtime.v2.task")
    for dirpath, dirnames, _ in os.walk(tasks):
        found += [os.path.join(dirpath, d) for d in dirnames if d == cid]
    mounts = Path("/proc/self/mounts").read_text().splitlines()
    found += [m for m in mounts if f"{c.dir}/" in m.split()[1] and "/rootfs" in m.split()[1]]
    return found


def test_ctr_run_rm_prints_output_and_exits_with_the_code(
    containerd: tuple[Containerd, str],
) -> None:
    c, image = containerd
    cid = f"run-{uuid.uuid4().hex[:6]}"
    cp = c.ctr(
        "run",
        "--rm",
        "--fifo-dir",
        c.fifo_dir,
        "--runtime",
        RUNTIME,
        image,
        cid,
        "sh",
        "-c",
        "echo hello from $(hostname); ls /; echo oops >&2; exit 7",
        check=False,
        timeout=240,
    )
    assert cp.returncode == 7, (cp.stderr, c.log_tail())
    lines = cp.stdout.decode().splitlines()
    assert lines[0].startswith("hello from")
    # The image's root filesystem: exactly what busybox_layer() put there.
    assert lines[1:] == ["bin", "dev", "etc", "proc", "sys", "tmp"]
    assert cp.stderr == b"oops\n"
    # The shim went through Create, Start, Wait, Delete and Shutdown: containerd logged the
    # task's events and the shim's own log lines.
    log = c.log_tail(400)
    for topic in ("/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete"):
        assert f"topic={topic}" in log
    assert "shutting down" in log
    assert settled(c, cid) == []


def settled(c: Containerd, cid: str, timeout: float = 15) -> list[str]:
    """leftovers() once the shim had time to exit (ctr returns as the shim shuts down)."""
    deadline = time.monotonic() + timeout
    while (found := leftovers(c, cid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return found
