"""Confinement and hostile input on a live QEMU VM: `-sandbox on`, an unprivileged QEMU,
private files, and a guest (or a host peer) writing garbage to the console and agent
channels — the host side keeps working."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import stat
import struct
import subprocess
import zlib
from typing import Any

import pytest
from rel_support import assert_clean, sandbox_kw

from leaks import running
from virtcontainers import persist
from virtcontainers.agent import AgentClient, AgentTimeoutError
from virtcontainers.agent import protocol as p
from virtcontainers.drivers.qemu import QemuHypervisor
from virtcontainers.errors import AgentError
from virtcontainers.sandbox import Sandbox
from virtcontainers.types import Param

pytestmark = pytest.mark.integration

CALL = 30.0  # bound on socket set-up in the raw garbage tests


def cmdline(pid: int) -> list[str]:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().decode().split("\0")[:-1]


def uid_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Uid:"):
                return int(line.split()[1])
    raise AssertionError("no Uid line")


def mode(path: str) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


async def test_qemu_runs_confined_and_files_are_private(sandbox: Sandbox, leak_check: str) -> None:
    pid = sandbox.hypervisor.get_pids()[0]
    argv = cmdline(pid)
    sandbox_opts = argv[argv.index("-sandbox") + 1].split(",")
    assert sandbox_opts[0] == "on"
    assert {"elevateprivileges=deny", "spawn=deny", "obsolete=deny"} <= set(sandbox_opts)

    vm_root = persist.vm_root(leak_check)
    vm_dir = persist.vm_dir("sb1", leak_check)
    state = persist.StateStore(leak_check).path("sb1")
    for d in (vm_root, vm_dir, os.path.dirname(state)):
        assert mode(d) == 0o700, (d, oct(mode(d)))
    assert mode(state) == 0o600
    sockets = [
        os.path.join(vm_dir, n)
        for n in os.listdir(vm_dir)
        if stat.S_ISSOCK(os.lstat(os.path.join(vm_dir, n)).st_mode)
    ]
    assert {"qmp.sock", "console.sock"} <= {os.path.basename(s) for s in sockets}
    for path in [
        *sockets,
        *(os.path.join(vm_dir, n) for n in os.listdir(vm_dir) if n.endswith(".log")),
    ]:
        assert mode(path) & 0o077 == 0, (path, oct(mode(path)))


async def test_qemu_drops_to_an_unprivileged_user(leak_check: str, guest_assets: Any) -> None:
    nobody = pwd.getpwnam("nobody")
    kw = sandbox_kw(guest_assets, hypervisor_params=[Param("runas", "nobody")])
    async with Sandbox("ru1", "qemu", run_root=leak_check, **kw) as sb:
        pid = sb.hypervisor.get_pids()[0]
        assert uid_of(pid) == nobody.pw_uid
        argv = cmdline(pid)
        assert argv[argv.index("-runas") + 1] == "nobody"
        assert "-sandbox" in argv
        res = await sb.exec(["echo", "unprivileged"])
        assert res.stdout == b"unprivileged\n"
        await sb.pause()
        await sb.resume()
    assert_clean(leak_check)


async def test_guest_flooding_its_console_neither_stalls_the_host_nor_fills_its_disk(
    leak_check: str, guest_assets: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    cap = 64 * 1024
    monkeypatch.setattr(QemuHypervisor, "console_log_max", cap)
    async with Sandbox("fl1", "qemu", run_root=leak_check, **sandbox_kw(guest_assets)) as sb:
        log = sb.hypervisor.console_log  # type: ignore[attr-defined]
        flood = asyncio.ensure_future(
            sb.exec(["sh", "-c", "cat /dev/urandom > /dev/ttyS0"], timeout=6)
        )
        await asyncio.sleep(1.0)
        for i in range(3):  # the host keeps working while the console is flooded
            res = await sb.exec(["echo", str(i)])
            assert res.stdout == f"{i}\n".encode()
            await sb.hypervisor.check()
        done = await flood
        assert done.timed_out
        # Far more than the cap went through (the console runs at ~100 KiB/s or more under
        # TCG), yet the log is the last 1-2 caps of it: console.log.1 full, console.log less.
        assert os.path.getsize(log + ".1") == cap
        assert os.path.getsize(log) <= cap
        res = await sb.exec(["sh", "-c", "echo AFTER-FLOOD > /dev/ttyS0"])
        assert res.exit_code == 0
        for _ in range(100):  # the keeper is still copying: the newest line arrives
            with open(log, "rb") as f:
                if b"AFTER-FLOOD" in f.read():
                    break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the console log stopped following the guest after the flood")
        keeper = sb.hypervisor.get_pids()[1:]
        assert keeper and all(running(pid) for pid in keeper)
    assert not any(running(pid) for pid in keeper)  # it went with the VM
    assert_clean(leak_check)


INJECT_C = r"""
/* Write stdin's bytes into the agent's own open port (the port allows one open at a time, so
 * the fd is taken from pid 1 with pidfd_getfd), i.e. to the host side of the channel. */
