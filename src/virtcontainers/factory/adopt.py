"""A factory VM as a `Sandbox`: what `virtc run --from-template NAME` / `--factory` run in."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..config import HypervisorConfig
    from ..containers import Mount
    from ..network import NetworkConfig
    from ..sandbox import Sandbox
    from .vm import VM

log = logging.getLogger(__name__)


async def factory_vm(
    config: HypervisorConfig,
    *,
    template: str | None = None,
    use_cache: bool = False,
    run_root: str | None = None,
    templates: str | None = None,
    id: str | None = None,
    timeout: float = 60.0,
    cache_socket: str | None = None,
) -> VM:
    """A running VM with a ready agent: cloned from `template`, or from the VM cache server
    (`use_cache`) at `cache_socket` (default: the run root's). A config the template or cache
    cannot serve, or a cache server that is not running, falls back to a direct boot with a
    log line saying why."""
    from .errors import CacheUnavailableError
    from .factory import Factory
    from .template import TemplateStore
    from .vm import boot_vm
    from .vmconfig import VMConfig

    if template and use_cache:
        raise ConfigError("use either a template or the VM cache, not both")
    if template:
        store = TemplateStore(templates, run_root=run_root)
        async with Factory.from_template(template, store=store) as factory:
            return await factory.get_vm(config, id=id, timeout=timeout)
    want = VMConfig.of(config)
    if use_cache:
        try:
            # The server checks `want` as it hands out a VM: no Config round trip first.
            factory = await Factory.connect(cache_socket, run_root=run_root, want=want)
        except CacheUnavailableError as exc:
            log.warning("factory: booting a VM directly: %s", exc)
            return await boot_vm(want, id=id, run_root=run_root, timeout=timeout)
        async with factory:
            return await factory.get_vm(want, id=id, timeout=timeout)
    return await boot_vm(want, id=id, run_root=run_root, timeout=timeout)


async def sandbox_from_factory(
    config: HypervisorConfig,
    *,
    template: str | None = None,
    use_cache: bool = False,
    run_root: str | None = None,
    templates: str | None = None,
    id: str | None = None,
    timeout: float = 60.0,
    image: str | None = None,
    bundle: str | None = None,
    mounts: Sequence[Mount | str] = (),
    image_store: str | None = None,
    cache_socket: str | None = None,
    network: NetworkConfig | str | None = None,
) -> Sandbox:
    """A started `Sandbox` around `factory_vm(...)` (its id is the VM's: a pooled VM already
    has one), with its `network` (see `Sandbox.plug_network`) and its container's root
    (`image` or `bundle`) and `mounts` shared over virtio-fs (`config.shared_fs` must be
    "virtio-fs": the factory's VMs then are too): in a pooled VM's staged share (no hotplug
    at hand-out), else hot-added. The VM is stopped if wrapping it fails."""
    from .vm import stop_quietly

    workload = image is not None or bundle is not None or bool(mounts)
    if workload and config.shared_fs != "virtio-fs":
        raise ConfigError("a container from the VM factory needs shared_fs = 'virtio-fs'")
    if network is not None:
        from ..sandbox import hot_network

        network = hot_network(network)  # refused before a VM is taken
    vm = await factory_vm(
        config,
        template=template,
        use_cache=use_cache,
        run_root=run_root,
        templates=templates,
        id=id,
        timeout=timeout,
        cache_socket=cache_socket,
    )
    try:
        sb = await adopt_vm(
            vm,
            run_root=run_root,
            image=image,
            bundle=bundle,
            mounts=mounts,
            image_store=image_store,
            network=network,
        )
    except BaseException:
        await stop_quietly(vm)
        raise
    try:
        await sb.plug_network()
        if workload:
            await sb.share_workload()
    except BaseException:
        await sb.stop()
        raise
    return sb


async def adopt_vm(vm: VM, *, run_root: str | None = None, **workload: Any) -> Sandbox:
    """Wrap a running factory VM in a persisted `Sandbox` (which then owns it); `workload`:
    its container's image, bundle, mounts, image_store (see `Sandbox.adopt`)."""
    from ..sandbox import Sandbox

    endpoint = vm.agent_endpoint
    agent = await vm.agent()
    return Sandbox.adopt(
        vm.hypervisor, agent, endpoint, run_root, share_dir=vm.share_dir, **workload
    )
