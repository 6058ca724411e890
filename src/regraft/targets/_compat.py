"""Every use of Keras' and TensorFlow's private API, in one place.

regraft computes a model's checkpoint keys by asking the frameworks, and some of
what it asks is not public: ``Layer._flatten_layers``, the weights saver's
attribute walk in ``keras.src.saving.saving_lib``, TensorFlow's
``_trackable_children``, the functional graph's nodes. Each such read is one
small function below, with the Keras version it exists since (checked against
Keras' release tags), and a test in ``tests/test_compat.py`` that pins what it
returns on a small real model.

When a name is missing — a Keras release renamed or removed it — the accessor
raises :class:`~regraft.errors.TargetError` naming the private name, the version
it is known from and the Keras installed. Nothing here falls back silently:
a key regraft cannot compute would otherwise just vanish from matching.

regraft is tested with Keras 3.15 and TensorFlow 2.21 (``pyproject.toml``'s floors).
Nothing in this module changes any state of Keras or TensorFlow, except
:func:`placeholder_initializers`, which swaps one method for the duration of a
``with`` block and puts it back.

Example:
    >>> from regraft.targets import _compat                           # doctest: +SKIP
    >>> [layer.name for layer in _compat.flatten_layers(model)]       # doctest: +SKIP
    ['model', 'dense1', 'dense2']
"""

from __future__ import annotations

import collections
import contextlib
import functools
import importlib
import sys
from typing import Any, Callable, Iterator, MutableMapping

from regraft.errors import TargetError

__all__ = [
    "keras_version",
    "save_weights_to_buffer",
    "functional_class",
    "is_functional",
    "flatten_layers",
    "own_variables",
    "variable_dtypes",
    "tracked_layers",
    "snake_case",
    "backend",
    "tensorflow",
    "checkpoint_children",
    "predicted_checkpoint_children",
    "instance_attributes",
    "inbound_layers",
    "input_consumers",
    "functional_inputs",
    "build_shapes",
    "saveable_class",
    "saveable_type",
    "attribute_skipset",
    "attribute_sort_key",
    "run_keras_weights_walk",
    "empty_host_tensor",
    "optimizer_slot_lists",
    "slot_holder",
    "loss_scale_variables",
    "optimizer_scalars",
    "step_variable",
    "placeholder_initializers",
]

_HINT = (
    "regraft is tested with keras 3.15 and tensorflow 2.21 (see pyproject.toml): install those, "
    "or report the Keras version to regraft; every private name it reads is in regraft/targets/_compat.py."
)


def keras_version() -> str:
    """The installed Keras version (``keras.__version__``, public), e.g. ``'3.15.1'``."""
    import keras

    return str(keras.__version__)


def _versions() -> str:
    """``Keras 3.15.1 (TensorFlow 2.21.0)``: what is installed, for error messages."""
    text = f"Keras {keras_version()}"
    tf = sys.modules.get("tensorflow")
    version = getattr(tf, "__version__", None)
    return f"{text} (TensorFlow {version})" if version else text


def _missing(name: str, since: str, found: str = "") -> TargetError:
    """The loud error for a private name that the installed Keras/TensorFlow lacks."""
    where = f" {found}" if found else ""
    return TargetError(
        f"regraft reads the private {name} (present since {since}), but{where} it is missing with "
        f"{_versions()} installed.",
        hint=_HINT,
    )


def _attribute(obj: Any, name: str, owner: str, since: str) -> Any:
    """``getattr(obj, name)``, or the loud error naming ``owner.name``."""
    try:
        return getattr(obj, name)
    except AttributeError:
        label = getattr(obj, "name", None)
        found = f"on {type(obj).__name__} '{label}'" if isinstance(label, str) else f"on an object of type {type(obj).__name__}"
        raise _missing(f"`{owner}.{name}`", since, found) from None


def _import(module: str, name: str, since: str) -> Any:
    """``from module import name``, or the loud error naming ``module.name``."""
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        raise _missing(f"`{module}.{name}`", since) from None


# --------------------------------------------------------------------------- model structure


