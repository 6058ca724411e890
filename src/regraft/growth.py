"""Reshape policies: what to do with a matched tensor whose shape differs.

``reshape=`` on :func:`regraft.plan` / :func:`regraft.load`:

``"error"``     a mismatch is a strict problem (non-strict: left fresh). The default.
``"fresh"``     leave mismatched variables fresh, on purpose (not a problem).
``"overlay"``   copy the overlapping block of the old tensor into the fresh variable.
``"preserve"``  function-preserving growth where the architecture allows it
                (Net2Net, Chen et al. 2016), following the model's layer graph:

                * a widened producer (Dense, Conv, SeparableConv) copies units by a
                  seeded mapping; its consumers divide the copied rows by the copy
                  counts. The mapping is carried through layers that keep channels
                  apart (activations, Dropout, pooling and global pooling, padding,
                  cropping, upsampling), BatchNormalization and depthwise convolutions
                  (copied along), ``Flatten`` (the consumer's rows repeat per spatial
                  position) and ``Concatenate`` (shifted by each input's offset). All
                  producers summed by one ``Add`` (a residual stream, projection
                  shortcuts included) share one mapping, so the sum stays consistent;
                * an inserted Dense or Conv starts as an identity (at the new width
                  after a widened layer), an inserted BatchNormalization as an exact
                  identity (moving variance ``1 - epsilon``);
                * an inserted branch that ends in an ``Add`` with its own input (a
                  residual or pre-LN transformer block) starts at zero: its last scale
                  (normalization gamma and beta, or its last kernel and bias, or an
                  attention layer's output projection) is zeroed, and the rest of the
                  branch stays fresh, which changes nothing.

                Every variable it cannot preserve gets ``not_preserved`` with the
                reason: a strict problem that names the layer (``strict=False``: the
                report marks it). An ``init`` rule wins over preserve: the layer stays
                fresh, and the report says its function is not preserved.

This module only rewrites :class:`Assignment` records (metadata): the transforms
themselves are the pure functions of :mod:`regraft.transforms`.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, replace
from typing import Any

from regraft.entries import Stage
from regraft.errors import RegraftError
from regraft.plans import MISSING, SHAPE_MISMATCH, TRANSFORMED, Assignment, status_for

__all__ = ["POLICIES", "apply_policy", "with_steps", "check_steps", "run_steps", "steps_need_fresh"]

POLICIES = ("error", "fresh", "overlay", "preserve")

# Weightless layers that act on each channel apart (element-wise or spatial only): a channel
# mapping passes through them unchanged.
_PASS_THROUGH = {
    "re_lu", "leaky_re_lu", "elu", "dropout", "spatial_dropout1d", "spatial_dropout2d", "spatial_dropout3d",
    "alpha_dropout", "gaussian_noise", "gaussian_dropout", "identity", "activity_regularization",
    "max_pooling1d", "max_pooling2d", "max_pooling3d", "average_pooling1d", "average_pooling2d", "average_pooling3d",
    "global_average_pooling1d", "global_average_pooling2d", "global_average_pooling3d",
    "global_max_pooling1d", "global_max_pooling2d", "global_max_pooling3d",
    "zero_padding1d", "zero_padding2d", "zero_padding3d", "cropping1d", "cropping2d", "cropping3d",
    "up_sampling1d", "up_sampling2d", "up_sampling3d", "activation",
}
# Of those, the ones whose output is non-negative when their input is.
_KEEPS_SIGN = _PASS_THROUGH - {"activation", "elu", "leaky_re_lu", "gaussian_noise"}
# Activations with f(0) = 0: always-zero channels stay zero. Softmax mixes channels.
_ZERO_AT_ZERO = {None, "linear", "relu", "relu6", "leaky_relu", "elu", "selu", "gelu", "tanh", "silu", "swish",
                 "hard_silu", "hard_swish", "mish", "softsign"}
# Activations applied to each unit apart (copies of a unit stay copies). Softmax mixes units.
_ELEMENTWISE = _ZERO_AT_ZERO | {"sigmoid", "hard_sigmoid", "softplus", "exponential", "log_sigmoid", "celu",
                                "sparse_plus", "squareplus", "tanh_shrink", "hard_tanh"}
_ACTIVATIONS = {"re_lu", "activation", "leaky_re_lu", "elu"}
_PRODUCERS = {"dense", "conv1d", "conv2d", "conv3d", "separable_conv1d", "separable_conv2d"}
_DEPTHWISE = {"depthwise_conv1d", "depthwise_conv2d"}
_NORMS = {"layer_normalization", "group_normalization", "batch_normalization", "rms_normalization"}
# Merges that combine their inputs element-wise: every input must carry the same channel layout.
_MERGES = {"add", "subtract", "average", "maximum", "minimum", "multiply"}
# Values that keep extra (always-zero) channels at zero through BatchNormalization.
_BN_PAD = {"gamma": 1.0, "beta": 0.0, "moving_mean": 0.0, "moving_variance": 1.0}
_INERT = "reshape='preserve': its residual branch starts at zero, so its values do not matter"


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
    by_layer = _variables_by_layer(assignments, graph)
    out = list(assignments)
    _shift_past_inserted(out, {k: v for k, v in by_layer.items()}, graph)
    spaces = _channel_spaces(graph)
    inert = _zero_inserted_branches(out, by_layer, graph)
    channels: dict[str, Any] = {}
    non_negative: dict[str, bool] = {}
    for layer in graph:
        incoming = _incoming(layer, channels, inert)
        first = layer.inputs[0] if layer.inputs else None
        non_negative[layer.key] = layer.non_negative or (layer.kind in _KEEPS_SIGN and non_negative.get(first, False))
        if layer.key in inert:
            channels[layer.key] = None
            continue
        indices = by_layer.get(layer.key, [])
        if not indices:
            channels[layer.key] = _weightless(layer, incoming)
            continue
        roles = {out[i].target.role: i for i in indices}
        ruled = [i for i in indices if out[i].stage == Stage.RULE and out[i].source is None]
        if ruled:  # an init rule wins over preserve: the layer stays fresh, on purpose
            _explain(out, indices, "an init rule leaves this layer fresh")
            channels[layer.key] = _UNKNOWN
        elif _is_inserted(out, indices):
            channels[layer.key] = _preserve_inserted(out, roles, indices, incoming, layer,
                                                      non_negative.get(first, False))
        elif layer.kind == "batch_normalization":
            channels[layer.key] = _preserve_norm(out, roles, incoming)
        elif layer.kind in _DEPTHWISE:
            channels[layer.key] = _preserve_depthwise(out, roles, incoming)
        elif layer.kind == "embedding" and "embeddings" in roles and len(roles) == 1:
            channels[layer.key] = _preserve_embedding(out, roles["embeddings"], spaces.get(layer.key, layer.key))
        elif layer.kind in _PRODUCERS and ("kernel" in roles or "pointwise_kernel" in roles):
            seed_key = spaces.get(layer.key, layer.key)
            channels[layer.key] = _preserve_producer(out, roles, incoming, layer, seed_key, noise)
        else:
            changed = any(out[i].status == SHAPE_MISMATCH for i in indices)
            channels[layer.key] = None if incoming is None and not changed else _UNKNOWN
            _explain(out, indices, f"{layer.kind} layers are not grown function-preservingly")
    _mark_grown_outputs(out, by_layer, graph, channels)
    owner = {i: key for key, indices in by_layer.items() for i in indices}
    for i, a in enumerate(out):  # whatever is left: never silently different
        if owner.get(i) in inert or a.not_preserved:
            continue
        if a.status == SHAPE_MISMATCH:
            _explain(out, [i], "its layer is not in the computation graph regraft follows")
        elif a.status == MISSING:
            _explain(out, [i], "a new layer with no counterpart in the checkpoint that regraft cannot start as "
                     "an identity")
    return out


def _mark_grown_outputs(out: list[Assignment], by_layer: dict[str, list[int]], graph: list[Any],
                        channels: dict[str, Any]) -> None:
    """A model output that grew (more classes in a head) computes more than the old model: copied
    units are not new classes. Mark the variables of the layer that widened it."""
    consumed = {key for layer in graph for key in layer.inputs}
    by_key = {layer.key: layer for layer in graph}
    for layer in graph:
        if layer.key in consumed or channels.get(layer.key) is None:
            continue
        source = layer
        while not by_layer.get(source.key) and source.inputs and source.inputs[0] in by_key:
            source = by_key[source.inputs[0]]  # back through weightless layers to the one that grew
        why = ("a model output with more units than before: the copied units are not new outputs, and the old "
               "model has nothing to compare them with")
        for i in by_layer.get(source.key, []):
            a = out[i]
            grew = any(name == "widen_out" and int(options.get("axis", -1)) == -1 for name, options in a.steps)
            if a.status == TRANSFORMED and grew and not a.not_preserved:
                out[i] = replace(a, reason=f"{a.reason}; could not preserve: {why}", not_preserved=why)


def _variables_by_layer(assignments: list[Assignment], graph: list[Any]) -> dict[str, list[int]]:
    """Assignment indices per graph layer; a layer's sub-layers' variables (an attention layer's
    projections) count as its own."""
    keys = {layer.key for layer in graph}
    by_layer: dict[str, list[int]] = {}
    for i, a in enumerate(assignments):
        owner, probe = a.target.layer, a.target.layer
        while probe and probe not in keys:
            probe = probe.rpartition("/")[0]
        by_layer.setdefault(probe or owner, []).append(i)
    return by_layer


def _is_inserted(out: list[Assignment], indices: list[int]) -> bool:
    return all(out[i].source is None and out[i].status == MISSING for i in indices)


def _channel_spaces(graph: list[Any]) -> dict[str, str]:
    """For each producer, the key that seeds its unit mapping: producers whose outputs are summed
    (through layers that keep channels apart) share one, so a residual stream widens consistently."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.get(x, x) != x:
            x = parent[x]
        return x

    space: dict[str, str] = {}
    for layer in graph:
        sources = [space.get(key, key) for key in layer.inputs] + [f"input:{name}" for name in layer.model_inputs]
        if layer.kind in _MERGES and sources:
            root = find(sources[0])
            for other in sources[1:]:
                if find(other) != root:
                    parent[find(other)] = root
            space[layer.key] = root
        elif (layer.kind in _PASS_THROUGH or layer.kind in _DEPTHWISE or layer.kind in _NORMS) and sources:
            space[layer.key] = sources[0]
        else:
            space[layer.key] = layer.key
    return {key: find(value) for key, value in space.items()}


