"""Template store without booting: metadata, integrity and identity checks, listing, removal.

Templates here are forged (files and metadata written by the test) so every fault can be
made exactly; the real create/clone path is covered by the integration tests.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import time
from typing import Any

import pytest

from virtcontainers.config import HypervisorConfig
from virtcontainers.errors import ConfigError
from virtcontainers.factory import TemplateError, TemplateMismatchError, TemplateStore, memcopy
from virtcontainers.factory import template as tmod
from virtcontainers.factory.template import FileStamp, TemplateInfo, sha256_file
from virtcontainers.types import Param


@pytest.fixture
def assets(tmp_path: Any) -> dict[str, str]:
    kernel = tmp_path / "vmlinuz"
    initrd = tmp_path / "initrd.img"
    kernel.write_bytes(b"kernel" * 1000)
    initrd.write_bytes(b"initrd" * 1000)
    return {"kernel": str(kernel), "initrd": str(initrd)}


def config(assets: dict[str, str], **kw: Any) -> HypervisorConfig:
    fields: dict[str, Any] = {
        "kernel_path": assets["kernel"],
        "initrd_path": assets["initrd"],
        "num_vcpus": 1,
        "memory_size": 256,
    }
    cfg = HypervisorConfig(**{**fields, **kw})
    cfg.validate()
    return cfg


def forge(store: TemplateStore, name: str, cfg: HypervisorConfig, files: str) -> TemplateInfo:
    """Write a complete-looking template: files in `files`, metadata in the store."""
    os.makedirs(files, exist_ok=True)
    with open(os.path.join(files, "memory"), "wb") as f:
        f.truncate(cfg.memory_size << 20)
    with open(os.path.join(files, "state"), "wb") as f:
        f.write(b"QEVM" + os.urandom(4096))
    qemu = tmod.resolve_qemu(cfg)
    info = TemplateInfo(
        format=tmod.FORMAT,
        name=name,
        created_at=time.time(),
        hypervisor="qemu",
        qemu=FileStamp.of(qemu, digest=False),
        qemu_version=tmod.qemu_version(qemu),
        config=tmod._base_dict(cfg),
        config_hash="x",
        kernel=FileStamp.of(cfg.kernel_path),
        initrd=FileStamp.of(cfg.initrd_path),
        num_vcpus=cfg.num_vcpus,
        memory_mib=cfg.memory_size,
        directory=files,
        tmpfs=False,
        state_sha256=sha256_file(os.path.join(files, "state")),
        boot_seconds=1.0,
    )
    os.makedirs(store.template_dir(name), exist_ok=True)
    with open(store.metadata_path(name), "w") as f:
        f.write(info.model_dump_json())
    return info


@pytest.fixture
def store(tmp_path: Any, run_root: str) -> TemplateStore:
    return TemplateStore(str(tmp_path / "templates"), run_root=run_root)


def test_a_sound_template_verifies(
    store: TemplateStore, assets: dict[str, str], tmp_path: Any
) -> None:
    cfg = config(assets)
    forge(store, "t1", cfg, str(tmp_path / "files"))
    info = store.get("t1")
    store.verify(info)
    store.verify(info, config(assets, num_vcpus=2, memory_size=4096))  # size may differ
    clone = info.clone_config()
    assert clone.boot_from_template and not clone.boot_to_be_template
    assert clone.memory_path == str(tmp_path / "files" / "memory")
    assert clone.devices_state_path == str(tmp_path / "files" / "state")
    assert [e.name for e in store.list()] == ["t1"] and store.list()[0].info is not None


def test_missing_template_and_bad_names(store: TemplateStore) -> None:
    with pytest.raises(TemplateError, match="no such template: nope"):
        store.get("nope")
    with pytest.raises(ConfigError, match="invalid template name"):
        store.get("../etc")
    with pytest.raises(TemplateError, match="no such template"):
        store.remove("nope")
    assert store.list() == []


def test_incomplete_template_is_reported_and_removable(store: TemplateStore) -> None:
    os.makedirs(store.template_dir("half"))
    with pytest.raises(TemplateError, match="incomplete"):
        store.get("half")
    [entry] = store.list()
    assert entry.info is None and "incomplete" in entry.problem
    store.remove("half")
    assert not os.path.exists(store.template_dir("half"))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda doc: "{not json", "metadata file .* is corrupt"),
        (lambda doc: json.dumps({**doc, "format": 99}), "format 99"),
        (lambda doc: json.dumps({**doc, "name": "other"}), "names another template"),
        (lambda doc: json.dumps({k: v for k, v in doc.items() if k != "qemu"}), "corrupt"),
        (lambda doc: json.dumps({**doc, "surprise": 1}), "corrupt"),
    ],
)
def test_corrupt_metadata_is_a_clear_error(
    store: TemplateStore, assets: dict[str, str], tmp_path: Any, damage: Any, message: str
) -> None:
    forge(store, "t1", config(assets), str(tmp_path / "files"))
    path = store.metadata_path("t1")
    with open(path) as f:
        doc = json.load(f)
    with open(path, "w") as f:
        f.write(damage(doc))
    with pytest.raises(TemplateError, match=message):
        store.get("t1")
    assert store.list()[0].info is None


def test_memory_file_missing_or_truncated(
    store: TemplateStore, assets: dict[str, str], tmp_path: Any
) -> None:
    info = forge(store, "t1", config(assets), str(tmp_path / "files"))
    os.truncate(info.memory_path, 4096)
    with pytest.raises(TemplateError, match="has 4096 bytes, expected"):
        store.verify(info)
    os.unlink(info.memory_path)
    with pytest.raises(TemplateError, match=r"memory file .*No such file"):
        store.verify(info)


def test_state_file_missing_or_altered(
    store: TemplateStore, assets: dict[str, str], tmp_path: Any
) -> None:
    info = forge(store, "t1", config(assets), str(tmp_path / "files"))
    with open(info.state_path, "r+b") as f:
        f.seek(100)
        f.write(b"\xff")
    with pytest.raises(TemplateError, match="does not match its checksum"):
        store.verify(info)
    os.unlink(info.state_path)
    with pytest.raises(TemplateError, match=r"device state file .*No such file"):
        store.verify(info)


def test_other_config_is_a_mismatch_naming_the_fields(
    store: TemplateStore, assets: dict[str, str], tmp_path: Any
) -> None:
    info = forge(store, "t1", config(assets), str(tmp_path / "files"))
    other = config(assets, kernel_params=[Param("debug")], hypervisor_machine_type="pc")
    with pytest.raises(TemplateMismatchError, match="hypervisor_machine_type, kernel_params"):
        store.verify(info, other)


def test_another_qemu_is_refused(
    store: TemplateStore, assets: dict[str, str], tmp_path: Any
) -> None:
    fake = tmp_path / "qemu-system-x86_64"
    fake.write_text("#!/bin/sh\necho 'QEMU emulator version 99.0.0'\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    info = forge(store, "t1", config(assets), str(tmp_path / "files"))
    # Same binary, touched (new mtime) but the same version: accepted.
    real = info.qemu.path
    info2 = info.model_copy(update={"qemu": info.qemu.model_copy(update={"mtime_ns": 1})})
    store.verify(info2)
    # Made by one QEMU, cloned with another.
    made_by_fake = info.model_copy(
        update={
            "qemu": FileStamp.of(str(fake), digest=False),
            "qemu_version": "QEMU emulator version 99.0.0",
            "config": {**info.config, "hypervisor_path": str(fake)},
        }
    )
    fake.write_text("#!/bin/sh\necho 'QEMU emulator version 99.1.0'\n")
    with pytest.raises(
        TemplateMismatchError, match=r"made by QEMU emulator version 99.0.0.*99.1.0"
    ):
        store.verify(made_by_fake)
    # The QEMU the clone would run is not the template's binary at all.
    wrong_path = info.model_copy(
        update={"qemu": info.qemu.model_copy(update={"path": "/opt/qemu", "ino": 1})}
    )
    with pytest.raises(TemplateMismatchError, match=f"would run .*{real}"):
        store.verify(wrong_path)


def test_changed_or_missing_kernel_is_refused(
    store: TemplateStore, assets: dict[str, str], tmp_path: Any
) -> None:
    info = forge(store, "t1", config(assets), str(tmp_path / "files"))
    # Rewritten with the same bytes: still the same kernel.
    with open(assets["kernel"], "rb") as f:
        data = f.read()
    os.unlink(assets["kernel"])
    with open(assets["kernel"], "wb") as f:
        f.write(data)
    store.verify(info)
    with open(assets["kernel"], "ab") as f:
        f.write(b"patched")
    with pytest.raises(TemplateMismatchError, match=r"kernel .* changed"):
        store.verify(info)
    os.unlink(assets["initrd"])
    with open(assets["kernel"], "wb") as f:
        f.write(data)
    with pytest.raises(TemplateMismatchError, match=r"initrd .* is gone"):
        store.verify(info)


def test_remove_deletes_files_in_a_user_directory(
    store: TemplateStore, assets: dict[str, str], tmp_path: Any
) -> None:
    files = str(tmp_path / "shm" / "t1")
    forge(store, "t1", config(assets), files)
    store.remove("t1")
    assert not os.path.exists(files)
    assert not os.path.exists(store.template_dir("t1"))
    assert os.listdir(store.root) == []


async def test_clone_of_missing_or_mismatched_template_boots_nothing(
    store: TemplateStore, assets: dict[str, str], tmp_path: Any, run_root: str
) -> None:
    with pytest.raises(TemplateError, match="no such template"):
        await store.clone("ghost")
    forge(store, "t1", config(assets), str(tmp_path / "files"))
    with pytest.raises(TemplateMismatchError):
        await store.clone("t1", config(assets, debug=True))
    assert not os.path.exists(os.path.join(run_root, "vm")) or not os.listdir(
        os.path.join(run_root, "vm")
    )


async def test_create_refuses_unusable_configs_before_booting(
    store: TemplateStore, assets: dict[str, str]
) -> None:
    with pytest.raises(ConfigError, match="huge_pages"):
        await store.create("t1", config(assets, huge_pages=True))
    with pytest.raises(ConfigError, match="set by the template store"):
        await store.create("t1", config(assets, boot_to_be_template=True, memory_path="/x"))
    with pytest.raises(ConfigError, match="use_vsock"):
        await store.create("t1", config(assets, use_vsock=True))
    with pytest.raises(TemplateError, match="does not exist"):
        await store.create("t1", config(assets), directory="/nonexistent/dir")
    assert store.list() == []


async def test_create_refuses_an_existing_template(
    store: TemplateStore, assets: dict[str, str], tmp_path: Any
) -> None:
    forge(store, "t1", config(assets), str(tmp_path / "files"))
    with pytest.raises(TemplateError, match="already exists"):
        await store.create("t1", config(assets))
    assert store.get("t1").name == "t1"


async def test_create_in_a_directory_without_room_is_refused(
    store: TemplateStore, assets: dict[str, str], tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tmod.tmpfs, "free_bytes", lambda path: 100 << 20)
    with pytest.raises(TemplateError, match=r"has 100 MiB free.*needs 288 MiB"):
        await store.create("t1", config(assets), directory=str(tmp_path))
    assert store.list() == []
    assert sorted(os.listdir(tmp_path)) == ["initrd.img", "templates", "vmlinuz"]


async def test_a_busy_template_is_reported(
    store: TemplateStore, assets: dict[str, str], tmp_path: Any
) -> None:
    forge(store, "t1", config(assets), str(tmp_path / "files"))
    with store._lock("t1", timeout=1), pytest.raises(TemplateError, match="is busy"):
        async with store._shared_lock("t1", timeout=0.05):
            pass
    with store._lock("t1", timeout=1), pytest.raises(TemplateError, match="is busy"):
        await store.create("t1", config(assets))


def test_non_root_needs_a_directory(
    store: TemplateStore, assets: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tmod.os, "geteuid", lambda: 1000)
    with pytest.raises(TemplateError, match="needs root; name a directory"):
        store._prepare_files("t1", 256, None)
    shutil.rmtree(store.root, ignore_errors=True)


def _memory_file(path: Any, size: int = 64 << 20) -> None:
    """A sparse template memory file: three pages of data, the rest holes."""
    with open(path, "wb") as f:
        f.truncate(size)
        for off in (0, 5 << 20, size - 4096):
            f.seek(off)
            f.write(off.to_bytes(8, "little") + b"x" * 4088)


def test_private_memory_copies_the_data_and_keeps_the_holes(tmp_path: Any) -> None:
    """A virtio-fs clone's memory: the template's data at the same offsets, holes as holes,
    in a memfd of its own (writing to it leaves the template file as it was)."""
    mem = tmp_path / "memory"
    size = 64 << 20
    _memory_file(mem, size)
    fd = memcopy.private_memory("t1", size, "vm1")
    try:
        memcopy.fill_private_memory("t1", str(mem), fd)
        assert os.fstat(fd).st_size == size
        with open(mem, "rb") as f:
            assert os.pread(fd, size, 0) == f.read()
        allocated = os.fstat(fd).st_blocks * 512
        assert allocated < 1 << 20, "holes were copied as data"
        os.pwrite(fd, b"clone", 0)
        assert mem.read_bytes()[:5] == bytes(5)
    finally:
        os.close(fd)
    os.unlink(mem)
    fd = memcopy.private_memory("t1", size, "vm2")
    try:
        with pytest.raises(TemplateError, match="cannot copy its memory"):
            memcopy.fill_private_memory("t1", str(mem), fd)
    finally:
        os.close(fd)


def _template_dir(tmp_path: Any, shared_fs: str = "virtio-fs") -> tuple[str, str]:
    tdir = tmp_path / "t1"
    tdir.mkdir()
    _memory_file(tdir / "memory")
    meta = {"name": "t1", "directory": str(tdir), "memory_mib": 64}
    meta["config"] = {"shared_fs": shared_fs}  # type: ignore[assignment]
    (tdir / "template.json").write_text(json.dumps(meta))
    return str(tdir), str(tdir / "memory")


def test_memory_copied_ahead_is_taken_by_the_clone_once(tmp_path: Any) -> None:
    """`virtc run --from-template` copies the memory while it imports: the clone takes that
    copy (the template's data), and only once."""
    tdir, mem = _template_dir(tmp_path)
    memcopy.copy_ahead(tdir)
    ahead = memcopy.take(mem)
    assert ahead is not None
    fd, copy = ahead
    try:
        copy.result(timeout=30)
        with open(mem, "rb") as f:
            assert os.pread(fd, 64 << 20, 0) == f.read()
    finally:
        os.close(fd)
    assert memcopy.take(mem) is None


def test_memory_copied_ahead_of_a_changed_template_is_dropped(tmp_path: Any) -> None:
    """A template removed and made again between the copy and the clone: the copy of the old
    one is not used (its memfd is closed once the copy ends); the clone copies anew."""
    tdir, mem = _template_dir(tmp_path)
    before = set(os.listdir("/proc/self/fd"))
    memcopy.copy_ahead(tdir)
    os.unlink(mem)
    _memory_file(mem)
    assert memcopy.take(mem) is None
    deadline = time.monotonic() + 30
    while set(os.listdir("/proc/self/fd")) - before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not set(os.listdir("/proc/self/fd")) - before, "the stale copy's memfd was kept"


def test_no_memory_copied_ahead_for_a_template_without_virtio_fs(tmp_path: Any) -> None:
    """A copy-on-write template (no virtio-fs) and unreadable metadata: nothing is copied."""
    tdir, mem = _template_dir(tmp_path, shared_fs="")
    memcopy.copy_ahead(tdir)
    assert memcopy.take(mem) is None
    (tmp_path / "t1" / "template.json").write_text("{not json")
    memcopy.copy_ahead(tdir)
    memcopy.copy_ahead(str(tmp_path / "missing"))
    assert memcopy.take(mem) is None
