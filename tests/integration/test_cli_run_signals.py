"""`virtc run --image` on a real QEMU guest, and what reaches it from outside while it runs:
SIGTERM and SIGHUP stop it as cleanly as SIGINT (nothing left behind). Run without the
zygote (`test_zygote` covers the hand-over)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest

from leaks import leftovers, vm_processes
from virtcontainers.images import ImageStore
from virtcontainers.images.build import busybox_image

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("leak_check")]

VIRTC = (sys.executable, "-m", "virtcontainers.cli")
RUN = ("run", "--net", "none", "--image", "busybox")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ImageStore]:
    s = ImageStore(str(tmp_path_factory.mktemp("images")))
    s.import_archive(busybox_image())
    yield s


def env(run_root: str, store: ImageStore) -> dict[str, str]:
    return dict(os.environ, VC_RUN_ROOT=run_root, VC_IMAGE_ROOT=store.root, VIRTC_NO_ZYGOTE="1")


@pytest.mark.parametrize("signo", [signal.SIGTERM, signal.SIGHUP])
def test_a_termination_signal_stops_the_sandbox(
    run_root: str, store: ImageStore, signo: signal.Signals
) -> None:
    proc = subprocess.Popen(
        [*VIRTC, *RUN, "--", "sh", "-c", "echo up; sleep 600"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env(run_root, store),
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"up\n"
        assert vm_processes(run_root), "the sandbox's VM should be running"
        proc.send_signal(signo)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signo, err
    assert signo.name.encode() in err, err
    assert vm_processes(run_root) == []
    assert leftovers(run_root) == []