@functools.cache
def functional_class() -> type:
    """The class of functional models, ``keras.src.models.functional.Functional``.

    ``keras.Model(inputs, outputs)`` returns one (so does a ``keras.Model``
    subclass initialised with inputs and outputs); Keras exports it under no
    public name. Since Keras 3.0 (under ``keras.src`` since 3.3). ``Sequential``
    is not a subclass of it.
    """
    return _import("keras.src.models.functional", "Functional", "Keras 3.3")


def is_functional(model: Any) -> bool:
    """Whether ``model`` is a functional model (``isinstance`` of :func:`functional_class`)."""
    return isinstance(model, functional_class())


def flatten_layers(layer: Any, include_self: bool = True, recursive: bool = True) -> list[Any]:
    """Every layer ``layer`` tracks, depth first: ``Layer._flatten_layers`` (Keras 3.0).

    Each layer once, ``layer`` itself first when ``include_self``; with
    ``recursive``, the layers of sub-layers too.
    """
    method = _attribute(layer, "_flatten_layers", "Layer", "Keras 3.0")
    return list(method(include_self=include_self, recursive=recursive))


def own_variables(layer: Any) -> list[Any]:
    """The variables a layer created itself, not its sub-layers': trainable first, then non-trainable.

    Reads ``Layer._trainable_variables`` and ``Layer._non_trainable_variables``
    (Keras 3.0); in this order ``Layer.save_own_variables`` numbers them
    ``vars/0, vars/1, …``.
    """
    trainable = _attribute(layer, "_trainable_variables", "Layer", "Keras 3.0")
    non_trainable = _attribute(layer, "_non_trainable_variables", "Layer", "Keras 3.0")
    return list(trainable) + list(non_trainable)


def variable_shape(variable: Any) -> tuple[int, ...]:
    """A Keras variable's shape as a tuple of ints: ``KerasVariable._shape`` (Keras 3.0).

    The TensorFlow backend's ``shape`` wraps it in a new ``tf.TensorShape`` on every
    read (a third of describing a model's variables); where ``_shape`` is not a
    tuple of ints, ``shape`` serves.
    """
    shape = getattr(variable, "_shape", None)
    if type(shape) is tuple and all(type(d) is int for d in shape):
        return shape
    return tuple(int(d) for d in variable.shape)


def variable_dtypes(variables: list[Any]) -> list[Any]:
    """Each variable's ``dtype``, exactly as ``variable.dtype`` gives it.

    Outside an autocast scope (``keras.src.backend.common.variables.get_autocast_scope``,
    Keras 3.0) ``KerasVariable.dtype`` is ``standardize_dtype(variable._dtype)``, and
    ``_dtype`` (Keras 3.0) was standardised when the variable was made: read directly,
    it costs a tenth of the property (which looks the scope up and standardises again
    on every read). Inside a scope, or where ``_dtype`` is not a string, the property serves.
    """
    try:
        from keras.src.backend.common.variables import get_autocast_scope
    except ImportError:
        return [variable.dtype for variable in variables]
    if get_autocast_scope() is not None:
        return [variable.dtype for variable in variables]
    out = []
    for variable in variables:
        dtype = getattr(variable, "_dtype", None)
        out.append(dtype if type(dtype) is str else variable.dtype)
    return out


def tracked_layers(layer: Any) -> list[Any]:
    """The direct sub-layers Keras tracks on ``layer``: ``Layer._layers`` (Keras 3.0).

    Every layer assigned to an attribute (or held in a list or dict attribute) is
    tracked here, so an empty list means a leaf layer.
    """
    return list(_attribute(layer, "_layers", "Layer", "Keras 3.0"))


@functools.cache
def _to_snake_case() -> Callable[[str], str]:
    return _import("keras.src.utils.naming", "to_snake_case", "Keras 3.3")


@functools.lru_cache(maxsize=4096)
def snake_case(class_name: str) -> str:
    """Keras' snake case of a class name, as in auto-generated layer names (``Conv2D`` → ``conv2d``).

    ``keras.src.utils.naming.to_snake_case`` (Keras 3.0, under ``keras.src`` since
    3.3). The weights saver names the items of a list attribute with it too.
    Memoised: a pure function of the name, asked once per layer (three regular
    expressions each).
    """
    return _to_snake_case()(class_name)


def backend() -> str:
    """The Keras backend the models run on: ``keras.backend.backend()`` (public), e.g. ``'jax'``."""
    import keras

    return str(keras.backend.backend())


