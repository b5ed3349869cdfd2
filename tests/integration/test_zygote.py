"""The zygote beside a real VM cache server (QEMU, TCG): `virtc run --factory` and the
shim's `start` under a real containerd are served by workers forked from it, with the
client's output, cwd, environment, terminal and exit status; a signal to the client reaches
its worker; a client killed takes its worker and VM with it; a process of another user is
refused; a dead zygote means commands run in their own process again; nothing is left."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import os
import pty
import re
import resource
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from containerd_support import import_busybox, leftovers, running_containerd, settled
from test_shim_containerd import SHIM_CONFIG, metrics, wait_status

from leaks import processes_mentioning
from virtcontainers import host
from virtcontainers.containers.container import POOL_CGROUP
from virtcontainers.factory import paths, poolshare
from virtcontainers.factory.daemon import daemon_status
from virtcontainers.images import ImageStore
from virtcontainers.images.build import busybox_image
from virtcontainers.sandbox import Sandbox
from virtcontainers.zygote import client, protocol

pytestmark = pytest.mark.integration

VIRTC = [sys.executable, "-m", "virtcontainers.cli"]
RUN = ["run", "--memory", "256", "--factory", "--image", "busybox"]


class Server:
    def __init__(self, run_root: str, env: dict[str, str]) -> None:
        self.run_root = run_root
        self.env = env
        self.log = paths.log_file(run_root)

    def virtc(self, *args: str, cwd: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*VIRTC, *args],
            env=self.env,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [*VIRTC, *args], env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    def logged(self) -> str:
        return Path(self.log).read_text(errors="replace")

    def worker_of(self, client_pid: int, timeout: float = 60) -> int:
        """The pid of the worker the zygote forked for `client_pid` (from its log)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(rf"worker (\d+) runs .* for pid {client_pid}\b", self.logged())
            if m:
                return int(m.group(1))
            time.sleep(0.1)
        raise AssertionError(f"no worker for pid {client_pid}:\n{self.logged()[-3000:]}")

    def pooled(self) -> str:
        """The id of the pooled VM, once the pool is full: the next `--factory` run's."""
        deadline = time.monotonic() + 240
        while True:
            status = asyncio.run(daemon_status(self.run_root))
            if status.vms and not status.booting:
                return status.vms[0].id
            assert time.monotonic() < deadline, status
            time.sleep(0.2)

    def listed(self) -> set[str]:
        return {info.id for info in Sandbox.list(self.run_root)}

    def zygote_pid(self) -> int:
        return int(re.findall(r"zygote (\d+) serving on", self.logged())[-1])


