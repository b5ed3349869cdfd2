"""ttrpc, containerd's lightweight RPC protocol (protobuf over framed Unix sockets), in asyncio."""

from __future__ import annotations

from .client import Client, ClientStream
from .framing import MAX_MESSAGE, Flag, Header, MessageType
from .server import CallContext, Server, ServerStream, Service
from .status import Code, ConnectionClosedError, TtrpcError

__all__ = [
    "MAX_MESSAGE",
    "CallContext",
    "Client",
    "ClientStream",
    "Code",
    "ConnectionClosedError",
    "Flag",
    "Header",
    "MessageType",
    "Server",
    "ServerStream",
    "Service",
    "TtrpcError",
]