def _ancestors(graph: list[Any]) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for layer in graph:
        mine = {f"input:{name}" for name in layer.model_inputs}
        for key in layer.inputs:
            mine |= found.get(key, set()) | {key}
        found[layer.key] = mine
    return found


def _zero_inserted_branches(out: list[Assignment], by_layer: dict[str, list[int]], graph: list[Any]) -> set[str]:
    """Start every inserted residual branch at zero; return the layers whose values no longer matter.

    A branch is what lies between an ``Add`` input and another input of the same ``Add`` that
    feeds it (``x + f(x)``). When every layer in it that holds variables is inserted (all fresh),
    zeroing the branch's last scale makes ``f(x) = 0`` exactly, so the block is an identity.
    """
    by_key = {layer.key: layer for layer in graph}
    ancestors = _ancestors(graph)
    non_negative: dict[str, bool] = {}
    for layer in graph:
        feeding = [non_negative.get(key, False) for key in layer.inputs] + [False] * len(layer.model_inputs)
        non_negative[layer.key] = layer.non_negative or bool(
            feeding and all(feeding) and (layer.kind in _KEEPS_SIGN or layer.kind in ("add", "concatenate")))
    inert: set[str] = set()
    for merge in graph:
        if merge.kind != "add":
            continue
        inputs = list(merge.inputs) + [f"input:{name}" for name in merge.model_inputs]
        for branch_end in merge.inputs:
            skips = [a for a in inputs if a != branch_end and a in ancestors.get(branch_end, set())]
            if not skips:
                continue
            skip = skips[0]
            branch = ({branch_end} | ancestors[branch_end]) - ({skip} | ancestors.get(skip, set()))
            weighted = [key for key in branch if by_layer.get(key)]
            if not weighted or not all(_is_inserted(out, by_layer[key]) for key in weighted):
                continue
            last = branch_end
            while last in branch and not by_layer.get(last) and _zero_passes(by_key[last]) and by_key[last].inputs:
                last = by_key[last].inputs[0]
            after = [g.activation for g in graph if merge.key in g.inputs and g.kind in _ACTIVATIONS
                     and g.activation not in (None, "linear")]
            if any(act != "relu" or not non_negative.get(skip, False) for act in after):
                for key in weighted:
                    _explain(out, by_layer[key], f"the {after[0]} after the residual sum changes its input even when "
                             "the branch adds zero (the input can be negative)")
                inert |= branch
                continue
            if last not in branch or not _zero_last_scale(out, by_layer[last], by_key[last]):
                continue
            inert |= branch
            for key in weighted:
                for i in by_layer[key]:
                    a = out[i]
                    if a.status == MISSING:
                        out[i] = replace(a, allowed=a.allowed or _INERT, reason=f"{a.reason}; {_INERT}")
    return inert


