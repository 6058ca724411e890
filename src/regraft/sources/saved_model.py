"""SavedModel folders: ``saved_model.pb`` beside ``variables/variables.index`` and its data files.

The variables of a SavedModel are an ordinary tensor bundle with an object graph,
read by :class:`~regraft.sources.tf_checkpoint.TFCheckpoint` (checked with TF 2.21 /
Keras 3.15):

* ``tf.saved_model.save(model, folder)`` roots the graph at the model itself:
  keys are those of a checkpoint of the model (``_operations/1/_kernel``);
* ``model.export(folder)`` roots it at an export archive that tracks the model's
  variables as flat lists, ``variables/N`` (model order) and ``_all_variables/N``
  (another order), each variable stored once per list. Positions in a flat list
  say nothing, so these are keyed by the name each variable recorded when saved
  (its ``full_name``, Keras' ``variable.path``: ``enc/kernel``), in the ``name``
  namespace; the copies become aliases of one entry. Where several variables
  recorded one name (the layers of a subclassed model record only the model's
  scope: ``m/kernel`` twice), the graph's positional keys are kept: names cannot
  tell those variables apart.

``saved_model.pb`` itself (the graph and signatures) is not read.
"""

from __future__ import annotations

import os

from regraft.entries import WEIGHT, SourceEntry
from regraft.errors import SourceError
from regraft.sources._keystyle import numbered
from regraft.sources.tf_checkpoint import TFCheckpoint

__all__ = ["SavedModel"]

_GRAPH_FILES = ("saved_model.pb", "saved_model.pbtxt")
_EXPORT_LISTS = ("_all_variables", "variables", "trainable_variables", "non_trainable_variables")


def _folder(path: str) -> str | None:
    """The SavedModel folder ``path`` names (itself, or the parent of its ``variables`` folder)."""
    path = path.rstrip("/") or path
    for folder in (path, os.path.dirname(path) if os.path.basename(path) == "variables" else None):
        if folder is not None and os.path.isdir(folder) and any(
                os.path.isfile(os.path.join(folder, g)) for g in _GRAPH_FILES):
            return folder
    return None


class SavedModel(TFCheckpoint):
    """A SavedModel folder; its ``variables/variables`` bundle is read like a TF checkpoint."""

    @classmethod
    def detect(cls, path: str) -> bool:
        """True for a folder holding ``saved_model.pb`` (or its ``variables`` sub-folder)."""
        return _folder(path) is not None

    def __init__(self, path: str) -> None:
        folder = _folder(path) or path
        prefix = os.path.join(folder, "variables", "variables")
        if not os.path.isfile(prefix + ".index"):
            found = sorted(os.listdir(folder))
            raise SourceError(
                f"{folder} is a SavedModel without variables: {prefix}.index does not exist "
                f"(found: {', '.join(found[:6])}).",
                hint="A model with weights saves them there; copy the whole folder the model was saved to.",
            )
        super().__init__(prefix)
        self.path, self.folder = path, folder
        self.format = "saved-model"
        graph = next(os.path.join(folder, g) for g in _GRAPH_FILES if os.path.isfile(os.path.join(folder, g)))
        self.files = (graph, *self.files)
        if any(e.key.split("/", 1)[0] == "_all_variables" for e in self.entries()):
            self._key_by_full_name()

    def _key_by_full_name(self) -> None:
        """``model.export()``: key every variable by its recorded name, one entry per variable."""
        full_names = {attr.checkpoint_key: attr.full_name.removesuffix(":0")
                      for node in (self.bundle.object_graph() or []) for attr in node.attributes}
        weights = [e for e in self.entries() if e.kind == WEIGHT]
        if not all(full_names.get(self._bundle_key[e.key]) for e in weights):
            return  # no names recorded: keep the graph's keys
        if not all(e.key.split("/", 1)[0] in _EXPORT_LISTS for e in weights):
            return  # more than the export lists: an object graph worth its keys
        by_list: dict[str, list[str]] = {}
        for e in weights:
            by_list.setdefault(e.key.split("/", 1)[0], []).append(full_names[self._bundle_key[e.key]])
        if any(len(set(names)) != len(names) for names in by_list.values()):
            # Several variables recorded one name (a subclassed model's layers record only the
            # model's scope, "m/kernel" twice): names cannot tell them apart, positions stay.
            return
        by_name: dict[str, list[SourceEntry]] = {}
        for e in sorted(weights, key=lambda e: e.key.startswith("_all_variables/")):  # model order first
            by_name.setdefault(full_names[self._bundle_key[e.key]], []).append(e)
        entries, bundle_key = [], {}
        for name, same in by_name.items():
            first = same[0]
            aliases = tuple(k for e in same for k in (e.key, *e.aliases))
            layer, _, role = name.rpartition("/")
            entries.append(SourceEntry(name, first.shape, first.dtype, WEIGHT, layer, role, None, None, aliases))
            bundle_key[name] = self._bundle_key[first.key]
        others = [e for e in self.entries() if e.kind != WEIGHT]
        bundle_key.update({e.key: self._bundle_key[e.key] for e in others})
        self._bundle_key = bundle_key
        self._entries = {e.key: e for e in [*numbered(entries), *others]}
        self._layer_names = {}
        self.format, self.namespace = "saved-model-export", "name"
