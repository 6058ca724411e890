"""A target with no model: the new model's structure read from a weights file of it (``regraft convert``).

:class:`FileTarget` satisfies :class:`~regraft.targets.base.Target` from an opened
:class:`~regraft.sources.base.Source` (the ``--like`` file): each weight of that file
is a variable, keyed in the file's namespace, held in a numpy buffer that starts as
the file's own value. Matching sees what the file records (keys, shapes, dtypes,
layer names and classes where the format keeps them); applying assigns into the
buffers; :meth:`FileTarget.save` writes the file again in its own format with the
new values, through :mod:`regraft.writing`.

What a file cannot give, compared with a live Keras model (:class:`KerasTarget`):

* keys in other namespaces: a model computes its key in every format, a file
  knows only its own, so the old checkpoint must be in the same namespace
  (:func:`regraft.convert` refuses otherwise);
* the layer graph (``--reshape preserve`` needs it) and trainable flags;
* layer classes where the format does not record them (a TF checkpoint records
  none; ``.weights.h5`` groups of functional models are named after the class).
"""

from __future__ import annotations

import io
import os
import zipfile
from typing import Any, Callable

import numpy as np

from regraft.entries import WEIGHT, SourceEntry, TargetVariable
from regraft.errors import RegraftError, TargetError
from regraft.keys import namespace as namespace_of
from regraft.naming import dtype_of
from regraft.sources.base import Source
from regraft.targets.base import GraphLayer, LayerTable

__all__ = ["FileTarget", "WRITES", "model_from_archive", "compiled_from_config", "output_format", "check_writable"]

#: What :meth:`FileTarget.save` writes (by the output's extension) from which ``--like`` formats.
WRITES = {
    ".weights.h5": ("keras-h5", "keras-archive"),
    ".keras": ("keras-archive",),
    ".safetensors": None,  # from any format: the --like file's keys (its tensor names as written)
    "checkpoint": ("tf-object",),
}
_WEIGHTS_MEMBER = "model.weights.h5"
_OBJECT_GRAPH = "_CHECKPOINTABLE_OBJECT_GRAPH"


class _Buffer:
    """One variable's value: the ``--like`` file's tensor until something is assigned."""

    __slots__ = ("entry", "value")

    def __init__(self, entry: SourceEntry) -> None:
        self.entry = entry
        self.value: np.ndarray | None = None


