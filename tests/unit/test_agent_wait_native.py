"""WAIT in the real C agent, run as an ordinary process (`--unix PATH --sysroot DIR`).

`--sysroot` points the agent's hardware checks at a fake /sys and /dev tree that the
tests change to play a hotplug; the kernel side (uevents, real sysfs) is covered by the
QEMU integration tests.
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from test_agent_native import read_frames

from virtcontainers.agent import AgentClient, AgentRequestError, WaitResult
from virtcontainers.agent import protocol as p
from virtcontainers.guest import initrd

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is needed to build it")


@pytest.fixture(scope="module")
def binary() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="vc-wait-bin-", dir="/tmp")
    try:
        path = os.path.join(d, "init")
        initrd.compile_agent(path, d)
        yield path
    finally:
        shutil.rmtree(d, ignore_errors=True)


class Guest:
    """A fake /sys + /dev tree and the agent serving on top of it."""

    def __init__(self, binary: str) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="vc-wait-", dir="/tmp"))
        self.root = self.dir / "root"
        self.sock = str(self.dir / "agent.sock")
        (self.root / "dev").mkdir(parents=True)
        (self.root / "sys/block").mkdir(parents=True)
        self.cpu = self.root / "sys/devices/system/cpu"
        self.cpu.mkdir(parents=True)
        (self.cpu / "online").write_text("0\n")
        self.proc = subprocess.Popen(
            [binary, "--unix", self.sock, "--sysroot", str(self.root)],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline() == b"VC-AGENT-READY\n"

    def virtio_disk(self, name: str, serial: str, *, node: bool = True) -> None:
        (self.root / "sys/block" / name).mkdir()
        (self.root / "sys/block" / name / "serial").write_text(serial + "\n")
        if node:
            (self.root / "dev" / name).touch()

    def scsi_disk(self, name: str, serial: str) -> None:
        dev = self.root / "sys/block" / name / "device"
        dev.mkdir(parents=True)
        raw = serial.encode()
        (dev / "vpd_pg80").write_bytes(bytes([0, 0x80, 0, len(raw)]) + raw)
        (self.root / "dev" / name).touch()

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def guest(binary: str) -> Iterator[Guest]:
    g = Guest(binary)
    try:
        yield g
    finally:
        assert g.proc.poll() is None, "the agent died"
        g.stop()


@pytest.fixture
async def client(guest: Guest) -> AsyncIterator[AgentClient]:
    async with await AgentClient.connect(guest.sock, 5) as c:
        yield c


async def eventually(check: Path, text: str) -> None:
    for _ in range(500):
        if check.exists() and check.read_text().strip() == text:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{check} never read {text!r}")


def wait_frame(id_: int, *fields: tuple[int, bytes | str | int]) -> bytes:
    return p.encode_frame(p.MsgType.WAIT, id_, p.fields(*fields).encode())


def raw_errors(guest: Guest, frames: bytes, count: int) -> dict[int, tuple[int, str]]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(guest.sock)
        s.sendall(frames)
        got = read_frames(s, count)
    out = {}
    for f in got:
        assert f.type == p.MsgType.ERROR, f
        fields = p.Fields.decode(f.payload)
        out[f.id] = (fields.int_(p.Tag.ERRNO), fields.str_(p.Tag.MESSAGE))
    return out


def test_bad_fields_are_einval_naming_the_field(guest: Guest) -> None:
    t = (p.Tag.TIMEOUT_MS, 1000)
    short = (p.Tag.WANT_CPUS, b"\x02\x00\x00\x00")
    cases = {
        1: (wait_frame(1, (p.Tag.SERIAL, "x")), "timeout_ms"),
        2: (wait_frame(2, (p.Tag.SERIAL, "x"), (p.Tag.TIMEOUT_MS, 0)), "timeout_ms"),
        3: (wait_frame(3, (p.Tag.SERIAL, "x"), (p.Tag.TIMEOUT_MS, 600_001)), "timeout_ms"),
        4: (wait_frame(4, (p.Tag.SERIAL, "x"), (p.Tag.TIMEOUT_MS, b"\x01")), "timeout_ms"),
        5: (wait_frame(5, t, short), "cpus"),
        6: (wait_frame(6, t, (p.Tag.WANT_CPUS, -1)), "cpus"),
        7: (wait_frame(7, t, (p.Tag.MEMORY, 2)), "memory"),
        8: (wait_frame(8, t, (p.Tag.SERIAL, "")), "serial"),
        9: (wait_frame(9, t, (p.Tag.SERIAL, b"a\x00b")), "serial"),
        10: (wait_frame(10, t, (p.Tag.SERIAL, "s" * 256)), "serial"),
        11: (wait_frame(11, t), "nothing to wait for"),
    }
    errors = raw_errors(guest, b"".join(frame for frame, _ in cases.values()), len(cases))
    for id_, (_, word) in cases.items():
        err, message = errors[id_]
        assert err == errno.EINVAL, (id_, message)
        assert word in message, (id_, message)


async def test_timeout_says_what_is_missing(client: AgentClient, guest: Guest) -> None:
    guest.virtio_disk("vda", "other")
    with pytest.raises(AgentRequestError) as info:
        await client.wait_hardware(block_serial="never", cpus=2, timeout=0.1)
    assert info.value.errno == errno.ETIMEDOUT
    assert "no block device with serial 'never'" in info.value.message
    assert "1 of 2 CPUs online" in info.value.message
    assert (await client.ping()).running == 0  # the agent serves on


async def test_present_hardware_answers_at_once(client: AgentClient, guest: Guest) -> None:
    guest.virtio_disk("vda", "rootdisk")
    res = await client.wait_hardware(block_serial="rootdisk", cpus=1, timeout=0.05)
    assert res == WaitResult(device="vda", dev_path="/dev/vda", cpus_online=1, mem_blocks=0)


async def test_hotplug_seen_while_waiting(client: AgentClient, guest: Guest) -> None:
    (guest.cpu / "cpu1").mkdir()
    (guest.cpu / "cpu1/online").write_text("0\n")
    task = asyncio.create_task(client.wait_hardware(block_serial="d1", cpus=2, timeout=10))
    await asyncio.sleep(0.05)
    assert not task.done()
    guest.scsi_disk("sdb", "d1")
    await eventually(guest.cpu / "cpu1/online", "1")  # the agent onlined the new vCPU
    assert not task.done()  # the kernel has not counted it yet
    (guest.cpu / "online").write_text("0-1\n")
    res = await asyncio.wait_for(task, 10)
    assert (res.device, res.dev_path, res.cpus_online) == ("sdb", "/dev/sdb", 2)


async def test_serial_is_matched_as_a_whole_word_and_needs_the_node(
    client: AgentClient, guest: Guest
) -> None:
    guest.virtio_disk("vdb", "disk10")
    guest.virtio_disk("vdc", "disk1", node=False)
    task = asyncio.create_task(client.wait_hardware(block_serial="disk1", timeout=10))
    await asyncio.sleep(0.1)
    assert not task.done()  # disk10 is another disk; vdc has no /dev node yet
    (guest.root / "dev/vdc").touch()
    assert (await asyncio.wait_for(task, 10)).device == "vdc"


async def test_memory_blocks_are_onlined(client: AgentClient, guest: Guest) -> None:
    mem = guest.root / "sys/devices/system/memory"
    for i, state in enumerate(["online", "offline", "offline"]):
        (mem / f"memory{i}").mkdir(parents=True)
        (mem / f"memory{i}/state").write_text(state + "\n")
    res = await client.wait_hardware(memory=True, timeout=5)
    assert res == WaitResult(device=None, dev_path=None, cpus_online=None, mem_blocks=2)
    assert (mem / "memory1/state").read_text() == "online_movable"


async def test_many_waits_and_cancel(client: AgentClient, guest: Guest) -> None:
    tasks = [
        asyncio.create_task(client.wait_hardware(block_serial=f"s{i}", timeout=10))
        for i in range(5)
    ]
    await asyncio.sleep(0.05)
    tasks[0].cancel()  # the client sends CANCEL: the agent drops that wait
    for i in range(1, 5):
        guest.virtio_disk(f"vd{i}", f"s{i}")
    names = [(await asyncio.wait_for(t, 10)).device for t in tasks[1:]]
    assert names == ["vd1", "vd2", "vd3", "vd4"]
    assert tasks[0].cancelled()


async def test_closed_connection_drops_its_waits(client: AgentClient, guest: Guest) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(guest.sock)
        s.sendall(
            b"".join(
                wait_frame(i, (p.Tag.SERIAL, f"gone{i}"), (p.Tag.TIMEOUT_MS, 600_000))
                for i in range(1, 65)
            )
        )
        await asyncio.sleep(0.2)
        # 64 waits fill the table: one more on another connection is refused.
        with pytest.raises(AgentRequestError, match="too many pending waits"):
            await client.wait_hardware(block_serial="x", timeout=1)
    await asyncio.sleep(0.2)  # the hangup frees them
    guest.virtio_disk("vda", "x")
    assert (await client.wait_hardware(block_serial="x", timeout=5)).device == "vda"
