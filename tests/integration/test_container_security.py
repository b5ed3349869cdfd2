"""config.json's seccomp profile, user namespace and cgroup namespace honoured by vc-run in a
real QEMU guest (TCG), and bad profiles refused before anything boots."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from leaks import processes_mentioning
from virtcontainers import Sandbox
from virtcontainers.containers import Container
from virtcontainers.errors import ConfigError, HostError, UnsupportedError
from virtcontainers.images import ImageStore
from virtcontainers.images.build import busybox_image

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("leak_check")]

ENOSYS = 38
#: A Docker-default-like allow list (what a shell and busybox's applets use); everything
#: else fails with the default action.
ALLOWED = """
    access arch_prctl brk capget capset chdir chmod chown clock_gettime clock_nanosleep
    clone clone3 close dup dup2 dup3 epoll_create1 epoll_ctl epoll_pwait epoll_wait execve
    exit exit_group faccessat faccessat2 fchdir fchmod fchmodat fchown fchownat fcntl fstat
    fstatfs futex getcwd getdents64 getegid geteuid getgid getgroups getpgid getpgrp getpid
    getppid getrandom getresgid getresuid getrlimit getrusage gettid gettimeofday getuid
    ioctl kill lseek lstat madvise mkdir mkdirat mmap mprotect mremap munmap nanosleep
    newfstatat open openat pipe pipe2 poll ppoll prctl pread64 prlimit64 pselect6 read
    readlink readlinkat rename renameat renameat2 rseq rt_sigaction rt_sigprocmask
    rt_sigreturn rt_sigsuspend sched_getaffinity select set_robust_list set_tid_address
    setgid setgroups setpgid setresgid setresuid setsid setuid sigaltstack stat statfs
    statx symlink symlinkat sysinfo tgkill time umask uname unlink unlinkat utimensat vfork
    wait4 write writev
"""
CLONE_NEW_FLAGS = 0x7E020000
"""CLONE_NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET: Docker lets clone through
only without these."""


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory: pytest.TempPathFactory) -> str:
    store = ImageStore(str(tmp_path_factory.mktemp("images")))
    store.import_archive(busybox_image())
    return store.rootfs(store.get("busybox"))


def make_bundle(
    path: Path, rootfs: str, args: list[str], linux: dict[str, Any], **process: Any
) -> str:
    shutil.copytree(rootfs, path / "rootfs", symlinks=True)
    config = {
        "ociVersion": "1.0.2",
        "process": {"args": args, "env": ["PATH=/bin:/usr/bin"], "cwd": "/", **process},
        "root": {"path": "rootfs"},
        "linux": {"namespaces": [{"type": "mount"}, {"type": "pid"}], **linux},
    }
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


async def started(c: Container) -> None:
    """Start the container's first process and wait until it is running."""
    await c.setup()
    await c.start()
    await c.until_running()
    if (await c.sandbox.exec(["test", "-s", f"{c.guest_dir}/pid"])).exit_code != 0:
        raise AssertionError("the container did not start")


async def written(c: Container, path: str, marker: str) -> str:
    """The container's file `path` once it holds `marker` (its first process writes it)."""
    for _ in range(100):
        out = (await c.exec(["cat", path])).stdout.decode()
        if marker in out:
            return out
        await asyncio.sleep(0.05)
    return out


