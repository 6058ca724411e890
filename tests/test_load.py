"""regraft.load / regraft.diff: exact round trips, changed architectures, strictness, all-or-nothing,
casts, freezing, reports and root selection.

Every checkpoint is written by TensorFlow, Keras 3 or tf-keras in a temporary
folder. After every load, each loaded variable is compared bit for bit with the
checkpoint tensor and every other variable with its value before the load.

The files TensorFlow writes come from the ``tf_writer`` functions below (see
``tests/backend_cases.py``): on the TF backend they run in-process, on another
backend their files come from the TF environment. Old models are rebuilt here with
the same seeded values, or their values are read from the ``values.npz`` the writer saved.
"""

from __future__ import annotations

import fnmatch
import json
import os

import numpy as np
import pytest

import keras
import regraft
from regraft.errors import CorruptCheckpointError, LoadError, RegraftError, TargetError

from backend_cases import tf_writer

from conftest import (
    ARCHITECTURES,
    X5,
    Chain,
    np_dtype,
    assert_all_differ,
    assert_state,
    build,
    dense_chain,
    functional,
    randomize,
    save_h5,
    save_tf,
    save_tf1,
    snapshot,
    value_of,
)

STRICT_HINT = (
    "Hint: Map renamed keys with rename=, allow expected gaps with allow_missing=/allow_unused=, "
    "confirm placements by order with accept_order=True, or pass strict=False to load what matches and report the rest."
)
RULE = "rule 1 (rename 'dense2/' -> 'dense3/')"
X16 = np.linspace(-1.0, 1.0, 32, dtype="float32").reshape(2, 16)


def statuses(report) -> dict[str, str]:
    return {row["target"]: row["status"] for row in report.rows()}


def saved_values(folder: str) -> dict[str, np.ndarray]:
    """The values a writer saved beside its files (``variable.path`` or index -> value)."""
    return dict(np.load(os.path.join(folder, "values.npz")))


def _save_values(folder: str, model, by="path") -> None:
    keys = [v.path if by == "path" else str(i) for i, v in enumerate(model.weights)]
    np.savez(os.path.join(folder, "values.npz"), **{k: np.asarray(v.numpy()) for k, v in zip(keys, model.weights)})


# Checkpoints ``tf.train.Checkpoint(**objects).write(<name>/ckpt)`` of seeded models; each test
# rebuilds the same objects for the values it expects (``TF_SAVED[name]()``).
TF_SAVED = {f"round_trip/{arch}": (lambda arch=arch: {"model": build(arch, seed=1)}) for arch in ARCHITECTURES}


def tf_saved(name):
    """Declare ``TF_SAVED[name]``: a zero-argument function returning the objects to save."""
    def declare(objects):
        TF_SAVED[name] = objects
        return objects

    return declare


@tf_writer
def tf_saved_files(folder):
    for name, objects in TF_SAVED.items():
        keras.backend.clear_session()
        save_tf(os.path.join(folder, name, "ckpt"), **objects())


@pytest.fixture(scope="module")
def tf_ckpt(tf_written):
    """``tf_ckpt(name)``: the prefix of ``TF_SAVED[name]``'s checkpoint."""
    return lambda name: os.path.join(tf_written(tf_saved_files), name, "ckpt")


# --------------------------------------------------------------------------- exact round trips