def tensorflow(needed_for: str) -> Any:
    """The ``tensorflow`` module, imported on first use; a clear error where it is not installed.

    ``needed_for`` says what needs it (``'writing a TF checkpoint'``). Reading
    a TF checkpoint never does: regraft reads bundles itself.
    """
    try:
        import tensorflow as tf
    except ImportError:
        raise TargetError(
            f"{needed_for[:1].upper()}{needed_for[1:]} needs TensorFlow, which is not installed "
            f"(Keras backend: {backend()}).",
            hint="Install it with `pip install 'regraft[tensorflow]'`, or write a Keras .weights.h5 "
            "file instead (needs no TensorFlow).",
        ) from None
    return tf


def checkpoint_children(obj: Any) -> dict[str, Any]:
    """The named children ``tf.train.Checkpoint`` saves for ``obj``.

    On the TensorFlow backend, TensorFlow's own
    ``Trackable._trackable_children(save_type="checkpoint")`` (overridden by
    Keras' TensorFlow-backend ``Layer`` since Keras 3.0); raises
    :class:`TargetError` when ``obj`` has no such method. On other backends Keras
    objects are not TensorFlow trackables: :func:`predicted_checkpoint_children`
    computes the same children from the object's attributes.
    """
    if backend() != "tensorflow":
        return predicted_checkpoint_children(obj)
    if _reads_dependencies(type(obj)) and hasattr(obj, "_self_unconditional_checkpoint_dependencies"):
        return {name: ref for name, ref in obj._checkpoint_dependencies}
    method = _attribute(obj, "_trackable_children", "Trackable", "TensorFlow 2.x / Keras 3.0")
    return dict(method(save_type="checkpoint"))


@functools.cache
def _reads_dependencies(cls: type) -> bool:
    """Whether ``_trackable_children(save_type="checkpoint")`` of a ``cls`` instance only lists its dependencies.

    True when the classes along ``cls``'s MRO that define ``_trackable_children``
    are Keras' TensorFlow-backend ``Layer`` (Keras 3.0: hands a checkpoint to
    ``super()``), TensorFlow's ``AutoTrackable`` (likewise) and ``Trackable``
    (TensorFlow 2.x), or a tail of that chain, and ``_checkpoint_dependencies``
    and ``_maybe_initialize_trackable`` are ``Trackable``'s own. Then the children
    of an initialised object are ``{name: ref for name, ref in obj._checkpoint_dependencies}``,
    which :func:`checkpoint_children` reads directly: the method itself wraps each call
    in two ``no_automatic_dependency_tracking`` toggles, four attribute writes that
    Keras' ``Layer.__setattr__`` tracks (two thirds of describing a 10,000-variable
    model's object keys). Anything else (an override, another TensorFlow) takes the
    method; ``tests/test_compat.py`` checks both give the same children.
    """
    try:
        from keras.src.backend.tensorflow.layer import TFLayer
        from tensorflow.python.trackable.autotrackable import AutoTrackable
        from tensorflow.python.trackable.base import Trackable
    except ImportError:
        return False

    def definers(name: str) -> list[type]:
        return [klass for klass in cls.__mro__ if name in vars(klass)]

    chain = [TFLayer, AutoTrackable, Trackable]
    return (definers("_trackable_children") in (chain, chain[1:], chain[2:])
            and definers("_checkpoint_dependencies")[:1] == [Trackable]
            and definers("_maybe_initialize_trackable")[:1] == [Trackable])


