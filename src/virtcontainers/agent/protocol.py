"""The guest agent wire format: framed, binary-safe TLV messages (see PROTOCOL.md).

Pure encoding and decoding, no I/O, so it can be tested exhaustively and shared by
the client and by test doubles of the agent.
"""

from __future__ import annotations

import enum
import struct
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from ..errors import AgentError

MAGIC = b"VCAG"
PROTO_VERSION = 1
HEADER = struct.Struct("<4sBBHIII")
HEADER_LEN = HEADER.size  # 20
MAX_FRAME = 64 << 20
"""Largest payload either side sends or accepts (the agent's limit too)."""
MAX_ID = 0xFFFFFFFF
MAX_FIELDS = 65536
"""Most fields one payload may carry; a payload with more is refused, so decoding work and
memory stay bounded whatever the peer sends (64 MiB of empty fields would be 11 M)."""


class ProtocolError(AgentError):
    """The byte stream from the agent cannot be decoded (corrupt, oversize or unexpected)."""


class MsgType(enum.IntEnum):
    """Frame types. A reply carries `request | REPLY`; an error reply is `ERROR`."""

    HELLO = 0x01
    PING = 0x02
    EXEC = 0x03
    READ_FILE = 0x04
    WRITE_FILE = 0x05
    SET_TIME = 0x06
    ADD_ENTROPY = 0x07
    CANCEL = 0x08
    ONLINE = 0x09
    WAIT = 0x0A
    START = 0x0B
    STDIN = 0x0C
    SIGNAL = 0x0D
    RESIZE = 0x0E
    ATTACH = 0x0F
    OUTPUT = 0x10
    """Notification (id 0): a chunk of a started process's stdout or stderr."""
    EXITED = 0x11
    """Notification (id 0): a started process ended (after its last OUTPUT)."""
    NETWORK = 0x12
    ERROR = 0xFF


REPLY = 0x80


class Tag(enum.IntEnum):
    """Field tags inside a payload (each field: u16 tag, u32 length, value)."""

    NONCE = 0x01
    VERSION = 0x02
    PROTO = 0x03
    MAX_FRAME = 0x04
    ARGV = 0x10
    ENV = 0x11
    CWD = 0x12
    STDIN = 0x13
    TIMEOUT_MS = 0x14
    MAX_OUTPUT = 0x15
    UID = 0x16
    GID = 0x17
    GROUPS = 0x18
    ROOT = 0x19
    TTY = 0x1A
    ROWS = 0x1B
    COLS = 0x1C
    DETACH = 0x1D
    NAMESPACES = 0x1E
    HOSTNAME = 0x1F
    EXIT_CODE = 0x20
    SIGNAL = 0x21
    TIMED_OUT = 0x22
    STDOUT = 0x23
    STDERR = 0x24
    TRUNCATED = 0x25
    PROC = 0x26
    PID = 0x27
    STREAM = 0x28
    CLOSE = 0x29
    EXITED = 0x2A
    DROPPED = 0x2B
    OUT_FROM = 0x2C
    ERR_FROM = 0x2D
    PATH = 0x30
    DATA = 0x31
    MODE = 0x32
    FLAGS = 0x33
    SEC = 0x40
    NSEC = 0x41
    TARGET = 0x50
    FOUND = 0x51
    CPUS = 0x60
    MEM_BLOCKS = 0x61
    UPTIME_NS = 0x70
    RUNNING = 0x71
    SERIAL = 0x90
    WANT_CPUS = 0x91
    MEMORY = 0x92
    DEVICE = 0x93
    CPUS_ONLINE = 0x94
    LINK = 0xA0
    MAC = 0xA1
    MTU = 0xA2
    ADDRESS = 0xA3
    ROUTE = 0xA4
    DEST = 0xA5
    GATEWAY = 0xA6
    FAMILY = 0xA7
    NEIGH = 0xA8
    LLADDR = 0xA9
    HOSTS = 0xAA
    RESOLV = 0xAB
    ERRNO = 0x80
    MESSAGE = 0x81


