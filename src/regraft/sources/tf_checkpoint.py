"""TensorFlow checkpoints: TF2 object-based, tf-keras ``save_weights``, TF1 name-based.

All three are tensor bundles (``PREFIX.index`` + ``PREFIX.data-*``), read by
:class:`regraft.sources._bundle.Bundle` without importing TensorFlow. What differs
is how keys are made:

* object-based checkpoints carry ``_CHECKPOINTABLE_OBJECT_GRAPH``; every variable
  is addressed by its path through that graph. A variable reachable several ways
  (the model *and* the optimizer's ``_trainable_variables``) gets one canonical
  key — the first path breadth-first that does not pass through an optimizer —
  and the others as aliases;
* tf-keras models number their layers (``layer_with_weights-N``);
* TF1 checkpoints key tensors by variable name.
"""

from __future__ import annotations

import os
import re
import warnings
from collections import Counter, deque
from typing import TYPE_CHECKING

from regraft.entries import BOOKKEEPING, OPTIMIZER_SLOT, WEIGHT, SourceEntry
from regraft.errors import CorruptCheckpointError, SourceError
from regraft.sources._bundle import DAMAGED_HINT, OBJECT_GRAPH_KEY, Bundle
from regraft.sources._keystyle import entry_order, numbered
from regraft.sources.base import Source

if TYPE_CHECKING:
    import numpy as np

__all__ = ["TFCheckpoint", "resolve_prefix"]

_OPTIMIZER_EDGES = {"optimizer", "_optimizer"}
_OPTIMIZER_MARKERS = {"_iterations", "iter", "_momentums", "_velocities"}
_OPTIMIZER_OWN_LISTS = {"_variables", "_trainable_variables", "_index_dict"}
_DATA_FILE = re.compile(r"^(?P<prefix>.*)\.data-\d{5}-of-\d{5}$")
_TF1_SLOT_SUFFIX = re.compile(r"/(Adam|Adam_1|Momentum|RMSProp|RMSProp_1|Adagrad|Adadelta|Adadelta_1|Ftrl|Ftrl_1)$")


def resolve_prefix(path: str, allow_outside_state: bool = False) -> str:
    """Turn what a user typed into a checkpoint prefix.

    Accepts a prefix (``dir/ckpt-3``), its ``.index`` or ``.data-*`` file, or a
    folder holding a ``checkpoint`` state file (its latest checkpoint is taken)
    or exactly one ``*.index`` file.

    Args:
        path: what the user gave.
        allow_outside_state: follow a state file that names a checkpoint outside
            its own folder (an absolute path elsewhere, ``../other/ckpt-1``). By
            default that is refused: the folder given is not what would be read.

    Raises:
        SourceError: when no checkpoint is found there, or the state file points
            outside its folder; the message says what was found.
    """
    if path.endswith(".index") and os.path.isfile(path):
        return path[: -len(".index")]
    match = _DATA_FILE.match(path)
    if match and os.path.isfile(path):
        return match.group("prefix")
    if os.path.isfile(path + ".index"):
        return path
    if os.path.isdir(path):
        state = os.path.join(path, "checkpoint")
        if os.path.isfile(state):
            latest = _latest_from_state(state)
            prefix = latest if os.path.isabs(latest) else os.path.join(path, latest)
            if not allow_outside_state and not _inside(prefix, path):
                raise SourceError(
                    f"{state} names '{latest}' as the latest checkpoint, which is outside the folder {path} "
                    f"({os.path.abspath(prefix)}); regraft opens only a checkpoint in the folder it was given.",
                    hint="Pass that checkpoint's prefix itself, or allow the state file to point elsewhere with "
                    "allow_outside_state=True (on the command line: --allow-outside-state).",
                )
            if not os.path.isfile(prefix + ".index"):
                raise SourceError(
                    f"{state} names '{latest}' as the latest checkpoint, but {prefix}.index does not exist.",
                    hint="Pass the prefix of a checkpoint that exists (e.g. dir/ckpt-3) or fix the state file.",
                )
            return prefix
        try:
            indexes = sorted(f for f in os.listdir(path) if f.endswith(".index"))
        except OSError as exc:
            raise SourceError(
                f"cannot list the folder {path}: {exc.strerror or exc}",
                hint="Check the folder's permissions, or pass the checkpoint prefix itself (e.g. dir/ckpt-3).",
            ) from None
        if len(indexes) == 1:
            return os.path.join(path, indexes[0][: -len(".index")])
        if len(indexes) > 1:
            names = ", ".join(i[: -len(".index")] for i in indexes[:5])
            raise SourceError(
                f"{path} holds {len(indexes)} checkpoints ({names}) and no 'checkpoint' state file saying which is latest.",
                hint="Pass one prefix, e.g. " + os.path.join(path, indexes[-1][: -len(".index")]) + ".",
            )
    raise SourceError(f"{path} is not a TensorFlow checkpoint (no {os.path.basename(path)}.index found).")