def alive(pid: int) -> bool:
    """`pid` runs (not a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except FileNotFoundError:
        return False
    return stat.rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")


def wait_gone(pid: int, timeout: float = 120) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.1)
    return False


def read_line(proc: subprocess.Popen[str], want: str, timeout: float = 180) -> None:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, f"no output from {proc.args}"
    assert proc.stdout.readline().strip() == want


@pytest.fixture(scope="module")
def server(guest_assets: object) -> Iterator[Server]:
    """A VM cache server (one pooled clone of a --virtio-fs template) and its zygote."""
    run_root = tempfile.mkdtemp(prefix="vczy-", dir="/tmp")
    store = os.path.join(run_root, "images")
    ImageStore(store).import_archive(busybox_image())
    env = {**os.environ, "VC_RUN_ROOT": run_root, "VC_IMAGE_ROOT": store}
    env.pop(protocol.DISABLE_ENV, None)
    s = Server(run_root, env)
    try:
        r = s.virtc("template", "create", "t", "--virtio-fs", "--memory", "256")
        assert r.returncode == 0, r.stderr
        r = s.virtc("factory", "init", "--template", "t", "--size", "1", "--wait")
        assert r.returncode == 0, r.stderr
        deadline = time.monotonic() + 120
        while not os.path.exists(paths.zygote_socket(run_root)):
            assert time.monotonic() < deadline, s.logged()
            time.sleep(0.1)
        yield s
    finally:
        s.virtc("factory", "destroy")
        s.virtc("template", "rm", "t")
        try:
            assert not os.path.exists(paths.zygote_socket(run_root))
            assert not processes_mentioning(run_root)
            assert Sandbox.list(run_root) == []
        finally:
            shutil.rmtree(run_root, ignore_errors=True)


def test_run_is_served_by_a_worker_of_the_zygote(server: Server, tmp_path: Path) -> None:
    """Output, exit code, a volume found from the client's cwd, the image store from its
    environment: all the client's, though a worker of the zygote ran the command."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "g").write_text("hello from the cwd\n")
    vm = server.pooled()
    proc = subprocess.Popen(
        [*VIRTC, *RUN, "-v", "data:/data", "--", "sh", "-c", "cat /data/g; echo out; exit 7"],
        env=server.env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = proc.communicate(timeout=300)
    assert (proc.returncode, out) == (7, "hello from the cwd\nout\n"), err
    server.worker_of(proc.pid)
    assert vm not in server.listed()


@pytest.mark.parametrize(
    ("signo", "code", "said"),
    [
        (signal.SIGINT, 130, "virtc: interrupted"),
        (signal.SIGTERM, 143, "virtc: terminated by SIGTERM"),
    ],
)
def test_a_signal_reaches_the_worker(server: Server, signo: int, code: int, said: str) -> None:
    """The client's signal reaches the worker, which stops the sandbox and exits as virtc
    would without the zygote."""
    vm = server.pooled()
    proc = server.popen(*RUN, "--", "sh", "-c", "echo up; sleep 600")
    try:
        read_line(proc, "up")
        worker = server.worker_of(proc.pid)
        # The worker shows the client's command line, not the zygote's.
        cmdline = Path(f"/proc/{worker}/cmdline").read_bytes()
        assert b"sleep 600" in cmdline and b"virtcontainers.zygote" not in cmdline
        proc.send_signal(signo)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == code and said in err, err
        assert wait_gone(worker)
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    assert vm not in server.listed()


def test_a_client_killed_takes_its_worker_and_vm_along(server: Server) -> None:
    vm = server.pooled()
    proc = server.popen(*RUN, "--", "sh", "-c", "echo up; sleep 600")
    read_line(proc, "up")
    worker = server.worker_of(proc.pid)
    [qemu] = [info.pid for info in Sandbox.list(server.run_root) if info.id == vm]
    assert alive(worker) and alive(qemu)
    proc.kill()
    proc.wait()
    assert wait_gone(worker), f"worker {worker} outlived its client"
    assert proc.stderr is not None
    assert vm not in server.listed(), proc.stderr.read()
    assert wait_gone(qemu, 30)


def _reap(pid: int, timeout: float) -> int:
    """The wait status of child `pid`, SIGKILLed if it has not exited within `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    return os.waitpid(pid, 0)[1]


def _set_size(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def test_run_t_through_the_zygote_has_the_client_terminal(server: Server) -> None:
    """`virtc run -t` on a pty: the worker has the client's terminal (the container's
    terminal gets its size)."""
    vm = server.pooled()
    pid, fd = pty.fork()
    if pid == 0:  # the child becomes virtc on the pty
        _set_size(0, 33, 99)
        os.execve(
            sys.executable,
            [*VIRTC, *RUN, "-t", "--", "sh", "-c", "stty size; tty; exit 5"],
            server.env,
        )
    seen = b""
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if select.select([fd], [], [], 0.2)[0]:
                try:
                    seen += os.read(fd, 65536)
                except OSError:  # the client exited: the pty is hung up
                    break
    finally:
        status = _reap(pid, 60)
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 5, seen
    assert re.search(rb"\b33 99\r+\n/dev/pts/0\r", seen), seen
    server.worker_of(pid)
    assert vm not in server.listed()


def test_the_shim_start_is_served_by_the_zygote_under_containerd(
    server: Server, tmp_path: Path
) -> None:
    config = tmp_path / "configuration.toml"
    # The template's config (`virtc template create`): Kata's TOML means mlock without
    # enable_swap, which the factory would refuse (the shim then boots a VM instead).
    config.write_text(f"{SHIM_CONFIG}enable_swap = true\n\n[factory]\nvm_cache_number = 1\n")
    env = {"VC_RUN_ROOT": server.run_root, "VC_SHIM_CONFIG": str(config)}
    with running_containerd(env=env) as c:
        # The harness's leftovers are what mentions the shim's run root: here the VM cache
        # server's too, which must stay. VMs are checked below, the rest under c.dir.
        c.vm_root = c.dir
        image = import_busybox(c)
        cid = f"zy-{uuid.uuid4().hex[:6]}"
        vm = server.pooled()
        cp = c.run(image, cid, "sh", "-c", "echo from-the-pool; exit 4", check=False)
        # The moment `ctr run --rm` returns, the pooled VM it ran in is gone whole: its
        # processes, state, staged share (and the root mounted there), the shim and its
        # socket, the bundle and its root's mount.
        gone = (processes_mentioning(vm), vm in server.listed(), leftovers(c, cid))
        staged = os.path.exists(poolshare.share_dir(server.run_root, vm))
        assert (cp.returncode, cp.stdout) == (4, b"from-the-pool\n"), (cp.stderr, c.log_tail())
        for fallback in ("VM factory", "booting a VM directly"):  # no boot instead
            assert fallback not in c.log_tail(400)
        assert (gone, staged) == (([], False, []), False), c.log_tail()
        # containerd runs in a network namespace of its own: the worker joined it.
        starts = [
            line
            for line in server.logged().splitlines()
            if re.search(rf"runs containerd-shim-virtc-v2 .*-id {cid} .*start for pid", line)
        ]
        assert len(starts) == 1 and "net namespace" in starts[0], server.logged()[-3000:]

        # A detached task in the next pooled VM runs in the cgroup the VM made while it
        # waited; an exec joins it there, and the limit, metrics and ps find it.
        cid = f"zy-{uuid.uuid4().hex[:6]}"
        vm = server.pooled()
        loop = ["sh", "-c", "while :; do sleep 1; done"]
        c.run(image, cid, *loop, detach=True, options=["--memory-limit", str(48 << 20)])
        fifo = ["--fifo-dir", c.fifo_dir]
        where = c.ctr("task", "exec", *fifo, "--exec-id", "cg", cid, "cat", "/proc/self/cgroup")
        assert where.stdout == f"0::/{os.path.basename(POOL_CGROUP)}\n".encode(), where
        used = metrics(c, cid)
        assert int(used["memory.usage_limit"]) == 48 << 20
        assert 0 < int(used["memory.usage"]) < 48 << 20
        assert len(c.ctr("task", "ps", cid).stdout.splitlines()) >= 2  # header, the loop's pid
        c.ctr("task", "kill", "-s", "SIGKILL", cid)
        wait_status(c, cid, "STOPPED")
        c.ctr("task", "delete", cid)
        c.ctr("container", "delete", cid)
        assert settled(c, cid) == []
        assert (processes_mentioning(vm), vm in server.listed()) == ([], False)
    assert c.left_at_stop == []


def _command_process(zygote: int, title: bytes, timeout: float = 60) -> int:
    """The pid of the command process (a grandchild of `zygote`) showing `title` as its
    command line (the client's words joined by spaces: `proctitle`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                if Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")[0] != title:
                    continue
                parent = _ppid(int(entry))
                if _ppid(parent) == zygote:
                    return int(entry)
            except (OSError, ValueError):
                continue
        time.sleep(0.05)
    raise AssertionError(f"no worker runs {title!r}")


def _ppid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _client(path: str, setup: Callable[[], None], stdout: int = 1) -> bytes:
    """Connect to `path` from a child that ran `setup` first, send a `virtc --version`
    request (fds 0, `stdout`, 2); the zygote's answer."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        answer = b"?"
        try:
            os.close(r)
            setup()
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(path)
            req = protocol.Request("virtc", ["virtc", "--version"], {}, "/", 0o22)
            data = protocol.encode_request(req)
            fds = struct.pack("3i", 0, stdout, 2)
            with contextlib.suppress(BrokenPipeError):  # refused before it was all sent
                sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
            answer = sock.recv(64) or b"EOF"
            if answer.startswith(protocol.ACCEPT):  # stay, as a client does, till the end
                answer += sock.recv(64)
        except BaseException as exc:
            answer = repr(exc).encode()
        finally:
            os.write(w, answer)
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        got = f.read()
    os.waitpid(pid, 0)
    return got


def _connect_as(path: str, uid: int) -> bytes:
    """Connect to `path` as `uid` (file access still as root, so only the zygote's own
    check stands in the way)."""

    def become() -> None:
        os.setresuid(uid, uid, 0)
        ctypes.CDLL(None, use_errno=True).setfsuid(0)

    return _client(path, become)


@pytest.fixture
def lone_zygote() -> Iterator[tuple[str, subprocess.Popen[bytes], str]]:
    """A zygote on its own (no VM cache server): its socket, process and log path."""
    d = tempfile.mkdtemp(prefix="vczl-", dir="/tmp")
    sock, log = os.path.join(d, "zygote.sock"), os.path.join(d, "log")
    with open(log, "wb") as logf:
        proc = subprocess.Popen(
            host.python_command("-m", "virtcontainers.zygote", "--socket", sock),
            stdout=logf,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 120
        while not os.path.exists(sock):
            assert time.monotonic() < deadline and proc.poll() is None, Path(log).read_text()
            time.sleep(0.1)
        yield sock, proc, log
    finally:
        proc.terminate()
        proc.wait(30)
        assert not os.path.exists(sock)
        shutil.rmtree(d)


def test_a_process_of_another_user_is_refused(
    lone_zygote: tuple[str, subprocess.Popen[bytes], str],
) -> None:
    sock, _, log = lone_zygote
    answer = _connect_as(sock, 65534)
    assert answer.startswith(protocol.REFUSE), answer
    assert "refused pid" in Path(log).read_text() and "of uid 65534" in Path(log).read_text()
    assert "runs virtc" not in Path(log).read_text()
    # Root, the zygote's user, is served.
    assert _connect_as(sock, 0).startswith(protocol.ACCEPT)


def test_a_socket_of_another_user_gets_nothing() -> None:
    """A socket where the zygote's should be, but whose process runs as another user (one
    who could make it, in a run root of theirs): the client sends it neither its request
    (argv, environment) nor its fds, and runs the command itself."""
    d = tempfile.mkdtemp(prefix="vczu-", dir="/tmp")
    os.chmod(d, 0o755)
    os.chown(d, 65534, 65534)
    path = os.path.join(d, "zygote.sock")
    ready_r, ready_w = os.pipe()
    got_r, got_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the other user's listener: reports what it was sent
        got = b"?"
        try:
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
                listener.bind(path)
                listener.listen(1)
                os.write(ready_w, b"r")
                conn, _ = listener.accept()
                conn.settimeout(30)
                got = conn.recv(65536) or b"EOF"
        except BaseException as exc:
            got = repr(exc).encode()
        finally:
            os.write(got_w, got)
            os._exit(0)
    os.close(ready_w)
    os.close(got_w)
    try:
        assert os.read(ready_r, 1) == b"r"
        assert client.delegate("virtc", ["virtc", "--version"], [path]) is None
    finally:
        os.waitpid(pid, 0)
        with os.fdopen(got_r, "rb") as f:
            got = f.read()
        os.close(ready_r)
        shutil.rmtree(d)
    assert got == b"EOF", got


def test_a_dead_zygote_means_commands_run_themselves(server: Server) -> None:
    """Last in this module: it kills the server's zygote."""
    zygote = server.zygote_pid()
    served = server.logged().count(" runs ")
    os.kill(zygote, signal.SIGKILL)
    assert wait_gone(zygote, 30)
    r = subprocess.run(
        [*VIRTC, *RUN, "--", "sh", "-c", "echo local; exit 3"],
        env=server.env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert (r.returncode, r.stdout) == (3, "local\n"), r.stderr
    assert server.logged().count(" runs ") == served


PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS, CAP_SYS_ADMIN = 24, 38, 21


def _prctl(option: int, arg: int) -> None:
    if ctypes.CDLL(None, use_errno=True).prctl(option, arg, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), f"prctl({option}, {arg})")


