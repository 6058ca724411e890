"""A minimal protobuf wire-format decoder for the few messages of a TF checkpoint.

Decodes ``BundleHeaderProto`` and ``BundleEntryProto``
(tensorflow/core/protobuf/tensor_bundle.proto) and ``TrackableObjectGraph``
(tensorflow/core/protobuf/trackable_object_graph.proto) without the protobuf
runtime or TensorFlow. Field numbers were checked against the descriptors that
ship in the TensorFlow 2.21 wheel. Unknown fields are skipped; any malformed
input raises :class:`DecodeError`, never ``IndexError`` or similar.

Two decoders read each message: a general one (``iter_fields`` and the
``_parse_*`` functions), which is the reference and says precisely what is wrong
with bad bytes, and a fast one for the layout TensorFlow writes (fields in order,
each once, short varints), about seven times quicker at 10,000 variables. The fast
one gives up (returns ``None``) on anything else, and the general one decodes
that message again: both give the same result on any input, and every error
comes from the reference.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple, cast

__all__ = [
    "BundleEntryProto",
    "BundleHeader",
    "DecodeError",
    "ObjectNode",
    "ObjectReference",
    "SerializedTensor",
    "SlotVariableReference",
    "decode_varint",
    "fast_bundle_entries",
    "iter_fields",
    "parse_bundle_entry",
    "parse_bundle_header",
    "parse_object_graph",
]

VARINT = 0
FIXED64 = 1
LENGTH_DELIMITED = 2
START_GROUP = 3
END_GROUP = 4
FIXED32 = 5

_MAX_VARINT_BYTES = 10
_U64 = (1 << 64) - 1
_INT64_SIGN = 1 << 63

FieldValue = int | bytes
"""An ``int`` for varint and fixed fields, ``bytes`` for length-delimited ones."""


class DecodeError(ValueError):
    """Bytes that are not a well-formed encoding of the expected message."""


def decode_varint(buf: bytes | bytearray, pos: int, end: int | None = None) -> tuple[int, int]:
    """Decodes one base-128 varint as an unsigned 64-bit integer.

    Args:
        buf: the encoded bytes.
        pos: index of the varint's first byte.
        end: index the varint must end before; ``len(buf)`` if None.

    Returns:
        ``(value, position after the varint)``.

    Raises:
        DecodeError: the varint is cut off by ``end`` or longer than 10 bytes.
    """
    limit = len(buf) if end is None else min(end, len(buf))
    result = 0
    shift = 0
    for i in range(pos, min(limit, pos + _MAX_VARINT_BYTES)):
        byte = buf[i]
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result & _U64, i + 1
        shift += 7
    if limit - pos >= _MAX_VARINT_BYTES:
        raise DecodeError(f"varint at byte {pos} is longer than {_MAX_VARINT_BYTES} bytes")
    raise DecodeError(f"varint at byte {pos} is cut off at byte {limit}")


def _signed64(value: int) -> int:
    """Reinterprets an unsigned 64-bit varint as two's complement (int32/int64/enum)."""
    return value - (1 << 64) if value & _INT64_SIGN else value


def _take(buf: bytes, pos: int, size: int, what: str) -> tuple[bytes, int]:
    """Returns ``buf[pos:pos+size]`` and the position after it, or raises if short."""
    end = pos + size
    if end > len(buf):
        raise DecodeError(f"{what} at byte {pos} needs {size} bytes, only {len(buf) - pos} left")
    return buf[pos:end], end


def _read_value(buf: bytes, pos: int, number: int, wire_type: int) -> tuple[FieldValue, int]:
    """Reads the value of a non-group field whose tag ends before ``pos``.

    Returns:
        ``(value, position after the value)``.
    """
    if wire_type == VARINT:
        return decode_varint(buf, pos)
    if wire_type in (FIXED64, FIXED32):
        raw, pos = _take(buf, pos, 8 if wire_type == FIXED64 else 4, f"fixed field {number}")
        return int.from_bytes(raw, "little"), pos
    if wire_type == LENGTH_DELIMITED:
        size, pos = decode_varint(buf, pos)
        return _take(buf, pos, size, f"length-delimited field {number}")
    raise DecodeError(f"field {number} has invalid wire type {wire_type}")


