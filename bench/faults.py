#!/usr/bin/env python
"""Fault checks of `regraft load --out`: SIGKILL at random moments, and a full disk.

SIGKILL: the CLI runs in a child process over a folder that holds a previous
output (or none); when the child starts writing it prints a marker, the script
waits a seeded random delay (0 to 2x the measured write time) and sends SIGKILL.
Then the output is read by TensorFlow / Keras into a fresh model and compared by
value with the previous and the new weights, and the next run's cleanup
(``regraft.writing.clean_stale``) is run: nothing of the killed run may be left
(no staging folder, no data file the live index does not read).

Disk full: a real full disk when this machine allows a private tmpfs
(``unshare -m`` + ``mount -t tmpfs -o size=N``, as root), else a file-size limit
(RLIMIT_FSIZE, SIGXFSZ ignored: writes fail with EFBIG). The tmpfs is sized to
hold the previous output plus 10%, 50% or 90% of the new one.

Usage: python bench/faults.py [--kills 16] [--seed 0]
Prints one table per fault; every row should read: old or new (never broken), 0 left.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(os.path.dirname(HERE), "src")
sys.path.insert(0, SRC)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

MODELS_PY = '''
import keras

def build(width=65536):
    inputs = keras.Input((16,))
    x = keras.layers.Dense(width, name="d1")(inputs)
    return keras.Model(inputs, keras.layers.Dense(8, name="d2")(x))
'''

CHILD = r'''
import os, resource, signal, sys
import regraft.targets.keras as target
from regraft.cli.main import main

mode, limit = sys.argv[1], int(sys.argv[2])
original = target.save_weights

def save_weights(model, out):
    if mode == "fsize":
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    elif mode == "announce":
        print("WRITING", flush=True)
    return original(model, out)

target.save_weights = save_weights
sys.exit(main(sys.argv[3:]))
'''

KINDS = [("tf", True), ("h5", True), ("tf", False), ("h5", False)]


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=SRC, TF_CPP_MIN_LOG_LEVEL="3")


def _out(folder: str, kind: str) -> str:
    return os.path.join(folder, "new.weights.h5" if kind == "h5" else "ckpt")


def _files(folder: str) -> dict[str, bytes]:
    return {n: open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder))
            if os.path.isfile(os.path.join(folder, n))}


def _leftovers(folder: str, kind: str) -> list[str]:
    """Staging folders, temporary files, and data files the live index does not read."""
    from regraft.writing import bundle_names

    names = sorted(os.listdir(folder))
    left = [n for n in names if n.startswith(".regraft") or "regraft-tmp" in n or n.endswith("_temp")]
    if kind == "tf":
        data = [n for n in names if n.startswith("ckpt.data-")]
        counts = {n.rsplit("-of-", 1)[1] for n in data}
        if "ckpt.index" not in names:
            left += data
        elif len(counts) == 1:
            left += sorted(set(data) - set(bundle_names("ckpt", int(counts.pop()))))
        else:
            left += data
    return left


def _read(module, path: str, kind: str):
    import numpy as np
    import tensorflow as tf

    model = module.build()
    if kind == "h5":
        if not os.path.exists(path):
            return None
        model.load_weights(path)
    else:
        if not os.path.exists(path + ".index"):
            return None
        tf.train.Checkpoint(model=model).read(path).assert_existing_objects_matched()
    return [np.array(v.numpy()) for v in model.weights]


def _same(a, b) -> bool:
    import numpy as np

    return a is not None and b is not None and all(
        x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x.view(np.uint8), y.view(np.uint8))
        for x, y in zip(a, b))


def _setup(work: str):
    import importlib.util

    import numpy as np
    import tensorflow as tf

    from regraft.targets.keras import save_weights

    path = os.path.join(work, "models.py")
    with open(path, "w") as f:
        f.write(MODELS_PY)
    spec = importlib.util.spec_from_file_location("fault_models", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rng = np.random.default_rng(0)
    new, old = module.build(), module.build()
    for model in (new, old):
        for v in model.weights:
            v.assign(rng.standard_normal(tuple(v.shape)).astype("float32"))
    source = tf.train.Checkpoint(model=new).write(os.path.join(work, "src", "ckpt"))
    previous = {}
    for kind in ("tf", "h5"):
        folder = os.path.join(work, f"previous-{kind}")
        os.makedirs(folder)
        started = time.perf_counter()
        save_weights(old, _out(folder, kind))
        previous[kind] = (folder, time.perf_counter() - started)
    values = ([np.array(v.numpy()) for v in new.weights], [np.array(v.numpy()) for v in old.weights])
    return path, module, source, previous, values


def _fresh(work: str, name: str, previous_folder: str | None) -> str:
    folder = os.path.join(work, name)
    if previous_folder:
        shutil.copytree(previous_folder, folder)
    else:
        os.makedirs(folder)
    return folder


def kills(args, work, models_py, module, source, previous, values) -> list[tuple]:
    from regraft.writing import clean_stale

    new_values, old_values = values
    rng = random.Random(args.seed)
    rows = {k: dict(old=0, new=0, absent=0, broken=0, left=0, runs=0, before_write=0) for k in KINDS}
    for i in range(args.kills):
        kind, over = KINDS[i % len(KINDS)]
        folder = _fresh(work, f"kill-{i}", previous[kind][0] if over else None)
        out = _out(folder, kind)
        delay = rng.uniform(0.0, 2 * previous[kind][1])
        child = subprocess.Popen([sys.executable, "-c", CHILD, "announce", "0", "load", source, "--model",
                                  f"{models_py}:build", "--out", out], env=_env(), stdout=subprocess.PIPE,
                                 stderr=subprocess.DEVNULL, text=True)
        if child.stdout.readline() != "WRITING\n":
            raise SystemExit(f"the child did not start writing: exit {child.wait()}")
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
        child.communicate()
        row = rows[(kind, over)]
        row["runs"] += 1
        try:
            found = _read(module, out, kind)
        except Exception:  # noqa: BLE001 - a broken output is what this counts
            found = "broken"
        if found is None:
            row["absent" if not over else "broken"] += 1
        elif isinstance(found, str):
            row["broken"] += 1
        elif _same(found, new_values):
            row["new"] += 1
        elif over and _same(found, old_values):
            row["old"] += 1
        else:
            row["broken"] += 1
        clean_stale(folder)  # what the next run does first
        row["left"] += bool(_leftovers(folder, kind))
        shutil.rmtree(folder)
    return [(f"{kind} {'over previous' if over else 'no previous'}", r["runs"], r["old"], r["new"], r["absent"],
             r["broken"], r["left"]) for (kind, over), r in rows.items()]


def _can_tmpfs() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt && umount /mnt"],
                           capture_output=True)
    return probe.returncode == 0


def _inside(args) -> None:
    """Run inside a private mount namespace with a small tmpfs at ``args.inside``: one disk-full case."""
    folder, kind, previous_folder = args.inside, args.kind, args.previous
    if previous_folder:
        for name in os.listdir(previous_folder):
            shutil.copy(os.path.join(previous_folder, name), folder)
    before = _files(folder)
    run = subprocess.run([sys.executable, "-c", CHILD, "none", "0", "load", args.source, "--model",
                          f"{args.models}:build", "--out", _out(folder, kind)], env=_env(), capture_output=True,
                         text=True)
    after = _files(folder)
    print(json.dumps(dict(code=run.returncode, stderr=run.stderr.strip().splitlines()[-2:] if run.stderr else [],
                          traceback="Traceback" in run.stderr, unchanged=after == before,
                          left=[n for n in os.listdir(folder) if n.startswith(".regraft")])))


def disk_full(args, work, models_py, source, previous) -> tuple[str, list[tuple]]:
    sizes = {kind: sum(len(b) for b in _files(previous[kind][0]).values()) for kind in ("tf", "h5")}
    tmpfs = _can_tmpfs()
    rows = []
    for kind, over in KINDS:
        for fraction in (0.1, 0.5, 0.9):
            new_size = sizes[kind]
            if tmpfs:
                folder = os.path.join(work, f"full-{kind}-{over}-{fraction}")
                os.makedirs(folder)
                limit = int((new_size if over else 0) + fraction * new_size)
                script = (f"mount -t tmpfs -o size={limit} tmpfs {folder} && exec {sys.executable} "
                          f"{os.path.abspath(__file__)} --inside {folder} --kind {kind} --source {source} "
                          f"--models {models_py}" + (f" --previous {previous[kind][0]}" if over else ""))
                run = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, env=_env())
                try:
                    result = json.loads(run.stdout.strip().splitlines()[-1])
                except (IndexError, ValueError):
                    raise SystemExit(f"the disk-full worker failed:\n{run.stderr}") from None
            else:
                folder = _fresh(work, f"full-{kind}-{over}-{fraction}", previous[kind][0] if over else None)
                before = _files(folder)
                limit = int(fraction * new_size)
                run = subprocess.run([sys.executable, "-c", CHILD, "fsize", str(limit), "load", source, "--model",
                                      f"{models_py}:build", "--out", _out(folder, kind)], env=_env(),
                                     capture_output=True, text=True)
                result = dict(code=run.returncode, stderr=run.stderr.strip().splitlines()[-2:],
                              traceback="Traceback" in run.stderr, unchanged=_files(folder) == before,
                              left=[n for n in os.listdir(folder) if n.startswith(".regraft")])
            outcome = ("clean RegraftError" if result["code"] == 2 and not result["traceback"]
                       else "crash" if result["code"] < 0 or result["code"] > 128
                       else "traceback" if result["traceback"] else f"exit {result['code']}")
            first = result["stderr"][0] if result["stderr"] else ""
            said = re.search(r": ([^:]*)\. Nothing was written", first)  # the problem the error names
            message = said.group(1) if said else first[:70]
            rows.append((f"{kind} {'over previous' if over else 'no previous'}", f"{fraction:.0%}", outcome,
                         "yes" if result["unchanged"] else "NO", len(result["left"]), message))
    return ("tmpfs (real ENOSPC)" if tmpfs else "RLIMIT_FSIZE (EFBIG)"), rows


def _table(header: tuple, rows: list[tuple]) -> str:
    cells = [tuple(map(str, header))] + [tuple(map(str, r)) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=16, help="SIGKILLs in all (spread over the four cases)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--inside", help=argparse.SUPPRESS)
    parser.add_argument("--kind", help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    parser.add_argument("--models", help=argparse.SUPPRESS)
    parser.add_argument("--previous", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inside:
        _inside(args)
        return
    work = tempfile.mkdtemp(prefix="regraft-faults-")
    try:
        models_py, module, source, previous, values = _setup(work)
        print(f"model: {sum(v.size for v in values[0]) * 4 / 2**20:.1f} MiB of float32; write time "
              f"(regraft, previous output): tf {previous['tf'][1] * 1000:.0f} ms, h5 {previous['h5'][1] * 1000:.0f} ms")
        print(f"\nSIGKILL during `regraft load --out` ({args.kills} kills, seed {args.seed}; delay after the write "
              "starts: uniform in 0..2x the write time)")
        print(_table(("case", "kills", "old intact", "new complete", "absent", "BROKEN", "left after next run"),
                     kills(args, work, models_py, module, source, previous, values)))
        how, rows = disk_full(args, work, models_py, source, previous)
        print(f"\nDisk full during `regraft load --out`, by {how}; room for the new output: 10/50/90%")
        print(_table(("case", "room", "outcome", "previous unchanged", "left", "problem named"), rows))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
