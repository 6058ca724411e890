#!/usr/bin/env python
"""Time regraft.plan on a model of about 10,000 variables whose architecture changed.

The old model is a flat functional chain of ``Dense(8) -> BatchNormalization``
pairs (6 variables per pair), with enough pairs to reach ``--variables``. Every
layer has an explicit name (``dense_17``, ``bn_17``). The script fills its
variables with seeded random values and saves it as a TF checkpoint and as a
Keras ``.weights.h5`` file. The new model is the same chain with three
``LayerNormalization`` layers inserted at 1/4, 1/2 and 3/4 of the depth and one
``BatchNormalization`` removed at 3/5 of the depth.

It then times, interleaved, ``--repeat`` runs (median reported) of:

  plan-tf       regraft.plan(new, prefix)                                 metadata only
  plan-h5       regraft.plan(new, "old.weights.h5")                        metadata only
  tf-read       tf.train.Checkpoint(model=new).read(prefix).expect_partial()   loads data
  load-weights  new.load_weights("old.weights.h5", skip_mismatch=True)     loads data

The two native loaders also read every tensor, so they are context, not a like-
for-like comparison.

It also times, in the same interleaved runs, listing each file's tensors from a
fresh process (process start and imports included, output to /dev/null):

  inspect-tf    python -m regraft inspect prefix
  inspect-h5    python -m regraft inspect old.weights.h5
  tf-list       python -c "tf.train.list_variables(prefix)"            TensorFlow's listing
  h5py-list     python -c "h5py: visit every dataset, read its shape and dtype"

and, in this process, ``regraft.open(path)`` with ``entries()`` (open-tf, open-h5:
the part of ``inspect`` that grows with the number of tensors). Unless ``--no-verify`` is given, the first run of each
native loader, and one extra ``regraft.load`` per format (timed once, not part
of the ratios), are checked by value, as in ``bench_align.py``: each new variable is ``recovered``
(holds the old variable with the same layer and variable name), ``wrong``
(holds another old variable) or ``fresh`` (holds none). The script exits with
status 1 if regraft gets any variable wrong, if its report disagrees with the
model's values, or if ``--max-plan-seconds`` is given and a median plan time
exceeds it.

Run ``python bench/bench_plan_speed.py --help`` for the options; README.md
beside this file explains how to read the output.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_align import FRESH, RECOVERED, WRONG, Snapshot, classify, log, quiet, randomise, variables_by_path, zero

if TYPE_CHECKING:
    import keras

WIDTH = 8
VARS_PER_PAIR = 6  # Dense: kernel, bias; BatchNormalization: gamma, beta, moving_mean, moving_variance
INSERT_AT = (0.25, 0.5, 0.75)  # LayerNormalization inserted after the pair at this share of the depth
REMOVE_AT = 0.6  # BatchNormalization of the pair at this share of the depth is removed
MODES = ("plan-tf", "plan-h5", "tf-read", "load-weights", "open-tf", "open-h5", "inspect-tf", "inspect-h5",
         "tf-list", "h5py-list")
# Listing in a fresh process, as a user runs it: the command per mode (the file path is appended).
LISTERS = {
    "inspect-tf": [sys.executable, "-m", "regraft", "inspect"],
    "inspect-h5": [sys.executable, "-m", "regraft", "inspect"],
    "tf-list": [sys.executable, "-c", "import sys, tensorflow as tf; tf.train.list_variables(sys.argv[1])"],
    # visititems stops at the first callback that returns something: the callback returns None.
    "h5py-list": [sys.executable, "-c", "import sys, h5py; f = h5py.File(sys.argv[1], 'r'); found = []; "
                  "f.visititems(lambda n, o: found.append((o.shape, o.dtype)) if isinstance(o, h5py.Dataset) else None); "
                  "assert found"],
}
# Deep functional graphs recurse once per layer when Keras maps them.
STACK_BYTES = 1 << 30
RECURSION_LIMIT = 1_000_000


@dataclass
class Timing:
    mode: str
    seconds: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


@dataclass
class Check:
    """Value check of one load: new variables by what they hold."""

    loader: str
    eligible: int
    recovered: int
    wrong: int
    fresh: int
    seconds: float
    raised: str | None = None
    wrong_variables: list[str] = field(default_factory=list)
    report_mismatches: list[str] = field(default_factory=list)


@dataclass
class PlanOutcome:
    format: str
    statuses: dict[str, int]
    loaded: int  # variables the plan writes (loaded or cast)
    fresh: int  # variables the plan leaves at their initial value
    unused: int
    inserted: list[str]
    removed: list[str]
    stages: dict[str, int]


def build(pairs: int, changed: bool) -> keras.Model:
    """The chain of Dense+BN pairs; ``changed`` inserts 3 LayerNormalization and removes 1 BN."""
    import keras

    inserts = {max(0, min(pairs - 1, int(pairs * f))): k for k, f in enumerate(INSERT_AT)} if changed else {}
    remove = int(pairs * REMOVE_AT) if changed else -1
    x = inputs = keras.Input((WIDTH,), name="inputs")
    for i in range(pairs):
        x = keras.layers.Dense(WIDTH, name=f"dense_{i}")(x)
        if i != remove:
            x = keras.layers.BatchNormalization(name=f"bn_{i}")(x)
        if i in inserts:
            x = keras.layers.LayerNormalization(name=f"inserted_ln_{inserts[i]}")(x)
    return keras.Model(inputs, x, name="changed" if changed else "original")


def listed(mode: str, path: str) -> Callable[[], None]:
    """Run the listing command of ``mode`` on ``path`` in a fresh process; raise if it fails."""
    import subprocess

    def run() -> None:
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
        done = subprocess.run([*LISTERS[mode], path], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        if done.returncode:
            raise RuntimeError(f"exit status {done.returncode}: {done.stderr.decode(errors='replace')[-300:]}")

    return run


def opened(path: str) -> Callable[[], int]:
    """``regraft.open(path)`` and its entries, in this process: what ``inspect`` spends per tensor."""
    import regraft

    def run() -> int:
        with regraft.open(path) as source:
            return len(source.entries())

    return run


def timed(fn: Callable[[], Any]) -> tuple[float, Any, str | None]:
    start = time.perf_counter()
    try:
        value = fn()
        raised = None
    except Exception as exc:  # noqa: BLE001 - the benchmark records any failure
        value, raised = None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
    return time.perf_counter() - start, value, raised


def value_check(loader: str, new_vars: dict[str, Any], old: Snapshot, seconds: float, raised: str | None) -> Check:
    status, holds, eligible = classify(new_vars, old)
    counts = Counter(status.values())
    return Check(
        loader=loader, eligible=len(eligible),
        recovered=sum(1 for k in eligible if status[k] == RECOVERED),
        wrong=counts[WRONG], fresh=counts[FRESH], seconds=seconds, raised=raised,
        wrong_variables=[f"{k} <- {holds[k]}" for k in new_vars if status[k] == WRONG],
    )


def report_mismatches(report: Any, new_vars: dict[str, Any], old: Snapshot) -> list[str]:
    """Rows whose status disagrees with the value the model holds."""
    status, holds, _ = classify(new_vars, old)
    out = []
    for r in report.rows():
        key = r["target"]
        if key not in status:
            out.append(f"report row {key!r} names no model variable")
        elif r["status"] in ("loaded", "cast") and status[key] == FRESH:
            out.append(f"{key}: report says {r['status']} from {r['source']}, value is fresh")
        elif r["status"] not in ("loaded", "cast") and status[key] != FRESH:
            out.append(f"{key}: report says {r['status']}, value came from {holds[key]}")
    return out


def outcome(fmt: str, plan: Any) -> PlanOutcome:
    statuses = Counter(str(a.status) for a in plan.assignments)
    loaded = sum(1 for a in plan.assignments if a.status in ("loaded", "cast"))
    return PlanOutcome(
        format=fmt, statuses=dict(statuses), loaded=loaded, fresh=len(plan.assignments) - loaded,
        unused=len(plan.unused), inserted=list(plan.inserted), removed=list(plan.removed),
        stages=dict(Counter(str(a.stage) or "-" for a in plan.assignments)),
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time regraft.plan on a ~10,000-variable changed model, with tf.train.Checkpoint.read "
        "and Keras load_weights on the same model as context.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--variables", type=int, default=10_000,
                        help=f"minimum number of variables of the saved model ({VARS_PER_PAIR} per Dense+BN pair)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per mode (the median is reported)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the saved model's random values")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip the value checks (and the extra regraft.load per format)")
    parser.add_argument("--max-plan-seconds", type=float, default=None,
                        help="exit 1 if the median plan time of either format exceeds this")
    parser.add_argument("--json", action="store_true",
                        help="print the results as JSON on stdout; the human-readable output goes to stderr")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="write the checkpoints here and keep them; if not given, a temporary directory is used "
                        "and removed at the end")
    args = parser.parse_args(argv)
    if args.variables < 10 * VARS_PER_PAIR:
        parser.error(f"--variables must be at least {10 * VARS_PER_PAIR}")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    return args


def run(args: argparse.Namespace) -> int:
    out: TextIO = sys.stderr if args.json else sys.stdout

    import keras
    import regraft
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")
    pairs = math.ceil(args.variables / VARS_PER_PAIR)
    log(out, f"command: {shlex.join([sys.executable, *sys.argv])}")
    log(out, f"python {platform.python_version()}, tensorflow {tf.__version__}, keras {keras.__version__}, "
             f"regraft {regraft.__version__} ({Path(regraft.__file__).parent})")

    tmp = None
    if args.workdir is None:
        tmp = tempfile.mkdtemp(prefix="bench_plan_speed_")
        workdir = Path(tmp)
    else:
        workdir = args.workdir
        workdir.mkdir(parents=True, exist_ok=True)
    try:
        start = time.perf_counter()
        with quiet(out):
            old = build(pairs, changed=False)
        build_old = time.perf_counter() - start
        snapshot = randomise(old, args.seed)
        prefix, h5 = str(workdir / "old" / "ckpt"), str(workdir / "old.weights.h5")
        start = time.perf_counter()
        tf.train.Checkpoint(model=old).write(prefix)
        write_tf = time.perf_counter() - start
        start = time.perf_counter()
        with quiet(out):
            old.save_weights(h5)
        write_h5 = time.perf_counter() - start
        old_count = len(old.weights)
        del old
        start = time.perf_counter()
        with quiet(out):
            new = build(pairs, changed=True)
        build_new = time.perf_counter() - start
        new_vars = variables_by_path(new)
        eligible = sum(1 for k, v in new_vars.items() if snapshot.shapes.get(k) == tuple(v.shape))
        log(out, f"saved model: {pairs} Dense({WIDTH})+BatchNormalization pairs, {old_count} variables "
                 f"(built in {build_old:.1f} s; tf write {write_tf:.1f} s, h5 save {write_h5:.1f} s)")
        log(out, f"changed model: {len(new_vars)} variables, {eligible} with a counterpart "
                 f"(3 LayerNormalization inserted, 1 BatchNormalization removed; built in {build_new:.1f} s)")
        log(out, f"files: {prefix} ({sum(p.stat().st_size for p in Path(prefix).parent.iterdir()) / 1e6:.1f} MB), "
                 f"{h5} ({Path(h5).stat().st_size / 1e6:.1f} MB)")
        log(out)

        checks: list[Check] = []
        outcomes: dict[str, PlanOutcome] = {}
        failures: list[str] = []
        if not args.no_verify:
            for fmt, path in (("tf", prefix), ("h5", h5)):
                zero(new)
                with quiet(out):
                    seconds, report, raised = timed(functools.partial(regraft.load, new, path, strict=False))
                check = value_check(f"regraft.load-{fmt}", new_vars, snapshot, seconds, raised)
                if report is not None:
                    check.report_mismatches = report_mismatches(report, new_vars, snapshot)
                checks.append(check)

        timings = {m: Timing(m) for m in MODES}
        for rep in range(args.repeat):
            for mode in MODES:
                verify_now = rep == 0 and not args.no_verify and mode in ("tf-read", "load-weights")
                if verify_now:
                    zero(new)
                with quiet(out):
                    if mode == "plan-tf":
                        seconds, value, raised = timed(lambda: regraft.plan(new, prefix))
                    elif mode == "plan-h5":
                        seconds, value, raised = timed(lambda: regraft.plan(new, h5))
                    elif mode == "tf-read":
                        seconds, value, raised = timed(
                            lambda: tf.train.Checkpoint(model=new).read(prefix).expect_partial())
                    elif mode == "load-weights":
                        seconds, value, raised = timed(lambda: new.load_weights(h5, skip_mismatch=True))
                    elif mode in ("open-tf", "open-h5"):
                        seconds, value, raised = timed(opened(prefix if mode == "open-tf" else h5))
                    else:
                        seconds, value, raised = timed(listed(mode, prefix if mode in ("inspect-tf", "tf-list") else h5))
                timings[mode].seconds.append(seconds)
                if raised and (mode.startswith(("plan", "open", "inspect"))):
                    failures.append(f"{mode} raised {raised}")
                if mode.startswith("plan") and value is not None and rep == 0:
                    outcomes[mode[-2:]] = outcome(mode[-2:], value)
                if verify_now:
                    checks.append(value_check(mode, new_vars, snapshot, seconds, raised))
                log(out, f"run {rep + 1}/{args.repeat} {mode:12} {seconds:7.2f} s"
                         + (f"  raised {raised}" if raised else ""))
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    log(out)
    header = ("mode", "median s", "min s", "max s", "runs")
    rows = [(t.mode, f"{t.median:.2f}", f"{min(t.seconds):.2f}", f"{max(t.seconds):.2f}", str(len(t.seconds)))
            for t in timings.values()]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        log(out, "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    ratios = {
        "plan-tf / tf-read": timings["plan-tf"].median / timings["tf-read"].median,
        "plan-h5 / load-weights": timings["plan-h5"].median / timings["load-weights"].median,
        "inspect-tf / tf-list": timings["inspect-tf"].median / timings["tf-list"].median,
        "inspect-h5 / h5py-list": timings["inspect-h5"].median / timings["h5py-list"].median,
    }
    for name, value in ratios.items():
        log(out, f"{name}: {value:.2f}")
    log(out)
    for fmt, o in outcomes.items():
        log(out, f"plan-{fmt}: {o.loaded} variables loaded, {o.fresh} left fresh {o.statuses}; {o.unused} unused; "
                 f"stages {o.stages}; inserted {o.inserted}; removed {o.removed}")
    for c in checks:
        log(out, f"value check {c.loader:18} eligible {c.eligible}: {c.recovered} recovered, {c.wrong} wrong, "
                 f"{c.fresh} fresh ({c.seconds:.2f} s)" + (f"; raised {c.raised}" if c.raised else ""))
        if c.loader.startswith("regraft"):
            if c.raised:
                failures.append(f"{c.loader} raised {c.raised}")
            if c.wrong:
                failures.append(f"{c.loader}: {c.wrong} wrong: " + ", ".join(c.wrong_variables[:20])
                                + (" ..." if c.wrong > 20 else ""))
            failures.extend(f"{c.loader}: report disagrees with the model: {m}" for m in c.report_mismatches[:20])
    if args.max_plan_seconds is not None:
        for mode in ("plan-tf", "plan-h5"):
            if timings[mode].median > args.max_plan_seconds:
                failures.append(f"{mode} median {timings[mode].median:.2f} s > {args.max_plan_seconds} s")
    log(out)
    if failures:
        log(out, "FAILED:")
        for f in failures:
            log(out, f"  - {f}")
    else:
        log(out, "OK")
    if args.json:
        payload = {
            "command": [sys.executable, *sys.argv],
            "versions": {"python": platform.python_version(), "tensorflow": tf.__version__,
                         "keras": keras.__version__, "regraft": regraft.__version__},
            "pairs": pairs, "old_variables": old_count, "new_variables": len(new_vars), "eligible": eligible,
            "build_seconds": {"old": build_old, "new": build_new},
            "write_seconds": {"tf": write_tf, "h5": write_h5},
            "timings": {m: {"median": t.median, "seconds": t.seconds} for m, t in timings.items()},
            "ratios": ratios,
            "plans": {fmt: asdict(o) for fmt, o in outcomes.items()},
            "value_checks": [asdict(c) for c in checks],
            "failures": failures,
            "ok": not failures,
        }
        json.dump(payload, sys.stdout, indent=2)
        sys.stdout.write("\n")
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    return run_on_deep_stack(run, parse_args(argv))


def run_on_deep_stack(work, args) -> int:
    """``work(args)`` in a thread with a large stack and a high recursion limit.

    Keras maps a deep functional graph recursively (a few frames per layer).
    """
    sys.setrecursionlimit(RECURSION_LIMIT)
    threading.stack_size(STACK_BYTES)
    result: list[int] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            result.append(work(args))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
            errors.append(exc)

    thread = threading.Thread(target=target, name="bench")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return result[0]

if __name__ == "__main__":
    sys.exit(main())
