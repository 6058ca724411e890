#!/usr/bin/env python
"""Measure how accurately regraft maps old weights onto a grown architecture.

For each architecture pair (old -> new) the script builds the old model with
``keras.applications`` (``include_top=False, weights=None``), fills every
variable with seeded random values so that no two tensors are equal, and saves
it twice: as a TF checkpoint (``tf.train.Checkpoint(model=old).write(prefix)``)
and as a Keras ``old.save_weights("old.weights.h5")`` file. It then loads each
file into a fresh new model (every variable zeroed first) with:

  tf-read        tf.train.Checkpoint(model=new).read(prefix).expect_partial()   (TF format)
  load-weights   new.load_weights(h5, skip_mismatch=True)                        (.h5 format)
  regraft        regraft.load(new, path, strict=False)                           (both formats)

Each new variable is then classified by its VALUE, not by any key:

  recovered  equals the old variable with the same layer name, variable name and shape
  wrong      equals some other old variable (a wrong assignment)
  fresh      equals no old variable (left at zero, or not loaded at all)

"Eligible" variables are the new ones that have such a counterpart. The check
that the script enforces: regraft recovers at least ``--min-recovered`` (98%)
of the eligible variables with 0 wrong in every (pair, format) case; otherwise
it exits with status 1.

Run ``python bench/bench_align.py --help`` for the options; README.md beside
this file explains how to read the output.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    import keras
    import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

# pair name -> (old application, new application)
PAIRS: dict[str, tuple[str, str]] = {
    "vgg": ("VGG16", "VGG19"),
    "resnet": ("ResNet50", "ResNet101"),
}
FORMATS = ("tf", "h5")
METHODS: dict[str, tuple[str, ...]] = {"tf": ("tf-read", "regraft"), "h5": ("load-weights", "regraft")}
RECOVERED, WRONG, FRESH = "recovered", "wrong", "fresh"


@dataclass
class Result:
    """One load of one checkpoint file into a fresh new model."""

    pair: str
    old: str
    new: str
    format: str
    method: str
    new_variables: int
    eligible: int
    recovered: int
    wrong: int
    fresh: int
    fresh_eligible: int  # eligible variables left fresh
    load_seconds: float
    raised: str | None = None
    warnings: int = 0
    wrong_variables: list[dict[str, str]] = field(default_factory=list)
    # regraft only
    plan_seconds: float | None = None
    statuses: dict[str, int] | None = None
    stages: dict[str, int] | None = None
    confidence: dict[str, int] | None = None  # "stage@confidence" -> count
    by_order: int | None = None  # rows whose reason says "placed by order"
    aligned_below_1: int | None = None  # stage 'aligned' with confidence < 1
    report_mismatches: list[str] = field(default_factory=list)

    @property
    def recovered_share(self) -> float:
        return self.recovered / self.eligible if self.eligible else 1.0


@dataclass(frozen=True)
class Snapshot:
    """The old model's values: which variable each distinct tensor came from."""

    by_digest: dict[str, str]  # value digest -> old variable path
    shapes: dict[str, tuple[int, ...]]  # old variable path -> shape


def log(out: TextIO, text: str = "") -> None:
    print(text, file=out, flush=True)


def variables_by_path(model: keras.Model) -> dict[str, Any]:
    """Every variable of a flat functional model as ``layer.name/variable.name`` -> variable.

    Raises if a variable is reached twice, or if ``model.weights`` holds a variable
    that no layer lists, so the ground truth never silently drops one.
    """
    out: dict[str, Any] = {}
    for layer in model.layers:
        for v in layer.weights:
            key = f"{layer.name}/{v.name}"
            if key in out:
                raise RuntimeError(f"variable path {key} appears twice in model {model.name}")
            out[key] = v
    if len(out) != len(model.weights):
        raise RuntimeError(f"{model.name}: layers list {len(out)} variables, model.weights has {len(model.weights)}")
    return out


