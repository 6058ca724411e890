"""regraft.verify: compare a regrafted model's outputs with the old model's, on real small Keras models."""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402

from conftest import X5, assert_state, randomize, same_bytes, save_h5, snapshot  # noqa: E402
from conftest import build as build_random  # noqa: E402
from regraft.cli.output import fail  # noqa: E402
from regraft.cli.verify import verify_command  # noqa: E402
from regraft.errors import RegraftError  # noqa: E402
from regraft.verification import (  # noqa: E402
    INT_HIGH,
    UNKNOWN_DIM,
    VerifyError,
    VerifyReport,
    probe_inputs,
    verify,
)


def build(kind: str, seed: int):
    """conftest's seeded model, with positive batch-norm variances (random ones make NaN outputs)."""
    model = build_random(kind, seed)
    for v in model.weights:
        if "variance" in v.path:
            v.assign(np.abs(v.numpy()) + 0.5)
    return model


def outputs_of(model, x) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(model(x, training=False)), dtype=np.float64)


def perturb(model, delta=1e-3, index=0) -> None:
    """Add ``delta`` to one element of the model's ``index``-th variable."""
    v = model.weights[index]
    value = np.array(v.numpy(), copy=True)
    value.reshape(-1)[0] += delta
    v.assign(value)


def classifier(units=10, seed=0, name="clf"):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((5,))
    x = keras.layers.Dense(8, activation="relu", name="d1")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(units, name="d2")(x), name=name)
    randomize(model, seed)
    return model


def embedding_model(input_dim=50, seed=0):
    keras.utils.set_random_seed(seed)
    ids = keras.Input((6,), dtype="int32", name="ids")
    x = keras.layers.Embedding(input_dim, 4, name="emb")(ids)
    x = keras.layers.GlobalAveragePooling1D()(x)
    model = keras.Model(ids, keras.layers.Dense(3, name="head")(x), name="emb_model")
    randomize(model, seed)
    return model


def two_input_model(seed=0):
    """Two inputs (5 and 3 features), two outputs ``a`` (2 units) and ``b`` (4 units)."""
    keras.utils.set_random_seed(seed)
    x1 = keras.Input((5,), name="x1")
    x2 = keras.Input((3,), name="x2")
    h = keras.layers.Concatenate()([keras.layers.Dense(4, name="p1")(x1), keras.layers.Dense(4, name="p2")(x2)])
    model = keras.Model([x1, x2], [keras.layers.Dense(2, name="a")(h), keras.layers.Dense(4, name="b")(h)],
                        name="two_in")
    randomize(model, seed)
    return model


# --------------------------------------------------------------------------- identical and perturbed


def test_identical_functional_models_give_zero_difference():
    old, new = build("functional", 3), build("functional", 3)
    report = verify(old, new)
    assert isinstance(report, VerifyReport)
    assert report.max_abs == 0.0 and report.max_rel == 0.0
    assert report.passed and report.samples == 8 and report.tolerance == 1e-5
    assert len(report.outputs) == 1 and report.outputs[0]["shape"] == [8, 2]
    assert str(report) == "max |Δ| 0.0e+00 (rel 0.0e+00) over 8 probe inputs: within 1e-05"


def test_perturbed_weight_fails_with_the_numpy_difference_and_changes_nothing():
    old, new = build("functional", 3), build("functional", 3)
    perturb(new, 1e-3)
    before_old, before_new = snapshot(old), snapshot(new)

    report = verify(old, new, samples=16, seed=4)

    x = probe_inputs(old, 16, seed=4)
    a, b = outputs_of(old, x), outputs_of(new, x)
    expected = float(np.max(np.abs(a - b)))
    assert report.max_abs == expected
    assert report.max_abs > 1e-5 and not report.passed
    assert report.max_rel == expected / float(np.max(np.abs(a)))
    assert report.samples == 16
    assert str(report).endswith("over 16 probe inputs: exceeds 1e-05")
    assert_state(old, before_old)
    assert_state(new, before_new)
    # a looser tolerance passes the same models
    assert verify(old, new, tolerance=1.0).passed


def test_nan_outputs_are_flagged():
    old = build_random("functional", 3)  # random (negative) batch-norm variances: NaN outputs
    report = verify(old, old)
    assert report.max_abs == 0.0 and report.outputs[0]["nonfinite"] > 0
    assert "NaN or infinite" in str(report)
    finite = build("functional", 3)
    assert verify(old, finite).max_abs == float("inf")


