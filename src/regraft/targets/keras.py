"""Describe a built Keras 3 model as :class:`TargetVariable` records, and assign to it.

This is the only module that knows Keras' and TensorFlow's internals on the
target side. Keys are computed by asking the frameworks themselves:

* ``object`` keys walk ``_trackable_children("checkpoint")`` breadth-first from
  the model, exactly as ``tf.train.Checkpoint`` does when it saves;
* ``h5`` keys run Keras' own weights walk (``saving_lib._save_state``) against a
  recording store, so they equal the paths ``model.save_weights`` would write;
* ``keras2`` keys reproduce tf-keras' ``layer_with_weights-N`` numbering;
* ``name`` keys are Keras variable paths (``dense_1/kernel``).
"""

from __future__ import annotations

import functools
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from regraft.entries import NAMESPACES, TargetVariable
from regraft.errors import TargetError

__all__ = [
    "describe",
    "describe_with_layers",
    "assign",
    "read_value",
    "restore_tensor",
    "save_weights",
    "layer_graph",
    "GraphLayer",
    "custom_classes",
]


def _keras():
    import keras  # imported lazily: TensorFlow's import takes seconds

    return keras


def describe(model: Any, namespaces: tuple[str, ...] = NAMESPACES) -> list[TargetVariable]:
    """List every variable of ``model`` with its keys in the given namespaces.

    Args:
        model: a built Keras 3 model (functional, Sequential, subclassed, nested).
        namespaces: which key namespaces to compute (``name`` is always there).
            Computing only the one a source speaks keeps planning fast: the
            ``h5`` walk is the slow one.

    Returns:
        One record per distinct variable, in ``model.weights`` order.

    Raises:
        TargetError: when ``model`` is not a Keras model or is not built yet.

    Example:
        >>> [t.key for t in describe(model)]        # doctest: +SKIP
        ['dense1/kernel', 'dense1/bias']
    """
    return describe_with_layers(model, namespaces)[0]


def describe_with_layers(
    model: Any, namespaces: tuple[str, ...] = NAMESPACES
) -> tuple[list[TargetVariable], dict[str, dict[str, tuple[str | None, str | None]]]]:
    """:func:`describe`, plus every layer's key per namespace with (Keras name, class in snake case).

    Weightless layers are included: alignment uses them as landmarks.
    """
    _check_model(model)
    variables = _unique(model.weights)
    owners = _owners(model)
    readable = _readable_keys(model)
    tables: dict[str, dict[int, str]] = {}
    layers: dict[str, dict[str, tuple[str | None, str | None]]] = {}
    if "object" in namespaces:
        tables["object"], layers["object"] = _object_walk(model)
    if "h5" in namespaces:
        tables["h5"], layers["h5"] = _h5_walk(model)
    if "keras2" in namespaces:
        tables["keras2"], layers["keras2"] = _keras2_keys(model)
    used: dict[str, int] = {}
    out = []
    for variable in variables:
        layer, layer_path, index = owners.get(id(variable), (None, "", 0))
        key = _unique_key(readable.get(id(variable), variable.path), used)
        layer_path = key.rpartition("/")[0] if id(variable) in readable else layer_path
        keys = {"name": key}  # the readable key: unique, built from layer names (Keras 2 .h5, TF1)
        for namespace, table in tables.items():
            if id(variable) in table:
                keys[namespace] = table[id(variable)]
        out.append(
            TargetVariable(
                key=key,
                shape=tuple(int(d) for d in variable.shape),
                dtype=np.dtype(variable.dtype).name,
                layer=layer_path,
                layer_class=type(layer).__name__ if layer is not None else "",
                role=variable.name,
                index=index,
                trainable=bool(variable.trainable),
                keys=keys,
                variable=variable,
                layer_object=layer,
            )
        )
    return out, layers


