"""Real QEMU (TCG) template faults: damaged files, another QEMU or config, a full filesystem.

Each fault gets a forged copy of the module's template (memory hard-linked inside the
template's tmpfs, state copied, then damaged), so the real template stays intact.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from test_template_clone import NAME, Made, base_config, made_template, store_for

from virtcontainers.factory import (
    Factory,
    TemplateError,
    TemplateMismatchError,
    TemplateStore,
)
from virtcontainers.factory import template as tmod
from virtcontainers.factory import tmpfs as tmpfs_mod
from virtcontainers.factory.template import sha256_file
from virtcontainers.types import Param

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("leak_check")]


@pytest.fixture(scope="module")
def template(guest_assets: Any) -> Iterator[Made]:
    yield from made_template(guest_assets)


@pytest.fixture
def forged(template: Made, run_root: str) -> Iterator[Callable[..., TemplateStore]]:
    """Make forged copies of the template in a store of their own; removed afterwards."""
    root = tempfile.mkdtemp(prefix="vcforged-", dir="/tmp")
    store = TemplateStore(root, run_root=run_root)

    def forge(name: str, damage: Callable[[str], None] | None = None, **meta: Any) -> TemplateStore:
        files = os.path.join(template.info.directory, f"copy-{name}")
        os.mkdir(files)
        os.link(template.info.memory_path, os.path.join(files, "memory"))
        state = os.path.join(files, "state")
        shutil.copyfile(template.info.state_path, state)
        if damage is not None:
            damage(state)
        info = template.info.model_copy(
            update={
                "name": name,
                "directory": files,
                "tmpfs": False,
                "state_sha256": sha256_file(state),
                **meta,
            }
        )
        os.makedirs(store.template_dir(name))
        with open(os.path.join(store.template_dir(name), "location"), "w") as f:
            f.write(files)
        with open(store.metadata_path(name), "w") as f:
            f.write(info.model_dump_json())
        return store

    try:
        yield forge
    finally:
        for entry in store.list():
            store.remove(entry.name)
        shutil.rmtree(root)
        left = [n for n in os.listdir(template.info.directory) if n.startswith("copy-")]
        assert left == []


def scramble(path: str) -> None:
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(size // 3)
        f.write(os.urandom(4096))


def truncate_half(path: str) -> None:
    os.truncate(path, os.path.getsize(path) // 2)


@pytest.mark.parametrize("damage", [scramble, truncate_half])
async def test_damaged_device_state_fails_the_clone_cleanly(
    forged: Callable[..., TemplateStore], damage: Callable[[str], None]
) -> None:
    store = forged("damaged", damage)
    with pytest.raises(TemplateError, match=r"cloning template damaged failed") as err:
        await store.clone("damaged", timeout=30)
    assert "QEMU" in str(err.value) or "migration" in str(err.value)


async def test_damaged_files_are_refused_before_anything_runs(
    forged: Callable[..., TemplateStore], run_root: str
) -> None:
    store = forged("nostate")
    os.unlink(os.path.join(store.get("nostate").directory, "state"))
    with pytest.raises(TemplateError, match=r"device state file .* No such file"):
        await store.clone("nostate")
    store = forged("shortmem")
    memory = os.path.join(store.get("shortmem").directory, "memory")
    os.unlink(memory)  # a new, short file (not the template's, which is hard-linked)
    with open(memory, "wb") as f:
        f.truncate(1 << 20)
    with pytest.raises(TemplateError, match="has 1048576 bytes"):
        await store.clone("shortmem")
    store = forged("badmeta")
    with open(store.metadata_path("badmeta"), "w") as f:
        f.write('{"format": 1, "name": "badmeta"')
    with pytest.raises(TemplateError, match=r"metadata file .* is corrupt"):
        await store.clone("badmeta")
    vm_root = os.path.join(run_root, "vm")
    assert not os.path.isdir(vm_root) or os.listdir(vm_root) == []


async def test_template_of_another_qemu_is_refused(
    forged: Callable[..., TemplateStore], template: Made
) -> None:
    other_qemu = template.info.qemu.model_copy(update={"ino": template.info.qemu.ino + 1})
    store = forged("oldqemu", qemu=other_qemu, qemu_version="QEMU emulator version 6.2.0")
    with pytest.raises(TemplateMismatchError, match=r"made by QEMU emulator version 6\.2\.0"):
        await store.clone("oldqemu")
    with pytest.raises(TemplateMismatchError, match="recreate the template"):
        Factory.from_template("oldqemu", store=store)


async def test_clone_with_another_config_is_refused(template: Made, run_root: str) -> None:
    other = template.config.copy()
    other.debug = True
    with pytest.raises(TemplateMismatchError, match="debug"):
        await store_for(template, run_root).clone(NAME, other)


async def test_factory_boots_directly_for_another_config(
    template: Made, run_root: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    factory = Factory.from_template(NAME, store=store_for(template, run_root))
    other = template.config.copy()
    other.kernel_params.append(Param("vc.hostname", "direct"))
    vm = await factory.get_vm(other)
    try:
        assert vm.origin == "direct (fallback)"
        assert "booting a VM directly" in caplog.text and "kernel_params" in caplog.text
        res = await (await vm.agent()).exec(["cat", "/proc/cmdline"])
        assert b"vc.hostname=direct" in res.stdout
    finally:
        await vm.stop()


@pytest.fixture
def small_tmpfs() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="vcsmall-", dir="/tmp")
    tmpfs_mod.mount_tmpfs(path, 48 << 20)
    try:
        yield path
    finally:
        tmpfs_mod.unmount(path)
        os.rmdir(path)


async def test_template_on_a_small_filesystem(
    guest_assets: Any,
    run_root: str,
    small_tmpfs: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = TemplateStore(os.path.join(run_root, "templates"), run_root=run_root)
    cfg = base_config(guest_assets)
    with pytest.raises(TemplateError, match=r"has 4\d MiB free.*needs 288 MiB"):
        await store.create("small", cfg, directory=small_tmpfs)
    # Past the check (say the space went away after it), the guest's memory does not fit:
    # QEMU dies of SIGBUS, and the error says why.
    monkeypatch.setattr(tmod, "check_room", lambda *a: None)
    with pytest.raises(TemplateError, match=r"is full: 0 MiB free.*signal 7"):
        await asyncio.wait_for(store.create("small", cfg, directory=small_tmpfs), 60)
    assert os.listdir(small_tmpfs) == []
    assert store.list() == []
