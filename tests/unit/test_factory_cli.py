"""`virtc template ...` and `virtc factory ...` commands that need no VM."""

from __future__ import annotations

import json
import os

import pytest

from cli_support import invoke
from virtcontainers.factory import TemplateStore

Capsys = pytest.CaptureFixture[str]


def test_template_list_empty_and_broken(capsys: Capsys, run_root: str) -> None:
    res = invoke(capsys, "template", "list")
    assert res.code == 0 and "templates" in res.out
    os.makedirs(TemplateStore(run_root=run_root).template_dir("half"))
    res = invoke(capsys, "template", "list")
    assert res.code == 0
    assert "half" in res.out and "broken" in res.out


def test_template_rm_unknown_is_an_error(capsys: Capsys, run_root: str) -> None:
    res = invoke(capsys, "template", "rm", "ghost")
    assert res.code == 125
    assert res.err.startswith("virtc: error: no such template: ghost")


def test_template_rm_removes(capsys: Capsys, run_root: str) -> None:
    store = TemplateStore(run_root=run_root)
    os.makedirs(store.template_dir("half"))
    res = invoke(capsys, "template", "rm", "half")
    assert res.code == 0 and "removed template half" in res.out
    assert store.list() == []


def test_factory_status_without_a_server(capsys: Capsys, run_root: str) -> None:
    res = invoke(capsys, "factory", "status")
    assert res.code == 125
    assert "virtc factory init" in res.err


def test_factory_init_refuses_config_options_with_a_template(capsys: Capsys, run_root: str) -> None:
    res = invoke(capsys, "factory", "init", "--template", "t1", "--cpus", "2")
    assert res.code == 2
    assert "the VM config is the template's" in res.err


def test_factory_init_with_a_missing_template_fails_with_the_reason(
    capsys: Capsys, run_root: str
) -> None:
    res = invoke(capsys, "--debug", "factory", "init", "--template", "ghost", "--size", "1")
    assert res.code == 125
    assert "exited with code" in res.err
    assert "no such template: ghost" in res.err
    assert not os.path.exists(os.path.join(run_root, "factory", "cache.pid"))


def test_factory_destroy_without_a_server(capsys: Capsys, run_root: str) -> None:
    res = invoke(capsys, "factory", "destroy")
    assert res.code == 0 and "stopped" in res.out


def test_template_create_refuses_other_hypervisors(capsys: Capsys, run_root: str) -> None:
    res = invoke(capsys, "-H", "firecracker", "template", "create", "t1")
    assert res.code == 2
    assert "QEMU only" in res.err


def test_template_list_json(capsys: Capsys, run_root: str) -> None:
    os.makedirs(TemplateStore(run_root=run_root).template_dir("half"))
    res = invoke(capsys, "--json", "template", "list")
    assert res.code == 0
    [entry] = json.loads(res.out)
    assert entry["name"] == "half" and entry["ok"] is False and "incomplete" in entry["problem"]


@pytest.mark.parametrize("flag", ["--kernel", "--initrd"])
def test_template_create_refuses_a_missing_asset(capsys: Capsys, run_root: str, flag: str) -> None:
    res = invoke(capsys, "template", "create", "t1", flag, "/no/such/file")
    assert res.code == 2
    assert f"{flag}: no such file /no/such/file" in res.err
    assert TemplateStore(run_root=run_root).list() == []


def test_run_from_a_template_copies_its_memory_first(capsys: Capsys, run_root: str) -> None:
    """`virtc run --from-template` starts copying the template's memory before anything
    else (factory.memcopy), for the clone to take; what is wrong is still the clone's to
    report."""
    from virtcontainers.factory import memcopy

    tdir = TemplateStore(run_root=run_root).template_dir("t1")
    os.makedirs(tdir)
    mem = os.path.join(tdir, "memory")
    with open(mem, "wb") as f:
        f.truncate(4 << 20)
        f.write(b"guest")
    meta = {"name": "t1", "directory": tdir, "memory_mib": 4, "config": {"shared_fs": "virtio-fs"}}
    with open(os.path.join(tdir, "template.json"), "w") as f:
        json.dump(meta, f)  # not a whole template: the clone refuses it
    res = invoke(capsys, "run", "--from-template", "t1", "--image", "busybox", "--", "true")
    assert res.code == 125 and "template t1: metadata file" in res.err
    ahead = memcopy.take(mem)
    assert ahead is not None, "the command did not copy the template's memory ahead"
    fd, copy = ahead
    try:
        copy.result(timeout=30)
        assert os.pread(fd, 5, 0) == b"guest" and os.fstat(fd).st_size == 4 << 20
    finally:
        os.close(fd)