def test_report_to_dict_is_json_ready():
    old, new = build("functional", 1), build("functional", 1)
    perturb(new, 1e-2)
    data = json.loads(json.dumps(verify(old, new).to_dict()))
    assert set(data) == {"passed", "max_abs", "max_rel", "tolerance", "samples", "inputs", "outputs"}
    assert data["passed"] is False and data["inputs"] == "probe" and data["samples"] == 8
    (out,) = data["outputs"]
    assert out["index"] == 0 and out["name"] == "d2" and out["shape"] == [8, 2] and out["dtype"] == "float32"
    assert out["max_abs"] == data["max_abs"] and out["max_rel"] == data["max_rel"]


# --------------------------------------------------------------------------- input shapes and dtypes


def test_subclassed_model_built_by_calling_is_probed_from_its_build_shape():
    old, new = build("subclassed", 2), build("subclassed", 2)
    x = probe_inputs(old)
    assert isinstance(x, np.ndarray) and x.shape == (8, 5) and x.dtype == np.float32
    assert verify(old, new).max_abs == 0.0
    perturb(new, 1e-3, index=2)  # a BatchNormalization variable: used in inference mode
    assert not verify(old, new).passed


class HandBuilt(keras.Model):
    """A subclassed model built by hand (``self.built = True``), so it records no build shape."""

    def __init__(self, first, **kwargs):
        super().__init__(**kwargs)
        self.first = first
        self.dense = keras.layers.Dense(2)
        self.first.build((None, 5))
        self.dense.build((None, 5))
        self.built = True

    def call(self, x):
        return self.dense(self.first(x))


def test_first_layer_input_spec_is_the_fallback_and_otherwise_a_clear_error():
    model = HandBuilt(keras.layers.Dense(5), name="hand_built")
    assert getattr(model, "_build_shapes_dict", None) is None
    assert probe_inputs(model).shape == (8, 5)  # from Dense's InputSpec(min_ndim=2, axes={-1: 5})

    no_spec = HandBuilt(keras.layers.Activation("relu"), name="no_spec")
    with pytest.raises(VerifyError) as info:
        probe_inputs(no_spec)
    assert info.value.message == (
        "Cannot tell the input shape of model 'no_spec' (HandBuilt): it has no Input layers, records no build "
        "shape, and its first layer has no input spec."
    )
    assert "inputs=" in info.value.hint
    # with inputs= it works
    assert verify(no_spec, no_spec, X5).max_abs == 0.0


def test_unbuilt_model_is_refused_before_it_is_changed():
    model = build("subclassed", 0)
    fresh = type(model)(name="fresh")
    with pytest.raises(VerifyError, match="'fresh' is not built"):
        verify(model, fresh, X5)
    assert not fresh.built and not fresh.weights


def test_two_input_two_output_functional_model():
    old, new = two_input_model(5), two_input_model(5)
    x = probe_inputs(old, samples=4)
    assert isinstance(x, list) and [a.shape for a in x] == [(4, 5), (4, 3)]
    report = verify(old, new)
    assert report.max_abs == 0.0 and [o["name"] for o in report.outputs] == ["a", "b"]

    perturb(new, 1e-3, index=[v.path for v in new.weights].index(new.get_layer("b").kernel.path))
    report = verify(old, new)
    x = probe_inputs(old)
    a_old, b_old = (np.asarray(keras.ops.convert_to_numpy(t), np.float64) for t in old(x, training=False))
    a_new, b_new = (np.asarray(keras.ops.convert_to_numpy(t), np.float64) for t in new(x, training=False))
    assert report.outputs[0]["max_abs"] == 0.0
    assert report.outputs[1]["max_abs"] == float(np.max(np.abs(b_old - b_new))) == report.max_abs > 0
    text = str(report).splitlines()
    assert len(text) == 3 and text[1].startswith("  a  (8, 2): max |Δ| 0.0e+00") and text[2].startswith("  b  (8, 4)")


def test_dict_inputs_mirror_the_models_input_structure():
    keras.utils.set_random_seed(0)
    ids = keras.Input((3,), dtype="int32", name="ids")
    feats = keras.Input((2,), name="feats")
    x = keras.layers.Flatten()(keras.layers.Embedding(4, 2)(ids))
    model = keras.Model({"ids": ids, "feats": feats}, keras.layers.Dense(1)(keras.layers.Concatenate()([x, feats])))
    x = probe_inputs(model, samples=64)
    assert set(x) == {"ids", "feats"}
    assert x["ids"].dtype == np.int32 and x["ids"].shape == (64, 3)
    assert x["ids"].min() >= 0 and x["ids"].max() == 3  # Embedding(4, ...): ids in [0, 4)
    assert x["feats"].dtype == np.float32 and x["feats"].shape == (64, 2)
    assert verify(model, model).max_abs == 0.0


