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
from .endpoint import AGENT_PORT, AgentEndpoint, plug_agent_channel
from .process import NAMESPACES, ExitStatus, OutputStream, Process
from .protocol import MAX_FRAME, ProtocolError

__all__ = [
    "AGENT_PORT",
    "MAX_FRAME",
    "NAMESPACES",
    "AgentClient",
    "AgentEndpoint",
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
    "plug_agent_channel",
]