def _zero_passes(layer: Any) -> bool:
    """A weightless layer that maps zero to zero (so a zero branch stays zero through it)."""
    return layer.kind in _PASS_THROUGH and (layer.kind != "activation" or layer.activation in _ZERO_AT_ZERO)


def _zero_last_scale(out: list[Assignment], indices: list[int], layer: Any) -> bool:
    """Zero what makes ``layer``'s output zero: gamma and beta, a kernel and bias, an attention output projection."""
    roles = {out[i].target.role: i for i in indices}
    if layer.kind in _NORMS:
        chosen = [roles[r] for r in ("gamma", "beta") if r in roles]
        if "gamma" not in roles:
            return False
    elif layer.kind in _PRODUCERS or layer.kind in _DEPTHWISE:
        chosen = [roles[r] for r in ("kernel", "pointwise_kernel", "bias") if r in roles]
        if "bias" in roles and len(chosen) < 2:
            return False
    elif "gamma" in roles and set(roles) <= {"gamma", "beta"}:  # a per-channel scale
        chosen = [roles[r] for r in ("gamma", "beta") if r in roles]
    elif "scale" in layer.kind and len(indices) == 1 and len(out[indices[0]].target.shape) == 1:
        chosen = list(indices)  # ConvNeXt's LayerScale: one per-channel multiplier
    elif layer.kind == "multi_head_attention":
        sub_layers = list(dict.fromkeys(out[i].target.layer for i in indices))
        last = sub_layers[-1]  # the output projection, built after query, key and value
        chosen = [i for i in indices if out[i].target.layer == last]
    else:
        return False
    if not chosen:
        return False
    for i in chosen:
        out[i] = with_steps(replace(out[i], allowed=None), [("fill", {"value": 0.0})],
                            "preserve: zeroed so that the inserted residual branch adds nothing")
    return True


