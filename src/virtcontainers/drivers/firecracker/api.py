"""Firecracker's REST API over its Unix socket (httpx with a `uds=` transport).

Errors carry Firecracker's `fault_message`, the HTTP method and the path.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import httpx

from ...errors import HypervisorError, VMTimeoutError


class FirecrackerAPIError(HypervisorError):
    """Firecracker refused a request (or could not be reached)."""

    def __init__(self, method: str, path: str, status: int | None, fault_message: str) -> None:
        self.method = method
        self.path = path
        self.status = status
        self.fault_message = fault_message
        code = f"HTTP {status}" if status is not None else "no answer"
        super().__init__(f"firecracker {method} {path} failed ({code}): {fault_message}")


def fault_message(response: httpx.Response) -> str:
    """The `fault_message` of an error answer, or the raw body when it has none."""
    try:
        doc = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
        return response.text.strip() or response.reason_phrase
    if isinstance(doc, dict) and isinstance(doc.get("fault_message"), str):
        return str(doc["fault_message"])
    return response.text.strip()


class FirecrackerAPI:
    """An async client for one Firecracker API socket."""

    def __init__(self, socket_path: str, timeout: float = 10.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        self._client: httpx.AsyncClient | None = None

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            transport = httpx.AsyncHTTPTransport(uds=self.socket_path, retries=0)
            self._client = httpx.AsyncClient(
                transport=transport, base_url="http://localhost", timeout=self.timeout
            )
        return self._client

    async def close(self) -> None:
        """Close the connection pool (the VM is not touched)."""
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def request(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Send one request; the decoded JSON answer (None for 204), or `FirecrackerAPIError`."""
        try:
            response = await self._http().request(
                method,
                path,
                json=body,
                timeout=timeout if timeout is not None else self.timeout,
            )
        except httpx.TimeoutException as e:
            raise VMTimeoutError(
                f"firecracker {method} {path}: no answer within "
                f"{timeout if timeout is not None else self.timeout:g}s on {self.socket_path}"
            ) from e
        except httpx.TransportError as e:
            await self.close()
            raise FirecrackerAPIError(method, path, None, f"{type(e).__name__}: {e}") from e
        if response.status_code >= 300:
            raise FirecrackerAPIError(method, path, response.status_code, fault_message(response))
        if response.status_code == 204 or not response.content:
            return None
        try:
            return response.json()
        except ValueError as e:
            raise FirecrackerAPIError(
                method, path, response.status_code, f"answer is not JSON: {response.text[:200]}"
            ) from e

    async def get(self, path: str, timeout: float | None = None) -> Any:
        return await self.request("GET", path, timeout=timeout)

    async def put(self, path: str, body: dict[str, Any], timeout: float | None = None) -> None:
        await self.request("PUT", path, body, timeout=timeout)

    async def patch(self, path: str, body: dict[str, Any], timeout: float | None = None) -> None:
        await self.request("PATCH", path, body, timeout=timeout)

    async def describe(self, timeout: float | None = None) -> dict[str, Any]:
        """`GET /`: id, state ("Not started", "Running", "Paused"), vmm_version."""
        info = await self.get("/", timeout=timeout)
        if not isinstance(info, dict):
            raise FirecrackerAPIError("GET", "/", 200, f"unexpected answer {info!r}")
        return info

    async def wait_ready(
        self, deadline: float, alive: Callable[[], None], interval: float = 0.005
    ) -> dict[str, Any]:
        """Poll `GET /` until it answers, with a growing interval (5 ms doubling to 100 ms).

        `alive()` raises when the process has gone; past `deadline` (time.monotonic) raise
        `VMTimeoutError`.
        """
        last = ""
        while True:
            alive()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise VMTimeoutError(
                    f"firecracker API socket {self.socket_path} did not answer in time"
                    + (f" (last error: {last})" if last else "")
                )
            try:
                return await self.describe(timeout=max(0.05, min(remaining, 1.0)))
            except (FirecrackerAPIError, VMTimeoutError) as e:
                last = str(e)
            await asyncio.sleep(min(interval, max(0.0, deadline - time.monotonic())))
            interval = min(interval * 2, 0.1)
