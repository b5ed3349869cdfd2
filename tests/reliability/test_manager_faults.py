"""The managing process SIGKILLed mid-operation, forged state, and two managers at once.

A new process finds the sandbox through the state store and either re-attaches (the VM
still works) or cleans it up; nothing is orphaned; a recorded pid whose start time does not
match is never signalled; the state lock serialises concurrent managers.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from rel_support import assert_clean, run_python, sandbox_kw

from leaks import proc_status, vmm_processes
from virtcontainers import host, persist
from virtcontainers.config import HypervisorConfig
from virtcontainers.errors import StateError
from virtcontainers.hypervisor import VMState
from virtcontainers.sandbox import STARTING, Sandbox, recorded_state

pytestmark = pytest.mark.integration

START_AND_WAIT = """
import asyncio, json, os, signal, sys
from virtcontainers import sandbox as m
if sys.argv[3] == "die-before-pid":
    real = m.Sandbox._persist
    def dying(self, state=None):
        if state == m.STARTING:  # the manager dies right before it records the VMM's pid
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, state)
    m.Sandbox._persist = dying
async def main():
    sb = m.Sandbox("mgr1", "qemu", run_root=sys.argv[1], **json.loads(sys.argv[2]))
    await sb.start()
    await asyncio.sleep(600)
asyncio.run(main())
"""


def launch_manager(run_root: str, kw: dict[str, Any], mode: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", START_AND_WAIT, run_root, json.dumps(kw), mode],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def persisted_state(run_root: str, id: str) -> str:
    store = persist.StateStore(run_root)
    try:
        return recorded_state(store, id, store.read(id))
    except (StateError, KeyError):
        return ""


async def test_manager_killed_mid_start_then_reattached(leak_check: str, guest_assets: Any) -> None:
    manager = launch_manager(leak_check, sandbox_kw(guest_assets), "normal")
    try:
        for _ in range(3000):  # the pid is recorded before the VM has booted
            if persisted_state(leak_check, "mgr1") == STARTING:
                break
            assert manager.poll() is None, manager.stderr.read() if manager.stderr else ""
            await asyncio.sleep(0.01)
        manager.kill()
    finally:
        manager.wait()
        if manager.stderr:
            manager.stderr.close()
    [qemu] = vmm_processes(leak_check)
    [info] = Sandbox.list(leak_check)
    assert (info.id, info.state, info.pid) == ("mgr1", STARTING, qemu[0])

    sb = await Sandbox.attach("mgr1", run_root=leak_check)
    assert sb.state is VMState.RUNNING
    res = await sb.exec(["echo", "survived"])  # waits for the agent: the VM is still booting
    assert res.stdout == b"survived\n"
    await sb.stop()
    assert_clean(leak_check)


async def test_manager_killed_before_recording_the_pid_leaves_no_orphan(
    leak_check: str, guest_assets: Any
) -> None:
    manager = launch_manager(leak_check, sandbox_kw(guest_assets), "die-before-pid")
    try:
        assert await asyncio.to_thread(manager.wait, 60) == -signal.SIGKILL
    finally:
        if manager.stderr:
            manager.stderr.close()
    [(pid, _)] = vmm_processes(leak_check)  # QEMU runs on, unknown to the state file
    [info] = Sandbox.list(leak_check)
    assert (info.id, info.state, info.pid) == ("mgr1", "created", 0)

    sb = await Sandbox.attach("mgr1", run_root=leak_check)
    with pytest.raises(StateError, match="cannot exec in sandbox mgr1: it is created"):
        await sb.exec(["true"])
    await sb.stop()
    assert proc_status(pid) in ("", "Z")
    assert_clean(leak_check)


HOTPLUG_AND_DIE = """
import asyncio, os, signal, sys
from virtcontainers import sandbox as m
real = m.Sandbox._persist
def dying(self, state=None):
    if self.disks:  # the device is in the VM, the state file does not know it yet
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, state)
m.Sandbox._persist = dying
async def main():
    sb = await m.Sandbox.attach("sb1", run_root=sys.argv[1])
    await sb.add_disk(sys.argv[2], "d0")
