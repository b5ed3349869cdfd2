"""containerd-shim-virtc-v2 with the VM factory of its configuration.toml (Kata's `[factory]`
section) under a real containerd: each task's VM is cloned from a template made for
virtio-fs, the bundle's root hot-added (and a network namespace's endpoint, for a task that
joins one); a missing template falls back to a boot; afterwards nothing is left."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from containerd_support import Containerd, import_busybox, running_containerd
from test_network import IN4, OUT4, mac_of
from test_shim_containerd import SHIM_CONFIG, kill_shim_then_delete, settled, wait_status
from test_shim_cri import fetch

from leaks import processes_mentioning
from net_support import Namespace, namespaces, veth
from virtcontainers.config import load_toml
from virtcontainers.factory import TemplateStore
from virtcontainers.sandbox import build_config
from virtcontainers.types import HypervisorType

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def containerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Containerd, str, str]]:
    """containerd whose shims clone template `shim` (made here with the shim's own config)."""
    run_root = str(tmp_path_factory.mktemp("shimfrr"))
    templates = os.path.join(run_root, "templates")
    config = os.path.join(run_root, "configuration.toml")
    Path(config).write_text(
        f'{SHIM_CONFIG}\n[factory]\nenable_template = true\ntemplate_path = "{templates}/shim"\n'
    )
    cfg = build_config(load_toml(config).config, {"shared_fs": "virtio-fs"}, HypervisorType.QEMU)
    store = TemplateStore(templates, run_root=run_root)
    asyncio.run(store.create("shim", cfg))
    env = {"VC_RUN_ROOT": run_root, "VC_SHIM_CONFIG": config}
    try:
        with running_containerd(env=env) as c:
            yield c, import_busybox(c), run_root
    finally:
        store.remove("shim")
    assert not processes_mentioning(run_root)


def qemu_cmdlines(run_root: str) -> list[str]:
    return [
        Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        for pid, cmd in processes_mentioning(run_root)
        if "qemu-system" in cmd
    ]


def kill_and_remove(c: Containerd, cid: str) -> None:
    """SIGKILL the task, then delete it and its container."""
    c.ctr("task", "kill", "-s", "SIGKILL", cid)
    wait_status(c, cid, "STOPPED")
    c.ctr("task", "delete", cid)
    c.ctr("container", "delete", cid)


def test_ctr_run_on_a_clone_of_the_template(containerd: tuple[Containerd, str, str]) -> None:
    c, image, run_root = containerd
    cid = f"tpl-{uuid.uuid4().hex[:6]}"
    script = "ls /; echo from-clone > /tmp/x && cat /tmp/x; exit 6"
    cp = c.run(image, cid, "sh", "-c", script, check=False)
    assert cp.returncode == 6, (cp.stderr, c.log_tail())
    lines = cp.stdout.decode().splitlines()
    assert set(lines[:-1]) - {"run"} == {"bin", "dev", "etc", "proc", "sys", "tmp"}
    assert lines[-1] == "from-clone"
    assert "VM factory" not in c.log_tail(400)  # no fallback to a boot
    assert settled(c, cid) == []

    # A running task's VM is a clone: QEMU restored the template's state.
    cid = f"tpd-{uuid.uuid4().hex[:6]}"
    c.run(image, cid, "sleep", "600", detach=True)
    try:
        [cmd] = qemu_cmdlines(run_root)
        assert "-incoming defer" in cmd and "/templates/shim/" not in cmd.split("mem-path=")[1]
    finally:
        kill_and_remove(c, cid)
    assert settled(c, cid) == []


def test_a_missing_template_falls_back_to_a_boot(
    containerd: tuple[Containerd, str, str], tmp_path: Path
) -> None:
    c, image, _ = containerd
    config = tmp_path / "configuration.toml"
    config.write_text(
        f'{SHIM_CONFIG}\n[factory]\nenable_template = true\ntemplate_path = "{tmp_path}/none"\n'
    )
    cid = f"nt-{uuid.uuid4().hex[:6]}"
    options = ["--runtime-config-path", str(config)]
    cp = c.run(image, cid, "echo", "booted", options=options, check=False)
    assert (cp.returncode, cp.stdout) == (0, b"booted\n"), (cp.stderr, c.log_tail())
    assert "no such template: none" in c.log_tail(400)
    assert "booting the VM instead" in c.log_tail(400)
    assert settled(c, cid) == []


async def serve_in(c: Containerd, image: str, pod: Namespace, cid: str) -> str:
    """Run task `cid` detached in network namespace `pod`, serving "hi-<cid>" on port 80;
    what containerd logged meanwhile (the shim's lines included)."""
    serve = f"mkdir -p /w && echo hi-{cid} > /w/index.html && exec busybox httpd -f -p 80 -h /w"
    with_ns = ["--with-ns", f"network:{pod.path}"]
    logged = os.path.getsize(c.log_path)
    await asyncio.to_thread(c.run, image, cid, "sh", "-c", serve, detach=True, options=with_ns)
    with open(c.log_path, "rb") as f:
        f.seek(logged)
        return f.read().decode(errors="replace")


async def test_a_task_in_a_network_namespace_takes_a_clone_and_its_endpoint(
    containerd: tuple[Containerd, str, str], host_untouched: None
) -> None:
    """A task whose spec joins a network namespace (as a CRI pod's does) still gets a clone
    of the template, with the namespace's veth joined to it: its address answers from the
    other end with the namespace's MAC in the guest. Its shim SIGKILLed, containerd's clean-up
    leaves the namespace holding only its endpoint again."""
    c, image, run_root = containerd
    async with namespaces(2, "vcsfn") as (out, pod):
        await veth(out, "vth0", [f"{OUT4}/24"], pod, "eth0", [f"{IN4}/24"], b_gateway=OUT4)
        mac = await asyncio.to_thread(mac_of, pod, "eth0")
        cid = f"tpn-{uuid.uuid4().hex[:6]}"
        log = await serve_in(c, image, pod, cid)
        try:
            # The VM is a clone of the template (not a boot), its QEMU outside the namespace.
            [cmd] = qemu_cmdlines(run_root)
            assert "-incoming defer" in cmd
            [(vmm, _)] = [p for p in processes_mentioning(run_root) if "qemu-system" in p[1]]
            assert os.stat(f"/proc/{vmm}/ns/net").st_ino != os.stat(pod.path).st_ino
            assert "cold-plugged" not in log and "VM factory" not in log, log
            assert await asyncio.to_thread(fetch, out, f"http://{IN4}/") == f"hi-{cid}\n"
            macs = c.ctr(
                "task", "exec", "--exec-id", "m", cid, "cat", "/sys/class/net/eth0/address"
            )
            assert macs.stdout.decode().strip() == mac
        except BaseException:
            kill_and_remove(c, cid)
            raise
        # The shim SIGKILLed: containerd's `delete` stops the VM as the sandbox's record
        # says, its tap and tc filters with it.
        kill_shim_then_delete(c, cid)
        assert settled(c, cid, timeout=30) == []
        assert pod.links() == ["eth0", "lo"]
        assert "ingress" not in pod.run("tc", "qdisc", "show", "dev", "eth0")


async def test_a_namespace_with_more_endpoints_than_the_clone_takes_boots_instead(
    containerd: tuple[Containerd, str, str], host_untouched: None
) -> None:
    """Three endpoints, two free root ports on a clone of the template: the third NIC finds
    none, the clone is undone and the task's VM is booted with all three cold-plugged (a log
    line says why); its address answers."""
    c, image, run_root = containerd
    async with namespaces(2, "vcsfm") as (out, pod):
        await veth(out, "vth0", [f"{OUT4}/24"], pod, "eth0", [f"{IN4}/24"], b_gateway=OUT4)
        for n in (1, 2):
            await veth(out, f"vth{n}", [], pod, f"eth{n}", [f"192.168.{80 + n}.2/24"])
        cid = f"tpm-{uuid.uuid4().hex[:6]}"
        log = await serve_in(c, image, pod, cid)
        try:
            [cmd] = qemu_cmdlines(run_root)
            assert "-incoming" not in cmd
            assert "no free pcie-root-port" in log and "booting the VM instead" in log, log
            assert await asyncio.to_thread(fetch, out, f"http://{IN4}/") == f"hi-{cid}\n"
        finally:
            kill_and_remove(c, cid)
        assert settled(c, cid) == []
        assert pod.links() == ["eth0", "eth1", "eth2", "lo"]
