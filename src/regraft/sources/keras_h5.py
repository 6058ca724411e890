"""Keras weight files in HDF5: Keras 3 ``.weights.h5`` and Keras 2 (tf-keras) ``.h5``.

Keras 3 writes ``<path>/vars/<i>`` datasets, ``<path>`` being the attribute path
from the model with class-name counters for list items (``layers/dense_1``), and
stores the layer's own name as the ``name`` attribute of each ``vars`` group.
Keras 2 writes one group per layer (root attribute ``layer_names``) whose
``weight_names`` attribute lists datasets named like ``dense/kernel:0``.

Metadata is checked on open, before any tensor is read, so that what reaches
matching and applying is numbers of a known size stored in this file:

* every link must be a hard link: a soft or external link (which Keras never
  writes) can leave the file or loop, so the file is refused and each link named;
* datasets must hold numbers (bool, int, float, complex; Keras' bfloat16 tagged
  opaque type), not strings, references or compound records;
* a dataset's bytes must be in the file: no virtual or external storage, no
  declared size beyond what is stored (an unwritten or sparse dataset would read
  as fill values) and no more than :data:`_MAX_EXPANSION` times its stored bytes
  when compressed;
* of attributes, only ``name`` (Keras 3 ``vars`` groups), ``dtype`` (opaque
  datasets), ``layer_names`` and ``weight_names`` (Keras 2) are read, and only
  when their type is a string or a plain number: h5py crashes decoding some
  damaged types;
* before the first variable-length string is decoded, the HDF5 global heap
  that holds such strings is walked with a bound: HDF5 loops forever, holding
  the GIL, on a heap object whose size is damaged to 0.

Those checks are h5py's path. A file within what h5py writes by default (every
Keras file) is first read by :mod:`regraft.sources._hdf5`, in pure Python and
without h5py, about ten times faster; that reader only declines, never refuses,
and a file it declines, or whose entries it cannot build without a refusal, is
opened again through h5py, so the user sees the h5py path's message.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import re
import struct
import sys
from typing import IO, TYPE_CHECKING, Any, Iterator

from regraft.entries import BOOKKEEPING, OPTIMIZER_SLOT, WEIGHT, SourceEntry
from regraft.errors import CorruptCheckpointError, RegraftError, SourceError, UnsupportedFormatError
from regraft.sources import _hdf5
from regraft.sources.base import Source

if TYPE_CHECKING:
    import numpy as np

__all__ = ["KerasH5", "keras2_key"]

_VAR = re.compile(r"(^|/)vars/\d+$")
_COUNTER = re.compile(r"_\d+$")  # Keras' suffix for the n-th layer of a class in a list: dense_1
_NUMERIC = "biufc"
_MAX_BYTES = sys.maxsize  # numpy cannot hold a larger array (the largest np.intp)
_MAX_EXPANSION = 2048  # a compressed dataset may decode to at most this many times its stored bytes (deflate: 1032)
_EXPANSION_FLOOR = 1 << 26  # below 64 MiB any ratio is allowed: a zero bias compresses very well
_TYPE_CLASSES = {  # HDF5 type classes an attribute may not have (H5T_class_t)
    2: "time", 4: "bitfield", 5: "opaque", 6: "compound", 7: "reference", 8: "enum",
    9: "variable-length sequence", 10: "array",
}
_GCOL = b"GCOL"  # signature of an HDF5 global heap collection, where variable-length strings live
_GCOL_MIN = 4096  # HDF5 refuses a smaller collection itself ("global heap size is too small")
_SCAN_BLOCK = 1 << 20
_NOT_KERAS = "Keras does not write this; save the weights again with model.save_weights()."


class KerasH5(Source):
    """A Keras HDF5 weights file, opened read-only; datasets are read on demand."""

    @classmethod
    def detect(cls, path: str) -> bool:
        """True when ``path`` is an HDF5 file (by its signature, not its name)."""
        if not os.path.isfile(path):
            return False
        with open(path, "rb") as f:
            return f.read(len(_hdf5.SIGNATURE)) == _hdf5.SIGNATURE

    def __init__(self, path: str) -> None:
        self.path = path
        self.files = (path,)
        self._file: Any = None  # the h5py file, when the fast reader declined this one
        self._fd: int | None = None  # the fast reader's file: tensors are read from it with pread
        self._start = 0  # where the HDF5 image starts in that file (a .keras member)
        self._own_fd: int | None = None  # a descriptor this class opened (a subclass may lend its own)
        self._view: memoryview | None = None  # the image, while the fast reader decodes attributes
        self._objects: dict[str, _hdf5.Group | _hdf5.Dataset] = {}
        self._global_heaps: dict[int, dict[int, tuple[int, int]]] = {}  # collections the fast reader walked
        entries = self._open_fast(path)
        #: Which reader decoded the metadata: ``"regraft"`` (:mod:`regraft.sources._hdf5`,
        #: tensors then read with ``pread``) or ``"h5py"`` (a file outside its subset).
        self.metadata_reader = "regraft"
        if entries is None:
            entries, self.metadata_reader = self._open_with_h5py(path), "h5py"
        super().__init__(path, entries)

    def _reset(self) -> None:
        self._datasets: dict[str, _hdf5.Dataset] = {}  # HDF5 path -> dataset, from the fast reader
        self._layers: dict[str, tuple[str | None, str | None]] = {}  # layer key -> (Keras name, class)
        self._dataset_path: dict[str, str] = {}  # canonical key -> HDF5 dataset path
        self._names: set[str] = set()
        self._heaps_checked = False
        self._extents: dict[str, tuple[int, int] | None] = {}  # dataset path -> its contiguous bytes, once looked up

    def _build_entries(self, path: str) -> list[SourceEntry]:
        """Every entry, from the objects of the open file (h5py's or the fast reader's); refuses what Keras does not write."""
        names = self._names
        layer_names = self._attribute_names(self._root, "/", "layer_names")
        if layer_names is not None:
            self.format, self.namespace = "keras2-h5", "name"
            return self._keras2_entries(layer_names)
        if "layers" in names or "vars" in names:
            self.format, self.namespace = "keras-h5", "h5"
            return self._keras3_entries(names)
        top = ", ".join(sorted(n for n in names if "/" not in n)[:6]) or "nothing"
        raise UnsupportedFormatError(
            f"{path} is an HDF5 file but not Keras weights: its top level holds {top}, "
            "not the 'layers'/'vars' groups of model.save_weights() nor Keras 2's 'layer_names'.",
            hint="Pass a file written by model.save_weights('x.weights.h5') or a TensorFlow checkpoint.",
        )

    def _open_fast(self, path: str) -> list[SourceEntry] | None:
        """The entries read by :mod:`regraft.sources._hdf5` without h5py, or ``None`` when it declines the file.

        Only a file the fast reader takes whole and that passes every check is opened
        this way; any refusal is left to the h5py path, so that its message is the one
        the user sees.
        """
        image = self._image_file(path)
        if image is None:
            return None
        fd, start, size = image
        self._reset()
        try:
            with mmap.mmap(fd, start + size, access=mmap.ACCESS_READ) as mapped, memoryview(mapped) as whole:
                with whole[start : start + size] as view:
                    self._view, self._size = view, size
                    root, objects = _hdf5.read_tree(view)
                    self._root, self._objects, self._names = root, objects, set(objects)
                    entries = self._build_entries(path)
                    self._view = None
        except Exception:  # noqa: BLE001 - declined, damaged or not Keras: the h5py path decides and says why
            self._view = None
            self._close_image()
            return None
        except BaseException:
            self._close_image()
            raise
        finally:
            self._objects, self._global_heaps = {}, {}
        self._fd, self._start = fd, start
        return entries

    def _image_file(self, path: str) -> tuple[int, int, int] | None:
        """``(file descriptor, where the HDF5 image starts, its size)`` for the fast reader, or ``None``.

        A subclass finds the image elsewhere (inside a zip); the descriptor is closed by :meth:`_close_image`.
        """
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return None  # h5py says what is wrong
        self._own_fd = fd
        return fd, 0, os.fstat(fd).st_size

    def _close_image(self) -> None:
        fd, self._own_fd = getattr(self, "_own_fd", None), None
        if fd is not None:
            os.close(fd)

    def _open_with_h5py(self, path: str) -> list[SourceEntry]:
        self._reset()
        self._file = self._open_h5(path)
        self._size = self._file.id.get_filesize()  # the HDF5 image's size, also inside a .keras zip
        try:
            with self._reading("its list of groups and datasets"):
                self._names = self._hard_links()
            with self._reading("the root group"):
                self._root = self._file["/"].id
            return self._build_entries(path)
        except BaseException:
            self._file.close()
            raise

    def _open_h5(self, path: str) -> Any:
        """Open the HDF5 file read-only (a subclass opens it from elsewhere, e.g. inside a zip)."""
        import h5py

        try:
            return h5py.File(path, "r")
        except OSError as exc:
            raise CorruptCheckpointError(
                f"{path} has an HDF5 signature but h5py cannot open it ({exc}).",
                hint="The file is damaged or still being written; save it again.",
            ) from None

    @contextlib.contextmanager
    def _image(self) -> Iterator[IO[bytes]]:
        """The HDF5 image's raw bytes, for checks h5py cannot make (a subclass reads them from elsewhere)."""
        with open(self.path, "rb") as f:
            yield f

    def read(self, key: str) -> np.ndarray:
        """Read one dataset by canonical key into a fresh array in native byte order."""
        where = self._dataset_path[key]
        if self._file is None:
            array = self._read_fast(key)
        else:
            array = self._read_h5py(key, where)
        return _native(array)

    def _read_fast(self, key: str, out: np.ndarray | None = None) -> np.ndarray:
        """A dataset's bytes as the fast reader located them, into ``out`` or a fresh array of the file's dtype."""
        import numpy as np  # here, not at the top: listing a file (`regraft inspect`) needs no numpy

        where = self._dataset_path[key]
        dataset = self._datasets[where]
        if out is None:
            try:
                out = np.empty(dataset.shape, dtype=dataset.dtype)
            except MemoryError:
                raise self._no_memory(key, where) from None
        flat = out.reshape(-1).view(np.uint8)
        if dataset.compact is not None:
            flat[:] = np.frombuffer(dataset.compact, dtype=np.uint8)
            return out
        view, done = memoryview(flat), 0
        try:
            while done < dataset.size:
                got = os.preadv(self._fd, [view[done:]], self._start + dataset.offset + done)  # type: ignore[operator]
                if not got:
                    raise OSError(f"the file ends before byte {dataset.offset + dataset.size:,}, where the tensor ends")
                done += got
        except OSError as exc:
            raise self._unreadable(key, where, exc) from None
        return out

    def _unreadable(self, key: str, where: str, exc: BaseException) -> CorruptCheckpointError:
        return CorruptCheckpointError(
            f"Cannot read tensor '{key}' (dataset '/{where}') from {self.path}: {_reason(exc)}.",
            hint="The file is damaged; save the weights again.",
        )

    def _no_memory(self, key: str, where: str) -> SourceError:
        entry = self._entries[key]
        return SourceError(
            f"Not enough memory to read tensor '{key}' (dataset '/{where}', shape {entry.shape} of {entry.dtype}) "
            f"from {self.path}.",
            hint="Free memory, or load on a machine with more of it.",
        )

    def _read_h5py(self, key: str, where: str) -> np.ndarray:
        import numpy as np

        try:
            # h5py returns a fresh array (a numpy scalar for shape ()): no second copy.
            return np.asarray(self._file[where][()])
        except MemoryError:
            raise self._no_memory(key, where) from None
        except (OSError, RuntimeError, ValueError, TypeError, KeyError) as exc:
            raise self._unreadable(key, where, exc) from None

    def read_into(self, key: str, out: np.ndarray, checked: bool = False) -> None:
        """Read one dataset straight into ``out`` (no intermediate array) when the dtypes agree."""
        if self._file is None:
            fast = self._datasets[self._dataset_path[key]]
            if fast.dtype != out.dtype or fast.shape != out.shape or not out.size or not out.flags.c_contiguous:
                super().read_into(key, out)
            else:
                self._read_fast(key, out)
            return
        dataset = self._file[self._dataset_path[key]]
        if dataset.dtype != out.dtype or tuple(dataset.shape) != out.shape or not out.size:
            super().read_into(key, out)
            return
        try:
            dataset.read_direct(out)
        except (OSError, RuntimeError, ValueError, TypeError, KeyError) as exc:
            raise self._unreadable(key, self._dataset_path[key], exc) from None

    def read_slice(self, key: str, index: tuple[slice, ...]) -> np.ndarray:
        """Read one block of a dataset through h5py's hyperslab selection (``dataset[index]``).

        A contiguous dataset without filters is read as the block's runs, counted with
        :func:`~regraft.sources._slices.touched_bytes` (HDF5's sieve buffer may read a
        little more); a chunked or filtered one is read whole (:meth:`Source.read_slice`).
        """
        import numpy as np

        from regraft.sources._slices import touched_bytes

        where = self._dataset_path[key]
        if self._file is None:
            return self._read_slice_fast(key, self._datasets[where], index)
        dataset = self._file[where]
        offset = dataset.id.get_offset() if dataset.chunks is None and dataset.dtype.kind in "fiubV" else None
        if offset is None or not dataset.shape:
            return super().read_slice(key, index)
        try:
            array = np.asarray(dataset[index])
        except (OSError, RuntimeError, ValueError, TypeError, KeyError) as exc:
            raise self._unreadable(key, where, exc) from None
        self.sliced_bytes_read += touched_bytes(offset, tuple(dataset.shape), dataset.dtype.itemsize, index)
        return _native(array)

    def _read_slice_fast(self, key: str, dataset: _hdf5.Dataset, index: tuple[slice, ...]) -> np.ndarray:
        """One block of a contiguous dataset, copied out of a map of the file (only its pages are read)."""
        from regraft.sources._slices import read_block, touched_bytes

        if dataset.offset is None or not dataset.shape or dataset.type.kind not in "fiubV":
            return super().read_slice(key, index)
        start = self._start + dataset.offset
        try:
            with mmap.mmap(self._fd, start + dataset.size, access=mmap.ACCESS_READ) as mapped:  # type: ignore[arg-type]
                array = read_block(mapped, start, dataset.dtype, dataset.shape, index)
        except (OSError, ValueError) as exc:
            raise self._unreadable(key, dataset.path, exc) from None
        self.sliced_bytes_read += touched_bytes(dataset.offset, dataset.shape, dataset.dtype.itemsize, index)
        return _native(array)

    def verify(self, key: str) -> None:
        """Check a dataset can be read: from metadata alone for plain contiguous data, else by reading it.

        HDF5 stores no checksum for unfiltered data, so reading it would only
        prove the bytes are there; for a contiguous dataset without filters
        that is the check that its byte range lies inside the file (which the
        fast reader made on open).
        """
        if self._file is None:
            if self._datasets[self._dataset_path[key]].type.kind not in "fiub":
                self.read(key)
            return
        dataset = self._file[self._dataset_path[key]]
        if dataset.chunks is None and dataset.dtype.kind in "fiub" and dataset.external is None:
            offset = dataset.id.get_offset()
            if offset is not None and offset + dataset.id.get_storage_size() <= self._size:  # the HDF5 image's size
                return
        self.read(key)

    def layers(self) -> dict[str, tuple[str | None, str | None]]:
        """Every saved layer (weightless ones too), with its Keras name and, for list items, its class."""
        return dict(self._layers)

    def close(self) -> None:
        """Close the HDF5 file."""
        if self._file is not None:
            self._file.close()
        self._close_image()

    # ----------------------------------------------------------------------------------------- metadata

    def _reading(self, what: str) -> _Reading:
        """Turn h5py's failures on damaged metadata (KeyError, RuntimeError, OSError, ...) into one error."""
        return _Reading(self.path, what)

    def _refuse(self, where: str, problem: str, hint: str = _NOT_KERAS) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"{self.path}: '{where}' {problem}.", hint=hint)

    def _hard_links(self) -> set[str]:
        """Every path in the file; refuses the file if any link is soft, external or user-defined."""
        import h5py

        links: list[tuple[bytes, bool]] = []

        def visit(name: bytes, info: object) -> None:
            # Nothing may raise in here: h5py turns an exception in a visit callback into SystemError.
            links.append((name, info.type == h5py.h5l.TYPE_HARD))  # type: ignore[attr-defined]

        try:
            self._file.id.links.visit(visit, info=True)
        except SystemError as exc:  # a Ctrl-C at the callback's first instruction leaves h5py as this
            interrupt = exc.__cause__ or exc.__context__
            if isinstance(interrupt, KeyboardInterrupt):
                raise KeyboardInterrupt from None
            raise
        names: set[str] = set()
        others: list[str] = []
        for name, hard in links:
            text = name.decode("utf-8")  # a UnicodeDecodeError is reported by _reading
            (names.add if hard else others.append)(text)
        if others:
            shown = "; ".join(self._describe_link(name) for name in sorted(others)[:5])
            more = f" and {len(others) - 5} more" if len(others) > 5 else ""
            raise UnsupportedFormatError(
                f"{self.path} holds {len(others)} link(s) that regraft does not follow: {shown}{more}. "
                "Keras never writes links; a link can lead out of the file or in a loop.",
                hint="Save the weights again with model.save_weights(), or replace each link by a copy of its data.",
            )
        return names

    def _describe_link(self, name: str) -> str:
        import h5py

        try:
            value = self._file.id.links.get_val(name.encode())
        except (KeyError, RuntimeError, OSError, ValueError):
            return f"'/{name}' (unreadable link)"
        if isinstance(value, tuple):  # external: (file, object)
            file, target = (part.decode(errors="replace") for part in value)
            return f"'/{name}' -> external file '{file}', object '{target}'"
        if isinstance(value, bytes) and self._file.id.links.get_info(name.encode()).type == h5py.h5l.TYPE_SOFT:
            return f"'/{name}' -> soft link to '{value.decode(errors='replace')}'"
        return f"'/{name}' (a user-defined link)"

    def _open(self, base: object, name: str, where: str, listed_in: str = "") -> object:
        """The object at ``name`` relative to ``base`` (a low-level id); ``where`` is its full path for messages.

        ``listed_in`` says which attribute named it (Keras 2), so that a missing
        object is told apart from a damaged one.
        """
        if isinstance(base, _hdf5.Group):
            return self._open_fast_object(base, name)
        import h5py

        with self._reading(f"'{where}'"):
            try:
                return h5py.h5o.open(base, name.encode())  # type: ignore[arg-type]
            except KeyError as exc:
                if not listed_in or not any(m in str(exc) for m in ("doesn't exist", "component not found")):
                    raise
                raise self._refuse(
                    where,
                    f"is listed in {listed_in} but does not exist",
                    hint="The file is incomplete or was altered; save the weights again with model.save_weights().",
                ) from None

    def _open_fast_object(self, base: _hdf5.Group, name: str) -> _hdf5.Group | _hdf5.Dataset:
        """The fast reader's object at ``name``, a path relative to ``base``.

        The reader's paths hold no empty, ``.`` or ``..`` component, so a name that
        HDF5 would resolve in another way (``/x``, ``a//b``, ``./a``) is not found and
        left to h5py, like a missing one.
        """
        found = self._objects.get(f"{base.path}/{name}" if base.path else name)
        if found is None:
            raise _hdf5.NotHandled(f"no object '{name}' in '/{base.path}'")
        return found

    def _attribute(self, oid: object, where: str, name: str, listed: bool = False) -> object:
        """One attribute of an object (a low-level id), or ``None`` when absent; only needed attributes are decoded.

        With ``listed``, the fast reader gives a one-dimensional attribute as a :class:`_Items`
        list, without numpy (its ``tolist()``).
        """
        if isinstance(oid, (_hdf5.Group, _hdf5.Dataset)):
            attribute = oid.attributes.get(name)
            if attribute is None:
                return None
            if listed:
                items = _hdf5.attribute_list(self._view, attribute, self._global_heaps)
                if items is not None:
                    return _Items(items)
            return _hdf5.attribute_value(self._view, attribute, self._global_heaps)
        import h5py

        with self._reading(f"attribute '{name}' of '{where}'"):
            if not h5py.h5a.exists(oid, name.encode()):  # type: ignore[arg-type]
                return None
            attribute = h5py.h5a.open(oid, name.encode())  # type: ignore[arg-type]
            kind = attribute.get_type()
            # Decode only strings and plain numbers: h5py crashes (SIGSEGV) decoding a
            # variable-length sequence whose type bytes were damaged, and Keras writes none.
            if not isinstance(kind, (h5py.h5t.TypeStringID, h5py.h5t.TypeIntegerID, h5py.h5t.TypeFloatID)):
                raise self._refuse(
                    where,
                    f"has attribute '{name}' of HDF5 type class {_TYPE_CLASSES.get(kind.get_class(), kind.get_class())}, "
                    "where Keras writes strings; it was not decoded",
                    hint="The file is damaged or was altered; save the weights again with model.save_weights().",
                )
            if isinstance(kind, h5py.h5t.TypeStringID) and kind.is_variable_str():
                self._check_global_heaps()
            return _attribute_value(attribute)

    def _check_global_heaps(self) -> None:
        """Refuse a damaged HDF5 global heap before h5py decodes a variable-length string from it.

        HDF5 walks a global heap collection object by object, each advancing by its
        declared size; a damaged size of 0 (or one that runs past the collection)
        makes that walk spin forever inside the C library, holding the GIL, where no
        time limit can stop it. So, once per file and before the first such string
        is read, every collection outside the datasets' bytes is walked here with
        the same rules and a bound. A collection HDF5 itself refuses (wrong version,
        size under 4 KiB or past the end) is left to h5py, which fails cleanly.
        """
        import h5py

        if self._heaps_checked:
            return
        with self._reading("its list of datasets"):
            for name in self._names:
                if "/" + name not in self._extents:  # datasets described already are not opened again
                    oid = h5py.h5o.open(self._file.id, name.encode())
                    if isinstance(oid, h5py.h5d.DatasetID):
                        self._extent(oid, "/" + name)
        spans = [span for span in self._extents.values() if span is not None]  # contiguous datasets: never metadata
        gaps, start = [], 0
        for begin, end in sorted(spans):
            if begin < start or end > self._size:
                continue  # overlapping or past the end: damaged, so its bytes are scanned too
            gaps.append((start, begin))
            start = end
        gaps.append((start, self._size))
        with self._image() as image:
            for begin, end in gaps:
                position = begin
                while position < end - len(_GCOL) + 1:
                    image.seek(position)
                    block = _read(image, min(_SCAN_BLOCK, end - position))
                    found = block.find(_GCOL)
                    if found < 0:
                        position += max(1, len(block) - len(_GCOL) + 1)
                        continue
                    position += found
                    position += self._walk_global_heap(image, position)
        self._heaps_checked = True

    def _extent(self, oid: Any, where: str, stored: int | None = None) -> None:
        """Note where a contiguous dataset's bytes are (its offset is ``None`` otherwise)."""
        offset = oid.get_offset()
        size = oid.get_storage_size() if stored is None else stored
        self._extents[where] = None if offset is None else (int(offset), int(offset) + int(size))

    def _walk_global_heap(self, image: IO[bytes], at: int) -> int:
        """Check the collection whose signature is at ``at``; how far to skip past it."""
        image.seek(at)
        header = _read(image, 16)
        if len(header) < 16 or header[4] != 1:
            return 1  # not a collection HDF5 would read: only a signature-like string
        size = struct.unpack_from("<Q", header, 8)[0]
        if size < _GCOL_MIN or at + size > self._size:
            return 1
        body = _read(image, size - 16)
        if len(body) < size - 16:
            return 1  # the file ended early: HDF5 refuses the collection itself
        offset, end = 0, len(body)
        while end - offset >= 16:  # a smaller tail is free space without a header
            index = struct.unpack_from("<H", body, offset)[0]
            declared = struct.unpack_from("<Q", body, offset + 8)[0]
            step = 16 + (declared + 7) // 8 * 8 if index else declared  # object 0 is free space, header included
            if step == 0 or step > end - offset:
                raise self._refuse(
                    f"global heap at byte {at:,}",
                    f"holds an object (index {index}) of {declared:,} bytes at byte {at + 16 + offset:,}, "
                    f"{'which would make HDF5 loop forever' if step == 0 else 'past the end of its collection'}; "
                    "its strings (layer and weight names) cannot be read",
                    hint="The file is damaged; save the weights again with model.save_weights().",
                )
            offset += step
        return size

    def _attribute_names(self, oid: object, where: str, name: str) -> list[str] | None:
        """A Keras 2 list-of-names attribute (``layer_names``, ``weight_names``), joined from its chunks.

        tf-keras splits a list longer than an object header holds into ``name0``,
        ``name1``, ...; ``None`` when the attribute is absent.
        """
        value = self._attribute(oid, where, name, listed=True)
        parts = [(name, value)] if value is not None else []
        while value is None:
            chunk = f"{name}{len(parts)}"
            found = self._attribute(oid, where, chunk, listed=True)
            if found is None:
                break
            parts.append((chunk, found))
        if not parts:
            return None
        out: list[str] = []
        for attr, value in parts:
            if type(value) is _Items:  # the fast reader's one-dimensional list
                items, size, ndim = value, len(value), 1
            else:
                import numpy as np

                array = np.asarray(value)
                items, size, ndim = array.tolist(), array.size, array.ndim
            if size == 0 and ndim == 1:  # tf-keras writes [] as an empty float array
                continue
            if ndim != 1 or not all(isinstance(v, (bytes, str)) for v in items):
                raise self._refuse(where, f"has attribute '{attr}' = {_short(value)}; expected a list of names")
            for item in items:
                try:
                    text = item.decode("utf-8") if isinstance(item, bytes) else item
                except UnicodeDecodeError:
                    raise self._refuse(where, f"has attribute '{attr}' with a name that is not UTF-8: {item!r}") from None
                if not text:
                    raise self._refuse(where, f"has attribute '{attr}' with an empty name")
                out.append(text)
        return out

    def _describe(self, oid: object, where: str) -> tuple[tuple[int, ...], str]:
        """Shape and dtype name of a dataset, refusing what is not numbers stored in this file."""
        if isinstance(oid, _hdf5.Dataset):
            # The fast reader returns only contiguous or compact datasets without filters or external
            # files, their declared size stored inside the image: the size checks below hold.
            # Its type is one of numpy's plain ones, described without numpy.
            datatype = oid.type
            if datatype.kind in _NUMERIC:
                return oid.shape, datatype.name
            dtype, kind, itemsize, plain = None, datatype.kind, datatype.itemsize, True
            shape, virtual, external, filters, stored = oid.shape, False, 0, 0, oid.size
        else:
            import h5py

            with self._reading(f"dataset '{where}'"):
                dtype, shape = _dtype(oid.get_type()), oid.shape  # type: ignore[attr-defined]
                plist = oid.get_create_plist()  # type: ignore[attr-defined]
                virtual = plist.get_layout() == h5py.h5d.VIRTUAL
                external, filters = plist.get_external_count(), plist.get_nfilters()
                stored = int(oid.get_storage_size())  # type: ignore[attr-defined]
                self._extent(oid, where, stored)
            kind, itemsize, plain = dtype.kind, dtype.itemsize, dtype.fields is None and dtype.subdtype is None
        if kind in _NUMERIC and plain:
            name = _dtype_name(dtype)
        elif kind == "V" and plain:
            tag = self._attribute(oid, where, "dtype")
            if _text(tag) != "bfloat16" or itemsize != 2:
                raise self._refuse(
                    where,
                    f"holds opaque {itemsize}-byte values tagged dtype={_short(tag)}; "
                    "regraft reads Keras' opaque type only as 2-byte values tagged 'bfloat16'",
                )
            name = "bfloat16"
        else:
            raise self._refuse(
                where,
                f"holds {_dtype_words(oid.dtype if dtype is None else dtype)}, not numbers",
                hint="regraft loads numeric weights only (bool, int, float, complex, bfloat16); "
                "remove or convert this dataset, or save the weights again with model.save_weights().",
            )
        if shape is None:
            raise self._refuse(where, "holds no data (an HDF5 null dataspace), not an array")
        shape = tuple(int(d) for d in shape)
        if virtual or external:
            raise self._refuse(
                where,
                "keeps its bytes in other files (a virtual dataset)" if virtual
                else "keeps its bytes in external raw files",
                hint="regraft reads only bytes stored in the weights file itself; "
                "save the weights again with model.save_weights().",
            )
        declared = math.prod(shape) * itemsize
        size = f"shape {shape} of {name} ({declared:,} bytes)"
        if declared > _MAX_BYTES:
            raise self._refuse(where, f"declares {size}, more than any array can hold")
        if stored > self._size:
            raise self._refuse(where, f"claims {stored:,} bytes of storage but the whole file is {self._size:,} bytes")
        if not filters and stored < declared:
            raise self._refuse(
                where,
                f"declares {size} but stores {stored:,} bytes: the rest was never written and would read as fill values",
            )
        if filters and declared > _EXPANSION_FLOOR and declared > _MAX_EXPANSION * stored:
            raise self._refuse(
                where,
                f"declares {size} from {stored:,} compressed bytes, more than {_MAX_EXPANSION}x; "
                "it would not fit in memory or was never written",
            )
        return shape, name

    def _base(self) -> object:
        """Where paths are opened from: the fast reader's root group, or h5py's file id."""
        return self._root if self._file is None else self._file.id

    @staticmethod
    def _is_dataset(oid: object) -> bool:
        if isinstance(oid, _hdf5.Dataset):
            return True
        import h5py

        return isinstance(oid, h5py.h5d.DatasetID)

    @staticmethod
    def _is_group(oid: object) -> bool:
        if isinstance(oid, _hdf5.Group):
            return True
        import h5py

        return isinstance(oid, h5py.h5g.GroupID)

    def _keras3_entries(self, names: set[str]) -> list[SourceEntry]:
        out = []
        root = self._base()
        found: list[tuple[str, tuple[int, ...], str]] = []
        if self._file is None:  # the fast reader's datasets, by path (their order does not matter: sorted below)
            datasets = self._datasets
            for name, oid in self._objects.items():
                if type(oid) is _hdf5.Dataset and _VAR.search(name):
                    datasets[name] = oid
                    if oid.type.kind in _NUMERIC:  # what _describe answers for the fast reader's numbers
                        found.append((name, oid.shape, oid.type.name))
                    else:
                        found.append((name, *self._describe(oid, "/" + name)))
        for name in sorted(names) if self._file is not None else ():
            if _VAR.search(name):
                # The low-level handle gives shape and dtype 4x faster than file[name].
                oid = self._open(root, name, "/" + name)
                if self._is_dataset(oid):
                    found.append((name, *self._describe(oid, "/" + name)))
        for name in sorted(n for n in names if n == "vars" or n.endswith("/vars")):
            layer = name[: -len("vars")].rstrip("/")
            if layer == "optimizer" or layer.startswith("optimizer/") or not layer:
                continue
            oid = self._open(root, name, "/" + name)
            if not self._is_group(oid):
                raise self._refuse("/" + name, "is a dataset where Keras writes the group of a layer's variables")
            layer_name = self._layer_name(oid, "/" + name)
            parent, _, segment = layer.rpartition("/")
            kind = _COUNTER.sub("", segment) if parent.rpartition("/")[2] == "layers" else None
            self._layers[layer] = (layer_name, kind)
        for name, shape, dtype in found:
            layer, marker, index = name.rpartition("/vars/")
            if not marker:
                layer, marker, index = ("", "vars/", name[len("vars/") :]) if name.startswith("vars/") else ("", "", "")
            if not marker or not index.isdigit():
                continue
            layer_name = self._layers[layer][0] if layer in self._layers else None
            kind = WEIGHT
            if layer == "optimizer" or layer.startswith("optimizer/"):
                kind = BOOKKEEPING if shape == () else OPTIMIZER_SLOT
            self._dataset_path[name] = name
            out.append(SourceEntry(name, shape, dtype, kind, layer, None, int(index), layer_name))
        order = {WEIGHT: 0, OPTIMIZER_SLOT: 1, BOOKKEEPING: 2}
        return sorted(out, key=lambda e: (order[e.kind], e.layer, e.index or 0))

    def _path_of(self, dataset: object, where: str) -> str:
        """The path a dataset was opened by, without the leading ``/``."""
        if isinstance(dataset, _hdf5.Dataset):
            return dataset.path
        import h5py

        with self._reading(f"the name of dataset '{where}'"):
            return h5py.h5i.get_name(dataset).decode("utf-8").lstrip("/")  # type: ignore[arg-type]

    def _note_dataset(self, path: str, dataset: object) -> None:
        """Keep the fast reader's record of a dataset, from which it is read."""
        if isinstance(dataset, _hdf5.Dataset):
            self._datasets[path] = dataset

    def _layer_name(self, oid: object, where: str) -> str | None:
        """The ``name`` attribute Keras 3 writes on a ``vars`` group: a non-empty string, or absent."""
        value = self._attribute(oid, where, "name")
        if value is None:
            return None
        text = _text(value)
        if not text or "/" in text:
            raise self._refuse(
                where,
                f"has attribute name = {_short(value)}; Keras writes the layer's name there, a non-empty string without '/'",
                hint=f"Delete or fix the attribute (with h5py: del f['{where}'].attrs['name']), "
                "or save the weights again with model.save_weights().",
            )
        return text

    def _keras2_entries(self, layer_names: list[str]) -> list[SourceEntry]:
        out = []  # keys are the weights' own names: no layers to add
        owner: dict[str, str] = {}
        for layer_name in layer_names:
            where = "/" + layer_name.lstrip("/")
            group = self._open(self._base(), layer_name, where, "the root's layer_names")
            if not self._is_group(group):
                raise self._refuse(where, "is listed in the root's layer_names but is not a group")
            for index, weight_name in enumerate(self._attribute_names(group, where, "weight_names") or []):
                path = where.rstrip("/") + "/" + weight_name
                dataset = self._open(group, weight_name, path, f"the weight_names of '{where}'")
                if not self._is_dataset(dataset):
                    raise self._refuse(path, f"is listed in the weight_names of '{where}' but is not a dataset")
                shape, dtype = self._describe(dataset, path)
                key = keras2_key(layer_name, weight_name)
                if key in owner:
                    raise UnsupportedFormatError(
                        f"{self.path}: layers '{owner[key]}' and '{layer_name}' both hold a weight that reads as "
                        f"'{key}'; regraft cannot tell them apart.",
                        hint="Save the weights in TensorFlow format (model.save_weights('prefix')) or as .weights.h5.",
                    )
                owner[key] = layer_name
                parent, _, role = key.rpartition("/")
                self._dataset_path[key] = self._path_of(dataset, path)
                self._note_dataset(self._dataset_path[key], dataset)
                out.append(SourceEntry(key, shape, dtype, WEIGHT, parent, role, index, layer_name))
        return out


