"""`Sandbox`: a VM with a guest agent — config -> hypervisor -> agent; exec, files, lifecycle.

Works with any driver through `Hypervisor` only. State is persisted in the state store so
that `Sandbox.list()` and `Sandbox.attach(id)` work from another process.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import logging
import os
import time
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Iterator,
    Mapping,
    Sequence,
)
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from . import persist
from .errors import (
    AgentError,
    ConfigError,
    StateError,
    UnsupportedError,
    VCError,
    VMExitedError,
    VMTimeoutError,
)
from .hypervisor import Hypervisor, VMState, new_hypervisor
from .inventory import (
    STARTING,
    SandboxInfo,
    list_sandboxes,
    one_sandbox,
    recorded_state,
)
from .types import Capabilities, HypervisorType

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from .agent import AgentClient, ExecResult, Process
    from .agent.endpoint import AgentEndpoint
    from .agent.fake import FakeAgent
    from .agent.process import StartOptions
    from .config import HypervisorConfig
    from .containers import Container, Mount, ProcessSpec
    from .devices import BlockDrive, SharedFS
    from .network import Interface, NetworkConfig, SandboxNetwork

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_START_TIMEOUT = 60.0
DEATH_POLL = 0.5
"""How often a wait on the guest (agent connect) checks that the VM is still alive."""
PID_POLL = 0.005
LOCK_TIMEOUT = 60.0
"""Longest wait for another process's operation on the same sandbox (a stop takes seconds)."""
GUEST_SETTLE_TIMEOUT = 30.0
"""Longest wait for the guest to see hotplugged hardware."""
MOCK_GUEST = {"kernel_path": "/mock/vmlinux", "initrd_path": "/mock/initrd.img"}
"""Guest asset paths the mock is given when the config names none: it boots nothing, but its
config is validated as a real VMM's is (a kernel, and an initrd or image)."""
MOCK_AGENT_SOCKET = "mock-agent.sock"


def build_config(
    config: HypervisorConfig | None, overrides: dict[str, Any], htype: HypervisorType
) -> HypervisorConfig:
    """A validated config: the caller's (copied), overrides applied, guest assets filled in."""
    from .config import HypervisorConfig

    cfg = config.copy() if config is not None else HypervisorConfig()
    fields = {f.name for f in dataclasses.fields(HypervisorConfig)}
    for name, value in overrides.items():
        if name not in fields:
            raise ConfigError(f"unknown sandbox option {name!r} (not a HypervisorConfig field)")
        setattr(cfg, name, value)
    if htype is HypervisorType.MOCK and not cfg.kernel_path and not cfg.custom_kernel_asset():
        cfg.kernel_path = MOCK_GUEST["kernel_path"]
        if not cfg.image_path and not cfg.initrd_path:
            cfg.initrd_path = MOCK_GUEST["initrd_path"]
    if htype is not HypervisorType.MOCK and not cfg.kernel_path and not cfg.custom_kernel_asset():
        from .guest import default_kernel_params, ensure_assets, loops_per_jiffy

        assets = ensure_assets()
        # acrn-dm loads only bzImages; the others boot the ELF kernel without decompressing.
        acrn = htype is HypervisorType.ACRN and assets.bzimage
        cfg.kernel_path = assets.bzimage if acrn else assets.kernel
        if not cfg.image_path and not cfg.initrd_path:
            cfg.initrd_path = assets.initrd
        lpj = loops_per_jiffy(assets.kernel_hz)
        cfg.kernel_params = [*default_kernel_params(lpj=lpj), *cfg.kernel_params]
    cfg.validate()
    return cfg


