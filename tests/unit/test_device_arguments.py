"""Every driver refuses, with a ConfigError naming the type, an argument that is not a device."""

from __future__ import annotations

import pytest

from virtcontainers.errors import ConfigError
from virtcontainers.hypervisor import new_hypervisor
from virtcontainers.types import HypervisorType, Socket, VSock


@pytest.mark.parametrize("kind", [str(t) for t in HypervisorType])
@pytest.mark.parametrize("method", ["add_device", "hotplug_add_device", "hotplug_remove_device"])
async def test_a_socket_is_not_a_device(kind: str, method: str) -> None:
    hv = new_hypervisor(kind)
    sock = hv.generate_socket("sb1", False) if kind == "mock" else Socket("c", "i", "/x", "n")
    with pytest.raises(
        ConfigError, match=rf"^{kind}: cannot .* a Socket: not a device .*SerialPort"
    ):
        await getattr(hv, method)(sock)
    with pytest.raises(ConfigError, match="a VSock: not a device"):
        await getattr(hv, method)(VSock(-1, 3, 1024))
    with pytest.raises(ConfigError, match="a str: not a device"):
        await getattr(hv, method)("/dev/sdb")
