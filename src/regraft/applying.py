"""Apply a plan: check every tensor, then assign them all; freeze what was loaded.

How all-or-nothing is guaranteed, cheaply
-----------------------------------------
Everything that can be checked from metadata (keys, shapes, dtypes, strictness)
is checked before any tensor is read. Then two passes:

1. **Check.** Every tensor the plan writes is read and checked as it will be
   assigned: its checksum (a TF bundle is checksummed in place, memory-mapped,
   at the speed of CRC32C), its shape, and for a cast or transform the
   conversion itself (a cast that would overflow is refused). Nothing is
   assigned and nothing is kept: memory holds the model plus one tensor. A
   corrupt tensor, a refused cast, an exception or interrupt (the progress
   callback runs here) stops the load with the model untouched.
2. **Commit.** The same tensors are read again (from the page cache) and
   assigned, one at a time, each read straight into the memory of the
   variable's next value (:meth:`Target.assign_filled`). Data can no longer
   fail here; from the first assignment until ``load``/``apply`` returns,
   Ctrl-C is held back (:class:`interrupts_held`), so a load either stops in
   the check with nothing changed or finishes and returns.

What can still fail in the commit is the environment: the checkpoint's files
changing, an I/O error, memory running out. The files' identity (device,
inode, size, mtime_ns) is recorded before the check pass: a change by the end
of the check is refused with nothing assigned; a change or failure during the
commit raises a :class:`~regraft.errors.LoadError` that says the model is partly
loaded, lists what was assigned and how to recover. There is no undo: keeping
the old values costs the model's size in memory or a journal slower than the
load itself (``bench/bench_apply.py``; docs/design.md, "All-or-nothing").
"""

from __future__ import annotations

import math
import os
import signal
import threading
import warnings
from dataclasses import replace
from typing import Any, Callable

import numpy as np

from regraft.entries import TargetVariable
from regraft.errors import LoadError, RegraftError
from regraft.growth import run_steps, steps_need_fresh
from regraft.naming import dtype_of
from regraft.plans import CAST, LOADED, TRANSFORMED, Assignment, Plan, fingerprint_source, fingerprint_target
from regraft.report import AppliedTensor, LoadReport, ShardedRead
from regraft.sources import open_source
from regraft.sources.base import Source
from regraft.targets import Target, target_for
from regraft.transforms import axis_permutation, cast_array

__all__ = ["apply", "apply_plan", "convert", "freeze_loaded", "hold_interrupts", "interrupts_held", "Progress"]

Progress = Callable[[int, int, str], None]


def apply(plan: Plan, model: Any, source: Source | None = None, *, freeze: bool = False,
          progress: Progress | None = None, full_checksums: bool = False, optimizer: Any = None) -> LoadReport:
    """Load the checkpoint into ``model`` exactly as ``plan`` says (all-or-nothing).

    ``model`` must be the model the plan was made for, or one built the same way
    (same variable keys, shapes and dtypes): the plan is then bound to its
    variables. ``source`` is the checkpoint already open (it must be the one the
    plan was made from); by default it is opened from the plan's path and
    checked against the plan's fingerprint. ``optimizer``: the optimizer to load
    the plan's optimizer section into (a plan made with ``optimizer=``, read from
    a file), bound to its slots like the model's variables; it is built for the
    model's trainable variables if it is not built.

    A variable laid out over several devices (Keras 3 on JAX with
    ``keras.distribution``) is read block by block: each device's block of the
    checkpoint tensor, once per distinct block (see :func:`_sharded_blocks`). A
    TF bundle or ``.npz`` checksums whole tensors, so block reads are not
    checksummed (the report says so per variable) unless ``full_checksums=True``,
    which checksums each such tensor whole in the check pass.

    Raises:
        RegraftError: the model or the checkpoint no longer fits the plan, or the
            load failed (the model is then unchanged).

    Example:
        >>> report = regraft.apply(regraft.read_plan("plan.yaml", model), model)   # doctest: +SKIP
    """
    with interrupts_held():  # ends after the source is closed: nothing runs after it
        return _apply_opened(plan, model, source, freeze, progress, full_checksums, optimizer)


