"""Transforms: small pure numpy functions that turn a checkpoint tensor into a variable's value.

A plan names, for every written variable, one transform and its options
(``pad`` with ``value: 0.0``, ``widen_in`` with ``mapping: [...]``). Each
transform comes in two halves:

* ``out_shape(in_shape, target_shape, **options)`` checks, from shapes and
  options only, that the transform can produce the target shape; it raises
  :class:`TransformError` with the reason when it cannot. :func:`check` runs it at
  plan time, before any tensor byte is read, and names the variable in the error.
* ``apply(value, fresh, *, target_shape, key, **options)`` computes the new
  array. ``fresh`` is the target variable's current (freshly initialised) value
  for transforms with ``needs_fresh`` (``overlay``), ``None`` otherwise; ``key``
  is the variable's key, used only in error messages. :func:`run` = ``check`` +
  ``apply`` + a check of the returned shape; it is how an applier should call a
  transform.

Conventions:

* Options are keyword arguments holding only ints, floats, strings, booleans,
  ``None`` and lists/dicts of those, because they are written into plan files;
  :func:`check` refuses numpy values (use ``.tolist()``). ``target_shape`` and
  ``key`` are reserved names, never options.
* Transforms never modify their inputs. They return a new array, except
  ``identity`` (and ``cast`` to the dtype the value already has), which return
  the input itself.
* dtype: shape transforms keep the value's dtype (``resize`` of integers gives
  float64); ``overlay`` gives ``fresh``'s dtype (the copied block is cast with
  :func:`cast_array`'s overflow refusal); ``identity_init`` gives its ``dtype``
  option (float32). Only ``cast`` is meant to change the dtype, and an applier
  casts the result to the variable's dtype with :func:`cast_array` when it differs.

Built-in transforms:

==================  ======================================================================
``identity``        shapes equal; the value as is.
``overlay``         (needs ``fresh``) the block ``value[:min(a, b)]`` on every axis written
                    into a copy of ``fresh`` (or, with ``value=``, into that constant); grows
                    or shrinks any axis, ranks equal.
``pad``             grows only: constant ``value`` (0.0), at the ``"end"`` (or ``"start"``)
                    of each axis.
``slice``           shrinks only: a block from ``start=[...]`` (0 per axis), or
                    ``indices={axis: [...]}`` picking given (distinct) indices on an axis.
``resize``          linear interpolation along ``axes`` (default: every axis whose size
                    differs), *align-corners*: sample ``j`` of ``m`` sits at
                    ``j * (n - 1) / (m - 1)`` of the old axis, so the first and last
                    samples are kept exactly. For position tables and kernels; not
                    function-preserving.
``adapt_channels``  a first-layer kernel (``axis=2`` = input channels) from 3 channels to 1
                    (sum) or to N (cycle the 3 channels, times 3/N, like timm's
                    ``adapt_input_conv``).
``widen_out``       Net2Net producer side: ``out[..., j] = value[..., mapping[j]]`` on
                    ``axis`` (-1): kernel output axis, bias, BatchNormalization vectors.
``widen_in``        Net2Net consumer side: ``out[j] = value[mapping[j]] / count[mapping[j]]``
                    on ``axis`` (-2: Dense kernel axis 0, Conv kernel axis 2); optional
                    symmetry-breaking ``noise`` that keeps every sum over copies;
                    ``power=2`` divides by ``count**2`` (an optimizer's second moment).
``identity_init``   an inserted layer's kernel as :func:`identity_kernel`, its bias as zeros;
                    ignores the value (may be ``None``).
``fill``            the constant ``value`` everywhere; ignores the value (may be ``None``):
                    a zeroed residual branch, an inserted BatchNormalization's statistics.
``cast``            dtype only (``dtype`` option), shapes equal; refuses overflow.
``linear_to_dense`` PyTorch ``Linear.weight`` ``[out, in]`` → Keras ``Dense`` kernel ``[in, out]``.
``conv_oihw_to_hwio`` PyTorch conv weight ``[out, in/groups, *spatial]`` → Keras kernel
                    ``[*spatial, in/groups, out]``; also a transposed conv (``[in, out, ...]``
                    → ``[..., out, in]``, the same permutation).
``depthwise_oihw_to_hwcm`` PyTorch depthwise weight ``[C*M, 1, *spatial]`` (output channel
                    ``c*M + m``) → Keras ``DepthwiseConv`` kernel ``[*spatial, C, M]``.
==================  ======================================================================

Function preservation (Net2Net, Chen, Goodfellow & Shlens, ICLR 2016): widen a
layer from ``n`` to ``m`` units with ``mapping = widen_mapping(n, m, seed)``, apply
``widen_out`` with that mapping to everything indexed by the layer's units (kernel
output axis, bias, a following BatchNormalization's gamma/beta/moving mean and
variance) and ``widen_in`` with the *same* mapping to the input axis of every
consumer's kernel. Copies of a unit then compute equal activations (any
elementwise activation, inference-mode BatchNormalization) and the consumer
splits each old row among the copies, so the network computes the same function
up to float rounding. ``widen_in``'s ``noise=s`` (with ``seed``) adds
N(0, s * std(value)) to every copy of a unit that has two or more, centred over
those copies (for two copies: ``+eps`` and ``-eps``), so the sums over copies,
hence the function, are unchanged up to rounding while the copies are no longer
equal and can train apart; a unit with a single copy gets no noise.

``resize`` interpolates each listed axis on its own: a ViT position table
``(1 + h*w, d)`` with a class token and a 2-D grid must be split and reshaped
first (a custom transform), or the flat axis is interpolated as a line.

Example:
    >>> import numpy as np
    >>> run("pad", np.ones((2, 2), "float32"), None, (3, 2), "dense/kernel").tolist()
    [[1.0, 1.0], [1.0, 1.0], [0.0, 0.0]]
    >>> try:
    ...     check("pad", (64, 10), (32, 10), "dense2/kernel")
    ... except TransformError as exc:
    ...     print(exc.message)
    Transform 'pad' cannot turn tensor 'dense2/kernel' of shape (64, 10) into (32, 10): pad only grows; use 'slice' or 'overlay'.
"""

