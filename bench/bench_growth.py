"""Function-preserving growth (``reshape="preserve"``) on the growth moves people use, as a table.

Each case builds an old model (random biases and BatchNormalization statistics, so that
they are tested too), writes a real TF checkpoint with ``tf.train.Checkpoint(model=old).write``,
builds the grown model, loads the checkpoint with ``regraft.load(new, path, reshape="preserve")``
and compares both models' outputs with ``regraft.verify`` on random inputs. The table gives
the relative max error (max |old - new| over the largest |old|); a case passes below 1e-5.
Cases that cannot be preserved (a post-LN block) must be refused in strict mode with the
reason: their row says "refused" and the first problem.

Run from the repository root::

    TF_CPP_MIN_LOG_LEVEL=3 PYTHONPATH=src python bench/bench_growth.py [--only NAME]

The builders are used by ``tests/test_growth.py`` too.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import Any, Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

TOLERANCE = 1e-5


def _keras():
    import keras

    return keras


def randomize_extras(model: Any, seed: int) -> None:
    """Non-zero biases and BatchNormalization statistics with a positive variance (kernels stay Glorot)."""
    rng = np.random.default_rng(seed)
    for v in model.weights:
        name = v.path.rsplit("/", 1)[-1]
        shape = tuple(v.shape)
        if name in ("bias", "beta", "moving_mean"):
            v.assign((rng.standard_normal(shape) * 0.1).astype("float32"))
        elif name in ("gamma", "moving_variance"):
            v.assign(rng.uniform(0.5, 1.5, shape).astype("float32"))


# --------------------------------------------------------------------------- the cases


def tutorial(grown: bool) -> Any:
    from regraft.demo import build_inserted_new, build_inserted_old

    return build_inserted_new() if grown else build_inserted_old()


def plain_conv(grown: bool) -> Any:
    keras = _keras()
    inputs = keras.Input((12, 12, 3))
    x = keras.layers.Conv2D(20 if grown else 8, 3, activation="relu", name="c1")(inputs)
    return keras.Model(inputs, keras.layers.Conv2D(6, 3, name="c2")(x), name="plain")


def conv_bn_pool_head(grown: bool) -> Any:
    keras = _keras()
    inputs = keras.Input((12, 12, 3))
    x = keras.layers.Conv2D(24 if grown else 16, 3, name="c1")(inputs)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.ReLU(name="r1")(x)
    x = keras.layers.MaxPooling2D(2, name="pool")(x)
    x = keras.layers.Conv2D(48 if grown else 32, 3, activation="relu", name="c2")(x)
    x = keras.layers.Dropout(0.2, name="drop")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inputs, keras.layers.Dense(5, name="head")(x), name="pooled")


def conv_flatten(grown: bool) -> Any:
    keras = _keras()
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(12 if grown else 6, 3, activation="relu", name="c1")(inputs)
    x = keras.layers.ZeroPadding2D(1, name="pad")(x)
    x = keras.layers.AveragePooling2D(2, name="pool")(x)
    x = keras.layers.Flatten(name="flat")(x)
    return keras.Model(inputs, keras.layers.Dense(4, name="head")(x), name="flat")


def mlp_widen_and_insert(grown: bool) -> Any:
    keras = _keras()
    inputs = keras.Input((16,))
    x = keras.layers.Dense(64 if grown else 48, activation="relu", name="fc0")(inputs)
    x = keras.layers.Dense(48, activation="relu", name="fc1")(x)
    if grown:
        x = keras.layers.Dense(48, activation="relu", name="fc_new")(x)
    x = keras.layers.Dense(48, activation="relu", name="fc2")(x)
    return keras.Model(inputs, keras.layers.Dense(3, name="out")(x), name="mlp")


def _res_block(x: Any, name: str, filters: int, project: bool = False) -> Any:
    keras = _keras()
    y = keras.layers.Conv2D(filters, 3, padding="same", name=f"{name}_conv1")(x)
    y = keras.layers.BatchNormalization(name=f"{name}_bn1")(y)
    y = keras.layers.ReLU(name=f"{name}_relu1")(y)
    y = keras.layers.Conv2D(filters, 3, padding="same", name=f"{name}_conv2")(y)
    y = keras.layers.BatchNormalization(name=f"{name}_bn2")(y)
    if project:
        x = keras.layers.Conv2D(filters, 1, name=f"{name}_proj")(x)
        x = keras.layers.BatchNormalization(name=f"{name}_proj_bn")(x)
    return keras.layers.ReLU(name=f"{name}_out")(keras.layers.Add(name=f"{name}_add")([x, y]))


def resnet_deeper(grown: bool) -> Any:
    keras = _keras()
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", name="stem")(inputs)
    x = _res_block(x, "b1", 8)
    x = _res_block(x, "b2", 8)
    if grown:
        x = _res_block(x, "b3", 8)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inputs, keras.layers.Dense(4, name="head")(x), name="resnet")


def resnet_wider(grown: bool) -> Any:
    keras = _keras()
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(12 if grown else 8, 3, padding="same", name="stem")(inputs)
    x = _res_block(x, "b1", 12 if grown else 8)
    x = _res_block(x, "b2", 24 if grown else 16, project=True)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inputs, keras.layers.Dense(4, name="head")(x), name="resnet_wide")


def _bottleneck(x: Any, name: str, filters: int) -> Any:
    keras = _keras()
    y = x
    for i, (f, k) in enumerate(((filters, 1), (filters, 3), (4 * filters, 1)), start=1):
        y = keras.layers.Conv2D(f, k, padding="same", name=f"{name}_{i}_conv")(y)
        y = keras.layers.BatchNormalization(epsilon=1.001e-5, name=f"{name}_{i}_bn")(y)
        if i < 3:
            y = keras.layers.Activation("relu", name=f"{name}_{i}_relu")(y)
    return keras.layers.Activation("relu", name=f"{name}_out")(keras.layers.Add(name=f"{name}_add")([x, y]))


def resnet50_stage(grown: bool) -> Any:
    """A ResNet50-style stage of bottleneck blocks (conv1x1-BN-ReLU-conv3x3-BN-ReLU-conv1x1-BN + Add), 3 -> 5 blocks."""
    keras = _keras()
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(32, 3, padding="same", name="conv1_conv")(inputs)
    for i in range(1, (5 if grown else 3) + 1):
        x = _bottleneck(x, f"conv2_block{i}", 8)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    return keras.Model(inputs, keras.layers.Dense(4, name="predictions")(x), name="resnet50ish")


def _transformer_block(x: Any, name: str, pre_ln: bool) -> Any:
    keras = _keras()
    dim = x.shape[-1]
    if pre_ln:
        y = keras.layers.LayerNormalization(name=f"{name}_ln1")(x)
        y = keras.layers.MultiHeadAttention(2, 8, name=f"{name}_mha")(y, y)
        x = keras.layers.Add(name=f"{name}_add1")([x, y])
        y = keras.layers.LayerNormalization(name=f"{name}_ln2")(x)
        y = keras.layers.Dense(2 * dim, activation="gelu", name=f"{name}_ff1")(y)
        y = keras.layers.Dense(dim, name=f"{name}_ff2")(y)
        y = keras.layers.Dropout(0.1, name=f"{name}_drop")(y)
        return keras.layers.Add(name=f"{name}_add2")([x, y])
    y = keras.layers.MultiHeadAttention(2, 8, name=f"{name}_mha")(x, x)
    x = keras.layers.LayerNormalization(name=f"{name}_ln1")(keras.layers.Add(name=f"{name}_add1")([x, y]))
    y = keras.layers.Dense(2 * dim, activation="gelu", name=f"{name}_ff1")(x)
    y = keras.layers.Dense(dim, name=f"{name}_ff2")(y)
    return keras.layers.LayerNormalization(name=f"{name}_ln2")(keras.layers.Add(name=f"{name}_add2")([x, y]))


def _transformer(grown: bool, pre_ln: bool) -> Any:
    keras = _keras()
    inputs = keras.Input((6, 16))
    x = keras.layers.Dense(16, name="embed")(inputs)
    blocks = ["block1", "block2", "block3"] if grown else ["block1", "block2"]
    for name in blocks:
        x = _transformer_block(x, name, pre_ln)
    if pre_ln:
        x = keras.layers.LayerNormalization(name="final_ln")(x)
    return keras.Model(inputs, keras.layers.Dense(3, name="head")(x), name="pre_ln" if pre_ln else "post_ln")


def pre_ln_transformer(grown: bool) -> Any:
    return _transformer(grown, pre_ln=True)


def post_ln_transformer(grown: bool) -> Any:
    return _transformer(grown, pre_ln=False)


def concatenate_widened(grown: bool) -> Any:
    keras = _keras()
    inputs = keras.Input((8, 8, 3))
    a = keras.layers.Conv2D(10 if grown else 6, 1, activation="relu", name="branch_a")(inputs)
    b = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="branch_b")(inputs)
    c = keras.layers.Conv2D(9 if grown else 5, 3, padding="same", activation="relu", name="branch_c")(inputs)
    x = keras.layers.Concatenate(name="concat")([a, b, c])
    x = keras.layers.Conv2D(8, 1, name="mix")(x)
    x = keras.layers.GlobalMaxPooling2D(name="gmp")(x)
    return keras.Model(inputs, keras.layers.Dense(3, name="head")(x), name="inception")


def insert_after_widened(grown: bool) -> Any:
    keras = _keras()
    inputs = keras.Input((10,))
    x = keras.layers.Dense(40 if grown else 24, activation="relu", name="h1")(inputs)
    if grown:
        x = keras.layers.Dense(40, activation="relu", name="h_inserted")(x)
    return keras.Model(inputs, keras.layers.Dense(3, name="out")(x), name="mlp2")


def inserted_conv_bn(grown: bool) -> Any:
    keras = _keras()
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="c1")(inputs)
    if grown:
        x = keras.layers.Conv2D(6, 3, padding="same", name="c_inserted")(x)
        x = keras.layers.BatchNormalization(name="bn_inserted")(x)
    x = keras.layers.Conv2D(4, 3, name="c2")(x)
    return keras.Model(inputs, keras.layers.GlobalAveragePooling2D(name="gap")(x), name="convs")


def mlp_unnamed(grown: bool) -> Any:
    """The MLP case with Keras' automatic names: alignment alone pairs the layers."""
    keras = _keras()
    inputs = keras.Input((48,))
    x = keras.layers.Dense(64 if grown else 48, activation="relu")(inputs)
    x = keras.layers.Dense(48, activation="relu")(x)
    if grown:
        x = keras.layers.Dense(48, activation="relu")(x)
    x = keras.layers.Dense(48, activation="relu")(x)
    return keras.Model(inputs, keras.layers.Dense(3)(x), name="mlp_unnamed")


