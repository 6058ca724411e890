"""Describe a built Keras 3 model as :class:`TargetVariable` records, and assign to it.

This is the only module that knows how Keras and TensorFlow name a model's
variables on the target side; every private name it reads goes through
:mod:`regraft.targets._compat`. Keys are computed by asking the frameworks:

* ``object`` keys walk ``_trackable_children("checkpoint")`` breadth-first from
  the model, exactly as ``tf.train.Checkpoint`` does when it saves; on the JAX
  and PyTorch backends, where Keras objects are not TensorFlow trackables, the
  same children are predicted from the objects' attributes
  (``_compat.predicted_checkpoint_children``, checked against TensorFlow's walk);
* ``h5`` keys follow Keras' weights saver walk (``saving_lib._save_state``), its
  attribute order and skip sets read from Keras, calling each layer's own
  ``save_own_variables`` with a recording store, so they equal the paths
  ``model.save_weights`` would write (a test compares them with Keras' own walk
  and with a written file);
* ``keras2`` keys reproduce tf-keras' ``layer_with_weights-N`` numbering;
* ``name`` keys are Keras variable paths (``dense_1/kernel``);
* ``torch`` keys spell the model as a PyTorch ``state_dict`` would (``features/0/weight``).
"""

from __future__ import annotations

import types
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from regraft.entries import NAMESPACES, TargetVariable
from regraft.targets.base import GraphLayer, LayerTable
from regraft.errors import TargetError
from regraft.naming import dtype_of
import regraft.targets._compat as _compat