def _read_tag(buf: bytes, pos: int) -> tuple[int, int, int]:
    """Reads a field tag.

    Returns:
        ``(field number, wire type, position after the tag)``.
    """
    tag, after = decode_varint(buf, pos)
    if tag >> 3 == 0:
        raise DecodeError(f"field number 0 in tag at byte {pos}")
    return tag >> 3, tag & 7, after


def _skip_group(buf: bytes, pos: int, number: int) -> int:
    """Skips a (deprecated) group, nested groups included, without recursion.

    Args:
        buf: the encoded message.
        pos: position right after the group's START_GROUP tag.
        number: the group's field number.

    Returns:
        The position after the matching END_GROUP tag.
    """
    open_groups = [number]
    while open_groups:
        if pos >= len(buf):
            raise DecodeError(f"group {open_groups[-1]} has no end tag")
        field, wire_type, pos = _read_tag(buf, pos)
        if wire_type == START_GROUP:
            open_groups.append(field)
        elif wire_type == END_GROUP:
            if field != open_groups.pop():
                raise DecodeError(f"group closed by the end tag of field {field}")
        else:
            pos = _read_value(buf, pos, field, wire_type)[1]
    return pos


def iter_fields(buf: bytes) -> Iterator[tuple[int, int, FieldValue]]:
    """Iterates over the fields of one serialized message, skipping groups.

    Args:
        buf: the serialized message.

    Yields:
        ``(field number, wire type, value)`` in wire order; ``value`` is an
        unsigned ``int`` for varint and fixed fields, ``bytes`` otherwise.

    Raises:
        DecodeError: the bytes are not a well-formed message.
    """
    pos = 0
    while pos < len(buf):
        number, wire_type, pos = _read_tag(buf, pos)
        if wire_type == START_GROUP:
            pos = _skip_group(buf, pos, number)
        elif wire_type == END_GROUP:
            raise DecodeError(f"unmatched end-group tag of field {number}")
        else:
            value, pos = _read_value(buf, pos, number, wire_type)
            yield number, wire_type, value


def _expect(number: int, wire_type: int, expected: int) -> None:
    """Raises unless a known field arrived with the wire type its type implies."""
    if wire_type != expected:
        raise DecodeError(f"field {number} has wire type {wire_type}, expected {expected}")


def _int(number: int, wire_type: int, value: FieldValue) -> int:
    """Decodes an int32/int64/enum field (two's complement)."""
    _expect(number, wire_type, VARINT)
    return _signed64(cast(int, value))


def _bytes(number: int, wire_type: int, value: FieldValue) -> bytes:
    """Decodes a bytes or sub-message field."""
    _expect(number, wire_type, LENGTH_DELIMITED)
    return cast(bytes, value)


def _str(number: int, wire_type: int, value: FieldValue) -> str:
    """Decodes a string field; bytes that are not UTF-8 become ``\\xNN`` escapes.

    TensorFlow writes names and keys as bytes; a checkpoint key is shown the way
    :class:`regraft.sources._bundle.Bundle` shows the index's keys, so the two match.
    """
    return _text(_bytes(number, wire_type, value))


def _text(raw: bytes) -> str:
    """UTF-8 text of ``raw``, with ``\\xNN`` escapes for bytes that are not UTF-8."""
    return raw.decode("utf-8", "backslashreplace")


class BundleHeader(NamedTuple):
    """The ``BundleHeaderProto`` stored under the empty key of a bundle index.

    Attributes:
        num_shards: number of ``.data-?????-of-?????`` files.
        endianness: 0 for little-endian, 1 for big-endian data.
        version_producer: ``version.producer`` (the bundle format version).
    """

    num_shards: int
    endianness: int
    version_producer: int


def _parse_version_producer(buf: bytes, producer: int) -> int:
    """Returns ``VersionDef.producer`` (field 1), else ``producer`` if absent."""
    for number, wire_type, value in iter_fields(buf):
        if number == 1:
            producer = _int(number, wire_type, value)
    return producer


