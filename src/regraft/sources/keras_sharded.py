"""Sharded Keras 3 weights: ``model.save_weights("x.weights.json", max_shard_size=...)``.

Keras 3.15 writes ``x.weights.json`` and shards ``x_00000.weights.h5``,
``x_00001.weights.h5``… beside it. The JSON holds ``{"metadata": {"total_size": …},
"weight_map": {"/layers/dense/vars": "x_00000.weights.h5", …}}``: each key is a
``vars`` group's path, each value the shard holding it, or a list of shards when
a layer's variables were split across two (``vars/0`` in one, ``vars/1`` in the
next). Every shard is a ``.weights.h5`` file holding its part of the same layout,
so each is read by :class:`~regraft.sources.keras_h5.KerasH5` and the entries are
joined.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace

import numpy as np

from regraft.entries import OPTIMIZER_SLOT, WEIGHT, SourceEntry
from regraft.errors import CorruptCheckpointError, SourceError
from regraft.sources.base import Source
from regraft.sources.keras_h5 import KerasH5

__all__ = ["KerasSharded"]

_MAX_JSON = 100_000_000
_RESAVE = "Save the weights again with model.save_weights('x.weights.json', max_shard_size=...)."


def _weight_map(path: str) -> dict[str, list[str]] | None:
    """The ``weight_map`` of a sharded Keras weights file, each value a list; ``None`` if not one."""
    try:
        if not os.path.isfile(path) or os.path.getsize(path) > _MAX_JSON:
            return None
        with open(path, "rb") as f:
            data = json.loads(f.read())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        return None
    out = {}
    for group, shards in weight_map.items():
        shards = [shards] if isinstance(shards, str) else shards
        if not (isinstance(shards, list) and shards and all(isinstance(s, str) and s.endswith(".weights.h5")
                                                             for s in shards)):
            return None
        out[group] = shards
    return out


class KerasSharded(Source):
    """A sharded ``.weights.json`` and its ``.weights.h5`` shards, read shard by shard on demand."""

    suffixes = (".weights.json",)

    @classmethod
    def detect(cls, path: str) -> bool:
        """True for a JSON file whose ``weight_map`` sends ``vars`` groups to ``.weights.h5`` shards."""
        return _weight_map(path) is not None

    def __init__(self, path: str) -> None:
        self.path, self.format, self.namespace = path, "keras-sharded", "h5"
        weight_map = _weight_map(path)
        if weight_map is None:
            raise CorruptCheckpointError(
                f"{path} is not a sharded Keras weights file: it is not JSON with a 'weight_map' of "
                "'/<layer>/vars' -> '<name>_NNNNN.weights.h5'.", hint=_RESAVE)
        folder = os.path.dirname(path)
        names = sorted({s for shards in weight_map.values() for s in shards})
        self._shards: dict[str, KerasH5] = {}
        self._owner: dict[str, KerasH5] = {}
        self._layers: dict[str, tuple[str | None, str | None]] = {}
        entries: list[SourceEntry] = []
        try:
            for name in names:
                shard_path = os.path.join(folder, name)
                if not os.path.isfile(shard_path):
                    raise SourceError(f"{path} names shard {name}, which does not exist in {folder or '.'}.",
                                      hint="Keep every shard beside the .weights.json file that lists it.")
                if not KerasH5.detect(shard_path):
                    raise CorruptCheckpointError(f"{path}: its shard {shard_path} is not an HDF5 file.", hint=_RESAVE)
                shard = self._shards[name] = KerasH5(shard_path)
                for entry in shard.entries():
                    if entry.key in self._owner:
                        raise CorruptCheckpointError(
                            f"{path}: tensor '{entry.key}' is in two shards, {self._owner[entry.key].path} and "
                            f"{shard_path}.", hint=_RESAVE)
                    self._owner[entry.key] = shard
                    entries.append(entry)
                for layer, (layer_name, kind) in shard.layers().items():
                    known = self._layers.get(layer, (None, None))
                    self._layers[layer] = (known[0] or layer_name, known[1] or kind)
            for group, shards in weight_map.items():
                layer = group.strip("/")[: -len("vars")].rstrip("/")
                held = {os.path.basename(self._owner[e.key].path) for e in entries if e.layer == layer}
                if not held:
                    raise CorruptCheckpointError(
                        f"{path} lists '{group}' in {', '.join(shards)}, but no shard holds its variables.",
                        hint=_RESAVE)
                if not held <= set(shards):
                    raise CorruptCheckpointError(
                        f"{path} lists '{group}' in {', '.join(shards)}, but its variables are in "
                        f"{', '.join(sorted(held))}.", hint=_RESAVE)
        except Exception:
            self.close()
            raise
        self.files = (path,) + tuple(os.path.join(folder, n) for n in names)
        # A layer split across shards has its name attribute in the first shard only.
        entries = [replace(e, layer_name=self._layers[e.layer][0]) if e.layer_name is None and e.layer in self._layers
                   else e for e in entries]
        order = {WEIGHT: 0, OPTIMIZER_SLOT: 1}
        super().__init__(path, sorted(entries, key=lambda e: (order.get(e.kind, 2), e.layer, e.index or 0)))

    def read(self, key: str) -> np.ndarray:
        """Read one tensor from the shard that holds it."""
        return self._owner[key].read(key)

    def read_slice(self, key: str, index: tuple[slice, ...]) -> np.ndarray:
        """Read one block from the shard that holds the tensor (counted here too)."""
        shard = self._owner[key]
        before = shard.sliced_bytes_read
        block = shard.read_slice(key, index)
        self.sliced_bytes_read += shard.sliced_bytes_read - before
        return block

    def layers(self) -> dict[str, tuple[str | None, str | None]]:
        """Every saved layer across the shards, with its Keras name and class where known."""
        return dict(self._layers)

    def close(self) -> None:
        """Close every shard."""
        for shard in self._shards.values():
            shard.close()