def _apply_opened(plan: Plan, model: Any, source: Source | None, freeze: bool, progress: Progress | None,
                  full_checksums: bool = False, optimizer: Any = None) -> LoadReport:
    target = target_for(model)
    plan = _bind(plan, target)
    if optimizer is not None:
        from regraft.optimizer_state import bind_optimizer

        plan = bind_optimizer(plan, optimizer, model.trainable_variables)
    elif any(a.target.variable is None for a in plan.optimizer_assignments):
        raise RegraftError(
            "This plan has an optimizer section (made with optimizer=): pass the optimizer to load it into.",
            hint="regraft.apply(plan, model, optimizer=opt) (CLI: regraft apply --optimizer), or delete the plan "
            "file's 'optimizer' section to load the model's variables only.")
    if source is not None:
        return _apply(plan, source, target, freeze, progress, full_checksums)
    with open_source(plan.source_path) as opened:
        if fingerprint_source(opened.entries()) != plan.source_fingerprint:
            raise RegraftError(
                f"The checkpoint {plan.source_path} has changed since this plan was made "
                "(its keys, shapes or dtypes differ).",
                hint="Make a new plan against the checkpoint as it is now.",
            )
        return _apply(plan, opened, target, freeze, progress, full_checksums)


def _apply(plan: Plan, source: Source, target: Target, freeze: bool, progress: Progress | None,
           full_checksums: bool = False) -> LoadReport:
    with interrupts_held():
        done = apply_plan(plan, source, target, progress, full_checksums=full_checksums)
        frozen = freeze_loaded(plan, target) if freeze else []
        report = LoadReport.build(plan, done, frozen)
    return report


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


def apply_plan(plan: Plan, source: Source, target: Target, progress: Progress | None = None, *,
               full_checksums: bool = False) -> dict[str, AppliedTensor]:
    """Write every ``loaded``/``cast``/``transformed`` assignment of ``plan`` into the model, all-or-nothing.

    Args:
        plan: a plan whose strict checks have already passed.
        source: the opened checkpoint the plan was made from.
        target: the model the plan is bound to.
        progress: called as ``progress(done, total, key)`` after each tensor is
            checked; if it raises, nothing has been assigned. If it also has an
            ``assigned(done, total, key)`` method, that is called after each
            assignment of the commit pass; what it raises there is ignored (a
            display must not stop a load half-way), and it is not called again.
        full_checksums: also checksum whole every TF-bundle or ``.npz`` tensor of a
            variable read block by block (see :func:`apply`).

    Returns:
        What was done per written target key.

    Raises:
        RegraftError: anything that stopped the load; the model is then unchanged,
            except after an environment failure in the commit pass, which the
            error's message states.
    """
    with interrupts_held():
        writes = _writes(plan)
        layouts = _layouts(writes, target)
        identity = file_identity(getattr(source, "files", ()))  # before any tensor is read
        done = _check_agreed(writes, source, plan, target, progress, layouts, identity, full_checksums)
        hold_interrupts()  # from the first assignment on, the load finishes
        _commit(writes, source, plan, target, identity, getattr(progress, "assigned", None), layouts)
    return done


def _writes(plan: Plan) -> list[Assignment]:
    return [a for a in (*plan.assignments, *plan.optimizer_assignments) if a.writes]


def _layouts(writes: list[Assignment], target: Target) -> dict[str, list[tuple[slice, ...]]]:
    """The per-device blocks of every written variable laid out over several devices."""
    layouts = {}
    for a in writes:
        indices = target.shards(a.target)
        if indices is not None:
            layouts[a.target.key] = indices
    return layouts


def _check_agreed(
    writes: list[Assignment], source: Source, plan: Plan, target: Target, progress: Progress | None,
    layouts: dict[str, list[tuple[slice, ...]]], identity: "FileIdentity", full_checksums: bool = False,
) -> dict[str, AppliedTensor]:
    """:func:`_check_all`, then the files' identity (:func:`_refuse_changed`); for a sharded model, then
    every process's verdict (a model spanning several processes changes on all of them or on none:
    each process reads and checks only its own blocks, so one that failed tells the others, which
    then refuse too)."""
    if not layouts:
        done = _check_all(writes, source, plan, target, progress)
        _refuse_changed(identity, plan)  # the last moment the model can still be left unchanged
        return done
    try:
        done = _check_all(writes, source, plan, target, progress, layouts, full_checksums)
        _refuse_changed(identity, plan)
    except BaseException:
        target.all_passed(False)
        raise
    if not target.all_passed(True):
        raise LoadError(
            f"Loading {plan.source_path} was refused: another process of this model failed its checks "
            "(its error says why). Nothing was assigned here either.",
            hint="Read the error of the process that failed; fix that and load again on every process.",
        )
    return done


