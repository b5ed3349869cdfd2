"""`kill_strays`: a VMM nobody recorded is found by its VM directory and killed."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

from virtcontainers.drivers.vmm_process import VMM_PROGRAMS, kill_strays, processes_using


def _vmm_pids_in(vm_dir: str) -> list[int]:
    return processes_using(vm_dir, VMM_PROGRAMS)


def test_a_stray_vmm_is_killed_and_other_processes_are_left(tmp_path: Path) -> None:
    vm_dir = str(tmp_path / "vm" / "sb1")
    os.makedirs(vm_dir)
    sleep = shutil.which("sleep")
    assert sleep is not None
    # argv[0] names a file in the VM directory: only the one called like a VMM is a stray.
    stray = subprocess.Popen([os.path.join(vm_dir, "qemu-system-x86_64"), "30"], executable=sleep)
    bystander = subprocess.Popen([os.path.join(vm_dir, "tail"), "30"], executable=sleep)
    try:
        deadline = time.monotonic() + 10
        while not _vmm_pids_in(vm_dir) and time.monotonic() < deadline:
            time.sleep(0.01)  # until the child has exec'd its new command line
        assert _vmm_pids_in(vm_dir) == [stray.pid]
        assert kill_strays(vm_dir) == [stray.pid]
        assert stray.poll() is not None  # killed
        assert bystander.poll() is None
        assert _vmm_pids_in(vm_dir) == []
    finally:
        for p in (stray, bystander):
            p.kill()
            p.wait()
