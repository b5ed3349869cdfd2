"""`virtc` end to end: real subprocesses driving real QEMU VMs, across separate invocations."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import pytest
from test_network import mac_of

from net_support import namespaces, veth

pytestmark = pytest.mark.integration

VIRTC = [sys.executable, "-m", "virtcontainers.cli"]


async def virtc(
    run_root: str, *args: str, stdin: bytes = b"", timeout: float = 120
) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "VC_RUN_ROOT": run_root, "COLUMNS": "200"}
    return await asyncio.to_thread(
        subprocess.run,
        [*VIRTC, *args],
        input=stdin,
        capture_output=True,
        env=env,
        timeout=timeout,
        check=False,
    )


def state_files(run_root: str) -> list[str]:
    sbs = os.path.join(run_root, "sbs")
    return sorted(os.listdir(sbs)) if os.path.isdir(sbs) else []


async def test_run_prints_output_and_exits_with_command_code(leak_check: str) -> None:
    r = await virtc(
        leak_check, "run", "--memory", "256M", "--", "sh", "-c", "echo out; echo err >&2; exit 3"
    )
    assert r.returncode == 3, r.stderr
    assert r.stdout == b"out\n"
    assert b"err\n" in r.stderr
    r = await virtc(leak_check, "run", "-i", "--", "tr", "a-z", "A-Z", stdin=b"shout\n")
    assert (r.returncode, r.stdout) == (0, b"SHOUT\n")
    r = await virtc(leak_check, "run", "--exec-timeout", "0.5", "--", "sleep", "30")
    assert r.returncode == 124 and b"timed out" in r.stderr
    r = await virtc(leak_check, "run", "--", "sh", "-c", "kill -9 $$")
    assert r.returncode == 128 + 9
    assert state_files(leak_check) == []


async def test_lifecycle_across_invocations(leak_check: str) -> None:
    r = await virtc(leak_check, "create", "--name", "cli1", "--memory", "256M", "--cpus", "2")
    assert (r.returncode, r.stdout.strip()) == (0, b"cli1"), r.stderr
    r = await virtc(leak_check, "--json", "list")
    [entry] = json.loads(r.stdout)
    assert entry["id"] == "cli1" and entry["state"] == "created"
    assert set(entry) == {
        "id", "hypervisor", "state", "pid", "created_at", "vcpus", "memory_mb", "ip"
    }  # fmt: skip

    assert (await virtc(leak_check, "start", "cli1")).returncode == 0
    r = await virtc(leak_check, "exec", "cli1", "--", "nproc")
    assert (r.returncode, r.stdout) == (0, b"2\n"), r.stderr
    r = await virtc(leak_check, "exec", "-e", "GREETING=hi", "cli1", "sh", "-c", "echo $GREETING")
    assert r.stdout == b"hi\n", r.stderr

    assert (await virtc(leak_check, "pause", "cli1")).returncode == 0
    [entry] = json.loads((await virtc(leak_check, "list", "--json")).stdout)
    assert entry["state"] == "paused" and entry["pid"] > 0
    r = await virtc(leak_check, "exec", "cli1", "true")
    assert r.returncode == 125 and b"paused" in r.stderr
    assert (await virtc(leak_check, "resume", "cli1")).returncode == 0
    r = await virtc(leak_check, "exec", "cli1", "sh", "-c", "exit 9")
    assert r.returncode == 9

    r = await virtc(leak_check, "inspect", "cli1")
    doc = json.loads(r.stdout)
    assert doc["sandbox"]["state"] == "running" and doc["config"]["num_vcpus"] == 2

    full = (await virtc(leak_check, "logs", "--console", "cli1")).stdout
    assert b"VC-AGENT-READY" in full
    r = await virtc(leak_check, "logs", "--console", "--tail", "1", "cli1")
    assert r.returncode == 0 and r.stdout and r.stdout.count(b"\n") <= 1
    assert full.endswith(r.stdout) and len(r.stdout) < len(full)

    # --follow shows what the guest writes from now on, and ends when the sandbox stops.
    follower = await asyncio.create_subprocess_exec(
        *VIRTC,
        "logs",
        "--console",
        "--follow",
        "--tail",
        "0",
        "cli1",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "VC_RUN_ROOT": leak_check},
    )
    try:
        # The follower may not have opened the log yet when the first line is written
        # (--tail 0 would skip it): write until it sees one.
        assert follower.stdout is not None
        reading = asyncio.ensure_future(follower.stdout.readuntil(b"FOLLOWED"))
        for _ in range(15):
            r = await virtc(leak_check, "exec", "cli1", "sh", "-c", "echo FOLLOWED > /dev/ttyS0")
            assert r.returncode == 0, r.stderr
            done, _pending = await asyncio.wait({reading}, timeout=2)
            if done:
                break
        line = await asyncio.wait_for(reading, 5)
        assert b"VC-AGENT-READY" not in line  # --tail 0: nothing from before

        r = await virtc(leak_check, "list", "-q")
        assert r.stdout.split() == [b"cli1"]
        assert (await virtc(leak_check, "stop", "cli1")).returncode == 0
        assert await asyncio.wait_for(follower.wait(), 30) == 0
    finally:
        if follower.returncode is None:
            follower.kill()
            await follower.wait()
    assert state_files(leak_check) == []
    r = await virtc(leak_check, "stop", "cli1")
    assert r.returncode == 125
    assert r.stderr.decode().strip() == "virtc: error: no such sandbox: cli1"


async def test_kill_and_dead_vm_reporting(leak_check: str) -> None:
    r = await virtc(leak_check, "create", "--start", "--name", "cli2", "-m", "256M")
    assert r.returncode == 0, r.stderr
    [entry] = json.loads((await virtc(leak_check, "list", "--json")).stdout)
    os.kill(entry["pid"], 9)
    for _ in range(50):
        [entry] = json.loads((await virtc(leak_check, "list", "--json")).stdout)
        if entry["state"] == "dead":
            break
        await asyncio.sleep(0.1)
    assert entry["state"] == "dead"
    doc = json.loads((await virtc(leak_check, "inspect", "cli2")).stdout)
    assert doc["sandbox"]["state"] == doc["hypervisor"]["vm_state"] == "dead"
    r = await virtc(leak_check, "exec", "cli2", "true")
    assert r.returncode == 125
    assert b"cli2" in r.stderr
    assert (await virtc(leak_check, "kill", "cli2")).returncode == 0
    assert state_files(leak_check) == []


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (("-H", "vmware", "list"), 2, "Unknown hypervisor type vmware"),
        (("run", "--kernel", "/no/such/vmlinuz", "true"), 2, "--kernel: no such file"),
        (("run", "--memory", "lots", "true"), 2, "invalid memory size 'lots'"),
        (("run", "--cpus", "0", "true"), 2, "invalid --cpus 0"),
        (("run", "--cpus", "999", "true"), 2, "num_vcpus"),
        (("exec", "ghost", "true"), 125, "no such sandbox: ghost"),
        (("pause", "ghost"), 125, "no such sandbox: ghost"),
        (("create", "--name", "../x"), 2, "../x"),
        (("nosuchcommand",), 2, "No such command"),
    ],
)
async def test_bad_input(leak_check: str, args: tuple[str, ...], code: int, message: str) -> None:
    r = await virtc(leak_check, *args)
    assert r.returncode == code, (r.stdout, r.stderr)
    assert message in r.stderr.decode()
    assert state_files(leak_check) == []


def _console_session(run_root: str, sandbox_id: str) -> tuple[int, bytes]:
    """Drive `virtc console` through a pty: see the boot log, run a command, escape."""
    import pty
    import select
    import time

    pid, fd = pty.fork()
    if pid == 0:  # the child becomes virtc on the pty
        os.environ["VC_RUN_ROOT"] = run_root
        os.execv(sys.executable, [*VIRTC, "console", sandbox_id])
    seen = b""

    def read_until(marker: bytes, timeout: float = 30) -> None:
        nonlocal seen
        deadline = time.monotonic() + timeout
        while marker not in seen and time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.2)
            if ready:
                try:
                    seen += os.read(fd, 65536)
                except OSError:
                    return

    try:
        read_until(b"Connected to")
        os.write(fd, b"\r")
        read_until(b"# ")
        os.write(fd, b"echo con$((40+2))sole\r")
        read_until(b"con42sole")
        os.write(fd, b"\x1d")  # Ctrl-]
        read_until(b"Disconnected")
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    return os.waitstatus_to_exitcode(status), seen


async def test_console_through_a_pty(leak_check: str) -> None:
    r = await virtc(leak_check, "create", "--start", "--name", "con1", "-m", "256M")
    assert r.returncode == 0, r.stderr
    try:
        code, seen = await asyncio.to_thread(_console_session, leak_check, "con1")
        assert b"VC-AGENT-READY" in seen  # the boot log is shown first
        assert b"con42sole" in seen  # a command typed at the shell ran in the guest
        assert b"Disconnected" in seen and code == 0
    finally:
        assert (await virtc(leak_check, "stop", "con1")).returncode == 0


async def test_run_from_template(leak_check: str, host_untouched: None) -> None:
    r = await virtc(leak_check, "template", "create", "tpl", "--memory", "256M")
    assert r.returncode == 0, r.stderr
    try:
        r = await virtc(leak_check, "--json", "template", "list")
        assert [t["name"] for t in json.loads(r.stdout)] == ["tpl"]
        r = await virtc(
            leak_check, "run", "-m", "256M", "--from-template", "tpl", "--", "sh", "-c", "exit 5"
        )
        assert r.returncode == 5, r.stderr
        # A clone joined to a test namespace's veth: its MAC and address, the other end reached.
        async with namespaces(2) as (out, sbns):
            await veth(out, "vth0", ["192.168.77.1/24"], sbns, "eth0", ["192.168.77.2/24"])
            mac = await asyncio.to_thread(mac_of, sbns, "eth0")
            script = "cat /sys/class/net/eth0/address; ip -4 addr; ping -c 1 -W 10 192.168.77.1"
            net = ("--net", f"ns:{sbns.path}")
            r = await virtc(leak_check, "run", "-m", "256M", "--from-template", "tpl", *net,
                            "--", "sh", "-c", script)  # fmt: skip
            assert r.returncode == 0, (r.stdout, r.stderr)
            assert r.stdout.decode().startswith(f"{mac}\n") and b"192.168.77.2/24" in r.stdout
            assert sbns.links() == ["eth0", "lo"]
        r = await virtc(leak_check, "run", "-m", "256M", "--from-template", "nope", "--", "true")
        assert r.returncode != 0 and b"nope" in r.stderr
        assert state_files(leak_check) == []
    finally:
        assert (await virtc(leak_check, "template", "rm", "tpl")).returncode == 0
