"""PyTorch-layout tensors (safetensors / npz with ``state_dict`` names) loaded into Keras models.

Files are written with the safetensors package (and numpy.savez) from arrays laid out
the way PyTorch lays them out: Linear ``[out, in]``, conv ``OIHW``, depthwise
``[C*M, 1, kh, kw]``, BatchNorm ``weight/bias/running_mean/running_var`` plus
``num_batches_tracked``, LayerNorm ``weight/bias``. Where torch is installed, a real
``nn.Module``'s ``state_dict`` is written too and the Keras model must compute what the
PyTorch module computes.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import assert_state, snapshot

import keras  # noqa: E402
import regraft  # noqa: E402
from regraft import transforms  # noqa: E402

safetensors_numpy = pytest.importorskip("safetensors.numpy")


def _randomize(model: keras.Model, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for v in model.weights:
        value = rng.standard_normal(tuple(v.shape)).astype("float32")
        v.assign(np.abs(value) + 0.5 if "variance" in v.path else value)


def cnn_layers(head_units: int = 16) -> list[keras.layers.Layer]:
    """The layers of a small CNN as PyTorch's ``nn.Sequential`` would list them (weightless ones too)."""
    return [
        keras.layers.Conv2D(8, 3), keras.layers.BatchNormalization(epsilon=1e-5), keras.layers.ReLU(),
        keras.layers.MaxPooling2D(),
        keras.layers.DepthwiseConv2D(3, depth_multiplier=2, padding="same"),
        keras.layers.BatchNormalization(epsilon=1e-5), keras.layers.ReLU(),
        keras.layers.Conv2D(16, 1), keras.layers.GlobalAveragePooling2D(), keras.layers.LayerNormalization(epsilon=1e-5),
        keras.layers.Dense(head_units), keras.layers.ReLU(), keras.layers.Dense(10),
    ]


def cnn(seed: int, head_units: int = 16) -> keras.Model:
    model = keras.Sequential([keras.Input((12, 12, 3)), *cnn_layers(head_units)])
    _randomize(model, seed)
    return model


def torch_layout(layer: keras.layers.Layer, prefix: str) -> dict[str, np.ndarray]:
    """A Keras layer's variables written as PyTorch's state_dict holds them (independent of regraft)."""
    out = {}
    cls = type(layer).__name__
    for v in layer.weights:
        a, name = v.numpy(), v.name
        if cls == "Dense" and name == "kernel":
            out["weight"] = a.T
        elif cls == "Conv2D" and name == "kernel":
            out["weight"] = a.transpose(3, 2, 0, 1)  # HWIO -> OIHW
        elif cls == "DepthwiseConv2D" and name == "kernel":
            kh, kw, c, m = a.shape
            out["weight"] = a.transpose(2, 3, 0, 1).reshape(c * m, 1, kh, kw)  # output channel c*M + m
        else:
            out[{"gamma": "weight", "beta": "bias", "moving_mean": "running_mean",
                 "moving_variance": "running_var"}.get(name, name)] = a
    if cls == "BatchNormalization":
        out["num_batches_tracked"] = np.array(12, "int64")
    return {f"{prefix}{k}": np.ascontiguousarray(v) for k, v in out.items()}


def sequential_state(model: keras.Model, prefix: str = "") -> dict[str, np.ndarray]:
    state = {}
    for i, layer in enumerate(model.layers):
        state.update(torch_layout(layer, f"{prefix}{i}."))
    return state