@pytest.mark.parametrize("fmt", ["tf", "h5"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_round_trip_is_bit_exact(tmp_path, tf_ckpt, arch, fmt):
    path = tf_ckpt(f"round_trip/{arch}") if fmt == "tf" else None
    source = TF_SAVED[f"round_trip/{arch}"]()["model"]
    target = build(arch, seed=2)
    assert_all_differ(source, target)
    if fmt == "h5":
        path = save_h5(source, tmp_path / "model.weights.h5")
    before = snapshot(target)
    calls = []
    report = regraft.load(target, path, progress=lambda done, total, key: calls.append((done, total, key)))
    n = len(target.weights)
    assert_state(target, before, {id(t): value_of(s) for s, t in zip(source.weights, target.weights)})
    assert report.applied and report.plan.source_format == ("tf-object" if fmt == "tf" else "keras-h5")
    assert report.counts()["loaded"] == n and report.counts()["missing"] == report.counts()["unused"] == 0
    assert [c[:2] for c in calls] == [(i, n) for i in range(1, n + 1)]
    assert [c[2] for c in calls] == [r["target"] for r in report.rows()]


@tf_writer
def tf_keras_trained_files(folder):
    """A tf-keras functional and Sequential d1 -> bn -> d2, trained one step, saved in TF format; their values."""
    import tf_keras

    for kind in ("functional", "sequential"):
        tf_keras.backend.clear_session()
        tf_keras.utils.set_random_seed(7)
        layers = [
            tf_keras.layers.Dense(4, name="d1"),
            tf_keras.layers.BatchNormalization(name="bn"),
            tf_keras.layers.Dense(2, name="d2"),
        ]
        if kind == "functional":
            inputs = tf_keras.Input((5,))
            x = inputs
            for layer in layers:
                x = layer(x)
            old = tf_keras.Model(inputs, x)
        else:
            old = tf_keras.Sequential([tf_keras.Input((5,)), *layers])
        rng = np.random.default_rng(7)
        old.set_weights([rng.standard_normal(w.shape).astype("float32") for w in old.get_weights()])
        old.compile(optimizer=tf_keras.optimizers.legacy.Adam(0.01), loss="mse")
        old.fit(X5, np.ones((2, 2), "float32"), epochs=1, batch_size=2, verbose=0)  # optimizer state in the file
        os.makedirs(os.path.join(folder, kind))
        old.save_weights(os.path.join(folder, kind, "tfk"))
        _save_values(os.path.join(folder, kind), old, by="index")


@pytest.mark.parametrize("kind", ["functional", "sequential"])
def test_tf_keras_checkpoint_into_keras3_model(tf_written, kind):
    """tf-keras ``save_weights`` (TF format, keys ``layer_with_weights-N/role``) into the same
    architecture built with Keras 3, through the keras2 namespace."""
    folder = os.path.join(tf_written(tf_keras_trained_files), kind)
    prefix = os.path.join(folder, "tfk")
    old = saved_values(folder)

    target = build(kind, seed=8)
    before = snapshot(target)
    report = regraft.load(target, prefix)
    assert report.plan.source_format == "tf-keras"
    sources = [r["source"] for r in report.rows()]
    assert sources == [
        f"layer_with_weights-{n}/{r}"
        for n, r in [(0, "kernel"), (0, "bias"), (1, "gamma"), (1, "beta"), (1, "moving_mean"), (1, "moving_variance"), (2, "kernel"), (2, "bias")]
    ]
    assert_state(target, before, {id(t): old[str(i)] for i, t in enumerate(target.weights)})
    assert report.counts()["unused"] == 0 and report.counts()["optimizer_and_bookkeeping"] > 0


def _encoder_decoder(k):
    """Sub-models ``encoder`` and ``decoder`` of equal shapes whose layers share names (proj, norm, out)."""
    def sub(name):
        inputs = k.Input((6,))
        x = k.layers.Dense(6, name="proj")(inputs)
        x = k.layers.LayerNormalization(name="norm")(x)
        return k.Model(inputs, k.layers.Dense(6, name="out")(x), name=name)

    inputs = k.Input((6,))
    return k.Model(inputs, sub("decoder")(sub("encoder")(inputs)), name="ae")


@tf_writer
def tf_keras_encoder_decoder_files(folder):
    """``_encoder_decoder(tf_keras)`` as Keras 2 .h5, tf-keras TF format and tf.train.Checkpoint; its values."""
    import tensorflow as tf
    import tf_keras

    tf_keras.backend.clear_session()
    old = _encoder_decoder(tf_keras)
    rng = np.random.default_rng(11)
    old.set_weights([rng.standard_normal(w.shape).astype("float32") for w in old.get_weights()])
    old.save_weights(os.path.join(folder, "ae.h5"))
    old.save_weights(os.path.join(folder, "ae"))
    tf.train.Checkpoint(model=old).write(os.path.join(folder, "ck", "ae"))
    _save_values(folder, old, by="index")


@pytest.mark.parametrize("fmt", ["h5", "tf-keras", "tf"])
def test_tf_keras_sub_models_with_the_same_layer_names_load_each_its_own(tf_written, fmt):
    """Keras 2 ``.h5`` names weights ``proj/kernel:0`` in both the encoder's and the decoder's group."""
    folder = tf_written(tf_keras_encoder_decoder_files)
    old = saved_values(folder)
    path = os.path.join(folder, {"h5": "ae.h5", "tf-keras": "ae", "tf": "ck/ae"}[fmt])
    target = _encoder_decoder(keras)
    before = snapshot(target)
    regraft.load(target, path)  # strict: every variable has its own tensor
    assert_state(target, before, {id(t): old[str(i)] for i, t in enumerate(target.weights)})
    if fmt == "h5":
        with regraft.open(path) as source:
            assert {"encoder/proj/kernel", "decoder/proj/kernel"} <= {e.key for e in source.entries()}


def _tf1_arrays(target) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(9)
    return {v.path: rng.standard_normal(tuple(v.shape)).astype("float32") for v in target.weights}


@tf_writer
def tf1_names_files(folder):
    save_tf1(_tf1_arrays(functional(("d1", "bn", "d2"))), os.path.join(folder, "v1", "model.ckpt"))


def test_tf1_names_into_keras3_variable_paths(tf_written):
    """A TF1 ``Saver`` checkpoint whose variable names equal the Keras 3 variable paths."""
    path = os.path.join(tf_written(tf1_names_files), "v1", "model.ckpt")
    target = functional(("d1", "bn", "d2"))
    names = [v.path for v in target.weights]
    assert names[:2] == ["d1/kernel", "d1/bias"]
    arrays = _tf1_arrays(target)
    before = snapshot(target)
    report = regraft.load(target, path)
    assert report.plan.source_format == "tf1-names"
    assert [r["source"] for r in report.rows()] == names
    assert_state(target, before, {id(v): arrays[v.path] for v in target.weights})


# --------------------------------------------------------------------------- the tutorial situations


@tf_saved("tutorial")
def tutorial_objects():
    keras.utils.set_random_seed(10)
    old = dense_chain((64, 10), inputs=X16)
    randomize(old, 10)
    return {"model": old}


@pytest.fixture(scope="module")
def tutorial(tf_ckpt):
    """(a) ``dense1 Dense(64, relu) -> dense2 Dense(10)``, saved by tf.train.Checkpoint."""
    path = tf_ckpt("tutorial")
    return tutorial_objects()["model"], path


def grown_model():
    """The tutorial's changed model: ``dense1 -> dense2 Dense(128, relu) -> dense3 Dense(10)``."""
    keras.utils.set_random_seed(11)
    model = dense_chain((64, 128, 10), inputs=X16)
    randomize(model, 11)
    return model


def test_tutorial_strict_refuses_and_lists_every_problem(tutorial):
    _, path = tutorial
    model = grown_model()
    before = snapshot(model)
    with pytest.raises(LoadError) as info:
        regraft.load(model, path)
    problems = [
        "shape mismatch: tensor 'model/dense2/_kernel' has shape (64, 10); variable 'dense2/kernel' needs (64, 128)",
        "shape mismatch: tensor 'model/dense2/bias' has shape (10,); variable 'dense2/bias' needs (128,)",
        "missing from the checkpoint (2): dense3/{bias,kernel}",
    ]
    assert info.value.problems == problems
    assert str(info.value) == (
        f"Refusing to load {path} into model 'tutorial': 3 problems; the model was not changed.\n  "
        + "\n  ".join(problems)
        + "\n"
        + STRICT_HINT
    )
    assert_state(model, before)


def test_tutorial_non_strict_loads_what_matches(tutorial):
    old, path = tutorial
    model = grown_model()
    before = snapshot(model)

    preview = regraft.diff(model, path)
    assert not preview.applied
    assert_state(model, before)  # diff never writes

    report = regraft.load(model, path, strict=False)
    expected = {
        "dense1/kernel": "loaded",
        "dense1/bias": "loaded",
        "dense2/kernel": "shape-mismatch",
        "dense2/bias": "shape-mismatch",
        "dense3/kernel": "missing",
        "dense3/bias": "missing",
    }
    assert statuses(report) == statuses(preview) == expected
    assert_state(model, before, {id(model.dense1.kernel): value_of(old.dense1.kernel), id(model.dense1.bias): value_of(old.dense1.bias)})
    assert report.summary() == (
        "2 loaded, 2 shape-mismatch, 2 missing, 0 unused — "
        f"{(16 * 64 + 64) / (16 * 64 + 64 + 64 * 128 + 128 + 128 * 10 + 10):.1%} of parameters from the checkpoint"
    )
    assert preview.summary().startswith("2 would load, 2 shape-mismatch, 2 missing, 0 unused")


def test_tutorial_rename_old_to_new_cannot_copy_the_kernel(tutorial):
    """``rename={"dense2/": "dense3/"}`` (old -> new, like assignment_map) makes the old dense2 the
    candidate for dense3: its kernel (64, 10) cannot fill (128, 10), only its bias (10,) fits."""
    old, path = tutorial
    model = grown_model()
    before = snapshot(model)
    with pytest.raises(LoadError) as info:
        regraft.load(model, path, rename={"dense2/": "dense3/"})
    assert info.value.problems == [
        "shape mismatch: tensor 'model/dense2/_kernel' has shape (64, 10); variable 'dense3/kernel' needs (128, 10)",
        "missing from the checkpoint (2): dense2/{bias,kernel}",
    ]
    assert "2 problems; the model was not changed." in str(info.value)
    assert_state(model, before)

    report = regraft.load(model, path, rename={"dense2/": "dense3/"}, strict=False)
    rows = {r["target"]: r for r in report.rows()}
    assert {k: (r["status"], r["source"], r["stage"]) for k, r in rows.items()} == {
        "dense1/kernel": ("loaded", "model/dense1/_kernel", "exact"),
        "dense1/bias": ("loaded", "model/dense1/bias", "exact"),
        "dense2/kernel": ("missing", None, None),
        "dense2/bias": ("missing", None, None),
        "dense3/kernel": ("shape-mismatch", "model/dense2/_kernel", "rule"),
        "dense3/bias": ("loaded", "model/dense2/bias", "rule"),
    }
    assert rows["dense3/bias"]["reason"] == RULE
    assert report.to_dict()["rules"] == [{"rule": RULE, "used": 2}]
    assert_state(
        model,
        before,
        {
            id(model.dense1.kernel): value_of(old.dense1.kernel),
            id(model.dense1.bias): value_of(old.dense1.bias),
            id(model.dense3.bias): value_of(old.dense2.bias),
        },
    )


def conv_chain(filters2):
    keras.utils.set_random_seed(filters2)
    model = Chain(
        [("conv1", keras.layers.Conv2D(8, 3, name="conv1")), ("conv2", keras.layers.Conv2D(filters2, 3, name="conv2"))],
        name="convnet",
    )
    model(np.zeros((1, 8, 8, 3), "float32"))
    randomize(model, filters2)
    return model


TF_SAVED["conv"] = lambda: {"model": conv_chain(32)}


def test_tutorial_conv_filters_changed(tf_ckpt):
    """(b) Conv2D(32, 3) -> Conv2D(64, 3): a mismatch, reported; fresh values kept."""
    path = tf_ckpt("conv")
    old = conv_chain(32)
    model = conv_chain(64)
    before = snapshot(model)
    with pytest.raises(LoadError) as info:
        regraft.load(model, path)
    assert info.value.problems == [
        "shape mismatch: tensor 'model/conv2/_kernel' has shape (3, 3, 8, 32); variable 'conv2/kernel' needs (3, 3, 8, 64)",
        "shape mismatch: tensor 'model/conv2/bias' has shape (32,); variable 'conv2/bias' needs (64,)",
    ]
    assert_state(model, before)
    report = regraft.load(model, path, strict=False)
    assert statuses(report) == {
        "conv1/kernel": "loaded",
        "conv1/bias": "loaded",
        "conv2/kernel": "shape-mismatch",
        "conv2/bias": "shape-mismatch",
    }
    assert_state(model, before, {id(model.conv1.kernel): value_of(old.conv1.kernel), id(model.conv1.bias): value_of(old.conv1.bias)})


def named_functional(first_name, seed):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((5,))
    x = keras.layers.Dense(4, name=first_name)(inputs)
    model = keras.Model(inputs, keras.layers.Dense(2, name="out")(x), name="renamed")
    randomize(model, seed)
    return model


TF_SAVED["renamed"] = lambda: {"model": named_functional("dense_layer_1", 12)}
TF_SAVED["renamed_14"] = lambda: {"model": named_functional("dense_layer_1", 14)}


@pytest.mark.parametrize("fmt", ["tf", "h5"])
def test_tutorial_layer_renamed_is_not_loaded_on_a_guess(tmp_path, tf_ckpt, fmt):
    """(c) ``name="dense_layer_1"`` -> ``name="my_dense_layer"``: two different chosen names are two layers.

    Same structure in the same place may be the old layer renamed or a new layer that replaced it
    (a new head); regraft does not guess: strict refuses, non-strict leaves it fresh and loads the rest.
    """
    path = tf_ckpt("renamed") if fmt == "tf" else None
    old = named_functional("dense_layer_1", 12)
    path = path or save_h5(old, tmp_path / "c.weights.h5")
    model = named_functional("my_dense_layer", 13)
    before = snapshot(model)
    with pytest.raises(regraft.LoadError, match=r"missing from the checkpoint \(2\): my_dense_layer/\{bias,kernel\}"):
        regraft.load(model, path)
    assert_state(model, before, {})
    report = regraft.load(model, path, strict=False)
    assert statuses(report) == {
        "my_dense_layer/kernel": "missing",
        "my_dense_layer/bias": "missing",
        "out/kernel": "loaded",
        "out/bias": "loaded",
    }
    assert_state(model, before, {id(t): value_of(s) for s, t in zip(old.weights[2:], model.weights[2:])})
    if fmt == "h5":
        with regraft.open(path) as src:  # the file still names the layer by its old name
            assert {e.key: e for e in src.entries()}["layers/dense/vars/0"].layer_name == "dense_layer_1"


# --------------------------------------------------------------------------- strict text, allow patterns


def blocks_model(n_blocks, extra, seed):
    """``stem -> block0..block{n-1} -> extra0..extra{m-1} -> head``: Dense(8) stem and extras,
    BatchNormalization blocks (nothing like an extra, so the alignment cannot pair them), Dense(2) head."""
    keras.utils.set_random_seed(seed)
    spec = [("stem", keras.layers.Dense(8, name="stem"))]
    spec += [(f"block{i}", keras.layers.BatchNormalization(name=f"block{i}")) for i in range(n_blocks)]
    spec += [(f"extra{i}", keras.layers.Dense(8, name=f"extra{i}")) for i in range(extra)]
    spec += [("head", keras.layers.Dense(2, name="head"))]
    model = Chain(spec, name="net")
    model(X5)
    randomize(model, seed)
    return model


TF_SAVED["blocks"] = lambda: {"model": blocks_model(0, 3, seed=20)}


@pytest.fixture(scope="module")
def blocks_ckpt(tf_ckpt):
    """A checkpoint with 3 ``extra`` layers that the model below does not have, and no blocks."""
    path = tf_ckpt("blocks")
    return TF_SAVED["blocks"]()["model"], path


def test_strict_error_collapses_repeated_keys(blocks_ckpt):
    _, path = blocks_ckpt
    model = blocks_model(4, 0, seed=21)
    before = snapshot(model)
    with pytest.raises(LoadError) as info:
        regraft.load(model, path)
    assert str(info.value) == (
        f"Refusing to load {path} into model 'net': 2 problems; the model was not changed.\n"
        "  missing from the checkpoint (16): block{0..3}/{beta,gamma,moving_mean,moving_variance}\n"
        "  unused checkpoint tensors (6): model/extra{0..2}/{_kernel,bias}\n" + STRICT_HINT
    )
    assert_state(model, before)


@pytest.mark.parametrize(
    "allow_missing, allow_unused, problems",
    [
        (["block[0-2]/*"], [], [
            "missing from the checkpoint (4): block3/{beta,gamma,moving_mean,moving_variance}",
            "unused checkpoint tensors (6): model/extra{0..2}/{_kernel,bias}",
        ]),
        ([], ["extra0/*"], [
            "missing from the checkpoint (16): block{0..3}/{beta,gamma,moving_mean,moving_variance}",
            "unused checkpoint tensors (4): model/extra{1..2}/{_kernel,bias}",
        ]),
        (["block*"], ["model/extra*"], []),
    ],
)
def test_allow_patterns_silence_exactly_what_they_match(blocks_ckpt, allow_missing, allow_unused, problems):
    old, path = blocks_ckpt
    model = blocks_model(4, 0, seed=22)
    before = snapshot(model)
    if problems:
        with pytest.raises(LoadError) as info:
            regraft.load(model, path, allow_missing=allow_missing, allow_unused=allow_unused)
        assert info.value.problems == problems
        assert_state(model, before)
        report = regraft.load(model, path, allow_missing=allow_missing, allow_unused=allow_unused, strict=False)
    else:
        report = regraft.load(model, path, allow_missing=allow_missing, allow_unused=allow_unused)
    loaded = {id(getattr(model, n).kernel): value_of(getattr(old, n).kernel) for n in ("stem", "head")}
    loaded |= {id(getattr(model, n).bias): value_of(getattr(old, n).bias) for n in ("stem", "head")}
    assert_state(model, before, loaded)

    def covered(key, patterns):
        return next((p for p in patterns if fnmatch.fnmatchcase(key, p)), None)

    for row in report.rows():
        if row["status"] == "missing":
            assert row.get("allowed_by") == covered(row["target"], allow_missing), row
        else:
            assert "allowed_by" not in row and row["status"] == "loaded", row
    unused = report.to_dict()["unused"]
    assert len(unused) == 6
    for item in unused:
        short = item["source"][len("model/") :]
        assert item["allowed_by"] == (covered(short, allow_unused) or covered(item["source"], allow_unused)), item
    table = report.table()
    assert table.count("missing (allowed)") == sum(1 for r in report.rows() if r.get("allowed_by"))
    assert table.count("unused (allowed)") == sum(1 for u in unused if u["allowed_by"])


# --------------------------------------------------------------------------- rename from YAML


@pytest.mark.parametrize(
    "text",
    ['rename:\n  "dense2/": "dense3/"\n', '"dense2/": "dense3/"\n'],
    ids=["under-rename", "bare-mapping"],
)
def test_rename_from_yaml_file(tutorial, tmp_path, text):
    old, path = tutorial
    rules = tmp_path / "rename.yaml"
    rules.write_text(text)
    model = grown_model()
    before = snapshot(model)
    report = regraft.load(model, path, rename=rules, strict=False)
    assert statuses(report)["dense3/bias"] == "loaded" and statuses(report)["dense3/kernel"] == "shape-mismatch"
    assert report.to_dict()["rules"] == [{"rule": RULE, "used": 2}]
    assert_state(
        model,
        before,
        {
            id(model.dense1.kernel): value_of(old.dense1.kernel),
            id(model.dense1.bias): value_of(old.dense1.bias),
            id(model.dense3.bias): value_of(old.dense2.bias),
        },
    )


def _bad_rename(tmp_path, text):
    rules = tmp_path / "rename.yaml"
    if text is not None:
        rules.write_text(text)
    return str(rules)


@pytest.mark.parametrize(
    "text, fragments",
    [
        (
            'rename: {"dense2/": [unclosed\n',
            ["The rename file {file} is not valid YAML: ", "line 2, column 1", "\nHint: Fix the YAML syntax."],
        ),
        (None, ["The rename file {file} does not exist.\nHint: Check the path."]),
        (
            "- dense2/\n- dense3/\n",
            ["must map old checkpoint keys to new model keys. Received: ['dense2/', 'dense3/'].", "\nHint: Write "],
        ),
        (
            '"dense2/": "dense3"\n',
            [
                "rule 1 (rename 'dense2/' -> 'dense3') in the rename file {file}: a scope prefix must end in '/' on both sides.",
                "\nHint: Write 'dense2/' -> 'dense3/' for a prefix, or neither for one key.",
            ],
        ),
    ],
    ids=["bad-yaml", "no-file", "not-a-mapping", "half-prefix"],
)
def test_bad_rename_file(tutorial, tmp_path, text, fragments):
    _, path = tutorial
    rules = _bad_rename(tmp_path, text)
    model = grown_model()
    before = snapshot(model)
    with pytest.raises(RegraftError) as info:
        regraft.load(model, path, rename=rules, strict=False)
    message = str(info.value)
    for fragment in fragments:
        assert fragment.format(file=rules) in message, message
    assert_state(model, before)


@pytest.mark.parametrize("text", ["- dense2/\n- dense3/\n", '"dense2/": "dense3"\n'], ids=["not-a-mapping", "half-prefix"])
def test_bad_rename_file_content_names_the_file(tutorial, tmp_path, text):
    _, path = tutorial
    rules = _bad_rename(tmp_path, text)
    model = grown_model()
    before = snapshot(model)
    with pytest.raises(RegraftError) as info:
        regraft.load(model, path, rename=rules, strict=False)
    assert_state(model, before)
    assert rules in str(info.value)


def test_rename_rule_that_matches_nothing_is_a_strict_problem(tutorial):
    old, path = tutorial
    model = dense_chain((64, 10), inputs=X16)
    before = snapshot(model)
    with pytest.raises(LoadError) as info:
        regraft.load(model, path, rename={"decoder/": "dense2/"})
    assert info.value.problems == ["unused rule: rule 1 (rename 'decoder/' -> 'dense2/') matched nothing"]
    assert_state(model, before)
    with pytest.warns(UserWarning, match=r"regraft: rule 1 \(rename 'decoder/' -> 'dense2/'\) matched nothing"):
        report = regraft.load(model, path, rename={"decoder/": "dense2/"}, strict=False)
    assert report.to_dict()["rules"] == [{"rule": "rule 1 (rename 'decoder/' -> 'dense2/')", "used": 0}]
    assert_state(model, before, {id(t): value_of(s) for s, t in zip(old.weights, model.weights)})


# --------------------------------------------------------------------------- all-or-nothing


TF_SAVED["functional_30"] = lambda: {"model": build("functional", seed=30)}


@pytest.fixture
def saved_functional(tf_written, tmp_path):
    """A functional d1 -> bn -> d2 model saved with tf.train.Checkpoint, copied into ``tmp_path`` (the tests
    damage it); returns (model, prefix, data file)."""
    prefix = os.path.join(tf_written(tf_saved_files, copy_to=tmp_path), "functional_30", "ckpt")
    old = build("functional", seed=30)
    data = prefix + ".data-00000-of-00001"
    assert os.path.isfile(data)
    return old, prefix, data


def offset_of(data_file, array) -> int:
    """Where ``array``'s bytes sit in a data file (found by content, not by regraft)."""
    blob = open(data_file, "rb").read()
    needle = np.ascontiguousarray(array).tobytes()
    offset = blob.find(needle)
    assert offset >= 0 and blob.find(needle, offset + 1) < 0
    return offset


def test_corrupt_tensor_midway_restores_every_variable(saved_functional):
    old, prefix, data = saved_functional
    kernel = value_of(old.get_layer("d2").kernel)  # loaded 7th of 8: six assignments happen first
    offset = offset_of(data, kernel) + kernel.nbytes // 2
    with open(data, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x10]))
    model = build("functional", seed=31)
    before = snapshot(model)
    done = []
    with pytest.raises(CorruptCheckpointError) as info:
        regraft.load(model, prefix, strict=False, progress=lambda d, t, k: done.append(k))
    assert done == ["d1/kernel", "d1/bias", "bn/gamma", "bn/beta", "bn/moving_mean", "bn/moving_variance"]
    message = str(info.value)
    assert message.startswith(f"{data}: tensor 'model/_operations/3/_kernel/.ATTRIBUTES/VARIABLE_VALUE' has checksum ")
    assert "its data is corrupted" in message and "Hint: " in message
    assert_state(model, before)


