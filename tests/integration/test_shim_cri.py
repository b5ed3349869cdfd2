"""The path kubelet uses: a CRI client (the CRI v1 API over gRPC) drives containerd's CRI plugin,
which runs a pod of two containers through containerd-shim-virtc-v2 with runtime handler
`virtc`, its network made by Debian's CNI bridge plugin inside containerd's own network
namespace. The pod is one VM; its address answers from that namespace; afterwards nothing is
left."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from containerd_support import Containerd, import_busybox, running_containerd, settled
from cri_support import K8S_NAMESPACE, RUNTIME_HANDLER, CriClient, PodNetwork, import_pause

from cri_api import api_pb2 as cri
from leaks import kill_all, processes_mentioning
from net_support import Namespace
from virtcontainers.config import load_toml
from virtcontainers.factory import TemplateStore
from virtcontainers.sandbox import build_config
from virtcontainers.types import HypervisorType

pytestmark = pytest.mark.integration

SHIM_CONFIG = """[hypervisor.qemu]
default_memory = 256
default_vcpus = 1
"""
#: The runtime handler whose shims take their VMs from the template FACTORY_TEMPLATE (made
#: by the test that uses it) through the configuration.toml given as CRI's `ConfigPath`.
FACTORY_HANDLER = "virtc-factory"
FACTORY_TEMPLATE = "pod"
#: gRPC deadline of the calls that boot or stop a VM (TCG on a busy machine).
VM_CALL = 300
#: The network namespaces CRI made for the tests' pods.
POD_NETNS: list[str] = []


@pytest.fixture(scope="module")
def cri_containerd() -> Iterator[tuple[Containerd, PodNetwork, str]]:
    # Short: the VMs' sockets are under <run root>/vm/<64-character CRI sandbox id>/.
    run_root = tempfile.mkdtemp(prefix="vccri-", dir="/tmp")
    config = os.path.join(run_root, "configuration.toml")
    Path(config).write_text(SHIM_CONFIG)
    factory = os.path.join(run_root, "factory.toml")
    template = os.path.join(run_root, "templates", FACTORY_TEMPLATE)
    # A pod's VM needs root ports for its containers' roots: the template is made with them.
    Path(factory).write_text(
        f"{SHIM_CONFIG}pcie_root_port = 8\n[factory]\n"
        f'enable_template = true\ntemplate_path = "{template}"\n'
    )
    env = {"VC_RUN_ROOT": run_root, "VC_SHIM_CONFIG": config}
    net = PodNetwork.unique()
    try:
        with running_containerd(
            env=env, cri=lambda d: net.plugin_config(d, {FACTORY_HANDLER: factory})
        ) as c:
            import_pause(c)
            try:
                yield c, net, import_busybox(c, namespace=K8S_NAMESPACE)
            finally:
                remove_pods(c)
        # containerd is gone: shims (which name its directory) and VMs must be too.
        left = c.left_at_stop
    finally:
        # After a failure: what a pod left (the test itself asserts that nothing is).
        kill_all(processes_mentioning(run_root))
        for path in POD_NETNS:
            if os.path.exists(path):
                subprocess.run(["ip", "netns", "delete", os.path.basename(path)], check=False)
        shutil.rmtree(run_root, ignore_errors=True)
    assert not left


@pytest.fixture(autouse=True)
def pods_removed(cri_containerd: tuple[Containerd, PodNetwork, str]) -> Iterator[None]:
    """After each test, the pods it left (a failed one's): its pod's veth in containerd's
    namespace must not fail the next test's check of that namespace too."""
    yield
    remove_pods(cri_containerd[0])


def remove_pods(c: Containerd) -> None:
    """Stop and remove every pod CRI still has (a failed test's), as kubelet would."""
    with CriClient(c) as client, contextlib.suppress(grpc.RpcError):
        for pod in client.runtime.ListPodSandbox(cri.ListPodSandboxRequest(), timeout=30).items:
            with contextlib.suppress(grpc.RpcError):
                client.runtime.StopPodSandbox(
                    cri.StopPodSandboxRequest(pod_sandbox_id=pod.id), timeout=VM_CALL
                )
                client.runtime.RemovePodSandbox(
                    cri.RemovePodSandboxRequest(pod_sandbox_id=pod.id), timeout=VM_CALL
                )


def pod_netns(c: Containerd, pod_id: str) -> str:
    """The network namespace CRI made for a pod (/var/run/netns/cni-<uuid>), from its sandbox
    container's bundle; remembered for the fixture's clean-up after a failure."""
    bundle = os.path.join(c.state, "io.containerd.runtime.v2.task", K8S_NAMESPACE, pod_id)
    spec = json.loads(Path(bundle, "config.json").read_text())
    path = next(n["path"] for n in spec["linux"]["namespaces"] if n["type"] == "network")
    POD_NETNS.append(path)
    return str(path)


def qemu_processes(c: Containerd) -> list[tuple[int, str]]:
    return [(pid, cmd) for pid, cmd in processes_mentioning(c.vm_root) if "qemu-system" in cmd]


def mounts_under(path: str) -> list[str]:
    lines = Path("/proc/self/mounts").read_text().splitlines()
    return [line.split()[1] for line in lines if line.split()[1].startswith(path + "/")]


def fetch(ns: Namespace, url: str, timeout: float = 120) -> str:
    """`url`'s body fetched from namespace `ns`, once it answers."""
    get = (
        "import sys, urllib.request as u;"
        "sys.stdout.buffer.write(u.urlopen(sys.argv[1], None, 5).read())"
    )
    deadline = time.monotonic() + timeout
    while True:
        body = ns.run(sys.executable, "-c", get, url, check=False)
        if body or time.monotonic() > deadline:
            return body
        time.sleep(0.5)


def new_pod_config(name: str) -> cri.PodSandboxConfig:
    """A pod named and hostnamed `name`."""
    return cri.PodSandboxConfig(
        metadata=cri.PodSandboxMetadata(name=name, uid=name, namespace="default"),
        hostname=name,
        linux=cri.LinuxPodSandboxConfig(),
    )


def serving(tag: str) -> str:
    """A script serving "hello-<tag>" on port 8080 with busybox httpd."""
    return (
        f"mkdir -p /tmp/www && echo hello-{tag} > /tmp/www/index.html && "
        "exec busybox httpd -f -p 8080 -h /tmp/www"
    )


def run_pod(rt: Any, pod_config: cri.PodSandboxConfig, handler: str) -> tuple[str, Any]:
    """RunPodSandbox with runtime handler `handler`: the pod's id and status."""
    pod_id = rt.RunPodSandbox(
        cri.RunPodSandboxRequest(config=pod_config, runtime_handler=handler), timeout=VM_CALL
    ).pod_sandbox_id
    status = rt.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=pod_id), timeout=30)
    return str(pod_id), status.status


