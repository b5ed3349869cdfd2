"""The fake Firecracker answers like the real one: the same request script, step by step, must
get the same status codes (and key fault texts) from the real v1.12.1 binary and from the fake.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import pytest
from fc_support import (  # noqa: F401 - fixtures
    Backend,
    fake_backend,
    fc_kernel,
    real_backend,
    short_tmp,
)

from virtcontainers.drivers.firecracker import FirecrackerAPI, FirecrackerAPIError

pytestmark = pytest.mark.integration


@pytest.fixture(params=["real", "fake"])
def backend(request: pytest.FixtureRequest, short_tmp: str) -> Backend:  # noqa: F811
    if request.param == "real":
        return real_backend()
    return fake_backend(short_tmp)


async def _step(api: FirecrackerAPI, method: str, path: str, body: Any = None) -> tuple[int, str]:
    try:
        await api.request(method, path, body)
    except FirecrackerAPIError as e:
        return e.status or 0, e.fault_message
    return 200 if method == "GET" else 204, ""


async def test_same_answers_as_the_real_server(
    backend: Backend,
    fc_kernel: tuple[str, str],  # noqa: F811
    short_tmp: str,  # noqa: F811
) -> None:
    kernel = os.path.join(short_tmp, "vmlinux")
    from virtcontainers.guest.vmlinux import ensure_vmlinux

    os.link(ensure_vmlinux(fc_kernel[0], os.path.join(short_tmp, "k")), kernel)
    empty = os.path.join(short_tmp, "empty.img")
    open(empty, "wb").close()
    log = os.path.join(short_tmp, "fc.log")
    open(log, "wb").close()
    sock = os.path.join(short_tmp, "api.sock")
    with open(os.path.join(short_tmp, "out.log"), "wb") as out:
        proc = await asyncio.create_subprocess_exec(
            backend.firecracker, "--api-sock", sock, "--id", "fidelity",
            stdout=out, stderr=out, cwd=short_tmp,
        )  # fmt: skip
    api = FirecrackerAPI(sock)
    try:
        await api.wait_ready(time.monotonic() + 10, lambda: None)
        script: list[tuple[str, str, Any, int, str]] = [
            ("PATCH", "/vm", {"state": "Paused"}, 400, "before starting"),
            ("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 64, "x": 1}, 400,
             "unknown field `x`"),
            ("PUT", "/machine-config", {"vcpu_count": 33, "mem_size_mib": 64}, 400, ""),
            ("PUT", "/drives/bad-id", {"drive_id": "bad-id", "is_root_device": False,
                                       "path_on_host": empty, "is_read_only": False}, 400,
             "alphanumeric characters and underscores"),
            ("PUT", "/drives/a", {"drive_id": "b", "is_root_device": False,
                                  "path_on_host": empty, "is_read_only": False}, 400,
             "does not match"),
            ("PUT", "/logger", {"log_path": os.path.join(short_tmp, "nope", "x.log")}, 400,
             "Logger"),
            ("PUT", "/logger", {"log_path": log, "level": "Info"}, 204, ""),
            ("PUT", "/actions", {"action_type": "InstanceStart"}, 400, "kernel"),
            ("PUT", "/machine-config", {"vcpu_count": 2, "mem_size_mib": 64}, 204, ""),
            ("PUT", "/boot-source", {"kernel_image_path": kernel}, 204, ""),
            ("PUT", "/drives/a", {"drive_id": "a", "is_root_device": False,
                                  "path_on_host": empty, "is_read_only": False}, 204, ""),
            ("PUT", "/vsock", {"guest_cid": 3, "uds_path": "v.sock"}, 204, ""),
            ("PUT", "/actions", {"action_type": "InstanceStart"}, 204, ""),
            ("GET", "/", None, 200, ""),
            ("PUT", "/boot-source", {"kernel_image_path": kernel}, 400, "after starting"),
            ("PUT", "/snapshot/create", {"snapshot_path": "s", "mem_file_path": "m"}, 400,
             "while running"),
            ("PATCH", "/vm", {"state": "Paused"}, 204, ""),
            ("PATCH", "/vm", {"state": "Paused"}, 204, ""),
            ("PATCH", "/drives/nope", {"drive_id": "nope", "path_on_host": empty}, 400,
             "Failed to find the device"),
            ("PATCH", "/drives/a", {"drive_id": "a", "path_on_host": empty}, 204, ""),
            ("PUT", "/snapshot/load", {"snapshot_path": "s", "mem_backend":
                                       {"backend_type": "File", "backend_path": "m"}}, 400, ""),
            ("GET", "/nonexistent", None, 400, "Invalid request method and/or path"),
            ("PATCH", "/vm", {"state": "Resumed"}, 204, ""),
        ]  # fmt: skip
        for method, path, body, status, text in script:
            got, message = await _step(api, method, path, body)
            assert got == status, f"{backend.name}: {method} {path} -> {got} {message}"
            assert text in message, f"{backend.name}: {method} {path}: {message!r}"
        assert os.path.exists(os.path.join(short_tmp, "v.sock"))  # relative to the cwd
    finally:
        await api.close()
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
