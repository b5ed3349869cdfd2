"""The guest agent in a real QEMU (TCG) guest booted from `ensure_assets()`.

One VM serves the whole module (each TCG boot costs seconds); every test opens
its own connection, which also exercises virtio-serial reconnection.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
import zlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from virtcontainers.agent import AgentClient, AgentRequestError
from virtcontainers.agent import protocol as p
from virtcontainers.guest import (
    AGENT_READY_MARKER,
    GuestAssets,
    default_kernel_params,
    ensure_assets,
)
from virtcontainers.types import serialize_params

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs QEMU"),
]

BOOT_TIMEOUT = 60.0


@dataclass
class GuestVM:
    assets: GuestAssets
    proc: subprocess.Popen[bytes]
    agent_sock: str
    console_log: str


def boot_argv(
    assets: GuestAssets, agent_sock: str, console_log: str, console: str = "ttyS0"
) -> list[str]:
    cmdline = " ".join(serialize_params(default_kernel_params(console), "="))
    if console == "hvc0":
        console_args = [
            "-chardev", f"file,id=con0,path={console_log}",
            "-device", "virtconsole,chardev=con0",
        ]  # fmt: skip
    else:
        console_args = ["-serial", f"file:{console_log}"]
    return [
        "qemu-system-x86_64",
        "-machine", "q35,accel=tcg",
        "-m", "256,slots=2,maxmem=1G",
        "-object", "memory-backend-ram,id=dimm0,size=128M",
        "-device", "pc-dimm,id=dimm0dev,memdev=dimm0",
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-kernel", assets.kernel,
        "-initrd", assets.initrd,
        "-append", cmdline,
        "-device", "virtio-serial-pci,id=vser0",
        "-chardev", f"socket,id=agent0,path={agent_sock},server=on,wait=off",
        "-device", "virtserialport,chardev=agent0,name=agent.channel.0",
        *console_args,
        "-monitor", "none",
    ]  # fmt: skip


def wait_for_marker(vm: GuestVM) -> None:
    deadline = time.monotonic() + BOOT_TIMEOUT
    while time.monotonic() < deadline:
        if vm.proc.poll() is not None:
            pytest.fail(f"QEMU exited ({vm.proc.returncode}): {Path(vm.console_log).read_text()}")
        if os.path.exists(vm.console_log) and AGENT_READY_MARKER in Path(vm.console_log).read_text(
            errors="replace"
        ):
            return
        time.sleep(0.05)
    pytest.fail(f"no {AGENT_READY_MARKER} within {BOOT_TIMEOUT}s")


@pytest.fixture(scope="module")
def assets() -> GuestAssets:
    return ensure_assets()


@contextlib.contextmanager
def booted(assets: GuestAssets, console: str = "ttyS0") -> Iterator[GuestVM]:
    d = tempfile.mkdtemp(prefix="vc-agent-vm-", dir="/tmp")
    sock, log = os.path.join(d, "agent.sock"), os.path.join(d, "console.log")
    proc = subprocess.Popen(
        boot_argv(assets, sock, log, console),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        guest = GuestVM(assets, proc, sock, log)
        wait_for_marker(guest)
        yield guest
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def vm(assets: GuestAssets) -> Iterator[GuestVM]:
    with booted(assets) as guest:
        yield guest


async def test_marker_on_a_virtio_console(assets: GuestAssets) -> None:
    # hvc0 exists only after the agent loads virtio_console: the marker must still show.
    with booted(assets, console="hvc0") as guest:
        async with await AgentClient.connect(guest.agent_sock, 30) as c:
            res = await c.exec(["cat", "/proc/consoles"])
            assert res.stdout.startswith(b"hvc0")


@pytest.fixture
async def client(vm: GuestVM) -> AsyncIterator[AgentClient]:
    async with await AgentClient.connect(vm.agent_sock, 30) as c:
        yield c
    assert vm.proc.poll() is None, "the guest died"


async def test_ping_and_kernel_version(client: AgentClient, assets: GuestAssets) -> None:
    info = await client.ping()
    assert info.version.startswith("vc-agent ") and info.uptime > 0
    res = await client.exec(["uname", "-r"])
    assert res.exit_code == 0 and res.stdout.decode().strip() == assets.kernel_version


async def test_modules_and_devices(client: AgentClient, assets: GuestAssets) -> None:
    # Drivers of present devices load before the marker (a NIC's right after it, first),
    # the rest right after it.
    loaded: set[str] = set()
    for _ in range(200):
        res = await client.exec(["cut", "-d", " ", "-f1", "/proc/modules"])
        loaded = set(res.stdout.decode().split())
        if set(assets.modules) <= loaded:
            break
        await asyncio.sleep(0.05)
    assert set(assets.modules) <= loaded
    # The initrd's modules carry no signature (its check cost ~5 ms a module under TCG):
    # the kernel loads them, marked unsigned (E).
    res = await client.exec(["cat", "/sys/module/virtio_pci/taint", "/sys/module/fuse/taint"])
    assert res.stdout == b"E\nE\n"
    assert (await client.exec(["hostname"])).stdout == b"sandbox\n"
    res = await client.exec(["sh", "-c", "cat /sys/class/virtio-ports/*/name"])
    assert b"agent.channel.0" in res.stdout


async def test_exit_codes_and_stream_separation(client: AgentClient) -> None:
    res = await client.exec(["sh", "-c", "echo to-out; echo to-err >&2; exit 42"])
    assert (res.exit_code, res.stdout, res.stderr) == (42, b"to-out\n", b"to-err\n")
    res = await client.exec(["false"])
    assert res.exit_code == 1
    res = await client.exec(["sh", "-c", "kill -KILL $$"])
    assert res.exit_code == -1 and res.signal == 9
    with pytest.raises(AgentRequestError, match="ENOENT"):
        await client.exec(["/bin/does-not-exist"])


async def test_stdin_binary_env_cwd(client: AgentClient) -> None:
    blob = bytes(range(256)) * 512
    res = await client.exec(["cat"], stdin=blob)
    assert res.stdout == blob
    res = await client.exec(
        ["sh", "-c", 'echo "$A/$B"; pwd'], env={"A": "x y", "B": "ü"}, cwd="/tmp"
    )
    assert res.stdout.decode() == "x y/ü\n/tmp\n"


async def test_large_output(client: AgentClient) -> None:
    res = await client.exec(["sh", "-c", "head -c 5000000 /dev/urandom | tee /tmp/big | md5sum"])
    digest = res.stdout.split()[0]
    res = await client.exec(["cat", "/tmp/big"])
    assert len(res.stdout) == 5_000_000
    import hashlib

    assert hashlib.md5(res.stdout).hexdigest().encode() == digest


async def test_timeout_kills_the_process(client: AgentClient) -> None:
    res = await client.exec(["sh", "-c", "sleep 60 & sleep 60; echo never"], timeout=1.0)
    assert res.timed_out and res.signal == 9 and b"never" not in res.stdout
    res = await client.exec(["sh", "-c", "pgrep -x sleep || true"])
    assert res.stdout == b""


async def test_concurrent_execs(client: AgentClient) -> None:
    results = await asyncio.gather(
        *(client.exec(["sh", "-c", f"sleep 0.3; echo {i}"]) for i in range(10))
    )
    assert [r.stdout for r in results] == [f"{i}\n".encode() for i in range(10)]


async def test_file_round_trip(client: AgentClient) -> None:
    data = os.urandom(1 << 20)
    await client.write_file("/run/vc/test/blob", data, 0o600, make_parents=True)
    assert await client.read_file("/run/vc/test/blob") == data
    res = await client.exec(["stat", "-c", "%a %s", "/run/vc/test/blob"])
    assert res.stdout == f"600 {len(data)}\n".encode()


async def test_guest_users_symlinks_do_not_redirect_host_writes(client: AgentClient) -> None:
    """A guest user's link in /tmp to a root file: the agent neither writes through it nor
    follows a user's symlinked directory; the kernel's protected_symlinks is on."""
    res = await client.exec(["cat", "/proc/sys/fs/protected_symlinks"])
    assert res.stdout == b"1\n"
    plant = (
        "echo root-only > /root/secret && ln -s /root/secret /tmp/x && ln -s /root /tmp/d"
        " && chown -h 65534:65534 /tmp/x /tmp/d"
    )
    assert (await client.exec(["sh", "-c", plant])).ok
    with pytest.raises(AgentRequestError, match="symbolic link"):
        await client.write_file("/tmp/x", b"owned")
    with pytest.raises(AgentRequestError, match="symlink owned by another user"):
        await client.write_file("/tmp/d/secret", b"owned")
    assert await client.read_file("/root/secret") == b"root-only\n"


async def test_set_time_and_entropy(client: AgentClient) -> None:
    target = 1_900_000_000.0
    await client.set_time(target)
    res = await client.exec(["date", "+%s"])
    assert target <= int(res.stdout) < target + 60
    await client.set_time()
    res = await client.exec(["date", "+%s"])
    assert abs(int(res.stdout) - time.time()) < 60
    await client.add_entropy(os.urandom(64))
    with pytest.raises(AgentRequestError):
        await client.add_entropy(b"x" * ((1 << 20) + 1))


async def test_cold_plugged_memory_is_online_and_online_works(client: AgentClient) -> None:
    # The DIMM's block comes up offline; the agent onlines it (movable) at boot.
    script = (
        "cd /sys/devices/system/memory; for b in memory*; do "
        '[ "$(cat $b/valid_zones)" = Movable ] && echo $b; done'
    )
    res = await client.exec(["sh", "-c", script])
    blocks = res.stdout.decode().split()
    assert len(blocks) == 1, res
    state = f"/sys/devices/system/memory/{blocks[0]}/state"
    assert (await client.read_file(state)).strip() == b"online"
    assert (await client.exec(["sh", "-c", f"echo offline > {state}"])).exit_code == 0
    assert (await client.read_file(state)).strip() == b"offline"
    assert await client.online() == (0, 1)
    assert (await client.read_file(state)).strip() == b"online"


async def test_garbage_does_not_kill_the_agent(vm: GuestVM) -> None:
    # Plain garbage, then a header announcing 1 MiB of payload that never comes:
    # the agent must drop both when the host disconnects.
    head = struct.pack("<4sBBHII", b"VCAG", 1, p.MsgType.WRITE_FILE, 0, 5, 1 << 20)
    for junk in (os.urandom(4096), head + struct.pack("<I", zlib.crc32(head)) + b"abc"):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(vm.agent_sock)
            s.sendall(junk)
            await asyncio.sleep(0.3)
        async with await AgentClient.connect(vm.agent_sock, 30) as c:
            assert (await c.ping()).version.startswith("vc-agent")
            assert (await c.exec(["echo", "alive"])).stdout == b"alive\n"


async def test_disconnect_kills_that_connections_processes(vm: GuestVM) -> None:
    c = await AgentClient.connect(vm.agent_sock, 30)
    task = asyncio.create_task(c.exec(["sleep", "300"]))
    for _ in range(100):
        if (await c.ping()).running == 1:
            break
        await asyncio.sleep(0.05)
    await c.close()
    with pytest.raises(Exception):  # noqa: B017 - closed with the connection
        await task
    async with await AgentClient.connect(vm.agent_sock, 30) as c2:
        for _ in range(100):
            if (await c2.ping()).running == 0:
                break
            await asyncio.sleep(0.05)
        assert (await c2.ping()).running == 0


def test_second_ensure_assets_builds_nothing(assets: GuestAssets) -> None:
    again = ensure_assets()
    assert not again.built
    assert (again.kernel, again.initrd, again.key) == (assets.kernel, assets.initrd, assets.key)
