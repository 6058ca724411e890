"""Optimizer state that follows its variables: slots get their variable's transform.

:func:`optimizer_assignments` turns a plan for a model into assignments for the
optimizer's variables, so that :func:`regraft.applying.apply` streams them with the
model's variables, all-or-nothing. For each trainable variable of the model:

* its slots (Keras 3 ``_momentums``, ``_velocities``, …; legacy tf.keras ``m``, ``v``,
  ``momentum``, ``rms``, …) take the checkpoint's slots of the weight it loaded from,
  through the *slot transform* of the weight's transform (below);
* a variable left fresh, inserted (``identity_init``, ``fill``), or loaded through a
  transform that has no slot counterpart (``resize``, ``adapt_channels``, a custom
  one) gets fresh slots: its optimizer's initial value (zeros; Adagrad's
  ``initial_accumulator_value``).

The step count (``iterations``) is carried, and so are the scalars a step reads
(:data:`SCALARS`: a ``LossScaleOptimizer``'s dynamic loss scale, Nadam's
``u_product``); the learning rate is not: the optimizer passed in keeps its own. A
``LossScaleOptimizer``'s slots and step count are its inner optimizer's.

Where the checkpoint's slots come from (:func:`saved_slots`): a TF checkpoint records
each slot's variable (``slot_of``); a ``.keras`` archive numbers them
(``optimizer/vars/N``), and they are placed by rebuilding the model and optimizer its
config describes, as Keras' own loader does, or refused with the reason.

Slot transforms for Net2Net widening
------------------------------------
Widening copies unit ``j`` of a producer into ``k_j`` units (``widen_out``) and divides
the consumer's rows of those units by ``k_j`` (``widen_in``), so the new network ``N'``
computes what the old one ``N`` did. At that point its gradients are:

* a consumer row: ``W'[j'] = W[j] / k_j`` multiplies ``h'_j' = h_j``, so
  ``dL/dW'[j'] = h_j * dL/dy = dL/dW[j]``: the gradient is *copied, not divided*;
* anything indexed by the producer's unit (kernel column, bias, a following
  BatchNormalization's gamma/beta): ``dL/dh'_j' = W'[j'] . dL/dy = (1/k_j) dL/dh_j``,
  so its gradient is the old one *divided by* ``k_j``.

A first moment (Adam ``m``, SGD and RMSprop momentum, RMSprop's centred mean) is a
linear sum of past gradients, so it gets the same map: ``widen_out`` (copy) where the
weight had ``widen_in``, ``widen_in`` (copy and divide by ``k_j``) where the weight had
``widen_out``. A second moment (Adam ``v``, RMSprop ``rms``, Adagrad's accumulator,
AMSGrad's ``v_hat``) sums squared gradients, so it is divided by ``k_j**2``
(``widen_in`` with ``power=2``). These are exact for the gradients at the loaded point;
for moments they are what the history would have been had the gradients scaled
that way all along. Adam's step ``m / (sqrt(v) + eps)`` is then unchanged for copies of
a producer unit (up to ``eps``). ``widen_in``'s ``noise`` is not applied to slots.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Iterable

from regraft.entries import BOOKKEEPING, OPTIMIZER_SLOT, SourceEntry, Stage, Status, TargetVariable
from regraft.errors import RegraftError
from regraft.naming import collapse, dtype_of
from regraft.plans import Assignment, Plan, status_for
from regraft.targets import _compat

__all__ = ["optimizer_assignments", "bind_optimizer", "saved_slots", "SavedSlots", "slot_steps", "SLOT_KINDS"]

# Keras 3 slot list -> (how it scales with the gradient, its fresh value). The power is 1 for
# a sum or running max of gradients, 2 for a sum of squares, 0 for a copy of the weight itself
# (the weights' moving average: it takes the weight's own transform), None when no scaling is
# known (copied only). The fresh value is zeros, an optimizer attribute's value, or None: left
# as the optimizer has it (a moving average starts as the weight, which regraft does not read).
SLOT_KINDS: dict[str, tuple[int | None, str | float | None]] = {
    "_momentums": (1, 0.0),
    "momentums": (1, 0.0),  # SGD
    "_average_gradients": (1, 0.0),  # centred RMSprop
    "_m": (1, 0.0),  # Adamax first moment
    "_u": (1, 0.0),  # Adamax: a running max of |g|, scales like g
    "_accumulated_gradients": (1, 0.0),  # gradient accumulation
    "_velocities": (2, 0.0),
    "_velocity_hats": (2, 0.0),
    "_accumulators": (2, "initial_accumulator_value"),  # Adagrad, Ftrl: sums of squared gradients
    "_accumulated_grads": (2, 0.0),  # Adadelta
    "_accumulated_delta_vars": (None, 0.0),
    "_linears": (None, 0.0),  # Ftrl: gradients minus a multiple of the weight
    "_model_variables_moving_average": (0, None),  # use_ema
    "_v": (2, 0.0),  # Adafactor: its second moment, of the variable's shape
    "adam_velocities": (2, 0.0),  # Muon: Adam's second moment for the variables it does not orthogonalise
    "_r": (None, 0.0),  # Adafactor's factored second moment: row means (shape[:-1]; a dummy scalar for 1-D)
    "_c": (None, 0.0),  # and column means (shape[:-2] + shape[-1:])
}
# Slots whose shape is not their variable's: copied only when the variable is loaded as saved.
FACTORED = {"_r", "_c"}
# Legacy tf.keras slot names (object-graph ``slot_variables``) -> the Keras 3 list holding the same moment.
LEGACY_SLOTS = {
    "m": "_momentums", "v": "_velocities", "vhat": "_velocity_hats", "momentum": "_momentums",
    "rms": "_velocities", "mg": "_average_gradients", "accumulator": "_accumulators",
    "accum_grad": "_accumulated_grads", "accum_var": "_accumulated_delta_vars", "linear": "_linears",
}
_PERMUTATIONS = {"identity", "cast", "linear_to_dense", "conv_oihw_to_hwio", "depthwise_oihw_to_hwcm", "slice"}
ITERATIONS = "optimizer/iterations"
# A LossScaleOptimizer's own state (its attributes since Keras 3.0): carried like the step count.
LOSS_SCALE = ("dynamic_scale", "step_counter")
# Optimizer state other than slots and the step count that its next step reads (by role: the name without "_").
SCALARS = (*LOSS_SCALE, "u_product")  # Nadam: the product of its momentum schedule


@dataclass(frozen=True)
class _Slot:
    list_name: str
    weight: str  # source key of the weight the slot belongs to


def slot_steps(steps: Iterable[tuple[str, dict[str, Any]]], list_name: str) -> tuple[tuple[str, dict[str, Any]], ...] | None:
    """The transform pipeline for a slot of kind ``list_name``, given its variable's ``steps``.

    ``None`` when the slot must start fresh (an inserted variable, or a transform with
    no slot counterpart).

    Example:
        >>> slot_steps([("widen_out", {"mapping": [0, 1, 0], "axis": -1})], "_velocities")
        (('widen_in', {'mapping': [0, 1, 0], 'axis': -1, 'power': 2}),)
        >>> slot_steps([("widen_in", {"mapping": [0, 1, 0], "axis": -2, "noise": 0.1})], "_momentums")
        (('widen_out', {'mapping': [0, 1, 0], 'axis': -2}),)
        >>> slot_steps([("widen_in", {"mapping": [0, 1, 0], "axis": -2})], "_r") is None  # Adafactor's row means
        True
    """
    power = SLOT_KINDS.get(list_name, (None, None))[0]
    if list_name in FACTORED:
        return () if all(name in ("identity", "cast") for name, _ in steps) else None
    if power == 0:
        return tuple((name, dict(options)) for name, options in steps)
    out: list[tuple[str, dict[str, Any]]] = []
    for name, options in steps:
        if name in _PERMUTATIONS:
            out.append((name, dict(options)))
        elif name == "pad":
            out.append((name, {**options, "value": 0.0}))
        elif name == "overlay":
            out.append((name, {**options, "value": 0.0}))  # fresh moments outside the old block
        elif name == "widen_in":
            out.append(("widen_out", {"mapping": options["mapping"], "axis": options.get("axis", -2)}))
        elif name == "widen_out":
            axis = options.get("axis", -1)
            if power is None:
                out.append(("widen_out", {"mapping": options["mapping"], "axis": axis}))
            else:
                out.append(("widen_in", {"mapping": options["mapping"], "axis": axis, "power": power}))
        else:  # identity_init, fill, resize, adapt_channels, custom: no slot counterpart
            return None
    return tuple(out)


@dataclass(frozen=True)
class SavedSlots:
    """The checkpoint's optimizer state, keyed for :func:`optimizer_assignments`.

    Attributes:
        slots: (source key of a weight, Keras 3 slot list) -> the checkpoint's slot entry.
        step: the step count's entry, if the checkpoint has one.
        refused: why the checkpoint's optimizer variables could not be given to their
            weights (``""``: nothing refused).
        scalars: other optimizer state carried like the step count, by name (:data:`SCALARS`).
    """

    slots: dict[tuple[str, str], SourceEntry]
    step: SourceEntry | None
    refused: str = ""
    scalars: dict[str, SourceEntry] = field(default_factory=dict)


def saved_slots(plan: Plan, config: dict[str, Any] | None = None) -> SavedSlots:
    """The checkpoint's slots by weight: from ``slot_of`` (TF checkpoints), or for Keras 3
    ``optimizer/vars/N`` (``.keras``, ``.weights.h5``) by position, when that is certain.

    Keras 3 saves an optimizer's variables as ``optimizer/vars/N`` in ``optimizer.variables``
    order and loads them back by position into the optimizer its loader builds: the one
    the archive's compile config names, built for ``model.trainable_variables`` of the
    model its config describes (``Trainer.compile_from_config``). regraft does the same
    (:func:`regraft.targets.file.compiled_from_config`, no weights read) and reads off,
    for each ``N``, the slot list and the trainable variable it belongs to, whose key in
    the archive is its ``.weights.h5`` key. It refuses (``refused``) unless every one of
    the archive's optimizer variables has the shape of the rebuilt optimizer's ``N``-th
    variable and is an integer where it is (widths may differ: the step count is int64
    on TensorFlow and int32 on JAX), and every rebuilt trainable variable is a weight of
    the archive with its shape. A ``.weights.h5`` records neither the optimizer's class nor the old
    model, so its numbered variables are refused.
    """
    numbered = sorted((e for e in plan.optimizer if e.layer == "optimizer" and e.index is not None
                       and e.key == f"optimizer/vars/{e.index}"), key=lambda e: e.index or 0)
    if not numbered:
        return SavedSlots(_source_slots(plan.optimizer), _step_entry(plan.optimizer), "", _scalar_entries(plan.optimizer))
    if plan.source_format != "keras-archive":
        return SavedSlots({}, None, f"{plan.source_path} numbers its optimizer variables (optimizer/vars/N) without "
                          "recording the optimizer's class or the model they were built for")
    try:
        return _numbered_slots(plan, numbered, config)
    except RegraftError as exc:
        return SavedSlots({}, None, exc.message.rstrip("."))


def _numbered_slots(plan: Plan, numbered: list[SourceEntry], config: dict[str, Any] | None) -> SavedSlots:
    from regraft.targets.file import compiled_from_config
    from regraft.targets.keras import describe

    model, optimizer = compiled_from_config(config, plan.source_path)
    rebuilt = list(optimizer.variables)
    kind = type(optimizer).__name__
    if len(rebuilt) != len(numbered) or [e.index for e in numbered] != list(range(len(numbered))):
        raise RegraftError(f"{plan.source_path} holds {len(numbered)} optimizer variables; the {kind} its config "
                           f"names, built for the model it describes, has {len(rebuilt)}")
    for e, v in zip(numbered, rebuilt):
        # Integer or float alike: the step count is int64 on TensorFlow, int32 on JAX (cast when loaded).
        if tuple(e.shape) != tuple(v.shape) or _is_integer(e.dtype) != _is_integer(v.dtype):
            raise RegraftError(f"{e.key} is {e.dtype} {list(e.shape)}; the {kind} its config names has "
                               f"{dtype_of(v.dtype)} {list(v.shape)} there ({v.path})")
    weights = {e.key: e for e in (*(a.source for a in plan.assignments if a.source is not None),
                                  *(e for e, _ in plan.unused), *(e for e, _ in plan.ignored))}
    keys = {id(t.variable): t.keys.get("h5") for t in describe(model, ("h5",))}
    holder = _compat.slot_holder(optimizer)
    variables, lists = _compat.optimizer_slot_lists(holder)
    for v in variables:
        entry = weights.get(keys.get(id(v)) or "")
        if entry is None or tuple(entry.shape) != tuple(v.shape):
            raise RegraftError(f"the model its config describes has trainable variable {v.path} "
                               f"({keys.get(id(v))}, {list(v.shape)}), which {plan.source_path} does not hold")
    position = {id(v): i for i, v in enumerate(rebuilt)}
    slots = {}
    for list_name, items in lists.items():
        for v, slot in zip(variables, items):
            if slot is not None and id(slot) in position:
                slots[(keys[id(v)], list_name)] = numbered[position[id(slot)]]
    step = position.get(id(_compat.step_variable(holder)))
    scalars = {name: numbered[position[id(v)]] for name, v in _scalar_variables(optimizer).items() if id(v) in position}
    return SavedSlots(slots, numbered[step] if step is not None else None, "", scalars)


def _scalar_variables(optimizer: Any) -> dict[str, Any]:
    """The optimizer's :data:`SCALARS` variables by name (a wrapper's and its inner optimizer's)."""
    holder = _compat.slot_holder(optimizer)
    return {**_compat.loss_scale_variables(optimizer),
            **{name.lstrip("_"): v for name, v in _compat.optimizer_scalars(holder).items()}}