def inserted_valid_conv(grown: bool) -> Any:
    """A 3x3 'valid' convolution inserted: it crops the border, so it is no identity."""
    keras = _keras()
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="c1")(inputs)
    if grown:
        x = keras.layers.Conv2D(6, 3, name="c_valid")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inputs, keras.layers.Dense(3, name="head")(x), name="valid")


def block_after_linear_stem(grown: bool) -> Any:
    """A residual block (with ReLU after its sum) inserted right after a stem without activation."""
    keras = _keras()
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", name="stem")(inputs)
    if grown:
        x = _res_block(x, "b0", 8)
    x = _res_block(x, "b1", 8)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inputs, keras.layers.Dense(4, name="head")(x), name="linear_stem")


def embedding_widened(grown: bool) -> Any:
    """A token embedding widened 8 -> 12, averaged over the sequence, into a Dense head."""
    keras = _keras()
    inputs = keras.Input((5,), dtype="int32")
    x = keras.layers.Embedding(20, 12 if grown else 8, name="emb")(inputs)
    x = keras.layers.GlobalAveragePooling1D(name="mean")(x)
    return keras.Model(inputs, keras.layers.Dense(2, name="head")(x), name="embedding")


def more_classes(grown: bool) -> Any:
    """A classifier head with more classes (10 -> 12): new outputs, nothing to preserve them from."""
    keras = _keras()
    inputs = keras.Input((16,))
    x = keras.layers.Dense(32, activation="relu", name="features")(inputs)
    x = keras.layers.Dense(12 if grown else 10, name="logits")(x)
    return keras.Model(inputs, keras.layers.Activation("softmax", name="probs")(x), name="classifier")


