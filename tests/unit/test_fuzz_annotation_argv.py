"""Annotation attacks end to end (CVE-2020-27151 class): annotation -> config -> the QEMU
command line (root image and cold-plugged devices included) and virtiofsd's.

Whatever a pod's annotations say, no command line carries an option the attacker chose or a
host file the operator did not allow, and none grows with an attacker's integer: attacks are
refused with a clear `ConfigError`, and what is accepted lands only where it is harmless
(the guest kernel command line, plain -machine/-cpu flags, allowlisted virtiofsd options).
"""

from __future__ import annotations

import json
import os
import re
import resource
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from virtcontainers.config import (
    ANNOTATION_PREFIX,
    KNOWN_ANNOTATIONS,
    UNSAFE_MACHINE_OPTIONS,
    HypervisorConfig,
    apply_annotations,
)
from virtcontainers.devices import BlockDrive, Device, NetworkEndpoint, SharedFS
from virtcontainers.drivers import virtiofsd
from virtcontainers.drivers.qemu import argv as qargv
from virtcontainers.errors import ConfigError, VCError

A = ANNOTATION_PREFIX
SAFE_TOKEN = re.compile(r"[+-]?[A-Za-z0-9_.:-]+(=[A-Za-z0-9_.:-]*)?")


def base_config(tmp: Path, *, boot_image: bool = False) -> HypervisorConfig:
    """An operator's config: trusted assets in `tmp`, every allowlist naming only them."""
    for name in ("vmlinuz", "initrd.img", "rootfs.img", "disk.img"):
        (tmp / name).write_bytes(b"x" * 4096)
    (tmp / "share").mkdir(exist_ok=True)
    return HypervisorConfig(
        kernel_path=str(tmp / "vmlinuz"),
        initrd_path="" if boot_image else str(tmp / "initrd.img"),
        image_path=str(tmp / "rootfs.img") if boot_image else "",
        memory_size=256,
        shared_fs="virtio-fs",
        virtio_fs_daemon=VIRTIOFSD,
        enable_annotations=[".*"],
        hypervisor_path_list=["/usr/bin/qemu-system-x86_64"],
        virtio_fs_daemon_list=[VIRTIOFSD],
        file_backed_mem_root_list=["/dev/shm"],
        kernel_path_list=[str(tmp / "vmlinuz")],
        initrd_path_list=[str(tmp / "initrd.img")],
        image_path_list=[str(tmp / "rootfs.img")],
        firmware_path_list=[],
    )


VIRTIOFSD = virtiofsd.DEFAULT_VIRTIOFSD
VM_DIR = "/run/vc/vm/sb1"


@dataclass
class Rendered:
    """Every command line an accepted config turns into: QEMU's (with the root image and
    cold-plugged devices) and virtiofsd's for the shared directory."""

    qemu: list[str]
    virtiofsd: list[str]
    share: str
    trusted: set[str]


def render(cfg: HypervisorConfig) -> list[str]:
    return render_all(cfg).qemu


def render_all(cfg: HypervisorConfig) -> Rendered:
    cfg.validate()
    kernel = cfg.kernel_asset_path()
    tmp = Path(kernel).parent
    share = str(tmp / "share")
    image = cfg.image_asset_path()
    fs = SharedFS(id="s0", source=share, mount_tag="s0", fs_type=cfg.shared_fs or "virtio-9p")
    devices: list[Device] = [
        BlockDrive(id="disk0", path=str(tmp / "disk.img")),
        NetworkEndpoint(id="eth0", tap_name="tap0", mac="02:00:00:00:00:01", vhost=True),
        fs,
    ]
    spec = qargv.LaunchSpec(
        config=cfg,
        name="sb1",
        uuid="00000000-0000-0000-0000-000000000000",
        paths=qargv.VMPaths(VM_DIR),
        qemu=cfg.hypervisor_asset_path() or "/usr/bin/qemu-system-x86_64",
        kernel=kernel,
        initrd=cfg.initrd_asset_path(),
        image=image,
        image_size=os.stat(image).st_size if image else 0,
        host_memory_mib=4096,
        host_cpus=2,
        devices=devices,
    )
    qemu = qargv.build(spec).argv
    fsd = virtiofsd.argv(cfg, "qemu", fs, spec.paths.virtiofsd_socket("s0"))
    trusted = {str(tmp / n) for n in ("vmlinuz", "initrd.img", "rootfs.img", "disk.img")}
    return Rendered(qemu, fsd, share, trusted | {share})