from __future__ import annotations

import functools
import inspect
import math
import operator
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from regraft.errors import LoadError, RegraftError
from regraft.naming import dtype_of

__all__ = [
    "Transform",
    "TransformError",
    "TRANSFORMS",
    "get",
    "register",
    "check",
    "run",
    "cast_array",
    "widen_mapping",
    "identity_kernel",
    "axis_permutation",
]

Shape = tuple[int, ...]

#: Keyword names the calling convention uses; never allowed as option names.
RESERVED = ("target_shape", "key")

_CHECK_HINT = "Choose another transform for that variable in the plan, or set its source to null to leave it fresh."
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")


class TransformError(RegraftError):
    """A transform that cannot produce the target shape, with bad options, or unknown."""


@dataclass(frozen=True)
class Transform:
    """One named transform.

    Attributes:
        name: the name used in plans and reports.
        out_shape: ``out_shape(in_shape, target_shape, **options) -> shape``; raises
            :class:`TransformError` (a reason, without the variable's key) when it
            cannot produce ``target_shape``. ``in_shape`` is ``None`` when there is
            no source tensor.
        apply: ``apply(value, fresh, *, target_shape, key, **options) -> array`` of
            ``target_shape``.
        needs_fresh: the applier must pass the variable's current value as ``fresh``.
        doc: one line saying what the transform does.
    """

    name: str
    out_shape: Callable[..., Shape]
    apply: Callable[..., np.ndarray]
    needs_fresh: bool = False
    doc: str = ""


# --------------------------------------------------------------------------- validation helpers


def _reason(text: str) -> TransformError:
    return TransformError(text)


def _shape(shape: Any, what: str) -> Shape:
    """A shape as a tuple of non-negative ints, or TransformError."""
    try:
        out = tuple(operator.index(d) for d in shape)
    except TypeError:
        raise TransformError(f"{what} {shape!r} is not a shape (a sequence of ints).") from None
    if any(d < 0 for d in out):
        raise TransformError(f"{what} {out} has a negative size.")
    return out


def _int(x: Any, what: str) -> int:
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, np.integer)):
        raise _reason(f"{what} must be an int, not {x!r}")
    return int(x)


def _number(x: Any, what: str) -> float:
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, float, np.integer, np.floating)):
        raise _reason(f"{what} must be a number, not {x!r}")
    return float(x)


def _ints(x: Any, what: str) -> list[int]:
    if isinstance(x, (str, bytes)) or not isinstance(x, (list, tuple, np.ndarray)):
        raise _reason(f"{what} must be a list of ints, not {x!r}")
    return [_int(v, f"every entry of {what}") for v in x]


def _axis(axis: Any, rank: int, what: str = "axis") -> int:
    a = _int(axis, what)
    if not -rank <= a < rank:
        raise _reason(f"{what}={a} is out of range for rank {rank}")
    return a % rank


def _need(in_shape: Shape | None, name: str) -> Shape:
    if in_shape is None:
        raise _reason(f"{name} needs a source tensor; only 'identity_init' works without one")
    return in_shape


def _same_rank(name: str, in_shape: Shape, target_shape: Shape) -> None:
    if len(in_shape) != len(target_shape):
        raise _reason(
            f"ranks differ ({len(in_shape)} vs {len(target_shape)}); {name} keeps the rank, "
            "so reshape in the model or write a transform with register()"
        )


def _only_axis_changes(name: str, in_shape: Shape, target_shape: Shape, axis: int) -> None:
    for i, (a, b) in enumerate(zip(in_shape, target_shape)):
        if i != axis and a != b:
            raise _reason(f"{name} changes only axis {axis}, but axis {i} changes too ({a} -> {b})")


def _float_work(value: np.ndarray) -> np.ndarray:
    """``value`` as float64 (complex128 for complex) for arithmetic."""
    return value.astype(np.complex128 if value.dtype.kind == "c" else np.float64)


def _back(result: np.ndarray, like: np.dtype) -> np.ndarray:
    """Cast an arithmetic result back to the value's dtype (integers stay float64)."""
    if like.kind in "iub":
        return np.ascontiguousarray(result)
    return np.ascontiguousarray(result.astype(like))


def _is_plain(v: Any) -> bool:
    """True for what a plan file (YAML/JSON) stores as is; numpy scalars and arrays are not."""
    if v is None or type(v) in (bool, int, float, str):
        return True
    if type(v) in (list, tuple):
        return all(_is_plain(x) for x in v)
    if type(v) is dict:
        return all(type(k) in (int, str) and _is_plain(x) for k, x in v.items())
    return False


def _options_of(fn: Callable[..., Any]) -> tuple[set[str] | None, set[str]]:
    """The option names ``fn`` accepts after its two leading positional arguments (``None``: any) and requires."""
    accepted: set[str] = set()
    required: set[str] = set()
    anything = False
    skipped = 0
    for p in inspect.signature(fn).parameters.values():
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and skipped < 2:
            skipped += 1
            continue
        if p.kind is p.VAR_KEYWORD:
            anything = True
        elif p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in RESERVED:
            accepted.add(p.name)
            if p.default is p.empty:
                required.add(p.name)
    return (None if anything else accepted), required


def _check_options(t: Transform, options: Mapping[str, Any]) -> None:
    """Option names and values, before out_shape runs; raises a reason."""
    for name in options:
        if name in RESERVED:
            raise _reason(f"'{name}' is not an option: the applier passes it")
    known: set[str] = set()
    for fn in (t.out_shape, t.apply):
        accepted, required = _options_of(fn)
        missing = sorted(required - set(options))
        if missing:
            raise _reason(f"option '{missing[0]}' is required")
        if accepted is not None:
            known |= accepted
            unknown = sorted(set(options) - accepted)
            if unknown:
                takes = ", ".join(sorted(known)) or "no options"
                raise _reason(f"unknown option '{unknown[0]}' ({t.name} takes: {takes})")
    for name, v in options.items():
        if not _is_plain(v):
            raise _reason(
                f"option '{name}' holds a {type(v).__module__}.{type(v).__name__}, which a plan file cannot store; "
                "use ints, floats, strings and lists or dicts of them (numpy: .tolist())"
            )