def parse_bundle_header(buf: bytes) -> BundleHeader:
    """Parses a serialized ``tensorflow.BundleHeaderProto``.

    Args:
        buf: the serialized message.

    Returns:
        The header; absent fields take their proto3 default 0.

    Raises:
        DecodeError: the bytes are not a well-formed message.
    """
    num_shards = endianness = producer = 0
    for number, wire_type, value in iter_fields(buf):
        if number == 1:
            num_shards = _int(number, wire_type, value)
        elif number == 2:
            endianness = _int(number, wire_type, value)
        elif number == 3:
            producer = _parse_version_producer(_bytes(number, wire_type, value), producer)
    return BundleHeader(num_shards=num_shards, endianness=endianness, version_producer=producer)


class BundleEntryProto(NamedTuple):
    """The fields of a ``tensorflow.BundleEntryProto`` (one tensor's index entry).

    Attributes:
        dtype: ``tensorflow.DataType`` enum value (1 = DT_FLOAT, ...).
        shape: dimension sizes; ``()`` for a scalar.
        unknown_rank: ``TensorShapeProto.unknown_rank``.
        shard_id: which data file holds the bytes.
        offset: byte offset of the tensor in that file.
        size: number of bytes of the tensor.
        crc32c: masked CRC-32C of the tensor's bytes.
        num_slices: number of ``TensorSliceProto`` slices (partitioned variable).
    """

    dtype: int
    shape: tuple[int, ...]
    unknown_rank: bool
    shard_id: int
    offset: int
    size: int
    crc32c: int
    num_slices: int


def _parse_dim_size(buf: bytes) -> int:
    """Returns ``TensorShapeProto.Dim.size`` (field 1)."""
    size = 0
    for number, wire_type, value in iter_fields(buf):
        if number == 1:
            size = _int(number, wire_type, value)
    return size


def _parse_shape(buf: bytes) -> tuple[list[int], bool]:
    """Parses a ``TensorShapeProto`` into ``(dim sizes, unknown_rank)``."""
    dims: list[int] = []
    unknown_rank = False
    for number, wire_type, value in iter_fields(buf):
        if number == 2:
            dims.append(_parse_dim_size(_bytes(number, wire_type, value)))
        elif number == 3:
            unknown_rank = _int(number, wire_type, value) != 0
    return dims, unknown_rank


def parse_bundle_entry(buf: bytes) -> BundleEntryProto:
    """Parses a serialized ``tensorflow.BundleEntryProto``.

    Args:
        buf: the serialized message.

    Returns:
        The entry; absent fields take their proto3 default 0 / empty.

    Raises:
        DecodeError: the bytes are not a well-formed message.
    """
    found = fast_bundle_entries([buf])[0]
    if found is not None:
        return found
    dtype = shard_id = offset = size = crc = num_slices = 0
    dims: list[int] = []
    unknown_rank = False
    for number, wire_type, value in iter_fields(buf):
        if number == 1:
            dtype = _int(number, wire_type, value)
        elif number == 2:
            more_dims, unknown_rank = _parse_shape(_bytes(number, wire_type, value))
            dims.extend(more_dims)
        elif number == 3:
            shard_id = _int(number, wire_type, value)
        elif number == 4:
            offset = _int(number, wire_type, value)
        elif number == 5:
            size = _int(number, wire_type, value)
        elif number == 6:
            _expect(number, wire_type, FIXED32)
            crc = cast(int, value)
        elif number == 7:
            _bytes(number, wire_type, value)
            num_slices += 1
    return BundleEntryProto(
        dtype=dtype,
        shape=tuple(dims),
        unknown_rank=unknown_rank,
        shard_id=shard_id,
        offset=offset,
        size=size,
        crc32c=crc,
        num_slices=num_slices,
    )


class ObjectReference(NamedTuple):
    """``TrackableObject.ObjectReference``: an edge to a child object.

    Attributes:
        node_id: index of the child in the graph's node list.
        local_name: the attribute name of the child in its parent.
    """

    node_id: int
    local_name: str


class SerializedTensor(NamedTuple):
    """``TrackableObject.SerializedTensor``: a tensor saved for an object.

    Attributes:
        name: attribute name, e.g. ``"VARIABLE_VALUE"``.
        full_name: the variable's graph name when saved, e.g. ``"dense/kernel"``.
        checkpoint_key: the bundle key holding the tensor.
    """

    name: str
    full_name: str
    checkpoint_key: str


