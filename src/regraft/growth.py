"""Reshape policies: what to do with a matched tensor whose shape differs.

``reshape=`` on :func:`regraft.plan` / :func:`regraft.load`:

``"error"``     a mismatch is a strict problem (non-strict: left fresh). The default.
``"fresh"``     leave mismatched variables fresh, on purpose (not a problem).
``"overlay"``   copy the overlapping block of the old tensor into the fresh variable.
``"preserve"``  function-preserving growth where the architecture allows it
                (Net2Net, Chen et al. 2016): a widened producer copies units by a
                seeded mapping and its consumers divide the copied rows by the copy
                counts, through BatchNormalization in between; an inserted Dense or
                Conv2D starts as an identity. Each variable it could not handle keeps
                its mismatch, with the reason.

This module only rewrites :class:`Assignment` records (metadata): the transforms
themselves are the pure functions of :mod:`regraft.transforms`.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, replace
from typing import Any

from regraft.entries import Stage
from regraft.errors import RegraftError
from regraft.plans import CAST, LOADED, MISSING, SHAPE_MISMATCH, TRANSFORMED, Assignment, status_for

__all__ = ["POLICIES", "apply_policy", "with_steps", "check_steps", "run_steps", "steps_need_fresh"]

POLICIES = ("error", "fresh", "overlay", "preserve")

# Layers a channel mapping passes through unchanged (element-wise or spatial only).
_PASS_THROUGH = {
    "activation", "re_lu", "leaky_re_lu", "dropout", "spatial_dropout2d", "max_pooling2d", "average_pooling2d",
    "max_pooling1d", "average_pooling1d", "zero_padding2d", "identity", "gaussian_noise", "gaussian_dropout",
}
_PRODUCERS = {"dense", "conv2d", "conv1d"}
# Values that keep extra (always-zero) channels at zero through BatchNormalization.
_BN_PAD = {"gamma": 1.0, "beta": 0.0, "moving_mean": 0.0, "moving_variance": 1.0}


@dataclass(frozen=True)
class _Channels:
    """How a layer's output channels relate to the old model's: widened by ``mapping``, or
    padded with always-zero channels after the first ``old`` ones."""

    old: int
    mapping: tuple[int, ...] | None = None  # widened: new unit j copies old unit mapping[j]


class _Unknown:
    """The channel layout cannot be followed past this layer (a merge, a reshape, a layer not grown)."""

    def __repr__(self) -> str:
        return "<unknown channel layout>"


_UNKNOWN = _Unknown()

Steps = tuple[tuple[str, dict[str, Any]], ...]


def _step_shapes(steps: Steps, in_shape: tuple[int, ...] | None, final: tuple[int, ...]) -> list[tuple[int, ...]]:
    """The shape after each step: a widening changes its axis only; any other step reaches ``final``."""
    shapes, shape = [], in_shape
    for name, options in steps:
        if name in ("widen_in", "widen_out") and shape is not None and "mapping" in options:
            axis = int(options.get("axis", -1 if name == "widen_out" else -2)) % len(shape)
            shape = tuple(len(options["mapping"]) if k == axis else d for k, d in enumerate(shape))
        else:
            shape = tuple(final)
        shapes.append(shape)
    return shapes


def check_steps(steps: Steps, in_shape: tuple[int, ...] | None, final: tuple[int, ...], key: str) -> None:
    """Validate a transform pipeline from shapes alone; it must end at ``final``.

    Raises:
        TransformError: naming the step, the variable and both shapes.
    """
    from regraft import transforms

    shape = in_shape
    for (name, options), out in zip(steps, _step_shapes(steps, in_shape, final)):
        transforms.check(name, shape, out, key, **options)
        shape = out
    if shape != tuple(final):
        raise transforms.TransformError(
            f"The transforms of variable '{key}' end at shape {shape}, not its shape {tuple(final)}.",
            hint="Add a step that reaches the variable's shape (pad, slice or overlay).",
        )


def run_steps(steps: Steps, value: Any, fresh: Any, final: tuple[int, ...], key: str) -> Any:
    """Run a transform pipeline on ``value`` (``None`` for ``identity_init``)."""
    from regraft import transforms

    for (name, options), out in zip(steps, _step_shapes(steps, None if value is None else value.shape, final)):
        value = transforms.run(name, value, fresh if out == tuple(final) else None, out, key, **options)
    return value


def steps_need_fresh(steps: Steps) -> bool:
    """Whether any step needs the variable's current value."""
    from regraft import transforms

    return any(transforms.get(name).needs_fresh for name, _ in steps)


def with_steps(a: Assignment, steps: list[tuple[str, dict[str, Any]]], reason: str) -> Assignment:
    """``a`` written through the transform pipeline ``steps`` (validated from shapes)."""
    check_steps(tuple(steps), a.source.shape if a.source is not None else None, a.target.shape, a.target.key)
    return replace(a, status=TRANSFORMED, steps=tuple(steps), reason=f"{a.reason}; {reason}" if a.reason else reason)