# --------------------------------------------------------------------------- registry


TRANSFORMS: dict[str, Transform] = {}
_BUILTIN: set[str] = set()


def get(name: str) -> Transform:
    """The transform called ``name``.

    Raises:
        TransformError: no transform has that name; the message lists the known ones.

    Example:
        >>> get("pad").name
        'pad'
    """
    try:
        return TRANSFORMS[name]
    except (KeyError, TypeError):
        known = ", ".join(sorted(TRANSFORMS))
        raise TransformError(
            f"Unknown transform {name!r}; known transforms: {known}.",
            hint="Check the spelling in the plan, or register() your own function first.",
        ) from None


def register(
    name: str,
    apply: Callable[..., np.ndarray],
    out_shape: Callable[..., Shape] | None = None,
    needs_fresh: bool = False,
    *,
    replace: bool = False,
    doc: str = "",
) -> Transform:
    """Register a user transform under ``name`` (so a plan can name it).

    Args:
        name: the name plans use: letters, digits, ``_``, ``.``, ``-``.
        apply: ``apply(value, fresh, **options)``; it receives ``target_shape=`` and
            ``key=`` too if its signature names them.
        out_shape: ``out_shape(in_shape, target_shape, **options) -> shape``, raising
            :class:`TransformError` (or any exception) when it cannot produce the
            target; default: the shape is kept (``in_shape == target_shape``).
        needs_fresh: pass the variable's freshly initialised value as ``fresh``.
        replace: allow replacing an existing transform (built-ins included).
        doc: one line for listings.

    Returns:
        The registered :class:`Transform`.

    Raises:
        TransformError: bad name, ``apply`` not callable with ``(value, fresh)``, or
            the name is taken and ``replace`` is false.

    Example:
        >>> import numpy as np
        >>> t = register("negate_demo", lambda value, fresh: -value)
        >>> run("negate_demo", np.array([1.0, -2.0]), None, (2,), "w").tolist()
        [-1.0, 2.0]
        >>> del TRANSFORMS["negate_demo"]
    """
    if not isinstance(name, str) or not _NAME.match(name):
        raise TransformError(f"Transform name {name!r} is not usable in a plan; use letters, digits, '_', '.', '-'.")
    if name in TRANSFORMS and not replace:
        what = "a built-in transform" if name in _BUILTIN else "already registered"
        raise TransformError(
            f"Transform '{name}' is {what}; register(..., replace=True) replaces it.",
            hint="Pick another name unless you mean to change what every plan naming it does.",
        )
    if not callable(apply) or (out_shape is not None and not callable(out_shape)):
        raise TransformError(f"Transform '{name}': apply and out_shape must be callables.")
    sig = inspect.signature(apply)
    try:
        sig.bind_partial(None, None)
    except TypeError:
        raise TransformError(f"Transform '{name}': apply must accept (value, fresh, **options).") from None
    passes = [k for k in RESERVED if k in sig.parameters]

    @functools.wraps(apply)
    def call(value: Any, fresh: Any, /, *, target_shape: Shape, key: str = "tensor", **options: Any) -> np.ndarray:
        extra = {"target_shape": target_shape, "key": key}
        return apply(value, fresh, **{k: extra[k] for k in passes}, **options)

    t = Transform(name, out_shape or _same_shape, call, bool(needs_fresh), doc)
    TRANSFORMS[name] = t
    return t


def _same_shape(in_shape: Shape | None, target_shape: Shape, /, **options: Any) -> Shape:
    """Default out_shape of user transforms: the shape is kept."""
    if in_shape is None:
        raise _reason("it needs a source tensor")
    if tuple(in_shape) != tuple(target_shape):
        raise _reason("it keeps the shape (no out_shape was registered)")
    return tuple(target_shape)


def check(name: str, in_shape: Sequence[int] | None, target_shape: Sequence[int], key: str, /, **options: Any) -> None:
    """Check from shapes and options alone that transform ``name`` can fill variable ``key``.

    Args:
        name: the transform.
        in_shape: the source tensor's shape, ``None`` when there is none (``identity_init``).
        target_shape: the variable's shape.
        key: the variable's key, for the message.
        **options: the transform's options, as written in the plan.

    The four arguments are positional-only, so an option may be called ``value``
    (``pad``'s) or ``name``; ``target_shape`` and ``key`` are refused as options.

    Raises:
        TransformError: naming the transform, the variable, both shapes and the reason.

    Example:
        >>> check("slice", (64, 10), (32, 10), "dense2/kernel", start=[16, 0])
        >>> try:
        ...     check("slice", (32, 10), (64, 10), "dense2/kernel")
        ... except TransformError as exc:
        ...     print(exc)
        Transform 'slice' cannot turn tensor 'dense2/kernel' of shape (32, 10) into (64, 10): slice only shrinks; use 'pad' or 'overlay'.
        Hint: Choose another transform for that variable in the plan, or set its source to null to leave it fresh.
    """
    t = get(name)
    target = _shape(target_shape, "target shape")
    source = None if in_shape is None else _shape(in_shape, "source shape")
    try:
        _check_options(t, options)
        got = t.out_shape(source, target, **options)
        if got is None or tuple(got) != target:
            raise _reason(f"it produces {None if got is None else tuple(got)}")
    except Exception as exc:
        reason = exc.message if isinstance(exc, RegraftError) else f"{type(exc).__name__}: {exc}"
        reason = reason if reason.endswith(".") else reason + "."
        if source is None:
            message = f"Transform '{name}' cannot fill variable '{key}' of shape {target}: {reason}"
        else:
            message = f"Transform '{name}' cannot turn tensor '{key}' of shape {source} into {target}: {reason}"
        raise TransformError(message, hint=_CHECK_HINT) from exc


