"""safetensors files, single or sharded (``model.safetensors.index.json``), read without any framework.

The format (as the safetensors project documents it): an unsigned 64-bit
little-endian header length ``N``, then ``N`` bytes of UTF-8 JSON mapping each
tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets into
the byte buffer that follows the header; an optional ``__metadata__`` holds
strings), then the buffer, little-endian, C order. The buffer must be indexed
entirely, without holes or overlaps. This reader checks all of it from the
header alone — header size, JSON, known dtype, offsets inside the file, no
overlap, no hole, ``prod(shape) * itemsize == end - begin`` — and maps the file
into memory: :meth:`SafetensorsFile.read` copies one tensor out of the map.

A sharded checkpoint is an index JSON whose ``weight_map`` maps each tensor
name to the shard file holding it; every shard is checked the same way and must
hold exactly the tensors the index gives it.

Keys: a name with ``/`` is kept as it is (``name`` namespace). Dotted names
(``features.0.weight``), the PyTorch convention, become ``features/0/weight``
in the ``torch`` namespace, with the original name as an alias; those tensors
are in PyTorch's layouts, which :mod:`regraft.layouts` converts.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from typing import Any

import numpy as np

from regraft.entries import BOOKKEEPING, WEIGHT, SourceEntry
from regraft.errors import CorruptCheckpointError, SourceError, UnsupportedFormatError
from regraft.sources._keystyle import canonical_key, is_torch_style, numbered
from regraft.sources.base import Source
from regraft.sources._slices import read_block, touched_bytes

__all__ = ["SafetensorsFile", "read_header", "DTYPES"]

#: safetensors dtype codes → numpy dtype names (bfloat16 and float8 through ml_dtypes).
DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}
MAX_HEADER = 100_000_000  # the limit the safetensors library itself enforces
_INDEX_SUFFIX = ".safetensors.index.json"
_RESAVE = "The file is damaged or was cut short; write it again (safetensors.numpy.save_file / save_file)."


def _dtype(name: str) -> np.dtype:
    from regraft.naming import dtype_of

    return np.dtype(dtype_of(name))


def read_header(path: str) -> tuple[dict[str, tuple[str, tuple[int, ...], int, int]], dict[str, str], int]:
    """Read and check a safetensors header without reading tensor bytes.

    Returns:
        ``{name: (numpy dtype name, shape, begin, end)}`` with absolute file
        offsets, the ``__metadata__`` strings, and the file size.

    Raises:
        CorruptCheckpointError: naming the file, the tensor and the problem.
    """
    def bad(problem: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"{path} is not a valid safetensors file: {problem}.", hint=_RESAVE)

    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise bad(f"it is {size} bytes long, shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or n > size - 8:
                raise bad(f"its header length field says {n} bytes, but the file holds {size - 8} after it"
                          + (f" and headers are limited to {MAX_HEADER}" if n > MAX_HEADER else ""))
            raw = f.read(n)
    except OSError as exc:
        raise SourceError(f"{path} cannot be read: {exc.strerror or exc}.",
                          hint="Check the path and its permissions.") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise bad(f"its {n}-byte header is not UTF-8 JSON ({exc})") from None
    if not isinstance(header, dict):
        raise bad(f"its header is a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise bad("its __metadata__ is not an object of strings")
    start = 8 + n
    tensors: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
    for name, info in header.items():
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            raise bad(f"tensor '{name}' lacks dtype, shape or data_offsets")
        code, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if code not in DTYPES:
            raise bad(f"tensor '{name}' has dtype {code!r}; known: {', '.join(DTYPES)}")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise bad(f"tensor '{name}' has shape {shape!r}, not a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise bad(f"tensor '{name}' has data_offsets {offsets!r}, not [begin, end] with 0 <= begin <= end")
        begin, end = offsets
        if start + end > size:
            raise bad(f"tensor '{name}' ends at byte {start + end}, past the end of the file ({size} bytes)")
        want = math.prod(shape) * _dtype(DTYPES[code]).itemsize
        if end - begin != want:
            raise bad(f"tensor '{name}' of shape {tuple(shape)} and dtype {code} needs {want} bytes, "
                      f"its data_offsets give {end - begin}")
        tensors[name] = (DTYPES[code], tuple(shape), start + begin, start + end)
    position = start
    for name, (_, _, begin, end) in sorted(tensors.items(), key=lambda kv: (kv[1][2], kv[1][3])):
        if begin < position:
            raise bad(f"tensor '{name}' (bytes {begin}..{end}) overlaps the tensor before it")
        if begin > position:
            raise bad(f"bytes {position}..{begin} before tensor '{name}' belong to no tensor")
        position = end
    if position != size:
        raise bad(f"bytes {position}..{size} at the end belong to no tensor")
    return tensors, {str(k): str(v) for k, v in metadata.items()}, size


def _is_safetensors(path: str) -> bool:
    """A plausible header: a length that fits the file, then ``{``."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return 2 <= n <= min(size - 8, MAX_HEADER) and head[8:9] == b"{"


def _index_map(path: str) -> dict[str, str] | None:
    """The ``weight_map`` of a sharded safetensors index, or ``None`` if ``path`` is not one."""
    if not os.path.isfile(path) or os.path.getsize(path) > MAX_HEADER:
        return None
    try:
        with open(path, "rb") as f:
            if f.read(1) != b"{":
                return None
            data = json.loads(b"{" + f.read())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        return None
    if not all(isinstance(v, str) and v.endswith(".safetensors") for v in weight_map.values()):
        return None
    return weight_map


class SafetensorsFile(Source):
    """A safetensors file or a sharded index; tensors are copied out of memory maps on demand."""

    suffixes = (".safetensors", _INDEX_SUFFIX)

    @classmethod
    def detect(cls, path: str) -> bool:
        """True for a file that starts like a safetensors header, or a sharded safetensors index."""
        if not os.path.isfile(path):
            return False
        return _is_safetensors(path) or _index_map(path) is not None

    def __init__(self, path: str) -> None:
        self._maps: dict[str, tuple[Any, mmap.mmap | None]] = {}
        self._where: dict[str, tuple[str, str, tuple[int, ...], int, int]] = {}  # key -> (file, dtype, shape, b, e)
        self.metadata: dict[str, str] = {}
        weight_map = None if _is_safetensors(path) else _index_map(path)
        if weight_map is not None:
            tensors = self._sharded(path, weight_map)
            self.format = "safetensors-sharded"
        elif path.endswith(_INDEX_SUFFIX) and os.path.isfile(path) and not _is_safetensors(path):
            raise CorruptCheckpointError(
                f"{path} is not a sharded safetensors index: it is not JSON with a 'weight_map' of "
                "tensor name -> .safetensors file.", hint="Pass the index written with the shards, or one shard.")
        else:
            header, self.metadata, _ = read_header(path)  # raises the precise reason for a damaged file
            tensors = {name: (path, *info) for name, info in header.items()}
            self.format = "safetensors"
        self.files = (path,) + tuple(sorted({t[0] for t in tensors.values()} - {path}))
        torch = is_torch_style(tensors)
        self.namespace = "torch" if torch else "name"
        entries = []
        for name, (file, dtype, shape, begin, end) in sorted(tensors.items()):
            key = canonical_key(name, torch)
            if key in self._where:
                raise UnsupportedFormatError(
                    f"{path}: tensors '{self._where[key][0]}' and '{name}' both read as '{key}'.",
                    hint="Rename one of them in the file.")
            self._where[key] = (file, dtype, shape, begin, end)
            layer, _, role = key.rpartition("/")
            kind = BOOKKEEPING if torch and role == "num_batches_tracked" else WEIGHT
            aliases = (name,) if key != name else ()
            entries.append(SourceEntry(key, shape, dtype, kind, layer, role, None, None, aliases))
        super().__init__(path, numbered(entries))

    def _sharded(self, path: str, weight_map: dict[str, str]) -> dict[str, tuple[str, str, tuple[int, ...], int, int]]:
        folder = os.path.dirname(path)
        by_shard: dict[str, set[str]] = {}
        for name, shard in weight_map.items():
            by_shard.setdefault(shard, set()).add(name)
        tensors = {}
        for shard, names in sorted(by_shard.items()):
            shard_path = os.path.join(folder, shard)
            if not os.path.isfile(shard_path):
                raise SourceError(f"{path} names shard {shard}, which does not exist in {folder or '.'}.",
                                  hint="Put every shard the index lists beside it.")
            header, _, _ = read_header(shard_path)
            if set(header) != names:
                missing = sorted(names - set(header))[:3]
                extra = sorted(set(header) - names)[:3]
                raise CorruptCheckpointError(
                    f"{shard_path} does not hold what {path} says: "
                    + "; ".join(x for x in (f"missing {missing}" if missing else "",
                                            f"not in the index {extra}" if extra else "") if x) + ".",
                    hint="The index and the shards come from different saves; use the ones written together.")
            tensors.update({name: (shard_path, *info) for name, info in header.items()})
        return tensors

    def read(self, key: str) -> np.ndarray:
        """Copy one tensor out of its file's memory map (little-endian, C order)."""
        file, dtype, shape, begin, end = self._where[key]
        mm, now = self._map(file)
        try:
            if end > min(len(mm), now):  # a file cut short after opening: refuse before touching the map
                raise CorruptCheckpointError(
                    f"Cannot read tensor '{key}' from {file}: it ends at byte {end}, the file now has {now}.",
                    hint=_RESAVE)
            want = _dtype(dtype).newbyteorder("<") if _dtype(dtype).itemsize > 1 else _dtype(dtype)
            array = np.frombuffer(mm, dtype=want, count=math.prod(shape), offset=begin).reshape(shape)
            return np.array(array, dtype=_dtype(dtype), copy=True)
        except ValueError as exc:
            raise CorruptCheckpointError(f"Cannot read tensor '{key}' from {file}: {exc}.", hint=_RESAVE) from None

    def read_slice(self, key: str, index: tuple[slice, ...]) -> np.ndarray:
        """Copy one block of a tensor out of its file's memory map (only the block's pages are read)."""
        file, dtype, shape, begin, end = self._where[key]
        mm, now = self._map(file)
        if end > min(len(mm), now):
            raise CorruptCheckpointError(
                f"Cannot read tensor '{key}' from {file}: it ends at byte {end}, the file now has {now}.", hint=_RESAVE)
        want = _dtype(dtype).newbyteorder("<") if _dtype(dtype).itemsize > 1 else _dtype(dtype)
        try:
            block = read_block(mm, begin, want, tuple(shape), index)
        except ValueError as exc:
            raise CorruptCheckpointError(f"Cannot read tensor '{key}' from {file}: {exc}.", hint=_RESAVE) from None
        self.sliced_bytes_read += touched_bytes(begin, tuple(shape), want.itemsize, index)
        return block

    def _map(self, file: str) -> Any:
        if file not in self._maps:
            handle = open(file, "rb")
            size = os.fstat(handle.fileno()).st_size
            mm = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) if size else None
            self._maps[file] = (handle, mm)
        handle, mm = self._maps[file]
        return (mm if mm is not None else b""), os.fstat(handle.fileno()).st_size

    def close(self) -> None:
        """Unmap and close every file."""
        for handle, mm in self._maps.values():
            if mm is not None:
                mm.close()
            handle.close()
        self._maps.clear()

