"""What a container runs and how, from an image config (plus `virtc run` options) or an OCI
runtime bundle's config.json, turned into the guest's `vc-run` command line.

A config.json feature the guest cannot do (a time namespace, hooks run in the guest...) is
refused with `UnsupportedError` naming it, never silently dropped.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError, UnsupportedError
from .hooks import hooks_from_oci

RUNNER = "/sbin/vc-run"
DEVICE_PROGRAMS = "/run/vc/devprog"
"""The guest's cache of containers' device programs (vc-run's `--device-program-cache`):
loaded ones stay pinned in its `bpf/` (a bpffs the pool's warm-up mounts), so a later
container with the same rules skips the load (docs/architecture.md 6.6)."""
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

READ_AHEAD_KIB = 4096
"""Read-ahead of the shares of containers' roots (FUSE's default: 128 KiB; vc-run's
`--read-ahead`, a pooled guest's roots' share).
A binary's first page fault then reads a small binary whole, in parallel requests, instead
of a round trip to virtiofsd per 128 KiB window: a pooled VM's first busybox `true`, from
its exec to its exit, 115 -> 72 ms (medians of 8, alternated, load 2.7; 6.6)."""

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
NAMESPACE_LETTERS = {
    "mount": "m",
    "pid": "p",
    "uts": "u",
    "ipc": "i",
    "network": "n",
    "cgroup": "c",
    "user": "U",
}
SECCOMP_ACTIONS = {
    "SCMP_ACT_KILL": "kill",
    "SCMP_ACT_KILL_THREAD": "kill",
    "SCMP_ACT_KILL_PROCESS": "kill_process",
    "SCMP_ACT_TRAP": "trap",
    "SCMP_ACT_ERRNO": "errno",
    "SCMP_ACT_TRACE": "trace",
    "SCMP_ACT_ALLOW": "allow",
    "SCMP_ACT_LOG": "log",
}
"""OCI seccomp actions -> vc-run's; ERRNO and TRACE carry a number (errnoRet, EPERM unless
given). SCMP_ACT_NOTIFY needs a listener the guest does not have."""
SECCOMP_OPS = {
    "SCMP_CMP_NE": "ne",
    "SCMP_CMP_LT": "lt",
    "SCMP_CMP_LE": "le",
    "SCMP_CMP_EQ": "eq",
    "SCMP_CMP_GE": "ge",
    "SCMP_CMP_GT": "gt",
    "SCMP_CMP_MASKED_EQ": "masked_eq",
}
SECCOMP_FLAGS = {
    "SECCOMP_FILTER_FLAG_LOG": "log",
    "SECCOMP_FILTER_FLAG_SPEC_ALLOW": "spec_allow",
    "SECCOMP_FILTER_FLAG_TSYNC": "",
}
"""OCI filter flags -> vc-run's; TSYNC needs nothing (vc-run has one thread)."""
SECCOMP_ARCHES = {
    "SCMP_ARCH_" + a.upper(): a
    for a in [
        "x86",
        "x86_64",
        "x32",
        "arm",
        "aarch64",
        "mips",
        "mips64",
        "mips64n32",
        "mipsel",
        "mipsel64",
        "mipsel64n32",
        "ppc",
        "ppc64",
        "ppc64le",
        "s390",
        "s390x",
        "parisc",
        "parisc64",
        "riscv64",
    ]
}
"""OCI architecture names -> libseccomp's."""
EPERM = 1
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
    """A host directory shared into a container (`-v HOST:GUEST[:ro]`); from a bundle's
    config.json, a file too (its directory is what the guest is given, see
    `volume_records`)."""

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


