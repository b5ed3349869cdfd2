"""containerd-shim-virtc-v2 under a real containerd (Debian's 1.6.20), driven with `ctr`: the
task runs in a QEMU VM, in the image's root filesystem; afterwards nothing is left."""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from containerd_support import Containerd, import_busybox, running_containerd, settled

from leaks import processes_mentioning
from virtcontainers.shim.main import CONTAINER_TYPE, SANDBOX_ID

pytestmark = pytest.mark.integration

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


def test_ctr_run_rm_prints_output_and_exits_with_the_code(
    containerd: tuple[Containerd, str],
) -> None:
    c, image = containerd
    cid = f"run-{uuid.uuid4().hex[:6]}"
    script = "echo hello from $(hostname); ls /; echo oops >&2; exit 7"
    cp = c.run(image, cid, "sh", "-c", script, check=False)
    assert cp.returncode == 7, (cp.stderr, c.log_tail())
    lines = cp.stdout.decode().splitlines()
    assert lines[0].startswith("hello from")
    # The image's root filesystem (what busybox_layer() put there; the guest adds /run).
    assert set(lines[1:]) - {"run"} == {"bin", "dev", "etc", "proc", "sys", "tmp"}
    assert cp.stderr == b"oops\n"
    # The shim went through Create, Start, Wait, Delete and Shutdown: containerd logged the
    # task's events and the shim's own log lines.
    log = c.log_tail(400)
    for topic in ("/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete"):
        assert f"topic={topic}" in log
    assert "shutting down" in log
    assert settled(c, cid) == []


def task_status(c: Containerd, cid: str) -> str:
    for line in c.ctr("task", "ls").stdout.decode().splitlines()[1:]:
        fields = line.split()
        if fields and fields[0] == cid:
            return fields[-1]
    return ""


