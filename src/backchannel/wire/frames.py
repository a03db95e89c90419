"""A Frame's wire format by hand: reading what protobuf refuses to parse, and writing
frames from parts that are serialized already.

Reading: a Batch is split into its frames' bytes so that each is parsed on its own (one
frame the parser refuses, too deep say, costs only itself), and an unparseable frame is
searched for the id of the Call or Result it holds, so that call is answered, not lost.

Writing: a frame is sent as ``tag + length + the serialized message it wraps``, which is
exactly what protobuf would write for ``Frame(call=call)``; building that Frame instead
would copy the call, and protobuf copies a message by serializing and parsing it (about
60 ms per MB of map entries: the biggest cost of a bulk call). A Batch is put together
from its frames' bytes the same way.

A Multicast is written the same way: the Call serialized once, then its targets.

Only the envelope's own layout is used: Frame.call is field 3, Frame.result field 4,
Frame.batch field 8 holding Batch.frames, field 1, and Frame.multicast field 10 holding
Multicast.call, field 1; a Call or Result has its id in field 1 (a varint),
Result.value is field 2, and Call.one_way is field 9.
"""

from __future__ import annotations

from collections.abc import Iterator

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
_FRAME_CALL, _FRAME_RESULT, _FRAME_BATCH, _FRAME_MULTICAST = 3, 4, 8, 10
_BATCH_FRAMES = 1
_ID = 1
_RESULT_VALUE = 2
_CALL_ONE_WAY = 9

#: the tag of each length-delimited field this module writes
_FRAME_CALL_TAG = bytes([_FRAME_CALL << 3 | _LEN])
_FRAME_RESULT_TAG = bytes([_FRAME_RESULT << 3 | _LEN])
_FRAME_BATCH_TAG = bytes([_FRAME_BATCH << 3 | _LEN])
_BATCH_FRAMES_TAG = bytes([_BATCH_FRAMES << 3 | _LEN])
_ID_TAG = bytes([_ID << 3 | _VARINT])
_RESULT_VALUE_TAG = bytes([_RESULT_VALUE << 3 | _LEN])
_FRAME_MULTICAST_TAG = bytes([_FRAME_MULTICAST << 3 | _LEN])
_MULTICAST_CALL, _MULTICAST_TARGETS = 1, 2
_MULTICAST_CALL_TAG = bytes([_MULTICAST_CALL << 3 | _LEN])


class Malformed(Exception):
    """The bytes do not follow protobuf's wire format."""


