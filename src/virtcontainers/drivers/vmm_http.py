"""The one HTTP client style for VMMs with a REST API on a Unix socket (Firecracker, Cloud
Hypervisor): httpx over `uds=`, no retries, `get`/`put`/`patch` of the VMM's resource paths.

Failures are the same for every VMM: no answer in time is `VMTimeoutError`, a dropped or
refused connection is the VMM's error without a status (or `VMExitedError` when `exited`
says the process died), a non-2xx answer is the VMM's error with its status and the detail
its body carries. After a timeout or a transport error the connection pool is dropped: a
half-answered request would otherwise poison the pooled connection.
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from ..errors import HypervisorError, VMExitedError, VMTimeoutError

DEFAULT_TIMEOUT = 10.0


class VmmHttpClient(abc.ABC):
    """An async client for one VMM API socket; subclasses name the VMM and its errors and
    add the VMM's resources as methods."""

    #: The VMM's name, at the start of every error message.
    vmm = "vmm"
    #: Prefix of every request path.
    base_url = "http://localhost"

    def __init__(
        self,
        socket_path: str,
        timeout: float = DEFAULT_TIMEOUT,
        exited: Callable[[], Awaitable[str | None]] | None = None,
    ) -> None:
        """`exited` (optional) is asked after a transport failure: a description of the
        VMM's death turns the failure into `VMExitedError`."""
        self.socket_path = socket_path
        self.timeout = timeout
        self._exited = exited
        self._client: httpx.AsyncClient | None = None

    @abc.abstractmethod
    def error_detail(self, response: httpx.Response) -> str:
        """What an error answer says (each VMM has its own error body)."""

    @abc.abstractmethod
    def api_error(self, method: str, path: str, status: int | None, detail: str) -> HypervisorError:
        """The VMM's error for a failed request (`status` None: no answer)."""

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                transport=httpx.AsyncHTTPTransport(uds=self.socket_path, retries=0),
                base_url=self.base_url,
            )
        return self._client

    async def close(self) -> None:
        """Drop the connection pool (the VMM keeps running)."""
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
        """Send one request; the decoded JSON answer, or None for an empty one."""
        limit = self.timeout if timeout is None else timeout
        try:
            response = await self._http().request(
                method, path, json=body, timeout=httpx.Timeout(limit)
            )
        except httpx.TimeoutException as e:
            await self.close()
            raise VMTimeoutError(
                f"{self.vmm} {method} {path}: no answer within {limit:g}s on {self.socket_path}"
            ) from e
        except httpx.TransportError as e:
            await self.close()
            death = await self._exited() if self._exited is not None else None
            if death:
                raise VMExitedError(f"{self.vmm} {method} {path}: the VMM {death}") from e
            raise self.api_error(
                method,
                path,
                None,
                f"cannot reach the API socket {self.socket_path}: {e or type(e).__name__}",
            ) from e
        if not 200 <= response.status_code < 300:
            raise self.api_error(method, path, response.status_code, self.error_detail(response))
        if not response.content.strip():
            return None
        try:
            return response.json()
        except ValueError as e:
            raise self.api_error(
                method, path, response.status_code, f"answer is not JSON: {response.text[:200]!r}"
            ) from e

    async def get(self, path: str, timeout: float | None = None) -> Any:
        return await self.request("GET", path, timeout=timeout)

    async def put(
        self, path: str, body: dict[str, Any] | None = None, timeout: float | None = None
    ) -> Any:
        return await self.request("PUT", path, body, timeout=timeout)

    async def patch(self, path: str, body: dict[str, Any], timeout: float | None = None) -> Any:
        return await self.request("PATCH", path, body, timeout=timeout)