def _check_model(model: Any) -> None:
    keras = _keras()
    if not isinstance(model, keras.Model) and not isinstance(model, keras.layers.Layer):
        raise TargetError(
            f"Expected a Keras model. Received: an object of type {type(model).__name__}.",
            hint="Pass the keras.Model you want to load into.",
        )
    if not model.built or (not model.weights and _has_unbuilt_layers(model)):
        raise TargetError(
            f"Model '{model.name}' is not built, so it has no variables to load into yet.",
            hint="Build it first: call it once on an example batch (model(x)) or call "
            "model.build(input_shape).",
        )


def read_value(target: TargetVariable) -> np.ndarray:
    """The variable's current value as a numpy array (a snapshot, or a view valid until the next assign)."""
    return np.asarray(target.variable.numpy())


def assign(target: TargetVariable, value: Any) -> None:
    """Assign ``value`` (a numpy array or tensor of the variable's shape and dtype) to the variable.

    A tensor read by :func:`restore_tensor` is adopted by the variable without a copy.
    """
    target.variable.assign(value)


def restore_tensor(prefix: str, name: str, dtype: str) -> Any:
    """Read one tensor of a TF checkpoint with TensorFlow's own reader (checksum verified).

    TensorFlow reads the bytes straight into a tensor buffer, which ``assign``
    then hands to the variable: one copy from the file, none in memory.
    """
    import tensorflow as tf

    return tf.raw_ops.RestoreV2(prefix=prefix, tensor_names=[name], shape_and_slices=[""], dtypes=[tf.as_dtype(dtype)])[0]


def _unique(variables: list[Any]) -> list[Any]:
    seen: set[int] = set()
    out = []
    for v in variables:
        if id(v) not in seen:
            seen.add(id(v))
            out.append(v)
    return out


def _unique_key(path: str, used: dict[str, int]) -> str:
    if path not in used:
        used[path] = 1
        return path
    used[path] += 1
    return f"{path}#{used[path]}"


def _has_unbuilt_layers(model: Any) -> bool:
    return any(not layer.built for layer in getattr(model, "_flatten_layers", lambda: [])())


def _owners(model: Any) -> dict[int, tuple[Any, str, int]]:
    """Map each variable id to (owning layer, layer path, index inside that layer).

    The owner is the innermost layer whose own (non-nested) variables include it.
    """
    out: dict[int, tuple[Any, str, int]] = {}
    for layer in model._flatten_layers(include_self=True, recursive=True):
        own = list(layer._trainable_variables) + list(layer._non_trainable_variables)
        path = layer.path if hasattr(layer, "path") else layer.name
        for index, variable in enumerate(own):
            out.setdefault(id(variable), (layer, path, index))
    # Variables whose owner was not found keep the variable path's parent.
    for variable in model.weights:
        if id(variable) not in out:
            out[id(variable)] = (None, variable.path.rsplit("/", 1)[0], 0)
    return out


def _readable_keys(model: Any) -> dict[int, str]:
    """Stable, readable keys: layer names inside functional models, attribute names elsewhere.

    ``dense2/kernel`` for ``self.dense2`` of a subclassed model, ``d1/kernel`` for
    a functional layer named ``d1``, ``blocks/0/kernel`` for an item of a list
    attribute. Unlike ``variable.path`` these do not depend on how many layers were
    created before in the process. The model's own name is not part of the key.
    """
    out: dict[int, str] = {}
    seen: set[int] = set()

    def visit(layer: Any, prefix: str) -> None:
        if id(layer) in seen:
            return
        seen.add(id(layer))
        own = list(layer._trainable_variables) + list(layer._non_trainable_variables)
        for variable in own:
            out.setdefault(id(variable), f"{prefix}{variable.name}")
        for name, child in _named_sub_layers(layer):
            visit(child, f"{prefix}{name}/")

    visit(model, "")
    return out