def wait_status(c: Containerd, cid: str, status: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while (now := task_status(c, cid)) != status:
        assert time.monotonic() < deadline, f"task {cid} is {now!r}, not {status}\n{c.log_tail(60)}"
        time.sleep(0.2)


def test_detached_task_exec_ps_pause_metrics_kill_delete(
    containerd: tuple[Containerd, str],
) -> None:
    c, image = containerd
    cid = f"det-{uuid.uuid4().hex[:6]}"
    fifo = ["--fifo-dir", c.fifo_dir]
    # The container's first process handles SIGTERM (as PID 1 of its namespace it must).
    trap = "trap 'exit 42' TERM; while :; do sleep 1; done"
    c.run(image, cid, "sh", "-c", trap, detach=True)
    assert task_status(c, cid) == "RUNNING"

    cp = c.ctr(
        "task",
        "exec",
        *fifo,
        "--exec-id",
        "e1",
        cid,
        "sh",
        "-c",
        "echo in-exec; exit 4",
        check=False,
    )
    assert (cp.returncode, cp.stdout) == (4, b"in-exec\n"), cp.stderr
    # The exec id is free again once the exec was deleted (ctr deletes it after it ends).
    cp = c.ctr("task", "exec", *fifo, "--exec-id", "e1", cid, "true", check=False)
    assert cp.returncode == 0, cp.stderr

    ps = c.ctr("task", "ps", cid).stdout.decode().splitlines()
    assert ps[0].split() == ["PID", "INFO"] and len(ps) >= 2
    assert all(int(line.split()[0]) > 0 for line in ps[1:])

    c.ctr("task", "pause", cid)
    assert task_status(c, cid) == "PAUSED"
    c.ctr("task", "resume", cid)
    assert task_status(c, cid) == "RUNNING"

    metrics = c.ctr("task", "metrics", cid).stdout.decode()
    assert "memory.usage_in_bytes" in metrics
    usage = next(line.split()[-1] for line in metrics.splitlines() if "usage_in_bytes" in line)
    assert int(usage) > 0

    c.ctr("task", "kill", "-s", "SIGTERM", cid)
    wait_status(c, cid, "STOPPED")
    deleted = c.ctr("task", "delete", cid)
    # The signal reached the process: its handler's exit status.
    assert b"exit with non-zero exit code 42" in deleted.stderr, deleted
    c.ctr("container", "delete", cid)
    assert settled(c, cid) == []


def test_kill_all_ends_init_and_execs(containerd: tuple[Containerd, str]) -> None:
    c, image = containerd
    cid = f"all-{uuid.uuid4().hex[:6]}"
    fifo = ["--fifo-dir", c.fifo_dir]
    c.run(image, cid, "sleep", "600", detach=True)
    c.ctr("task", "exec", "-d", *fifo, "--exec-id", "bg", cid, "sleep", "600")
    before = len(c.ctr("task", "ps", cid).stdout.decode().splitlines())
    c.ctr("task", "exec", "-d", *fifo, "--exec-id", "bg2", cid, "sleep", "600")
    ps = c.ctr("task", "ps", cid).stdout.decode().splitlines()
    assert len(ps) > before, ps
    c.ctr("task", "kill", "--all", "-s", "SIGKILL", cid)
    wait_status(c, cid, "STOPPED")
    c.ctr("task", "delete", cid)
    c.ctr("container", "delete", cid)
    assert settled(c, cid) == []


def test_shim_killed_then_containerd_cleans_up(containerd: tuple[Containerd, str]) -> None:
    c, image = containerd
    cid = f"kill-{uuid.uuid4().hex[:6]}"
    c.run(image, cid, "sleep", "600", detach=True)
    bundle = os.path.join(c.state, "io.containerd.runtime.v2.task", "vctest", cid)
    shim_pid = int(Path(bundle, "shim.pid").read_text())
    os.kill(shim_pid, 9)
    # containerd sees the shim gone, runs `containerd-shim-virtc-v2 delete` (which stops the
    # VM and unmounts the rootfs) and marks the task stopped.
    deadline = time.monotonic() + 60
    while task_status(c, cid) not in ("", "STOPPED"):
        assert time.monotonic() < deadline, task_status(c, cid)
        time.sleep(0.2)
    c.ctr("task", "delete", cid, check=False)
    c.ctr("container", "delete", cid)
    assert settled(c, cid, timeout=30) == []


def test_vmm_killed_task_exits(containerd: tuple[Containerd, str]) -> None:
    c, image = containerd
    cid = f"vmm-{uuid.uuid4().hex[:6]}"
    c.run(image, cid, "sleep", "600", detach=True)
    qemu = [pid for pid, cmd in processes_mentioning(f"sandbox-{cid}") if "qemu-system" in cmd]
    assert len(qemu) == 1
    os.kill(qemu[0], 9)
    wait_status(c, cid, "STOPPED")
    c.ctr("task", "delete", cid)
    c.ctr("container", "delete", cid)
    assert settled(c, cid, timeout=30) == []


def test_containerd_restart_reconnects_to_the_running_task(
    containerd: tuple[Containerd, str],
) -> None:
    c, image = containerd
    cid = f"rst-{uuid.uuid4().hex[:6]}"
    c.run(image, cid, "sleep", "600", detach=True)
    c.stop()
    c.start()
    # containerd read the shim's address from the bundle and reconnected: the task still runs
    # and answers.
    assert task_status(c, cid) == "RUNNING", c.log_tail()
    cp = c.ctr("task", "exec", "--fifo-dir", c.fifo_dir, "--exec-id", "after", cid, "echo", "back")
    assert cp.stdout == b"back\n"
    c.ctr("task", "kill", "-s", "SIGKILL", cid)
    wait_status(c, cid, "STOPPED")
    c.ctr("task", "delete", cid)
    c.ctr("container", "delete", cid)
    assert settled(c, cid) == []


def test_stdin_reaches_the_process(containerd: tuple[Containerd, str]) -> None:
    c, image = containerd
    cid = f"in-{uuid.uuid4().hex[:6]}"
    cp = c.run(image, cid, "sh", "-c", "tr a-z A-Z", input=b"piped in\n")
    assert cp.stdout == b"PIPED IN\n"
    assert settled(c, cid) == []


def test_pod_network_namespace_reaches_the_vm(containerd: tuple[Containerd, str]) -> None:
    """A container joining a network namespace (as CRI's pods do, set up by CNI) has that
    namespace's address in the VM and reaches its peer."""
    c, image = containerd
    cid = f"net-{uuid.uuid4().hex[:6]}"
    pod = f"vcpod-{uuid.uuid4().hex[:6]}"
    host_if, pod_if = f"vh{cid[-6:]}", f"vp{cid[-6:]}"
    sh = lambda *a: subprocess.run(a, check=True, capture_output=True)  # noqa: E731
    sh("ip", "netns", "add", pod)
    try:
        sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", pod_if)
        sh("ip", "link", "set", pod_if, "netns", pod)
        sh("ip", "link", "set", host_if, "netns", c.netns)  # the peer: containerd's namespace
        sh("ip", "-n", c.netns, "addr", "add", "10.213.7.1/24", "dev", host_if)
        sh("ip", "-n", c.netns, "link", "set", host_if, "up")
        sh("ip", "-n", pod, "addr", "add", "10.213.7.2/24", "dev", pod_if)
        sh("ip", "-n", pod, "link", "set", pod_if, "up")
        sh("ip", "-n", pod, "link", "set", "lo", "up")
        cp = c.run(
            image, cid, "sh", "-c", "ip -4 addr; ping -c 1 -W 10 10.213.7.1",
            options=["--with-ns", f"network:/run/netns/{pod}"], check=False,
        )  # fmt: skip
        assert cp.returncode == 0, (cp.stdout, cp.stderr)
        out = cp.stdout.decode()
        assert "10.213.7.2/24" in out
        assert "1 packets received" in out
    finally:
        subprocess.run(["ip", "netns", "delete", pod], check=False)
    assert settled(c, cid) == []


def test_pod_containers_run_in_one_vm(containerd: tuple[Containerd, str]) -> None:
    """Containers CRI marks as one pod's (annotations) run in the VM of its sandbox
    container, behind its shim: each in its own root, with its own processes, exit and
    delete; the VM goes with the sandbox container."""
    c, image = containerd
    pod, app = f"pod-{uuid.uuid4().hex[:6]}", f"app-{uuid.uuid4().hex[:6]}"
    mine = "echo {} > /who; exec sleep 600"
    c.run(
        image, pod, "sh", "-c", mine.format("pod"), detach=True,
        options=["--annotation", f"{CONTAINER_TYPE}=sandbox"],
    )  # fmt: skip
    c.run(
        image, app, "sh", "-c", mine.format("app"), detach=True,
        options=["--annotation", f"{CONTAINER_TYPE}=container",
                 "--annotation", f"{SANDBOX_ID}={pod}"],
    )  # fmt: skip
    # One VM, behind one shim: both tasks report its VMM's pid; no VM for the app container.
    qemu = [pid for pid, cmd in processes_mentioning(f"sandbox-{pod}") if "qemu-system" in cmd]
    assert len(qemu) == 1
    assert not [cmd for _, cmd in processes_mentioning(f"sandbox-{app}") if "qemu" in cmd]
    tasks = {line.split()[0]: line.split()[1:] for line in task_lines(c)}
    assert tasks[pod] == tasks[app] == [str(qemu[0]), "RUNNING"]
    bundles = os.path.join(c.state, "io.containerd.runtime.v2.task", "vctest")
    address = Path(bundles, pod, "address").read_text()
    assert Path(bundles, app, "address").read_text() == address

    def in_task(cid: str, *argv: str) -> bytes:
        exec_id = ["--exec-id", f"x{uuid.uuid4().hex[:6]}"]
        return c.ctr("task", "exec", "--fifo-dir", c.fifo_dir, *exec_id, cid, *argv).stdout

    assert in_task(pod, "cat", "/who") == b"pod\n"
    assert in_task(app, "cat", "/who") == b"app\n"
    ps = {cid: c.ctr("task", "ps", cid).stdout.decode().splitlines()[1:] for cid in (pod, app)}
    assert len(ps[pod]) == len(ps[app]) == 1 and ps[pod] != ps[app], ps

    # The app container ends and goes; the pod's keeps running in the same VM.
    c.ctr("task", "kill", "-s", "SIGKILL", app)
    wait_status(c, app, "STOPPED")
    assert task_status(c, pod) == "RUNNING"
    c.ctr("task", "delete", app)
    c.ctr("container", "delete", app)
    assert in_task(pod, "cat", "/who") == b"pod\n"
    assert [pid for pid, cmd in processes_mentioning(f"sandbox-{pod}") if "qemu" in cmd] == qemu
    c.ctr("task", "kill", "-s", "SIGKILL", pod)
    wait_status(c, pod, "STOPPED")
    c.ctr("task", "delete", pod)
    c.ctr("container", "delete", pod)
    assert settled(c, pod) == [] and settled(c, app) == []


def task_lines(c: Containerd) -> list[str]:
    return c.ctr("task", "ls").stdout.decode().splitlines()[1:]
