"""Firecracker's REST API over its Unix socket (the shared `vmm_http` client).

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
from ..vmm_http import VmmHttpClient


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


class FirecrackerAPI(VmmHttpClient):
    """An async client for one Firecracker API socket."""

    vmm = "firecracker"

    def error_detail(self, response: httpx.Response) -> str:
        return fault_message(response)

    def api_error(
        self, method: str, path: str, status: int | None, detail: str
    ) -> FirecrackerAPIError:
        return FirecrackerAPIError(method, path, status, detail)

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