@tf_writer
def tf1_functional_files(folder):
    save_tf1({v.path: value_of(v) for v in build("functional", seed=32).weights}, os.path.join(folder, "model.ckpt"))


def test_truncated_data_file_restores_every_variable(tf_written, tmp_path):
    """A TF1 checkpoint (no object graph at the end of the data file) cut inside 'd2/kernel', which
    is stored last but loaded seventh: six variables are assigned before the reader hits the end."""
    prefix = os.path.join(tf_written(tf1_functional_files, copy_to=tmp_path), "model.ckpt")
    old = build("functional", seed=32)
    arrays = {v.path: value_of(v) for v in old.weights}
    data = prefix + ".data-00000-of-00001"
    kernel = arrays["d2/kernel"]
    offset = offset_of(data, kernel)
    assert offset + kernel.nbytes == os.path.getsize(data)  # keys are stored sorted: d2/kernel is last
    with open(data, "r+b") as f:
        f.truncate(offset + 4)
    model = build("functional", seed=33)
    before = snapshot(model)
    done = []
    with pytest.raises(CorruptCheckpointError) as info:
        regraft.load(model, prefix, strict=False, progress=lambda d, t, k: done.append(k))
    assert done == ["d1/kernel", "d1/bias", "bn/gamma", "bn/beta", "bn/moving_mean", "bn/moving_variance"]
    assert str(info.value).startswith(
        f"{data}: tensor 'd2/kernel' needs {kernel.nbytes} bytes "
        f"at offset {offset}, found only 4; the data file is truncated\nHint: "
    )
    assert_state(model, before)


