from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Empty(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GrpcVMConfig(_message.Message):
    __slots__ = ("hypervisor", "config")
    HYPERVISOR_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    hypervisor: str
    config: bytes
    def __init__(self, hypervisor: _Optional[str] = ..., config: _Optional[bytes] = ...) -> None: ...

class GetBaseVMRequest(_message.Message):
    __slots__ = ("timeout_ms", "want")
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    WANT_FIELD_NUMBER: _ClassVar[int]
    timeout_ms: int
    want: GrpcVMConfig
    def __init__(self, timeout_ms: _Optional[int] = ..., want: _Optional[_Union[GrpcVMConfig, _Mapping]] = ...) -> None: ...

class GrpcVM(_message.Message):
    __slots__ = ("id", "hypervisor", "data", "config", "agent_socket", "agent_vsock_port", "cpu", "memory_mb", "created_at", "origin", "share_dir")
    ID_FIELD_NUMBER: _ClassVar[int]
    HYPERVISOR_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    AGENT_SOCKET_FIELD_NUMBER: _ClassVar[int]
    AGENT_VSOCK_PORT_FIELD_NUMBER: _ClassVar[int]
    CPU_FIELD_NUMBER: _ClassVar[int]
    MEMORY_MB_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    SHARE_DIR_FIELD_NUMBER: _ClassVar[int]
    id: str
    hypervisor: str
    data: bytes
    config: bytes
    agent_socket: str
    agent_vsock_port: int
    cpu: int
    memory_mb: int
    created_at: float
    origin: str
    share_dir: str
    def __init__(self, id: _Optional[str] = ..., hypervisor: _Optional[str] = ..., data: _Optional[bytes] = ..., config: _Optional[bytes] = ..., agent_socket: _Optional[str] = ..., agent_vsock_port: _Optional[int] = ..., cpu: _Optional[int] = ..., memory_mb: _Optional[int] = ..., created_at: _Optional[float] = ..., origin: _Optional[str] = ..., share_dir: _Optional[str] = ...) -> None: ...

class GrpcVMStatus(_message.Message):
    __slots__ = ("id", "pid", "cpu", "memory_mb", "state", "created_at")
    ID_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    CPU_FIELD_NUMBER: _ClassVar[int]
    MEMORY_MB_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    id: str
    pid: int
    cpu: int
    memory_mb: int
    state: str
    created_at: float
    def __init__(self, id: _Optional[str] = ..., pid: _Optional[int] = ..., cpu: _Optional[int] = ..., memory_mb: _Optional[int] = ..., state: _Optional[str] = ..., created_at: _Optional[float] = ...) -> None: ...

class GrpcStatus(_message.Message):
    __slots__ = ("pid", "vms", "size", "booting", "handed_out", "waiting", "base", "last_error")
    PID_FIELD_NUMBER: _ClassVar[int]
    VMS_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    BOOTING_FIELD_NUMBER: _ClassVar[int]
    HANDED_OUT_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    BASE_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    pid: int
    vms: _containers.RepeatedCompositeFieldContainer[GrpcVMStatus]
    size: int
    booting: int
    handed_out: int
    waiting: int
    base: str
    last_error: str
    def __init__(self, pid: _Optional[int] = ..., vms: _Optional[_Iterable[_Union[GrpcVMStatus, _Mapping]]] = ..., size: _Optional[int] = ..., booting: _Optional[int] = ..., handed_out: _Optional[int] = ..., waiting: _Optional[int] = ..., base: _Optional[str] = ..., last_error: _Optional[str] = ...) -> None: ...