class SlotVariableReference(NamedTuple):
    """``TrackableObject.SlotVariableReference``: an optimizer slot of a variable.

    Attributes:
        original_variable_node_id: node id of the variable the slot belongs to.
        slot_name: slot name, e.g. ``"m"`` or ``"momentum"``.
        slot_variable_node_id: node id of the slot variable itself.
    """

    original_variable_node_id: int
    slot_name: str
    slot_variable_node_id: int


class ObjectNode(NamedTuple):
    """One ``TrackableObjectGraph.TrackableObject``.

    Attributes:
        children: named edges to child nodes.
        attributes: tensors saved for this object.
        slot_variables: optimizer slots owned by this (optimizer) object.
    """

    children: tuple[ObjectReference, ...]
    attributes: tuple[SerializedTensor, ...]
    slot_variables: tuple[SlotVariableReference, ...]


def _parse_object_reference(buf: bytes) -> ObjectReference:
    """Parses ``ObjectReference`` {1 node_id, 2 local_name}."""
    node_id, local_name = 0, ""
    for number, wire_type, value in iter_fields(buf):
        if number == 1:
            node_id = _int(number, wire_type, value)
        elif number == 2:
            local_name = _str(number, wire_type, value)
    return ObjectReference(node_id=node_id, local_name=local_name)


def _parse_serialized_tensor(buf: bytes) -> SerializedTensor:
    """Parses ``SerializedTensor`` {1 name, 2 full_name, 3 checkpoint_key}."""
    strings = {1: "", 2: "", 3: ""}
    for number, wire_type, value in iter_fields(buf):
        if number in strings:
            strings[number] = _str(number, wire_type, value)
    return SerializedTensor(name=strings[1], full_name=strings[2], checkpoint_key=strings[3])


def _parse_slot_variable(buf: bytes) -> SlotVariableReference:
    """Parses ``SlotVariableReference`` {1 original id, 2 slot_name, 3 slot id}."""
    original_id, slot_name, slot_id = 0, "", 0
    for number, wire_type, value in iter_fields(buf):
        if number == 1:
            original_id = _int(number, wire_type, value)
        elif number == 2:
            slot_name = _str(number, wire_type, value)
        elif number == 3:
            slot_id = _int(number, wire_type, value)
    return SlotVariableReference(
        original_variable_node_id=original_id, slot_name=slot_name, slot_variable_node_id=slot_id
    )


def _parse_trackable_object(buf: bytes) -> ObjectNode:
    """Parses one ``TrackableObject``; fields 4 and up are skipped."""
    children: list[ObjectReference] = []
    attributes: list[SerializedTensor] = []
    slots: list[SlotVariableReference] = []
    for number, wire_type, value in iter_fields(buf):
        if number == 1:
            children.append(_parse_object_reference(_bytes(number, wire_type, value)))
        elif number == 2:
            attributes.append(_parse_serialized_tensor(_bytes(number, wire_type, value)))
        elif number == 3:
            slots.append(_parse_slot_variable(_bytes(number, wire_type, value)))
    return ObjectNode(children=tuple(children), attributes=tuple(attributes), slot_variables=tuple(slots))


def parse_object_graph(buf: bytes) -> list[ObjectNode]:
    """Parses a serialized ``tensorflow.TrackableObjectGraph``.

    Args:
        buf: the serialized message (the ``_CHECKPOINTABLE_OBJECT_GRAPH`` tensor).

    Returns:
        The nodes in order; node 0 is the root object that was saved.

    Raises:
        DecodeError: the bytes are not a well-formed message.
    """
    fast = _compiled_classes().get("Graph")
    if fast is not None:
        found = fast(buf)
        if found is not None:
            return found
    return [
        _parse_trackable_object(_bytes(number, wire_type, value))
        for number, wire_type, value in iter_fields(buf)
        if number == 1
    ]




# --- the fast decoders: TensorFlow's layout only, None for anything else ----------------------


_new_tuple = tuple.__new__  # a NamedTuple from a tuple of its fields, without its Python-level __new__ (2x quicker)