def test_interrupt_midway_restores_every_variable(saved_functional):
    """An exception raised while loading (here Ctrl-C from the progress callback) rolls back too."""
    _, prefix, _ = saved_functional
    model = build("functional", seed=35)
    before = snapshot(model)
    done = []

    def progress(d, total, key):
        done.append(key)
        if d == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        regraft.load(model, prefix, progress=progress)
    assert len(done) == 5
    assert_state(model, before)


def test_truncated_object_graph_fails_before_any_assignment(saved_functional):
    """In a TF2 checkpoint the object graph is written last: cutting the file fails at open."""
    old, prefix, data = saved_functional
    kernel = value_of(old.get_layer("d2").kernel)
    with open(data, "r+b") as f:
        f.truncate(offset_of(data, kernel) + kernel.nbytes + 1)
    model = build("functional", seed=34)
    before = snapshot(model)
    with pytest.raises(CorruptCheckpointError) as info:
        regraft.load(model, prefix, strict=False, progress=lambda d, t, k: pytest.fail("nothing may be assigned"))
    assert f"{data}: tensor '_CHECKPOINTABLE_OBJECT_GRAPH' needs " in str(info.value)
    assert "the data file is truncated" in str(info.value)
    assert_state(model, before)


def _functional_with_a_big_value():
    old = build("functional", seed=33)
    kernel = value_of(old.get_layer("d2").kernel)
    kernel[1, 1] = 1e6  # finite in float32, inf in float16
    old.get_layer("d2").kernel.assign(kernel)
    return {"model": old}