def run(
    name: str,
    value: np.ndarray | None,
    fresh: np.ndarray | None,
    target_shape: Sequence[int],
    key: str = "tensor",
    /,
    **options: Any,
) -> np.ndarray:
    """Check, then apply transform ``name``: the value for variable ``key``.

    Args:
        name: the transform.
        value: the source tensor (``None`` only for ``identity_init``).
        fresh: the variable's current value when the transform ``needs_fresh``, else ignored.
        target_shape: the variable's shape.
        key: the variable's key, for messages.
        **options: the transform's options.

    Returns:
        An array of ``target_shape`` (see the module notes on dtype).

    Raises:
        TransformError: the check failed, ``fresh`` is missing, or the transform
            failed or returned another shape.
        LoadError: a cast (``cast``, or ``overlay`` into another dtype) would overflow.

    Example:
        >>> import numpy as np
        >>> run("widen_out", np.array([10.0, 20.0]), None, (3,), "bias", mapping=[0, 1, 0]).tolist()
        [10.0, 20.0, 10.0]
    """
    t = get(name)
    target = _shape(target_shape, "target shape")
    if value is not None:
        value = np.asarray(value)
    check(name, None if value is None else value.shape, target, key, **options)
    if t.needs_fresh:
        if fresh is None:
            raise TransformError(f"Transform '{name}' needs the current value of variable '{key}' (fresh), got None.")
        fresh = np.asarray(fresh)
        if fresh.shape != target:
            raise TransformError(
                f"Transform '{name}' got a current value of shape {fresh.shape} for variable '{key}' of shape {target}."
            )
    else:
        fresh = None
    try:
        out = t.apply(value, fresh, target_shape=target, key=key, **options)
    except RegraftError:
        raise
    except Exception as exc:
        raise TransformError(f"Transform '{name}' failed on tensor '{key}': {type(exc).__name__}: {exc}") from exc
    out = np.asarray(out)
    if out.shape != target:
        raise TransformError(f"Transform '{name}' returned shape {out.shape} for variable '{key}' of shape {target}.")
    return out


def _builtin(name: str, out_shape: Callable[..., Shape], apply: Callable[..., np.ndarray], doc: str,
             needs_fresh: bool = False) -> None:
    TRANSFORMS[name] = Transform(name, out_shape, apply, needs_fresh, doc)
    _BUILTIN.add(name)


# --------------------------------------------------------------------------- cast


def cast_array(
    value: np.ndarray, dtype: Any, key: str = "tensor", target_key: str | None = None
) -> tuple[np.ndarray, float | None]:
    """Cast ``value`` to ``dtype``, refusing to turn finite values into inf or integers out of range.

    :func:`regraft.applying.convert` applies it to a ``TargetVariable``. Fractional
    floats cast to integers are truncated, NaN passes through float casts.

    Args:
        value: the array.
        dtype: a dtype or dtype name (``"bfloat16"`` included).
        key: the source tensor's key, for the message.
        target_key: the variable's key, for the message, if known.

    Returns:
        The cast array (``value`` itself when the dtype is already right) and the
        largest absolute rounding error (``None`` when nothing was cast).

    Raises:
        LoadError: a value does not fit ``dtype``.

    Example:
        >>> import numpy as np
        >>> cast_array(np.array([1.0, 0.1]), "float32")[0].dtype.name
        'float32'
        >>> cast_array(np.array(5, "int64"), "int32")[0].shape  # a scalar stays one (a step count)
        ()
        >>> try:
        ...     cast_array(np.array([1.0, 70000.0], "float32"), "float16", "w")
        ... except LoadError as exc:
        ...     print(exc.message)
        Tensor 'w' (float32) cannot be cast to float16: the value 70000 does not fit float16.
    """
    want = dtype_of(dtype) if isinstance(dtype, str) else np.dtype(dtype)
    value = np.asarray(value)
    if value.dtype == want:
        return value, None
    if np.issubdtype(want, np.integer):
        info = np.iinfo(want)
        wide = value.astype(np.float64) if value.dtype.kind == "V" else value
        if value.size and (np.min(wide) < info.min or np.max(wide) > info.max):
            bad = np.min(wide) if np.min(wide) < info.min else np.max(wide)
            raise _cast_refused(key, value.dtype, want, float(bad), target_key)
    with np.errstate(over="ignore", invalid="ignore"):
        out = value.astype(want)
    source64 = value.astype(np.float64) if value.dtype.kind != "c" else value
    out64 = out.astype(np.float64) if out.dtype.kind != "c" else out
    overflow = np.isinf(out64) & np.isfinite(source64)
    if overflow.any():
        raise _cast_refused(key, value.dtype, want, float(np.abs(source64[overflow]).max()), target_key)
    error = float(np.max(np.abs(out64 - source64))) if value.size else 0.0
    return np.require(out, requirements="C"), error  # not ascontiguousarray: it makes a scalar 1-d


def _cast_refused(key: str, dtype: np.dtype, want: np.dtype, bad: float, target_key: str | None) -> LoadError:
    where = f" for variable '{target_key}'" if target_key is not None else ""
    return LoadError(
        f"Tensor '{key}' ({np.dtype(dtype).name}) cannot be cast to {want.name}{where}: "
        f"the value {bad:g} does not fit {want.name}.",
        hint=f"Build that variable as {np.dtype(dtype).name}, or rescale the checkpoint before loading.",
    )


def _check_dtype_option(dtype: Any) -> None:
    if not isinstance(dtype, str):
        raise _reason(f"option dtype must be a dtype name such as 'float16', not {dtype!r}")
    try:
        dtype_of(dtype)
    except TypeError:
        raise _reason(f"unknown dtype {dtype!r}") from None


def _cast_shape(in_shape: Shape | None, target_shape: Shape, /, *, dtype: str) -> Shape:
    in_shape = _need(in_shape, "cast")
    _check_dtype_option(dtype)
    if in_shape != target_shape:
        raise _reason("cast changes only the dtype; use a shape transform for the shape")
    return target_shape


def _cast_apply(
    value: np.ndarray, fresh: None, /, *, target_shape: Shape, key: str = "tensor", dtype: str
) -> np.ndarray:
    return cast_array(value, dtype, key)[0]


# --------------------------------------------------------------------------- identity, overlay, pad, slice


def _identity_shape(in_shape: Shape | None, target_shape: Shape, /) -> Shape:
    in_shape = _need(in_shape, "identity")
    if in_shape != target_shape:
        raise _reason("identity keeps the shape; use 'overlay', 'pad', 'slice' or 'resize'")
    return target_shape