def test_embedding_model_gets_integer_token_ids():
    old, new = embedding_model(), embedding_model()
    x = probe_inputs(old, samples=200)
    assert x.dtype == np.int32 and x.shape == (200, 6)
    assert x.min() == 0 and x.max() == INT_HIGH - 1
    assert verify(old, new).max_abs == 0.0
    perturb(new, 1e-3)  # row 0 of the embedding table: the probes contain token 0
    assert verify(old, new).max_abs > 1e-5


def test_subclassed_embedding_model_and_unknown_dims():
    class Tokens(keras.Model):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.emb = keras.layers.Embedding(7, 3)
            self.head = keras.layers.Dense(2)

        def call(self, x):
            return self.head(keras.ops.mean(self.emb(x), axis=1))

    model = Tokens(name="tokens")
    model(np.zeros((2, 4), "int32"))
    x = probe_inputs(model, samples=100)
    assert x.dtype == np.int32 and x.shape == (100, 4) and x.max() == 6

    ids = keras.Input((None,), dtype="int32")
    seq = keras.Model(ids, keras.layers.Embedding(20, 2)(ids))
    assert probe_inputs(seq, samples=3).shape == (3, UNKNOWN_DIM)


def test_float_probes_are_standard_normal():
    x = probe_inputs(build("functional", 0), samples=4000)
    assert abs(float(x.mean())) < 0.02 and abs(float(x.std()) - 1.0) < 0.02


# --------------------------------------------------------------------------- mismatches and given inputs


def test_mismatched_output_shapes_name_what_differs():
    old, new = classifier(10), classifier(12)
    with pytest.raises(VerifyError) as info:
        verify(old, new)
    assert info.value.message == (
        "old model outputs (8, 10) but new model outputs (8, 12): the two models do not compute outputs of the "
        "same shape; verify compares models with the same outputs."
    )
    assert isinstance(info.value, RegraftError) and info.value.hint


def test_mismatched_output_structure_names_both_structures():
    old = two_input_model()
    with pytest.raises(VerifyError) as info:
        verify(old, keras.Model(old.inputs, old.outputs[0]))
    assert info.value.message == (
        "old model outputs [(8, 2), (8, 4)] but new model outputs (8, 2): the two models do not return the same "
        "structure of outputs; verify compares models with the same outputs."
    )


def test_new_model_that_rejects_the_inputs_is_a_clear_error():
    old = classifier(10)
    inputs = keras.Input((6,))
    other = keras.Model(inputs, keras.layers.Dense(10)(inputs), name="wants_six")
    with pytest.raises(VerifyError, match=r"^Calling the new model 'wants_six' on inputs \(8, 5\) raised ValueError"):
        verify(old, other)


def test_given_inputs_are_used_as_given():
    old, new = build("functional", 3), build("functional", 3)
    perturb(new, 1e-3)
    x = np.linspace(-3, 3, 15, dtype="float32").reshape(3, 5)
    report = verify(old, new, x, samples=999)
    assert report.samples == 3 and not report.probed
    assert report.max_abs == float(np.max(np.abs(outputs_of(old, x) - outputs_of(new, x))))
    assert "over 3 given inputs" in str(report)

    with pytest.raises(VerifyError, match="different batch sizes: 3, 2"):
        verify(two_input_model(), two_input_model(), [np.zeros((3, 5), "float32"), np.zeros((2, 3), "float32")])


def test_probes_are_deterministic():
    model = two_input_model()
    a, b, c = probe_inputs(model, seed=7), probe_inputs(model, seed=7), probe_inputs(model, seed=8)
    assert all(same_bytes(p, q) for p, q in zip(a, b))
    assert not same_bytes(a[0], c[0])
    old, new = build("functional", 3), build("functional", 3)
    perturb(new, 1e-3)
    assert verify(old, new, seed=7) == verify(old, new, seed=7)
    assert verify(old, new, seed=7).max_abs != verify(old, new, seed=8).max_abs