def _compiled_classes() -> dict[str, Callable[[bytes], Any]]:
    """The fast decoders by message, ``Graph`` and ``Entry``; a test replaces this with ``{}`` to compare.

    (Named for the compiled protobuf classes these once were: the protobuf runtime
    cost ~25 ms to import and as long to turn its messages into Python objects,
    more than the fast decoders take for the whole graph.)
    """
    return _FAST


def _short_varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    """``(value, position after)`` of a varint below 2**63 ending by ``end``; ``(-1, pos)`` otherwise.

    Values of 2**63 and above are negative int32/int64 values: the fast decoders
    leave them (and everything cut off) to the reference decoder.
    """
    result = shift = 0
    while pos < end and shift < 63:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return (result, pos) if result < _INT64_SIGN else (-1, pos)
        shift += 7
    return -1, pos


def _skip_field(buf: bytes, pos: int, end: int, tag: int) -> int:
    """The position after an unknown field's value (its one-byte tag ends before ``pos``), or -1."""
    wire_type = tag & 7
    if wire_type == VARINT:
        value, pos = _short_varint(buf, pos, end)
        return pos if value >= 0 else -1
    if wire_type == LENGTH_DELIMITED:
        size, pos = _short_varint(buf, pos, end)
        return pos + size if 0 <= size <= end - pos else -1
    if wire_type in (FIXED64, FIXED32):
        pos += 8 if wire_type == FIXED64 else 4
        return pos if pos <= end else -1
    return -1  # groups, and wire types 6 and 7


_ENTRY_VARINT_FIELDS = {0x08: 0, 0x18: 3, 0x20: 4, 0x28: 5}  # tag -> position in BundleEntryProto
# What follows the shape in almost every entry: shard_id, offset, size (each absent when 0, as
# proto3 writes them), then crc32c. Varints of at most 9 bytes are below 2**63.
_ENTRY_TAIL = re.compile(
    rb"(?:\x18([\x01-\x7f]))?(?:\x20([\x80-\xff]{0,8}[\x00-\x7f]))?(?:\x28([\x80-\xff]{0,8}[\x00-\x7f]))?\x35(....)",
    re.DOTALL,
)
_ENTRY_HEADS: dict[bytes, tuple[int, tuple[int, ...], bool]] = {}  # dtype and shape bytes -> their values


def fast_bundle_entries(values: list[bytes]) -> list[BundleEntryProto | None]:
    """Many ``BundleEntryProto``s at once by the fast decoders; ``None`` where :func:`parse_bundle_entry` must judge.

    The commonest entry is a one-byte dtype, a shape, then what :data:`_ENTRY_TAIL`
    matches. The 10,000 entries of a model share a few dtype-and-shape prefixes:
    each is decoded once (by :func:`_fast_bundle_entry`) and looked up after that.
    """
    one_entry = _compiled_classes().get("Entry")
    if one_entry is None:
        return [None] * len(values)
    heads, tail_match, out = _ENTRY_HEADS, _ENTRY_TAIL.fullmatch, []
    for buf in values:
        found = None
        if len(buf) >= 4 and buf[0] == 0x08 and buf[1] < 0x80 and buf[2] == 0x12 and buf[3] < 0x80:
            split = 4 + buf[3]  # {1: dtype} {2: shape} end here
            tail = tail_match(buf, split) if split <= len(buf) else None
            if tail is not None:
                head = buf[:split]
                known = heads.get(head)
                if known is None:
                    decoded = one_entry(head)
                    known = decoded[:3] if decoded is not None else None
                    if known is not None and len(heads) < 4096:
                        heads[head] = known
                if known is not None:
                    shard, offset, size, crc = tail.groups()
                    found = _new_tuple(BundleEntryProto, (
                        known[0], known[1], known[2], shard[0] if shard else 0,
                        (offset[0] if len(offset) == 1 else _varint_bytes(offset)) if offset else 0,
                        (size[0] if len(size) == 1 else _varint_bytes(size)) if size else 0,
                        int.from_bytes(crc, "little"), 0,
                    ))
        out.append(found or one_entry(buf))
    return out


def _varint_bytes(raw: bytes) -> int:
    """The value of one complete varint (``raw`` is exactly its bytes)."""
    if len(raw) == 1:
        return raw[0]
    value = 0
    for i, byte in enumerate(raw):
        value |= (byte & 0x7F) << (7 * i)
    return value


