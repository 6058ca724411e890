#!/usr/bin/env python
"""A sharded load: what each device's block costs to read, against Keras' own load_weights.

A Keras 3 JAX model of three Dense layers (``--width 3072``: 288 MB of float32) is laid
out over 8 virtual CPU devices with ``keras.distribution.ModelParallel`` on a 1 x 8 mesh:
``rows`` and ``head`` kernels split by rows, the ``cols`` kernel by columns, two biases
split, the head's bias replicated. The old values are saved as ``.weights.h5`` (Keras),
``.npz`` (numpy) and, with ``--tf-python`` (a Python that has TensorFlow and
safetensors, e.g. the main venv's), as a TF checkpoint and a safetensors file.

For each format it prints, per variable: its layout, the shard's bytes (one device's
block), the file bytes regraft's read of that block touched (``ShardedRead.block_bytes``:
one byte range for rows; for columns, the pages the strided runs lie in), and the
whole tensor's bytes. Then load times (median of ``--repeat``, page cache warm for every
file): ``regraft.load`` into the distributed model against ``model.load_weights`` of the
``.weights.h5`` file into the same model (Keras reads every tensor whole and lets JAX
split it), measured in the same run, as a ratio.

Usage (the JAX venv; the script sets the 8-device flag before JAX starts):
    python bench/bench_sharded.py [--width 3072] [--repeat 3] [--tf-python /work/main/.venv/bin/python]
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("KERAS_BACKEND", "jax")

import argparse  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

LAYOUT = {"rows/kernel": ("model", None), "rows/bias": ("model",), "cols/kernel": (None, "model"),
          "cols/bias": ("model",), "head/kernel": ("model", None)}

_TF_CHILD = """
import os, sys
os.environ["KERAS_BACKEND"] = "tensorflow"
import numpy as np, tensorflow as tf
from safetensors.numpy import save_file
sys.path.insert(0, {bench!r})
import bench_sharded
model = bench_sharded.build({width})
model.load_weights({h5!r})
tf.train.Checkpoint(model=model).write({ckpt!r})
save_file({{v.path: np.asarray(v.numpy()) for v in model.weights}}, {st!r})
"""


def build(width: int):
    """``Input(width) -> rows Dense(2w) -> cols Dense(2w) -> head Dense(w)``."""
    import keras

    inputs = keras.Input((width,))
    x = keras.layers.Dense(2 * width, name="rows")(inputs)
    x = keras.layers.Dense(2 * width, name="cols")(x)
    return keras.Model(inputs, keras.layers.Dense(width, name="head")(x), name="sharded_bench")


def _layout(path: str) -> str:
    axes = LAYOUT.get(path)
    if axes is None:
        return "replicated"
    return "rows" if axes[0] == "model" else "columns"


def _timed(fn, repeat: int) -> float:
    fn()  # warm: page cache, JAX compilation of the transfers
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=3072)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--tf-python", default=os.environ.get("REGRAFT_TF_PYTHON"),
                        help="a Python with TensorFlow and safetensors, to write the TF checkpoint and safetensors file")
    args = parser.parse_args()

    import jax

    if jax.device_count() != 8:
        print(f"JAX has {jax.device_count()} devices, expected 8 (XLA_FLAGS set too late?)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="bench-sharded-") as folder:
        return _run(args, folder)


def _run(args: argparse.Namespace, folder: str) -> int:
    import jax
    import keras
    from keras import distribution

    import regraft

    old = build(args.width)
    rng = np.random.default_rng(0)
    for v in old.weights:
        v.assign(rng.standard_normal(tuple(v.shape)).astype("float32"))
    values = {v.path: np.asarray(v.numpy()) for v in old.weights}
    total = sum(a.nbytes for a in values.values())
    files = {"h5": os.path.join(folder, "old.weights.h5"), "npz": os.path.join(folder, "old.npz")}
    old.save_weights(files["h5"])
    np.savez(files["npz"], **values)
    del old
    if args.tf_python:
        files["tf"], files["safetensors"] = os.path.join(folder, "ckpt"), os.path.join(folder, "old.safetensors")
        script = _TF_CHILD.format(bench=os.path.dirname(os.path.abspath(__file__)), width=args.width, h5=files["h5"],
                                  ckpt=files["tf"], st=files["safetensors"])
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
        subprocess.run([args.tf_python, "-c", script], check=True, env=env, stderr=subprocess.DEVNULL)

    mesh = distribution.DeviceMesh((1, 8), ("batch", "model"), distribution.list_devices())
    layout_map = distribution.LayoutMap(mesh)
    for key, axes in LAYOUT.items():
        layout_map[key] = axes
    with distribution.ModelParallel(layout_map=layout_map, batch_dim_name="batch").scope():
        model = build(args.width)
    print(f"model: {total / 1e6:.0f} MB float32 over {jax.device_count()} devices (mesh 1 x 8), "
          f"jax {jax.__version__}, keras {keras.__version__}")

    keras_time = _timed(lambda: model.load_weights(files["h5"]), args.repeat)
    for fmt, path in files.items():
        report = regraft.load(model, path)
        for v in model.weights:  # by value: every device's shard is its block
            for shard in v.value.addressable_shards:
                assert np.array_equal(np.asarray(shard.data), values[v.path][shard.index]), (fmt, v.path)
        print(f"\n{fmt}: {path}")
        print(f"  {'variable':<13} {'layout':<10} {'shard':>10} {'read/device':>12} {'whole':>10}  read/shard")
        for key, read in report.sharded.items():
            per_device = max(read.block_bytes)
            print(f"  {key:<13} {_layout(key):<10} {read.shard_bytes / 1e6:>8.2f}MB {per_device / 1e6:>10.2f}MB "
                  f"{read.whole_bytes / 1e6:>8.2f}MB  {per_device / read.shard_bytes:.2f}x")
        read_total = sum(sum(r.block_bytes) for r in report.sharded.values())
        print(f"  every block once (one pass, summed over devices): {read_total / 1e6:.0f} MB; "
              f"the model {total / 1e6:.0f} MB"
              + (f"; {report.sharded_summary().split('(', 1)[1].split(')')[0].split('; ', 1)[1]}"
                 if "checksum" in report.sharded_summary() else ""))
        regraft_time = _timed(lambda: regraft.load(model, path), args.repeat)
        print(f"  load: regraft {regraft_time:.3f} s, Keras load_weights(.weights.h5) {keras_time:.3f} s: "
              f"ratio {regraft_time / keras_time:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