def predicted_checkpoint_children(obj: Any) -> dict[str, Any]:
    """The children ``tf.train.Checkpoint`` would save for ``obj`` had it been built on TensorFlow.

    Needs no TensorFlow. On the TensorFlow backend a Keras layer, optimizer or
    variable is a TensorFlow ``Trackable``, and assigning an attribute records it
    as a checkpoint dependency when the value is trackable
    (``KerasAutoTrackable.__setattr__`` and TensorFlow's
    ``data_structures.sticky_attribute_assignment``): a layer, an optimizer, a
    variable, or a container of *exactly* type ``list``, ``dict``,
    ``OrderedDict`` or ``tuple``, which TensorFlow wraps (``ListWrapper``, …)
    and whose children are its trackable items keyed by position or string key.
    Keras' own tracked containers (``TrackedList``, ``TrackedDict``: any list
    or dict a layer attribute gets while Keras tracking is on) are not
    trackable, so they are not followed: the reason ``tf.train.Checkpoint``
    drops layers kept in a list attribute of a custom layer. Dependencies are
    in attribute order (``vars(obj)``, the order of first assignment).

    Reads ``vars(obj)``, skipping TensorFlow's own bookkeeping (``_self_*``)
    and the lists Keras assigns with TensorFlow's tracking switched off
    (``_UNTRACKED_LISTS``), so it gives the same children on every backend; ``tests/test_compat.py``
    checks it against ``_trackable_children`` on the TensorFlow backend.
    """
    if _tf_wrapped(obj) or type(obj) in (list, tuple):
        return {str(i): v for i, v in enumerate(obj) if _checkpoint_trackable(v)}
    if type(obj) in (dict, collections.OrderedDict) or (_tf_wrapped(obj) and isinstance(obj, dict)):
        return {k: v for k, v in obj.items() if isinstance(k, str) and _checkpoint_trackable(v)}
    import keras

    if isinstance(obj, keras.Variable) or not hasattr(obj, "__dict__"):
        return {}
    torch_own = _torch_module_attributes() if _is_torch_module(obj) else frozenset()
    return {name: value for name, value in instance_attributes(obj).items()
            if not name.startswith("_self_") and name != "_modules" and name not in _UNTRACKED_LISTS
            and name not in torch_own and _checkpoint_trackable(value)}


# Plain lists Keras 3.15 assigns with TensorFlow's attribute tracking switched off
# (``_self_setattr_tracking = False`` on the TensorFlow backend), so no checkpoint holds
# them: ``Layer._initialize_tracker``'s collections (Keras 3.0) and ``Function.__init__``'s
# inputs and outputs (Keras 3.0).
_UNTRACKED_LISTS = frozenset({
    "_trainable_variables", "_non_trainable_variables", "_layers", "_metrics", "_seed_generators",
    "_inputs_struct", "_outputs_struct", "_inputs", "_outputs",
})


def instance_attributes(obj: Any) -> dict[str, Any]:
    """``obj``'s own attributes by name: ``vars(obj)``, plus on the PyTorch backend its sub-modules.

    A Keras layer on PyTorch is a ``torch.nn.Module``, which keeps sub-layers
    assigned to attributes in ``Module._modules`` (torch 1.0), not in the
    instance ``__dict__``; they follow the other attributes here (their order
    relative to list and dict attributes is not kept).
    """
    found = dict(vars(obj))
    modules = found.get("_modules")
    if isinstance(modules, dict) and _is_torch_module(obj):
        found.update((name, module) for name, module in modules.items() if module is not None and name not in found)
    return found


def _is_torch_module(obj: Any) -> bool:
    """A ``torch.nn.Module`` (every Keras layer on the PyTorch backend), found without importing torch."""
    return any(c.__module__.startswith("torch.") for c in type(obj).__mro__)


@functools.cache
def _torch_module_attributes() -> frozenset[str]:
    """The attributes ``torch.nn.Module.__init__`` assigns (its hook and parameter dicts, ``training``):
    plain dicts that TensorFlow would track, but a Keras layer has them only on the PyTorch backend."""
    import torch

    return frozenset(vars(torch.nn.Module()))


def _tf_wrapped(value: Any) -> bool:
    """A TensorFlow data-structure wrapper (``ListWrapper``, ``_DictWrapper``, ``_TupleWrapper``)."""
    return type(value).__module__.startswith("tensorflow.") and isinstance(value, (list, tuple, dict))


def _checkpoint_trackable(value: Any) -> bool:
    """Whether TensorFlow would track ``value`` when assigned to a Keras object's attribute."""
    import keras

    if isinstance(value, (keras.layers.Layer, keras.Variable, keras.optimizers.Optimizer)):
        return True
    if type(value) in (list, dict, collections.OrderedDict) or _tf_wrapped(value):
        return True
    return type(value) is tuple  # a namedtuple is wrapped differently; no Keras model holds one of layers