class _Items(list):
    """A one-dimensional attribute's items, as the fast reader gives them without numpy (``array.tolist()``)."""

    __slots__ = ()


class _Reading:
    """The context of :meth:`KerasH5._reading` (a class: it is entered once per dataset, and a
    generator-based context manager costs several times more)."""

    __slots__ = ("path", "what")

    def __init__(self, path: str, what: str) -> None:
        self.path, self.what = path, what

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> bool:
        if exc is None or isinstance(exc, RegraftError):
            return False
        if isinstance(exc, (OSError, RuntimeError, KeyError, ValueError, TypeError, UnicodeDecodeError)):
            raise CorruptCheckpointError(
                f"{self.path}: cannot read {self.what}: {_reason(exc)}.",
                hint="The file is damaged or was not written by Keras; save the weights again with model.save_weights().",
            ) from None
        return False


_DTYPES: dict[Any, np.dtype] = {}  # HDF5 type (by its encoding) -> numpy dtype, for numeric types
_DTYPE_NAMES: dict[np.dtype, str] = {}


def _dtype(kind: Any) -> np.dtype:
    """The numpy dtype of an HDF5 type id; numeric types are converted once per file type.

    A Keras file holds thousands of datasets of two or three types, and h5py builds
    a new dtype for each (the slowest step of describing a dataset).
    """
    import h5py

    if not isinstance(kind, (h5py.h5t.TypeIntegerID, h5py.h5t.TypeFloatID)):
        return kind.dtype
    code = kind.encode()
    dtype = _DTYPES.get(code)
    if dtype is None:
        dtype = _DTYPES[code] = kind.dtype
    return dtype


