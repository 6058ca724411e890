"""Check that a regrafted model computes what the old model did.

After a load into a changed architecture (a layer inserted as an identity, a layer
renamed, variables re-split), the new model should compute the same function as the
old one. :func:`verify` runs both models in inference mode on the same inputs and
reports the largest difference of their outputs.

Probe inputs (when no inputs are given) are drawn from the *old* model's input
spec with a seeded generator, so a run is reproducible:

* float inputs: standard normal, ``N(0, 1)``, in the input's dtype;
* integer inputs: uniform integers in ``[0, 10)`` (``[0, input_dim)`` when the input
  feeds an ``Embedding`` with fewer than 10 rows), in the input's dtype; a float
  input that feeds an ``Embedding`` directly gets such integers too;
* boolean inputs: ``True``/``False`` with equal odds;
* the batch dimension is ``samples``; any other unknown dimension is
  :data:`UNKNOWN_DIM`.

Differences:

* ``max_abs``: the largest ``|old - new|`` over every output and sample, computed
  in float64 (NaN where both are NaN counts as equal; NaN on one side only counts as
  an infinite difference).
* ``max_rel``: for each output, its ``max_abs`` divided by the largest ``|old|`` of
  that output (at least :data:`TINY`); the report's ``max_rel`` is the largest over
  outputs. Dividing by the output's scale, not element by element, keeps
  near-zero activations from blowing the number up.

Example:
    >>> report = regraft.verification.verify(old_model, new_model)   # doctest: +SKIP
    >>> print(report)                                           # doctest: +SKIP
    max |Δ| 3.1e-07 (rel 2.0e-07) over 8 probe inputs: within 1e-05
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

import regraft.targets._compat as _compat
from regraft.errors import RegraftError
from regraft.naming import dtype_of

__all__ = [
    "INT_HIGH",
    "TINY",
    "UNKNOWN_DIM",
    "VerifyError",
    "VerifyReport",
    "probe_inputs",
    "verify",
]

INT_HIGH = 10
"""Integer probe inputs are drawn uniformly from ``[0, INT_HIGH)``."""

UNKNOWN_DIM = 16
"""The size given to unknown non-batch dimensions of probe inputs (e.g. a sequence length)."""

TINY = 1e-30
"""The smallest denominator of ``max_rel`` (so that an all-zero old output gives a finite ratio)."""

_INPUTS_HINT = "Pass inputs= (an array, or a list/dict of arrays, batch first); on the command line, --inputs FILE.npy."


class VerifyError(RegraftError):
    """The two models cannot be compared: unknown input shape, different outputs, a call that fails."""


# --------------------------------------------------------------------------- the report


@dataclass(frozen=True)
class VerifyReport:
    """How far the new model's outputs are from the old model's on the same inputs.

    Attributes:
        max_abs: the largest ``|old - new|`` over all outputs and samples.
        max_rel: the largest over outputs of that output's ``max_abs`` divided by
            the largest ``|old|`` of the same output (at least :data:`TINY`).
        tolerance: the largest ``max_abs`` that passes.
        passed: ``max_abs <= tolerance``.
        samples: the batch size of the inputs both models ran on.
        outputs: one dict per output, in order: ``index``, ``name``, ``shape``,
            ``dtype`` (of the old output), ``max_abs``, ``max_rel``, ``scale``
            (the largest finite ``|old|``), ``nonfinite`` (how many old values are
            NaN or infinite; they count as equal where the new value is the same).
        probed: ``True`` when the inputs were random probe inputs, ``False`` when
            they were given.
    """

    max_abs: float
    max_rel: float
    tolerance: float
    passed: bool
    samples: int
    outputs: list[dict] = field(default_factory=list)
    probed: bool = True

    def to_dict(self) -> dict:
        """A JSON-ready dict of every field (``outputs`` copied)."""
        return {
            "passed": self.passed,
            "max_abs": self.max_abs,
            "max_rel": self.max_rel,
            "tolerance": self.tolerance,
            "samples": self.samples,
            "inputs": "probe" if self.probed else "given",
            "outputs": [dict(o) for o in self.outputs],
        }

    def __str__(self) -> str:
        verdict = "within" if self.passed else "exceeds"
        kind = "probe" if self.probed else "given"
        plural = "" if self.samples == 1 else "s"
        lines = [
            f"max |Δ| {self.max_abs:.1e} (rel {self.max_rel:.1e}) over {self.samples} {kind} input{plural}: "
            f"{verdict} {self.tolerance:g}"
        ]
        if len(self.outputs) > 1:
            width = max(len(str(o["name"])) for o in self.outputs)
            for o in self.outputs:
                lines.append(
                    f"  {str(o['name']).ljust(width)}  {tuple(o['shape'])}: "
                    f"max |Δ| {o['max_abs']:.1e} (rel {o['max_rel']:.1e})"
                )
        nonfinite = sum(o.get("nonfinite", 0) for o in self.outputs)
        if nonfinite:
            lines.append(f"warning: {nonfinite} old output value{'s are' if nonfinite > 1 else ' is'} NaN or "
                         "infinite (equal values on both sides count as no difference)")
        return "\n".join(lines)


# --------------------------------------------------------------------------- probe inputs


@dataclass(frozen=True)
class _Spec:
    shape: tuple[int | None, ...]
    dtype: str
    int_high: int = INT_HIGH
    ids: bool = False  # integer ids even though the dtype is float (a float input feeding an Embedding)


def probe_inputs(model: Any, samples: int = 8, seed: int = 0) -> np.ndarray | list[np.ndarray] | dict[str, np.ndarray]:
    """Random inputs of the right shape and dtype for ``model``, reproducible from ``seed``.

    The shapes and dtypes come from ``model.inputs`` (functional and Sequential
    models; the result mirrors the model's input structure: one array, a list, or a
    dict keyed by input name), else from the shape the model was built with
    (subclassed models built by calling them), else from the first layer's
    ``input_spec``. For subclassed models the dtype is ``int32`` when the first
    layer is an ``Embedding``, ``float32`` otherwise. See the module docstring for
    the distributions.

    Args:
        model: a built Keras 3 model.
        samples: the batch size.
        seed: the seed of the generator; arrays are drawn in input order.

    Returns:
        One array, or a list or dict of arrays, each with ``samples`` rows.

    Raises:
        VerifyError: the model is not built, its input shape cannot be found, or
            an input has a dtype probes cannot be made for (e.g. strings).
    """
    if isinstance(samples, bool) or not isinstance(samples, (int, np.integer)) or samples < 1:
        raise VerifyError(f"samples must be a positive integer, got {samples!r}.")
    _require_built(model)
    specs = _input_specs(model)
    rng = np.random.default_rng(seed)
    return _map_structure(lambda spec: _draw(spec, int(samples), rng), specs, leaf=lambda s: isinstance(s, _Spec))


def _draw(spec: _Spec, samples: int, rng: np.random.Generator) -> np.ndarray:
    shape = (samples,) + tuple(UNKNOWN_DIM if d is None else int(d) for d in spec.shape[1:])
    dtype = _np_dtype(spec.dtype)
    if dtype.kind == "b":
        return rng.integers(0, 2, size=shape).astype(bool)
    if dtype.kind in "iu" or spec.ids:
        return rng.integers(0, spec.int_high, size=shape).astype(dtype)
    if dtype.kind == "f" or spec.dtype == "bfloat16":
        return rng.standard_normal(shape).astype(dtype)
    raise VerifyError(f"Cannot make probe inputs of dtype {spec.dtype}.", hint=_INPUTS_HINT)


def _np_dtype(name: str) -> np.dtype:
    try:
        return dtype_of(name)
    except TypeError:
        raise VerifyError(f"Cannot make probe inputs of dtype {name}.", hint=_INPUTS_HINT) from None


def _require_built(model: Any) -> None:
    if not getattr(model, "built", False):
        raise VerifyError(
            f"Model '{getattr(model, 'name', type(model).__name__)}' is not built; calling it would create new "
            "random variables.",
            hint="Build it first (call it once on an example batch, or model.build(shape)) and load its weights.",
        )


def _input_specs(model: Any) -> Any:
    """The structure of input specs: from ``model.inputs``, the build shape, or the first layer's input spec."""
    struct = _compat.functional_inputs(model)  # None unless functional
    if struct is None:
        try:
            inputs = model.inputs  # Sequential (a list); raises on subclassed models
        except (AttributeError, ValueError):
            inputs = None
        if inputs:
            struct = inputs[0] if len(inputs) == 1 else list(inputs)
    if struct is not None:
        return _map_structure(_tensor_spec, struct, leaf=lambda t: hasattr(t, "shape") and hasattr(t, "dtype"))

    first = _first_layer(model)
    dtype, high = "float32", INT_HIGH
    if first is not None and _is_embedding(first):
        dtype, high = "int32", min(INT_HIGH, int(first.input_dim))

    shapes = _compat.build_shapes(model)
    if isinstance(shapes, Mapping) and len(shapes) == 1:
        shape_struct = next(iter(shapes.values()))
        if shape_struct is not None and _has_shapes(shape_struct):
            return _map_structure(lambda s: _shape_spec(s, dtype, high, model), shape_struct, leaf=_is_shape)
    elif isinstance(shapes, Mapping) and len(shapes) > 1:
        raise VerifyError(
            f"Model '{model.name}' was built with several call arguments ({', '.join(shapes)}); verify calls a "
            "model with one argument.",
            hint=_INPUTS_HINT,
        )

    spec_shape = _shape_from_input_spec(getattr(first, "input_spec", None)) if first is not None else None
    if spec_shape is not None:
        return _Spec(spec_shape, dtype, high)
    raise VerifyError(
        f"Cannot tell the input shape of model '{model.name}' ({type(model).__name__}): it has no Input layers, "
        "records no build shape, and its first layer has no input spec.",
        hint=_INPUTS_HINT,
    )