def create_container(
    rt: Any,
    pod_id: str,
    pod_config: cri.PodSandboxConfig,
    image: str,
    name: str,
    script: str,
    pid: int = cri.POD,
    target: str = "",
) -> str:
    """CreateContainer of `sh -c script` in the pod, in pid namespace mode `pid` (TARGET:
    container `target`'s)."""
    options = cri.NamespaceOption(pid=pid, target_id=target)
    security = cri.LinuxContainerSecurityContext(namespace_options=options)
    cid = rt.CreateContainer(
        cri.CreateContainerRequest(
            pod_sandbox_id=pod_id,
            config=cri.ContainerConfig(
                metadata=cri.ContainerMetadata(name=name),
                image=cri.ImageSpec(image=image),
                command=["sh", "-c", script],
                linux=cri.LinuxContainerConfig(security_context=security),
            ),
            sandbox_config=pod_config,
        ),
        timeout=VM_CALL,
    ).container_id
    return str(cid)


def test_pod_of_two_containers_is_one_vm_on_the_cni_network(
    cri_containerd: tuple[Containerd, PodNetwork, str], host_untouched: None
) -> None:
    c, net, image = cri_containerd
    ns = Namespace(c.netns)
    tag = uuid.uuid4().hex[:6]
    pod_config = new_pod_config(f"pod-{tag}")
    with CriClient(c) as client:
        rt = client.runtime
        version = rt.Version(cri.VersionRequest(), timeout=30)
        assert (version.runtime_name, version.runtime_api_version) == ("containerd", "v1")
        pod_id, status = run_pod(rt, pod_config, RUNTIME_HANDLER)
        assert status.state == cri.SANDBOX_READY
        assert status.runtime_handler == RUNTIME_HANDLER
        pod_ip = status.network.ip
        assert pod_ip in [str(a) for a in net.subnet.hosts()], status
        netns = pod_netns(c, pod_id)
        # The MAC of the pod's interface, as CNI made it in the pod's namespace.
        veth = Namespace(os.path.basename(netns)).run("ip", "-o", "link", "show", "eth0")
        pod_mac = veth.split("link/ether ")[1].split()[0]
        # The pod's sandbox (the pause image's process) runs in a VM of ours: one QEMU.
        assert len(qemu_processes(c)) == 1

        def container(name: str, script: str, pid: int = cri.POD, target: str = "") -> str:
            return create_container(rt, pod_id, pod_config, image, name, script, pid, target)

        web = container("web", serving(tag))
        side = container("side", "exec sleep 600")
        solo = container("solo", "exec sleep 601", pid=cri.CONTAINER)
        for cid in (web, side, solo):
            rt.StartContainer(cri.StartContainerRequest(container_id=cid), timeout=VM_CALL)
        # An ephemeral (debug) container targeting solo's pid namespace (TARGET mode).
        debug = container("debug", "exec sleep 602", pid=cri.TARGET, target=solo)
        rt.StartContainer(cri.StartContainerRequest(container_id=debug), timeout=VM_CALL)
        # Both containers joined the pod's VM.
        assert len(qemu_processes(c)) == 1

        def exec_sync(cid: str, script: str) -> cri.ExecSyncResponse:
            request = cri.ExecSyncRequest(container_id=cid, cmd=["sh", "-c", script], timeout=60)
            return rt.ExecSync(request, timeout=VM_CALL)

        # The guest's NIC is up with the pod interface's MAC (the guest side of the VM).
        links = "for d in /sys/class/net/*; do echo $(cat $d/address $d/operstate); done"
        ran = exec_sync(side, links)
        assert f"{pod_mac} up" in ran.stdout.decode().splitlines(), (pod_mac, ran)
        ran = exec_sync(web, "cat /tmp/www/index.html; exit 3")
        assert (ran.exit_code, ran.stdout) == (3, f"hello-{tag}\n".encode()), ran
        # The other container shares the pod's network (the guest's), not web's root.
        ran = exec_sync(side, "busybox wget -q -O - http://127.0.0.1:8080/; test -e /tmp/www")
        assert (ran.exit_code, ran.stdout) == (1, f"hello-{tag}\n".encode()), ran

        def ps(cid: str) -> dict[int, str]:
            """pid -> command line of what the container sees."""
            ran = exec_sync(cid, "busybox ps -o pid,args")
            assert ran.exit_code == 0, ran
            lines = [line.split(None, 1) for line in ran.stdout.decode().splitlines()[1:]]
            return {int(f[0]): f[1] for f in lines if len(f) == 2}

        # The pod's pid namespace (CRI's POD mode, its default) is the sandbox container's:
        # pause is its pid 1 and both containers' processes are there, but nothing of the
        # guest's own (the agent, vc-run, the shim's scripts) nor the third container's.
        seen = ps(side)
        assert seen.get(1) == "/pause", seen
        assert "sleep 600" in seen.values() and any("httpd" in a for a in seen.values()), seen
        for other in ("/init", "vc-run", "vc-setup", "oom_kill", "sleep 601"):
            assert not any(other in a for a in seen.values()), (other, seen)
        # Its ipc and uts namespaces are pause's (pid 1's) too: the pod's hostname.
        same = "[ $(readlink /proc/1/ns/$0) = $(readlink /proc/self/ns/$0) ] || echo $0"
        ran = exec_sync(side, f"hostname; for ns in ipc uts; do sh -c '{same}' $ns; done")
        assert (ran.exit_code, ran.stdout.decode()) == (0, f"pod-{tag}\n"), ran
        # A pid namespace of its own (CONTAINER mode): only its processes, its command pid 1.
        seen = ps(solo)
        assert seen.get(1) == "sleep 601", seen
        assert not any(a in ("/pause", "sleep 600") or "httpd" in a for a in seen.values()), seen
        # The debug container sees solo's processes, solo's command its pid 1, not the pod's.
        seen = ps(debug)
        assert seen.get(1) == "sleep 601" and "sleep 602" in seen.values(), seen
        assert not any(a in ("/pause", "sleep 600") or "httpd" in a for a in seen.values()), seen

        # The pod's address, given by CNI's host-local IPAM in the pod's namespace, is the
        # guest's: it answers from containerd's namespace (the bridge's side) with what the
        # web container serves.
        assert fetch(ns, f"http://{pod_ip}:8080/") == f"hello-{tag}\n"

        stats = rt.ContainerStats(
            cri.ContainerStatsRequest(container_id=web), timeout=VM_CALL
        ).stats
        assert stats.attributes.id == web
        assert stats.memory.working_set_bytes.value > 0, stats
        assert stats.cpu.usage_core_nano_seconds.value > 0, stats

        rt.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout=VM_CALL)
        rt.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=VM_CALL)
        assert not rt.ListPodSandbox(cri.ListPodSandboxRequest(), timeout=30).items
        assert not rt.ListContainers(cri.ListContainersRequest(), timeout=30).containers

    assert settled(c, pod_id, web, side, solo, debug) == []
    assert mounts_under(c.dir) == []
    # The pod's network namespace (CRI's, under /run/netns) is gone, and with it the veth: the
    # test namespace keeps only its loopback and the CNI bridge.
    assert not os.path.exists(netns)
    assert ns.links() == sorted(["lo", net.bridge])


