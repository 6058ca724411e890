#!/usr/bin/env python
"""Reading the new formats: regraft against each format's own loader, measured in the same run.

One model of N Dense(2048) layers (float32) is saved as a ``.keras`` archive (as
Keras writes it: the weights member stored), the same archive re-zipped with
compression, and a safetensors file. Each mode runs in a fresh subprocess that
builds the model, then times one load and reports its peak RSS above the
built model:

  keras-load-keras     model.load_weights("m.keras")   (Keras reads its own archive)
  regraft-keras        regraft.load(model, "m.keras")  (h5py reads the member in place)
  regraft-keras-zip    regraft.load(model, "m-deflated.keras")  (member copied to a temp file)
  st-load-file         safetensors.numpy.load_file + assign each variable
  regraft-safetensors  regraft.load(model, torch-layout "m.safetensors")  (memory map, linear_to_dense)

Usage: python bench/bench_formats.py [--layers 6] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile

MODES = ("keras-load-keras", "regraft-keras", "regraft-keras-zip", "st-load-file", "regraft-safetensors")


def build(layers: int):
    import keras

    model = keras.Sequential([keras.Input((2048,)), *[keras.layers.Dense(2048) for _ in range(layers)]])
    return model


def child(mode: str, folder: str, layers: int) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import numpy as np

    model = build(layers)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if mode == "keras-load-keras":
        model.load_weights(os.path.join(folder, "m.keras"))
    elif mode in ("regraft-keras", "regraft-keras-zip", "regraft-safetensors"):
        import regraft

        name = {"regraft-keras": "m.keras", "regraft-keras-zip": "m-deflated.keras",
                "regraft-safetensors": "m.safetensors"}[mode]
        regraft.load(model, os.path.join(folder, name))
    elif mode == "st-load-file":
        from safetensors.numpy import load_file

        arrays = load_file(os.path.join(folder, "m.safetensors"))
        for i, layer in enumerate(model.layers):
            layer.kernel.assign(arrays[f"{i}.weight"].T)
            layer.bias.assign(arrays[f"{i}.bias"])
    seconds = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    want = np.load(os.path.join(folder, "first.npy"))
    assert np.array_equal(model.layers[0].kernel.numpy(), want), "wrong values"
    print(json.dumps({"seconds": seconds, "peak_mb": (rss - rss0) / 1024}))


def prepare(folder: str, layers: int) -> float:
    import numpy as np
    from safetensors.numpy import save_file

    model = build(layers)
    rng = np.random.default_rng(0)
    for v in model.weights:
        v.assign(rng.standard_normal(tuple(v.shape)).astype("float32"))
    model.save(os.path.join(folder, "m.keras"))
    with zipfile.ZipFile(os.path.join(folder, "m.keras")) as src, zipfile.ZipFile(
            os.path.join(folder, "m-deflated.keras"), "w", compression=zipfile.ZIP_DEFLATED) as dst:
        for name in src.namelist():
            dst.writestr(name, src.read(name))
    state = {}
    for i, layer in enumerate(model.layers):
        state[f"{i}.weight"] = np.ascontiguousarray(layer.kernel.numpy().T)
        state[f"{i}.bias"] = layer.bias.numpy()
    save_file(state, os.path.join(folder, "m.safetensors"))
    np.save(os.path.join(folder, "first.npy"), model.layers[0].kernel.numpy())
    return sum(v.size for v in state.values()) * 4 / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.layers)
        return
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    with tempfile.TemporaryDirectory() as folder:
        megabytes = subprocess.run(
            [sys.executable, "-c", f"import sys; sys.path[:0] = {sys.path!r}; import bench_formats as b; "
             f"print(b.prepare({folder!r}, {args.layers}))"],
            check=True, capture_output=True, text=True, env=env, cwd=os.path.dirname(__file__)).stdout.split()[-1]
        print(f"{args.layers} x Dense(2048): {float(megabytes):.0f} MB of float32 weights; "
              f"median of {args.repeat} runs, each in a fresh process")
        results = {}
        for mode in MODES:
            runs = []
            for _ in range(args.repeat):
                out = subprocess.run([sys.executable, __file__, "--layers", str(args.layers), "--child", mode, folder],
                                     check=True, capture_output=True, text=True, env=env).stdout
                runs.append(json.loads(out.strip().splitlines()[-1]))
            results[mode] = (statistics.median(r["seconds"] for r in runs), statistics.median(r["peak_mb"] for r in runs))
        base_keras, base_st = results["keras-load-keras"], results["st-load-file"]
        print(f"{'mode':22} {'seconds':>8} {'peak MB':>8} {'time ratio':>11}")
        for mode, (seconds, peak) in results.items():
            base = base_st if "safetensors" in mode or mode.startswith("st-") else base_keras
            print(f"{mode:22} {seconds:8.3f} {peak:8.0f} {seconds / base[0]:10.2f}x")


if __name__ == "__main__":
    main()