class FileTarget:
    """The new model as a weights file describes it: variables are the file's weights, in numpy buffers.

    Args:
        like: the opened weights file of the new model (any format regraft reads).

    Raises:
        RegraftError: the file holds weights of several saved objects (``model``
            and ``ema``), or no weights at all.

    Example:
        >>> with regraft.open("new.weights.h5") as like:     # doctest: +SKIP
        ...     target = FileTarget(like)
        ...     [v.key for v in target.describe(("h5",))[0]][:2]
        ['layers/dense/vars/0', 'layers/dense/vars/1']
    """

    def __init__(self, like: Source) -> None:
        self.like = like
        self.model = like
        self.name = os.path.basename(os.path.normpath(like.path))
        ns = namespace_of(like.namespace)
        weights = [e for e in like.entries() if e.kind == WEIGHT]
        if not weights:
            raise RegraftError(f"{like.path} holds no weights to take the new model's structure from.",
                               hint="Pass a weights file of the new model as --like.")
        roots = [r for r in like.roots() if r and ns.saved_objects and not ns.position(r, "")]
        if len(roots) > 1:
            raise RegraftError(
                f"{like.path} holds the weights of several saved objects ({', '.join(roots)}); regraft cannot tell "
                "which one is the new model.", hint="Save the new model's weights alone (save_weights) and pass that.")
        self.root = roots[0] + "/" if roots else ""
        self._buffers = [_Buffer(e) for e in weights if e.key.startswith(self.root)]
        readable = self._readable_keys()
        self._variables = [self._variable(b, readable.get(b.entry.key)) for b in self._buffers]

    def _readable_keys(self) -> dict[str, str]:
        """``<layer name>/<role or index>`` (``head/kernel``, ``head/0``) where the file records every weight
        layer's name once; otherwise none (the file's own keys are shown). A Keras model's readable key of a
        functional layer is ``<layer name>/<role>`` too."""
        layers = self.like.layers()
        out: dict[str, str] = {}
        for buffer in self._buffers:
            entry = buffer.entry
            name = entry.layer_name or layers.get(entry.layer, (None, None))[0]
            leaf = entry.role or (str(entry.index) if entry.index is not None else None)
            if not name or leaf is None:
                return {}
            out[entry.key] = f"{name}/{leaf}"
        names_per_layer: dict[str, set[str]] = {}
        for buffer in self._buffers:
            names_per_layer.setdefault(out[buffer.entry.key].rpartition("/")[0], set()).add(buffer.entry.layer)
        if len(set(out.values())) != len(out) or any(len(v) > 1 for v in names_per_layer.values()):
            return {}  # a name two layers carry (or a layer's two names) would be a confusing key
        return out

    def _variable(self, buffer: _Buffer, readable: str | None) -> TargetVariable:
        entry = buffer.entry
        key = entry.key[len(self.root):]
        return TargetVariable(
            key=readable or key, shape=tuple(entry.shape), dtype=entry.dtype, layer=entry.layer[len(self.root):],
            layer_class="", role=entry.role or "", index=entry.index or 0, trainable=True,
            keys={self.like.namespace: key}, variable=buffer)

    # --- matching --------------------------------------------------------------------------------

    def describe(self, namespaces: tuple[str, ...]) -> tuple[list[TargetVariable], dict[str, LayerTable]]:
        layers = {k[len(self.root):]: v for k, v in self.like.layers().items() if k.startswith(self.root)}
        return list(self._variables), {self.like.namespace: layers}

    def layer_graph(self) -> list[GraphLayer]:
        return []  # a weights file records no computation graph

    def layer_classes(self) -> frozenset[str]:
        return frozenset(kind for _, kind in self.like.layers().values() if kind)

    # --- applying --------------------------------------------------------------------------------

    def variables(self) -> list[Any]:
        return list(self._buffers)

    def read(self, variable: TargetVariable) -> np.ndarray:
        buffer = variable.variable
        if buffer.value is None:
            buffer.value = self.like.read(buffer.entry.key)
        return buffer.value

    def assign(self, variable: TargetVariable, value: Any) -> None:
        array = np.array(value, copy=True)
        if array.shape != variable.shape or array.dtype.name != variable.dtype:
            raise TargetError(f"Cannot assign a {array.dtype.name} array of shape {array.shape} to '{variable.key}' "
                              f"({variable.dtype}, shape {variable.shape}).", hint="Report this: the plan was checked.")
        variable.variable.value = array

    def shards(self, variable: TargetVariable) -> list[tuple[slice, ...]] | None:
        """A file's buffers live in host memory: never sharded."""
        return None

    def assign_shards(self, variable: TargetVariable, blocks: list[np.ndarray]) -> None:
        raise NotImplementedError("a FileTarget holds no sharded variables")

    def all_passed(self, passed: bool) -> bool:
        return passed

    def assign_filled(self, variable: TargetVariable, fill: Callable[[np.ndarray], None]) -> None:
        array = np.empty(tuple(variable.shape), dtype_of(variable.dtype))
        fill(array)
        variable.variable.value = array  # new and filled once: no copy needed

    def freeze(self, variable: TargetVariable) -> None:
        """Weights files keep no trainable flags: nothing to do."""

    # --- writing ---------------------------------------------------------------------------------

    def values(self) -> dict[str, np.ndarray]:
        """Every variable's current value by the ``--like`` file's key (the saved root included)."""
        return {b.entry.key: self.read(v) for b, v in zip(self._buffers, self._variables)}

    def save(self, path: str) -> list[str]:
        """Write the ``--like`` file again with the current values, in the format ``path``'s extension names.

        ``.weights.h5`` (from a ``.weights.h5`` or ``.keras`` file), ``.keras`` (from a
        ``.keras`` file: its config and metadata copied), ``.safetensors`` (from any
        file: its keys, tensor names as written), a TF checkpoint prefix (from a TF
        checkpoint: its object graph and other tensors copied; needs TensorFlow).
        """
        from regraft.writing import replace_bundle, replace_file

        fmt = output_format(path)
        check_writable(self.like, fmt, path)
        if fmt == ".weights.h5":
            return replace_file(path, lambda tmp: _write_bytes(tmp, self._h5_bytes()), what="the weights",
                                example="model.weights.h5")
        if fmt == ".keras":
            return replace_file(path, self._write_archive, what="the model", example="model.keras")
        if fmt == ".safetensors":
            return replace_file(path, self._write_safetensors, what="the weights", example="model.safetensors")
        return replace_bundle(path, lambda tmp, shards: self._write_checkpoint(tmp, shards, path),
                              what="the checkpoint", example="ckpt")

    def _h5_bytes(self) -> bytes:
        """The ``--like`` HDF5 image with every weight dataset overwritten, built in memory."""
        import h5py

        if self.like.format == "keras-archive":
            with zipfile.ZipFile(self.like.path) as archive:
                image = archive.read(_WEIGHTS_MEMBER)
        else:
            with open(self.like.path, "rb") as f:
                image = f.read()
        buffer = io.BytesIO(image)
        with h5py.File(buffer, "r+") as f:
            for key, value in self.values().items():
                dataset = f[key]
                if dataset.shape != value.shape:
                    raise TargetError(f"Cannot write '{key}': {self.like.path} stores it as {dataset.shape}, "
                                      f"the value is {value.shape}.", hint="Report this: the plan was checked.")
                if dataset.dtype.kind == "V":  # bfloat16, stored as opaque 2-byte values (Keras' layout)
                    dataset[...] = np.ascontiguousarray(value).view(dataset.dtype)
                else:
                    dataset[...] = value
        return buffer.getvalue()

    def _write_archive(self, tmp: str) -> None:
        weights = self._h5_bytes()
        with zipfile.ZipFile(self.like.path) as old, zipfile.ZipFile(tmp, "w") as new:
            for info in old.infolist():
                if info.filename == _WEIGHTS_MEMBER:
                    new.writestr(info, weights, compress_type=zipfile.ZIP_STORED)
                else:
                    new.writestr(info, old.read(info))

    def _write_safetensors(self, tmp: str) -> None:
        from safetensors.numpy import save_file

        entries = {e.key: e for e in self.like.entries()}
        tensors = {}
        for key, value in self.values().items():
            aliases = entries[key].aliases
            name = aliases[0] if self.like.format.startswith(("safetensors", "npz")) and aliases else key
            tensors[name] = np.ascontiguousarray(value)
        save_file(tensors, tmp)

    def _write_checkpoint(self, tmp: str, shards: int, out: str) -> None:
        """The ``--like`` bundle's tensors under their names, weights replaced, written by TensorFlow."""
        try:
            import tensorflow as tf
        except ImportError:
            raise TargetError(f"Cannot write the TF checkpoint {out}: writing one needs TensorFlow, which is not "
                              "installed.", hint="Install tensorflow, or write .safetensors instead.") from None

        from regraft.sources._bundle import Bundle
        from regraft.writing import write_error

        bundle = Bundle(_prefix_of(self.like))
        replaced = {}
        for key, value in self.values().items():
            location = self.like.native_location(key)
            if location is None:
                raise TargetError(f"Cannot write tensor '{key}' of {self.like.path} to a checkpoint: it is "
                                  "partitioned or its name is not UTF-8.",
                                  hint="Write .safetensors instead (--out out.safetensors).")
            replaced[location[1]] = value
        names, tensors = [], []
        for name, entry in sorted(bundle.entries.items()):
            if entry.sliced:
                raise TargetError(f"Cannot write tensor '{name}' of {self.like.path}: it is partitioned.",
                                  hint="Write .safetensors instead (--out out.safetensors).")
            names.append(name)
            if name in replaced:
                tensors.append(tf.constant(replaced[name]))
            elif str(entry.dtype) == "string":
                tensors.append(tf.reshape(tf.constant(bundle.read_string(name), dtype=tf.string), entry.shape))
            else:
                tensors.append(tf.constant(bundle.read(name)))
        parts = [(names[i::shards], tensors[i::shards]) for i in range(shards)]
        try:
            if shards == 1:
                tf.raw_ops.SaveV2(prefix=tmp, tensor_names=names, shape_and_slices=[""] * len(names),
                                  tensors=tensors)
                return
            folder = os.path.join(os.path.dirname(tmp), "parts")
            prefixes = []
            for i, (part_names, part_tensors) in enumerate(parts):
                prefixes.append(os.path.join(folder, str(i), "part"))
                os.makedirs(os.path.dirname(prefixes[-1]))
                tf.raw_ops.SaveV2(prefix=prefixes[-1], tensor_names=part_names,
                                  shape_and_slices=[""] * len(part_names), tensors=part_tensors)
            tf.raw_ops.MergeV2Checkpoints(checkpoint_prefixes=prefixes, destination_prefix=tmp,
                                          delete_old_dirs=True)
            import shutil

            shutil.rmtree(folder, ignore_errors=True)
        except tf.errors.OpError as exc:
            raise write_error(out, "the checkpoint", exc) from None