__all__ = [
    "describe",
    "describe_with_layers",
    "assign",
    "assign_filled",
    "read_value",
    "shard_indices",
    "assign_shard_blocks",
    "processes_agree",
    "save_weights",
    "layer_graph",
    "GraphLayer",
    "custom_classes",
    "unique_variables",
    "KerasTarget",
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
    model: Any, namespaces: tuple[str, ...] = NAMESPACES, weights: list[Any] | None = None
) -> tuple[list[TargetVariable], dict[str, dict[str, tuple[str | None, str | None]]]]:
    """:func:`describe`, plus every layer's key per namespace with (Keras name, class in snake case).

    Weightless layers are included: alignment uses them as landmarks. ``weights``:
    ``model.weights`` as :func:`_check_model` just returned it, if the caller has it
    (a 10,000-variable model takes 10 ms to list them).
    """
    weights = _check_model(model) if weights is None else weights
    variables = _unique(weights)
    owners = _owners(model, weights)
    readable = _readable_keys(model)
    tables: dict[str, dict[int, str]] = {}
    layers: dict[str, dict[str, tuple[str | None, str | None]]] = {}
    if "object" in namespaces:
        tables["object"], layers["object"] = _object_walk(model)
    if "h5" in namespaces:
        tables["h5"], layers["h5"] = _h5_walk(model)
    if "keras2" in namespaces:
        tables["keras2"], layers["keras2"] = _keras2_keys(model)
    if "torch" in namespaces:
        tables["torch"], layers["torch"] = _torch_walk(model)
    used: dict[str, int] = {}
    dtype_names: dict[Any, str] = {}  # a variable's dtype -> its numpy name, converted once per dtype
    out = []
    by_namespace = list(tables.items())
    for variable, dtype in zip(variables, _compat.variable_dtypes(variables)):
        vid = id(variable)
        layer, layer_path, index = owners.get(vid, (None, "", 0))
        readable_key = readable.get(vid)
        key = _unique_key(variable.path if readable_key is None else readable_key, used)
        if readable_key is not None:
            layer_path = key.rpartition("/")[0]
        keys = {"name": key}  # the readable key: unique, built from layer names (Keras 2 .h5, TF1)
        for namespace, table in by_namespace:
            found = table.get(vid)
            if found is not None:
                keys[namespace] = found
        dtype_name = dtype_names.get(dtype)
        if dtype_name is None:
            dtype_name = dtype_names[dtype] = np.dtype(dtype).name
        out.append(
            TargetVariable(
                key=key,
                shape=_compat.variable_shape(variable),
                dtype=dtype_name,
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


def _check_model(model: Any) -> list[Any]:
    """``model.weights``, once it is checked that ``model`` is a built Keras model."""
    keras = _keras()
    if not isinstance(model, keras.Model) and not isinstance(model, keras.layers.Layer):
        raise TargetError(
            f"Expected a Keras model. Received: an object of type {type(model).__name__}.",
            hint="Pass the keras.Model you want to load into.",
        )
    weights = list(model.weights) if model.built else []
    if not model.built or (not weights and _has_unbuilt_layers(model)):
        raise TargetError(
            f"Model '{model.name}' is not built, so it has no variables to load into yet.",
            hint="Build it first: call it once on an example batch (model(x)) or call "
            "model.build(input_shape).",
        )
    return weights


def read_value(target: TargetVariable) -> np.ndarray:
    """The variable's current value as a numpy array (a snapshot, or a view valid until the next assign)."""
    return np.asarray(target.variable.numpy())


def assign(target: TargetVariable, value: Any) -> None:
    """Assign ``value`` (a numpy array or tensor of the variable's shape and dtype) to the variable.

    A numpy array is copied into the variable's own buffer on TensorFlow; JAX and
    PyTorch may instead wrap the array's memory (seen with JAX on the CPU), which
    can be a view of a source's memory map, so there it is copied first.
    """
    if isinstance(value, np.ndarray) and _compat.backend() != "tensorflow":
        value = value.copy()
    target.variable.assign(value)


def shard_indices(target: TargetVariable) -> list[tuple[slice, ...]] | None:
    """The blocks of a JAX variable laid out over several devices (``keras.distribution``), or ``None``.

    One index per device this process addresses (``jax.Array.sharding``'s
    ``addressable_devices_indices_map``), sorted by device id, with integer bounds.
    On other backends, and for a variable on one device, ``None``.
    """
    placed = _placement(target)
    if placed is None:
        return None
    shape = tuple(target.shape)
    return [
        tuple(slice(*part.indices(size)[:2]) for part, size in zip(index, shape)) + tuple(
            slice(0, size) for size in shape[len(index):])
        for _, index in placed[1]
    ]


def assign_shard_blocks(target: TargetVariable, blocks: list[np.ndarray]) -> None:
    """Put each block on its device and give the variable the array they make, in its own layout.

    ``blocks`` follow :func:`shard_indices`' order; a block repeated for replicas is the
    same numpy array, put on each of its devices. No device ever holds the whole tensor
    unless the layout says so.
    """
    import jax

    sharding, placed = _placement(target)  # type: ignore[misc]
    if len(blocks) != len(placed):
        raise ValueError(f"{len(blocks)} blocks for the {len(placed)} devices of '{target.key}'")
    arrays = [jax.device_put(block, device) for block, (device, _) in zip(blocks, placed)]
    value = jax.make_array_from_single_device_arrays(tuple(target.shape), sharding, arrays)
    target.variable.assign(value)


def processes_agree(passed: bool) -> bool:
    """True when every JAX process passed (``passed`` is this one's): a collective with several processes.

    ``jax.experimental.multihost_utils.process_allgather`` of one flag per process;
    with one process (or another backend) no collective runs and ``passed`` is returned.
    """
    if _compat.backend() != "jax":
        return passed
    import jax

    if jax.process_count() == 1:
        return passed
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.int32(passed))))


def _placement(target: TargetVariable) -> tuple[Any, list[tuple[Any, tuple[slice, ...]]]] | None:
    """``(sharding, [(device, index), ...])`` of a JAX variable spread over several devices, else ``None``."""
    if _compat.backend() != "jax":
        return None
    sharding = getattr(target.variable.value, "sharding", None)
    if sharding is None or len(sharding.device_set) < 2:
        return None
    by_device = sharding.addressable_devices_indices_map(tuple(target.shape))
    return sharding, sorted(by_device.items(), key=lambda item: item[0].id)