ATTACKS = [
    ("machine_accelerators", "dumpdtb=/tmp/pwned", "dumpdtb"),
    ("machine_accelerators", "nosmm,kernel=evil", "kernel"),
    ("machine_accelerators", "memory-backend=ram9", "memory-backend"),
    ("machine_accelerators", "x=/etc/shadow", "plain flag"),
    ("machine_accelerators", "a b", "control character|plain flag"),
    ("cpu_features", "+x,y=/dev/mem", "plain flag"),
    ("kernel", "/tmp/k,file=/etc/shadow", ""),
    ("kernel", "/boot/../etc/shadow", "normalized"),
    ("initrd", "relative/initrd", "normalized"),
    ("path", "/usr/bin/qemu-system-x86_64,x", "not allowed"),
    ("path", "/bin/sh", "not allowed"),
    ("jailer_path", "/bin/sh", "not allowed"),
    ("ctlpath", "/bin/sh", "not allowed"),
    ("virtio_fs_daemon", "/bin/sh", "not allowed"),
    ("file_mem_backend", "/dev/shm,share=off", "not allowed"),
    ("file_mem_backend", "/dev/shm/../../etc", "normalized"),
    ("entropy_source", "/etc/shadow", "refused"),
    ("kernel_params", "quiet\ninit=/bin/sh", "control character"),
    ("virtio_fs_extra_args", "--thread-pool-size=1", "JSON list"),
    ("hypervisor_params", "-sandbox off", "Unknown hypervisor annotation"),
    ("machine_type", "q35,kernel=x", "invalid machine type"),
    ("kernel_hash", "0" * 128, "does not match"),
    ("default_memory", "99999999999", "not an integer"),
]


@pytest.mark.parametrize(("name", "value", "why"), ATTACKS, ids=[a[0] for a in ATTACKS])
def test_attack_is_refused(tmp_path: Path, name: str, value: str, why: str) -> None:
    cfg = base_config(tmp_path)
    with pytest.raises(ConfigError, match=why or "."):
        apply_annotations(cfg, {A + name: value})
        render(cfg)


def test_symlink_out_of_an_allowlist_is_refused(tmp_path: Path) -> None:
    cfg = base_config(tmp_path)
    link_dir = tmp_path / "bin"
    link_dir.mkdir()
    (link_dir / "qemu-system-x86_64").symlink_to("/bin/sh")
    cfg.hypervisor_path_list = [str(link_dir / "qemu-*")]
    with pytest.raises(ConfigError, match="resolves to"):
        apply_annotations(cfg, {A + "path": str(link_dir / "qemu-system-x86_64")})


def test_kernel_param_annotation_stays_in_the_guest_command_line(tmp_path: Path) -> None:
    cfg = base_config(tmp_path)
    apply_annotations(cfg, {A + "kernel_params": "init=/bin/sh quiet"})
    argv = render(cfg)
    [append] = [argv[i + 1] for i, a in enumerate(argv) if a == "-append"]
    assert "init=/bin/sh" in append.split(" ")
    assert not any("init=" in a for i, a in enumerate(argv) if argv[i - 1] != "-append")


def test_kernel_param_with_a_space_cannot_smuggle_another_param(tmp_path: Path) -> None:
    from virtcontainers.types import Param

    cfg = base_config(tmp_path)
    cfg.kernel_params = [Param("console", "ttyS0 init=/bin/sh")]
    with pytest.raises(ConfigError, match="kernel_params"):
        render(cfg)


