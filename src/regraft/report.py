"""LoadReport: what happened to every tensor, as a table for people and a dict for programs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from regraft.entries import Stage
from regraft.naming import collapse, text_table
from regraft.plans import (
    AMBIGUOUS,
    CAST,
    LOADED,
    MISSING,
    SHAPE_MISMATCH,
    TRANSFORMED,
    UNCONFIRMED,
    Plan,
    _shape,
)

__all__ = ["LoadReport", "AppliedTensor", "ShardedRead"]

_MISMATCH_LINES = 12  # details (shape mismatches, candidates, proposals) shown one per line in the grouped view


@dataclass(frozen=True)
class ShardedRead:
    """How a variable laid out over several devices was read: block by block, or whole.

    Attributes:
        devices: the devices of this process holding a block of it.
        blocks: distinct blocks read (replicas of a block share one read).
        block_bytes: file bytes each distinct read touched (one entry for a whole read,
            none when the value comes from no checkpoint tensor). Counted in the check
            pass; the commit reads the same blocks again, from the page cache.
        shard_bytes: the largest device block, in the checkpoint's dtype.
        whole_bytes: the checkpoint tensor's size (0 without one).
        read_whole: why the whole tensor was read and cut on the host
            (``"read whole: widen_out is not sliceable"``), else ``None``.
        checksum: for formats that checksum whole tensors: ``"not verified: read as
            slices"`` or ``"verified whole"``; empty otherwise.
    """

    devices: int
    blocks: int
    block_bytes: tuple[int, ...]
    shard_bytes: int
    whole_bytes: int
    read_whole: str | None = None
    checksum: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "devices": self.devices,
            "blocks": self.blocks,
            "bytes_read": sum(self.block_bytes),
            "block_bytes": list(self.block_bytes),
            "shard_bytes": self.shard_bytes,
            "whole_bytes": self.whole_bytes,
            "read_whole": self.read_whole,
            "checksum": self.checksum or None,
        }


@dataclass(frozen=True)
class AppliedTensor:
    """What was done to one written variable: the cast error, if cast; how it was read, if sharded."""

    key: str
    max_cast_error: float | None = None
    sharded: ShardedRead | None = None


@dataclass(frozen=True)
class LoadReport:
    """The outcome of a load (or, with ``applied=False``, of a dry run such as ``diff``).

    Attributes:
        plan: the plan that was applied.
        applied: whether tensors were written to the model.
        cast_errors: the largest rounding error of each cast variable.
        frozen: paths of layers set to ``trainable=False``.
        sharded: for each variable laid out over several devices, how it was read.
    """

    plan: Plan
    applied: bool
    cast_errors: dict[str, float] = field(default_factory=dict)
    frozen: tuple[str, ...] = ()
    sharded: dict[str, ShardedRead] = field(default_factory=dict)

    @classmethod
    def build(cls, plan: Plan, applied: dict[str, AppliedTensor] | None, frozen: list[str] = ()) -> "LoadReport":  # type: ignore[assignment]
        errors = {k: t.max_cast_error for k, t in (applied or {}).items() if t.max_cast_error is not None}
        sharded = {k: t.sharded for k, t in (applied or {}).items() if t.sharded is not None}
        return cls(plan, applied is not None, errors, tuple(frozen), sharded)

    def kept_trainable(self) -> list[str]:
        """When freezing: layers left trainable because a variable of theirs was transformed."""
        if not self.frozen:
            return []
        return sorted({a.target.layer for a in self.plan.assignments if a.status == TRANSFORMED})

    def counts(self) -> dict[str, int]:
        """Number of target variables per status, plus unused/outside/optimizer tensors."""
        return self.plan.counts()

    def parameter_share(self) -> float:
        """Share of the model's parameters (elements) that take a checkpoint value."""
        return self.plan.parameter_share()

    def summary(self) -> str:
        """One line: counts and share of parameters loaded."""
        line = self.plan.summary("loaded" if self.applied else "would load")
        if self.frozen:
            line += f"; {len(self.frozen)} layers frozen"
        if self.sharded:
            line += "; " + self.sharded_summary()
        return line

    def sharded_summary(self) -> str:
        """One phrase on the variables laid out over several devices: bytes read, what was read whole, checks.

        Example: ``6 sharded variables read as 48 blocks (1.1 MB of 1.1 MB; checksum not verified: read as
        slices); read whole: widen_out is not sliceable (d2/kernel)``.
        """
        reads = self.sharded.values()
        read = sum(sum(r.block_bytes) for r in reads)
        whole = sum(r.whole_bytes for r in reads)
        text = (f"{len(self.sharded)} sharded variables read as {sum(r.blocks for r in reads)} blocks "
                f"({read / 1e6:.1f} MB of {whole / 1e6:.1f} MB")
        checks = sorted({r.checksum for r in reads if r.checksum})
        text += "; checksum " + ", ".join(checks) + ")" if checks else ")"
        by_reason: dict[str, list[str]] = {}
        for key, r in self.sharded.items():
            if r.read_whole:
                by_reason.setdefault(r.read_whole, []).append(key)
        for reason, keys in sorted(by_reason.items()):
            text += f"; {reason} ({', '.join(collapse(keys))})"
        return text

    def rows(self) -> list[dict[str, Any]]:
        """One dict per target variable, in model order."""
        out = []
        for a in self.plan.assignments:
            row: dict[str, Any] = {
                "status": str(a.status),
                "target": a.target.key,
                "source": a.source.key if a.source else None,
                "target_shape": list(a.target.shape),
                "source_shape": list(a.source.shape) if a.source else None,
                "target_dtype": a.target.dtype,
                "source_dtype": a.source.dtype if a.source else None,
                "stage": str(a.stage) or None,
                "reason": a.reason,
                "confidence": a.confidence,
                "transform": a.transform,
            }
            if a.candidates:
                row["candidates"] = list(a.candidates)
            if a.order_only:
                row["confirm"] = True  # placed by order only: loaded only if the user accepted order
            if a.allowed:
                row["allowed_by"] = a.allowed
            if a.not_preserved:
                row["not_preserved"] = a.not_preserved
            if a.target.key in self.cast_errors:
                row["max_cast_error"] = self.cast_errors[a.target.key]
            if a.target.key in self.sharded:
                row["sharded"] = self.sharded[a.target.key].to_dict()
            out.append(row)
        return out

    def to_dict(self) -> dict[str, Any]:
        """The whole report as plain data (what ``--json`` prints)."""
        p = self.plan
        return {
            "source": p.source_path,
            "format": p.source_format,
            "root": p.root,
            "applied": self.applied,
            "summary": self.summary(),
            "counts": self.counts(),
            "parameter_share": self.parameter_share(),
            "variables": self.rows(),
            "unused": [
                {"source": e.key, "shape": list(e.shape), "dtype": e.dtype, "allowed_by": allowed}
                for e, allowed in p.unused
            ],
            "outside_root": [e.key for e in p.outside],
            "optimizer_and_bookkeeping": [{"source": e.key, "kind": e.kind, "slot_of": e.slot_of} for e in p.optimizer],
            "rules": [{"rule": str(rule), "used": n} for rule, n in p.rules],
            "ignored": [{"source": e.key, "rule": rule} for e, rule in p.ignored],
            "inserted_layers": list(p.inserted),
            "removed_layers": list(p.removed),
            "frozen": list(self.frozen),
            "kept_trainable": self.kept_trainable(),
            "optimizer": p.optimizer_rows(),
        }

    def optimizer_table(self) -> str:
        """The optimizer section: per slot, its state (loaded/transformed/fresh), source and transform."""
        rows = [(r["state"], r["slot"], r["source"] or "-", r["transform"] or "-") for r in self.plan.optimizer_rows()]
        return text_table([("STATE", "SLOT", "FROM", "TRANSFORM"), *rows]) if rows else ""

    def table(self) -> str:
        """A plain-text table: status, target, source, shapes, dtype; then unused tensors."""
        return self.plan.table(self.cast_errors)

    def grouped(self) -> str:
        """The plan grouped by outcome, keys collapsed, with the aligned regions: what a person reads first.

        Example output::

            loaded, exact key (2): dense1/{bias,kernel}
            loaded, aligned (4): _operations/{4..5}/... -> block{2..3}/{bias,kernel}
            shape-mismatch (2): dense2/{bias,kernel}
            missing (2): dense3/{bias,kernel}
            inserted layers: dense3
        """
        groups: dict[str, list[str]] = {}
        by_order = []
        for a in self.plan.assignments:
            if a.status == TRANSFORMED:
                label = f"transformed, {a.transform}"
            elif a.status in (LOADED, CAST):
                label = f"{a.status}, {'exact key' if a.stage in (Stage.EXACT, Stage.NONE) else a.stage}"
                if a.confidence is not None and a.confidence < 1.0 and a.stage == Stage.ALIGNED:
                    label += f" (confidence {a.confidence:.1f})"
            else:
                label = a.status + (" (allowed)" if a.allowed else "")
            groups.setdefault(label, []).append(a.target.key)
            if a.order_only:
                by_order.append(a.target.key)
        order = [LOADED, CAST, TRANSFORMED, SHAPE_MISMATCH, AMBIGUOUS, UNCONFIRMED, MISSING]
        ranked = sorted(groups.items(), key=lambda kv: order.index(kv[0].split(",")[0].split(" ")[0]))
        lines = [f"{label} ({len(keys)}): " + ", ".join(collapse(keys)) for label, keys in ranked]
        mismatched = [a for a in self.plan.assignments if a.status == SHAPE_MISMATCH and a.source is not None]
        for a in mismatched[:_MISMATCH_LINES]:
            lines.append(f"  {a.target.key}: {_shape(a.source.shape)} in '{a.source.key}' -> {_shape(a.target.shape)}")
        if len(mismatched) > _MISMATCH_LINES:
            lines.append(f"  … and {len(mismatched) - _MISMATCH_LINES} more shape mismatches (the table lists every one)")
        ambiguous = [f"  {a.target.key}: candidates " + ", ".join(a.candidates)
                     for a in self.plan.assignments if a.status == AMBIGUOUS]
        proposed = [f"  {a.target.key}: proposed '{a.source.key}'"
                    for a in self.plan.assignments if a.status == UNCONFIRMED and a.source is not None]
        for details, what in ((ambiguous, "ambiguous variables"), (proposed, "proposals")):
            lines.extend(details[:_MISMATCH_LINES])
            if len(details) > _MISMATCH_LINES:
                lines.append(f"  … and {len(details) - _MISMATCH_LINES} more {what} (the table lists every one)")
        unused = [e.key for e, _ in self.plan.unused]
        if unused:
            lines.append(f"unused ({len(unused)}): " + ", ".join(collapse(unused)))
        if self.plan.ignored:
            lines.append(f"ignored ({len(self.plan.ignored)}): " + ", ".join(collapse(e.key for e, _ in self.plan.ignored)))
        lines.extend(growth_lines(self.plan))
        if self.plan.inserted:
            lines.append("inserted layers: " + ", ".join(collapse(self.plan.inserted)))
        if self.plan.removed:
            lines.append("removed layers: " + ", ".join(collapse(self.plan.removed)))
        if by_order:
            accepted = all(a.status != UNCONFIRMED for a in self.plan.assignments if a.order_only)
            lines.append(
                "placed by order only (alike layers and no names to tell them apart; the old ones were taken to "
                + ("come first; accepted): " if accepted else "come first; confirm with accept_order=True / --accept-order): ")
                + ", ".join(collapse(by_order))
            )
        for rule, count in self.plan.rules:
            lines.append(f"{rule}: {'used ' + str(count) + 'x' if count else 'UNUSED (matched nothing)'}")
        return "\n".join([self.plan.heading(), *lines, self.summary()])

    def __str__(self) -> str:
        head = self.plan.heading()
        tail = [self.summary()]
        if self.frozen:
            tail.append("frozen: " + ", ".join(self.frozen))
            if self.kept_trainable():
                tail.append("kept trainable (transformed): " + ", ".join(self.kept_trainable()))
        optimizer = [self.optimizer_table()] if self.plan.optimizer_assignments else []
        return "\n".join([head, self.table(), *optimizer, *tail])


