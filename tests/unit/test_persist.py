"""Unit tests for virtcontainers.persist: paths, HypervisorState, the atomic state store, locks."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import os
import random
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ConfigDict, ValidationError

from virtcontainers import host, persist
from virtcontainers.errors import ConfigError, StateError
from virtcontainers.persist import (
    Bridge,
    DriverState,
    HotpluggedVCPU,
    HypervisorState,
    StateStore,
)
from virtcontainers.types import VMState


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path | str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def temp_files(directory: Path) -> list[str]:
    return [n for n in os.listdir(directory) if n.startswith(persist.TEMP_PREFIX)]


# -- paths ------------------------------------------------------------------------------------
USER = 4242
OTHER = 4343
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="giving files to other users needs root")


@pytest.fixture
def shared_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A sticky, world-writable directory standing in for /tmp (`tempfile.gettempdir()`)."""
    d = tmp_path / "tmp"
    d.mkdir()
    d.chmod(0o1777)
    monkeypatch.setattr(tempfile, "tempdir", str(d))
    monkeypatch.setattr(persist, "USER_RUNTIME_BASE", str(tmp_path / "no-run-user"), raising=False)
    return d


def as_user(monkeypatch: pytest.MonkeyPatch, uid: int = USER) -> None:
    """Act as non-root user `uid` without XDG_RUNTIME_DIR or VC_RUN_ROOT."""
    monkeypatch.setattr(os, "geteuid", lambda: uid)
    monkeypatch.delenv("VC_RUN_ROOT", raising=False)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)


def private_dir(path: Path, uid: int = USER, mode: int = 0o700) -> Path:
    path.mkdir()
    os.chown(path, uid, uid)
    path.chmod(mode)
    return path


def plant_state(root: Path) -> None:
    """What an attacker leaves in a run root: a sandbox whose state names their binary."""
    sbs = root / "sbs" / "evil"
    sbs.mkdir(parents=True)
    doc = {"hypervisor": {"type": "qemu", "config": {"hypervisor_path": "/tmp/evil"}}}
    (sbs / persist.STATE_FILE).write_text(json.dumps(doc))


@needs_root
def test_run_root_precedence(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, shared_tmp: Path
) -> None:
    monkeypatch.setenv("VC_RUN_ROOT", "/srv/env-root")
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    assert persist.run_root("/srv/override") == "/srv/override"
    assert persist.run_root() == "/srv/env-root"
    monkeypatch.delenv("VC_RUN_ROOT")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert persist.run_root() == "/run/vc"
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert persist.run_root() == "/run/user/1000/vc"
    as_user(monkeypatch)
    # The login manager's private directory comes before anything in /tmp...
    base = tmp_path / "run-user"
    base.mkdir()
    private_dir(base / str(USER))
    monkeypatch.setattr(persist, "USER_RUNTIME_BASE", str(base))
    assert persist.run_root() == str(base / str(USER) / "vc")
    # ...which is the last resort, and then only a directory of the user's own.
    monkeypatch.setattr(persist, "USER_RUNTIME_BASE", str(tmp_path / "no-run-user"), raising=False)
    private_dir(shared_tmp / f"vc-{USER}")
    assert persist.run_root() == str(shared_tmp / f"vc-{USER}")


@needs_root
@pytest.mark.parametrize(
    ("owner", "mode", "problem"),
    [(OTHER, 0o700, f"owned by uid {OTHER}"), (USER, 0o777, "writable by others")],
)
def test_run_root_planted_by_another_user_is_refused(
    monkeypatch: pytest.MonkeyPatch, shared_tmp: Path, owner: int, mode: int, problem: str
) -> None:
    planted = private_dir(shared_tmp / f"vc-{USER}", owner, mode)
    plant_state(planted)
    as_user(monkeypatch)
    with pytest.raises(ConfigError, match=f"unsafe run root {planted}: it is {problem}"):
        StateStore().list()
    with pytest.raises(ConfigError, match="unsafe run root"):
        persist.run_root(str(planted))