def _check_all(
    writes: list[Assignment], source: Source, plan: Plan, target: Target, progress: Progress | None,
    layouts: dict[str, list[tuple[slice, ...]]] | None = None, full_checksums: bool = False,
) -> dict[str, AppliedTensor]:
    """Pass 1 over every write; the progress callback runs here, where stopping changes nothing."""
    done: dict[str, AppliedTensor] = {}
    layouts = layouts or {}
    for i, a in enumerate(writes):
        if a.target.key in layouts:
            if full_checksums and a.source is not None and source.slices_skip_checksum:
                source.verify(a.source.key)
            _, error, read = _sharded_blocks(a, layouts[a.target.key], source, plan, target)
            if full_checksums and read.checksum:
                read = replace(read, checksum="verified whole")
            done[a.target.key] = AppliedTensor(a.target.key, error, read)
        else:
            done[a.target.key] = AppliedTensor(a.target.key, _check(a, source, plan, target))
        if progress is not None:
            progress(i + 1, len(writes), a.target.key)
    return done


def _check(a: Assignment, source: Source, plan: Plan, target: Target) -> float | None:
    """Pass 1: read and check what ``a`` will assign, keep nothing; return the cast's rounding error."""
    if a.status == LOADED and a.source is not None:
        _check_shape(a, a.source.shape, plan)
        source.verify(a.source.key)
        return None
    value, error = _value(a, source, plan, target)
    _check_shape(a, value.shape, plan)
    return error


def _commit(
    writes: list[Assignment], source: Source, plan: Plan, target: Target, identity: FileIdentity,
    assigned_progress: Progress | None, layouts: dict[str, list[tuple[slice, ...]]] | None = None,
) -> None:
    """Pass 2: read every checked tensor again and assign it (callers hold back interrupts).

    Raises:
        LoadError: the environment failed or the files changed meanwhile; the message
            says which variables were assigned and how to recover.
    """
    assigned: list[Assignment] = []
    layouts = layouts or {}
    try:
        for a in writes:
            if a.target.key in layouts:
                blocks, _, _ = _sharded_blocks(a, layouts[a.target.key], source, plan, target)
                target.assign_shards(a.target, blocks)
                del blocks
            else:
                _assign(a, source, plan, target)
            assigned.append(a)
            if assigned_progress is not None:
                try:
                    assigned_progress(len(assigned), len(writes), a.target.key)
                except Exception:  # a display failing: the load goes on without it
                    assigned_progress = None
    except Exception as exc:
        raise _partly_loaded(plan, writes, assigned, changed_files(identity), _reason(exc)) from exc
    changed = changed_files(identity)
    if changed:  # every variable was assigned, but maybe from the bytes of another file
        raise _partly_loaded(plan, writes, assigned, changed, None)


def _assign(a: Assignment, source: Source, plan: Plan, target: Target) -> None:
    """Read what ``a`` writes and assign it.

    A plain load is read by regraft's reader straight into the variable's next
    buffer (:meth:`Target.assign_filled`): one copy from the file, no array beside
    it. The check pass verified the bytes and the files are unchanged since
    (compared just before the commit, and again after it), so the reader may skip
    its checksum (``checked=True``). ``bench/bench_apply.py`` compares this with
    TensorFlow's ``RestoreV2`` per tensor, which is slower.
    """
    if a.status == LOADED and a.source is not None:
        entry = a.source
        _check_shape(a, entry.shape, plan)
        target.assign_filled(a.target, lambda out: source.read_into(entry.key, out, checked=True))
        return
    value, _ = _value(a, source, plan, target)
    _check_shape(a, tuple(value.shape), plan)
    target.assign(a.target, value)


