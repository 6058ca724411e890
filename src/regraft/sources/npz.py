"""NumPy ``.npz`` archives (``np.savez``, ``np.savez_compressed``): one array per key.

An ``.npz`` is a zip whose members are ``KEY.npy`` files. Metadata comes from each
member's ``.npy`` header (magic, version, then a dict with ``descr``, ``fortran_order``
and ``shape``), read without reading the array; :meth:`NpzFile.read` reads one
member to its end, so zip's CRC32 of the member is checked. Object arrays would
need pickle and are refused.

Keys: as for safetensors (:mod:`regraft.sources._keystyle`), dotted PyTorch names
(``features.0.weight``) are read in the ``torch`` namespace as ``features/0/weight``;
other keys are variable names (``dense/kernel``, the ``name`` namespace).
"""

from __future__ import annotations

import mmap
import os
import zipfile

import numpy as np

from regraft.entries import BOOKKEEPING, WEIGHT, SourceEntry
from regraft.errors import CorruptCheckpointError, SourceError, UnsupportedFormatError
from regraft.sources._keystyle import canonical_key, is_torch_style, numbered
from regraft.sources._slices import read_block, touched_bytes
from regraft.sources.keras_archive import _data_offset
from regraft.sources.base import Source

__all__ = ["NpzFile"]

_RESAVE = "The file is damaged or was cut short; write it again with numpy.savez."


class NpzFile(Source):
    """An ``.npz`` archive of named arrays; each array is read on demand."""

    suffixes = (".npz",)

    slices_skip_checksum = True  # zip's CRC32 covers the whole member

    @classmethod
    def detect(cls, path: str) -> bool:
        """True for a zip whose members are all ``.npy`` files."""
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (OSError, zipfile.BadZipFile, ValueError):
            return False
        return bool(names) and all(n.endswith(".npy") for n in names)

    def __init__(self, path: str) -> None:
        self.path, self.format, self.files = path, "npz", (path,)
        try:
            self._zip = zipfile.ZipFile(path)
        except zipfile.BadZipFile as exc:
            raise CorruptCheckpointError(f"{path} is not a readable .npz archive: {exc} (a truncated or damaged "
                                         "zip file).", hint=_RESAVE) from None
        except OSError as exc:
            raise SourceError(f"{path} cannot be read: {exc.strerror or exc}.",
                              hint="Check the path and its permissions.") from None
        self._stored: dict[str, tuple[bool, np.dtype, int]] = {}
        try:
            members = {n[: -len(".npy")]: n for n in self._zip.namelist() if n.endswith(".npy")}
            others = [n for n in self._zip.namelist() if not n.endswith(".npy")]
            if others or not members:
                raise UnsupportedFormatError(
                    f"{path} is a zip archive but not an .npz of arrays (found: {', '.join(others[:4]) or 'nothing'}).",
                    hint="Pass a file written by numpy.savez(path, **arrays).")
            torch = is_torch_style(members)
            self.namespace = "torch" if torch else "name"
            self._member: dict[str, str] = {}
            entries = []
            for name, member in sorted(members.items()):
                shape, dtype = self._header(name, member)
                key = canonical_key(name, torch)
                self._member[key] = member
                layer, _, role = key.rpartition("/")
                kind = BOOKKEEPING if torch and role == "num_batches_tracked" else WEIGHT
                entries.append(SourceEntry(key, shape, dtype, kind, layer, role, None, None,
                                           (name,) if name != key else ()))
        except Exception:
            self._zip.close()
            raise
        super().__init__(path, numbered(entries))

    def _header(self, name: str, member: str) -> tuple[tuple[int, ...], str]:
        fmt = np.lib.format
        try:
            with self._zip.open(member) as f:
                version = fmt.read_magic(f)
                if version == (1, 0):
                    shape, fortran, dtype = fmt.read_array_header_1_0(f)
                else:
                    shape, fortran, dtype = fmt.read_array_header_2_0(f)
                self._stored[member] = (bool(fortran), dtype, f.tell())  # where the array's bytes start
        except (ValueError, zipfile.BadZipFile, EOFError, OSError) as exc:
            raise CorruptCheckpointError(f"{self.path}: array '{name}' has no valid .npy header ({exc}).",
                                         hint=_RESAVE) from None
        if dtype.hasobject:
            raise UnsupportedFormatError(
                f"{self.path}: array '{name}' holds Python objects (dtype {dtype}), which only pickle can read.",
                hint="Save numeric arrays only: numpy.savez(path, **{k: np.asarray(v, 'float32') ...}).")
        return tuple(int(d) for d in shape), dtype.name

    def read(self, key: str) -> np.ndarray:
        """Read one array (the member is read to its end, so its CRC32 is checked)."""
        member = self._member[key]
        try:
            with self._zip.open(member) as f:
                array = np.lib.format.read_array(f, allow_pickle=False)
                f.read()  # to the end: zipfile verifies the CRC there
        except (ValueError, zipfile.BadZipFile, EOFError, OSError) as exc:
            raise CorruptCheckpointError(f"Cannot read array '{key}' from {self.path}: {exc}.", hint=_RESAVE) from None
        return np.array(array, dtype=array.dtype.newbyteorder("="), copy=True, order="C")

    def read_slice(self, key: str, index: tuple[slice, ...]) -> np.ndarray:
        """Read one block of a stored (uncompressed) C-order member from a memory map of the archive.

        Not checked against the member's CRC32, which covers the whole member; a
        compressed or Fortran-order member is read whole (:meth:`Source.read_slice`).
        """
        member = self._member[key]
        info = self._zip.getinfo(member)
        fortran, dtype, header = self._stored[member]
        entry = self._entries[key]
        if info.compress_type != zipfile.ZIP_STORED or fortran or not entry.shape or dtype.hasobject:
            return super().read_slice(key, index)
        try:
            start = _data_offset(self.path, info) + header
            with open(self.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                if start + info.file_size - header > len(mapped):
                    raise ValueError(f"member '{member}' ends past the end of the file")
                block = read_block(mapped, start, dtype, tuple(entry.shape), index)
        except (ValueError, zipfile.BadZipFile, OSError) as exc:
            raise CorruptCheckpointError(f"Cannot read array '{key}' from {self.path}: {exc}.", hint=_RESAVE) from None
        self.sliced_bytes_read += touched_bytes(start, tuple(entry.shape), dtype.itemsize, index)
        return block

    def close(self) -> None:
        """Close the archive."""
        self._zip.close()