def _tensor_spec(tensor: Any) -> _Spec:
    shape = tuple(None if d is None else int(d) for d in tensor.shape)
    if not shape:
        raise VerifyError("The model has a scalar input (no batch dimension).", hint=_INPUTS_HINT)
    dtype = str(getattr(tensor.dtype, "name", tensor.dtype))
    embeddings = [layer for layer in _consumers(tensor) if _is_embedding(layer)]
    if not embeddings:
        return _Spec(shape, dtype)
    high = min([INT_HIGH] + [int(e.input_dim) for e in embeddings])
    return _Spec(shape, dtype, high, ids=True)


def _consumers(tensor: Any) -> list[Any]:
    """The layers that take the functional input ``tensor`` directly."""
    return _compat.input_consumers(tensor)


def _is_embedding(layer: Any) -> bool:
    import keras

    return isinstance(layer, keras.layers.Embedding)


def _first_layer(model: Any) -> Any:
    """The first leaf layer the model tracks (descending into nested models and blocks), or ``None``."""
    import keras

    layer = model
    for _ in range(32):
        children = [child for child in getattr(layer, "layers", None) or []
                    if not isinstance(child, keras.layers.InputLayer)]
        if not children:
            break
        layer = children[0]
    return None if layer is model else layer


def _is_shape(value: Any) -> bool:
    return isinstance(value, (tuple, list)) and all(
        d is None or isinstance(d, (int, np.integer)) and not isinstance(d, bool) for d in value
    )


