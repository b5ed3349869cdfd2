"""Firecracker failures: injected through the fake (hangs, crashes, slow answers, refusals)
and, where the real binary can show them, on the real one too. After every failure nothing
may be left: no process, socket, directory or fd."""

from __future__ import annotations

import os
import signal

import pytest
from fc_support import (  # noqa: F401 - fixtures
    Backend,
    fake_backend,
    fc_kernel,
    make_config,
    open_fds,
    real_backend,
    short_tmp,
)

from leaks import running
from virtcontainers import (
    AssetError,
    ConfigError,
    HypervisorError,
    LaunchError,
    VMExitedError,
    VMTimeoutError,
)
from virtcontainers.drivers.firecracker import Firecracker, FirecrackerAPIError

pytestmark = pytest.mark.integration


def _children() -> set[int]:
    me = os.getpid()
    out = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == me:
            out.add(int(entry))
    return out


async def _start_expecting(
    backend: Backend,
    kernel: tuple[str, str],
    run_root: str,
    exc: type[BaseException],
    timeout: float = 20,
    **cfg: object,
) -> pytest.ExceptionInfo[BaseException]:
    fds = open_fds()
    children = _children()
    fc = Firecracker(run_root=run_root)
    await fc.create_sandbox("fc-fault", None, make_config(backend, kernel, **cfg))
    with pytest.raises(exc) as info:
        await fc.start_sandbox(timeout=timeout)
    assert fc.get_pids() == []
    assert _children() == children, "firecracker process left behind"
    assert not os.path.exists(fc.vm_dir), "VM directory left behind"
    assert open_fds() == fds, "fd leaked"
    await fc.stop_sandbox()  # still fine after a failed start
    return info


async def test_exit_at_start_is_launch_error_with_log(
    fc_kernel: tuple[str, str],  # noqa: F811
    short_tmp: str,  # noqa: F811
) -> None:
    backend = fake_backend(short_tmp, "--exit-at-start 3")
    info = await _start_expecting(backend, fc_kernel, short_tmp, LaunchError)
    err = info.value
    assert isinstance(err, LaunchError)
    assert err.exit_code == 3
    assert "injected start-up failure" in err.log_tail
    assert err.argv[0] == backend.firecracker and "--api-sock" in err.argv


async def test_crash_mid_configuration(
    fc_kernel: tuple[str, str],  # noqa: F811
    short_tmp: str,  # noqa: F811
) -> None:
    backend = fake_backend(short_tmp, "--fault crash-on=putMachineConfiguration")
    info = await _start_expecting(backend, fc_kernel, short_tmp, LaunchError)
    assert isinstance(info.value, LaunchError)
    assert info.value.exit_code == 134
    assert "injected crash" in info.value.log_tail


async def test_hang_on_instance_start_times_out(
    fc_kernel: tuple[str, str],  # noqa: F811
    short_tmp: str,  # noqa: F811
) -> None:
    backend = fake_backend(short_tmp, "--fault hang-on=InstanceStart")
    info = await _start_expecting(backend, fc_kernel, short_tmp, VMTimeoutError, timeout=3)
    assert "PUT /actions" in str(info.value)


async def test_api_socket_never_appears(
    fc_kernel: tuple[str, str],  # noqa: F811
    short_tmp: str,  # noqa: F811
) -> None:
    backend = fake_backend(short_tmp, "--no-listen")
    info = await _start_expecting(backend, fc_kernel, short_tmp, VMTimeoutError, timeout=1.5)
    assert "did not answer" in str(info.value)


async def test_slow_answers_within_and_past_deadline(
    fc_kernel: tuple[str, str],  # noqa: F811
    short_tmp: str,  # noqa: F811
) -> None:
    backend = fake_backend(short_tmp, "--fault slow=0.2")
    await _start_expecting(backend, fc_kernel, short_tmp, VMTimeoutError, timeout=1.0)
    fc = Firecracker(run_root=short_tmp)
    async with fc:
        await fc.create_sandbox("fc-slow", None, make_config(backend, fc_kernel))
        await fc.start_sandbox(timeout=30)
        assert fc.api is not None
        assert (await fc.api.describe())["state"] == "Running"


async def test_refused_request_names_method_path_and_fault(
    fc_kernel: tuple[str, str],  # noqa: F811
    short_tmp: str,  # noqa: F811
) -> None:
    backend = fake_backend(short_tmp, "--fault fail-on=putGuestVsock")
    info = await _start_expecting(backend, fc_kernel, short_tmp, FirecrackerAPIError)
    assert isinstance(info.value, FirecrackerAPIError)
    assert info.value.method == "PUT" and info.value.path == "/vsock"
    assert "injected failure" in str(info.value) and "HTTP 400" in str(info.value)