def _weightless(layer: Any, incoming: Any) -> Any:
    """The channel layout after a layer without variables."""
    if incoming is None or incoming is _UNKNOWN:
        return incoming
    if layer.kind == "activation" and layer.activation == "softmax":
        return _UNKNOWN
    if layer.kind == "reshape" and _keeps_last_axis(layer):
        return incoming
    if layer.kind in _PASS_THROUGH:
        if incoming.mapping is None and layer.kind == "activation" and layer.activation not in _ZERO_AT_ZERO:
            return _UNKNOWN  # the added channels would no longer be zero
        return incoming
    shape = layer.in_shapes[0] if layer.in_shapes else None
    if layer.kind == "flatten" and shape and all(d is not None for d in shape):
        if incoming.mapping is None:
            return _UNKNOWN
        positions = math.prod(shape[:-1])
        mapping = tuple(p * incoming.old + unit for p in range(positions) for unit in incoming.mapping)
        return _Channels(positions * incoming.old, mapping)
    if layer.kind in _MERGES:
        return incoming  # _incoming checked that all inputs agree
    if layer.kind == "concatenate":
        return incoming  # _incoming shifted each input's mapping by its offset
    return _UNKNOWN


def _incoming(layer: Any, channels: dict[str, Any], inert: set[str]) -> _Channels | None | _Unknown:
    keys = [key for key in layer.inputs if key not in inert] if layer.kind in _MERGES else list(layer.inputs)
    found = [channels.get(key) for key in keys]
    if layer.model_inputs and layer.kind not in _MERGES:
        found += [None] * len(layer.model_inputs)
    if layer.kind == "concatenate":
        return _concatenated(layer, found)
    changed = [c for c in found if c is not None]
    if not changed:
        return None
    if layer.kind in _MERGES and all(c == changed[0] for c in changed) and len(changed) == len(found):
        return changed[0]
    if len(found) > 1:
        return _UNKNOWN  # several inputs whose channel layouts do not agree
    return changed[0]