MARK = "EVIL"
#: Host files an attacker would like the VM to read, attach or share.
SENSITIVE = ("/etc/shadow", "/dev/sda", "/dev/loop0", "/", "/root", "/proc/self/mem")
#: Pieces of virtiofsd command lines, allowed and not.
VIRTIOFSD_PIECES = [
    "-o",
    "source=/",
    "announce_submounts",
    "no_xattr,log_level=warn",
    "modcaps=+sys_admin",
    "cache=always",
    "--thread-pool-size=4",
    "--socket-path=/tmp/EVIL.sock",
    "--fd=3",
    "xattr,source=/",
]
hostile = st.one_of(
    st.text(alphabet=st.sampled_from(list("EVIL,=/.-_ \n:+x0[]\"'")), max_size=30),
    st.sampled_from(
        [
            "EVIL",
            "EVIL=1",
            "+EVIL",
            "EVIL,kernel=EVIL",
            "/dev/shm/EVIL",
            "/tmp/EVIL",
            '["EVIL"]',
            "init=/EVIL",
            "EVIL=x EVIL=y",
            "true",
            *SENSITIVE,
            '["-o", "source=/"]',
            '["-o", "modcaps=+sys_admin"]',
            '["--socket-path=/tmp/EVIL.sock"]',
            '["--thread-pool-size=1", "-o", "announce_submounts,source=/"]',
            '["-o", "sandbox=chroot", "--fd=3"]',
        ]
    ),
    # Large and edge integers: sizes and counts the command lines are built from.
    st.integers(min_value=0, max_value=2**32 - 1).map(str),
    st.sampled_from(["4294967295", "4294967296", "2147483648", "65536", "257", "17", "0"]),
    # Values some annotation accepts, so that configs get rendered, not only refused.
    st.sampled_from(["true", "false", "1", "2", "16", "virtio-fs", "virtio-9p", "virtio-blk"]),
    st.sampled_from(["none", "auto", "q35", "pc", "microvm", "/dev/urandom", "quiet"]),
    st.lists(st.sampled_from(VIRTIOFSD_PIECES), max_size=4).map(json.dumps),
)


def host_paths(arg: str) -> list[str]:
    """Every host path an argument names, whole (`/x`) or as an option value (`k=/x`)."""
    out = []
    for part in arg.split(","):
        value = part.split("=", 1)[1] if "=" in part else part
        if value.startswith("/"):
            out.append(value)
    return out


def harmless(argv: list[str]) -> None:
    """MARK may only sit in the guest command line or in plain -machine/-cpu flags; no
    attacker-named host file appears anywhere (guest assets included)."""
    for i, arg in enumerate(argv):
        assert "\n" not in arg
        opt = argv[i - 1] if i else ""
        if opt == "-append":
            continue
        for path in host_paths(arg):
            assert path not in SENSITIVE, (opt, arg)
        if MARK not in arg:
            continue
        assert i > 0 and opt in ("-machine", "-cpu"), (opt, arg)
        for token in arg.split(","):
            if MARK in token:
                assert SAFE_TOKEN.fullmatch(token), token
                key = token.lstrip("+-").split("=")[0].replace("_", "-")
                assert key not in UNSAFE_MACHINE_OPTIONS, token


#: virtiofsd options that change what is shared, how it is confined or where it listens.
VIRTIOFSD_CONTROL = ("source=", "modcaps", "sandbox", "allow_root", "socket", "--fd", "cache=")


def harmless_virtiofsd(r: Rendered) -> None:
    """virtiofsd shares the project's directory on the project's socket: no other argument
    controls either or names a host path, and the project's options come last."""
    fsd = r.virtiofsd
    assert fsd[0] == VIRTIOFSD
    ours = fsd.index(f"--socket-path={VM_DIR}/fs-s0.sock")
    assert fsd[ours + 1 : ours + 3] == ["-o", f"source={r.share}"]
    tail = fsd[ours + 3 :]
    assert tail[:1] == ["-o"] and tail[1].startswith("cache=") and tail[2:] in ([], ["-d"])
    for arg in fsd[1:ours] + tail[2:]:
        assert MARK not in arg and not host_paths(arg), arg
        assert not any(c in arg for c in VIRTIOFSD_CONTROL), arg


#: No accepted config makes a command line longer than this (root ports, bridges, slots...).
MAX_ARGV = 400
#: Address space a render may use beyond what the process has: a command line sized by an
#: attacker's integer would exhaust it (MemoryError) instead of the machine's memory.
RENDER_HEADROOM = 1 << 30


def render_bounded(cfg: HypervisorConfig) -> Rendered:
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as f:
        used = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    resource.setrlimit(resource.RLIMIT_AS, (used + RENDER_HEADROOM, hard))
    try:
        return render_all(cfg)
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


