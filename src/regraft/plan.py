"""The Plan: for every target variable, one source tensor (and a transform) or none.

A plan is computed from metadata only and is immutable. It prints as a table,
serialises to YAML a person can review and edit (:meth:`Plan.save`,
:meth:`Plan.read`), and carries fingerprints of the checkpoint and of the model
so that a plan is never applied to something it was not made for.
:func:`regraft.load` is :func:`regraft.plan` followed by :meth:`Plan.apply`.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable

from regraft.entries import SourceEntry, TargetVariable
from regraft.errors import RegraftError
from regraft.files import read_yaml
from regraft.naming import collapse

if TYPE_CHECKING:  # pragma: no cover
    from regraft.report import LoadReport
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
    "fingerprint_source",
    "fingerprint_target",
]

LOADED = "loaded"
CAST = "cast"
SHAPE_MISMATCH = "shape-mismatch"
MISSING = "missing"
AMBIGUOUS = "ambiguous"
TRANSFORMED = "transformed"
UNCONFIRMED = "unconfirmed"  # a pairing only order supports: proposed, left fresh until the user confirms it
PLAN_VERSION = 1


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
    """

    target: TargetVariable
    source: SourceEntry | None
    status: str
    stage: str = ""
    reason: str = ""
    allowed: str | None = None
    confidence: float | None = None
    candidates: tuple[str, ...] = ()
    steps: tuple[tuple[str, dict[str, Any]], ...] = ()
    order_only: bool = False

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

    # -- checks -------------------------------------------------------------------

    def unused_rules(self) -> list["Rule"]:
        """Rules that decided nothing (a typo, or a rule that no longer applies)."""
        return [rule for rule, count in self.rules if count == 0]

    def problems(self) -> list[str]:
        """Every reason a strict load refuses this plan, collapsed, as text lines."""
        lines = []
        for a in self.assignments:
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
        missing = [a.target.key for a in self.assignments if a.status == MISSING and a.allowed is None]
        if missing:
            lines.append(f"missing from the checkpoint ({len(missing)}): " + ", ".join(collapse(missing)))
        contested = {c for a in self.assignments for c in a.candidates} | {
            a.source.key for a in unconfirmed if a.source is not None}
        unused = [e.key for e, allowed in self.unused if allowed is None and e.key not in contested]
        if unused:
            lines.append(f"unused checkpoint tensors ({len(unused)}): " + ", ".join(collapse(unused)))
        for rule in self.unused_rules():
            lines.append(f"unused rule: {rule} matched nothing")
        return lines

    # -- use ------------------------------------------------------------------------

    def apply(self, model: Any, *, freeze: bool = False, progress: Any = None) -> "LoadReport":
        """Load the checkpoint into ``model`` exactly as planned (all-or-nothing).

        ``model`` must be the model the plan was made for, or one built the same
        way (same variable keys, shapes and dtypes): otherwise the plan is refused.

        Raises:
            RegraftError: the model or the checkpoint no longer fits the plan, or
                the load failed (the model is then unchanged).
        """
        from regraft.sources import open_source

        with open_source(self.source_path) as source:
            self._check_source(source)
            return self._apply_to(model, source, freeze, progress)

    def _apply_to(self, model: Any, source: Any, freeze: bool, progress: Any) -> "LoadReport":
        """Apply with ``source`` already open and known to be the planned checkpoint."""
        from regraft.apply import apply_plan, freeze_loaded
        from regraft.report import LoadReport
        from regraft.targets import describe

        plan = self
        if [id(v) for v in _unique_weights(model)] != [id(a.target.variable) for a in self.assignments]:
            # Another model object: it must be built the same way; bind the plan to its variables.
            targets = describe(model, ())
            if fingerprint_target(targets) != self.target_fingerprint:
                raise RegraftError(
                    f"This plan was made for another model than '{model.name}' "
                    "(its variable keys, shapes or dtypes differ).",
                    hint="Make a new plan for this model (regraft.plan / regraft plan).",
                )
            plan = self._rebind({t.key: t for t in targets})
        applied = apply_plan(plan, source, progress)
        frozen = freeze_loaded(plan) if freeze else []
        return LoadReport.build(plan, applied, frozen)

    def _rebind(self, by_key: dict[str, TargetVariable]) -> "Plan":
        from dataclasses import replace

        return replace(self, assignments=tuple(replace(a, target=by_key[a.target.key]) for a in self.assignments))

    def _check_source(self, source: Any) -> None:
        if fingerprint_source(source.entries()) != self.source_fingerprint:
            raise RegraftError(
                f"The checkpoint {self.source_path} has changed since this plan was made "
                "(its keys, shapes or dtypes differ).",
                hint="Make a new plan against the checkpoint as it is now.",
            )

    # -- display and files -------------------------------------------------------

    def __str__(self) -> str:
        from regraft.report import LoadReport

        return str(LoadReport.build(self, None))

    def to_dict(self) -> dict[str, Any]:
        """The plan as plain data: what a plan file holds."""
        variables = {}
        for a in self.assignments:
            entry: dict[str, Any] = {
                "source": a.source.key if a.source and a.status != UNCONFIRMED else None,
                "status": a.status,
                "transform": a.transform,
                "stage": a.stage or None,
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
            "ignored": [e.key for e, _ in self.ignored],
            "inserted_layers": list(self.inserted),
            "removed_layers": list(self.removed),
            "rules": [{"rule": str(rule), "used": count} for rule, count in self.rules],
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the plan as YAML to ``path`` (temporary name, then renamed into place)."""
        import yaml

        path = os.fspath(path)
        text = _PLAN_HEADER + yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True, width=120)
        tmp = f"{path}.regraft-tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)

    @classmethod
    def read(cls, path: str | os.PathLike[str], model: Any) -> "Plan":
        """Read a plan file (possibly edited by hand) and bind it to ``model``.

        Each variable's ``source`` may be changed to another checkpoint key or to
        ``null`` (leave fresh); the status is recomputed from shapes and dtypes.

        Raises:
            RegraftError: the file is not a regraft plan, names keys that do not
                exist, or was made for another checkpoint or model.
        """
        from regraft.sources import open_source
        from regraft.targets import describe

        data = _read_plan_file(os.fspath(path))
        checkpoint = data["checkpoint"]
        namespace_targets = describe(model, ())
        if fingerprint_target(namespace_targets) != data["model"]["fingerprint"]:
            raise RegraftError(
                f"Plan {path} was made for another model than '{model.name}' "
                "(its variable keys, shapes or dtypes differ).",
                hint="Make a new plan for this model with `regraft plan`.",
            )
        with open_source(checkpoint["path"]) as source:
            if fingerprint_source(source.entries()) != checkpoint["fingerprint"]:
                raise RegraftError(
                    f"Plan {path} was made for another checkpoint than {checkpoint['path']} as it is now "
                    "(its keys, shapes or dtypes differ).",
                    hint="Make a new plan against this checkpoint with `regraft plan`.",
                )
            entries = {e.key: e for e in source.entries()}
            namespace, source_format = source.namespace, source.format
        by_key = {t.key: t for t in namespace_targets}
        unknown = sorted(set(data["variables"]) - set(by_key))
        if unknown:
            raise RegraftError(
                f"Plan {path} names variables the model does not have: {', '.join(collapse(unknown))}.",
                hint="Only edit the 'source' of existing entries.",
            )
        assignments = []
        used: set[str] = set()
        for target in namespace_targets:
            entry = data["variables"].get(target.key, {"source": None})
            assignments.append(_assignment_from_file(target, entry, entries, path))
            if entry.get("source"):
                used.add(entry["source"])
        prefix = checkpoint["root"] + "/" if checkpoint["root"] else ""
        unused = tuple(
            (e, None) for e in entries.values() if e.kind == "weight" and e.key.startswith(prefix) and e.key not in used
            and e.key not in set(data.get("ignored", []))
        )
        return cls(
            source_path=checkpoint["path"],
            source_format=source_format,
            root=checkpoint["root"],
            assignments=tuple(assignments),
            namespace=namespace,
            model_name=data["model"].get("name", ""),
            unused=unused,
            inserted=tuple(data.get("inserted_layers", [])),
            removed=tuple(data.get("removed_layers", [])),
            source_fingerprint=checkpoint["fingerprint"],
            target_fingerprint=data["model"]["fingerprint"],
        )


def _unique_weights(model: Any) -> list[Any]:
    seen: set[int] = set()
    return [v for v in model.weights if not (id(v) in seen or seen.add(id(v)))]


_PLAN_HEADER = """\
# regraft plan: what each model variable takes from the checkpoint.
# Edit a variable's 'source' to another checkpoint key, or to null to leave it at
# its fresh value, then run:  regraft apply THIS_FILE --model SPEC --out OUT
# 'status' is recomputed from shapes and dtypes when the plan is read.
"""


def _read_plan_file(path: str) -> dict[str, Any]:
    data = read_yaml(path, f"plan file {path}", "Write one with `regraft plan CKPT --model SPEC -o FILE`.")
    if not isinstance(data, dict) or data.get("regraft_plan") != PLAN_VERSION or "variables" not in data:
        raise RegraftError(
            f"{path} is not a regraft plan file (version {PLAN_VERSION}).",
            hint="Write one with `regraft plan CKPT --model SPEC -o FILE`.",
        )
    return data


def _assignment_from_file(target: TargetVariable, entry: Any, entries: dict[str, SourceEntry], path: Any) -> Assignment:
    if not isinstance(entry, dict):
        raise RegraftError(f"Plan {path}: the entry of '{target.key}' must be a mapping with a 'source'.")
    key = entry.get("source")
    proposed = entry.get("proposed")
    if key is None and entry.get("status") == UNCONFIRMED and (proposed is None or proposed in entries):
        return Assignment(target, entries[proposed] if proposed is not None else None, UNCONFIRMED,
                          entry.get("stage") or "plan", entry.get("reason") or "placed by order only", None,
                          entry.get("confidence"), order_only=True)
    if key is None and entry.get("steps"):
        return _transformed_from_file(target, None, entry, entry.get("stage") or "plan", entry.get("reason") or "", path)
    if key is None:
        return Assignment(target, None, MISSING, "plan", entry.get("reason") or "left fresh in the plan", "plan")
    if key not in entries:
        raise RegraftError(
            f"Plan {path}: variable '{target.key}' names source '{key}', which is not in the checkpoint.",
            hint="Use a key listed by `regraft inspect CKPT`, or null to leave the variable fresh.",
        )
    source = entries[key]
    stage, reason = entry.get("stage") or "plan", entry.get("reason") or "chosen in the plan file"
    if entry.get("steps"):
        return _transformed_from_file(target, source, entry, stage, reason, path)
    if source.shape != target.shape:  # reported, left fresh: what a plan says of a mismatch
        return Assignment(target, source, SHAPE_MISMATCH, stage, reason, None, entry.get("confidence"))
    status = CAST if source.dtype != target.dtype else LOADED
    return Assignment(target, source, status, stage, reason, None, entry.get("confidence"))


def _transformed_from_file(target: TargetVariable, source: SourceEntry | None, entry: dict[str, Any], stage: str,
                           reason: str, path: Any) -> Assignment:
    """An entry with ``steps``: each step checked against the shapes before anything is read."""
    from regraft.growth import check_steps

    steps = []
    for step in entry["steps"]:
        if not isinstance(step, dict) or not isinstance(step.get("name"), str):
            raise RegraftError(
                f"Plan {path}: the steps of '{target.key}' must be mappings with a 'name'. Received: {step!r}.",
                hint="Write steps like  - {name: pad, value: 0.0}",
            )
        steps.append((step["name"], {k: v for k, v in step.items() if k != "name"}))
    check_steps(tuple(steps), source.shape if source else None, target.shape, target.key)
    return Assignment(target, source, TRANSFORMED, stage, reason, None, entry.get("confidence"), (), tuple(steps))


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
