"""Started processes (the streaming process model) on the real C agent run natively
(`init --unix PATH`): streamed output, stdin, signals, terminals, detach and re-attach,
user/cwd/env, a root directory and new namespaces. No `wait_for` around the calls: the
client's own deadlines end a call the agent never answers."""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_agent_native import NativeAgent, client, native, wait_gone

from leaks import running
from virtcontainers.agent import AgentClient, AgentRequestError, ExitStatus
from virtcontainers.errors import AgentError

__all__ = ["client", "native"]  # the module's agent and a client of it (fixtures)

pytestmark = [
    pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is needed to build it"),
    pytest.mark.timeout(60),
]


async def settled(client: AgentClient) -> None:
    """Wait until the agent runs no process (they are reaped asynchronously)."""
    for _ in range(100):
        if (await client.ping()).running == 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the agent still runs processes")


async def test_output_streams_as_written_and_stdin_drives_it(client: AgentClient) -> None:
    # The process blocks on stdin after its first line: that line can only reach the host
    # if output is streamed, not collected until exit.
    proc = await client.start_process(
        ["sh", "-c", "echo first; echo warn >&2; read x; echo got $x; read y; echo end"]
    )
    assert proc.pid > 0 and proc.handle > 0
    assert await anext(proc.stdout) == b"first\n"
    assert await anext(proc.stderr) == b"warn\n"
    assert not proc.done()
    await proc.write_stdin(b"one\n")
    assert await anext(proc.stdout) == b"got one\n"
    await proc.close_stdin()  # read y sees end of file
    assert await proc.stdout.read() == b"end\n"
    assert await proc.stderr.read() == b""
    assert await proc.wait() == ExitStatus(0)
    await proc.close_stdin()  # already ended: nothing to do
    with pytest.raises(AgentRequestError) as info:
        await proc.write_stdin(b"late")  # data that cannot arrive is an error
    assert info.value.errno == errno.ESRCH


async def test_order_and_volume_of_a_stream(client: AgentClient) -> None:
    proc = await client.start_process(
        ["sh", "-c", "i=0; while [ $i -lt 2000 ]; do echo $i; i=$((i+1)); done"]
    )
    out = await proc.stdout.read()
    assert out.decode().split() == [str(i) for i in range(2000)]
    assert (await proc.wait()).ok


async def test_stdin_close_ends_cat_and_large_stdin_is_streamed(client: AgentClient) -> None:
    proc = await client.start_process(["cat"])
    blob = os.urandom(3 << 20)
    for i in range(0, len(blob), 1 << 20):
        await proc.write_stdin(blob[i : i + (1 << 20)])
    await proc.close_stdin()
    assert await proc.stdout.read() == blob
    assert await proc.wait() == ExitStatus(0)


async def test_signals_and_exit_status(client: AgentClient) -> None:
    proc = await client.start_process(["sleep", "100"])
    await proc.signal(signal.SIGTERM)
    assert await proc.wait() == ExitStatus(-1, signal.SIGTERM)
    proc = await client.start_process(["sh", "-c", "exit 7"])
    assert (await proc.wait()).exit_code == 7
    proc = await client.start_process(["sleep", "100"], timeout=0.3)
    assert await proc.wait() == ExitStatus(-1, signal.SIGKILL, timed_out=True)
    with pytest.raises(AgentError, match=r"1\.\.64"):
        await proc.signal(0)


async def test_terminal_and_resize(client: AgentClient) -> None:
    proc = await client.start_process(
        ["sh", "-c", "stty size; tty; read x; stty size; echo err >&2"], tty=True, rows=30, cols=99
    )
    assert proc.tty
    first = await anext(proc.stdout)
    while b"\n" not in first.split(b"\r\n", 1)[-1]:
        first += await anext(proc.stdout)
    lines = first.split(b"\r\n")
    assert lines[0] == b"30 99" and lines[1].startswith(b"/dev/pts/")
    await proc.resize(50, 132)
    await proc.write_stdin(b"go\n")
    rest = await proc.stdout.read()
    assert b"50 132\r\n" in rest and b"err\r\n" in rest  # stderr shares the terminal
    assert await proc.stderr.read() == b""
    assert (await proc.wait()).ok
    plain = await client.start_process(["sleep", "10"])
    with pytest.raises(AgentRequestError) as info:
        await plain.resize(10, 10)
    assert info.value.errno == errno.ENOTTY
    await plain.signal(signal.SIGKILL)
    await plain.wait()


async def test_detached_process_outlives_its_connection_and_is_reattached(
    native: NativeAgent,
) -> None:
    pidfile = os.path.join(native.workdir, "detached.pid")
    async with await AgentClient.connect(native.path, 5) as first:
        kept = await first.start_process(
            ["sh", "-c", f"echo $$ > {pidfile}; echo before; read x; echo after $x"], detach=True
        )
        gone = await first.start_process(["sleep", "100"])
        assert await anext(kept.stdout) == b"before\n"
        handle, gone_pid = kept.handle, gone.pid
    assert await wait_gone(gone_pid)  # not detached: killed with its connection
    assert running(int(Path(pidfile).read_text()))
    async with await AgentClient.connect(native.path, 5) as second:
        again = await second.attach_process(handle)
        assert again.pid == kept.pid and not again.tty
        assert await anext(again.stdout) == b"before\n"  # kept in the guest
        await again.write_stdin(b"x\n")
        assert await again.stdout.read() == b"after x\n"
        assert await again.wait() == ExitStatus(0)
        with pytest.raises(AgentRequestError) as info:
            await second.attach_process(handle)  # collected: forgotten
        assert info.value.errno == errno.ESRCH