# --------------------------------------------------------------------------- what can fail after the check

FileIdentity = dict[str, "tuple[int, int, int, int] | None"]


def file_identity(files: tuple[str, ...] | list[str]) -> FileIdentity:
    """Each file's ``(device, inode, size, mtime_ns)``, or ``None`` if it cannot be stat'ed.

    Two snapshots differ when a file was rewritten, replaced or removed in between.
    """
    out: FileIdentity = {}
    for path in files:
        try:
            st = os.stat(path)
        except OSError:
            out[path] = None
        else:
            out[path] = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    return out


def changed_files(before: FileIdentity) -> list[str]:
    """What changed in the files of ``before`` since it was taken, one phrase per file."""
    now = file_identity(tuple(before))
    out = []
    for path, old in before.items():
        new = now[path]
        if new == old:
            continue
        if new is None:
            out.append(f"{path} was removed")
        elif old is None:
            out.append(f"{path} appeared")
        elif new[:2] != old[:2]:
            out.append(f"{path} was replaced by another file")
        elif new[2] != old[2]:
            out.append(f"{path} changed size from {old[2]:,} to {new[2]:,} bytes")
        else:
            out.append(f"{path} was rewritten (modification time changed)")
    return out


def _refuse_changed(identity: FileIdentity, plan: Plan) -> None:
    changed = changed_files(identity)
    if changed:
        raise LoadError(
            f"The checkpoint {plan.source_path} changed on disk while its tensors were being checked: "
            f"{'; '.join(changed)}. Nothing was assigned: the model is unchanged.",
            hint="Load again once nothing writes to the checkpoint.",
        )


def _partly_loaded(
    plan: Plan, writes: list[Assignment], assigned: list[Assignment], changed: list[str], error: str | None
) -> LoadError:
    """The error for a commit the environment broke: which variables were assigned, and how to recover."""
    if error is None:
        what = f"Every variable was assigned from {plan.source_path}, but it changed on disk during the load"
    else:
        what = (f"Loading {plan.source_path} stopped after {len(assigned)} of {len(writes)} variables were "
                f"assigned, although every tensor had passed its checks ({error})")
    if changed:
        what += f": {'; '.join(changed)}"
    cause = "Load again once nothing writes to the checkpoint" if changed else "Load again once the disk or device works"
    if not assigned:
        return LoadError(f"{what}. Nothing was assigned: the model is unchanged.", hint=f"{cause}.")
    left = [a.target.key for a in writes[len(assigned):]]
    state = f"assigned {_listing([a.target.key for a in assigned])}"
    state += f"; not assigned {_listing(left)}" if left else ""
    fresh_read = [a.target.key for a in assigned if a.status == TRANSFORMED and steps_need_fresh(a.steps)]
    if fresh_read:
        hint = (f"{cause}, into a rebuilt model: {_listing(fresh_read)} already hold values transformed from their "
                "fresh ones, so a second load into this model would not give the same result.")
    else:
        hint = (f"{cause}: it overwrites every variable the plan writes, so this model then ends up as if "
                "loaded once.")
    return LoadError(f"{what}. The model is now partly loaded ({state}).", hint=hint)


def _listing(keys: list[str], most: int = 4) -> str:
    shown = ", ".join(f"'{k}'" for k in keys[:most])
    return shown if len(keys) <= most else f"{shown} and {len(keys) - most} more"