def residual_plus_operator(grown: bool) -> Any:
    """Residual blocks written ``x + f(x)`` (an operation, not an Add layer), ConvNeXt-style, one inserted."""
    keras = _keras()
    inputs = keras.Input((6, 6, 8))
    x = inputs
    for name in ("b1", "b2", "b3") if grown else ("b1", "b2"):
        y = keras.layers.Conv2D(8, 3, padding="same", groups=8, name=f"{name}_dw")(x)
        y = keras.layers.LayerNormalization(epsilon=1e-6, name=f"{name}_ln")(y)
        y = keras.layers.Dense(32, activation="gelu", name=f"{name}_pw1")(y)
        y = keras.layers.Dense(8, name=f"{name}_pw2")(y)
        x = x + y
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inputs, keras.layers.Dense(3, name="head")(x), name="plus")


def efficientnet_b0_b1(grown: bool) -> Any:
    """EfficientNetB0 -> B1 (same widths, more blocks per stage: inserted MBConv blocks with squeeze-excite)."""
    keras = _keras()
    build = keras.applications.EfficientNetB1 if grown else keras.applications.EfficientNetB0
    return build(input_shape=(64, 64, 3), weights=None, classes=10)


def mobilenet_v2(grown: bool) -> Any:
    keras = _keras()
    return keras.applications.MobileNetV2(input_shape=(64, 64, 3), alpha=1.3 if grown else 1.0, weights=None,
                                          classes=10)


