"""Started processes in a real QEMU (TCG) guest through `Sandbox.start_process`: streamed
output in order, stdin and its close, signals, a terminal and its resize, a chroot into a
root directory, a detached process re-attached by another manager, and the sync facade.
No `wait_for` around the calls: the agent client's own deadlines bound them."""

from __future__ import annotations

import signal

import pytest

from virtcontainers import sync
from virtcontainers.agent import AgentRequestError, ExitStatus
from virtcontainers.sandbox import Sandbox

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

KW = {"memory_size": 256, "num_vcpus": 1}


async def test_processes_stream_and_are_controlled(leak_check: str) -> None:
    async with Sandbox("proc1", run_root=leak_check, **KW) as sb:
        # Streaming: the first line arrives while the process waits for stdin.
        proc = await sb.start_process(
            ["sh", "-c", "echo first; echo err >&2; read x; echo got $x; cat; echo end"]
        )
        assert await anext(proc.stdout) == b"first\n"
        assert await anext(proc.stderr) == b"err\n"
        await proc.write_stdin("one\n")
        assert await anext(proc.stdout) == b"got one\n"
        await proc.write_stdin(b"to cat\n")
        assert await anext(proc.stdout) == b"to cat\n"
        await proc.close_stdin()
        assert await proc.stdout.read() == b"end\n"
        assert await proc.wait() == ExitStatus(0)

        numbered = await sb.start_process(["sh", "-c", "seq 1 3000"])
        assert (await numbered.stdout.read()).split() == [str(i).encode() for i in range(1, 3001)]

        sleeper = await sb.start_process(["sleep", "100"])
        await sleeper.signal(signal.SIGTERM)
        assert await sleeper.wait() == ExitStatus(-1, signal.SIGTERM)

        term = await sb.start_process(
            ["sh", "-c", "stty size; read x; stty size"], tty=True, rows=33, cols=101
        )
        assert (await anext(term.stdout)).startswith(b"33 101")
        await term.resize(44, 123)
        await term.write_stdin("\n")
        assert b"44 123" in await term.stdout.read()
        assert (await term.wait()).ok

        # A root directory: the initrd's own files, seen under a chroot of a copy.
        r = await sb.exec(
            [
                "sh",
                "-c",
                "mkdir -p /tmp/box/bin /tmp/box/etc && cp /bin/busybox"
                " /tmp/box/bin/ && ln -s busybox /tmp/box/bin/sh && echo boxed >"
                " /tmp/box/etc/marker",
            ]
        )
        assert r.ok, r.stderr
        boxed = await sb.start_process(
            ["/bin/sh", "-c", "busybox ls /; busybox cat /etc/marker; echo $$"],
            root="/tmp/box",
            namespaces={"mount", "pid"},
            uid=65534,
            gid=65534,
            env={"PATH": "/bin"},
        )
        assert (await boxed.stdout.read()).split() == [b"bin", b"etc", b"boxed", b"1"]
        assert (await boxed.wait()).ok

        # A process flooding its output does not hold up other requests.
        flood = await sb.start_process(["sh", "-c", "yes | head -c 4000000"])
        assert (await sb.exec(["echo", "through"])).stdout == b"through\n"
        total = 0
        async for chunk in flood.stdout:
            total += len(chunk)
        assert total == 4_000_000
        assert (await flood.wait()).ok

        with pytest.raises(AgentRequestError, match="exec /no/such"):
            await sb.start_process(["/no/such"])

        # Detached: survives this manager; another one attaches and gets the kept output.
        kept = await sb.start_process(
            ["sh", "-c", "echo before; read x; echo after $x"], detach=True
        )
        assert await anext(kept.stdout) == b"before\n"
        gone = await sb.start_process(["sleep", "100"])
        handle, gone_pid = kept.handle, gone.pid
        await sb.detach()
        other = await Sandbox.attach("proc1", run_root=leak_check)
        again = await other.attach_process(handle)
        assert await anext(again.stdout) == b"before\n"
        await again.write_stdin("x\n")
        assert await again.stdout.read() == b"after x\n"
        assert (await again.wait()).ok
        ps = await other.exec(
            ["sh", "-c", f"kill -0 {gone_pid} 2>/dev/null && echo alive || echo gone"]
        )
        assert ps.stdout == b"gone\n"  # not detached: ended with the first manager's session
        await other.stop()


def test_sync_facade_streams_too(leak_check: str) -> None:
    with sync.Sandbox("proc2", run_root=leak_check, **KW) as sb:
        proc = sb.start_process(["sh", "-c", "echo a; read x; echo $x"])
        assert next(iter(proc.stdout)) == b"a\n"
        proc.write_stdin("b\n")
        proc.close_stdin()
        assert proc.stdout.read() == b"b\n"
        assert proc.wait().ok
        assert proc.returncode == ExitStatus(0)
