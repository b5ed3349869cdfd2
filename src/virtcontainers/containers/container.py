"""`Container`: one container inside a sandbox's guest (host side).

Its root reaches the guest as a virtio-fs share (the image's unpacked root under a writable
upper directory, an overlay made in virtiofsd's own mount namespace); `vc-run` in the guest
creates the container from a `ProcessSpec`. Processes run through the agent's buffered
exec: `start` launches the container's process and `wait` returns its `ExecResult`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shlex
import signal as signals
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, StateError
from .spec import (
    DEVICE_PROGRAMS,
    READ_AHEAD_KIB,
    Mount,
    ProcessSpec,
    Resources,
    device_cgroup_options,
)

if TYPE_CHECKING:
    from ..agent import ExecResult, Process
    from ..devices import SharedFS
    from ..sandbox import Sandbox

GUEST_ROOT = "/run/vc/c"
"""Where containers live in the guest: <id>/rootfs (the share), <id>/pid."""
GUEST_VOLUMES = "/run/vc/v"
GUEST_POOL = "/run/vc/pool"
"""Where a pooled VM's staged share of roots is mounted (see factory/poolshare.py)."""
GUEST_POOL_VOLUMES = "/run/vc/poolv"
"""Where a pooled VM's staged share of volumes is mounted."""
CGROUP_ROOT = "/sys/fs/cgroup"
MOUNT_TRIES = 200
"""A hot-added share is probed by the guest a moment after it is plugged: its mount is
retried (every 50 ms) this many times."""
RUNNING_TRIES = 1000
"""Looks (10 ms apart, in the guest) for a started container's pid before giving up waiting."""
NETWORK_FILES = ("/etc/hosts", "/etc/resolv.conf", "/etc/hostname")
"""What the guest's network set-up writes (network/guest.py), shared with its container."""


@dataclass
class ContainerRecord:
    """What is persisted about a container (so another process can exec into it)."""

    id: str
    share_tag: str
    """The virtio-fs tag of its root ("" when the root is a block device)."""
    block_serial: str = ""
    """Without virtio-fs: the serial of the drive holding its root (an ext4 image)."""
    image: str = ""
    spec: dict[str, Any] = field(default_factory=dict)
    volumes: list[dict[str, Any]] = field(default_factory=list)
    """Each: source, destination, read_only, tag, and file (a file bound from the shared
    directory `source`; "" for a directory)."""
    status: str = "created"
    process: int = 0
    """The agent's handle on the container's first process (for attach, logs)."""
    share_id: str = "ctr"
    """The id of the virtio-fs share of its root (what `virtc cp` reaches on the host)."""
    hot_shares: list[dict[str, Any]] = field(default_factory=list)
    """Shares hot-added for this container alone (id, source, tag): removed with it."""
    share_path: str = ""
    """In a VM from the pool: the guest directory holding its root in the share the guest
    mounted before hand-out (bound there; `share_tag` is that share's)."""
    cgroup: str = ""
    """Its cgroup in the guest when not its own (`cgroup_of`): a pooled VM's first container
    takes the one made while the VM waited (`POOL_CGROUP`)."""


DROP_CACHES = "echo 3 > /proc/sys/vm/drop_caches"
"""Guest shell: forget every unused name and inode, and every clean page, of every file
system (virtio-fs shares included): what a share cached is read again from the host."""


GUEST_MOUNTED = (
    'vc_mounted() { while read -r _ m t _; do [ "$m" = "$1" ] && { [ -z "$2" ] || '
    '[ "$t" = "$2" ]; } && return 0; done < /proc/mounts; return 1; }'
)
"""Shell function `vc_mounted WHERE [TYPE]`: whether something (of TYPE) is mounted on
WHERE, read by the shell itself: under TCG every process the guest starts costs
milliseconds, so the scripts below start only the ones that do something."""


def _mkdir(where: str) -> str:
    q = shlex.quote
    return f"{{ [ -d {q(where)} ] || mkdir -p {q(where)}; }}"