def inbound_layers(layer: Any) -> list[Any]:
    """The operations (layers) whose outputs ``layer`` was called on in its functional graph(s).

    ``Operation._inbound_nodes`` (Keras 3.0), each node's ``parent_nodes``
    (Keras 3.0) and their ``operation``; one entry per call argument, in call
    order, for every graph the layer is part of.
    """
    nodes = _attribute(layer, "_inbound_nodes", "Operation", "Keras 3.0")
    return [_attribute(parent, "operation", "Node", "Keras 3.0")
            for node in nodes for parent in _attribute(node, "parent_nodes", "Node", "Keras 3.0")]


def input_consumers(tensor: Any) -> list[Any]:
    """The layers a functional model's input tensor feeds directly.

    ``KerasTensor._keras_history.operation`` (the ``InputLayer``, Keras 3.0), then
    its ``Operation._outbound_nodes`` (Keras 3.0) and each node's ``operation``.
    """
    history = getattr(tensor, "_keras_history", None)
    if history is None:
        raise _missing("`KerasTensor._keras_history`", "Keras 3.0", f"on the input {tensor!r}")
    source = _attribute(history, "operation", "KerasHistory", "Keras 3.0")
    return [_attribute(node, "operation", "Node", "Keras 3.0")
            for node in _attribute(source, "_outbound_nodes", "Operation", "Keras 3.0")]


def functional_inputs(model: Any) -> Any:
    """A functional model's inputs in the structure it was built with, or ``None`` for other models.

    ``Function._inputs_struct`` (Keras 3.0): one ``KerasTensor``, a list, or a
    dict keyed by input name, exactly as passed to ``keras.Model(inputs, …)``
    (``model.inputs`` flattens it).
    """
    if not is_functional(model):
        return None
    return _attribute(model, "_inputs_struct", "Function", "Keras 3.0")


def build_shapes(model: Any) -> Any:
    """The shapes a layer was built with, by call argument: ``Layer._build_shapes_dict`` (Keras 3.0).

    ``{'x': (None, 5)}`` for a subclassed model built by calling it on a batch;
    ``None`` before it is built that way or for an object that is not a Keras layer.
    """
    import keras

    if not isinstance(model, keras.layers.Layer):
        return None
    return _attribute(model, "_build_shapes_dict", "Layer", "Keras 3.0")


# --------------------------------------------------------------------------- the weights saver's walk


@functools.cache
def saveable_class() -> type:
    """The base class of what Keras' weights saver visits: ``keras.src.saving.keras_saveable.KerasSaveable``.

    Layers, models, optimizers, metrics and losses are ``KerasSaveable``. Since Keras 3.4.
    """
    return _import("keras.src.saving.keras_saveable", "KerasSaveable", "Keras 3.4")


def saveable_type(saveable: Any) -> str:
    """The saver's type tag of ``saveable``: ``KerasSaveable._obj_type()`` (Keras 3.4).

    ``'Layer'``, ``'Functional'``, ``'Sequential'``, ``'Optimizer'``, ``'Metric'``, ``'Loss'``, …
    """
    return str(_attribute(saveable, "_obj_type", "KerasSaveable", "Keras 3.4")())


@functools.cache
def attribute_skipset(obj_type: str) -> frozenset[str]:
    """The attribute names the weights saver does not follow for objects of type ``obj_type``.

    ``saving_lib.get_attr_skipset`` (Keras 3.6; ``get_attr_skiplist`` before).
    Memoised here: Keras 3.15 caches it under one global name and reads another,
    so each call builds a throwaway ``Layer`` (5 s for 3,000 layers).
    """
    function = _import("keras.src.saving.saving_lib", "get_attr_skipset", "Keras 3.6")
    return frozenset(function(obj_type))


@functools.cache
def attribute_sort_key() -> Callable[[str], str]:
    """The key the weights saver sorts attribute names by: ``saving_lib._name_key`` (Keras 3.1;
    under ``keras.src`` since 3.3, as every module path here).

    Private names (``_x``) sort after public ones.
    """
    return _import("keras.src.saving.saving_lib", "_name_key", "Keras 3.3")


