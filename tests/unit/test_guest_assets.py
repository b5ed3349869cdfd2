"""Guest asset building blocks: module planning, apt resolution memo, tools, cpio, cache."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

from cli_support import invoke
from virtcontainers.errors import AssetError
from virtcontainers.guest import assets, default_kernel_params, initrd, kernel, loops_per_jiffy
from virtcontainers.types import Param

# -- module planning -----------------------------------------------------------------------


def make_modules_tree(root: Path, dep: str, builtin: str = "") -> str:
    d = root / "lib" / "modules" / "6.1.0-test"
    d.mkdir(parents=True)
    (d / "modules.dep").write_text(dep)
    (d / "modules.builtin").write_text(builtin)
    return str(d)


V = "kernel/drivers/virtio"
DEP = f"""\
{V}/virtio_pci.ko: {V}/virtio_pci_legacy_dev.ko {V}/virtio.ko {V}/virtio_ring.ko
{V}/virtio_pci_legacy_dev.ko:
{V}/virtio.ko: {V}/virtio_ring.ko
{V}/virtio_ring.ko:
kernel/drivers/char/hw_random/virtio-rng.ko: {V}/virtio.ko {V}/virtio_ring.ko
kernel/drivers/block/virtio_blk.ko: {V}/virtio.ko {V}/virtio_ring.ko
"""


def test_plan_orders_dependencies_first(tmp_path: Path) -> None:
    mods = make_modules_tree(tmp_path, DEP, "kernel/crypto/crc32c_generic.ko\n")
    plan = kernel.plan_modules(mods, ["virtio_rng", "virtio_pci", "crc32c-generic"], ["nope"])
    order = [kernel.module_name(p) for p in plan.load_order]
    assert order == [
        "virtio_ring",
        "virtio",
        "virtio_rng",
        "virtio_pci_legacy_dev",
        "virtio_pci",
    ]
    assert plan.wanted == ("virtio_rng", "virtio_pci")
    assert plan.builtin == ("crc32c_generic",)
    assert plan.absent == ("nope",)
    assert plan.load_order[2] == "kernel/drivers/char/hw_random/virtio-rng.ko"


def test_plan_missing_required_module_is_an_error(tmp_path: Path) -> None:
    mods = make_modules_tree(tmp_path, DEP)
    with pytest.raises(AssetError, match="virtio_scsi"):
        kernel.plan_modules(mods, ["virtio_blk", "virtio_scsi"], [])


def test_plan_detects_cycles(tmp_path: Path) -> None:
    mods = make_modules_tree(tmp_path, "a.ko: b.ko\nb.ko: a.ko\n")
    with pytest.raises(AssetError, match="cycle"):
        kernel.plan_modules(mods, ["a"], [])


def test_module_name() -> None:
    assert kernel.module_name("kernel/fs/fuse/virtiofs.ko") == "virtiofs"
    assert kernel.module_name("x/virtio-rng.ko.xz") == "virtio_rng"


# -- kernel parameters ------------------------------------------------------------------------


def test_default_kernel_params() -> None:
    params = default_kernel_params()
    assert params[:3] == [Param("console", "ttyS0"), Param("quiet"), Param("panic", "1")]
    assert Param("tsc", "reliable") in params
    dbg = default_kernel_params("hvc0", debug=True, agent_port=2000, hostname="box")
    assert Param("quiet") not in dbg and Param("console", "hvc0") in dbg
    assert {
        Param("vc.debug", "1"),
        Param("vc.agent_port", "2000"),
        Param("vc.hostname", "box"),
    } <= set(dbg)
    bare = default_kernel_params(None, fast_boot=False)
    assert bare == [Param("quiet"), Param("panic", "1")]


# -- apt resolution ----------------------------------------------------------------------------


@pytest.fixture
def fake_apt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An apt-cache on PATH that answers from canned text and counts its calls."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    calls = tmp_path / "calls"
    script = bindir / "apt-cache"
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> {calls}\n'
        'case "$1" in\n'
        '  depends) printf "meta\\n  Depends: linux-image-9.9-cloud-amd64\\n";;\n'
        '  policy) printf "linux-image-9.9-cloud-amd64:\\n  Candidate: 9.9.1-1\\n";;\n'
        "esac\n"
    )
    script.chmod(0o755)
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "Packages").write_text("v1")
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    monkeypatch.setattr(kernel, "APT_LISTS", str(lists))
    monkeypatch.delenv("VC_KERNEL_DEB", raising=False)
    return tmp_path


def test_resolve_package_is_remembered_until_lists_change(fake_apt: Path) -> None:
    state = str(fake_apt / "state")
    pkg = kernel.resolve_package(state)
    assert pkg == kernel.KernelPackage("linux-image-9.9-cloud-amd64", "9.9.1-1")
    assert pkg.deb_name == "linux-image-9.9-cloud-amd64_9.9.1-1_amd64.deb"
    assert kernel.resolve_package(state) == pkg
    assert len((fake_apt / "calls").read_text().splitlines()) == 2
    (fake_apt / "lists" / "Packages").write_text("v2 longer")
    assert kernel.resolve_package(state) == pkg
    assert len((fake_apt / "calls").read_text().splitlines()) == 4


def test_resolve_package_without_candidate(fake_apt: Path) -> None:
    script = fake_apt / "bin" / "apt-cache"
    script.write_text(script.read_text().replace("9.9.1-1", "(none)"))
    with pytest.raises(AssetError, match="apt-get update"):
        kernel.resolve_package(str(fake_apt / "state"))


def test_kernel_deb_override_must_exist(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VC_KERNEL_DEB", str(tmp_path / "missing.deb"))
    with pytest.raises(AssetError, match=r"missing\.deb"):
        kernel.resolve_package(str(tmp_path))


# -- tools -------------------------------------------------------------------------------------


def test_missing_busybox_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VC_BUSYBOX", "/nonexistent/busybox")
    with pytest.raises(AssetError, match="apt-get install busybox-static"):
        initrd.busybox_path()


def test_dynamic_busybox_is_refused() -> None:
    with pytest.raises(AssetError, match="dynamically linked"):
        initrd.check_busybox_static("/bin/ls")


def test_missing_gcc_names_the_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(AssetError, match="apt-get install gcc"):
        initrd.compile_agent(str(tmp_path / "init"), str(tmp_path))


def test_missing_libc_a_names_the_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(initrd, "LIBC_A", str(tmp_path / "libc.a"))
    with pytest.raises(AssetError, match="libc6-dev"):
        initrd.compile_agent(str(tmp_path / "init"), str(tmp_path))


# -- module signatures ---------------------------------------------------------------------------


def _signed(body: bytes, sig: bytes) -> bytes:
    # struct module_signature: algo, hash, id_type, signer_len, key_id_len, pad[3], be32 sig_len
    info = struct.pack(">BBBBB3xI", 0, 0, 2, 0, 0, len(sig))
    return body + sig + info + initrd.MODULE_SIG_MARKER


def test_module_copied_without_its_signature(tmp_path: Path) -> None:
    body = b"\x7fELF" + bytes(range(256)) * 4
    src, dst = tmp_path / "m.ko", tmp_path / "out.ko"
    src.write_bytes(_signed(body, b"S" * 512))
    initrd.copy_unsigned_module(str(src), str(dst))
    assert dst.read_bytes() == body
    src.write_bytes(body)  # an unsigned module is copied as it is
    initrd.copy_unsigned_module(str(src), str(dst))
    assert dst.read_bytes() == body


def test_module_with_a_bad_signature_length_is_an_error(tmp_path: Path) -> None:
    src = tmp_path / "m.ko"
    info = struct.pack(">BBBBB3xI", 0, 0, 2, 0, 0, 1 << 20)  # longer than the file
    src.write_bytes(b"\x7fELF" + b"S" * 8 + info + initrd.MODULE_SIG_MARKER)
    with pytest.raises(AssetError, match=r"m\.ko: signature length 1048576 exceeds the file"):
        initrd.copy_unsigned_module(str(src), str(tmp_path / "out.ko"))
    src.write_bytes(b"abc" + initrd.MODULE_SIG_MARKER)
    with pytest.raises(AssetError, match="truncated signature"):
        initrd.copy_unsigned_module(str(src), str(tmp_path / "out.ko"))


# -- cpio ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("compression", "magic"),
    [("none", b"070701"), ("gzip", b"\x1f\x8b"), ("lz4", b"\x02\x21\x4c\x18")],
)
def test_write_cpio(tmp_path: Path, compression: str, magic: bytes) -> None:
    root = tmp_path / "root"
    (root / "bin").mkdir(parents=True)
    (root / "init").write_bytes(b"\x7fELF-ish\x00")
    (root / "init").chmod(0o755)
    os.symlink("/bin/busybox", root / "bin" / "sh")
    out = tmp_path / "initrd"
    initrd.write_cpio(str(root), str(out), compression)
    data = out.read_bytes()
    assert data.startswith(magic)
    raw = data
    if compression != "none":
        tool = {"gzip": "gzip", "lz4": "lz4"}[compression]
        raw = subprocess.run([tool, "-dc"], input=data, capture_output=True, check=True).stdout
    listing = subprocess.run(
        ["cpio", "-itv", "--quiet"], input=raw, capture_output=True, check=True
    ).stdout.decode()
    names = {
        line.split()[-1] if "->" not in line else line.split()[-3] for line in listing.splitlines()
    }
    assert names == {"bin", "bin/sh", "init"}
    assert "root     root" in listing
    assert not list(tmp_path.glob("initrd.*"))


def test_write_cpio_unknown_compression(tmp_path: Path) -> None:
    (tmp_path / "root").mkdir()
    with pytest.raises(AssetError, match="compression"):
        initrd.write_cpio(str(tmp_path / "root"), str(tmp_path / "out"), "brotli")


# -- cache ---------------------------------------------------------------------------------------


@pytest.fixture
def fake_build(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Replace the expensive parts: inputs are a dict the test edits, builds are counted."""
    state: dict[str, Any] = {
        "inputs": {"builder": 1, "kernel_package": "k", "kernel_package_version": "1"},
        "builds": 0,
        "fail": False,
        "gate": None,
    }

    def inputs(cache_dir: str) -> dict[str, Any]:
        return dict(state["inputs"])

    def build(inp: dict[str, Any], key: str, cache_dir: str, tmp: str) -> None:
        state["builds"] += 1
        if state["gate"] is not None:
            state["gate"].wait(5)
        if state["fail"]:
            raise AssetError("boom")
        out = Path(tmp) / "out"
        out.mkdir()
        (out / assets.KERNEL_FILE).write_bytes(b"kernel")
        (out / assets.INITRD_FILE).write_bytes(b"initrd")
        manifest = {
            "key": key,
            "inputs": inp,
            "kernel_version": "9.9",
            "modules": ["m"],
            "agent_version": "a",
        }
        (out / assets.MANIFEST).write_text(json.dumps(manifest))

    monkeypatch.setattr(assets, "_inputs", inputs)
    monkeypatch.setattr(assets, "_build", build)
    return state


