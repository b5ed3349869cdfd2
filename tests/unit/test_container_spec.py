"""Container specs: volumes, environment, users, and config.json translated for vc-run (or
refused naming the feature the guest cannot do)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from virtcontainers.containers import Mount, from_oci
from virtcontainers.containers.spec import caps_mask, merge_env, resolve_user
from virtcontainers.errors import ConfigError, UnsupportedError


def test_mount_parse(tmp_path: Path) -> None:
    assert Mount.parse(f"{tmp_path}:/data:ro") == Mount(str(tmp_path), "/data", True)
    assert Mount.parse(f"{tmp_path}:/data") == Mount(str(tmp_path), "/data", False)
    with pytest.raises(ConfigError, match="volume source /nope is not an existing directory"):
        Mount.parse("/nope:/data")
    with pytest.raises(ConfigError, match="must be absolute"):
        Mount.parse(f"{tmp_path}:data")
    with pytest.raises(ConfigError, match="invalid volume"):
        Mount.parse("just-one")


def test_env_and_user(tmp_path: Path) -> None:
    assert merge_env(["A=1", "PATH=/x"], ["A=2", "B="]) == ["A=2", "PATH=/x", "B="]
    assert merge_env([], [])[0].startswith("PATH=/usr/local/sbin")
    with pytest.raises(ConfigError, match="invalid environment variable 'NOEQUALS'"):
        merge_env([], ["NOEQUALS"])
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\napp:x:1000:1001::/:/bin/sh\n")
    (tmp_path / "etc/group").write_text("root:x:0:\nstaff:x:50:\n")
    assert resolve_user("app", str(tmp_path)) == (1000, 1001, [])
    assert resolve_user("app:staff", str(tmp_path)) == (1000, 50, [])
    assert resolve_user("1000", str(tmp_path)) == (1000, 1001, [])
    assert resolve_user("42:7", str(tmp_path)) == (42, 7, [])
    with pytest.raises(ConfigError, match="user 'ghost' is not in the image's /etc/passwd"):
        resolve_user("ghost", str(tmp_path))


def _bundle(tmp_path: Path, **extra: Any) -> tuple[dict[str, Any], str]:
    (tmp_path / "rootfs").mkdir(exist_ok=True)
    doc: dict[str, Any] = {
        "process": {"args": ["true"], "env": ["A=1"], "cwd": "/w", "user": {"uid": 5, "gid": 6}},
        "root": {"path": "rootfs", "readonly": True},
        "hostname": "h",
        "linux": {"namespaces": [{"type": "mount"}, {"type": "pid"}, {"type": "network"}]},
    }
    for key, value in extra.items():
        doc[key] = value
    return doc, str(tmp_path)


def test_from_oci_translates(tmp_path: Path) -> None:
    vol = tmp_path / "vol"
    vol.mkdir()
    doc, bundle = _bundle(
        tmp_path,
        mounts=[
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/data", "type": "bind", "source": str(vol), "options": ["ro"]},
            {"destination": "/scratch", "type": "tmpfs", "source": "tmpfs", "options": ["size=1m"]},
        ],
    )
    doc["linux"]["resources"] = {"memory": {"limit": 1 << 26}, "pids": {"limit": 10}}
    spec, root, shares = from_oci(doc, bundle)
    assert root == os.path.join(bundle, "rootfs")
    assert shares == [Mount(str(vol), "/data", True)]
    assert spec.resources.files() == {"memory.max": str(1 << 26), "pids.max": "10"}
    argv = spec.runner_argv("/r", pid_file="/p")
    assert argv[-2:] == ["--", "true"]
    assert argv[argv.index("--ns") + 1] == "m,p,n"
    assert argv[argv.index("--user") + 1] == "5:6"
    assert argv[argv.index("--cwd") + 1] == "/w"
    assert "--readonly" in argv and "A=1" in argv
    assert "tmpfs:tmpfs:/scratch:size=1m" in argv


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"linux": {"devices": [{"path": "/dev/x", "type": "c"}]}}, "must be numbers"),
        ({"linux": {"devices": [{"path": "/dev/x", "type": "z"}]}}, "unknown device type 'z'"),
        ({"linux": {"devices": [{"path": "x", "type": "p"}]}}, "path 'x' must be absolute"),
        ({"linux": {"sysctl": {"vm.swappiness": "1"}}}, "'vm.swappiness' is not namespaced"),
        ({"linux": {"sysctl": {"kernel.shmmax": "1"}}}, "'kernel.shmmax' needs an ipc"),
        ({"linux": {"sysctl": {"net/../x": "1"}}}, "is not a sysctl name"),
        ({"linux": {"namespaces": [{"type": "time"}, {"type": "mount"}]}}, "a time namespace"),
        ({"linux": {"seccomp": {"defaultAction": "SCMP_ACT_NOPE"}}}, "action 'SCMP_ACT_NOPE'"),
        ({"linux": {"seccomp": {"defaultAction": "SCMP_ACT_NOTIFY"}}}, "SCMP_ACT_NOTIFY"),
        (
            {"linux": {"seccomp": {"defaultAction": "SCMP_ACT_ALLOW", "flags": ["SECCOMP_X"]}}},
            "flag 'SECCOMP_X'",
        ),
        (
            {
                "linux": {
                    "seccomp": {
                        "defaultAction": "SCMP_ACT_ALLOW",
                        "syscalls": [
                            {
                                "names": ["read"],
                                "action": "SCMP_ACT_ERRNO",
                                "args": [{"index": 0, "value": 1, "op": "SCMP_CMP_ALMOST"}],
                            }
                        ],
                    }
                }
            },
            r"syscalls\[0\]: unknown seccomp operator 'SCMP_CMP_ALMOST'",
        ),
        (
            {
                "linux": {
                    "seccomp": {
                        "defaultAction": "SCMP_ACT_ALLOW",
                        "syscalls": [{"names": "read", "action": "SCMP_ACT_LOG"}],
                    }
                }
            },
            r"syscalls\[0\]\.names must be a list",
        ),
        ({"linux": {"namespaces": [{"type": "pid"}]}}, "without a mount namespace"),
        ({"linux": {"namespaces": [{"type": "mount", "path": "/proc/1/ns/mnt"}]}}, "joining"),
        ({"hooks": {"createContainer": [{"path": "/bin/true"}]}}, "hooks.createContainer run in"),
        ({"hooks": {"startContainer": [{"path": "/x"}]}}, "hooks.startContainer run in the"),
        ({"hooks": {"prestop": [{"path": "/bin/true"}]}}, "unknown hook kind hooks.prestop"),
        ({"hooks": {"poststop": [{"path": "true"}]}}, r"poststop\[0\]: path 'true' must be an"),
        ({"hooks": {"poststart": [{"path": "/x", "timeout": 0}]}}, "timeout 0 must be a number"),
        ({"hooks": {"prestart": [{"path": "/x", "env": ["NOEQ"]}]}}, "must be KEY=VALUE"),
        ({"hooks": {"prestart": [{"path": "/x", "args": "a b"}]}}, "args must be a list"),
        ({"mounts": [{"destination": "/x", "type": "nfs", "source": "h:/"}]}, "type 'nfs'"),
        ({"linux": {"resources": {"hugepageLimits": [{}]}}}, "hugepageLimits"),
    ],
)
def test_from_oci_refuses(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    doc, bundle = _bundle(tmp_path)
    for key, value in change.items():
        if isinstance(value, dict) and isinstance(doc.get(key), dict):
            doc[key] = {**doc[key], **value}
        else:
            doc[key] = value
    with pytest.raises(UnsupportedError, match=message):
        from_oci(doc, bundle)


def test_from_oci_seccomp_as_runc_reads_it(tmp_path: Path) -> None:
    doc, bundle = _bundle(tmp_path)
    doc["linux"]["seccomp"] = {
        "defaultAction": "SCMP_ACT_ERRNO",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86"],
        "flags": ["SECCOMP_FILTER_FLAG_LOG", "SECCOMP_FILTER_FLAG_TSYNC"],
        "syscalls": [
            {"names": ["read", "write", "bad name", ""], "action": "SCMP_ACT_ALLOW"},
            {"names": ["mkdir"], "action": "SCMP_ACT_ERRNO"},  # = the default: dropped
            {"names": ["chmod"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13},
            {
                "names": ["personality"],
                "action": "SCMP_ACT_ALLOW",
                "args": [
                    {"index": 0, "value": 0, "op": "SCMP_CMP_EQ"},
                    {"index": 0, "value": 8, "op": "SCMP_CMP_EQ"},
                ],
            },
            {
                "names": ["clone"],
                "action": "SCMP_ACT_ALLOW",
                "args": [
                    {"index": 0, "value": 0x7E020000, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"},
                    {"index": 1, "value": 5, "op": "SCMP_CMP_NE"},
                ],
            },
        ],
    }
    spec, _, _ = from_oci(doc, bundle)
    assert spec.seccomp == [
        "--seccomp-default",
        "errno=1",
        "--seccomp-arch",
        "x86_64",
        "--seccomp-arch",
        "x86",
        "--seccomp-flag",
        "log",
        "--seccomp-syscall",
        "allow:read,write",
        "--seccomp-syscall",
        "errno=13:chmod",
        # one index twice: one rule per condition (either matches), as runc does
        "--seccomp-syscall",
        "allow:personality:0,eq,0,0",
        "--seccomp-syscall",
        "allow:personality:0,eq,8,0",
        "--seccomp-syscall",
        "allow:clone:0,masked_eq,2114060288,0:1,ne,5,0",
    ]
    argv = spec.runner_argv("/r")
    assert argv[argv.index("--") - len(spec.seccomp) : argv.index("--")] == spec.seccomp


def test_from_oci_user_and_cgroup_namespaces(tmp_path: Path) -> None:
    doc, bundle = _bundle(tmp_path)
    doc["process"]["user"] = {"uid": 0, "gid": 0}
    doc["linux"] = {
        "namespaces": [{"type": "mount"}, {"type": "user"}, {"type": "cgroup"}],
        "uidMappings": [{"containerID": 0, "hostID": 100000, "size": 65536}],
        "gidMappings": [{"containerID": 0, "hostID": 200000, "size": 10}],
    }
    spec, _, _ = from_oci(doc, bundle)
    argv = spec.runner_argv("/r")
    assert argv[argv.index("--ns") + 1] == "m,U,c"
    assert argv[argv.index("--uid-map") + 1] == "0:100000:65536"
    assert argv[argv.index("--gid-map") + 1] == "0:200000:10"

    doc["process"]["user"] = {"uid": 0, "gid": 10}
    with pytest.raises(ConfigError, match=r"process\.user\.gid 10 is not in linux\.gidMappings"):
        from_oci(doc, bundle)
    del doc["linux"]["gidMappings"]
    with pytest.raises(ConfigError, match=r"linux\.gidMappings: a user namespace needs id"):
        from_oci(doc, bundle)
    doc["linux"]["namespaces"] = [{"type": "mount"}]
    with pytest.raises(ConfigError, match=r"uidMappings given without a user namespace"):
        from_oci(doc, bundle)


def test_from_oci_devices(tmp_path: Path) -> None:
    doc, bundle = _bundle(tmp_path)
    doc["linux"]["devices"] = [
        {"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229},
        {"path": "/dev/sda", "type": "b", "major": 8, "minor": 0, "fileMode": 0o660, "gid": 6},
        {"path": "/dev/kmsg", "type": "u", "major": 1, "minor": 11, "uid": 5},
        {"path": "/dev/pipe", "type": "p"},
    ]
    spec, _, _ = from_oci(doc, bundle)
    argv = spec.runner_argv("/r")
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "--device"] == [
        "/dev/fuse:c:10:229:666:0:0",
        "/dev/sda:b:8:0:660:0:6",
        "/dev/kmsg:c:1:11:666:5:0",
        "/dev/pipe:p:0:0:666:0:0",
    ]


def test_from_oci_sysctls(tmp_path: Path) -> None:
    doc, bundle = _bundle(tmp_path)
    doc["linux"]["namespaces"].append({"type": "ipc"})
    doc["linux"]["sysctl"] = {"kernel.shmmni": "1234", "net.ipv4.ping_group_range": "0 10"}
    spec, _, _ = from_oci(doc, bundle)
    argv = spec.runner_argv("/r")
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "--sysctl"] == [
        "kernel.shmmni=1234",
        "net.ipv4.ping_group_range=0 10",
    ]


def test_caps() -> None:
    assert caps_mask(["CAP_KILL", "chown"]) == (1 << 5) | 1
    with pytest.raises(ConfigError, match="unknown capability 'CAP_NOPE'"):
        caps_mask(["CAP_NOPE"])


def _device_rules(rules: list[dict[str, Any]]) -> list[str]:
    from virtcontainers.containers.spec import device_cgroup_options

    def refuse(what: str) -> UnsupportedError:
        return UnsupportedError("the guest", what)

    out = device_cgroup_options(rules, refuse)
    if not out:
        return []
    assert out[::2] == ["--device-cgroup"] + ["--device-rule"] * (len(out) // 2 - 1)
    return [out[1], *out[3::2]]


DEFAULTS = [
    "b:*:*:m",
    "c:*:*:m",
    "c:1:3:rwm",
    "c:1:5:rwm",
    "c:1:7:rwm",
    "c:1:8:rwm",
    "c:1:9:rwm",
    "c:5:0:rwm",
    "c:5:1:rwm",
    "c:5:2:rwm",
    "c:10:200:rwm",
    "c:136:*:rwm",
]
DENY_ALL = {"allow": False, "access": "rwm"}


@pytest.mark.parametrize(
    ("rules", "expected"),
    [
        # none given: deny-all with runc's default devices, as runc does
        ([], ["deny", *DEFAULTS]),
        ([DENY_ALL], ["deny", *DEFAULTS]),
        # an allowed device joins the exceptions; accesses given twice are merged
        (
            [
                DENY_ALL,
                {"allow": True, "type": "b", "major": 8, "minor": 0, "access": "r"},
                {"allow": True, "type": "b", "major": 8, "minor": 0, "access": "w"},
            ],
            ["deny", "b:*:*:m", "b:8:0:rw", *DEFAULTS[1:]],
        ),
        # a later deny takes accesses away from an earlier allow (last match wins)
        (
            [
                DENY_ALL,
                {"allow": True, "type": "c", "major": 4, "minor": 1, "access": "rwm"},
                {"allow": False, "type": "c", "major": 4, "minor": 1, "access": "wm"},
            ],
            [
                "deny",
                *DEFAULTS[:2],
                "c:1:3:rwm",
                "c:1:5:rwm",
                "c:1:7:rwm",
                "c:1:8:rwm",
                "c:1:9:rwm",
                "c:4:1:r",
                *DEFAULTS[7:],
            ],
        ),
        # allow-all resets: every device allowed, no program at all
        ([DENY_ALL, {"allow": True, "type": "a", "access": "rwm"}], []),
        # allow-all then denies: a deny list (the defaults, being allows, change nothing)
        (
            [{"allow": True}, {"allow": False, "type": "c", "major": 1, "minor": 11}],
            ["allow", "c:1:11:rwm"],
        ),
        # a default device denied after allow-all is allowed again by runc's defaults
        ([{"allow": True}, {"allow": False, "type": "c", "major": 1, "minor": 5}], []),
    ],
)
def test_device_rules_reduced_as_runc(rules: list[dict[str, Any]], expected: list[str]) -> None:
    assert _device_rules(rules) == expected


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        (
            {"allow": True, "type": "u", "major": 1},
            r"devices\[1\]: device type 'u' is not a, c or b",
        ),
        ({"allow": True, "type": "c", "access": "rx"}, r"access 'rx' is not made of r, w and m"),
        ({"allow": "yes"}, "allow must be true or false"),
        ({"allow": True, "type": "c", "major": -2}, "major -2 is not a 32-bit number"),
        ({"allow": True, "type": "c", "minor": 1 << 32}, "minor 4294967296 is not a 32-bit"),
        ({"allow": True, "type": "a", "major": 1}, "must be for every number and rwm"),
        ({"allow": False, "access": "m"}, "must be for every number and rwm"),
        # a hole in a wildcard exception cannot be expressed (runc refuses it too)
        (
            {"allow": False, "type": "c", "major": 136, "minor": 3, "access": "w"},
            r"denying c 136:3 w inside the wider exception c 136:\* rwm",
        ),
    ],
)
def test_device_rules_refused_by_name(rule: dict[str, Any], message: str, tmp_path: Path) -> None:
    doc, bundle = _bundle(tmp_path)
    hole = rule.get("major") == 136
    first = {"allow": True, "type": "c", "major": 136, "access": "rwm"} if hole else DENY_ALL
    doc["linux"]["resources"] = {"devices": [first, rule]}
    with pytest.raises(UnsupportedError, match=message):
        from_oci(doc, bundle)


def test_device_rules_reach_vc_run(tmp_path: Path) -> None:
    doc, bundle = _bundle(tmp_path)
    doc["linux"]["resources"] = {"devices": [{"allow": True, "access": "rwm"}]}
    spec, _, _ = from_oci(doc, bundle)
    assert "--device-cgroup" not in spec.runner_argv("/r")
    doc["linux"]["resources"] = {"devices": [DENY_ALL]}
    argv = from_oci(doc, bundle)[0].runner_argv("/r", cgroup="/sys/fs/cgroup/x")
    at = argv.index("--device-cgroup")
    assert argv[at : at + 4] == ["--device-cgroup", "deny", "--device-rule", "b:*:*:m"]
    assert argv.index("--") > at


def test_userns_parsed_and_applied() -> None:
    from virtcontainers.containers import ProcessSpec
    from virtcontainers.containers.spec import apply_userns, parse_userns

    assert parse_userns("host") is None
    assert parse_userns("auto") == (100000, 65536)
    assert parse_userns("5000:10") == (5000, 10)
    for bad in ("0:10", "5:0", "x", "5", "-1:2", "4294967295:2"):
        with pytest.raises(ConfigError, match=f"invalid userns '{bad}'"):
            parse_userns(bad)
    spec = ProcessSpec(args=["true"], uid=9, gid=3)
    apply_userns(spec, (5000, 10))
    argv = spec.runner_argv("/r")
    assert argv[argv.index("--ns") + 1] == "m,p,u,i,U"
    assert argv[argv.index("--uid-map") + 1] == argv[argv.index("--gid-map") + 1] == "0:5000:10"
    with pytest.raises(ConfigError, match="container uid 10 is not mapped by userns 5000:10"):
        apply_userns(ProcessSpec(args=["true"], uid=10), (5000, 10))


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_idshift_keeps_set_id_bits_and_capabilities(tmp_path: Path) -> None:
    from virtcontainers.containers.idshift import CAPS_XATTR, shift

    root = tmp_path / "root"
    (root / "bin").mkdir(parents=True)
    tool = root / "bin" / "tool"
    tool.write_text("")
    os.chown(tool, 0, 5)
    tool.chmod(0o6755)
    caps = bytes.fromhex("0000000200200000000000000000000000000000")  # v2: cap_net_raw
    os.setxattr(tool, CAPS_XATTR, caps)
    outside = tmp_path / "outside"
    outside.write_text("")
    (root / "link").symlink_to(outside)
    assert shift(str(root), 1000) == 4
    st = tool.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (1000, 1005, 0o6755)
    assert os.getxattr(tool, CAPS_XATTR) == caps
    assert os.lstat(root / "link").st_uid == 1000 and outside.stat().st_uid == 0
    assert (root.stat().st_uid, (root / "bin").stat().st_gid) == (1000, 1000)


async def test_hooks_run_with_state_env_and_timeout(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Hooks get the OCI state on stdin and their own env only; a failure names the hook and
    stops the ones after it (run_hooks) or not (run_hooks_warning); a hook outliving its
    timeout is killed with its children."""
    from virtcontainers.containers.hooks import run_hooks, run_hooks_warning
    from virtcontainers.errors import HostError

    log = tmp_path / "log"
    record = f'{{ echo "$0 $HOOK_VAR ${{HOME:-nohome}}"; cat; echo; }} >> {log}'
    doc, bundle = _bundle(tmp_path)
    doc["annotations"] = {"a": "b"}
    doc["hooks"] = {
        "prestart": [
            {"path": "/bin/sh", "args": ["first", "-c", record], "env": ["HOOK_VAR=1"]},
            {"path": "/bin/sh", "args": ["sh", "-c", "echo broken; exit 3"]},
            {"path": "/bin/sh", "args": ["never", "-c", record]},
        ],
        "poststart": [
            {"path": "/no/such/hook"},
            {
                "path": "/bin/sh",
                "args": ["sleeper", "-c", f"sleep 30 & echo $! > {log}.child; wait"],
                "timeout": 1,
            },
            {"path": "/bin/sh", "args": ["last", "-c", record], "env": ["HOOK_VAR=2"]},
        ],
    }
    hooks = from_oci(doc, bundle)[0].hooks
    with pytest.raises(
        HostError, match=r"c1: hooks.prestart\[1\] /bin/sh failed \(exit status 3\): broken"
    ):
        await run_hooks(hooks, "prestart", "c1", "creating", 42)
    await run_hooks_warning(hooks, "poststart", "c1", "running", 42)
    lines = log.read_text().splitlines()
    assert lines[0] == "first 1 nohome" and lines[2] == "last 2 nohome"
    state = {
        "ociVersion": "1.0.2",
        "id": "c1",
        "pid": 42,
        "bundle": bundle,
        "annotations": {"a": "b"},
    }
    assert json.loads(lines[1]) == state | {"status": "creating"}
    assert json.loads(lines[3]) == state | {"status": "running"}
    child = int((tmp_path / "log.child").read_text())
    with pytest.raises(ProcessLookupError):
        for _ in range(100):
            os.kill(child, 0)
            time.sleep(0.02)
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == [
        "container c1: hooks.poststart[0] /no/such/hook cannot be run: No such file or directory",
        "container c1: hooks.poststart[1] /bin/sh timed out after 1 s (killed)",
    ]
