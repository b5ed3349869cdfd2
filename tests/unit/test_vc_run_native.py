"""vc-run built for the host as for the guest (static, libseccomp linked in): a malformed
seccomp profile or id map is refused by name before anything is set up."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from virtcontainers.guest import initrd


@pytest.fixture(scope="module")
def vc_run(tmp_path_factory: pytest.TempPathFactory) -> str:
    work = tmp_path_factory.mktemp("vc-run")
    binary = str(work / "vc-run")
    initrd.compile_runner(binary, str(work))
    return binary


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--seccomp-default", "kill_sometimes"], "unknown seccomp action kill_sometimes"),
        (["--seccomp-default", "errno=70000"], "unknown seccomp action errno=70000"),
        (
            ["--seccomp-default", "allow", "--seccomp-syscall", "notify:read"],
            "unknown seccomp action notify",
        ),
        (
            ["--seccomp-default", "allow", "--seccomp-syscall", "errno=1:read:0,almost,1,0"],
            "unknown seccomp operator almost",
        ),
        (
            ["--seccomp-default", "allow", "--seccomp-syscall", "errno=1:read:9,eq,1,0"],
            "bad seccomp argument condition 9,eq,1,0",
        ),
        (["--seccomp-default", "allow", "--seccomp-arch", "z80"], "unknown seccomp architecture"),
        (["--seccomp-default", "allow", "--seccomp-flag", "fast"], "unknown seccomp flag fast"),
        (["--seccomp-syscall", "allow:read"], "seccomp options need --seccomp-default"),
        (["--ns", "m,U", "--uid-map", "0:1:1"], "a user namespace needs --uid-map and --gid-map"),
        (["--ns", "m,U", "--uid-map", "0:1", "--gid-map", "0:1:1"], "bad id map 0:1 "),
        (["--device", "/dev/x:z:1:2:666:0:0"], "bad --device /dev/x:z:1:2:666:0:0"),
        (["--device", "dev/x:c:1:2:666:0:0"], "bad --device dev/x:c:1:2:666:0:0"),
        (["--sysctl", "kernel.shmmni"], "bad --sysctl kernel.shmmni (KEY=VALUE)"),
        (["--sysctl", "net/../x=1"], "bad --sysctl net/../x=1"),
        (["--device-rule", "c:1:3:rwm"], "--device-rule needs --device-cgroup"),
        (["--device-cgroup", "maybe", "--cgroup", "/x"], "bad --device-cgroup maybe"),
        (["--device-cgroup", "deny"], "--device-cgroup needs --cgroup"),
        (
            ["--cgroup", "/x", "--device-cgroup", "deny", "--device-rule", "u:1:3:rwm"],
            "bad --device-rule u:1:3:rwm",
        ),
        (
            ["--cgroup", "/x", "--device-cgroup", "deny", "--device-rule", "c:1:3:rwx"],
            "bad --device-rule c:1:3:rwx",
        ),
        (
            ["--cgroup", "/x", "--device-cgroup", "deny", "--device-rule", "c:4294967296:3:r"],
            "bad --device-rule c:4294967296:3:r",
        ),
        (["--join-ns", "m:/run/x"], "bad --join-ns m:/run/x (LETTER:PIDFILE"),
        (["--ns", "m,p", "--join-ns", "p:/run/x"], "bad --join-ns p:/run/x"),
        (["--ns", "m", "--join-ns", "p:/nowhere/pid"], "--join-ns p:/nowhere/pid: no running"),
    ],
)
def test_bad_options_refused_before_setup(
    vc_run: str, tmp_path: Path, options: list[str], message: str
) -> None:
    # The root does not exist: had vc-run started setting up, it would fail on that instead.
    missing = str(tmp_path / "no-root")
    res = subprocess.run(
        [vc_run, "--rootfs", missing, "--pid-file", str(tmp_path / "pid"), *options, "--", "true"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert res.returncode == 125
    assert res.stderr.startswith(f"vc-run: {message}"), res.stderr
    assert not (tmp_path / "pid").exists()


def _cgroup2_root() -> str:
    """Where this host mounts cgroup v2 (the unified hierarchy, also in hybrid mode)."""
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if fields[2] == "cgroup2":
                return fields[1]
    raise AssertionError("this host mounts no cgroup2 hierarchy")


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        # an allow list: /dev/null read-write, /dev/zero (1:5) not at all
        (
            ["--device-cgroup", "deny", "--device-rule", "c:1:3:rwm"],
            "null-r=0 null-w=0 null-rw=0 zero-r=1",
        ),
        # a wildcard minor allows every 1:* node, only for reading
        (
            ["--device-cgroup", "deny", "--device-rule", "c:1:*:r"],
            "null-r=0 null-w=1 null-rw=1 zero-r=0",
        ),
        # a deny list: a write exception denies a read-write open too (cgroup v1's rule)
        (
            ["--device-cgroup", "allow", "--device-rule", "c:1:3:w"],
            "null-r=0 null-w=1 null-rw=1 zero-r=0",
        ),
        # a block exception does not touch character devices
        (
            ["--device-cgroup", "allow", "--device-rule", "b:1:*:rwm"],
            "null-r=0 null-w=0 null-rw=0 zero-r=0",
        ),
    ],
)
def test_device_program_on_this_host(
    vc_run: str, tmp_path: Path, options: list[str], expected: str
) -> None:
    """The device program vc-run attaches, run by this host's kernel: which opens of the
    container's /dev/null and /dev/zero it lets through (1: EPERM)."""
    root = tmp_path / "root"
    (root / "bin").mkdir(parents=True)
    shutil.copy(initrd.busybox_path(), root / "bin" / "busybox")
    cgroup = os.path.join(_cgroup2_root(), f"vc-test-{os.getpid()}-{len(expected)}")
    os.mkdir(cgroup)
    probe = (
        "cat /dev/null; echo null-r=$?; echo x > /dev/null; echo null-w=$?;"
        " true <> /dev/null; echo null-rw=$?; head -c1 /dev/zero >&-; echo zero-r=$?"
    )
    try:
        res = subprocess.run(
            [
                vc_run,
                "--rootfs",
                str(root),
                "--cgroup",
                cgroup,
                *options,
                "--",
                "/bin/busybox",
                "sh",
                "-c",
                probe,
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    finally:
        os.rmdir(cgroup)
    assert res.returncode == 0, res.stderr
    assert " ".join(res.stdout.split()) == expected, res.stderr


def test_cgroup_and_pid_file_directory_made(vc_run: str, tmp_path: Path) -> None:
    """A new container's cgroup and its pid file's directory need not exist: vc-run makes
    them (a pooled VM's container gets no set-up request before it), and the command runs in
    that cgroup."""
    root = tmp_path / "root"
    (root / "bin").mkdir(parents=True)
    shutil.copy(initrd.busybox_path(), root / "bin" / "busybox")
    cgroup = os.path.join(_cgroup2_root(), f"vc-test-new-{os.getpid()}")
    pid_file = tmp_path / "c" / "ctr1" / "pid"
    options = ["--rootfs", str(root), "--cgroup", cgroup, "--pid-file", str(pid_file)]
    try:
        res = subprocess.run(
            [vc_run, *options, "--", "/bin/busybox", "cat", "/proc/self/cgroup"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        made = os.path.isdir(cgroup)
    finally:
        if os.path.isdir(cgroup):
            os.rmdir(cgroup)
    assert res.returncode == 0, res.stderr
    assert made
    assert res.stdout.strip().endswith(cgroup.removeprefix(_cgroup2_root())), res.stdout
    assert pid_file.read_text().strip().isdigit()


SUBREAPER = """
import ctypes, os, subprocess, sys
ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: orphans come here
code = subprocess.run(sys.argv[1:]).returncode
orphans = 0
while True:
    try:
        os.waitpid(-1, 0)
    except ChildProcessError:
        break
    orphans += 1
print(code, orphans)
"""


def test_namespaces_released_after_exit_by_a_holder(vc_run: str, tmp_path: Path) -> None:
    """vc-run leaves its container's namespaces (and its memory) to a holder process at
    the lowest priority, so that its exit is seen before they are torn down: the exit status
    is the command's, and the holder, orphaned once vc-run has exited, ends by itself (a
    subreaper collects it: on a vc-run without it, no orphan comes)."""
    root = tmp_path / "root"
    (root / "bin").mkdir(parents=True)
    shutil.copy(initrd.busybox_path(), root / "bin" / "busybox")
    argv = [vc_run, "--rootfs", str(root), "--ns", "m,p,u,i", "--", "/bin/busybox", "sh", "-c",
            "exit 7"]  # fmt: skip
    res = subprocess.run(
        [sys.executable, "-c", SUBREAPER, *argv],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["7", "1"], res


DEVICE_PROBE = (
    "cat /dev/null; echo null-r=$?; echo x > /dev/null; echo null-w=$?;"
    " true <> /dev/null; echo null-rw=$?; head -c1 /dev/zero >&-; echo zero-r=$?"
)
NULL_ONLY = ["--device-cgroup", "deny", "--device-rule", "c:1:3:rwm"]
NULL_ONLY_SEES = "null-r=0 null-w=0 null-rw=0 zero-r=1"
READ_ANY_MEM = ["--device-cgroup", "deny", "--device-rule", "c:1:*:r"]
READ_ANY_MEM_SEES = "null-r=0 null-w=1 null-rw=1 zero-r=0"


def test_device_program_cache(vc_run: str, tmp_path: Path) -> None:
    """--device-program-cache keeps each loaded device program pinned (in a bpffs) beside a
    copy of its instructions, and a later container whose program is the same attaches the
    pinned one instead of loading it: a pinned program put under another program's name
    and instructions is the one that then runs (the cache is trusted: it is the guest's)."""
    root = tmp_path / "root"
    (root / "bin").mkdir(parents=True)
    shutil.copy(initrd.busybox_path(), root / "bin" / "busybox")
    caches = [tmp_path / "a", tmp_path / "b"]
    for cache in caches:
        (cache / "bpf").mkdir(parents=True)
        subprocess.run(["mount", "-t", "bpf", "bpf", str(cache / "bpf")], check=True)
    cgroup = os.path.join(_cgroup2_root(), f"vc-test-cache-{os.getpid()}")

    def probe(cache: Path, rules: list[str]) -> str:
        os.mkdir(cgroup)
        try:
            res = subprocess.run(
                [vc_run, "--rootfs", str(root), "--cgroup", cgroup, *rules,
                 "--device-program-cache", str(cache), "--", "/bin/busybox", "sh", "-c",
                 DEVICE_PROBE],
                capture_output=True, text=True, timeout=30, check=False,
            )  # fmt: skip
        finally:
            os.rmdir(cgroup)
        assert res.returncode == 0, res.stderr
        return " ".join(res.stdout.split())

    try:
        a, b = caches
        for _ in range(2):  # loaded and pinned, then taken from the pin
            assert probe(a, NULL_ONLY) == NULL_ONLY_SEES
            assert probe(b, READ_ANY_MEM) == READ_ANY_MEM_SEES
        ((pin_a,), (pin_b,)) = (
            [p for p in os.listdir(c / "bpf") if p.startswith("dev-")] for c in caches
        )
        (insns_a,) = (p for p in os.listdir(a) if p.endswith(".insns"))
        assert insns_a == f"{pin_a}.insns"
        # b's program under a's name and instructions: a's rules now get b's program
        os.rename(b / "bpf" / pin_b, b / "bpf" / pin_a)
        shutil.copy(a / insns_a, b / insns_a)
        assert probe(b, NULL_ONLY) == READ_ANY_MEM_SEES
        # instructions that differ from the container's: the pin is not used
        (b / insns_a).write_bytes((a / insns_a).read_bytes()[:-8])
        assert probe(b, NULL_ONLY) == NULL_ONLY_SEES
    finally:
        for cache in caches:
            subprocess.run(["umount", str(cache / "bpf")], check=False)