def apply_policy(assignments: list[Assignment], policy: str, graph: list[Any] | None, noise: float = 0.0) -> list[Assignment]:
    """Rewrite shape-mismatched (and, for ``preserve``, inserted) assignments per ``policy``."""
    if policy not in POLICIES:
        raise RegraftError(
            f"Unknown reshape policy '{policy}'. Expected one of: {', '.join(POLICIES)}.",
            hint="reshape='preserve' keeps what the old model computed; 'overlay' keeps the old values it can.",
        )
    if policy == "error":
        return assignments
    if policy == "fresh":
        return [replace(a, allowed="reshape='fresh'") if a.status == SHAPE_MISMATCH else a for a in assignments]
    if policy == "overlay":
        return [_overlay(a) if a.status == SHAPE_MISMATCH else a for a in assignments]
    return _preserve(assignments, graph or [], noise)


def _overlay(a: Assignment) -> Assignment:
    if a.source is None or len(a.source.shape) != len(a.target.shape):
        return replace(a, reason=a.reason + "; overlay needs the same rank")
    return with_steps(a, [("overlay", {})], "overlay: old values where the shapes overlap, fresh elsewhere")


def _preserve(assignments: list[Assignment], graph: list[Any], noise: float) -> list[Assignment]:
    by_layer: dict[str, list[int]] = {}
    for i, a in enumerate(assignments):
        by_layer.setdefault(a.target.layer, []).append(i)
    out = list(assignments)
    _shift_past_inserted(out, by_layer, graph)
    channels: dict[str, _Channels | None | _Unknown] = {}
    for layer in graph:
        incoming = _incoming(layer, channels)
        indices = by_layer.get(layer.key, [])
        if not indices:
            channels[layer.key] = incoming if layer.kind in _PASS_THROUGH or incoming is None else _UNKNOWN
            continue
        roles = {out[i].target.role: i for i in indices}
        if layer.kind == "batch_normalization":
            channels[layer.key] = _preserve_norm(out, roles, incoming)
        elif layer.kind in _PRODUCERS and "kernel" in roles:
            previous = next((g for g in graph if g.key in layer.inputs), None)
            channels[layer.key] = _preserve_producer(out, roles, incoming, layer, previous, noise)
        else:
            channels[layer.key] = None if incoming is None else _UNKNOWN
            _explain(out, indices, f"{layer.kind} layers are not grown function-preservingly")
    return out


def _incoming(layer: Any, channels: dict[str, Any]) -> _Channels | None | _Unknown:
    found = [channels.get(key) for key in layer.inputs]
    changed = [c for c in found if c is not None]
    if not changed:
        return None
    if len(found) > 1:
        return _UNKNOWN  # merging several inputs: their channel layouts need not agree
    return changed[0]


def _preserve_norm(out: list[Assignment], roles: dict[str, int], incoming: Any) -> Any:
    for role, i in roles.items():
        a = out[i]
        if a.status != SHAPE_MISMATCH or a.source is None:
            continue
        if isinstance(incoming, _Channels) and incoming.mapping is not None:
            out[i] = with_steps(a, [("widen_out", {"mapping": list(incoming.mapping), "axis": -1})],
                                "preserve: copied along the widened channels")
        elif isinstance(incoming, _Channels):
            out[i] = with_steps(a, [("pad", {"value": _BN_PAD.get(role, 0.0)})],
                                "preserve: padded so the added (zero) channels stay zero")
        else:
            _explain(out, [i], "its input channels did not grow in a way regraft can follow")
    return incoming


def _preserve_producer(out: list[Assignment], roles: dict[str, int], incoming: Any, layer: Any,
                       previous: Any, noise: float) -> Any:
    kernel = out[roles["kernel"]]
    bias_index = roles.get("bias")
    if kernel.status == MISSING and kernel.source is None:
        return _identity(out, roles, incoming, layer, previous)
    if kernel.source is None or kernel.status != SHAPE_MISMATCH:
        return None  # unchanged (or already decided by a rule)
    old, new = kernel.source.shape, kernel.target.shape
    in_axis = len(new) - 2
    if len(old) != len(new) or any(o != n for k, (o, n) in enumerate(zip(old, new)) if k not in (in_axis, len(new) - 1)):
        _explain(out, list(roles.values()), f"kernel {old} -> {new} changes more than its input and output units")
        return _UNKNOWN
    kernel_steps: list[tuple[str, dict[str, Any]]] = []
    bias_steps: list[tuple[str, dict[str, Any]]] = []
    outgoing: _Channels | None = None
    if new[-1] != old[-1]:
        if new[-1] < old[-1]:
            _explain(out, list(roles.values()), "fewer output units cannot compute the same function")
            return _UNKNOWN
        mapping = _mapping(old[-1], new[-1], layer.key)
        kernel_steps.append(("widen_out", {"mapping": mapping, "axis": -1}))
        bias_steps.append(("widen_out", {"mapping": mapping, "axis": -1}))
        outgoing = _Channels(old[-1], tuple(mapping))
    if new[in_axis] != old[in_axis]:
        if isinstance(incoming, _Channels) and incoming.mapping is not None and incoming.old == old[in_axis]:
            step = {"mapping": list(incoming.mapping), "axis": in_axis}
            if noise:
                step.update(noise=noise, seed=_seed(layer.key))
            kernel_steps.append(("widen_in", step))
        elif isinstance(incoming, _Channels) and incoming.mapping is None and incoming.old == old[in_axis]:
            kernel_steps.append(("pad", {}))  # rows for always-zero inputs: zeros
        else:
            _explain(out, list(roles.values()), f"its input units changed ({old[in_axis]} -> {new[in_axis]}) "
                     "without a widened or inserted layer before it that regraft can follow")
            return _UNKNOWN
    if kernel_steps:
        out[roles["kernel"]] = with_steps(kernel, kernel_steps, "preserve: " + _describe(kernel_steps))
    if bias_index is not None and bias_steps and out[bias_index].source is not None:
        out[bias_index] = with_steps(out[bias_index], bias_steps, "preserve: " + _describe(bias_steps))
    return outgoing