WRITE_MKDIRS = 1
ATTACH_KEEP = 1
"""ATTACH flag: an exited detached process stays kept after this attach saw its exit."""
ONLINE_CPUS = 1
ONLINE_MEMORY = 2
TRUNC_STDOUT = 1
TRUNC_STDERR = 2
MAX_WAIT_MS = 600_000
"""Longest WAIT the agent accepts (its `timeout_ms` is 1..this)."""
MAX_SERIAL = 255
"""Longest block-device serial a WAIT may name, in bytes."""
MAX_WANT_CPUS = 8192
MAX_NET_LINKS = 32
"""Most links one NETWORK request configures."""
MAX_NET_ITEMS = 1024
"""Most addresses (all links together), routes and neighbours, each, in one NETWORK request."""
MAX_NET_FILE = 1 << 20
"""Largest /etc/hosts or /etc/resolv.conf a NETWORK request carries, in bytes."""
STDOUT = 1
STDERR = 2
NOTICE_FIELDS = 8
"""Most fields an id-0 frame (notice, OUTPUT, EXITED) is decoded with, in the reader task."""

_FIELD = struct.Struct("<HI")
_INT = struct.Struct("<q")


@dataclass(frozen=True)
class Frame:
    """One decoded frame: type byte, request id and raw payload."""

    type: int
    id: int
    payload: bytes = b""


@dataclass
class Fields:
    """A decoded payload: every value of every tag, in order (tags may repeat)."""

    items: list[tuple[int, bytes]] = field(default_factory=list)

    def add(self, tag: int, value: bytes | str | int) -> Fields:
        """Append a field; str is UTF-8 encoded, int becomes an 8-byte signed integer."""
        if isinstance(value, bool | int):
            data = _INT.pack(int(value))
        elif isinstance(value, str):
            data = value.encode()
        else:
            data = bytes(value)
        self.items.append((tag, data))
        return self

    def all(self, tag: int) -> list[bytes]:
        """Every value carried under `tag`."""
        return [v for t, v in self.items if t == tag]

    def get(self, tag: int, default: bytes | None = None) -> bytes | None:
        """The first value under `tag`, or `default`."""
        for t, v in self.items:
            if t == tag:
                return v
        return default

    def bytes_(self, tag: int) -> bytes:
        """The first value under `tag`, empty when absent."""
        return self.get(tag, b"") or b""

    def str_(self, tag: int) -> str:
        """The first value under `tag` decoded as UTF-8 (invalid bytes replaced)."""
        return self.bytes_(tag).decode(errors="replace")

    def int_(self, tag: int, default: int = 0) -> int:
        """The first value under `tag` as an 8-byte signed integer."""
        raw = self.get(tag)
        if raw is None:
            return default
        if len(raw) != _INT.size:
            raise ProtocolError(f"field 0x{tag:02x} should be an 8-byte integer, got {len(raw)}")
        value: int = _INT.unpack(raw)[0]
        return value

    def encode(self) -> bytes:
        """The payload bytes."""
        return b"".join(_FIELD.pack(t, len(v)) + v for t, v in self.items)

    @classmethod
    def decode(cls, payload: bytes, *, max_fields: int = MAX_FIELDS) -> Fields:
        """Parse a payload; `ProtocolError` when a field runs past the end or the payload holds
        more than `max_fields` fields (refused before more than that are built)."""
        return cls(list(iter_fields(payload, max_fields=max_fields)))