class interrupts_held:
    """A scope in which Ctrl-C (SIGINT) stops a load only before its first assignment.

    :func:`hold_interrupts`, called when the commit pass starts, replaces
    Python's ``KeyboardInterrupt`` by a note; leaving the outermost scope puts
    the previous handler back and warns if an interrupt was held back. Leaving
    is the last thing the public function does, so no interrupt can surface
    inside regraft once the model has changed. Only the main thread receives
    signals; elsewhere the scope does nothing.

    Example:
        >>> with interrupts_held():      # doctest: +SKIP
        ...     report = apply(plan, model)
    """

    _scopes = threading.local()  # the outermost scope of each thread

    def __init__(self) -> None:
        self.received: list[int] = []
        self._previous: Any = None
        self._held = False
        self._outermost = False

    def __enter__(self) -> "interrupts_held":
        if getattr(interrupts_held._scopes, "active", None) is None:
            interrupts_held._scopes.active = self
            self._outermost = True
        return interrupts_held._scopes.active

    def hold(self) -> None:
        if self._held or threading.current_thread() is not threading.main_thread():
            return
        previous = signal.getsignal(signal.SIGINT)
        if callable(previous):  # SIG_IGN / SIG_DFL raise nothing in Python
            self._previous, self._held = previous, True  # first: an interrupt may land in the next call
            signal.signal(signal.SIGINT, lambda signum, frame: self.received.append(signum))

    def __exit__(self, *exc: object) -> None:
        if not self._outermost:
            return
        interrupts_held._scopes.active = None
        if not self._held:
            return
        self._held = False
        try:
            signal.signal(signal.SIGINT, self._previous)
            if self.received:
                warnings.warn(
                    "regraft: interrupt received while the checked tensors were being assigned; the load "
                    "was finished rather than left half-done.",
                    RuntimeWarning,
                    stacklevel=3,
                )
        except KeyboardInterrupt:  # arrived as the handler came back: the load has finished, it returns
            pass


def hold_interrupts() -> None:
    """From now until the current :class:`interrupts_held` scope ends, Ctrl-C is noted, not raised."""
    active = getattr(interrupts_held._scopes, "active", None)
    if active is not None:
        active.hold()


def _check_shape(a: Assignment, shape: tuple[int, ...], plan: Plan, expected: tuple[int, ...] | None = None) -> None:
    if tuple(shape) != tuple(a.target.shape if expected is None else expected):
        key = a.source.key if a.source else a.target.key
        raise LoadError(
            f"Tensor '{key}' in {plan.source_path} has shape {tuple(shape)} on disk, "
            f"but its index says {a.source.shape if a.source else a.target.shape}.",
            hint="The checkpoint is inconsistent; save it again.",
        )


def _value(a: Assignment, source: Source, plan: Plan, target: Target) -> tuple[Any, float | None]:
    """The value ``a`` assigns, read through regraft's reader."""
    if a.status == TRANSFORMED:
        return _transformed(a, source, target)
    entry = a.source
    if entry is None:  # loaded and cast assignments always have a source
        raise LoadError(f"Variable '{a.target.key}' has no source to load.")
    if a.status == CAST:
        return convert(source.read(entry.key), a.target, entry.key)
    _check_shape(a, entry.shape, plan)
    return source.read(entry.key), None


def _transformed(a: Assignment, source: Source, target: Target) -> tuple[np.ndarray, float | None]:
    """Read the source (if any), run the transform pipeline, cast to the variable's dtype."""
    value = source.read(a.source.key) if a.source is not None else None
    fresh = target.read(a.target) if steps_need_fresh(a.steps) else None
    value = run_steps(a.steps, value, fresh, a.target.shape, a.target.key)
    if value.dtype != dtype_of(a.target.dtype):
        return convert(value, a.target, a.source.key if a.source else a.target.key)
    return value, None


# --------------------------------------------------------------------------- sharded variables

Block = tuple[slice, ...]


