"""The Plan: for every target variable, one source tensor (and a transform) or none.

A plan is data: computed from metadata only, immutable, printable as a table,
and carrying fingerprints of the checkpoint and of the model so that it is never
applied to something it was not made for. Nothing here reads files or touches a
model: :mod:`regraft.planfile` saves and reads plans as YAML,
:func:`regraft.applying.apply` applies one, and :func:`regraft.load` is
:func:`regraft.plan` followed by :func:`regraft.apply`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable

from regraft.entries import SourceEntry, Stage, Status, TargetVariable
from regraft.naming import collapse, text_table

if TYPE_CHECKING:  # pragma: no cover
    from regraft.rules import Rule

__all__ = [
    "Assignment",
    "Plan",
    "LOADED",
    "CAST",
    "SHAPE_MISMATCH",
    "MISSING",
    "AMBIGUOUS",
    "TRANSFORMED",
    "UNCONFIRMED",
    "PLAN_VERSION",
    "STATUSES",
    "status_for",
    "fingerprint_source",
    "fingerprint_target",
]

LOADED, CAST, TRANSFORMED = Status.LOADED, Status.CAST, Status.TRANSFORMED
SHAPE_MISMATCH, MISSING, AMBIGUOUS, UNCONFIRMED = Status.SHAPE_MISMATCH, Status.MISSING, Status.AMBIGUOUS, Status.UNCONFIRMED
PLAN_VERSION = 1
STATUSES = tuple(Status)
OPTIMIZER_STATES = ("loaded", "transformed", "fresh", "kept")


@dataclass(frozen=True)
class Assignment:
    """What happens to one target variable.

    Attributes:
        target: the model variable.
        source: the checkpoint entry it takes its value from, or ``None``.
        status: ``loaded``, ``cast``, ``transformed``, ``shape-mismatch``,
            ``missing``, ``ambiguous`` or ``unconfirmed`` (the last four leave the
            variable at its fresh value; ``unconfirmed`` names the proposed
            ``source``, which only order among alike layers supports).
        stage: which stage decided: ``rule``, ``exact``, ``aligned``, ``plan``
            (read from an edited plan file), ``""`` if none did.
        reason: the decision in words.
        allowed: for a variable left fresh, the ``allow_missing`` pattern or
            ``init`` rule that covers it, if any.
        confidence: how sure an automatic decision is (1.0 for exact keys and rules).
        transform: ``identity`` or ``cast`` for what is written; ``None`` otherwise.
        candidates: for ``ambiguous``, the equally good source keys.
        steps: for ``transformed``, the transform pipeline ``((name, options), ...)``
            applied to the source tensor (or, for ``identity_init``, to nothing).
        order_only: the pairing rests on order among alike layers alone; it is
            ``unconfirmed`` unless the user accepted order (``accept_order=True``).
        not_preserved: under ``reshape="preserve"``, why this variable cannot take a value
            that keeps the old model's function (``""`` when it can, or outside ``preserve``).
            A strict problem unless ``allowed``.
    """

    target: TargetVariable
    source: SourceEntry | None
    status: Status
    stage: Stage = Stage.NONE
    reason: str = ""
    allowed: str | None = None
    confidence: float | None = None
    candidates: tuple[str, ...] = ()
    steps: tuple[tuple[str, dict[str, Any]], ...] = ()
    order_only: bool = False
    not_preserved: str = ""

    @property
    def writes(self) -> bool:
        """True when applying the plan assigns this variable."""
        return self.status in (LOADED, CAST, TRANSFORMED)

    @property
    def transform(self) -> str | None:
        """``identity``, ``cast`` or the transform pipeline (``widen_in + widen_out``) for what is written."""
        if self.steps:
            return " + ".join(name for name, _ in self.steps)
        return {LOADED: "identity", CAST: "cast"}.get(self.status)


@dataclass(frozen=True)
class Plan:
    """An immutable load plan.

    Attributes:
        source_path: the checkpoint path.
        source_format: the detected format.
        namespace: the key namespace of the checkpoint.
        root: the saved object whose subtree was matched (``""`` = the saved root).
        model_name: the name of the model the plan was made for.
        assignments: one per target variable, in model order.
        unused: source weights under ``root`` that no target takes, with the
            ``allow_unused`` pattern that covers each (or ``None``).
        ignored: source weights dropped on purpose by an ``ignore`` rule, with the rule.
        outside: source weights outside ``root`` (other saved objects), never loaded.
        optimizer: optimizer slots and bookkeeping tensors, listed apart.
        rules: every rule given, with how many variables or tensors it decided.
        inserted: model layers with no counterpart in the checkpoint (readable keys).
        removed: checkpoint layers with no counterpart in the model.
        source_fingerprint: hash of the checkpoint's keys, shapes and dtypes.
        target_fingerprint: hash of the model's keys, shapes and dtypes.
        optimizer_assignments: with ``load(..., optimizer=)``, one per optimizer slot and
            one for the step count (see :mod:`regraft.optimizer_state`); applied with
            the model's variables, all-or-nothing.
        optimizer_refused: why the checkpoint's optimizer variables could not be given to
            their weights (``""``: nothing refused).
    """

    source_path: str
    source_format: str
    root: str
    assignments: tuple[Assignment, ...]
    namespace: str = ""
    model_name: str = ""
    unused: tuple[tuple[SourceEntry, str | None], ...] = ()
    ignored: tuple[tuple[SourceEntry, str], ...] = ()
    outside: tuple[SourceEntry, ...] = ()
    optimizer: tuple[SourceEntry, ...] = ()
    rules: tuple[tuple["Rule", int], ...] = field(default=())
    inserted: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    source_fingerprint: str = ""
    target_fingerprint: str = ""
    optimizer_assignments: tuple[Assignment, ...] = ()
    optimizer_refused: str = ""

    # -- checks -------------------------------------------------------------------

    def unused_rules(self) -> list["Rule"]:
        """Rules that decided nothing (a typo, or a rule that no longer applies)."""
        return [rule for rule, count in self.rules if count == 0]

    def problems(self) -> list[str]:
        """Every reason a strict load refuses this plan, collapsed, as text lines."""
        lines = []
        unpreserved: dict[tuple[str, str], list[str]] = {}
        for a in self.assignments:
            if a.not_preserved and a.allowed is None:
                unpreserved.setdefault((a.target.layer, a.not_preserved), []).append(a.target.key)
        for (layer, why), keys in unpreserved.items():
            lines.append(f"not preserved: layer '{layer}' ({', '.join(collapse(keys))}): {why}")
        for a in self.assignments:
            if a.not_preserved and a.allowed is None:
                continue  # said above, with the reason
            if a.status == SHAPE_MISMATCH and a.allowed is None and a.source is not None:
                lines.append(
                    f"shape mismatch: tensor '{a.source.key}' has shape {_shape(a.source.shape)}; "
                    f"variable '{a.target.key}' needs {_shape(a.target.shape)}"
                )
        for a in self.assignments:
            if a.status == AMBIGUOUS and a.allowed is None:
                lines.append(
                    f"ambiguous: variable '{a.target.key}' fits equally well "
                    + " and ".join(f"'{c}'" for c in a.candidates)
                    + "; add a rename rule to choose"
                )
        unconfirmed = [a for a in self.assignments if a.status == UNCONFIRMED and a.allowed is None]
        if unconfirmed:
            layers = sorted({a.target.layer for a in unconfirmed})
            lines.append(
                f"{len(layers)} layer{'s' if len(layers) > 1 else ''} placed by order only: "
                + ", ".join(collapse(a.target.key for a in unconfirmed))
                + " (a tie among alike layers, no names to tell them apart) — confirm with accept_order=True "
                "(CLI --accept-order) or a rename rule"
            )
        missing = [a.target.key for a in self.assignments
                   if a.status == MISSING and a.allowed is None and not a.not_preserved]
        if missing:
            lines.append(f"missing from the checkpoint ({len(missing)}): " + ", ".join(collapse(missing)))
        contested = {c for a in self.assignments for c in a.candidates} | {
            a.source.key for a in unconfirmed if a.source is not None}
        unused = [e.key for e, allowed in self.unused if allowed is None and e.key not in contested]
        if unused:
            lines.append(f"unused checkpoint tensors ({len(unused)}): " + ", ".join(collapse(unused)))
        for rule in self.unused_rules():
            lines.append(f"unused rule: {rule} matched nothing")
        lacking = [a.target.key for a in self.optimizer_assignments if a.source is None and a.allowed is None]
        if lacking:
            lines.append(
                f"optimizer state missing from the checkpoint ({len(lacking)}): " + ", ".join(collapse(lacking))
                + " — slots of loaded variables would start fresh ("
                + (self.optimizer_refused or "a checkpoint without the optimizer, or slots that do not record their "
                   "variable") + ")"
            )
        return lines

    # -- counts and display ------------------------------------------------------

    def counts(self) -> dict[str, int]:
        """Number of target variables per status, plus unused/outside/optimizer tensors."""
        out = {str(status): 0 for status in STATUSES}
        for a in self.assignments:
            out[str(a.status)] += 1
        out["unused"] = len(self.unused)
        out["outside_root"] = len(self.outside)
        out["optimizer_and_bookkeeping"] = len(self.optimizer)
        return out

    def parameter_share(self) -> float:
        """Share of the model's parameters (elements) that take a checkpoint value."""
        total = sum(a.target.size for a in self.assignments)
        # An identity-initialised or zeroed variable is written, but takes nothing from the checkpoint.
        loaded = sum(a.target.size for a in self.assignments if a.writes and a.source is not None)
        return loaded / total if total else 1.0

    def summary(self, verb: str = "would load") -> str:
        """One line: counts and share of parameters loaded."""
        c = self.counts()
        parts = [f"{c[LOADED]} {verb}"]
        if c[CAST]:
            parts.append(f"{c[CAST]} cast")
        if c[TRANSFORMED]:
            parts.append(f"{c[TRANSFORMED]} transformed")
        parts.append(f"{c[SHAPE_MISMATCH]} shape-mismatch")
        parts.append(f"{c[MISSING]} missing")
        if c[AMBIGUOUS]:
            parts.append(f"{c[AMBIGUOUS]} ambiguous")
        if c[UNCONFIRMED]:
            parts.append(f"{c[UNCONFIRMED]} unconfirmed (placed by order only, left fresh)")
        parts.append(f"{c['unused']} unused")
        line = ", ".join(parts) + f" — {self.parameter_share():.1%} of parameters from the checkpoint"
        if self.optimizer_assignments:
            states = [row["state"] for row in self.optimizer_rows()]
            line += "; optimizer: " + ", ".join(f"{states.count(s)} {s}" for s in OPTIMIZER_STATES if s in states)
        elif c["optimizer_and_bookkeeping"]:
            line += f"; {c['optimizer_and_bookkeeping']} optimizer/bookkeeping tensors not loaded"
        return line

    def optimizer_rows(self) -> list[dict[str, Any]]:
        """One dict per optimizer slot (and the step count): ``state`` is ``loaded``
        (as saved), ``transformed`` (its variable's transform, mapped for slots), ``fresh``
        (initial value) or ``kept`` (left as the optimizer has it: a step count the checkpoint
        lacks, a moving average of a fresh variable)."""
        rows = []
        for a in self.optimizer_assignments:
            if a.source is None:
                state = "fresh" if a.writes else "kept"
            else:
                state = "transformed" if a.status == TRANSFORMED else "loaded"
            rows.append({"slot": a.target.key, "source": a.source.key if a.source else None, "state": state,
                         "transform": a.transform, "reason": a.reason})
        return rows

    def heading(self) -> str:
        """``path [format] (object 'model')``: what the plan reads."""
        where = f" (object '{self.root}')" if self.root else ""
        return f"{self.source_path} [{self.source_format}]{where}"

    def table(self, cast_errors: dict[str, float] | None = None) -> str:
        """A plain-text table: status, target, source, shapes, dtype; then unused tensors."""
        cast_errors = cast_errors or {}
        header = ("STATUS", "VARIABLE", "FROM", "SHAPE", "DTYPE")
        lines = []
        for a in self.assignments:
            shape = _shape(a.target.shape)
            if a.source is not None and a.source.shape != a.target.shape:
                shape = f"{_shape(a.source.shape)} -> {shape}"
            dtype = a.target.dtype
            if a.source is not None and a.source.dtype != a.target.dtype:
                dtype = f"{a.source.dtype} -> {dtype}"
                if a.target.key in cast_errors:
                    dtype += f" (max err {cast_errors[a.target.key]:.3g})"
            source = a.source.key if a.source else "-"
            status = a.status + (" (allowed)" if a.allowed else "")
            if a.status == TRANSFORMED:
                status += f": {a.transform}"
            lines.append((status, a.target.key, source, shape, dtype))
        for entry, allowed in self.unused:
            lines.append(("unused" + (" (allowed)" if allowed else ""), "-", entry.key, _shape(entry.shape), entry.dtype))
        return text_table([header, *lines])

    def __str__(self) -> str:
        return "\n".join([self.heading(), self.table(), self.summary()])

    def to_dict(self) -> dict[str, Any]:
        """The plan as plain data: what a plan file holds."""
        variables = {}
        for a in self.assignments:
            entry: dict[str, Any] = {
                "source": a.source.key if a.source and a.status != UNCONFIRMED else None,
                "status": str(a.status),
                "transform": a.transform,
                "stage": str(a.stage) or None,
                "reason": a.reason,
            }
            if a.confidence is not None:
                entry["confidence"] = round(a.confidence, 3)
            if a.candidates:
                entry["candidates"] = list(a.candidates)
            if a.status == UNCONFIRMED and a.source is not None:
                entry["proposed"] = a.source.key  # to load it, the user copies it into "source"
            if a.steps:
                entry["steps"] = [{"name": name, **options} for name, options in a.steps]
            if a.allowed:
                entry["allowed_by"] = a.allowed
            if a.order_only and a.status != UNCONFIRMED:
                entry["order_only"] = True  # placed by order, accepted with accept_order
            if a.not_preserved:
                entry["not_preserved"] = a.not_preserved
            variables[a.target.key] = entry
        return {
            "regraft_plan": PLAN_VERSION,
            "checkpoint": {
                "path": self.source_path,
                "format": self.source_format,
                "root": self.root,
                "fingerprint": self.source_fingerprint,
            },
            "model": {"name": self.model_name, "fingerprint": self.target_fingerprint},
            "variables": variables,
            "fresh": [a.target.key for a in self.assignments if not a.writes],
            "unused": [e.key for e, _ in self.unused],
            "ignored": [{"source": e.key, "rule": rule} for e, rule in self.ignored],
            "inserted_layers": list(self.inserted),
            "removed_layers": list(self.removed),
            "rules": [{"rule": str(rule), "used": count} for rule, count in self.rules],
            **({"optimizer": self._optimizer_dict()} if self.optimizer_assignments else {}),
        }

    def _optimizer_dict(self) -> dict[str, Any]:
        """The optimizer section of a plan file: one entry per slot and the step count."""
        slots = {}
        for a in self.optimizer_assignments:
            entry: dict[str, Any] = {"source": a.source.key if a.source else None, "status": str(a.status),
                                     "transform": a.transform, "stage": str(a.stage) or None, "reason": a.reason,
                                     "shape": list(a.target.shape), "dtype": a.target.dtype}
            if a.steps:
                entry["steps"] = [{"name": name, **options} for name, options in a.steps]
            if a.allowed:
                entry["allowed_by"] = a.allowed
            slots[a.target.key] = entry
        return {"refused": self.optimizer_refused or None, "slots": slots}

def status_for(source: SourceEntry, target: TargetVariable) -> Status:
    """What loading ``source`` into ``target`` is, from shapes and dtypes alone."""
    if tuple(source.shape) != tuple(target.shape):
        return SHAPE_MISMATCH
    return CAST if source.dtype != target.dtype else LOADED


def fingerprint_source(entries: Iterable[SourceEntry]) -> str:
    """A short hash of every checkpoint entry's key, shape, dtype and kind."""
    h = hashlib.sha256()
    for e in sorted(entries, key=lambda e: e.key):
        h.update(f"{e.key}|{e.shape}|{e.dtype}|{e.kind}\n".encode())
    return h.hexdigest()[:16]


def fingerprint_target(targets: Iterable[TargetVariable]) -> str:
    """A short hash of every model variable's readable key, shape and dtype."""
    h = hashlib.sha256()
    for t in targets:
        h.update(f"{t.key}|{t.shape}|{t.dtype}\n".encode())
    return h.hexdigest()[:16]


def _shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"