def digest(value: np.ndarray) -> str:
    """Identity of a tensor's value: dtype, shape and bytes."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{value.dtype.str}{value.shape}".encode())
    h.update(value.tobytes())
    return h.hexdigest()


def build(app: str, input_size: int) -> keras.Model:
    import keras

    factory: Callable[..., keras.Model] = getattr(keras.applications, app)
    return factory(include_top=False, weights=None, input_shape=(input_size, input_size, 3))


def randomise(model: keras.Model, seed: int) -> Snapshot:
    """Give every variable seeded random values, all distinct; return their digests."""
    import numpy as np

    by_digest: dict[str, str] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for i, (key, v) in enumerate(variables_by_path(model).items()):
        rng = np.random.default_rng([seed, i])
        dtype = np.dtype(v.dtype)
        shape = tuple(int(d) for d in v.shape)
        if dtype.kind == "f":
            value = rng.standard_normal(shape).astype(dtype)
        else:
            value = rng.integers(1, 1 << 20, size=shape).astype(dtype)
        v.assign(value)
        d = digest(np.asarray(v.numpy()))
        if d in by_digest:
            raise RuntimeError(f"old variables {by_digest[d]} and {key} have equal values; pick another seed")
        by_digest[d] = key
        shapes[key] = shape
    return Snapshot(by_digest, shapes)


def zero(model: keras.Model) -> None:
    import numpy as np

    for v in model.weights:
        v.assign(np.zeros(tuple(v.shape), dtype=np.dtype(v.dtype)))


@contextlib.contextmanager
def quiet(out: TextIO) -> Iterator[list[warnings.WarningMessage]]:
    """Collect Python warnings and keep anything printed on stdout off ``--json`` output."""
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(out):
        warnings.simplefilter("always")
        yield caught


def classify(
    new_vars: dict[str, Any], old: Snapshot
) -> tuple[dict[str, str], dict[str, str | None], set[str]]:
    """Status of each new variable by value, the old variable it holds, and the eligible set."""
    import numpy as np

    status: dict[str, str] = {}
    holds: dict[str, str | None] = {}
    eligible: set[str] = set()
    for key, v in new_vars.items():
        shape = tuple(int(d) for d in v.shape)
        if old.shapes.get(key) == shape:
            eligible.add(key)
        source = old.by_digest.get(digest(np.asarray(v.numpy())))
        holds[key] = source
        if source is None:
            status[key] = FRESH
        elif source == key:
            status[key] = RECOVERED
        else:
            status[key] = WRONG
    return status, holds, eligible


def run_case(
    pair: str, old_app: str, new_app: str, fmt: str, method: str, path: str, old: Snapshot,
    input_size: int, out: TextIO,
) -> Result:
    import regraft
    import tensorflow as tf

    new = build(new_app, input_size)
    new_vars = variables_by_path(new)
    zero(new)
    raised: str | None = None
    plan_seconds: float | None = None
    report: Any = None
    with quiet(out) as caught:
        if method == "regraft":
            start = time.perf_counter()
            regraft.plan(new, path)
            plan_seconds = time.perf_counter() - start
        start = time.perf_counter()
        try:
            if method == "tf-read":
                tf.train.Checkpoint(model=new).read(path).expect_partial()
            elif method == "load-weights":
                new.load_weights(path, skip_mismatch=True)
            else:
                report = regraft.load(new, path, strict=False)
        except Exception as exc:  # noqa: BLE001 - the benchmark records any failure
            raised = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
        load_seconds = time.perf_counter() - start
    status, holds, eligible = classify(new_vars, old)
    counts = Counter(status.values())
    result = Result(
        pair=pair, old=old_app, new=new_app, format=fmt, method=method,
        new_variables=len(new_vars), eligible=len(eligible),
        recovered=sum(1 for k in eligible if status[k] == RECOVERED),
        wrong=counts[WRONG], fresh=counts[FRESH],
        fresh_eligible=sum(1 for k in eligible if status[k] == FRESH),
        load_seconds=load_seconds, raised=raised, warnings=len(caught),
        wrong_variables=[{"variable": k, "holds": str(holds[k])} for k in new_vars if status[k] == WRONG],
        plan_seconds=plan_seconds,
    )
    if report is not None:
        describe_report(result, report, status, holds)
    del new
    return result


def describe_report(result: Result, report: Any, status: dict[str, str], holds: dict[str, str | None]) -> None:
    """Decisions per stage from ``report.rows()``, and rows whose claim disagrees with the values."""
    rows: list[dict[str, Any]] = report.rows()
    result.statuses = dict(Counter(r["status"] for r in rows))
    result.stages = dict(Counter(r["stage"] or "-" for r in rows))
    result.confidence = dict(Counter(f"{r['stage'] or '-'}@{r['confidence']}" for r in rows))
    result.by_order = sum(1 for r in rows if "by order" in (r.get("reason") or ""))
    result.aligned_below_1 = sum(
        1 for r in rows if r["stage"] == "aligned" and r["confidence"] is not None and r["confidence"] < 1
    )
    seen: set[str] = set()
    for r in rows:
        key = r["target"]
        seen.add(key)
        if key not in status:
            result.report_mismatches.append(f"report row {key!r} names no model variable")
            continue
        writes = r["status"] in ("loaded", "cast")
        if writes and status[key] == FRESH:
            result.report_mismatches.append(f"{key}: report says {r['status']} from {r['source']}, value is fresh")
        if not writes and status[key] != FRESH:
            result.report_mismatches.append(f"{key}: report says {r['status']}, value came from {holds[key]}")
    for key in status:
        if key not in seen:
            result.report_mismatches.append(f"model variable {key!r} has no report row")


def save_old(old_app: str, input_size: int, seed: int, workdir: Path) -> tuple[Snapshot, dict[str, str], str]:
    """Build, randomise and save the old model; return its snapshot, the files, and a path check."""
    import tensorflow as tf

    old = build(old_app, input_size)
    snapshot = randomise(old, seed)
    paths_agree = sum(1 for k, v in variables_by_path(old).items() if getattr(v, "path", None) == k)
    path_note = f"{paths_agree}/{len(old.weights)} variables have v.path == layer.name/v.name"
    prefix = str(workdir / old_app / "ckpt")
    h5 = str(workdir / f"{old_app}.weights.h5")
    tf.train.Checkpoint(model=old).write(prefix)
    old.save_weights(h5)
    return snapshot, {"tf": prefix, "h5": h5}, path_note


def pct(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:.1f}%" if whole else "n/a"


def table(results: list[Result]) -> str:
    header = ("pair", "format", "method", "eligible", "recovered", "wrong", "fresh", "load s", "plan s", "raised")
    rows = []
    for r in results:
        rows.append((
            f"{r.old}->{r.new}", r.format, r.method, str(r.eligible),
            f"{r.recovered} ({pct(r.recovered, r.eligible)})", str(r.wrong), str(r.fresh),
            f"{r.load_seconds:.2f}", f"{r.plan_seconds:.2f}" if r.plan_seconds is not None else "-",
            r.raised.split(":")[0] if r.raised else "no",
        ))
    widths = [max(len(x[i]) for x in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *rows])


def check(results: list[Result], min_recovered: float) -> list[str]:
    """The acceptance check on every regraft result; one message per violation."""
    failures = []
    for r in results:
        if r.method != "regraft":
            continue
        case = f"{r.old}->{r.new} [{r.format}]"
        if r.raised:
            failures.append(f"{case}: regraft.load raised {r.raised}")
        if r.recovered_share < min_recovered:
            failures.append(f"{case}: recovered {r.recovered}/{r.eligible} ({pct(r.recovered, r.eligible)}) "
                            f"< {min_recovered:.0%}")
        if r.wrong:
            names = ", ".join(f"{w['variable']} <- {w['holds']}" for w in r.wrong_variables)
            failures.append(f"{case}: {r.wrong} wrong: {names}")
        for m in r.report_mismatches:
            failures.append(f"{case}: report disagrees with the model: {m}")
    return failures


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Accuracy of regraft.load on real architecture pairs (VGG16->VGG19, ResNet50->ResNet101), "
        "judged by tensor values, against tf.train.Checkpoint.read and Keras load_weights.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--pairs", default="vgg,resnet",
                        help=f"comma-separated pairs to run, from: {', '.join(PAIRS)}")
    parser.add_argument("--formats", default="tf,h5", help="comma-separated checkpoint formats: tf, h5")
    parser.add_argument("--input-size", type=int, default=64, help="side of the square input image")
    parser.add_argument("--seed", type=int, default=0, help="seed for the old models' random values")
    parser.add_argument("--min-recovered", type=float, default=0.98,
                        help="share of eligible variables regraft must recover (with 0 wrong)")
    parser.add_argument("--json", action="store_true",
                        help="print the results as JSON on stdout; the human-readable output goes to stderr")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="write the checkpoints here and keep them; if not given, a temporary directory is used "
                        "and removed at the end")
    args = parser.parse_args(argv)
    args.pair_list = [p.strip() for p in args.pairs.split(",") if p.strip()]
    args.format_list = [f.strip() for f in args.formats.split(",") if f.strip()]
    for p in args.pair_list:
        if p not in PAIRS:
            parser.error(f"unknown pair {p!r}; choose from {', '.join(PAIRS)}")
    for f in args.format_list:
        if f not in FORMATS:
            parser.error(f"unknown format {f!r}; choose from {', '.join(FORMATS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out: TextIO = sys.stderr if args.json else sys.stdout

    import keras
    import regraft
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")
    log(out, f"command: {shlex.join([sys.executable, *sys.argv])}")
    log(out, f"python {platform.python_version()}, tensorflow {tf.__version__}, keras {keras.__version__}, "
             f"regraft {regraft.__version__} ({Path(regraft.__file__).parent})")
    log(out, f"input {args.input_size}x{args.input_size}x3, seed {args.seed}, "
             f"acceptance: regraft recovers >= {args.min_recovered:.0%} of eligible variables with 0 wrong")
    log(out)

    tmp = None
    if args.workdir is None:
        tmp = tempfile.mkdtemp(prefix="bench_align_")
        workdir = Path(tmp)
    else:
        workdir = args.workdir
        workdir.mkdir(parents=True, exist_ok=True)
    results: list[Result] = []
    notes: dict[str, str] = {}
    try:
        for pair in args.pair_list:
            old_app, new_app = PAIRS[pair]
            with quiet(out):
                snapshot, files, path_note = save_old(old_app, args.input_size, args.seed, workdir)
            notes[pair] = path_note
            log(out, f"== {old_app} -> {new_app}: {len(snapshot.shapes)} old variables; {path_note}")
            for fmt in args.format_list:
                for method in METHODS[fmt]:
                    r = run_case(pair, old_app, new_app, fmt, method, files[fmt], snapshot, args.input_size, out)
                    results.append(r)
                    log(out, f"   {fmt:2} {method:12} {r.new_variables} new variables, {r.eligible} eligible: "
                             f"{r.recovered} recovered, {r.wrong} wrong, {r.fresh} fresh"
                             + (f"; raised {r.raised}" if r.raised else "")
                             + (f"; {r.warnings} warnings" if r.warnings else ""))
                    if r.method == "regraft":
                        log(out, f"      statuses {r.statuses}; stages {r.stages}")
                        log(out, f"      stage@confidence {r.confidence}; by_order (reason) {r.by_order}, "
                                 f"aligned with confidence < 1: {r.aligned_below_1}")
                        for m in r.report_mismatches:
                            log(out, f"      REPORT MISMATCH {m}")
                    for w in r.wrong_variables[:5]:
                        log(out, f"      wrong: {w['variable']} holds {w['holds']}")
                    if len(r.wrong_variables) > 5:
                        log(out, f"      ... and {len(r.wrong_variables) - 5} more wrong")
            keras.backend.clear_session()
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    log(out)
    log(out, table(results))
    plan_times = [r.plan_seconds for r in results if r.plan_seconds is not None]
    if plan_times:
        log(out, f"regraft plan time: median {statistics.median(plan_times):.2f} s over {len(plan_times)} cases "
                 "(one run each, includes opening the file)")
    failures = check(results, args.min_recovered)
    log(out)
    if failures:
        log(out, "FAILED: regraft does not meet the acceptance check:")
        for f in failures:
            log(out, f"  - {f}")
    else:
        cases = sum(1 for r in results if r.method == "regraft")
        log(out, f"OK: regraft recovered >= {args.min_recovered:.0%} of eligible variables with 0 wrong "
                 f"in all {cases} (pair, format) cases")
    if args.json:
        payload = {
            "command": [sys.executable, *sys.argv],
            "versions": {"python": platform.python_version(), "tensorflow": tf.__version__,
                         "keras": keras.__version__, "regraft": regraft.__version__},
            "input_size": args.input_size,
            "seed": args.seed,
            "min_recovered": args.min_recovered,
            "variable_path_check": notes,
            "results": [{**asdict(r), "recovered_share": r.recovered_share} for r in results],
            "failures": failures,
            "ok": not failures,
        }
        json.dump(payload, sys.stdout, indent=2)
        sys.stdout.write("\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
