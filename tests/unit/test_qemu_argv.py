"""The QEMU command line builder: argv per machine type and per config switch."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from virtcontainers.config import HypervisorConfig
from virtcontainers.devices import (
    BlockDrive,
    NetworkEndpoint,
    SerialPort,
    SharedFS,
    UserNetwork,
    VSockDevice,
)
from virtcontainers.drivers.qemu import argv as qa
from virtcontainers.drivers.qemu import machine_capabilities
from virtcontainers.errors import ConfigError, UnsupportedError
from virtcontainers.types import Capabilities, Param, Socket, VSock

PATHS = qa.VMPaths("/run/vc/vm/sb1")


def make_spec(devices: Sequence[Any] = (), **cfg: Any) -> qa.LaunchSpec:
    kw: dict[str, Any] = {"kernel_path": "/k/vmlinuz", "initrd_path": "/k/initrd.img"}
    kw.update(cfg)
    config = HypervisorConfig(**kw)
    config.validate()
    return qa.LaunchSpec(
        config=config,
        name="sb1",
        uuid="0f0f0f0f-0000-4000-8000-000000000001",
        paths=PATHS,
        qemu="/usr/bin/qemu-system-x86_64",
        kernel=config.kernel_path,
        initrd=config.initrd_path,
        image=config.image_path,
        image_size=64 << 20 if config.image_path else 0,
        accel="tcg",
        qmp_fd=7,
        host_memory_mib=8192,
        host_cpus=4,
        devices=list(devices),
    )


def opts(argv: list[str], flag: str) -> list[str]:
    """Every value given to `flag`."""
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag]


def one(argv: list[str], flag: str) -> str:
    values = opts(argv, flag)
    assert len(values) == 1, (flag, values)
    return values[0]


def append_params(argv: list[str]) -> list[str]:
    return one(argv, "-append").split(" ")


def test_q35_default_command_line() -> None:
    launch = qa.build(make_spec())
    argv = launch.argv
    assert argv[0] == "/usr/bin/qemu-system-x86_64"
    assert one(argv, "-machine") == "q35"
    assert one(argv, "-accel") == "tcg,thread=multi"
    assert one(argv, "-cpu") == "max"
    assert one(argv, "-smp") == "1,maxcpus=4"
    assert one(argv, "-m") == "2048M,slots=10,maxmem=8192M"
    for flag in ("-nodefaults", "-nographic", "-no-user-config", "-no-reboot"):
        assert flag in argv
    assert "-daemonize" not in argv
    assert one(argv, "-name") == "sandbox-sb1,debug-threads=on"
    assert one(argv, "-kernel") == "/k/vmlinuz"
    assert one(argv, "-initrd") == "/k/initrd.img"
    roots = [d for d in opts(argv, "-device") if d.startswith("pcie-root-port")]
    assert roots == [
        "pcie-root-port,id=rp0,bus=pcie.0,chassis=1",
        "pcie-root-port,id=rp1,bus=pcie.0,chassis=2",
    ]
    assert "virtio-scsi-pci,id=scsi0" in opts(argv, "-device")  # the default block driver
    assert one(argv, "-sandbox") == (
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
    )
    assert launch.pass_fds == [7]
    assert "-incoming" not in argv


def test_qmp_monitors_pre_connected_fd_and_named_socket() -> None:
    argv = qa.build(make_spec()).argv
    chardevs = opts(argv, "-chardev")
    assert "socket,id=qmp,fd=7" in chardevs
    assert "socket,id=qmp-named,path=/run/vc/vm/sb1/qmp.sock,server=on,wait=off" in chardevs
    assert opts(argv, "-mon") == ["chardev=qmp,mode=control", "chardev=qmp-named,mode=control"]


def test_no_qmp_fd_means_only_named_monitor() -> None:
    spec = make_spec()
    spec.qmp_fd = None
    launch = qa.build(spec)
    assert opts(launch.argv, "-mon") == ["chardev=qmp-named,mode=control"]
    assert launch.pass_fds == []


def test_console_on_socket_with_log_file() -> None:
    argv = qa.build(make_spec()).argv
    assert (
        "socket,id=console0,path=/run/vc/vm/sb1/console.sock,server=on,wait=off,"
        "logfile=/run/vc/vm/sb1/console.log"
    ) in opts(argv, "-chardev")
    assert one(argv, "-serial") == "chardev:console0"
    assert "console=ttyS0" in append_params(argv)


def test_hvc0_console_uses_virtconsole() -> None:
    spec = make_spec()
    spec.console = "hvc0"
    argv = qa.build(spec).argv
    assert "-serial" not in argv
    assert "virtconsole,chardev=console0,id=console0" in opts(argv, "-device")
    assert "console=hvc0" in append_params(argv)


def test_kernel_params_order_and_last_wins() -> None:
    spec = make_spec(kernel_params=[Param("quiet"), Param("panic", "5"), Param("foo", "bar")])
    params = qa.kernel_params(spec)
    keys = [p.key for p in params]
    assert keys[0] == "console"
    # Kata's fast-boot params come first, in their order.
    fast = [p.key for p in qa.FAST_BOOT_PARAMS]
    assert [k for k in keys if k in fast] == fast
    assert Param("panic", "5") in params and Param("panic", "1") not in params
    assert keys.count("quiet") == 1
    assert params[-1] == Param("foo", "bar")
    assert Param("nr_cpus", "4") in params
    rendered = append_params(qa.build(spec).argv)
    assert rendered[-3:] == ["quiet", "panic=5", "foo=bar"]


def test_debug_switches_kernel_verbosity() -> None:
    quiet = qa.kernel_params(make_spec())
    debug = qa.kernel_params(make_spec(debug=True))
    assert Param("quiet") in quiet and Param("debug") not in quiet
    assert Param("debug") in debug and Param("quiet") not in debug


def test_scsi_driver_late_only_without_cold_plugged_scsi_disks() -> None:
    late = qa.SCSI_LATE_PARAM
    assert late in qa.kernel_params(make_spec())  # the controller, no disk on it
    scsi = BlockDrive(id="d1", path="/d1.img")  # the config's driver: virtio-scsi
    assert late not in qa.kernel_params(make_spec([scsi]))
    blk = BlockDrive(id="d0", path="/d0.img", driver="virtio-blk")
    assert late in qa.kernel_params(make_spec([blk]))
    assert late not in qa.kernel_params(make_spec([blk, scsi]))
    # No controller at all: nothing to say.
    assert late not in qa.kernel_params(make_spec(block_device_driver="virtio-blk"))
    assert late not in append_params(qa.build(make_spec([scsi])).argv)
    assert "vc.scsi=late" in append_params(qa.build(make_spec()).argv)


def test_vcpus_and_max_bounded_by_host() -> None:
    argv = qa.build(make_spec(num_vcpus=2, default_max_vcpus=16)).argv
    assert one(argv, "-smp") == "2,maxcpus=4"
    argv = qa.build(make_spec(num_vcpus=2, default_max_vcpus=3)).argv
    assert one(argv, "-smp") == "2,maxcpus=3"


def test_maxmem_never_below_memory() -> None:
    spec = make_spec(memory_size=16384, mem_slots=4)
    assert one(qa.build(spec).argv, "-m") == "16384M,slots=4,maxmem=16384M"


def test_microvm() -> None:
    argv = qa.build(make_spec(hypervisor_machine_type="microvm", num_vcpus=2)).argv
    assert one(argv, "-machine") == "microvm,pit=on,pic=on,rtc=on,isa-serial=on,acpi=on"
    assert one(argv, "-m") == "2048M"  # no hotplug slots
    assert one(argv, "-smp") == "2,maxcpus=2"
    devices = opts(argv, "-device")
    assert not [d for d in devices if d.startswith("pcie-root-port")]
    assert "virtio-scsi-device,id=scsi0" in devices
    assert not [d for d in devices if "-pci" in d.split(",")[0]]
    assert "pci=lastbus=0" not in append_params(argv)


@pytest.mark.parametrize("fs_type", ["virtio-fs", "virtio-9p"])
def test_microvm_takes_no_shared_filesystem(fs_type: str) -> None:
    """Nothing shows a share working on microvm: refused, and not claimed."""
    fs = SharedFS(id="fs0", source="/srv/share", mount_tag="share", fs_type=fs_type)
    spec = make_spec([fs], hypervisor_machine_type="microvm", shared_fs=fs_type)
    with pytest.raises(UnsupportedError, match="microvm machine type"):
        qa.build(spec)
    assert Capabilities.FS_SHARING not in machine_capabilities("microvm")
    assert Capabilities.FS_SHARING in machine_capabilities("q35")


def test_microvm_under_kvm_drops_legacy_timers() -> None:
    spec = make_spec(hypervisor_machine_type="microvm")
    spec.accel = "kvm"
    argv = qa.build(spec).argv
    assert one(argv, "-machine").startswith("microvm,pit=off,pic=off")
    assert one(argv, "-accel") == "kvm"
    assert one(argv, "-cpu") == "host"


def test_pc_uses_pci_bridges() -> None:
    argv = qa.build(make_spec(hypervisor_machine_type="pc", default_bridges=2)).argv
    assert one(argv, "-machine") == "pc"
    devices = opts(argv, "-device")
    assert "pci-bridge,id=pci-bridge-0,bus=pci.0,chassis_nr=1,shpc=on" in devices
    assert "pci-bridge,id=pci-bridge-1,bus=pci.0,chassis_nr=2,shpc=on" in devices
    assert not [d for d in devices if d.startswith("pcie-root-port")]


def test_unknown_machine_type_refused() -> None:
    with pytest.raises(ConfigError, match=r"hypervisor_machine_type.*virt"):
        qa.build(make_spec(hypervisor_machine_type="virt"))


def test_root_port_count_from_config() -> None:
    devices = opts(qa.build(make_spec(pcie_root_port=5)).argv, "-device")
    assert len([d for d in devices if d.startswith("pcie-root-port")]) == 5


def test_template_memory_backends() -> None:
    argv = qa.build(make_spec(boot_to_be_template=True, memory_path="/tpl/mem")).argv
    assert one(argv, "-object") == (
        "memory-backend-file,id=ram0,size=2048M,mem-path=/tpl/mem,share=on"
    )
    assert one(argv, "-machine") == "q35,memory-backend=ram0"
    assert "spawn=deny" in one(argv, "-sandbox")  # the state file is passed as an fd
    assert "-incoming" not in argv

    argv = qa.build(
        make_spec(boot_from_template=True, memory_path="/tpl/mem", devices_state_path="/tpl/st")
    ).argv
    assert one(argv, "-object") == (
        "memory-backend-file,id=ram0,size=2048M,mem-path=/tpl/mem,share=off"
    )
    assert one(argv, "-incoming") == "defer"
    assert "spawn=deny" in one(argv, "-sandbox")

    # A clone for virtio-fs: memory_path is its own copy, mapped shared (virtiofsd maps it).
    argv = qa.build(
        make_spec(
            boot_from_template=True,
            shared_fs="virtio-fs",
            memory_path="/proc/1/fd/9",
            devices_state_path="/tpl/st",
        )
    ).argv
    assert one(argv, "-object") == (
        "memory-backend-file,id=ram0,size=2048M,mem-path=/proc/1/fd/9,share=on"
    )


def test_hugepages_prealloc_and_plain_prealloc() -> None:
    argv = qa.build(make_spec(huge_pages=True, mem_prealloc=True)).argv
    assert one(argv, "-object") == (
        "memory-backend-file,id=ram0,size=2048M,mem-path=/dev/hugepages,share=on,prealloc=on"
    )
    argv = qa.build(make_spec(mem_prealloc=True)).argv
    assert one(argv, "-object") == "memory-backend-ram,id=ram0,size=2048M,prealloc=on"


def test_virtio_fs_needs_shared_memory() -> None:
    argv = qa.build(make_spec(shared_fs="virtio-fs")).argv
    assert one(argv, "-object") == "memory-backend-memfd,id=ram0,size=2048M,share=on"


def test_image_as_nvdimm_and_as_virtio_blk() -> None:
    spec = make_spec(image_path="/k/rootfs.img", initrd_path="")
    argv = qa.build(spec).argv
    assert one(argv, "-machine") == "q35,nvdimm=on"
    assert (
        "memory-backend-file,id=image-mem0,mem-path=/k/rootfs.img,size=67108864,"
        "readonly=on,share=on" in opts(argv, "-object")
    )
    assert "nvdimm,id=image-nv0,memdev=image-mem0,unarmed=on" in opts(argv, "-device")
    assert one(argv, "-m") == "2048M,slots=10,maxmem=8256M"  # host memory + image
    assert "root=/dev/pmem0p1" in append_params(argv)
    assert "-initrd" not in argv

    spec = make_spec(image_path="/k/rootfs.img", initrd_path="", disable_image_nvdimm=True)
    argv = qa.build(spec).argv
    assert one(argv, "-blockdev") == (
        "node-name=image0,driver=raw,file.driver=file,file.filename=/k/rootfs.img,read-only=on"
    )
    assert "virtio-blk-pci,drive=image0,id=image-blk0" in opts(argv, "-device")
    assert "root=/dev/vda1" in append_params(argv)


def test_rng_from_entropy_source() -> None:
    argv = qa.build(make_spec(entropy_source="/dev/urandom")).argv
    assert "rng-random,id=rng0,filename=/dev/urandom" in opts(argv, "-object")
    assert "virtio-rng-pci,rng=rng0,id=rng-dev0" in opts(argv, "-device")
    assert "virtio-rng-pci" not in " ".join(qa.build(make_spec()).argv)


def test_machine_accelerators_cpu_features_hypervisor_params() -> None:
    spec = make_spec(
        machine_accelerators="kernel_irqchip=on",
        cpu_features="pmu=off",
        hypervisor_params=[Param("-global", "foo.bar=1"), Param("no-hpet")],
    )
    argv = qa.build(spec).argv
    assert one(argv, "-machine") == "q35,kernel_irqchip=on"
    assert one(argv, "-cpu") == "max,pmu=off"
    assert argv[-3:] == ["-global", "foo.bar=1", "-no-hpet"]


def test_block_device_driver_virtio_blk_has_no_scsi_controller() -> None:
    drive = BlockDrive(id="d0", path="/data/disk.img")
    argv = qa.build(make_spec([drive], block_device_driver="virtio-blk")).argv
    devices = opts(argv, "-device")
    assert not [d for d in devices if d.startswith("virtio-scsi")]
    assert "virtio-blk-pci,drive=d0,id=blk-d0" in devices
    assert "node-name=d0,driver=raw,file.driver=file,file.filename=/data/disk.img" in opts(
        argv, "-blockdev"
    )


def test_scsi_drive_and_cache_options() -> None:
    drive = BlockDrive(
        id="d1", path="/data/d.qcow2", format="qcow2", read_only=True, scsi_addr="2:0"
    )
    spec = make_spec([drive], block_device_cache_set=True, block_device_cache_direct=True)
    argv = qa.build(spec).argv
    assert one(argv, "-blockdev") == (
        "node-name=d1,driver=qcow2,file.driver=file,file.filename=/data/d.qcow2,read-only=on,"
        "cache.direct=on,cache.no-flush=off"
    )
    assert "scsi-hd,bus=scsi0.0,channel=0,scsi-id=2,lun=0,drive=d1,id=scsi-d1" in opts(
        argv, "-device"
    )


def test_agent_serial_port_and_vsock() -> None:
    port = SerialPort(Socket("channel0", "charch0", "/run/vc/vm/sb1/kata.sock", "agent.channel.0"))
    vsock = VSockDevice(VSock(vhost_fd=9, context_id=42, port=1024))
    launch = qa.build(make_spec([port, vsock]))
    argv = launch.argv
    assert "socket,id=charch0,path=/run/vc/vm/sb1/kata.sock,server=on,wait=off" in opts(
        argv, "-chardev"
    )
    devices = opts(argv, "-device")
    assert "virtio-serial-pci,id=serial0" in devices
    assert (
        "virtserialport,bus=serial0.0,chardev=charch0,name=agent.channel.0,id=channel0" in devices
    )
    assert "vhost-vsock-pci,id=vsock-42,guest-cid=42,vhostfd=9" in devices
    assert launch.pass_fds == [7, 9]


def test_network_tap_multiqueue() -> None:
    ep = NetworkEndpoint(id="eth0", tap_name="tap0", mac="02:00:00:00:00:01", queues=4, vhost=True)
    argv = qa.build(make_spec([ep])).argv
    assert one(argv, "-netdev") == (
        "tap,id=netdev-eth0,ifname=tap0,script=no,downscript=no,vhost=on,queues=4"
    )
    assert (
        "virtio-net-pci,netdev=netdev-eth0,id=net-eth0,mac=02:00:00:00:00:01,mq=on,vectors=10,"
        "romfile=,status=off,guest_announce=off" in opts(argv, "-device")
    )


@pytest.mark.parametrize("machine", ["q35", "pc", "microvm"])
def test_nics_have_no_option_rom(machine: str) -> None:
    """A PCI NIC gets `romfile=` (SeaBIOS would run its iPXE ROM on every boot); microvm's
    virtio-mmio NIC has no such property (QEMU refuses it)."""
    tap = NetworkEndpoint(id="eth0", tap_name="tap0", mac="02:00:00:00:00:01")
    user = UserNetwork(id="user0", mac="02:00:00:00:00:02", net="10.0.2.0/24")
    nics = [
        d for d in opts(qa.build(make_spec([tap, user], hypervisor_machine_type=machine)).argv,
                        "-device") if d.startswith("virtio-net")
    ]  # fmt: skip
    assert len(nics) == 2
    for nic in nics:
        assert ("romfile=" in nic.split(",")) == (machine != "microvm"), nic
        # The link has no status to report: up for the guest as soon as the driver probes.
        assert {"status=off", "guest_announce=off"} <= set(nic.split(",")), nic


def test_network_tap_given_as_fds() -> None:
    ep = NetworkEndpoint(
        id="eth0", tap_name="mvt0_vc", mac="02:00:00:00:00:01", queues=2, fds=[11, 12]
    )
    launch = qa.build(make_spec([ep]))
    assert one(launch.argv, "-netdev") == "tap,id=netdev-eth0,fds=11:12"
    assert launch.pass_fds[-2:] == [11, 12]
    with pytest.raises(ConfigError, match="1 fds for 2 queues"):
        NetworkEndpoint(id="eth0", tap_name="mvt0_vc", queues=2, fds=[11])


def test_9p_share() -> None:
    fs = SharedFS(id="fs0", source="/srv/share", mount_tag="share", fs_type="virtio-9p")
    argv = qa.build(make_spec([fs])).argv
    assert one(argv, "-fsdev") == "local,id=fsdev-fs0,path=/srv/share,security_model=none"
    assert "virtio-9p-pci,fsdev=fsdev-fs0,mount_tag=share,id=fs-fs0" in opts(argv, "-device")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("kernel", "/k/vm,linuz"),
        ("initrd", "/k/init,rd"),
        ("qemu", "/usr/bin/qemu,x"),
    ],
)
def test_commas_in_paths_refused(field: str, value: str) -> None:
    spec = make_spec()
    setattr(spec, field, value)
    with pytest.raises(ConfigError, match="contains ','"):
        qa.build(spec)


def test_comma_in_vm_dir_refused() -> None:
    spec = make_spec()
    spec.paths = qa.VMPaths("/run/vc,x/vm/sb1")
    with pytest.raises(ConfigError, match=r"qmp socket.*contains ','"):
        qa.build(spec)


def test_comma_in_memory_path_refused() -> None:
    with pytest.raises(ConfigError, match="memory_path"):
        qa.build(make_spec(boot_to_be_template=True, memory_path="/tpl/m,share=off"))


def test_option_injection_in_free_form_values_refused() -> None:
    with pytest.raises(ConfigError, match="cpu_features"):
        qa.build(make_spec(cpu_features="pmu=off -device foo"))


def test_hypervisor_param_without_name_refused() -> None:
    with pytest.raises(ConfigError, match="hypervisor_params"):
        qa.build(make_spec(hypervisor_params=[Param("", "x")]))


@pytest.mark.parametrize("machine", ["microvm", "q35", "pc"])
def test_tcg_guest_gets_the_tsc_rate(machine: str) -> None:
    spec = make_spec(hypervisor_machine_type=machine)
    spec.host_tsc_khz = 2300000
    assert "tsc_early_khz=2300000" in append_params(qa.build(spec).argv)
    spec.accel = "kvm"  # KVM's guest TSC may be scaled: the kernel calibrates
    assert not [p for p in append_params(qa.build(spec).argv) if p.startswith("tsc_early_khz")]
    unknown = make_spec(hypervisor_machine_type=machine)
    assert not [p for p in append_params(qa.build(unknown).argv) if p.startswith("tsc_early_khz")]


def test_host_tsc_khz_from_cpuinfo(tmp_path: Any) -> None:
    from virtcontainers.host import tsc_khz as host_tsc_khz

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\ncpu MHz\t\t: 2299.998\nflags\t: fpu\n")
    missing = str(tmp_path / "no-sysfs")
    assert host_tsc_khz.__wrapped__(str(info), missing) == 2299998
    sysfs = tmp_path / "tsc_freq_khz"
    sysfs.write_text("2100000\n")
    assert host_tsc_khz.__wrapped__(str(info), str(sysfs)) == 2100000
    assert host_tsc_khz.__wrapped__(missing, missing) == 0


def test_firmware_pflash_and_mlock() -> None:
    spec = make_spec(
        firmware_path="/fw/bios.bin",
        pflash=["/fw/code.fd", "/fw/vars.fd"],
        realtime=True,
        mlock=True,
    )
    argv = qa.build(spec).argv
    assert one(argv, "-bios") == "/fw/bios.bin"
    assert opts(argv, "-drive") == [
        "if=pflash,format=raw,unit=0,file=/fw/code.fd",
        "if=pflash,format=raw,unit=1,file=/fw/vars.fd",
    ]
    assert one(argv, "-overcommit") == "mem-lock=on"
    plain = qa.build(make_spec()).argv
    assert "-bios" not in plain and "-drive" not in plain and "-overcommit" not in plain


def test_iommu_on_q35_only() -> None:
    argv = qa.build(make_spec(iommu=True)).argv
    assert "intel-iommu,intremap=on,device-iotlb=on" in opts(argv, "-device")
    params = append_params(argv)
    assert "intel_iommu=on" in params and "iommu=pt" in params and "iommu=off" not in params
    spec = make_spec(iommu=True)
    spec.accel = "kvm"
    assert "kernel-irqchip=split" in one(qa.build(spec).argv, "-machine")
    with pytest.raises(ConfigError, match=r"iommu.*q35"):
        qa.build(make_spec(iommu=True, hypervisor_machine_type="microvm"))


def test_cold_plugged_nic_honours_disable_vhost_net() -> None:
    ep = NetworkEndpoint(id="eth0", tap_name="tap0", vhost=True)
    assert "vhost=on" in one(qa.build(make_spec([ep])).argv, "-netdev")
    argv = qa.build(make_spec([ep], disable_vhost_net=True)).argv
    assert "vhost" not in one(argv, "-netdev")


@pytest.mark.parametrize("machine", ["q35", "microvm"])
def test_iommu_platform_on_every_virtio_device(machine: str) -> None:
    devices = [
        NetworkEndpoint(id="eth0", tap_name="tap0"),
        BlockDrive(id="d0", path="/srv/d0.img", driver="virtio-blk"),
    ]
    spec = make_spec(devices, hypervisor_machine_type=machine, entropy_source="/dev/urandom")
    assert not any("iommu_platform" in d for d in opts(qa.build(spec).argv, "-device"))
    spec.config.iommu_platform = True
    devs = opts(qa.build(spec).argv, "-device")
    virtio = [d for d in devs if d.startswith(("virtio-", "vhost-"))]
    assert len(virtio) >= 3  # the NIC, the disk, the rng (and the console's serial bus)
    for dev in virtio:
        assert "iommu_platform=on" in dev.split(","), dev
        # QEMU refuses the IOMMU feature on a transitional (legacy-capable) PCI device.
        assert ("disable-legacy=on" in dev.split(",")) == dev.split(",")[0].endswith("-pci")
    assert not any("iommu_platform" in d for d in devs if d not in virtio)


def test_nested_host_gets_no_guest_pmu_unless_nesting_checks_are_disabled() -> None:
    spec = make_spec()
    assert "pmu=off" not in one(qa.build(spec).argv, "-cpu")
    spec.nested = True
    assert one(qa.build(spec).argv, "-cpu").split(",")[-1] == "pmu=off"
    spec.config.disable_nesting_checks = True
    assert "pmu=off" not in one(qa.build(spec).argv, "-cpu")


def test_iommu_platform_with_a_vhost_user_device_is_refused() -> None:
    # QEMU refuses iommu_platform on vhost-user-fs unless virtiofsd translates IOVAs.
    fs = SharedFS(id="fs0", source="/srv/share", mount_tag="share")
    spec = make_spec([fs], shared_fs="virtio-fs", iommu_platform=True)
    with pytest.raises(UnsupportedError, match="iommu_platform with a vhost-user-fs-pci device"):
        qa.build(spec)
