"""Frame and payload encoding of the guest agent protocol."""

from __future__ import annotations

import struct
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from virtcontainers.agent import protocol as p

frames_st = st.builds(
    p.Frame,
    type=st.integers(0, 255),
    id=st.integers(0, p.MAX_ID),
    payload=st.binary(max_size=300),
)


def test_header_layout_is_fixed() -> None:
    raw = p.encode_frame(p.MsgType.PING, 7, b"xyz")
    assert raw[:4] == b"VCAG"
    assert raw[4] == 1 and raw[5] == p.MsgType.PING
    assert struct.unpack_from("<II", raw, 8) == (7, 3)
    assert struct.unpack_from("<I", raw, 16)[0] == zlib.crc32(raw[:16])
    assert raw[20:] == b"xyz"


@given(st.lists(frames_st, max_size=8))
def test_round_trip_in_one_piece(frames: list[p.Frame]) -> None:
    assert p.FrameDecoder().feed(p.encode_frames(frames)) == frames


@given(st.lists(frames_st, max_size=6), st.data())
def test_round_trip_split_anywhere(frames: list[p.Frame], data: st.DataObject) -> None:
    raw = p.encode_frames(frames)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=10)))
    dec = p.FrameDecoder()
    out: list[p.Frame] = []
    prev = 0
    for cut in [*cuts, len(raw)]:
        out += dec.feed(raw[prev:cut])
        prev = cut
    assert out == frames
    assert dec.pending == 0 and dec.skipped == 0


@given(st.binary(max_size=2000))
@settings(max_examples=300)
def test_arbitrary_bytes_never_crash_the_decoder(junk: bytes) -> None:
    dec = p.FrameDecoder(max_frame=1 << 16)
    try:
        for frame in dec.feed(junk):
            assert isinstance(frame, p.Frame)
    except p.ProtocolError:
        pass


@given(st.binary(max_size=500), frames_st)
def test_resynchronises_after_garbage(junk: bytes, frame: p.Frame) -> None:
    # Garbage that itself decodes as frames is astronomically unlikely (magic + CRC32).
    dec = p.FrameDecoder()
    got = dec.feed(junk.replace(b"VCAG", b"VCAX") + p.encode_frames([frame]))
    assert got[-1:] == [frame]


def test_garbage_counted_and_magic_split_across_reads() -> None:
    raw = p.encode_frame(p.MsgType.PING, 1)
    dec = p.FrameDecoder()
    assert dec.feed(b"noise" + raw[:2]) == []
    assert dec.skipped == 5
    assert dec.feed(raw[2:]) == [p.Frame(p.MsgType.PING, 1, b"")]


def test_corrupt_header_crc_is_skipped() -> None:
    bad = bytearray(p.encode_frame(p.MsgType.EXEC, 3, b"payload"))
    bad[12] ^= 0xFF  # length field no longer matches the CRC
    good = p.encode_frame(p.MsgType.PING, 4)
    dec = p.FrameDecoder()
    assert dec.feed(bytes(bad) + good) == [p.Frame(p.MsgType.PING, 4, b"")]
    assert dec.skipped >= 20


def test_oversize_frame_is_a_protocol_error() -> None:
    head = struct.pack("<4sBBHII", b"VCAG", 1, 2, 0, 1, 1 << 30)
    raw = head + struct.pack("<I", zlib.crc32(head))
    with pytest.raises(p.ProtocolError, match="exceeds"):
        p.FrameDecoder(max_frame=1024).feed(raw)


def test_wrong_protocol_version_is_a_protocol_error() -> None:
    head = struct.pack("<4sBBHII", b"VCAG", 9, 2, 0, 1, 0)
    with pytest.raises(p.ProtocolError, match="version 9"):
        p.FrameDecoder().feed(head + struct.pack("<I", zlib.crc32(head)))


def test_encode_refuses_out_of_range_values() -> None:
    with pytest.raises(ValueError):
        p.encode_frame(256, 1)
    with pytest.raises(ValueError):
        p.encode_frame(1, -1)


@given(
    st.lists(
        st.tuples(
            st.integers(0, 0xFFFF),
            st.one_of(st.binary(max_size=64), st.integers(-(2**63), 2**63 - 1)),
        ),
        max_size=10,
    )
)
def test_fields_round_trip(items: list[tuple[int, bytes | int]]) -> None:
    f = p.Fields()
    for tag, value in items:
        f.add(tag, value)
    back = p.Fields.decode(f.encode())
    assert back.items == f.items
    for tag, value in items:
        if isinstance(value, int):
            assert any(v == struct.pack("<q", value) for v in back.all(tag))


@given(st.binary(max_size=200))
def test_fields_decode_arbitrary_bytes(junk: bytes) -> None:
    try:
        f = p.Fields.decode(junk)
    except p.ProtocolError:
        return
    assert f.encode() == junk


def test_fields_accessors() -> None:
    f = p.Fields().add(p.Tag.ARGV, "a").add(p.Tag.ARGV, "b").add(p.Tag.EXIT_CODE, -3)
    assert f.all(p.Tag.ARGV) == [b"a", b"b"]
    assert f.int_(p.Tag.EXIT_CODE) == -3
    assert f.int_(p.Tag.SIGNAL, 42) == 42
    assert f.str_(p.Tag.ARGV) == "a"
    assert f.bytes_(p.Tag.STDOUT) == b""
    with pytest.raises(p.ProtocolError, match="8-byte"):
        p.Fields().add(p.Tag.EXIT_CODE, b"abc").int_(p.Tag.EXIT_CODE)


BOMB = b"\x00" * (p.MAX_FRAME // 6 * 6)
"""A full-size payload of empty fields: 11 M of them if decoded naively."""


def test_a_payload_of_millions_of_empty_fields_is_refused_after_the_bound() -> None:
    fields = p.iter_fields(BOMB)
    taken = sum(1 for _ in zip(range(p.MAX_FIELDS), fields, strict=False))
    assert taken == p.MAX_FIELDS
    with pytest.raises(p.ProtocolError, match=f"more than {p.MAX_FIELDS} fields"):
        next(fields)  # the next one is refused: no more than the bound is ever built
    with pytest.raises(p.ProtocolError, match="more than 8 fields"):
        p.first_field(BOMB, p.Tag.MESSAGE, max_fields=8)
    with pytest.raises(p.ProtocolError, match="fields"):
        p.Fields.decode(BOMB)
    # Up to the bound is fine, and a value is found without building the rest.
    ok = b"\x00" * 6 * (p.MAX_FIELDS - 1) + p.Fields().add(p.Tag.MESSAGE, "hi").encode()
    assert len(p.Fields.decode(ok).items) == p.MAX_FIELDS
    assert p.first_field(ok, p.Tag.MESSAGE) == b"hi"