def _named_sub_layers(layer: Any) -> list[tuple[str, Any]]:
    """A layer's direct sub-layers with the key segment naming each.

    Functional and Sequential models name them by layer name; other layers by
    attribute, public attributes first, in assignment order (``blocks/0`` for a
    list item, ``heads/cls`` for a dict item).
    """
    keras = _keras()
    if isinstance(layer, keras.Sequential) or type(layer).__name__ == "Functional" or (
        isinstance(layer, keras.Model) and getattr(layer, "_is_graph_network", False)
    ):
        return [(child.name, child) for child in layer.layers]
    if not getattr(layer, "_layers", True):
        return []  # Keras tracks every sub-layer in _layers: a leaf layer has none to look for
    found: list[tuple[str, Any]] = []
    for name, value in sorted(vars(layer).items(), key=lambda kv: kv[0].startswith("_")):
        if isinstance(value, keras.layers.Layer):
            found.append((name, value))
        elif isinstance(value, (list, tuple)):
            found.extend((f"{name}/{i}", v) for i, v in enumerate(value) if isinstance(v, keras.layers.Layer))
        elif isinstance(value, dict):
            found.extend((f"{name}/{k}", v) for k, v in value.items() if isinstance(v, keras.layers.Layer))
    return found


def _snake(layer: Any) -> str:
    from keras.src.utils.naming import to_snake_case

    return to_snake_case(type(layer).__name__)


def _object_walk(model: Any) -> tuple[dict[int, str], dict[str, tuple[str | None, str | None]]]:
    """Breadth-first object-graph paths, the way tf.train.Checkpoint names them.

    Returns (variable id → path, layer path → (name, kind)).
    """
    keras = _keras()
    variables: dict[int, str] = {}
    layers: dict[str, tuple[str | None, str | None]] = {}
    seen = {id(model)}
    queue: deque[tuple[Any, str]] = deque([(model, "")])
    while queue:
        obj, path = queue.popleft()
        try:
            children = obj._trackable_children(save_type="checkpoint")
        except Exception:  # an object TF cannot walk has no checkpoint path
            continue
        for name, child in children.items():
            if id(child) in seen:
                continue
            seen.add(id(child))
            child_path = f"{path}/{name}" if path else name
            if isinstance(child, keras.Variable):
                variables[id(child)] = child_path
                continue
            if isinstance(child, keras.layers.Layer):
                layers[child_path] = (child.name, _snake(child))
            queue.append((child, child_path))
    return variables, layers


def _h5_walk(model: Any, fast: bool = True) -> tuple[dict[int, str], dict[str, tuple[str | None, str | None]]]:
    """Paths Keras' own weights saver would write, from its walk run against a recorder.

    With ``fast``, Keras' attribute walk runs with two speed-ups that keep its
    result (a test compares both): the skip set is memoised, and ``dir(obj)`` —
    re-sorted for every layer — is replaced by the same names gathered from the
    instance and a per-class cache.

    Returns (variable id → path, layer path → (name, kind)).
    """
    try:
        from keras.src.saving import saving_lib
    except ImportError:  # pragma: no cover - depends on the Keras version installed
        return {}, {}

    out: dict[int, str] = {}
    layer_names: dict[str, str | None] = {}

    class _Vars(dict):
        def __init__(self, path: str) -> None:
            super().__init__()
            self.path = path

        def __setitem__(self, name: str, value: Any) -> None:
            out.setdefault(id(value), f"{self.path}/vars/{name}" if self.path else f"vars/{name}")

    class _Recorder(saving_lib.H5IOStore):
        def __init__(self) -> None:  # no file: only records paths
            pass

        def __bool__(self) -> bool:
            return True

        def make(self, path: str, metadata: Any = None) -> _Vars:
            layer_names[path] = (metadata or {}).get("name")
            return _Vars(path)

        def get(self, path: str) -> _Vars:
            return _Vars(path)

    # Keras 3.15's get_attr_skipset caches under one global name and reads another
    # ("skipset" vs "skiplist"), so it builds a throwaway Layer per visited layer:
    # 5 s for 3,000 layers. The skip set depends only on the object type; memoise it
    # for the duration of this walk.
    original_skipset, original_walk = saving_lib.get_attr_skipset, saving_lib._walk_saveable
    if fast:
        saving_lib.get_attr_skipset = functools.lru_cache(maxsize=None)(original_skipset)
        saving_lib._walk_saveable = _fast_walk_saveable(saving_lib)
    try:
        saving_lib._save_state(model, _Recorder(), None, "", set())
    except Exception:  # Keras internals changed: h5 keys are then unknown, matching falls back
        return {}, {}
    finally:
        saving_lib.get_attr_skipset, saving_lib._walk_saveable = original_skipset, original_walk
    kinds = {layer.name: _snake(layer) for layer in model._flatten_layers(include_self=False, recursive=True)}
    return out, {path: (name, kinds.get(name)) for path, name in layer_names.items() if path}