def _dtype_name(dtype: np.dtype) -> str:
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        name = _DTYPE_NAMES[dtype] = dtype.name
    return name


def _attribute_value(attribute: Any) -> object:
    """The value of an open attribute (a low-level id), decoded as ``h5py.AttributeManager`` does.

    Strings come back as ``str`` (variable-length ones decoded with ``surrogateescape``,
    fixed-length ones as ``bytes``), a scalar as a numpy scalar, an empty dataspace as
    ``h5py.Empty``. Reading through the id already open spares a second ``H5Aopen``.
    """
    import h5py
    import numpy as np

    shape, dtype = attribute.shape, attribute.dtype
    if shape is None:
        return h5py.Empty(dtype)
    memory_type = h5py.h5t.py_create(dtype)
    if dtype.subdtype is not None:  # an array type: numpy holds its shape in the array's
        dtype, inner = dtype.subdtype
        shape = tuple(shape) + tuple(inner)
    array = np.zeros(shape, dtype=dtype, order="C")
    attribute.read(array, mtype=memory_type)
    string = h5py.check_string_dtype(dtype)
    if string is not None and string.length is None:
        array = np.array([b.decode("utf-8", "surrogateescape") for b in array.flat], dtype=dtype).reshape(array.shape)
    return array[()] if array.ndim == 0 else array