def mount_virtiofs(tag: str, where: str) -> str:
    """Shell (using `GUEST_MOUNTED`) that mounts the virtio-fs share `tag` on `where` unless
    something is mounted there already: a hot-added share is probed by the guest a moment
    after it is plugged."""
    q = shlex.quote
    mount = f"mount -t virtiofs {q(tag)} {q(where)}"
    return (
        f"{{ vc_mounted {q(where)} || {{ n=0; until {mount} 2>/dev/null; do "
        f"n=$((n+1)); [ $n -lt {MOUNT_TRIES} ] || {{ {mount}; break; }}; sleep 0.05; "
        f"done; vc_mounted {q(where)}; }}; }}"
    )


def read_ahead(where: str, kib: int = READ_AHEAD_KIB) -> str:
    """Shell (builtins only) that sets the read-ahead of the file system mounted on `where`
    (its bdi, named by the mount's device numbers); never fails. The directory is listed
    first: FUSE lowers the read-ahead to what its daemon's answer to INIT allows, and a
    request waits for that answer."""
    q = shlex.quote(where)
    return (
        f'{{ for _ in {q}/*; do :; done; while read -r _ _ dev _ m _; do [ "$m" = {q} ] && '
        f"echo {kib} > /sys/class/bdi/$dev/read_ahead_kb; done < /proc/self/mountinfo; true; }}"
    )


def rootfs_of(container_id: str) -> str:
    """Where container `container_id`'s root is mounted in the guest."""
    return f"{GUEST_ROOT}/{container_id}/rootfs"


def cgroup_of(container_id: str) -> str:
    """Container `container_id`'s own cgroup in the guest."""
    return f"{CGROUP_ROOT}/vc-{container_id}"


def cgroup_script() -> str:
    """Shell (using `GUEST_MOUNTED`) that mounts the guest's cgroup2 hierarchy and enables
    the controllers containers use (once per guest)."""
    return (
        f"{{ vc_mounted {CGROUP_ROOT} cgroup2 || mount -t cgroup2 none {CGROUP_ROOT}; }} && "
        f"{{ echo '+memory +pids +cpu' > {CGROUP_ROOT}/cgroup.subtree_control 2>/dev/null; "
        "true; }"
    )


WARM_ROOT = "/run/vc/warm"
"""Where the guest's warm-up container (`warm_up_script`) lives while it runs."""
WARM_CGROUP = cgroup_of("warm-up")
POOL_CGROUP = f"{CGROUP_ROOT}/vc.pooled"
"""The cgroup a pooled VM makes while it waits, for its first container: cgroup v2 cannot
rename one, and its creation at hand-out cost vc-run 3-30 ms under TCG (6.6). Outside the
`vc-<id>` names, and made after the warm-up (`poolshare.guest_script`), so that its stats
count the container's processes alone."""


def warm_up_script() -> str:
    """Shell that runs one throwaway container in the guest (`true` from the guest's own
    /bin, in the namespaces a container gets, network included, and a cgroup of its own
    with the device program of an OCI default spec), then removes what it made. A pooled
    VM runs it while it waits: under TCG the first container of a guest pays for QEMU's
    translation of the code it runs (vc-run, the kernel's namespace, mount, exec and exit
    paths: ~0.1 s), which this moves out of the hand-out, and the device program it loads
    stays pinned in `DEVICE_PROGRAMS` for the containers whose rules are the default's
    (docs/architecture.md 6.6). Expects `cgroup_script` to have run."""
    q = shlex.quote
    spec = ProcessSpec(
        args=["/bin/true"],
        namespaces="m,p,u,i,n",
        mounts=[("bind", "/bin", "/bin", "rbind,ro")],
        device_cgroup=device_cgroup_options([{"allow": False, "access": "rwm"}], ConfigError),
    )
    argv = spec.runner_argv(f"{WARM_ROOT}/rootfs", cgroup=WARM_CGROUP, pid_file=f"{WARM_ROOT}/pid")
    pins = f"{DEVICE_PROGRAMS}/bpf"
    return (
        f"{GUEST_MOUNTED}; mkdir -p {WARM_ROOT}/rootfs {WARM_CGROUP} {pins} && "
        f"{{ vc_mounted {pins} bpf || mount -t bpf bpf {pins}; }} && "
        f"{{ {' '.join(q(a) for a in argv)}; rc=$?; rm -rf {WARM_ROOT}; rmdir {WARM_CGROUP}; "
        '[ "$rc" = 0 ]; }'
    )


