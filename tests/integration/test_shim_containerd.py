"""containerd-shim-virtc-v2 under a real containerd (Debian's 1.6.20), driven with `ctr`: the
task runs in a QEMU VM, in the image's root filesystem; afterwards nothing is left."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import pty
import select
import signal
import struct
import subprocess
import termios
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from containerd_support import (
    CTR,
    NAMESPACE,
    Containerd,
    import_busybox,
    leftovers,
    running_containerd,
    settled,
)
from google.protobuf import any_pb2, empty_pb2

from leaks import processes_mentioning
from virtcontainers.shim.main import CONTAINER_TYPE, SANDBOX_ID
from virtcontainers.shim.proto.containerd.runtime.v2.task import shim_pb2 as pb
from virtcontainers.shim.service import RESOURCES_TYPE, SERVICE
from virtcontainers.shim.ttrpc import Client

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


def test_ctr_run_rm_leaves_nothing_the_moment_it_returns(
    containerd: tuple[Containerd, str],
) -> None:
    """containerd waits for the task's Delete, the shim's Shutdown and the `delete` binary it
    runs once the shim's connection closes, before `ctr run --rm` returns. The shim kills the
    container's VM at its Delete and exits by itself after Shutdown (the `delete` binary
    waits for that, it does not kill it mid-cleanup): no VMM, virtiofsd, shim, socket, mount
    or directory is left when `ctr` returns, without waiting for anything to settle."""
    c, image = containerd
    cid = f"rm-{uuid.uuid4().hex[:6]}"
    c.run(image, cid, "true")
    assert leftovers(c, cid) == []
    deadline = time.monotonic() + 30  # containerd copies the shim's log lines as they come
    while f"shim {cid}: exiting (0)" not in (log := c.log_tail(400)):
        assert time.monotonic() < deadline, log
        time.sleep(0.1)
    assert f"delete {cid}: VM killed" in log


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

    # The container's cgroup (v2): its memory use, not the guest's.
    assert int(metrics(c, cid)["memory.usage"]) > 0

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


def kill_shim_then_delete(c: Containerd, cid: str) -> None:
    """SIGKILL the task's shim; once containerd has cleaned up after it, delete the task and
    the container."""
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


def test_shim_killed_then_containerd_cleans_up(containerd: tuple[Containerd, str]) -> None:
    c, image = containerd
    cid = f"kill-{uuid.uuid4().hex[:6]}"
    c.run(image, cid, "sleep", "600", detach=True)
    kill_shim_then_delete(c, cid)
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
    events_log = Path(c.dir, f"events-{pod}")
    with open(events_log, "w") as out:  # every event from now on, as containerd saw it
        events = subprocess.Popen([CTR, "-a", c.address, "events"], stdout=out)
    c.run(
        image, pod, "sh", "-c", mine.format("pod"), detach=True,
        options=["--annotation", f"{CONTAINER_TYPE}=sandbox"],
    )  # fmt: skip
    c.run(
        image, app, "sh", "-c", mine.format("app"), detach=True,
        options=["--annotation", f"{CONTAINER_TYPE}=container",
                 "--annotation", f"{SANDBOX_ID}={pod}"],
    )  # fmt: skip
    # One VM, behind one shim: the first task reports its VMM's pid, the app container's the
    # guest pid of its process; no VM for the app container.
    qemu = [pid for pid, cmd in processes_mentioning(f"sandbox-{pod}") if "qemu-system" in cmd]
    assert len(qemu) == 1
    assert not [cmd for _, cmd in processes_mentioning(f"sandbox-{app}") if "qemu" in cmd]
    tasks = {line.split()[0]: line.split()[1:] for line in task_lines(c)}
    assert tasks[pod] == [str(qemu[0]), "RUNNING"]
    assert tasks[app][1] == "RUNNING" and tasks[app][0] != tasks[pod][0], tasks
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
    assert ps[app][0].split()[0] == tasks[app][0], (ps, tasks)

    # A container of the pod naming the app task's pid namespace by its path joins the app
    # container's in the guest (not the pod's); a path of no task of the pod is refused.
    pidns = "busybox readlink /proc/self/ns/pid; busybox readlink /proc/1/ns/pid"
    dbg, stray = (f"{what}-{uuid.uuid4().hex[:6]}" for what in ("dbg", "str"))
    c.run(
        image, dbg, "sh", "-c", f"{pidns}; exec sleep 600", detach=True,
        options=["--annotation", f"{CONTAINER_TYPE}=container",
                 "--annotation", f"{SANDBOX_ID}={pod}",
                 "--with-ns", f"pid:/proc/{tasks[app][0]}/ns/pid"],
    )  # fmt: skip
    assert in_task(dbg, "sh", "-c", pidns) == in_task(app, "sh", "-c", pidns)
    assert in_task(dbg, "sh", "-c", pidns) != in_task(pod, "sh", "-c", pidns)
    c.ctr("task", "kill", "-s", "SIGKILL", dbg)
    wait_status(c, dbg, "STOPPED")
    c.ctr("task", "delete", dbg)
    c.ctr("container", "delete", dbg)
    cp = c.run(
        image, stray, "true", detach=True, check=False,
        options=["--annotation", f"{CONTAINER_TYPE}=container",
                 "--annotation", f"{SANDBOX_ID}={pod}", "--with-ns", "pid:/proc/1/ns/pid"],
    )  # fmt: skip
    assert cp.returncode != 0 and b"pid namespace /proc/1/ns/pid is none" in cp.stderr, cp
    c.ctr("container", "delete", stray, check=False)

    # The app container ends and goes; the pod's keeps running in the same VM.
    c.ctr("task", "kill", "-s", "SIGKILL", app)
    wait_status(c, app, "STOPPED")
    assert task_status(c, pod) == "RUNNING"
    c.ctr("task", "delete", app)
    c.ctr("container", "delete", app)
    assert in_task(pod, "cat", "/who") == b"pod\n"
    events.terminate()
    events.wait()
    lines = [line.split() for line in events_log.read_text().splitlines() if app in line]
    topics = [next(w for w in words if w.startswith("/")) for words in lines]
    assert [t for t in topics if t.startswith("/tasks/")] == [
        *("/tasks/create", "/tasks/start"),
        *("/tasks/exec-added", "/tasks/exec-started", "/tasks/exit", "/tasks/delete"),  # cat
        *("/tasks/exec-added", "/tasks/exec-started", "/tasks/exit", "/tasks/delete"),  # readlink
        *("/tasks/exit", "/tasks/delete"),  # the container's
    ], topics
    assert [pid for pid, cmd in processes_mentioning(f"sandbox-{pod}") if "qemu" in cmd] == qemu
    c.ctr("task", "kill", "-s", "SIGKILL", pod)
    wait_status(c, pod, "STOPPED")
    c.ctr("task", "delete", pod)
    c.ctr("container", "delete", pod)
    assert settled(c, pod, app) == []


def task_lines(c: Containerd) -> list[str]:
    return c.ctr("task", "ls").stdout.decode().splitlines()[1:]


def metrics(c: Containerd, cid: str) -> dict[str, str]:
    """`ctr task metrics` as METRIC -> VALUE (its table for cgroup v2 Metrics)."""
    out = c.ctr("task", "metrics", cid).stdout.decode()
    return {f[0]: f[1] for line in out.splitlines() if len(f := line.split()) == 2}


def read_until(fd: int, want: bytes, timeout: float = 120) -> bytes:
    """Read from `fd` until `want` has arrived (AssertionError with what came, at timeout)."""
    got = b""
    deadline = time.monotonic() + timeout
    while want not in got:
        left = deadline - time.monotonic()
        assert left > 0, f"waited for {want!r}, got {got!r}"
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: a pty whose other side has closed
                chunk = b""
            assert chunk, f"end of output while waiting for {want!r}, got {got!r}"
            got += chunk
    return got


def test_output_streams_and_stdin_is_interactive(containerd: tuple[Containerd, str]) -> None:
    """Output reaches ctr while the process runs; each line written to ctr's stdin reaches
    the process as it is written; closing stdin ends it."""
    c, image = containerd
    cid = f"io-{uuid.uuid4().hex[:6]}"
    script = "echo started; while read l; do echo got:$l; done; echo bye"
    ctr = subprocess.Popen(
        [*c.ctr_argv(), *c.run_args(image, cid, "sh", "-c", script)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert ctr.stdin is not None and ctr.stdout is not None
    try:
        out = read_until(ctr.stdout.fileno(), b"started\n")
        for word in ("one", "two"):
            ctr.stdin.write(f"{word}\n".encode())
            ctr.stdin.flush()
            out += read_until(ctr.stdout.fileno(), f"got:{word}\n".encode())
            assert ctr.poll() is None  # answered while it runs
        ctr.stdin.close()
        out += read_until(ctr.stdout.fileno(), b"bye\n")
        assert ctr.wait(120) == 0
    finally:
        if ctr.poll() is None:
            ctr.kill()
            ctr.wait()
    assert out == b"started\ngot:one\ngot:two\nbye\n"
    assert settled(c, cid) == []


def on_a_terminal(c: Containerd, *args: str) -> int:
    """Run `ctr ARGS` on a new terminal of 33x111 (ctr -t needs one), answer each line with
    `stty size` until the process sees ctr's size, then again after a resize to 40x120 (and
    SIGWINCH to ctr, as a terminal emulator does), then type ^D; ctr's exit status."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 111, 0, 0))
    ctr = subprocess.Popen(
        [*c.ctr_argv(), *args], stdin=slave, stdout=slave, stderr=slave, start_new_session=True
    )
    os.close(slave)
    try:
        # A terminal of the container's own (a pty of its devpts), which `tty` can name.
        read_until(master, b"/dev/pts/")

        def size_seen(size: bytes) -> None:
            # ctr sends its terminal's size after the start: ask until the process sees it.
            deadline = time.monotonic() + 60
            while True:
                os.write(master, b"\r")
                try:
                    read_until(master, size, timeout=2)
                    return
                except AssertionError:
                    assert time.monotonic() < deadline, f"the terminal never was {size!r}"

        size_seen(b"33 111")
        fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        os.kill(ctr.pid, signal.SIGWINCH)
        size_seen(b"40 120")
        os.write(master, b"\x04")  # ^D: end of input at the terminal
        return ctr.wait(120)
    finally:
        if ctr.poll() is None:
            ctr.kill()
            ctr.wait()
        os.close(master)