TF_SAVED["big"] = _functional_with_a_big_value


def test_refused_cast_midway_restores_every_variable(tf_ckpt):
    path = tf_ckpt("big")
    keras.utils.set_random_seed(34)
    model = functional(dtype="float16")
    randomize(model, 34)
    before = snapshot(model)
    done = []
    with pytest.raises(LoadError) as info:
        regraft.load(model, path, strict=False, progress=lambda d, t, k: done.append(k))
    assert len(done) == 6  # six variables were cast and assigned before the refusal
    assert str(info.value) == (
        "Tensor 'model/_operations/3/_kernel' (float32) cannot be cast to float16 for variable 'd2/kernel': "
        "the value 1e+06 does not fit float16.\n"
        "Hint: Build that variable as float32, or rescale the checkpoint before loading."
    )
    assert_state(model, before)


# --------------------------------------------------------------------------- casts


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
def test_cast_into_other_float_dtypes(tmp_path, dtype):
    if dtype == "float64" and keras.backend.backend() == "jax":
        pytest.skip("JAX makes float64 variables float32 unless jax_enable_x64 is set for the whole process")
    old = build("functional", seed=40)
    path = save_h5(old, tmp_path / "f32.weights.h5")
    keras.utils.set_random_seed(41)
    model = functional(dtype=dtype)
    randomize(model, 41)
    before = snapshot(model)
    report = regraft.load(model, path)
    want = np_dtype(dtype)
    expected = {id(t): value_of(s).astype(want) for s, t in zip(old.weights, model.weights)}
    assert_state(model, before, expected)
    rows = report.rows()
    assert {r["status"] for r in rows} == {"cast"} and {r["target_dtype"] for r in rows} == {want.name}
    for row, s in zip(rows, old.weights):
        src = value_of(s).astype(np.float64)
        true_error = float(np.max(np.abs(value_of(s).astype(want).astype(np.float64) - src)))
        assert row["max_cast_error"] == true_error, row["target"]
        assert row["source_dtype"] == "float32"
    if dtype == "float64":
        assert all(r["max_cast_error"] == 0.0 for r in rows)
    else:
        assert max(r["max_cast_error"] for r in rows) > 0
    assert report.counts()["cast"] == 8 and report.summary().startswith("0 loaded, 8 cast, ")