def _identity_apply(value: np.ndarray, fresh: None, /, *, target_shape: Shape, key: str = "tensor") -> np.ndarray:
    return value


def _overlay_shape(in_shape: Shape | None, target_shape: Shape, /, *, value: float | None = None) -> Shape:
    in_shape = _need(in_shape, "overlay")
    _same_rank("overlay", in_shape, target_shape)
    if value is not None and not math.isfinite(_number(value, "option value")):
        raise _reason(f"option value must be a finite number, not {value!r}")
    return target_shape


def _overlay_apply(tensor: np.ndarray, fresh: np.ndarray, /, *, target_shape: Shape, key: str = "tensor",
                   value: float | None = None) -> np.ndarray:
    out = np.array(fresh, copy=True) if value is None else np.full(fresh.shape, value, fresh.dtype)
    block = tuple(slice(0, min(a, b)) for a, b in zip(tensor.shape, target_shape))
    out[block] = cast_array(tensor[block], out.dtype, key)[0]
    return out


def _pad_shape(in_shape: Shape | None, target_shape: Shape, /, *, value: float = 0.0, where: str = "end") -> Shape:
    in_shape = _need(in_shape, "pad")
    _same_rank("pad", in_shape, target_shape)
    _number(value, "option value")
    if where not in ("end", "start"):
        raise _reason(f"option where must be 'end' or 'start', not {where!r}")
    if any(b < a for a, b in zip(in_shape, target_shape)):
        raise _reason("pad only grows; use 'slice' or 'overlay'")
    return target_shape


def _pad_apply(
    tensor: np.ndarray, fresh: None, /, *, target_shape: Shape, key: str = "tensor", value: float = 0.0,
    where: str = "end",
) -> np.ndarray:
    widths = [(0, b - a) if where == "end" else (b - a, 0) for a, b in zip(tensor.shape, target_shape)]
    return np.pad(tensor, widths, mode="constant", constant_values=np.asarray(value).astype(tensor.dtype))


def _slice_indices(indices: Any, in_shape: Shape, target_shape: Shape) -> dict[int, list[int]]:
    """Validated ``indices`` option: {normalised axis: list of indices}."""
    if indices is None:
        return {}
    if not isinstance(indices, Mapping):
        raise _reason(f"option indices must be a mapping {{axis: [index, ...]}}, not {indices!r}")
    out: dict[int, list[int]] = {}
    for k, picks in indices.items():
        if isinstance(k, str) and re.fullmatch(r"-?\d+", k.strip()):
            k = int(k)
        axis = _axis(k, len(in_shape), "indices axis")
        if axis in out:
            raise _reason(f"indices name axis {axis} twice")
        picks = _ints(picks, f"indices[{k}]")
        if len(picks) != target_shape[axis]:
            raise _reason(f"indices pick {len(picks)} entries of axis {axis}, but the target has {target_shape[axis]}")
        bad = [i for i in picks if not 0 <= i < in_shape[axis]]
        if bad:
            raise _reason(f"index {bad[0]} is out of range for axis {axis} of size {in_shape[axis]}")
        if len(set(picks)) != len(picks):
            raise _reason(f"indices along axis {axis} repeat; use 'widen_out' to copy units")
        out[axis] = picks
    return out


def _slice_shape(
    in_shape: Shape | None, target_shape: Shape, /, *, start: Sequence[int] | None = None,
    indices: Mapping[Any, Sequence[int]] | None = None,
) -> Shape:
    in_shape = _need(in_shape, "slice")
    _same_rank("slice", in_shape, target_shape)
    if any(b > a for a, b in zip(in_shape, target_shape)):
        raise _reason("slice only shrinks; use 'pad' or 'overlay'")
    picked = _slice_indices(indices, in_shape, target_shape)
    if start is not None:
        starts = _ints(start, "option start")
        if len(starts) != len(in_shape):
            raise _reason(f"option start has {len(starts)} entries for rank {len(in_shape)}")
        for axis, (s, a, b) in enumerate(zip(starts, in_shape, target_shape)):
            if axis in picked:
                if s != 0:
                    raise _reason(f"axis {axis} is picked by indices, so its start must be 0, not {s}")
            elif s < 0 or s + b > a:
                raise _reason(f"start {s} with size {b} runs outside axis {axis} of size {a}")
    return target_shape


def _slice_apply(
    value: np.ndarray, fresh: None, /, *, target_shape: Shape, key: str = "tensor",
    start: Sequence[int] | None = None, indices: Mapping[Any, Sequence[int]] | None = None,
) -> np.ndarray:
    picked = _slice_indices(indices, value.shape, target_shape)
    starts = [int(s) for s in start] if start is not None else [0] * value.ndim
    block = tuple(
        slice(None) if axis in picked else slice(s, s + b) for axis, (s, b) in enumerate(zip(starts, target_shape))
    )
    out = value[block]
    for axis, picks in picked.items():
        out = np.take(out, np.asarray(picks, dtype=np.intp), axis=axis)
    return np.array(out, copy=True, order="C")


# --------------------------------------------------------------------------- resize


def _resize_axes(axes: Any, in_shape: Shape, target_shape: Shape) -> list[int]:
    if axes is None:
        return [i for i, (a, b) in enumerate(zip(in_shape, target_shape)) if a != b]
    listed = [_axis(a, len(in_shape), "axes entry") for a in _ints(axes, "option axes")]
    if len(set(listed)) != len(listed):
        raise _reason(f"option axes names an axis twice: {list(axes)}")
    return listed


def _resize_shape(in_shape: Shape | None, target_shape: Shape, /, *, axes: Sequence[int] | None = None) -> Shape:
    in_shape = _need(in_shape, "resize")
    _same_rank("resize", in_shape, target_shape)
    listed = _resize_axes(axes, in_shape, target_shape)
    for i, (a, b) in enumerate(zip(in_shape, target_shape)):
        if i in listed:
            if a == 0 or b == 0:
                raise _reason(f"resize cannot interpolate axis {i} from or to size 0")
        elif a != b:
            raise _reason(
                f"axis {i} changes size ({a} -> {b}) but is not in axes={list(axes or [])}; "
                "list it in axes to interpolate it"
            )
    return target_shape