def spec_from_dict(d: dict[str, Any]) -> ProcessSpec:
    d = dict(d)
    d["resources"] = Resources(**(d.get("resources") or {}))
    d["rlimits"] = [tuple(x) for x in d.get("rlimits") or []]
    d["mounts"] = [tuple(x) for x in d.get("mounts") or []]
    for key in ("uid_mappings", "gid_mappings", "joined"):
        d[key] = [tuple(x) for x in d.get(key) or []]
    return ProcessSpec(**d)


class Container:
    """A container in a sandbox: start, exec, kill, wait, pids, delete."""

    def __init__(self, sandbox: Sandbox, record: ContainerRecord) -> None:
        self.sandbox = sandbox
        self.record = record
        self._task: asyncio.Task[ExecResult] | None = None
        self.process: Process | None = None
        """The container's first process once started (streamed output, stdin, signals)."""
        self._set_up = False
        """`setup` ran (through this object): the start need not run its script again."""

    @property
    def id(self) -> str:
        return self.record.id

    @property
    def spec(self) -> ProcessSpec:
        return spec_from_dict(self.record.spec)

    @property
    def guest_dir(self) -> str:
        return f"{GUEST_ROOT}/{self.id}"

    @property
    def rootfs(self) -> str:
        return rootfs_of(self.id)

    @property
    def cgroup(self) -> str:
        """The container's own cgroup in the guest (its processes and limits)."""
        return self.record.cgroup or cgroup_of(self.id)

    def _volume_mounts(self) -> list[tuple[str, str, str, str]]:
        out = []
        for v in self.record.volumes:
            opts = "rbind,ro" if v["read_only"] else "rbind"
            base = v.get("guest") or f"{GUEST_VOLUMES}/{v['tag']}"
            src = base + (f"/{v['file']}" if v.get("file") else "")
            out.append(("bind", src, str(v["destination"]), opts))
        return out

    @property
    def root(self) -> str:
        """The root vc-run enters: in a pooled VM, the container's directory in the staged
        share itself (vc-run binds it in the container's own mount namespace), else where the
        set-up script mounts it (`rootfs`)."""
        return self.record.share_path or self.rootfs

    def setup_script(self) -> str:
        """Shell run once in the guest before the first start: mount a block root, the
        volumes and write the cgroup's limits. "" when vc-run does it all (it mounts a root
        share, `--share`, makes its pid file's directory, mounts the cgroup hierarchy and
        makes its cgroup): a root share with no volume to mount and no limit to write."""
        q = shlex.quote
        lines = [GUEST_MOUNTED]
        if self.record.block_serial:
            find = (
                'for d in /sys/block/vd*; do [ "$(cat $d/serial 2>/dev/null)" = '
                f"{q(self.record.block_serial)} ] && dev=/dev/${{d##*/}}; done; "
                '[ -n "$dev" ]'
            )
            lines.append(_mkdir(self.rootfs))
            lines.append(
                f"{{ vc_mounted {q(self.rootfs)} || {{ {find} && "
                f"mount -t ext4 $dev {q(self.rootfs)}; }}; }}"
            )
        for tag in dict.fromkeys(v["tag"] for v in self.record.volumes if not v.get("guest")):
            where = f"{GUEST_VOLUMES}/{tag}"
            lines.append(_mkdir(where))
            lines.append(mount_virtiofs(tag, where))
        limits = self.spec.resources.files()
        if len(lines) == 1 and not limits:
            return ""
        if limits:
            lines.append(cgroup_script())
            lines.append(_mkdir(self.cgroup))
        for name, value in limits.items():
            lines.append(f"echo {q(value)} > {self.cgroup}/{name}")
        return " && ".join(lines)

    async def setup(self) -> None:
        """Mount the container's block root and volumes in the guest (idempotent); no guest
        request when vc-run needs nothing made before it (`setup_script`)."""
        script = self.setup_script()
        result = await self.sandbox.exec(["/bin/sh", "-c", script]) if script else None
        if result is not None and result.exit_code != 0:
            raise StateError(
                f"container {self.id}: cannot mount its root in the guest: "
                f"{result.stderr.decode(errors='replace').strip()}"
            )
        self._set_up = True

    def _network_mounts(self, spec: ProcessSpec) -> list[tuple[str, str, str, str]]:
        """The guest's /etc/hosts, /etc/resolv.conf and /etc/hostname bound into the
        container (as Kata does) when the sandbox has a network and the spec binds none."""
        if self.sandbox.network is None:
            return []
        taken = {m[2] for m in spec.mounts}
        return [("bind", f, f, "bind") for f in NETWORK_FILES if f not in taken]

    def runner_argv(self, spec: ProcessSpec | None = None) -> list[str]:
        spec = spec or self.spec
        spec.mounts = [*spec.mounts, *self._volume_mounts(), *self._network_mounts(spec)]
        share = self.record.share_tag if not self.record.share_path else ""
        return spec.runner_argv(
            self.root, cgroup=self.cgroup, pid_file=f"{self.guest_dir}/pid", share=share
        )

    def _start_argv(self) -> list[str]:
        """Mount what the container needs, then become vc-run (one guest request); vc-run
        alone once `setup` has run (its script, idempotent, costs a TCG guest ~0.2 s) or
        when there is nothing to set up."""
        setup = "" if self._set_up else self.setup_script()
        if not setup:
            return self.runner_argv()
        script = f'{setup} && exec "$@"'
        return ["/bin/sh", "-c", script, "vc-setup", *self.runner_argv()]

    async def start(
        self,
        *,
        tty: bool = False,
        rows: int = 24,
        cols: int = 80,
        detach: bool = False,
        timeout: float | None = None,
    ) -> Process:
        """Start the container's process; its output streams as it is written (see
        `Process`). A `detach`ed one outlives this connection (`attach`)."""
        if self.process is not None or self._task is not None:
            raise StateError(f"container {self.id} is already started")
        self.process = await self.sandbox.start_process(
            self._start_argv(), tty=tty, rows=rows, cols=cols, detach=detach, timeout=timeout
        )
        self.record.process = self.process.handle
        self.record.status = "running"
        if detach or self.spec.hooks.get("poststart"):
            await self.until_running()
        await self._poststart()
        return self.process

    def _vmm_pid(self) -> int:
        """The pid OCI hooks get in the container's state: the VMM's, as Kata gives."""
        hv = self.sandbox._driver()
        pids = hv.get_pids() if hv is not None else []
        return pids[0] if pids else 0

    async def _poststart(self) -> None:
        from .hooks import run_hooks_warning

        hooks = self.spec.hooks
        if hooks.get("poststart"):
            await run_hooks_warning(hooks, "poststart", self.id, "running", self._vmm_pid())

    async def until_running(self) -> None:
        """Until the first process has written its pid (exec, kill and ps can find it), or
        has ended: a detached start returns only then. One guest request that looks there,
        not a round trip per look."""
        script = (
            f"n=0; until [ -s {self.guest_dir}/pid ]; do n=$((n+1)); "
            f"[ $n -lt {RUNNING_TRIES} ] || exit 1; sleep 0.01; done"
        )
        probe = asyncio.ensure_future(self.sandbox.exec(["/bin/sh", "-c", script]))
        ended: asyncio.Future[Any]
        if self.process is not None:
            ended = asyncio.ensure_future(self.process.wait())
        else:  # `run`'s buffered request
            assert self._task is not None
            ended = asyncio.ensure_future(asyncio.shield(self._task))
        try:
            await asyncio.wait({probe, ended}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (probe, ended):
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task

    async def attach(self, *, keep: bool = False, offsets: tuple[int, int] = (0, 0)) -> Process:
        """A handle on the (detached) container process, from any manager; with `keep` (a
        log reader) its exit is left for a later attach to collect; its kept output from the
        stream `offsets` (stdout, stderr) on."""
        if self.process is None:
            if not self.record.process:
                raise StateError(f"container {self.id} was never started")
            self.process = await self.sandbox.attach_process(
                self.record.process, keep=keep, offsets=offsets
            )
        return self.process

    async def run(self, *, stdin: bytes = b"", timeout: float | None = None) -> ExecResult:
        """Start and wait, collecting the output (the buffered form)."""
        self._task = asyncio.ensure_future(
            self.sandbox.exec(self._start_argv(), stdin=stdin, timeout=timeout)
        )
        self.record.status = "running"
        if self.spec.hooks.get("poststart"):
            await self.until_running()
            await self._poststart()
        return await self.wait()

    async def wait(self) -> ExecResult:
        """The container process's result (exit code and, for `run`, its output)."""
        from ..agent import ExecResult

        try:
            if self._task is not None:
                return await self._task
            proc = await self.attach()
            status = await proc.wait()
            return ExecResult(status.exit_code, b"", b"", status.signal, status.timed_out)
        finally:
            self.record.status = "stopped"

    async def pid(self) -> int:
        """The guest pid of the container's first process (in the guest's pid namespace)."""
        result = await self.sandbox.exec(["/bin/cat", f"{self.guest_dir}/pid"])
        text = result.stdout.decode().strip()
        if result.exit_code != 0 or not text.isdigit():
            raise StateError(f"container {self.id} is not running")
        return int(text)

    async def exec(
        self,
        argv: list[str],
        *,
        env: list[str] | None = None,
        cwd: str | None = None,
        user: tuple[int, int] | None = None,
        stdin: bytes = b"",
        timeout: float | None = None,
    ) -> ExecResult:
        """Run a command inside the running container (its namespaces, root, env, user)."""
        runner = await self._exec_argv(argv, env, cwd, user)
        return await self.sandbox.exec(runner, stdin=stdin, timeout=timeout)

    async def start_exec(
        self,
        argv: list[str],
        *,
        env: list[str] | None = None,
        cwd: str | None = None,
        user: tuple[int, int] | None = None,
        tty: bool = False,
        rows: int = 24,
        cols: int = 80,
    ) -> Process:
        """`exec` as a started process: output streams as it is written, stdin as it comes,
        with `tty` a terminal of rows x cols."""
        runner = await self._exec_argv(argv, env, cwd, user)
        return await self.sandbox.start_process(runner, tty=tty, rows=rows, cols=cols)

    async def _exec_argv(
        self,
        argv: list[str],
        env: list[str] | None,
        cwd: str | None,
        user: tuple[int, int] | None,
    ) -> list[str]:
        """vc-run joining the running container (its namespaces, root, cgroup, env, user)."""
        if not argv:
            raise ConfigError("exec: empty command")
        from .spec import caps_mask, merge_env

        spec = self.spec
        pid = await self.pid()
        uid, gid = user if user is not None else (spec.uid, spec.gid)
        runner = ["/sbin/vc-run", "--join", str(pid), "--cgroup", self.cgroup]
        runner += ["--cwd", cwd or spec.cwd or "/"]
        runner += ["--user", f"{uid}:{gid}", "--caps", format(caps_mask(spec.caps), "x")]
        for e in merge_env(spec.env, env or []):
            runner += ["--env", e]
        if spec.no_new_privs:
            runner.append("--no-new-privs")
        runner += spec.seccomp
        return [*runner, "--", *argv]

    async def kill(self, sig: int = signals.SIGTERM) -> None:
        """Send a signal to the container's first process."""
        pid = await self.pid()
        result = await self.sandbox.exec(["/bin/kill", f"-{int(sig)}", str(pid)])
        if result.exit_code != 0:
            raise StateError(f"container {self.id}: kill failed: {result.stderr.decode().strip()}")

    async def pids(self) -> list[int]:
        """The guest pids of every process in the container."""
        return [pid for pid, _ in await self.processes()]

    async def processes(self) -> list[tuple[int, str]]:
        """(guest pid, command line) of every process in the container (its cgroup's)."""
        await self.pid()
        script = (
            f"for p in $(cat {self.cgroup}/cgroup.procs); do "
            f"echo \"$p $(tr '\\0' ' ' < /proc/$p/cmdline)\"; done 2>/dev/null; true"
        )
        result = await self.sandbox.exec(["/bin/sh", "-c", script])
        out = []
        for line in result.stdout.decode(errors="replace").splitlines():
            pid_text, _, cmd = line.partition(" ")
            if pid_text.isdigit():
                out.append((int(pid_text), cmd.strip()))
        return sorted(out)

    async def delete(self) -> None:
        """Kill what still runs in it, unmount its root and volumes in the guest, remove
        its cgroup and the shares made for it alone; the sandbox's other containers go on."""
        with contextlib.suppress(StateError):
            await self.kill(signals.SIGKILL)
        with contextlib.suppress(Exception):
            await self.sandbox.exec(["/bin/sh", "-c", f"echo 1 > {self.cgroup}/cgroup.kill"])
        if self._task is not None or self.process is not None:
            with contextlib.suppress(Exception):
                await self.wait()
        q = shlex.quote
        script = [f"umount -l {q(self.rootfs)} 2>/dev/null", f"rm -rf {q(self.guest_dir)}"]
        hot = {s["tag"] for s in self.record.hot_shares}
        script += [
            f"umount {q(GUEST_VOLUMES + '/' + tag)} 2>/dev/null"
            for tag in dict.fromkeys(v["tag"] for v in self.record.volumes)
            if tag in hot
        ]
        script += [
            f"for i in $(seq 100); do rmdir {self.cgroup} 2>/dev/null && break; "
            f"[ -d {self.cgroup} ] || break; sleep 0.02; done"
        ]
        with contextlib.suppress(Exception):
            await self.sandbox.exec(["/bin/sh", "-c", "; ".join(script) + "; true"])
        self.record.status = "deleted"
        await self.sandbox.remove_container(self)
        await self.poststop()

    async def poststop(self) -> None:
        """Run the container's poststop hooks (failures are warnings), once it is gone."""
        from .hooks import run_hooks_warning

        hooks = self.record.spec.get("hooks") or {}
        if hooks.get("poststop"):
            await run_hooks_warning(hooks, "poststop", self.id, "stopped")

    async def copy_in(self, host_src: str, path: str) -> None:
        """Copy the host file or directory `host_src` to container path `path` (docker cp
        rules: see `copy.copy_in`), written on the host, then make the guest drop its caches:
        its root share keeps names, attributes and pages (`ROOT_CACHE`), so the guest would
        go on reading what a copy replaced."""
        from .. import persist
        from .copy import copy_in

        root, where, read_only = self.locate(
            path, persist.vm_dir(self.sandbox.id, self.sandbox.run_root)
        )
        if read_only:
            raise ConfigError(f"cp: {path} is on a read-only volume")
        copy_in(root, host_src, where, self.root_ids())  # forks: not from a worker thread
        result = await self.sandbox.exec(["/bin/sh", "-c", DROP_CACHES])
        if result.exit_code != 0:
            raise StateError(
                f"container {self.id}: copied, but the guest cannot drop its caches: "
                f"{result.stderr.decode(errors='replace').strip()}"
            )

    async def copy_out(self, path: str, host_dst: str) -> None:
        """Copy container path `path` to the host's `host_dst` (docker cp rules: see
        `copy.copy_out`)."""
        from .. import persist
        from .copy import copy_out

        root, where, _ = self.locate(path, persist.vm_dir(self.sandbox.id, self.sandbox.run_root))
        copy_out(root, where, host_dst)  # forks: not from a worker thread

    def root_ids(self) -> tuple[int, int]:
        """The host (and guest) uid and gid of the container's root: 0 and 0, or what its
        user namespace maps them to (id 0 is always mapped: vc-run requires it)."""

        def mapped(maps: list[tuple[int, int, int]]) -> int:
            for inside, outside, count in maps:
                if inside <= 0 < inside + count:
                    return outside - inside
            return 0

        return mapped(self.spec.uid_mappings), mapped(self.spec.gid_mappings)

    def locate(self, path: str, vm_dir: str) -> tuple[str, str, bool]:
        """Where a container path lives on the host: (directory, path under it, read-only).
        Under a volume: the volume's host directory; else the root the share serves."""
        from .copy import share_root

        if not path.startswith("/"):
            raise ConfigError(f"container path {path!r} must be absolute")
        norm = "/" + "/".join(p for p in path.split("/") if p not in ("", "."))
        for v in sorted(self.record.volumes, key=lambda v: -len(v["destination"])):
            dest = "/" + v["destination"].strip("/")
            if v.get("file") and norm == dest:
                return v["source"], "/" + v["file"], bool(v["read_only"])
            if not v.get("file") and (norm == dest or norm.startswith(dest + "/")):
                return v["source"], norm[len(dest) :] or "/", bool(v["read_only"])
        root = share_root(vm_dir, self.record.share_id)
        if self.record.share_path:  # the share's directory that holds the root
            root += self.record.share_path[len(GUEST_POOL) :]
        return root, norm, False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.record)


