"""A pure-Python reader of TensorFlow tensor-bundle (V2) checkpoints.

A checkpoint ``PREFIX`` is ``PREFIX.index`` plus ``PREFIX.data-0000i-of-0000N``.
The index is a LevelDB-style SSTable (tensorflow/core/lib/io/table_builder.cc)
mapping each tensor name to a ``BundleEntryProto`` (dtype, shape, shard, offset,
size, masked CRC-32C); the empty key maps to the ``BundleHeaderProto``. The data
files hold raw little-endian tensor bytes. TensorFlow is never imported.
"""

from __future__ import annotations

import contextlib
import io
import math
import mmap
import os
import re
import struct
from collections.abc import Iterator
from typing import TYPE_CHECKING, NamedTuple, Union

from regraft.naming import dtype_of

from regraft.errors import CorruptCheckpointError, SourceError, UnsupportedFormatError
from regraft.sources._crc32c import crc32c, mask
from regraft.sources._proto import (
    BundleEntryProto,
    BundleHeader,
    DecodeError,
    ObjectNode,
    decode_varint,
    fast_bundle_entries,
    parse_bundle_entry,
    parse_bundle_header,
    parse_object_graph,
)

if TYPE_CHECKING:
    import numpy as np

__all__ = ["OBJECT_GRAPH_KEY", "Bundle", "BundleEntry", "data_file_path"]

OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"
"""Key of the scalar string tensor holding the serialized TrackableObjectGraph."""

DAMAGED_HINT = "The checkpoint is damaged; re-save it or restore the file from a backup."

_TABLE_MAGIC = 0xDB4775248B80FB57
_FOOTER_SIZE = 48  # two BlockHandles padded to 2 * 20 bytes, then the 8-byte magic
_BLOCK_TRAILER_SIZE = 5  # 1 byte compression type + 4 bytes masked CRC-32C
_SNAPPY_COMPRESSION = 1
_SLICE_KEY_PREFIX = b"\x00"  # keys of the slices of partitioned variables
_FILE_SUFFIX = re.compile(r"\.(index|data-\d{5}-of-\d{5})$")
_DT_BFLOAT16 = 14
_UINT32_MAX = 0xFFFFFFFF
_READ_CHUNK = 1 << 30  # a single read() syscall is capped near 2 GiB on Linux
_MAX_SHARDS_UNLISTED = 4096  # data files checked one by one when the folder cannot be listed
_MAX_ELEMENTS = (1 << 63) // 16  # numpy's limit on array bytes, for the widest dtype
_MAX_NDIM = 64  # numpy's limit on dimensions; TensorFlow allows 254

# tensorflow/core/framework/types.proto DataType -> numpy dtype name (bfloat16 needs ml_dtypes).
# Names, not numpy types: opening a checkpoint lists it without importing numpy.
_NUMPY_DTYPES: dict[int, str] = {
    1: "float32",
    2: "float64",
    3: "int32",
    4: "uint8",
    5: "int16",
    6: "int8",
    8: "complex64",
    9: "int64",
    10: "bool",
    17: "uint16",
    18: "complex128",
    19: "float16",
    22: "uint32",
    23: "uint64",
}
_DTYPE_NAMES = (
    "invalid", "float", "double", "int32", "uint8", "int16", "int8", "string", "complex64",
    "int64", "bool", "qint8", "quint8", "qint32", "bfloat16", "qint16", "quint16", "uint16",
    "complex128", "half", "resource", "variant", "uint32", "uint64", "float8_e5m2",
    "float8_e4m3fn", "float8_e4m3fnuz", "float8_e4m3b11fnuz", "float8_e5m2fnuz", "int4",
    "uint4", "int2", "uint2", "float4_e2m1fn",
)  # fmt: skip

EntryDType = Union["np.dtype", str]
"""A numpy dtype, ``"string"``, or the TF name of a dtype regraft cannot read."""