def _write_bytes(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def _prefix_of(like: Source) -> str:
    bundle = getattr(like, "bundle", None)
    if bundle is None:
        raise TargetError(f"{like.path} is not a TF checkpoint.", hint="Pass a TF checkpoint as --like.")
    return str(bundle.prefix)


def output_format(path: str) -> str:
    """The format an output path names: ``.weights.h5``, ``.keras``, ``.safetensors``, or ``checkpoint``."""
    for ext in (".weights.h5", ".keras", ".safetensors"):
        if path.endswith(ext):
            return ext
    return "checkpoint"


def check_writable(like: Source, fmt: str, path: str) -> None:
    """Refuse, before any work, an output format the ``--like`` file cannot be written as.

    Raises:
        RegraftError: ``.keras`` without a ``.keras`` to take the config from, ``.weights.h5``
            without Keras 3 HDF5 weights to take the layout from, a checkpoint without a TF checkpoint.
    """
    allowed = WRITES[fmt]
    if allowed is None or like.format in allowed:
        return
    shown = "a TF checkpoint" if fmt == "checkpoint" else fmt
    need = {".keras": "a .keras archive of the new model (the config is copied from it)",
            ".weights.h5": "a Keras 3 .weights.h5 or .keras file of the new model (its layout is copied)",
            "checkpoint": "a TF checkpoint of the new model (its object graph is copied)"}[fmt]
    written = [ext for ext, formats in WRITES.items() if formats is None or like.format in formats]
    raise RegraftError(
        f"Cannot write {path} as {shown} from --like {like.path} ({like.format}): that needs {need}.",
        hint="From this --like file regraft writes: "
        + ", ".join("a TF checkpoint (no extension)" if w == "checkpoint" else w for w in written) + ".")


def model_from_archive(path: str) -> Any:
    """The model a ``.keras`` archive describes, rebuilt by Keras from its config, with its weights.

    Keras' ``safe_mode`` stays on (no code from the file is run); layers of classes
    Keras does not know cannot be rebuilt.

    Raises:
        RegraftError: Keras could not rebuild the model (an unregistered custom layer, …).
    """
    import keras

    try:
        return keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as exc:
        raise RegraftError(
            f"Cannot rebuild the model of {path} from its config: Keras raised {type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}",
            hint="Its layers need classes Keras knows: use `regraft load` with the new model's code, or pass "
            "a --like file of the old checkpoint's kind.") from None


def compiled_from_config(config: dict[str, Any] | None, path: str) -> tuple[Any, Any]:
    """The model a ``.keras`` archive's ``config.json`` describes (built, no weights read) and the
    optimizer its compile config names, built for the model's trainable variables.

    This is what Keras' own loader does before it assigns ``optimizer/vars/N`` by
    position (``Trainer.compile_from_config``: ``compile(optimizer=...)``, which wraps
    it in a ``LossScaleOptimizer`` under ``mixed_float16``, then
    ``optimizer.build(model.trainable_variables)``). Only the optimizer of the compile
    config is used: its loss and metrics are not needed and may be custom code.
    Keras' ``safe_mode`` stays on.

    Raises:
        RegraftError: no compile config or optimizer recorded, or Keras could not rebuild
            the model or the optimizer.
    """
    import json

    import keras

    compile_config = (config or {}).get("compile_config") or {}
    if not compile_config.get("optimizer"):
        raise RegraftError(f"{path}: its config.json records no optimizer (the model was saved uncompiled).",
                           hint="Compile the model before model.save(), or save a TF checkpoint.")
    model_config = {k: v for k, v in (config or {}).items() if k != "compile_config"}
    try:
        model = keras.models.model_from_json(json.dumps(model_config))
        model.compile(optimizer=keras.saving.deserialize_keras_object(compile_config["optimizer"]))
        if not model.built:
            raise ValueError("the model its config describes is not built (no build_config)")
        model.optimizer.build(model.trainable_variables)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise RegraftError(
            f"Cannot rebuild the model and optimizer of {path} from its config: Keras raised "
            f"{type(exc).__name__}: {first}",
            hint="Their classes must be ones Keras knows; otherwise save a TF checkpoint "
            "(tf.train.Checkpoint(model=, optimizer=)), whose slots name their variables.") from None
    return model, model.optimizer