@tf_saved("bf16")
def bfloat16_objects():
    keras.utils.set_random_seed(45)
    old = functional(dtype="bfloat16")
    randomize(old, 45)
    return {"model": old}


@pytest.mark.parametrize("target_dtype, status", [("bfloat16", "loaded"), ("float32", "cast")])
@pytest.mark.parametrize("fmt", ["tf", "h5"])
def test_bfloat16_checkpoint(tmp_path, tf_ckpt, fmt, target_dtype, status):
    """bfloat16 weights (stored by Keras' .weights.h5 as opaque 2-byte values) load exactly."""
    path = tf_ckpt("bf16") if fmt == "tf" else None
    old = bfloat16_objects()["model"]
    path = path or save_h5(old, tmp_path / "bf16.weights.h5")
    with regraft.open(path) as src:
        for e in src.entries():
            assert e.dtype == "bfloat16" and src.read(e.key).dtype == np_dtype("bfloat16"), e.key
    keras.utils.set_random_seed(46)
    model = functional(dtype=target_dtype)
    randomize(model, 46)
    before = snapshot(model)
    report = regraft.load(model, path)
    assert {r["status"] for r in report.rows()} == {status}
    want = np_dtype(target_dtype)
    assert_state(model, before, {id(t): value_of(s).astype(want) for s, t in zip(old.weights, model.weights)})
    if status == "cast":  # bfloat16 -> float32 is exact
        assert all(r["max_cast_error"] == 0.0 for r in report.rows())