async def test_detached_process_that_exited_unattached_is_collected_later(
    native: NativeAgent,
) -> None:
    async with await AgentClient.connect(native.path, 5) as first:
        proc = await first.start_process(["sh", "-c", "sleep 0.3; echo bye; exit 4"], detach=True)
        handle = proc.handle
    async with await AgentClient.connect(native.path, 5) as second:
        await settled(second)
        again = await second.attach_process(handle)
        assert await again.stdout.read() == b"bye\n"
        assert (await again.wait()).exit_code == 4


async def test_keep_attach_reads_a_detached_process_without_collecting_it(
    native: NativeAgent,
) -> None:
    async with await AgentClient.connect(native.path, 5) as first:
        proc = await first.start_process(
            ["sh", "-c", "echo one; echo err >&2; read x; echo two; exit 3"], detach=True
        )
        handle = proc.handle
    async with await AgentClient.connect(native.path, 5) as reader:
        seen = await reader.attach_process(handle, keep=True)
        assert await anext(seen.stdout) == b"one\n"  # a log reader while it runs
        assert await anext(seen.stderr) == b"err\n"
        await seen.write_stdin(b"go\n")
        assert await seen.stdout.read() == b"two\n"
        assert await seen.wait() == ExitStatus(3)
    for _ in range(2):  # each reader sees all of it again, exit status included
        async with await AgentClient.connect(native.path, 5) as reader:
            again = await reader.attach_process(handle, keep=True)
            assert await again.stdout.read() == b"one\ntwo\n"
            assert await again.stderr.read() == b"err\n"
            assert await again.wait() == ExitStatus(3)
    async with await AgentClient.connect(native.path, 5) as reader:
        rest = await reader.attach_process(handle, keep=True, offsets=(4, 99))
        assert rest.offsets == (4, 4)  # from stdout's byte 4; all of stderr already seen
        assert (await rest.stdout.read(), await rest.stderr.read()) == (b"two\n", b"")
        with pytest.raises(AgentError, match="bad stream offsets"):
            await reader.attach_process(handle, offsets=(-1, 0))
    async with await AgentClient.connect(native.path, 5) as last:
        collected = await last.attach_process(handle)  # without keep: collected
        assert await collected.stdout.read() == b"one\ntwo\n"
        assert await collected.wait() == ExitStatus(3)
        with pytest.raises(AgentRequestError) as info:
            await last.attach_process(handle, keep=True)
        assert info.value.errno == errno.ESRCH


async def test_user_cwd_env(client: AgentClient, native: NativeAgent) -> None:
    proc = await client.start_process(
        ["sh", "-c", 'echo "$(id -u):$(id -g):$(id -G):$(pwd):$GREETING"'],
        uid=65534,
        gid=65534,
        groups=[65534, 100],
        cwd="/tmp",
        env={"GREETING": "hi"},
    )
    assert await proc.stdout.read() == b"65534:65534:65534 100:/tmp:hi\n"
    assert (await proc.wait()).ok


@pytest.fixture
def rootfs(native: NativeAgent) -> Iterator[str]:
    """A tiny root directory: a static busybox and one file."""
    root = tempfile.mkdtemp(prefix="root-", dir=native.workdir)
    os.makedirs(os.path.join(root, "bin"))
    os.makedirs(os.path.join(root, "data"))
    shutil.copy("/bin/busybox", os.path.join(root, "bin", "busybox"))
    os.symlink("busybox", os.path.join(root, "bin", "sh"))
    with open(os.path.join(root, "data", "marker"), "w") as f:
        f.write("inside\n")
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.skipif(not os.path.exists("/bin/busybox"), reason="needs busybox-static")
async def test_root_directory_and_namespaces(client: AgentClient, rootfs: str) -> None:
    proc = await client.start_process(
        ["/bin/sh", "-c", "busybox ls /; busybox cat marker; echo $$; busybox hostname"],
        root=rootfs,
        cwd="/data",
        namespaces={"mount", "uts", "pid"},
        hostname="box",
        env={"PATH": "/bin"},
    )
    out = await proc.stdout.read()
    assert out.split() == [b"bin", b"data", b"inside", b"1", b"box"], out
    assert (await proc.wait()).ok
    assert os.uname().nodename != "box"  # the agent's own namespace kept its name


async def test_setup_failures_are_named_errors(client: AgentClient, native: NativeAgent) -> None:
    cases = [
        ({"argv": ["/no/such/prog"]}, errno.ENOENT, "exec /no/such/prog"),
        ({"argv": ["true"], "cwd": "/no/such/dir"}, errno.ENOENT, "chdir /no/such/dir"),
        ({"argv": ["true"], "root": "/no/such/root"}, errno.ENOENT, "root directory /no/such/root"),
    ]
    for kw, err, what in cases:
        with pytest.raises(AgentRequestError, match=what) as info:
            await client.start_process(**kw)  # type: ignore[arg-type]
        assert info.value.errno == err
    for kw, what in [
        ({"namespaces": {"time"}}, "unknown namespaces"),
        ({"namespaces": "pid"}, "unknown namespaces"),
        ({"hostname": "x"}, "uts"),
        ({"tty": True, "rows": 0}, "rows"),
        ({"uid": -1}, "uid"),
        ({"root": "relative"}, "absolute"),
        ({"timeout": 0}, "timeout"),
        ({"user": 0}, "unknown options user"),
    ]:
        with pytest.raises(AgentError, match=what):
            await client.start_process(["true"], **kw)  # type: ignore[arg-type]
    await settled(client)


async def test_unknown_handles_are_refused(client: AgentClient) -> None:
    with pytest.raises(AgentRequestError) as info:
        await client.attach_process(999_999)
    assert info.value.errno == errno.ESRCH
    with pytest.raises(AgentError, match="handle"):
        await client.attach_process(0)