def _inside(prefix: str, folder: str) -> bool:
    """Whether checkpoint ``prefix`` lies in ``folder`` or below it, as written or with links resolved.

    Both readings count: a TF1 ``Saver`` writes absolute paths, which may spell the
    folder through another link, and a link inside the folder is the user's own.
    """
    for resolve in (os.path.abspath, os.path.realpath):
        where, top = resolve(os.path.dirname(prefix) or "."), resolve(folder)
        if os.path.commonpath([where, top]) == top:
            return True
    return False


def _latest_from_state(state: str) -> str:
    try:
        with open(state, encoding="utf-8", errors="replace") as f:
            for line in f:
                m = re.match(r'\s*model_checkpoint_path:\s*"(.*)"\s*$', line)
                if m:
                    return m.group(1)
    except OSError as exc:
        raise SourceError(
            f"cannot read the checkpoint state file {state}: {exc.strerror or exc}",
            hint="Check the file's permissions, or pass the checkpoint prefix itself (e.g. dir/ckpt-3).",
        ) from None
    raise SourceError(
        f"{state} has no model_checkpoint_path line.",
        hint="Pass the checkpoint prefix itself (e.g. dir/ckpt-3).",
    )


class TFCheckpoint(Source):
    """A TensorFlow tensor-bundle checkpoint, in any of its three key styles."""

    slices_skip_checksum = True  # each entry's CRC32C covers the whole entry

    @classmethod
    def detect(cls, path: str) -> bool:
        """True when ``path`` names a tensor bundle (prefix, .index, .data-* or a folder of one)."""
        try:
            resolve_prefix(path, allow_outside_state=True)  # where a state file may point is for __init__ to judge
        except SourceError:
            return False
        return True

    def __init__(self, path: str, allow_outside_state: bool = False) -> None:
        """Open the checkpoint at ``path`` (see :func:`resolve_prefix`; it says what ``allow_outside_state`` allows)."""
        self._layer_names = {}
        self._bundle_key: dict[str, str] = {}  # canonical key -> tensor name in the bundle
        prefix = resolve_prefix(path, allow_outside_state)
        outside = os.path.isdir(path) and not _inside(prefix, path)
        if outside:  # allowed: say so, and go by the checkpoint itself from here on (reports, plan files)
            prefix = os.path.abspath(prefix)
            warnings.warn(
                f"regraft: the state file {os.path.join(path, 'checkpoint')} points outside its folder; "
                f"opened {prefix}",
                stacklevel=2,
            )
        self.prefix = prefix
        self.bundle = Bundle(prefix)
        self.files = (prefix + ".index",) + tuple(
            f"{prefix}.data-{i:05d}-of-{self.bundle.header.num_shards:05d}" for i in range(self.bundle.header.num_shards)
        )
        graph = self.bundle.object_graph()
        if graph is not None:
            entries = self._object_entries(graph)
        else:
            self.format, self.namespace = "tf1-names", "name"
            entries = self._name_entries()
        super().__init__(prefix if outside else path, entries)

    def layers(self) -> dict[str, tuple[str | None, str | None]]:
        """Layers reached by position, with the Keras name their variables' ``full_name`` records.

        Weightless list items (pooling, activation) are included as landmarks,
        without a name (they have no variables to record one). Classes are not
        recorded in a TF checkpoint.
        """
        return dict(self._layer_names)

    @property
    def _layer_names(self) -> dict[str, tuple[str | None, str | None]]:
        """Positional layer -> (name, class): the landmarks, and the names made from ``full_name``s on first use.

        Naming takes ~15 ms at 10,000 variables, which `regraft inspect` does not need.
        Setting it (as a subclass that re-keys its entries does) replaces both.
        """
        if self._pending_full_names:
            self._known_layer_names.update(_positional_layer_names(self._pending_full_names))
            self._pending_full_names = {}
        return self._known_layer_names

    @_layer_names.setter
    def _layer_names(self, value: dict[str, tuple[str | None, str | None]]) -> None:
        self._known_layer_names = value
        self._pending_full_names: dict[str, str] = {}

    def native_location(self, key: str) -> tuple[str, str] | None:
        """TensorFlow reads bundles natively: ``(prefix, tensor name in the bundle)``.

        ``None`` (regraft reads it) for a partitioned tensor, and for a name that is
        not UTF-8: its text form is escaped, and TensorFlow would look up the escape.
        """
        entry = self.bundle.entries[self._bundle_key[key]]
        if entry.sliced or entry.raw_key != entry.key.encode("utf-8"):
            return None
        return (self.prefix, entry.key)

    def read(self, key: str) -> np.ndarray:
        """Read the tensor with canonical ``key`` (checksum verified)."""
        return self.bundle.read(self._bundle_key[key])

    def read_into(self, key: str, out: np.ndarray, checked: bool = False) -> None:
        """Read the tensor with canonical ``key`` straight into ``out`` (checksum verified unless ``checked``)."""
        self.bundle.read_into(self._bundle_key[key], out, checksum=not checked)

    def verify(self, key: str) -> None:
        """Check the tensor's size and checksum in place (memory-mapped), keeping no bytes."""
        self.bundle.verify(self._bundle_key[key])

    def read_slice(self, key: str, index: tuple[slice, ...]) -> np.ndarray:
        """Read one block from the memory-mapped data file: leading rows are one byte range, columns strided.

        Not checksummed (the entry's CRC32C covers the whole entry): :meth:`verify` does that.
        """
        block, touched = self.bundle.read_slice(self._bundle_key[key], index)
        self.sliced_bytes_read += touched
        return block

    # -- TF1 name-based ------------------------------------------------------------

    def _name_entries(self) -> list[SourceEntry]:
        keys = set(self.bundle.entries)
        out = []
        for key, b in self.bundle.entries.items():
            parent, _, role = key.rpartition("/")
            kind, slot_of = WEIGHT, None
            if _TF1_SLOT_SUFFIX.search(key) and parent in keys:
                kind, slot_of = OPTIMIZER_SLOT, parent
            elif key == "global_step" or key.endswith("_power"):
                kind = BOOKKEEPING
            self._bundle_key[key] = key
            out.append(SourceEntry(key, b.shape, b.dtype_name, kind, parent, role, None, None, (), slot_of))
        return numbered(out)

    # -- TF2 object graph ------------------------------------------------------------

    def _graph_error(self, problem: str) -> CorruptCheckpointError:
        """The error for an object graph that does not hold together."""
        shard = self.bundle.entries[OBJECT_GRAPH_KEY].shard_id
        return CorruptCheckpointError(
            f"{self.bundle.data_path(shard)}: the object graph of checkpoint {self.prefix} is invalid: {problem}.",
            hint=DAMAGED_HINT,
        )

    def _check_graph(self, nodes: list) -> None:
        """Check every reference in the object graph before following any.

        A child or slot must name a node of the graph (``-1`` is not "the last one"),
        a node's children must have distinct names, and every variable value a node
        saves must be in the index: TensorFlow writes graphs that way, and a reader
        that followed anything else would give a tensor another's path or lose it.
        """
        count = len(nodes)
        if not count:
            raise self._graph_error("it has no nodes (node 0 is the saved object)")

        def check(node_id: int, owner: int, what: str) -> None:
            if not 0 <= node_id < count:
                raise self._graph_error(
                    f"node {owner} has {what} pointing to node {node_id}, but the graph has {count} nodes "
                    f"(0 to {count - 1})"
                )

        for owner, node in enumerate(nodes):
            names: dict[str, int] = {}
            for child_id, name in node.children:
                if not 0 <= child_id < count:
                    check(child_id, owner, f"child '{name}'")
                if name in names:
                    raise self._graph_error(
                        f"node {owner} has two children named '{name}' (nodes {names[name]} and {child_id})"
                    )
                names[name] = child_id
            for slot in node.slot_variables:
                check(slot.original_variable_node_id, owner, f"slot variable '{slot.slot_name}' of a variable")
                check(slot.slot_variable_node_id, owner, f"slot variable '{slot.slot_name}'")
            for attr in node.attributes:
                # Other attributes may save several tensors under suffixed keys (a hash table's
                # "table" is "…/table-keys" and "…/table-values"); a variable's value is one tensor.
                if attr.name == "VARIABLE_VALUE" and attr.checkpoint_key not in self.bundle.entries:
                    raise self._graph_error(
                        f"node {owner} saves its {attr.name or 'tensor'} under key '{attr.checkpoint_key}', "
                        f"which {self.bundle.index_path} does not hold"
                    )

    def _object_entries(self, nodes: list) -> list[SourceEntry]:
        self._check_graph(nodes)
        optimizer_nodes = _optimizer_nodes(nodes)
        all_paths = _paths(nodes, skip=set(), every=True)
        # Canonical: the first path not through an optimizer. Without one, that is every node's
        # first path of the same breadth-first walk: one walk of the graph, not two (only the
        # first path of each node in ``paths`` is ever read).
        paths = _paths(nodes, skip=optimizer_nodes) if optimizer_nodes else all_paths
        slot_owner = _slot_owners(nodes, optimizer_nodes)
        keras2 = _numbers_layers_with_weights(nodes)
        # Weightless items of layer lists (pooling, activation, input): empty nodes reached by a numbered edge.
        landmarks: dict[str, tuple[str | None, str | None]] = {
            path: (None, None)
            for node_id, found in paths.items()
            for path in found[:1]
            if not nodes[node_id].children and not nodes[node_id].attributes and path.rpartition("/")[2].isdigit()
        }
        self.format, self.namespace = ("tf-keras", "keras2") if keras2 else ("tf-object", "object")

        out = []
        full_names: dict[str, str] = {}
        bundle_entries, bundle_key = self.bundle.entries, self._bundle_key
        counters: dict[str, int] = {}  # layer -> its weights so far: each weight's index in its layer
        for node_id, node in enumerate(nodes):
            for attr in node.attributes:
                b = bundle_entries.get(attr.checkpoint_key)
                if b is None:
                    continue  # saved under suffixed keys (tables) or not at all: no tensor of that name
                node_paths = all_paths.get(node_id, ())
                found = paths.get(node_id)
                if found:
                    canonical = found[0]
                elif node_paths:
                    canonical = node_paths[0]
                else:
                    # A node reached by no child edge (a legacy optimizer's slot) keeps its
                    # checkpoint key minus the "/.ATTRIBUTES/<name>" tail, like every other key.
                    canonical = attr.checkpoint_key.rsplit("/.ATTRIBUTES/", 1)[0]
                if attr.name != "VARIABLE_VALUE":
                    canonical = f"{canonical}/{attr.name}"
                index = slot_of = None
                if found is not None:
                    kind = WEIGHT if "/" in canonical else BOOKKEEPING  # save_counter and other root scalars
                elif node_id in slot_owner:
                    owner = slot_owner[node_id]
                    kind, slot_of = OPTIMIZER_SLOT, (paths.get(owner) or [None])[0]
                else:
                    kind = BOOKKEEPING if b.shape == () else OPTIMIZER_SLOT
                layer, _, role = canonical.rpartition("/")
                if len(node_paths) == 1 and node_paths[0] == canonical:
                    aliases: tuple[str, ...] = ()
                else:
                    aliases = tuple(p for p in node_paths if p != canonical)
                if canonical in bundle_key:
                    raise self._graph_error(
                        f"node {node_id} saves tensor '{attr.checkpoint_key}' under the path '{canonical}', "
                        f"which already names tensor '{bundle_key[canonical]}'"
                    )
                bundle_key[canonical] = attr.checkpoint_key
                if kind == WEIGHT:
                    index = counters.get(layer, 0)
                    counters[layer] = index + 1
                    if attr.full_name:
                        full_names[canonical] = attr.full_name
                out.append(SourceEntry(canonical, b.shape, b.dtype_name, kind, layer, role.lstrip("_"), index, None,
                                       aliases, slot_of))
        self._layer_names = landmarks
        self._pending_full_names = full_names
        out.sort(key=entry_order)  # numbered()'s order; each weight got its index above, as numbered() gives it
        return out