def _has_shapes(struct: Any) -> bool:
    if _is_shape(struct):
        return True
    if isinstance(struct, Mapping):
        return bool(struct) and all(_has_shapes(v) for v in struct.values())
    if isinstance(struct, (list, tuple)):
        return bool(struct) and all(_has_shapes(v) for v in struct)
    return False


def _shape_spec(shape: Sequence[int | None], dtype: str, high: int, model: Any) -> _Spec:
    if len(shape) == 0:
        raise VerifyError(f"Model '{model.name}' was built on a scalar input (no batch dimension).",
                          hint=_INPUTS_HINT)
    return _Spec(tuple(shape), dtype, high)


def _shape_from_input_spec(spec: Any) -> tuple[int | None, ...] | None:
    """A full input shape from a layer's ``InputSpec``: its ``shape``, or ``ndim``/``min_ndim`` plus ``axes``."""
    if isinstance(spec, (list, tuple)):
        spec = spec[0] if len(spec) == 1 else None
    if spec is None:
        return None
    if getattr(spec, "shape", None) is not None:
        shape = tuple(spec.shape)
        return shape if shape else None
    ndim = getattr(spec, "ndim", None) or getattr(spec, "min_ndim", None)
    axes = dict(getattr(spec, "axes", None) or {})
    if not ndim:
        return None
    known = {(a % ndim): size for a, size in axes.items()}
    if any(i not in known for i in range(1, ndim)):
        return None
    return (None,) + tuple(int(known[i]) for i in range(1, ndim))


def _map_structure(fn: Callable[[Any], Any], struct: Any, *, leaf: Callable[[Any], bool]) -> Any:
    """Apply ``fn`` to every leaf of nested dicts/lists/tuples; lists and tuples come back as lists."""
    if leaf(struct):
        return fn(struct)
    if isinstance(struct, Mapping):
        return {k: _map_structure(fn, v, leaf=leaf) for k, v in struct.items()}
    if isinstance(struct, (list, tuple)):
        return [_map_structure(fn, v, leaf=leaf) for v in struct]
    return fn(struct)