@needs_root
def test_run_root_that_is_a_symlink_is_refused(
    monkeypatch: pytest.MonkeyPatch, shared_tmp: Path, tmp_path: Path
) -> None:
    target = private_dir(tmp_path / "target")  # even one to a directory of the user's own
    plant_state(target)
    (shared_tmp / f"vc-{USER}").symlink_to(target)
    as_user(monkeypatch)
    with pytest.raises(ConfigError, match="it is a symbolic link"):
        StateStore().list()


@needs_root
def test_run_root_under_a_directory_others_can_change_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    shared = private_dir(tmp_path / "shared", OTHER, 0o777)  # not sticky: renames allowed
    root = private_dir(shared / "vc")
    as_user(monkeypatch)
    with pytest.raises(ConfigError, match=f"{shared} is owned by uid {OTHER}"):
        persist.run_root(str(root))
    shared.chmod(0o1777)
    os.chown(shared, 0, 0)  # root's sticky directory, like /tmp: fine
    assert persist.run_root(str(root)) == str(root)


def test_missing_run_root_in_a_shared_directory_is_created_private_at_once(
    shared_tmp: Path,
) -> None:
    root = shared_tmp / "vc-new"
    with umask(0):
        assert persist.run_root(str(root)) == str(root)
    st = os.lstat(root)  # nobody else can now make it first
    assert stat.S_ISDIR(st.st_mode) and mode(root) == 0o700 and st.st_uid == os.geteuid()


def test_missing_run_root_in_a_private_directory_is_not_created(tmp_path: Path) -> None:
    root = tmp_path / "a" / "vc"
    assert persist.run_root(str(root)) == str(root)
    assert not root.exists() and not root.parent.exists()