def test_a_pod_with_a_cni_network_takes_its_vm_from_the_template(
    cri_containerd: tuple[Containerd, PodNetwork, str], host_untouched: None
) -> None:
    """A pod run with the runtime handler whose configuration (CRI's `ConfigPath`) has Kata's
    `[factory]`: its VM is a clone of the template, not a boot, though the pod has a network
    namespace; the namespace's CNI veth is joined to it (QEMU stays outside the namespace) and
    the pod's address answers from the node with what the pod's container serves."""
    c, net, image = cri_containerd
    ns = Namespace(c.netns)
    run_root = c.vm_root
    config = load_toml(os.path.join(run_root, "factory.toml")).config
    cfg = build_config(config, {"shared_fs": "virtio-fs"}, HypervisorType.QEMU)
    store = TemplateStore(os.path.join(run_root, "templates"), run_root=run_root)
    asyncio.run(store.create(FACTORY_TEMPLATE, cfg))
    tag = uuid.uuid4().hex[:6]
    pod_config = new_pod_config(f"fpod-{tag}")
    logged = os.path.getsize(c.log_path)
    try:
        with CriClient(c) as client:
            rt = client.runtime
            pod_id, status = run_pod(rt, pod_config, FACTORY_HANDLER)
            assert status.state == cri.SANDBOX_READY
            pod_ip = status.network.ip
            netns = pod_netns(c, pod_id)
            # The pod's VM is a clone (QEMU restored the template's state), outside the
            # pod's network namespace.
            [(vmm, _)] = [(p, cmd) for p, cmd in qemu_processes(c) if pod_id in cmd]
            assert b"-incoming\0defer" in Path(f"/proc/{vmm}/cmdline").read_bytes()
            assert os.stat(f"/proc/{vmm}/ns/net").st_ino != os.stat(netns).st_ino
            web = create_container(rt, pod_id, pod_config, image, "web", serving(tag))
            rt.StartContainer(cri.StartContainerRequest(container_id=web), timeout=VM_CALL)
            assert fetch(ns, f"http://{pod_ip}:8080/") == f"hello-{tag}\n"
            # The container joined the pod's VM (none of its own).
            assert [p for p, cmd in qemu_processes(c) if pod_id in cmd or web in cmd] == [vmm]
            with open(c.log_path, "rb") as f:
                f.seek(logged)
                log = f.read().decode(errors="replace")
            for boot in ("cold-plugged", "VM factory", "booting a VM directly"):
                assert boot not in log, log
            rt.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout=VM_CALL)
            rt.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=VM_CALL)
        assert settled(c, pod_id, web) == []
        assert not os.path.exists(netns)
        assert ns.links() == sorted(["lo", net.bridge])
    finally:
        store.remove(FACTORY_TEMPLATE)