def keras2_key(group: str, weight_name: str) -> str:
    """The key of a Keras 2 ``.h5`` weight: its path from the top-level layer group that holds it.

    A top-level layer's weights are named after it (``dense/kernel:0`` in group
    ``dense``); a nested model's group holds its layers' weights under their own
    names (``proj/kernel:0`` in group ``encoder``, and ``decoder`` may hold another
    ``proj/kernel:0``), so the group is put in front; a subclassed model's weight
    names carry the model's scope first (``tm/dense_1/kernel:0`` in ``dense_1``).

    Example:
        >>> keras2_key("dense", "dense/kernel:0"), keras2_key("encoder", "proj/kernel:0")
        ('dense/kernel', 'encoder/proj/kernel')
        >>> keras2_key("dense_1", "tm/dense_1/kernel:0")
        'dense_1/kernel'
    """
    name = weight_name[:-2] if weight_name.endswith(":0") else weight_name
    segments = name.split("/")
    if group in segments[:-1]:
        return "/".join([group, *segments[segments.index(group) + 1 :]])
    return f"{group}/{name}"


def _text(value: object) -> str | None:
    """A string attribute as ``str`` (h5py gives ``str``, ``bytes`` or a 0-d array); ``None`` otherwise."""
    if not isinstance(value, (str, bytes)) and "numpy" in sys.modules:  # no numpy array without numpy imported
        import numpy as np

        if isinstance(value, np.ndarray) and value.shape == ():
            value = value.item()
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    return value if isinstance(value, str) else None


