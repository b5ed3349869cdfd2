"""`ctr run --rm IMAGE true` under containerd: this shim vs runc vs gVisor, alternated, same run.

A private containerd (Debian's 1.6.20, own root/state/sockets, in its own network namespace:
the tests' harness) with a busybox image. Candidates: `io.containerd.runc.v2` (runc),
the same runc shim with Debian's `runsc` as its binary (`--network=none`), and
`io.containerd.virtc.v2` cold (a new QEMU VM per container: q35, TCG, 1 vCPU, 256 MiB).
Also the shim binary's own start-up (`containerd-shim-virtc-v2 -v`: interpreter and imports,
what containerd pays on every start and delete) against `python -c pass`, and memory: the
PSS of the shim server and of the VM (QEMU and its helpers) while a container runs.

With the VM factory of the shim's configuration.toml (Kata's `[factory]`): `virtc_template`
clones each VM from a template made for virtio-fs (`enable_template`), `virtc_cache` takes
it from the VM cache server (`vm_cache_number`; a pool of 2 clones of that template, full
before each run), the bundle's root hot-added in both. The VM cache server runs a zygote
(virtcontainers/zygote/): `virtc_cache`'s shim `start` and `delete` are served by workers
forked from it, pre-imported; for the other candidates its socket is moved aside, so they
stay cold (each shim command its own interpreter). Memory is measured both ways.

The factory runs are broken down into the steps of `ctr run --rm` (`PHASES`), from the
times of containerd's log lines and the shim's (at debug level, copied into containerd's
log), each the time since the step before: where the time goes, run by run.

Targets (issue 13): with a VM factory or template <= 1.0x runsc; cold: the ratios are
reported; shim PSS <= 40 MiB.

    .venv/bin/python benchmarks/shim.py [--runs 3] [--quick]
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

from _lib import (
    Options,
    Result,
    Sample,
    Skip,
    add_metrics,
    add_ratio,
    alternate,
    fmt_s,
    main,
    median,
    new_result,
    pool_full,
    run_command,
    smaps_rollup,
    temp_run_root,
    vm_memory,
)

from virtcontainers.config import load_toml
from virtcontainers.factory import (
    DaemonSpec,
    TemplateStore,
    paths,
    start_daemon,
    stop_daemon,
)
from virtcontainers.sandbox import build_config
from virtcontainers.types import HypervisorType

HERE = os.path.dirname(os.path.abspath(__file__))
# containerd_support and what it imports (tests/images_support.py)
sys.path[:0] = [os.path.join(HERE, "..", "tests", "integration"), os.path.join(HERE, "..", "tests")]
from containerd_support import import_busybox, running_containerd  # noqa: E402

TITLE = "`ctr run --rm IMAGE true`: virtc shim (cold) vs runc vs runsc; shim start-up and memory"
LABELS = {
    "runc": "runc (io.containerd.runc.v2)",
    "runsc": "runsc (runc shim, gVisor binary)",
    "virtc": "virtc shim, cold VM",
    "virtc_template": "virtc shim, VM from a template",
    "virtc_cache": "virtc shim, VM from the VM cache server",
    "python_pass": "python -c pass",
    "shim_version": "containerd-shim-virtc-v2 -v",
}
SHIM = os.path.join(os.path.dirname(sys.executable), "containerd-shim-virtc-v2")
SHIM_PSS_LIMIT_MIB = 40
SHIM_CONFIG = "[hypervisor.qemu]\ndefault_memory = 256\ndefault_vcpus = 1\n"
TEMPLATE = "shim"
POOL = 2
POOL_TIMEOUT = 300.0
FACTORY_TARGET = 1.0
#: The steps of `ctr run --rm` with a factory VM: (metric, what ends the step in containerd's
#: log: containerd's message or the shim's), in order; each step is timed from the one before
#: (the first from ctr's start).
PHASES = (
    ("1 ctr+containerd: container made", "topic=/containers/create"),
    ("2 shim start: fork, server imports", "shim {cid}: server process up"),
    ("3 Connect, Create sent", "create {cid}: received"),
    ("4 Create: rootfs mounted", "create {cid}: rootfs mounted"),
    ("5 Create: factory VM, share", "create {cid}: VM ready"),
    ("6 Create: container in the guest", "create {cid}: container made in the guest"),
    ("7 Create answered, Start sent", "start {cid}/: received"),
    ("8 Start: vc-run started", "start {cid}/: running"),
    ("9 process set up, ran, exit seen", "process {cid}/: exited"),
    ("10 exit event, Wait, Delete", "delete {cid}/: received"),
    ("11 Delete answered", "delete {cid}/: answered"),
    ("12 Shutdown sent", "shutdown: received"),
    ("13 VM killed, root unmounted, shim exit", "shim {cid}: exiting"),
    ("14 shim delete binary, bundle", "topic=/containers/delete"),
)
PHASE_END = "15 container removed, ctr exit"


async def bench(opts: Options) -> Result:
    for binary in ("containerd", "ctr", "runc", "runsc"):
        if shutil.which(binary) is None:
            raise Skip(f"{binary} is not installed")
    result = new_result("shim", TITLE, opts, unit="s", labels=LABELS)
    host_run = os.path.exists("/run/containerd")
    async with temp_run_root() as run_root:
        config = os.path.join(run_root, "configuration.toml")
        Path(config).write_text(SHIM_CONFIG)
        wrapper = os.path.join(run_root, "runsc-none")
        Path(wrapper).write_text(f'#!/bin/sh\nexec {shutil.which("runsc")} --network=none "$@"\n')
        os.chmod(wrapper, 0o755)
        env = {"VC_RUN_ROOT": run_root, "VC_SHIM_CONFIG": config}
        templates = os.path.join(run_root, "templates")
        factory_configs = {
            "template": f'enable_template = true\ntemplate_path = "{templates}/{TEMPLATE}"\n',
            "cache": f"vm_cache_number = {POOL}\n",
        }
        for name, section in factory_configs.items():
            Path(run_root, f"{name}.toml").write_text(f"{SHIM_CONFIG}\n[factory]\n{section}")
        store = await _factory(config, templates, run_root)
        with running_containerd(env=env) as c:
            image = import_busybox(c)
            runc_root = os.path.join(c.dir, "runc")

            def ctr_run(*runtime: str, phases: bool = False) -> Sample:
                cid = f"b{uuid.uuid4().hex[:8]}"
                args = ["run", "--rm", "--fifo-dir", c.fifo_dir, *runtime, image, cid, "true"]
                offset = os.path.getsize(c.log_path)
                start = time.time()
                t0 = time.perf_counter()
                c.ctr(*args, timeout=300)
                wall = time.perf_counter() - t0
                sample = {"wall": wall}
                if phases:
                    sample.update(_phases(c.log_path, offset, cid, start, start + wall))
                return sample

            zygote = paths.zygote_socket(run_root)

            def use_zygote(on: bool) -> None:
                """The shim finds the zygote by its path only: moved aside, it runs cold."""
                aside = f"{zygote}.off"
                with contextlib.suppress(FileNotFoundError):
                    os.rename(*((aside, zygote) if on else (zygote, aside)))

            def candidate(*runtime: str, phases: bool = False, via_zygote: bool = False):  # type: ignore[no-untyped-def]
                async def run(_i: int) -> Sample:
                    use_zygote(via_zygote)
                    return await asyncio.to_thread(ctr_run, *runtime, phases=phases)

                return run

            def virtc_factory(name: str):  # type: ignore[no-untyped-def]
                run = candidate(
                    "--runtime",
                    "io.containerd.virtc.v2",
                    "--runtime-config-path",
                    os.path.join(run_root, f"{name}.toml"),
                    phases=True,
                    via_zygote=name == "cache",
                )

                async def measured(i: int) -> Sample:
                    if name == "cache":
                        await pool_full(run_root, POOL, POOL_TIMEOUT)
                    return await run(i)  # type: ignore[no-any-return]

                return measured

            runs = opts.runs if not opts.quick else 2
            try:
                samples = await alternate(
                    {
                        "runc": candidate("--runc-root", runc_root),
                        "runsc": candidate("--runc-root", runc_root, "--runc-binary", wrapper),
                        "virtc": candidate("--runtime", "io.containerd.virtc.v2"),
                        "virtc_template": virtc_factory("template"),
                        "virtc_cache": virtc_factory("cache"),
                    },
                    runs,
                    opts.warmup,
                )
                use_zygote(True)
                zygote_memory = await asyncio.to_thread(_memory, c, image)
            finally:
                use_zygote(True)
                await stop_daemon(run_root)
                store.remove(TEMPLATE)
            startup = await alternate(
                {
                    "python_pass": _command([sys.executable, "-c", "pass"]),
                    "shim_version": _command([SHIM, "-v"]),
                },
                opts.scaled(3),
                opts.warmup,
            )
            samples.update(startup)
            memory = await asyncio.to_thread(_memory, c, image)
    if not host_run:  # the runc shim's sockets go to /run/containerd/s whatever its root
        with contextlib.suppress(OSError):
            shutil.rmtree("/run/containerd")
    add_metrics(result, samples)
    add_ratio(result, "virtc cold / runc", ("virtc", "wall"), ("runc", "wall"))
    add_ratio(result, "virtc cold / runsc", ("virtc", "wall"), ("runsc", "wall"))
    add_ratio(result, "runsc / runc", ("runsc", "wall"), ("runc", "wall"))
    for cand, how in (("virtc_template", "a template"), ("virtc_cache", "the VM cache")):
        add_ratio(
            result, f"virtc, VM from {how} / runsc", (cand, "wall"), ("runsc", "wall"),
            target=FACTORY_TARGET,
        )  # fmt: skip
        add_ratio(result, f"virtc, VM from {how} / runc", (cand, "wall"), ("runc", "wall"))
    add_ratio(
        result, "containerd-shim-virtc-v2 -v / python -c pass", ("shim_version", "wall"),
        ("python_pass", "wall"),
    )  # fmt: skip
    for cand, how in (("virtc_cache", "the VM cache"), ("virtc_template", "a template")):
        note = _breakdown(result, cand, how)
        if note:
            result["notes"].append(note)
    result["memory_mib"] = {**memory, "shim_pss_zygote": zygote_memory["shim_pss"]}
    result["notes"].append(
        f"shim server PSS forked from the zygote (its pages shared): "
        f"{zygote_memory['shim_pss']:.1f} MiB"
    )
    met = "met" if memory["shim_pss"] <= SHIM_PSS_LIMIT_MIB else "NOT met"
    result["notes"].append(
        f"shim server PSS {memory['shim_pss']:.1f} MiB (target <= {SHIM_PSS_LIMIT_MIB} MiB: "
        f"{met}); its VM (QEMU, virtiofsd, console keeper) {memory['vm_pss']:.1f} MiB"
    )
    return result


async def _factory(config: str, templates: str, run_root: str) -> TemplateStore:
    """Template `TEMPLATE`, made from the shim's config as the shim asks for VMs (virtio-fs),
    and the VM cache server (the run root's) filled with clones of it."""
    cfg = build_config(load_toml(config).config, {"shared_fs": "virtio-fs"}, HypervisorType.QEMU)
    store = TemplateStore(templates, run_root=run_root)
    await store.create(TEMPLATE, cfg)
    await start_daemon(
        DaemonSpec(size=POOL, template=TEMPLATE, template_root=templates), run_root=run_root
    )
    await pool_full(run_root, POOL, POOL_TIMEOUT)
    return store


def _breakdown(result: Result, cand: str, how: str) -> str:
    """The steps' medians grouped: whose time it is (they add up to about the wall median)."""
    steps = [median(result, cand, name) for name, _ in PHASES] + [median(result, cand, PHASE_END)]
    if any(s is None for s in steps):
        return ""
    t = dict(enumerate((float(s or 0) for s in steps), start=1))

    def total(*ns: int) -> str:
        return fmt_s(sum(t[n] for n in ns))

    return (
        f"`ctr run --rm` with a VM from {how}, step medians grouped (step numbers in the "
        f"table): ctr and containerd {total(1, 3, 7, 10, 15)} (1, 3, 7, 10, 15); the shim's "
        f"start {total(2)} (2: `start`'s interpreter and fork, the server's imports); Create "
        f"{total(4, 5, 6)} (rootfs mount {total(4)}, factory VM and its share {total(5)}, the "
        f"container made in the guest {total(6)}); Start until the agent has started vc-run "
        f"{total(8)}, then until the process's exit is seen {total(9)} (vc-run's set-up, "
        f"`true`, the namespaces' end); teardown {total(11, 12, 13, 14)} (Delete answered "
        f"{total(11)}, Shutdown sent {total(12)}, the rest of the VM's end (killed while "
        f"Delete answers), the root's unmount and the shim's exit {total(13)}, the `delete` "
        f"binary containerd runs and the bundle's removal {total(14)})"
    )


_LOG_TIME = re.compile(r'^time="([^".]+)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)"')


def _phases(log_path: str, offset: int, cid: str, start: float, end: float) -> Sample:
    """The steps of one `ctr run --rm` (`PHASES`) from containerd's log past `offset`; the
    shim's last lines may reach it a moment after ctr returned. {} when a step is missing."""
    deadline = time.monotonic() + 5
    while True:
        with open(log_path, "rb") as f:
            f.seek(offset)
            lines = f.read().decode(errors="replace").splitlines()
        times = [_first(lines, needle.format(cid=cid)) for _, needle in PHASES]
        if all(t is not None for t in times) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    if any(t is None for t in times):
        return {}
    out: Sample = {}
    before = start
    for (name, _), t in zip(PHASES, times, strict=True):
        assert t is not None
        out[name] = t - before
        before = t
    out[PHASE_END] = end - before
    return out


def _first(lines: list[str], needle: str) -> float | None:
    """The time (epoch seconds) of the first log line containing `needle`."""
    for line in lines:
        m = _LOG_TIME.match(line)
        if m and needle in line:
            when = datetime.datetime.fromisoformat(m.group(1) + m.group(3).replace("Z", "+00:00"))
            return when.timestamp() + float(f"0.{m.group(2) or 0}")
    return None


def _command(argv: list[str]):  # type: ignore[no-untyped-def]
    async def run(_i: int) -> Sample:
        return {"wall": await asyncio.to_thread(run_command, argv, dict(os.environ))}

    return run


def _memory(c, image: str) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """PSS (MiB) of the shim server and of its VM while `sleep` runs in a container."""
    cid = f"m{uuid.uuid4().hex[:8]}"
    c.ctr("run", "-d", "--fifo-dir", c.fifo_dir, "--runtime", "io.containerd.virtc.v2",
          image, cid, "sleep", "600", timeout=300)  # fmt: skip
    try:
        bundle = os.path.join(c.state, "io.containerd.runtime.v2.task", "vctest", cid)
        with open(os.path.join(bundle, "shim.pid")) as f:
            shim = int(f.read())
        kids = subprocess.run(
            ["pgrep", "-P", str(shim)], capture_output=True, text=True, check=False
        ).stdout.split()
        time.sleep(1)
        shim_pss = smaps_rollup(shim).get("Pss", 0) / (1 << 20)
        vm = vm_memory([int(k) for k in kids])
        return {"shim_pss": round(shim_pss, 1), "vm_pss": round(vm.get("Pss", 0) / (1 << 20), 1)}
    finally:
        c.ctr("task", "kill", "-s", "SIGKILL", cid, check=False)
        for _ in range(100):
            if (
                b"STOPPED" in c.ctr("task", "ls").stdout
                or cid.encode() not in c.ctr("task", "ls").stdout
            ):
                break
            time.sleep(0.2)
        c.ctr("task", "delete", cid, check=False)
        c.ctr("container", "delete", cid, check=False)


if __name__ == "__main__":
    sys.exit(main(bench, __doc__.splitlines()[0]))