def assign_filled(target: TargetVariable, fill: Callable[[np.ndarray], None]) -> None:
    """Give the variable the value ``fill`` writes into a new array of its shape and dtype.

    On TensorFlow the array is the memory of a new host tensor that the variable
    then adopts (:func:`_compat.empty_host_tensor`): the value is written once,
    with no copy in memory and no array beside the variable's own. Elsewhere it
    is a new numpy array, which the variable may wrap since nothing reuses it.
    """
    made = _compat.empty_host_tensor(tuple(target.shape), target.dtype)
    if made is None:
        out = np.empty(tuple(target.shape), dtype_of(target.dtype))
        fill(out)
        target.variable.assign(out)
        return
    tensor, memory = made
    del made
    fill(memory)
    del memory  # while a view of its memory lives, TensorFlow would copy the tensor rather than adopt it
    target.variable.assign(tensor)


def unique_variables(model: Any) -> list[Any]:
    """``model.weights`` without repeats (a shared layer lists its variables once per use), in order."""
    return _unique(model.weights)


def _unique(weights: list[Any]) -> list[Any]:
    seen: set[int] = set()
    return [v for v in weights if not (id(v) in seen or seen.add(id(v)))]


def _unique_key(path: str, used: dict[str, int]) -> str:
    if path not in used:
        used[path] = 1
        return path
    used[path] += 1
    return f"{path}#{used[path]}"


def _has_unbuilt_layers(model: Any) -> bool:
    return any(not layer.built for layer in _compat.flatten_layers(model))


def _owners(model: Any, weights: list[Any]) -> dict[int, tuple[Any, str, int]]:
    """Map each variable id to (owning layer, layer path, index inside that layer).

    The owner is the innermost layer whose own (non-nested) variables include it.
    """
    out: dict[int, tuple[Any, str, int]] = {}
    for layer in _compat.flatten_layers(model):
        own = _compat.own_variables(layer)
        path = layer.path if hasattr(layer, "path") else layer.name
        for index, variable in enumerate(own):
            out.setdefault(id(variable), (layer, path, index))
    # Variables whose owner was not found keep the variable path's parent.
    for variable in weights:
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
        for variable in _compat.own_variables(layer):
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
    if _is_layered(layer):
        return [(child.name, child) for child in layer.layers]
    if not _compat.tracked_layers(layer):
        return []  # Keras tracks every sub-layer: a leaf layer has none to look for
    found: list[tuple[str, Any]] = []
    for name, value in sorted(_compat.instance_attributes(layer).items(), key=lambda kv: kv[0].startswith("_")):
        if isinstance(value, keras.layers.Layer):
            found.append((name, value))
        elif isinstance(value, (list, tuple)):
            found.extend((f"{name}/{i}", v) for i, v in enumerate(value) if isinstance(v, keras.layers.Layer))
        elif isinstance(value, dict):
            found.extend((f"{name}/{k}", v) for k, v in value.items() if isinstance(v, keras.layers.Layer))
    return found


def _is_layered(model: Any) -> bool:
    """A Sequential or functional model: one whose sub-layers are its ``layers``, in graph order."""
    return isinstance(model, _keras().Sequential) or _compat.is_functional(model)


def _snake(layer: Any) -> str:
    return _compat.snake_case(type(layer).__name__)


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
        for name, child in _compat.checkpoint_children(obj).items():
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