def _concatenated(layer: Any, found: list[Any]) -> Any:
    """The channel layout of a ``Concatenate`` on its last axis: each input's mapping shifted by its offset."""
    if all(c is None for c in found):
        return None
    shapes = layer.in_shapes
    rank = len(shapes[0]) + 1 if shapes else 0
    if layer.model_inputs or layer.axis is None or layer.axis % max(rank, 1) != rank - 1:
        return _UNKNOWN  # joined on another axis than channels, or inputs in an order not recorded
    if not shapes or len(shapes) != len(found) or any(not s or s[-1] is None for s in shapes):
        return _UNKNOWN
    mapping: list[int] = []
    offset = 0
    for state, shape in zip(found, shapes):
        if state is None:
            mapping.extend(range(offset, offset + shape[-1]))
            offset += shape[-1]
        elif isinstance(state, _Channels) and state.mapping is not None and len(state.mapping) == shape[-1]:
            mapping.extend(offset + unit for unit in state.mapping)
            offset += state.old
        else:
            return _UNKNOWN
    return _Channels(offset, tuple(mapping))


def _preserve_norm(out: list[Assignment], roles: dict[str, int], incoming: Any) -> Any:
    for role, i in roles.items():
        a = out[i]
        if a.status != SHAPE_MISMATCH or a.source is None:
            continue
        if isinstance(incoming, _Channels) and incoming.mapping is not None and len(a.source.shape) == 1:
            out[i] = with_steps(a, [("widen_out", {"mapping": list(incoming.mapping), "axis": -1})],
                                "preserve: copied along the widened channels")
        elif isinstance(incoming, _Channels) and incoming.mapping is None and len(a.source.shape) == 1:
            out[i] = with_steps(a, [("pad", {"value": _BN_PAD.get(role, 0.0)})],
                                "preserve: padded so the added (zero) channels stay zero")
        else:
            _explain(out, [i], "its input channels did not grow in a way regraft can follow")
            return _UNKNOWN
    return incoming


def _preserve_embedding(out: list[Assignment], index: int, seed_key: str) -> Any:
    """A wider embedding copies its old dimensions by a mapping, like a producer's output units."""
    a = out[index]
    if a.source is None or a.status != SHAPE_MISMATCH:
        return None if a.source is not None else _UNKNOWN
    (old_rows, old_dim), (new_rows, new_dim) = a.source.shape, a.target.shape
    if old_rows != new_rows or new_dim < old_dim:
        _explain(out, [index], f"embeddings {a.source.shape} -> {a.target.shape}: only the dimension may grow")
        return _UNKNOWN
    mapping = _mapping(old_dim, new_dim, seed_key)
    out[index] = with_steps(a, [("widen_out", {"mapping": mapping, "axis": -1})], "preserve: widen_out(axis -1)")
    return _Channels(old_dim, tuple(mapping))


def _preserve_depthwise(out: list[Assignment], roles: dict[str, int], incoming: Any) -> Any:
    """A depthwise conv works per channel: its kernel's channel axis and its bias follow the input's mapping."""
    kernel = out[roles["kernel"]] if "kernel" in roles else None
    if kernel is None or kernel.source is None or kernel.status != SHAPE_MISMATCH:
        return incoming if kernel is not None and kernel.source is not None else _UNKNOWN
    old, new = kernel.source.shape, kernel.target.shape
    same_elsewhere = len(old) == len(new) and old[:-2] == new[:-2] and old[-1] == new[-1] == 1
    if not same_elsewhere or not isinstance(incoming, _Channels) or incoming.old != old[-2]:
        _explain(out, list(roles.values()), f"depthwise kernel {old} -> {new}: only its channels may grow, "
                 "following a widened layer before it")
        return _UNKNOWN
    if incoming.mapping is not None:
        step: tuple[str, dict[str, Any]] = ("widen_out", {"mapping": list(incoming.mapping), "axis": -2})
        bias_step: tuple[str, dict[str, Any]] = ("widen_out", {"mapping": list(incoming.mapping), "axis": -1})
    else:
        step, bias_step = ("pad", {}), ("pad", {})
    out[roles["kernel"]] = with_steps(kernel, [step], "preserve: each channel's filter copied along its channel")
    if "bias" in roles and out[roles["bias"]].source is not None and out[roles["bias"]].status == SHAPE_MISMATCH:
        out[roles["bias"]] = with_steps(out[roles["bias"]], [bias_step], "preserve: copied along the channels")
    return incoming