def iter_fields(payload: bytes, *, max_fields: int = MAX_FIELDS) -> Iterator[tuple[int, bytes]]:
    """The (tag, value) fields of a payload one at a time, in order; `ProtocolError` on a field
    running past the end or on field number `max_fields` + 1."""
    view = memoryview(payload)
    pos, n, count = 0, len(payload), 0
    while pos < n:
        if count == max_fields:
            raise ProtocolError(f"payload holds more than {max_fields} fields")
        count += 1
        if n - pos < _FIELD.size:
            raise ProtocolError(f"truncated field header at offset {pos}")
        tag, length = _FIELD.unpack_from(payload, pos)
        pos += _FIELD.size
        if length > n - pos:
            raise ProtocolError(f"field 0x{tag:02x} of {length} bytes runs past the payload")
        yield tag, bytes(view[pos : pos + length])
        pos += length


def first_field(payload: bytes, tag: int, *, max_fields: int = MAX_FIELDS) -> bytes | None:
    """The first value under `tag`, scanning without building the other fields (None if
    absent; `ProtocolError` as `iter_fields`)."""
    for t, value in iter_fields(payload, max_fields=max_fields):
        if t == tag:
            return value
    return None


def fields(*pairs: tuple[int, bytes | str | int]) -> Fields:
    """Build `Fields` from (tag, value) pairs."""
    out = Fields()
    for tag, value in pairs:
        out.add(tag, value)
    return out


def encode_frame(type_: int, id_: int, payload: bytes = b"") -> bytes:
    """Header (with its CRC) followed by the payload."""
    if not 0 <= type_ <= 0xFF:
        raise ValueError(f"frame type {type_} out of range")
    if not 0 <= id_ <= MAX_ID:
        raise ValueError(f"request id {id_} out of range")
    if len(payload) > MAX_FRAME:
        raise ProtocolError(f"payload of {len(payload)} bytes exceeds the {MAX_FRAME}-byte limit")
    head = HEADER.pack(MAGIC, PROTO_VERSION, type_, 0, id_, len(payload), 0)[:16]
    return head + struct.pack("<I", zlib.crc32(head)) + payload


class FrameDecoder:
    """Incremental decoder: feed bytes, get whole frames.

    Bytes that do not start a valid header (magic + header CRC) are skipped one at a
    time until a valid header appears, so the stream resynchronises after garbage;
    `skipped` counts them. A valid header announcing more than `max_frame` bytes
    raises `ProtocolError`: the peer is not speaking this protocol.
    """

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self.max_frame = max_frame
        self.skipped = 0
        self._buf = bytearray()

    @property
    def pending(self) -> int:
        """Bytes buffered towards the next frame."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[Frame]:
        """Add bytes; return the frames completed by them."""
        self._buf += data
        return list(self._drain())

    def _drain(self) -> Iterator[Frame]:
        buf = self._buf
        while True:
            start = buf.find(MAGIC)
            if start < 0:
                # Keep a tail that may be the start of a magic split across reads.
                keep = next((k for k in (3, 2, 1) if buf.endswith(MAGIC[:k])), 0)
                self.skipped += len(buf) - keep
                del buf[: len(buf) - keep]
                return
            if start:
                self.skipped += start
                del buf[:start]
            if len(buf) < HEADER_LEN:
                return
            _, version, type_, _, id_, length, crc = HEADER.unpack_from(buf)
            if zlib.crc32(bytes(buf[:16])) != crc:
                self.skipped += 1
                del buf[:1]
                continue
            if version != PROTO_VERSION:
                raise ProtocolError(f"peer speaks protocol version {version}, not {PROTO_VERSION}")
            if length > self.max_frame:
                raise ProtocolError(
                    f"frame of {length} bytes exceeds the {self.max_frame}-byte limit"
                )
            if len(buf) < HEADER_LEN + length:
                return
            payload = bytes(buf[HEADER_LEN : HEADER_LEN + length])
            del buf[: HEADER_LEN + length]
            yield Frame(type_, id_, payload)


def encode_frames(frames: Iterable[Frame]) -> bytes:
    """Concatenate encoded frames (handy in tests and fakes)."""
    return b"".join(encode_frame(f.type, f.id, f.payload) for f in frames)