def resources_from_oci(resources: dict[str, Any]) -> Resources:
    """The limits of an OCI LinuxResources object (memory.limit, pids.limit, cpu.quota and
    cpu.period; unset or not positive: no limit)."""
    memory = resources.get("memory") or {}
    cpu = resources.get("cpu") or {}
    return Resources(
        memory_max=int(memory.get("limit") or 0),
        pids_max=int((resources.get("pids") or {}).get("limit") or 0),
        cpu_quota=int(cpu.get("quota") or 0),
        cpu_period=int(cpu.get("period") or 0),
    )


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
    uid_mappings: list[tuple[int, int, int]] = field(default_factory=list)
    """(container id, guest id, count) for a user namespace; gid_mappings likewise."""
    gid_mappings: list[tuple[int, int, int]] = field(default_factory=list)
    seccomp: list[str] = field(default_factory=list)
    """The seccomp profile as vc-run options (`seccomp_options`), for every process."""
    sysctls: list[str] = field(default_factory=list)
    """`KEY=VALUE` written from inside the container's namespaces."""
    devices: list[str] = field(default_factory=list)
    """Device nodes to make in the container, as vc-run's `PATH:TYPE:MAJOR:MINOR:MODE:UID:GID`."""
    joined: list[tuple[str, str]] = field(default_factory=list)
    """(namespace letter, guest pid file): namespaces joined, not made: those of another
    container of the sandbox (a pod's containers share its sandbox container's pid one)."""
    hooks: dict[str, Any] = field(default_factory=dict)
    """A bundle's OCI hooks, run on the host (`containers.hooks.hooks_from_oci`)."""
    device_cgroup: list[str] = field(default_factory=list)
    """`linux.resources.devices` as vc-run's `--device-cgroup`/`--device-rule` options
    (`device_cgroup_options`); empty: no device program (every device allowed)."""

    def runner_argv(
        self, rootfs: str, *, cgroup: str = "", pid_file: str = "", share: str = ""
    ) -> list[str]:
        """vc-run's command line for this process in the container rooted at `rootfs` (where
        vc-run mounts the virtio-fs `share` first, reading ahead `READ_AHEAD_KIB`)."""
        if not self.args:
            raise ConfigError("container: no command (the image has no Entrypoint or Cmd)")
        argv = [RUNNER, "--rootfs", rootfs]
        if share:
            argv += ["--share", share, "--read-ahead", str(READ_AHEAD_KIB)]
        argv += ["--cwd", self.cwd or "/", "--ns", self.namespaces]
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
        for flag, maps in (("--uid-map", self.uid_mappings), ("--gid-map", self.gid_mappings)):
            for inside, outside, count in maps:
                argv += [flag, f"{inside}:{outside}:{count}"]
        for device in self.devices:
            argv += ["--device", device]
        for sysctl in self.sysctls:
            argv += ["--sysctl", sysctl]
        for letter, pid_file_of in self.joined:
            argv += ["--join-ns", f"{letter}:{pid_file_of}"]
        if self.device_cgroup:
            argv += [*self.device_cgroup, "--device-program-cache", DEVICE_PROGRAMS]
        if cgroup:
            argv += ["--cgroup", cgroup]
        if pid_file:
            argv += ["--pid-file", pid_file]
        return [*argv, *self.seccomp, "--", *self.args]


USERNS_AUTO = (100000, 65536)
"""`--userns auto`: container ids 0-65535 are guest (and host) ids 100000-165535."""


def parse_userns(text: str) -> tuple[int, int] | None:
    """`host` (no user namespace), `auto` (`USERNS_AUTO`) or `ID:SIZE` (container ids
    0..SIZE-1 are ids ID..ID+SIZE-1 outside) -> (first outside id, size), None for host."""
    if text == "host":
        return None
    if text == "auto":
        return USERNS_AUTO
    first, sep, size = text.partition(":")
    if sep and first.isdigit() and size.isdigit():
        start, count = int(first), int(size)
        if start > 0 and count > 0 and start + count <= 1 << 32:
            return start, count
    raise ConfigError(
        f"invalid userns {text!r}: use host, auto or ID:SIZE (ID > 0, ids below 2^32)"
    )