# --------------------------------------------------------------------------- freeze


@tf_saved("freeze")
def freeze_objects():
    keras.utils.set_random_seed(50)
    old = Chain([(n, keras.layers.Dense(u, name=n)) for n, u in (("a", 4), ("b", 3), ("c", 6))], name="freeze")
    old(X5)
    randomize(old, 50)
    return {"model": old}


def test_freeze_only_layers_loaded_unchanged(tf_ckpt):
    path = tf_ckpt("freeze")
    old = freeze_objects()["model"]
    keras.utils.set_random_seed(51)
    model = Chain(
        [
            ("a", keras.layers.Dense(4, name="a")),  # loaded unchanged -> frozen
            ("b", keras.layers.Dense(3, name="b", dtype="float16")),  # cast -> trainable
            ("c", keras.layers.Dense(2, name="c")),  # shape mismatch -> trainable
            ("d", keras.layers.Dense(2, name="d")),  # missing -> trainable
        ],
        name="freeze",
    )
    model(X5)
    randomize(model, 51)
    before = snapshot(model)
    report = regraft.load(model, path, strict=False, freeze=True)
    assert statuses(report) == {
        "a/kernel": "loaded", "a/bias": "loaded",
        "b/kernel": "cast", "b/bias": "cast",
        "c/kernel": "shape-mismatch", "c/bias": "shape-mismatch",
        "d/kernel": "missing", "d/bias": "missing",
    }  # fmt: skip
    assert report.frozen == (report.plan.assignments[0].target.layer,)
    assert [model.a.trainable, model.b.trainable, model.c.trainable, model.d.trainable] == [False, True, True, True]
    assert [id(v) for v in model.trainable_weights] == [id(v) for v in model.b.weights + model.c.weights + model.d.weights]
    assert report.summary().endswith("; 1 layers frozen")
    assert_state(
        model,
        before,
        {
            id(model.a.kernel): value_of(old.a.kernel),
            id(model.a.bias): value_of(old.a.bias),
            id(model.b.kernel): value_of(old.b.kernel).astype("float16"),
            id(model.b.bias): value_of(old.b.bias).astype("float16"),
        },
    )


def test_no_freeze_by_default(tutorial):
    _, path = tutorial
    model = grown_model()
    report = regraft.load(model, path, strict=False)
    assert report.frozen == () and all(layer.trainable for layer in (model.dense1, model.dense2, model.dense3))


# --------------------------------------------------------------------------- report


@tf_writer
def trained_with_adam_files(folder):
    """A model trained one Adam step, saved with its optimizer by ``tf.train.Checkpoint.save``; its values."""
    import tensorflow as tf

    keras.utils.set_random_seed(60)
    old = Chain(
        [
            ("dense1", keras.layers.Dense(4, name="dense1")),
            ("aux", keras.layers.BatchNormalization(name="aux")),  # the new model has nothing like it: unused
            ("dense2", keras.layers.Dense(3, name="dense2")),
        ],
        name="rep",
    )
    opt = keras.optimizers.Adam(0.01)
    old.compile(optimizer=opt, loss="mse")
    old.fit(X5, np.ones((2, 3), "float32"), epochs=1, batch_size=2, verbose=0)
    tf.train.Checkpoint(model=old, optimizer=opt).save(os.path.join(folder, "ckpt"))
    _save_values(folder, old)


def test_report_is_complete_and_serialisable(tf_written):
    folder = tf_written(trained_with_adam_files)
    path = os.path.join(folder, "ckpt-1")
    old = saved_values(folder)
    model = dense_chain((4, 5, 3), name="rep")
    before = snapshot(model)
    report = regraft.load(model, path, strict=False)

    data = json.loads(json.dumps(report.to_dict()))
    assert data["applied"] is True and data["format"] == "tf-object" and data["root"] == "model"
    assert len(data["variables"]) == len(model.weights) == len(report.rows())
    counts = report.counts()
    assert sum(counts[s] for s in ("loaded", "cast", "shape-mismatch", "missing", "ambiguous")) == len(model.weights)
    assert counts == {
        "loaded": 2, "cast": 0, "transformed": 0, "shape-mismatch": 2, "missing": 2, "ambiguous": 0, "unconfirmed": 0,
        "unused": 4, "outside_root": 0, "optimizer_and_bookkeeping": 3 + 2 * 6,
    }  # fmt: skip
    assert data["counts"] == counts
    sizes = {v.path: int(np.prod(v.shape)) for v in model.weights}
    loaded = sizes[model.dense1.kernel.path] + sizes[model.dense1.bias.path]
    assert report.parameter_share() == loaded / sum(sizes.values()) == data["parameter_share"]
    # Optimizer slots and bookkeeping are listed apart, never as unused checkpoint tensors.
    assert sorted(u["source"] for u in data["unused"]) == [f"model/aux/{r}" for r in ("beta", "gamma", "moving_mean", "moving_variance")]
    assert all(not u["source"].startswith("optimizer/") for u in data["unused"])
    kinds = sorted(o["kind"] for o in data["optimizer_and_bookkeeping"])
    assert kinds == ["bookkeeping"] * 3 + ["optimizer_slot"] * 12
    slot_owners = {o["slot_of"] for o in data["optimizer_and_bookkeeping"] if o["kind"] == "optimizer_slot"}
    assert slot_owners == {f"model/{n}/{r}" for n in ("dense1", "dense2") for r in ("_kernel", "bias")} | {"model/aux/gamma", "model/aux/beta"}
    text = str(report)
    assert text.splitlines()[0] == f"{path} [tf-object] (object 'model')"
    assert text.splitlines()[-1] == report.summary()
    assert report.summary().endswith("; 15 optimizer/bookkeeping tensors not loaded")
    assert_state(model, before, {id(v): old[v.path] for v in (model.dense1.kernel, model.dense1.bias)})


