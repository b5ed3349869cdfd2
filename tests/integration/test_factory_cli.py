"""`virtc template` and `virtc factory` end to end, in a subprocess, on real QEMU (TCG)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Any

import pytest

from virtcontainers import host
from virtcontainers.factory import tmpfs as tmpfs_mod

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("leak_check")]

VIRTC = ["-m", "virtcontainers.cli"]


async def virtc(run_root: str, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *VIRTC,
        "--run-root",
        run_root,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "COLUMNS": "200"},
    )
    out, err = await asyncio.wait_for(proc.communicate(), 180)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_template_and_factory_commands(run_root: str, guest_assets: Any) -> None:
    assets = ["--kernel", guest_assets.kernel, "--initrd", guest_assets.initrd]
    code, out, err = await virtc(run_root, "template", "create", "t1", "--memory", "256", *assets)
    assert code == 0, err
    assert "template t1: 1 vCPU, 256 MiB" in out and "tmpfs" in out
    try:
        code, out, err = await virtc(run_root, "template", "create", "t1", *assets)
        assert code == 125 and "template t1 already exists" in err

        code, out, _ = await virtc(run_root, "--json", "template", "list")
        [entry] = json.loads(out)
        assert entry["name"] == "t1" and entry["ok"] and entry["info"]["memory_mib"] == 256

        code, out, err = await virtc(
            run_root, "--json", "factory", "init", "--template", "t1", "--size", "2", "--wait"
        )
        assert code == 0, err
        started = json.loads(out)
        assert host.pid_is(started["pid"], host.process_start_time(started["pid"]))

        code, out, err = await virtc(run_root, "factory", "init", "--template", "t1")
        assert code == 125 and "already running" in err

        code, out, err = await virtc(run_root, "--json", "factory", "status")
        assert code == 0, err
        status = json.loads(out)
        assert status["ready"] == 2 and status["base"] == "template:t1"
        assert {v["state"] for v in status["vms"]} == {"paused"}

        code, out, err = await virtc(run_root, "factory", "destroy")
        assert code == 0 and "stopped" in out, err
        assert not os.path.exists(started["socket"])

        code, out, err = await virtc(run_root, "factory", "status")
        assert code == 125 and "no VM cache server runs" in err
    finally:
        await virtc(run_root, "factory", "destroy")
        code, out, err = await virtc(run_root, "template", "rm", "t1")
    assert code == 0 and "removed template t1" in out, err
    assert tmpfs_mod.mounts_under(run_root) == []


async def test_factory_init_with_a_broken_template_reports_why(
    run_root: str, guest_assets: Any
) -> None:
    os.makedirs(os.path.join(run_root, "templates", "half"))
    code, _, err = await virtc(run_root, "factory", "init", "--template", "half", "--size", "1")
    assert code == 125
    assert "exited with code" in err
    code, _, err = await virtc(run_root, "--debug", "factory", "init", "--template", "half")
    assert "is incomplete" in err


async def test_sandbox_from_a_template_and_from_a_missing_cache(
    run_root: str, guest_assets: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """What `virtc run --from-template NAME` and `virtc run --factory` call."""
    from virtcontainers.factory import TemplateStore, sandbox_from_factory
    from virtcontainers.sandbox import Sandbox, build_config
    from virtcontainers.types import HypervisorType

    cfg = build_config(None, {"memory_size": 256}, HypervisorType.QEMU)
    store = TemplateStore(run_root=run_root)
    await store.create("t1", cfg)
    try:
        sb = await sandbox_from_factory(cfg, template="t1", run_root=run_root, id="from-tpl")
        try:
            assert sb.id == "from-tpl"
            assert (await sb.exec("echo hi")).stdout == b"hi\n"
            assert [i.id for i in Sandbox.list(run_root)] == ["from-tpl"]
            await sb.detach()
            again = await Sandbox.attach("from-tpl", run_root=run_root)
            assert (await again.exec(["cat", "/proc/sys/kernel/random/boot_id"])).ok
            await again.stop()
        finally:
            await sb.stop()
        assert Sandbox.list(run_root) == []
    finally:
        store.remove("t1")
    sb = await sandbox_from_factory(cfg, use_cache=True, run_root=run_root)
    try:
        assert "no VM cache server" in caplog.text and "booting a VM directly" in caplog.text
        assert (await sb.exec("echo cold")).stdout == b"cold\n"
    finally:
        await sb.stop()