# --------------------------------------------------------------------------- verify


def verify(
    old_model: Any,
    new_model: Any,
    inputs: Any = None,
    *,
    tolerance: float = 1e-5,
    samples: int = 8,
    seed: int = 0,
) -> VerifyReport:
    """Run both models on the same inputs in inference mode and compare their outputs.

    Neither model is changed: both must be built, and they are called with
    ``training=False`` (no batch-norm statistics update, no dropout).

    Args:
        old_model: the model with the checkpoint's original architecture, loaded.
        new_model: the regrafted model.
        inputs: what to feed both models, as given (an array, or a list/dict of
            arrays, batch first); ``None`` draws :func:`probe_inputs` from the old
            model's input spec.
        tolerance: the largest ``max_abs`` that passes.
        samples: the batch size of probe inputs (ignored when ``inputs`` is given;
            the report then counts the inputs' batch size).
        seed: the seed of the probe inputs.

    Returns:
        A :class:`VerifyReport`; ``passed`` says whether ``max_abs <= tolerance``.

    Raises:
        VerifyError: a model is not built, probe inputs cannot be made, a model
            fails on the inputs, or the two models' outputs differ in structure or
            shape.

    Example:
        >>> report = verify(old_model, new_model, tolerance=1e-6)   # doctest: +SKIP
        >>> assert report.passed, report
    """
    try:
        tolerance = float(tolerance)
    except (TypeError, ValueError):
        raise VerifyError(f"tolerance must be a number, got {tolerance!r}.") from None
    if math.isnan(tolerance) or tolerance < 0:
        raise VerifyError(f"tolerance must be a number >= 0, got {tolerance!r}.")
    _require_built(old_model)
    _require_built(new_model)

    probed = inputs is None
    x = probe_inputs(old_model, samples, seed) if probed else inputs
    count = _batch_size(x)
    old_out = _run(old_model, "old", x)
    new_out = _run(new_model, "new", x)
    old_leaves = _flatten(old_out)
    new_leaves = _flatten(new_out)
    _check_same_outputs(old_out, new_out, old_leaves, new_leaves)

    names = _output_names(old_model, old_out, old_leaves)
    outputs: list[dict] = []
    for index, ((_, old), (_, new), name) in enumerate(zip(old_leaves, new_leaves, names)):
        max_abs, scale, nonfinite = _difference(old, new)
        max_rel = max_abs / max(scale, TINY)
        outputs.append({
            "index": index,
            "name": name,
            "shape": list(old.shape),
            "dtype": str(old.dtype),
            "max_abs": max_abs,
            "max_rel": max_rel,
            "scale": scale,
            "nonfinite": nonfinite,
        })
    max_abs = max((o["max_abs"] for o in outputs), default=0.0)
    max_rel = max((o["max_rel"] for o in outputs), default=0.0)
    return VerifyReport(
        max_abs=max_abs,
        max_rel=max_rel,
        tolerance=tolerance,
        passed=bool(max_abs <= tolerance),
        samples=count,
        outputs=outputs,
        probed=probed,
    )


def _batch_size(inputs: Any) -> int:
    leaves = [leaf for _, leaf in _flatten(inputs, convert=False)]
    if not leaves:
        raise VerifyError("inputs holds no arrays.", hint=_INPUTS_HINT)
    sizes = []
    for leaf in leaves:
        shape = getattr(leaf, "shape", None)
        shape = tuple(np.shape(leaf)) if shape is None else tuple(shape)
        if not shape:
            raise VerifyError("inputs has a scalar where an array with a batch dimension was expected.",
                              hint=_INPUTS_HINT)
        sizes.append(shape[0])
    if len(set(sizes)) > 1:
        raise VerifyError(f"The input arrays have different batch sizes: {', '.join(map(str, sizes))}.",
                          hint="Give every input array the same number of rows.")
    if sizes[0] is None:
        raise VerifyError("The inputs have an unknown batch size.", hint=_INPUTS_HINT)
    return int(sizes[0])