class BundleEntry(NamedTuple):
    """Where and how one tensor is stored in a bundle.

    Attributes:
        key: the tensor's checkpoint key, e.g. ``"dense/kernel/.ATTRIBUTES/VARIABLE_VALUE"``.
        data_type: the ``tensorflow.DataType`` enum value (1 = DT_FLOAT, ...);
            :attr:`dtype` and :attr:`dtype_name` say it for numpy and for people.
        shape: dimension sizes, ``()`` for a scalar.
        shard_id: index of the data file holding the bytes.
        offset: byte offset in that data file.
        size: number of bytes stored.
        crc32c: masked CRC-32C of the stored bytes.
        sliced: True for a partitioned variable stored as several slices.
        raw_key: the key's bytes as stored. ``key`` is their UTF-8 text, with
            ``\\xNN`` escapes for bytes that are not UTF-8 (TensorFlow keys are
            bytes); ``raw_key`` is the name TensorFlow itself looks the tensor up by.
    """

    key: str
    data_type: int
    shape: tuple[int, ...]
    shard_id: int
    offset: int
    size: int
    crc32c: int
    sliced: bool
    raw_key: bytes = b""

    @property
    def dtype(self) -> EntryDType:
        """A numpy dtype; ``"string"`` for DT_STRING; for any other dtype (e.g. ``"resource"``,
        ``"variant"``, or ``"bfloat16"`` when ml_dtypes is not installed) its TensorFlow name."""
        found = _ENTRY_DTYPES.get(self.data_type)
        if found is None:
            found = _ENTRY_DTYPES[self.data_type] = _entry_dtype(self.data_type)
        return found

    @property
    def dtype_name(self) -> str:
        """The dtype's name (numpy's, e.g. ``"float32"``; TensorFlow's for the others), without numpy."""
        return _NUMPY_DTYPES.get(self.data_type) or _tf_dtype_name(self.data_type)


_new_tuple = tuple.__new__  # a BundleEntry from a tuple of its fields, without NamedTuple's Python-level __new__


def _entry_problem(proto: BundleEntryProto, num_shards: int) -> str:
    """Returns what is wrong with an entry's fields, or ``""``."""
    shape = proto.shape
    if not (proto.unknown_rank or not 0 <= proto.shard_id < num_shards or proto.offset < 0 or proto.size < 0 or (
            shape and (min(shape) < 0 or 0 in shape or math.prod(shape) > _MAX_ELEMENTS))):
        return ""  # every check below passes: one expression for the 10,000 entries that get here
    if proto.unknown_rank or any(d < 0 for d in shape):
        return f"shape {list(shape)} (unknown_rank={proto.unknown_rank}) is not fully defined"
    if not 0 <= proto.shard_id < num_shards:
        return f"shard {proto.shard_id}, expected 0 to {num_shards - 1}"
    if proto.offset < 0 or proto.size < 0:
        return f"offset {proto.offset} and size {proto.size} must not be negative"
    if math.prod(d for d in shape if d) > _MAX_ELEMENTS:
        return f"shape {list(shape)} has more elements than any array can hold"
    return ""


def data_file_path(prefix: str, shard_id: int, num_shards: int) -> str:
    """Returns the path of one data shard, ``PREFIX.data-0000i-of-0000N``."""
    return f"{prefix}.data-{shard_id:05d}-of-{num_shards:05d}"


_ENTRY_DTYPES: dict[int, EntryDType] = {}  # enum -> its EntryDType, made on first use


def _entry_dtype(enum: int) -> EntryDType:
    """Maps a ``tensorflow.DataType`` enum value to a :data:`EntryDType`."""
    if enum in _NUMPY_DTYPES:
        import numpy as np

        return np.dtype(_NUMPY_DTYPES[enum])
    if enum == _DT_BFLOAT16:
        return dtype_of("bfloat16")
    return _tf_dtype_name(enum)


def _tf_dtype_name(enum: int) -> str:
    """TensorFlow's name of a ``DataType`` enum value (``"bfloat16"``, ``"string"``, ``"resource"``...)."""
    if 0 <= enum < len(_DTYPE_NAMES):
        return _DTYPE_NAMES[enum]
    return f"DataType({enum})"


def _prefix_hint(prefix: str) -> str:
    """Returns the hint for a prefix whose ``.index`` file is missing."""
    suffix = _FILE_SUFFIX.search(prefix)
    if suffix:
        return f"Pass the checkpoint prefix without the file suffix: {prefix[: suffix.start()]}"
    return "Pass the checkpoint prefix (the path without '.index'), e.g. ckpt/model-1000."


# --- the SSTable index ------------------------------------------------------------