NUMBERS: tuple[str, ...] = (
    "default_vcpus",
    "default_maxvcpus",
    "default_memory",
    "memory_slots",
    "memory_offset",
)
NUMBERS += ("default_bridges", "msize_9p", "virtio_fs_cache_size", "pcie_root_port")
large_ints = st.one_of(
    st.integers(min_value=0, max_value=2**32 - 1),
    st.sampled_from([0, 1, 2, 16, 17, 256, 257, 4096, 65536, 2**31, 2**32 - 1]),
).map(str)


def plausible(name: str) -> st.SearchStrategy[str]:
    """A value of the annotation's own type (so configs often render), or a hostile one."""
    if name.startswith(("enable_", "disable_", "use_", "hotplug_", "block_device_cache")):
        return st.sampled_from(["true", "false"])
    if name in NUMBERS:
        return large_ints
    if name == "virtio_fs_extra_args":
        return st.lists(st.sampled_from(VIRTIOFSD_PIECES), min_size=1, max_size=4).map(json.dumps)
    if name in ("kernel", "image", "initrd", "firmware"):
        return st.sampled_from([*SENSITIVE, "/tmp/EVIL", "/dev/shm/EVIL"])
    if name in PLAUSIBLE:
        return st.sampled_from(PLAUSIBLE[name]) | hostile
    return hostile


PLAUSIBLE = {
    "shared_fs": ["virtio-fs", "virtio-9p"],
    "block_device_driver": ["virtio-scsi", "virtio-blk", "nvdimm"],
    "virtio_fs_cache": ["none", "auto", "always"],
    "machine_type": ["q35", "pc", "microvm"],
    "entropy_source": ["/dev/urandom"],
    "kernel_params": ["quiet", "init=/EVIL"],
}


#: Annotations that size the command lines or name host files: drawn more often.
RISKY = (*NUMBERS, "kernel", "image", "initrd", "firmware", "virtio_fs_extra_args")


@st.composite
def annotation_sets(draw: st.DrawFn) -> dict[str, str]:
    name = st.sampled_from(RISKY) | st.sampled_from(sorted(KNOWN_ANNOTATIONS))
    names = draw(st.lists(name, max_size=3, unique=True))
    return {n: draw(hostile if draw(st.integers(0, 3)) == 0 else plausible(n)) for n in names}


@settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck))
@given(annotation_sets(), st.booleans())
def test_no_annotation_puts_an_attacker_option_on_a_command_line(
    tmp_path_factory: Any, annotations: dict[str, str], boot_image: bool
) -> None:
    cfg = base_config(tmp_path_factory.mktemp("a"), boot_image=boot_image)
    try:
        apply_annotations(cfg, {A + k: v for k, v in annotations.items()})
        r = render_bounded(cfg)
    except VCError:
        event("refused")
        return
    event("rendered")
    harmless(r.qemu)
    harmless_virtiofsd(r)
    assert len(r.qemu) <= MAX_ARGV


@pytest.mark.parametrize(
    ("annotations", "why"),
    [
        ({"initrd": "/etc/shadow"}, "initrd"),
        ({"image": "/dev/loop0", "disable_image_nvdimm": "true"}, "image"),
        ({"kernel": "/proc/self/mem"}, "kernel"),
        ({"virtio_fs_extra_args": '["-o", "source=/"]'}, "virtio_fs_extra_args"),
        ({"virtio_fs_extra_args": '["-o", "modcaps=+sys_admin"]'}, "virtio_fs_extra_args"),
        ({"virtio_fs_extra_args": '["--socket-path=/tmp/x"]'}, "virtio_fs_extra_args"),
        ({"pcie_root_port": "4294967295"}, "pcie_root_port"),
        ({"memory_offset": "4294967295"}, "mem_offset"),
        ({"cpu_features": "EVIL,kernel=EVIL"}, "cpu_features"),
    ],
)
def test_issue_14_attacks_are_refused(
    tmp_path: Path, annotations: dict[str, str], why: str
) -> None:
    """The attacks the fuzzer must be able to find (items 2, 3 and 9 of the review)."""
    cfg = base_config(tmp_path, boot_image="image" in annotations)
    with pytest.raises(ConfigError, match=why):
        apply_annotations(cfg, {A + k: v for k, v in annotations.items()})
        render_bounded(cfg)
