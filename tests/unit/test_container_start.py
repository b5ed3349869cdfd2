"""Container.start's guest request: the set-up script only when `setup` has not run it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from virtcontainers.agent.client import ExecResult
from virtcontainers.containers import Container, ContainerRecord
from virtcontainers.containers.spec import READ_AHEAD_KIB, RUNNER


@dataclass
class FakeProcess:
    handle: int = 7


@dataclass
class FakeSandbox:
    """What Container.setup and Container.start ask of their sandbox."""

    network: None = None
    execs: list[list[str]] = field(default_factory=list)
    started: list[list[str]] = field(default_factory=list)

    async def exec(self, argv: list[str], **_: Any) -> ExecResult:
        self.execs.append(argv)
        return ExecResult(0, b"", b"")

    async def start_process(self, argv: list[str], **_: Any) -> FakeProcess:
        self.started.append(argv)
        return FakeProcess()


def container(sandbox: FakeSandbox, cid: str, **spec: Any) -> Container:
    record = ContainerRecord(id=cid, share_tag="vc-ctr", spec={"args": ["true"], **spec})
    return Container(sandbox, record)  # type: ignore[arg-type]


async def test_start_runs_the_setup_script_only_when_setup_has_not() -> None:
    sb = FakeSandbox()
    fresh = container(sb, "c1", resources={"memory_max": 64 << 20})
    await fresh.start()
    [argv] = sb.started
    assert argv[:2] == ["/bin/sh", "-c"] and fresh.setup_script() in argv[2]
    assert argv[argv.index("vc-setup") + 1] == RUNNER

    set_up = container(sb, "c2", resources={"memory_max": 64 << 20})
    await set_up.setup()
    assert sb.execs == [["/bin/sh", "-c", set_up.setup_script()]]
    await set_up.start()
    assert sb.started[1][0] == RUNNER  # vc-run at once: its mounts and cgroup are there
    assert sb.started[1] == set_up.runner_argv()


async def started_alone(sb: FakeSandbox, c: Container) -> list[str]:
    """Start `c`, checking that neither `setup` nor `start` ran a script: vc-run's argv."""
    assert c.setup_script() == ""
    await c.setup()
    assert sb.execs == []
    await c.start()
    [argv] = sb.started
    assert argv[0] == RUNNER
    assert argv[argv.index("--cgroup") + 1] == c.cgroup
    return argv


async def test_a_root_share_is_mounted_by_vc_run() -> None:
    """A container whose root is a share, with no volume and no limit, needs no set-up
    shell: vc-run mounts the share (reading ahead READ_AHEAD_KIB), the cgroup hierarchy and
    makes its cgroup; with limits the script writes them and leaves the root to vc-run."""
    sb = FakeSandbox()
    c = container(sb, "c1")
    argv = await started_alone(sb, c)
    assert argv[argv.index("--rootfs") + 1] == c.rootfs
    assert argv[argv.index("--share") + 1] == "vc-ctr"
    assert argv[argv.index("--read-ahead") + 1] == str(READ_AHEAD_KIB)
    limited = container(sb, "c2", resources={"memory_max": 64 << 20})
    script = limited.setup_script()
    assert "virtiofs" not in script and f"{limited.cgroup}/memory.max" in script


def pooled(sandbox: FakeSandbox, cid: str, **spec: Any) -> Container:
    record = ContainerRecord(
        id=cid, share_tag="vc-pool", spec={"args": ["true"], **spec}, share_path="/run/vc/pool/ctr"
    )
    return Container(sandbox, record)  # type: ignore[arg-type]


async def test_a_pooled_vms_container_needs_no_set_up_request() -> None:
    """Its root is in the share the guest mounted while pooled and vc-run makes its cgroup
    and directory: neither Create (`setup`) nor `start` runs a script, and vc-run enters the
    staged directory itself."""
    sb = FakeSandbox()
    c = pooled(sb, "c1")
    argv = await started_alone(sb, c)
    assert argv[argv.index("--rootfs") + 1] == "/run/vc/pool/ctr" and "--share" not in argv


async def test_a_pooled_vms_container_with_limits_writes_them_only() -> None:
    sb = FakeSandbox()
    c = pooled(sb, "c2", resources={"memory_max": 64 << 20})
    await c.setup()
    [[_, _, script]] = sb.execs
    assert f"echo {64 << 20} > {c.cgroup}/memory.max" in script
    assert "bind" not in script and c.rootfs not in script  # no root to mount: vc-run binds it