def _read_block(index: bytes, offset: int, size: int, path: str, what: str) -> bytes:
    """Returns one verified, uncompressed SSTable block.

    Args:
        index: the whole index file.
        offset: the block's offset, from its BlockHandle.
        size: the block's size without its 5-byte trailer.
        path: index file path, for messages.
        what: ``"index"``, ``"metaindex"`` or ``"data"``, for messages.

    Raises:
        CorruptCheckpointError: the block runs past the file or fails its checksum.
        UnsupportedFormatError: the block is compressed.
    """
    end = offset + size + _BLOCK_TRAILER_SIZE
    if end > len(index) - _FOOTER_SIZE:
        raise CorruptCheckpointError(
            f"{path}: {what} block at offset {offset} of {size} bytes runs past the "
            f"end of the file's blocks (byte {len(index) - _FOOTER_SIZE}); the file is truncated "
            "or garbled",
            hint=DAMAGED_HINT,
        )
    (stored,) = struct.unpack_from("<I", index, offset + size + 1)
    actual = mask(crc32c(memoryview(index)[offset : offset + size + 1]))
    if stored != actual:
        raise CorruptCheckpointError(
            f"{path}: {what} block at offset {offset} has checksum {actual:#010x}, "
            f"expected {stored:#010x}",
            hint=DAMAGED_HINT,
        )
    compression = index[offset + size]
    if compression != 0:
        name = "snappy" if compression == _SNAPPY_COMPRESSION else f"type-{compression}"
        raise UnsupportedFormatError(
            f"{path}: {what} block at offset {offset} is {name}-compressed; regraft reads "
            "only uncompressed indexes, which is what TensorFlow writes",
            hint="Re-save the checkpoint with TensorFlow's tf.train.Checkpoint or tf.compat.v1.train.Saver.",
        )
    return index[offset : offset + size]


def _block_entries(block: bytes) -> list[tuple[bytes, bytes]]:
    """Decodes the prefix-compressed ``(key, value)`` entries of one block.

    Raises:
        DecodeError: the block's layout is inconsistent.
    """
    if len(block) < 4:
        raise DecodeError(f"block of {len(block)} bytes has no restart count")
    (num_restarts,) = struct.unpack_from("<I", block, len(block) - 4)
    limit = len(block) - 4 * (num_restarts + 1)
    if limit < 0:
        raise DecodeError(f"block of {len(block)} bytes claims {num_restarts} restart points")
    entries = []
    key = b""
    pos = 0
    while pos < limit:
        if pos + 3 <= limit and (block[pos] | block[pos + 1] | block[pos + 2]) < 0x80:  # three 1-byte varints
            shared, non_shared, value_size = block[pos], block[pos + 1], block[pos + 2]
            pos += 3
        else:
            shared, pos = decode_varint(block, pos, limit)
            non_shared, pos = decode_varint(block, pos, limit)
            value_size, pos = decode_varint(block, pos, limit)
        value_pos = pos + non_shared
        if shared > len(key) or value_pos + value_size > limit:
            raise DecodeError(f"entry at block byte {pos} overruns its block")
        key = key[:shared] + block[pos:value_pos]
        pos = value_pos + value_size
        entries.append((key, block[value_pos:pos]))
    return entries


def _block_handle(buf: bytes, pos: int = 0) -> tuple[int, int, int]:
    """Decodes a BlockHandle.

    Returns:
        ``(offset, size, position after the handle)``.
    """
    offset, pos = decode_varint(buf, pos)
    size, pos = decode_varint(buf, pos)
    return offset, size, pos