def test_bad_arguments():
    model = build("functional", 0)
    with pytest.raises(VerifyError, match="samples must be a positive integer"):
        probe_inputs(model, samples=0)
    with pytest.raises(VerifyError, match="tolerance must be a number >= 0"):
        verify(model, model, tolerance=-1)


# --------------------------------------------------------------------------- verify_command

MODELS_PY = '''
import keras

def build_old():
    inputs = keras.Input((5,))
    x = keras.layers.Dense(4, activation="relu", name="d1")(inputs)
    return keras.Model(inputs, keras.layers.Dense(3, name="d2")(x), name="old")

def build_new():
    inputs = keras.Input((5,))
    x = keras.layers.Dense(4, activation="relu", name="d1")(inputs)
    return keras.Model(inputs, keras.layers.Dense(3, name="d2")(x), name="new")

def build_wide():
    inputs = keras.Input((5,))
    x = keras.layers.Dense(4, activation="relu", name="d1")(inputs)
    return keras.Model(inputs, keras.layers.Dense(6, name="d2")(x), name="wide")
'''


@pytest.fixture
def files(tmp_path):
    """models.py, the old model's weights, new weights equal to them (h5 and TF prefix), perturbed, and wide."""
    from regraft.cli.modelspec import build_model
    from regraft.targets import save_weights

    models = tmp_path / "models.py"
    models.write_text(MODELS_PY)
    old = build_model(f"{models}:build_old")
    randomize(old, 11)
    paths = {"models": str(models), "old": save_h5(old, tmp_path / "old.weights.h5")}
    new = build_model(f"{models}:build_new")
    new.set_weights(old.get_weights())
    paths["same"] = save_weights(new, str(tmp_path / "same.weights.h5"))[0]
    save_weights(new, str(tmp_path / "same_ckpt"))
    paths["same_prefix"] = str(tmp_path / "same_ckpt")
    perturb(new, 1e-3, index=2)  # d2's kernel
    paths["off"] = save_weights(new, str(tmp_path / "off.weights.h5"))[0]
    paths["wide"] = save_weights(build_model(f"{models}:build_wide"), str(tmp_path / "wide.weights.h5"))[0]
    return paths


def namespace(files, new_weights, model="build_new", **kw):
    args = dict(old_checkpoint=files["old"], old_model=f"{files['models']}:build_old", new_weights=new_weights,
                model=f"{files['models']}:{model}", tolerance=1e-5, samples=8, inputs=None, json=True)
    args.update(kw)
    return argparse.Namespace(**args)


def test_verify_command_passes_with_exit_0_and_json(files, capsys):
    assert verify_command(namespace(files, files["same"])) == 0
    out, err = capsys.readouterr()
    data = json.loads(out)
    assert data["passed"] is True and data["max_abs"] == 0.0 and data["samples"] == 8 and err == ""

    assert verify_command(namespace(files, files["same_prefix"], json=False, samples=3)) == 0
    out, _ = capsys.readouterr()
    assert out.strip() == "max |Δ| 0.0e+00 (rel 0.0e+00) over 3 probe inputs: within 1e-05"


def test_verify_command_exceeding_the_tolerance_exits_1(files, capsys, tmp_path):
    assert verify_command(namespace(files, files["off"])) == 1
    out, err = capsys.readouterr()
    data = json.loads(out)
    assert data["passed"] is False and data["max_abs"] > 1e-5 and data["outputs"][0]["shape"] == [8, 3]
    assert err.startswith("verify failed: max |Δ| ") and "exceeds the tolerance 1e-05" in err

    assert verify_command(namespace(files, files["off"], tolerance=1.0)) == 0
    capsys.readouterr()

    npy = tmp_path / "x.npy"
    np.save(npy, np.ones((5, 5), "float32"))
    assert verify_command(namespace(files, files["off"], inputs=str(npy))) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["samples"] == 5 and data["inputs"] == "given"


def test_verify_command_user_errors_raise_for_exit_2(files, capsys, tmp_path):
    with pytest.raises(VerifyError) as info:
        verify_command(namespace(files, files["wide"], model="build_wide"))
    assert "old model outputs (8, 3) but new model outputs (8, 6)" in info.value.message
    assert fail(info.value) == 2

    with pytest.raises(RegraftError):  # the new weights do not fit the new model: a strict load refuses
        verify_command(namespace(files, files["old"], model="build_wide"))
    with pytest.raises(VerifyError, match="Inputs file .*missing.npy does not exist"):
        verify_command(namespace(files, files["same"], inputs=str(tmp_path / "missing.npy")))