@needs_root
def test_ensure_dir_refuses_to_build_on_another_users_directory_or_link(
    monkeypatch: pytest.MonkeyPatch, shared_tmp: Path, tmp_path: Path
) -> None:
    as_user(monkeypatch)
    theirs = private_dir(shared_tmp / "theirs", OTHER, 0o777)
    with pytest.raises(PermissionError, match=f"untrusted directory: {theirs} is owned by"):
        persist.ensure_dir(str(theirs / "sub"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    link = shared_tmp / "link"
    link.symlink_to(elsewhere)
    os.lchown(link, OTHER, OTHER)
    with pytest.raises(PermissionError, match=f"untrusted directory: {link}"):
        persist.ensure_dir(str(link / "sub"))
    with pytest.raises(StateError, match="untrusted directory"):
        persist.atomic_write(str(link / "sub" / "f"), b"x")
    assert os.listdir(elsewhere) == []
    mine = private_dir(shared_tmp / "mine")
    persist.ensure_dir(str(mine / "sub"))
    assert mode(mine / "sub") == 0o700


def test_run_root_normalises_and_refuses_relative(monkeypatch: pytest.MonkeyPatch) -> None:
    assert persist.run_root("/srv//vc/") == "/srv/vc"
    with pytest.raises(ConfigError, match="run root"):
        persist.run_root("relative/dir")
    monkeypatch.setenv("VC_RUN_ROOT", "also-relative")
    with pytest.raises(ConfigError, match="VC_RUN_ROOT"):
        persist.run_root()


def test_vm_and_sandbox_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    assert persist.vm_root("/r") == "/r/vm"
    assert persist.vm_dir("sb1", "/r") == "/r/vm/sb1"
    assert persist.sandbox_state_dir("sb1", "/r") == "/r/sbs/sb1"
    monkeypatch.setenv("VC_RUN_ROOT", "/from-env")
    assert persist.vm_dir("sb1") == "/from-env/vm/sb1"
    assert persist.sandbox_state_dir("sb1") == "/from-env/sbs/sb1"


@pytest.mark.parametrize("good", ["a", "0", "sb-1.2_3", "Z" * persist.ID_MAX_LEN, "f" * 64])
def test_valid_ids(good: str) -> None:
    assert persist.validate_id(good) == good
    assert persist.vm_dir(good, "/r") == f"/r/vm/{good}"


@pytest.mark.parametrize(
    "bad",
    ["", "a/b", "/abs", "..", ".", "a..b", ".hidden", "-opt", "_x", "a b", "a\nb", "é", "x" * 129],
)
def test_invalid_ids(bad: str) -> None:
    with pytest.raises(ConfigError) as exc:
        persist.validate_id(bad)
    assert "id" in str(exc.value)
    with pytest.raises(ConfigError):
        persist.vm_dir(bad, "/r")
    with pytest.raises(ConfigError):
        persist.sandbox_state_dir(bad, "/r")
    with pytest.raises(ConfigError):
        StateStore("/r").path(bad)


def test_invalid_id_type() -> None:
    with pytest.raises(ConfigError):
        persist.validate_id(None)  # type: ignore[arg-type]


# -- models -----------------------------------------------------------------------------------
def full_state() -> HypervisorState:
    return HypervisorState(
        type="qemu",
        pid=4242,
        pid_start_time=123456,
        uuid="2d3c8c1e-0f6a-4b4c-9a53-6a3a7a5c1e11",
        api_socket="/r/vm/sb1/api.sock",
        block_index_map=[3, 1, 1],
        hotplugged_vcpus=["cpu-1", HotpluggedVCPU(id="cpu-2")],  # type: ignore[list-item]
        hotplugged_memory=512,
        virtiofsd_pid=4243,
        pcie_root_port=2,
        bridges=[Bridge(id="pcie-bridge-0", type="pcie", addr=2, devices_addr={1: "blk0"})],
        hotplug_vfio_on_root_bus=True,
        vm_dir="/r/vm/sb1",
        qmp_socket="/r/vm/sb1/qmp.sock",
        console_socket="/r/vm/sb1/console.sock",
        agent_socket="/r/vm/sb1/kata.sock",
        config={"num_vcpus": 1, "kernel_params": "quiet"},
        id="sb1",
        vm_state="paused",  # type: ignore[arg-type]
        driver=_Own(machine="q35", nested={"a": [1, 2]}),
    )


class _Own(DriverState):
    model_config = ConfigDict(extra="forbid")

    machine: str = ""
    nested: dict[str, list[int]] = {}


def test_state_defaults() -> None:
    s = HypervisorState()
    assert (s.pid, s.pid_start_time, s.type, s.bridges) == (0, None, "", [])
    assert (s.id, s.vm_state, s.driver.model_dump()) == ("", VMState.NEW, {})


def test_state_json_round_trip() -> None:
    s = full_state()
    assert s.block_index_map == [1, 3]
    assert [v.id for v in s.hotplugged_vcpus] == ["cpu-1", "cpu-2"]
    text = json.dumps(s.model_dump(mode="json"))
    back = HypervisorState.model_validate(json.loads(text))
    assert back.model_dump() == s.model_dump() and back.vm_state is VMState.PAUSED
    assert back.driver_state(_Own) == s.driver
    assert back.bridges[0].devices_addr == {1: "blk0"}  # int keys survive JSON


@pytest.mark.parametrize(
    "bad",
    [
        {"pid": -1},
        {"hotplugged_memory": -5},
        {"block_index_map": [-1]},
        {"qmp_sock": "/typo"},
        {"bridges": [{"id": "b", "addr": -1}]},
        {"hotplugged_vcpus": [{"name": "cpu-1"}]},
    ],
)
def test_state_rejects_bad_fields(bad: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        HypervisorState.model_validate(bad)


# -- store: documents -------------------------------------------------------------------------
@pytest.fixture
def store(tmp_path: Path) -> StateStore:
    return StateStore(str(tmp_path / "run"))


def test_store_uses_run_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VC_RUN_ROOT", str(tmp_path))
    s = StateStore()
    assert s.path("sb1") == str(tmp_path / "sbs" / "sb1" / "persist.json")
    assert s.lock_path("sb1") == str(tmp_path / "sbs" / "sb1" / "lock")


def test_write_read_round_trip(store: StateStore) -> None:
    doc = {"a": 1, "nested": {"list": [1, "two", None, True]}, "unicode": "ü"}
    assert not store.exists("sb1")
    store.write("sb1", doc)
    assert store.exists("sb1")
    assert store.read("sb1") == doc
    store.write("sb1", {"b": 2})
    assert store.read("sb1") == {"b": 2}


def test_read_missing_names_id(store: StateStore) -> None:
    with pytest.raises(StateError, match="'ghost'"):
        store.read("ghost")


@pytest.mark.parametrize("content", [b"{not json", b"", b"[1, 2]", b"\xff\xfe"])
def test_read_corrupt_names_file(store: StateStore, content: bytes) -> None:
    path = Path(store.path("sb1"))
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    with pytest.raises(StateError, match="corrupt") as exc:
        store.read("sb1")
    assert str(path) in str(exc.value)


@pytest.mark.parametrize("doc", [{"x": object()}, {"x": float("nan")}, ["not", "a", "dict"]])
def test_write_refuses_non_json_and_keeps_old(store: StateStore, doc: Any) -> None:
    store.write("sb1", {"old": True})
    with pytest.raises(StateError, match="sb1"):
        store.write("sb1", doc)
    assert store.read("sb1") == {"old": True}
    assert temp_files(Path(store.dir("sb1"))) == []


def test_list_and_delete(store: StateStore) -> None:
    assert store.list() == []
    for sid in ("zeta", "alpha", "mid-1"):
        store.write(sid, {"id": sid})
    sbs = Path(store.sbs_root)
    (sbs / "no-state").mkdir()  # a directory without a state file (e.g. only a lock)
    (sbs / ".junk").mkdir()
    (sbs / "zeta" / ".persist.json.tmp.1.2.abcd").write_text("{")
    assert store.list() == ["alpha", "mid-1", "zeta"]
    store.delete("mid-1")
    assert store.list() == ["alpha", "zeta"]
    assert not (sbs / "mid-1").exists()
    store.delete("mid-1")  # idempotent
    store.delete("never-existed")
    with pytest.raises(StateError, match="'mid-1'"):
        store.read("mid-1")


def test_hypervisor_state_round_trip_keeps_other_keys(store: StateStore) -> None:
    store.write("sb1", {"sandbox": {"state": "running"}})
    state = full_state()
    store.save_hypervisor("sb1", state)
    assert store.load_hypervisor("sb1") == state
    doc = store.read("sb1")
    assert doc["sandbox"] == {"state": "running"}
    assert doc["hypervisor"]["qmp_socket"] == "/r/vm/sb1/qmp.sock"
    state.pid = 99
    store.save_hypervisor("sb1", state)
    assert store.load_hypervisor("sb1").pid == 99
    store.save_hypervisor("fresh", HypervisorState(type="mock"))  # no document yet
    assert store.read("fresh") == {"hypervisor": HypervisorState(type="mock").model_dump()}


def test_load_hypervisor_errors(store: StateStore) -> None:
    with pytest.raises(StateError, match="'none'"):
        store.load_hypervisor("none")
    store.write("nohv", {"sandbox": {}})
    with pytest.raises(StateError, match="no hypervisor state"):
        store.load_hypervisor("nohv")
    store.write("bad", {"hypervisor": {"pid": "not a pid"}})
    with pytest.raises(StateError, match="'bad'") as exc:
        store.load_hypervisor("bad")
    assert "pid" in str(exc.value)


# -- store: permissions and durability --------------------------------------------------------
@pytest.mark.parametrize("mask", [0o000, 0o022, 0o277])
def test_permissions_regardless_of_umask(tmp_path: Path, mask: int) -> None:
    root = tmp_path / "deep" / "run"
    s = StateStore(str(root))
    with umask(mask):
        s.write("sb1", {"a": 1})
        with s.lock("sb1"):
            pass
    for d in (tmp_path / "deep", root, root / "sbs", root / "sbs" / "sb1"):
        assert mode(d) == 0o700, d
    assert mode(s.path("sb1")) == 0o600
    assert mode(s.lock_path("sb1")) == 0o600


def test_durable_atomic_write_fsyncs_file_and_directory_state_writes_do_not(
    store: StateStore, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    synced: list[tuple[str, int]] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        st = os.fstat(fd)
        synced.append(("dir" if stat.S_ISDIR(st.st_mode) else "file", st.st_size))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    target = tmp_path / "doc.json"
    persist.atomic_write(str(target), b"x" * 100)
    assert [k for k, _ in synced] == ["file", "dir"]
    assert synced[0][1] == 100  # fsynced after the full write
    synced.clear()
    store.write("sb1", {"a": "x" * 100})  # running-VM state: atomic, not durable
    assert synced == [] and store.read("sb1") == {"a": "x" * 100}


def test_partial_os_write_is_completed(store: StateStore, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = os.write

    def short_write(fd: int, data: Any) -> int:
        return real_write(fd, bytes(data[:7]))

    monkeypatch.setattr(os, "write", short_write)
    doc = {"blob": "y" * 1000}
    store.write("sb1", doc)
    monkeypatch.undo()
    assert store.read("sb1") == doc


def test_stale_temp_files_are_removed_by_next_write(store: StateStore) -> None:
    store.write("sb1", {"v": 1})
    d = Path(store.dir("sb1"))
    dead = subprocess.Popen(["/bin/true"])
    dead_start = host.process_start_time(dead.pid) or 0
    dead.wait()
    own = f"{persist.TEMP_PREFIX}{os.getpid()}.{host.process_start_time(os.getpid())}.live"
    reused = f"{persist.TEMP_PREFIX}{os.getpid()}.1.reused"  # our pid, another start time
    stale = [
        f"{persist.TEMP_PREFIX}{dead.pid}.{dead_start}.dead",
        f"{persist.TEMP_PREFIX}junk",
        reused,
    ]
    for name in [*stale, own]:
        (d / name).write_text("{partial")
    store.write("sb1", {"v": 2})
    assert temp_files(d) == [own]  # a live writer's temp file is left alone
    assert store.read("sb1") == {"v": 2}
    (d / own).unlink()


WRITER = textwrap.dedent(
    """
    import hashlib, sys
    import secrets, virtcontainers.host  # what a write imports on first use: not in the window
    from virtcontainers.persist import StateStore
    root, sid, seq = sys.argv[1], sys.argv[2], int(sys.argv[3])
    store = StateStore(root)
    print("ready", flush=True)
    while True:
        seq += 1
        blob = ("%08d" % seq) * (1 << 17)
        store.write(sid, {"seq": seq, "blob": blob,
                          "sha": hashlib.sha256(blob.encode()).hexdigest()})
    """
)


def check_intact(store: StateStore, sid: str) -> int:
    doc = store.read(sid)  # raises on a torn or empty file
    blob = doc["blob"]
    assert hashlib.sha256(blob.encode()).hexdigest() == doc["sha"]
    assert blob == f"{doc['seq']:08d}" * (1 << 17)
    return int(doc["seq"])


def test_sigkilled_writer_never_tears_state(store: StateStore) -> None:
    sid = "crashy"
    blob = f"{0:08d}" * (1 << 17)
    store.write(sid, {"seq": 0, "blob": blob, "sha": hashlib.sha256(blob.encode()).hexdigest()})
    rng = random.Random(1234)
    seq = 0
    advanced = 0
    leftovers = 0
    for _ in range(16):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, store.run_root, sid, str(seq)],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "ready"
            time.sleep(rng.uniform(0.0, 0.06))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            if proc.stdout:
                proc.stdout.close()
        new_seq = check_intact(store, sid)
        assert new_seq >= seq  # never rolled back
        advanced += new_seq > seq
        seq = new_seq
        leftovers += len(temp_files(Path(store.dir(sid))))
    assert advanced > 0, "the writer never completed a write: the test proved nothing"
    # A clean write removes whatever temp files the killed writers left behind.
    store.write(sid, {"seq": seq + 1, "blob": "", "sha": hashlib.sha256(b"").hexdigest()})
    assert temp_files(Path(store.dir(sid))) == []
    print(f"{advanced} of 16 runs advanced; {leftovers} temp files seen after kills")


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str = "64k") -> Iterator[bool]:
    """Mount a tiny tmpfs at `path`; yields False when this process cannot mount."""
    path.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
        check=False,
        capture_output=True,
    )
    try:
        yield proc.returncode == 0
    finally:
        if proc.returncode == 0:
            subprocess.run(["umount", str(path)], check=True)


def test_enospc_keeps_old_state_and_removes_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with small_tmpfs(tmp_path / "small") as mounted:
        if not mounted:  # not root: simulate a full disk instead
            real_write = os.write

            def full_disk(fd: int, data: Any) -> int:
                if len(data) > 10_000:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                return real_write(fd, data)

            monkeypatch.setattr(os, "write", full_disk)
        s = StateStore(str(tmp_path / "small"))
        s.write("sb1", {"small": True})
        with pytest.raises(StateError) as exc:
            s.write("sb1", {"big": "z" * 200_000})
        assert s.path("sb1") in str(exc.value)
        assert os.strerror(errno.ENOSPC) in str(exc.value)
        assert s.read("sb1") == {"small": True}
        assert temp_files(Path(s.dir("sb1"))) == []
        s.write("sb1", {"small": 2})  # space was given back
        assert s.read("sb1") == {"small": 2}


# -- locks ------------------------------------------------------------------------------------
HOLDER = textwrap.dedent(
    """
    import sys
    from virtcontainers.persist import StateStore
    with StateStore(sys.argv[1]).lock(sys.argv[2]):
        print("locked", flush=True)
        sys.stdin.read()
    """
)


@contextlib.contextmanager
def held_elsewhere(store: StateStore, sid: str) -> Iterator[subprocess.Popen[str]]:
    """Another process holds the lock of `sid` until the block ends."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, store.run_root, sid],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        yield proc
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=10)
        if proc.stdout:
            proc.stdout.close()


def test_lock_timeout_names_id(store: StateStore) -> None:
    before = fd_count()
    with held_elsewhere(store, "busy"):
        with pytest.raises(StateError) as exc, store.lock("busy", timeout=0.2):
            pass
        assert "'busy'" in str(exc.value) and "timed out after 0.2 s" in str(exc.value)
        assert store.lock_path("busy") in str(exc.value)
    with store.lock("busy", timeout=5):  # free again once the holder exits
        pass
    assert fd_count() == before


COUNTER = textwrap.dedent(
    """
    import json, os, sys, time
    from virtcontainers.persist import StateStore
    store = StateStore(sys.argv[1])
    log = sys.argv[2]
    for _ in range(int(sys.argv[3])):
        with store.lock("shared"):
            with open(log, "a") as f:
                f.write(f"enter {os.getpid()}\\n")
            n = store.read("shared")["n"] if store.exists("shared") else 0
            time.sleep(0.01)
            store.write("shared", {"n": n + 1})
            with open(log, "a") as f:
                f.write(f"exit {os.getpid()}\\n")
    """
)


def test_lock_serialises_processes(store: StateStore, tmp_path: Path) -> None:
    log = tmp_path / "log"
    procs = [
        subprocess.Popen([sys.executable, "-c", COUNTER, store.run_root, str(log), "5"])
        for _ in range(3)
    ]
    for p in procs:
        assert p.wait(timeout=60) == 0
    assert store.read("shared") == {"n": 15}  # no lost update
    lines = log.read_text().split()
    events = list(zip(lines[0::2], lines[1::2], strict=True))
    assert len(events) == 30
    for (k1, p1), (k2, p2) in zip(events[0::2], events[1::2], strict=True):
        assert (k1, k2) == ("enter", "exit") and p1 == p2  # critical sections never overlap
    assert len({p for _, p in events}) == 3


def test_delete_under_lock_then_relock(store: StateStore) -> None:
    store.write("sb1", {"a": 1})
    with store.lock("sb1"):
        store.delete("sb1")
        assert not os.path.exists(store.dir("sb1"))
    with store.lock("sb1", timeout=1):
        assert os.path.exists(store.lock_path("sb1"))
    assert not store.exists("sb1")


def test_delete_while_a_waiter_recreates_the_lock_file(
    store: StateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A second `virtc stop` polling for the lock re-creates the lock file between rmtree's
    # unlink and its rmdir of the directory (seen as "Directory not empty" from one of two
    # concurrent stops).
    store.write("sb1", {"a": 1})
    directory = store.dir("sb1")
    real_rmdir = os.rmdir
    recreated = 0

    def rmdir(path: Any, *args: Any, **kwargs: Any) -> None:
        nonlocal recreated
        if os.fspath(path) == directory and recreated < 3:
            recreated += 1
            Path(store.lock_path("sb1")).touch()  # what the waiter's O_CREAT open does
        real_rmdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "rmdir", rmdir)
    with store.lock("sb1"):
        store.delete("sb1")
    assert recreated == 3
    assert not os.path.exists(directory)


def test_lock_refuses_bad_id(store: StateStore) -> None:
    with pytest.raises(ConfigError), store.lock("../etc"):
        pass


async def test_alock_waits_without_blocking_the_loop(store: StateStore) -> None:
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.create_task(ticker())
    try:
        with held_elsewhere(store, "sb1"):
            with pytest.raises(StateError, match=r"timed out after 0\.3 s"):
                async with store.alock("sb1", timeout=0.3):
                    pass
            assert ticks > 0  # the event loop kept running while we waited
        async with store.alock("sb1", timeout=5):
            with pytest.raises(StateError, match="timed out"), store.lock("sb1", timeout=0.05):
                pass  # held by alock: a second taker must wait
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_alock_cancelled_while_waiting_leaks_nothing(store: StateStore) -> None:
    before = fd_count()
    with held_elsewhere(store, "sb1"):
        waiter = asyncio.create_task(store.alock("sb1", timeout=30).__aenter__())
        await asyncio.sleep(0.1)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
    await asyncio.sleep(0.2)  # the worker thread notices the cancellation
    with store.lock("sb1", timeout=1):  # nobody kept it
        pass
    assert fd_count() == before


async def test_alock_refuses_bad_id(store: StateStore) -> None:
    with pytest.raises(ConfigError):
        async with store.alock("a/b"):
            pass


def test_unchanged_since_write_sees_other_writers(store: StateStore) -> None:
    assert not store.unchanged_since_write("sb1")  # never written by this store
    store.write("sb1", {"v": 1})
    assert store.unchanged_since_write("sb1")
    other = StateStore(store.run_root)  # another process's store
    other.write("sb1", {"v": 2})
    assert not store.unchanged_since_write("sb1") and other.unchanged_since_write("sb1")
    store.write("sb1", {"v": 3})
    assert store.unchanged_since_write("sb1") and not other.unchanged_since_write("sb1")
    store.delete("sb1")
    assert not store.unchanged_since_write("sb1")


def test_runstate_is_one_byte_in_place(store: StateStore) -> None:
    store.write("sb1", {"v": 1})
    assert store.runstate("sb1") is None  # never recorded
    store.set_runstate("sb1", "paused")
    path = Path(store.dir("sb1")) / persist.RUNSTATE_FILE
    inode = path.stat().st_ino
    assert store.runstate("sb1") == "paused" and path.read_bytes() == b"P"
    store.set_runstate("sb1", "running")
    assert store.runstate("sb1") == "running"
    assert path.stat().st_ino == inode and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert store.unchanged_since_write("sb1")  # the document itself was not rewritten
    with pytest.raises(StateError, match="running or paused, not 'stopped'"):
        store.set_runstate("sb1", "stopped")
    path.write_bytes(b"?")
    assert store.runstate("sb1") is None  # garbage is "not recorded", never a wrong state
