"""The cache server's ledger (what a dead server leaves is stopped) and daemon bookkeeping."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from virtcontainers import host, persist
from virtcontainers.drivers.vmm_process import processes_using
from virtcontainers.errors import ConfigError
from virtcontainers.factory import DaemonSpec, daemon_status, paths, stop_daemon
from virtcontainers.factory import ledger as ledger_mod
from virtcontainers.factory.daemon import cleanup_after, read_pid_file, running_pid
from virtcontainers.factory.errors import CacheUnavailableError


def fake_vmm(vm_dir: str) -> subprocess.Popen[bytes]:
    """A process called like a VMM whose command line names a file in `vm_dir` (a socket)."""
    os.makedirs(vm_dir, exist_ok=True)
    proc = subprocess.Popen(
        ["qemu-system-x86_64", "-c", "import time; time.sleep(60)", f"{vm_dir}/qmp.sock"],
        executable=sys.executable,
    )
    # Right after the fork its command line can still read empty: wait until it shows.
    for _ in range(500):
        if proc.pid in processes_using(vm_dir):
            break
        time.sleep(0.01)
    return proc


def dead_pid() -> tuple[int, int | None]:
    """The pid and start time of a process that has exited."""
    p = subprocess.Popen(["true"])
    start = host.process_start_time(p.pid)
    p.wait()
    return p.pid, start


def write_ledger(path: str, owner: int, start: int | None, vms: list[dict[str, object]]) -> None:
    with open(path, "w") as f:
        json.dump({"owner": owner, "owner_start_time": start, "vms": vms}, f)


def test_ledger_file_tracks_adds_and_removes(run_root: str) -> None:
    path = os.path.join(run_root, "pool.json")
    led = ledger_mod.Ledger(path, run_root)
    led.add("a")
    led.add("b", os.getpid())
    led.remove("a")
    led.remove("zzz")
    owner, start, entries = ledger_mod.read(path)
    assert owner == os.getpid() and start == host.process_start_time(os.getpid())
    assert [e["id"] for e in entries] == ["b"]
    assert entries[0]["vm_dir"] == persist.vm_dir("b", run_root)
    assert entries[0]["pid"] == os.getpid()
    assert led.ids() == ["b"]


def test_reap_stops_what_a_dead_owner_left(run_root: str) -> None:
    path = os.path.join(run_root, "pool.json")
    booted_dir = persist.vm_dir("vm-pooled", run_root)
    booting_dir = persist.vm_dir("vm-booting", run_root)
    pooled, booting = fake_vmm(booted_dir), fake_vmm(booting_dir)
    try:
        owner, start = dead_pid()
        write_ledger(
            path,
            owner,
            start,
            [
                {
                    "id": "vm-pooled",
                    "vm_dir": booted_dir,
                    "pid": pooled.pid,
                    "start_time": host.process_start_time(pooled.pid),
                },
                # Killed mid-boot: no pid yet; found by its command line.
                {"id": "vm-booting", "vm_dir": booting_dir, "pid": 0, "start_time": None},
            ],
        )
        assert sorted(ledger_mod.reap(path, owner=owner)) == ["vm-booting", "vm-pooled"]
        assert pooled.wait(5) == -9 and booting.wait(5) == -9
        assert not os.path.exists(booted_dir) and not os.path.exists(booting_dir)
        assert not os.path.exists(path)
    finally:
        for p in (pooled, booting):
            p.kill()
            p.wait()


def test_reap_leaves_a_live_owner_and_other_owners_alone(run_root: str) -> None:
    path = os.path.join(run_root, "pool.json")
    vm_dir = persist.vm_dir("vm1", run_root)
    proc = fake_vmm(vm_dir)
    try:
        entry = {"id": "vm1", "vm_dir": vm_dir, "pid": proc.pid, "start_time": None}
        write_ledger(path, os.getpid(), host.process_start_time(os.getpid()), [entry])
        assert ledger_mod.reap(path) == []
        owner, start = dead_pid()
        write_ledger(path, owner, start, [entry])
        assert ledger_mod.reap(path, owner=owner + 1) == []
        assert proc.poll() is None and os.path.isdir(vm_dir) and os.path.exists(path)
    finally:
        proc.kill()
        proc.wait()


def test_reap_spares_what_only_mentions_the_vm_dir(run_root: str) -> None:
    """An operator's `tail -f console.log` names the VM directory but is no VMM."""
    path = os.path.join(run_root, "pool.json")
    vm_dir = persist.vm_dir("vm1", run_root)
    vmm = fake_vmm(vm_dir)
    open(f"{vm_dir}/console.log", "w").close()
    tail = subprocess.Popen(["tail", "-f", f"{vm_dir}/console.log"])
    try:
        while tail.pid not in processes_using(vm_dir):
            time.sleep(0.01)
        owner, start = dead_pid()
        write_ledger(path, owner, start, [{"id": "vm1", "vm_dir": vm_dir, "pid": 0}])
        assert ledger_mod.reap(path) == ["vm1"]
        assert vmm.wait(5) == -9
        assert tail.poll() is None
    finally:
        for p in (vmm, tail):
            p.kill()
            p.wait()