def _scalar_entries(entries: Iterable[SourceEntry]) -> dict[str, SourceEntry]:
    """A TF checkpoint's :data:`SCALARS`: a loss scale's own, else an inner optimizer's first."""
    out: dict[str, SourceEntry] = {}
    for e in entries:
        if e.kind != BOOKKEEPING or e.role not in SCALARS:
            continue
        inner = "inner_optimizer" in e.key.split("/")
        if e.role in LOSS_SCALE and inner:
            continue
        if e.role not in out or inner:
            out[e.role] = e
    return out


def _step_entry(entries: Iterable[SourceEntry]) -> SourceEntry | None:
    """The step count of a TF checkpoint's optimizer: a wrapped optimizer's (``inner_optimizer``, which
    counts the steps of a ``LossScaleOptimizer``, whose own ``_iterations`` stays 0), else the first."""
    found = [e for e in entries if e.kind == BOOKKEEPING and e.role in ("iterations", "iter")]
    inner = [e for e in found if "inner_optimizer" in e.key.split("/")]
    return (inner or found or [None])[0]


def _is_integer(dtype: Any) -> bool:
    return dtype_of(str(dtype)).kind in "iub"


def optimizer_assignments(plan: Plan, optimizer: Any, trainable: Iterable[Any],
                          saved: SavedSlots | None = None) -> tuple[Assignment, ...]:
    """Assignments for ``optimizer``'s slots and step count, following ``plan``'s variables.

    Args:
        plan: the model's plan (its ``optimizer`` section lists the checkpoint's slots).
        optimizer: a Keras 3 optimizer; built for ``trainable`` here if it is not built.
        trainable: the model's trainable variables.
        saved: the checkpoint's slots by weight (:func:`saved_slots`; computed from ``plan``
            when not given).

    Raises:
        RegraftError: the optimizer was built for other variables.
    """
    slots, scalars = _slot_targets(plan, optimizer, trainable)
    saved = saved if saved is not None else saved_slots(plan)
    holder = _compat.slot_holder(optimizer)
    out = [_slot_assignment(a, target, saved, holder) for a, target in slots]
    step_target = scalars.pop("iterations")
    if saved.step is not None:
        e = saved.step
        out.append(Assignment(step_target, e, status_for(e, step_target), Stage.EXACT, "the optimizer's step count"))
    else:
        out.append(Assignment(step_target, None, Status.MISSING,
                              reason=saved.refused or "the checkpoint has no optimizer step count"))
    for name, target in scalars.items():  # a LossScaleOptimizer's dynamic loss scale, Nadam's u_product
        e = saved.scalars.get(name)
        what = f"loss scale ({name})" if name in LOSS_SCALE else name
        if e is not None:
            out.append(Assignment(target, e, status_for(e, target), Stage.EXACT, f"the optimizer's {what}"))
        else:
            reason = f"kept as built: the checkpoint's optimizer has no {what}"
            out.append(Assignment(target, None, Status.MISSING, Stage.NONE, reason, allowed=reason))
    return tuple(out)