@pytest.mark.parametrize(
    ("setup", "said"),
    [
        (lambda: _prctl(PR_CAPBSET_DROP, CAP_SYS_ADMIN), "CapBnd"),
        (lambda: _prctl(PR_SET_NO_NEW_PRIVS, 1), "NoNewPrivs"),
    ],
    ids=["without CAP_SYS_ADMIN", "no_new_privs"],
)
def test_a_client_with_fewer_privileges_is_refused(
    lone_zygote: tuple[str, subprocess.Popen[bytes], str], setup: Callable[[], None], said: str
) -> None:
    """A root process that gave up a capability (or may gain none) must not get a worker
    that has it: the zygote refuses, and the client runs the command itself, as it is."""
    sock, _, log = lone_zygote
    answer = _client(sock, setup)
    assert answer.startswith(protocol.REFUSE), answer
    assert said in answer.decode(errors="replace")
    assert "runs virtc" not in Path(log).read_text()


def test_a_worker_takes_on_its_client_limits_groups_and_nice(
    lone_zygote: tuple[str, subprocess.Popen[bytes], str],
) -> None:
    """The worker has the client's resource limits, group ids and nice value, as a command
    the client ran itself would (not the zygote's). Its stdout is a full pipe, so it waits
    in its first write while it is looked at."""
    sock, zygote, _ = lone_zygote
    r, w = os.pipe()
    os.set_blocking(w, False)
    with contextlib.suppress(BlockingIOError):
        while True:
            os.write(w, b"x" * 4096)
    os.set_blocking(w, True)
    result: list[bytes] = []

    def setup() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (321, 4321))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        os.setgroups([0, 4242])
        os.setresgid(4243, 4243, 4243)
        os.nice(7)

    t = threading.Thread(target=lambda: result.append(_client(sock, setup, stdout=w)))
    t.start()
    try:
        worker = _command_process(zygote.pid, b"virtc --version")
        limits = Path(f"/proc/{worker}/limits").read_text()
        status = Path(f"/proc/{worker}/status").read_text()
        stat = Path(f"/proc/{worker}/stat").read_text().rsplit(")", 1)[1].split()
    finally:
        os.close(w)
        with os.fdopen(r, "rb") as f:
            f.read()
        t.join(60)
    assert re.search(r"Max open files\s+321\s+4321\s", limits), limits
    assert re.search(r"Max core file size\s+0\s+0\s", limits), limits
    assert re.search(r"^Groups:\s+0 4242\s*$", status, re.M), status
    assert re.search(r"^Gid:\s+4243\s+4243\s+4243\s", status, re.M), status
    assert int(stat[16]) == 7, stat  # nice
    assert result and result[0].startswith(protocol.ACCEPT), result
