"""build_and_load: the same model as a normal build followed by load, without drawing the
initial values the load overwrites."""

from __future__ import annotations

import numpy as np
import pytest

import keras
import regraft
from regraft.errors import LoadError

from conftest import X5, Chain, save_h5, save_tf, value_of, same_bytes


def chain(inserted: bool):
    layers = [("d1", keras.layers.Dense(6, name="d1"))]
    if inserted:
        layers.append(("new", keras.layers.Dense(6, name="new")))
    layers.append(("d2", keras.layers.Dense(3, name="d2")))
    model = Chain(layers, name="chain")
    model(X5)
    return model


@pytest.fixture(params=["tf", "h5"])
def checkpoint(request, tmp_path):
    keras.utils.set_random_seed(1)
    old = chain(inserted=False)
    if request.param == "tf":
        return old, save_tf(tmp_path / "ckpt", model=old)
    return old, save_h5(old, tmp_path / "model.weights.h5")


def test_same_result_as_a_normal_build_then_load(checkpoint):
    old, path = checkpoint
    keras.utils.set_random_seed(7)
    normal = chain(inserted=True)
    regraft.load(normal, path, strict=False)
    keras.utils.set_random_seed(7)
    at_build = []

    def build():
        model = chain(inserted=True)
        at_build.extend(np.count_nonzero(value_of(v)) for v in model.weights)
        return model

    model, report = regraft.build_and_load(build, path, strict=False)
    assert at_build == [0] * 6  # placeholders: no initial value was drawn while building
    assert report.counts()["loaded"] == 4 and report.counts()["missing"] == 2
    for a, b in zip(normal.weights, model.weights):
        assert same_bytes(value_of(a), value_of(b)), a.path
    # the inserted layer got its real initializer (glorot kernel), not the zeros placeholder
    assert np.count_nonzero(value_of(model.new.kernel)) == 36
    assert same_bytes(value_of(model.d1.kernel), value_of(old.d1.kernel))


def test_fresh_variables_follow_the_seed(checkpoint):
    _, path = checkpoint
    keras.utils.set_random_seed(8)
    first, _ = regraft.build_and_load(lambda: chain(inserted=True), path, strict=False)
    keras.utils.set_random_seed(9)
    second, _ = regraft.build_and_load(lambda: chain(inserted=True), path, strict=False)
    assert not same_bytes(value_of(first.new.kernel), value_of(second.new.kernel))


def test_a_refused_load_still_initialises_every_variable(checkpoint):
    _, path = checkpoint
    keras.utils.set_random_seed(10)
    normal = chain(inserted=True)
    keras.utils.set_random_seed(10)
    built = []

    def build():
        built.append(chain(inserted=True))
        return built[0]

    with pytest.raises(LoadError, match="Refusing to load"):
        regraft.build_and_load(build, path)  # strict: the inserted layer is missing
    for a, b in zip(normal.weights, built[0].weights):
        assert same_bytes(value_of(a), value_of(b)), a.path
