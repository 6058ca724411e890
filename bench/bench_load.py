#!/usr/bin/env python
"""Benchmark regraft.load against TensorFlow's and Keras' own weight loaders.

The script saves one model of 4096x4096 Dense layers (at least --size-gb GiB of
float32 weights) as a TF checkpoint and as a Keras ``.weights.h5`` file, then
times four loads, each in a fresh subprocess so its memory numbers are clean:

  tf-restore          tf.train.Checkpoint(model=m).read(prefix).assert_consumed()
  keras-load-weights  m.load_weights(path.weights.h5)
  regraft-tf          regraft.load(changed, prefix, strict=False)
  regraft-h5          regraft.load(changed, path.weights.h5, strict=False)

``m`` has the saved architecture; ``changed`` has one extra Dense layer inserted
in the middle, so regraft loads every saved tensor and leaves the new layer fresh.
Before timing, one untimed run per regraft mode checks every loaded tensor bit
for bit against the file.

Run ``python bench/bench_load.py --help`` for the options; README.md beside
this file explains how to read the output.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, TextIO

if TYPE_CHECKING:
    import keras

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

WIDTH = 4096
BASELINES = ("tf-restore", "keras-load-weights")
REGRAFT_MODES = ("regraft-tf", "regraft-h5")
# Timed from before the model is built: build + load (regraft.build_and_load skips the initialisers
# of what it loads) against build + tf.train.Checkpoint read.
BUILD_MODES = ("build+tf-restore", "build+regraft-tf")
MODES = BASELINES + REGRAFT_MODES + BUILD_MODES
TIME_BASELINE = {
    "regraft-tf": "tf-restore",
    "regraft-h5": "keras-load-weights",
    "build+regraft-tf": "build+tf-restore",
}
CHANGED = REGRAFT_MODES + ("build+regraft-tf",)
SETUP_FILE = "setup.json"
RESULT_MARK = "@@bench-result "
MiB = 1 << 20
GiB = 1 << 30


class BenchError(RuntimeError):
    """A worker failed or a load did not do what the benchmark expects."""


@dataclass(frozen=True)
class Setup:
    """The saved model, shared by the parent and its workers through ``setup.json``."""

    layers: int
    width: int
    insert_at: int
    tf_prefix: str
    h5_path: str

    @property
    def saved_variables(self) -> int:
        return 2 * self.layers


@dataclass(frozen=True)
class Run:
    """One load in one worker process. Memory in bytes."""

    mode: str
    seconds: float
    rss_before: int
    peak_rss: int
    peak_reset: bool
    summary: str | None
    verified_tensors: int | None

    @property
    def rss_added(self) -> int:
        return self.peak_rss - self.rss_before


# --------------------------------------------------------------------------- model


def build_model(setup: Setup, *, inserted: bool) -> keras.Model:
    """A built subclassed model whose layers are the attributes ``l0 .. lN``.

    With ``inserted``, a layer named ``inserted`` of the same width runs before
    ``l{insert_at}``: every saved key (``model/l3/...`` or ``l3/vars/0``) stays the same.
    """
    import keras
    import numpy as np

    class Chain(keras.Model):
        def __init__(self) -> None:
            super().__init__(name="chain")
            for i in range(setup.layers):
                setattr(self, f"l{i}", keras.layers.Dense(setup.width, name=f"l{i}"))
            if inserted:
                self.inserted = keras.layers.Dense(setup.width, name="inserted")

        def call(self, x: Any) -> Any:
            for i in range(setup.layers):
                if inserted and i == setup.insert_at:
                    x = self.inserted(x)
                x = getattr(self, f"l{i}")(x)
            return x

    model = Chain()
    model(np.zeros((1, setup.width), dtype="float32"))
    return model


def save_model(workdir: Path, size_gb: float) -> tuple[Setup, int]:
    """Build the model, write both files, return the setup and the weight bytes."""
    import tensorflow as tf

    layer_bytes = (WIDTH * WIDTH + WIDTH) * 4
    layers = max(2, math.ceil(size_gb * GiB / layer_bytes))
    setup = Setup(
        layers=layers,
        width=WIDTH,
        insert_at=layers // 2,
        tf_prefix=str(workdir / "ckpt" / "model"),
        h5_path=str(workdir / "model.weights.h5"),
    )
    model = build_model(setup, inserted=False)
    tf.train.Checkpoint(model=model).write(setup.tf_prefix)
    model.save_weights(setup.h5_path)
    (workdir / SETUP_FILE).write_text(json.dumps(asdict(setup)))
    return setup, layers * layer_bytes


# --------------------------------------------------------------------------- worker


def current_rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def peak_rss() -> int:
    """The process's peak RSS in bytes (ru_maxrss is KiB on Linux, bytes on macOS)."""
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024


