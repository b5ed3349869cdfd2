"""`virtc list` and `virtc inspect` report a sandbox's state the same way: a VM recorded as
running or paused whose VMM process is gone is "dead" in both (the state file alone would
still say "running")."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from cli_support import invoke
from virtcontainers import persist
from virtcontainers.host import process_start_time

Capsys = pytest.CaptureFixture[str]


def record(run_root: str, sid: str, pid: int, start: int | None, runstate: str) -> None:
    """A state file as a manager leaves it for a started sandbox whose VMM is `pid`."""
    store = persist.StateStore(run_root)
    store.write(
        sid,
        {
            "sandbox": {"id": sid, "hypervisor": "qemu", "state": "running"},
            "hypervisor": {"pid": pid, "pid_start_time": start, "vm_state": "running"},
            "config": {"num_vcpus": 1, "memory_size": 256},
        },
    )
    store.set_runstate(sid, runstate)


def gone_process() -> tuple[int, int | None]:
    """The pid and start time of a process that has exited (a SIGKILLed VMM's)."""
    proc = subprocess.Popen(["sleep", "30"])
    start = process_start_time(proc.pid)
    proc.kill()
    proc.wait()
    return proc.pid, start


def states(capsys: Capsys, sid: str) -> tuple[str, str, str]:
    """(list's state, inspect's sandbox state, inspect's hypervisor vm_state)."""
    listed = invoke(capsys, "--json", "list")
    assert listed.code == 0, listed.err
    [entry] = [e for e in json.loads(listed.out) if e["id"] == sid]
    shown = invoke(capsys, "inspect", sid)
    assert shown.code == 0, shown.err
    doc = json.loads(shown.out)
    return entry["state"], doc["sandbox"]["state"], doc["hypervisor"]["vm_state"]


def test_inspect_says_dead_when_the_vmm_was_killed(capsys: Capsys, run_root: str) -> None:
    pid, start = gone_process()
    record(run_root, "killed", pid, start, "running")
    assert states(capsys, "killed") == ("dead", "dead", "dead")


def test_inspect_and_list_agree_on_live_sandboxes(capsys: Capsys, run_root: str) -> None:
    me = os.getpid()
    record(run_root, "up", me, process_start_time(me), "running")
    record(run_root, "held", me, process_start_time(me), "paused")
    assert states(capsys, "up") == ("running", "running", "running")
    assert states(capsys, "held") == ("paused", "paused", "paused")


def test_a_reused_pid_is_not_the_vmm(capsys: Capsys, run_root: str) -> None:
    """A live process with the recorded pid but another start time is not the VM's VMM."""
    me = os.getpid()
    start = process_start_time(me)
    record(run_root, "reused", me, (start or 0) + 1, "running")
    assert states(capsys, "reused") == ("dead", "dead", "dead")


def test_mock_runs_a_command(capsys: Capsys, run_root: str) -> None:
    """`virtc -H mock run` needs no kernel: the mock's stand-in agent runs the command."""
    res = invoke(capsys, "-H", "mock", "run", "--", "echo", "hi")
    assert (res.code, res.out, res.err) == (0, "hi\n", "")
    assert invoke(capsys, "-H", "mock", "run", "--", "exit", "7").code == 7
    assert invoke(capsys, "--json", "list").out.strip() == "[]"
