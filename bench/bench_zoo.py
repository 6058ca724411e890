#!/usr/bin/env python
"""Which old tensor does each new variable get? A zoo of old -> new model pairs, scored by value.

For every pair the script builds the old model (Keras 3, or tf-keras for the
"tf.keras moved to Keras 3" pairs), gives every old variable -- trainable and
non-trainable -- distinct seeded random values, and saves it in each format that
applies:

  tf        tf.train.Checkpoint(model=old).write(prefix)          (Keras 3 and tf-keras old models)
  tf-keras  old.save_weights(prefix), TF format                    (tf-keras old models only)
  h5        old.save_weights("old.weights.h5") (Keras 3) or old.save_weights("old.h5") (tf-keras, Keras 2 h5)
  tf-opt    the folder of a tf.train.CheckpointManager of Checkpoint(model=old, optimizer=...)  (pairs with
            train=True: the old model takes one Adam step first, so every format of such a pair holds
            optimizer slots where the library saves them; the folder holds an older save of the trained,
            not yet randomised values, and a loader that reads it instead of the newest gets WRONG values)

Old and new models are built as if by separate programs: ``clear_session()`` runs
before each build, so auto-generated layer names restart.

The ground truth is written by hand per pair: which old *layer* each new layer
continues (explicit dicts of layer paths for the synthetic pairs; "same layer name,
model-name prefix removed" for the keras.applications families). Variables of
corresponding layers correspond by variable name. Old variables are then identified
by VALUE, never by checkpoint key.

Each (pair, format) case is run three ways:

  fresh     regraft.load(new, path, strict=False, reshape="fresh"); every new variable
            is judged by its value: recovered (holds its expected old tensor bit for bit),
            WRONG (holds another old tensor, or anything but its fresh value), or fresh.
            A fresh variable whose expected source is in the file with its shape is
            "confirm" when the plan left it for the user to confirm (status
            ``unconfirmed`` or a truthy ``confirm`` attribute), else "missed".
  strict    regraft.load(new, path) (strict=True): "refused" (LoadError) or loaded and
            scored the same way; the number of strict problems is recorded.
  decisions regraft.plan(new, path, reshape="fresh"): every assignment with a source is
            read back with regraft.open(path).read(key), identified by value and compared
            with the expected old variable -- this also judges shape-mismatched and
            unconfirmed decisions; a calibration table shows, per confidence value, how
            many decisions were right.

Expected sources of another shape are counted as "mismatch" (reshape="fresh" cannot
load them); expected sources that the file does not hold at all (e.g. layers kept in a
plain Python list, which Keras 3 ``tf.train.Checkpoint`` drops) are counted as
"absent". Neither is eligible.

Pairs of the group "limits" are cases that no loader can decide from the file alone (TF
checkpoints do not record sub-model names or layer classes; .weights.h5 keeps a layer's
variables by index) or whose truth is debatable. They are run and scored like the others
but printed apart, under "Known limits (not counted in the totals or the exit status)",
with their wrong counts and one line each saying why; the TOTAL row, the calibration table
and the exit status leave them out (a crash of one still counts as an error).

Some pairs need more than ``Checkpoint(model=old)``: ``Pair.writer`` writes their "tf"
checkpoint (the model next to an EMA copy or a teacher, inside a ``tf.Module``),
``Pair.root`` is passed to ``regraft.plan`` / ``regraft.load`` as ``root=``, and
``Pair.only_formats`` restricts a pair to some of its formats.

The script exits 1 when any variable or decision outside the known limits is WRONG, or an
unchanged architecture does not load 100% with strict=True and no problems. Run ``--help`` for the
options and ``--list`` for the pairs; bench/README.md explains the output.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import re
import shlex
import shutil
import sys
import tempfile
import time
import types
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from bench_align import digest, pct, quiet  # noqa: E402  (shared helpers of the sibling benchmark)

ELIGIBLE, MISMATCH, ABSENT, NEW = "eligible", "mismatch", "absent", "new"
KERAS3_FORMATS = ("tf", "h5")
TF_KERAS_FORMATS = ("tf", "tf-keras", "h5")
ALL_FORMATS = ("tf", "tf-keras", "h5", "tf-opt")

Layer = Any
Model = Any
# A pair's ground truth: (new model, old model) -> [(new layer, old layer it continues, or None)].
# Layers may be containers (a block, a sub-model): their weighted leaf layers then correspond in order.
Expect = Callable[[Model, Model], list[tuple[Layer, Layer | None]]]


# =============================================================================== model walking


def sublayers(layer: Layer) -> list[Layer]:
    """Direct sub-layers of a Keras 3 or tf-keras layer/model (both have ``_flatten_layers``)."""
    flatten = getattr(layer, "_flatten_layers", None)
    if flatten is not None:
        return list(flatten(include_self=False, recursive=False))
    return list(getattr(layer, "layers", []))


def short_name(variable: Any) -> str:
    """``kernel`` for Keras 3 (``v.name``) and tf-keras (``v.name == "dense/kernel:0"``)."""
    return str(variable.name).rsplit("/", 1)[-1].split(":", 1)[0]


def leaf_layers(root: Layer) -> list[tuple[str, Layer, list[Any]]]:
    """Every layer that owns variables itself, as ``(path of layer names below root, layer, own variables)``.

    A variable belongs to the innermost layer that lists it. Raises unless the leaves
    account for exactly ``root.weights``, so a ground truth never silently drops a variable.
    """
    out: list[tuple[str, Layer, list[Any]]] = []
    seen: set[int] = set()

    def visit(layer: Layer, path: str) -> None:
        kids = [c for c in sublayers(layer) if id(c) not in seen]
        seen.update(id(c) for c in kids)
        in_kids = {id(v) for c in kids for v in c.weights}
        own = [v for v in layer.weights if id(v) not in in_kids]
        if own:
            out.append((path or layer.name, layer, own))
        for c in kids:
            visit(c, f"{path}/{c.name}" if path else c.name)

    visit(root, "")
    listed = [id(v) for _, _, vs in out for v in vs]
    weights = {id(v) for v in root.weights}
    if len(listed) != len(set(listed)) or set(listed) != weights:
        raise RuntimeError(f"{root.name}: leaf layers list {len(set(listed))} variables, weights has {len(weights)}")
    return out


def labelled_variables(root: Layer) -> list[tuple[str, Any]]:
    """Every variable of ``root`` as ``(leaf path/variable name, variable)``, labels made unique."""
    out, used = [], Counter()
    for path, _, variables in leaf_layers(root):
        for v in variables:
            label = f"{path}/{short_name(v)}"
            used[label] += 1
            out.append((label if used[label] == 1 else f"{label}#{used[label]}", v))
    return out


def role(variable: Any) -> str:
    """A variable's name without Keras' auto-numbering: ``variable_33`` -> ``variable``, ``kernel`` -> ``kernel``."""
    return re.sub(r"_\d+$", "", short_name(variable))


def corresponding_variables(new_layer: Layer, old_layer: Layer) -> list[tuple[Any, Any]]:
    """Variables of two corresponding layers: their weighted leaves in order, then their variables in
    creation order when the names agree up to auto-numbering (``add_weight`` without a name gives
    ``variable_15`` in one program and ``variable_33`` in the other), else by exact name.

    Raises if the two layers do not have the same structure (a bug in the ground truth).
    """
    new_leaves, old_leaves = leaf_layers(new_layer), leaf_layers(old_layer)
    if len(new_leaves) != len(old_leaves):
        raise RuntimeError(f"ground truth: {new_layer.name} has {len(new_leaves)} weighted leaves, "
                           f"{old_layer.name} has {len(old_leaves)}")
    pairs = []
    for (n_path, n_layer, n_vars), (o_path, o_layer, o_vars) in zip(new_leaves, old_leaves):
        if type(n_layer).__name__ != type(o_layer).__name__:
            raise RuntimeError(f"ground truth: {n_path} is a {type(n_layer).__name__}, "
                               f"{o_path} a {type(o_layer).__name__}")
        if [role(v) for v in n_vars] == [role(v) for v in o_vars]:
            pairs += list(zip(n_vars, o_vars))
            continue
        old_by_name = {short_name(v): v for v in o_vars}
        if len(old_by_name) != len(o_vars):
            raise RuntimeError(f"ground truth: {o_path} has two variables of one name")
        pairs += [(v, old_by_name[short_name(v)]) for v in n_vars if short_name(v) in old_by_name]
    return pairs


# =============================================================================== ground-truth helpers


def explicit(mapping: dict[str, str | None]) -> Expect:
    """Ground truth as a dict: every weighted leaf path of the new model -> old leaf path (or None: new layer).

    The dict must name every new leaf exactly, and every old path must exist, so that a
    layer renamed by Keras' auto-naming shows up as an error rather than a silent gap.
    """

    def expect(new: Model, old: Model) -> list[tuple[Layer, Layer | None]]:
        new_leaves = {p: layer for p, layer, _ in leaf_layers(new)}
        old_leaves = {p: layer for p, layer, _ in leaf_layers(old)}
        if set(mapping) != set(new_leaves):
            raise RuntimeError(f"ground truth for {new.name}: dict names {sorted(set(mapping) - set(new_leaves))} "
                               f"that the new model lacks, and lacks {sorted(set(new_leaves) - set(mapping))}")
        bad = [o for o in mapping.values() if o is not None and o not in old_leaves]
        if bad:
            raise RuntimeError(f"ground truth for {new.name}: old model {old.name} has no layer {bad}; "
                               f"it has {sorted(old_leaves)}")
        return [(new_leaves[n], old_leaves[o] if o is not None else None) for n, o in mapping.items()]

    return expect


def identity_paths(paths: list[str]) -> dict[str, str | None]:
    return {p: p for p in paths}


def by_name(old_prefix: str = "", new_prefix: str = "", new_scope: str = "",
            extra: dict[str, str] | None = None) -> Expect:
    """The rule for keras.applications families: same layer path after removing the model-name prefix
    (``convnext_tiny_`` / ``convnext_small_``) from every path component; ``new_scope`` is a nested
    base model's name in the new model (``xception/``); ``extra`` maps new paths to old paths by hand."""

    def strip(path: str, prefix: str) -> str:
        return "/".join(c[len(prefix):] if prefix and c.startswith(prefix) else c for c in path.split("/"))

    def expect(new: Model, old: Model) -> list[tuple[Layer, Layer | None]]:
        olds = {strip(p, old_prefix): layer for p, layer, _ in leaf_layers(old)}
        by_path = {p: layer for p, layer, _ in leaf_layers(old)}
        out = []
        for p, layer, _ in leaf_layers(new):
            if extra and p in extra:
                out.append((layer, by_path[extra[p]]))
                continue
            if new_scope:
                if not p.startswith(new_scope + "/"):
                    raise RuntimeError(f"ground truth: new layer {p} is outside {new_scope}/ and not in extra")
                p = p[len(new_scope) + 1:]
            out.append((layer, olds.get(strip(p, new_prefix))))
        return out

    return expect


def by_object(pairs: Callable[[Model, Model], list[tuple[Layer, Layer]]]) -> Expect:
    """Ground truth given as layer objects (``new.blocks[0]`` continues ``old.blocks[0]``);
    every weighted leaf of the new model not covered continues nothing."""

    def expect(new: Model, old: Model) -> list[tuple[Layer, Layer | None]]:
        return list(pairs(new, old))

    return expect


# =============================================================================== synthetic models


