"""The CLI commands. Each takes the parsed arguments and returns an exit code."""

from __future__ import annotations

import argparse
import os
from collections import Counter

from regraft.cli.output import emit, info, progress_printer
from regraft.errors import RegraftError
from regraft.keys import namespace
from regraft.naming import collapse, text_table

__all__ = ["inspect", "diff", "plan", "load", "apply", "convert", "demo"]


def inspect(args: argparse.Namespace) -> int:
    """``regraft inspect CKPT``: every tensor's key, shape, dtype and kind, from metadata only."""
    from regraft.sources import without_gc

    with without_gc():
        # The listing is made in a function whose objects (~40 a tensor) are all freed when it
        # returns: the collector, enabled again, does not walk 400,000 of them at 10,000 tensors.
        data, text = _listing(args)
    emit(data, text, args.json)
    return 0


def _listing(args: argparse.Namespace) -> tuple[dict, str]:
    """What ``regraft inspect`` prints: the JSON data (entries included with ``--json``) and the text."""
    from regraft.sources import open_source

    with open_source(args.checkpoint, allow_outside_state=args.allow_outside_state) as source:
        entries = source.entries()
        kinds = Counter(e.kind for e in entries)
        weights = [e for e in entries if e.kind == "weight"]
        data = {
            "path": source.path,
            "format": source.format,
            "namespace": source.namespace,
            "files": list(source.files),
            "objects": [r for r in source.roots() if r] if namespace(source.namespace).saved_objects else [],
            "counts": dict(kinds),
            "parameters": sum(e.size for e in weights),
        }
        if args.json:
            data["entries"] = [
                {"key": e.key, "shape": list(e.shape), "dtype": e.dtype, "kind": e.kind, "layer_name": e.layer_name,
                 "aliases": list(e.aliases), "slot_of": e.slot_of}
                for e in entries
            ]
            return data, ""
        shown = entries if args.all else weights
        header = ("KEY", "SHAPE", "DTYPE", "KIND", "LAYER NAME") + (("SLOT OF",) if args.all else ())
        rows = [header] + [
            (e.key, str(tuple(e.shape)), e.dtype, e.kind, e.layer_name or "") + ((e.slot_of or "",) if args.all else ())
            for e in shown
        ]
        table = text_table(rows)
        objects = f"; objects: {', '.join(collapse(data['objects']))}" if data["objects"] else ""
        hidden = len(entries) - len(shown)
        text = (
            f"{source.path} [{source.format}]{objects}\n{table}\n"
            f"{kinds['weight']} weights ({data['parameters']:,} parameters), "
            f"{kinds['optimizer_slot']} optimizer slots, {kinds['bookkeeping']} bookkeeping"
            + (" (not listed; --all lists them)" if hidden else "")
        )
    return data, text


def _options(args: argparse.Namespace) -> dict:
    return dict(rules=args.rules, rename=args.rename, allow_missing=args.allow_missing,
                allow_unused=args.allow_unused, root=args.root, reshape=args.reshape, noise=args.noise,
                accept_order=args.accept_order, allow_outside_state=args.allow_outside_state)


def diff(args: argparse.Namespace) -> int:
    """``regraft diff CKPT --model SPEC``: the plan grouped by outcome; nothing loaded."""
    import regraft
    from regraft.cli.modelspec import build_model
    from regraft.report import LoadReport

    model = build_model(args.model)
    optimizer = _compiled_optimizer(model, args.model) if args.optimizer else None
    plan = regraft.plan(model, args.checkpoint, optimizer=optimizer, **_options(args))
    report = LoadReport.build(plan, None)
    problems = plan.problems()
    text = report.grouped() + (("\n\n" + report.table()) if args.table else "")
    if plan.optimizer_assignments:
        text += "\n\n" + report.optimizer_table()
    if problems:
        # Shape mismatches are listed above already: count them here instead of listing them twice.
        mismatches = sum(1 for p in problems if p.startswith("shape mismatch:"))
        rest = [p for p in problems if not p.startswith("shape mismatch:")]
        if mismatches:
            rest.insert(0, f"{mismatches} shape mismatch{'es' if mismatches > 1 else ''} (see above; "
                           "--table lists every variable)")
        text += "\nA strict load would refuse:\n  " + "\n  ".join(rest)
    data = report.to_dict()
    data["strict_problems"] = problems
    emit(data, text, args.json)
    return 0


def plan(args: argparse.Namespace) -> int:
    """``regraft plan CKPT --model SPEC -o PLAN``: write the plan file."""
    import regraft
    from regraft.cli.modelspec import build_model
    from regraft.planfile import save_plan
    from regraft.report import LoadReport

    model = build_model(args.model)
    optimizer = _compiled_optimizer(model, args.model) if args.optimizer else None
    the_plan = regraft.plan(model, args.checkpoint, optimizer=optimizer, **_options(args))
    save_plan(the_plan, args.output)
    report = LoadReport.build(the_plan, None)
    data = report.to_dict()
    data["plan_file"] = args.output
    emit(data, report.grouped() + f"\nplan written to {args.output}", args.json)
    return 0


def load(args: argparse.Namespace) -> int:
    """``regraft load CKPT --model SPEC --out OUT``: load, then write the new model's weights."""
    import regraft
    from regraft.cli.modelspec import build_model

    _check_out(args.out, args.optimizer)
    model = build_model(args.model)
    optimizer = _compiled_optimizer(model, args.model) if args.optimizer else None
    report = regraft.load(model, args.checkpoint, strict=args.strict, freeze=args.freeze, optimizer=optimizer,
                          progress=progress_printer(not args.json, model), **_options(args))
    return _write(model, report, args, optimizer)


