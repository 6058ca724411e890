#!/usr/bin/env python
"""How planning time grows with the number of variables, against TF and Keras in the same run.

For each size in ``--sizes`` (variables of the saved model) the script builds the
``bench_plan_speed.py`` models (a chain of ``Dense(8) -> BatchNormalization`` pairs;
the new one has three ``LayerNormalization`` layers inserted and one
``BatchNormalization`` removed), saves the old one as a TF checkpoint and a
``.weights.h5``, and times, interleaved, ``--repeat`` runs (median reported; at the first size one untimed plan per format first) of:

  plan-tf       regraft.plan(new, prefix)                                 metadata only
  plan-h5       regraft.plan(new, "old.weights.h5")                        metadata only
  tf-read       tf.train.Checkpoint(model=new).read(prefix).expect_partial()   loads data
  load-weights  new.load_weights("old.weights.h5", skip_mismatch=True)     loads data

It prints one row per size, the ratios plan-tf / tf-read and plan-h5 /
load-weights, and for each mode the growth exponent: the least-squares slope of
log(time) against log(variables) over all sizes (1 is linear, 2 quadratic), and
the slope between the two largest sizes. With ``--max-exponent`` it exits 1 when
a plan's overall exponent exceeds it. Load time against bytes (0.25 to 4 GB) is
``bench_load.py``'s subject, not this script's.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_align import log, quiet  # noqa: E402
from bench_plan_speed import VARS_PER_PAIR, build, run_on_deep_stack  # noqa: E402

MODES = ("plan-tf", "plan-h5", "tf-read", "load-weights")


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log(y) against log(x)."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    den = sum((a - mx) ** 2 for a in lx)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / den if den else float("nan")


def run(args: argparse.Namespace) -> int:
    import keras  # noqa: F401
    import regraft
    import tensorflow as tf

    out = sys.stdout
    tf.get_logger().setLevel("ERROR")
    log(out, f"command: {' '.join([sys.executable, *sys.argv])}")
    rows: list[tuple[int, dict[str, float]]] = []
    failures: list[str] = []
    for size in args.sizes:
        pairs = math.ceil(size / VARS_PER_PAIR)
        work = Path(tempfile.mkdtemp(prefix="bench_scaling_"))
        try:
            with quiet(out):
                old = build(pairs, changed=False)
            prefix, h5 = str(work / "old" / "ckpt"), str(work / "old.weights.h5")
            tf.train.Checkpoint(model=old).write(prefix)
            with quiet(out):
                old.save_weights(h5)
            count = len(old.weights)
            del old
            with quiet(out):
                new = build(pairs, changed=True)
            times: dict[str, list[float]] = {m: [] for m in MODES}
            if not rows:  # the first plans import the planner and warm caches: not part of the growth
                with quiet(out):
                    regraft.plan(new, prefix)
                    regraft.plan(new, h5)
            for _ in range(args.repeat):
                for mode in MODES:
                    start = time.perf_counter()
                    with quiet(out):
                        if mode == "plan-tf":
                            plan = regraft.plan(new, prefix)
                        elif mode == "plan-h5":
                            plan = regraft.plan(new, h5)
                        elif mode == "tf-read":
                            tf.train.Checkpoint(model=new).read(prefix).expect_partial()
                        else:
                            new.load_weights(h5, skip_mismatch=True)
                    times[mode].append(time.perf_counter() - start)
                    if mode.startswith("plan"):
                        # Every variable with a counterpart is loaded: all but the 4 of the removed
                        # BatchNormalization (bench_plan_speed.py checks the values themselves).
                        loaded = sum(1 for a in plan.assignments if a.status in ("loaded", "cast"))
                        if loaded != count - 4:
                            failures.append(f"{mode} at {count} variables loads {loaded}, expected {count - 4}")
            medians = {m: statistics.median(v) for m, v in times.items()}
            rows.append((count, medians))
            log(out, f"{count:>7} variables: " + "  ".join(f"{m} {medians[m]:6.2f} s" for m in MODES)
                + f"  plan-tf/tf-read {medians['plan-tf'] / medians['tf-read']:.2f}"
                + f"  plan-h5/load-weights {medians['plan-h5'] / medians['load-weights']:.2f}")
            del new
            keras.backend.clear_session()
        finally:
            shutil.rmtree(work, ignore_errors=True)
    log(out)
    header = ("variables", *MODES, "plan-tf/tf-read", "plan-h5/load-weights")
    table = [header] + [(str(c), *(f"{m[k]:.3f}" for k in MODES), f"{m['plan-tf'] / m['tf-read']:.2f}",
                         f"{m['plan-h5'] / m['load-weights']:.2f}") for c, m in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for r in table:
        log(out, "  ".join(c.rjust(w) for c, w in zip(r, widths)))
    log(out)
    if len(rows) >= 2:
        xs = [float(c) for c, _ in rows]
        for mode in MODES:
            ys = [m[mode] for _, m in rows]
            overall = slope(xs, ys)
            last = slope(xs[-2:], ys[-2:])
            log(out, f"growth exponent {mode:12} {overall:.2f} over all sizes, {last:.2f} between the two largest")
            if args.max_exponent is not None and mode.startswith("plan") and overall > args.max_exponent:
                failures.append(f"{mode} grows as variables^{overall:.2f} > {args.max_exponent}")
    log(out, "FAILED: " + "; ".join(failures) if failures else "OK")
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")],
                        default=[1000, 2500, 5000, 10000, 25000, 50000],
                        help="comma-separated numbers of variables of the saved model")
    parser.add_argument("--repeat", type=int, default=1, help="timed runs per mode and size (median reported)")
    parser.add_argument("--max-exponent", type=float, default=None,
                        help="exit 1 if a plan's growth exponent over all sizes exceeds this")
    args = parser.parse_args(argv)
    if any(s < 10 * VARS_PER_PAIR for s in args.sizes) or args.repeat < 1:
        parser.error(f"sizes must be at least {10 * VARS_PER_PAIR} and --repeat at least 1")
    return run_on_deep_stack(run, args)


if __name__ == "__main__":
    sys.exit(main())