def _torch_walk(model: Any) -> tuple[dict[int, str], dict[str, tuple[str | None, str | None]]]:
    """Keys as a PyTorch ``state_dict`` of the same design would spell them (``features/0/weight``).

    Sequential and functional models number their layers, as ``nn.Sequential``
    does (input layers left out, weightless layers counted); other layers are
    reached by attribute (``self.classifier``), like ``nn.Module`` attributes.
    Each variable is named by its PyTorch parameter (:func:`regraft.layouts.torch_view`).

    Returns (variable id → key, layer key → (name, kind)).
    """
    from regraft.layouts import torch_view

    keras = _keras()
    variables: dict[int, str] = {}
    layers: dict[str, tuple[str | None, str | None]] = {}
    seen: set[int] = set()

    def visit(layer: Any, prefix: str) -> None:
        if id(layer) in seen:
            return
        seen.add(id(layer))
        for variable in _compat.own_variables(layer):
            role = torch_view(type(layer).__name__, variable.name, tuple(variable.shape)).role
            variables.setdefault(id(variable), f"{prefix}{role}")
        if _is_layered(layer):
            items = [c for c in layer.layers if not isinstance(c, keras.layers.InputLayer)]
            children = [(str(i), c) for i, c in enumerate(items)]
        else:
            children = _named_sub_layers(layer)
        for name, child in children:
            layers[f"{prefix}{name}"] = (child.name, _snake(child))
            visit(child, f"{prefix}{name}/")

    visit(model, "")
    return variables, layers


def _h5_walk(model: Any, fast: bool = True) -> tuple[dict[int, str], dict[str, tuple[str | None, str | None]]]:
    """Paths Keras' weights saver would write for ``model`` (``model.save_weights``), without writing.

    With ``fast`` (the default), regraft's own copy of the saver's walk
    (:func:`_walk_weights`); otherwise Keras' own (``saving_lib._save_state``),
    which is slower on large models. Both record what each object's
    ``save_own_variables`` writes; a test checks they agree with each other and
    with a file ``save_weights`` wrote. Neither changes any state of Keras, so
    walks may run on several threads at once.

    Returns (variable id → path, layer path → (name, kind)).

    Raises:
        TargetError: a private Keras name the walk reads is missing, or the walk
            failed on this model (as ``model.save_weights`` would).
    """
    out: dict[int, str] = {}
    layer_names: dict[str, str | None] = {}

    def make(path: str, metadata: dict | None) -> _RecordedVars:
        layer_names[path] = (metadata or {}).get("name")
        return _RecordedVars(path, out)

    try:
        if fast:
            _walk_weights(model, make)
        else:
            _compat.run_keras_weights_walk(model, make)
    except TargetError:
        raise
    except Exception as exc:
        raise TargetError(
            f"Cannot list the .weights.h5 keys of model '{model.name}': Keras' weights walk raised "
            f"{type(exc).__name__}: {exc}",
            hint="regraft walks the model as model.save_weights does: check that "
            "model.save_weights('check.weights.h5') works on this model.",
        ) from exc
    kinds = {layer.name: _snake(layer) for layer in _compat.flatten_layers(model, include_self=False)}
    return out, {path: (name, kinds.get(name)) for path, name in layer_names.items() if path}


class _RecordedVars(dict):
    """The store one object's ``save_own_variables`` writes into: records each variable's path."""

    def __init__(self, path: str, out: dict[int, str]) -> None:
        super().__init__()
        self.path = path
        self.out = out

    def __setitem__(self, name: str, value: Any) -> None:
        self.out.setdefault(id(value), f"{self.path}/vars/{name}" if self.path else f"vars/{name}")


