"""Client for the Cloud Hypervisor REST API (`/api/v1/*`) over its Unix socket.

Every non-2xx answer is a failure: the server's codes often differ from its spec (a wrong
lifecycle state comes back as 500, not 405), and its error body is a JSON array of strings,
which goes into the `HypervisorError` message with the endpoint.
"""

from __future__ import annotations

import json
from typing import Any

import httpx

from ...errors import HypervisorError
from ..vmm_http import VmmHttpClient

API_PREFIX = "http://localhost/api/v1/"


def error_text(body: bytes) -> str:
    """Render an error body: a JSON array of strings joined with ': ', else the raw text."""
    text = body.decode("utf-8", "replace").strip()
    if not text:
        return "(empty body)"
    try:
        doc = json.loads(text)
    except ValueError:
        return text
    if isinstance(doc, list) and all(isinstance(x, str) for x in doc):
        return ": ".join(doc) if doc else "(empty error list)"
    return text


class ClhApiError(HypervisorError):
    """Cloud Hypervisor answered an API call with a non-2xx status (or did not answer)."""

    def __init__(self, method: str, endpoint: str, status: int | None, detail: str) -> None:
        self.method = method
        self.endpoint = endpoint
        self.status = status
        self.detail = detail
        code = f"with HTTP {status}" if status is not None else "(no answer)"
        super().__init__(f"cloud-hypervisor {method} {endpoint} failed {code}: {detail}")


class ClhApi(VmmHttpClient):
    """Async calls to one Cloud Hypervisor API socket (the shared `vmm_http` client)."""

    vmm = "cloud-hypervisor"
    base_url = API_PREFIX

    def error_detail(self, response: httpx.Response) -> str:
        return error_text(response.content)

    def api_error(self, method: str, path: str, status: int | None, detail: str) -> ClhApiError:
        return ClhApiError(method, path, status, detail)

    async def call(
        self,
        method: str,
        endpoint: str,
        body: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Send one request to `endpoint` (relative to `/api/v1/`)."""
        return await self.request(method, endpoint, body, timeout)

    # -- endpoints -------------------------------------------------------------------------
    async def ping(self, timeout: float | None = None) -> dict[str, Any]:
        """`GET vmm.ping`: the VMM's version information."""
        return dict(await self.call("GET", "vmm.ping", timeout=timeout) or {})

    async def shutdown_vmm(self, timeout: float | None = None) -> None:
        """`PUT vmm.shutdown`: ask the VMM process to exit."""
        await self.call("PUT", "vmm.shutdown", timeout=timeout)

    async def create(self, config: dict[str, Any], timeout: float | None = None) -> None:
        """`PUT vm.create` with a full `VmConfig`."""
        await self.call("PUT", "vm.create", config, timeout=timeout)

    async def boot(self, timeout: float | None = None) -> None:
        """`PUT vm.boot`."""
        await self.call("PUT", "vm.boot", timeout=timeout)

    async def info(self, timeout: float | None = None) -> dict[str, Any]:
        """`GET vm.info`: `{config, state, memory_actual_size?, device_tree?}`."""
        doc = await self.call("GET", "vm.info", timeout=timeout)
        if not isinstance(doc, dict) or "state" not in doc:
            raise HypervisorError(f"cloud-hypervisor GET vm.info: unexpected answer {doc!r}")
        return doc

    async def pause(self) -> None:
        """`PUT vm.pause`."""
        await self.call("PUT", "vm.pause")

    async def resume(self) -> None:
        """`PUT vm.resume`."""
        await self.call("PUT", "vm.resume")

    async def resize(self, *, vcpus: int | None = None, ram_bytes: int | None = None) -> None:
        """`PUT vm.resize` with `desired_vcpus` and/or `desired_ram` (bytes)."""
        body: dict[str, Any] = {}
        if vcpus is not None:
            body["desired_vcpus"] = vcpus
        if ram_bytes is not None:
            body["desired_ram"] = ram_bytes
        await self.call("PUT", "vm.resize", body)

    async def add(self, kind: str, body: dict[str, Any]) -> dict[str, Any] | None:
        """`PUT vm.add-<kind>` (disk, net, fs, device, ...): the new device's `PciDeviceInfo`."""
        doc = await self.call("PUT", f"vm.add-{kind}", body)
        return doc if isinstance(doc, dict) else None

    async def remove_device(self, device_id: str) -> None:
        """`PUT vm.remove-device`."""
        await self.call("PUT", "vm.remove-device", {"id": device_id})

    async def snapshot(self, destination_url: str, timeout: float | None = None) -> None:
        """`PUT vm.snapshot` (the VM must be paused)."""
        await self.call("PUT", "vm.snapshot", {"destination_url": destination_url}, timeout)

    async def restore(self, source_url: str, timeout: float | None = None) -> None:
        """`PUT vm.restore` into a VMM that has no VM yet; the VM comes back paused."""
        await self.call("PUT", "vm.restore", {"source_url": source_url}, timeout)
