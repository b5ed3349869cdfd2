"""vc-run built for the host as for the guest (static, libseccomp linked in): a malformed
seccomp profile or id map is refused by name before anything is set up."""

from __future__ import annotations

import subprocess
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