asyncio.run(main())
"""


async def test_manager_killed_mid_hotplug(
    sandbox: Sandbox, leak_check: str, tmp_path: Path
) -> None:
    from virtcontainers.types import Capabilities

    if Capabilities.BLOCK_DEVICE_HOTPLUG not in sandbox.capabilities():
        pytest.skip("QEMU block hotplug is not implemented")
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\0" * (1 << 20))
    await sandbox.detach()  # the agent's virtio-serial port serves one client at a time
    rc, _, err = await run_python(HOTPLUG_AND_DIE, leak_check, str(disk))
    assert rc == -signal.SIGKILL, err

    other = await Sandbox.attach("sb1", run_root=leak_check)
    assert other.disks == {}  # the half-done hotplug was never recorded
    assert (await other.exec(["echo", "still here"])).stdout == b"still here\n"
    await other.detach()
    await sandbox.stop()
    assert_clean(leak_check)


def forge_state(run_root: str, id: str, pid: int, start_time: int | None) -> None:
    """A state file claiming that `pid` is the QEMU of running sandbox `id`."""
    vm_dir = persist.vm_dir(id, run_root)
    os.makedirs(vm_dir, mode=0o700)
    cfg = HypervisorConfig(kernel_path="/nonexistent/vmlinuz", initrd_path="/nonexistent/initrd")
    cfg.validate()
    hv = persist.HypervisorState(
        type="qemu",
        pid=pid,
        pid_start_time=start_time,
        vm_dir=vm_dir,
        qmp_socket=os.path.join(vm_dir, "qmp.sock"),
        console_socket=os.path.join(vm_dir, "console.sock"),
        config=cfg.to_dict(),
        id=id,
        vm_state="running",
    )
    doc = {
        "sandbox": {"id": id, "hypervisor": "qemu", "state": "running", "created_at": 0.0},
        "hypervisor": hv.model_dump(mode="json"),
        "config": cfg.to_dict(),
    }
    persist.StateStore(run_root).write(id, doc)


@pytest.mark.parametrize("how", ["stop", "kill", "api-force"])
async def test_forged_pid_with_wrong_start_time_is_never_signalled(
    leak_check: str, how: str
) -> None:
    bystander = subprocess.Popen(["sleep", "120"])
    try:
        start = host.process_start_time(bystander.pid)
        assert start is not None
        forge_state(leak_check, "forged", bystander.pid, start + 1)
        [info] = Sandbox.list(leak_check)
        assert info.state == "dead"  # the recorded process is not the one alive under that pid
        if how == "api-force":
            sb = await Sandbox.attach("forged", run_root=leak_check)
            await sb.stop(force=True)
        else:
            rc, _, err = await run_python(
                "from virtcontainers.cli import main; main()",
                "--run-root",
                leak_check,
                how,
                "forged",
            )
            assert rc == 0, err
        assert bystander.poll() is None and proc_status(bystander.pid) == "S"
        assert_clean(leak_check)
    finally:
        bystander.kill()
        bystander.wait()


async def test_forged_pid_without_start_time_is_never_signalled(leak_check: str) -> None:
    bystander = subprocess.Popen(["sleep", "120"])
    try:
        forge_state(leak_check, "forged", bystander.pid, None)
        sb = await Sandbox.attach("forged", run_root=leak_check)
        await sb.stop(force=True)
        assert bystander.poll() is None
        assert_clean(leak_check)
    finally:
        bystander.kill()
        bystander.wait()


TOGGLER = """
import asyncio, json, random, sys
from virtcontainers.errors import StateError
from virtcontainers.sandbox import Sandbox
async def main():
    rnd = random.Random(int(sys.argv[2]))
    done = []
    for _ in range(int(sys.argv[3])):
        sb = await Sandbox.attach("sb1", run_root=sys.argv[1])
        op = rnd.choice(["pause", "resume"])
        try:
            await getattr(sb, op)()
            done.append(op)
        except StateError as e:
            # Refused only because the VM already is in the wanted state.
            assert ("paused" if op == "pause" else "running") in str(e), e
            done.append("refused")
        finally:
            await sb.detach()
    print(json.dumps(done))
asyncio.run(main())
"""


async def test_two_managers_are_serialised(sandbox: Sandbox, leak_check: str) -> None:
    store = persist.StateStore(leak_check)
    path = store.path("sb1")
    reads = 0
    stop_reading = asyncio.Event()

    async def reader() -> None:
        nonlocal reads
        while not stop_reading.is_set():
            with open(path, "rb") as f:
                doc = json.loads(f.read())  # never torn: always a whole document
            assert doc["sandbox"]["state"] in ("running", "paused")
            assert store.runstate("sb1") in ("running", "paused")  # one byte: never torn
            reads += 1
            await asyncio.sleep(0.005)

    reading = asyncio.ensure_future(reader())
    try:
        results = await asyncio.gather(
            *(run_python(TOGGLER, leak_check, str(seed), "8") for seed in (1, 2))
        )
    finally:
        stop_reading.set()
        await reading
    for rc, _, err in results:
        assert rc == 0, err
    ops = [op for _, out, _ in results for op in json.loads(out)]
    assert ops.count("pause") + ops.count("resume") > 0
    assert reads > 0
    # The persisted state is the VM's real state.
    actual = (await sandbox.hypervisor._execute("query-status"))["status"]  # type: ignore[attr-defined]
    recorded = persisted_state(leak_check, "sb1")
    assert (recorded, actual) in (("running", "running"), ("paused", "paused"))


async def test_two_concurrent_stops(sandbox: Sandbox, leak_check: str) -> None:
    await sandbox.detach()
    stop = "from virtcontainers.cli import main; main()"
    results = await asyncio.gather(
        *(run_python(stop, "--run-root", leak_check, "stop", "sb1") for _ in range(2))
    )
    codes = sorted(rc for rc, _, _ in results)
    assert codes[0] == 0, results
    for rc, _, err in results:
        assert rc == 0 or "no such sandbox: sb1" in err, err
    assert_clean(leak_check)