def _sharded_blocks(
    a: Assignment, indices: list[Block], source: Source, plan: Plan, target: Target
) -> tuple[list[np.ndarray], float | None, ShardedRead]:
    """The value of each device's block of ``a``'s variable, how it was read, and the cast's largest error.

    Each distinct block is read once (replicas share the array). A plain load or a
    cast reads the block alone (:meth:`Source.read_slice`) and casts it (overflow
    checked per block); a one-step ``pad`` or axis permutation (the PyTorch layouts
    ``linear_to_dense``, ``conv_oihw_to_hwio``) reads the part of the source the block maps to. Any other transform reads the whole tensor, runs
    the pipeline, and cuts the blocks on the host: ``read_whole`` says so.
    """
    distinct = list(dict.fromkeys(_bounds(i) for i in indices))
    source_item = dtype_of(a.source.dtype).itemsize if a.source is not None else 0
    whole_bytes = _nbytes(a.source) if a.source is not None else 0
    if not indices:  # this process addresses none of its devices: nothing to read here
        return [], None, ShardedRead(0, 0, (), 0, whole_bytes)
    shard_bytes = max(math.prod(stop - start for start, stop in box) for box in distinct) * source_item
    checksum = "not verified: read as slices" if a.source is not None and source.slices_skip_checksum else ""
    mapper = _block_mapper(a)
    values: dict[tuple[tuple[int, int], ...], np.ndarray] = {}
    errors: list[float] = []
    if mapper is not None:
        touched = []
        for box in distinct:
            before = source.sliced_bytes_read
            value = mapper(box, source)
            touched.append(source.sliced_bytes_read - before)
            value, error = convert(value, a.target, a.source.key) if value.dtype != dtype_of(a.target.dtype) else (
                value, None)
            _check_shape(a, value.shape, plan, tuple(stop - start for start, stop in box))
            values[box] = value
            if error is not None:
                errors.append(error)
        read = ShardedRead(len(indices), len(distinct), tuple(touched), shard_bytes, whole_bytes, None, checksum)
    else:
        whole, error = _transformed(a, source, target)
        _check_shape(a, whole.shape, plan)
        for box in distinct:
            values[box] = np.array(whole[tuple(slice(*b) for b in box)], copy=True, order="C")
        del whole
        if error is not None:
            errors.append(error)
        names = "+".join(name for name, _ in a.steps) or str(a.status)
        reason = f"read whole: {names} is not sliceable" if a.source is not None else None
        read = ShardedRead(len(indices), len(distinct), (whole_bytes,) if a.source is not None else (), shard_bytes,
                           whole_bytes, reason, "verified" if checksum else "")  # Source.read checksums
    blocks = [values[_bounds(i)] for i in indices]
    return blocks, (max(errors) if errors else None), read


def _nbytes(entry: Any) -> int:
    return int(np.prod(entry.shape, dtype=np.int64)) * dtype_of(entry.dtype).itemsize


def _bounds(index: Block) -> tuple[tuple[int, int], ...]:
    return tuple((int(s.start), int(s.stop)) for s in index)


def _block_mapper(a: Assignment) -> Callable[[tuple[tuple[int, int], ...], Source], np.ndarray] | None:
    """How to read one block of ``a``'s value from the source, or ``None`` when only a whole read can."""
    entry = a.source
    if entry is None:
        return None
    if a.status in (LOADED, CAST):
        return lambda box, source: source.read_slice(entry.key, tuple(slice(*b) for b in box))
    if a.status != TRANSFORMED or len(a.steps) != 1:
        return None
    name, options = a.steps[0]
    perm = axis_permutation(name, len(entry.shape))
    if perm is not None:  # a PyTorch layout: the block is the permuted block of the source
        def permuted(box: tuple[tuple[int, int], ...], source: Source) -> np.ndarray:
            inner = [slice(0)] * len(perm)
            for axis, taken in enumerate(perm):
                inner[taken] = slice(*box[axis])
            return np.ascontiguousarray(source.read_slice(entry.key, tuple(inner)).transpose(perm))

        return permuted
    if name == "pad":
        return lambda box, source: _padded_block(entry, box, source, a.target.shape, **options)
    return None


def _padded_block(entry: Any, box: tuple[tuple[int, int], ...], source: Source, shape: tuple[int, ...],
                  value: float = 0.0, where: str = "end") -> np.ndarray:
    """A block of the padded tensor: the part inside the source's range read as a block, ``value`` around it."""
    dtype = dtype_of(entry.dtype)
    out = np.full(tuple(stop - start for start, stop in box), np.asarray(value).astype(dtype), dtype)
    inner, place = [], []
    for (start, stop), old, new in zip(box, entry.shape, shape):
        shift = 0 if where == "end" else new - old
        lo, hi = max(start - shift, 0), min(stop - shift, old)
        if hi <= lo:
            return out  # the block lies wholly in the padding
        inner.append(slice(lo, hi))
        place.append(slice(lo + shift - start, hi + shift - start))
    out[tuple(place)] = source.read_slice(entry.key, tuple(inner))
    return out


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



def _reason(exc: BaseException) -> str:
    return exc.message if isinstance(exc, RegraftError) else f"{type(exc).__name__}: {exc}"
