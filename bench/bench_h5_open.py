#!/usr/bin/env python
"""What checking HDF5 metadata costs, and what reading it in a worker process would cost.

Builds a Keras 3 functional model of ``--layers`` parallel ``Dense(8)`` layers on one input, saves it
with ``model.save_weights("chain.weights.h5")`` (two datasets per layer), and times,
interleaved, ``--repeat`` runs (median reported) of:

  regraft-open     regraft.open(path).entries(): every link, dtype, layout and size
                   checked, the needed attributes decoded (what regraft does)
  no-heap-check    regraft-open without the walk of HDF5's global heap collections
                   that refuses a damaged one before HDF5 loops on it (what that check costs)
  h5py-walk        h5py.File(path).visit(...) plus shape and dtype of each dataset
                   (the least any reader does: the floor under regraft-open)
  worker-open      the same regraft.open in a fresh Python process that imports
                   h5py and regraft and sends the entries back pickled (what a
                   worker with a time limit against HDF5 hangs would add)
  keras-load       model.load_weights(path) (Keras' own reader, reads the data too)

and prints each time and its ratio to ``keras-load``.

Run ``python bench/bench_h5_open.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

_WORKER = (
    "import pickle, sys\n"
    "import regraft\n"
    "with regraft.open(sys.argv[1]) as source:\n"
    "    sys.stdout.buffer.write(pickle.dumps(source.entries()))\n"
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=2000, help="Dense layers in the chain (default 2000)")
    ap.add_argument("--repeat", type=int, default=5, help="runs of each mode; the median is reported (default 5)")
    args = ap.parse_args()

    import h5py
    import keras

    import regraft

    inputs = keras.Input((8,))  # parallel, not chained: Keras' graph walk recurses once per layer of depth
    model = keras.Model(inputs, [keras.layers.Dense(8, name=f"dense_{i}")(inputs) for i in range(args.layers)])
    folder = tempfile.mkdtemp(prefix="regraft-bench-h5-")
    path = os.path.join(folder, "chain.weights.h5")
    model.save_weights(path)

    def regraft_open():
        with regraft.open(path) as source:
            return len(source.entries())

    from regraft.sources.keras_h5 import KerasH5

    def no_heap_check():
        check = KerasH5._check_global_heaps
        KerasH5._check_global_heaps = lambda self: None  # type: ignore[method-assign]
        try:
            return regraft_open()
        finally:
            KerasH5._check_global_heaps = check  # type: ignore[method-assign]

    def h5py_walk():
        found = []
        with h5py.File(path, "r") as f:
            names: list[str] = []
            f.visit(names.append)
            for name in names:
                obj = f[name]
                if isinstance(obj, h5py.Dataset):
                    found.append((obj.shape, obj.dtype))
        return len(found)

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}

    def worker_open():
        out = subprocess.run([sys.executable, "-c", _WORKER, path], capture_output=True, check=True, env=env)
        return len(out.stdout)

    def keras_load():
        model.load_weights(path)

    modes = {"regraft-open": regraft_open, "no-heap-check": no_heap_check, "h5py-walk": h5py_walk, "worker-open": worker_open, "keras-load": keras_load}
    times: dict[str, list[float]] = {m: [] for m in modes}
    assert regraft_open() == h5py_walk() == 2 * args.layers
    for _ in range(args.repeat):
        for mode, run in modes.items():
            start = time.perf_counter()
            run()
            times[mode].append(time.perf_counter() - start)
    base = statistics.median(times["keras-load"])
    print(f"{args.layers} Dense layers, {2 * args.layers} datasets, median of {args.repeat} runs")
    for mode in modes:
        median = statistics.median(times[mode])
        print(f"  {mode:13s} {median * 1000:9.1f} ms   {median / base:6.2f}x keras-load")


if __name__ == "__main__":
    main()