def _run(model: Any, which: str, x: Any) -> Any:
    try:
        return model(x, training=False)
    except Exception as exc:  # the user's model or inputs: say which model, keep it short
        raise VerifyError(
            f"Calling the {which} model '{model.name}' on inputs {_describe(x)} raised "
            f"{type(exc).__name__}: {_first_line(exc)}",
            hint=_INPUTS_HINT if which == "old" else "Check the new model accepts the old model's inputs; "
            "set REGRAFT_DEBUG=1 for the traceback.",
        ) from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def _flatten(struct: Any, path: tuple = (), *, convert: bool = True) -> list[tuple[tuple, Any]]:
    """``(path, leaf)`` pairs of nested dicts (sorted by key)/lists/tuples; leaves as numpy when ``convert``."""
    if isinstance(struct, Mapping):
        out = []
        for key in sorted(struct, key=str):
            out.extend(_flatten(struct[key], path + (key,), convert=convert))
        return out
    if isinstance(struct, (list, tuple)):
        out = []
        for i, value in enumerate(struct):
            out.extend(_flatten(value, path + (i,), convert=convert))
        return out
    if not convert:
        return [(path, struct)]
    import keras

    return [(path, np.asarray(keras.ops.convert_to_numpy(struct)))]


def _describe(struct: Any) -> str:
    """Shapes in the structure of ``struct``: ``(8, 10)``, ``[(8, 10), (8, 3)]``, ``{'a': (8, 10)}``."""
    if isinstance(struct, Mapping):
        return "{" + ", ".join(f"{k!r}: {_describe(struct[k])}" for k in sorted(struct, key=str)) + "}"
    if isinstance(struct, (list, tuple)):
        return "[" + ", ".join(_describe(v) for v in struct) + "]"
    shape = getattr(struct, "shape", None)
    shape = np.shape(struct) if shape is None else shape
    return str(tuple(None if d is None else int(d) for d in shape))


def _path_name(path: tuple) -> str:
    return "".join(f"[{p!r}]" for p in path) if path else "output"


def _check_same_outputs(old_out: Any, new_out: Any, old_leaves: list, new_leaves: list) -> None:
    old_text, new_text = _describe(old_out), _describe(new_out)
    hint = ("verify checks that a regrafted model reproduces the old one; when the change alters what the "
            "model computes (a new head, more classes), compare sub-models that end at a layer both share.")
    if [p for p, _ in old_leaves] != [p for p, _ in new_leaves] or _kind(old_out) != _kind(new_out):
        raise VerifyError(
            f"old model outputs {old_text} but new model outputs {new_text}: the two models do not return the "
            "same structure of outputs; verify compares models with the same outputs.",
            hint=hint,
        )
    differing = [(p, o.shape, n.shape) for (p, o), (_, n) in zip(old_leaves, new_leaves) if o.shape != n.shape]
    if differing:
        detail = ""
        if len(old_leaves) > 1:
            detail = " (" + "; ".join(f"output {_path_name(p)}: {tuple(o)} vs {tuple(n)}" for p, o, n in differing) + ")"
        raise VerifyError(
            f"old model outputs {old_text} but new model outputs {new_text}: the two models do not compute "
            f"outputs of the same shape{detail}; verify compares models with the same outputs.",
            hint=hint,
        )


def _kind(struct: Any) -> str:
    if isinstance(struct, Mapping):
        return "dict"
    if isinstance(struct, (list, tuple)):
        return "list"
    return "tensor"


def _output_names(model: Any, out: Any, leaves: list[tuple[tuple, np.ndarray]]) -> list[str]:
    """Dict keys for dict outputs; the model's ``output_names`` for a tensor or flat list; else paths."""
    if not isinstance(out, Mapping):
        try:
            names = list(getattr(model, "output_names", None) or [])
        except Exception:  # some models compute it lazily and may fail
            names = []
        flat = all(len(p) <= 1 for p, _ in leaves)
        if flat and len(names) == len(leaves) and all(isinstance(n, str) for n in names):
            return names
    return ["/".join(str(p) for p in path) if path else "output" for path, _ in leaves]


def _difference(old: np.ndarray, new: np.ndarray) -> tuple[float, float, int]:
    """``(max |old - new|, max finite |old|, non-finite old count)`` in float64.

    Equal NaNs and equal infinities count as equal; a NaN on one side only is an
    infinite difference.
    """
    if old.size == 0:
        return 0.0, 0.0, 0
    a = old.astype(np.float64)
    b = new.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.abs(a - b)
    same = (a == b) | (np.isnan(a) & np.isnan(b))
    diff[same] = 0.0
    diff[np.isnan(diff)] = np.inf
    finite_mask = np.isfinite(a)
    finite = np.abs(a[finite_mask])
    scale = float(finite.max()) if finite.size else 0.0
    return float(diff.max()), scale, int(a.size - np.count_nonzero(finite_mask))