def _lerp_axis(x: np.ndarray, axis: int, m: int) -> np.ndarray:
    """Align-corners linear resampling of ``x`` along ``axis`` to ``m`` samples."""
    n = x.shape[axis]
    if n == m:
        return x
    if m == 1:
        pos = np.zeros(1)
    else:
        pos = (np.arange(m, dtype=np.int64) * (n - 1)) / (m - 1)  # exact at both ends
    lo = np.minimum(np.floor(pos).astype(np.intp), n - 1)
    hi = np.minimum(lo + 1, n - 1)
    w = (pos - lo).reshape([-1 if i == axis else 1 for i in range(x.ndim)])
    return np.take(x, lo, axis=axis) * (1.0 - w) + np.take(x, hi, axis=axis) * w


def _resize_apply(
    value: np.ndarray, fresh: None, /, *, target_shape: Shape, key: str = "tensor", axes: Sequence[int] | None = None
) -> np.ndarray:
    out = _float_work(value)
    for axis in _resize_axes(axes, value.shape, target_shape):
        out = _lerp_axis(out, axis, target_shape[axis])
    return _back(out, value.dtype)


# --------------------------------------------------------------------------- adapt_channels


def _adapt_shape(in_shape: Shape | None, target_shape: Shape, /, *, axis: int = 2) -> Shape:
    in_shape = _need(in_shape, "adapt_channels")
    _same_rank("adapt_channels", in_shape, target_shape)
    ax = _axis(axis, len(in_shape))
    if in_shape[ax] != 3:
        raise _reason(f"adapt_channels starts from 3 input channels (RGB), but axis {ax} has {in_shape[ax]}")
    if target_shape[ax] < 1:
        raise _reason(f"adapt_channels needs at least 1 channel on axis {ax}")
    _only_axis_changes("adapt_channels", in_shape, target_shape, ax)
    return target_shape


def _adapt_apply(
    value: np.ndarray, fresh: None, /, *, target_shape: Shape, key: str = "tensor", axis: int = 2
) -> np.ndarray:
    ax = axis % value.ndim
    n = target_shape[ax]
    work = _float_work(value)
    if n == 1:
        out = work.sum(axis=ax, keepdims=True)
    else:
        out = np.take(work, np.arange(n) % 3, axis=ax) * (3.0 / n)
    return _back(out, value.dtype)


# --------------------------------------------------------------------------- Net2Net widening


def widen_mapping(old_units: int, new_units: int, seed: int = 0) -> np.ndarray:
    """Net2Net's unit mapping for widening a layer from ``old_units`` to ``new_units``.

    Entry ``j < old_units`` is ``j`` (every old unit keeps its place); each later
    entry is an old unit drawn uniformly with ``np.random.default_rng(seed)``, so
    the mapping is deterministic for a seed. Pass it (as ``.tolist()``) to
    ``widen_out`` on the producer and ``widen_in`` on its consumers.

    Args:
        old_units: units before, at least 1.
        new_units: units after, at least ``old_units``.
        seed: the random generator's seed.

    Returns:
        An int64 array of length ``new_units``.

    Raises:
        TransformError: ``new_units < old_units`` or ``old_units < 1``.

    Example:
        >>> widen_mapping(3, 6, seed=0).tolist()
        [0, 1, 2, 2, 1, 1]
    """
    old = _checked_int(old_units, "old_units")
    new = _checked_int(new_units, "new_units")
    _checked_int(seed, "seed")
    if old < 1 or new < old:
        raise TransformError(
            f"widen_mapping cannot widen {old} units to {new}: it needs 1 <= old_units <= new_units.",
            hint="To remove units use the 'slice' transform.",
        )
    rng = np.random.default_rng(seed)
    return np.concatenate([np.arange(old, dtype=np.int64), rng.integers(0, old, size=new - old, dtype=np.int64)])


def _checked_int(x: Any, what: str) -> int:
    try:
        return _int(x, what)
    except TransformError as exc:
        raise TransformError(exc.message + ".") from None


def _mapping(mapping: Any, in_shape: Shape, target_shape: Shape, axis: int, name: str) -> tuple[int, np.ndarray]:
    ax = _axis(axis, len(in_shape))
    m = np.asarray(_ints(mapping, "option mapping"), dtype=np.intp)
    if len(m) != target_shape[ax]:
        raise _reason(f"mapping has {len(m)} entries but axis {ax} of the target has {target_shape[ax]}")
    bad = m[(m < 0) | (m >= in_shape[ax])]
    if bad.size:
        raise _reason(f"mapping entry {int(bad[0])} is out of range for axis {ax} of size {in_shape[ax]}")
    _only_axis_changes(name, in_shape, target_shape, ax)
    return ax, m


def _widen_out_shape(
    in_shape: Shape | None, target_shape: Shape, /, *, mapping: Sequence[int], axis: int = -1
) -> Shape:
    in_shape = _need(in_shape, "widen_out")
    _same_rank("widen_out", in_shape, target_shape)
    _mapping(mapping, in_shape, target_shape, axis, "widen_out")
    return target_shape


def _widen_out_apply(
    value: np.ndarray, fresh: None, /, *, target_shape: Shape, key: str = "tensor", mapping: Sequence[int],
    axis: int = -1,
) -> np.ndarray:
    return np.take(value, np.asarray(mapping, dtype=np.intp), axis=axis % value.ndim)


def _widen_in_shape(
    in_shape: Shape | None, target_shape: Shape, /, *, mapping: Sequence[int], axis: int = -2,
    noise: float = 0.0, seed: int = 0, power: int = 1,
) -> Shape:
    if power not in (1, 2):
        raise _reason(f"option power must be 1 or 2, not {power!r}")
    in_shape = _need(in_shape, "widen_in")
    _same_rank("widen_in", in_shape, target_shape)
    ax, m = _mapping(mapping, in_shape, target_shape, axis, "widen_in")
    unused = np.setdiff1d(np.arange(in_shape[ax]), m)
    if unused.size:
        raise _reason(
            f"mapping never uses unit {int(unused[0])} of axis {ax}, so widen_in would drop its contribution; "
            "use the producer's mapping (every old unit appears in widen_mapping's)"
        )
    if _number(noise, "option noise") < 0 or not math.isfinite(noise):
        raise _reason(f"option noise must be a finite number >= 0, not {noise!r}")
    _int(seed, "option seed")
    return target_shape


