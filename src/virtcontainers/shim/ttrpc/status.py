"""ttrpc call status: gRPC's status codes carried in a google.rpc.Status."""

from __future__ import annotations

import enum

from google.rpc import status_pb2


class Code(enum.IntEnum):
    """The gRPC status codes (google.rpc.Code), which ttrpc and containerd's errdefs use."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class TtrpcError(Exception):
    """A call that ended with a non-OK status (raised by handlers, and by the client)."""

    def __init__(self, code: Code | int, message: str) -> None:
        try:
            self.code: Code | int = Code(code)
        except ValueError:
            self.code = code
        self.message = message
        name = self.code.name if isinstance(self.code, Code) else str(code)
        super().__init__(f"{name}: {message}")

    def to_status(self) -> status_pb2.Status:
        return status_pb2.Status(code=int(self.code), message=self.message)

    @classmethod
    def from_status(cls, status: status_pb2.Status) -> TtrpcError:
        return cls(status.code, status.message)


class ConnectionClosedError(TtrpcError):
    """The connection closed before the call was answered."""

    def __init__(self, message: str = "ttrpc: connection closed") -> None:
        super().__init__(Code.UNAVAILABLE, message)