def _slot_targets(plan: Plan, optimizer: Any, trainable: Iterable[Any]
                  ) -> tuple[list[tuple[Assignment, TargetVariable]], dict[str, TargetVariable]]:
    """(the model variable's assignment, a target per slot) for every slot of ``optimizer``, and the
    targets of its scalars (``iterations``; a ``LossScaleOptimizer``'s ``dynamic_scale`` and
    ``step_counter``). Builds an unbuilt optimizer for ``trainable``."""
    trainable = list(trainable)
    if not getattr(optimizer, "built", False):
        optimizer.build(trainable)
    holder = _compat.slot_holder(optimizer)
    variables, lists = _compat.optimizer_slot_lists(holder)
    index = {id(v): i for i, v in enumerate(variables)}
    if any(id(v) not in index for v in trainable):
        raise RegraftError(
            f"The optimizer '{optimizer.name}' was built for other variables than this model's.",
            hint="Pass a new optimizer (it is built for the model), or the one compiled with this model.",
        )
    out = []
    for a in plan.assignments:
        i = index.get(id(a.target.variable))
        if i is None:
            continue
        for list_name, items in lists.items():
            variable = items[i]
            if variable is None:  # a variable the optimizer overwrites with its gradient has no slots
                continue
            key = f"optimizer/{a.target.key}/{list_name.lstrip('_')}"
            out.append((a, TargetVariable(key, tuple(variable.shape), str(dtype_of(variable.dtype)), "optimizer", "",
                                          list_name, 0, False, variable=variable)))
    scalars = {"iterations": (ITERATIONS, _compat.step_variable(holder))}
    scalars.update({name: (f"optimizer/loss_scale/{name}" if name in LOSS_SCALE else f"optimizer/{name}", v)
                    for name, v in _scalar_variables(optimizer).items()})
    return out, {name: TargetVariable(key, tuple(v.shape), str(dtype_of(v.dtype)), "optimizer", "", name, 0, False,
                                      variable=v) for name, (key, v) in scalars.items()}