def _fast_walk_saveable(saving_lib: Any) -> Any:
    """``saving_lib._walk_saveable`` with ``dir(obj)`` computed from ``vars(obj)`` and cached class names.

    ``dir`` of an instance is its ``__dict__`` keys plus every name in its class's
    MRO; Keras sorts all of them (hundreds) for every layer, then skips most.
    """
    class_names: dict[tuple[type, str], frozenset[str]] = {}

    def walk(saveable: Any) -> Any:
        obj_type = saveable._obj_type()
        skip = saving_lib.get_attr_skipset(obj_type)
        if obj_type in ("Sequential", "Functional"):
            yield "layers", saveable.layers
        key = (type(saveable), obj_type)
        if key not in class_names:
            names = {name for cls in type(saveable).__mro__ for name in vars(cls)}
            class_names[key] = frozenset(n for n in names if not n.startswith("__") and n not in skip)
        own = {n for n in vars(saveable) if not n.startswith("__") and n not in skip}
        for child_attr in sorted(own | class_names[key], key=saving_lib._name_key):
            try:
                child_obj = getattr(saveable, child_attr)
            except Exception:
                continue
            yield child_attr, child_obj

    return walk


def _keras2_keys(model: Any) -> tuple[dict[int, str], dict[str, tuple[str | None, str | None]]]:
    """tf-keras ``save_weights`` paths: ``layer_with_weights-N/<role>`` for layered models.

    Returns (variable id → path, layer path → (name, kind)).
    """
    keras = _keras()
    out: dict[int, str] = {}
    names: dict[str, tuple[str | None, str | None]] = {}

    def visit(container: Any, prefix: str) -> None:
        layers = getattr(container, "layers", None)
        if layers is None:
            return
        numbered = 0
        for layer in layers:
            if not layer.weights:
                continue
            path = f"{prefix}layer_with_weights-{numbered}"
            names[path] = (layer.name, _snake(layer))
            numbered += 1
            if isinstance(layer, keras.Model) or getattr(layer, "layers", None):
                visit(layer, path + "/")
            else:
                for variable in layer.weights:
                    out.setdefault(id(variable), f"{path}/{variable.name}")

    if isinstance(model, (keras.Sequential,)) or model.__class__.__name__ == "Functional":
        visit(model, "")
    return out, names


def custom_classes(model: Any) -> set[str]:
    """Snake-case class names of every layer in ``model`` (its own included).

    A layer named after its class (``block``, ``block_2``) was named by Keras:
    these are the class names that auto-generated names are built from.
    """
    return {_snake(layer) for layer in model._flatten_layers(include_self=True, recursive=True)}