_POSITIONAL_SEGMENT = re.compile(r"^(\d+|layer(_with_weights)?-\d+)$")


def _positional_layer_names(full_names: dict[str, str]) -> dict[str, tuple[str | None, str | None]]:
    """Name each object reached by position (``_operations/3``, ``layer_with_weights-2``) from ``full_name``s.

    A variable's ``full_name`` is its graph name when saved: ``conv1/kernel`` for a
    Keras 3 layer built on its own, ``sequential/c1/kernel`` inside a Sequential,
    but only the *outer* scope (``block/kernel``) for the sub-layers of a custom
    layer. So an object's name is the last segment of the scope its variables
    share, and a name is trusted only where it is unambiguous: an object whose
    name is also a descendant's (a sub-model holding one layer) leaves it to the
    descendant, and a name claimed by two unrelated objects is dropped.

    Example:
        >>> _positional_layer_names({"_operations/1/_kernel": "c1/kernel", "_operations/1/bias": "c1/bias"})
        {'_operations/1': ('c1', None)}
    """
    scopes: dict[str, list[str]] = {}
    positional_nodes: dict[str, list[str]] = {}  # a key's parent -> the objects on its path reached by position
    seen: set[tuple[str, str]] = set()
    for key, full_name in full_names.items():
        full_name = full_name.removesuffix(":0")
        parent = key.rpartition("/")[0]
        # A common prefix does not change when a scope comes again: each (parent, scope) counts once.
        scope_text = full_name[: full_name.rfind("/") + 1]
        if (parent, scope_text) in seen:
            continue
        seen.add((parent, scope_text))
        scope = full_name.split("/")[:-1]
        nodes = positional_nodes.get(parent)
        if nodes is None:
            segments = parent.split("/") if parent else []
            nodes = positional_nodes[parent] = [
                "/".join(segments[: i + 1]) for i, segment in enumerate(segments) if _POSITIONAL_SEGMENT.match(segment)
            ]
        for node in nodes:
            known = scopes.get(node)
            if known is None:
                scopes[node] = scope
            elif known != scope:
                common = []
                for a, b in zip(known, scope):
                    if a != b:
                        break
                    common.append(a)
                scopes[node] = common
    named = {node: scope[-1] for node, scope in scopes.items() if scope}
    # An ancestor with its descendant's name (a sub-model holding one layer): the name is the descendant's.
    cleared = set()
    for node, name in named.items():
        ancestor = node.rpartition("/")[0]
        while ancestor:
            if named.get(ancestor) == name:
                cleared.add(ancestor)
            ancestor = ancestor.rpartition("/")[0]
    for node in cleared:
        named[node] = ""
    claims = Counter(name for name in named.values() if name)
    return {node: (name, None) for node, name in named.items() if name and claims[name] == 1}