def bind_optimizer(plan: Plan, optimizer: Any, trainable: Iterable[Any]) -> Plan:
    """``plan`` (read from a plan file) with its optimizer assignments bound to ``optimizer``'s variables.

    Raises:
        RegraftError: the plan has no optimizer section, or ``optimizer`` has other slots
            (another class or options) or slots of other shapes or dtypes than the plan's.
    """
    if not plan.optimizer_assignments:
        raise RegraftError(
            "This plan has no optimizer section: it was made without an optimizer.",
            hint="Make the plan with regraft.plan(model, path, optimizer=opt) (CLI: regraft plan --optimizer).")
    slots, scalars = _slot_targets(plan, optimizer, trainable)
    live = {t.key: t for _, t in slots}
    live.update({t.key: t for t in scalars.values()})
    planned = [a.target.key for a in plan.optimizer_assignments]
    if set(planned) != set(live):
        other = sorted(set(planned) ^ set(live))
        raise RegraftError(
            f"This plan's optimizer slots are not those of the optimizer '{optimizer.name}' "
            f"({type(optimizer).__name__}): {', '.join(collapse(other))} "
            f"{'is' if len(other) == 1 else 'are'} in one and not the other.",
            hint="Pass an optimizer of the class and options the plan was made with, or make a new plan.")
    bound = []
    for a in plan.optimizer_assignments:
        target = live[a.target.key]
        if (tuple(target.shape), target.dtype) != (tuple(a.target.shape), a.target.dtype):
            raise RegraftError(
                f"This plan's optimizer slot '{a.target.key}' is {a.target.dtype} {list(a.target.shape)}; the "
                f"optimizer '{optimizer.name}' has {target.dtype} {list(target.shape)} there.",
                hint="Pass an optimizer of the class and options the plan was made with, or make a new plan.")
        bound.append(replace(a, target=target))
    return replace(plan, optimizer_assignments=tuple(bound))