def _walk_weights(model: Any, make: Any) -> None:
    """Keras 3.15's weights saver walk (``saving_lib._save_state``), reading only what Keras tells.

    From ``model``, depth first: each object with ``save_own_variables`` writes
    its variables into ``make(path, {'name': its name})``; then its attributes
    are followed in Keras' order — ``layers`` first for Sequential and functional
    models, then every attribute name not in Keras' skip set for the object's
    type, sorted with Keras' key (private names last). A saveable attribute is
    visited at ``path/attribute``; the items of a list, tuple or dict attribute
    at ``path/attribute/<class in snake case>[_N]`` (nested lists:
    ``container[_N]``). Each object is visited once, at its first path.

    The same walk as Keras', made fast: ``dir(obj)`` (sorted anew per object) is
    the instance's names plus its class's, which are cached per class; the skip
    sets are cached per type.
    """
    saveable_class = _compat.saveable_class()
    sort_key = _compat.attribute_sort_key()
    class_names: dict[tuple[type, str], frozenset[str]] = {}
    orders: dict[tuple[type, str, tuple[str, ...]], list[str]] = {}  # names to visit, per class and instance names
    visited: set[int] = set()

    def attributes(saveable: Any) -> Any:
        obj_type = _compat.saveable_type(saveable)
        if obj_type in ("Sequential", "Functional"):
            yield "layers", saveable.layers
        instance_names = tuple(_compat.instance_attributes(saveable))
        order = orders.get((type(saveable), obj_type, instance_names))
        if order is None:  # layers of one class mostly share their attribute names: sorted once
            skip = _compat.attribute_skipset(obj_type)
            key = (type(saveable), obj_type)
            if key not in class_names:
                class_names[key] = frozenset(
                    n for n in _class_attributes(type(saveable)) if not n.startswith("__") and n not in skip)
            own = {n for n in instance_names if not n.startswith("__") and n not in skip}
            order = orders[(type(saveable), obj_type, instance_names)] = sorted(own | class_names[key], key=sort_key)
        for name in order:
            try:
                child = getattr(saveable, name)
            except Exception:  # Keras' walk skips an attribute that raises; so does the file
                continue
            yield name, child

    def save_state(saveable: Any, path: str) -> None:
        if id(saveable) in visited:
            return
        if hasattr(saveable, "save_own_variables"):
            name = getattr(saveable, "name", None)
            saveable.save_own_variables(make(path, {"name": name} if isinstance(name, str) else None))
        visited.add(id(saveable))
        for name, child in attributes(saveable):
            if isinstance(child, saveable_class):
                save_state(child, _join(path, name))
            elif isinstance(child, (list, dict, tuple)) and leads_on(child):
                save_container(child, _join(path, name), set())

    def save_container(container: Any, path: str, seen: set[int]) -> None:
        if id(container) in seen:
            return
        seen.add(id(container))
        used: dict[str, int] = {}
        for item in list(container.values()) if isinstance(container, dict) else container:
            if isinstance(item, saveable_class):
                save_state(item, _join(path, _unique_name(_compat.snake_case(item.__class__.__name__), used)))
            elif isinstance(item, (list, dict, tuple)):
                name = _unique_name("container", used)  # numbered even when not visited: the next ones count it
                if leads_on(item):
                    save_container(item, _join(path, name), seen)

    def leads_on(container: Any) -> bool:
        # Whether visiting the container could reach anything: a visit of one whose items are neither
        # saveable nor containers does nothing (most are a layer's empty dicts and the (name, variable)
        # references of its checkpoint dependencies).
        for item in container.values() if isinstance(container, dict) else container:
            if isinstance(item, saveable_class) or isinstance(item, (list, dict, tuple)):
                return True
        return False

    save_state(model, "")


def _class_attributes(cls: type) -> list[str]:
    """The names ``dir()`` finds on ``cls`` whose value on an instance may be saveable or a container.

    A name whose first definition along the MRO is a plain function gives a bound
    method, which the walk never follows, unless the instance shadows it (then
    the name is among the instance's own); leaving such names out spares a
    ``getattr`` per method of every layer.
    """
    first: dict[str, Any] = {}
    for klass in cls.__mro__:
        for name, value in vars(klass).items():
            first.setdefault(name, value)
    return [name for name, value in first.items() if not isinstance(value, types.FunctionType)]


def _join(path: str, name: str) -> str:
    return f"{path}/{name}" if path else name


def _unique_name(name: str, used: dict[str, int]) -> str:
    """``name``, then ``name_1``, ``name_2``, … for repeats within one container (as Keras numbers them)."""
    if name in used:
        used[name] += 1
        return f"{name}_{used[name]}"
    used[name] = 0
    return name


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

    if _is_layered(model):
        visit(model, "")
    return out, names


