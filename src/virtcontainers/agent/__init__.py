"""Host side of the guest agent: connect over the agent socket, ping, exec, copy files,
wait for hotplugged hardware."""

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
from .protocol import MAX_FRAME, ProtocolError

__all__ = [
    "MAX_FRAME",
    "AgentClient",
    "AgentInfo",
    "AgentRequestError",
    "AgentTimeoutError",
    "ExecResult",
    "HybridVsock",
    "ProtocolError",
    "VsockAddress",
    "WaitResult",
]