class Sandbox:
    """A running VM with a guest agent; use `async with Sandbox(...) as sb: await sb.exec(...)`."""

    def __init__(
        self,
        id: str | None = None,
        hypervisor: str | HypervisorType = "qemu",
        config: HypervisorConfig | None = None,
        *,
        run_root: str | None = None,
        start_timeout: float = DEFAULT_START_TIMEOUT,
        agent_timeout: float | None = None,
        network: NetworkConfig | str | None = None,
        image: str | None = None,
        bundle: str | None = None,
        mounts: Sequence[Mount | str] = (),
        image_store: str | None = None,
        userns: str | None = None,
        **overrides: Any,
    ) -> None:
        """`agent_timeout` bounds each guest agent request that should be answered promptly,
        and how long the agent may stay silent during a long one (an exec without a
        timeout); default `agent.client.DEFAULT_REQUEST_TIMEOUT`.

        `image` (a reference in the image store at `image_store`) or `bundle` (an OCI
        runtime bundle directory) is the root of the sandbox's container (see
        `create_container`); `mounts` (`Mount`s or "HOST:GUEST[:ro]") are host directories
        shared into it. They reach the guest over virtio-fs, set up before the VM boots.
        `userns` ("host", "auto" or "ID:SIZE", see `containers.spec.parse_userns`) runs the
        image's containers in a user namespace whose root is outside id ID: their roots'
        owners are shifted by ID (metadata-only copies in their overlays)."""
        self.id = id or _new_id(12)
        persist.vm_dir(self.id, run_root)  # validates the id early
        self.hypervisor_type = HypervisorType.parse(hypervisor)
        self.run_root = persist.run_root(run_root)
        self.start_timeout = start_timeout
        self.agent_timeout = agent_timeout
        self.config_request = config
        self.overrides = overrides
        self._hv: Hypervisor | None = None
        self._saved: dict[str, Any] | None = None
        """An attached sandbox's state document, until its driver is needed (`_driver`)."""
        self._saved_state = VMState.NEW
        self._agent: AgentClient | None = None
        self._agent_endpoint: AgentEndpoint | None = None
        self._mock_agent: FakeAgent | None = None
        """The mock's stand-in guest agent, served by the process that started the sandbox."""
        self._agent_lock = asyncio.Lock()
        self._holding_lock = False
        self._store = persist.StateStore(self.run_root)
        self.created_at = time.time()
        self.disks: dict[str, BlockDrive] = {}
        self.network_request = network
        self.network: SandboxNetwork | None = None
        """The sandbox's network (None: no network was asked for, the VM has no NIC)."""
        if image is not None and bundle is not None:
            raise ConfigError("a sandbox takes an image or a bundle, not both")
        self.image = image
        self.bundle = os.path.abspath(bundle) if bundle is not None else None
        self.mounts: list[Mount] = []
        if mounts:  # the container code is imported only for sandboxes that use it
            from .containers import Mount

            self.mounts = [m if isinstance(m, Mount) else Mount.parse(m) for m in mounts]
        for m in self.mounts:
            m.check()
        self.image_store = image_store
        self.userns: tuple[int, int] | None = None
        if userns is not None:
            from .containers.spec import parse_userns

            if bundle is not None:
                raise ConfigError("userns is for an image: a bundle's config.json maps its own")
            self.userns = parse_userns(userns)
        self.workload: dict[str, Any] = {}
        """What was shared for the container: image digest, store, root, volumes."""
        self.containers: dict[str, Container] = {}
        workload = image is not None or bundle is not None or bool(self.mounts)
        virtio_fs = self.hypervisor_type in (HypervisorType.QEMU, HypervisorType.CLH)
        if workload and virtio_fs and not overrides.get("shared_fs"):
            self.overrides = {**overrides, "shared_fs": "virtio-fs"}

    # -- properties -------------------------------------------------------------------------
    @property
    def hypervisor(self) -> Hypervisor:
        """The driver behind this sandbox."""
        hv = self._driver()
        if hv is None:
            raise StateError(f"sandbox {self.id} is not created")
        return hv

    def _driver(self) -> Hypervisor | None:
        """The driver, if any; an attached sandbox's is loaded from its saved state on first
        use: exec, file copies and detach need only the agent, not the driver's imports."""
        if self._hv is None and self._saved is not None:
            from .persist import HypervisorState

            doc, self._saved = self._saved, None
            hv = new_hypervisor(self.hypervisor_type, self.run_root)
            try:
                hv.load(HypervisorState.model_validate(doc.get("hypervisor", {})))
            except ValueError as e:
                raise StateError(f"sandbox {self.id}: unreadable hypervisor state: {e}") from e
            hv.state = self._saved_state
            self._hv = hv
        return self._hv

    @property
    def config(self) -> HypervisorConfig:
        """The validated configuration."""
        return self.hypervisor.hypervisor_config()

    @property
    def state(self) -> VMState:
        """Lifecycle state of the VM."""
        if self._hv is not None:
            return self._hv.state
        return self._saved_state

    def capabilities(self) -> Capabilities:
        """What the driver supports for this sandbox."""
        return self.hypervisor.capabilities()

    # -- lifecycle --------------------------------------------------------------------------
    async def create(self) -> None:
        """Validate the config and prepare the VM (nothing is launched); persist it."""
        if self._hv is not None or self._saved is not None:
            raise StateError(f"sandbox {self.id} is already created")
        cfg = build_config(self.config_request, self.overrides, self.hypervisor_type)
        if self.network_request is not None:
            self.network = self._plan_network(self.network_request)
        with self._store.lock(self.id):
            if self._store.exists(self.id):
                raise StateError(f"sandbox {self.id} already exists")
            self._store.write(self.id, self._doc(VMState.NEW.value, cfg))
        try:
            net = self.network
            hv = new_hypervisor(self.hypervisor_type, self.run_root)
            queues = cfg.num_vcpus if Capabilities.MULTI_QUEUE in hv.capabilities() else 1
            if net is not None:
                # Each step of the plan is recorded before it is made (see SandboxNetwork).
                await net.setup(queues, lambda: self._write_doc(VMState.NEW.value, cfg))
            await hv.create_sandbox(self.id, net.vmm_netns if net else None, cfg)
            self._hv = hv
            await self._plug_agent_channel()
            if net is not None:
                for dev in net.devices(queues, _vhost_net(cfg)):
                    await hv.add_device(dev)
            await self._plug_workload()
            self._persist()
        except BaseException:
            await self._teardown()
            raise

    async def _plug_workload(self) -> None:
        """Share the container's root and volumes with the guest: before it boots, or
        hot-added to a running VM (one from the VM factory: see `share_workload`)."""
        if self.image is None and self.bundle is None and not self.mounts:
            return
        from .containers.container import volume_records, volume_shares

        hv = self.hypervisor
        vm_dir = persist.vm_dir(self.id, self.run_root)
        work: dict[str, Any] = {"share_tag": "vc-ctr"}
        if self.workload.get("share_dir"):
            work["share_dir"] = self.workload["share_dir"]
        self.workload = work  # teardown releases what is recorded here, even half-way
        if work.get("share_dir"):
            await self._stage_workload(work)
            return
        if Capabilities.FS_SHARING not in hv.capabilities() or not self.config.shared_fs:
            if hv.state is not VMState.CREATED:
                raise UnsupportedError(
                    str(self.hypervisor_type),
                    "containers in a VM from the factory",
                    "its VMs need shared_fs = 'virtio-fs' (`virtc template create --virtio-fs`)",
                )
            if self.image is None or self.mounts:
                raise UnsupportedError(
                    str(self.hypervisor_type),
                    "bundles and shared directories (-v)",
                    "they are shared over virtio-fs",
                )
            if self.userns is not None:
                raise UnsupportedError(
                    str(self.hypervisor_type),
                    "a user namespace (userns)",
                    "a root's owners are shifted in its virtio-fs overlay",
                )
            await self._plug_image_block(work, vm_dir)
            return
        root = self._workload_root(work)
        if root:
            await self._plug_share(self._root_share(0, **root))
        work["volumes"] = volume_records(self.mounts, "vc-")
        for share in volume_shares(work["volumes"], "vol"):
            await self._plug_share(share)

    def _workload_root(self, work: dict[str, Any]) -> dict[str, str]:
        """The container's root, recorded in `work`: {"lower": the image's unpacked root}
        (leased to this sandbox), {"root": a bundle's root} (its mounts join `mounts`), or
        {} without either."""
        if self.image is not None:
            from .images import ImageStore

            store = ImageStore(self.image_store)
            image = store.get(self.image)
            lower = store.rootfs(image)
            store.acquire(self.id, image)
            work.update(image=image.digest, image_store=store.root, lower=lower)
            if self.userns is not None:
                work["userns"] = list(self.userns)
                work["shifted"] = store.shifted_rootfs(image, self.userns[0])
            return {"lower": lower}
        if self.bundle is not None:
            from .containers import from_oci

            spec, root, extra = from_oci(_read_bundle(self.bundle), self.bundle)
            self.mounts = [*self.mounts, *extra]
            work.update(bundle=self.bundle, lower=root, spec=dataclasses.asdict(spec))
            return {"root": root}
        return {}

    async def _stage_workload(self, work: dict[str, Any]) -> None:
        """In a pooled VM with a staged share (see factory/poolshare.py): mount the root and
        volumes under the share's directory on the host, where the guest already sees them."""
        from .containers.container import volume_records
        from .factory import poolshare

        directory = work["share_dir"]
        work.update(share_tag=poolshare.TAG, share_id=poolshare.SHARE_ID)
        root = self._workload_root(work)
        try:
            if root:
                work["share_path"] = await asyncio.to_thread(
                    poolshare.stage_root, directory, **root
                )
            work["volumes"] = volume_records(self.mounts, "vc-")
            staged: dict[str, str] = {}
            for v in work["volumes"]:
                if v["tag"] not in staged:
                    staged[v["tag"]] = await asyncio.to_thread(
                        poolshare.stage_volume, directory, v["tag"], v["source"], v["read_only"]
                    )
                v["guest"] = staged[v["tag"]]
        except OSError as exc:
            raise StateError(
                f"sandbox {self.id}: cannot stage its container's files: {exc}"
            ) from exc

    async def _plug_image_block(self, work: dict[str, Any], vm_dir: str) -> None:
        """Without virtio-fs: the image's root as an ext4 image file (built without mounting,
        the sandbox's own copy, so the container writes to it) on a cold-plugged drive."""
        from .devices import BlockDrive
        from .images.ext4 import build_ext4

        lower = self._workload_root(work)["lower"]  # an image: refused above otherwise
        work["share_tag"] = ""
        os.makedirs(vm_dir, mode=0o750, exist_ok=True)  # the driver removes it with the VM
        path = os.path.join(vm_dir, "ctr.ext4")
        await asyncio.to_thread(build_ext4, lower, path)
        drive = BlockDrive(id="ctr", path=path)
        await self.hypervisor.add_device(drive)
        work["block_serial"] = self.hypervisor.block_serial(drive)
        work["volumes"] = []

    def _root_share(self, index: int, *, lower: str = "", root: str = "") -> SharedFS:
        """The virtio-fs share of a container's root: over an image (`lower`), an overlay with
        a writable upper directory of its own under the VM directory; else a bundle's root.
        The first container's ("ctr") is plugged before boot; each later one's ("ctrN") is
        hot-added, served by its own virtiofsd, its cache mode `ROOT_CACHE`. Always
        writable: vc-run makes a read-only root's mount points in it, then remounts it
        read-only (as runc does)."""
        from .devices import SharedFS
        from .drivers.virtiofsd import ROOT_CACHE

        sid = "ctr" if index == 0 else f"ctr{index}"
        if lower:
            upper = os.path.join(persist.vm_dir(self.id, self.run_root), sid, "upper")
            os.makedirs(upper, mode=0o755)
            shift = (self.workload.get("userns") or [0])[0]
            return SharedFS(
                id=sid,
                source=upper,
                mount_tag=f"vc-{sid}",
                lower=lower,
                id_shift=shift,
                shifted=self.workload.get("shifted", "") if shift else "",
                cache=ROOT_CACHE,
            )
        return SharedFS(id=sid, source=root, mount_tag=f"vc-{sid}", cache=ROOT_CACHE)

    async def create_container(
        self,
        command: list[str] | None = None,
        *,
        id: str | None = None,
        env: Sequence[str] = (),
        cwd: str | None = None,
        user: str | None = None,
        hostname: str | None = None,
        bundle: str | None = None,
        share_with: str | Mapping[str, str] | None = None,
        shared: Sequence[str] = ("pid",),
    ) -> Container:
        """A container in the sandbox, from its image (Entrypoint + `command`, else Cmd; the
        image's Env, WorkingDir and User unless given), its bundle's config.json, or another
        OCI runtime `bundle`. Each container has its own root (the first one's plugged with
        the sandbox, later ones hot-added), pid namespace and cgroup in the guest (with
        `share_with`, that container's `shared` namespaces: "pid", "ipc", "uts", as a pod's
        containers share their sandbox container's; or, as a mapping, each namespace kind's
        of the container named); its id defaults to the sandbox's for the first, a random one
        after."""
        from .containers import Container, ContainerRecord
        from .containers.container import POOL_CGROUP
        from .containers.spec import NAMESPACE_LETTERS

        own = self.workload.get("image") or self.workload.get("bundle")
        if bundle is None and not own:
            raise StateError(f"sandbox {self.id} has no image or bundle to make a container from")
        cid = id or (_new_id(12) if self.containers else self.id)
        persist.validate_id(cid, "container id")
        async with self._op():
            if cid in self.containers:
                raise ConfigError(f"sandbox {self.id} already has a container {cid!r}")
            index = int(self.workload.get("next_share", 0))
            if bundle is not None and index == 0:
                index = 1  # the share plugged with the sandbox holds the sandbox's own root
            if index > 0 and not self.workload.get("share_tag"):
                raise UnsupportedError(
                    str(self.hypervisor_type),
                    "a second container",
                    "a container's root reaches the guest over virtio-fs",
                )
            joins = (
                {}
                if share_with is None
                else dict.fromkeys(shared, share_with)
                if isinstance(share_with, str)
                else dict(share_with)
            )
            for other in joins.values():
                if other not in self.containers:
                    raise ConfigError(
                        f"sandbox {self.id} has no container {other!r} to share namespaces with"
                    )
            if set(joins) - {"pid", "ipc", "uts"}:
                bad = ", ".join(k for k in joins if k not in ("pid", "ipc", "uts"))
                raise ConfigError(f"only pid, ipc and uts namespaces are shared, not {bad}")
            spec, volumes, shares = await self._container_parts(
                index, command, env, cwd, user, hostname, bundle
            )
            if joins:
                letters = {NAMESPACE_LETTERS[kind]: other for kind, other in joins.items()}
                spec.namespaces = ",".join(
                    n for n in spec.namespaces.split(",") if n not in letters
                )
                spec.joined = [
                    (letter, f"{self.containers[other].guest_dir}/pid")
                    for letter, other in letters.items()
                ]
            self.workload["next_share"] = index + 1
            record = ContainerRecord(
                id=cid,
                share_tag=shares[0]["tag"] if shares else self.workload["share_tag"],
                share_id=shares[0]["id"] if shares else self.workload.get("share_id", "ctr"),
                share_path=shares[0].get("guest", "")
                if shares
                else self.workload.get("share_path", ""),
                block_serial=self.workload.get("block_serial", ""),
                image=self.workload.get("image", "") if bundle is None else "",
                spec=dataclasses.asdict(spec),
                volumes=volumes,
                hot_shares=shares,
                cgroup=POOL_CGROUP if index == 0 and self.workload.get("share_path") else "",
            )
            container = Container(self, record)
            self.containers[cid] = container
            try:
                self._persist()
            except BaseException:
                del self.containers[cid]
                await self._unplug_shares(shares)
                raise
        if spec.hooks:
            await self._create_hooks(container)
        return container

    async def _create_hooks(self, container: Container) -> None:
        """The new container's prestart, then createRuntime hooks (OCI order); when one
        fails the container is deleted (its poststop hooks run) and the error raised."""
        from .containers.hooks import run_hooks

        pid = container._vmm_pid()
        try:
            for kind in ("prestart", "createRuntime"):
                await run_hooks(container.spec.hooks, kind, container.id, "creating", pid)
        except BaseException:
            with contextlib.suppress(Exception):
                await container.delete()
            raise

    async def _container_parts(
        self,
        index: int,
        command: list[str] | None,
        env: Sequence[str],
        cwd: str | None,
        user: str | None,
        hostname: str | None,
        bundle: str | None,
    ) -> tuple[ProcessSpec, list[dict[str, Any]], list[dict[str, Any]]]:
        """A new container's process spec, its volumes, and the shares hot-added for it
        (its root and a bundle's bind mounts; none for the first container of the sandbox's
        own image or bundle, whose root was plugged with the sandbox)."""
        from .containers import ProcessSpec
        from .containers.container import spec_from_dict, volume_records, volume_shares
        from .containers.spec import (
            apply_userns,
            device_cgroup_options,
            from_oci,
            merge_env,
            resolve_user,
        )

        volumes = list(self.workload.get("volumes", []))
        extra: list[Mount] = []
        if bundle is not None:
            bundle = os.path.abspath(bundle)
            spec, lower, extra = from_oci(_read_bundle(bundle), bundle)
        elif self.workload.get("image"):
            from .images import ImageStore

            lower = self.workload["lower"]
            image = ImageStore(self.workload["image_store"]).get(self.workload["image"])
            uid, gid, groups = resolve_user(user or image.config.user, lower)
            spec = ProcessSpec(
                args=image.config.argv(command),
                env=merge_env(image.config.env, list(env)),
                cwd=cwd or image.config.working_dir or "/",
                uid=uid,
                gid=gid,
                groups=groups,
                hostname=hostname or (self.network.hostname if self.network else self.id[:63]),
                device_cgroup=device_cgroup_options([], ConfigError),
            )
            if self.workload.get("userns"):
                start, size = self.workload["userns"]
                apply_userns(spec, (start, size))
        else:
            lower = self.workload["lower"]
            spec = spec_from_dict(self.workload["spec"])
        if bundle is not None or not self.workload.get("image"):
            if command:
                spec.args = list(command)
            spec.env = merge_env(spec.env, list(env))
            if cwd:
                spec.cwd = cwd
            if user:
                spec.uid, spec.gid, spec.groups = resolve_user(user, lower)
            if hostname:
                spec.hostname = hostname
        if index == 0:
            return spec, volumes, []
        of_image = bundle is None and bool(self.workload.get("image"))
        if self.workload.get("share_dir"):
            volumes, records = await self._stage_container(
                index, lower, of_image, extra if bundle is not None else None
            )
            return spec, volumes, records
        if of_image:
            root = self._root_share(index, lower=lower)
        else:
            root = self._root_share(index, root=lower)
        shares = [root]
        if bundle is not None:
            shared = list(self.workload.get("volumes", []))
            volumes = volume_records(extra, f"{root.mount_tag}-", shared)
            reused = {v["tag"] for v in shared}
            shares += volume_shares([v for v in volumes if v["tag"] not in reused], f"{root.id}v")
        records = [{"id": s.id, "source": s.source, "tag": s.mount_tag} for s in shares]
        plugged: list[dict[str, Any]] = []
        try:
            for share, rec in zip(shares, records, strict=True):
                await self._plug_share(share)
                plugged.append(rec)
        except BaseException:
            await self._unplug_shares(plugged)
            await asyncio.to_thread(self._remove_share_dir, root.id)
            raise
        return spec, volumes, records

    async def _stage_container(
        self, index: int, lower: str, image: bool, extra: list[Mount] | None
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """A later container's root (and a bundle's new volumes) in the sandbox's staged
        share, as the first one's (`_stage_workload`): its volumes, and a record per entry
        (`staged`: its name in the share; the first, the root's, with its `guest` path)."""
        from .containers.container import volume_records
        from .factory import poolshare

        directory = self.workload["share_dir"]
        name = f"ctr{index}"
        volumes = list(self.workload.get("volumes", []))
        records: list[dict[str, Any]] = []

        def record(entry: str, guest: str = "") -> dict[str, Any]:
            rec = {"id": poolshare.SHARE_ID, "source": "", "tag": poolshare.TAG}
            return {**rec, "staged": entry, "guest": guest}

        try:
            root = {"lower": lower} if image else {"root": lower}
            guest = await asyncio.to_thread(poolshare.stage_root, directory, name=name, **root)
            records.append(record(name, guest))
            if extra is not None:
                shared = volumes
                volumes = volume_records(extra, f"vc-{name}-", shared)
                reused = {v["tag"] for v in shared}
                staged: dict[str, str] = {}
                for v in volumes:
                    if v["tag"] in reused:
                        continue
                    if v["tag"] not in staged:
                        staged[v["tag"]] = await asyncio.to_thread(
                            poolshare.stage_volume, directory, v["tag"], v["source"], v["read_only"]
                        )
                        records.append(record(v["tag"]))
                    v["guest"] = staged[v["tag"]]
        except BaseException as exc:
            for rec in reversed(records):
                await asyncio.to_thread(poolshare.unstage, directory, rec["staged"])
            if isinstance(exc, OSError):
                raise StateError(f"sandbox {self.id}: cannot stage a container: {exc}") from exc
            raise
        return volumes, records

    async def _plug_share(self, share: SharedFS) -> None:
        """Share a directory with the VM: plugged before it boots, else hot-added."""
        hv = self.hypervisor
        if share.id_shift:  # the overlay's root is the upper directory itself
            top = os.stat(share.lower)
            os.chown(share.source, top.st_uid + share.id_shift, top.st_gid + share.id_shift)
        if hv.state is VMState.CREATED:
            await hv.add_device(share)
        else:
            await hv.hotplug_add_device(share)

    async def _unplug_shares(self, records: Sequence[dict[str, Any]]) -> None:
        """Hot-remove the shares made for one container (unmounted in the guest first) and
        delete their upper directories; a VM that no longer runs has nothing to remove."""
        from .devices import SharedFS

        hv = self._driver()
        for rec in reversed(records):
            if rec.get("staged"):
                from .factory.poolshare import unstage

                await asyncio.to_thread(unstage, self.workload["share_dir"], rec["staged"])
                continue
            if hv is not None and hv.state is VMState.RUNNING:
                share = SharedFS(id=rec["id"], source=rec["source"], mount_tag=rec["tag"])
                try:
                    await hv.hotplug_remove_device(share)
                except VCError as e:
                    log.warning("sandbox %s: removing share %s: %s", self.id, rec["id"], e)
            await asyncio.to_thread(self._remove_share_dir, rec["id"])

    def _remove_share_dir(self, share_id: str) -> None:
        """The upper directory (and overlay work and mount point) of a container's root."""
        import shutil

        shutil.rmtree(os.path.join(persist.vm_dir(self.id, self.run_root), share_id), True)

    async def remove_container(self, container: Container) -> None:
        """Forget a deleted container: its hot-added shares go, the others stay."""
        async with self._op(missing_ok=True):
            await self._unplug_shares(container.record.hot_shares)
            if self.containers.get(container.id) is container:
                del self.containers[container.id]
            if self._store.exists(self.id):
                self._persist()

    def container(self, id: str | None = None) -> Container:
        """A container of this sandbox (the only one when `id` is None)."""
        if id is None and len(self.containers) == 1:
            return next(iter(self.containers.values()))
        if id is None and self.containers:
            raise StateError(
                f"sandbox {self.id} has {len(self.containers)} containers "
                f"({', '.join(self.containers)}): name one"
            )
        if id is None or id not in self.containers:
            raise StateError(f"sandbox {self.id} has no container {id or ''}".rstrip())
        return self.containers[id]

    async def start(self) -> None:
        """Create if needed, launch the VM and connect to its agent."""
        if self._driver() is None:
            await self.create()
        async with self._op():
            hv = self.hypervisor
            if hv.state is not VMState.CREATED:
                raise StateError(f"cannot start sandbox {self.id}: it is {hv.state.value}")
            net = self.network
            # The bridge and its rules are not needed before the guest's network is
            # configured: they are made while the VM boots.
            joining = asyncio.ensure_future(net.join_bridge()) if net is not None else None
            try:
                await self._launch(hv)
                if self.hypervisor_type is HypervisorType.MOCK:
                    await self._serve_mock_agent()
                self._persist()
                await self._connect_agent(self.start_timeout, booting=True)
                if net is not None and joining is not None:
                    await joining
                    self._persist()
                    if self.hypervisor_type is not HypervisorType.MOCK:
                        await net.configure_guest(await self.agent())
            except BaseException:
                if joining is not None:
                    # Let it finish (its thread cannot be stopped) before undoing what it made.
                    await asyncio.wait({joining})
                    if not joining.cancelled():
                        joining.exception()  # retrieved: the start's own error is raised
                await self._teardown()
                raise

    async def _launch(self, hv: Hypervisor) -> None:
        """`start_sandbox`, persisting the VMM's pid as soon as it exists.

        A manager killed mid-start thus leaves a state file naming the VMM (state
        "starting"), so that another process can re-attach to it or stop it.
        """
        launching = asyncio.ensure_future(hv.start_sandbox(self.start_timeout))
        try:
            recorded = False
            while not launching.done():
                await asyncio.wait({launching}, timeout=None if recorded else PID_POLL)
                if not recorded and not launching.done() and hv.get_pids():
                    self._persist(STARTING)
                    recorded = True
            launching.result()
        finally:
            if not launching.done():
                launching.cancel()
                with contextlib.suppress(asyncio.CancelledError, VCError):
                    await launching

    async def stop(self, force: bool = False) -> None:
        """Stop the VM, release everything and forget the sandbox. Idempotent."""
        if self._driver() is None:
            return
        async with self._op(missing_ok=True):
            await self._teardown(force=force)

    async def _teardown(self, force: bool = False) -> None:
        hv = self._hv
        vm_dir = persist.vm_dir(self.id, self.run_root)
        await self._close_agent()
        await self._stop_mock_agent()
        scanned = False
        releasing: asyncio.Future[None] | None = None
        try:
            if hv is not None:
                if force:
                    await _force_kill(hv, vm_dir)
                    scanned = True
                    # Its processes are gone: the staged share is released (its thread
                    # started now) while the driver closes its side, in this thread.
                    releasing = self._release_share()
                await hv.stop_sandbox()
        finally:
            if hv is not None:
                await hv.cleanup()
            if not scanned:
                await asyncio.to_thread(_kill_strays, vm_dir)
            await (releasing or self._release_share())
            if self.network is not None:
                await self.network.teardown()
            if self.workload.get("image_store"):
                from .images import ImageStore

                ImageStore(self.workload["image_store"]).release(self.id)
            with self._locked_store():
                self._store.delete(self.id)
            for c in self.containers.values():
                if c.record.status != "deleted":
                    await c.poststop()

    def _release_share(self) -> asyncio.Future[None]:
        """Release the pooled VM's staged share (`factory.poolshare`), if it has one, in a
        worker thread started at once (the driver's stop, next, runs in the event loop's)."""
        loop = asyncio.get_running_loop()
        if not self.workload.get("share_dir"):
            done: asyncio.Future[None] = loop.create_future()
            done.set_result(None)
            return done
        from .factory.poolshare import release_quietly

        return loop.run_in_executor(None, release_quietly, self.workload["share_dir"])

    async def pause(self) -> None:
        """Freeze the guest."""
        async with self._op():
            hv = self.hypervisor
            hv.require(Capabilities.PAUSE, "pause")
            await hv.pause_sandbox()
            await self._record_runstate_or_undo(VMState.PAUSED, hv.resume_sandbox)

    async def resume(self) -> None:
        """Resume a paused guest."""
        async with self._op():
            hv = self.hypervisor
            hv.require(Capabilities.PAUSE, "resume")
            await hv.resume_sandbox()
            await self._record_runstate_or_undo(VMState.RUNNING, hv.pause_sandbox)

    async def _record_runstate_or_undo(
        self, state: VMState, undo: Callable[[], Awaitable[Any]]
    ) -> None:
        """Record a pause or resume (the one-byte run state, not the whole document); if that
        fails, undo the change and re-raise."""
        await self._persist_or_undo(undo, lambda: self._store.set_runstate(self.id, state.value))

    async def _persist_or_undo(
        self, undo: Callable[[], Awaitable[Any]], persist: Callable[[], None] | None = None
    ) -> None:
        """Persist after a change to the VM (`persist`, else the whole document); if that
        fails, undo the change and re-raise.

        The state file and the VM thus never disagree: a full disk leaves both as they were.
        """
        try:
            (persist or self._persist)()
        except StateError as e:
            try:
                await undo()
            except VCError as undo_error:
                log.warning("sandbox %s: cannot undo after %s: %s", self.id, e, undo_error)
            raise

    @contextlib.asynccontextmanager
    async def _op(self, *, missing_ok: bool = False) -> AsyncIterator[None]:
        """Hold the sandbox's state lock for one operation, after refreshing the state.

        Two processes working on one sandbox are serialised, and each acts on the state the
        other left (not on what it read when it attached).
        """
        if self._holding_lock:
            yield
            return
        self._driver()  # the operation needs it: load it before refreshing its state
        async with self._store.alock(self.id, timeout=LOCK_TIMEOUT):
            self._holding_lock = True
            try:
                self._refresh(missing_ok)
                yield
            finally:
                self._holding_lock = False

    @contextlib.contextmanager
    def _locked_store(self) -> Iterator[None]:
        """The state lock, unless this sandbox already holds it for the current operation."""
        if self._holding_lock:
            yield
            return
        with self._store.lock(self.id, timeout=LOCK_TIMEOUT):
            yield

    def _refresh(self, missing_ok: bool) -> None:
        """Adopt the lifecycle state another process may have persisted since we read it."""
        hv = self._hv
        if hv is None or hv.state in (VMState.NEW, VMState.STOPPED):
            return
        if self._store.unchanged_since_write(self.id):
            # Nobody else rewrote the document; a pause or resume only changes the run state.
            state = self._store.runstate(self.id) or ""
        elif not self._store.exists(self.id):
            if missing_ok:
                return
            raise StateError(f"sandbox {self.id} no longer exists (stopped by another process)")
        else:
            state = recorded_state(self._store, self.id, self._store.read(self.id))
        if state in (VMState.RUNNING.value, VMState.PAUSED.value) and hv.state in (
            VMState.RUNNING,
            VMState.PAUSED,
        ):
            hv.state = VMState(state)

    async def __aenter__(self) -> Sandbox:
        """Start the sandbox unless it already runs (adopted or attached); stop it on exit."""
        if self.state in (VMState.NEW, VMState.CREATED):
            await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- guest operations -------------------------------------------------------------------
    async def exec(
        self,
        argv: list[str] | str,
        *,
        stdin: bytes = b"",
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
    ) -> ExecResult:
        """Run a command in the guest; returns its exit code, stdout and stderr."""
        cmd = _command(argv, "exec")
        return await self._agent_call(
            "exec", lambda agent: agent.exec(cmd, stdin=stdin, env=env, cwd=cwd, timeout=timeout)
        )

    async def start_process(
        self, argv: list[str] | str, **options: Unpack[StartOptions]
    ) -> Process:
        """Start a process in the guest and return its `Process` handle (streamed stdout and
        stderr, stdin, signals, wait, terminal resize); see `AgentClient.start_process` for the
        arguments. A string `argv` runs under `/bin/sh -c`."""
        cmd = _command(argv, "start_process")
        return await self._agent_call(
            "start a process", lambda agent: agent.start_process(cmd, **options)
        )

    async def attach_process(
        self, handle: int, *, keep: bool = False, offsets: tuple[int, int] = (0, 0)
    ) -> Process:
        """A `Process` handle on a process started earlier (a detached one, typically from
        another manager): its kept output first (from the stream `offsets` on), then live
        output and its exit (with `keep`, an exited process stays for the next attach: see
        `AgentClient.attach_process`)."""
        return await self._agent_call(
            "attach to a process",
            lambda agent: agent.attach_process(handle, keep=keep, offsets=offsets),
        )

    async def _agent_call(self, what: str, call: Callable[[AgentClient], Awaitable[T]]) -> T:
        """`call(agent)` on the running sandbox's agent; an agent error caused by the VM
        having died is reported as that (see `_raise_if_vm_dead`)."""
        agent = await self._running_agent(what)
        try:
            return await call(agent)
        except AgentError:
            await self._raise_if_vm_dead()
            raise

    async def _running_agent(self, what: str) -> AgentClient:
        """The agent, after checking the VM runs (a paused guest cannot answer)."""
        if self.state is VMState.PAUSED:
            await self._raise_if_vm_dead()  # a dead VM is worth reporting before "paused"
            raise StateError(f"cannot {what} in sandbox {self.id}: it is paused (resume it first)")
        if self.state is not VMState.RUNNING:
            raise StateError(f"cannot {what} in sandbox {self.id}: it is {self.state.value}")
        return await self.agent()

    async def write_file(self, guest_path: str, data: bytes, mode: int = 0o644) -> None:
        """Create or replace a file in the guest (`AgentTimeoutError` past `agent_timeout`)."""
        agent = await self.agent()
        await agent.write_file(guest_path, data, mode=mode)

    async def read_file(self, guest_path: str) -> bytes:
        """Read a whole file from the guest (`AgentTimeoutError` past `agent_timeout`)."""
        agent = await self.agent()
        return await agent.read_file(guest_path)

    async def copy_in(self, host_path: str, guest_path: str) -> None:
        """Copy a host file into the guest, keeping its permission bits."""
        data = await asyncio.to_thread(_read_host_file, host_path)
        await self.write_file(guest_path, data, mode=os.stat(host_path).st_mode & 0o7777)

    async def copy_out(self, guest_path: str, host_path: str) -> None:
        """Copy a guest file to the host."""
        data = await self.read_file(guest_path)
        await asyncio.to_thread(_write_host_file, host_path, data)

    async def add_disk(
        self, path: str, id: str | None = None, *, read_only: bool = False
    ) -> BlockDrive:
        """Hot-add a host file as a guest disk."""
        self.hypervisor.require(Capabilities.BLOCK_DEVICE_HOTPLUG, "disk hotplug")
        from .devices import BlockDrive

        drive = BlockDrive(id=id or f"disk{_new_id(6)}", path=path, read_only=read_only)
        async with self._op():
            if drive.id in self.disks:
                raise ConfigError(f"sandbox {self.id} already has a disk with id {drive.id!r}")
            serial = self.hypervisor.block_serial(drive)
            async with self._guest_sees(f"disk {drive.id}", block_serial=serial):
                await self.hypervisor.hotplug_add_device(drive)
                self.disks[drive.id] = drive
            try:
                await self._persist_or_undo(lambda: self.hypervisor.hotplug_remove_device(drive))
            except StateError:
                del self.disks[drive.id]
                raise
        return drive

    async def remove_disk(self, drive: BlockDrive | str) -> None:
        """Hot-remove a disk added with `add_disk` (the drive or its id)."""
        self.hypervisor.require(Capabilities.BLOCK_DEVICE_HOTPLUG, "disk hot-removal")
        disk_id = drive if isinstance(drive, str) else drive.id
        async with self._op():
            known = self.disks.get(disk_id)
            if known is None:
                raise ConfigError(f"sandbox {self.id} has no hot-added disk {disk_id!r}")
            await self.hypervisor.hotplug_remove_device(known)
            del self.disks[disk_id]
            self._persist()

    async def remove_disk_by_id(self, disk_id: str) -> None:
        """Hot-remove a disk by the id `add_disk` gave it."""
        await self.remove_disk(disk_id)

    def _plan_network(self, request: NetworkConfig | str) -> SandboxNetwork:
        from .network import NetworkConfig, SandboxNetwork

        cfg = NetworkConfig.parse(request) if isinstance(request, str) else request
        kind = self.hypervisor_type
        if kind is HypervisorType.ACRN and cfg.mode != "none":
            raise UnsupportedError(
                str(kind), "sandbox networking", "its driver plugs no network device yet"
            )
        if kind not in (HypervisorType.QEMU, HypervisorType.MOCK):
            if cfg.mode == "user":
                raise UnsupportedError(
                    str(kind), "--net user", "user-mode networking is QEMU's own: use bridge"
                )
            if cfg.model == "macvtap":
                raise UnsupportedError(
                    str(kind),
                    "the macvtap network model",
                    "it opens taps by name; a macvtap's queues are handed over as fds",
                )
        return SandboxNetwork.plan(self.id, cfg, self.run_root)

    async def add_network(self, name: str) -> Interface:
        """Take endpoint `name` (just put into the sandbox's namespace) into the running VM:
        a tap joined to it, a hot-added NIC, configured in the guest before returning."""
        hv = self.hypervisor
        hv.require(Capabilities.NET_DEVICE_HOTPLUG, "network hotplug")
        if self.network is None:
            raise ConfigError(f"sandbox {self.id} was created without a network")
        net = self.network
        async with self._op():
            iface, routes, neighbours = await net.find_new(name)
            queues = self.config.num_vcpus if Capabilities.MULTI_QUEUE in hv.capabilities() else 1
            net.interfaces.append(iface)
            self._persist()  # the tap is named in the record before it exists
            try:
                await net.connect(iface, queues)
                await self._hot_add_nic(net, iface, queues)
            except BaseException:
                await net.disconnect(iface)
                net.interfaces.remove(iface)
                self._persist()
                raise
            net.routes += routes
            net.neighbours += neighbours
            self._persist()
            if self.hypervisor_type is not HypervisorType.MOCK:
                from .network.guest import configure_guest_network, only

                guest = only(net.guest(), iface)
                await configure_guest_network(await self.agent(), guest, files=False)
        return iface

    async def _hot_add_nic(self, net: SandboxNetwork, iface: Interface, queues: int) -> None:
        """Hot-add the NIC of `iface` (its tap made and joined already)."""
        ep = await net.nic(iface, queues, _vhost_net(self.config))
        try:
            await self.hypervisor.hotplug_add_device(ep)
        finally:
            for fd in ep.fds:  # the tap's queues: QEMU has its copies
                os.close(fd)

    async def plug_network(self) -> None:
        """Give an adopted sandbox (a VM from the factory, whose VMM runs outside the
        sandbox's namespace) the network it was asked for: the endpoints found or made in
        the namespace joined to taps there, each tap handed to the VMM open with a hot-added
        NIC, the guest configured before returning. A booted sandbox has it from the start."""
        if self.network_request is None or self.network is not None:
            return
        net = self._plan_network(hot_network(self.network_request))
        if net.config.mode == "none":
            return
        hv = self.hypervisor
        hv.require(Capabilities.NET_DEVICE_HOTPLUG, "a network on a VM from the factory")
        net.vmm_outside = True
        queues = self.config.num_vcpus if Capabilities.MULTI_QUEUE in hv.capabilities() else 1
        async with self._op():
            self.network = net
            await net.setup(queues, self._persist)  # undoes itself on failure
            try:
                await net.join_bridge()
                for iface in net.interfaces:
                    if iface.tap:
                        await self._hot_add_nic(net, iface, queues)
            finally:
                self._persist()
            if self.hypervisor_type is not HypervisorType.MOCK:
                await net.configure_guest(await self.agent())

    async def remove_network(self, name: str) -> None:
        """Hot-remove the NIC of endpoint `name` and undo its tap."""
        hv = self.hypervisor
        hv.require(Capabilities.NET_DEVICE_HOTPLUG, "network hot-removal")
        net = self.network
        iface = next((i for i in net.interfaces if i.name == name), None) if net else None
        if net is None or iface is None:
            raise ConfigError(f"sandbox {self.id} has no network endpoint {name!r}")
        async with self._op():
            ep = net.endpoint(
                iface, self.config.num_vcpus, _vhost_net(self.config), open_queues=False
            )
            await hv.hotplug_remove_device(ep)
            await net.disconnect(iface)
            net.interfaces.remove(iface)
            net.routes = [r for r in net.routes if r.device != name]
            net.neighbours = [n for n in net.neighbours if n.device != name]
            self._persist()

    async def resize(self, vcpus: int | None = None, memory_mb: int | None = None) -> None:
        """Change the number of vCPUs and/or the memory size of the running VM."""
        hv = self.hypervisor
        async with self._op():
            if vcpus is not None:
                hv.require(Capabilities.CPU_HOTPLUG, "vCPU resize")
                # Hot-added vCPUs appear offline in the guest: the agent onlines them.
                async with self._guest_sees(f"{vcpus} vCPUs", cpus=int(vcpus)):
                    await hv.resize_vcpus(vcpus)
            if memory_mb is not None:
                hv.require(Capabilities.MEMORY_HOTPLUG, "memory resize")
                await hv.resize_memory(memory_mb, 128, False)
                # Onlining takes the blocks present when the agent looks: ask only now.
                async with self._guest_sees("memory", memory=True):
                    pass
            self._persist()

    @contextlib.asynccontextmanager
    async def _guest_sees(
        self,
        what: str,
        *,
        block_serial: str | None = None,
        cpus: int | None = None,
        memory: bool = False,
    ) -> AsyncIterator[None]:
        """Around a hotplug: wait until the guest sees the hardware. The agent's wait (one
        request, answered on kernel uevents) is sent before the hotplug starts, so the guest
        is listening when the device arrives; the agent onlines new vCPUs (`cpus`) and
        memory blocks (`memory`) meanwhile. If the hotplug fails, the wait is cancelled. The
        mock runs no guest: nothing to wait for."""
        if self.hypervisor_type is HypervisorType.MOCK:
            yield
            return
        from .agent import AgentRequestError

        agent = await self.agent()
        waiter = asyncio.create_task(
            agent.wait_hardware(
                block_serial=block_serial, cpus=cpus, memory=memory, timeout=GUEST_SETTLE_TIMEOUT
            )
        )
        await asyncio.sleep(0)  # let the request go out before the hotplug starts
        try:
            yield
        except BaseException:
            waiter.cancel()
            with contextlib.suppress(asyncio.CancelledError, VCError):
                await waiter
            raise
        try:
            await waiter
        except AgentRequestError as exc:
            if exc.errno != errno.ETIMEDOUT:
                raise
            raise VMTimeoutError(
                f"sandbox {self.id}: the guest did not see the hotplugged {what} within "
                f"{GUEST_SETTLE_TIMEOUT:g}s ({exc.message})"
            ) from None
        except AgentError:
            await self._raise_if_vm_dead()
            raise

    async def console_path(self) -> str:
        """Host address of the guest console."""
        return await self.hypervisor.get_sandbox_console(self.id)

    def log_paths(self, vmm: bool = False) -> list[str]:
        """The console log (or, with `vmm`, the VMM's own log) files of this sandbox."""
        return _log_paths(persist.vm_dir(self.id, self.run_root), vmm)

    @classmethod
    def log_paths_of(cls, id: str, run_root: str | None = None, vmm: bool = False) -> list[str]:
        """`log_paths` of a persisted sandbox, without attaching to it (a dead one too)."""
        root = persist.run_root(run_root)
        if not persist.StateStore(root).exists(id):
            raise StateError(f"no such sandbox: {id}")
        return _log_paths(persist.vm_dir(id, root), vmm)

    async def detach(self) -> None:
        """Let go of the sandbox without stopping it (it stays running for a later attach)."""
        await self._close_agent()
        await self._stop_mock_agent()
        if self._hv is not None:
            # Under the lock and after a refresh: never write back a state another manager
            # has changed since, nor resurrect a sandbox it has stopped (checked before the
            # lock too: taking it would create the sandbox's directory again).
            if self._store.exists(self.id):
                async with self._op(missing_ok=True):
                    if self._store.exists(self.id):
                        self._persist()
            await self._hv.disconnect()

    # -- agent ------------------------------------------------------------------------------
    async def agent(self) -> AgentClient:
        """The connected agent client (connecting on first use)."""
        if self.hypervisor_type is HypervisorType.MOCK and self._mock_agent is None:
            raise UnsupportedError(
                "mock",
                "guest agent operations once the sandbox is detached",
                "it runs no guest; its stand-in agent serves the process that started it",
            )
        if self._agent is not None and self._agent.closed:
            await self._close_agent()  # the connection died: make a new one
        if self._agent is None:
            await self._connect_agent(self.start_timeout)  # VM death is noticed at once
        assert self._agent is not None
        return self._agent

    async def _plug_agent_channel(self) -> None:
        from .agent.endpoint import plug_agent_channel

        self._agent_endpoint = await plug_agent_channel(
            self.hypervisor, self.id, use_vsock=self.config.use_vsock
        )

    async def _serve_mock_agent(self) -> None:
        """The mock runs no guest: a fake agent (built-in echo, cat, true, false, exit, sleep,
        env) answers its exec and file requests, on a socket in its VM directory."""
        from .agent.endpoint import AgentEndpoint
        from .agent.fake import FakeAgent
        from .host import build_socket_path

        vm_dir = persist.vm_dir(self.id, self.run_root)
        persist.ensure_dir(vm_dir)
        path = build_socket_path(vm_dir, MOCK_AGENT_SOCKET)
        self._mock_agent = await FakeAgent(path).start()
        self._agent_endpoint = AgentEndpoint.unix(path)

    async def _stop_mock_agent(self) -> None:
        agent, self._mock_agent = self._mock_agent, None
        if agent is not None:
            await agent.stop()
            path = agent.path
        elif self.hypervisor_type is HypervisorType.MOCK:
            # The stand-in of a manager that was killed: its socket is left behind.
            path = os.path.join(persist.vm_dir(self.id, self.run_root), MOCK_AGENT_SOCKET)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        else:
            return
        with contextlib.suppress(OSError):
            os.rmdir(os.path.dirname(path))

    async def _connect_agent(self, timeout: float, *, booting: bool = False) -> None:
        """Connect to the agent (`booting`: of the VM this start just launched, see
        `AgentClient.connect`)."""
        from .agent import AgentClient
        from .agent.waiting import wait_watched

        async with self._agent_lock:
            if self._agent is not None:
                return
            if self._agent_endpoint is None:
                raise StateError(f"sandbox {self.id}: no agent channel was plugged")
            target = self._agent_endpoint.target()
            try:
                # A VM that dies while booting is reported now, not when `timeout` runs out;
                # a connection made just as the VM was found dead is closed again.
                kw = {} if self.agent_timeout is None else {"request_timeout": self.agent_timeout}
                self._agent = await wait_watched(
                    AgentClient.connect(target, timeout, booting=booting, **kw),
                    self._raise_if_vm_dead,
                    DEATH_POLL,
                    discard=AgentClient.close,
                )
            except AgentError:
                await self._raise_if_vm_dead()
                raise

    async def _close_agent(self) -> None:
        agent, self._agent = self._agent, None
        if agent is not None:
            try:
                await agent.close()
            except VCError as e:
                log.debug("closing agent of %s: %s", self.id, e)

    async def _raise_if_vm_dead(self) -> None:
        hv = self._driver()
        if hv is None:
            return
        try:
            await hv.check()
        except VMExitedError:
            raise
        except VCError as e:
            raise VMExitedError(f"sandbox {self.id}: VM is unhealthy: {e}") from e

    # -- persistence ------------------------------------------------------------------------
    def _doc(self, state: str, cfg: HypervisorConfig) -> dict[str, Any]:
        hv = self._hv
        return {
            "sandbox": {
                "id": self.id,
                "hypervisor": str(self.hypervisor_type),
                "created_at": self.created_at,
                "state": state,
                "agent": self._agent_endpoint.to_doc() if self._agent_endpoint else None,
                "start_timeout": self.start_timeout,
                "agent_timeout": self.agent_timeout,
                "disks": {
                    d.id: {"path": d.path, "read_only": d.read_only} for d in self.disks.values()
                },
                "network": self.network.to_dict() if self.network else None,
                "workload": self.workload,
                "containers": {cid: c.to_dict() for cid, c in self.containers.items()},
            },
            "hypervisor": hv.save().model_dump(mode="json") if hv is not None else {},
            "config": cfg.to_dict(),
        }

    def _write_doc(self, state: str, cfg: HypervisorConfig) -> None:
        """Persist before the VM exists (the network's plan, as it grows)."""
        with self._locked_store():
            self._store.write(self.id, self._doc(state, cfg))

    def _persist(self, state: str | None = None) -> None:
        hv = self.hypervisor
        state = state or hv.state.value
        doc = self._doc(state, hv.hypervisor_config())
        with self._locked_store():
            self._store.write(self.id, doc)
            if state in (VMState.RUNNING.value, VMState.PAUSED.value):
                self._store.set_runstate(self.id, state)

    @classmethod
    def list(cls, run_root: str | None = None) -> list[SandboxInfo]:
        """Every persisted sandbox under the run root, with its liveness checked."""
        return list_sandboxes(run_root)

    @classmethod
    def info(cls, id: str, run_root: str | None = None) -> SandboxInfo:
        """One persisted sandbox as `list()` reports it (`StateError` when there is none)."""
        return one_sandbox(id, run_root)

    @classmethod
    def adopt(
        cls,
        hv: Hypervisor,
        agent: AgentClient,
        endpoint: AgentEndpoint,
        run_root: str | None = None,
        *,
        image: str | None = None,
        bundle: str | None = None,
        mounts: Sequence[Mount | str] = (),
        image_store: str | None = None,
        network: NetworkConfig | str | None = None,
        share_dir: str = "",
    ) -> Sandbox:
        """Wrap a VM that is already running with a connected agent (e.g. from the factory)
        reached at `endpoint`. Its container's root (`image` or `bundle`) and `mounts` are
        hot-added by `share_workload` (or with `share_dir`, a pooled VM's staged share: see
        factory/poolshare.py, mounted there; the sandbox releases it when it stops), its
        `network` by `plug_network`."""
        sb = cls(
            hv.id,
            hv.hypervisor_type,
            run_root=run_root,
            network=network,
            image=image,
            bundle=bundle,
            mounts=mounts,
            image_store=image_store,
        )
        sb._hv = hv
        sb._agent = agent
        sb._agent_endpoint = endpoint
        if share_dir:
            sb.workload = {"share_dir": share_dir}
        with sb._store.lock(sb.id):
            if sb._store.exists(sb.id):
                raise StateError(f"sandbox {sb.id} already exists")
            sb._store.write(sb.id, sb._doc(hv.state.value, hv.hypervisor_config()))
        return sb

    async def share_workload(self) -> None:
        """Hot-add the shares of an adopted sandbox's container (its root and volumes), or
        mount them in its staged share: a booted sandbox has them from the start. The guest
        mounts them when the container starts (waiting for a share it has not probed yet)."""
        async with self._op():
            await self._plug_workload()
            self._persist()

    @classmethod
    async def attach(cls, id: str, run_root: str | None = None) -> Sandbox:
        """Take over a sandbox persisted by another process (the VM keeps running). The
        driver of a running sandbox is loaded when an operation needs it (see `_driver`)."""
        root = persist.run_root(run_root)
        store = persist.StateStore(root)
        if not store.exists(id):  # checked first: taking the lock would create its directory
            raise StateError(f"no such sandbox: {id}")
        async with store.alock(id, timeout=LOCK_TIMEOUT):
            doc = store.read(id)
            if str(doc.get("sandbox", {}).get("state", "")) in ("new", "created"):
                # Nobody holds the lock, so no start is under way: a VMM still serving the
                # VM dir was left by a manager that died before recording its pid.
                await asyncio.to_thread(_kill_strays, persist.vm_dir(id, root))
        sb_doc = doc.get("sandbox", {})
        sb = cls(id, sb_doc.get("hypervisor", "qemu"), run_root=root)
        sb.start_timeout = float(sb_doc.get("start_timeout", DEFAULT_START_TIMEOUT))
        agent_timeout = sb_doc.get("agent_timeout")
        sb.agent_timeout = float(agent_timeout) if agent_timeout is not None else None
        sb.created_at = float(sb_doc.get("created_at", time.time()))
        if sb_doc.get("network"):
            from .network import SandboxNetwork

            sb.network = SandboxNetwork.from_dict(sb_doc["network"])
        state = recorded_state(store, id, doc) or "created"
        if state == VMState.CREATED.value:
            from .config import HypervisorConfig

            # Created by another process, never started: rebuild the VM's devices.
            cfg = HypervisorConfig.from_dict(doc.get("config", {}))
            net = sb.network
            hv = new_hypervisor(sb.hypervisor_type, root)
            await hv.create_sandbox(id, net.vmm_netns if net else None, cfg)
            sb._hv = hv
            await sb._plug_agent_channel()
            if net is not None:
                for dev in net.devices(cfg.num_vcpus, _vhost_net(cfg)):
                    await hv.add_device(dev)
            return sb
        # A "starting" sandbox's manager died mid-start: its VMM may still be booting.
        sb._saved_state = VMState(state) if state in VMState._value2member_map_ else VMState.RUNNING
        sb._saved = doc
        agent = sb_doc.get("agent")
        if agent:
            from .agent.endpoint import AgentEndpoint

            sb._agent_endpoint = AgentEndpoint.from_doc(agent)
        for disk_id, d in (sb_doc.get("disks") or {}).items():
            from .devices import BlockDrive

            sb.disks[disk_id] = BlockDrive(
                id=disk_id, path=d["path"], read_only=bool(d.get("read_only"))
            )
        sb._adopt_containers(sb_doc)
        return sb

    def _adopt_containers(self, sb_doc: dict[str, Any]) -> None:
        self.workload = dict(sb_doc.get("workload") or {})
        records = sb_doc.get("containers") or {}
        if not records:
            return  # the container code is imported only for sandboxes that have some
        from .containers import Container, ContainerRecord

        for cid, record in records.items():
            self.containers[cid] = Container(self, ContainerRecord(**record))


def hot_network(request: NetworkConfig | str) -> NetworkConfig:
    """`request` checked for a VM that runs already (one from the factory): its NICs are
    hot-added, which QEMU's user-mode network, made at boot, cannot be."""
    from .network import NetworkConfig

    cfg = NetworkConfig.parse(request) if isinstance(request, str) else request
    cfg.validate()
    if cfg.mode == "user":
        raise ConfigError(
            "--net user: a VM from the factory cannot take QEMU's user-mode network (made "
            "at boot): use bridge or ns:PATH"
        )
    return cfg


def _command(argv: list[str] | str, what: str) -> list[str]:
    """`argv`, or a string run under `/bin/sh -c`; an empty command is refused."""
    if isinstance(argv, str):
        argv = ["/bin/sh", "-c", argv]
    if not argv:
        raise ConfigError(f"{what}: empty command")
    return argv


def _vhost_net(cfg: HypervisorConfig) -> bool:
    """vhost-net (in-kernel virtio-net) where the host has it and the config allows it."""
    return not cfg.disable_vhost_net and os.path.exists("/dev/vhost-net")


def _kill_strays(vm_dir: str, known: Collection[int] = ()) -> list[int]:
    """`vmm_process.kill_strays`, imported when needed (not on exec's path)."""
    from .drivers.vmm_process import kill_strays

    return kill_strays(vm_dir, known=known)


def _new_id(length: int) -> str:
    """A random id of `length` hex digits (uuid4's, imported only when an id is made)."""
    import uuid

    return uuid.uuid4().hex[:length]


def _log_paths(vm_dir: str, vmm: bool) -> list[str]:
    """Oldest first: a rotated `X.log.1` (see drivers/console_keeper) comes before `X.log`."""
    try:
        names = [n for n in os.listdir(vm_dir) if n.endswith((".log", ".log.1"))]
    except FileNotFoundError:
        return []
    names.sort(key=lambda n: (n.removesuffix(".1"), not n.endswith(".1")))
    return [os.path.join(vm_dir, n) for n in names if ("console" in n) != vmm]


FORCE_KILL_WAIT = 5.0
"""Seconds a SIGKILLed VMM gets to be gone before its driver's stop goes on regardless."""


async def _force_kill(hv: Hypervisor, vm_dir: str) -> None:
    """SIGKILL the VMM process and its driver's helper daemons (virtiofsd, the console log
    keeper), each if it is still the process that was started (via a pidfd), all at once, and
    wait for their end: the driver's stop then finds them gone (no quit over a dying QMP, no
    wait for a helper to notice the VMM's end before it exits, tearing its mappings of the
    guest's memory down in turn). The scan of `vm_dir`'s stray VMMs (`kill_strays`) runs
    while the kernel tears the killed processes down."""
    import signal

    from .drivers.helpers import Helpers
    from .drivers.vmm_process import wait_pidfd
    from .host import pidfd_of

    state = hv.save()
    targets = [(state.pid, state.pid_start_time)]
    helpers = getattr(hv, "helpers", None)  # the drivers that have helper daemons
    if isinstance(helpers, Helpers):
        targets += [(h.pid, h.start_time) for h in helpers if h.pid]
    pinned = {pid: fd for pid, start in targets if (fd := pidfd_of(pid, start)) is not None}
    fds = list(pinned.values())
    try:
        for fd in fds:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(fd, signal.SIGKILL)
        strays = asyncio.to_thread(_kill_strays, vm_dir, set(pinned))
        waits = (wait_pidfd(fd, FORCE_KILL_WAIT) for fd in fds)
        for result in await asyncio.gather(strays, *waits, return_exceptions=True):
            if isinstance(result, BaseException):
                raise result
    finally:
        for fd in fds:
            os.close(fd)


def _read_host_file(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(f"cannot read host file {path}: {e.strerror}") from e


def _write_host_file(path: str, data: bytes) -> None:
    """Write guest bytes to `path` (replaced whole, by a rename) through a temp file of a random
    name created afresh (O_EXCL, O_NOFOLLOW) beside it: nothing planted in the directory
    (a link at a guessable name) can redirect the write."""
    directory, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(directory, persist.temp_name(name))
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(tmp, flags, 0o666)
    except OSError as e:
        raise ConfigError(f"cannot write host file {path}: {e.strerror}") from e
    try:
        with open(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise ConfigError(f"cannot write host file {path}: {e.strerror}") from e


def _read_bundle(bundle: str) -> Any:
    """A bundle's config.json, parsed; `ConfigError` naming what is wrong."""
    import json

    path = os.path.join(bundle, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"bundle {bundle}: no config.json") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"bundle {bundle}: config.json is unreadable: {e}") from None