def custom_classes(model: Any) -> set[str]:
    """Snake-case class names of every layer in ``model`` (its own included).

    A layer named after its class (``block``, ``block_2``) was named by Keras:
    these are the class names that auto-generated names are built from.
    """
    return {_snake(layer) for layer in _compat.flatten_layers(model)}


def save_weights(model: Any, out: str, optimizer: Any = None) -> list[str]:
    """Write the model's weights to ``out`` atomically; returns the files written.

    ``*.weights.h5`` is written with Keras' ``save_weights``; ``*.keras`` with Keras'
    ``model.save`` (config and weights); ``*.safetensors`` holds every variable under
    its readable key (``dense1/kernel``); anything else is a TF checkpoint prefix
    written with ``tf.train.Checkpoint(model=model).write`` (``Checkpoint(model=model, optimizer=optimizer)``
    when an optimizer is given: only TF checkpoints carry one).
    Both go through :mod:`regraft.writing`: written in a staging folder next to
    ``out``, then moved into place so that, killed at any moment, ``out`` is the
    previous file or checkpoint (or absent) or the complete new one.

    Raises:
        RegraftError: ``out`` cannot be written (disk full, permission, name too
            long, …); nothing was written and a previous ``out`` is unchanged.
    """
    from regraft.writing import replace_bundle, replace_file

    if optimizer is not None and out.endswith((".weights.h5", ".keras", ".safetensors")):
        raise TargetError(f"Cannot write an optimizer's state into {out}: regraft writes it only into a TF checkpoint.",
                          hint="Give a checkpoint prefix without an extension (out/ckpt).")
    if out.endswith(".weights.h5"):
        return replace_file(out, lambda tmp: _write_h5(model, tmp, out), what="the weights",
                            example="model.weights.h5")
    if out.endswith(".keras"):
        return replace_file(out, lambda tmp: _write_archive(model, tmp, out), what="the model",
                            example="model.keras")
    if out.endswith(".safetensors"):
        return replace_file(out, lambda tmp: _write_safetensors(model, tmp), what="the weights",
                            example="model.safetensors")
    if _compat.backend() != "tensorflow":
        raise TargetError(
            f"Cannot write the TF checkpoint {out}: tf.train.Checkpoint saves models of the "
            f"TensorFlow Keras backend, and this one runs on {_compat.backend()}.",
            hint="Write a Keras weights file instead (a path ending in .weights.h5), or build the "
            "model with KERAS_BACKEND=tensorflow.",
        )
    return replace_bundle(out, lambda tmp, shards: _write_checkpoint(model, tmp, shards, out, optimizer),
                          what="the checkpoint", example="ckpt")


def _write_h5(model: Any, tmp: str, out: str) -> None:
    """Keras' ``.weights.h5`` bytes, built in memory, then written to ``tmp`` with plain writes.

    HDF5 never writes to disk here, so a full disk is an ``OSError`` of the plain
    write (regraft.writing names it), never an HDF5 error that crashes the process
    at exit. The cost: the file's size in memory while writing.
    """
    import io

    if not getattr(model, "built", True):
        raise TargetError(f"Cannot write the weights {out}: the model is not built.",
                          hint="Build the model (call it on a batch, or model.build(shape)) before saving.")
    buffer = io.BytesIO()
    _compat.save_weights_to_buffer(model, buffer)
    with open(tmp, "wb") as f:
        f.write(buffer.getbuffer())
    del buffer


def _write_archive(model: Any, tmp: str, out: str) -> None:
    """Keras' own ``model.save(tmp)``: a ``.keras`` archive with the model's config and weights."""
    try:
        model.save(tmp)
    except OSError:
        raise
    except Exception as exc:  # a layer without get_config, a config that is not JSON, ...
        raise TargetError(
            f"Cannot write the model {out}: Keras could not save model '{model.name}': {type(exc).__name__}: {exc}",
            hint="A .keras archive needs every layer's get_config(); write the weights only instead "
            "(--out model.weights.h5 or model.safetensors).",
        ) from None