def _widen_in_apply(
    value: np.ndarray, fresh: None, /, *, target_shape: Shape, key: str = "tensor", mapping: Sequence[int],
    axis: int = -2, noise: float = 0.0, seed: int = 0, power: int = 1,
) -> np.ndarray:
    ax = axis % value.ndim
    m = np.asarray(mapping, dtype=np.intp)
    count = np.bincount(m, minlength=value.shape[ax]).astype(np.float64)
    moved = np.moveaxis(_float_work(value), ax, 0)  # (old, ...)
    out = moved[m] / (count[m] ** power).reshape([-1] + [1] * (moved.ndim - 1))
    if noise > 0 and value.size:
        out = out + _zero_sum_noise(m, count, out.shape, float(noise) * float(np.std(moved)), seed)
    return _back(np.moveaxis(out, 0, ax), value.dtype)


def _zero_sum_noise(m: np.ndarray, count: np.ndarray, shape: Shape, sigma: float, seed: int) -> np.ndarray:
    """Noise on rows of ``shape`` (rows = copies): N(0, sigma) per copy, summing to 0 over the copies of a unit.

    Draws ``z`` per copy, subtracts the mean over the copies of the same unit and
    rescales by sqrt(c / (c - 1)) so each copy's marginal standard deviation stays
    ``sigma``; for two copies this is exactly ``+eps`` / ``-eps``. Units with one
    copy get none.
    """
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, sigma, size=shape).reshape(shape[0], -1)
    sums = np.zeros((len(count), z.shape[1]))
    np.add.at(sums, m, z)
    c = count[m][:, None]
    scale = np.where(c > 1, np.sqrt(c / np.maximum(c - 1, 1)), 0.0)
    return ((z - sums[m] / c) * scale).reshape(shape)


# --------------------------------------------------------------------------- identity_init


def _identity_kernel_problem(shape: Shape) -> str | None:
    if len(shape) < 2:
        return (
            f"an identity kernel needs rank >= 2 (shape {shape}); a rank-1 variable is a bias: role='bias' gives zeros"
        )
    n, m = shape[-2], shape[-1]
    if m < n:
        return (
            f"an identity kernel needs at least as many outputs as inputs, "
            f"but shape {shape} has {n} inputs and {m} outputs"
        )
    if any(k % 2 == 0 for k in shape[:-2]):
        return f"an identity kernel needs odd kernel sizes to centre a delta, but shape {shape} has an even one"
    return None