SIZES = "busybox tty; while read l; do busybox stty size; done; exit 3"


def test_run_t_gives_a_terminal_that_resizes(containerd: tuple[Containerd, str]) -> None:
    c, image = containerd
    cid = f"tty-{uuid.uuid4().hex[:6]}"
    assert on_a_terminal(c, *c.run_args(image, cid, "sh", "-c", SIZES, options=["-t"])) == 3
    assert settled(c, cid) == []


def update_task(c: Containerd, cid: str, resources: dict[str, object]) -> None:
    """The Update containerd sends for a task's new OCI LinuxResources (ctr 1.6 has no
    command for it: sent to the task's shim at the address containerd keeps in the bundle)."""
    bundle = os.path.join(c.state, "io.containerd.runtime.v2.task", NAMESPACE, cid)
    address = Path(bundle, "address").read_text().strip().removeprefix("unix://")
    packed = any_pb2.Any(type_url=RESOURCES_TYPE, value=json.dumps(resources).encode())

    async def call() -> None:
        async with await Client.connect(address) as client:
            request = pb.UpdateTaskRequest(id=cid, resources=packed)
            await client.call(SERVICE, "Update", request, empty_pb2.Empty, timeout=120)

    asyncio.run(call())


def test_exec_terminal_memory_limit_update_metrics_and_oom_event(
    containerd: tuple[Containerd, str],
) -> None:
    """`ctr task exec -t` gets a terminal; the container's cgroup in the guest: its limit in
    `ctr task metrics`, an Update changes it, and an OOM kill in it is a /tasks/oom event."""
    c, image = containerd
    cid = f"oom-{uuid.uuid4().hex[:6]}"
    fifo = ["--fifo-dir", c.fifo_dir]
    loop = "while :; do sleep 1; done"
    c.run(image, cid, "sh", "-c", loop, detach=True, options=["--memory-limit", str(48 << 20)])
    events = subprocess.Popen(
        [*c.ctr_argv(), "events"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    assert events.stdout is not None
    try:
        # An exec gets a terminal of its own too, resized with ctr's.
        exec_t = ["task", "exec", "-t", *fifo, "--exec-id", "t", cid, "sh", "-c", SIZES]
        assert on_a_terminal(c, *exec_t) == 3
        before = metrics(c, cid)
        assert int(before["memory.usage_limit"]) == 48 << 20
        assert 0 < int(before["memory.usage"]) < 48 << 20
        update_task(c, cid, {"memory": {"limit": 40 << 20}})
        assert int(metrics(c, cid)["memory.usage_limit"]) == 40 << 20
        # 64 MiB touched in a 40 MiB cgroup: the guest kernel kills dd.
        hog = "busybox dd if=/dev/zero of=/dev/null bs=64M count=1"
        cp = c.ctr("task", "exec", *fifo, "--exec-id", "hog", cid, "sh", "-c", hog, check=False)
        assert cp.returncode != 0, cp
        out = read_until(events.stdout.fileno(), b"/tasks/oom", timeout=60)
        line = next(x for x in out.decode().splitlines() if "/tasks/oom" in x)
        assert cid in line
    finally:
        events.kill()
        events.wait()
    c.ctr("task", "kill", "-s", "SIGKILL", cid)
    wait_status(c, cid, "STOPPED")
    c.ctr("task", "delete", cid)
    c.ctr("container", "delete", cid)
    assert settled(c, cid) == []


def test_pod_whose_sandbox_container_exits_at_once_goes_entirely(
    containerd: tuple[Containerd, str],
) -> None:
    """A pod's sandbox container that exits as it starts (as a broken pause image would), then
    an app container refused or ended: deleting them leaves no shim, VM or virtiofsd."""
    c, image = containerd
    pod, app = f"pod-{uuid.uuid4().hex[:6]}", f"app-{uuid.uuid4().hex[:6]}"
    c.run(
        image, pod, "sh", "-c", "exit 125", detach=True,
        options=["--annotation", f"{CONTAINER_TYPE}=sandbox"],
    )  # fmt: skip
    wait_status(c, pod, "STOPPED")
    c.run(
        image, app, "sh", "-c", "exit 3", detach=True, check=False,
        options=["--annotation", f"{CONTAINER_TYPE}=container",
                 "--annotation", f"{SANDBOX_ID}={pod}"],
    )  # fmt: skip
    if app in {line.split()[0] for line in task_lines(c)}:
        wait_status(c, app, "STOPPED")
        c.ctr("task", "delete", app)
    c.ctr("container", "delete", app, check=False)
    c.ctr("task", "delete", pod)
    c.ctr("container", "delete", pod)
    assert settled(c, pod, app) == []