def _slot_assignment(a: Assignment, target: TargetVariable, saved: SavedSlots, optimizer: Any) -> Assignment:
    list_name = target.role
    entry = saved.slots.get((a.source.key, list_name)) if a.source is not None and a.writes else None
    if entry is not None:
        steps = slot_steps(a.steps, list_name) if a.steps else ()
        if steps is not None:
            if not steps:
                return Assignment(target, entry, status_for(entry, target), a.stage, f"slot of {a.source.key}")
            return Assignment(target, entry, Status.TRANSFORMED, a.stage, f"slot of {a.source.key}, as its variable",
                              steps=steps)
    reason = f"fresh: {saved.refused}" if saved.refused and a.writes and a.source is not None else \
        _fresh_reason(a, entry is None)
    if list_name in FACTORED and entry is not None and a.steps:
        reason = (f"fresh: a factored slot ({list_name}, shape {list(target.shape)}, not its variable's) has no "
                  f"counterpart of {a.transform}")
    # Fresh slots of a fresh variable, or behind a transform with no slot counterpart, are expected
    # (``allowed``); a loaded variable whose slot the checkpoint lacks is a strict problem.
    allowed = None if a.writes and a.source is not None and entry is None else reason
    fresh = SLOT_KINDS.get(list_name, (None, 0.0))[1]
    if fresh is None:
        return Assignment(target, None, Status.MISSING, Stage.NONE, reason.replace("fresh:", "kept as built:", 1),
                          allowed=allowed)
    value = float(getattr(optimizer, fresh)) if isinstance(fresh, str) else fresh
    return Assignment(target, None, Status.TRANSFORMED, Stage.NONE, reason, allowed=allowed,
                      steps=(("fill", {"value": value}),))


