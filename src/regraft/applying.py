"""Apply a plan: stream tensors into the model, all-or-nothing; freeze what was loaded.

How all-or-nothing is guaranteed
--------------------------------
Everything that can be checked from metadata (keys, shapes, dtypes, strictness)
is checked before the first assignment. Tensors are then streamed one at a time:
read (checksum verified by the reader), converted, checked (a cast that would
overflow is refused), and only then assigned. Just before a variable is assigned,
its current value is appended to an *undo journal* — an unnamed temporary file on
disk, not memory — so that the model never has two copies in RAM. If anything
fails after the first assignment (a corrupt tensor met halfway, a refused cast,
an interrupt), every variable already assigned is restored from the journal, bit
for bit, and the original error is raised. Peak memory stays near the model plus
two tensors (the one read and the old value being journaled).
"""

from __future__ import annotations

import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from regraft.entries import TargetVariable
from regraft.errors import CorruptCheckpointError, LoadError, RegraftError
from regraft.growth import run_steps, steps_need_fresh
from regraft.naming import dtype_of
from regraft.plans import CAST, LOADED, TRANSFORMED, Assignment, Plan, fingerprint_source, fingerprint_target
from regraft.report import AppliedTensor, LoadReport
from regraft.sources import open_source
from regraft.sources.base import Source
from regraft.targets import Target, target_for
from regraft.transforms import cast_array

__all__ = ["apply", "apply_plan", "convert", "freeze_loaded", "Progress"]

Progress = Callable[[int, int, str], None]


def apply(plan: Plan, model: Any, source: Source | None = None, *, freeze: bool = False,
          progress: Progress | None = None) -> LoadReport:
    """Load the checkpoint into ``model`` exactly as ``plan`` says (all-or-nothing).

    ``model`` must be the model the plan was made for, or one built the same way
    (same variable keys, shapes and dtypes): the plan is then bound to its
    variables. ``source`` is the checkpoint already open (it must be the one the
    plan was made from); by default it is opened from the plan's path and
    checked against the plan's fingerprint.

    Raises:
        RegraftError: the model or the checkpoint no longer fits the plan, or the
            load failed (the model is then unchanged).

    Example:
        >>> report = regraft.apply(regraft.read_plan("plan.yaml", model), model)   # doctest: +SKIP
    """
    target = target_for(model)
    plan = _bind(plan, target)
    if source is not None:
        return _apply(plan, source, target, freeze, progress)
    with open_source(plan.source_path) as opened:
        if fingerprint_source(opened.entries()) != plan.source_fingerprint:
            raise RegraftError(
                f"The checkpoint {plan.source_path} has changed since this plan was made "
                "(its keys, shapes or dtypes differ).",
                hint="Make a new plan against the checkpoint as it is now.",
            )
        return _apply(plan, opened, target, freeze, progress)


def _apply(plan: Plan, source: Source, target: Target, freeze: bool, progress: Progress | None) -> LoadReport:
    applied = apply_plan(plan, source, target, progress)
    frozen = freeze_loaded(plan, target) if freeze else []
    return LoadReport.build(plan, applied, frozen)


def _bind(plan: Plan, target: Target) -> Plan:
    """The plan with its targets bound to this model's variables (another object built the same way)."""
    from dataclasses import replace

    if [id(v) for v in target.variables()] == [id(a.target.variable) for a in plan.assignments]:
        return plan
    targets = target.describe(())[0]
    if fingerprint_target(targets) != plan.target_fingerprint:
        raise RegraftError(
            f"This plan was made for another model than '{target.name}' (its variable keys, shapes or dtypes differ).",
            hint="Make a new plan for this model (regraft.plan / regraft plan).",
        )
    by_key = {t.key: t for t in targets}
    return replace(plan, assignments=tuple(replace(a, target=by_key[a.target.key]) for a in plan.assignments))


def convert(value: np.ndarray, target: TargetVariable, source_key: str) -> tuple[np.ndarray, float | None]:
    """Convert a source tensor to the target's dtype, refusing lossy overflow.

    :func:`regraft.transforms.cast_array` with the variable's dtype and key.
    Returns the converted array and, for a cast, the largest absolute rounding error.

    Raises:
        LoadError: the cast would turn finite values into inf, or integers out of range.
    """
    return cast_array(value, target.dtype, source_key, target_key=target.key)