def _read_table(index: bytes, path: str) -> list[tuple[bytes, bytes]]:
    """Returns all ``(key, value)`` entries of an SSTable, in file order.

    Raises:
        CorruptCheckpointError: the table is truncated, garbled or fails a checksum.
        UnsupportedFormatError: the table is compressed.
    """
    if len(index) < _FOOTER_SIZE:
        raise CorruptCheckpointError(
            f"{path} is {len(index)} bytes, shorter than the {_FOOTER_SIZE}-byte footer "
            "of a checkpoint index",
            hint=DAMAGED_HINT,
        )
    footer = index[-_FOOTER_SIZE:]
    (magic,) = struct.unpack_from("<Q", footer, _FOOTER_SIZE - 8)
    if magic != _TABLE_MAGIC:
        raise CorruptCheckpointError(
            f"{path} ends with {magic:#018x}, expected the table magic number "
            f"{_TABLE_MAGIC:#018x}; it is not a checkpoint index or it is truncated",
            hint=DAMAGED_HINT,
        )
    try:
        meta_offset, meta_size, pos = _block_handle(footer)
        _block_entries(_read_block(index, meta_offset, meta_size, path, "metaindex"))  # verify only
        index_offset, index_size, _ = _block_handle(footer, pos)
        index_block = _read_block(index, index_offset, index_size, path, "index")
        entries = []
        for _, handle in _block_entries(index_block):
            offset, size, _ = _block_handle(handle)
            entries.extend(_block_entries(_read_block(index, offset, size, path, "data")))
    except DecodeError as exc:
        raise CorruptCheckpointError(f"{path} has a garbled table: {exc}", hint=DAMAGED_HINT) from None
    return entries


# --- the bundle ---------------------------------------------------------------------


