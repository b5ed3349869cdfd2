"""The real C agent, built from source and run as an ordinary process (`--unix PATH`).

Everything here runs the same code as /init in the guest, minus the pid-1 setup:
framing, resynchronisation, exec, files. Guest-only operations (set_time,
add_entropy, online) are covered by the QEMU integration tests instead.
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import zlib
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from leaks import running
from virtcontainers.agent import AgentClient, AgentRequestError
from virtcontainers.agent import protocol as p
from virtcontainers.guest import initrd

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is needed to build it")


class NativeAgent:
    """The agent serving on `workdir`/agent.sock: built there unless `binary` is given, run
    under the `wrap` command (e.g. one entering namespaces), with `args` added."""

    def __init__(
        self, workdir: str, *, binary: str = "", wrap: Sequence[str] = (), args: Sequence[str] = ()
    ) -> None:
        self.workdir = workdir
        self.binary = binary or os.path.join(workdir, "init")
        self.path = os.path.join(workdir, "agent.sock")
        if not binary:
            initrd.compile_agent(self.binary, workdir)
        self.proc = subprocess.Popen(
            [*wrap, self.binary, "--unix", self.path, *args],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline() == b"VC-AGENT-READY\n"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()


@pytest.fixture(scope="module")
def native() -> Iterator[NativeAgent]:
    d = tempfile.mkdtemp(prefix="vc-native-", dir="/tmp")
    agent = NativeAgent(d)
    try:
        yield agent
    finally:
        agent.stop()
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
async def client(native: NativeAgent) -> AsyncIterator[AgentClient]:
    async with await AgentClient.connect(native.path, 5) as c:
        yield c
    assert native.alive()


def raw_conn(native: NativeAgent) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(native.path)
    return s


def read_frames(s: socket.socket, count: int) -> list[p.Frame]:
    dec = p.FrameDecoder()
    out: list[p.Frame] = []
    while len(out) < count:
        data = s.recv(65536)
        assert data, "agent closed the connection"
        out += dec.feed(data)
    return out


async def wait_gone(pid: int) -> bool:
    for _ in range(200):
        if not running(pid):
            return True
        await asyncio.sleep(0.05)
    return False


def error_of(frame: p.Frame) -> int:
    assert frame.type == p.MsgType.ERROR
    return p.Fields.decode(frame.payload).int_(p.Tag.ERRNO)


async def test_exec_exit_codes_and_streams(client: AgentClient) -> None:
    res = await client.exec(["sh", "-c", "echo out; echo err >&2; exit 7"])
    assert (res.exit_code, res.stdout, res.stderr, res.signal) == (7, b"out\n", b"err\n", 0)
    res = await client.exec(["sh", "-c", "kill -TERM $$"])
    assert (res.exit_code, res.signal, res.timed_out) == (-1, 15, False)


async def test_exec_stdin_binary_env_cwd(client: AgentClient) -> None:
    blob = bytes(range(256)) * 1000
    res = await client.exec(["cat"], stdin=blob)
    assert res.stdout == blob
    res = await client.exec(
        ["sh", "-c", 'printf "%s|%s" "$GREETING" "$(pwd)"'], env={"GREETING": "hi there"}, cwd="/"
    )
    assert res.stdout == b"hi there|/"
    res = await client.exec(["sh", "-c", "echo $PATH"])
    assert b"/usr/bin" in res.stdout


async def test_exec_large_output_and_truncation(client: AgentClient) -> None:
    res = await client.exec(["head", "-c", str(6 << 20), "/dev/zero"])
    assert len(res.stdout) == 6 << 20 and not res.stdout_truncated
    res = await client.exec(["head", "-c", "100000", "/dev/zero"], max_output=1000)
    assert len(res.stdout) == 1000 and res.stdout_truncated and res.exit_code == 0


async def test_exec_failures_are_error_replies(client: AgentClient) -> None:
    with pytest.raises(AgentRequestError) as info:
        await client.exec(["/no/such/binary"])
    assert info.value.errno == errno.ENOENT
    with pytest.raises(AgentRequestError, match="chdir") as info:
        await client.exec(["true"], cwd="/no/such/dir")
    assert info.value.errno == errno.ENOENT


async def test_timeout_kills_the_process_group(client: AgentClient, native: NativeAgent) -> None:
    pidfile = os.path.join(native.workdir, "bg.pid")
    res = await client.exec(["sh", "-c", f"sleep 100 & echo $! > {pidfile}; wait"], timeout=0.5)
    assert res.timed_out and res.signal == 9
    bg = int(Path(pidfile).read_text())
    assert await wait_gone(bg), f"background process {bg} survived the timeout"


async def test_cancelling_an_exec_kills_it(client: AgentClient, native: NativeAgent) -> None:
    pidfile = os.path.join(native.workdir, "cancel.pid")
    task = asyncio.create_task(client.exec(["sh", "-c", f"echo $$ > {pidfile}; exec sleep 100"]))
    while not os.path.exists(pidfile) or not Path(pidfile).read_text().strip():
        await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    pid = int(Path(pidfile).read_text())
    assert await wait_gone(pid)
    for _ in range(100):
        if (await client.ping()).running == 0:
            break
        await asyncio.sleep(0.05)
    assert (await client.ping()).running == 0


async def test_concurrent_execs(client: AgentClient) -> None:
    results = await asyncio.gather(
        *(client.exec(["sh", "-c", f"sleep 0.2; echo {i}"]) for i in range(10))
    )
    assert [r.stdout for r in results] == [f"{i}\n".encode() for i in range(10)]


async def test_files(client: AgentClient, native: NativeAgent) -> None:
    path = os.path.join(native.workdir, "deep", "er", "file.bin")
    data = os.urandom(300_000) + b"\x00"
    await client.write_file(path, data, 0o640, make_parents=True)
    assert Path(path).read_bytes() == data
    assert os.stat(path).st_mode & 0o7777 == 0o640
    assert await client.read_file(path) == data
    await client.write_file(path, b"short", 0o600)
    assert await client.read_file(path) == b"short"
    assert os.stat(path).st_mode & 0o7777 == 0o600
    with pytest.raises(AgentRequestError) as info:
        await client.read_file(os.path.join(native.workdir, "missing"))
    assert info.value.errno == errno.ENOENT
    with pytest.raises(AgentRequestError, match="regular"):
        await client.read_file("/dev/zero")
    with pytest.raises(AgentRequestError):
        await client.write_file("/nonexistent-dir/x", b"")


def test_garbage_then_valid_frame_on_one_connection(native: NativeAgent) -> None:
    with raw_conn(native) as s:
        s.sendall(b"\x00garbage VCAG VCAGxxxxxxxxxxxxxxxxxxxxx" + p.encode_frame(p.MsgType.PING, 5))
        notice, reply = read_frames(s, 2)
    assert notice.id == 0 and error_of(notice) == errno.EBADMSG
    assert (reply.type, reply.id) == (p.MsgType.PING | p.REPLY, 5)


def test_bad_requests_get_error_replies(native: NativeAgent) -> None:
    bad_payload = b"\x10\x00\xff\xff\xff\x7f"  # a field claiming 2 GiB
    with raw_conn(native) as s:
        s.sendall(
            p.encode_frame(p.MsgType.EXEC, 1, bad_payload)
            + p.encode_frame(0x3E, 2)
            + p.encode_frame(p.MsgType.EXEC, 3)
            + p.encode_frame(p.MsgType.SET_TIME, 4, p.Fields().add(p.Tag.SEC, b"x").encode())
        )
        frames = {f.id: f for f in read_frames(s, 4)}
    assert error_of(frames[1]) == errno.EBADMSG
    assert error_of(frames[2]) == errno.ENOSYS
    assert error_of(frames[3]) == errno.EINVAL
    assert error_of(frames[4]) == errno.EINVAL


def test_oversize_frame_is_refused_and_agent_survives(native: NativeAgent) -> None:
    head = struct.pack("<4sBBHII", b"VCAG", 1, p.MsgType.WRITE_FILE, 0, 9, (64 << 20) + 1)
    with raw_conn(native) as s:
        s.sendall(head + struct.pack("<I", zlib.crc32(head)) + b"x" * 1000)
        (frame,) = read_frames(s, 1)
    assert frame.id == 9 and error_of(frame) == errno.EMSGSIZE
    with raw_conn(native) as s:
        s.sendall(p.encode_frame(p.MsgType.PING, 1))
        assert read_frames(s, 1)[0].type == p.MsgType.PING | p.REPLY
    assert native.alive()


@given(junk=st.binary(min_size=1, max_size=4096))
@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_fuzzed_streams_never_kill_the_agent(native: NativeAgent, junk: bytes) -> None:
    with raw_conn(native) as s:
        s.sendall(junk)
    with raw_conn(native) as s:
        s.sendall(p.encode_frame(p.MsgType.PING, 77))
        frames = read_frames(s, 1)
    assert frames[0].id == 77 and native.alive()


async def test_write_file_never_writes_through_a_guest_users_symlink(
    client: AgentClient, native: NativeAgent
) -> None:
    """The attack: a guest user plants `x -> secret` (or a symlinked directory, or a file of
    their own) where the host will write as root."""
    nobody = 65534
    d = tempfile.mkdtemp(prefix="plant-", dir=native.workdir)
    secret = os.path.join(d, "secret")
    Path(secret).write_bytes(b"root only")
    os.symlink(secret, os.path.join(d, "x"))
    with pytest.raises(AgentRequestError, match="symbolic link") as info:
        await client.write_file(os.path.join(d, "x"), b"owned")
    assert info.value.errno == errno.ELOOP
    assert Path(secret).read_bytes() == b"root only"

    os.mkdir(os.path.join(d, "real"))
    os.symlink(os.path.join(d, "real"), os.path.join(d, "via"))
    os.lchown(os.path.join(d, "via"), nobody, nobody)
    with pytest.raises(AgentRequestError, match="symlink owned by another user"):
        await client.write_file(os.path.join(d, "via", "f"), b"owned", make_parents=True)
    assert os.listdir(os.path.join(d, "real")) == []

    theirs = os.path.join(d, "theirs")
    Path(theirs).write_bytes(b"old")
    os.chown(theirs, nobody, nobody)
    os.chmod(theirs, 0o666)
    held = os.open(theirs, os.O_RDONLY)  # the user keeps the old file open
    try:
        await client.write_file(theirs, b"new secret", 0o600)
        assert os.read(held, 100) == b"old"  # not written in place
    finally:
        os.close(held)
    st = os.stat(theirs)
    assert (st.st_uid, st.st_mode & 0o7777) == (os.geteuid(), 0o600)
    assert Path(theirs).read_bytes() == b"new secret"
    with pytest.raises(AgentRequestError, match="absolute"):
        await client.write_file("relative/path", b"")


class HungFuse:
    """A FUSE mount whose server never answers: every access to it blocks, like a hung
    network filesystem. Closing the device aborts the connection and frees the waiters."""

    def __init__(self, where: str) -> None:
        self.where = where
        os.mkdir(where)
        self.fd = os.open("/dev/fuse", os.O_RDWR)
        opts = f"fd={self.fd},rootmode=40000,user_id=0,group_id=0"
        subprocess.run(
            ["mount", "-t", "fuse", "-o", opts, "hung", where],
            check=True,
            pass_fds=(self.fd,),
        )

    def release(self) -> None:
        os.close(self.fd)
        subprocess.run(["umount", "-l", self.where], check=False)
        os.rmdir(self.where)


@pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")
@pytest.mark.timeout(60)
async def test_a_hung_filesystem_does_not_wedge_the_agent(
    client: AgentClient, native: NativeAgent
) -> None:
    fuse = HungFuse(os.path.join(native.workdir, "hung"))
    try:
        reading = asyncio.create_task(client.read_file(os.path.join(fuse.where, "f")))
        writing = asyncio.create_task(client.write_file(os.path.join(fuse.where, "g"), b"x"))
        running = asyncio.create_task(client.exec([os.path.join(fuse.where, "prog")]))
        await asyncio.sleep(0.5)
        assert not (reading.done() or writing.done() or running.done())
        # Everything else is still served (no wait_for: the client's deadline would end a
        # ping the agent never answers).
        assert (await client.ping()).version
        assert (await client.exec(["echo", "served"])).stdout == b"served\n"
        data = os.path.join(native.workdir, "ok.txt")
        await client.write_file(data, b"fine")
        assert await client.read_file(data) == b"fine"
        for task in (reading, writing, running):  # given up: the guest side is killed
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        for _ in range(100):
            if (await client.ping()).running == 0:
                break
            await asyncio.sleep(0.05)
        assert (await client.ping()).running == 0
    finally:
        fuse.release()
    assert native.alive()