def test_weights_h5_with_optimizer_state_loads_weights_only(tmp_path):
    """A compiled, trained model's .weights.h5 also holds the optimizer: listed apart, never unused."""
    old = build("functional", seed=65)
    old.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    old.fit(X5, np.ones((2, 2), "float32"), epochs=1, batch_size=2, verbose=0)
    path = save_h5(old, tmp_path / "trained.weights.h5")
    model = build("functional", seed=66)
    before = snapshot(model)
    report = regraft.load(model, path)
    assert report.counts() == {
        "loaded": 8, "cast": 0, "transformed": 0, "shape-mismatch": 0, "missing": 0, "ambiguous": 0, "unconfirmed": 0,
        "unused": 0, "outside_root": 0, "optimizer_and_bookkeeping": 2 + 2 * 6,
    }  # fmt: skip
    assert {o["source"] for o in report.to_dict()["optimizer_and_bookkeeping"]} == {f"optimizer/vars/{i}" for i in range(14)}
    assert_state(model, before, {id(t): value_of(s) for s, t in zip(old.weights, model.weights)})


# --------------------------------------------------------------------------- root selection


TF_SAVED["roots"] = lambda: {"model": build("functional", seed=70), "ema": build("functional", seed=71)}


@pytest.fixture(scope="module")
def two_objects(tf_ckpt):
    """``tf.train.Checkpoint(model=m, ema=m_copy)``: the same architecture, different values."""
    path = tf_ckpt("roots")
    objects = TF_SAVED["roots"]()
    return objects["model"], objects["ema"], path


@pytest.mark.parametrize("root, pick", [(None, "model"), ("model", "model"), ("ema", "ema"), ("/ema/", "ema")])
def test_root_selection(two_objects, root, pick):
    m, ema, path = two_objects
    model = build("functional", seed=72)
    before = snapshot(model)
    report = regraft.load(model, path, root=root)
    chosen, other = (m, "ema") if pick == "model" else (ema, "model")
    assert report.plan.root == pick
    assert report.counts()["outside_root"] == 8 and report.counts()["unused"] == 0
    assert all(k.startswith(other + "/") for k in report.to_dict()["outside_root"])
    assert all(r["source"].startswith(pick + "/") for r in report.rows())
    assert_state(model, before, {id(t): value_of(s) for s, t in zip(chosen.weights, model.weights)})


@tf_saved("teacher_student")
def teacher_student_objects():
    keras.utils.set_random_seed(73)
    teacher = Chain([("encoder", keras.layers.Dense(6, name="encoder")), ("decoder", keras.layers.Dense(3, name="decoder"))])
    teacher(X5)
    student = dense_chain((4, 3), name="student")
    randomize(student, 73)
    return {"teacher": teacher, "student": student}


def test_root_auto_picks_the_object_that_matches(tf_ckpt):
    path = tf_ckpt("teacher_student")
    student = teacher_student_objects()["student"]
    model = dense_chain((4, 3), name="student")
    randomize(model, 74)
    before = snapshot(model)
    report = regraft.load(model, path)
    assert report.plan.root == "student" and str(report).splitlines()[0].endswith("(object 'student')")
    assert_state(model, before, {id(t): value_of(s) for s, t in zip(student.weights, model.weights)})


def test_unknown_root_lists_the_objects(two_objects):
    _, _, path = two_objects
    model = build("functional", seed=75)
    before = snapshot(model)
    with pytest.raises(RegraftError) as info:
        regraft.load(model, path, root="nope")
    assert str(info.value) == (
        f"Root 'nope' is not an object of {path}. Objects holding weights: 'ema', 'model'.\n"
        "Hint: Pass one of those names as root=, or leave it out to choose automatically."
    )
    assert_state(model, before)


# --------------------------------------------------------------------------- target errors


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda: keras.Sequential([keras.layers.Dense(2)], name="lazy_seq"), "lazy_seq"),
        (lambda: Chain([("dense1", keras.layers.Dense(2))], name="lazy_sub"), "lazy_sub"),
    ],
    ids=["sequential", "subclassed"],
)
def test_unbuilt_model(tutorial, make, name):
    _, path = tutorial
    with pytest.raises(TargetError) as info:
        regraft.load(make(), path)
    assert str(info.value) == (
        f"Model '{name}' is not built, so it has no variables to load into yet.\n"
        "Hint: Build it first: call it once on an example batch (model(x)) or call model.build(input_shape)."
    )


def test_not_a_model(tutorial):
    _, path = tutorial
    with pytest.raises(TargetError) as info:
        regraft.load({"dense1": 1}, path)
    assert str(info.value).startswith("Expected a Keras model. Received: an object of type dict.")


@pytest.mark.parametrize("fmt", ["tf", "h5"])
def test_rename_rule_by_recorded_layer_name_works_whatever_the_keys(tmp_path, tf_ckpt, fmt):
    """``rename={"dense_layer_1/": "my_dense_layer/"}`` names layers, not file keys (``_operations/1``, ``layers/dense``)."""
    path = tf_ckpt("renamed_14") if fmt == "tf" else None
    old = named_functional("dense_layer_1", 14)
    path = path or save_h5(old, tmp_path / "c.weights.h5")
    model = named_functional("my_dense_layer", 15)
    before = snapshot(model)
    report = regraft.load(model, path, rename={"dense_layer_1/": "my_dense_layer/"})
    assert set(statuses(report).values()) == {"loaded"}
    assert {r["target"]: r["stage"] for r in report.rows()}["my_dense_layer/kernel"] == "rule"
    assert_state(model, before, {id(t): value_of(s) for s, t in zip(old.weights, model.weights)})