def apply_userns(spec: ProcessSpec, userns: tuple[int, int]) -> None:
    """Run `spec` in a user namespace mapping container ids 0..size-1 (uids and gids) to
    `userns`'s; its user must be one of them."""
    start, size = userns
    for what, value in (("uid", spec.uid), ("gid", spec.gid)):
        if value >= size:
            raise ConfigError(f"container {what} {value} is not mapped by userns {start}:{size}")
    if "U" not in spec.namespaces.split(","):
        spec.namespaces += ",U"
    spec.uid_mappings = [(0, start, size)]
    spec.gid_mappings = [(0, start, size)]


def caps_mask(names: list[str]) -> int:
    mask = 0
    for name in names:
        key = name.upper().removeprefix("CAP_")
        if key not in CAPABILITIES:
            raise ConfigError(f"unknown capability {name!r}")
        mask |= 1 << CAPABILITIES[key]
    return mask


def seccomp_options(profile: Any, refuse: Callable[[str], Exception]) -> list[str]:
    """An OCI `linux.seccomp` profile -> vc-run's `--seccomp-*` options, as runc reads it:
    syscall names are resolved in the guest (names its libseccomp does not know are
    skipped), a rule repeating the default action is dropped, a rule whose conditions name
    one argument twice becomes one rule per condition (OR); an unknown action, operator,
    architecture or flag is refused by name."""
    if not isinstance(profile, dict):
        raise refuse("linux.seccomp must be an object")
    if profile.get("listenerPath"):
        raise refuse("linux.seccomp.listenerPath (a seccomp notify listener) is not supported")

    def action(name: Any, errno_ret: Any, where: str) -> str:
        if name is None:
            raise refuse(f"{where}: no seccomp action")
        if name == "SCMP_ACT_NOTIFY":
            raise refuse(f"{where}: seccomp action SCMP_ACT_NOTIFY is not supported")
        if name not in SECCOMP_ACTIONS:
            raise refuse(f"{where}: unknown seccomp action {name!r}")
        kind = SECCOMP_ACTIONS[name]
        if kind in ("errno", "trace"):
            value = EPERM if errno_ret is None else errno_ret
            if not isinstance(value, int) or not 0 <= value <= 0xFFFF:
                raise refuse(f"{where}: errnoRet {value!r} is not a number 0-65535")
            return f"{kind}={value}"
        return kind

    default = action(profile.get("defaultAction"), profile.get("defaultErrnoRet"), "linux.seccomp")
    out = ["--seccomp-default", default]
    for arch in profile.get("architectures") or []:
        if arch not in SECCOMP_ARCHES:
            raise refuse(f"linux.seccomp: unknown architecture {arch!r}")
        out += ["--seccomp-arch", SECCOMP_ARCHES[arch]]
    for flag in profile.get("flags") or []:
        if flag not in SECCOMP_FLAGS:
            raise refuse(f"linux.seccomp: unknown or unsupported flag {flag!r}")
        if SECCOMP_FLAGS[flag]:
            out += ["--seccomp-flag", SECCOMP_FLAGS[flag]]
    for i, rule in enumerate(profile.get("syscalls") or []):
        where = f"linux.seccomp.syscalls[{i}]"
        if not isinstance(rule, dict):
            raise refuse(f"{where} must be an object")
        act = action(rule.get("action"), rule.get("errnoRet"), where)
        names = rule.get("names") or []
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise refuse(f"{where}.names must be a list of syscall names")
        names = [n for n in names if _syscall_name(n)]
        conditions = []
        for arg in rule.get("args") or []:
            op = arg.get("op") if isinstance(arg, dict) else None
            if op not in SECCOMP_OPS:
                raise refuse(f"{where}: unknown seccomp operator {op!r}")
            index, value, two = arg.get("index"), arg.get("value", 0), arg.get("valueTwo", 0)
            if not isinstance(index, int) or not 0 <= index <= 5:
                raise refuse(f"{where}: argument index {index!r} is not 0-5")
            for v in (value, two):
                if not isinstance(v, int) or not 0 <= v < 1 << 64:
                    raise refuse(f"{where}: argument value {v!r} is not a 64-bit number")
            conditions.append((index, f"{index},{SECCOMP_OPS[op]},{value},{two}"))
        if act == default or not names:
            continue
        indexes = [index for index, _ in conditions]
        groups = (
            [[c] for _, c in conditions]
            if len(set(indexes)) < len(indexes)
            else [[c for _, c in conditions]]
        )
        for group in groups:
            out += ["--seccomp-syscall", ":".join([act, ",".join(names), *group])]
    return out


