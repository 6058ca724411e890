"""The Plan: for every target variable, one source tensor (and a transform) or none.

A plan is computed from metadata only and is immutable. :func:`regraft.load` is
``make_plan`` followed by :func:`regraft.apply.apply_plan`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from regraft.entries import SourceEntry, TargetVariable

__all__ = ["Assignment", "Plan", "LOADED", "CAST", "SHAPE_MISMATCH", "MISSING"]

LOADED = "loaded"
CAST = "cast"
SHAPE_MISMATCH = "shape-mismatch"
MISSING = "missing"


@dataclass(frozen=True)
class Assignment:
    """What happens to one target variable.

    Attributes:
        target: the model variable.
        source: the checkpoint entry it takes its value from, or ``None``.
        status: ``loaded``, ``cast``, ``shape-mismatch`` or ``missing`` (the last two
            leave the variable at its fresh value).
        stage: which matcher stage decided (``exact``, ``rename``), ``""`` if none did.
        reason: the decision in words.
        allowed: for a variable left fresh (``missing``, ``shape-mismatch``), the
            ``allow_missing`` pattern that covers it, if any.
    """

    target: TargetVariable
    source: SourceEntry | None
    status: str
    stage: str = ""
    reason: str = ""
    allowed: str | None = None

    @property
    def writes(self) -> bool:
        """True when applying the plan assigns this variable."""
        return self.status in (LOADED, CAST)


@dataclass(frozen=True)
class Plan:
    """An immutable load plan.

    Attributes:
        source_path: the checkpoint path.
        source_format: the detected format.
        root: the saved object whose subtree was matched (``""`` = the saved root).
        assignments: one per target variable, in model order.
        unused: source weights under ``root`` that no target takes, with the
            ``allow_unused`` pattern that covers each (or ``None``).
        outside: source weights outside ``root`` (other saved objects), never loaded.
        optimizer: optimizer slots and bookkeeping tensors, listed apart.
        renames_used: for each rename rule given, how many tensors it renamed.
    """

    source_path: str
    source_format: str
    root: str
    assignments: tuple[Assignment, ...]
    unused: tuple[tuple[SourceEntry, str | None], ...] = ()
    outside: tuple[SourceEntry, ...] = ()
    optimizer: tuple[SourceEntry, ...] = ()
    renames_used: tuple[tuple[str, str, int], ...] = field(default=())

    def problems(self) -> list[str]:
        """Every reason a strict load refuses this plan, collapsed, as text lines."""
        from regraft.naming import collapse

        lines = []
        mismatched = [a for a in self.assignments if a.status == SHAPE_MISMATCH and a.allowed is None]
        for a in mismatched:
            source = a.source or a.target  # a mismatch always has a source; keep typing honest
            lines.append(
                f"shape mismatch: tensor '{source.key}' has shape {_shape(source.shape)}; "
                f"variable '{a.target.key}' needs {_shape(a.target.shape)}"
            )
        missing = [a.target.key for a in self.assignments if a.status == MISSING and a.allowed is None]
        if missing:
            lines.append(f"missing from the checkpoint ({len(missing)}): " + ", ".join(collapse(missing)))
        unused = [e.key for e, allowed in self.unused if allowed is None]
        if unused:
            lines.append(f"unused checkpoint tensors ({len(unused)}): " + ", ".join(collapse(unused)))
        return lines


def _shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"
