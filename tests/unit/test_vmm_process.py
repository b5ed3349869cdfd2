"""Generic VMM-process helpers shared by several drivers (`drivers/vmm_process.py`)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
from pathlib import Path

import pytest

from virtcontainers import host
from virtcontainers.drivers.vmm_process import (
    VmmProcess,
    log_tail,
    read_end,
    read_tail,
    threads_named,
    wait_pidfd,
)


def test_threads_named_finds_threads_by_comm() -> None:
    named = threading.Event()
    done = threading.Event()
    tids: list[int] = []

    def worker() -> None:
        tid = threading.get_native_id()
        with open(f"/proc/self/task/{tid}/comm", "w", encoding="utf-8") as f:
            f.write("vcpu7")
        tids.append(tid)
        named.set()
        done.wait(10)

    t = threading.Thread(target=worker)
    t.start()
    try:
        assert named.wait(10)
        found = threads_named(os.getpid(), re.compile(r"^vcpu(\d+)$"))
        assert found == {7: tids[0]}
        assert threads_named(os.getpid(), re.compile(r"^fc_vcpu (\d+)$")) == {}
    finally:
        done.set()
        t.join()


def test_threads_named_of_a_gone_process_raises() -> None:
    proc = subprocess.Popen(["true"])
    proc.wait()
    with pytest.raises(FileNotFoundError):
        threads_named(proc.pid, re.compile(r"^vcpu(\d+)$"))


async def test_wait_pidfd_sees_an_exit_and_times_out_on_a_live_process() -> None:
    sleeper = subprocess.Popen(["sleep", "30"])
    fd = os.pidfd_open(sleeper.pid)
    try:
        assert await wait_pidfd(fd, 0.05) is False
        sleeper.kill()
        assert await wait_pidfd(fd, 5.0) is True
    finally:
        os.close(fd)
        sleeper.kill()
        sleeper.wait()


async def test_an_attached_process_is_signalled_only_while_it_is_the_same_one() -> None:
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        start = host.process_start_time(sleeper.pid)
        assert start is not None
        impostor = VmmProcess.attach("vmm", sleeper.pid, start + 1)  # a reused pid
        assert impostor.send_signal(signal.SIGTERM) is False
        assert sleeper.poll() is None
        same = VmmProcess.attach("vmm", sleeper.pid, start)
        assert not same.is_child and same.alive()
        await same.stop(grace=5.0)
        assert not same.alive()
        assert same.exit_code == -signal.SIGTERM  # reaped by the handle: it was our child
    finally:
        sleeper.kill()
        sleeper.wait()


def test_log_tails_read_the_end_of_each_file(tmp_path: Path) -> None:
    big, blank = tmp_path / "big.log", tmp_path / "blank.log"
    big.write_bytes(b"x" * 100 + b"\nlast line \xff\n")
    blank.write_bytes(b"\n\n")
    assert read_end(str(big), 12) == "last line \ufffd\n"
    assert read_end(str(tmp_path / "missing.log"), 12) is None
    paths = [str(big), str(blank), str(tmp_path / "missing.log")]
    assert read_tail(paths, 12) == "last line \ufffd\n"
    assert log_tail(str(big), max_lines=1) == "last line \ufffd"
    assert log_tail(str(tmp_path / "missing.log")) == ""