def test_a_pytorch_layout_cnn_gets_a_readable_plan_and_loads_by_value(tmp_path):
    old = cnn(0)
    path = str(tmp_path / "cnn.safetensors")
    safetensors_numpy.save_file(sequential_state(old), path)
    new = cnn(1)
    before = snapshot(new)
    with regraft.open(path) as src:
        assert src.namespace == "torch"
        entry = next(e for e in src.entries() if e.key == "0/weight")
        assert (entry.shape, entry.aliases) == ((8, 3, 3, 3), ("0.weight",))
        assert {e.key for e in src.entries() if e.kind == "bookkeeping"} == {"1/num_batches_tracked",
                                                                             "5/num_batches_tracked"}
    plan = regraft.plan(new, path)
    steps = {a.target.layer_class + "/" + a.target.role: a.transform for a in plan.assignments}
    assert steps == {
        "Conv2D/kernel": "conv_oihw_to_hwio", "Conv2D/bias": "identity",
        "BatchNormalization/gamma": "identity", "BatchNormalization/beta": "identity",
        "BatchNormalization/moving_mean": "identity", "BatchNormalization/moving_variance": "identity",
        "DepthwiseConv2D/kernel": "depthwise_oihw_to_hwcm", "DepthwiseConv2D/bias": "identity",
        "LayerNormalization/gamma": "identity", "LayerNormalization/beta": "identity",
        "Dense/kernel": "linear_to_dense", "Dense/bias": "identity",
    }
    # The square Dense(16 -> 16) kernel is transposed although its shape already fits.
    square = next(a for a in plan.assignments if a.source is not None and a.source.key == "10/weight")
    assert (square.source.shape, square.transform) == ((16, 16), "linear_to_dense")
    assert plan.counts()["transformed"] == 5 and not plan.problems()
    regraft.save_plan(plan, str(tmp_path / "plan.yaml"))  # the steps survive a plan file
    read = regraft.read_plan(str(tmp_path / "plan.yaml"), new)
    assert [a.steps for a in read.assignments] == [a.steps for a in plan.assignments]
    regraft.apply(read, new)
    assert_state(new, before, {id(v): w.numpy() for v, w in zip(new.weights, old.weights)})  # bit for bit
    assert regraft.verify(old, new).max_abs < 1e-5


def test_a_subclassed_model_with_an_inserted_layer(tmp_path):
    """``features.N`` / ``classifier.N`` names; the new model has one more Dense in its classifier."""

    class Net(keras.Model):
        def __init__(self, extra: bool):
            super().__init__()
            self.features = keras.Sequential(cnn_layers()[:9])
            self.classifier = keras.Sequential([keras.layers.LayerNormalization(epsilon=1e-5), keras.layers.Dense(16),
                                                *([keras.layers.Dense(16)] if extra else []),
                                                keras.layers.ReLU(), keras.layers.Dense(10)])

        def call(self, x):
            return self.classifier(self.features(x))

    old, new = Net(False), Net(True)
    for seed, model in enumerate((old, new)):
        model(np.zeros((1, 12, 12, 3), "float32"))
        _randomize(model, seed)
    state = {**sequential_state(old.features, "features."), **sequential_state(old.classifier, "classifier.")}
    path = str(tmp_path / "net.npz")
    np.savez(path, **state)
    before = snapshot(new)
    # The inserted Dense(16) is alike to the old one: only order says which is new.
    plan = regraft.plan(new, path)
    dense = [layer.name for layer in new.classifier.layers if isinstance(layer, keras.layers.Dense)]
    assert {a.target.key: a.status for a in plan.assignments if a.target.layer_class == "Dense"} == {
        **{f"classifier/{name}/{role}": "unconfirmed" for name in dense[:2] for role in ("kernel", "bias")},
        f"classifier/{dense[2]}/kernel": "transformed", f"classifier/{dense[2]}/bias": "loaded"}
    report = regraft.load(new, path, strict=False, accept_order=True)
    inserted = new.classifier.layers[2]
    assert {a.target.key: (a.status, a.source.key if a.source else None) for a in report.plan.assignments
            if a.target.layer.startswith("classifier")} == {
        f"classifier/{new.classifier.layers[0].name}/gamma": ("loaded", "classifier/0/weight"),
        f"classifier/{new.classifier.layers[0].name}/beta": ("loaded", "classifier/0/bias"),
        f"classifier/{new.classifier.layers[1].name}/kernel": ("transformed", "classifier/1/weight"),
        f"classifier/{new.classifier.layers[1].name}/bias": ("loaded", "classifier/1/bias"),
        f"classifier/{inserted.name}/kernel": ("missing", None),
        f"classifier/{inserted.name}/bias": ("missing", None),
        f"classifier/{new.classifier.layers[4].name}/kernel": ("transformed", "classifier/3/weight"),
        f"classifier/{new.classifier.layers[4].name}/bias": ("loaded", "classifier/3/bias"),
    }
    loaded = {id(v): w.numpy() for v, w in zip(new.features.weights, old.features.weights)}
    pairs = [(new.classifier.layers[i], old.classifier.layers[j]) for i, j in ((0, 0), (1, 1), (4, 3))]
    loaded.update({id(v): w.numpy() for a, b in pairs for v, w in zip(a.weights, b.weights)})
    assert_state(new, before, loaded)