def _identity(out: list[Assignment], roles: dict[str, int], incoming: Any, layer: Any, previous: Any) -> Any:
    kernel = out[roles["kernel"]]
    shape = kernel.target.shape
    if incoming is not None:
        _explain(out, list(roles.values()), "an inserted layer after a widened one is not handled")
        return _UNKNOWN
    exact = layer.activation in (None, "linear") or (previous is not None and previous.non_negative)
    if not exact:
        _explain(out, list(roles.values()), f"an identity {layer.activation} layer is exact only after a ReLU")
        return _UNKNOWN
    try:
        out[roles["kernel"]] = with_steps(kernel, [("identity_init", {"role": "kernel"})],
                                          "preserve: inserted layer starts as an identity")
        if "bias" in roles:
            out[roles["bias"]] = with_steps(out[roles["bias"]], [("identity_init", {"role": "bias"})],
                                            "preserve: inserted layer starts as an identity")
    except RegraftError as exc:
        _explain(out, list(roles.values()), exc.message)
        return _UNKNOWN
    return _Channels(shape[-2]) if shape[-1] > shape[-2] else None


def _shift_past_inserted(out: list[Assignment], by_layer: dict[str, list[int]], graph: list[Any]) -> None:
    """Re-read "old B matched new B with another shape, new C missing" as "new B was inserted".

    In the tutorial's case, ``dense1 → dense2(10)`` became ``dense1 → dense2(128,
    inserted) → dense3(10)``: old dense2 fits new dense3 once its input rows are
    padded, and new dense2 can start as an identity. Names alone paired old and new
    dense2; function preservation needs old dense2 in dense3.
    """
    for layer, following in zip(graph, graph[1:]):
        if following.inputs != (layer.key,) or layer.kind not in _PRODUCERS or following.kind != layer.kind:
            continue
        here = {out[i].target.role: i for i in by_layer.get(layer.key, [])}
        there = {out[i].target.role: i for i in by_layer.get(following.key, [])}
        if "kernel" not in here or "kernel" not in there or set(here) != set(there):
            continue
        k_here, k_there = out[here["kernel"]], out[there["kernel"]]
        if k_here.status != SHAPE_MISMATCH or k_here.source is None or k_there.status != MISSING:
            continue
        if any(out[i].source is None for i in here.values()) or any(out[i].source for i in there.values()):
            continue
        old, inserted, after = k_here.source.shape, k_here.target.shape, k_there.target.shape
        in_axis = len(old) - 2
        fits_after = old[-1] == after[-1] and old[in_axis] <= after[in_axis] and old[:in_axis] == after[:in_axis]
        can_be_identity = inserted[in_axis] == old[in_axis] and inserted[-1] >= inserted[in_axis]
        if not (fits_after and can_be_identity):
            continue
        for role in here:
            moved, emptied = out[here[role]], out[there[role]]
            source = moved.source  # not None: checked above
            status = status_for(source, emptied.target)
            out[there[role]] = replace(emptied, source=moved.source, status=status, stage=Stage.ALIGNED,
                                       reason=f"preserve: '{layer.key}' looks inserted; its old tensor moves here",
                                       confidence=moved.confidence)
            out[here[role]] = replace(moved, source=None, status=MISSING, reason="preserve: treated as inserted")


def _mapping(old: int, new: int, key: str) -> list[int]:
    from regraft.transforms import widen_mapping

    return [int(j) for j in widen_mapping(old, new, seed=_seed(key))]


def _seed(key: str) -> int:
    return zlib.crc32(key.encode())


def _describe(steps: list[tuple[str, dict[str, Any]]]) -> str:
    return " + ".join(f"{name}(axis {options['axis']})" if "axis" in options else name for name, options in steps)


def _explain(out: list[Assignment], indices: list[int], why: str) -> None:
    for i in indices:
        a = out[i]
        if a.status == SHAPE_MISMATCH:
            out[i] = replace(a, reason=f"{a.reason}; could not preserve: {why}")