async def test_seccomp_rules_in_first_process_and_exec(
    run_root: str, rootfs: str, tmp_path: Path
) -> None:
    """A profile that allows everything but mkdir (EPERM), chmod (EACCES) and kill(.., 9)
    makes exactly those fail, in the container's first process and in what exec runs; the
    config's device node is made and its sysctl set in the container's namespace."""
    profile = {
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "syscalls": [
            # a name this libseccomp does not know is skipped, as runc does
            {"names": ["mkdir", "mkdirat", "no_such_call"], "action": "SCMP_ACT_ERRNO"},
            {"names": ["chmod", "fchmodat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13},
            {
                "names": ["kill"],
                "action": "SCMP_ACT_ERRNO",
                "args": [{"index": 1, "value": 9, "op": "SCMP_CMP_EQ"}],
            },
            {"names": ["getpid"], "action": "SCMP_ACT_ALLOW"},  # the default: dropped
        ],
    }
    first = "mkdir /tmp/d 2>/tmp/err; echo $? > /tmp/rc; exec sleep 600"
    device = {"path": "/dev/vc/null", "type": "c", "major": 1, "minor": 3, "fileMode": 0o620}
    linux = {
        "seccomp": profile,
        "devices": [device | {"gid": 5}],
        "namespaces": [{"type": "mount"}, {"type": "pid"}, {"type": "ipc"}],
        "sysctl": {"kernel.shmmni": "1234"},
    }
    # no_new_privs: the filter is loaded last, just before exec (the other test loads it
    # before the user changes)
    bundle = make_bundle(tmp_path, rootfs, ["sh", "-c", first], linux, noNewPrivileges=True)
    async with Sandbox(bundle=bundle, run_root=run_root) as sb:
        c = await sb.create_container()
        await started(c)
        for _ in range(100):
            seen = await c.exec(["cat", "/tmp/rc", "/tmp/err"])
            if seen.exit_code == 0:
                break
            await asyncio.sleep(0.05)
        assert seen.stdout.decode().splitlines() == [
            "1",
            "mkdir: can't create directory '/tmp/d': Operation not permitted",
        ]
        script = (
            "mkdir /tmp/e; echo mkdir=$?; touch /tmp/f; echo touch=$?; chmod 600 /tmp/f;"
            " echo chmod=$?; kill -9 $$; echo kill9=$?; kill -0 $$; echo kill0=$?;"
            " ls -d /tmp/e; echo ls=$?; grep NoNewPrivs /proc/self/status"
        )
        result = await c.exec(["sh", "-c", script])
        assert result.stdout.decode().split() == [
            "mkdir=1",
            "touch=0",
            "chmod=1",
            "kill9=1",
            "kill0=0",
            "ls=1",
            "NoNewPrivs:",
            "1",
        ], result
        err = result.stderr.decode()
        assert "Operation not permitted" in err and "Permission denied" in err
        # The config's device node, made with its mode and owner.
        node = await c.exec(["sh", "-c", "ls -ln /dev/vc/null; echo x > /dev/vc/null && echo ok"])
        fields = node.stdout.decode().split()
        assert fields[0] == "crw--w----" and fields[2:6] == ["0", "5", "1,", "3"], node
        assert fields[-1] == "ok"
        # The sysctl is the container's ipc namespace's, not the guest's.
        shmmni = await c.exec(["cat", "/proc/sys/kernel/shmmni"])
        assert shmmni.stdout == b"1234\n"
        assert (await sb.exec(["cat", "/proc/sys/kernel/shmmni"])).stdout != b"1234\n"
        # The guest itself is not filtered.
        assert (await sb.exec(["mkdir", "/tmp/guest-dir"])).exit_code == 0
        await c.delete()


async def test_default_deny_profile_runs_busybox_in_cgroup_namespace(
    run_root: str, rootfs: str, tmp_path: Path
) -> None:
    """A Docker-like allow list (default: an errno) runs busybox's shell and applets; what
    it does not list fails with the profile's errno; the cgroup namespace's root is the
    container's cgroup."""
    profile = {
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": ENOSYS,
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "syscalls": [
            {
                "names": [n for n in ALLOWED.split() if n not in ("clone", "clone3")],
                "action": "SCMP_ACT_ALLOW",
            },
            {
                "names": ["clone"],
                "action": "SCMP_ACT_ALLOW",
                "args": [
                    {
                        "index": 0,
                        "value": CLONE_NEW_FLAGS,
                        "valueTwo": 0,
                        "op": "SCMP_CMP_MASKED_EQ",
                    }
                ],
            },
            {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": ENOSYS},
        ],
    }
    script = (
        "cat /proc/self/cgroup; ls /bin >/dev/null && echo ls; echo hi | sed s/hi/sed/;"
        " sh -c 'echo nested'; touch /tmp/x && rm /tmp/x && echo files;"
        " unshare -u true; echo unshare=$?"
    )
    linux = {
        "seccomp": profile,
        "namespaces": [{"type": "mount"}, {"type": "pid"}, {"type": "cgroup"}],
    }
    first = f"({script}) >/tmp/out 2>&1; exec sleep 600"
    bundle = make_bundle(tmp_path, rootfs, ["sh", "-c", first], linux)
    async with Sandbox(bundle=bundle, run_root=run_root) as sb:
        c = await sb.create_container()
        await started(c)
        out = await written(c, "/tmp/out", "unshare=")
        inside = await c.exec(["cat", "/proc/self/cgroup"])
        (pid,) = await c.pids()
        outside = await sb.exec(["cat", f"/proc/{pid}/cgroup"])
        await c.delete()
    assert out.splitlines() == [
        "0::/",
        "ls",
        "sed",
        "nested",
        "files",
        "unshare: unshare(0x4000000): Function not implemented",
        "unshare=1",
    ], out
    # The namespace's root is the container's own cgroup (exec joins both).
    assert inside.stdout == b"0::/\n"
    assert outside.stdout.decode().strip() == f"0::/vc-{c.id}"


async def test_user_namespace(run_root: str, rootfs: str, tmp_path: Path) -> None:
    """Container root is guest uid 100000: its maps show it, and a file it makes in a shared
    directory belongs to that uid on the host; exec joins the same namespace."""
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chown(shared, 100000, 100000)
    maps = [{"containerID": 0, "hostID": 100000, "size": 65536}]
    linux = {
        "namespaces": [{"type": "mount"}, {"type": "pid"}, {"type": "user"}],
        "uidMappings": maps,
        "gidMappings": maps,
    }
    script = "cat /proc/self/uid_map /proc/self/gid_map; id -u; touch /shared/made; exec sleep 600"
    bundle = make_bundle(tmp_path / "b", rootfs, ["sh", "-c", script], linux)
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    config["mounts"] = [
        {"destination": "/shared", "type": "bind", "source": str(shared), "options": ["rbind"]}
    ]
    (tmp_path / "b" / "config.json").write_text(json.dumps(config))
    # The root's files belong to the mapped ids (as runc needs: nothing is chowned here).
    for dirpath, dirnames, filenames in os.walk(os.path.join(bundle, "rootfs")):
        for name in [dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)]:
            os.lchown(name, 100000, 100000)
    async with Sandbox(bundle=bundle, run_root=run_root) as sb:
        c = await sb.create_container()
        await started(c)
        for _ in range(100):
            if (shared / "made").exists():
                break
            await asyncio.sleep(0.05)
        inside = await c.exec(["sh", "-c", "cat /proc/self/uid_map; id -u; touch /shared/exec"])
        await c.kill(9)
        out = await c.wait()
        assert out.exit_code == 137
    assert (shared / "made").stat().st_uid == 100000
    assert (shared / "made").stat().st_gid == 100000
    assert inside.stdout.decode().split() == ["0", "100000", "65536", "0"], inside
    assert (shared / "exec").stat().st_uid == 100000


async def test_device_rules_enforced_by_the_cgroup_device_program(
    run_root: str, rootfs: str, tmp_path: Path
) -> None:
    """linux.resources.devices denying all but runc's defaults: the container (holding
    CAP_MKNOD) makes a /dev/kmsg node (1:11) but cannot open it (EPERM), in its first
    process and in what exec runs, while /dev/null works; a second container whose rules
    allow writing 1:11 can."""
    deny_all = {"allow": False, "access": "rwm"}
    write = "echo vc-devices > /tmp/kmsg; echo kmsg=$?; echo x > /dev/null; echo null=$?"
    probe = f"mknod /tmp/kmsg c 1 11 && echo made; {write}"
    first = f"({probe}) >/tmp/out 2>&1; exec sleep 600"
    resources = {"devices": [deny_all, {"allow": True, "type": "c", "major": 1, "minor": 3}]}
    bundle = make_bundle(tmp_path / "deny", rootfs, ["sh", "-c", first], {"resources": resources})
    allowing = {
        "devices": [deny_all, {"allow": True, "type": "c", "major": 1, "minor": 11, "access": "w"}]
    }
    other = make_bundle(tmp_path / "allow", rootfs, ["sh", "-c", probe], {"resources": allowing})
    async with Sandbox(bundle=bundle, run_root=run_root) as sb:
        c = await sb.create_container()
        await started(c)
        out = await written(c, "/tmp/out", "null=")
        again = await c.exec(["sh", "-c", write])
        await c.delete()
        allowed = await (await sb.create_container(bundle=other)).run()
    denied = "sh: can't create /tmp/kmsg: Operation not permitted"
    assert out.splitlines() == ["made", denied, "kmsg=1", "null=0"], out
    assert again.stdout.decode().split() == ["kmsg=1", "null=0"], again
    assert again.stderr.decode().strip() == denied
    assert allowed.stdout.decode().split() == ["made", "kmsg=0", "null=0"], allowed


async def test_oci_hooks_run_on_the_host(run_root: str, rootfs: str, tmp_path: Path) -> None:
    """config.json's hooks run on the host in the lifecycle's order, the OCI state on their
    stdin (pid: the VMM's); a failing poststart hook is a warning only; a failing prestart
    hook fails the create, skips the hooks after it, deletes the container and runs its
    poststop hooks; a container still there when the sandbox stops gets its poststop."""
    log = tmp_path / "hooks.log"

    def hook(name: str, then: str = "") -> dict[str, Any]:
        record = f'{{ printf "%s " "$0"; cat; echo; }} >> {log}; {then}'
        return {"path": "/bin/sh", "args": [name, "-c", record]}

    def with_hooks(bundle: str, hooks: dict[str, Any]) -> str:
        path = Path(bundle) / "config.json"
        path.write_text(json.dumps(json.loads(path.read_text()) | {"hooks": hooks}))
        return bundle

    good = with_hooks(
        make_bundle(tmp_path / "ok", rootfs, ["sh", "-c", "echo ran"], {}),
        {
            "prestart": [hook("prestart")],
            "createRuntime": [hook("createRuntime")],
            "poststart": [hook("poststart-fails", "exit 1"), hook("poststart")],
            "poststop": [hook("poststop")],
        },
    )
    bad = with_hooks(
        make_bundle(tmp_path / "bad", rootfs, ["true"], {}),
        {
            "prestart": [hook("bad-prestart", "echo no >&2; exit 3"), hook("never")],
            "createRuntime": [hook("never")],
            "poststop": [hook("bad-poststop")],
        },
    )
    async with Sandbox(bundle=good, run_root=run_root) as sb:
        vmm = sb.hypervisor.get_pids()[0]
        c = await sb.create_container()
        result = await c.run()
        message = r"hooks\.prestart\[0\] /bin/sh failed \(exit status 3\): no"
        with pytest.raises(HostError, match=message):
            await sb.create_container(id="bad", bundle=bad)
        assert list(sb.containers) == [c.id]
    assert result.stdout == b"ran\n"
    seen = [line.split(" ", 1) for line in log.read_text().splitlines()]
    states = [json.loads(doc) for _, doc in seen]
    assert [name for name, _ in seen] == [
        "prestart",
        "createRuntime",
        "poststart-fails",
        "poststart",
        "bad-prestart",
        "bad-poststop",
        "poststop",
    ]
    assert [(s["id"], s["status"], s.get("pid")) for s in states] == [
        (c.id, "creating", vmm),
        (c.id, "creating", vmm),
        (c.id, "running", vmm),
        (c.id, "running", vmm),
        ("bad", "creating", vmm),
        ("bad", "stopped", None),
        (c.id, "stopped", None),
    ]
    assert {s["bundle"] for s in states} == {good, bad}


async def test_bad_profiles_refused_before_boot(run_root: str, rootfs: str, tmp_path: Path) -> None:
    bad: list[tuple[dict[str, Any], type[Exception], str]] = [
        (
            {"defaultAction": "SCMP_ACT_BOGUS"},
            UnsupportedError,
            "unknown seccomp action 'SCMP_ACT_BOGUS'",
        ),
        (
            {
                "defaultAction": "SCMP_ACT_ALLOW",
                "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_KILL_SOMETIMES"}],
            },
            UnsupportedError,
            r"syscalls\[0\]: unknown seccomp action 'SCMP_ACT_KILL_SOMETIMES'",
        ),
        (
            {"defaultAction": "SCMP_ACT_NOTIFY"},
            UnsupportedError,
            "seccomp action SCMP_ACT_NOTIFY is not supported",
        ),
        (
            {"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_Z80"]},
            UnsupportedError,
            "unknown architecture 'SCMP_ARCH_Z80'",
        ),
    ]
    for i, (profile, error, message) in enumerate(bad):
        bundle = make_bundle(tmp_path / str(i), rootfs, ["true"], {"seccomp": profile})
        with pytest.raises(error, match=message):
            await Sandbox(bundle=bundle, run_root=run_root).start()
    hole = [
        {"allow": True, "type": "c", "major": 1, "access": "rwm"},
        {"allow": False, "type": "c", "major": 1, "minor": 5, "access": "r"},
    ]
    bundle = make_bundle(tmp_path / "d", rootfs, ["true"], {"resources": {"devices": hole}})
    with pytest.raises(UnsupportedError, match=r"devices\[1\]: denying c 1:5 r inside"):
        await Sandbox(bundle=bundle, run_root=run_root).start()
    userns = {"namespaces": [{"type": "mount"}, {"type": "user"}]}
    bundle = make_bundle(tmp_path / "u", rootfs, ["true"], userns)
    with pytest.raises(ConfigError, match="a user namespace needs id mappings"):
        await Sandbox(bundle=bundle, run_root=run_root).start()
    assert processes_mentioning(run_root) == []


async def test_exec_joins_only_a_container_that_is_made(
    run_root: str, rootfs: str, tmp_path: Path
) -> None:
    """The pid exec joins is published only once the container is made: an exec run as soon
    as it is there sees every mount of the container and its root, not a half-made one
    (150 tmpfs mounts make the set-up long)."""
    count = 150
    bundle = make_bundle(tmp_path / "b", rootfs, ["sleep", "600"], {})
    config_path = Path(bundle) / "config.json"
    config = json.loads(config_path.read_text())
    config["mounts"] = [
        {"destination": f"/m/{i}", "type": "tmpfs", "source": "tmpfs"} for i in range(count)
    ]
    config_path.write_text(json.dumps(config))
    probe = "grep -c ' /m/' /proc/self/mounts; test ! -e /sbin/vc-run && echo container-root"
    async with Sandbox(bundle=bundle, run_root=run_root) as sb:
        c = await sb.create_container()
        await started(c)
        seen = await c.exec(["sh", "-c", probe])
        await c.kill(9)
        await c.wait()
    assert seen.stdout.decode().split() == [str(count), "container-root"], seen