async def test_signals_go_through_pidfds(run_root: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing checks a pid and then signals the number (which may be reused meanwhile)."""
    from virtcontainers import sandbox
    from virtcontainers.factory import daemon
    from virtcontainers.persist import HypervisorState
    from virtcontainers.shim import cleanup

    class Driver:
        def __init__(self, proc: subprocess.Popen[bytes]) -> None:
            self.state = HypervisorState(
                pid=proc.pid, pid_start_time=host.process_start_time(proc.pid)
            )

        def save(self) -> HypervisorState:
            return self.state

    def no_kill(pid: int, sig: int) -> None:
        raise AssertionError(f"os.kill({pid}, {sig}): a pid, not a pidfd")

    path = os.path.join(run_root, "pool.json")
    vm_dir = persist.vm_dir("vm1", run_root)
    vmm, server = fake_vmm(vm_dir), subprocess.Popen(["sleep", "60"])
    forced = subprocess.Popen(["sleep", "60"])
    shim = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", "virtcontainers.shim"]
    )
    while shim.pid not in processes_naming("virtcontainers.shim"):
        time.sleep(0.01)
    monkeypatch.setattr(os, "kill", no_kill)
    try:
        owner, start = dead_pid()
        vmm_start = host.process_start_time(vmm.pid)
        entry = {"id": "vm1", "vm_dir": vm_dir, "pid": vmm.pid, "start_time": vmm_start}
        write_ledger(path, owner, start, [entry])
        assert ledger_mod.reap(path) == ["vm1"]
        assert vmm.wait(5) == -9
        daemon._kill(server.pid, host.process_start_time(server.pid))
        assert server.wait(5) == -signal.SIGTERM
        await sandbox._force_kill(Driver(forced), vm_dir)  # type: ignore[arg-type]
        assert forced.wait(5) == -signal.SIGKILL
        with open(os.path.join(run_root, "shim.pid"), "w") as f:
            f.write(str(shim.pid))
        with open(os.path.join(run_root, "shim.start_time"), "w") as f:
            f.write(str(host.process_start_time(shim.pid)))
        cleanup._end_shim(run_root, wait=0)
        assert shim.wait(5) == -signal.SIGKILL
    finally:
        monkeypatch.undo()
        for p in (vmm, server, forced, shim):
            p.kill()
            p.wait()


def test_reap_of_a_missing_or_garbage_ledger(run_root: str) -> None:
    path = os.path.join(run_root, "pool.json")
    assert ledger_mod.reap(path) == []
    with open(path, "w") as f:
        f.write("garbage")
    assert ledger_mod.read(path) == (0, None, [])
    assert ledger_mod.reap(path) == []
    assert not os.path.exists(path)


def test_daemon_spec_validation() -> None:
    DaemonSpec(size=1, template="t").validate()
    with pytest.raises(ConfigError, match="at least 1"):
        DaemonSpec(size=0, template="t").validate()
    with pytest.raises(ConfigError, match="concurrency"):
        DaemonSpec(size=1, template="t", concurrency=0).validate()
    with pytest.raises(ConfigError, match="template or a VM config"):
        DaemonSpec(size=1).validate()
    with pytest.raises(ConfigError, match="unexpected keyword"):
        DaemonSpec.from_dict({"size": 1, "template": "t", "colour": "red"})
    with pytest.raises(ConfigError, match="JSON object"):
        DaemonSpec.from_dict([1])


async def test_stale_pid_file_and_leftovers_of_a_killed_server(run_root: str) -> None:
    persist.ensure_dir(paths.factory_dir(run_root))
    pid, start = dead_pid()
    with open(paths.pid_file(run_root), "w") as f:
        json.dump({"pid": pid, "start_time": start, "watcher": 0}, f)
    open(paths.socket_path(run_root), "w").close()
    vm_dir = persist.vm_dir("left", run_root)
    proc = fake_vmm(vm_dir)
    try:
        entry = {"id": "left", "vm_dir": vm_dir, "pid": 0, "start_time": None}
        write_ledger(paths.ledger_file(run_root), pid, start, [entry])
        assert read_pid_file(run_root)[0] == pid
        assert running_pid(run_root) == 0
        assert await stop_daemon(run_root) == ["left"]
        assert proc.wait(5) == -9
        for path in (paths.pid_file(run_root), paths.socket_path(run_root)):
            assert not os.path.exists(path)
        assert cleanup_after(run_root, pid) == []
    finally:
        proc.kill()
        proc.wait()


async def test_status_without_a_server(run_root: str) -> None:
    with pytest.raises(CacheUnavailableError, match="no VM cache server runs"):
        await daemon_status(run_root)


async def test_garbage_pid_file_means_no_server(run_root: str) -> None:
    persist.ensure_dir(paths.factory_dir(run_root))
    with open(paths.pid_file(run_root), "w") as f:
        f.write("{")
    assert read_pid_file(run_root) == (0, None, 0, None)
    assert running_pid(run_root) == 0
    assert await stop_daemon(run_root) == []
    assert not os.path.exists(paths.pid_file(run_root))


def processes_naming(text: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if text.encode() in f.read():
                        found.append(int(entry))
            except OSError:
                continue
    return found


async def test_a_server_that_does_not_come_up_in_time_is_not_left_running(run_root: str) -> None:
    from virtcontainers.factory import FactoryError, start_daemon

    with pytest.raises(FactoryError, match=r"did not answer within 0\.01s"):
        await start_daemon(DaemonSpec(size=1, template="t"), run_root=run_root, timeout=0.01)
    assert processes_naming(run_root) == []
    assert not os.path.exists(paths.pid_file(run_root))