CASES: dict[str, tuple[str, Callable[[bool], Any], bool]] = {
    # name: (what changed, builder, must be preserved; otherwise refused with the reason)
    "tutorial": ("the tutorial's inserted Dense (subclassed)", tutorial, True),
    "plain_conv": ("a plain conv widened 8->20", plain_conv, True),
    "conv_bn_pool_head": ("conv+BN 16->24, conv 32->48, GAP -> Dense head", conv_bn_pool_head, True),
    "conv_flatten": ("a conv widened 6->12 before padding, pooling, Flatten -> Dense", conv_flatten, True),
    "mlp_widen_insert": ("MLP: first layer 48->64, a 48->48 layer inserted later", mlp_widen_and_insert, True),
    "resnet_deeper": ("ResNet-style (conv-BN-ReLU-conv-BN + Add), third block inserted", resnet_deeper, True),
    "pre_ln_deeper": ("pre-LN transformer, third block inserted", pre_ln_transformer, True),
    "resnet_wider": ("ResNet-style widened, identity and projection shortcuts", resnet_wider, True),
    "resnet50_stage": ("ResNet50-style bottleneck stage, 3 -> 5 blocks", resnet50_stage, True),
    "concatenate": ("Concatenate of three branches, two widened", concatenate_widened, True),
    "insert_after_widened": ("Dense widened 24->40, Dense(40) inserted right after", insert_after_widened, True),
    "inserted_conv_bn": ("Conv2D + BatchNormalization inserted", inserted_conv_bn, True),
    "mobilenet_v2": ("MobileNetV2 alpha 1.0 -> 1.3 (depthwise convs)", mobilenet_v2, True),
    "residual_plus_operator": ("ConvNeXt-style blocks summed with x + f(x), one inserted", residual_plus_operator,
                               True),
    "efficientnet_b0_b1": ("EfficientNetB0 -> B1 (inserted MBConv blocks)", efficientnet_b0_b1, True),
    "embedding": ("a token embedding widened 8->12, mean-pooled, Dense head", embedding_widened, True),
    "mlp_unnamed": ("the MLP case with automatic names (alignment alone; accept_order)", mlp_unnamed, True),
    "post_ln_deeper": ("post-LN transformer, third block inserted: cannot be an identity", post_ln_transformer, False),
    "inserted_valid_conv": ("a 'valid' 3x3 conv inserted: crops, cannot be an identity", inserted_valid_conv, False),
    "block_after_linear_stem": ("residual block + ReLU inserted after a linear stem: ReLU changes negatives",
                                block_after_linear_stem, False),
    "more_classes": ("a head with more classes (10 -> 12): new outputs are not the old ones", more_classes, False),
}
# Load options per case: which of two alike inserted layers is the new one only order tells.
OPTIONS: dict[str, dict[str, Any]] = {"mlp_unnamed": {"accept_order": True}}


def run_case(name: str, folder: str) -> dict[str, Any]:
    """Build, save, grow, load with preserve and verify one case; returns a table row."""
    import tensorflow as tf

    import regraft

    keras = _keras()
    what, builder, preservable = CASES[name]
    keras.utils.set_random_seed(7)
    old = builder(False)
    randomize_extras(old, 7)
    path = tf.train.Checkpoint(model=old).write(os.path.join(folder, name, "ckpt"))
    new = builder(True)
    try:
        report = regraft.load(new, path, reshape="preserve", **OPTIONS.get(name, {}))
    except regraft.LoadError as exc:
        return {"case": name, "what": what, "result": "refused", "max_rel": None,
                "ok": not preservable, "detail": exc.problems[0] if exc.problems else str(exc)}
    result = regraft.verify(old, new, tolerance=float("inf"))
    ok = preservable and result.max_rel < TOLERANCE
    return {"case": name, "what": what, "result": "loaded", "max_rel": result.max_rel, "ok": ok,
            "detail": report.summary()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", action="append", help="run only this case (repeatable)")
    args = parser.parse_args(argv)
    names = args.only or list(CASES)
    rows = []
    print("| case | what changed | result | relative max error | |\n| --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory(prefix="regraft-bench-growth-") as folder:
        for name in names:
            rows.append(run_case(name, folder))
            row = rows[-1]
            err = "-" if row["max_rel"] is None else f"{row['max_rel']:.1e}"
            print(f"| {row['case']} | {row['what']} | {row['result']} | {err} | {'ok' if row['ok'] else 'FAIL'} |",
                  flush=True)
            if not row["ok"] or row["result"] == "refused":
                print(f"|   | {row['detail'][:300]} | | | |", flush=True)
    passed = sum(r["ok"] for r in rows)
    print(f"\n{passed}/{len(rows)} cases as expected (preserved below {TOLERANCE:g} relative max error, "
          "or refused with the reason)")
    return 0 if passed == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
