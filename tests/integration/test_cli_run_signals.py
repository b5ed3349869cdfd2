"""`virtc run --image` on a real QEMU guest, and what reaches it from outside while it runs:
SIGTERM and SIGHUP stop it as cleanly as SIGINT (nothing left behind), a terminal's resize
reaches the container's terminal, and `-t -i` ends with its command (or SIGINT) though its
stdin stays open. Run without the zygote (`test_zygote` covers the hand-over)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time

import pytest

from leaks import leftovers, vm_processes
from virtcontainers.images import ImageStore

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("leak_check")]

VIRTC = (sys.executable, "-m", "virtcontainers.cli")
RUN = ("run", "--net", "none", "--image", "busybox")


@pytest.fixture(scope="module")
def store(images: ImageStore) -> ImageStore:
    """The busybox store (conftest's `images`)."""
    return images


def env(run_root: str, store: ImageStore) -> dict[str, str]:
    return dict(os.environ, VC_RUN_ROOT=run_root, VC_IMAGE_ROOT=store.root, VIRTC_NO_ZYGOTE="1")


@pytest.mark.parametrize("signo", [signal.SIGTERM, signal.SIGHUP])
def test_a_termination_signal_stops_the_sandbox(
    run_root: str, store: ImageStore, signo: signal.Signals
) -> None:
    proc = subprocess.Popen(
        [*VIRTC, *RUN, "--", "sh", "-c", "echo up; sleep 600"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env(run_root, store),
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"up\n"
        assert vm_processes(run_root), "the sandbox's VM should be running"
        proc.send_signal(signo)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signo, err
    assert signo.name.encode() in err, err
    assert vm_processes(run_root) == []
    assert leftovers(run_root) == []


def _set_size(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _on_a_pty(
    run_root: str, store: ImageStore, args: list[str], until: bytes | None = None
) -> tuple[int, int, bytes]:
    """Start `virtc ARGS` on a new 33x99 pty whose leader we keep (its stdin stays open);
    returns (pid, leader fd, what it wrote up to and including `until`)."""
    pid, fd = pty.fork()
    if pid == 0:  # the child becomes virtc on the pty
        _set_size(0, 33, 99)
        os.execve(sys.executable, [*VIRTC, *args], env(run_root, store))
    seen = b""
    deadline = time.monotonic() + 180
    while until is not None and until not in seen and time.monotonic() < deadline:
        if select.select([fd], [], [], 0.2)[0]:
            try:
                seen += os.read(fd, 65536)
            except OSError:
                break
    return pid, fd, seen


def _finish(pid: int, fd: int, seen: bytes, timeout: float) -> tuple[int | None, bytes]:
    """Read the pty until `pid` exits (or `timeout` passes: then it is killed, None)."""
    deadline = time.monotonic() + timeout
    code: int | None = None
    try:
        while time.monotonic() < deadline:
            if select.select([fd], [], [], 0.2)[0]:
                with contextlib.suppress(OSError):  # EIO: every other side is closed
                    seen += os.read(fd, 65536)
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                code = os.waitstatus_to_exitcode(status)
                break
    finally:
        if code is None:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(fd)
    return code, seen


def test_run_t_follows_the_terminal_size(run_root: str, store: ImageStore) -> None:
    script = (
        'stty size; while [ "$(stty size)" != "40 120" ]; do sleep 0.1; done; stty size; exit 4'
    )
    pid, fd, seen = _on_a_pty(
        run_root, store, [*RUN, "-t", "--", "sh", "-c", script], until=b"33 99"
    )
    _set_size(fd, 40, 120)
    code, seen = _finish(pid, fd, seen, 60)
    assert code == 4, seen
    assert re.search(rb"33 99\r+\n40 120\r+\n", seen), seen


def test_run_i_streams_all_of_stdin_to_the_container(run_root: str, store: ImageStore) -> None:
    data = b"".join(b"line %d of the input\n" % i for i in range(20000))  # 0.4 MB, in order
    done = subprocess.run(
        [*VIRTC, *RUN, "-i", "--", "tr", "a-z", "A-Z"],
        input=data,
        capture_output=True,
        env=env(run_root, store),
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == data.upper()


def test_run_t_i_ends_with_its_command_while_stdin_stays_open(
    run_root: str, store: ImageStore
) -> None:
    pid, fd, seen = _on_a_pty(run_root, store, [*RUN, "-t", "-i", "--", "sh", "-c", "exit 3"])
    code, seen = _finish(pid, fd, seen, 180)
    assert code == 3, seen


def test_sigint_ends_run_t_i_while_stdin_stays_open(run_root: str, store: ImageStore) -> None:
    pid, fd, seen = _on_a_pty(
        run_root, store, [*RUN, "-t", "-i", "--", "sh", "-c", "echo up; sleep 600"], until=b"up"
    )
    assert b"up" in seen, seen
    os.kill(pid, signal.SIGINT)
    code, seen = _finish(pid, fd, seen, 120)
    assert code == 130, seen
    assert vm_processes(run_root) == []
