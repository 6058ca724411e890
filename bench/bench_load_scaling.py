#!/usr/bin/env python
"""How load time and memory grow with the checkpoint's size, against TF and Keras in the same run.

For each size in ``--sizes`` (GiB of float32 weights, 0.25 to 4 by default) the
script saves ``bench_load.py``'s model (``Dense(4096)`` layers; the loaded model
has one more inserted) as a TF checkpoint and a ``.weights.h5`` and times, each
load in a fresh process, interleaved, ``--repeat`` runs (median reported) of:

  tf-restore          tf.train.Checkpoint(model=m).read(prefix).assert_consumed()
  regraft-tf          regraft.load(changed, prefix, strict=False)
  keras-load-weights  m.load_weights(path.weights.h5)
  regraft-h5          regraft.load(changed, path.weights.h5, strict=False)

Before timing, one untimed run per regraft mode and size checks every loaded
tensor bit for bit against the file. It prints one row per size and mode (median
seconds, GB/s, peak RSS the load added), the ratios regraft-tf / tf-restore and
regraft-h5 / load_weights per size, and per mode the growth exponent: the
least-squares slope of log(time) against log(bytes) over all sizes (1 is
linear, 2 quadratic) and the slope between the two largest sizes. With
``--max-exponent`` it exits 1 when a regraft mode's overall exponent exceeds it.

The 4 GiB point needs about 4 GiB for the model plus what each loader adds, and
8 GiB of disk: run it when the machine's memory is free (``free -g``).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_load  # noqa: E402
from bench_scaling import slope  # noqa: E402

MODES = ("tf-restore", "regraft-tf", "keras-load-weights", "regraft-h5")
PAIRS = (("regraft-tf", "tf-restore"), ("regraft-h5", "keras-load-weights"))
MiB = 1 << 20
GB = 1e9


def save_in_child(workdir: Path, size_gb: float) -> tuple[bench_load.Setup, int]:
    """``bench_load.save_model`` in a child process, so this process never holds a model's memory."""
    command = [sys.executable, str(Path(__file__).resolve()), "--save", str(size_gb), "--workdir", str(workdir)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise bench_load.BenchError(f"saving the {size_gb:g} GiB model failed:\n{done.stderr[-2000:]}")
    setup = bench_load.Setup(**json.loads((workdir / bench_load.SETUP_FILE).read_text()))
    layer_bytes = (setup.width * setup.width + setup.width) * 4
    return setup, setup.layers * layer_bytes


def measure(size_gb: float, repeat: int, root: Path) -> tuple[int, dict[str, list[bench_load.Run]]]:
    """Save the model of ``size_gb``, check the regraft loads bit for bit, time every mode."""
    workdir = root / f"{size_gb:g}gb"
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        setup, weight_bytes = save_in_child(workdir, size_gb)
        for mode in ("regraft-tf", "regraft-h5"):
            run = bench_load.spawn_worker(mode, workdir, verify=True)
            if run.verified_tensors != setup.saved_variables:
                raise bench_load.BenchError(f"{mode} at {size_gb:g} GiB verified {run.verified_tensors} tensors")
        runs: dict[str, list[bench_load.Run]] = {m: [] for m in MODES}
        for _ in range(repeat):
            for mode in MODES:
                runs[mode].append(bench_load.spawn_worker(mode, workdir))
        return weight_bytes, runs
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def report(results: dict[float, tuple[int, dict[str, list[bench_load.Run]]]]) -> dict[str, float]:
    """Print the per-size table, the ratios and the exponents; return each mode's overall exponent."""
    print(f"\n{'GiB':>5} {'mode':<20}{'median s':>10}{'min s':>8}{'max s':>8}{'GB/s':>7}{'RSS added MB':>14}")
    medians: dict[str, dict[float, float]] = {m: {} for m in MODES}
    for size, (weight_bytes, runs) in results.items():
        for mode in MODES:
            seconds = [r.seconds for r in runs[mode]]
            med = medians[mode][size] = statistics.median(seconds)
            added = max(r.rss_added for r in runs[mode]) / MiB
            print(f"{size:>5g} {mode:<20}{med:>10.3f}{min(seconds):>8.3f}{max(seconds):>8.3f}"
                  f"{weight_bytes / GB / med:>7.2f}{added:>14.1f}")
    print("\nratios of median times (below 1: regraft is faster):")
    print(f"{'GiB':>5}" + "".join(f"{f'{a} / {b}':>38}" for a, b in PAIRS))
    for size in results:
        print(f"{size:>5g}" + "".join(f"{medians[a][size] / medians[b][size]:>37.2f}x" for a, b in PAIRS))
    sizes = sorted(results)
    weights = [results[s][0] for s in sizes]
    exponents = {}
    print("\ngrowth exponent of time against bytes (1 linear, 2 quadratic):")
    for mode in MODES:
        times = [medians[mode][s] for s in sizes]
        exponents[mode] = slope(weights, times)
        apart = len(sizes) > 1 and weights[-1] != weights[-2]
        last = math.log(times[-1] / times[-2]) / math.log(weights[-1] / weights[-2]) if apart else float("nan")
        print(f"  {mode:<20} all sizes {exponents[mode]:5.2f}   two largest {last:5.2f}")
    return exponents


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Load time and added memory from 0.25 to 4 GiB, regraft against "
                                     "tf.train.Checkpoint and Keras load_weights, each load in a fresh process.")
    parser.add_argument("--sizes", type=float, nargs="+", default=[0.25, 0.5, 1.0, 2.0, 4.0], help="GiB of weights")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per mode and size (default 3)")
    parser.add_argument("--workdir", type=Path, help="where to write the checkpoints (default: a temp dir)")
    parser.add_argument("--max-exponent", type=float, help="exit 1 if a regraft mode's exponent exceeds this")
    parser.add_argument("--save", type=float, metavar="GIB", help="internal: save the model of this size in --workdir")
    args = parser.parse_args(argv)
    if args.save is not None:
        bench_load.save_model(args.workdir, args.save)
        return 0
    if args.repeat < 1 or min(args.sizes) <= 0:
        parser.error("--repeat must be >= 1 and every size > 0")
    print(f"command: {shlex.join([sys.executable, *sys.argv])}", flush=True)
    root = args.workdir or Path(tempfile.mkdtemp(prefix="regraft-load-scaling-"))
    results = {}
    try:
        for size in sorted(args.sizes):
            results[size] = measure(size, args.repeat, root)
            weight_bytes, runs = results[size]
            line = ", ".join(f"{m} {statistics.median(r.seconds for r in runs[m]):.3f} s" for m in MODES)
            print(f"{size:g} GiB ({weight_bytes / MiB:.0f} MB, verified bit for bit): {line}", flush=True)
    except bench_load.BenchError as e:
        print(f"FAILED: {e}", file=sys.stderr)
        return 1
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    exponents = report(results)
    if args.max_exponent is not None:
        worst = max(exponents[m] for m in ("regraft-tf", "regraft-h5"))
        if worst > args.max_exponent:
            print(f"FAILED: a regraft load grows with exponent {worst:.2f} > {args.max_exponent}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