def _write_safetensors(model: Any, tmp: str) -> None:
    """Every variable under its readable key (``dense1/kernel``), written with the ``safetensors`` package."""
    from safetensors.numpy import save_file

    variables, _ = describe_with_layers(model, ())
    tensors = {v.key: np.ascontiguousarray(read_value(v)) for v in variables}
    try:
        save_file(tensors, tmp)
    except (ValueError, TypeError) as exc:  # a dtype safetensors has no code for
        raise TargetError(f"Cannot write the weights as safetensors: {exc}",
                          hint="Write .weights.h5 or a TF checkpoint instead.") from None


def _write_checkpoint(model: Any, tmp: str, shards: int, out: str, optimizer: Any = None) -> None:
    """``tf.train.Checkpoint(model=model).write(tmp)`` (with ``optimizer=`` when given) in exactly ``shards`` data files."""
    tf = _compat.tensorflow(f"writing the TF checkpoint {out}")

    from regraft.writing import write_error

    options = None
    if shards > 1:
        options = tf.train.CheckpointOptions(experimental_sharding_callback=_shards_policy(shards))
    try:
        saved = {"model": model} if optimizer is None else {"model": model, "optimizer": optimizer}
        tf.train.Checkpoint(**saved).write(tmp, options=options)
    except tf.errors.OpError as exc:  # OutOfRangeError (file too large), ResourceExhausted, InvalidArgument, …
        raise write_error(out, "the checkpoint", exc) from None


def _shards_policy(shards: int) -> Any:
    """A ``tf.train.experimental.ShardingCallback`` spreading the tensors over exactly ``shards`` data files."""
    tf = _compat.tensorflow("writing a sharded TF checkpoint")

    class _Spread(tf.train.experimental.ShardingCallback):
        @property
        def description(self) -> str:
            return f"regraft: {shards} shards"

        def __call__(self, shardable_tensors):
            if len(shardable_tensors) < shards:
                raise TargetError(f"Cannot write a checkpoint of {len(shardable_tensors)} tensors in {shards} "
                                  "data files.", hint="Write to another prefix.")
            out = [{} for _ in range(shards)]
            for i, tensor in enumerate(shardable_tensors):
                out[i % shards].setdefault(tensor.checkpoint_key, {})[tensor.slice_spec] = tensor.tensor
            return out

    return _Spread()


def layer_graph(model: Any) -> list[GraphLayer]:
    """The model's layers in computation order, each with the layers that feed it.

    Functional and Sequential models give their real graph. A subclassed model
    gives its leaf layers in the order its attributes were assigned, each fed by
    the previous one: the usual way such models are written, and an assumption
    (``regraft.verify`` checks the result).
    """
    keras = _keras()
    readable = _readable_layer_keys(model)
    if _is_layered(model):
        # A functional model's operations include what is not a Layer (``x + y`` is an ``Add``
        # operation): without them, a residual sum written with ``+`` would vanish from the graph.
        operations = list(getattr(model, "operations", None) or model.layers)
        members = {id(layer) for layer in operations}
        out = []
        for layer in operations:
            if isinstance(layer, keras.layers.InputLayer):
                continue
            parents = [parent for parent in _compat.inbound_layers(layer) if id(parent) in members]
            inputs = tuple(readable.get(id(p), p.name) for p in parents if not isinstance(p, keras.layers.InputLayer))
            model_inputs = tuple(p.name for p in parents if isinstance(p, keras.layers.InputLayer))
            out.append(_graph_layer(layer, readable.get(id(layer), layer.name), inputs, model_inputs))
        return out
    leaves = [layer for layer in _leaf_layers(model)]
    out = []
    for i, layer in enumerate(leaves):
        inputs = (readable.get(id(leaves[i - 1]), leaves[i - 1].name),) if i else ()
        out.append(_graph_layer(layer, readable.get(id(layer), layer.name), inputs))
    return out


