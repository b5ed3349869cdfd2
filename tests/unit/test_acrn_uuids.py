"""ACRN VM UUID allocation: one per sandbox, persisted, never reused while in use."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest

from virtcontainers.drivers.acrn.uuids import DEFAULT_POOL, UuidAllocator
from virtcontainers.errors import HypervisorError


def test_default_pool_is_valid_and_distinct() -> None:
    assert len(set(DEFAULT_POOL)) == len(DEFAULT_POOL) == 8
    for u in DEFAULT_POOL:
        assert str(uuid.UUID(u)) == u


def test_one_uuid_per_sandbox_until_released(run_root: str) -> None:
    alloc = UuidAllocator(run_root)
    a = alloc.allocate("sb-a")
    b = alloc.allocate("sb-b")
    assert a != b and {a, b} <= set(DEFAULT_POOL)
    assert alloc.allocate("sb-a") == a  # the same sandbox keeps its UUID
    assert alloc.in_use() == {a: "sb-a", b: "sb-b"}
    alloc.release("sb-a")
    assert alloc.in_use() == {b: "sb-b"}
    assert alloc.allocate("sb-c") == a  # freed, so handed out again
    alloc.release("sb-b")
    alloc.release("sb-c")
    alloc.release("sb-c")  # releasing twice is harmless
    assert alloc.in_use() == {}
    assert not os.path.exists(os.path.join(run_root, "acrn"))


def test_exhaustion_is_a_clear_error(run_root: str) -> None:
    alloc = UuidAllocator(run_root, pool=DEFAULT_POOL[:2])
    alloc.allocate("one")
    alloc.allocate("two")
    with pytest.raises(HypervisorError, match=r"no free VM UUID for sandbox 'three'.*all 2"):
        alloc.allocate("three")
    alloc.release("one")
    assert alloc.allocate("three") == DEFAULT_POOL[0]
    alloc.release("two")
    alloc.release("three")


def test_dead_owner_frees_its_uuid_but_a_live_one_does_not(run_root: str) -> None:
    alloc = UuidAllocator(run_root, pool=DEFAULT_POOL[:1])
    u = alloc.allocate("crashed")
    dead = subprocess.Popen(["true"])
    dead.wait()
    alloc.set_owner(u, dead.pid, 1)  # a pid (and start time) that no longer runs
    assert alloc.allocate("next") == u
    alloc.set_owner(u, os.getpid(), _start_time(os.getpid()))
    with pytest.raises(HypervisorError, match="no free VM UUID"):
        alloc.allocate("after")
    alloc.release("next")


def test_table_is_shared_between_processes(run_root: str) -> None:
    alloc = UuidAllocator(run_root)
    mine = alloc.allocate("parent")
    code = (
        "import sys; from virtcontainers.drivers.acrn.uuids import UuidAllocator;"
        "print(UuidAllocator(sys.argv[1]).allocate('child'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, run_root], check=True, capture_output=True, text=True
    )
    theirs = out.stdout.strip()
    assert theirs in DEFAULT_POOL and theirs != mine
    assert alloc.in_use() == {mine: "parent", theirs: "child"}
    alloc.release("parent")
    alloc.release("child")


def _start_time(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[19])
