"""Container specs: volumes, environment, users, and config.json translated for vc-run (or
refused naming the feature the guest cannot do)."""

from __future__ import annotations

import os
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
        ({"linux": {"seccomp": {"defaultAction": "SCMP_ACT_ERRNO"}}}, r"linux\.seccomp"),
        ({"linux": {"namespaces": [{"type": "user"}, {"type": "mount"}]}}, "a user namespace"),
        ({"linux": {"namespaces": [{"type": "pid"}]}}, "without a mount namespace"),
        ({"linux": {"namespaces": [{"type": "mount", "path": "/proc/1/ns/mnt"}]}}, "joining"),
        ({"hooks": {"prestart": [{"path": "/bin/true"}]}}, "hooks are not supported"),
        ({"mounts": [{"destination": "/x", "type": "nfs", "source": "h:/"}]}, "type 'nfs'"),
        ({"linux": {"resources": {"hugepageLimits": [{}]}}}, "hugepageLimits"),
        ({"process": {"args": ["true"], "terminal": True}}, "process.terminal"),
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


def test_caps() -> None:
    assert caps_mask(["CAP_KILL", "chown"]) == (1 << 5) | 1
    with pytest.raises(ConfigError, match="unknown capability 'CAP_NOPE'"):
        caps_mask(["CAP_NOPE"])