def save_weights(model: Any, out: str) -> list[str]:
    """Write the model's weights to ``out`` atomically; returns the files written.

    ``*.weights.h5`` is written with Keras' ``save_weights``; anything else is a TF
    checkpoint prefix written with ``tf.train.Checkpoint(model=model).write``.
    Files are written under a temporary name in the same folder, then renamed
    into place, so a failure leaves no half-written output.
    """
    import os
    import shutil
    import tempfile

    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise TargetError(f"Output folder {folder} does not exist.", hint="Create it first, or choose another --out.")
    staging = tempfile.mkdtemp(prefix=".regraft-out-", dir=folder)
    try:
        if out.endswith(".weights.h5"):
            staged = os.path.join(staging, "model.weights.h5")
            model.save_weights(staged)
            os.replace(staged, out)
            return [out]
        import tensorflow as tf

        base = os.path.basename(out)
        tf.train.Checkpoint(model=model).write(os.path.join(staging, base))
        written = []
        for name in sorted(os.listdir(staging)):
            os.replace(os.path.join(staging, name), os.path.join(folder, name))
            written.append(os.path.join(folder, name))
        return written
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@dataclass(frozen=True)
class GraphLayer:
    """One layer of the model's computation, for function-preserving growth.

    Attributes:
        key: the layer's readable key (``TargetVariable.layer`` of its variables).
        kind: the class in snake case (``dense``, ``conv2d``, ``batch_normalization``).
        inputs: readable keys of the layers feeding it.
        activation: the activation's name for layers that have one (``relu``, ``linear``).
        non_negative: its output is never negative (ReLU activation or a ReLU layer).
    """

    key: str
    kind: str
    inputs: tuple[str, ...]
    activation: str | None
    non_negative: bool


def layer_graph(model: Any) -> list[GraphLayer]:
    """The model's layers in computation order, each with the layers that feed it.

    Functional and Sequential models give their real graph. A subclassed model
    gives its leaf layers in the order its attributes were assigned, each fed by
    the previous one: the usual way such models are written, and an assumption
    (``regraft.verify`` checks the result).
    """
    keras = _keras()
    readable = _readable_layer_keys(model)
    if isinstance(model, keras.Sequential) or type(model).__name__ == "Functional":
        members = {id(layer) for layer in model.layers}
        out = []
        for layer in model.layers:
            if isinstance(layer, keras.layers.InputLayer):
                continue
            parents = [
                p.operation for node in layer._inbound_nodes for p in node.parent_nodes if id(p.operation) in members
            ]
            inputs = tuple(readable.get(id(p), p.name) for p in parents if not isinstance(p, keras.layers.InputLayer))
            out.append(_graph_layer(layer, readable.get(id(layer), layer.name), inputs))
        return out
    leaves = [layer for layer in _leaf_layers(model)]
    out = []
    for i, layer in enumerate(leaves):
        inputs = (readable.get(id(leaves[i - 1]), leaves[i - 1].name),) if i else ()
        out.append(_graph_layer(layer, readable.get(id(layer), layer.name), inputs))
    return out


def _graph_layer(layer: Any, key: str, inputs: tuple[str, ...]) -> GraphLayer:
    activation = getattr(layer, "activation", None)
    name = getattr(activation, "__name__", None) if activation is not None else None
    non_negative = name == "relu" or type(layer).__name__ == "ReLU"
    return GraphLayer(key, _snake(layer), inputs, name, non_negative)


def _leaf_layers(model: Any) -> list[Any]:
    """Layers without sub-layers, in the readable walk's order (attribute order)."""
    found: list[Any] = []
    seen: set[int] = set()

    def visit(layer: Any) -> None:
        if id(layer) in seen:
            return
        seen.add(id(layer))
        children = [child for _, child in _named_sub_layers(layer)]
        if not children and layer is not model:
            found.append(layer)
        for child in children:
            visit(child)

    visit(model)
    return found


def _readable_layer_keys(model: Any) -> dict[int, str]:
    """Layer id → readable layer key, consistent with the variables' readable keys."""
    by_variable = _readable_keys(model)
    out: dict[int, str] = {}
    for layer in model._flatten_layers(include_self=False, recursive=True):
        own = list(layer._trainable_variables) + list(layer._non_trainable_variables)
        if own and id(own[0]) in by_variable:
            out[id(layer)] = by_variable[id(own[0])].rpartition("/")[0]
    return out