class Bundle:
    """A TensorFlow V2 checkpoint (tensor bundle), read without TensorFlow.

    The index is read and validated on construction; tensor bytes are read
    (and checksummed) only by :meth:`read` and :meth:`read_string`.

    Attributes:
        prefix: the checkpoint prefix, e.g. ``"ckpt/model-1000"``.
        index_path: ``prefix + ".index"``.
        header: the bundle header (number of shards, endianness, version).
        entries: one :class:`BundleEntry` per tensor, in key order. Slices of
            partitioned variables are not listed separately (as in TensorFlow).
    """

    def __init__(self, prefix: str | os.PathLike[str]) -> None:
        """Reads and validates ``prefix.index`` and checks the data files exist.

        Args:
            prefix: the checkpoint prefix (path without ``.index``).

        Raises:
            SourceError: the index or a data file is missing or unreadable.
            CorruptCheckpointError: the index is truncated, garbled or fails a checksum.
            UnsupportedFormatError: the index is compressed or the data big-endian.
        """
        self.prefix = os.fspath(prefix)
        self.index_path = self.prefix + ".index"
        table = _read_table(self._read_index_file(), self.index_path)
        self.header = self._parse_header(table)
        self.entries = self._parse_entries(table[1:])
        self._check_data_files()

    def __repr__(self) -> str:
        return f"Bundle({self.prefix!r}, {len(self.entries)} tensors, {self.header.num_shards} shards)"

    def data_path(self, shard_id: int) -> str:
        """Returns the path of data shard ``shard_id``."""
        return data_file_path(self.prefix, shard_id, self.header.num_shards)

    # --- reading tensors ------------------------------------------------------

    def read(self, key: str) -> np.ndarray:
        """Reads one numeric tensor, verifying its checksum.

        Args:
            key: a key of :attr:`entries`.

        Returns:
            A new writable, C-contiguous array of the entry's dtype and shape.

        Raises:
            SourceError: no such key, or the data file cannot be opened.
            UnsupportedFormatError: a string, resource/variant, or partitioned tensor.
            CorruptCheckpointError: the data is truncated or fails its checksum.
        """
        import numpy as np

        entry, dtype = self._sized_entry(key)
        with self._open_data(entry) as f:
            array = np.empty(entry.shape, dtype)
            raw = array.reshape(-1).view(np.uint8).data  # no buffer export for bfloat16 itself
            self._fill(entry, f, raw)
        self._check_crc(entry, mask(crc32c(raw)))
        return array

    def read_into(self, key: str, out: np.ndarray, checksum: bool = True) -> None:
        """Reads one numeric tensor into ``out``: the bytes go from the file straight into ``out``
        (an array of the tensor's shape and dtype; others are filled from :meth:`read`).

        With ``checksum=False`` the bytes' CRC32C is not computed again: for a tensor
        :meth:`verify` passed in a file the caller knows is unchanged since.

        Raises:
            The same errors as :meth:`read`; ``out`` may then hold part of the bytes.
        """
        import numpy as np

        entry, dtype = self._sized_entry(key)
        if out.dtype != dtype or out.shape != tuple(entry.shape) or not out.flags.c_contiguous:
            out[...] = self.read(key)
            return
        raw = out.reshape(-1).view(np.uint8).data
        with self._open_data(entry) as f:
            self._fill(entry, f, raw)
        if checksum:
            self._check_crc(entry, mask(crc32c(raw)))

    def verify(self, key: str) -> None:
        """Checks one numeric tensor's size and checksum without keeping its bytes.

        The data file is mapped into memory and checksummed in place: no copy,
        no allocation, so checking is as fast as the CRC itself.

        Raises:
            The same errors as :meth:`read`.
        """
        entry, _ = self._sized_entry(key)
        with self._open_data(entry) as f:
            if entry.size == 0:
                actual = crc32c(b"")
            else:
                with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped, memoryview(mapped) as whole:
                    with whole[entry.offset : entry.offset + entry.size] as data:
                        actual = crc32c(data)
        self._check_crc(entry, mask(actual))

    def read_slice(self, key: str, index: tuple[slice, ...]) -> tuple[np.ndarray, int]:
        """Reads one block of a numeric tensor (``index``: one ``slice(start, stop)`` per axis).

        The data file is memory-mapped and only the block's pages are copied out.
        The entry's CRC32C covers the whole entry, so a block read is *not*
        checksummed: :meth:`verify` checks the whole entry when that is wanted.

        Returns:
            The block as a new C-contiguous array, and the file bytes the read
            touched (:func:`regraft.sources._slices.touched_bytes`).

        Raises:
            The errors of :meth:`read`, except a checksum mismatch.
        """
        import numpy as np

        from regraft.sources._slices import read_block, touched_bytes

        entry, dtype = self._sized_entry(key)
        with self._open_data(entry) as f:
            if entry.size == 0:
                return np.empty(tuple(s.stop - s.start for s in index), dtype), 0
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                block = read_block(mapped, entry.offset, dtype, entry.shape, index)
        return block, touched_bytes(entry.offset, entry.shape, dtype.itemsize, index)

    def _sized_entry(self, key: str) -> tuple[BundleEntry, np.dtype]:
        """The numeric entry of ``key`` and its dtype, checking its byte size matches its shape."""
        entry, dtype = self._numeric_entry(key)
        expected = _num_elements(entry.shape) * dtype.itemsize
        if entry.size != expected:
            raise CorruptCheckpointError(
                f"{self.index_path}: tensor {key!r} of shape {list(entry.shape)} and dtype "
                f"{dtype.name} should take {expected} bytes, but its entry says {entry.size}",
                hint=DAMAGED_HINT,
            )
        return entry, dtype

    def read_string(self, key: str) -> list[bytes]:
        """Reads one DT_STRING tensor, verifying its checksums.

        On disk a string tensor of n elements is: n varint64 lengths, the
        masked CRC-32C of the lengths (each as a little-endian uint32, or
        uint64 if it does not fit), then the n strings' bytes back to back.
        The entry's checksum covers those lengths (as uint32/uint64), the
        4 checksum bytes, and the string bytes.

        Args:
            key: a key of :attr:`entries` whose dtype is ``"string"``.

        Returns:
            The elements in row-major order (``entries[key].shape`` gives the shape).

        Raises:
            SourceError: no such key, or the data file cannot be opened.
            UnsupportedFormatError: the tensor is not a string tensor, or is partitioned.
            CorruptCheckpointError: the data is truncated, garbled or fails a checksum.
        """
        entry = self._entry(key)
        if entry.dtype != "string":
            raise UnsupportedFormatError(
                f"{self.index_path}: tensor {key!r} has dtype {entry.dtype_name}, "
                "not string",
                hint="Read numeric tensors with Bundle.read.",
            )
        self._check_not_sliced(entry)
        with self._open_data(entry) as f:
            buf = bytearray(entry.size)
            self._fill(entry, f, memoryview(buf))
        try:
            strings, crc = _decode_strings(buf, _num_elements(entry.shape))
        except DecodeError as exc:
            raise CorruptCheckpointError(
                f"{self.data_path(entry.shard_id)}: string tensor {key!r} is garbled: {exc}",
                hint=DAMAGED_HINT,
            ) from None
        self._check_crc(entry, mask(crc))
        return strings

    def object_graph(self) -> list[ObjectNode] | None:
        """Reads and parses the TrackableObjectGraph of a TF2 checkpoint.

        Returns:
            The graph's nodes (node 0 is the saved root object), or None for a
            checkpoint without ``_CHECKPOINTABLE_OBJECT_GRAPH`` (e.g. a TF1 Saver's).

        Raises:
            CorruptCheckpointError: the graph tensor is damaged or not a valid graph.
        """
        if OBJECT_GRAPH_KEY not in self.entries:
            return None
        try:
            return parse_object_graph(b"".join(self.read_string(OBJECT_GRAPH_KEY)))
        except DecodeError as exc:
            raise CorruptCheckpointError(
                f"{self.data_path(self.entries[OBJECT_GRAPH_KEY].shard_id)}: tensor "
                f"{OBJECT_GRAPH_KEY!r} is not a valid TrackableObjectGraph: {exc}",
                hint=DAMAGED_HINT,
            ) from None

    # --- index parsing ----------------------------------------------------------

    def _read_index_file(self) -> bytes:
        """Returns the bytes of the index file."""
        try:
            with open(self.index_path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise SourceError(
                f"expected a TensorFlow checkpoint index at {self.index_path}, found no such file",
                hint=_prefix_hint(self.prefix),
            ) from None
        except OSError as exc:
            raise SourceError(
                f"cannot read checkpoint index {self.index_path}: {exc.strerror or exc}",
                hint="Check the file's permissions and that it is a regular file.",
            ) from None

    def _parse_header(self, table: list[tuple[bytes, bytes]]) -> BundleHeader:
        """Parses and checks the header, which must be the first (empty-key) entry."""
        if not table or table[0][0] != b"":
            found = f"first key {table[0][0]!r}" if table else "no entries"
            raise CorruptCheckpointError(
                f"{self.index_path}: expected a bundle header under the empty key, found {found}",
                hint=DAMAGED_HINT,
            )
        try:
            header = parse_bundle_header(table[0][1])
        except DecodeError as exc:
            raise CorruptCheckpointError(
                f"{self.index_path}: the bundle header is garbled: {exc}", hint=DAMAGED_HINT
            ) from None
        if header.num_shards < 1:
            raise CorruptCheckpointError(
                f"{self.index_path}: the bundle header says {header.num_shards} data shards, "
                "expected at least 1",
                hint=DAMAGED_HINT,
            )
        if header.endianness != 0:
            raise UnsupportedFormatError(
                f"{self.index_path}: the checkpoint was written on a big-endian machine; "
                "regraft reads only little-endian checkpoints",
                hint="Re-save the checkpoint on a little-endian (x86 or ARM) machine.",
            )
        return header

    def _parse_entries(self, table: list[tuple[bytes, bytes]]) -> dict[str, BundleEntry]:
        """Parses the tensor entries, skipping slice keys of partitioned variables."""
        entries: dict[str, BundleEntry] = {}
        previous = b""
        num_shards = self.header.num_shards
        decoded = fast_bundle_entries([value for _, value in table])  # None where the reference must judge
        for (raw_key, value), proto in zip(table, decoded):
            if raw_key <= previous:
                raise CorruptCheckpointError(
                    f"{self.index_path}: key {raw_key!r} follows {previous!r}; expected "
                    "strictly increasing keys",
                    hint=DAMAGED_HINT,
                )
            previous = raw_key
            if raw_key.startswith(_SLICE_KEY_PREFIX):
                continue
            key = raw_key.decode("utf-8", "backslashreplace")
            if key in entries:  # b"w\xff" and the text "w\\xff" display alike: never let one stand for the other
                raise UnsupportedFormatError(
                    f"{self.index_path}: the tensor keys {entries[key].raw_key!r} and {raw_key!r} are both "
                    f"shown as {key!r} (a key that is not UTF-8 is shown with \\x escapes); regraft cannot "
                    "tell them apart",
                    hint="Rename one of the two tensors in TensorFlow (tf.raw_ops.RestoreV2 reads by raw key) "
                    "and save the checkpoint again.",
                )
            if proto is None:
                try:
                    proto = parse_bundle_entry(value)
                except DecodeError as exc:
                    raise CorruptCheckpointError(
                        f"{self.index_path}: the entry of tensor {key!r} is garbled: {exc}", hint=DAMAGED_HINT
                    ) from None
            dtype, shape, unknown_rank, shard_id, offset, size, crc, num_slices = proto
            problem = _entry_problem(proto, num_shards)
            if problem:
                raise CorruptCheckpointError(
                    f"{self.index_path}: the entry of tensor {key!r} is invalid: {problem}",
                    hint=DAMAGED_HINT,
                )
            entries[key] = _new_tuple(BundleEntry, (key, dtype, shape, shard_id, offset, size, crc, num_slices > 0,
                                                    raw_key))
        return entries

    def _check_data_files(self) -> None:
        """Raises SourceError unless every data shard file exists.

        The folder is listed once: a header may claim any number of shards (up to
        2**31 - 1), and asking the file system about each one would take hours.
        """
        count = self.header.num_shards
        folder = os.path.dirname(self.prefix) or "."
        pattern = re.compile(re.escape(os.path.basename(self.prefix)) + rf"\.data-(\d{{5,}})-of-{count:05d}$")
        try:
            with os.scandir(folder) as listing:
                present = {
                    int(m.group(1))
                    for item in listing
                    if (m := pattern.match(item.name)) and item.is_file() and m.group(1) == f"{int(m.group(1)):05d}"
                }
        except OSError as exc:  # a folder one may enter but not list: ask per file, if they are few
            if count > _MAX_SHARDS_UNLISTED:
                raise SourceError(
                    f"cannot list the folder {folder} of checkpoint {self.index_path} to find its {count:,} "
                    f"data files: {exc.strerror or exc}",
                    hint="Check the folder's permissions.",
                ) from None
            present = {i for i in range(count) if os.path.isfile(self.data_path(i))}
        present = {i for i in present if i < count}
        if len(present) == count:
            return
        first = next(i for i in range(len(present) + 1) if i not in present)
        missing = count - len(present)
        more = f" (and {missing - 1:,} more)" if missing > 1 else ""
        raise SourceError(
            f"{self.index_path} expects {count:,} data file(s), but {self.data_path(first)} does not "
            f"exist{more}",
            hint="Copy every PREFIX.data-*-of-* file together with the .index file."
            if missing <= 1000
            else f"The folder holds {len(present):,} of them: a count so far above the files present means "
            "the index is damaged; re-save the checkpoint or restore the file from a backup.",
        )

    # --- tensor reading helpers -------------------------------------------------

    def _entry(self, key: str) -> BundleEntry:
        """Returns the entry of ``key`` or raises SourceError naming the key."""
        try:
            return self.entries[key]
        except KeyError:
            raise SourceError(
                f"{self.index_path} has no tensor {key!r} (it has {len(self.entries)} tensors)",
                hint="Check the key against the checkpoint's tensor list (Bundle.entries).",
            ) from None

    def _numeric_entry(self, key: str) -> tuple[BundleEntry, np.dtype]:
        """Returns the entry of ``key`` and its dtype, checking :meth:`read` can read it."""
        import numpy as np

        entry = self._entry(key)
        if not isinstance(entry.dtype, np.dtype):
            if entry.dtype == "string":
                hint = "Read string tensors with Bundle.read_string."
            elif entry.dtype == "bfloat16":
                hint = "Install the ml_dtypes package (pip install ml_dtypes) to read bfloat16 tensors."
            else:
                hint = "Skip this tensor; it holds no numeric weights regraft can transfer."
            raise UnsupportedFormatError(
                f"{self.index_path}: tensor {key!r} has dtype {entry.dtype}, which regraft cannot "
                "read as a numeric array",
                hint=hint,
            )
        self._check_not_sliced(entry)
        if len(entry.shape) > _MAX_NDIM:
            raise UnsupportedFormatError(
                f"{self.index_path}: tensor {key!r} has {len(entry.shape)} dimensions; numpy arrays hold at "
                f"most {_MAX_NDIM}",
                hint="Reshape it to fewer dimensions in TensorFlow and save the checkpoint again.",
            )
        return entry, entry.dtype

    def _check_not_sliced(self, entry: BundleEntry) -> None:
        """Raises UnsupportedFormatError for a partitioned variable."""
        if entry.sliced:
            raise UnsupportedFormatError(
                f"{self.index_path}: tensor {entry.key!r} is a partitioned variable stored as "
                "slices; partitioned variables are not supported",
                hint="Restore it in TensorFlow and re-save it unpartitioned.",
            )

    @contextlib.contextmanager
    def _open_data(self, entry: BundleEntry) -> Iterator[io.FileIO]:
        """Opens the entry's data file positioned at its offset, checking its length.

        Raises:
            SourceError: the data file cannot be opened or read (also while the
                caller reads it).
            CorruptCheckpointError: the file ends before the entry's last byte.
        """
        path = self.data_path(entry.shard_id)
        try:
            with open(path, "rb", buffering=0) as f:
                available = max(os.fstat(f.fileno()).st_size - entry.offset, 0)
                if available < entry.size:
                    raise self._truncated(entry, available)
                f.seek(entry.offset)
                yield f
        except OSError as exc:
            raise SourceError(
                f"cannot read checkpoint data file {path} (tensor {entry.key!r}): "
                f"{exc.strerror or exc}",
                hint="Check that the file exists and is readable.",
            ) from None

    def _fill(self, entry: BundleEntry, f: io.FileIO, out: memoryview) -> None:
        """Reads exactly ``entry.size`` bytes from ``f`` into ``out``."""
        got = _readinto_fully(f, out)
        if got != entry.size:
            raise self._truncated(entry, got)

    def _truncated(self, entry: BundleEntry, found: int) -> CorruptCheckpointError:
        """Returns the error for a data file that ends inside the entry's bytes."""
        return CorruptCheckpointError(
            f"{self.data_path(entry.shard_id)}: tensor {entry.key!r} needs {entry.size} bytes "
            f"at offset {entry.offset}, found only {found}; the data file is truncated",
            hint=DAMAGED_HINT,
        )

    def _check_crc(self, entry: BundleEntry, actual: int) -> None:
        """Raises CorruptCheckpointError if ``actual`` differs from the entry's checksum."""
        if actual != entry.crc32c:
            raise CorruptCheckpointError(
                f"{self.data_path(entry.shard_id)}: tensor {entry.key!r} has checksum "
                f"{actual:#010x}, expected {entry.crc32c:#010x}; its data is corrupted",
                hint=DAMAGED_HINT,
            )


def _num_elements(shape: tuple[int, ...]) -> int:
    """Returns the number of elements of a shape (1 for a scalar)."""
    count = 1
    for dim in shape:
        count *= dim
    return count


def _readinto_fully(f: io.FileIO, out: memoryview) -> int:
    """Reads until ``out`` is full or the file ends; returns the bytes read."""
    out = out.cast("B")
    total = 0
    while total < len(out):
        got = f.readinto(out[total : total + _READ_CHUNK])
        if not got:
            break
        total += got
    return total


def _decode_strings(buf: bytearray, count: int) -> tuple[list[bytes], int]:
    """Decodes a bundle's string-tensor layout and checks the length checksum.

    Args:
        buf: the tensor's stored bytes.
        count: number of elements.

    Returns:
        ``(strings, crc)`` where ``crc`` is the unmasked CRC-32C TensorFlow
        computes over the tensor (to compare with the entry's checksum).

    Raises:
        DecodeError: the lengths' checksum fails or the sizes do not add up.
    """
    lengths = []
    crc = 0
    pos = 0
    for _ in range(count):
        length, pos = decode_varint(buf, pos)
        lengths.append(length)
        crc = crc32c(struct.pack("<I" if length <= _UINT32_MAX else "<Q", length), crc)
    if pos + 4 > len(buf):
        raise DecodeError(f"the lengths' checksum at byte {pos} is cut off at byte {len(buf)}")
    (stored,) = struct.unpack_from("<I", buf, pos)
    if stored != mask(crc):
        raise DecodeError(f"the string lengths have checksum {mask(crc):#010x}, expected {stored:#010x}")
    start = pos + 4
    if start + sum(lengths) != len(buf):
        raise DecodeError(
            f"{count} strings of {sum(lengths)} bytes after {start} bytes of lengths and "
            f"checksum do not fill the tensor's {len(buf)} bytes"
        )
    strings = []
    pos = start
    for length in lengths:
        strings.append(bytes(buf[pos : pos + length]))
        pos += length
    return strings, crc32c(memoryview(buf)[start - 4 :], crc)
