"""Host side of the guest agent: connect over the agent socket, ping, exec, start and stream
processes, copy files, wait for hotplugged hardware."""

from __future__ import annotations

from .client import (
    AgentClient,
    AgentInfo,
    AgentRequestError,
    AgentTimeoutError,
    ExecResult,
    HybridVsock,
    VsockAddress,
    WaitResult,
)
from .process import NAMESPACES, ExitStatus, OutputStream, Process
from .protocol import MAX_FRAME, ProtocolError

__all__ = [
    "MAX_FRAME",
    "NAMESPACES",
    "AgentClient",
    "AgentInfo",
    "AgentRequestError",
    "AgentTimeoutError",
    "ExecResult",
    "ExitStatus",
    "HybridVsock",
    "OutputStream",
    "Process",
    "ProtocolError",
    "VsockAddress",
    "WaitResult",
]