def _syscall_name(name: str) -> bool:
    """A name that can be a syscall's (others cannot resolve: skipped like unknown ones)."""
    return bool(name) and all(c.isascii() and (c.isalnum() or c == "_") for c in name)


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
    # process.terminal: whoever starts the process gives it a pty (`Container.start(tty=)`).
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
        if kind == "time":
            raise refuse(f"a {kind} namespace is not supported")
        if kind not in NAMESPACE_LETTERS:
            raise refuse(f"unknown namespace type {kind!r}")
        letters.append(NAMESPACE_LETTERS[kind])
    if linux.get("namespaces") is not None:
        if "m" not in letters:
            raise refuse("a container without a mount namespace is not supported")
        spec.namespaces = ",".join(letters)
    spec.uid_mappings = _id_mappings(linux, "uidMappings", "U" in letters, bundle)
    spec.gid_mappings = _id_mappings(linux, "gidMappings", "U" in letters, bundle)
    if "U" in letters:
        for what, value, maps in (
            ("uid", spec.uid, spec.uid_mappings),
            ("gid", spec.gid, spec.gid_mappings),
        ):
            if not any(inside <= value < inside + count for inside, _, count in maps):
                raise ConfigError(
                    f"{bundle}/config.json: process.user.{what} {value} is not in "
                    f"linux.{what}Mappings"
                )
    if linux.get("seccomp") is not None:
        spec.seccomp = seccomp_options(linux["seccomp"], refuse)
    spec.devices = [_device(d, i, refuse) for i, d in enumerate(linux.get("devices") or [])]
    spec.sysctls = _sysctls(linux.get("sysctl") or {}, spec.namespaces.split(","), refuse)
    for key in ("intelRdt",):
        if linux.get(key):
            raise refuse(f"linux.{key} is not supported")
    spec.hooks = hooks_from_oci(doc, bundle, refuse)
    resources = linux.get("resources") or {}
    for key in resources:
        if key not in ("memory", "pids", "cpu", "devices"):
            raise refuse(f"linux.resources.{key} is not supported")
    spec.resources = resources_from_oci(resources)
    spec.device_cgroup = device_cgroup_options(resources.get("devices") or [], refuse)
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
            if not os.path.isdir(source) and not os.path.isfile(source):
                raise refuse(
                    f"mount {dest}: only directories and files can be bind-mounted ({source})"
                )
            shares.append(Mount(source, dest, "ro" in opts))
        elif kind in ("tmpfs", "proc", "sysfs", "mqueue", "devpts"):
            spec.mounts.append((kind, kind, dest, ",".join(opts)))
        else:
            raise refuse(f"mount {dest} of type {kind!r} is not supported")
    return spec, root_path, shares


IPC_SYSCTLS = {
    "kernel.msgmax",
    "kernel.msgmnb",
    "kernel.msgmni",
    "kernel.sem",
    "kernel.shmall",
    "kernel.shmmax",
    "kernel.shmmni",
    "kernel.shm_rmid_forced",
}
UTS_SYSCTLS = {"kernel.hostname", "kernel.domainname"}


def _sysctls(items: Any, letters: list[str], refuse: Callable[[str], Exception]) -> list[str]:
    """`linux.sysctl` -> `KEY=VALUE`s, only namespaced ones, as runc allows them: IPC ones
    with an IPC namespace, UTS ones with a UTS namespace; `net.*` also without a network
    namespace of the container's own (the guest's is the sandbox's, as in Kata)."""
    if not isinstance(items, dict):
        raise refuse("linux.sysctl must be an object")
    out = []
    for key, value in items.items():
        where = f"linux.sysctl {key!r}"
        if not key or not all(c.isalnum() or c in "._-" for c in key) or ".." in key:
            raise refuse(f"{where} is not a sysctl name")
        if not isinstance(value, str):
            raise refuse(f"{where}: the value must be a string")
        if key in IPC_SYSCTLS or key.startswith("fs.mqueue."):
            if "i" not in letters:
                raise refuse(f"{where} needs an ipc namespace")
        elif key in UTS_SYSCTLS:
            if "u" not in letters:
                raise refuse(f"{where} needs a uts namespace")
        elif not key.startswith("net."):
            raise refuse(f"{where} is not namespaced: it would change the whole guest")
        out.append(f"{key}={value}")
    return out