def _compiled_optimizer(model, spec: str):
    """The optimizer the ``--model`` function compiled the model with (``model.optimizer``)."""
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None:
        raise RegraftError(
            f"--optimizer: the model {spec} returned is not compiled, so it has no optimizer to load into.",
            hint="Compile the model in that function (model.compile(optimizer=keras.optimizers.Adam(...), ...)).",
        )
    return optimizer


def apply(args: argparse.Namespace) -> int:
    """``regraft apply PLAN --model SPEC --out OUT``: apply a plan file as written."""
    from regraft.cli.modelspec import build_model
    from regraft.applying import apply
    from regraft.planfile import read_plan

    _check_out(args.out, args.optimizer)
    model = build_model(args.model)
    optimizer = _compiled_optimizer(model, args.model) if args.optimizer else None
    the_plan = read_plan(args.plan_file, model)
    report = apply(the_plan, model, freeze=args.freeze, progress=progress_printer(not args.json, model),
                   optimizer=optimizer)
    return _write(model, report, args, optimizer)


#: What ``--out`` writes, by how the name ends; a name with no extension is a TF checkpoint prefix.
WRITTEN = {".weights.h5": "Keras weights", ".keras": "Keras model archive (config and weights)",
           ".safetensors": "safetensors (readable variable keys)"}
_NOT_WRITTEN = (".h5", ".hdf5", ".weights.json", ".json", ".npz", ".npy", ".pb", ".pt", ".pth", ".bin", ".ckpt.index",
                ".index", ".zip", ".yaml", ".yml")


def out_format(out: str) -> str:
    """The output format ``--out`` names: a key of :data:`WRITTEN`, or ``"checkpoint"`` for a TF prefix.

    Raises:
        RegraftError: the name ends with an extension regraft does not write.
    """
    for ext in WRITTEN:
        if out.endswith(ext):
            return ext
    base = os.path.basename(out)
    refused = next((ext for ext in _NOT_WRITTEN if base.endswith(ext)), None)
    if refused is not None:
        raise RegraftError(
            f"--out {out}: regraft does not write {refused} files. It writes "
            + ", ".join(f"{ext} ({what})" for ext, what in WRITTEN.items())
            + ", or a TensorFlow checkpoint when the name has no extension (out/ckpt).",
            hint="End --out with .weights.h5, .keras or .safetensors, or give a checkpoint prefix without an "
            "extension.",
        )
    return "checkpoint"


def _check_out(out: str, optimizer: bool = False) -> None:
    """Refuse, before any work, an ``--out`` regraft would not write.

    A format it does not write, a folder, a name too long, a folder that is not
    writable, or (``optimizer``) a format that does not carry the optimizer. The writer
    checks again, and reports what only writing finds (a full disk).
    """
    from regraft.writing import bundle_names, check_out_path

    if optimizer and out.endswith((".weights.h5", ".keras", ".safetensors")):
        raise RegraftError(f"--optimizer needs a TensorFlow checkpoint for --out, not {out}: "
                           "regraft writes the optimizer's state only into a TF checkpoint.",
                           hint="Give --out a checkpoint prefix without an extension (out/ckpt).")
    fmt = out_format(out)
    if fmt != "checkpoint":
        check_out_path(out, what="the model" if fmt == ".keras" else "the weights", example="model" + fmt)
        return
    base = os.path.basename(out)
    check_out_path(out, what="the checkpoint", suffixes=tuple(n[len(base):] for n in bundle_names(base, 2)),
                   example="ckpt")


def convert(args: argparse.Namespace) -> int:
    """``regraft convert OLD --like NEW_WEIGHTS --out OUT``: checkpoint to checkpoint, no model code."""
    from regraft.api import convert_files

    _check_out(args.out)
    options = _options(args)
    del options["noise"]
    report, written = convert_files(args.checkpoint, args.like, args.out, strict=args.strict,
                                    progress=progress_printer(not args.json), **options)
    data = report.to_dict()
    data["written"] = written
    emit(data, str(report) + "\nwrote " + ", ".join(os.path.relpath(w) for w in written), args.json)
    return 0


def _write(model, report, args: argparse.Namespace, optimizer=None) -> int:
    from regraft.targets import target_for

    counts = report.counts()
    if not (counts["loaded"] + counts["cast"] + counts["transformed"]):
        raise RegraftError(
            f"Nothing was loaded from {report.plan.source_path}: no variable of the model matched "
            "(the checkpoint may belong to another model); nothing was written.",
            hint="Check the checkpoint and --model; `regraft diff` shows what matched and what did not.",
        )
    written = target_for(model).save(args.out, optimizer) if optimizer is not None else target_for(model).save(args.out)
    if report.frozen:
        info("Warning: weights files do not keep trainable flags; freeze these layers in code after loading: "
             + ", ".join(report.frozen))
    data = report.to_dict()
    data["written"] = written
    emit(data, str(report) + "\nwrote " + ", ".join(os.path.relpath(w) for w in written), args.json)
    return 0


def demo(args: argparse.Namespace) -> int:
    """``regraft demo``: four model changes, end to end."""
    from regraft.demo import run_demo

    info("Building four pairs of example models and their checkpoints in a temporary folder…")
    run_demo()
    return 0