def _optimizer_nodes(nodes: list) -> set[int]:
    """Nodes that are optimizers: reached by an edge named 'optimizer' or holding an optimizer's counters."""
    found = set()
    for node_id, node in enumerate(nodes):
        if node.slot_variables:
            found.add(node_id)
        for child in node.children:
            if child.local_name in _OPTIMIZER_MARKERS:
                found.add(node_id)
            if child.local_name in _OPTIMIZER_EDGES:
                found.add(child.node_id)
    return found


def _numbers_layers_with_weights(nodes: list) -> bool:
    """Whether some edge is named ``layer_with_weights-N``: tf-keras numbers a model's layers so."""
    for node in nodes:
        for child in node.children:
            if child.local_name.startswith("layer_with_weights-"):
                return True
    return False


def _paths(nodes: list, skip: set[int], every: bool = False) -> dict[int, list[str]]:
    """Breadth-first paths from the root (node 0) to every node, not entering ``skip``.

    With ``every`` all paths are kept (up to 16 a node, for aliases); otherwise the first.
    """
    found: dict[int, list[str]] = {0: [""]}
    queue = deque([(0, "")])
    expanded: set[int] = set()
    while queue:
        node_id, path = queue.popleft()
        if node_id in expanded:
            continue
        expanded.add(node_id)
        for child_id, name in nodes[node_id].children:
            if child_id in skip or child_id == 0 or name == "root":
                continue
            child_path = f"{path}/{name}" if path else name
            known = found.get(child_id)
            if known is None:
                found[child_id] = [child_path]
            elif every and len(known) < 16:
                known.append(child_path)
            if child_id not in expanded:  # an expanded node would be skipped when taken from the queue
                queue.append((child_id, child_path))
    found.pop(0)
    return found


def _slot_owners(nodes: list, optimizer_nodes: set[int]) -> dict[int, int]:
    """Map slot-variable node → the weight node it belongs to.

    Legacy optimizers record ``slot_variables`` in the graph; Keras 3 optimizers keep
    per-variable lists (``_momentums/i``) parallel to ``_trainable_variables/i``.
    """
    owners: dict[int, int] = {}
    for node in nodes:
        for slot in node.slot_variables:
            owners[slot.slot_variable_node_id] = slot.original_variable_node_id
    for opt in optimizer_nodes:
        children = {c.local_name: c.node_id for c in nodes[opt].children}
        if "_trainable_variables" not in children:
            continue
        weights = [c.node_id for c in nodes[children["_trainable_variables"]].children]
        for name, list_node in children.items():
            if name in _OPTIMIZER_OWN_LISTS or name.startswith("_iterations") or name.startswith("_learning_rate"):
                continue
            slots = [c.node_id for c in nodes[list_node].children]
            if len(slots) == len(weights):
                for slot, weight in zip(slots, weights):
                    owners.setdefault(slot, weight)
    return owners