def reset_peak_rss() -> bool:
    """Reset the peak to the current RSS (Linux >= 4.0), so it covers only the load.

    Building the model leaves a higher peak than the RSS it settles at; without
    the reset, "peak - before" would count that transient as load memory.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def make_load(mode: str, model: keras.Model, setup: Setup) -> Callable[[], Any]:
    """The call to time: it returns regraft's report for the regraft modes."""
    if mode == "tf-restore":
        import tensorflow as tf

        # read() pairs with write(); restore() would add a save_counter that
        # makes assert_consumed() fail.
        return lambda: tf.train.Checkpoint(model=model).read(setup.tf_prefix).assert_consumed()
    if mode == "keras-load-weights":
        return lambda: model.load_weights(setup.h5_path)
    import regraft

    path = setup.tf_prefix if mode == "regraft-tf" else setup.h5_path
    return lambda: regraft.load(model, path, strict=False)


def check_report(report: Any, setup: Setup) -> str:
    """Require that every saved tensor loaded and only the inserted layer stayed fresh."""
    counts = report.counts()
    expected = {"loaded": setup.saved_variables, "cast": 0, "shape-mismatch": 0, "missing": 2, "unused": 0}
    wrong = {k: counts.get(k) for k, v in expected.items() if counts.get(k) != v}
    if wrong:
        raise BenchError(f"regraft report {wrong}, expected {expected}: {report.summary()}")
    return str(report.summary())


def saved_tensors(mode: str, setup: Setup, layer: str) -> dict[int, Any]:
    """The saved kernel (rank 2) and bias (rank 1) of one layer, read from the file."""
    import numpy as np

    if mode == "regraft-tf":
        import tensorflow as tf

        reader = tf.train.load_checkpoint(setup.tf_prefix)
        keys = [k for k in reader.get_variable_to_shape_map() if k.startswith(f"model/{layer}/")]
        tensors = [reader.get_tensor(k) for k in keys]
    else:
        import h5py

        with h5py.File(setup.h5_path, "r") as f:
            tensors = [np.asarray(d) for d in f[layer]["vars"].values()]
    by_rank = {t.ndim: t for t in tensors}
    if sorted(by_rank) != [1, 2] or len(tensors) != 2:
        raise BenchError(f"expected one kernel and one bias for {layer} in the {mode} file, found {len(tensors)}")
    return by_rank


def verify_bitwise(mode: str, model: keras.Model, setup: Setup) -> int:
    """Compare every variable of ``l0 .. lN`` with the file, byte for byte."""
    import numpy as np

    checked = 0
    for i in range(setup.layers):
        layer = getattr(model, f"l{i}")
        saved = saved_tensors(mode, setup, f"l{i}")
        for variable in (layer.kernel, layer.bias):
            value = np.asarray(variable)
            expected = saved[value.ndim]
            if value.dtype != expected.dtype or value.shape != expected.shape or value.tobytes() != expected.tobytes():
                raise BenchError(f"{mode}: {variable.path} differs from the saved tensor after the load")
            checked += 1
    return checked


