"""ttrpc message frames: a 10-byte header (data length, stream id, type, flags) and the data.

From containerd's ttrpc PROTOCOL.md: lengths and stream ids are big-endian uint32, the data is
at most 4 MiB, client streams have odd ids.
"""

from __future__ import annotations

import asyncio
import enum
import struct
from dataclasses import dataclass

HEADER_SIZE = 10
MAX_MESSAGE = 4 << 20
_HEADER = struct.Struct(">IIBB")


class MessageType(enum.IntEnum):
    REQUEST = 0x01
    RESPONSE = 0x02
    DATA = 0x03


class Flag(enum.IntFlag):
    """Request flags (REMOTE_CLOSED, REMOTE_OPEN) and data flags (REMOTE_CLOSED, NO_DATA)."""

    NONE = 0
    REMOTE_CLOSED = 0x01
    REMOTE_OPEN = 0x02
    NO_DATA = 0x04


@dataclass(frozen=True, slots=True)
class Header:
    length: int
    stream_id: int
    type: int
    flags: int = 0

    def pack(self) -> bytes:
        return _HEADER.pack(self.length, self.stream_id, self.type, self.flags)

    @classmethod
    def unpack(cls, data: bytes) -> Header:
        if len(data) != HEADER_SIZE:
            raise ValueError(f"ttrpc header is {HEADER_SIZE} bytes, got {len(data)}")
        return cls(*_HEADER.unpack(data))


def encode(stream_id: int, type_: int, data: bytes, flags: int = 0) -> bytes:
    """One frame: header + data. Refuses data over the 4 MiB limit (ValueError)."""
    if len(data) > MAX_MESSAGE:
        raise ValueError(f"ttrpc message of {len(data)} bytes exceeds the maximum {MAX_MESSAGE}")
    return Header(len(data), stream_id, type_, flags).pack() + data


class OversizedError(Exception):
    """A frame announced more than MAX_MESSAGE bytes; its data was read and discarded."""

    def __init__(self, header: Header) -> None:
        self.header = header
        super().__init__(
            f"message length {header.length} exceeds maximum message size of {MAX_MESSAGE}"
        )


async def read_frame(reader: asyncio.StreamReader) -> tuple[Header, bytes]:
    """The next frame. An oversized frame's data is skipped (the stream stays in sync) and
    OversizedError raised; a connection closed mid-frame raises asyncio.IncompleteReadError."""
    header = Header.unpack(await reader.readexactly(HEADER_SIZE))
    if header.length > MAX_MESSAGE:
        left = header.length
        while left:
            left -= len(await reader.readexactly(min(left, 1 << 16)))
        raise OversizedError(header)
    return header, await reader.readexactly(header.length)