#define _GNU_SOURCE
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>
int main(void)
{
	int pidfd = (int)syscall(SYS_pidfd_open, 1, 0);
	DIR *d = opendir("/proc/1/fd");
	struct dirent *de;
	char path[64], link[64];
	while (pidfd >= 0 && d && (de = readdir(d))) {
		snprintf(path, sizeof path, "/proc/1/fd/%s", de->d_name);
		ssize_t n = readlink(path, link, sizeof link - 1);
		if (n <= 0)
			continue;
		link[n] = 0;
		if (strncmp(link, "/dev/vport", 10))
			continue;
		int fd = (int)syscall(SYS_pidfd_getfd, pidfd, atoi(de->d_name), 0);
		char buf[4096];
		ssize_t r;
		while (fd >= 0 && (r = read(0, buf, sizeof buf)) > 0)
			if (write(fd, buf, (size_t)r) != r)
				return 3;
		return fd >= 0 ? 0 : 2;
	}
	return 1;
}
"""


@pytest.fixture(scope="module")
def injector(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The injector, built static for the guest."""
    d = tmp_path_factory.mktemp("inject")
    (d / "inject.c").write_text(INJECT_C)
    subprocess.run(
        ["gcc", "-static", "-O2", "-o", str(d / "inject"), str(d / "inject.c")], check=True
    )
    return (d / "inject").read_bytes()


async def test_guest_writing_garbage_to_the_host_side_of_the_agent_channel(
    sandbox: Sandbox, injector: bytes
) -> None:
    """A guest root process writes into the agent's port itself: the host decoder skips the
    garbage and keeps serving; an oversize frame header fails the connection cleanly (a
    clear error for the request in flight) and the sandbox reconnects."""
    await sandbox.write_file("/tmp/inject", injector, 0o755)
    agent = await sandbox.agent()
    skipped = agent._decoder.skipped
    junk = os.urandom(65536).replace(b"VCAG", b"vcag")
    res = await sandbox.exec(["/tmp/inject"], stdin=junk, timeout=30)
    assert res.exit_code == 0, res
    assert agent._decoder.skipped - skipped >= len(junk)  # it did reach the host, was skipped
    assert (await sandbox.exec(["echo", "ok"])).stdout == b"ok\n"
    assert not agent.closed

    oversize = frame_header(p.MsgType.EXEC | p.REPLY, 1, p.MAX_FRAME + 1)
    with pytest.raises(AgentError, match="exceeds"):
        await sandbox.exec(["/tmp/inject"], stdin=oversize, timeout=30)
    assert agent.closed
    assert (await sandbox.exec(["echo", "back"])).stdout == b"back\n"  # a new connection


def frame_header(type_: int, id_: int, length: int) -> bytes:
    head = struct.pack("<4sBBHII", p.MAGIC, p.PROTO_VERSION, type_, 0, id_, length)
    return head + struct.pack("<I", zlib.crc32(head))


GARBAGE = [
    os.urandom(4096),
    b"VCAG" * 1000,  # magic without valid headers
    frame_header(p.MsgType.EXEC, 7, 100) + b"short",  # truncated frame
    frame_header(p.MsgType.PING, 8, p.MAX_FRAME + 1),  # oversize
    frame_header(p.MsgType.EXEC, 9, 12) + struct.pack("<HI", p.Tag.ARGV, 1000) + b"xxxxxx",
    frame_header(0x7E, 10, 0),  # unknown type
    frame_header(p.MsgType.WRITE_FILE, 11, 0),  # missing fields
]


async def test_real_agent_survives_garbage_frames(sandbox: Sandbox) -> None:
    """Each kind of garbage on a fresh connection; after it, a new client is served."""
    target = sandbox._agent_endpoint.path
    await sandbox.detach()  # one client at a time on the virtio-serial port
    for garbage in GARBAGE:
        _, writer = await asyncio.wait_for(asyncio.open_unix_connection(target), CALL)
        writer.write(garbage)
        await asyncio.wait_for(writer.drain(), CALL)
        await asyncio.sleep(0.2)
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        client = await AgentClient.connect(target, CALL)
        try:
            info = await client.ping()
            assert info.version.startswith("vc-agent"), garbage[:20]
            res = await client.exec(["echo", "alive"])
            assert res.stdout == b"alive\n"
        finally:
            await client.close()


async def test_real_agent_resynchronises_on_a_live_connection(sandbox: Sandbox) -> None:
    """Garbage without a valid header is skipped; a truncated frame swallows what follows
    (framing cannot tell), and a new connection recovers from that."""
    agent = await sandbox.agent()
    for garbage in (GARBAGE[0], GARBAGE[1], GARBAGE[5], GARBAGE[6]):
        agent._writer.write(garbage)
        await agent._writer.drain()
        assert (await agent.ping()).version
    agent._writer.write(GARBAGE[2])
    await agent._writer.drain()
    with pytest.raises(AgentTimeoutError, match="ping"):
        await agent.ping(timeout=2.0)
    await sandbox.detach()
    assert (await sandbox.exec(["echo", "back"])).stdout == b"back\n"
