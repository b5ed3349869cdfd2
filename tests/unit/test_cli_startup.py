"""What `virtc` imports per command, checked in a fresh interpreter: start-up cost is guarded.

`virtc --version`, `--help`, `list` and `inspect` must not load pydantic, asyncio, the drivers,
grpc, httpx, qemu.qmp or rich (each costs tens of milliseconds; together they made every
command take ~0.3 s). A change that imports one of them at the top of a module on these paths
fails here, naming the module and the chain that imported it. Timings: benchmarks/startup.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest

from virtcontainers import persist
from virtcontainers.host import process_start_time

HEAVY = (
    "asyncio",
    "google.protobuf",
    "grpc",
    "httpx",
    "pydantic",
    "pydantic_core",
    "pyroute2",
    "qemu",
    "rich",
    "typer",
    "virtcontainers.agent",
    "virtcontainers.config",
    "virtcontainers.containers",
    "virtcontainers.drivers",
    "virtcontainers.factory",
    "virtcontainers.guest",
    "virtcontainers.hypervisor_state",
    "virtcontainers.images",
    "virtcontainers.network",
    "virtcontainers.sandbox",
)
"""Modules (and their submodules) that no listing or help command may load."""
UNUSED = ("bz2", "lzma", "shutil")
"""Lighter modules that help, list, inspect and exec have no use for (a command module that
imports one at its top makes every command pay for it: all of them are registered)."""

# Runs `virtc ARGS` through the entry point in a fresh, isolated interpreter, then reports
# its exit code, output and loaded modules (the harness's own imports come after the list).
_HARNESS = """
import sys
from virtcontainers.cli import run
code = run(sys.argv[1:])
modules = sorted(sys.modules)
import json
sys.__stderr__.write("\\n@@" + json.dumps({"code": code, "modules": modules}))
"""


def virtc_modules(*args: str) -> dict[str, Any]:
    """Run `virtc ARGS`; its exit code, stdout and the modules it loaded."""
    proc = subprocess.run(
        [sys.executable, "-I", "-c", _HARNESS, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    err, sep, report = proc.stderr.rpartition("\n@@")
    assert sep, f"virtc {' '.join(args)} did not finish: {proc.stderr[-2000:]}"
    return {**json.loads(report), "out": proc.stdout, "err": err}


def heavy_loaded(modules: list[str]) -> list[str]:
    return [m for m in modules if any(m == h or m.startswith(h + ".") for h in HEAVY)]


def unused_loaded(modules: list[str]) -> list[str]:
    return [m for m in UNUSED if m in modules]


@pytest.fixture
def listed_root(run_root: str) -> str:
    """A run root with one sandbox recorded as running (this test process as its VMM)."""
    store = persist.StateStore(run_root)
    store.write(
        "guard1",
        {
            "sandbox": {"id": "guard1", "hypervisor": "qemu", "state": "running"},
            "hypervisor": {"pid": os.getpid(), "pid_start_time": process_start_time(os.getpid())},
            "config": {"num_vcpus": 1, "memory_size": 256},
        },
    )
    store.set_runstate("guard1", "running")
    return run_root


def test_import_virtcontainers_is_cheap() -> None:
    code = "import sys, virtcontainers; print(sorted(sys.modules))"
    out = subprocess.run(
        [sys.executable, "-I", "-c", code], capture_output=True, text=True, check=True
    ).stdout
    modules = [m.strip(" '") for m in out.strip()[1:-1].split(",")]
    assert [m for m in modules if m.startswith("virtcontainers")] == ["virtcontainers"]
    assert heavy_loaded(modules) == []
    assert "typing" not in modules


def test_version_loads_nothing_but_the_entry_point() -> None:
    r = virtc_modules("--version")
    assert r["code"] == 0 and r["out"].startswith("virtc ")
    ours = [m for m in r["modules"] if m.startswith("virtcontainers")]
    assert ours == ["virtcontainers", "virtcontainers.cli", "virtcontainers.cli.app"]
    assert "argparse" not in r["modules"] and heavy_loaded(r["modules"]) == []


@pytest.mark.parametrize(
    "args", [("--help",), ("exec", "--help"), ("template", "--help"), ("run", "--help")]
)
def test_help_loads_no_heavy_module(args: tuple[str, ...]) -> None:
    r = virtc_modules(*args)
    assert r["code"] == 0 and "usage: virtc" in r["out"]
    assert heavy_loaded(r["modules"]) == [] and unused_loaded(r["modules"]) == []


def test_list_loads_no_heavy_module(listed_root: str) -> None:
    r = virtc_modules("--run-root", listed_root, "list")
    assert r["code"] == 0, r["err"]
    assert "guard1" in r["out"] and "running" in r["out"]
    assert heavy_loaded(r["modules"]) == [] and unused_loaded(r["modules"]) == []
    r = virtc_modules("--run-root", listed_root, "--json", "list")
    assert json.loads(r["out"])[0]["state"] == "running"
    assert heavy_loaded(r["modules"]) == []


def test_inspect_loads_no_heavy_module(listed_root: str) -> None:
    r = virtc_modules("--run-root", listed_root, "inspect", "guard1")
    assert r["code"] == 0, r["err"]
    assert json.loads(r["out"])["sandbox"]["state"] == "running"
    assert heavy_loaded(r["modules"]) == []


def test_the_guard_sees_a_heavy_import(listed_root: str) -> None:
    """The check itself can fail: a command that needs the drivers is caught loading them."""
    r = virtc_modules("--run-root", listed_root, "capabilities")
    assert r["code"] == 0, r["err"]
    assert "virtcontainers.drivers.qemu" in heavy_loaded(r["modules"])


async def test_exec_loads_only_the_agent_client(run_root: str) -> None:
    """`virtc exec` into a running sandbox needs the state file and the agent: not the driver
    (qemu.qmp), pydantic, grpc, httpx or rich. The sandbox here is a state file naming this
    process as its VMM and a fake agent this test serves on the recorded agent socket."""
    import asyncio

    from virtcontainers.agent.fake import FakeAgent

    sock = os.path.join(run_root, "agent.sock")
    store = persist.StateStore(run_root)
    store.write(
        "guard2",
        {
            "sandbox": {
                "id": "guard2",
                "hypervisor": "qemu",
                "state": "running",
                "agent": ["unix", sock, 0],
            },
            "hypervisor": {"pid": os.getpid(), "pid_start_time": process_start_time(os.getpid())},
            "config": {"num_vcpus": 1, "memory_size": 256},
        },
    )
    store.set_runstate("guard2", "running")
    async with FakeAgent(sock):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-I", "-c", _HARNESS, "--run-root", run_root,
            "exec", "guard2", "--", "echo", "hi",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    text, sep, report = err.decode().rpartition("\n@@")
    assert sep, text[-2000:]
    r = json.loads(report)
    assert (r["code"], out) == (0, b"hi\n"), text
    needed = ("asyncio", "virtcontainers.agent", "virtcontainers.sandbox")
    loaded = heavy_loaded(r["modules"])
    assert [m for m in loaded if not m.startswith(needed)] == []  # no driver, config, pydantic
    assert unused_loaded(r["modules"]) == []
    assert "virtcontainers.agent.client" in r["modules"]  # the check sees what exec loads


FACTORY_RUN_DEFERRED = (
    "tomllib",
    "virtcontainers.config.toml",
    "virtcontainers.factory.cache",
    "virtcontainers.factory.ledger",
    "virtcontainers.images.unpack",
)
"""What `virtc run --factory --image NAME` has no use for: the TOML loader, the in-process VM
pool and the layer unpacker (the image is unpacked already); each used to load on its path."""


def test_factory_run_path_defers_what_it_does_not_use() -> None:
    """The modules `virtc run --factory --image` loads (the command, the config, the cache
    client, the QEMU driver's take-over, the image store), imported in a fresh interpreter:
    none of FACTORY_RUN_DEFERRED comes with them, and the names still resolve on use."""
    code = (
        "import sys\n"
        "from virtcontainers.cli import commands, container_cmds\n"
        "from virtcontainers.config import HypervisorConfig\n"
        "from virtcontainers.factory import Factory, sandbox_from_factory\n"
        "from virtcontainers.factory.rpc import client\n"
        "from virtcontainers.drivers.qemu import driver\n"
        "from virtcontainers.images import ImageStore\n"
        "from virtcontainers.sandbox import build_config\n"
        "loaded = sorted(sys.modules)\n"
        "from virtcontainers.config import load_toml\n"
        "print(' '.join(loaded))\n"
        "print(load_toml.__module__)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-I", "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    modules, resolved = proc.stdout.splitlines()
    loaded = modules.split()
    assert "virtcontainers.drivers.qemu.driver" in loaded  # the import above did load
    assert [m for m in FACTORY_RUN_DEFERRED if m in loaded] == []
    assert resolved == "virtcontainers.config.toml"


def test_a_sandbox_without_host_networking_loads_no_pyroute2(run_root: str) -> None:
    """`--net none` (loopback only: the guest's NETWORK request) plans, starts and stops a
    sandbox without pyroute2, whose package imports all of itself (~140 ms of a cold `run
    --image`'s start: its default network is `none` in the benchmark)."""
    code = (
        "import asyncio, sys\n"
        "from virtcontainers import Sandbox\n"
        "async def main():\n"
        f"    async with Sandbox(hypervisor='mock', network='none', run_root={run_root!r}) as sb:\n"
        "        assert sb.network is not None\n"
        "asyncio.run(main())\n"
        "print('pyroute2' in sys.modules, 'virtcontainers.network.netlink' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-c", code], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert out.split() == ["False", "True"]  # the network's modules, without pyroute2