@pytest.fixture(params=["real", "fake"])
def backend(request: pytest.FixtureRequest, short_tmp: str) -> Backend:  # noqa: F811
    if request.param == "real":
        return real_backend()
    return fake_backend(short_tmp)


async def test_missing_kernel_file_is_refused(
    backend: Backend,
    fc_kernel: tuple[str, str],  # noqa: F811
    short_tmp: str,  # noqa: F811
) -> None:
    kernel = os.path.join(short_tmp, "vmlinux")
    with open(fc_kernel[0], "rb") as src, open(kernel, "wb") as dst:
        dst.write(src.read())
    fc = Firecracker(run_root=short_tmp)
    await fc.create_sandbox("fc-nokernel", None, make_config(backend, (kernel, fc_kernel[1])))
    os.unlink(kernel)
    with pytest.raises(AssetError, match=f"cannot read kernel {kernel}"):
        await fc.start_sandbox(timeout=20)
    assert not os.path.exists(fc.vm_dir)


async def test_corrupt_template_fails_cleanly(
    backend: Backend,
    fc_kernel: tuple[str, str],  # noqa: F811
    short_tmp: str,  # noqa: F811
) -> None:
    state = os.path.join(short_tmp, "bad.state")
    mem = os.path.join(short_tmp, "bad.mem")
    with open(state, "wb") as f:
        f.write(b"not a snapshot")
    with open(mem, "wb") as f:
        f.truncate(128 << 20)
    cfg = {"boot_from_template": True, "memory_path": mem, "devices_state_path": state}
    info = await _start_expecting(backend, fc_kernel, short_tmp, HypervisorError, **cfg)
    assert "snapshot" in str(info.value).lower()


async def test_missing_template_is_config_error(
    backend: Backend,
    fc_kernel: tuple[str, str],  # noqa: F811
    short_tmp: str,  # noqa: F811
) -> None:
    missing = os.path.join(short_tmp, "none")
    cfg = {"boot_from_template": True, "memory_path": missing, "devices_state_path": missing}
    info = await _start_expecting(backend, fc_kernel, short_tmp, ConfigError, **cfg)
    assert "devices_state_path" in str(info.value)


async def test_killed_vmm_is_detected_and_cleaned(
    backend: Backend,
    fc_kernel: tuple[str, str],  # noqa: F811
    short_tmp: str,  # noqa: F811
) -> None:
    fc = Firecracker(run_root=short_tmp)
    await fc.create_sandbox("fc-killed", None, make_config(backend, fc_kernel))
    await fc.start_sandbox(timeout=20)
    pid = fc.get_pids()[0]
    os.kill(pid, signal.SIGKILL)
    for _ in range(200):
        if not running(pid):
            break
        await __import__("asyncio").sleep(0.01)
    with pytest.raises(VMExitedError):
        await fc.check()
    with pytest.raises(HypervisorError):
        await fc.pause_sandbox()
    await fc.stop_sandbox()
    assert not os.path.exists(fc.vm_dir)


async def test_bad_inputs_are_refused_early(
    backend: Backend,
    fc_kernel: tuple[str, str],  # noqa: F811
    short_tmp: str,  # noqa: F811
) -> None:
    fc = Firecracker(run_root=short_tmp)
    with pytest.raises(ConfigError, match="invalid VM id"):
        await fc.create_sandbox("bad id!", None, make_config(backend, fc_kernel))
    with pytest.raises(ConfigError, match="num_vcpus"):
        cfg = make_config(backend, fc_kernel, num_vcpus=33, default_max_vcpus=64)
        await Firecracker(run_root=short_tmp).create_sandbox("fc-many-cpus", None, cfg)
    text = os.path.join(short_tmp, "not-exec")
    open(text, "w").close()
    with pytest.raises(ConfigError, match="not an executable"):
        await Firecracker(run_root=short_tmp).create_sandbox(
            "fc-noexec", None, make_config(backend, fc_kernel, hypervisor_path=text)
        )
    long_root = os.path.join(short_tmp, "x" * 90)
    with pytest.raises(ConfigError, match="socket path too long"):
        await Firecracker(run_root=long_root).create_sandbox(
            "fc-long", None, make_config(backend, fc_kernel)
        )
