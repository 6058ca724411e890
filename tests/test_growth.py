"""Reshape policies and function-preserving growth, end to end on real Keras models."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from conftest import randomize, same_bytes, save_tf, value_of

import keras  # noqa: E402  (conftest set the TF log level first)

import regraft  # noqa: E402
from regraft.demo import build_inserted_new, build_inserted_old  # noqa: E402


def mlp(width: int, name: str):
    inputs = keras.Input((8,))
    x = keras.layers.Dense(width, activation="relu", name="h1")(inputs)
    x = keras.layers.Dense(width, activation="relu", name="h2")(x)
    return keras.Model(inputs, keras.layers.Dense(3, name="out")(x), name=name)


def convs(filters: int, batch_norm: bool, name: str):
    inputs = keras.Input((10, 10, 3))
    x = keras.layers.Conv2D(filters, 3, activation="relu", name="c1")(inputs)
    if batch_norm:
        x = keras.layers.BatchNormalization(name="bn")(x)
    return keras.Model(inputs, keras.layers.Conv2D(16, 3, name="c2")(x), name=name)


def positive_batch_norm(model) -> None:
    """Random BN statistics with a positive variance, so outputs are finite."""
    rng = np.random.default_rng(11)
    for v in model.get_layer("bn").weights:
        v.assign(rng.uniform(0.5, 1.5, tuple(v.shape)).astype("float32"))


# Function-preservation tests keep Keras' own (Glorot) initialisation: outputs of order 1, so the
# 1e-5 tolerance measures the transforms, not float32 rounding of outputs in the hundreds.


def test_tutorial_inserted_layer_is_function_preserving(tmp_path):
    keras.utils.set_random_seed(1)
    old, new = build_inserted_old(), build_inserted_new()
    for v in (old.dense1.bias, old.dense2.bias):  # non-zero biases, so that they are tested too
        v.assign(np.random.default_rng(1).standard_normal(tuple(v.shape)).astype("float32") * 0.1)
    report = regraft.load(new, save_tf(tmp_path / "a" / "ckpt", model=old), reshape="preserve")
    rows = {r["target"]: r for r in report.rows()}
    assert rows["dense2/kernel"]["transform"] == "identity_init" and rows["dense2/kernel"]["source"] is None
    assert rows["dense3/kernel"]["transform"] == "pad" and rows["dense3/kernel"]["source"] == "model/dense2/_kernel"
    assert rows["dense3/bias"]["status"] == "loaded"
    result = regraft.verify(old, new)
    assert result.passed and result.max_abs < 1e-5
    kernel = value_of(new.dense3.kernel)
    assert same_bytes(kernel[:64], value_of(old.dense2.kernel)) and not kernel[64:].any()


@pytest.mark.parametrize("batch_norm", [False, True])
def test_wider_convolution_is_function_preserving(tmp_path, batch_norm):
    keras.utils.set_random_seed(2)
    old, new = convs(32, batch_norm, "old"), convs(64, batch_norm, "new")
    if batch_norm:
        positive_batch_norm(old)
    report = regraft.load(new, save_tf(tmp_path / "c" / "ckpt", model=old), reshape="preserve")
    assert report.counts()["shape-mismatch"] == 0 and report.counts()["missing"] == 0
    result = regraft.verify(old, new)
    assert result.passed, str(result)
    # The first 32 filters are the old ones, copied bit for bit.
    assert same_bytes(value_of(new.get_layer("c1").kernel)[..., :32], value_of(old.get_layer("c1").kernel))


def test_overlay_keeps_old_filters_and_fresh_values_elsewhere(tmp_path):
    old, new = convs(32, False, "old"), convs(64, False, "new")
    randomize(old, 3)
    fresh = value_of(new.get_layer("c1").kernel)
    regraft.load(new, save_tf(tmp_path / "c" / "ckpt", model=old), reshape="overlay")
    kernel = value_of(new.get_layer("c1").kernel)
    assert same_bytes(kernel[..., :32], value_of(old.get_layer("c1").kernel))
    assert same_bytes(kernel[..., 32:], fresh[..., 32:])
    c2 = value_of(new.get_layer("c2").kernel)  # (3, 3, 64, 16): old rows first, fresh rows after
    assert same_bytes(c2[:, :, :32], value_of(old.get_layer("c2").kernel))


def test_pad_rule_fills_zeros(tmp_path):
    old, new = convs(32, False, "old"), convs(64, False, "new")
    randomize(old, 4)
    report = regraft.load(new, save_tf(tmp_path / "c" / "ckpt", model=old),
                          rules={"transform": {"c1/*": "pad", "c2/kernel": {"name": "pad", "value": 0.0}}})
    kernel = value_of(new.get_layer("c1").kernel)
    assert same_bytes(kernel[..., :32], value_of(old.get_layer("c1").kernel)) and not kernel[..., 32:].any()
    assert not value_of(new.get_layer("c1").bias)[32:].any()
    assert {r["rule"]: r["used"] for r in report.to_dict()["rules"]} == {
        "rule 1 (transform 'c1/*' with pad)": 2, "rule 2 (transform 'c2/kernel' with pad)": 1}


def test_mlp_widened_in_both_hidden_layers(tmp_path):
    keras.utils.set_random_seed(5)
    old, new = mlp(64, "old"), mlp(96, "new")
    path = save_tf(tmp_path / "m" / "ckpt", model=old)
    report = regraft.load(new, path, reshape="preserve")
    assert {r["target"]: r["transform"] for r in report.rows()}["h2/kernel"] == "widen_out + widen_in"
    assert regraft.verify(old, new).max_abs < 1e-5

    noisy = mlp(96, "noisy")
    regraft.load(noisy, path, reshape="preserve", noise=0.01)
    assert not same_bytes(value_of(noisy.get_layer("h2").kernel), value_of(new.get_layer("h2").kernel))
    # The noise keeps each unit's copies summing to the old row: close, but not the same numbers.
    assert 0 < regraft.verify(old, noisy).max_abs < 1e-4


def test_freeze_keeps_transformed_layers_trainable(tmp_path):
    old, new = build_inserted_old(), build_inserted_new()
    report = regraft.load(new, save_tf(tmp_path / "a" / "ckpt", model=old), reshape="preserve", freeze=True)
    assert report.frozen == ("dense1",)
    assert report.kept_trainable() == ["dense2", "dense3"]
    assert not new.dense1.trainable and new.dense2.trainable and new.dense3.trainable
    assert "kept trainable (transformed): dense2, dense3" in str(report)


def test_preserve_says_why_it_could_not(tmp_path):
    old, new = mlp(64, "old"), mlp(32, "new")  # narrower: not function-preserving
    path = save_tf(tmp_path / "m" / "ckpt", model=old)
    plan = regraft.plan(new, path, reshape="preserve")
    reasons = {a.target.key: a.reason for a in plan.assignments}
    assert "could not preserve: fewer output units cannot compute the same function" in reasons["h1/kernel"]
    assert {a.status for a in plan.assignments if a.target.key.startswith("h1/")} == {"shape-mismatch"}


def test_plan_file_keeps_transform_steps(tmp_path):
    keras.utils.set_random_seed(6)
    old, new = mlp(64, "old"), mlp(96, "new")
    path = save_tf(tmp_path / "m" / "ckpt", model=old)
    plan_file = tmp_path / "plan.yaml"
    regraft.save_plan(regraft.plan(new, path, reshape="preserve"), plan_file)
    data = yaml.safe_load(plan_file.read_text())
    assert [s["name"] for s in data["variables"]["h2/kernel"]["steps"]] == ["widen_out", "widen_in"]
    regraft.apply(regraft.read_plan(plan_file, new), new)
    assert regraft.verify(old, new).max_abs < 1e-5

    data["variables"]["out/kernel"]["steps"] = [{"name": "pad"}]  # (64, 3) -> (96, 3) with zeros: valid
    data["variables"]["h1/kernel"]["steps"] = [{"name": "slice"}]  # (8, 64) -> (8, 96): refused on reading
    plan_file.write_text(yaml.safe_dump(data))
    with pytest.raises(regraft.RegraftError) as info:
        regraft.read_plan(plan_file, new)
    assert "Transform 'slice' cannot turn tensor 'h1/kernel' of shape (8, 64) into (8, 96)" in str(info.value)


@pytest.mark.parametrize("saved", ["float16", "bfloat16", "float64"])
def test_cast_from_other_float_dtypes_into_float32_is_exact(tmp_path, saved):
    """The other direction of the cast tests in test_load: float16/bfloat16 widen exactly; float64 rounds."""
    def model(dtype, name):
        inputs = keras.Input((4,))
        return keras.Model(inputs, keras.layers.Dense(3, name="d", dtype=dtype)(inputs), name=name)

    old, new = model(saved, "old"), model("float32", "new")
    randomize(old, 12)
    report = regraft.load(new, save_tf(tmp_path / "c" / "ckpt", model=old))
    rows = {r["target"]: r for r in report.rows()}
    assert rows["d/kernel"]["status"] == "cast" and rows["d/kernel"]["source_dtype"] == saved
    kernel64 = value_of(old.get_layer("d").kernel).astype("float64")
    assert rows["d/kernel"]["max_cast_error"] == float(np.max(np.abs(kernel64.astype("float32") - kernel64)))
    assert (rows["d/kernel"]["max_cast_error"] == 0.0) == (saved != "float64")
    for name in ("kernel", "bias"):
        expected = value_of(getattr(old.get_layer("d"), name)).astype("float32")
        assert same_bytes(value_of(getattr(new.get_layer("d"), name)), expected)
