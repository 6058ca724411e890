"""The CLI commands. Each takes the parsed arguments and returns an exit code."""

from __future__ import annotations

import argparse
import os
from collections import Counter

from regraft.cli.output import emit, info, progress_printer

__all__ = ["inspect", "diff", "load", "demo"]


def inspect(args: argparse.Namespace) -> int:
    """``regraft inspect CKPT``: every tensor's key, shape, dtype and kind, from metadata only."""
    from regraft.sources import open_source

    with open_source(args.checkpoint) as source:
        entries = source.entries()
        kinds = Counter(e.kind for e in entries)
        weights = [e for e in entries if e.kind == "weight"]
        data = {
            "path": source.path,
            "format": source.format,
            "namespace": source.namespace,
            "files": list(source.files),
            "objects": [r for r in source.roots() if r],
            "counts": dict(kinds),
            "parameters": sum(e.size for e in weights),
            "entries": [
                {"key": e.key, "shape": list(e.shape), "dtype": e.dtype, "kind": e.kind, "layer_name": e.layer_name,
                 "aliases": list(e.aliases), "slot_of": e.slot_of}
                for e in entries
            ],
        }
        shown = entries if args.all else weights
        rows = [("KEY", "SHAPE", "DTYPE", "KIND", "LAYER NAME")] + [
            (e.key, str(tuple(e.shape)), e.dtype, e.kind, e.layer_name or "") for e in shown
        ]
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        table = "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
        objects = f"; objects: {', '.join(data['objects'])}" if data["objects"] else ""
        hidden = len(entries) - len(shown)
        text = (
            f"{source.path} [{source.format}]{objects}\n{table}\n"
            f"{kinds['weight']} weights ({data['parameters']:,} parameters), "
            f"{kinds['optimizer_slot']} optimizer slots, {kinds['bookkeeping']} bookkeeping"
            + (f" (not listed; --all lists them)" if hidden else "")
        )
        emit(data, text, args.json)
    return 0


def _report(args: argparse.Namespace, apply: bool):
    import regraft
    from regraft.cli.modelspec import build_model

    model = build_model(args.model)
    options = dict(rename=args.rename, allow_missing=args.allow_missing, allow_unused=args.allow_unused, root=args.root)
    if not apply:
        return model, regraft.diff(model, args.checkpoint, **options)
    return model, regraft.load(
        model, args.checkpoint, strict=args.strict, freeze=args.freeze,
        progress=progress_printer(not args.json), **options,
    )


def diff(args: argparse.Namespace) -> int:
    """``regraft diff CKPT --model SPEC``: the plan, nothing loaded."""
    _, report = _report(args, apply=False)
    problems = report.plan.problems()
    text = str(report)
    if problems:
        text += "\nA strict load would refuse:\n  " + "\n  ".join(problems)
    data = report.to_dict()
    data["strict_problems"] = problems
    emit(data, text, args.json)
    return 0


def load(args: argparse.Namespace) -> int:
    """``regraft load CKPT --model SPEC --out OUT``: load, then write the new model's weights."""
    from regraft.targets import save_weights

    model, report = _report(args, apply=True)
    written = save_weights(model, args.out)
    data = report.to_dict()
    data["written"] = written
    emit(data, str(report) + "\nwrote " + ", ".join(os.path.relpath(w) for w in written), args.json)
    return 0


def demo(args: argparse.Namespace) -> int:
    """``regraft demo``: the three classic situations, end to end."""
    from regraft.demo import run_demo

    info("Building three example models and their checkpoints in a temporary folder…")
    run_demo()
    return 0