def _graph_layer(layer: Any, key: str, inputs: tuple[str, ...], model_inputs: tuple[str, ...] = ()) -> GraphLayer:
    keras = _keras()
    activation = getattr(layer, "activation", None)
    name = getattr(activation, "__name__", None) if activation is not None else None
    non_negative = name in ("relu", "relu6")
    if isinstance(layer, keras.layers.ReLU):
        # ReLU(negative_slope=a) is a leaky ReLU: negative for negative inputs when a > 0.
        slope, threshold = float(layer.negative_slope), float(layer.threshold)
        capped = layer.max_value is not None
        name = "leaky_relu" if slope != 0 or threshold != 0 else ("relu6" if capped else "relu")
        non_negative = slope == 0 and threshold >= 0
    epsilon = getattr(layer, "epsilon", None)
    try:
        tensors = layer.input if isinstance(layer.input, (list, tuple)) else [layer.input]
        in_shapes = tuple(tuple(None if d is None else int(d) for d in t.shape[1:]) for t in tensors)
        output = layer.output[0] if isinstance(layer.output, (list, tuple)) else layer.output
        out_shape = tuple(None if d is None else int(d) for d in output.shape[1:])
    except (AttributeError, ValueError, TypeError, IndexError):
        in_shapes, out_shape = (), None  # a layer not called in a graph (subclassed models)
    axis = getattr(layer, "axis", None) if isinstance(layer, keras.layers.Concatenate) else None
    return GraphLayer(key, _snake(layer), inputs, name, non_negative, model_inputs,
                      float(epsilon) if isinstance(epsilon, (int, float)) else None, in_shapes,
                      int(axis) if isinstance(axis, int) else None, out_shape)


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
    for layer in _compat.flatten_layers(model, include_self=False):
        own = _compat.own_variables(layer)
        if own and id(own[0]) in by_variable:
            out[id(layer)] = by_variable[id(own[0])].rpartition("/")[0]
    return out


class KerasTarget:
    """A built Keras 3 model on any backend (TensorFlow, JAX, PyTorch): a :class:`~regraft.targets.base.Target`."""

    def __init__(self, model: Any) -> None:
        self._checked = _check_model(model)  # model.weights, for the describe that follows (planning)
        self.model = model
        self.name = str(model.name)

    def describe(self, namespaces: tuple[str, ...]) -> tuple[list[TargetVariable], dict[str, LayerTable]]:
        # The weights listed by the check serve the first describe only; later ones list them anew.
        weights, self._checked = self._checked, None
        return describe_with_layers(self.model, namespaces, weights)

    def layer_graph(self) -> list[GraphLayer]:
        return layer_graph(self.model)

    def layer_classes(self) -> frozenset[str]:
        return frozenset(custom_classes(self.model))

    def variables(self) -> list[Any]:
        return unique_variables(self.model)

    def read(self, variable: TargetVariable) -> np.ndarray:
        return read_value(variable)

    def assign(self, variable: TargetVariable, value: Any) -> None:
        assign(variable, value)

    def assign_filled(self, variable: TargetVariable, fill: Callable[[np.ndarray], None]) -> None:
        assign_filled(variable, fill)

    def shards(self, variable: TargetVariable) -> list[tuple[slice, ...]] | None:
        return shard_indices(variable)

    def assign_shards(self, variable: TargetVariable, blocks: list[np.ndarray]) -> None:
        assign_shard_blocks(variable, blocks)

    def all_passed(self, passed: bool) -> bool:
        return processes_agree(passed)

    def freeze(self, variable: TargetVariable) -> None:
        if variable.layer_object is not None:
            variable.layer_object.trainable = False

    def save(self, path: str, optimizer: Any = None) -> list[str]:
        return save_weights(self.model, path) if optimizer is None else save_weights(self.model, path, optimizer)
