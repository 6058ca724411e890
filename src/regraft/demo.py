"""The built-in demo: four model changes, starting with the three of the classic "load weights into a changed model" tutorial.

The tutorial (TensorFlow's guide to loading weights after changing a model) builds a
small model, saves it, changes it and tries to load the old weights; its cases
(a)-(c) are the ones below.

Each ``build_*`` function returns a built model, so they double as ``--model``
specs (``--model regraft.demo:build_inserted_new``).

(a) a layer is inserted: ``dense1 Dense(64, relu) → dense2 Dense(10)`` becomes
    ``dense1 → dense2 Dense(128, relu) → dense3 Dense(10)``;
(b) a convolution gets more filters: ``Conv2D(32, 3)`` becomes ``Conv2D(64, 3)``;
(c) a layer is renamed: ``name="dense_layer_1"`` becomes ``name="my_dense_layer"``.
    Two different chosen names may be one layer renamed or a new layer that
    replaced it, so regraft does not guess; one rename rule says which;
(d) a layer is inserted in the middle of a functional model, whose TF-checkpoint
    keys are positions (``_operations/3``): every later key shifts, and alignment
    finds each old layer's counterpart anyway.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Callable

__all__ = ["run_demo", "SITUATIONS"]


def _keras():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    return keras


def build_inserted_old() -> Any:
    """(a) before: dense1(64, relu) → dense2(10), subclassed."""
    keras = _keras()

    class Original(keras.Model):
        def __init__(self) -> None:
            super().__init__(name="original")
            self.dense1 = keras.layers.Dense(64, activation="relu")
            self.dense2 = keras.layers.Dense(10)

        def call(self, x):
            return self.dense2(self.dense1(x))

    model = Original()
    model(keras.ops.zeros((1, 32)))
    return model


def build_inserted_new() -> Any:
    """(a) after: dense1(64, relu) → dense2(128, relu) → dense3(10), subclassed."""
    keras = _keras()

    class Modified(keras.Model):
        def __init__(self) -> None:
            super().__init__(name="modified")
            self.dense1 = keras.layers.Dense(64, activation="relu")
            self.dense2 = keras.layers.Dense(128, activation="relu")
            self.dense3 = keras.layers.Dense(10)

        def call(self, x):
            return self.dense3(self.dense2(self.dense1(x)))

    model = Modified()
    model(keras.ops.zeros((1, 32)))
    return model


def _conv_model(filters: int) -> Any:
    keras = _keras()
    return keras.Sequential(
        [keras.Input((28, 28, 1)), keras.layers.Conv2D(filters, 3, name="conv"), keras.layers.Flatten(), keras.layers.Dense(10, name="head")]
    )


def build_conv_old() -> Any:
    """(b) before: Conv2D(32, 3) → Flatten → Dense(10)."""
    return _conv_model(32)


def build_conv_new() -> Any:
    """(b) after: Conv2D(64, 3) → Flatten → Dense(10)."""
    return _conv_model(64)


def _named_model(name: str) -> Any:
    keras = _keras()
    inputs = keras.Input((16,))
    hidden = keras.layers.Dense(32, activation="relu", name=name)(inputs)
    return keras.Model(inputs, keras.layers.Dense(4, name="out")(hidden))


def build_renamed_old() -> Any:
    """(c) before: a functional model whose first layer is named dense_layer_1."""
    return _named_model("dense_layer_1")


def build_renamed_new() -> Any:
    """(c) after: the same layer named my_dense_layer."""
    return _named_model("my_dense_layer")


def _mlp(inserted: bool) -> Any:
    keras = _keras()
    inputs = keras.Input((16,))
    x = keras.layers.Dense(32, activation="relu", name="d1")(inputs)
    x = keras.layers.Dense(32, activation="relu", name="d2")(x)
    if inserted:
        x = keras.layers.Dense(48, activation="relu", name="inserted")(x)
    x = keras.layers.Dense(16, activation="relu", name="d3")(x)
    return keras.Model(inputs, keras.layers.Dense(4, name="head")(x))


def build_functional_old() -> Any:
    """(d) before: a functional MLP d1 → d2 → d3 → head (TF checkpoints key it by position)."""
    return _mlp(False)


def build_functional_new() -> Any:
    """(d) after: the same MLP with a layer inserted between d2 and d3."""
    return _mlp(True)


# What changed in each situation, in words (the model names Keras makes up say nothing).
CHANGES = {
    "(a) inserted layer": "dense1 -> dense2(10) becomes dense1 -> dense2(128) -> dense3(10), subclassed, TF checkpoint",
    "(b) more filters": "Conv2D(32) becomes Conv2D(64) before Flatten -> Dense head, Sequential, TF checkpoint",
    "(c) renamed layer": "the first layer's name dense_layer_1 becomes my_dense_layer, functional, .weights.h5",
    "(d) inserted layer, functional": "Dense 'inserted' between d2 and d3 of a functional MLP, TF checkpoint",
}

SITUATIONS: list[tuple[str, Callable[[], Any], Callable[[], Any], str]] = [
    ("(a) inserted layer", build_inserted_old, build_inserted_new, "ckpt"),
    ("(b) more filters", build_conv_old, build_conv_new, "ckpt"),
    ("(c) renamed layer", build_renamed_old, build_renamed_new, "weights.h5"),
    ("(d) inserted layer, functional", build_functional_old, build_functional_new, "ckpt"),
]


def run_demo(out: Callable[[str], None] = print, workdir: str | None = None) -> list[Any]:
    """Save each situation's original model, load it into the modified one, print the reports.

    Returns the reports, in order.
    """
    import regraft

    keras = _keras()
    keras.utils.set_random_seed(7)
    reports = []
    with tempfile.TemporaryDirectory(prefix="regraft-demo-", dir=workdir) as tmp:
        for title, build_old, build_new, kind in SITUATIONS:
            old, new = build_old(), build_new()
            path = os.path.join(tmp, title[1] + "." + kind) if kind != "ckpt" else os.path.join(tmp, title[1], "ckpt")
            if kind == "ckpt":
                import tensorflow as tf

                path = tf.train.Checkpoint(model=old).write(path)
            else:
                old.save_weights(path)
            out(f"\n=== {title}: {CHANGES[title]} ===")
            try:
                regraft.load(new, path)
                out("strict load: OK")
            except regraft.LoadError as exc:
                out("strict load refused (the model is unchanged):\n  " + "\n  ".join(exc.problems))
            report = regraft.load(new, path, strict=False)
            out("non-strict load:\n" + str(report))
            out("grouped (what `regraft diff` prints):\n  " + "\n  ".join(report.grouped().splitlines()[1:]))
            reports.append(report)
            if title.startswith("(c)"):
                fixed = build_renamed_new()
                renamed = regraft.load(fixed, path, rename={"dense_layer_1/": "my_dense_layer/"})
                out("names differ, so regraft did not guess; one rule says it is the same layer "
                    "(rename={'dense_layer_1/': 'my_dense_layer/'}):\n  " + renamed.summary())
        out(
            "\nNote on (a): the tutorial copies old dense2 into new dense3. Asked to do that "
            "(rename={'dense2/': 'dense3/'}), regraft says:"
        )
        old, new = build_inserted_old(), build_inserted_new()
        import tensorflow as tf

        path = tf.train.Checkpoint(model=old).write(os.path.join(tmp, "a2", "ckpt"))
        try:
            regraft.load(new, path, rename={"dense2/": "dense3/"}, allow_missing=["dense2/*"])
        except regraft.LoadError as exc:
            out("  " + "\n  ".join(exc.problems))
        out("\nWhat works instead for (a): reshape='preserve' starts the inserted dense2 as an identity and "
            "pads old dense2 into dense3, so the new model computes what the old one did:")
        out("(Why the inserted layer is dense3 above and dense2 here: a plain load pairs layers by name and never "
            "moves a tensor to a layer of another name on a guess, so old dense2 stays with new dense2 and dense3 "
            "is new; preserve reads the change by function, and only 'dense2 inserted, old dense2 now dense3' "
            "keeps the function, which verify then checks.)")
        grown = build_inserted_new()
        report = regraft.load(grown, path, reshape="preserve")
        out("  " + "\n  ".join(report.grouped().splitlines()[1:]))
        out(f"  verify: {regraft.verify(old, grown)}")
        reports.append(report)
    return reports
