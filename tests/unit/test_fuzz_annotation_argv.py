"""Annotation attacks end to end (CVE-2020-27151 class): annotation -> config -> QEMU argv.

Whatever a pod's annotations say, the rendered QEMU command line carries no option the
attacker chose: attacks are refused with a clear `ConfigError`, and what is accepted lands
only where it is harmless (the guest kernel command line, plain flags, checked paths).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from virtcontainers.config import (
    ANNOTATION_PREFIX,
    KNOWN_ANNOTATIONS,
    UNSAFE_MACHINE_OPTIONS,
    HypervisorConfig,
    apply_annotations,
)
from virtcontainers.drivers.qemu import argv as qargv
from virtcontainers.errors import ConfigError, VCError

A = ANNOTATION_PREFIX
SAFE_TOKEN = re.compile(r"[+-]?[A-Za-z0-9_.:-]+(=[A-Za-z0-9_.:-]*)?")


def base_config(tmp: Path) -> HypervisorConfig:
    for name in ("vmlinuz", "initrd.img"):
        (tmp / name).write_bytes(b"x")
    return HypervisorConfig(
        kernel_path=str(tmp / "vmlinuz"),
        initrd_path=str(tmp / "initrd.img"),
        memory_size=256,
        enable_annotations=[".*"],
        hypervisor_path_list=["/usr/bin/qemu-system-x86_64"],
        virtio_fs_daemon_list=["/usr/lib/qemu/virtiofsd"],
        file_backed_mem_root_list=["/dev/shm"],
    )


def render(cfg: HypervisorConfig) -> list[str]:
    cfg.validate()
    spec = qargv.LaunchSpec(
        config=cfg,
        name="sb1",
        uuid="00000000-0000-0000-0000-000000000000",
        paths=qargv.VMPaths("/run/vc/vm/sb1"),
        qemu=cfg.hypervisor_asset_path() or "/usr/bin/qemu-system-x86_64",
        kernel=cfg.kernel_asset_path(),
        initrd=cfg.initrd_asset_path(),
        host_memory_mib=4096,
        host_cpus=2,
    )
    return qargv.build(spec).argv


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
        ]
    ),
)


def harmless(argv: list[str]) -> None:
    """MARK may only sit in the guest command line, a whole checked path, or plain flags."""
    for i, arg in enumerate(argv):
        assert "\n" not in arg
        if MARK not in arg or i == 0:
            continue
        opt = argv[i - 1]
        if opt == "-append":
            continue
        if opt in ("-kernel", "-initrd", "-bios"):  # guest assets: run inside the VM only
            assert "," not in arg
            continue
        assert opt in ("-machine", "-cpu"), (opt, arg)
        for token in arg.split(","):
            if MARK in token:
                assert SAFE_TOKEN.fullmatch(token), token
                key = token.lstrip("+-").split("=")[0].replace("_", "-")
                assert key not in UNSAFE_MACHINE_OPTIONS, token


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.dictionaries(st.sampled_from(sorted(KNOWN_ANNOTATIONS)), hostile, max_size=5))
def test_no_annotation_puts_an_attacker_option_on_the_qemu_command_line(
    tmp_path_factory: Any, annotations: dict[str, str]
) -> None:
    cfg = base_config(tmp_path_factory.mktemp("a"))
    try:
        apply_annotations(cfg, {A + k: v for k, v in annotations.items()})
        argv = render(cfg)
    except VCError:
        return
    harmless(argv)
