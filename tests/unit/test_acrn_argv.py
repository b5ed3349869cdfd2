"""The acrn-dm command line: slot layout, devices, kernel and boot args; checked by the fake's
parser, which refuses what the real device model refuses."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from fakes.acrn import acrn_dm
from virtcontainers.config import HypervisorConfig
from virtcontainers.devices import BlockDrive, NetworkEndpoint, SerialPort
from virtcontainers.drivers.acrn import argv as acrn_argv
from virtcontainers.errors import ConfigError
from virtcontainers.types import Param, Socket

UUID = "6c8f3b22-0a4e-4a51-9a9f-2f1c8f0c1a77"


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    out = {}
    for name in ("vmlinuz", "initrd.img", "rootfs.img", "data.img"):
        p = tmp_path / name
        p.write_bytes(b"x")
        out[name] = str(p)
    return out


def build(cfg: HypervisorConfig, **kw: Any) -> acrn_argv.AcrnLayout:
    args: dict[str, Any] = {
        "binary": "/usr/bin/acrn-dm",
        "name": "vm1",
        "uuid": UUID,
        "console_socket": "/run/vc/vm/vm1/console.sock",
        "serial_ports": [],
        "disks": [],
        "nets": [],
    }
    args.update(kw)
    return acrn_argv.build(cfg, **args)


def slots(argv: list[str]) -> dict[int, str]:
    out = {}
    for i, a in enumerate(argv):
        if a == "-s":
            slot, _, rest = argv[i + 1].partition(",")
            out[int(slot.split(":")[0])] = rest
    return out


def test_image_vm_layout(files: dict[str, str]) -> None:
    cfg = HypervisorConfig(
        kernel_path=files["vmlinuz"], image_path=files["rootfs.img"], num_vcpus=2, memory_size=512
    )
    cfg.validate()
    layout = build(
        cfg,
        disks=[BlockDrive("data", files["data.img"], read_only=True)],
        nets=[NetworkEndpoint("eth0", "tap0", mac="02:AB:00:00:00:01")],
        serial_ports=[
            SerialPort(Socket("channel0", "charch0", "/run/vc/vm/vm1/kata.sock", "agent.channel.0"))
        ],
    )
    argv = layout.argv
    assert argv[:4] == ["/usr/bin/acrn-dm", "-A", "-m", "512M"]
    assert argv[argv.index("--cpu_affinity") + 1] == "0,1"
    assert argv[argv.index("-U") + 1] == UUID
    assert argv[argv.index("-l") + 1] == "com1,stdio"
    assert argv[argv.index("-k") + 1] == files["vmlinuz"]
    assert "-r" not in argv
    assert argv[-1] == "vm1"
    s = slots(argv)
    assert s[0] == "hostbridge" and s[1] == "lpc"
    assert 2 not in s  # reserved for GVT-g
    assert s[3] == "virtio-console,@socket:console=/run/vc/vm/vm1/console.sock"
    assert s[4] == "virtio-console,socket:agent.channel.0=/run/vc/vm/vm1/kata.sock"
    assert s[5] == f"virtio-blk,{files['rootfs.img']}"
    assert s[6] == f"virtio-blk,{files['data.img']},ro"
    assert layout.pool_slots == list(range(7, 15))
    assert all(s[i] == "virtio-blk,nodisk" for i in layout.pool_slots)
    assert s[15] == "virtio-net,tap=tap0,mac=02:ab:00:00:00:01"
    assert layout.slots == {
        "console": 3,
        "agent.channel.0": 4,
        "rootfs": 5,
        "data": 6,
        "eth0": 15,
    }
    bootargs = argv[argv.index("-B") + 1].split()
    assert bootargs[:3] == ["tsc=reliable", "no_timer_check", "nohpet"]
    assert "root=/dev/vda1" in bootargs and "rw" in bootargs and "quiet" in bootargs


def test_fake_acrn_dm_accepts_the_argv(files: dict[str, str], monkeypatch: Any) -> None:
    cfg = HypervisorConfig(
        kernel_path=files["vmlinuz"],
        initrd_path=files["initrd.img"],
        kernel_params=[Param("agent.debug", "1")],
        debug=True,
    )
    cfg.validate()
    argv = build(cfg, nets=[NetworkEndpoint("eth0", "tap0")]).argv
    rec = acrn_dm.parse(argv[1:])
    assert rec["name"] == "vm1" and rec["uuid"] == UUID
    assert rec["ramdisk"] == files["initrd.img"]
    assert rec["memsize"] == "2048M"
    assert rec["bootargs"].endswith("debug agent.debug=1")
    assert "root=" not in rec["bootargs"]
    assert rec["slots"]["0:0"]["emul"] == "hostbridge"
    assert sum(1 for v in rec["slots"].values() if v["conf"] == "nodisk") == 8


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda a: a.__setitem__(a.index("-m") + 1, "lots"), "invalid memsize"),
        (lambda a: a.__setitem__(a.index("-U") + 1, "not-a-uuid"), "invalid uuid"),
        (lambda a: a.extend(["-s", "3,virtio-rnd"]), "slot 3:0 is already in use"),
        (lambda a: a.extend(["-s", "40,virtio-rnd"]), "invalid PCI slot 40"),
        (lambda a: a.extend(["-s", "20,virtio-gpu"]), "unknown PCI emulation"),
        (lambda a: a.extend(["-s", "20,virtio-blk,/nonexistent.img"]), "cannot open"),
        (lambda a: a.extend(["-s", "20,virtio-net,tap=x,mac=zz"]), "bad MAC"),
    ],
)
def test_fake_acrn_dm_refuses_bad_argv(
    files: dict[str, str], mutate: Any, message: str, capsys: Any
) -> None:
    cfg = HypervisorConfig(kernel_path=files["vmlinuz"], initrd_path=files["initrd.img"])
    cfg.validate()
    argv = build(cfg).argv[1:]
    name = argv.pop()
    mutate(argv)
    argv.append(name)
    with pytest.raises(SystemExit) as ei:
        acrn_dm.parse(argv)
    assert ei.value.code == 1
    assert message in capsys.readouterr().err


def test_out_of_slots_is_a_config_error(files: dict[str, str]) -> None:
    cfg = HypervisorConfig(kernel_path=files["vmlinuz"], initrd_path=files["initrd.img"])
    cfg.validate()
    nets = [NetworkEndpoint(f"e{i}", f"tap{i}") for i in range(25)]
    with pytest.raises(ConfigError, match="no PCI slot left for network endpoint"):
        build(cfg, nets=nets)


def test_paths_that_would_break_the_option_syntax_are_refused(files: dict[str, str]) -> None:
    cfg = HypervisorConfig(kernel_path=files["vmlinuz"], initrd_path=files["initrd.img"])
    cfg.validate()
    with pytest.raises(ConfigError, match="console socket"):
        build(cfg, console_socket="/run/with space/console.sock")


def test_vm_name_is_short_and_stable() -> None:
    assert acrn_argv.vm_name("sandbox-1") == "sandbox-1"
    long_id = "f" * 64
    name = acrn_argv.vm_name(long_id)
    assert len(name) <= acrn_argv.MAX_VM_NAME and name == acrn_argv.vm_name(long_id)
    assert name != acrn_argv.vm_name("e" * 64)
    assert os.path.basename(name) == name