def volume_records(
    mounts: list[Mount], prefix: str, shared: Sequence[dict[str, Any]] = ()
) -> list[dict[str, Any]]:
    """The volumes of `mounts`, each with the tag of the share that holds it: a directory's
    own, or for a file (a bundle's bind of /etc/resolv.conf...) its directory's, shared once
    for every file bound from it in the same mode. The container sees only the file; the
    guest, the directory (containerd's and CRI's files sit in per-container directories).
    A directory already `shared` (volume records of the sandbox) read-write, or in the same
    mode, is reused; new tags are `prefix`vN."""
    tags: dict[tuple[str, bool], str] = {}
    for v in shared:
        tags.setdefault((v["source"], bool(v["read_only"])), v["tag"])
        if not v["read_only"]:
            tags.setdefault((v["source"], True), v["tag"])
    reused = len(tags)
    out = []
    for m in mounts:
        directory, name = (m.source, "") if os.path.isdir(m.source) else os.path.split(m.source)
        tag = tags.setdefault((directory, m.read_only), f"{prefix}v{len(tags) - reused}")
        out.append(
            {
                "source": directory,
                "destination": m.destination,
                "read_only": m.read_only,
                "tag": tag,
                "file": name,
            }
        )
    return out


def volume_shares(volumes: list[dict[str, Any]], id_prefix: str) -> list[SharedFS]:
    """One virtio-fs share per tag of `volumes` (ids `id_prefix`0, 1, ...)."""
    from ..devices import SharedFS

    unique = list({v["tag"]: v for v in volumes}.values())
    return [
        SharedFS(
            id=f"{id_prefix}{i}", source=v["source"], mount_tag=v["tag"], read_only=v["read_only"]
        )
        for i, v in enumerate(unique)
    ]