DeviceKey = tuple[str, int, int]
"""(type c|b, major, minor), -1 for a wildcard number."""
WILDCARD = -1
DEFAULT_ALLOWED_DEVICES: tuple[dict[str, Any], ...] = tuple(
    {"allow": True, "type": t, "major": major, "minor": minor, "access": access}
    for t, major, minor, access in [
        ("c", None, None, "m"),
        ("b", None, None, "m"),
        ("c", 1, 3, "rwm"),  # /dev/null
        ("c", 1, 8, "rwm"),  # /dev/random
        ("c", 1, 7, "rwm"),  # /dev/full
        ("c", 5, 0, "rwm"),  # /dev/tty
        ("c", 1, 5, "rwm"),  # /dev/zero
        ("c", 1, 9, "rwm"),  # /dev/urandom
        ("c", 5, 1, "rwm"),  # /dev/console
        ("c", 136, None, "rwm"),  # /dev/pts/*
        ("c", 5, 2, "rwm"),  # /dev/ptmx
        ("c", 10, 200, "rwm"),  # /dev/net/tun
    ]
)
"""What runc appends to every container's device rules (specconv's AllowedDevices): mknod
of any node, and the standard nodes vc-run makes in /dev."""


def device_cgroup_options(rules: Any, refuse: Callable[[str], Exception]) -> list[str]:
    """`linux.resources.devices` (then runc's `DEFAULT_ALLOWED_DEVICES`) -> vc-run's options
    for the cgroup v2 device program: `--device-cgroup allow|deny` (the default) and one
    `--device-rule TYPE:MAJOR:MINOR:ACCESS` per exception to it (`*` for a wildcard number).

    The rules are reduced as runc's devices emulator (and cgroup v1) does: they start from
    deny-all; a rule of type `a` (all devices, `rwm`) resets to allow- or deny-all; each
    later rule adds an exception to the default or takes accesses away from an exception;
    taking away what only a wildcard exception grants (a "hole" in `c 1:* rwm`) cannot be
    expressed and is refused by name, as runc refuses it. No access given means `rwm`."""
    if not isinstance(rules, list):
        raise refuse("linux.resources.devices must be a list")
    default_allow = False
    exceptions: dict[DeviceKey, set[str]] = {}
    for i, rule in enumerate([*rules, *DEFAULT_ALLOWED_DEVICES]):
        where = f"linux.resources.devices[{i}]" if i < len(rules) else "a default device rule"
        if not isinstance(rule, dict):
            raise refuse(f"{where} must be an object")
        allow = rule.get("allow")
        if not isinstance(allow, bool):
            raise refuse(f"{where}: allow must be true or false")
        kind = rule.get("type") or "a"
        if kind not in ("a", "c", "b"):
            raise refuse(f"{where}: device type {kind!r} is not a, c or b")
        access = rule.get("access") or "rwm"
        if not isinstance(access, str) or not set(access) <= set("rwm"):
            raise refuse(f"{where}: access {access!r} is not made of r, w and m")
        numbers = []
        for name in ("major", "minor"):
            value = rule.get(name)
            if value is None or value == WILDCARD:
                numbers.append(WILDCARD)
            elif isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 32:
                numbers.append(value)
            else:
                raise refuse(f"{where}: {name} {value!r} is not a 32-bit number")
        if kind == "a":
            if numbers != [WILDCARD, WILDCARD] or set(access) != set("rwm"):
                raise refuse(
                    f"{where}: a rule for all device types must be for every number and rwm"
                )
            default_allow, exceptions = allow, {}
            continue
        key = (kind, numbers[0], numbers[1])
        perms = set(access)
        if allow != default_allow:
            exceptions.setdefault(key, set()).update(perms)
            continue
        for wider in (
            (kind, WILDCARD, key[2]),
            (kind, key[1], WILDCARD),
            (kind, WILDCARD, WILDCARD),
        ):
            if wider != key and perms & exceptions.get(wider, set()):
                raise refuse(
                    f"{where}: {'allowing' if allow else 'denying'} {_rule_text(key, perms)} "
                    f"inside the wider exception {_rule_text(wider, exceptions[wider])} "
                    "cannot be expressed (as in runc)"
                )
        left = exceptions.get(key, set()) - perms
        if left:
            exceptions[key] = left
        else:
            exceptions.pop(key, None)
    if default_allow and not exceptions:
        return []
    out = ["--device-cgroup", "allow" if default_allow else "deny"]
    for key, perms in sorted(exceptions.items()):
        out += ["--device-rule", _rule_text(key, perms).replace(" ", ":")]
    return out