def _varint(data: bytes, position: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if position >= len(data) or shift > 63:
            raise Malformed("truncated or overlong varint")
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, position


def fields(data: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """(field number, wire type, value) of each field, in order: ints for varints,
    bytes for the rest. Raises :class:`Malformed` where the bytes stop making sense."""
    position = 0
    while position < len(data):
        key, position = _varint(data, position)
        number, kind = key >> 3, key & 7
        if kind == _VARINT:
            value, position = _varint(data, position)
            yield number, kind, value
            continue
        if kind == _LEN:
            size, position = _varint(data, position)
        elif kind in (_I64, _I32):
            size = 8 if kind == _I64 else 4
        else:
            raise Malformed(f"wire type {kind}")
        if number == 0 or position + size > len(data):
            raise Malformed("truncated field")
        yield number, kind, data[position : position + size]
        position += size


def split_batch(data: bytes) -> list[bytes] | None:
    """The frames of a Frame that holds only a Batch, as bytes; None if it is anything else."""
    frames: list[bytes] = []
    try:
        for number, kind, body in fields(data):
            if number != _FRAME_BATCH or kind != _LEN:
                return None
            assert isinstance(body, bytes)
            for inner_number, inner_kind, frame in fields(body):
                if inner_number == _BATCH_FRAMES and inner_kind == _LEN:
                    assert isinstance(frame, bytes)
                    frames.append(frame)
    except Malformed:
        return None
    return frames or None


def find_ids(data: bytes) -> tuple[int, bool, int]:
    """(call id, one way, result id) of the Call or Result an unparseable frame holds, as
    far as its bytes can be read; zeros when it holds neither (or no id can be found)."""
    kind_field, body = 0, b""
    try:
        for number, kind, value in fields(data):
            if kind == _LEN and number in (_FRAME_CALL, _FRAME_RESULT):
                kind_field, body = number, value  # type: ignore[assignment]
            elif 1 <= number <= _FRAME_BATCH + 1:  # another kind of the oneof: the last wins
                kind_field, body = 0, b""
    except Malformed:
        pass
    if not kind_field:
        return 0, False, 0
    found, one_way = 0, False
    try:
        for number, kind, value in fields(body):
            if number == _ID and kind == _VARINT:
                found = value  # type: ignore[assignment]
            elif kind_field == _FRAME_CALL and number == _CALL_ONE_WAY and kind == _VARINT:
                one_way = bool(value)
    except Malformed:
        pass
    if kind_field == _FRAME_CALL:
        return found, one_way, 0
    return 0, False, found


def find_targets(data: bytes, most: int) -> tuple[tuple[int, ...], bool]:
    """(call ids of its first ``most`` targets, one way) of the Multicast an unparseable
    frame holds, as far as its bytes can be read; ((), False) when it holds none."""
    body = b""
    try:
        for number, kind, value in fields(data):
            if number == _FRAME_MULTICAST and kind == _LEN:
                body = value  # type: ignore[assignment]
            elif 1 <= number <= _FRAME_MULTICAST:  # another kind of the oneof: the last wins
                body = b""
    except Malformed:
        pass
    ids: list[int] = []
    one_way = False
    try:
        for number, kind, value in fields(body):
            if number == _MULTICAST_CALL and kind == _LEN:
                for inner, inner_kind, flag in fields(value):  # type: ignore[arg-type]
                    if inner == _CALL_ONE_WAY and inner_kind == _VARINT:
                        one_way = bool(flag)
            elif number == _MULTICAST_TARGETS and kind == _LEN and len(ids) < most:
                for inner, inner_kind, found in fields(value):  # type: ignore[arg-type]
                    if inner == _ID and inner_kind == _VARINT and found:
                        ids.append(found)  # type: ignore[arg-type]
                        break
    except Malformed:
        pass
    return tuple(ids), one_way


# ------------------------------------------------------------------- writing


#: the varints of 0 to 127, one byte each, made once (ids and lengths are often small)
_SMALL = [bytes((value,)) for value in range(0x80)]


def varint(value: int) -> bytes:
    """``value`` (>= 0) as a protobuf varint."""
    if value < 0x80:
        return _SMALL[value]
    if value < 0x4000:  # call ids and sizes: most are two or three bytes, made directly
        return bytes((value & 0x7F | 0x80, value >> 7))
    if value < 0x200000:
        return bytes((value & 0x7F | 0x80, value >> 7 & 0x7F | 0x80, value >> 14))
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def call_frame(call: bytes) -> bytes:
    """The Frame holding a serialized Call."""
    return _FRAME_CALL_TAG + varint(len(call)) + call


def result_frame(result: bytes) -> bytes:
    """The Frame holding a serialized Result."""
    return _FRAME_RESULT_TAG + varint(len(result)) + result


def value_result(call_id: int, value: bytes) -> bytes:
    """The serialized Result of call ``call_id`` whose outcome is a serialized Value."""
    return _ID_TAG + varint(call_id) + _RESULT_VALUE_TAG + varint(len(value)) + value


def batch_frame(frames: list[bytes]) -> bytes:
    """One Frame holding serialized frames as a Batch (a lone frame stays as it is)."""
    if len(frames) == 1:
        return frames[0]
    body = b"".join(_BATCH_FRAMES_TAG + varint(len(data)) + data for data in frames)
    return _FRAME_BATCH_TAG + varint(len(body)) + body


def multicast_frame(call: bytes, targets: bytes) -> bytes:
    """The Frame holding a Multicast of a serialized Call to targets serialized apart (a
    Multicast holding only its targets: protobuf merges the two)."""
    body = _MULTICAST_CALL_TAG + varint(len(call)) + call + targets
    return _FRAME_MULTICAST_TAG + varint(len(body)) + body