def run_keras_weights_walk(model: Any, make: Callable[[str, dict | None], MutableMapping[str, Any]]) -> None:
    """Run Keras' own weights saver walk over ``model``, writing nothing.

    ``saving_lib._save_state`` (Keras 3.0) with a ``saving_lib.H5IOStore``
    subclass (``make(path, metadata)`` since Keras 3.6) that opens no file:
    for every object with variables it calls ``make(path, metadata)``
    (``metadata`` is ``{'name': layer name}`` or ``None``) and the object writes
    its variables into the mapping returned, as ``store['0'] = variable``. This
    is what ``model.save_weights`` does; regraft's own walk
    (``targets.keras._h5_walk``) is checked against it. It is slow on large
    models (Keras rebuilds its skip set and sorts ``dir()`` for every layer)
    and patches nothing.
    """
    store_class = _import("keras.src.saving.saving_lib", "H5IOStore", "Keras 3.3")
    save_state = _import("keras.src.saving.saving_lib", "_save_state", "Keras 3.3")

    class _Recorder(store_class):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:  # no file: only hands out mappings
            pass

        def __bool__(self) -> bool:
            return True

        def make(self, path: str, metadata: dict | None = None) -> MutableMapping[str, Any]:
            return make(path, metadata)

    save_state(model, _Recorder(), None, "", set())


def save_weights_to_buffer(model: Any, buffer: Any) -> None:
    """What ``model.save_weights("x.weights.h5")`` writes, into ``buffer`` (an ``io.BytesIO``).

    The steps of ``saving_lib.save_weights_only`` (Keras 3.15): ``_save_state``
    (Keras 3.0) into a ``saving_lib.H5IOStore`` (Keras 3.3) opened on the buffer
    (``io.BytesIO`` accepted since Keras 3.4). regraft writes the bytes to disk
    itself: HDF5 meeting a full disk leaves its library in a state that crashes
    the process at exit (seen with h5py 3.x), while a failed plain write is an
    ``OSError`` like any other.
    """
    store_class = _import("keras.src.saving.saving_lib", "H5IOStore", "Keras 3.4")
    save_state = _import("keras.src.saving.saving_lib", "_save_state", "Keras 3.3")
    store = store_class(buffer, mode="w")
    try:
        save_state(model, weights_store=store, assets_store=None, inner_path="", visited_saveables=set())
    finally:
        store.close()

# --------------------------------------------------------------------------- loading


class _Memory:
    """Exposes a tensor's memory as a writable numpy array (``__array_interface__``), keeping the tensor alive."""

    def __init__(self, tensor: Any, address: int, shape: tuple[int, ...], typestr: str) -> None:
        self.tensor = tensor
        self.__array_interface__ = {"data": (address, False), "shape": shape, "typestr": typestr, "version": 3}


def empty_host_tensor(shape: tuple[int, ...], dtype: str) -> tuple[Any, Any] | None:
    """A new, uninitialised TensorFlow tensor in host memory and a writable numpy view of its bytes.

    Filling the view and then assigning the tensor lets the variable adopt the
    tensor's buffer (``AssignVariableOp`` forwards an input nobody else holds),
    so a tensor read from a file is copied once, into memory TensorFlow's own
    allocator recycles from the variable's previous value. Built from public
    calls: ``tf.raw_ops.Empty`` (``init=False``) and the tensor's DLPack export
    (``np.from_dlpack``, TensorFlow 2.13+), which numpy marks read-only; the
    writable view is made over the same address, which is sound only because
    nobody else holds the new tensor. Drop the view before assigning: while it
    lives, TensorFlow copies instead of adopting. ``None`` on other backends and
    for dtypes DLPack cannot carry (bfloat16).
    """
    import numpy as np

    if backend() != "tensorflow" or not int(np.prod(shape, dtype=np.int64)):
        return None
    tf = tensorflow("reading into a TensorFlow tensor")
    try:
        with tf.device("CPU:0"):
            tensor = tf.raw_ops.Empty(shape=list(shape), dtype=tf.as_dtype(dtype), init=False)
        exported = np.from_dlpack(tensor)  # read-only, same memory
    except (RuntimeError, TypeError, ValueError, BufferError):  # a dtype DLPack or numpy cannot carry
        return None
    if exported.dtype != np.dtype(dtype) or not exported.flags.c_contiguous:
        return None
    address = exported.__array_interface__["data"][0]
    return tensor, np.asarray(_Memory(tensor, address, tuple(shape), exported.dtype.str))