def _read(image: IO[bytes], size: int) -> bytes:
    """``size`` bytes from ``image`` or up to its end (a raw file object may return fewer per read)."""
    parts, left = [], size
    while left > 0:
        part = image.read(left)
        if not part:
            break
        parts.append(part)
        left -= len(part)
    return b"".join(parts)


def _short(value: object) -> str:
    import numpy as np

    text = repr(value.tolist() if isinstance(value, (np.ndarray, np.generic)) else value)
    return text if len(text) <= 60 else text[:57] + "..."


def _native(array: np.ndarray) -> np.ndarray:
    """A tensor as read from the file, in the dtype regraft gives it: Keras stores bfloat16
    as opaque bytes (with a 'dtype' attribute), viewed here as bfloat16; other data in
    native byte order."""
    if array.dtype.kind == "V":
        from regraft.naming import dtype_of

        return array.view(dtype_of("bfloat16"))
    return array if array.dtype.isnative else array.astype(array.dtype.newbyteorder("="))


def _dtype_words(dtype: np.dtype) -> str:
    import h5py

    string = h5py.check_string_dtype(dtype)
    if string is not None:
        return "variable-length strings" if string.length is None else "fixed-length strings"
    if h5py.check_ref_dtype(dtype) is not None:
        return "HDF5 object references"
    if h5py.check_vlen_dtype(dtype) is not None:
        return "variable-length sequences"
    if dtype.fields is not None:
        return f"compound records (fields {', '.join(dtype.fields)})"
    if dtype.subdtype is not None:
        return f"an array type ({dtype.subdtype[0].name} x {dtype.subdtype[1]})"
    return f"values of type {dtype}"


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().rstrip(".")
    return text[0].lower() + text[1:] if text else type(exc).__name__
