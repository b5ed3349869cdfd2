"""`virtc logs ID` on a real QEMU guest: a detached container's kept output (stdout to our
stdout, stderr to our stderr; raw to a pipe, filtered to a terminal), `--tail`, `--follow`
until the process exits or Ctrl-C (which leaves it running), `--console`; clear errors."""

from __future__ import annotations

import asyncio
import os
import pty
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest

from virtcontainers.images import ImageStore
from virtcontainers.images.build import busybox_image

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("leak_check")]

# Waits for /tmp/go (written with exec), then for /tmp/end; an OSC 52 clipboard write on the
# way, which a terminal must never receive raw.
SCRIPT = (
    "echo out1; echo err1 >&2; printf '\\033]52;c;QUJD\\007esc\\n'; "
    "while [ ! -e /tmp/go ]; do sleep 0.05; done; echo late; "
    "while [ ! -e /tmp/end ]; do sleep 0.05; done; echo bye; exit 3"
)
KEPT = b"out1\n\x1b]52;c;QUJD\x07esc\n"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ImageStore]:
    s = ImageStore(str(tmp_path_factory.mktemp("images")))
    s.import_archive(busybox_image())
    yield s


def env(run_root: str, store: ImageStore) -> dict[str, str]:
    return dict(os.environ, VC_RUN_ROOT=run_root, VC_IMAGE_ROOT=store.root)


def virtc(run_root: str, store: ImageStore, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "virtcontainers.cli", *args],
        capture_output=True,
        env=env(run_root, store),
        timeout=300,
        check=False,
    )


async def follower(run_root: str, store: ImageStore, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "virtcontainers.cli",
        "logs",
        "--follow",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env(run_root, store),
    )


def on_a_terminal(run_root: str, store: ImageStore, *args: str) -> bytes:
    """What `virtc ARGS` writes to stdout when stdout is a terminal."""
    leader, follower_fd = pty.openpty()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "virtcontainers.cli", *args],
            stdout=follower_fd,
            stderr=subprocess.PIPE,
            env=env(run_root, store),
            timeout=300,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        os.close(follower_fd)
        follower_fd = -1
        out = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the other side is closed and drained
                break
            if not chunk:
                break
            out += chunk
        return out
    finally:
        os.close(leader)
        if follower_fd >= 0:
            os.close(follower_fd)


async def test_logs_of_a_detached_container(run_root: str, store: ImageStore) -> None:
    started = virtc(
        run_root, store, "run", "--net", "none", "-d", "--image", "busybox", "--name", "lg1",
        "--", "sh", "-c", SCRIPT,
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    try:
        for _ in range(100):  # `run -d` returns once it runs, maybe before it has written
            kept = virtc(run_root, store, "logs", "lg1")
            assert kept.returncode == 0, kept.stderr
            if kept.stdout == KEPT and kept.stderr == b"err1\n":
                break
            await asyncio.sleep(0.1)
        # To a pipe: the bytes as written, each stream to its own.
        assert (kept.stdout, kept.stderr) == (KEPT, b"err1\n")
        named = virtc(run_root, store, "logs", "--container", "lg1", "lg1")  # its first one
        assert (named.stdout, named.stderr) == (KEPT, b"err1\n")
        other = virtc(run_root, store, "logs", "-c", "nope", "lg1")
        assert other.returncode == 125 and b"sandbox lg1 has no container nope" in other.stderr
        tail = virtc(run_root, store, "logs", "--tail", "1", "lg1")
        assert (tail.stdout, tail.stderr) == (KEPT.split(b"\n")[1] + b"\n", b"err1\n")
        # To a terminal: control characters shown, not sent (no clipboard write).
        shown = on_a_terminal(run_root, store, "logs", "lg1")
        assert b"^[]52;c;QUJD^Gesc" in shown and b"\x1b" not in shown
        raw = on_a_terminal(run_root, store, "logs", "--raw", "lg1")
        assert b"\x1b]52;c;QUJD\x07esc" in raw

        # --follow: the kept output, then a line written later; Ctrl-C stops following only.
        first = await follower(run_root, store, "lg1")
        assert first.stdout is not None
        assert await asyncio.wait_for(first.stdout.readuntil(b"esc\n"), 60) == KEPT
        assert virtc(run_root, store, "exec", "lg1", "--", "touch", "/tmp/go").returncode == 0
        assert await asyncio.wait_for(first.stdout.readuntil(b"\n"), 30) == b"late\n"
        first.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(first.wait(), 30) == 0
        ps = virtc(run_root, store, "ps", "lg1")
        assert b"sh -c" in ps.stdout, ps  # still running

        # --follow ends by itself when the process exits; its output stays for later readers.
        second = await follower(run_root, store, "lg1")
        assert second.stdout is not None
        assert await asyncio.wait_for(second.stdout.readuntil(b"late\n"), 60) == KEPT + b"late\n"
        # The script (the container's pid 1) ends as soon as it sees the file, and its pid
        # namespace's end may kill `touch` before touch has exited itself (137).
        ended = virtc(run_root, store, "exec", "lg1", "--", "touch", "/tmp/end")
        assert ended.returncode in (0, 137), ended
        out, _err = await asyncio.wait_for(second.communicate(), 60)
        assert second.returncode == 0 and out == b"bye\n"
        again = virtc(run_root, store, "logs", "lg1")
        assert again.stdout == KEPT + b"late\nbye\n" and again.stderr == b"err1\n"

        console = virtc(run_root, store, "logs", "--console", "lg1")
        assert console.returncode == 0 and b"VC-AGENT-READY" in console.stdout
        both = virtc(run_root, store, "logs", "--console", "--vmm", "lg1")
        assert both.returncode == 2 and b"--console and --vmm" in both.stderr
    finally:
        assert virtc(run_root, store, "stop", "lg1").returncode == 0


def test_logs_errors_name_the_fault(run_root: str, store: ImageStore) -> None:
    unknown = virtc(run_root, store, "logs", "nosuch")
    assert unknown.returncode == 125
    assert unknown.stderr == b"virtc: error: no such sandbox: nosuch\n"
    made = virtc(run_root, store, "create", "--name", "lg2")  # no VM needed for this
    assert made.returncode == 0, made.stderr
    try:
        bare = virtc(run_root, store, "logs", "lg2")
        assert bare.returncode == 125
        assert b"sandbox lg2 has no container" in bare.stderr
        assert b"virtc logs --console lg2" in bare.stderr
    finally:
        assert virtc(run_root, store, "stop", "lg2").returncode == 0