def apply_plan(plan: Plan, source: Source, target: Target, progress: Progress | None = None) -> dict[str, AppliedTensor]:
    """Write every ``loaded``/``cast`` assignment of ``plan`` into the model, all-or-nothing.

    Args:
        plan: a plan whose strict checks have already passed.
        source: the opened checkpoint the plan was made from.
        target: the model the plan is bound to.
        progress: called as ``progress(done, total, key)`` after each tensor.

    Returns:
        What was done per written target key.

    Raises:
        RegraftError: anything that stopped the load; the model is then unchanged.
    """
    writes = [a for a in plan.assignments if a.writes]
    done: dict[str, AppliedTensor] = {}
    # Reading the next tensor (I/O and checksum, outside the GIL) overlaps with
    # journaling and assigning the current one; at most one read is ahead.
    with tempfile.TemporaryFile(prefix="regraft-undo-", buffering=0) as journal, ThreadPoolExecutor(1) as reader:
        undo: list[tuple[Assignment, int, tuple[int, ...], np.dtype]] = []
        ahead: Future | None = reader.submit(_fetch, writes[0], source, plan, target) if writes else None
        try:
            for i, a in enumerate(writes):
                assert ahead is not None
                value, error = ahead.result()
                ahead = reader.submit(_fetch, writes[i + 1], source, plan, target) if i + 1 < len(writes) else None
                old = target.read(a.target)
                undo.append((a, journal.tell(), old.shape, old.dtype))
                journal.write(_bytes_of(old))
                del old
                target.assign(a.target, value)
                done[a.target.key] = AppliedTensor(a.target.key, error)
                del value
                if progress is not None:
                    progress(i + 1, len(writes), a.target.key)
        except BaseException:
            if ahead is not None:
                ahead.cancel()
            _roll_back(journal, undo, target)
            raise
    return done


def _fetch(a: Assignment, source: Source, plan: Plan, target: Target) -> tuple[Any, float | None]:
    """Read (and for a cast, convert) the tensor an assignment needs; checks its shape.

    Uncast tensors of a TF checkpoint are read by TensorFlow straight into a
    tensor the variable can adopt without a copy; everything else goes through
    regraft's reader and numpy.
    """
    entry = a.source
    if a.status == TRANSFORMED:
        return _transformed(a, source, target)
    if entry is None:  # loaded and cast assignments always have a source
        raise LoadError(f"Variable '{a.target.key}' has no source to load.")
    location = source.native_location(entry.key) if a.status != CAST else None
    value, error = None, None
    if location is not None:
        try:
            value = target.read_native(*location, a.target.dtype)  # None: the backend has no reader
        except Exception as exc:
            source.read(entry.key)  # regraft's reader says precisely what is wrong, if it can tell
            raise CorruptCheckpointError(
                f"TensorFlow could not read tensor '{entry.key}' from {plan.source_path}: {exc}",
                hint="The checkpoint is damaged; save it again or restore it from a backup.",
            ) from None
    if value is None:
        value = source.read(entry.key)
        value, error = convert(value, a.target, entry.key) if a.status == CAST else (value, None)
    if tuple(value.shape) != tuple(a.target.shape):
        raise LoadError(
            f"Tensor '{entry.key}' in {plan.source_path} has shape {tuple(value.shape)} on disk, "
            f"but its index says {entry.shape}.",
            hint="The checkpoint is inconsistent; save it again.",
        )
    return value, error


def _transformed(a: Assignment, source: Source, target: Target) -> tuple[np.ndarray, float | None]:
    """Read the source (if any), run the transform pipeline, cast to the variable's dtype."""
    value = source.read(a.source.key) if a.source is not None else None
    fresh = target.read(a.target) if steps_need_fresh(a.steps) else None
    value = run_steps(a.steps, value, fresh, a.target.shape, a.target.key)
    if value.dtype != dtype_of(a.target.dtype):
        return convert(value, a.target, a.source.key if a.source else a.target.key)
    return value, None


def _roll_back(journal: Any, undo: list[tuple[Assignment, int, tuple[int, ...], np.dtype]], target: Target) -> None:
    """Restore every variable already assigned, last first, from the undo journal."""
    for a, offset, shape, dtype in reversed(undo):
        journal.seek(offset)
        old = np.empty(shape, dtype)
        if old.nbytes:
            journal.readinto(_bytes_of(old))
        target.assign(a.target, old)


def _bytes_of(array: np.ndarray) -> memoryview:
    """A writable byte view of a C-contiguous array (works for bfloat16 too)."""
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8).data


def freeze_loaded(plan: Plan, target: Target) -> list[str]:
    """Set ``trainable=False`` on every layer whose own variables were all loaded unchanged.

    Returns the frozen layers' paths. Layers with any variable cast, mismatched or
    missing stay trainable.
    """
    by_layer: dict[int, list[Assignment]] = {}
    for a in plan.assignments:
        layer = a.target.layer_object
        if layer is not None:
            by_layer.setdefault(id(layer), []).append(a)
    frozen = []
    for assignments in by_layer.values():
        if all(a.status == LOADED for a in assignments):
            target.freeze(assignments[0].target)
            frozen.append(assignments[0].target.layer)
    return frozen