def _rule_text(key: DeviceKey, perms: set[str]) -> str:
    """`c 1:* rw`, as cgroup v1 writes a device rule."""
    kind, major, minor = key
    numbers = ":".join("*" if n == WILDCARD else str(n) for n in (major, minor))
    return f"{kind} {numbers} {''.join(c for c in 'rwm' if c in perms)}"


def _device(d: Any, i: int, refuse: Callable[[str], Exception]) -> str:
    """One `linux.devices` entry -> vc-run's `--device` value (fileMode 0666, owner root
    unless given; a type `u` node is a character one)."""
    where = f"linux.devices[{i}]"
    if not isinstance(d, dict):
        raise refuse(f"{where} must be an object")
    path = d.get("path")
    kind = {"c": "c", "u": "c", "b": "b", "p": "p"}.get(str(d.get("type")))
    if not isinstance(path, str) or not path.startswith("/") or ".." in path.split("/"):
        raise refuse(f"{where}: path {path!r} must be absolute, without '..'")
    if ":" in path or path.rstrip("/") in ("", "/dev"):
        raise refuse(f"{where}: path {path!r} cannot be a device node")
    if kind is None:
        raise refuse(f"{where}: unknown device type {d.get('type')!r} (c, u, b or p)")
    numbers = [d.get(k, 0 if kind == "p" else None) for k in ("major", "minor")]
    numbers += [d.get("fileMode", 0o666), d.get("uid", 0), d.get("gid", 0)]
    if not all(isinstance(n, int) and 0 <= n < 1 << 32 for n in numbers):
        raise refuse(f"{where}: major, minor, fileMode, uid and gid must be numbers")
    major, minor, mode, uid, gid = (int(n or 0) for n in numbers)
    return f"{path}:{kind}:{major}:{minor}:{mode & 0o7777:o}:{uid}:{gid}"


def _id_mappings(
    linux: dict[str, Any], key: str, userns: bool, bundle: str
) -> list[tuple[int, int, int]]:
    """`linux.uidMappings`/`gidMappings` -> (container id, guest id, count); they come with
    a user namespace and only with one."""
    items = linux.get(key) or []
    where = f"{bundle}/config.json: linux.{key}"
    if items and not userns:
        raise ConfigError(f"{where} given without a user namespace")
    if userns and not items:
        raise ConfigError(f"{where}: a user namespace needs id mappings")
    out = []
    for m in items:
        fields = [
            m.get(k) if isinstance(m, dict) else None for k in ("containerID", "hostID", "size")
        ]
        if not all(isinstance(v, int) and 0 <= v < 1 << 32 for v in fields) or not fields[2]:
            raise ConfigError(f"{where}: {m!r} needs containerID, hostID and size > 0 (32-bit)")
        out.append((int(fields[0] or 0), int(fields[1] or 0), int(fields[2] or 0)))
    return out