def _fast_bundle_entry(buf: bytes) -> BundleEntryProto | None:
    """A ``BundleEntryProto`` as TensorFlow writes it, or ``None`` for the reference decoder.

    Takes each field at most once, varints that are not negative, a shape of
    ``dim { size }`` items and an optional ``unknown_rank``, and no unknown field.
    """
    n = len(buf)
    fields = [0, (), False, 0, 0, 0, 0, 0]  # dtype, shape, unknown_rank, shard, offset, size, crc, slices
    seen: set[int] = set()
    pos = 0
    while pos < n:
        tag = buf[pos]
        pos += 1
        if tag == 0x3A:  # a slice of a partitioned variable: counted
            size, pos = _short_varint(buf, pos, n)
            pos += size
            if size < 0 or pos > n:
                return None
            fields[7] += 1
            continue
        if tag in seen:
            return None
        seen.add(tag)
        if tag == 0x35:  # crc32c, fixed32
            if pos + 4 > n:
                return None
            fields[6] = int.from_bytes(buf[pos : pos + 4], "little")
            pos += 4
        elif tag == 0x12:  # shape
            size, pos = _short_varint(buf, pos, n)
            end = pos + size
            if size < 0 or end > n:
                return None
            dims = []
            while pos < end:
                if buf[pos] == 0x12 and pos + 1 < end:  # dim { size }
                    dim_end = pos + 2 + buf[pos + 1]
                    if buf[pos + 1] == 0:
                        dims.append(0)
                    elif buf[pos + 1] >= 0x80 or dim_end > end or buf[pos + 2] != 0x08:
                        return None
                    else:
                        value, after = _short_varint(buf, pos + 3, dim_end)
                        if value < 0 or after != dim_end:
                            return None
                        dims.append(value)
                    pos = dim_end
                elif buf[pos] == 0x18 and pos + 2 == end and buf[pos + 1] < 2:  # unknown_rank, last
                    fields[2] = buf[pos + 1] == 1
                    pos = end
                else:
                    return None
            fields[1] = tuple(dims)
        else:
            index = _ENTRY_VARINT_FIELDS.get(tag)
            if index is None:
                return None
            value, pos = _short_varint(buf, pos, n)
            if value < 0:
                return None
            fields[index] = value
    return BundleEntryProto._make(fields)


def _fast_object_graph(buf: bytes) -> list[ObjectNode] | None:
    """A ``TrackableObjectGraph`` as TensorFlow writes it, or ``None`` for the reference decoder.

    Nodes are read field by field; a child, tensor or slot must hold its known
    fields in order, each once. Unknown fields of a node are skipped, as the
    reference does; anything else odd is the reference decoder's to judge.
    """
    n = len(buf)
    nodes: list[ObjectNode] = []
    pos = 0
    while pos < n:
        if buf[pos] != 0x0A:
            return None
        if pos + 2 < n and buf[pos + 1] >= 0x80 and buf[pos + 2] < 0x80:  # most nodes: 128 bytes to 16 KB
            size, pos = (buf[pos + 1] & 0x7F) | (buf[pos + 2] << 7), pos + 3
        else:
            size, pos = _short_varint(buf, pos + 1, n)
        node_end = pos + size
        if size < 0 or node_end > n:
            return None
        parts: tuple[list[Any], list[Any], list[Any]] | None = None  # children, attributes, slots
        while pos < node_end:
            tag = buf[pos]
            if tag in (0x0A, 0x12, 0x1A):
                size = buf[pos + 1] if pos + 1 < node_end else 0x80
                start = pos + 2
                if size >= 0x80:
                    size, start = _short_varint(buf, pos + 1, node_end)
                end = start + size
                if size < 0 or end > node_end:
                    return None
                found: Any = None
                if tag == 0x0A:
                    found = _usual_child(buf, start, end)
                elif tag == 0x12:
                    found = _usual_tensor(buf, start, end)
                if found is None:
                    found = _fast_submessage(buf, start, end, tag)
                    if found is None:
                        return None
                if parts is None:
                    parts = ([], [], [])
                parts[(tag >> 3) - 1].append(found)
                pos = end
            elif 0x20 <= tag < 0x80:  # fields 4 to 15: skipped
                if tag & 7 == LENGTH_DELIMITED and pos + 1 < node_end and buf[pos + 1] < 0x80:
                    pos += 2 + buf[pos + 1]  # a short one (has_checkpoint_values, on most nodes)
                    if pos > node_end:
                        return None
                else:
                    pos = _skip_field(buf, pos + 1, node_end, tag)
                    if pos < 0:
                        return None
            else:
                return None
        nodes.append(_EMPTY_NODE if parts is None else
                     _new_tuple(ObjectNode, (tuple(parts[0]), tuple(parts[1]), tuple(parts[2]))))
    return nodes


