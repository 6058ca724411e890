"""The target description: keys computed by the frameworks' own walks."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import X5, build

import keras  # noqa: E402  (conftest set the TF log level first)

from regraft.targets.keras import _h5_walk  # noqa: E402


def _models():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.blocks = [keras.layers.Dense(3), keras.layers.Dense(3, name="named")]
            self.heads = {"a": keras.layers.Dense(2), "b": keras.layers.Dense(2)}
            self.norm = keras.layers.BatchNormalization()

        def call(self, x):
            for block in self.blocks:
                x = block(x)
            x = self.norm(x)
            return self.heads["a"](x) + self.heads["b"](x)

    net = Net()
    net(X5)
    compiled = build("functional", 1)
    compiled.compile(keras.optimizers.Adam(), "mse")
    compiled.fit(np.ones((2, 5), "float32"), np.ones((2, 2), "float32"), verbose=0)
    return {
        "subclassed-lists-dicts": net,
        "functional-compiled": compiled,
        "nested-functional": build("nested_functional", 2),
        "nested-subclassed": build("nested_subclassed", 4),
        "sequential": build("sequential", 3),
        "vgg16": keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3)),
    }


@pytest.mark.parametrize("name, model", list(_models().items()))
def test_fast_h5_walk_gives_exactly_keras_paths(tmp_path, name, model):
    fast_vars, fast_layers = _h5_walk(model, fast=True)
    slow_vars, slow_layers = _h5_walk(model, fast=False)
    # Compared on what regraft uses: the model's own variables and layers. (On a compiled
    # model the fast walk also records the optimizer's variables, which the slow one does
    # not reach; neither is a model weight.)
    ids = [id(v) for v in model.weights]
    assert all(i in fast_vars for i in ids)
    assert [fast_vars[i] for i in ids] == [slow_vars.get(i) for i in ids]
    model_layers = {k: v for k, v in fast_layers.items() if not k.startswith("optimizer")}
    assert model_layers == {k: v for k, v in slow_layers.items() if not k.startswith("optimizer")}
    # And they are the paths model.save_weights writes for the model's variables.
    import h5py

    path = tmp_path / "m.weights.h5"
    model.save_weights(str(path))
    with h5py.File(path, "r") as f:
        written = []
        f.visititems(lambda key, obj: written.append(key) if isinstance(obj, h5py.Dataset) else None)
    model_paths = {fast_vars[id(v)] for v in model.weights}
    assert model_paths == {key for key in written if not key.startswith("optimizer/")}
