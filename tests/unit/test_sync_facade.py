"""The synchronous facade drives the same Sandbox without asyncio in the caller."""

from __future__ import annotations

import pytest

from virtcontainers import StateError, UnsupportedError
from virtcontainers.hypervisor import VMState
from virtcontainers.sync import Sandbox

MOCK = {"kernel_path": "/boot/vmlinuz", "initrd_path": "/boot/initrd.img"}


def test_sync_lifecycle(run_root: str) -> None:
    with Sandbox("s1", "mock", run_root=run_root, **MOCK) as sb:
        assert sb.state is VMState.RUNNING
        assert [i.id for i in Sandbox.list(run_root)] == ["s1"]
        assert sb.exec(["echo", "hi"]).stdout == b"hi\n"
        other = Sandbox.attach("s1", run_root=run_root)
        with pytest.raises(UnsupportedError, match="detached"):
            other.exec(["true"])  # the mock's stand-in agent serves only `sb`
        other.pause()
        assert Sandbox.list(run_root)[0].state == "paused"
        other.detach()
    assert Sandbox.list(run_root) == []


def test_sync_attach_unknown(run_root: str) -> None:
    with pytest.raises(StateError, match="no such sandbox: nope"):
        Sandbox.attach("nope", run_root=run_root)


def test_sync_error_in_body_still_stops(run_root: str) -> None:
    with pytest.raises(KeyError), Sandbox("s2", "mock", run_root=run_root, **MOCK):
        raise KeyError("x")
    assert Sandbox.list(run_root) == []
