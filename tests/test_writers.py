"""Every output format ``--out`` writes, read back by its real reader and by regraft, bit for bit."""

from __future__ import annotations

import os

import numpy as np
import pytest

from conftest import ARCHITECTURES, assert_all_differ, build, same_bytes, value_of
from regraft.cli.main import main
from regraft.errors import RegraftError
from regraft.targets import target_for

keras = pytest.importorskip("keras")
tf = pytest.importorskip("tensorflow")

FORMATS = ("model.weights.h5", "model.keras", "model.safetensors", "ckpt")


def _values(model) -> list[np.ndarray]:
    return [value_of(v) for v in model.weights]


def _assert_same(model, want: list[np.ndarray]) -> None:
    got = _values(model)
    assert len(got) == len(want)
    for v, a, b in zip(model.weights, got, want):
        assert same_bytes(a, b), f"{v.path} differs"


def _read_back(kind: str, out: str, name: str, saved):
    """A fresh model of ``kind`` filled from ``out`` by the format's own reader (never regraft's).

    safetensors keys are the saved model's readable keys; auto-generated layer names in them
    (``dense_3``) count the layers built before in the process, so the fresh model's variables
    are found by their position in the saved model.
    """
    if name.endswith(".keras"):
        return keras.saving.load_model(out, custom_objects=_custom_objects(), compile=False)
    fresh = build(kind, seed=99)
    if name.endswith(".weights.h5"):
        fresh.load_weights(out)
    elif name.endswith(".safetensors"):
        from safetensors.numpy import load_file

        tensors = load_file(out)
        keys = [v.key for v in target_for(saved).describe(())[0]]
        assert sorted(tensors) == sorted(keys)
        for key, variable in zip(keys, target_for(fresh).variables()):
            variable.assign(tensors[key])
    else:
        tf.train.Checkpoint(model=fresh).read(out).assert_existing_objects_matched().expect_partial()
    return fresh


def _custom_objects():
    import conftest

    return {name: getattr(conftest, name) for name in ("Chain", "Block", "NestedSub", "SmallSub")}


@pytest.mark.parametrize("kind", ARCHITECTURES)
@pytest.mark.parametrize("name", FORMATS)
def test_each_output_reads_back_with_its_own_reader_bit_for_bit(tmp_path, kind, name):
    model = build(kind, seed=1)
    want = _values(model)
    out = str(tmp_path / name)
    written = target_for(model).save(out)
    assert all(os.path.exists(w) for w in written)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".regraft-out-")]
    if name.endswith(".keras") and kind in ("subclassed", "nested_subclassed"):
        pytest.skip("the test's subclassed models have no get_config: Keras cannot rebuild them from a .keras")
    back = _read_back(kind, out, name, model)
    assert_all_differ(back, build(kind, seed=99)) if not name.endswith(".keras") else None
    _assert_same(back, want)


@pytest.mark.parametrize("name", FORMATS)
def test_each_output_loads_strictly_back_with_regraft(tmp_path, name):
    import regraft

    model = build("functional", seed=1)
    out = str(tmp_path / name)
    target_for(model).save(out)
    fresh = build("functional", seed=99)
    assert_all_differ(model, fresh)
    report = regraft.load(fresh, out)
    assert report.counts()["loaded"] == len(fresh.weights)
    _assert_same(fresh, _values(model))


def test_safetensors_keys_are_the_readable_variable_paths(tmp_path):
    from safetensors.numpy import load_file

    model = build("functional", seed=1)
    out = str(tmp_path / "m.safetensors")
    target_for(model).save(out)
    assert sorted(load_file(out)) == ["bn/beta", "bn/gamma", "bn/moving_mean", "bn/moving_variance",
                                      "d1/bias", "d1/kernel", "d2/bias", "d2/kernel"]


def test_a_keras_archive_of_a_model_keras_cannot_serialise_is_a_regraft_error_and_nothing_is_written(tmp_path):
    class NoConfig(keras.layers.Layer):
        def __init__(self, units, **kwargs):
            super().__init__(**kwargs)
            self.dense = keras.layers.Dense(units)

        def call(self, x):
            return self.dense(x)

        def get_config(self):
            raise NotImplementedError("NoConfig has no config")

    inputs = keras.Input((3,))
    model = keras.Model(inputs, NoConfig(2, name="nc")(inputs), name="m")
    out = tmp_path / "m.keras"
    out.write_bytes(b"previous")
    with pytest.raises(RegraftError) as caught:
        target_for(model).save(str(out))
    assert str(caught.value).startswith(
        f"Cannot write the model {out}: Keras could not save model 'm': NotImplementedError: NoConfig has no config")
    assert caught.value.hint == ("A .keras archive needs every layer's get_config(); write the weights only instead "
                                 "(--out model.weights.h5 or model.safetensors).")
    assert out.read_bytes() == b"previous"
    assert sorted(os.listdir(tmp_path)) == ["m.keras"]


MODELS = """
import keras

def build(extra=False):
    inputs = keras.Input((5,))
    x = keras.layers.Dense(4, name="d1")(inputs)
    if extra:
        x = keras.layers.Dense(4, name="inserted")(x)
    x = keras.layers.BatchNormalization(name="bn")(x)
    outputs = keras.layers.Dense(2, name="d2")(x)
    return keras.Model(inputs, outputs, name="m")

def build_new():
    return build(extra=True)
"""


@pytest.mark.parametrize("name", ["new.keras", "new.safetensors", "new.weights.h5", "ckpt"])
def test_cli_load_out_writes_what_the_library_loads(capsys, tmp_path, name):
    import regraft
    from conftest import randomize

    (tmp_path / "models.py").write_text(MODELS)
    old = build("functional", seed=1)
    prefix = tf.train.Checkpoint(model=old).write(str(tmp_path / "old" / "ckpt"))
    out = str(tmp_path / "out" / name)
    code = main(["load", prefix, "--model", f"{tmp_path / 'models.py'}:build_new", "--allow-missing", "inserted/*",
                 "--out", out])
    _, err = capsys.readouterr()
    assert code == 0, err
    import importlib.util

    spec = importlib.util.spec_from_file_location("writer_models", tmp_path / "models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    expected = module.build_new()
    randomize(expected, 7)
    report = regraft.load(expected, prefix, allow_missing=["inserted/*"])
    loaded = {a.target.variable.path for a in report.plan.assignments if a.source is not None}
    assert len(loaded) == 8
    fresh = module.build_new()
    if name.endswith(".keras"):
        back = keras.saving.load_model(out, compile=False)
    elif name.endswith(".safetensors"):
        from safetensors.numpy import load_file

        tensors = load_file(out)
        for v in target_for(fresh).describe(())[0]:
            v.variable.assign(tensors[v.key])
        back = fresh
    elif name.endswith(".weights.h5"):
        fresh.load_weights(out)
        back = fresh
    else:
        tf.train.Checkpoint(model=fresh).read(out).assert_existing_objects_matched()
        back = fresh
    got = {v.path: value_of(v) for v in back.weights}
    for v in expected.weights:
        if v.path in loaded:
            assert same_bytes(got[v.path], value_of(v)), v.path
