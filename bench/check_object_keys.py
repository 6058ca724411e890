#!/usr/bin/env python
"""Are TF object-graph keys predicted right without TensorFlow? Checked on every Keras 3 model of the zoo.

On the TensorFlow backend regraft asks TensorFlow (``_trackable_children``) for a
model's checkpoint keys; on JAX and PyTorch it predicts them from the model's
attributes (``regraft.targets._compat.predicted_checkpoint_children``). This script
builds the old and new model of every Keras 3 pair of ``bench_zoo.py`` (after
``clear_session()``, so names are the same in every process) and writes each
variable's key, by ``variable.path``, and each layer's key to a JSON file:

    KERAS_BACKEND=tensorflow python bench/check_object_keys.py dump tf.json              # TensorFlow's walk
    KERAS_BACKEND=tensorflow python bench/check_object_keys.py dump pred.json --predicted  # prediction, same models
    KERAS_BACKEND=jax        python bench/check_object_keys.py dump jax.json             # prediction on JAX
    python bench/check_object_keys.py compare tf.json jax.json

``compare`` prints how many models have every key equal, and the differences.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def dump(out: str, predicted: bool) -> int:
    import keras

    import bench_zoo
    from regraft.targets import _compat
    from regraft.targets import keras as keras_target

    if predicted:  # the prediction, on whatever backend this is
        _compat.checkpoint_children = _compat.predicted_checkpoint_children
    found: dict[str, object] = {}
    for pair in bench_zoo.pairs():
        if pair.framework != "keras":
            continue
        for side, build in (("old", pair.build_old), ("new", pair.build_new)):
            keras.backend.clear_session()
            try:
                model = build()
            except Exception as exc:  # noqa: BLE001 - a pair this backend cannot build is reported, not fatal
                found[f"{pair.name}/{side}"] = f"build failed: {type(exc).__name__}: {exc}"
                continue
            variables, layers = keras_target._object_walk(model)
            found[f"{pair.name}/{side}"] = {
                "variables": sorted([v.path, variables.get(id(v))] for v in model.weights),
                "layers": sorted([path, list(named)] for path, named in layers.items()),
            }
    with open(out, "w") as f:
        json.dump({"backend": keras.backend.backend(), "predicted": predicted, "models": found}, f)
    print(f"{len(found)} models, backend {keras.backend.backend()}, {'predicted' if predicted else 'framework'} walk -> {out}")
    return 0


def compare(a_path: str, b_path: str) -> int:
    a, b = (json.load(open(p))["models"] for p in (a_path, b_path))
    common = sorted(set(a) & set(b))
    differ = [name for name in common if a[name] != b[name]]
    for name in differ[:20]:
        if isinstance(a[name], str) or isinstance(b[name], str):
            print(f"{name}: {a[name] if isinstance(a[name], str) else 'built'} | {b[name] if isinstance(b[name], str) else 'built'}")
            continue
        va, vb = dict(map(tuple, a[name]["variables"])), dict(map(tuple, b[name]["variables"]))
        wrong = [(path, va.get(path), vb.get(path)) for path in sorted(set(va) | set(vb)) if va.get(path) != vb.get(path)]
        print(f"{name}: {len(wrong)} variable keys differ {wrong[:3]}; layers equal: {a[name]['layers'] == b[name]['layers']}")
    variables = sum(len(a[n]["variables"]) for n in common if not isinstance(a[n], str))
    print(f"{len(common)} models ({variables} variables) in both; {len(common) - len(differ)} with every key equal, "
          f"{len(differ)} differ; only in {a_path}: {len(set(a) - set(b))}, only in {b_path}: {len(set(b) - set(a))}")
    return 1 if differ else 0


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "dump":
        return dump(argv[1], "--predicted" in argv[2:])
    if len(argv) == 3 and argv[0] == "compare":
        return compare(argv[1], argv[2])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
