"""State files of the previous format (driver fields in a free-form `extra`) still load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from virtcontainers.drivers.acrn.state import AcrnState
from virtcontainers.drivers.clh.state import ClhState
from virtcontainers.drivers.firecracker.state import FirecrackerState
from virtcontainers.drivers.qemu import QemuHypervisor
from virtcontainers.drivers.qemu.state import Dimm, Plugged, QemuState
from virtcontainers.errors import StateError
from virtcontainers.hypervisor import new_hypervisor
from virtcontainers.persist import HypervisorState, StateStore
from virtcontainers.types import VMState

OLD = Path(__file__).parent.parent / "data" / "state-v1"


def old_store(tmp_path: Path, kind: str) -> StateStore:
    """A store holding the saved old-format file of `kind` as sandbox `old`."""
    store = StateStore(str(tmp_path))
    Path(store.dir("old")).mkdir(parents=True)
    shutil.copy(OLD / f"{kind}.json", store.path("old"))
    return store


def test_qemu_sandbox_file_of_the_previous_format_loads(tmp_path: Path) -> None:
    store = old_store(tmp_path, "qemu")
    assert "extra" in store.read("old")["hypervisor"]
    state = store.load_hypervisor("old")
    assert (state.id, state.vm_state) == ("oldq", VMState.RUNNING)
    own = state.driver_state(QemuState)
    assert own.accel == "tcg" and own.qemu_path == "/usr/bin/qemu-system-x86_64"
    assert own.hotplug.devices == [
        Plugged("BlockDrive:data0", "scsi-data0", "blockdev", "data0", "", 0, "0:0")
    ]
    assert own.hotplug.dimms == [Dimm("dimm0", 0, 128, 4294967296)]
    assert [h.kind for h in own.helpers] == ["console-log"]
    drv = QemuHypervisor(run_root=str(tmp_path))
    drv.load(state)
    assert (drv.id, drv.state, drv.accel) == ("oldq", VMState.RUNNING, "tcg")
    assert drv.hotplug.dimms[0].size_mb == 128 and "BlockDrive:data0" in drv.hotplug.plugged
    assert drv.get_pids()[0] == state.pid
    # Saved again, it is in the new format and reads back the same.
    again = HypervisorState.model_validate_json(drv.save().model_dump_json())
    assert "extra" not in again.model_dump() and again.vm_state == VMState.RUNNING
    assert again.driver_state(QemuState) == own


def test_firecracker_id_moves_from_uuid(tmp_path: Path) -> None:
    state = old_store(tmp_path, "firecracker").load_hypervisor("old")
    assert (state.id, state.uuid, state.vm_state) == ("oldfi", "", VMState.CREATED)
    assert state.driver_state(FirecrackerState).root.endswith("/vm/oldfi")
    hv = new_hypervisor("firecracker", str(tmp_path))
    hv.load(state)
    assert (hv.id, hv.state) == ("oldfi", VMState.CREATED)


@pytest.mark.parametrize(
    ("kind", "vm_id", "model"),
    [("clh", "oldcl", ClhState), ("acrn", "oldac", AcrnState)],
)
def test_other_drivers_state_moves_to_fields(
    tmp_path: Path, kind: str, vm_id: str, model: type[ClhState] | type[AcrnState]
) -> None:
    state = old_store(tmp_path, kind).load_hypervisor("old")
    assert (state.id, state.vm_state) == (vm_id, VMState.CREATED)
    state.driver_state(model)
    hv = new_hypervisor(kind, str(tmp_path))
    hv.load(state)
    assert (hv.id, hv.state) == (vm_id, VMState.CREATED)


def test_mock_state_of_the_previous_format_loads(tmp_path: Path) -> None:
    state = old_store(tmp_path, "mock").load_hypervisor("old")
    hv = new_hypervisor("mock", str(tmp_path))
    hv.load(state)
    assert hv.id == "oldmo"


def test_an_old_state_without_a_vm_state_was_running() -> None:
    state = HypervisorState.model_validate({"type": "acrn", "extra": {"id": "a"}})
    assert (state.id, state.vm_state) == ("a", VMState.RUNNING)


def test_a_driver_field_of_the_wrong_type_names_the_vm(tmp_path: Path) -> None:
    doc = json.loads((OLD / "clh.json").read_text())["hypervisor"]
    doc["extra"]["hotplug_mb"] = "lots"
    state = HypervisorState.model_validate(doc)
    with pytest.raises(StateError, match=r"(?s)clh VM 'oldcl'.*hotplug_mb"):
        new_hypervisor("clh", str(tmp_path)).load(state)


def test_unknown_driver_fields_are_refused(tmp_path: Path) -> None:
    state = HypervisorState(type="qemu", id="q", driver={"acel": "tcg"})  # type: ignore[arg-type]
    with pytest.raises(StateError, match="acel"):
        state.driver_state(QemuState)