def _preserve_producer(out: list[Assignment], roles: dict[str, int], incoming: Any, layer: Any,
                       seed_key: str, noise: float) -> Any:
    outgoing: Any = None
    if "depthwise_kernel" in roles:  # a separable conv: its depthwise half first
        inner = _preserve_depthwise(out, {"kernel": roles["depthwise_kernel"]}, incoming)
        if inner is _UNKNOWN:
            _explain(out, list(roles.values()), "its depthwise kernel could not follow its input")
            return _UNKNOWN
    kernel_role = "pointwise_kernel" if "pointwise_kernel" in roles else "kernel"
    kernel = out[roles[kernel_role]]
    bias_index = roles.get("bias")
    if kernel.source is None or kernel.status != SHAPE_MISMATCH:
        if incoming is not None and kernel.source is not None and kernel.status != SHAPE_MISMATCH:
            return None  # same shapes: what came in was padded to the same width, or is unknown
        return None if kernel.source is not None else _UNKNOWN
    old, new = kernel.source.shape, kernel.target.shape
    in_axis = len(new) - 2
    if len(old) != len(new) or any(o != n for k, (o, n) in enumerate(zip(old, new)) if k not in (in_axis, len(new) - 1)):
        _explain(out, list(roles.values()), f"kernel {old} -> {new} changes more than its input and output units")
        return _UNKNOWN
    kernel_steps: list[tuple[str, dict[str, Any]]] = []
    bias_steps: list[tuple[str, dict[str, Any]]] = []
    if new[-1] != old[-1]:
        if new[-1] < old[-1]:
            _explain(out, list(roles.values()), "fewer output units cannot compute the same function")
            return _UNKNOWN
        if layer.activation not in _ELEMENTWISE:
            _explain(out, list(roles.values()), f"copied units change what its {layer.activation} activation computes "
                     "(it mixes units)")
            return _UNKNOWN
        mapping = _mapping(old[-1], new[-1], seed_key)
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
        out[roles[kernel_role]] = with_steps(kernel, kernel_steps, "preserve: " + _describe(kernel_steps))
    if bias_index is not None and bias_steps and out[bias_index].source is not None:
        out[bias_index] = with_steps(out[bias_index], bias_steps, "preserve: " + _describe(bias_steps))
    return outgoing


def _preserve_inserted(out: list[Assignment], roles: dict[str, int], indices: list[int], incoming: Any, layer: Any,
                       input_non_negative: bool) -> Any:
    """An inserted layer (no variable has a source) that is not in a zeroed residual branch."""
    if layer.kind == "batch_normalization":
        return _identity_norm(out, roles, indices, incoming, layer)
    if layer.kind not in ("dense", "conv1d", "conv2d", "conv3d") or "kernel" not in roles:
        why = f"an inserted {layer.kind} layer cannot start as an identity"
        if layer.kind in _NORMS:
            why += " (it normalises its input; in a post-LN block it follows the residual sum)"
        _explain(out, indices, why)
        return _UNKNOWN
    kernel = out[roles["kernel"]]
    shape = kernel.target.shape
    if len(shape) > 2 and not _keeps_size(layer, shape):
        _explain(out, indices, "an inserted convolution is an identity only with stride 1, 'same' padding and one "
                 "group (its output must keep the input's size)")
        return _UNKNOWN
    if incoming is _UNKNOWN or (incoming is not None and shape[-1] != shape[-2]):
        _explain(out, indices, "an inserted layer after a widened one starts as an identity only at the same width")
        return _UNKNOWN
    exact = layer.activation in (None, "linear") or (layer.activation in ("relu", "relu6") and input_non_negative
                                                     and layer.activation == "relu")
    if not exact:
        _explain(out, indices, f"an inserted layer with activation {layer.activation} is an identity only on "
                 "non-negative inputs (after a ReLU)" if layer.activation == "relu"
                 else f"an inserted layer with activation {layer.activation} cannot start as an identity")
        return _UNKNOWN
    try:
        out[roles["kernel"]] = with_steps(kernel, [("identity_init", {"role": "kernel"})],
                                          "preserve: inserted layer starts as an identity")
        if "bias" in roles:
            out[roles["bias"]] = with_steps(out[roles["bias"]], [("identity_init", {"role": "bias"})],
                                            "preserve: inserted layer starts as an identity")
    except RegraftError as exc:
        _explain(out, indices, exc.message)
        return _UNKNOWN
    if incoming is not None:
        return incoming
    return _Channels(shape[-2]) if shape[-1] > shape[-2] else None