@functools.cache
def custom() -> types.SimpleNamespace:
    """The custom layers and models of the synthetic pairs (defined on first use: Keras is imported lazily)."""
    import keras
    from keras import layers

    class TransformerBlock(layers.Layer):
        """Pre-LN transformer block: x + MHA(LN(x)), then x + FFN(LN(x))."""

        def __init__(self, dim: int, heads: int, named: bool, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            n = (lambda s: s) if named else (lambda s: None)
            self.ln1 = layers.LayerNormalization(name=n("ln1"))
            self.attn = layers.MultiHeadAttention(heads, dim // heads, name=n("attn"))
            self.ln2 = layers.LayerNormalization(name=n("ln2"))
            self.ff1 = layers.Dense(2 * dim, activation="gelu", name=n("ff1"))
            self.ff2 = layers.Dense(dim, name=n("ff2"))

        def call(self, x: Any) -> Any:
            h = self.ln1(x)
            x = x + self.attn(h, h)
            return x + self.ff2(self.ff1(self.ln2(x)))

    class PositionEmbedding(layers.Layer):
        """A learned position table added to the token embeddings (a custom layer with its own weight)."""

        def __init__(self, length: int, dim: int, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.table = self.add_weight(shape=(length, dim), initializer="random_normal", name="table")

        def call(self, x: Any) -> Any:
            return x + self.table

    class DenseStack(keras.Model):
        """Subclassed model whose blocks live in a plain Python list."""

        def __init__(self, depth: int, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.blocks = [layers.Dense(16, activation="relu") for _ in range(depth)]
            self.head = layers.Dense(3)

        def call(self, x: Any) -> Any:
            for block in self.blocks:
                x = block(x)
            return self.head(x)

    class Residual(layers.Layer):
        """conv -> BN -> conv, added to the input (a custom layer holding sub-layers as attributes)."""

        def __init__(self, channels: int, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.conv_a = layers.Conv2D(channels, 3, padding="same", name="conv_a")
            self.bn_a = layers.BatchNormalization(name="bn_a")
            self.conv_b = layers.Conv2D(channels, 3, padding="same", name="conv_b")

        def call(self, x: Any) -> Any:
            return x + self.conv_b(keras.ops.relu(self.bn_a(self.conv_a(x))))

    class Tower(keras.Model):
        """Subclassed model with attribute layers, a custom layer and a model-level weight."""

        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.stem = layers.Conv2D(8, 3, padding="same", name="stem")
            self.stem_bn = layers.BatchNormalization(name="stem_bn")
            self.res = Residual(8, name="res")
            self.pool = layers.GlobalAveragePooling2D(name="pool")
            self.head = layers.Dense(5, name="head")
            self.scale = self.add_weight(shape=(5,), initializer="ones", name="scale")

        def call(self, x: Any) -> Any:
            return self.head(self.pool(self.res(keras.ops.relu(self.stem_bn(self.stem(x)))))) * self.scale

    class NormProj(layers.Layer):
        """BatchNormalization then Dense, as one custom layer (for the move-into/out-of pairs)."""

        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.norm = layers.BatchNormalization(name="bn")
            self.proj = layers.Dense(12, name="d2")

        def call(self, x: Any) -> Any:
            return self.proj(self.norm(x))

    return types.SimpleNamespace(TransformerBlock=TransformerBlock, PositionEmbedding=PositionEmbedding,
                                 DenseStack=DenseStack, Residual=Residual, Tower=Tower, NormProj=NormProj)


def call(fn: Callable[..., Model], *args: Any, **kwargs: Any) -> Callable[[], Model]:
    """``fn(*args, **kwargs)`` as a builder that ``--list`` can describe."""
    builder = functools.partial(fn, *args, **kwargs)
    shown = [*map(repr, args), *(f"{k}={v!r}" for k, v in kwargs.items())]
    builder.label = f"{fn.__name__}({', '.join(shown)})"  # type: ignore[attr-defined]
    return builder


def lib(framework: str) -> Any:
    """The library a framework name stands for: ``keras`` (Keras 3) or ``tf_keras``."""
    if framework == "tf_keras":
        import tf_keras

        return tf_keras
    import keras

    return keras


def _named(named: bool) -> Callable[[str], str | None]:
    return (lambda s: s) if named else (lambda s: None)


def cnn_layers(k: Any, named: bool) -> list[Layer]:
    """The small CNN of the refactor pairs, as a list of layers (``k`` is keras or tf_keras)."""
    n, L = _named(named), k.layers
    return [L.Conv2D(8, 3, padding="same", name=n("conv1")), L.BatchNormalization(name=n("bn1")),
            L.ReLU(name=n("relu1")), L.Conv2D(16, 3, strides=2, name=n("conv2")), L.BatchNormalization(name=n("bn2")),
            L.ReLU(name=n("relu2")), L.GlobalAveragePooling2D(name=n("pool")), L.Dense(10, name=n("fc"))]


def chain(x: Any, layers: list[Layer]) -> Any:
    for layer in layers:
        x = layer(x)
    return x


def cnn_flat(named: bool, k: Any = None) -> Model:
    import keras

    k = k or keras
    inputs = k.Input((16, 16, 3))
    return k.Model(inputs, chain(inputs, cnn_layers(k, named)), name="cnn" if named else None)


def cnn_nested(named: bool, k: Any = None) -> Model:
    import keras

    k = k or keras
    layers = cnn_layers(k, named)
    inner = k.Input((16, 16, 3))
    backbone = k.Model(inner, chain(inner, layers[:-1]), name="backbone" if named else None)
    inputs = k.Input((16, 16, 3))
    return k.Model(inputs, layers[-1](backbone(inputs)), name="cnn" if named else None)


def cnn_sequential(named: bool) -> Model:
    import keras

    return keras.Sequential([keras.Input((16, 16, 3)), *cnn_layers(keras, named)], name="cnn" if named else None)


def dense_stack(depth: int) -> Model:
    import numpy as np

    model = custom().DenseStack(depth)
    model(np.zeros((1, 8), "float32"))
    return model


def mlp_insert(inserted: bool, k: Any = None) -> Model:
    """Unnamed Dense layers; the new model has a Dense(32) inserted after the BatchNormalization.

    ``k`` is the Keras library to build with (Keras 3 by default, or ``tf_keras``).
    """
    if k is None:
        import keras as k
    keras, layers = k, k.layers

    inputs = keras.Input((8,))
    x = layers.Dense(32, activation="relu")(inputs)
    x = layers.BatchNormalization()(x)
    if inserted:
        x = layers.Dense(32, activation="relu")(x)
    x = layers.Dense(24, activation="relu")(x)
    x = layers.Dense(16, activation="relu")(x)
    return keras.Model(inputs, layers.Dense(4)(x))


def transformer(blocks: int, named: bool) -> Model:
    import keras
    from keras import layers

    c, n = custom(), _named(named)
    tokens = keras.Input((8,), dtype="int32")
    x = layers.Embedding(50, 16, name=n("embed"))(tokens)
    x = c.PositionEmbedding(8, 16, name=n("pos"))(x)
    for i in range(blocks):
        x = c.TransformerBlock(16, 2, named, name=n(f"block_{i}"))(x)
    x = layers.GlobalAveragePooling1D()(layers.LayerNormalization(name=n("final_ln"))(x))
    return keras.Model(tokens, layers.Dense(4, name=n("head"))(x))


def tower() -> Model:
    import numpy as np

    model = custom().Tower(name="tower")
    model(np.zeros((1, 16, 16, 3), "float32"))
    return model


def moved(into_custom: bool) -> Model:
    """Dense d1 -> [BN bn -> Dense d2] -> Dense out; the bracket is a custom layer when ``into_custom``."""
    import keras
    from keras import layers

    inputs = keras.Input((8,))
    x = layers.Dense(16, name="d1")(inputs)
    if into_custom:
        x = custom().NormProj(name="block")(x)
    else:
        x = layers.Dense(12, name="d2")(layers.BatchNormalization(name="bn")(x))
    return keras.Model(inputs, layers.Dense(3, name="out")(x))


def alike_stack(n_hidden: int, insert_at: int | None = None, k: Any = None) -> Model:
    """Unnamed Dense(8) layers and a Dense(2) head; ``insert_at`` puts one more Dense(8) at that position."""
    if k is None:
        import keras as k
    inputs = k.Input((8,))
    x = inputs
    for i in range(n_hidden + (insert_at is not None)):
        x = k.layers.Dense(8)(x)
    return k.Model(inputs, k.layers.Dense(2)(x))


def tf_keras_mlp_insert() -> Model:
    import tf_keras

    return mlp_insert(False, tf_keras)


def tf_keras_alike_stack() -> Model:
    import tf_keras

    return alike_stack(3, None, tf_keras)


def tf_keras_cnn(named: bool) -> Model:
    import tf_keras

    return cnn_flat(named, tf_keras)


def tf_keras_cnn_nested(named: bool) -> Model:
    import tf_keras

    return cnn_nested(named, tf_keras)


# ------------------------------------------------------------------ the red-team pairs' models
# Held-out pairs written to break the matcher. ``framework`` is "keras" (Keras 3) or "tf_keras".


def enc_dec(framework: str = "keras", decoder_insert: bool = False) -> Model:
    """An autoencoder of two sub-models, ``encoder`` (10 -> 16 -> 8) and ``decoder`` (8 -> 16 -> 10), whose inner
    layers have the SAME names (proj, norm, out); ``decoder_insert`` adds a Dense ``proj2`` after the decoder's
    proj."""
    k = lib(framework)
    L = k.layers
    i = k.Input((10,))
    encoder = k.Model(i, L.Dense(8, name="out")(L.LayerNormalization(name="norm")(L.Dense(16, name="proj")(i))),
                      name="encoder")
    j = k.Input((8,))
    d = L.Dense(16, name="proj")(j)
    if decoder_insert:
        d = L.Dense(16, name="proj2")(d)
    decoder = k.Model(j, L.Dense(10, name="out")(L.LayerNormalization(name="norm")(d)), name="decoder")
    x = k.Input((10,))
    return k.Model(x, decoder(encoder(x)), name="ae")


def enc_dec_flat() -> Model:
    """``enc_dec`` flattened into one Keras 3 model: the layers are renamed enc_proj, ..., dec_out."""
    import keras
    from keras import layers as L

    x = keras.Input((10,))
    h = L.Dense(8, name="enc_out")(L.LayerNormalization(name="enc_norm")(L.Dense(16, name="enc_proj")(x)))
    h = L.Dense(10, name="dec_out")(L.LayerNormalization(name="dec_norm")(L.Dense(16, name="dec_proj")(h)))
    return keras.Model(x, h, name="ae")


def enc_dec_symmetric(framework: str = "keras") -> Model:
    """Like ``enc_dec``, but encoder and decoder are identical 16 -> 16 -> 16 stacks: only the sub-model
    name tells their proj / norm / out apart."""
    k = lib(framework)
    L = k.layers

    def sub(name: str) -> Model:
        j = k.Input((16,))
        return k.Model(j, L.Dense(16, name="out")(L.LayerNormalization(name="norm")(L.Dense(16, name="proj")(j))),
                       name=name)

    encoder, decoder = sub("encoder"), sub("decoder")
    x = k.Input((16,))
    return k.Model(x, decoder(encoder(x)), name="ae")


ENC_DEC = ["encoder/proj", "encoder/norm", "encoder/out", "decoder/proj", "decoder/norm", "decoder/out"]


@functools.cache
def net_class(framework: str, insert_renamed: bool) -> type:
    """A subclassed CNN with auto-named attribute layers conv1, bn1, conv2, fc1, fc2, out. ``insert_renamed``:
    a Conv2D ``conv_extra`` is inserted after bn1 and the attribute ``fc1`` is renamed ``hidden``."""
    k = lib(framework)
    L = k.layers
    fc1 = "hidden" if insert_renamed else "fc1"

    class Net(k.Model):
        def __init__(self) -> None:
            super().__init__(name="net")
            self.conv1 = L.Conv2D(8, 3, padding="same")
            self.bn1 = L.BatchNormalization()
            if insert_renamed:
                self.conv_extra = L.Conv2D(8, 3, padding="same")
            self.conv2 = L.Conv2D(16, 3)
            self.pool = L.GlobalAveragePooling2D()
            setattr(self, fc1, L.Dense(32))
            self.fc2 = L.Dense(32)
            self.out = L.Dense(4)

        def call(self, x: Any) -> Any:
            x = self.bn1(self.conv1(x))
            if insert_renamed:
                x = self.conv_extra(x)
            return self.out(self.fc2(getattr(self, fc1)(self.pool(self.conv2(x)))))

    return Net


def subclassed_net(framework: str = "keras", insert_renamed: bool = False) -> Model:
    import numpy as np

    model = net_class(framework, insert_renamed)()
    model(np.zeros((1, 12, 12, 3), "float32"))
    return model


def net_expect(new: Model, old: Model) -> list[tuple[Layer, Layer]]:
    """Every attribute continues the old one of the same name; ``hidden`` continues ``fc1``."""
    return [(new.conv1, old.conv1), (new.bn1, old.bn1), (new.conv2, old.conv2),
            (getattr(new, "hidden", None) or new.fc1, old.fc1), (new.fc2, old.fc2), (new.out, old.out)]


@functools.cache
def stack_class(framework: str) -> type:
    """Subclassed model whose Dense(16) blocks live in a plain Python list, plus a Dense(3) head."""
    k = lib(framework)
    L = k.layers

    class Stack(k.Model):
        def __init__(self, depth: int) -> None:
            super().__init__(name="stack")
            self.blocks = [L.Dense(16) for _ in range(depth)]
            self.head = L.Dense(3)

        def call(self, x: Any) -> Any:
            for block in self.blocks:
                x = block(x)
            return self.head(x)

    return Stack


def list_stack(framework: str, depth: int) -> Model:
    """All blocks have one shape (16 -> 16): only the code tells where a block was added."""
    import numpy as np

    model = stack_class(framework)(depth)
    model(np.zeros((1, 16), "float32"))
    return model


@functools.cache
def heads_class(keys: str) -> type:
    """Keras 3 subclassed model with a Dense(8) trunk and a dict of Dense(4) heads, one per letter of ``keys``."""
    import keras
    from keras import layers as L

    class Heads(keras.Model):
        def __init__(self) -> None:
            super().__init__(name="heads")
            self.trunk = L.Dense(8)
            self.heads = {key: L.Dense(4) for key in keys}

        def call(self, x: Any) -> Any:
            h = self.trunk(x)
            return [self.heads[key](h) for key in keys]

    return Heads


def dict_heads(keys: str) -> Model:
    import numpy as np

    model = heads_class(keys)()
    model(np.zeros((1, 5), "float32"))
    return model


def dict_expect(*keys: str) -> Expect:
    """The trunk and the heads of ``keys`` continue their old selves."""
    return by_object(lambda new, old: [(new.trunk, old.trunk), *((new.heads[key], old.heads[key]) for key in keys)])


# An MLP as (kind, name): Dense units, or a normalization.
MLP_SPEC = [(20, "a"), ("bn", "bn_a"), (24, "b"), (12, "c"), ("ln", "ln_c"), (28, "d"), (3, "head")]


def mlp_chain(removed: tuple[str, ...] = (), named: bool = False, framework: str = "keras") -> Model:
    """``MLP_SPEC`` as a functional model, without the layers named in ``removed``."""
    k = lib(framework)
    L = k.layers
    x = inputs = k.Input((6,))
    for kind, name in MLP_SPEC:
        if name in removed:
            continue
        name = name if named else None
        if kind == "bn":
            x = L.BatchNormalization(name=name)(x)
        elif kind == "ln":
            x = L.LayerNormalization(name=name)(x)
        else:
            x = L.Dense(kind, name=name)(x)
    return k.Model(inputs, x, name="m" if named else None)


def sequential_mlp(framework: str = "keras", prepend: bool = False, named: bool = False) -> Model:
    """Sequential Dense(10) l1 -> Dense(10) l2 -> Dense(3) l3; ``prepend`` puts a Dense(6) ``pre`` first."""
    k = lib(framework)
    n = _named(named)
    layers = [k.Input((6,))]
    if prepend:
        layers.append(k.layers.Dense(6, name=n("pre")))
    layers += [k.layers.Dense(10, name=n("l1")), k.layers.Dense(10, name=n("l2")), k.layers.Dense(3, name=n("l3"))]
    return k.Sequential(layers, name="seq" if named else None)


def shared_dense(framework: str = "keras", insert: bool = False) -> Model:
    """Dense -> shared Dense -> (inserted Dense) -> the shared Dense again -> head; all Dense(8), unnamed."""
    k = lib(framework)
    L = k.layers
    inputs = k.Input((8,))
    x = L.Dense(8)(inputs)
    shared = L.Dense(8)
    x = shared(x)
    if insert:
        x = L.Dense(8)(x)
    x = shared(x)
    return k.Model(inputs, L.Dense(2)(x))


def auto_looking_names(framework: str = "keras", insert: bool = False) -> Model:
    """User names that look auto-generated (dense_3, dense_2) around one auto-named Dense; ``insert`` puts
    another auto-named Dense before it (so the old ``dense`` becomes ``dense_1``)."""
    k = lib(framework)
    L = k.layers
    inputs = k.Input((8,))
    x = L.Dense(16, name="dense_3")(L.Dense(16, name="dense_layer")(inputs))
    if insert:
        x = L.Dense(16)(x)
    x = L.Dense(16, name="conv_block_1")(L.Dense(16)(x))
    return k.Model(inputs, L.Dense(2, name="dense_2")(x))


def swapped(framework: str = "keras", swap: bool = False) -> Model:
    """first -> alpha -> beta -> head, all Dense(8) but the head; ``swap`` applies beta before alpha."""
    k = lib(framework)
    L = k.layers
    inputs = k.Input((8,))
    x = L.Dense(8, name="first")(inputs)
    alpha, beta = L.Dense(8, name="alpha"), L.Dense(8, name="beta")
    x = alpha(beta(x)) if swap else beta(alpha(x))
    return k.Model(inputs, L.Dense(2, name="head")(x))


def text_model(framework: str = "keras", extra: bool = False, named: bool = False) -> Model:
    """Embedding -> Conv1D -> LSTM -> GRU -> Dense; ``extra`` adds a second LSTM and a Dense(12) before the head."""
    k = lib(framework)
    L, n = k.layers, _named(named)
    tokens = k.Input((12,), dtype="int32")
    x = L.Conv1D(16, 3, padding="same", name=n("conv"))(L.Embedding(40, 16, name=n("emb"))(tokens))
    x = L.LSTM(16, return_sequences=True, name=n("lstm"))(x)
    if extra:
        x = L.LSTM(16, return_sequences=True, name=n("lstm2"))(x)
    x = L.GRU(12, name=n("gru"))(x)
    if extra:
        x = L.Dense(12, name=n("extra"))(x)
    return k.Model(tokens, L.Dense(3, name=n("out"))(x))


def conv_norm(norm: str = "bn", named: bool = False) -> Model:
    """Conv2D c1 -> BatchNormalization or LayerNormalization ``norm`` -> Conv2D c2 -> pool -> Dense fc."""
    import keras
    from keras import layers as L

    n = _named(named)
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(8, 3, name=n("c1"))(inputs)
    x = (L.BatchNormalization if norm == "bn" else L.LayerNormalization)(name=n("norm"))(x)
    x = L.GlobalAveragePooling2D()(L.Conv2D(8, 3, name=n("c2"))(x))
    return keras.Model(inputs, L.Dense(2, name=n("fc"))(x))


def tf_keras_sequential_in_functional() -> Model:
    """tf-keras: a Sequential ``tower`` (t1, tbn, t2) inside a functional model with a ``head``."""
    import tf_keras as k

    L = k.layers
    tower = k.Sequential([L.Dense(12, name="t1"), L.BatchNormalization(name="tbn"), L.Dense(10, name="t2")],
                         name="tower")
    inputs = k.Input((6,))
    return k.Model(inputs, L.Dense(3, name="head")(tower(inputs)), name="m")


def flat_tower() -> Model:
    """Keras 3: the same layers in one flat functional model."""
    import keras
    from keras import layers as L

    inputs = keras.Input((6,))
    x = L.Dense(10, name="t2")(L.BatchNormalization(name="tbn")(L.Dense(12, name="t1")(inputs)))
    return keras.Model(inputs, L.Dense(3, name="head")(x), name="m")


def siamese(framework: str = "keras", mix: bool = False) -> Model:
    """A sub-model ``enc`` (e1, e2) shared by two inputs, concatenated, scored by Dense(1) ``score``;
    ``mix`` inserts a Dense(16) before the score (whose kernel keeps its shape, 16 x 1)."""
    k = lib(framework)
    L = k.layers
    j = k.Input((6,))
    enc = k.Model(j, L.Dense(8, name="e2")(L.Dense(8, name="e1")(j)), name="enc")
    a, b = k.Input((6,)), k.Input((6,))
    h = L.Concatenate()([enc(a), enc(b)])
    if mix:
        h = L.Dense(16, name="mix")(h)
    return k.Model([a, b], L.Dense(1, name="score")(h), name="siam")


def two_towers(framework: str = "keras", insert_second: bool = False) -> Model:
    """Two alike unnamed tower sub-models (Dense(8) -> Dense(4)); ``insert_second`` adds a Dense(8) to the second."""
    k = lib(framework)
    L = k.layers

    def tower(extra: bool) -> Model:
        j = k.Input((6,))
        x = L.Dense(8)(j)
        if extra:
            x = L.Dense(8)(x)
        return k.Model(j, L.Dense(4)(x))

    first, second = tower(False), tower(insert_second)
    a = k.Input((6,))
    return k.Model(a, L.Dense(2)(L.Concatenate()([first(a), second(a)])))


def resnet_like(framework: str = "keras", depth: int = 2) -> Model:
    """A conv-BN stem and ``depth`` residual blocks with chosen names block{i}_conv / block{i}_bn."""
    k = lib(framework)
    L = k.layers
    inputs = k.Input((8, 8, 3))
    x = L.BatchNormalization(name="stem_bn")(L.Conv2D(8, 3, padding="same", name="stem_conv")(inputs))
    for b in range(depth):
        h = L.BatchNormalization(name=f"block{b}_bn")(L.Conv2D(8, 3, padding="same", name=f"block{b}_conv")(x))
        x = L.Add(name=f"block{b}_add")([x, h])
    return k.Model(inputs, L.Dense(3, name="fc")(L.GlobalAveragePooling2D(name="pool")(x)), name="rn")


def resnet_like_expect(old_depth: int, new_depth: int) -> Expect:
    return explicit({"stem_conv": "stem_conv", "stem_bn": "stem_bn", "fc": "fc"}
                    | {f"block{b}_{s}": (f"block{b}_{s}" if b < old_depth else None)
                       for b in range(new_depth) for s in ("conv", "bn")})


def train_one_step(model: Model, framework: str) -> Any:
    """Compile with Adam and take one training step, so the optimizer has its slot variables; return it."""
    import numpy as np

    model.compile(optimizer=lib(framework).optimizers.Adam(1e-3), loss="mse")
    rng = np.random.default_rng(0)
    x = rng.random((4, *model.inputs[0].shape[1:])).astype("float32")
    y = rng.random((4, *model.outputs[0].shape[1:])).astype("float32")
    model.train_on_batch(x, y)
    return model.optimizer


# ------------------------------------------------------------------ red-team round 2: models
# Options toggled on a layer, layers wrapped into or out of a sub-model, alike sub-models, class
# replacements of one shape, and checkpoints that hold more than the model.


def norm_toggle(framework: str = "keras", scale: bool = True, center: bool = True, named: bool = True) -> Model:
    """Dense d1 -> BatchNormalization bn -> Dense d2 -> LayerNormalization ln -> Dense out, all of width 8;
    ``scale`` / ``center`` drop gamma / beta of both normalizations (variables of one shape, told apart by name)."""
    k = lib(framework)
    L, n = k.layers, _named(named)
    x = inputs = k.Input((6,))
    x = L.Dense(8, name=n("d1"))(x)
    x = L.BatchNormalization(scale=scale, center=center, name=n("bn"))(x)
    x = L.Dense(8, name=n("d2"))(x)
    x = L.LayerNormalization(scale=scale, center=center, name=n("ln"))(x)
    return k.Model(inputs, L.Dense(2, name=n("out"))(x), name="m" if named else None)


def norm_toggle_truth(named: bool) -> Expect:
    if named:
        return explicit(identity_paths(["d1", "bn", "d2", "ln", "out"]))
    return explicit(identity_paths(["dense", "batch_normalization", "dense_1", "layer_normalization", "dense_2"]))


def lora_mlp(enable: bool = False) -> Model:
    """Dense d1 -> Dense d2 -> Dense out; ``enable`` calls ``enable_lora(2)`` on d1 and d2 (new lora_kernel_a/b)."""
    import keras
    from keras import layers as L

    inputs = keras.Input((8,))
    d1, d2 = L.Dense(8, name="d1"), L.Dense(8, name="d2")
    model = keras.Model(inputs, L.Dense(2, name="out")(d2(d1(inputs))), name="m")
    if enable:
        d1.enable_lora(2)
        d2.enable_lora(2)
    return model


def bias_toggle(use_bias: bool = True, named: bool = True) -> Model:
    """Dense(8) a (``use_bias``) -> Dense(8) b -> Dense(2) out."""
    import keras
    from keras import layers as L

    n = _named(named)
    inputs = keras.Input((8,))
    x = L.Dense(8, name=n("b"))(L.Dense(8, use_bias=use_bias, name=n("a"))(inputs))
    return keras.Model(inputs, L.Dense(2, name=n("out"))(x))


def conv_replaced(kind: str = "conv", named: bool = True) -> Model:
    """Conv2D c0 -> ``mid`` (Conv2D, SeparableConv2D or DepthwiseConv2D: a bias of one shape) -> pool -> Dense fc."""
    import keras
    from keras import layers as L

    n = _named(named)
    inputs = keras.Input((8, 8, 8))
    x = L.Conv2D(8, 3, padding="same", name=n("c0"))(inputs)
    if kind == "conv":
        x = L.Conv2D(8, 3, padding="same", name=n("mid"))(x)
    elif kind == "sep":
        x = L.SeparableConv2D(8, 3, padding="same", name=n("mid"))(x)
    else:
        x = L.DepthwiseConv2D(3, padding="same", name=n("mid"))(x)
    return keras.Model(inputs, L.Dense(2, name=n("fc"))(L.GlobalAveragePooling2D()(x)))


def dense_replaced(einsum: bool = False, named: bool = True) -> Model:
    """Dense(16) a -> ``mid`` -> Dense(2) fc; ``mid`` is a Dense(16) or an EinsumDense("ab,bc->ac") of the SAME
    variable names and shapes (kernel 16x16, bias 16)."""
    import keras
    from keras import layers as L

    n = _named(named)
    inputs = keras.Input((16,))
    x = L.Dense(16, name=n("a"))(inputs)
    if einsum:
        x = L.EinsumDense("ab,bc->ac", output_shape=16, bias_axes="c", name=n("mid"))(x)
    else:
        x = L.Dense(16, name=n("mid"))(x)
    return keras.Model(inputs, L.Dense(2, name=n("fc"))(x))


def two_tables(vocab: int = 50, named: bool = False) -> Model:
    """A position table pos (60 x 16, created first) and a token table tok (``vocab`` x 16): resizing tok to 60
    gives it the shape of pos."""
    import keras
    from keras import layers as L

    n = _named(named)
    tokens = keras.Input((60,), dtype="int32")
    pos, tok = L.Embedding(60, 16, name=n("pos")), L.Embedding(vocab, 16, name=n("tok"))
    x = L.GlobalAveragePooling1D()(tok(tokens) + pos(tokens))
    return keras.Model(tokens, L.Dense(2, name=n("out"))(x))


def inner_model(named: bool = True, framework: str = "keras") -> Model:
    """Dense(8) fc1 -> Dense(8) fc, as a model ``inner``."""
    k = lib(framework)
    L, n = k.layers, _named(named)
    inputs = k.Input((6,))
    return k.Model(inputs, L.Dense(8, name=n("fc"))(L.Dense(8, name=n("fc1"))(inputs)), name="inner" if named else None)


def wrapped(named: bool = True, head: bool = False, framework: str = "keras") -> Model:
    """``inner_model`` as a sub-model of ``outer``; ``head`` adds a Dense(8) after it, named ``fc`` like the
    inner model's last layer, of the same shape."""
    k = lib(framework)
    inner = inner_model(named, framework)
    inputs = k.Input((6,))
    x = inner(inputs)
    if head:
        x = k.layers.Dense(8, name="fc" if named else None)(x)
    return k.Model(inputs, x, name="outer" if named else None)


def sym_ae(order: tuple[str, ...] = ("encoder", "decoder"), names: tuple[str, ...] = ("encoder", "decoder"),
           framework: str = "keras", prefixes: bool = False) -> Model:
    """Two identical 16 -> 16 -> 16 sub-models (proj, norm, out), created in the order of ``names`` and applied in
    the order of ``order``; ``prefixes`` gives their inner layers distinct names (e_proj.. / d_proj..)."""
    k = lib(framework)
    L = k.layers

    def sub(name: str) -> Model:
        p = (name[0] + "_") if prefixes else ""
        j = k.Input((16,))
        h = L.Dense(16, name=p + "out")(L.LayerNormalization(name=p + "norm")(L.Dense(16, name=p + "proj")(j)))
        return k.Model(j, h, name=name)

    subs = {name: sub(name) for name in names}
    x = inputs = k.Input((16,))
    for name in order:
        x = subs[name](x)
    return k.Model(inputs, x, name="ae")


def sym_truth(renamed: dict[str, str] | None = None, prefixes: bool = False) -> Expect:
    """Each sub-model's proj / norm / out continue those of the old sub-model of the same name (``renamed``: new
    sub-model name -> old one); ``prefixes``: the inner layers are named e_proj.. / d_proj.. (see ``sym_ae``)."""
    out: dict[str, str | None] = {}
    for new_sub, old_sub in (renamed or {"encoder": "encoder", "decoder": "decoder"}).items():
        for x in ("proj", "norm", "out"):
            name = f"{new_sub[0]}_{x}" if prefixes else x
            out[f"{new_sub}/{name}"] = f"{old_sub}/{name}"
    return explicit(out)


def res_block(shortcut: bool = False, shortcut_first: bool = False) -> Model:
    """Unnamed conv -> BN -> conv; ``shortcut`` adds a 1x1 Conv2D projection of the input (created before the
    block's convolutions when ``shortcut_first``, so every auto-generated conv name shifts)."""
    import keras
    from keras import layers as L

    inputs = keras.Input((8, 8, 4))
    sc = L.Conv2D(8, 1)(inputs) if shortcut and shortcut_first else None
    x = L.Conv2D(8, 3, padding="same")(L.BatchNormalization()(L.Conv2D(8, 3, padding="same")(inputs)))
    if shortcut and not shortcut_first:
        sc = L.Conv2D(8, 1)(inputs)
    if sc is not None:
        x = L.Add()([x, sc])
    return keras.Model(inputs, L.Dense(2)(L.GlobalAveragePooling2D()(x)))


def remove_and_insert(new: bool = False) -> Model:
    """Unnamed Dense(16) a, b, BN, c, head; the new model drops b (before the BN) and adds a Dense(16) after c."""
    import keras
    from keras import layers as L

    inputs = keras.Input((16,))
    x = L.Dense(16)(inputs)
    if not new:
        x = L.Dense(16)(x)
    x = L.Dense(16)(L.BatchNormalization()(x))
    if new:
        x = L.Dense(16)(x)
    return keras.Model(inputs, L.Dense(2)(x))


def deep_named(insert: bool = False, renumber: bool = False) -> Model:
    """Dense(16) l0..l5 and a head; ``insert`` puts a Dense(16) before l3, unnamed, or -- ``renumber`` -- named l3
    with the old l3..l5 renamed l4..l6."""
    import keras
    from keras import layers as L

    x = inputs = keras.Input((16,))
    for j in range(6):
        if insert and j == 3:
            x = L.Dense(16, name="l3" if renumber else None)(x)
        x = L.Dense(16, name=f"l{j + 1}" if renumber and insert and j >= 3 else f"l{j}")(x)
    return keras.Model(inputs, L.Dense(2, name="head")(x), name="deep")


def nested_seq(framework: str = "keras", named: bool = False, insert: bool = False) -> Model:
    """A Sequential: Dense o1, a Sequential ``inner`` (Dense i1, BN ibn, [Dense iextra], Dense i2), Dense o2;
    the inner layers are created first. All Dense(8) but o2."""
    k = lib(framework)
    L, n = k.layers, _named(named)
    inner = [L.Dense(8, name=n("i1")), L.BatchNormalization(name=n("ibn"))]
    if insert:
        inner.append(L.Dense(8, name=n("iextra")))
    inner.append(L.Dense(8, name=n("i2")))
    inner_model_ = k.Sequential(inner, name="inner" if named else None)
    return k.Sequential([k.Input((6,)), L.Dense(8, name=n("o1")), inner_model_, L.Dense(2, name=n("o2"))],
                        name="outer" if named else None)


def mha(heads: int = 2, key_dim: int = 8) -> Model:
    """MultiHeadAttention attn (heads x key_dim) -> Dense ff -> pool -> Dense out."""
    import keras
    from keras import layers as L

    inputs = keras.Input((5, 16))
    x = L.Dense(16, name="ff")(L.MultiHeadAttention(heads, key_dim, name="attn")(inputs, inputs))
    return keras.Model(inputs, L.Dense(2, name="out")(L.GlobalAveragePooling1D()(x)))


def branches(swap: bool = False) -> Model:
    """Two unnamed branches Dense(8) and Dense(16) of one input, concatenated; ``swap`` creates Dense(16) first."""
    import keras
    from keras import layers as L

    inputs = keras.Input((8,))
    if swap:
        b = L.Dense(16)(inputs)
        a = L.Dense(8)(inputs)
    else:
        a = L.Dense(8)(inputs)
        b = L.Dense(16)(inputs)
    return keras.Model(inputs, L.Dense(2)(L.Concatenate()([a, b])))


@functools.cache
def two_weight_class(order: tuple[str, ...]) -> type:
    """A custom layer with two 8x8 weights ``w`` and ``b``, created by ``add_weight`` in ``order``."""
    import keras

    class TwoWeights(keras.layers.Layer):
        def build(self, shape: Any) -> None:
            for name in order:
                setattr(self, name, self.add_weight(shape=(8, 8), name=name))

        def call(self, x: Any) -> Any:
            return x @ self.w + x @ self.b

    return TwoWeights


def two_weights(order: tuple[str, ...] = ("w", "b")) -> Model:
    import keras

    inputs = keras.Input((8,))
    return keras.Model(inputs, two_weight_class(order)(name="wb")(inputs), name="m")


def alike_before_bn(insert: bool = False, framework: str = "keras") -> Model:
    """Unnamed Dense(16) -> [Dense(16)] -> BN -> Dense(16) -> Dense(2): the inserted layer has the shape of its
    neighbours."""
    k = lib(framework)
    L = k.layers
    inputs = k.Input((16,))
    x = L.Dense(16)(inputs)
    if insert:
        x = L.Dense(16)(x)
    x = L.Dense(16)(L.BatchNormalization()(x))
    return k.Model(inputs, L.Dense(2)(x))


def two_heads(swap: bool = False) -> Model:
    """Unnamed Dense(8) trunk and two Dense(4) heads a, b (created in that order); ``swap`` returns [b, a]."""
    import keras
    from keras import layers as L

    inputs = keras.Input((8,))
    h = L.Dense(8)(inputs)
    a, b = L.Dense(4)(h), L.Dense(4)(h)
    return keras.Model(inputs, [b, a] if swap else [a, b])


# ------------------------------------------------------------------ checkpoint layouts
# Writers of the "tf" format for pairs whose checkpoint holds more than the model (Pair.writer):
# called as writer(old model, framework, path prefix) after the old model got its values.


def _other_values(model: Model, seed: int) -> None:
    """Give a copy of the model values of its own, none equal to an old variable's."""
    import numpy as np

    for i, v in enumerate(model.weights):
        dtype = np_dtype(v)
        if dtype.kind == "f":
            v.assign(np.random.default_rng([seed, 999, i]).standard_normal(shape_of(v)).astype(dtype))


def writer(fn: Callable[..., None], *args: Any) -> Callable[[Model, str, str], None]:
    """``fn(old, framework, path, *args)`` as a writer that ``--list`` can describe."""
    def write(old: Model, framework: str, path: str) -> None:
        fn(old, framework, path, *args)

    write.label = f"{fn.__name__}({', '.join(map(repr, args))})"  # type: ignore[attr-defined]
    return write


def write_with_copy(old: Model, framework: str, path: str, model_key: str, copy_key: str, copy_first: bool) -> None:
    """``tf.train.Checkpoint`` of the model and an EMA-like copy of it (same keys, other values)."""
    import tensorflow as tf

    copy = lib(framework).models.clone_model(old)
    _other_values(copy, 1)
    objects = {copy_key: copy, model_key: old} if copy_first else {model_key: old, copy_key: copy}
    tf.train.Checkpoint(**objects).write(path)


def write_with_teacher(old: Model, framework: str, path: str) -> None:
    """``Checkpoint(teacher=..., model=old)``: a smaller model whose one layer has the name of a model layer."""
    import keras
    import tensorflow as tf

    teacher = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, name="fc1")], name="teacher")
    _other_values(teacher, 2)
    tf.train.Checkpoint(teacher=teacher, model=old).write(path)


def write_in_module(old: Model, framework: str, path: str) -> None:
    """``Checkpoint(trainer=m)`` where ``m`` is a ``tf.Module`` holding the model and a step counter."""
    import tensorflow as tf

    trainer = tf.Module()
    trainer.model = old
    trainer.step = tf.Variable(3, dtype=tf.int64)
    tf.train.Checkpoint(trainer=trainer).write(path)



# =============================================================================== keras.applications


def app(name: str, size: int, **kwargs: Any) -> Callable[[], Model]:
    def build() -> Model:
        import keras

        return getattr(keras.applications, name)(weights=None, input_shape=(size, size, 3),
                                                 **{"include_top": False, **kwargs})

    build.label = f"{name}({size}x{size}{''.join(f', {k}={v}' for k, v in kwargs.items())})"
    return build


def new_head_flat(base: str, size: int, classes: int, head: str) -> Callable[[], Model]:
    """``base`` without its top, pooled, plus a new Dense head of ``classes``, in one flat functional model."""

    def build() -> Model:
        import keras

        b = getattr(keras.applications, base)(include_top=False, weights=None, input_shape=(size, size, 3),
                                              pooling="avg")
        return keras.Model(b.input, keras.layers.Dense(classes, activation="softmax", name=head)(b.output))

    build.label = f"{base}(include_top=False)+Dense({classes}, name={head!r})"
    return build


def new_head_nested(base: str, size: int, classes: int, head: str) -> Callable[[], Model]:
    """``base`` without its top as a nested sub-model, plus a new Dense head of ``classes``."""

    def build() -> Model:
        import keras

        b = getattr(keras.applications, base)(include_top=False, weights=None, input_shape=(size, size, 3),
                                              pooling="avg")
        inputs = keras.Input((size, size, 3))
        return keras.Model(inputs, keras.layers.Dense(classes, activation="softmax", name=head)(b(inputs)))

    build.label = f"[{base}(include_top=False)]+Dense({classes}, name={head!r})"
    return build


# =============================================================================== the pairs


@dataclass(frozen=True)
class Pair:
    """One old -> new architecture change with its hand-written ground truth."""

    name: str
    group: str  # apps | refactor | insert | remove | replace | reorder | list-grow | containers | transformer
    #             | tf_keras | unchanged | move | optimizer | ckpt | limits (reported apart, see LIMITS)
    build_old: Callable[[], Model]
    build_new: Callable[[], Model]
    expect: Expect
    framework: str = "keras"  # the OLD model's library: keras (Keras 3) or tf_keras
    unchanged: bool = False  # same architecture: must load 100% with strict=True and no problems
    note: str = ""
    train: bool = False  # the old model takes one Adam step before it is saved; adds the "tf-opt" format
    # writer(old, framework, path prefix) writes the "tf" checkpoint instead of Checkpoint(model=old) (a model
    # next to an EMA copy, a teacher, inside a tf.Module); such a pair runs the "tf" format only
    writer: Callable[[Model, str, str], None] | None = None
    root: str | None = None  # passed as root= to regraft.plan and regraft.load
    only_formats: tuple[str, ...] = ()  # run only these of the pair's formats
    limit: str = ""  # group "limits": why no loader can decide this pair from the file (one line)

    @property
    def formats(self) -> tuple[str, ...]:
        base = TF_KERAS_FORMATS if self.framework == "tf_keras" else KERAS3_FORMATS
        if self.writer is not None:
            base = ("tf",)
        fmts = (*base, "tf-opt") if self.train else base
        return tuple(f for f in fmts if f in self.only_formats) if self.only_formats else fmts


CNN_NAMED = ["conv1", "bn1", "conv2", "bn2", "fc"]
# Auto-generated names after clear_session(): what each program gets for the unnamed CNN.
CNN_UNNAMED = ["conv2d", "batch_normalization", "conv2d_1", "batch_normalization_1", "dense"]


BLOCK_NAMED = ["ln1", "attn/query", "attn/key", "attn/value", "attn/attention_output", "ln2", "ff1", "ff2"]
# transformer(2 -> 3, named): embed, pos, block_0, block_1, final_ln and head continue; block_2 is new.
TRANSFORMER_NAMED: dict[str, str | None] = {
    "embed": "embed", "pos": "pos",
    **{f"block_{i}/{x}": f"block_{i}/{x}" for i in (0, 1) for x in BLOCK_NAMED},
    **{f"block_2/{x}": None for x in BLOCK_NAMED},
    "final_ln": "final_ln", "head": "head",
}


def _unnamed_block(i: int) -> list[str]:
    """Leaf paths of the i-th unnamed TransformerBlock: Keras numbers every class globally."""
    b = "transformer_block" + (f"_{i}" if i else "")
    mha = "multi_head_attention" + (f"_{i}" if i else "")
    ln_a, ln_b = ("layer_normalization" + (f"_{2 * i}" if i else "")), f"layer_normalization_{2 * i + 1}"
    d_a, d_b = ("dense" + (f"_{2 * i}" if i else "")), f"dense_{2 * i + 1}"
    return [f"{b}/{ln_a}", *[f"{b}/{mha}/{x}" for x in ("query", "key", "value", "attention_output")],
            f"{b}/{ln_b}", f"{b}/{d_a}", f"{b}/{d_b}"]


# transformer(2 -> 3, unnamed): the same correspondence; the final LayerNormalization and Dense are
# numbered after the blocks, so their auto-generated names differ between the two programs.
TRANSFORMER_UNNAMED: dict[str, str | None] = {
    "embedding": "embedding", "position_embedding": "position_embedding",
    **{p: p for i in (0, 1) for p in _unnamed_block(i)},
    **{p: None for p in _unnamed_block(2)},
    "layer_normalization_6": "layer_normalization_4", "dense_6": "dense_4",
}


def pairs() -> list[Pair]:
    """All pairs, in the order they run."""
    apps = [
        Pair("vgg16-vgg19", "apps", app("VGG16", 32), app("VGG19", 32), by_name()),
        Pair("resnet50-resnet101", "apps", app("ResNet50", 32), app("ResNet101", 32), by_name()),
        Pair("resnet101-resnet152", "apps", app("ResNet101", 32), app("ResNet152", 32), by_name()),
        Pair("resnet50v2-resnet101v2", "apps", app("ResNet50V2", 32), app("ResNet101V2", 32), by_name()),
        Pair("densenet121-densenet169", "apps", app("DenseNet121", 32), app("DenseNet169", 32), by_name()),
        Pair("densenet169-densenet201", "apps", app("DenseNet169", 32), app("DenseNet201", 32), by_name()),
        Pair("efficientnetb0-b1", "apps", app("EfficientNetB0", 32), app("EfficientNetB1", 32), by_name()),
        Pair("efficientnetb1-b2", "apps", app("EfficientNetB1", 32), app("EfficientNetB2", 32), by_name()),
        Pair("efficientnetb2-b3", "apps", app("EfficientNetB2", 32), app("EfficientNetB3", 32), by_name()),
        Pair("efficientnetv2b0-b1", "apps", app("EfficientNetV2B0", 32), app("EfficientNetV2B1", 32), by_name()),
        Pair("efficientnetv2b1-b2", "apps", app("EfficientNetV2B1", 32), app("EfficientNetV2B2", 32), by_name()),
        Pair("mobilenet-a0.5-a1.0", "apps", app("MobileNet", 32, alpha=0.5), app("MobileNet", 32, alpha=1.0),
             by_name(), note="width: same names, other shapes"),
        Pair("mobilenetv2-a1.0-a1.3", "apps", app("MobileNetV2", 32, alpha=1.0), app("MobileNetV2", 32, alpha=1.3),
             by_name(), note="width"),
        Pair("mobilenetv3small-minimalistic", "apps", app("MobileNetV3Small", 32),
             app("MobileNetV3Small", 32, minimalistic=True), by_name(),
             note="SE blocks removed, 5x5 kernels become 3x3"),
        Pair("convnext-tiny-small", "apps", app("ConvNeXtTiny", 32), app("ConvNeXtSmall", 32),
             by_name("convnext_tiny_", "convnext_small_"), note="model-name prefix on every layer"),
        Pair("inceptionv3-newhead", "apps", app("InceptionV3", 75, include_top=True, classes=10),
             new_head_flat("InceptionV3", 75, 5, "new_head"), by_name(extra={"new_head": "predictions"}),
             note="10-class top -> new 5-class head (flat)"),
        Pair("xception-newhead", "apps", app("Xception", 71, include_top=True, classes=10),
             new_head_nested("Xception", 71, 5, "predictions"),
             by_name(new_scope="xception", extra={"predictions": "predictions"}),
             note="10-class top -> nested base + new 5-class head"),
        Pair("mobilenetv2-unchanged", "unchanged", app("MobileNetV2", 32), app("MobileNetV2", 32), by_name(),
             unchanged=True),
    ]
    synthetic = [
        Pair("cnn-flat-to-nested-named", "refactor", call(cnn_flat, True), call(cnn_nested, True),
             explicit({f"backbone/{p}": p for p in CNN_NAMED[:-1]} | {"fc": "fc"}),
             note="flat functional -> backbone sub-model + head"),
        Pair("cnn-flat-to-nested-unnamed", "refactor", call(cnn_flat, False), call(cnn_nested, False),
             explicit({f"functional/{p}": p for p in CNN_UNNAMED[:-1]} | {"dense": "dense"}),
             note="same, auto-generated names"),
        Pair("sequential-to-functional-named", "refactor", call(cnn_sequential, True), call(cnn_flat, True),
             explicit(identity_paths(CNN_NAMED))),
        Pair("sequential-to-functional-unnamed", "refactor", call(cnn_sequential, False), call(cnn_flat, False),
             explicit(identity_paths(CNN_UNNAMED))),
        Pair("subclassed-list-3-to-5", "list-grow", call(dense_stack, 3), call(dense_stack, 5),
             by_object(lambda new, old: [*zip(new.blocks[:3], old.blocks), (new.head, old.head)]),
             note="self.blocks list grows at the end; TF format drops list-held layers"),
        Pair("unnamed-dense-insert", "insert", call(mlp_insert, False), call(mlp_insert, True),
             explicit({"dense": "dense", "batch_normalization": "batch_normalization", "dense_1": None,
                       "dense_2": "dense_1", "dense_3": "dense_2", "dense_4": "dense_3"}),
             note="Dense(32) inserted after BN; names shift by one"),
        Pair("transformer-2-to-3-named", "transformer", call(transformer, 2, True), call(transformer, 3, True),
             explicit(TRANSFORMER_NAMED), note="pre-LN blocks block_0.. grow at the end"),
        Pair("transformer-2-to-3-unnamed", "transformer", call(transformer, 2, False),
             call(transformer, 3, False), explicit(TRANSFORMER_UNNAMED), note="same, auto-generated names"),
        Pair("tf-keras-to-keras3-named", "tf_keras", call(tf_keras_cnn, True), call(cnn_flat, True),
             explicit(identity_paths(CNN_NAMED)), framework="tf_keras"),
        Pair("tf-keras-to-keras3-unnamed", "tf_keras", call(tf_keras_cnn, False), call(cnn_flat, False),
             explicit(identity_paths(CNN_UNNAMED)), framework="tf_keras"),
        Pair("tf-keras-unnamed-insert", "tf_keras", tf_keras_mlp_insert, call(mlp_insert, True),
             explicit({"dense": "dense", "batch_normalization": "batch_normalization", "dense_1": None,
                       "dense_2": "dense_1", "dense_3": "dense_2", "dense_4": "dense_3"}),
             framework="tf_keras", note="tf.keras -> Keras 3 with a Dense inserted; names shift by one"),
        Pair("tf-keras-alike-insert", "tf_keras", tf_keras_alike_stack, call(alike_stack, 3, 1),
             explicit({"dense": "dense", "dense_1": None, "dense_2": "dense_1", "dense_3": "dense_2",
                       "dense_4": "dense_3"}),
             framework="tf_keras", note="one alike Dense(8) inserted second: only the user knows where"),
        Pair("subclassed-unchanged", "unchanged", call(tower), call(tower),
             explicit(identity_paths(["tower", "stem", "stem_bn", "res/conv_a", "res/bn_a", "res/conv_b", "head"])),
             unchanged=True),
        Pair("layers-into-custom-layer", "move", call(moved, False), call(moved, True),
             explicit({"d1": "d1", "block/bn": "bn", "block/d2": "d2", "out": "out"})),
        Pair("layers-out-of-custom-layer", "move", call(moved, True), call(moved, False),
             explicit({"d1": "d1", "bn": "block/bn", "d2": "block/d2", "out": "out"})),
    ]
    # Held-out pairs from a red-team review of the matcher: sub-models with the same inner names,
    # list- and dict-held layers, class changes, removals, prepends, shared layers, optimizer state.
    mlp_insert_truth = explicit({"dense": "dense", "batch_normalization": "batch_normalization", "dense_1": None,
                                 "dense_2": "dense_1", "dense_3": "dense_2", "dense_4": "dense_3"})
    two_towers_truth = {"functional/dense": "functional/dense", "functional/dense_1": "functional/dense_1",
                        "functional_1/dense_2": "functional_1/dense_2", "functional_1/dense_3": None,
                        "functional_1/dense_4": "functional_1/dense_3", "dense_5": "dense_4"}
    prepend_unnamed_truth = explicit({"dense": None, "dense_1": "dense", "dense_2": "dense_1", "dense_3": "dense_2"})
    list_front_truth = by_object(lambda new, old: [*zip(new.blocks[1:], old.blocks), (new.head, old.head)])
    redteam = [
        # sub-models whose inner layers have the same names
        Pair("tfk-encdec-symmetric-unchanged", "unchanged", call(enc_dec_symmetric, "tf_keras"),
             call(enc_dec_symmetric), explicit(identity_paths(ENC_DEC)), framework="tf_keras", unchanged=True,
             note="encoder and decoder alike in shapes and inner names (proj, norm, out)"),
        Pair("tfk-encdec-samenames-unchanged", "unchanged", call(enc_dec, "tf_keras"), call(enc_dec),
             explicit(identity_paths(ENC_DEC)), framework="tf_keras", unchanged=True,
             note="encoder and decoder with the same inner names"),
        Pair("encdec-samenames-decoder-insert", "insert", call(enc_dec), call(enc_dec, decoder_insert=True),
             explicit(identity_paths(ENC_DEC) | {"decoder/proj2": None}), note="Dense proj2 added in the decoder"),
        Pair("tfk-encdec-samenames-decoder-insert", "insert", call(enc_dec, "tf_keras"),
             call(enc_dec, decoder_insert=True), explicit(identity_paths(ENC_DEC) | {"decoder/proj2": None}),
             framework="tf_keras", note="the same from tf.keras"),
        Pair("tfk-encdec-nested-to-flat", "refactor", call(enc_dec, "tf_keras"), call(enc_dec_flat),
             explicit({"enc_proj": "encoder/proj", "enc_norm": "encoder/norm", "enc_out": "encoder/out",
                       "dec_proj": "decoder/proj", "dec_norm": "decoder/norm", "dec_out": "decoder/out"}),
             framework="tf_keras",
             note="the two sub-models flattened into one, their layers renamed enc_* / dec_*"),
        # layers held in a list or a dict
        Pair("list-insert-front", "containers", call(list_stack, "keras", 3), call(list_stack, "keras", 4),
             list_front_truth, note="self.blocks gets a Dense(16) at index 0; all blocks alike; TF drops the list"),
        Pair("tfk-list-insert-front", "containers", call(list_stack, "tf_keras", 3), call(list_stack, "keras", 4),
             list_front_truth, framework="tf_keras", note="the same from tf.keras, whose checkpoints keep the list"),
        Pair("tfk-list-unchanged", "unchanged", call(list_stack, "tf_keras", 3), call(list_stack, "keras", 3),
             by_object(lambda new, old: [*zip(new.blocks, old.blocks), (new.head, old.head)]),
             framework="tf_keras", unchanged=True, note="list-held layers, tf.keras -> Keras 3"),
        Pair("dict-heads-grow", "containers", call(dict_heads, "ab"), call(dict_heads, "abc"),
             dict_expect("a", "b"), note="a dict of heads gains key c"),
        Pair("dict-heads-key-inserted-first", "containers", call(dict_heads, "bc"), call(dict_heads, "abc"),
             dict_expect("b", "c"), note="a dict of heads gains key a, before the others"),
        Pair("dict-heads-key-renamed", "containers", call(dict_heads, "bc"), call(dict_heads, "ac"),
             dict_expect("c"), note="key b removed, key a added"),
        # a layer replaced by one of another class
        Pair("bn-to-ln-named", "replace", call(conv_norm, "bn", True), call(conv_norm, "ln", True),
             explicit({"c1": "c1", "norm": None, "c2": "c2", "fc": "fc"}),
             note="BatchNormalization 'norm' -> LayerNormalization 'norm': same name, new layer"),
        Pair("bn-to-ln-unnamed", "replace", call(conv_norm, "bn"), call(conv_norm, "ln"),
             explicit({"conv2d": "conv2d", "layer_normalization": None, "conv2d_1": "conv2d_1", "dense": "dense"}),
             note="BatchNormalization -> LayerNormalization, auto-generated names"),
        # nesting changes from tf.keras to Keras 3
        Pair("tfk-nested-to-k3-flat-named", "refactor", call(tf_keras_cnn_nested, True), call(cnn_flat, True),
             explicit({p: f"backbone/{p}" for p in CNN_NAMED[:-1]} | {"fc": "fc"}), framework="tf_keras"),
        Pair("tfk-nested-to-k3-flat-unnamed", "refactor", call(tf_keras_cnn_nested, False), call(cnn_flat, False),
             explicit({p: f"model/{p}" for p in CNN_UNNAMED[:-1]} | {"dense": "dense"}), framework="tf_keras"),
        Pair("tfk-flat-to-k3-nested-named", "refactor", call(tf_keras_cnn, True), call(cnn_nested, True),
             explicit({f"backbone/{p}": p for p in CNN_NAMED[:-1]} | {"fc": "fc"}), framework="tf_keras"),
        Pair("tfk-flat-to-k3-nested-unnamed", "refactor", call(tf_keras_cnn, False), call(cnn_nested, False),
             explicit({f"functional/{p}": p for p in CNN_UNNAMED[:-1]} | {"dense": "dense"}), framework="tf_keras"),
        Pair("tfk-seq-in-functional-to-flat", "refactor", tf_keras_sequential_in_functional, flat_tower,
             explicit({"t1": "tower/t1", "tbn": "tower/tbn", "t2": "tower/t2", "head": "head"}),
             framework="tf_keras", note="a Sequential inside a functional model, flattened"),
        # subclassed models with auto-named attribute layers
        Pair("tfk-subclassed-same", "unchanged", call(subclassed_net, "tf_keras"), call(subclassed_net),
             by_object(net_expect), framework="tf_keras", unchanged=True),
        Pair("k3-subclassed-insert-renamed", "insert", call(subclassed_net),
             call(subclassed_net, insert_renamed=True),
             by_object(net_expect), note="conv_extra inserted, attribute fc1 renamed hidden"),
        Pair("tfk-subclassed-insert-renamed", "insert", call(subclassed_net, "tf_keras"),
             call(subclassed_net, insert_renamed=True), by_object(net_expect), framework="tf_keras",
             note="the same from tf.keras; TF formats key by attribute: hidden is another chosen name"),
        # insertions
        Pair("two-towers-insert-second", "insert", call(two_towers), call(two_towers, insert_second=True),
             explicit(two_towers_truth), note="two alike unnamed tower sub-models; a Dense(8) added in the second"),
        Pair("tfk-two-towers-insert-second", "insert", call(two_towers, "tf_keras"),
             call(two_towers, insert_second=True),
             explicit({n: (o.replace("functional", "model") if o else None) for n, o in two_towers_truth.items()}),
             framework="tf_keras"),
        Pair("siamese-head-added", "insert", call(siamese), call(siamese, mix=True),
             explicit({"enc/e1": "enc/e1", "enc/e2": "enc/e2", "mix": None, "score": "score"}),
             note="shared sub-model; Dense 'mix' before 'score', which keeps its shape"),
        Pair("prepend-named-seq", "insert", call(sequential_mlp, named=True),
             call(sequential_mlp, prepend=True, named=True),
             explicit({"pre": None, "l1": "l1", "l2": "l2", "l3": "l3"}), note="Dense 'pre' put first"),
        Pair("prepend-unnamed-seq", "insert", call(sequential_mlp), call(sequential_mlp, prepend=True),
             prepend_unnamed_truth, note="a Dense put first: every auto-generated name shifts"),
        Pair("tfk-prepend-unnamed-seq", "insert", call(sequential_mlp, "tf_keras"),
             call(sequential_mlp, prepend=True),
             prepend_unnamed_truth, framework="tf_keras"),
        Pair("shared-dense-insert", "insert", call(shared_dense), call(shared_dense, insert=True),
             explicit({"dense": "dense", "dense_1": "dense_1", "dense_2": None, "dense_3": "dense_2"}),
             note="a Dense called twice; another inserted between the two calls"),
        Pair("auto-looking-names-insert", "insert", call(auto_looking_names), call(auto_looking_names, insert=True),
             explicit({"dense_layer": "dense_layer", "dense_3": "dense_3", "dense": None, "dense_1": "dense",
                       "conv_block_1": "conv_block_1", "dense_2": "dense_2"}),
             note="chosen names dense_3 / dense_2 look auto-generated; an auto-named Dense inserted"),
        Pair("tfk-auto-looking-names-insert", "insert", call(auto_looking_names, "tf_keras"),
             call(auto_looking_names, insert=True),
             explicit({"dense_layer": "dense_layer", "dense_3": "dense_3", "dense": None, "dense_1": "dense",
                       "conv_block_1": "conv_block_1", "dense_2": "dense_2"}), framework="tf_keras"),
        Pair("text-lstm-added-unnamed", "insert", call(text_model), call(text_model, extra=True),
             explicit({"embedding": "embedding", "conv1d": "conv1d", "lstm/lstm_cell": "lstm/lstm_cell",
                       "lstm_1/lstm_cell": None, "gru/gru_cell": "gru/gru_cell", "dense": None, "dense_1": "dense"}),
             note="an LSTM and a Dense inserted, auto-generated names"),
        Pair("tfk-text-lstm-added-named", "insert", call(text_model, "tf_keras", named=True),
             call(text_model, extra=True, named=True),
             explicit({"emb": "emb", "conv": "conv", "lstm/lstm_cell": "lstm/lstm_cell", "lstm2/lstm_cell": None,
                       "gru/gru_cell": "gru/gru_cell", "extra": None, "out": "out"}), framework="tf_keras"),
        Pair("resnet-like-2-to-3", "insert", call(resnet_like, depth=2), call(resnet_like, depth=3),
             resnet_like_expect(2, 3), note="named residual blocks block0..: one appended"),
        # removals and reordering
        Pair("mid-removed-named", "remove", call(mlp_chain, named=True), call(mlp_chain, ("c", "ln_c"), named=True),
             explicit({"a": "a", "bn_a": "bn_a", "b": "b", "d": "d", "head": "head"}),
             note="Dense c and LayerNormalization ln_c removed from the middle"),
        Pair("mid-removed-unnamed", "remove", call(mlp_chain), call(mlp_chain, ("c", "ln_c")),
             explicit({"dense": "dense", "batch_normalization": "batch_normalization", "dense_1": "dense_1",
                       "dense_2": "dense_3", "dense_3": "dense_4"}), note="the same, auto-generated names"),
        Pair("tfk-resnet-like-3-to-2", "remove", call(resnet_like, "tf_keras", depth=3), call(resnet_like, depth=2),
             resnet_like_expect(3, 2), framework="tf_keras", note="the last named block removed"),
        Pair("named-swap", "reorder", call(swapped), call(swapped, swap=True),
             explicit(identity_paths(["first", "alpha", "beta", "head"])),
             note="two alike named Dense applied in the other order"),
        Pair("tfk-siamese-unchanged", "unchanged", call(siamese, "tf_keras"), call(siamese),
             explicit(identity_paths(["enc/e1", "enc/e2", "score"])), framework="tf_keras", unchanged=True),
        # checkpoints that hold optimizer state
        Pair("opt-mlp-insert", "optimizer", call(mlp_insert, False), call(mlp_insert, True), mlp_insert_truth,
             train=True, note="unnamed-dense-insert after one Adam step: optimizer slots in the checkpoint"),
        Pair("tfk-opt-mlp-insert", "optimizer", tf_keras_mlp_insert, call(mlp_insert, True), mlp_insert_truth,
             framework="tf_keras", train=True, note="the same from tf.keras (save_weights keeps the optimizer)"),
        # keras.applications
        Pair("vgg16top-vgg19top", "apps", app("VGG16", 32, include_top=True, classes=10),
             app("VGG19", 32, include_top=True, classes=10), by_name(), note="with the top: fc1, fc2, predictions"),
        Pair("resnet50top-samecount-renamed-head", "apps", app("ResNet50", 32, include_top=True, classes=10),
             new_head_flat("ResNet50", 32, 10, "new_fc"), by_name(),
             note="10-class 'predictions' -> a new 10-class head 'new_fc' of the same shape"),
        Pair("mobilenetv2-a0.35-a0.5", "apps", app("MobileNetV2", 32, alpha=0.35), app("MobileNetV2", 32, alpha=0.5),
             by_name(), note="width"),
        Pair("efficientnetv2b2-b3", "apps", app("EfficientNetV2B2", 32), app("EfficientNetV2B3", 32), by_name()),
        Pair("densenet121-32-to-64", "apps", app("DenseNet121", 32), app("DenseNet121", 64), by_name(),
             unchanged=True, note="input size only: the same variables"),
        Pair("nasnetmobile-unchanged", "unchanged", app("NASNetMobile", 32), app("NASNetMobile", 32), by_name(),
             unchanged=True),
    ]
    # Held-out pairs from a second red-team round: options toggled on a layer, wrapping and unwrapping,
    # alike sub-models, class replacements of one shape, checkpoints that hold more than the model.
    inner_truth = explicit(identity_paths(["fc1", "fc"]))
    nested_seq_unnamed = {"dense_2": "dense_2", "sequential/dense": "sequential/dense",
                          "sequential/batch_normalization": "sequential/batch_normalization",
                          "sequential/dense_1": "sequential/dense_1", "dense_3": "dense_3"}
    redteam2 = [
        # keras.applications: shrinking, tops added and removed, more families
        Pair("vgg19-vgg16", "apps", app("VGG19", 32), app("VGG16", 32), by_name(), note="three convs removed"),
        Pair("resnet152v2-resnet101v2", "apps", app("ResNet152V2", 32), app("ResNet101V2", 32), by_name(),
             note="blocks removed"),
        Pair("densenet201-densenet121", "apps", app("DenseNet201", 32), app("DenseNet121", 32), by_name(),
             note="blocks removed"),
        Pair("efficientnetb3-b0", "apps", app("EfficientNetB3", 32), app("EfficientNetB0", 32), by_name(),
             note="blocks removed, widths shrink"),
        Pair("resnet50-notop-to-top", "apps", app("ResNet50", 32), app("ResNet50", 32, include_top=True, classes=10),
             by_name(), note="the top added"),
        Pair("xception-top-to-notop", "apps", app("Xception", 71, include_top=True, classes=10), app("Xception", 71),
             by_name(), note="the top removed"),
        Pair("mobilenetv3large-unchanged", "unchanged", app("MobileNetV3Large", 32), app("MobileNetV3Large", 32),
             by_name(), unchanged=True),
        Pair("mobilenetv3large-minimalistic", "apps", app("MobileNetV3Large", 32),
             app("MobileNetV3Large", 32, minimalistic=True), by_name(), note="SE blocks removed, kernels shrink"),
        Pair("mobilenetv3large-a0.75-a1.0", "apps", app("MobileNetV3Large", 32, alpha=0.75),
             app("MobileNetV3Large", 32), by_name(), note="width"),
        Pair("inceptionresnetv2-unchanged", "unchanged", app("InceptionResNetV2", 75),
             app("InceptionResNetV2", 75), by_name(), unchanged=True),
        Pair("efficientnetv2b3-v2s", "apps", app("EfficientNetV2B3", 32), app("EfficientNetV2S", 32), by_name()),
        Pair("resnet50v2top-resnet101v2top", "apps", app("ResNet50V2", 32, include_top=True, classes=10),
             app("ResNet101V2", 32, include_top=True, classes=10), by_name(), note="with the top"),
        # an option toggled on a layer: variables of one shape, told apart by name
        Pair("bn-ln-scale-off-named", "replace", call(norm_toggle, scale=True), call(norm_toggle, scale=False),
             norm_toggle_truth(True), note="BN/LN scale=False: gamma dropped; beta, moving stats go by role"),
        Pair("bn-ln-scale-on-named", "replace", call(norm_toggle, scale=False), call(norm_toggle, scale=True),
             norm_toggle_truth(True), note="BN/LN scale=True: gamma added"),
        Pair("bn-ln-center-off-unnamed", "replace", call(norm_toggle, center=True, named=False),
             call(norm_toggle, center=False, named=False), norm_toggle_truth(False), note="beta dropped"),
        Pair("tfk-bn-ln-scale-off-named", "replace", call(norm_toggle, "tf_keras", scale=True),
             call(norm_toggle, scale=False), norm_toggle_truth(True), framework="tf_keras"),
        Pair("tfk-bn-ln-scale-on-unnamed", "replace", call(norm_toggle, "tf_keras", scale=False, named=False),
             call(norm_toggle, scale=True, named=False), norm_toggle_truth(False), framework="tf_keras"),
        Pair("lora-enabled", "replace", call(lora_mlp), call(lora_mlp, enable=True),
             by_object(lambda new, old: [(new.get_layer(x), old.get_layer(x)) for x in ("d1", "d2", "out")]),
             note="enable_lora(2) on d1, d2: lora_kernel_a/b are new"),
        Pair("bias-off-named", "replace", call(bias_toggle, True), call(bias_toggle, False),
             explicit(identity_paths(["a", "b", "out"])), note="use_bias=False on a"),
        Pair("bias-on-unnamed", "replace", call(bias_toggle, False, False), call(bias_toggle, True, False),
             explicit(identity_paths(["dense", "dense_1", "dense_2"])), note="use_bias=True on the first Dense"),
        # a layer replaced by one of another class whose bias keeps its shape
        Pair("conv-to-separable-named", "replace", call(conv_replaced, "conv"), call(conv_replaced, "sep"),
             explicit({"c0": "c0", "mid": None, "fc": "fc"}), note="Conv2D mid -> SeparableConv2D mid"),
        Pair("conv-to-depthwise-unnamed", "replace", call(conv_replaced, "conv", False),
             call(conv_replaced, "dw", False),
             explicit({"conv2d": "conv2d", "depthwise_conv2d": None, "dense": "dense"}),
             note="Conv2D -> DepthwiseConv2D, auto-generated names"),
        Pair("embedding-resized-unnamed", "replace", call(two_tables, 50), call(two_tables, 60),
             explicit({"embedding": "embedding", "embedding_1": "embedding_1", "dense": "dense"}),
             note="token table 50x16 -> 60x16, the shape of the position table"),
        Pair("embedding-resized-named", "replace", call(two_tables, 50, True), call(two_tables, 60, True),
             explicit({"pos": "pos", "tok": "tok", "out": "out"})),
        Pair("mha-heads-2-to-4", "replace", call(mha, 2, 8), call(mha, 4, 4),
             explicit({f"attn/{x}": f"attn/{x}" for x in ("query", "key", "value", "attention_output")}
                      | {"ff": "ff", "out": "out"}), note="heads x key_dim 2x8 -> 4x4: attention shapes change"),
        # wrapping into / unwrapping out of a sub-model
        Pair("wrap-named", "refactor", call(inner_model, True), call(wrapped, True),
             explicit({"inner/fc1": "fc1", "inner/fc": "fc"})),
        Pair("wrap-unnamed", "refactor", call(inner_model, False), call(wrapped, False),
             explicit({"functional/dense": "dense", "functional/dense_1": "dense_1"})),
        Pair("wrap-named-samename-head", "refactor", call(inner_model, True), call(wrapped, True, True),
             explicit({"inner/fc1": "fc1", "inner/fc": "fc", "fc": None}),
             note="the new outer head is also 'fc', of the same shape"),
        Pair("tfk-wrap-named-samename-head", "refactor", call(inner_model, True, "tf_keras"),
             call(wrapped, True, True), explicit({"inner/fc1": "fc1", "inner/fc": "fc", "fc": None}),
             framework="tf_keras"),
        Pair("wrap-unnamed-head", "refactor", call(inner_model, False), call(wrapped, False, True),
             explicit({"functional/dense": "dense", "functional/dense_1": "dense_1", "dense_2": None}),
             note="a new outer head of the inner last layer's shape"),
        Pair("tfk-wrap-unnamed-head", "refactor", call(inner_model, False, "tf_keras"), call(wrapped, False, True),
             explicit({"functional/dense": "dense", "functional/dense_1": "dense_1", "dense_2": None}),
             framework="tf_keras"),
        Pair("unwrap-named-samename-head", "refactor", call(wrapped, True, True), call(inner_model, True),
             explicit({"fc1": "inner/fc1", "fc": "inner/fc"}), note="the old outer head 'fc' dropped"),
        Pair("tfk-unwrap-unnamed-head", "refactor", call(wrapped, False, True, "tf_keras"), call(inner_model, False),
             explicit({"dense": "model/dense", "dense_1": "model/dense_1"}), framework="tf_keras",
             note="the old outer head dense_2 dropped"),
        # alike sub-models
        Pair("sym-encoder-renamed", "refactor", call(sym_ae),
             call(sym_ae, order=("enc", "decoder"), names=("enc", "decoder")),
             sym_truth({"enc": "encoder", "decoder": "decoder"}), note="identical sub-models; encoder renamed enc"),
        Pair("sym-encoder-renamed-created-last", "refactor", call(sym_ae),
             call(sym_ae, order=("enc", "decoder"), names=("decoder", "enc")),
             sym_truth({"enc": "encoder", "decoder": "decoder"}), note="the same, the decoder created first"),
        Pair("sym-distinct-swapped-order", "reorder", call(sym_ae, prefixes=True),
             call(sym_ae, order=("decoder", "encoder"), prefixes=True), sym_truth(prefixes=True),
             note="alike sub-models with distinct inner names, applied in the other order"),
        Pair("tfk-sym-distinct-swapped-order", "reorder", call(sym_ae, framework="tf_keras", prefixes=True),
             call(sym_ae, order=("decoder", "encoder"), prefixes=True), sym_truth(prefixes=True),
             framework="tf_keras"),
        # insertions, removals, creation order
        Pair("residual-shortcut-added-after", "insert", call(res_block), call(res_block, True),
             explicit({"conv2d": "conv2d", "batch_normalization": "batch_normalization", "conv2d_1": "conv2d_1",
                       "conv2d_2": None, "dense": "dense"}), note="a 1x1 projection shortcut, created last"),
        Pair("residual-shortcut-added-first", "insert", call(res_block), call(res_block, True, True),
             explicit({"conv2d": None, "conv2d_1": "conv2d", "batch_normalization": "batch_normalization",
                       "conv2d_2": "conv2d_1", "dense": "dense"}), note="created first: the conv names shift"),
        Pair("k3-alike-insert-before-bn", "insert", call(alike_before_bn), call(alike_before_bn, True),
             explicit({"dense": "dense", "dense_1": None, "batch_normalization": "batch_normalization",
                       "dense_2": "dense_1", "dense_3": "dense_2"}), note="all Dense(16): only order tells"),
        Pair("k3-alike-remove-before-bn", "remove", call(alike_before_bn, True), call(alike_before_bn),
             explicit({"dense": "dense", "batch_normalization": "batch_normalization", "dense_1": "dense_2",
                       "dense_2": "dense_3"}), note="the reverse: the second Dense(16) removed"),
        Pair("unnamed-remove-and-insert", "reorder", call(remove_and_insert), call(remove_and_insert, True),
             explicit({"dense": "dense", "batch_normalization": "batch_normalization", "dense_1": "dense_2",
                       "dense_2": None, "dense_3": "dense_3"}), only_formats=("tf",),
             note="a Dense removed before the BN, one added after; the h5 format is a known limit"),
        Pair("deep-named-unnamed-insert", "insert", call(deep_named), call(deep_named, True),
             explicit({**{f"l{j}": f"l{j}" for j in range(6)}, "dense": None, "head": "head"}),
             note="named l0..l5; an unnamed Dense inserted before l3"),
        Pair("branches-created-other-order", "reorder", call(branches), call(branches, True),
             explicit({"dense": "dense_1", "dense_1": "dense", "dense_2": "dense_2"}),
             note="Dense(8) / Dense(16) branches created in the other order: auto names swap"),
        Pair("custom-weights-created-other-order", "reorder", call(two_weights), call(two_weights, ("b", "w")),
             by_object(lambda new, old: [(new.get_layer("wb"), old.get_layer("wb"))]), only_formats=("tf",),
             note="add_weight w, b -> b, w (one shape); the h5 format is a known limit"),
        Pair("sym-swapped-order-h5", "reorder", call(sym_ae), call(sym_ae, order=("decoder", "encoder")),
             sym_truth(), only_formats=("h5",),
             note="identical sub-models applied in the other order; the h5 file keeps their names"),
        Pair("tfk-sym-swapped-order-h5", "reorder", call(sym_ae, framework="tf_keras"),
             call(sym_ae, order=("decoder", "encoder")), sym_truth(), framework="tf_keras", only_formats=("h5",),
             note="the same from tf.keras (Keras 2 h5 keeps the sub-model names)"),
        # tf.keras Sequential inside a Sequential
        Pair("tfk-nested-seq-unchanged-unnamed", "unchanged", call(nested_seq, "tf_keras"), call(nested_seq),
             explicit(nested_seq_unnamed), framework="tf_keras", unchanged=True),
        Pair("tfk-nested-seq-insert-named", "insert", call(nested_seq, "tf_keras", named=True),
             call(nested_seq, named=True, insert=True),
             explicit({"o1": "o1", "inner/i1": "inner/i1", "inner/ibn": "inner/ibn", "inner/iextra": None,
                       "inner/i2": "inner/i2", "o2": "o2"}), framework="tf_keras", note="iextra after ibn"),
        Pair("tfk-nested-seq-insert-unnamed", "insert", call(nested_seq, "tf_keras"), call(nested_seq, insert=True),
             explicit({"dense_3": "dense_2", "sequential/dense": "sequential/dense",
                       "sequential/batch_normalization": "sequential/batch_normalization",
                       "sequential/dense_1": None, "sequential/dense_2": "sequential/dense_1", "dense_4": "dense_3"}),
             framework="tf_keras", note="the same unnamed: every Dense(8) alike"),
        # checkpoints holding more than the model (Pair.writer; the "tf" format only)
        Pair("ckpt-ema-after-root", "ckpt", call(inner_model), call(inner_model), inner_truth,
             writer=writer(write_with_copy, "model", "ema", False), root="model",
             note="Checkpoint(model=m, ema=copy), root='model'"),
        Pair("ckpt-ema-first-root-insert", "ckpt", call(mlp_insert, False), call(mlp_insert, True),
             mlp_insert_truth, writer=writer(write_with_copy, "model", "ema", True), root="model",
             note="Checkpoint(ema=copy, model=m), root='model'; a Dense inserted"),
        Pair("ckpt-net-ema-root", "ckpt", call(inner_model), call(inner_model), inner_truth,
             writer=writer(write_with_copy, "net", "ema_net", True), root="net",
             note="Checkpoint(ema_net=copy, net=m), root='net'"),
        Pair("tfk-ckpt-ema-after-root", "ckpt", call(inner_model, True, "tf_keras"), call(inner_model),
             inner_truth, framework="tf_keras", writer=writer(write_with_copy, "model", "ema", False), root="model",
             note="tf.keras model and its EMA copy, root='model'"),
        Pair("ckpt-teacher-beside", "ckpt", call(inner_model), call(inner_model), inner_truth,
             writer=writer(write_with_teacher), note="Checkpoint(teacher=small model with an fc1, model=m)"),
        Pair("ckpt-in-module", "ckpt", call(inner_model), call(inner_model), inner_truth,
             writer=writer(write_in_module), note="Checkpoint(trainer=tf.Module with .model and .step)"),
        Pair("ckpt-in-module-insert", "ckpt", call(mlp_insert, False), call(mlp_insert, True), mlp_insert_truth,
             writer=writer(write_in_module), note="the same, a Dense inserted"),
    ]
    # Known limits: run and scored, reported apart, not counted in the totals or the exit status.
    limits = [
        Pair("sym-swapped-order", "limits", call(sym_ae), call(sym_ae, order=("decoder", "encoder")), sym_truth(),
             only_formats=("tf",), note="identical sub-models applied in the other order (TF format)",
             limit="the sub-models differ only by their own names (encoder/decoder), which a TF checkpoint does not "
                   "record: it keys them by their place in the model, and the places swapped"),
        Pair("tfk-sym-swapped-order", "limits", call(sym_ae, framework="tf_keras"),
             call(sym_ae, order=("decoder", "encoder")), sym_truth(), framework="tf_keras",
             only_formats=("tf", "tf-keras"), note="the same from tf.keras (TF formats)",
             limit="tf.keras TF checkpoints key sub-models by place too (layer_with_weights-N): no sub-model name "
                   "in the file"),
        Pair("two-heads-output-order-swapped", "limits", call(two_heads), call(two_heads, True),
             explicit(identity_paths(["dense", "dense_1", "dense_2"])), note="outputs [a, b] -> [b, a]",
             limit="two unnamed heads of one shape: the truth follows creation order, the file keeps the heads by "
                   "their place in the layer list, which follows the outputs; which head the user meant is not "
                   "in the file"),
        Pair("unnamed-remove-and-insert-h5", "limits", call(remove_and_insert), call(remove_and_insert, True),
             explicit({"dense": "dense", "batch_normalization": "batch_normalization", "dense_1": "dense_2",
                       "dense_2": None, "dense_3": "dense_3"}), only_formats=("h5",),
             note="unnamed-remove-and-insert, h5 format",
             limit=".weights.h5 keys layers by auto-name and does not record where the BN sits among the Dense "
                   "layers: old and new have the same keys and shapes, so remove+insert looks like no change"),
        Pair("custom-weights-created-other-order-h5", "limits", call(two_weights), call(two_weights, ("b", "w")),
             by_object(lambda new, old: [(new.get_layer("wb"), old.get_layer("wb"))]), only_formats=("h5",),
             note="custom-weights-created-other-order, h5 format",
             limit=".weights.h5 stores a layer's variables by creation index (vars/0, vars/1), not by name: "
                   "two weights of one shape created in the other order swap"),
        Pair("dense-to-einsum-named", "limits", call(dense_replaced), call(dense_replaced, True),
             explicit({"a": "a", "mid": None, "fc": "fc"}), note="Dense mid -> EinsumDense mid, same shapes",
             limit="debatable truth: same layer name, same variable names and shapes; only the layer class says "
                   "the layer is new, and a TF checkpoint does not record classes"),
        Pair("dense-to-einsum-unnamed", "limits", call(dense_replaced, False, False), call(dense_replaced, True, False),
             explicit({"dense": "dense", "einsum_dense": None, "dense_1": "dense_2"}),
             note="the same, auto-generated names",
             limit="as dense-to-einsum-named: in a TF checkpoint a 16x16 kernel in that place is all there is"),
        Pair("deep-named-insert-renumbered", "limits", call(deep_named), call(deep_named, True, True),
             explicit({"l0": "l0", "l1": "l1", "l2": "l2", "l3": None, "l4": "l3", "l5": "l4", "l6": "l5",
                       "head": "head"}), note="a Dense inserted as l3, the old l3..l5 renamed l4..l6",
             limit="debatable truth: the user gave the names l3..l5 to other layers; the file's names say old l3 "
                   "is new l3, and no loader should overrule a matching name"),
    ]
    return apps + synthetic + redteam + redteam2 + limits


# =============================================================================== building and saving


def clear_sessions(framework: str) -> None:
    """What a fresh program starts with: auto-generated layer names restart."""
    import keras

    keras.backend.clear_session()
    if framework == "tf_keras":
        import tf_keras

        tf_keras.backend.clear_session()


def np_dtype(variable: Any) -> Any:
    import numpy as np

    return np.dtype(getattr(variable.dtype, "as_numpy_dtype", variable.dtype))


def shape_of(variable: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in variable.shape)


def value_of(variable: Any) -> Any:
    import numpy as np

    return np.array(variable.numpy(), copy=True)


def randomise(labelled: list[tuple[str, Any]], seed: int) -> dict[str, str]:
    """Give every variable seeded random values, all distinct; return value digest -> label."""
    import numpy as np

    by_digest: dict[str, str] = {}
    for i, (label, v) in enumerate(labelled):
        rng = np.random.default_rng([seed, i])
        dtype, shape = np_dtype(v), shape_of(v)
        if dtype.kind == "f":
            value = rng.standard_normal(shape).astype(dtype)
        else:
            value = rng.integers(1, 1 << 20, size=shape).astype(dtype)
        v.assign(value)
        d = digest(value_of(v))
        if d in by_digest:
            raise RuntimeError(f"old variables {by_digest[d]} and {label} have equal values; pick another seed")
        by_digest[d] = label
    return by_digest


def save(old: Model, framework: str, formats: tuple[str, ...], workdir: Path,
         manager: Any = None, writer: Callable[[Model, str, str], None] | None = None) -> dict[str, str]:
    """Save the old model in each format; return format -> path.

    ``tf-opt`` saves through ``manager``, a ``tf.train.CheckpointManager`` of ``Checkpoint(model=old,
    optimizer=...)`` that already holds one older save; its path is the manager's folder (the newest save).
    ``writer`` (``Pair.writer``) writes the ``tf`` format instead of ``Checkpoint(model=old)``.
    """
    import tensorflow as tf

    files: dict[str, str] = {}
    for fmt in formats:
        if fmt == "tf-opt":
            manager.save()
            files[fmt] = str(manager.directory)
        elif fmt == "tf":
            files[fmt] = str(workdir / "tf" / "ckpt")
            if writer is not None:
                writer(old, framework, files[fmt])
            else:
                tf.train.Checkpoint(model=old).write(files[fmt])
        elif fmt == "tf-keras":
            files[fmt] = str(workdir / "tf-keras" / "ckpt")
            old.save_weights(files[fmt])  # tf-keras: TF format for a path without .h5
        elif fmt == "h5":
            files[fmt] = str(workdir / ("old.h5" if framework == "tf_keras" else "old.weights.h5"))
            old.save_weights(files[fmt])
    return files


def file_digests(fmt: str, path: str) -> set[str]:
    """Digests of every tensor the file holds, read without regraft (TensorFlow's reader, h5py)."""
    import h5py
    import numpy as np
    import tensorflow as tf

    out: set[str] = set()
    if fmt in ("tf", "tf-keras", "tf-opt"):
        reader = tf.train.load_checkpoint(path)
        for name in reader.get_variable_to_shape_map():
            value = np.asarray(reader.get_tensor(name))
            if value.dtype != object:
                out.add(digest(value))
    else:
        with h5py.File(path, "r") as f:
            def visit(_: str, obj: Any) -> None:
                if isinstance(obj, h5py.Dataset) and obj.dtype.kind != "O":
                    out.add(digest(np.asarray(obj[()])))

            f.visititems(visit)
    return out


# =============================================================================== scoring


@dataclass
class Target:
    """One new variable, its fresh value and its hand-written expected source."""

    label: str
    variable: Any
    shape: tuple[int, ...]
    fresh: Any
    fresh_digest: str
    expected: str | None = None  # old variable label
    expected_digest: str | None = None
    expected_shape: tuple[int, ...] | None = None


@dataclass
class Prepared:
    """A pair ready to run: the saved old model (by value) and the built new model."""

    pair: Pair
    new: Model
    targets: list[Target]
    old_labels: dict[str, str]  # value digest -> old variable label
    files: dict[str, str]
    old_variables: int
    build_seconds: float
    # format -> digests of every tensor the file holds, read by TensorFlow / h5py when the files were
    # written (read_prepared); None: file_digests reads them when the case runs.
    in_file: dict[str, set[str]] | None = None


@dataclass
class ValueScore:
    """A loaded model judged by value."""

    recovered: int = 0
    wrong: int = 0
    confirm: int = 0
    missed: int = 0
    fresh: int = 0
    wrong_variables: list[dict[str, str]] = field(default_factory=list)
    missed_variables: list[str] = field(default_factory=list)
    confirm_variables: list[str] = field(default_factory=list)


@dataclass
class Case:
    """One (pair, format): counts from the fresh-mode load, the strict load and the plan's decisions."""

    pair: str
    group: str
    format: str
    note: str
    new_variables: int = 0
    eligible: int = 0  # expected source in the file, same shape
    mismatch: int = 0  # expected source in the file, another shape
    absent: int = 0  # expected source not in this file at all
    new_layer_variables: int = 0  # no expected source
    old_variables: int = 0
    old_absent: list[str] = field(default_factory=list)  # old variables this format does not hold
    fresh: ValueScore | None = None
    statuses: dict[str, int] = field(default_factory=dict)
    decisions: int = 0
    decisions_right: int = 0
    decisions_wrong: int = 0
    proposals_wrong: int = 0  # unconfirmed proposals (never loaded unless accept_order) naming another tensor
    wrong_decisions: list[dict[str, Any]] = field(default_factory=list)
    calibration: dict[str, dict[str, int]] = field(default_factory=dict)  # confidence -> counts
    strict: str = ""  # loaded | refused | error
    strict_problems: int = 0
    strict_score: ValueScore | None = None
    refused_but_changed: int = 0
    errors: list[str] = field(default_factory=list)
    plan_seconds: float = 0.0
    seconds: float = 0.0

    @property
    def wrong(self) -> int:
        """Every WRONG of this case: values (both loads) and decisions."""
        return ((self.fresh.wrong if self.fresh else 0) + (self.strict_score.wrong if self.strict_score else 0)
                + self.refused_but_changed + self.decisions_wrong)


def category(t: Target, in_file: set[str]) -> str:
    if t.expected is None:
        return NEW
    if t.expected_digest not in in_file:
        return ABSENT
    return ELIGIBLE if t.expected_shape == t.shape else MISMATCH


def left_to_confirm(assignment: Any) -> bool:
    """The plan left this variable fresh for the user to decide: ``unconfirmed`` (placed by order only,
    confirmed with ``accept_order=True``) or ``ambiguous`` (equally good candidates, settled by a rule)."""
    return assignment is not None and (getattr(assignment, "status", "") in ("unconfirmed", "ambiguous")
                                       or bool(getattr(assignment, "order_only", False)))


def score_values(targets: list[Target], categories: dict[int, str], old_labels: dict[str, str],
                 assignments: dict[int, Any]) -> ValueScore:
    """Judge every new variable by its value (see the module docstring)."""
    score = ValueScore()
    for t in targets:
        d = digest(value_of(t.variable))
        cat = categories[id(t.variable)]
        if t.expected_digest is not None and d == t.expected_digest:
            score.recovered += 1
            continue
        holds = old_labels.get(d)
        if holds is not None or d != t.fresh_digest:
            score.wrong += 1
            score.wrong_variables.append({"variable": t.label, "expected": str(t.expected),
                                          "holds": holds or "a value that is neither fresh nor an old tensor"})
            continue
        score.fresh += 1
        if cat == ELIGIBLE:
            if left_to_confirm(assignments.get(id(t.variable))):
                score.confirm += 1
                score.confirm_variables.append(t.label)
            else:
                score.missed += 1
                score.missed_variables.append(t.label)
    return score


def reset(targets: list[Target]) -> None:
    for t in targets:
        t.variable.assign(t.fresh)


def unchanged(targets: list[Target]) -> int:
    """How many variables differ from their fresh value."""
    return sum(1 for t in targets if digest(value_of(t.variable)) != t.fresh_digest)


def conf_key(confidence: float | None) -> str:
    return "none" if confidence is None else f"{confidence:g}"


def error_text(exc: BaseException) -> str:
    first = str(exc).splitlines()[0][:200] if str(exc) else ""
    return f"{type(exc).__name__}: {first}"


def prepare(pair: Pair, formats: tuple[str, ...], seed: int, workdir: Path) -> Prepared:
    """Build, randomise and save the old model; build the new one; resolve the ground truth by object."""
    start = time.perf_counter()
    clear_sessions(pair.framework)
    old = pair.build_old()
    manager = None
    if pair.train:
        import tensorflow as tf

        optimizer = train_one_step(old, pair.framework)
        if "tf-opt" in formats:
            manager = tf.train.CheckpointManager(tf.train.Checkpoint(model=old, optimizer=optimizer),
                                                 str(workdir / "tf-opt"), max_to_keep=5)
            manager.save()  # an older save holding the trained, not yet randomised values: must not be read
    old_labelled = labelled_variables(old)
    old_labels = randomise(old_labelled, seed)
    files = save(old, pair.framework, formats, workdir, manager, pair.writer)
    clear_sessions("keras")
    new = pair.build_new()

    expected: dict[int, Any] = {}
    for new_layer, old_layer in pair.expect(new, old):
        if old_layer is None:
            continue
        for nv, ov in corresponding_variables(new_layer, old_layer):
            if id(nv) in expected and expected[id(nv)] is not ov:
                raise RuntimeError(f"ground truth of {pair.name}: a new variable has two expected sources")
            expected[id(nv)] = ov
    taken = Counter(id(ov) for ov in expected.values())
    if taken and max(taken.values()) > 1:
        raise RuntimeError(f"ground truth of {pair.name}: an old variable is expected by two new variables")
    old_by_id = {id(v): (label, v) for label, v in old_labelled}
    targets = []
    for label, v in labelled_variables(new):
        fresh = value_of(v)
        t = Target(label, v, shape_of(v), fresh, digest(fresh))
        if id(v) in expected:
            old_label, ov = old_by_id[id(expected[id(v)])]
            t.expected, t.expected_digest, t.expected_shape = old_label, digest(value_of(ov)), shape_of(ov)
        targets.append(t)
    return Prepared(pair, new, targets, old_labels, files, len(old_labelled), time.perf_counter() - start)


def write_prepared(prep: Prepared, workdir: Path) -> None:
    """Record in ``workdir/prepared.json`` what scoring needs from the old model and its files.

    The files must be in ``workdir``. With the record, :func:`read_prepared` scores them on any
    Keras backend, without TensorFlow (the tests' JAX stage): the old model's value digests and
    labels, each new variable's expected source by label, and each file's tensor digests, which
    are read here, with TensorFlow's own reader.
    """
    record = {
        "pair": prep.pair.name,
        "files": {fmt: os.path.relpath(path, workdir) for fmt, path in prep.files.items()},
        "old_labels": prep.old_labels,
        "old_variables": prep.old_variables,
        "in_file": {fmt: sorted(file_digests(fmt, path)) for fmt, path in prep.files.items()},
        "new_labels": [t.label for t in prep.targets],
        "expected": {t.label: [t.expected, t.expected_digest, list(t.expected_shape)]
                     for t in prep.targets if t.expected is not None},
    }
    (workdir / "prepared.json").write_text(json.dumps(record, indent=1))


def read_prepared(pair: Pair, workdir: Path) -> Prepared:
    """The pair prepared by :func:`write_prepared` in ``workdir``, its new model built here (any backend)."""
    start = time.perf_counter()
    record = json.loads((workdir / "prepared.json").read_text())
    if record["pair"] != pair.name:
        raise RuntimeError(f"{workdir} holds pair {record['pair']}, not {pair.name}")
    clear_sessions("keras")
    new = pair.build_new()
    labelled = labelled_variables(new)
    if [label for label, _ in labelled] != record["new_labels"]:
        raise RuntimeError(f"{pair.name}: the new model built here has other variables than when its files were "
                           f"written: {[label for label, _ in labelled]} != {record['new_labels']}")
    targets = []
    for label, v in labelled:
        fresh = value_of(v)
        t = Target(label, v, shape_of(v), fresh, digest(fresh))
        if label in record["expected"]:
            t.expected, t.expected_digest, shape = record["expected"][label]
            t.expected_shape = tuple(shape)
        targets.append(t)
    files = {fmt: str(workdir / rel) for fmt, rel in record["files"].items()}
    return Prepared(pair, new, targets, record["old_labels"], files, record["old_variables"],
                    time.perf_counter() - start, {fmt: set(d) for fmt, d in record["in_file"].items()})


def run_case(prep: Prepared, fmt: str) -> Case:
    """Score one saved format of one pair: decisions, the fresh-mode load, the strict load."""
    import regraft
    from regraft.errors import LoadError

    start = time.perf_counter()
    pair, new, targets, path = prep.pair, prep.new, prep.targets, prep.files[fmt]
    case = Case(pair.name, pair.group, fmt, pair.note, new_variables=len(targets), old_variables=prep.old_variables)
    in_file = prep.in_file[fmt] if prep.in_file is not None else file_digests(fmt, path)
    case.old_absent = sorted(label for d, label in prep.old_labels.items() if d not in in_file)
    categories = {id(t.variable): category(t, in_file) for t in targets}
    counts = Counter(categories.values())
    case.eligible, case.mismatch, case.absent, case.new_layer_variables = (
        counts[ELIGIBLE], counts[MISMATCH], counts[ABSENT], counts[NEW])
    by_id = {id(t.variable): t for t in targets}

    # Decisions: what the plan chose, identified by the value of the tensor it names.
    try:
        with regraft.open(path) as source:
            t0 = time.perf_counter()
            plan = regraft.plan(new, source, reshape="fresh", root=pair.root)
            case.plan_seconds = time.perf_counter() - t0
            read: dict[str, str | None] = {}
            calibration: dict[str, Counter[str]] = defaultdict(Counter)
            for a in plan.assignments:
                if a.source is None:
                    continue
                if a.source.key not in read:
                    read[a.source.key] = prep.old_labels.get(digest(source.read(a.source.key)))
                holds = read[a.source.key]
                t = by_id.get(id(a.target.variable))
                expected = t.expected if t is not None else None
                right = holds is not None and holds == expected
                case.decisions += 1
                c = calibration[conf_key(a.confidence)]
                c["decisions"] += 1
                c["right" if right else "wrong"] += 1
                c[f"status:{a.status}"] += 1
                if right:
                    case.decisions_right += 1
                elif left_to_confirm(a):
                    case.proposals_wrong += 1  # the user is asked; a wrong guess here loads nothing
                else:
                    case.decisions_wrong += 1
                    case.wrong_decisions.append({
                        "variable": t.label if t else a.target.key, "status": a.status, "stage": a.stage,
                        "confidence": a.confidence, "source": a.source.key, "holds": holds or "no old tensor",
                        "expected": expected, "reason": a.reason})
            case.calibration = {k: dict(v) for k, v in calibration.items()}
    except Exception as exc:  # noqa: BLE001 - the benchmark records any failure
        case.errors.append(f"plan: {error_text(exc)}")

    # Fresh mode: load what matches, leave shape mismatches fresh; judge every variable by value.
    reset(targets)
    try:
        report = regraft.load(new, path, strict=False, reshape="fresh", root=pair.root)
        assignments = {id(a.target.variable): a for a in report.plan.assignments}
        case.statuses = dict(Counter(a.status for a in report.plan.assignments))
        case.fresh = score_values(targets, categories, prep.old_labels, assignments)
    except Exception as exc:  # noqa: BLE001
        case.errors.append(f"load(strict=False): {error_text(exc)}")

    # Strict mode (the default): refuses, or loads and is judged the same way.
    try:
        case.strict_problems = len(regraft.plan(new, path, root=pair.root).problems())
    except Exception as exc:  # noqa: BLE001
        case.errors.append(f"plan(strict problems): {error_text(exc)}")
    reset(targets)
    try:
        report = regraft.load(new, path, root=pair.root)
        case.strict = "loaded"
        assignments = {id(a.target.variable): a for a in report.plan.assignments}
        case.strict_score = score_values(targets, categories, prep.old_labels, assignments)
    except LoadError:
        case.strict = "refused"
        case.refused_but_changed = unchanged(targets)  # a refused load must not touch the model
    except Exception as exc:  # noqa: BLE001
        case.strict = "error"
        case.errors.append(f"load(strict=True): {error_text(exc)}")
    reset(targets)
    case.seconds = time.perf_counter() - start
    return case


def run_pair(pair: Pair, formats: tuple[str, ...] | None = None, seed: int = 0, workdir: Path | None = None,
             log: TextIO = sys.stderr) -> list[Case]:
    """Every applicable format of one pair (``formats`` filters them); files go to ``workdir`` or a temp dir."""
    fmts = tuple(f for f in pair.formats if formats is None or f in formats)
    if not fmts:
        return []
    tmp = None
    if workdir is None:
        tmp = tempfile.mkdtemp(prefix=f"bench_zoo_{pair.name}_")
        where = Path(tmp)
    else:
        where = workdir / pair.name
        where.mkdir(parents=True, exist_ok=True)
    try:
        with quiet(log):
            prep = prepare(pair, fmts, seed, where)
        say(log, f"   built and saved in {prep.build_seconds:.1f} s: {prep.old_variables} old variables, "
                 f"{len(prep.targets)} new ({', '.join(fmts)})")
        cases = []
        for fmt in fmts:
            with quiet(log):
                case = run_case(prep, fmt)
            cases.append(case)
            say(log, "   " + progress_line(case))
        return cases
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


# =============================================================================== output


def say(out: TextIO, text: str = "") -> None:
    print(text, file=out, flush=True)


def progress_line(c: Case) -> str:
    f = c.fresh
    parts = [f"{c.format:8} {c.eligible} eligible"]
    if f is not None:
        parts.append(f"{f.recovered} recovered, {f.wrong} wrong, {f.confirm} confirm, {f.missed} missed")
    parts.append(f"{c.mismatch} mismatch, {c.absent} absent")
    parts.append(f"decisions {c.decisions_right}/{c.decisions} right")
    parts.append(f"strict {c.strict} ({c.strict_problems} problems)")
    text = "; ".join(parts) + f" [{c.seconds:.1f} s]"
    if c.errors:
        text += " ERRORS: " + " | ".join(c.errors)
    return text


HEADER = ("pair", "format", "vars", "eligible", "recovered", "wrong", "confirm", "missed", "mismatch", "absent",
          "dec.right", "dec.wrong", "prop.wrong", "strict", "problems", "strict.rec", "strict.wrong")


def counts(c: Case) -> dict[str, int]:
    """The numeric columns of one case (strict.rec / strict.wrong: the strict load, when it loaded)."""
    f, s = c.fresh or ValueScore(), c.strict_score
    return {"vars": c.new_variables, "eligible": c.eligible, "recovered": f.recovered, "wrong": f.wrong,
            "confirm": f.confirm, "missed": f.missed, "mismatch": c.mismatch, "absent": c.absent,
            "dec.right": c.decisions_right, "dec.wrong": c.decisions_wrong, "prop.wrong": c.proposals_wrong,
            "problems": c.strict_problems,
            "strict.rec": s.recovered if s else 0, "strict.wrong": (s.wrong if s else 0) + c.refused_but_changed}


def cells(name: str, fmt: str, n: dict[str, int], strict: str, fresh_ok: bool = True) -> tuple[str, ...]:
    def get(col: str) -> str:
        if col == "recovered":
            return f"{n[col]} ({pct(n[col], n['eligible'])})" if fresh_ok else "ERROR"
        if col == "strict.rec" and strict in ("refused", "error", "-"):
            return "-"
        return str(n[col])

    return (name, fmt, *(get(h) for h in HEADER[2:13]), strict, get("problems"), get("strict.rec"),
            get("strict.wrong"))


def table(cases: list[Case]) -> str:
    rows = [cells(c.pair, c.format, counts(c), c.strict or "-", c.fresh is not None) for c in cases]
    total = {k: sum(counts(c)[k] for c in cases) for k in counts(cases[0])} if cases else dict.fromkeys(HEADER[2:], 0)
    loaded = sum(1 for c in cases if c.strict == "loaded")
    rows.append(cells("TOTAL", f"{len(cases)} cases", total, f"{loaded} loaded"))
    return render(rows, HEADER)


LIMITS = "limits"  # the group of known limits: run and scored, reported apart, not in the totals or exit status
LIMITS_HEADER = ("pair", "format", "eligible", "recovered", "wrong", "confirm", "missed", "dec.wrong", "strict",
                 "strict.wrong")


def limits_table(cases: list[Case], by_pair: dict[str, Pair]) -> str:
    """The known limits: one row per case with its wrong counts, then one line per pair saying why."""
    rows = []
    for c in cases:
        n = counts(c)
        rows.append((c.pair, c.format, str(n["eligible"]), str(n["recovered"]), str(n["wrong"]), str(n["confirm"]),
                     str(n["missed"]), str(n["dec.wrong"]), c.strict or "-", str(n["strict.wrong"])))
    text = render(rows, LIMITS_HEADER)
    why = [f"  {name}: {by_pair[name].limit}" for name in dict.fromkeys(c.pair for c in cases)]
    return text + "\nWhy:\n" + "\n".join(why)


def render(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    rule = tuple("-" * w for w in widths)
    lines = [header, rule, *rows]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in lines)


def merged_calibration(cases: list[Case]) -> dict[str, dict[str, int]]:
    merged: dict[str, Counter[str]] = defaultdict(Counter)
    for c in cases:
        for conf, counts in c.calibration.items():
            merged[conf].update(counts)
    return {k: dict(merged[k]) for k in sorted(merged, key=lambda k: (k == "none", -float(k) if k != "none" else 0))}


def calibration_table(cases: list[Case]) -> str:
    rows = []
    for conf, c in merged_calibration(cases).items():
        statuses = ", ".join(f"{k[len('status:'):]} {v}" for k, v in sorted(c.items()) if k.startswith("status:"))
        rows.append((conf, str(c.get("decisions", 0)), str(c.get("right", 0)), str(c.get("wrong", 0)),
                     pct(c.get("right", 0), c.get("decisions", 0)), statuses))
    return render(rows, ("confidence", "decisions", "right", "wrong", "right %", "plan statuses"))


def details(cases: list[Case], limit: int = 8) -> list[str]:
    """Every case's WRONG values and decisions, missed variables and errors, ``limit`` names each."""
    lines = []

    def some(items: list[str]) -> str:
        return ", ".join(items[:limit]) + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")

    for c in cases:
        name = f"{c.pair} [{c.format}]"
        for err in c.errors:
            lines.append(f"ERROR    {name}: {err}")
        for label, score in (("fresh", c.fresh), ("strict", c.strict_score)):
            if score and score.wrong:
                lines.append(f"WRONG    {name} {label} load, {score.wrong} variables: "
                             + some([f"{w['variable']} <- {w['holds']} (expected {w['expected']})"
                                     for w in score.wrong_variables]))
        if c.refused_but_changed:
            lines.append(f"WRONG    {name}: strict load refused but changed {c.refused_but_changed} variables")
        if c.decisions_wrong:
            lines.append(f"WRONG    {name} decisions, {c.decisions_wrong}: "
                         + some([f"{w['variable']} <- {w['holds']} (expected {w['expected']}; {w['status']}, "
                                 f"{w['stage']}@{w['confidence']})" for w in c.wrong_decisions]))
        if c.fresh and c.fresh.missed:
            lines.append(f"missed   {name}, {c.fresh.missed}: {some(c.fresh.missed_variables)}")
        if c.fresh and c.fresh.confirm:
            lines.append(f"confirm  {name}, {c.fresh.confirm}: {some(c.fresh.confirm_variables)}")
        if c.old_absent:
            lines.append(f"absent   {name}: the file lacks {len(c.old_absent)} of {c.old_variables} old variables: "
                         f"{some(c.old_absent)}")
    return lines


# =============================================================================== command line


def unchanged_failures(cases: list[Case], by_name: dict[str, Pair]) -> list[str]:
    """An unchanged architecture must load 100%, with strict=True and no problems, in every format."""
    out = []
    for c in cases:
        if not by_name[c.pair].unchanged:
            continue
        name = f"{c.pair} [{c.format}]"
        if c.fresh is None or c.fresh.recovered != c.new_variables or c.eligible != c.new_variables:
            out.append(f"{name}: recovered {c.fresh.recovered if c.fresh else 0} of {c.new_variables} variables")
        if c.strict != "loaded" or c.strict_problems:
            out.append(f"{name}: strict load {c.strict or 'not run'} with {c.strict_problems} problems")
        elif c.strict_score is None or c.strict_score.recovered != c.new_variables:
            out.append(f"{name}: strict load recovered {c.strict_score.recovered if c.strict_score else 0} "
                       f"of {c.new_variables} variables")
    return out


def label(builder: Callable[[], Model]) -> str:
    return str(getattr(builder, "label", getattr(builder, "__name__", "?")))


def select(all_pairs: list[Pair], only: str | None) -> list[Pair]:
    if not only:
        return all_pairs
    needles = [s.strip().lower() for s in only.split(",") if s.strip()]
    return [p for p in all_pairs if any(n in p.name.lower() or n in (p.group, p.framework) for n in needles)]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Which old tensor does each new variable get? regraft on a zoo of old -> new model pairs, "
        "judged by tensor values against hand-written ground truth.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--only", default=None,
                        help="comma-separated substrings of pair names, group names or tf_keras (every pair "
                        "whose old model is tf-keras) to run; see --list")
    parser.add_argument("--formats", default=",".join(ALL_FORMATS),
                        help="comma-separated formats: tf, tf-keras (tf-keras old models only), h5, "
                        "tf-opt (trained old models only)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the old models' random values")
    parser.add_argument("--json", default=None, metavar="PATH",
                        help="write the results as JSON to PATH ('-': stdout, the tables then go to stderr)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="write the checkpoints here and keep them (default: a temporary directory per pair)")
    parser.add_argument("--list", action="store_true", help="list the pairs and exit")
    args = parser.parse_args(argv)
    args.format_list = tuple(f.strip() for f in args.formats.split(",") if f.strip())
    for f in args.format_list:
        if f not in ALL_FORMATS:
            parser.error(f"unknown format {f!r}; choose from {', '.join(ALL_FORMATS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    chosen = select(pairs(), args.only)
    if args.list:
        for p in chosen:
            print(f"{p.name:36} {p.group:11} {p.framework:8} {','.join(p.formats):21} "
                  f"{label(p.build_old)} -> {label(p.build_new)}"
                  + (f"  ({p.note})" if p.note else "") + (f"  [limit: {p.limit}]" if p.limit else ""))
        return 0
    if not chosen:
        print(f"no pair matches --only {args.only!r}; see --list", file=sys.stderr)
        return 2
    out: TextIO = sys.stderr if args.json == "-" else sys.stdout
    err: TextIO = sys.stderr

    import keras
    import regraft
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")
    started = time.perf_counter()
    say(err, f"command: {shlex.join([sys.executable, *sys.argv])}")
    say(err, f"python {platform.python_version()}, tensorflow {tf.__version__}, keras {keras.__version__}, "
             f"regraft {regraft.__version__} ({Path(regraft.__file__).parent}); {len(chosen)} pairs, "
             f"formats {','.join(args.format_list)}, seed {args.seed}")
    cases: list[Case] = []
    failed_pairs: dict[str, str] = {}
    for i, pair in enumerate(chosen, 1):
        say(err, f"[{i}/{len(chosen)}] {pair.name} ({pair.group}{', ' + pair.note if pair.note else ''})")
        try:
            cases += run_pair(pair, args.format_list, args.seed, args.workdir, err)
        except Exception as exc:  # noqa: BLE001 - a broken pair must not hide the others
            failed_pairs[pair.name] = error_text(exc)
            say(err, f"   PAIR FAILED: {error_text(exc)}")
    seconds = time.perf_counter() - started
    by_pair = {p.name: p for p in chosen}
    limit_cases = [c for c in cases if c.group == LIMITS]
    cases = [c for c in cases if c.group != LIMITS]
    main_pairs = [p for p in chosen if p.group != LIMITS]

    say(out)
    say(out, table(cases))
    say(out)
    say(out, "Confidence calibration (decisions of regraft.plan(..., reshape='fresh') judged by value, all cases "
             "but the known limits):")
    say(out, calibration_table(cases))
    lines = details(cases)
    if lines or failed_pairs:
        say(out)
        for name, text in failed_pairs.items():
            say(out, f"PAIR FAILED {name}: {text}")
        for line in lines:
            say(out, line)
    not_full = unchanged_failures(cases, by_pair)
    for line in not_full:
        say(out, f"UNCHANGED {line}")
    limits_wrong = sum(c.wrong for c in limit_cases)
    if limit_cases:
        say(out)
        say(out, "Known limits (not counted in the totals or the exit status): cases no loader can decide from the "
                 "file alone, or whose truth is debatable; bench/README.md explains each.")
        say(out, limits_table(limit_cases, by_pair))
        for line in details(limit_cases, limit=4):
            say(out, "  " + line)
    wrong = sum(c.wrong for c in cases)
    errors = sum(len(c.errors) for c in cases + limit_cases) + len(failed_pairs)
    failed = bool(wrong or errors or not_full)
    say(out)
    say(out, f"{'FAILED' if failed else 'OK'}: {wrong} wrong (values and decisions), {errors} errors, "
             f"{len(not_full)} unchanged-architecture failures, in {len(cases)} cases of {len(main_pairs)} pairs"
             + (f" (known limits apart: {limits_wrong} wrong in {len(limit_cases)} cases of "
                f"{len(chosen) - len(main_pairs)} pairs)" if limit_cases else "")
             + f"; {seconds:.0f} s")
    if args.json:
        payload = {
            "command": [sys.executable, *sys.argv],
            "versions": {"python": platform.python_version(), "tensorflow": tf.__version__,
                         "keras": keras.__version__, "regraft": regraft.__version__},
            "seed": args.seed,
            "formats": list(args.format_list),
            "seconds": seconds,
            "cases": [{**asdict(c), "wrong_total": c.wrong} for c in cases],
            "limits": [{**asdict(c), "wrong_total": c.wrong, "limit": by_pair[c.pair].limit} for c in limit_cases],
            "limits_wrong": limits_wrong,
            "calibration": merged_calibration(cases),
            "failed_pairs": failed_pairs,
            "wrong": wrong,
            "errors": errors,
            "unchanged_failures": not_full,
            "ok": not failed,
        }
        if args.json == "-":
            json.dump(payload, sys.stdout, indent=2)
            sys.stdout.write("\n")
        else:
            Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
