"""What a container runs and how, from an image config (plus `virtc run` options) or an OCI
runtime bundle's config.json, turned into the guest's `vc-run` command line.

A config.json feature the guest cannot do (a user namespace, seccomp, devices, hooks...) is
refused with `UnsupportedError` naming it, never silently dropped.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError, UnsupportedError

RUNNER = "/sbin/vc-run"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

CAPABILITIES = {
    name: i
    for i, name in enumerate(
        [
            "CHOWN",
            "DAC_OVERRIDE",
            "DAC_READ_SEARCH",
            "FOWNER",
            "FSETID",
            "KILL",
            "SETGID",
            "SETUID",
            "SETPCAP",
            "LINUX_IMMUTABLE",
            "NET_BIND_SERVICE",
            "NET_BROADCAST",
            "NET_ADMIN",
            "NET_RAW",
            "IPC_LOCK",
            "IPC_OWNER",
            "SYS_MODULE",
            "SYS_RAWIO",
            "SYS_CHROOT",
            "SYS_PTRACE",
            "SYS_PACCT",
            "SYS_ADMIN",
            "SYS_BOOT",
            "SYS_NICE",
            "SYS_RESOURCE",
            "SYS_TIME",
            "SYS_TTY_CONFIG",
            "MKNOD",
            "LEASE",
            "AUDIT_WRITE",
            "AUDIT_CONTROL",
            "SETFCAP",
            "MAC_OVERRIDE",
            "MAC_ADMIN",
            "SYSLOG",
            "WAKE_ALARM",
            "BLOCK_SUSPEND",
            "AUDIT_READ",
            "PERFMON",
            "BPF",
            "CHECKPOINT_RESTORE",
        ]
    )
}
#: Docker's and containerd's default set.
DEFAULT_CAPS = [
    "CHOWN",
    "DAC_OVERRIDE",
    "FSETID",
    "FOWNER",
    "MKNOD",
    "NET_RAW",
    "SETGID",
    "SETUID",
    "SETFCAP",
    "SETPCAP",
    "NET_BIND_SERVICE",
    "SYS_CHROOT",
    "KILL",
    "AUDIT_WRITE",
]
#: Mounts vc-run makes itself (a config.json listing them is not asking for anything more).
STANDARD_MOUNTS = {
    "/proc",
    "/dev",
    "/dev/pts",
    "/dev/shm",
    "/dev/mqueue",
    "/sys",
    "/sys/fs/cgroup",
}
NAMESPACE_LETTERS = {"mount": "m", "pid": "p", "uts": "u", "ipc": "i", "network": "n"}
RLIMIT_NAMES = {
    "RLIMIT_" + n
    for n in [
        "NOFILE",
        "NPROC",
        "CORE",
        "STACK",
        "AS",
        "CPU",
        "DATA",
        "FSIZE",
        "MEMLOCK",
        "MSGQUEUE",
        "NICE",
        "RTPRIO",
        "RTTIME",
        "SIGPENDING",
        "LOCKS",
        "RSS",
    ]
}


@dataclass(frozen=True)
class Mount:
    """A host directory shared into a container (`-v HOST:GUEST[:ro]`)."""

    source: str
    destination: str
    read_only: bool = False

    @classmethod
    def parse(cls, text: str) -> Mount:
        """`HOST:GUEST[:ro|:rw]`; the host directory must exist."""
        parts = text.split(":")
        mode = ""
        if len(parts) == 3 and parts[2] in ("ro", "rw"):
            mode = parts.pop()
        if len(parts) != 2 or not parts[0] or not parts[1]:
            raise ConfigError(f"invalid volume {text!r}: use HOST:GUEST[:ro]")
        mount = cls(os.path.abspath(parts[0]), parts[1], mode == "ro")
        mount.check()
        return mount

    def check(self) -> None:
        if not os.path.isdir(self.source):
            raise ConfigError(f"volume source {self.source} is not an existing directory")
        if not self.destination.startswith("/") or ".." in self.destination.split("/"):
            raise ConfigError(
                f"volume destination {self.destination!r} must be absolute, without '..'"
            )


@dataclass
class Resources:
    """cgroup v2 limits (the config.json's linux.resources that the guest applies)."""

    memory_max: int = 0
    pids_max: int = 0
    cpu_quota: int = 0
    cpu_period: int = 0

    def files(self) -> dict[str, str]:
        """cgroup file -> value to write."""
        out = {}
        if self.memory_max > 0:
            out["memory.max"] = str(self.memory_max)
        if self.pids_max > 0:
            out["pids.max"] = str(self.pids_max)
        if self.cpu_quota > 0:
            out["cpu.max"] = f"{self.cpu_quota} {self.cpu_period or 100000}"
        return out


@dataclass
class ProcessSpec:
    """One container's process and isolation, as vc-run applies them."""

    args: list[str]
    env: list[str] = field(default_factory=list)
    cwd: str = "/"
    uid: int = 0
    gid: int = 0
    groups: list[int] = field(default_factory=list)
    hostname: str = ""
    readonly_root: bool = False
    namespaces: str = "m,p,u,i"
    caps: list[str] = field(default_factory=lambda: list(DEFAULT_CAPS))
    rlimits: list[tuple[str, int, int]] = field(default_factory=list)
    no_new_privs: bool = False
    mounts: list[tuple[str, str, str, str]] = field(default_factory=list)
    """(type, source in the guest, destination in the container, options)."""
    resources: Resources = field(default_factory=Resources)

    def runner_argv(self, rootfs: str, *, cgroup: str = "", pid_file: str = "") -> list[str]:
        """vc-run's command line for this process in the container rooted at `rootfs`."""
        if not self.args:
            raise ConfigError("container: no command (the image has no Entrypoint or Cmd)")
        argv = [RUNNER, "--rootfs", rootfs, "--cwd", self.cwd or "/", "--ns", self.namespaces]
        argv += ["--user", f"{self.uid}:{self.gid}"]
        if self.groups:
            argv += ["--groups", ",".join(str(g) for g in self.groups)]
        for e in self.env:
            argv += ["--env", e]
        if self.hostname:
            argv += ["--hostname", self.hostname]
        if self.readonly_root:
            argv.append("--readonly")
        if self.no_new_privs:
            argv.append("--no-new-privs")
        argv += ["--caps", format(caps_mask(self.caps), "x")]
        for name, soft, hard in self.rlimits:
            argv += ["--rlimit", f"{name}:{soft}:{hard}"]
        for kind, src, dest, opts in self.mounts:
            argv += ["--mount", f"{kind}:{src}:{dest}:{opts}"]
        if cgroup:
            argv += ["--cgroup", cgroup]
        if pid_file:
            argv += ["--pid-file", pid_file]
        return [*argv, "--", *self.args]


def caps_mask(names: list[str]) -> int:
    mask = 0
    for name in names:
        key = name.upper().removeprefix("CAP_")
        if key not in CAPABILITIES:
            raise ConfigError(f"unknown capability {name!r}")
        mask |= 1 << CAPABILITIES[key]
    return mask


def merge_env(base: list[str], extra: list[str]) -> list[str]:
    """`base` (the image's) with `extra` (K=V) overriding by name; PATH defaulted."""
    out: dict[str, str] = {}
    for item in [*base, *extra]:
        key, sep, value = item.partition("=")
        if not key or not sep:
            raise ConfigError(f"invalid environment variable {item!r}: use KEY=VALUE")
        out[key] = value
    out.setdefault("PATH", DEFAULT_PATH)
    return [f"{k}={v}" for k, v in out.items()]


def resolve_user(user: str, rootfs: str) -> tuple[int, int, list[int]]:
    """`UID[:GID]` or `NAME[:GROUP]` -> numbers, names looked up in the image's /etc files
    (read on the host, where the image is unpacked)."""
    if not user:
        return 0, 0, []
    name, _, group = user.partition(":")
    passwd = _table(rootfs, "etc/passwd")
    groups = _table(rootfs, "etc/group")
    if name.isdigit():
        uid = int(name)
        entry = next((e for e in passwd.values() if len(e) > 3 and e[2] == name), None)
    elif name in passwd and len(passwd[name]) > 3 and passwd[name][2].isdigit():
        entry = passwd[name]
        uid = int(entry[2])
    else:
        raise ConfigError(f"user {name!r} is not in the image's /etc/passwd")
    if group:
        if group.isdigit():
            gid = int(group)
        elif group in groups and groups[group][2].isdigit():
            gid = int(groups[group][2])
        else:
            raise ConfigError(f"group {group!r} is not in the image's /etc/group")
    else:
        gid = int(entry[3]) if entry is not None and entry[3].isdigit() else 0
    return uid, gid, []


def _table(rootfs: str, rel: str) -> dict[str, list[str]]:
    """name -> its fields (passwd: name, x, uid, gid, ...; group: name, x, gid, members)."""
    path = os.path.join(rootfs, rel)
    if os.path.islink(path):
        return {}
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return {}
    out = {}
    for line in lines:
        fields = line.split(":")
        if len(fields) >= 3 and fields[0]:
            out[fields[0]] = fields
    return out


def from_oci(doc: Any, bundle: str) -> tuple[ProcessSpec, str, list[Mount]]:
    """A config.json -> (process spec, root path on the host, host bind mounts to share).

    Everything the guest cannot do is refused with `UnsupportedError` naming the field."""
    if not isinstance(doc, dict):
        raise ConfigError(f"{bundle}/config.json is not a JSON object")

    def refuse(what: str) -> UnsupportedError:
        return UnsupportedError("the guest", f"bundle {bundle}: {what}")

    process = doc.get("process") or {}
    args = process.get("args") or []
    if not isinstance(args, list) or not args or not all(isinstance(a, str) for a in args):
        raise ConfigError(f"{bundle}/config.json: process.args must be a non-empty string list")
    if process.get("terminal"):
        raise refuse("process.terminal (a pty) is not supported yet")
    user = process.get("user") or {}
    linux = doc.get("linux") or {}
    root = doc.get("root") or {}
    root_path = root.get("path") or "rootfs"
    if not os.path.isabs(root_path):
        root_path = os.path.join(bundle, root_path)
    if not os.path.isdir(root_path):
        raise ConfigError(f"{bundle}/config.json: root.path {root_path} is not a directory")
    spec = ProcessSpec(
        args=list(args),
        env=merge_env([], list(process.get("env") or [])),
        cwd=process.get("cwd") or "/",
        uid=int(user.get("uid", 0)),
        gid=int(user.get("gid", 0)),
        groups=[int(g) for g in user.get("additionalGids") or []],
        hostname=str(doc.get("hostname") or ""),
        readonly_root=bool(root.get("readonly")),
        no_new_privs=bool(process.get("noNewPrivileges")),
    )
    caps = process.get("capabilities")
    if caps is not None:
        spec.caps = [str(c) for c in caps.get("bounding") or []]
        caps_mask(spec.caps)
    for r in process.get("rlimits") or []:
        name = str(r.get("type", ""))
        if name not in RLIMIT_NAMES:
            raise refuse(f"rlimit {name!r} is unknown")
        spec.rlimits.append((name, int(r.get("soft", 0)), int(r.get("hard", 0))))
    letters = []
    for ns in linux.get("namespaces") or []:
        kind = ns.get("type")
        if ns.get("path"):
            raise refuse(f"joining an existing {kind} namespace (path) is not supported")
        if kind in ("user", "cgroup", "time"):
            raise refuse(f"a {kind} namespace is not supported")
        if kind not in NAMESPACE_LETTERS:
            raise refuse(f"unknown namespace type {kind!r}")
        letters.append(NAMESPACE_LETTERS[kind])
    if linux.get("namespaces") is not None:
        if "m" not in letters:
            raise refuse("a container without a mount namespace is not supported")
        spec.namespaces = ",".join(letters)
    for key in ("seccomp", "devices", "uidMappings", "gidMappings", "sysctl", "intelRdt"):
        if linux.get(key):
            raise refuse(f"linux.{key} is not supported")
    for key in ("hooks",):
        if doc.get(key):
            raise refuse(f"{key} are not supported")
    resources = linux.get("resources") or {}
    for key in resources:
        if key not in ("memory", "pids", "cpu", "devices"):
            raise refuse(f"linux.resources.{key} is not supported")
    memory = resources.get("memory") or {}
    spec.resources.memory_max = int(memory.get("limit") or 0)
    spec.resources.pids_max = int((resources.get("pids") or {}).get("limit") or 0)
    cpu = resources.get("cpu") or {}
    spec.resources.cpu_quota = int(cpu.get("quota") or 0)
    spec.resources.cpu_period = int(cpu.get("period") or 0)
    shares: list[Mount] = []
    for m in doc.get("mounts") or []:
        dest = str(m.get("destination", ""))
        kind = str(m.get("type") or "")
        opts = [str(o) for o in m.get("options") or []]
        if dest in STANDARD_MOUNTS:
            continue
        if kind == "bind" or "bind" in opts or "rbind" in opts:
            source = str(m.get("source", ""))
            if not os.path.isabs(source):
                source = os.path.join(bundle, source)
            if not os.path.isdir(source):
                raise refuse(f"mount {dest}: only directories can be bind-mounted ({source})")
            shares.append(Mount(source, dest, "ro" in opts))
        elif kind in ("tmpfs", "proc", "sysfs", "mqueue", "devpts"):
            spec.mounts.append((kind, kind, dest, ",".join(opts)))
        else:
            raise refuse(f"mount {dest} of type {kind!r} is not supported")
    return spec, root_path, shares