_EMPTY_NODE = ObjectNode((), (), ())


def _usual_child(buf: bytes, pos: int, end: int) -> ObjectReference | None:
    """``{1: node_id (< 16384), 2: local_name (< 128 bytes)}`` in ``buf[pos:end]``, else ``None``."""
    if end - pos < 4 or buf[pos] != 0x08:
        return None
    node_id = buf[pos + 1]
    pos += 2
    if node_id >= 0x80:
        if buf[pos] >= 0x80:
            return None
        node_id = (node_id & 0x7F) | (buf[pos] << 7)
        pos += 1
    if pos + 2 > end or buf[pos] != 0x12 or buf[pos + 1] != end - pos - 2:
        return None
    return _new_tuple(ObjectReference, (node_id, buf[pos + 2 : end].decode("utf-8", "backslashreplace")))


def _usual_tensor(buf: bytes, pos: int, end: int) -> SerializedTensor | None:
    """``{1: name, 2: full_name, 3: checkpoint_key}``, each under 128 bytes, in ``buf[pos:end]``, else ``None``."""
    if end - pos < 6 or buf[pos] != 0x0A or buf[pos + 1] >= 0x80:
        return None
    name_end = pos + 2 + buf[pos + 1]
    if name_end + 2 > end or buf[name_end] != 0x12 or buf[name_end + 1] >= 0x80:
        return None
    full_name_end = name_end + 2 + buf[name_end + 1]
    if full_name_end + 2 > end or buf[full_name_end] != 0x1A or buf[full_name_end + 1] != end - full_name_end - 2:
        return None
    return _new_tuple(SerializedTensor, (
        buf[pos + 2 : name_end].decode("utf-8", "backslashreplace"),
        buf[name_end + 2 : full_name_end].decode("utf-8", "backslashreplace"),
        buf[full_name_end + 2 : end].decode("utf-8", "backslashreplace"),
    ))


# Per sub-message of a node: its fields' tags in order, and whether each is a string.
_NODE_PARTS: dict[int, tuple[tuple[int, bool], ...]] = {
    0x0A: ((0x08, False), (0x12, True)),  # ObjectReference: node_id, local_name
    0x12: ((0x0A, True), (0x12, True), (0x1A, True)),  # SerializedTensor: name, full_name, checkpoint_key
    0x1A: ((0x08, False), (0x12, True), (0x18, False)),  # SlotVariableReference: original, slot_name, slot
}
_NODE_PART_TYPES = {0x0A: ObjectReference, 0x12: SerializedTensor, 0x1A: SlotVariableReference}


def _fast_submessage(buf: bytes, pos: int, end: int, kind: int) -> Any:
    """One child, saved tensor or slot of a node in ``buf[pos:end]``, or ``None``; absent fields are 0 or ``""``."""
    parts = _NODE_PARTS[kind]
    values: list[Any] = [("" if is_text else 0) for _, is_text in parts]
    index = 0
    while pos < end:
        tag = buf[pos]
        while index < len(parts) and parts[index][0] != tag:
            index += 1
        if index == len(parts):
            return None  # unknown, repeated or out of order
        if parts[index][1]:
            size, pos = _short_varint(buf, pos + 1, end)
            if size < 0 or pos + size > end:
                return None
            values[index] = buf[pos : pos + size].decode("utf-8", "backslashreplace")
            pos += size
        else:
            values[index], pos = _short_varint(buf, pos + 1, end)
            if values[index] < 0:
                return None
        index += 1
    return _NODE_PART_TYPES[kind]._make(values)


_FAST: dict[str, Callable[[bytes], Any]] = {"Graph": _fast_object_graph, "Entry": _fast_bundle_entry}