def run_worker(mode: str, workdir: Path, verify: bool) -> Run:
    """Build the model for ``mode``, time its load, and measure the memory it added."""
    import tensorflow  # noqa: F401 - imported before the clock starts

    if mode in CHANGED:
        import regraft  # imported before the clock starts

    setup = Setup(**json.loads((workdir / SETUP_FILE).read_text()))
    if mode in BUILD_MODES:
        gc.collect()
        reset = reset_peak_rss()
        before = current_rss()
        start = time.perf_counter()
        if mode == "build+regraft-tf":
            model, result = regraft.build_and_load(lambda: build_model(setup, inserted=True), setup.tf_prefix, strict=False)
        else:
            model = build_model(setup, inserted=False)
            result = make_load("tf-restore", model, setup)()
    else:
        model = build_model(setup, inserted=mode in CHANGED)
        load = make_load(mode, model, setup)
        gc.collect()
        reset = reset_peak_rss()
        before = current_rss()
        start = time.perf_counter()
        result = load()
    seconds = time.perf_counter() - start
    peak = peak_rss()
    summary = check_report(result, setup) if mode in CHANGED else None
    verified = verify_bitwise("regraft-tf" if mode in BUILD_MODES else mode, model, setup) if verify else None
    if verify and mode == "build+regraft-tf" and not model.inserted.kernel.numpy().any():
        raise BenchError("build_and_load left the inserted layer's kernel at its zero placeholder")
    return Run(mode, seconds, before, peak, reset, summary, verified)


