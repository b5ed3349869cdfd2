"""VM cache hand-over for drivers whose persisted state is all another process needs to take
a VM over: `to_grpc` sends `save()` as JSON, `from_grpc` reads it back before `load()`.

`to_grpc`/`from_grpc` keep the seed's names, but what they exchange is this JSON document, not
a protobuf message: the VM cache's gRPC message (`factory/cache.proto`) carries it as bytes."""

from __future__ import annotations

from ..errors import StateError
from ..persist import HypervisorState


def encode_state(state: HypervisorState) -> bytes:
    """The bytes `to_grpc` hands over: the state as JSON."""
    return state.model_dump_json().encode()


def decode_state(data: bytes, hypervisor: str) -> HypervisorState:
    """The state `encode_state` wrote; `StateError` naming `hypervisor` when it is unreadable."""
    try:
        return HypervisorState.model_validate_json(data)
    except ValueError as e:
        raise StateError(f"{hypervisor}: unreadable VM state from the VM cache: {e}") from e
