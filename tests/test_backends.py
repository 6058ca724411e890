"""Loading into Keras models on any backend, TensorFlow installed or not.

These tests run in both CI environments: the main one (TensorFlow backend, which
writes the checkpoints itself) and the JAX one without TensorFlow, which reads
checkpoints the TF environment wrote (``REGRAFT_TF_FILES``, see
``tests/backend_cases.py``). Each load is checked by value against the old
model's variables, bit for bit, and by which stage decided it.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

import backend_cases
from backend_cases import CASES
from conftest import assert_state, same_bytes, snapshot

import regraft
from regraft.errors import CorruptCheckpointError, TargetError


def _backend() -> str:
    import keras

    return keras.backend.backend()


def _has_tensorflow() -> bool:
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="session")
def tf_files(tmp_path_factory) -> str:
    """The folder of TF-written cases: ``REGRAFT_TF_FILES``, or written here on the TF backend."""
    folder = os.environ.get("REGRAFT_TF_FILES")
    if folder:
        missing = [c.name for c in CASES if not os.path.exists(os.path.join(folder, c.name, "values.npz"))]
        assert not missing, f"REGRAFT_TF_FILES={folder} lacks cases {missing}: run tests/backend_cases.py again"
        return folder
    if _backend() != "tensorflow":
        pytest.skip("needs TF-written checkpoints: set REGRAFT_TF_FILES (make test-jax does)")
    folder = str(tmp_path_factory.mktemp("tf_files"))
    for case in CASES:
        backend_cases.write_case(case, os.path.join(folder, case.name))
    return folder


def _check_values(case, model, before, folder: str) -> None:
    """Every new variable holds its expected old value bit for bit, or (expected None) its value before."""
    old = dict(np.load(os.path.join(folder, case.name, "values.npz")))
    expected = case.expected or {path: path for path in old}
    paths = sorted(v.path for v in model.weights)
    assert paths == sorted(expected), f"the test's expectation does not cover the model: {paths}"
    for variable in model.weights:
        source = expected[variable.path]
        value = np.asarray(variable.numpy())
        if source is None:
            assert same_bytes(value, before[id(variable)]), f"{variable.path} should have stayed fresh"
        else:
            assert same_bytes(value, old[source]), f"{variable.path} does not hold old {source}"


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
@pytest.mark.parametrize("fmt", ["tf", "h5"])
def test_load_on_this_backend(case, fmt, tf_files):
    folder = os.path.join(tf_files, case.name)
    path = os.path.join(folder, "ckpt" if fmt == "tf" else "old.weights.h5")
    model = case.build_new()
    before = snapshot(model)
    report = regraft.load(model, path, strict=case.strict)
    assert report.applied
    _check_values(case, model, before, tf_files)


@pytest.mark.parametrize("kind", ["subclassed", "nested_subclassed"])
def test_object_keys_are_exact_without_tensorflow_walk(kind, tf_files):
    """Subclassed models' TF keys name attributes: every one is predicted exactly on every backend."""
    case = next(c for c in CASES if c.name == kind)
    plan = regraft.plan(case.build_new(), os.path.join(tf_files, kind, "ckpt"))
    stages = {a.target.key: str(a.stage) for a in plan.assignments}
    assert set(stages.values()) == {"exact"}, stages


def test_failed_load_leaves_model_unchanged(tf_files, tmp_path):
    """A tensor damaged on disk is found while loading; every variable is restored bit for bit."""
    for name in os.listdir(os.path.join(tf_files, "functional")):
        shutil.copy(os.path.join(tf_files, "functional", name), tmp_path / name)
    data = next(p for p in tmp_path.iterdir() if ".data-" in p.name)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    case = next(c for c in CASES if c.name == "functional")
    model = case.build_new()
    before = snapshot(model)
    with pytest.raises(CorruptCheckpointError):
        regraft.load(model, str(tmp_path / "ckpt"))
    assert_state(model, before)


def test_weights_h5_round_trip_on_this_backend(tmp_path):
    """A .weights.h5 file written on this backend loads back (no TensorFlow anywhere)."""
    import conftest

    old = conftest.build("nested_subclassed", 7)
    old.save_weights(str(tmp_path / "m.weights.h5"))
    new = conftest.build("nested_subclassed", 8)
    regraft.load(new, str(tmp_path / "m.weights.h5"))
    for a, b in zip(old.weights, new.weights):
        assert same_bytes(np.asarray(a.numpy()), np.asarray(b.numpy())), a.path


@pytest.mark.skipif("os.environ.get('KERAS_BACKEND', 'tensorflow') == 'tensorflow'")
def test_writing_a_tf_checkpoint_needs_the_tensorflow_backend(tmp_path):
    import conftest

    model = conftest.build("functional", 1)
    with pytest.raises(TargetError) as info:
        regraft.targets.save_weights(model, str(tmp_path / "out" / "ckpt"))
    assert str(info.value).startswith(
        f"Cannot write the TF checkpoint {tmp_path / 'out' / 'ckpt'}: tf.train.Checkpoint saves models of the "
        f"TensorFlow Keras backend, and this one runs on {_backend()}.")
    assert not (tmp_path / "out").exists()  # refused before anything was created


@pytest.mark.skipif("os.environ.get('KERAS_BACKEND', 'tensorflow') != 'tensorflow'")
def test_predicted_children_equal_tensorflow_walk():
    """The TF-free prediction of checkpoint children equals TensorFlow's own, on every test architecture."""
    import keras

    from regraft.targets import _compat
    import conftest

    def walk(model, children):
        out, seen, queue = {}, {id(model)}, [(model, "")]
        while queue:
            obj, path = queue.pop(0)
            for name, child in children(obj).items():
                if id(child) in seen:
                    continue
                seen.add(id(child))
                child_path = f"{path}/{name}" if path else name
                out[child_path] = "Wrapper" if isinstance(child, (list, tuple, dict)) else type(child).__name__
                if not isinstance(child, keras.Variable):
                    queue.append((child, child_path))
        return out

    def tf_children(obj):
        return dict(obj._trackable_children(save_type="checkpoint"))

    models = [conftest.build(kind, 1) for kind in conftest.ARCHITECTURES]
    models += [case.build_new() for case in CASES] + [conftest.dense_chain((4, 2, 2))]
    for model in models:
        tf_walk = walk(model, tf_children)
        predicted = walk(model, _compat.predicted_checkpoint_children)
        assert any(kind.endswith("Variable") for kind in tf_walk.values()), model.name
        # every variable and layer at the same path (TensorFlow's own empty lists may differ)
        def named(found):
            return {k: v for k, v in found.items() if isinstance(v, str) and not v.endswith("Wrapper")}

        assert named(predicted) == named(tf_walk), model.name