def _fresh_reason(a: Assignment, no_slot: bool) -> str:
    if not a.writes:
        return "fresh: its variable is not loaded"
    if a.source is None:
        return f"fresh: its variable is set by {a.transform}"
    if no_slot:
        return f"fresh: the checkpoint has no such slot for {a.source.key}"
    return f"fresh: {a.transform} has no slot counterpart"


def _source_slots(entries: Iterable[SourceEntry]) -> dict[tuple[str, str], SourceEntry]:
    """(weight source key, Keras 3 slot list) -> the checkpoint's slot entry."""
    out: dict[tuple[str, str], SourceEntry] = {}
    for e in entries:
        if e.kind != OPTIMIZER_SLOT or e.slot_of is None:
            continue
        name = _slot_list(e)
        if name is not None:
            out.setdefault((e.slot_of, name), e)
    return out


def _slot_list(e: SourceEntry) -> str | None:
    for key in (e.key, *e.aliases):
        parts = key.split("/")
        for part in reversed(parts[:-1]):
            if part in SLOT_KINDS:
                return part
        if parts[-1] in LEGACY_SLOTS:
            return LEGACY_SLOTS[parts[-1]]
    return None


def with_optimizer(plan: Plan, optimizer: Any, trainable: Iterable[Any], config: dict[str, Any] | None = None) -> Plan:
    """``plan`` with :func:`optimizer_assignments` as its ``optimizer_assignments`` (``config``: a
    ``.keras`` archive's ``config.json``, for its numbered optimizer variables)."""
    saved = saved_slots(plan, config)
    return replace(plan, optimizer_assignments=optimizer_assignments(plan, optimizer, trainable, saved),
                   optimizer_refused=saved.refused)
