"""Containers from images: `virtc run --image busybox -- true` against `virtc run -- true`
(alternated, same run; target <= 1.15x; `--net none` for both, the network's cost being
benchmarks/network.py's: `--net none` configures the guest's loopback with a NETWORK
request, which a `run` without a network does not send; the ratio against that run is
given too); the same from a VM template (`--from-template`, a template made
with `--virtio-fs` and the same config) and from the VM cache server (`--factory`, its pool
cloned from that template, each pooled VM's virtio-fs share already attached: see
factory/poolshare.py; the pool is full before every candidate's run, so that no pooled VM's
boot runs beside a measured command; the command served by a worker of the
server's zygote, pre-imported) against the cold one (its own interpreter: $VIRTC_NO_ZYGOTE,
as are the other candidates) (target <= 0.15x), with
where the factory run's time goes (the same hand-out in this process, by phase);
image import time and store size for the test images, and copying 100 MiB into and out of a
running container (`virtc cp`).

    [VC_BENCH_DEBIAN=1] .venv/bin/python benchmarks/images.py [--runs 10] [--quick] [--only A,B]

`--only` measures some candidates alone (e.g. `--only virtc_run_none,virtc_run_image` for the
cold ratio: no template, VM cache, import or cp), from CANDIDATES.

The busybox image is built from Debian's busybox-static (cached by its inputs); with
VC_BENCH_DEBIAN=1 it also imports the Debian bookworm + python3 image (mmdebstrap; the first
build takes minutes) and times `python3 -c pass` in it end to end.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
import time

from _lib import (
    Candidate,
    Options,
    Result,
    Sample,
    add_metrics,
    add_ratio,
    alternate,
    chosen,
    main,
    new_result,
    pool_full,
    temp_run_root,
)
from exec import run_virtc

from virtcontainers.images import ImageStore
from virtcontainers.images.build import busybox_image, debian_image
from virtcontainers.zygote.protocol import DISABLE_ENV as ZYGOTE_OFF

TITLE = "Containers from images: run --image vs run, from a template / the VM cache, import, cp"
RUN_TARGET = 1.15
FACTORY_TARGET = 0.15
TEMPLATE = "bench-img"
POOL = 2
POOL_TIMEOUT = 300.0
CP_BYTES = 100 << 20
DEBIAN = os.environ.get("VC_BENCH_DEBIAN") == "1"
"""Also the Debian image (`VC_BENCH_DEBIAN=1`): its first build takes minutes."""
WARM = ("virtc_run_image_template", "virtc_run_image_factory", "factory_phases")
CANDIDATES = (
    "import",
    "virtc_run",
    "virtc_run_none",
    "virtc_run_image",
    *WARM,
    "virtc_run_python",
    "cp",
)
"""What `--only` can name ("import": the images' imports, "cp": `virtc cp` in and out)."""


def _import(store_root: str, archive: str) -> Sample:
    """A fresh store each time: the whole import (digests, unpack), then its size."""
    shutil.rmtree(store_root, ignore_errors=True)
    store = ImageStore(store_root)
    t0 = time.perf_counter()
    store.import_archive(archive)
    t = time.perf_counter() - t0
    return {"import": t, "store_mib": store.disk_usage() / (1 << 20)}


async def bench(opts: Options) -> Result:
    result = new_result("images", TITLE, opts, unit="s")
    tmp = tempfile.mkdtemp(prefix="vcb-img-", dir=os.environ.get("VC_BENCH_TMPDIR", "/tmp"))
    samples: dict[str, dict[str, list[float]]] = {}
    try:
        archives = {"busybox": busybox_image()}
        if DEBIAN:
            archives["debian"] = debian_image()
        for name, archive in archives.items() if chosen(opts, CANDIDATES, "import") else ():
            runs = [_import(os.path.join(tmp, f"import-{name}"), archive) for _ in range(3)]
            samples[f"import_{name}"] = {
                "import": [r["import"] for r in runs],
            }
            result.setdefault("store_mib", {})[name] = round(runs[-1]["store_mib"], 1)
        store_root = os.path.join(tmp, "store")
        ImageStore(store_root).import_archive(archives["busybox"])
        if DEBIAN:
            ImageStore(store_root).import_archive(archives["debian"])
        async with temp_run_root() as run_root:
            env = dict(os.environ, VC_RUN_ROOT=run_root, VC_IMAGE_ROOT=store_root)
            # Cold runs are cold: each its own interpreter, never a worker of the zygote the
            # VM cache server runs (only `--factory`, which needs that server, uses it).
            env.pop(ZYGOTE_OFF, None)
            cold = dict(env, **{ZYGOTE_OFF: "1"})
            warm = chosen(opts, CANDIDATES, *WARM)

            async def settled() -> None:
                """The VM cache's pool full, when there is one: no refill beside a command."""
                if warm:
                    await pool_full(run_root, POOL, POOL_TIMEOUT)

            async def run_plain(_i: int) -> Sample:
                await settled()
                return {"wall": await asyncio.to_thread(run_virtc, ["run", "--", "true"], cold)}

            async def run_none(_i: int) -> Sample:
                await settled()
                args = ["run", "--net", "none", "--", "true"]
                return {"wall": await asyncio.to_thread(run_virtc, args, cold)}

            async def run_image(_i: int) -> Sample:
                await settled()
                args = ["run", "--net", "none", "--image", "busybox", "--", "true"]
                return {"wall": await asyncio.to_thread(run_virtc, args, cold)}

            cands: dict[str, Candidate] = {
                "virtc_run": run_plain,
                "virtc_run_none": run_none,
                "virtc_run_image": run_image,
            }
            if warm:
                await asyncio.to_thread(
                    run_virtc, ["template", "create", TEMPLATE, "--virtio-fs"], env
                )
                await asyncio.to_thread(
                    run_virtc,
                    ["factory", "init", "--template", TEMPLATE, "--size", str(POOL), "--wait"],
                    env,
                )
            image_true = ["--image", "busybox", "--", "true"]

            async def run_template(_i: int) -> Sample:
                await settled()
                args = ["run", "--from-template", TEMPLATE, *image_true]
                return {"wall": await asyncio.to_thread(run_virtc, args, cold)}

            async def run_factory(_i: int) -> Sample:
                await settled()
                args = ["run", "--factory", *image_true]
                return {"wall": await asyncio.to_thread(run_virtc, args, env)}

            async def factory_phases(_i: int) -> Sample:
                await settled()
                return await _handout_phases(run_root, store_root)

            cands["virtc_run_image_template"] = run_template
            cands["virtc_run_image_factory"] = run_factory
            cands["factory_phases"] = factory_phases
            if DEBIAN:

                async def run_python(_i: int) -> Sample:
                    image = "debian-python:bookworm"
                    args = ["run", "--net", "none", "--image", image, "--", "python3", "-c", "pass"]
                    return {"wall": await asyncio.to_thread(run_virtc, args, cold)}

                cands["virtc_run_python"] = run_python
            cands = {k: v for k, v in cands.items() if chosen(opts, CANDIDATES, k)}
            print("virtc run --image busybox -- true vs virtc run -- true", flush=True)
            try:
                samples.update(await alternate(cands, opts.runs, opts.warmup, settle=0.5))
            finally:
                if warm:
                    await asyncio.to_thread(run_virtc, ["factory", "destroy"], env)
                    await asyncio.to_thread(run_virtc, ["template", "rm", TEMPLATE], env)
            if chosen(opts, CANDIDATES, "cp"):
                samples.update(await _copy(opts, env, tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    add_metrics(result, samples)
    add_ratio(
        result,
        "run --net none --image busybox -- true / run --net none -- true",
        ("virtc_run_image", "wall"),
        ("virtc_run_none", "wall"),
        target=RUN_TARGET,
    )
    add_ratio(
        result,
        "run --net none --image busybox -- true / run -- true (no network)",
        ("virtc_run_image", "wall"),
        ("virtc_run", "wall"),
    )
    for cand, how in (("template", "a template"), ("factory", "the VM cache")):
        add_ratio(
            result,
            f"run --image busybox -- true from {how} / cold",
            (f"virtc_run_image_{cand}", "wall"),
            ("virtc_run_image", "wall"),
            target=FACTORY_TARGET,
        )
    phases = result["metrics"].get("factory_phases", {})
    if phases and "virtc_run_image_factory" in result["metrics"]:
        cli = result["metrics"]["virtc_run_image_factory"]["wall"]["median"]
        parts = {k: v["median"] for k, v in phases.items() if k != "total"}
        rest = cli - phases["total"]["median"]
        result["notes"].append(
            "where `virtc run --factory --image busybox -- true` spends its time (medians, the "
            "same work in this process by phase): "
            + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in parts.items())
            + f"; the rest of the command's median, {rest * 1000:.0f} ms, is the CLI's own "
            "(its client's interpreter start-up, the zygote's fork, argument parsing)"
        )
    for name, mib in result.get("store_mib", {}).items():
        result["notes"].append(f"store size after importing {name}: {mib} MiB")
    return result


async def _handout_phases(run_root: str, store_root: str) -> Sample:
    """What `virtc run --factory --image busybox -- true` does once started, in this process,
    timed by phase: the VM (GetBaseVM, take-over, resume, agent, guest RNG and clock), its
    container's root in the VM's staged share, the container's run, the stop."""
    from virtcontainers.factory import Factory, adopt_vm

    t0 = time.perf_counter()
    async with await Factory.connect(run_root=run_root) as factory:
        vm = await factory.get_vm()
    t1 = time.perf_counter()
    sb = await adopt_vm(vm, run_root=run_root, image="busybox", image_store=store_root)
    try:
        await sb.share_workload()
        t2 = time.perf_counter()
        result = await (await sb.create_container(["true"])).run()
        t3 = time.perf_counter()
    finally:
        await sb.stop()
    t4 = time.perf_counter()
    if result.exit_code != 0:
        raise RuntimeError(f"the container failed: {result}")
    return {
        "vm": t1 - t0,
        "share": t2 - t1,
        "container": t3 - t2,
        "stop": t4 - t3,
        "total": t4 - t0,
    }


def _write_blob(path: str) -> None:
    with open(path, "wb") as f:
        f.write(os.urandom(CP_BYTES))


async def _copy(opts: Options, env: dict[str, str], tmp: str) -> dict[str, dict[str, list[float]]]:
    """`virtc cp` of a 100 MiB file into a detached container and back out."""
    src = os.path.join(tmp, "blob")
    await asyncio.to_thread(_write_blob, src)
    sid = "cpbench"
    await asyncio.to_thread(
        run_virtc,
        ["run", "-d", "--net", "none", "--name", sid, "--image", "busybox", "--", "sleep", "3600"],
        env,
    )
    try:

        async def cp_in(i: int) -> Sample:
            args = ["cp", src, f"{sid}:/tmp/blob{i}"]
            return {"wall": await asyncio.to_thread(run_virtc, args, env)}

        async def cp_out(i: int) -> Sample:
            out = os.path.join(tmp, f"out{i}")
            args = ["cp", f"{sid}:/tmp/blob-src", out]
            t = await asyncio.to_thread(run_virtc, args, env)
            if os.path.getsize(out) != CP_BYTES:
                raise RuntimeError(f"virtc cp out: {os.path.getsize(out)} bytes")
            os.unlink(out)
            return {"wall": t}

        await asyncio.to_thread(run_virtc, ["cp", src, f"{sid}:/tmp/blob-src"], env)
        print("virtc cp of 100 MiB in and out", flush=True)
        return await alternate({"cp_in": cp_in, "cp_out": cp_out}, opts.runs, opts.warmup)
    finally:
        await asyncio.to_thread(run_virtc, ["stop", sid], env)


if __name__ == "__main__":
    sys.exit(main(bench, __doc__.splitlines()[0]))