def test_cache_reuses_and_rebuilds_on_input_change(
    tmp_path: Path, fake_build: dict[str, Any]
) -> None:
    first = assets.ensure_assets(str(tmp_path))
    assert first.built and fake_build["builds"] == 1
    assert Path(first.kernel).read_bytes() == b"kernel" and first.kernel_version == "9.9"
    again = assets.ensure_assets(str(tmp_path))
    assert not again.built and fake_build["builds"] == 1 and again.initrd == first.initrd
    fake_build["inputs"]["kernel_package_version"] = "2"
    newer = assets.ensure_assets(str(tmp_path))
    assert newer.built and newer.key != first.key and fake_build["builds"] == 2
    forced = assets.build_assets(force=True, cache_dir=str(tmp_path))
    assert forced.built and forced.key == newer.key and fake_build["builds"] == 3
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".build-") or p.startswith(".old-")]


def test_failed_build_leaves_nothing(tmp_path: Path, fake_build: dict[str, Any]) -> None:
    fake_build["fail"] = True
    with pytest.raises(AssetError, match="boom"):
        assets.ensure_assets(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == [assets.LOCK_FILE]
    info = assets.asset_info(str(tmp_path))
    assert info["status"] == "not built"


def test_concurrent_builders_build_once(tmp_path: Path, fake_build: dict[str, Any]) -> None:
    gate = threading.Event()
    fake_build["gate"] = gate
    results: list[assets.GuestAssets] = []
    threads = [
        threading.Thread(target=lambda: results.append(assets.ensure_assets(str(tmp_path))))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    gate.set()
    for t in threads:
        t.join(10)
    assert fake_build["builds"] == 1
    assert sorted(r.built for r in results) == [False, False, True]
    assert len({r.key for r in results}) == 1


def test_incomplete_entry_is_rebuilt(tmp_path: Path, fake_build: dict[str, Any]) -> None:
    first = assets.ensure_assets(str(tmp_path))
    os.unlink(first.initrd)
    assert assets.ensure_assets(str(tmp_path)).built


def test_asset_info(tmp_path: Path, fake_build: dict[str, Any]) -> None:
    assert assets.asset_info(str(tmp_path))["status"] == "not built"
    built = assets.ensure_assets(str(tmp_path))
    info = assets.asset_info(str(tmp_path))
    assert info["status"] == "built"
    assert info["kernel"] == built.kernel and info["kernel_size"] == len(b"kernel")
    assert info["key"] == built.key and info["kernel_version"] == "9.9"
    json.dumps(info)


def _stale_setup(tmp_path: Path, fake_build: dict[str, Any]) -> tuple[str, str]:
    """Two builds (the first now stale), a killed builder's leftover, and files not ours."""
    old = assets.ensure_assets(str(tmp_path)).key
    fake_build["inputs"]["kernel_package_version"] = "2"
    current = assets.ensure_assets(str(tmp_path)).key
    (tmp_path / ".build-killed" / "out").mkdir(parents=True)
    (tmp_path / ".build-killed" / "out" / "initrd.img").write_bytes(b"x" * 100)
    (tmp_path / "debs").mkdir()
    (tmp_path / "debs" / "k.deb").write_bytes(b"deb")
    (tmp_path / "notes").mkdir()  # not a name the cache makes: never touched
    return old, current


def test_prune_removes_only_stale_entries(tmp_path: Path, fake_build: dict[str, Any]) -> None:
    old, current = _stale_setup(tmp_path, fake_build)
    info = assets.asset_info(str(tmp_path))
    assert [e["name"] for e in info["stale"]] == [".build-killed", old]
    assert info["stale_size"] == 100 + len(b"kernel") + len(b"initrd") + len(
        (tmp_path / old / assets.MANIFEST).read_bytes()
    )
    listed = assets.prune_assets(str(tmp_path), dry_run=True)
    assert [e.name for e in listed] == [".build-killed", old] and (tmp_path / old).is_dir()
    removed = assets.prune_assets(str(tmp_path))
    assert [(e.name, e.size) for e in removed] == [(e.name, e.size) for e in listed]
    assert sorted(os.listdir(tmp_path)) == sorted([assets.LOCK_FILE, current, "debs", "notes"])
    assert not assets.ensure_assets(str(tmp_path)).built  # the current entry still serves
    assert assets.prune_assets(str(tmp_path)) == []
    assert assets.asset_info(str(tmp_path))["stale"] == []


def test_prune_without_a_cache_or_inputs(
    tmp_path: Path, fake_build: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert assets.prune_assets(str(tmp_path / "absent")) == []
    assert not (tmp_path / "absent").exists()
    old, _ = _stale_setup(tmp_path, fake_build)

    def no_inputs(cache_dir: str) -> dict[str, Any]:
        raise AssetError("no candidate for linux-image-cloud-amd64")

    monkeypatch.setattr(assets, "_inputs", no_inputs)
    with pytest.raises(AssetError, match="linux-image-cloud-amd64"):
        assets.prune_assets(str(tmp_path))
    assert (tmp_path / old).is_dir()  # without the current key nothing can be judged stale


def test_virtc_assets_prune(
    tmp_path: Path,
    fake_build: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    old, current = _stale_setup(tmp_path, fake_build)
    monkeypatch.setenv("VC_ASSETS_DIR", str(tmp_path))
    res = invoke(capsys, "--json", "assets", "prune", "--dry-run")
    assert res.code == 0, res.err
    doc = json.loads(res.out)
    assert doc["dry_run"] is True and [e["name"] for e in doc["stale"]] == [".build-killed", old]
    assert (tmp_path / old).is_dir()
    res = invoke(capsys, "assets", "prune")
    assert res.code == 0, res.err
    assert f"removed {tmp_path / old} (" in res.out and "removed 2 stale entries" in res.err
    assert not (tmp_path / old).exists() and (tmp_path / current).is_dir()


def test_unwritable_cache_dir(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(AssetError, match="assets cache"):
        assets.ensure_assets(str(blocker / "sub"))


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VC_ASSETS_DIR", "/x/y")
    assert assets.default_cache_dir() == "/x/y"
    monkeypatch.delenv("VC_ASSETS_DIR")
    expected = "/var/cache/virtcontainers/assets" if os.geteuid() == 0 else "virtcontainers/assets"
    assert assets.default_cache_dir().endswith(expected)


def test_agent_source_is_packaged() -> None:
    src = initrd.agent_source()
    assert b"VC-AGENT-READY" in src


# -- kernel features, PVH kernel, loops per jiffy -----------------------------------------------


def _unpacked(tmp_path: Path, config: str | None) -> kernel.UnpackedKernel:
    (tmp_path / "boot").mkdir()
    if config is not None:
        (tmp_path / "boot" / "config-9.9").write_text(config)
    return kernel.UnpackedKernel(str(tmp_path), "9.9", str(tmp_path / "boot" / "vmlinuz-9.9"))


@pytest.mark.parametrize(
    ("config", "hz", "pvh"),
    [
        ("CONFIG_HZ_250=y\nCONFIG_HZ=250\nCONFIG_PVH=y\n", 250, True),
        ("# CONFIG_PVH is not set\nCONFIG_HZ=1000\n", 1000, False),
        ("CONFIG_HZ=abc\n", 0, False),
        (None, 0, False),
    ],
)
def test_kernel_features(tmp_path: Path, config: str | None, hz: int, pvh: bool) -> None:
    assert kernel.read_features(_unpacked(tmp_path, config)) == kernel.KernelFeatures(hz, pvh)


def test_manifest_with_pvh_boots_the_elf_kernel(
    tmp_path: Path, fake_build: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    plain = assets.ensure_assets(str(tmp_path / "plain"))
    assert plain.kernel == plain.bzimage and plain.kernel_hz == 0
    fake = assets._build

    def build_pvh(inp: dict[str, Any], key: str, cache_dir: str, tmp: str) -> None:
        fake(inp, key, cache_dir, tmp)
        out = Path(tmp) / "out"
        (out / assets.VMLINUX_FILE).write_bytes(b"\x7fELF")
        doc = json.loads((out / assets.MANIFEST).read_text())
        doc["kernel_features"] = {"hz": 250, "pvh": True}
        (out / assets.MANIFEST).write_text(json.dumps(doc))

    monkeypatch.setattr(assets, "_build", build_pvh)
    pvh = assets.ensure_assets(str(tmp_path / "pvh"))
    assert pvh.kernel.endswith(assets.VMLINUX_FILE) and pvh.bzimage.endswith(assets.KERNEL_FILE)
    assert pvh.kernel_hz == 250
    os.unlink(pvh.kernel)  # an entry missing its ELF kernel is incomplete: rebuilt
    again = assets.ensure_assets(str(tmp_path / "pvh"))
    assert again.built and os.path.isfile(again.kernel)


def test_loops_per_jiffy() -> None:
    assert loops_per_jiffy(250, 2_300_000) == 9_200_000
    assert loops_per_jiffy(1000, 2_300_000) == 2_300_000
    assert loops_per_jiffy(0, 2_300_000) == 0  # kernel HZ unknown: the kernel calibrates
    assert loops_per_jiffy(250, 0) == 0  # no constant TSC rate
    assert Param("lpj", "9200000") in default_kernel_params(lpj=9_200_000)
    assert not [p for p in default_kernel_params() if p.key == "lpj"]


def test_input_files_are_hashed_again_only_once_changed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Each sandbox's configuration looks its assets up by the hashes of their input files
    (busybox, libseccomp): a file is hashed once, and again once it has changed."""
    hashed: list[str] = []
    real = initrd.file_sha256
    monkeypatch.setattr(initrd, "file_sha256", lambda p: hashed.append(p) or real(p))
    monkeypatch.setattr(assets, "_hashes", {})
    f = tmp_path / "busybox"
    f.write_bytes(b"one")
    first = assets._file_sha256(str(f))
    assert (assets._file_sha256(str(f)), hashed) == (first, [str(f)])
    f.write_bytes(b"two!")
    assert assets._file_sha256(str(f)) != first and hashed == [str(f)] * 2