def identity_kernel(shape: Sequence[int], dtype: Any = "float32") -> np.ndarray:
    """A kernel that makes an inserted Dense or Conv layer pass its input through.

    Dense ``(n, m)``, ``m >= n``: ``[I_n, 0]``, the first ``n`` outputs copy the
    inputs, the others are 0. Conv ``(*k, n, m)`` (Conv1D/2D/3D) with odd sizes
    ``k``: a delta at the centre tap from input ``i`` to output ``i``, i.e. the
    identity for stride 1 and ``'same'`` padding.

    Exactness: with a zero bias and no activation the layer is exactly the
    identity (padded with zero outputs). With ReLU it is exact only when its input
    is non-negative, e.g. when the layer is inserted after a ReLU. When ``m > n``
    the next layer sees ``m - n`` extra zero inputs, so whatever its kernel holds
    on those rows (``pad``, ``overlay``) the output is unchanged.

    Args:
        shape: the kernel's shape.
        dtype: the dtype of the result.

    Raises:
        TransformError: rank < 2, fewer outputs than inputs, or an even kernel size.

    Example:
        >>> identity_kernel((2, 3)).tolist()
        [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
        >>> identity_kernel((3, 3, 1, 1))[:, :, 0, 0].tolist()
        [[0.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]
    """
    shape = _shape(shape, "kernel shape")
    problem = _identity_kernel_problem(shape)
    if problem is not None:
        raise TransformError(problem[0].upper() + problem[1:] + ".")
    out = np.zeros(shape, dtype_of(dtype) if isinstance(dtype, str) else np.dtype(dtype))
    n = shape[-2]
    centre = tuple(k // 2 for k in shape[:-2])
    out[centre + (np.arange(n), np.arange(n))] = 1
    return out


def _identity_init_role(role: Any, target_shape: Shape) -> str:
    if role is None:
        return "bias" if len(target_shape) == 1 else "kernel"
    if role not in ("kernel", "bias"):
        raise _reason(f"option role must be 'kernel' or 'bias', not {role!r}")
    return role


def _identity_init_shape(
    in_shape: Shape | None, target_shape: Shape, /, *, role: str | None = None, dtype: str = "float32"
) -> Shape:
    if _identity_init_role(role, target_shape) == "kernel":
        problem = _identity_kernel_problem(target_shape)
        if problem is not None:
            raise _reason(problem)
    _check_dtype_option(dtype)
    return target_shape


def _identity_init_apply(
    value: Any, fresh: None, /, *, target_shape: Shape, key: str = "tensor", role: str | None = None,
    dtype: str = "float32",
) -> np.ndarray:
    if _identity_init_role(role, target_shape) == "kernel":
        return identity_kernel(target_shape, dtype)
    return np.zeros(target_shape, dtype_of(dtype))


# --------------------------------------------------------------------------- fill


def _fill_shape(in_shape: Shape | None, target_shape: Shape, /, *, value: float, dtype: str = "float32") -> Shape:
    if not math.isfinite(_number(value, "option value")):
        raise _reason(f"option value must be a finite number, not {value!r}")
    _check_dtype_option(dtype)
    return target_shape


def _fill_apply(
    value: Any, fresh: None, /, *, target_shape: Shape, key: str = "tensor", dtype: str = "float32", **options: Any
) -> np.ndarray:
    return np.full(target_shape, float(options["value"]), dtype_of(dtype))


# --------------------------------------------------------------------------- the built-in table

# --------------------------------------------------------------------------- PyTorch layouts


def _layout_shape(name: str, in_shape: Shape | None, min_rank: int, max_rank: int) -> Shape:
    in_shape = _need(in_shape, name)
    if not min_rank <= len(in_shape) <= max_rank:
        ranks = str(min_rank) if min_rank == max_rank else f"{min_rank} to {max_rank}"
        raise _reason(f"{name} takes a tensor of rank {ranks}, not {len(in_shape)}")
    return in_shape


def _linear_to_dense_shape(in_shape: Shape | None, target_shape: Shape, /) -> Shape:
    out, inp = _layout_shape("linear_to_dense", in_shape, 2, 2)
    return (inp, out)


def _linear_to_dense_apply(value: np.ndarray, fresh: None, /, *, target_shape: Shape, key: str = "tensor") -> np.ndarray:
    return np.ascontiguousarray(value.T)


def _conv_permutation(rank: int) -> tuple[int, ...]:
    """OI + spatial axes → spatial axes + IO (and a transposed conv's IO + spatial → spatial + OI)."""
    return (*range(2, rank), 1, 0)


def axis_permutation(name: str, rank: int) -> tuple[int, ...] | None:
    """The axes a layout transform that only permutes axes takes: result axis ``k`` is input axis ``perm[k]``.

    ``None`` for every other transform. A block of the result is then the permuted
    block of the input, which is how a sharded load reads one device's block.

    Example:
        >>> axis_permutation("conv_oihw_to_hwio", 4), axis_permutation("linear_to_dense", 2)
        ((2, 3, 1, 0), (1, 0))
        >>> axis_permutation("pad", 2) is None
        True
    """
    if name == "linear_to_dense" and rank == 2:
        return (1, 0)
    if name == "conv_oihw_to_hwio" and 3 <= rank <= 5:
        return _conv_permutation(rank)
    return None


def _conv_shape(in_shape: Shape | None, target_shape: Shape, /) -> Shape:
    shape = _layout_shape("conv_oihw_to_hwio", in_shape, 3, 5)
    return tuple(shape[i] for i in _conv_permutation(len(shape)))


def _conv_apply(value: np.ndarray, fresh: None, /, *, target_shape: Shape, key: str = "tensor") -> np.ndarray:
    return np.ascontiguousarray(value.transpose(_conv_permutation(value.ndim)))


def _depthwise_shape(in_shape: Shape | None, target_shape: Shape, /) -> Shape:
    shape = _layout_shape("depthwise_oihw_to_hwcm", in_shape, 3, 4)
    if shape[1] != 1:
        raise _reason(f"a depthwise kernel in PyTorch layout is [C*M, 1, ...], not {shape}")
    channels = target_shape[-2] if len(target_shape) == len(shape) else 0
    if channels <= 0 or shape[0] % channels:
        raise _reason(f"{shape[0]} output channels do not split into {channels} input channels")
    return (*shape[2:], channels, shape[0] // channels)


def _depthwise_apply(value: np.ndarray, fresh: None, /, *, target_shape: Shape, key: str = "tensor") -> np.ndarray:
    channels, multiplier = target_shape[-2], target_shape[-1]
    grouped = value.reshape((channels, multiplier, *value.shape[2:]))  # output channel o = c * M + m
    return np.ascontiguousarray(grouped.transpose((*range(2, grouped.ndim), 0, 1)))


def _pytorch_layout_examples() -> None:
    """The layout transforms on tiny tensors.

    Example:
        >>> w = np.arange(6).reshape(3, 2)                    # torch Linear(2, 3).weight: [out, in]
        >>> run("linear_to_dense", w, None, (2, 3), "fc/kernel").tolist()
        [[0, 2, 4], [1, 3, 5]]
        >>> run("conv_oihw_to_hwio", np.zeros((8, 3, 5, 4)), None, (5, 4, 3, 8), "c/kernel").shape
        (5, 4, 3, 8)
        >>> d = np.arange(6).reshape(6, 1, 1, 1)              # depthwise, 3 channels x multiplier 2
        >>> run("depthwise_oihw_to_hwcm", d, None, (1, 1, 3, 2), "dw/kernel")[0, 0].tolist()
        [[0, 1], [2, 3], [4, 5]]
    """


_builtin("identity", _identity_shape, _identity_apply, "the value as is (shapes equal)")
_builtin("overlay", _overlay_shape, _overlay_apply, "the overlapping block written into the fresh value", True)
_builtin("pad", _pad_shape, _pad_apply, "grow with a constant (0) at the end (or start) of each axis")
_builtin("slice", _slice_shape, _slice_apply, "shrink: a block from start=[...] or indices={axis: [...]}")
_builtin("resize", _resize_shape, _resize_apply, "linear interpolation (align corners) along axes")
_builtin("adapt_channels", _adapt_shape, _adapt_apply, "first conv kernel from 3 input channels to 1 or N")
_builtin("widen_out", _widen_out_shape, _widen_out_apply, "Net2Net producer: copy units by mapping along axis")
_builtin("widen_in", _widen_in_shape, _widen_in_apply, "Net2Net consumer: copy rows by mapping, divided by copy counts")
_builtin("identity_init", _identity_init_shape, _identity_init_apply, "identity kernel, zero bias: inserted layers")
_builtin("fill", _fill_shape, _fill_apply, "a constant value, ignoring the checkpoint: zeroed or fixed statistics")
_builtin("cast", _cast_shape, _cast_apply, "dtype only, refusing overflow")
_builtin("linear_to_dense", _linear_to_dense_shape, _linear_to_dense_apply,
         "PyTorch Linear weight [out, in] -> Keras Dense kernel [in, out]")
_builtin("conv_oihw_to_hwio", _conv_shape, _conv_apply,
         "PyTorch conv weight [out, in, *spatial] -> Keras kernel [*spatial, in, out] (transposed convs alike)")
_builtin("depthwise_oihw_to_hwcm", _depthwise_shape, _depthwise_apply,
         "PyTorch depthwise weight [C*M, 1, *spatial] -> Keras depthwise kernel [*spatial, C, M]")
