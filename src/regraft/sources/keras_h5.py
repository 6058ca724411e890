"""Keras weight files in HDF5: Keras 3 ``.weights.h5`` and Keras 2 (tf-keras) ``.h5``.

Keras 3 writes ``<path>/vars/<i>`` datasets, ``<path>`` being the attribute path
from the model with class-name counters for list items (``layers/dense_1``), and
stores the layer's own name as the ``name`` attribute of each ``vars`` group.
Keras 2 writes one group per layer (root attribute ``layer_names``) whose
``weight_names`` attribute lists datasets named like ``dense/kernel:0``.
"""

from __future__ import annotations

import os
import re

import numpy as np

from regraft.entries import BOOKKEEPING, OPTIMIZER_SLOT, WEIGHT, SourceEntry
from regraft.errors import CorruptCheckpointError, UnsupportedFormatError
from regraft.sources.base import Source

__all__ = ["KerasH5", "keras2_key"]

_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_VAR = re.compile(r"(^|/)vars/\d+$")


class KerasH5(Source):
    """A Keras HDF5 weights file, opened read-only; datasets are read on demand."""

    @classmethod
    def detect(cls, path: str) -> bool:
        """True when ``path`` is an HDF5 file (by its signature, not its name)."""
        if not os.path.isfile(path):
            return False
        with open(path, "rb") as f:
            return f.read(8) == _HDF5_SIGNATURE

    def __init__(self, path: str) -> None:
        import h5py

        self._layers: dict[str, tuple[str | None, str | None]] = {}  # layer key -> (Keras name, class)
        self._dataset_path: dict[str, str] = {}  # canonical key -> HDF5 dataset path

        try:
            self._file = h5py.File(path, "r")
        except OSError as exc:
            raise CorruptCheckpointError(
                f"{path} has an HDF5 signature but h5py cannot open it ({exc}).",
                hint="The file is damaged or still being written; save it again.",
            ) from None
        self.files = (path,)
        try:
            if "layer_names" in self._file.attrs:
                self.format, self.namespace = "keras2-h5", "name"
                entries = self._keras2_entries()
            elif "layers" in self._file or "vars" in self._file:
                self.format, self.namespace = "keras-h5", "h5"
                entries = self._keras3_entries()
            else:
                top = ", ".join(sorted(self._file.keys())[:6]) or "nothing"
                raise UnsupportedFormatError(
                    f"{path} is an HDF5 file but not Keras weights: its top level holds {top}, "
                    "not the 'layers'/'vars' groups of model.save_weights() nor Keras 2's 'layer_names'.",
                    hint="Pass a file written by model.save_weights('x.weights.h5') or a TensorFlow checkpoint.",
                )
        except Exception:
            self._file.close()
            raise
        super().__init__(path, entries)

    def read(self, key: str) -> np.ndarray:
        """Read one dataset by canonical key into a fresh array."""
        dataset = self._file[self._dataset_path[key]]
        try:
            array = np.array(dataset[()], copy=True)
            if array.dtype.kind == "V":  # Keras stores bfloat16 as opaque bytes with a 'dtype' attribute
                from regraft.naming import dtype_of

                array = array.view(dtype_of(_dtype_name(dataset)))
            return array
        except OSError as exc:
            raise CorruptCheckpointError(
                f"Cannot read tensor '{key}' from {self.path}: {exc}.",
                hint="The file is damaged; save the weights again.",
            ) from None

    def read_into(self, key: str, out: np.ndarray) -> None:
        """Read one dataset straight into ``out`` (no intermediate array) when the dtypes agree."""
        dataset = self._file[self._dataset_path[key]]
        if dataset.dtype != out.dtype or tuple(dataset.shape) != out.shape or not out.size:
            super().read_into(key, out)
            return
        try:
            dataset.read_direct(out)
        except OSError as exc:
            raise CorruptCheckpointError(
                f"Cannot read tensor '{key}' from {self.path}: {exc}.",
                hint="The file is damaged; save the weights again.",
            ) from None

    def verify(self, key: str) -> None:
        """Check a dataset can be read: from metadata alone for plain contiguous data, else by reading it.

        HDF5 stores no checksum for unfiltered data, so reading it would only
        prove the bytes are there; for a contiguous dataset without filters
        that is the check that its byte range lies inside the file.
        """
        dataset = self._file[self._dataset_path[key]]
        if dataset.chunks is None and dataset.dtype.kind in "fiub" and dataset.external is None:
            offset = dataset.id.get_offset()
            if offset is not None and offset + dataset.id.get_storage_size() <= os.path.getsize(self.path):
                return
        self.read(key)

    def layers(self) -> dict[str, tuple[str | None, str | None]]:
        """Every saved layer (weightless ones too), with its Keras name and, for list items, its class."""
        return dict(self._layers)

    def close(self) -> None:
        """Close the HDF5 file."""
        self._file.close()

    def _keras3_entries(self) -> list[SourceEntry]:
        import h5py

        out = []
        # Names first (h5py's visit), objects only for what is needed: building an
        # object for every node (visititems) costs 5x more on large models.
        names: list[str] = []
        self._file.visit(names.append)
        groups = [n for n in names if n == "vars" or n.endswith("/vars")]
        found: list[tuple[str, tuple[int, ...], str]] = []
        for name in names:
            if _VAR.search(name):
                # The low-level handle gives shape and dtype 4x faster than file[name].
                oid = h5py.h5o.open(self._file.id, name.encode())
                if isinstance(oid, h5py.h5d.DatasetID):
                    dtype = oid.dtype.name if oid.dtype.kind != "V" else _dtype_name(h5py.Dataset(oid))
                    found.append((name, tuple(int(d) for d in oid.shape), dtype))
        for name in groups:
            layer = name[: -len("vars")].rstrip("/")
            if layer == "optimizer" or layer.startswith("optimizer/") or not layer:
                continue
            layer_name = h5py.Group(h5py.h5o.open(self._file.id, name.encode())).attrs.get("name")
            parent, _, segment = layer.rpartition("/")
            kind = re.sub(r"_\d+$", "", segment) if parent.rpartition("/")[2] == "layers" else None
            self._layers[layer] = (layer_name.decode() if isinstance(layer_name, bytes) else layer_name, kind)
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

    def _keras2_entries(self) -> list[SourceEntry]:
        out = []  # keys are the weights' own names: no layers to add
        owner: dict[str, str] = {}
        for layer_name in _strings(self._file.attrs["layer_names"]):
            group = self._file[layer_name]
            for index, weight_name in enumerate(_strings(group.attrs.get("weight_names", []))):
                dataset = group[weight_name]
                key = keras2_key(layer_name, weight_name)
                if key in owner:
                    raise UnsupportedFormatError(
                        f"{self.path}: layers '{owner[key]}' and '{layer_name}' both hold a weight that reads as "
                        f"'{key}'; regraft cannot tell them apart.",
                        hint="Save the weights in TensorFlow format (model.save_weights('prefix')) or as .weights.h5.",
                    )
                owner[key] = layer_name
                parent, _, role = key.rpartition("/")
                self._dataset_path[key] = dataset.name
                shape = tuple(int(d) for d in dataset.shape)
                out.append(SourceEntry(key, shape, _dtype_name(dataset), WEIGHT, parent, role, index, layer_name))
        return out


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


def _strings(values: object) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]  # type: ignore[union-attr]


def _dtype_name(dataset: object) -> str:
    dtype = dataset.dtype  # type: ignore[attr-defined]
    # Keras stores bfloat16 as an opaque/void type or via ml_dtypes; keep the name it reports.
    return dtype.name if dtype.kind != "V" else str(dataset.attrs.get("dtype", dtype.name))  # type: ignore[attr-defined]