def test_a_resized_layer_in_another_layout_stays_a_mismatch(tmp_path):
    """Reshape policies think in Keras layouts: overlaying an [out, in] tensor would fill the wrong block."""
    old = cnn(0)
    path = str(tmp_path / "cnn.safetensors")
    safetensors_numpy.save_file(sequential_state(old), path)
    wide = cnn(1, head_units=24)
    before = snapshot(wide)
    report = regraft.load(wide, path, strict=False, reshape="overlay")
    status = {id(a.target.variable): a for a in report.plan.assignments}
    wide_dense, head = wide.layers[10], wide.layers[12]
    mismatched = {i for i, a in status.items() if a.status == "shape-mismatch"}
    assert mismatched == {id(wide_dense.kernel), id(head.kernel)}
    assert status[id(head.kernel)].reason.endswith("; in torch layout (reshape policies do not convert layouts)")
    # A bias has one layout in both frameworks: overlay applies to it as to any tensor.
    assert status[id(wide_dense.bias)].transform == "overlay"
    expected = {id(v): w.numpy() for v, w in zip(wide.weights, old.weights) if id(v) not in
                mismatched | {id(wide_dense.bias)}}
    expected[id(wide_dense.bias)] = np.concatenate([old.layers[10].bias.numpy(), before[id(wide_dense.bias)][16:]])
    assert_state(wide, before, expected)


@pytest.mark.parametrize("name, value, target, want", [
    ("linear_to_dense", np.arange(6).reshape(3, 2), (2, 3), np.arange(6).reshape(3, 2).T),
    ("conv_oihw_to_hwio", np.arange(24).reshape(4, 3, 2, 1), (2, 1, 3, 4), np.arange(24).reshape(4, 3, 2, 1)[:, :, 1, 0].T),
], ids=["linear", "conv"])
def test_layout_transforms_by_value(name, value, target, want):
    out = transforms.run(name, value, None, target, "k")
    assert out.shape == target
    if name == "linear_to_dense":
        assert np.array_equal(out, want)
    else:
        assert np.array_equal(out[1, 0], want)  # out[h, w, i, o] == value[o, i, h, w]


def test_layout_transforms_refuse_shapes_they_cannot_make():
    with pytest.raises(transforms.TransformError) as info:
        transforms.check("linear_to_dense", (3, 2), (3, 2), "fc/kernel")
    assert info.value.message == ("Transform 'linear_to_dense' cannot turn tensor 'fc/kernel' of shape (3, 2) into "
                                  "(3, 2): it produces (2, 3).")
    with pytest.raises(transforms.TransformError, match=r"16 output channels do not split into 3 input channels"):
        transforms.check("depthwise_oihw_to_hwcm", (16, 1, 3, 3), (3, 3, 3, 5), "dw/kernel")
    with pytest.raises(transforms.TransformError, match=r"not \(16, 2, 3, 3\)"):
        transforms.check("depthwise_oihw_to_hwcm", (16, 2, 3, 3), (3, 3, 8, 2), "dw/kernel")


def test_a_real_pytorch_state_dict(tmp_path):
    """torch's own Linear/Conv2d/BatchNorm2d/depthwise/LayerNorm: the Keras model computes what the module does."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    torch.manual_seed(0)
    nn = torch.nn
    module = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1, groups=8), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.LayerNorm(16),
        nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 10),
    )
    with torch.no_grad():  # BatchNorm statistics that are not the defaults
        for m in module:
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 2)
                m.bias.uniform_(-1, 1)
    module.eval()
    path = str(tmp_path / "torch.safetensors")
    save_file(module.state_dict(), path)
    model = cnn(1)
    layers = list(model.layers)
    model = keras.Sequential([keras.Input((12, 12, 3)), *layers[:9], keras.layers.Flatten(), *layers[9:]])
    regraft.load(model, path)
    x = np.random.default_rng(0).standard_normal((4, 12, 12, 3)).astype("float32")
    want = module(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).detach().numpy()
    got = keras.ops.convert_to_numpy(model(x, training=False))
    assert np.max(np.abs(got - want)) < 1e-5