_COPIES_SHOWN = 6


def growth_lines(plan: Plan) -> list[str]:
    """Per layer, what function-preserving growth did: widened (which units copied), consumer rows
    divided, inserted as an identity, zeroed; and what it could not preserve, with the reason."""
    per_layer: dict[str, list[str]] = {}
    for a in plan.assignments:
        said = per_layer.setdefault(a.target.layer, [])
        for name, options in a.steps:
            if name == "widen_out" and a.source is not None and a.target.role in ("kernel", "pointwise_kernel"):
                axis = int(options.get("axis", -1))
                old, new = a.source.shape[axis], a.target.shape[axis]
                mapping = options["mapping"]
                copies = [f"{j}<-{mapping[j]}" for j in range(old, new)]
                shown = ", ".join(copies[:_COPIES_SHOWN]) + (", ..." if len(copies) > _COPIES_SHOWN else "")
                text = f"widened {old}->{new} (units copied: {shown})" if old != new else ""
                if not text and a.target.role == "kernel" and axis == -2:
                    text = f"copied along its widened input channels ({a.source.shape[axis]}->{a.target.shape[axis]})"
            elif name == "widen_out" and a.source is not None and int(options.get("axis", -1)) == -2:
                text = f"copied along its widened input channels ({a.source.shape[-2]}->{a.target.shape[-2]})"
            elif name == "widen_in" and a.source is not None:
                axis = int(options.get("axis", -2))
                text = f"consumer rows divided (input {a.source.shape[axis]}->{a.target.shape[axis]})"
            elif name == "identity_init" and a.target.role == "kernel":
                text = "inserted as an identity"
            elif name == "fill" and options.get("value") == 0.0 and a.target.role in ("gamma", "kernel"):
                text = "zeroed: the inserted residual branch it ends adds nothing"
            elif name == "fill" and a.target.role == "moving_variance":
                text = "inserted as an identity (moving variance 1 - epsilon)"
            else:
                continue
            if text and text not in said:
                said.append(text)
        if a.not_preserved and f"NOT preserved: {a.not_preserved}" not in said:
            said.append(f"NOT preserved: {a.not_preserved}")
    lines = [f"  {layer}: " + "; ".join(said) for layer, said in per_layer.items() if said]
    return ["growth (reshape='preserve'):", *lines] if lines else []