# --------------------------------------------------------------------------- building


@contextlib.contextmanager
def placeholder_initializers(record: Callable[[Any, Any], None]) -> Iterator[None]:
    """While the block runs, a variable Keras creates from an initializer starts as zeros.

    ``record(variable, initializer)`` is called for each such variable, so the
    caller can run the real initializer later for the ones it does not
    overwrite. Wraps the backend variable class's private
    ``Variable._initialize_with_initializer`` (``keras.Variable``, Keras 3.0:
    every ``add_weight`` with an initializer goes through it), and puts it back
    on exit. The swap is process-wide: variables built on other threads
    meanwhile start as zeros too.
    """
    import keras

    cls = keras.Variable
    name = "_initialize_with_initializer"
    original = _attribute(cls, name, "keras.Variable", "Keras 3.0")
    own = name in vars(cls)
    zeros = keras.initializers.Zeros()

    def placeholder(variable: Any, initializer: Any) -> None:
        record(variable, initializer)
        original(variable, zeros)

    setattr(cls, name, placeholder)
    try:
        yield
    finally:
        if own:
            setattr(cls, name, original)
        else:
            delattr(cls, name)


# --------------------------------------------------------------------------- optimizers

# The per-variable slot lists of Keras 3's built-in optimizers (attribute names since Keras 3.0):
# item i of each list belongs to item i of ``_trainable_variables``.
OPTIMIZER_SLOT_LISTS = (
    "_momentums", "momentums", "_velocities", "_velocity_hats", "_average_gradients", "_accumulators",
    "_m", "_u", "_accumulated_grads", "_accumulated_delta_vars", "_linears", "_accumulated_gradients",
    "_model_variables_moving_average", "_r", "_c", "_v", "adam_velocities",
)
# Scalar state an optimizer's step reads besides its step count: Nadam's ``_u_product`` (since Keras 3.0).
OPTIMIZER_SCALARS = ("_u_product",)


def optimizer_slot_lists(optimizer: Any) -> tuple[list[Any], dict[str, list[Any]]]:
    """A built Keras 3 optimizer's variables (``_trainable_variables``, since Keras 3.0) and its
    per-variable slot lists (``_momentums``, ``_velocities``, … — those of
    ``OPTIMIZER_SLOT_LISTS`` it has, each as long as the variable list)."""
    variables = list(_attribute(optimizer, "_trainable_variables", "Optimizer", "keras 3.0"))
    lists = {}
    for name in OPTIMIZER_SLOT_LISTS:
        items = getattr(optimizer, name, None)
        if isinstance(items, (list, tuple)) and len(items) == len(variables):
            lists[name] = list(items)
    return variables, lists


def slot_holder(optimizer: Any) -> Any:
    """The optimizer that holds the per-variable slots: a ``LossScaleOptimizer``'s
    ``inner_optimizer`` (public attribute since Keras 3.0), else ``optimizer`` itself."""
    import keras

    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        return optimizer.inner_optimizer
    return optimizer


def step_variable(optimizer: Any) -> Any:
    """The optimizer's step-count variable, ``_iterations`` (since Keras 3.0): the one in
    ``optimizer.variables`` (``iterations`` is a computed value under gradient accumulation)."""
    return _attribute(optimizer, "_iterations", "Optimizer", "keras 3.0")


def loss_scale_variables(optimizer: Any) -> dict[str, Any]:
    """A built ``LossScaleOptimizer``'s ``dynamic_scale`` and ``step_counter`` variables (attributes
    its ``build`` sets, since Keras 3.0); ``{}`` for any other optimizer."""
    import keras

    if not isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        return {}
    return {name: _attribute(optimizer, name, "LossScaleOptimizer", "keras 3.0")
            for name in ("dynamic_scale", "step_counter")}


def optimizer_scalars(optimizer: Any) -> dict[str, Any]:
    """The ``OPTIMIZER_SCALARS`` variables ``optimizer`` has, by attribute name."""
    return {name: getattr(optimizer, name) for name in OPTIMIZER_SCALARS if getattr(optimizer, name, None) is not None}
