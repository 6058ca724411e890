#!/usr/bin/env python
"""Which all-or-nothing design loads fastest: the parts of a load, timed one by one.

For the model of ``bench_load.py`` (16 Dense(4096) layers, 1 GiB of float32), each
part below runs in a fresh process (so its first-touch memory costs are real, as in
a load), over every saved tensor; the table gives the median seconds.

  check: crc in place      regraft's check pass on a TF bundle: CRC32C of each tensor, memory-mapped
  check: read + crc        the same through a reused 8 MiB buffer (read, then checksum)
  commit: restore, copy    RestoreV2 per tensor, assigned while still referenced: the variable
                           copies it into its own buffer (regraft's commit pass)
  commit: restore, adopt   RestoreV2 per tensor, the variable adopts the new buffer
  commit: bundle into tensor  regraft's reader (readinto, then CRC32C of the bytes read) into a new
                           host tensor's memory, which the variable adopts
  commit: bundle, no crc   the same without the second checksum (regraft's TF commit: the check
                           pass verified the bytes, and the files' identity is unchanged)
  commit: h5 staging       h5py read_direct into one reused buffer, then assign (the old .weights.h5
                           commit: TensorFlow copies the buffer into a new tensor)
  commit: h5 into tensor   h5py read_direct into a new host tensor's memory, which the variable adopts
                           (regraft's .weights.h5 commit, Target.assign_filled)
  commit: h5 fresh arrays  h5py read into a new array per tensor, then assign (what load_weights does)
  undo: journal            write every variable's current value to an unnamed temporary file, no copy
                           in memory (what an undo journal costs at least)
  undo: keep old tensors   regraft's .weights.h5 commit, holding each variable's previous tensor until
                           the end (an undo in memory: no copy on TensorFlow, the model's size in memory)
  undo: copy in memory     the same, holding a numpy copy of each previous value

A design's load time is about the sum of its parts: regraft's is "check: crc in
place" + "commit: restore, copy" for a TF bundle; the journal design adds "undo:
journal" to a single pass. Run ``python bench/bench_apply.py --help``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_load  # noqa: E402

PARTS = (
    "check: crc in place",
    "check: read + crc",
    "commit: restore, copy",
    "commit: restore, adopt",
    "commit: bundle into tensor",
    "commit: bundle, no crc",
    "commit: h5 staging",
    "commit: h5 into tensor",
    "commit: h5 fresh arrays",
    "undo: journal",
    "undo: keep old tensors",
    "undo: copy in memory",
)
MARK = "@@part "


def _pairs(setup: bench_load.Setup, model) -> list[tuple[object, str, str]]:
    """(variable, TF bundle key, .weights.h5 dataset path) for every saved tensor."""
    out = []
    for i in range(setup.layers):
        layer = getattr(model, f"l{i}")
        out.append((layer.kernel, f"model/l{i}/_kernel/.ATTRIBUTES/VARIABLE_VALUE", f"l{i}/vars/0"))
        out.append((layer.bias, f"model/l{i}/bias/.ATTRIBUTES/VARIABLE_VALUE", f"l{i}/vars/1"))
    return out


def run_part(part: str, workdir: Path) -> tuple[float, int]:
    """Seconds the part took, and the peak RSS it added in bytes."""
    import h5py
    import numpy as np
    import tensorflow as tf

    from regraft.sources._bundle import Bundle
    from regraft.sources._crc32c import crc32c

    setup = bench_load.Setup(**json.loads((workdir / bench_load.SETUP_FILE).read_text()))
    model = bench_load.build_model(setup, inserted=True)
    pairs = _pairs(setup, model)
    bundle = Bundle(setup.tf_prefix)
    data = bundle.data_path(0)

    from regraft.targets import _compat

    def into_tensor(variable, dataset) -> None:
        tensor, memory = _compat.empty_host_tensor(tuple(dataset.shape), "float32")
        dataset.read_direct(memory)
        del memory
        variable.assign(tensor)

    def restore(key: str):
        return tf.raw_ops.RestoreV2(prefix=setup.tf_prefix, tensor_names=[key], shape_and_slices=[""], dtypes=[tf.float32])[0]

    bench_load.reset_peak_rss()
    rss_before = bench_load.current_rss()
    start = time.perf_counter()
    if part == "check: crc in place":
        for _, key, _ in pairs:
            bundle.verify(key)
    elif part == "check: read + crc":
        buffer = np.empty(8 << 20, np.uint8)
        with open(data, "rb", buffering=0) as f:
            for _, key, _ in pairs:
                entry = bundle.entries[key]
                f.seek(entry.offset)
                left, crc = entry.size, 0
                while left:
                    got = f.readinto(buffer.data[: min(left, len(buffer))])
                    crc = crc32c(buffer.data[:got], crc)
                    left -= got
    elif part == "commit: restore, copy":
        for variable, key, _ in pairs:
            value = restore(key)
            variable.assign(value)
            del value
    elif part == "commit: restore, adopt":
        for variable, key, _ in pairs:
            variable.assign(restore(key))
    elif part == "commit: h5 staging":
        staging = np.empty(setup.width * setup.width, np.float32)
        with h5py.File(setup.h5_path, "r") as f:
            for variable, _, name in pairs:
                dataset = f[name]
                view = staging[: dataset.size].reshape(dataset.shape)
                dataset.read_direct(view)
                variable.assign(view)
    elif part in ("commit: bundle into tensor", "commit: bundle, no crc"):
        for variable, key, _ in pairs:
            tensor, memory = _compat.empty_host_tensor(tuple(variable.shape), "float32")
            bundle.read_into(key, memory, checksum=part == "commit: bundle into tensor")
            del memory
            variable.assign(tensor)
    elif part == "commit: h5 into tensor":
        with h5py.File(setup.h5_path, "r") as f:
            for variable, _, name in pairs:
                into_tensor(variable, f[name])
    elif part in ("undo: keep old tensors", "undo: copy in memory"):
        kept = []
        with h5py.File(setup.h5_path, "r") as f:
            for variable, _, name in pairs:
                old = tf.convert_to_tensor(variable.value)  # the variable's buffer itself, not a copy
                kept.append(old if part == "undo: keep old tensors" else np.array(old))
                del old
                into_tensor(variable, f[name])
        del kept
    elif part == "commit: h5 fresh arrays":
        with h5py.File(setup.h5_path, "r") as f:
            for variable, _, name in pairs:
                variable.assign(f[name][()])
    elif part == "undo: journal":
        with tempfile.TemporaryFile(buffering=0) as journal:
            for variable, _, _ in pairs:
                journal.write(memoryview(np.asarray(variable.value.value())).cast("B"))
    else:
        raise ValueError(part)
    seconds = time.perf_counter() - start
    return seconds, bench_load.peak_rss() - rss_before


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Time the parts of a load, each in a fresh process (medians).")
    parser.add_argument("--size-gb", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workdir", type=Path, help="reuse the files bench_load.py --workdir wrote there")
    parser.add_argument("--part", choices=PARTS, help="internal: time one part in this process")
    args = parser.parse_args(argv)
    if args.part:
        print(MARK + json.dumps(run_part(args.part, args.workdir)), flush=True)
        return 0
    temporary = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="regraft-bench-")) if temporary else args.workdir
    try:
        if not (workdir / bench_load.SETUP_FILE).exists():
            bench_load.save_model(workdir, args.size_gb)
        setup = bench_load.Setup(**json.loads((workdir / bench_load.SETUP_FILE).read_text()))
        print(f"command: {' '.join([sys.executable, *sys.argv])}")
        print(f"model: {setup.layers} Dense {setup.width}x{setup.width} layers, {2 * setup.layers} tensors")
        times: dict[str, list[float]] = {p: [] for p in PARTS}
        added: dict[str, list[int]] = {p: [] for p in PARTS}
        for _ in range(args.repeat):
            for part in PARTS:
                command = [sys.executable, __file__, "--part", part, "--workdir", str(workdir)]
                done = subprocess.run(command, capture_output=True, text=True)
                lines = [ln for ln in done.stdout.splitlines() if ln.startswith(MARK)]
                if done.returncode or not lines:
                    print(f"FAILED {part}:\n{done.stderr[-2000:]}", file=sys.stderr)
                    return 1
                seconds, rss = json.loads(lines[-1][len(MARK) :])
                times[part].append(seconds)
                added[part].append(rss)
        print(f"\n{'part':<28}{'median s':>10}{'min s':>8}{'max s':>8}{'RSS added MB':>14}")
        for part, values in times.items():
            print(f"{part:<28}{statistics.median(values):>10.3f}{min(values):>8.3f}{max(values):>8.3f}"
                  f"{max(added[part]) / 2**20:>14.1f}")
        med = {p: statistics.median(v) for p, v in times.items()}
        print("\ndesigns (sum of medians):")
        print(f"  check + commit (regraft, TF):     {med['check: crc in place'] + med['commit: bundle, no crc']:.3f} s")
        print(f"  check + RestoreV2 commit (TF):    {med['check: crc in place'] + med['commit: restore, copy']:.3f} s")
        print(f"  journal + commit (one pass, TF):  {med['undo: journal'] + med['commit: restore, adopt']:.3f} s")
        print(f"  commit only, no guarantee (TF):   {med['commit: restore, copy']:.3f} s")
        print(f"  .weights.h5 commit, staging:      {med['commit: h5 staging']:.3f} s")
        print(f"  .weights.h5 commit, into tensor:  {med['commit: h5 into tensor']:.3f} s  (regraft)")
        print(f"  .weights.h5, undo kept in memory: {med['undo: keep old tensors']:.3f} s (old tensors), "
              f"{med['undo: copy in memory']:.3f} s (copies)")
        print(f"  .weights.h5 + journal:            {med['undo: journal'] + med['commit: h5 fresh arrays']:.3f} s")
    finally:
        if temporary:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