def spawn_worker(mode: str, workdir: Path, *, verify: bool = False) -> Run:
    """Run one worker in a fresh interpreter and return what it measured."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", mode, "--workdir", str(workdir)]
    if verify:
        command.append("--verify")
    done = subprocess.run(command, capture_output=True, text=True)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith(RESULT_MARK)]
    if done.returncode != 0 or not lines:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-30:])
        raise BenchError(f"worker {mode} failed (exit {done.returncode}):\n{tail}")
    return Run(**json.loads(lines[-1][len(RESULT_MARK) :]))


# --------------------------------------------------------------------------- report


def mb(n: float) -> float:
    return n / MiB


def ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator > 0 else None


def summarize(runs: list[Run]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for mode in MODES:
        mine = [r for r in runs if r.mode == mode]
        out[mode] = {
            "runs_s": [r.seconds for r in mine],
            "median_s": statistics.median(r.seconds for r in mine),
            "peak_rss_mb": mb(max(r.peak_rss for r in mine)),
            "rss_before_mb": mb(max(r.rss_before for r in mine)),
            "rss_added_mb": mb(max(r.rss_added for r in mine)),
        }
    return out


def ratios(modes: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for mode in TIME_BASELINE:
        base = TIME_BASELINE[mode]
        out[f"time {mode} / {base}"] = ratio(modes[mode]["median_s"], modes[base]["median_s"])
    for mode in REGRAFT_MODES:
        for base in BASELINES:
            out[f"rss added {mode} / {base}"] = ratio(modes[mode]["rss_added_mb"], modes[base]["rss_added_mb"])
    return out


def print_table(modes: dict[str, dict[str, Any]], ratio_values: dict[str, float | None], out: TextIO) -> None:
    header = f"{'mode':<20}{'runs':>5}{'median s':>10}{'min s':>8}{'max s':>8}"
    header += f"{'RSS before MB':>15}{'peak RSS MB':>13}{'added MB':>10}"
    print(header, file=out)
    for mode, m in modes.items():
        print(
            f"{mode:<20}{len(m['runs_s']):>5}{m['median_s']:>10.3f}{min(m['runs_s']):>8.3f}{max(m['runs_s']):>8.3f}"
            f"{m['rss_before_mb']:>15.1f}{m['peak_rss_mb']:>13.1f}{m['rss_added_mb']:>10.1f}",
            file=out,
        )
    print("\nratios (below 1 means regraft is faster / adds less memory):", file=out)
    for name, value in ratio_values.items():
        print(f"  {name:<48}{'n/a' if value is None else f'{value:.2f}x':>8}", file=out)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time regraft.load against tf.train.Checkpoint and Keras load_weights, "
        "each load in a fresh subprocess, and measure the peak RSS the load adds.",
        epilog="Memory: 'peak RSS' is ru_maxrss after the load, with the peak reset to the "
        "current RSS just before it (Linux); 'added' is peak minus the RSS just before the load.",
    )
    parser.add_argument("--size-gb", type=float, default=1.0, help="minimum weight size in GiB (default 1.0)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per mode, each a fresh process (default 3)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON on stdout (the table goes to stderr)")
    parser.add_argument("--workdir", type=Path, help="where to write the checkpoints (default: a temp dir removed at the end)")
    parser.add_argument("--keep", action="store_true", help="keep the default temp workdir and print its path")
    parser.add_argument("--worker", choices=MODES, metavar="MODE", help="internal: measure one load of MODE in this process")
    parser.add_argument("--verify", action="store_true", help="internal, with --worker: check loaded tensors bit for bit")
    args = parser.parse_args(argv)
    if args.worker and args.workdir is None:
        parser.error("--worker needs --workdir")
    if args.repeat < 1 or args.size_gb <= 0:
        parser.error("--repeat must be >= 1 and --size-gb > 0")
    return args


def bench(args: argparse.Namespace, workdir: Path, out: TextIO) -> dict[str, Any]:
    import keras
    import tensorflow as tf

    import regraft

    print(f"command: {shlex.join([sys.executable, *sys.argv])}", file=out)
    print(
        f"python {platform.python_version()}, tensorflow {tf.__version__}, keras {keras.__version__}, "
        f"regraft {regraft.__version__}, {os.cpu_count()} CPUs, {platform.platform()}",
        file=out,
    )
    setup, weight_bytes = save_model(workdir, args.size_gb)
    gc.collect()
    files = {
        "tf_checkpoint": sum(p.stat().st_size for p in Path(setup.tf_prefix).parent.iterdir()),
        "keras_h5": Path(setup.h5_path).stat().st_size,
    }
    print(
        f"model: {setup.layers} Dense {WIDTH}x{WIDTH} layers, {mb(weight_bytes):.1f} MB of float32 weights; "
        f"changed model inserts one more before l{setup.insert_at}",
        file=out,
    )
    print(f"on disk: TF checkpoint {mb(files['tf_checkpoint']):.1f} MB, .weights.h5 {mb(files['keras_h5']):.1f} MB", file=out)

    verified: dict[str, dict[str, Any]] = {}
    for mode in CHANGED:
        run = spawn_worker(mode, workdir, verify=True)
        print(f"{mode}: {run.summary}", file=out)
        print(f"{mode}: verified {run.verified_tensors}/{setup.saved_variables} tensors bit for bit", file=out)
        verified[mode] = {"summary": run.summary, "tensors": run.verified_tensors}

    runs: list[Run] = []
    for i in range(args.repeat):
        for mode in MODES:
            run = spawn_worker(mode, workdir)
            runs.append(run)
            print(
                f"  run {i + 1}/{args.repeat} {mode:<20}{run.seconds:8.3f} s  "
                f"peak {mb(run.peak_rss):8.1f} MB  added {mb(run.rss_added):8.1f} MB",
                file=out,
            )
    if not all(r.peak_reset for r in runs):
        print("warning: could not reset the peak RSS; peaks include the model build", file=out)

    modes = summarize(runs)
    ratio_values = ratios(modes)
    print(file=out)
    print_table(modes, ratio_values, out)
    return {
        "command": [sys.executable, *sys.argv],
        "versions": {
            "python": platform.python_version(),
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
            "regraft": regraft.__version__,
        },
        "cpus": os.cpu_count(),
        "size_gb": args.size_gb,
        "layers": setup.layers,
        "width": WIDTH,
        "weights_mb": mb(weight_bytes),
        "files_mb": {k: mb(v) for k, v in files.items()},
        "repeat": args.repeat,
        "peak_reset": all(r.peak_reset for r in runs),
        "verified": verified,
        "modes": modes,
        "ratios": ratio_values,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        run = run_worker(args.worker, args.workdir, args.verify)
        print(RESULT_MARK + json.dumps(asdict(run)), flush=True)
        return 0

    out = sys.stderr if args.json else sys.stdout
    temporary = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="regraft-bench-")) if temporary else args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        results = bench(args, workdir, out)
    except BenchError as e:
        print(f"FAILED: {e}", file=sys.stderr)
        return 1
    finally:
        if temporary and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"files kept in {workdir}", file=out)
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
