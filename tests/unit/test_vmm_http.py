"""Firecracker's and Cloud Hypervisor's API clients behave the same way (drivers/vmm_http)."""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import AsyncIterator

import pytest

from virtcontainers.drivers.clh import ClhApi, ClhApiError
from virtcontainers.drivers.firecracker import FirecrackerAPI, FirecrackerAPIError
from virtcontainers.drivers.vmm_http import VmmHttpClient
from virtcontainers.errors import VMExitedError, VMTimeoutError

CLIENTS = [(FirecrackerAPI, FirecrackerAPIError), (ClhApi, ClhApiError)]


@pytest.fixture
async def server() -> AsyncIterator[tuple[str, list[int]]]:
    """A server whose first request on each connection answers after 1 s, then at once;
    the list holds one entry per accepted connection."""
    tmp = tempfile.mkdtemp(prefix="vh-", dir="/tmp")
    path = os.path.join(tmp, "api.sock")
    connections: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        first = len(connections) == 1
        try:
            while await reader.readuntil(b"\r\n\r\n"):
                if first:
                    await asyncio.sleep(1.0)
                    first = False
                writer.write(b'HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n{"ok": true}')
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    srv = await asyncio.start_unix_server(handle, path)
    yield path, connections
    srv.close()
    await srv.wait_closed()
    os.unlink(path)
    os.rmdir(tmp)


@pytest.mark.parametrize(("client", "error"), CLIENTS)
async def test_a_timeout_drops_the_pool_then_the_next_request_works(
    server: tuple[str, list[int]], client: type[VmmHttpClient], error: type[Exception]
) -> None:
    path, connections = server
    api = client(path, timeout=0.2)
    with pytest.raises(VMTimeoutError, match=r"GET x: no answer within 0\.2s"):
        await api.get("x")
    assert api._client is None  # the half-answered connection is not reused
    assert await api.get("x", timeout=2.0) == {"ok": True}
    assert len(connections) == 2
    await api.close()


@pytest.mark.parametrize(("client", "error"), CLIENTS)
async def test_unreachable_socket_is_the_vmms_error_or_its_death(
    client: type[VmmHttpClient], error: type[Exception]
) -> None:
    api = client("/tmp/no-such-vmm-api.sock", timeout=1.0)
    where = r"cannot reach the API socket /tmp/no-such-vmm-api\.sock"
    with pytest.raises(error, match=where) as ei:
        await api.get("x")
    assert getattr(ei.value, "status", 0) is None

    async def died() -> str:
        return "exited with code 1"

    api = client("/tmp/no-such-vmm-api.sock", timeout=1.0, exited=died)
    with pytest.raises(VMExitedError, match="GET x: the VMM exited with code 1"):
        await api.get("x")