def _keeps_last_axis(layer: Any) -> bool:
    """A ``Reshape`` whose input and output end in the same (channel) axis size: channels survive it."""
    shape = layer.in_shapes[0] if layer.in_shapes else None
    return bool(shape) and layer.out_shape is not None and shape[-1] is not None and shape[-1] == layer.out_shape[-1]


def _keeps_size(layer: Any, kernel_shape: tuple[int, ...]) -> bool:
    """The layer's output has its input's spatial size, and the kernel reads every input channel."""
    if not layer.in_shapes or layer.out_shape is None:
        return False
    before, after = layer.in_shapes[0], layer.out_shape
    return tuple(before[:-1]) == tuple(after[:-1]) and before[-1] == kernel_shape[-2]


def _identity_norm(out: list[Assignment], roles: dict[str, int], indices: list[int], incoming: Any,
                   layer: Any) -> Any:
    """An inserted BatchNormalization: gamma 1, beta 0, mean 0, variance ``1 - epsilon``: exactly ``x``."""
    epsilon = layer.epsilon
    if epsilon is None or not 0 <= epsilon < 1 or incoming is _UNKNOWN:
        _explain(out, indices, "an inserted batch_normalization needs its epsilon below 1 to start as an identity")
        return _UNKNOWN
    values = {"gamma": 1.0, "beta": 0.0, "moving_mean": 0.0, "moving_variance": 1.0 - epsilon}
    if set(roles) - set(values):
        _explain(out, indices, "an inserted batch_normalization with unknown variables cannot start as an identity")
        return _UNKNOWN
    for role, i in roles.items():
        out[i] = with_steps(out[i], [("fill", {"value": values[role]})],
                            "preserve: inserted batch normalization starts as an identity")
    return incoming


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
                                       reason=f"preserve: '{layer.key}' reads as inserted before this layer, so the "
                                       "old tensor that names paired with it moves here (the only reading that "
                                       "keeps the function)",
                                       confidence=moved.confidence)
            out[here[role]] = replace(moved, source=None, status=MISSING,
                                      reason=f"preserve: inserted; the old tensor that names paired with it fits "
                                      f"'{following.key}' after it")


def _mapping(old: int, new: int, key: str) -> list[int]:
    from regraft.transforms import widen_mapping

    return [int(j) for j in widen_mapping(old, new, seed=_seed(key))]


def _seed(key: str) -> int:
    return zlib.crc32(key.encode())


def _describe(steps: list[tuple[str, dict[str, Any]]]) -> str:
    return " + ".join(f"{name}(axis {options['axis']})" if "axis" in options else name for name, options in steps)


def _explain(out: list[Assignment], indices: list[int], why: str) -> None:
    """Mark what could not be preserved: shape-mismatched and fresh variables keep their status."""
    for i in indices:
        a = out[i]
        if a.status in (SHAPE_MISMATCH, MISSING) and not a.not_preserved:
            reason = f"{a.reason}; could not preserve: {why}" if a.reason else f"could not preserve: {why}"
            out[i] = replace(a, reason=reason, not_preserved=why)
