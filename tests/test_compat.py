"""regraft.targets._compat: every private Keras/TensorFlow name regraft reads, pinned on small real models.

One test per accessor checks it returns what regraft relies on. When a Keras release
renames or drops a name, the test of its accessor fails here, and the accessor raises
a TargetError naming the name and the Keras installed (tested at the end) instead of
regraft silently losing keys.
"""

from __future__ import annotations

import threading

import pytest

from conftest import X5

import keras  # noqa: E402  (conftest set the TF log level first)

import regraft.targets._compat as compat  # noqa: E402
from regraft.errors import TargetError  # noqa: E402
from regraft.targets.keras import _h5_walk, _walk_weights, describe, describe_with_layers, layer_graph  # noqa: E402

CACHED = (compat.functional_class, compat._to_snake_case, compat.saveable_class, compat.attribute_skipset,
          compat.attribute_sort_key)


@pytest.fixture
def fresh_caches():
    """Accessors that cache what they import start and end empty, so a patched Keras is really read."""
    for function in CACHED:
        function.cache_clear()
    yield
    for function in CACHED:
        function.cache_clear()


class Block(keras.layers.Layer):
    """A custom layer with a sub-layer and two variables of its own (one non-trainable)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.inner = keras.layers.Dense(3, name="inner")
        self.scale = self.add_weight(shape=(3,), name="scale")
        self.count = self.add_weight(shape=(), name="count", trainable=False)

    def call(self, x):
        return self.inner(x) * self.scale


class Net(keras.Model):
    """A subclassed model: an attribute block and a list attribute of heads."""

    def __init__(self):
        super().__init__(name="net")
        self.block = Block(name="block")
        self.heads = [keras.layers.Dense(2, name="h0"), keras.layers.Dense(2, name="h1")]

    def call(self, x):
        x = self.block(x)
        return self.heads[0](x) + self.heads[1](x)


class FunctionalSubclass(keras.Model):
    """A keras.Model subclass initialised with inputs and outputs: Keras makes it a Functional."""

    def __init__(self):
        inputs = keras.Input((5,))
        outputs = keras.layers.Dense(2, name="d2")(keras.layers.Dense(3, name="d1")(inputs))
        super().__init__(inputs, outputs, name="fsub")


@pytest.fixture(scope="module")
def net():
    model = Net()
    model(X5)
    return model


@pytest.fixture(scope="module")
def two_inputs():
    """A functional model with dict inputs: a, b -> d1, d2 -> add; a -> e. Outputs [add, e]."""
    a, b = keras.Input((5,), name="a"), keras.Input((5,), name="b")
    add = keras.layers.Add(name="add")
    total = add([keras.layers.Dense(3, name="d1")(a), keras.layers.Dense(3, name="d2")(b)])
    return keras.Model({"a": a, "b": b}, [total, keras.layers.Dense(2, name="e")(a)], name="two")


def _names(layers):
    return [layer.name for layer in layers]


# --------------------------------------------------------------------------- model structure


def test_keras_version_is_the_one_tested():
    assert compat.keras_version().startswith("3.")
    assert compat.keras_version() == keras.__version__


def test_functional_class_covers_functional_models_and_their_subclasses(net, two_inputs):
    assert compat.functional_class().__name__ == "Functional"
    assert compat.is_functional(two_inputs)
    assert compat.is_functional(FunctionalSubclass())  # type name 'FunctionalSubclass', still functional
    assert not compat.is_functional(keras.Sequential([keras.Input((5,)), keras.layers.Dense(2)]))
    assert not compat.is_functional(net)
    # So a functional subclass is keyed like a functional model: by layer name, tf-keras numbering.
    model = FunctionalSubclass()
    keys = {t.key: t.keys for t in describe(model)}
    assert list(keys) == ["d1/kernel", "d1/bias", "d2/kernel", "d2/bias"]
    assert keys["d2/bias"]["keras2"] == "layer_with_weights-1/bias"


def test_flatten_layers_lists_every_layer_once_depth_first(net):
    assert _names(compat.flatten_layers(net)) == ["net", "block", "inner", "h0", "h1"]
    assert _names(compat.flatten_layers(net, include_self=False, recursive=False)) == ["block", "h0", "h1"]


def test_own_variables_are_a_layers_own_trainable_then_non_trainable(net):
    assert [v.name for v in compat.own_variables(net.block)] == ["scale", "count"]
    assert [v.name for v in compat.own_variables(net.block.inner)] == ["kernel", "bias"]
    assert compat.own_variables(net) == []
    bn = keras.layers.BatchNormalization()
    bn.build((None, 3))
    assert [v.name for v in compat.own_variables(bn)] == ["gamma", "beta", "moving_mean", "moving_variance"]


def test_variable_shape_is_the_variables_shape_as_ints(net):
    variables = [*compat.own_variables(net.block), *compat.own_variables(net.block.inner)]
    assert [compat.variable_shape(v) for v in variables] == [tuple(int(d) for d in v.shape) for v in variables]
    assert all(type(d) is int for v in variables for d in compat.variable_shape(v))
    # Without the private field (another Keras), the public shape serves.
    stand_in = type("Variable", (), {"shape": (2, 3)})()
    assert compat.variable_shape(stand_in) == (2, 3)


def test_variable_dtypes_are_what_the_dtype_property_gives():
    dense = keras.layers.Dense(3, dtype="float16")
    dense.build((None, 2))
    mixed = keras.layers.Dense(3, dtype="mixed_float16")  # float32 variables, cast to float16 in an autocast scope
    mixed.build((None, 2))
    variables = [*dense.weights, *mixed.weights, keras.Variable(1, dtype="int32", trainable=False)]  # torch: an int Parameter cannot require grad
    assert compat.variable_dtypes(variables) == [v.dtype for v in variables] == [
        "float16", "float16", "float32", "float32", "int32"]
    from keras.src.backend.common.variables import AutocastScope

    with AutocastScope("float16"):
        assert compat.variable_dtypes(variables) == [v.dtype for v in variables]
        assert compat.variable_dtypes(variables)[2] == "float16"
    # Without the private field (another Keras), the public dtype serves.
    stand_in = type("Variable", (), {"dtype": "float64"})()
    assert compat.variable_dtypes([stand_in]) == ["float64"]


def test_tracked_layers_are_the_direct_sub_layers_list_items_included(net):
    assert _names(compat.tracked_layers(net)) == ["block", "h0", "h1"]
    assert _names(compat.tracked_layers(net.block)) == ["inner"]
    assert compat.tracked_layers(net.block.inner) == []


@pytest.mark.parametrize("class_name, snake", [
    ("Dense", "dense"),
    ("Conv2D", "conv2d"),
    ("BatchNormalization", "batch_normalization"),
    ("LeakyReLU", "leaky_re_lu"),
    ("MyBlock2", "my_block2"),
])
def test_snake_case_is_keras_auto_naming(class_name, snake):
    assert compat.snake_case(class_name) == snake


def test_checkpoint_children_are_what_tf_train_checkpoint_saves(net):
    # A layer kept in a plain list attribute of a model is not saved by tf.train.Checkpoint
    # (design.md, "Facts about the formats"); attributes are.
    assert sorted(compat.checkpoint_children(net)) == ["block"]
    children = compat.checkpoint_children(net.block)
    assert sorted(children) == ["count", "inner", "scale"] and children["inner"] is net.block.inner
    assert sorted(compat.checkpoint_children(net.block.inner)) == ["_kernel", "bias"]


def test_checkpoint_children_read_directly_equal_tensorflows_method(net, two_inputs):
    # checkpoint_children reads plain Keras layers' and optimizers' dependencies directly
    # (_reads_dependencies); on every object of these graphs that must give exactly what
    # TensorFlow's own _trackable_children(save_type="checkpoint") gives, in the same order.
    if compat.backend() != "tensorflow":
        pytest.skip("TensorFlow's _trackable_children exists on the TensorFlow backend only")
    optimizer = keras.optimizers.Adam()
    optimizer.build(net.trainable_variables)
    sequential = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4), keras.layers.BatchNormalization(),
                                   keras.Sequential([keras.layers.Dense(2)])])
    direct = 0
    for root in (net, two_inputs, sequential, optimizer):
        queue, seen = [root], {id(root)}
        while queue:
            obj = queue.pop(0)
            if isinstance(obj, keras.Variable):
                continue
            children = compat.checkpoint_children(obj)
            expected = dict(obj._trackable_children(save_type="checkpoint"))
            assert list(children) == list(expected), type(obj).__name__
            assert all(children[k] is expected[k] for k in expected)
            direct += compat._reads_dependencies(type(obj))
            for child in children.values():
                if id(child) not in seen:
                    seen.add(id(child))
                    queue.append(child)
    assert direct > 10  # the layers and the optimizer took the direct read
    assert not compat._reads_dependencies(type(net.heads))  # a list is another kind of object: its own method


def test_inbound_layers_are_the_call_arguments_in_order(two_inputs):
    layer = {layer.name: layer for layer in two_inputs.layers}
    assert _names(compat.inbound_layers(layer["add"])) == ["d1", "d2"]
    assert _names(compat.inbound_layers(layer["d1"])) == ["a"]
    assert _names(compat.inbound_layers(layer["a"])) == []
    graph = {g.key: g.inputs for g in layer_graph(two_inputs)}
    assert graph == {"d1": (), "d2": (), "e": (), "add": ("d1", "d2")}


def test_input_consumers_are_the_layers_an_input_feeds(two_inputs):
    a = two_inputs.inputs[0]
    assert a.name == "a"
    assert _names(compat.input_consumers(a)) == ["d1", "e"]


def test_functional_inputs_keep_the_structure_the_model_was_built_with(net, two_inputs):
    struct = compat.functional_inputs(two_inputs)
    assert isinstance(struct, dict) and sorted(struct) == ["a", "b"]
    assert struct["b"] is two_inputs.inputs[1]
    assert compat.functional_inputs(net) is None
    assert compat.functional_inputs(keras.Sequential([keras.Input((5,)), keras.layers.Dense(2)])) is None


def test_build_shapes_are_the_shapes_a_called_model_was_built_with(net):
    assert compat.build_shapes(net) == {"input_shape": (2, 5)}
    assert compat.build_shapes(Net()) is None  # not built yet
    assert compat.build_shapes(object()) is None  # not a Keras layer


# --------------------------------------------------------------------------- the weights saver's walk


def test_saveable_class_is_the_base_of_layers_models_and_optimizers(net):
    saveable = compat.saveable_class()
    assert isinstance(net, saveable) and isinstance(net.block.inner, saveable)
    assert isinstance(keras.optimizers.Adam(), saveable)
    assert not isinstance([net.block], saveable)


def test_saveable_type_tags(net, two_inputs):
    sequential = keras.Sequential([keras.Input((5,)), keras.layers.Dense(2)])
    assert [compat.saveable_type(o) for o in (net, net.block, two_inputs, sequential, keras.optimizers.Adam())] == [
        "Layer", "Layer", "Functional", "Sequential", "Optimizer"]


def test_attribute_skipset_skips_keras_own_attributes_not_user_ones():
    layer = compat.attribute_skipset("Layer")
    assert isinstance(layer, frozenset)
    assert {"_self_unconditional_dependency_names", "trainable_weights", "_layers"} <= layer
    assert not {"kernel", "inner", "heads", "block"} & layer
    assert "_operations" in compat.attribute_skipset("Functional")
    assert "_functional" in compat.attribute_skipset("Sequential")
    assert "variables" not in compat.attribute_skipset("Optimizer")  # the optimizer's variables are saved
    assert compat.attribute_skipset("Layer") is layer  # memoised
    with pytest.raises(ValueError):  # Keras' own error for a type it does not know
        compat.attribute_skipset("NoSuchType")


def test_attribute_sort_key_puts_private_names_last():
    assert sorted(["_b", "c", "a", "_a"], key=compat.attribute_sort_key()) == ["a", "c", "_a", "_b"]


def test_run_keras_weights_walk_calls_make_per_object_with_its_name(net):
    made = []

    def make(path, metadata):
        made.append((path, metadata))
        return {}

    compat.run_keras_weights_walk(net, make)
    assert made == [("", {"name": "net"}), ("block", {"name": "block"}), ("block/inner", {"name": "inner"}),
                    ("heads/dense", {"name": "h0"}), ("heads/dense_1", {"name": "h1"})]


class Groups(keras.Model):
    """Nested lists of layers: Keras 3.15 names the inner lists 'container', 'container_1'."""

    def __init__(self):
        super().__init__(name="groups")
        self.groups = [[keras.layers.Dense(3), keras.layers.Dense(3)], [keras.layers.Dense(3)], keras.layers.Dense(2)]
        self.by_name = {"x": keras.layers.Dense(2), "y": [keras.layers.Dense(2)]}

    def call(self, x):
        for group in self.groups[:2]:
            for layer in group:
                x = layer(x)
        x = self.groups[2](x)
        return self.by_name["x"](x) + self.by_name["y"][0](x)


def _written_paths(model, path) -> set[str]:
    import h5py

    model.save_weights(str(path))
    with h5py.File(path, "r") as f:
        found = []
        f.visititems(lambda key, obj: found.append(key) if isinstance(obj, h5py.Dataset) else None)
    return set(found)


@pytest.mark.parametrize("build", [Net, Groups], ids=["lists", "nested-lists"])
def test_regrafts_walk_equals_keras_walk_and_the_written_file(tmp_path, build):
    model = build()
    model(X5)
    fast, slow = {}, {}
    _walk_weights(model, lambda path, metadata: _Recorder(path, fast))
    compat.run_keras_weights_walk(model, lambda path, metadata: _Recorder(path, slow))
    assert fast == slow
    assert set(fast.values()) == _written_paths(model, tmp_path / "m.weights.h5")
    if build is Groups:
        assert "groups/container_1/dense/vars/0" in fast.values()


class _Recorder(dict):
    def __init__(self, path, out):
        super().__init__()
        self.path, self.out = path, out

    def __setitem__(self, name, value):
        self.out[id(value)] = f"{self.path}/vars/{name}" if self.path else f"vars/{name}"


def test_h5_walk_patches_nothing_and_runs_on_threads_at_once():
    from keras.src.saving import saving_lib

    before = dict(vars(saving_lib))
    models = [Net() for _ in range(4)]
    for model in models:
        model(X5)
    expected = [_h5_walk(model) for model in models]
    results: dict[int, tuple] = {}
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            for _ in range(5):
                results[i] = _h5_walk(models[i % 4])
                assert results[i] == expected[i % 4]
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    after = dict(vars(saving_lib))
    assert after.keys() == before.keys()
    assert all(after[name] is before[name] for name in before), "saving_lib's globals were changed"


# --------------------------------------------------------------------------- loud failures


def test_a_missing_private_attribute_is_a_loud_target_error(monkeypatch, net):
    with pytest.raises(TargetError) as info:
        compat.flatten_layers(object())
    message = info.value.message
    assert message.startswith("regraft reads the private `Layer._flatten_layers` (present since Keras 3.0), "
                              "but on an object of type object it is missing with Keras ")
    assert keras.__version__ in message and "pyproject.toml" in info.value.hint

    from keras.src.layers.layer import Layer

    monkeypatch.delattr(Layer, "_flatten_layers")
    with pytest.raises(TargetError, match=r"`Layer\._flatten_layers` .* on Net 'net' it is missing"):
        describe(net)


def test_a_missing_saving_lib_name_fails_the_h5_walk_loudly(monkeypatch, net, fresh_caches):
    from keras.src.saving import saving_lib

    monkeypatch.delattr(saving_lib, "get_attr_skipset")
    with pytest.raises(TargetError) as info:
        describe_with_layers(net, ("h5",))
    assert info.value.message == (
        "regraft reads the private `keras.src.saving.saving_lib.get_attr_skipset` (present since Keras 3.6), but it "
        f"is missing with Keras {keras.__version__} (TensorFlow {__import__('tensorflow').__version__}) installed.")
    # Other namespaces do not need it.
    assert describe_with_layers(net, ("object",))[0]


def test_a_model_the_weights_walk_fails_on_is_an_error_not_missing_keys():
    class Broken(keras.layers.Layer):
        def build(self, shape):
            self.w = self.add_weight(shape=(shape[-1],), name="w")

        def call(self, x):
            return x * self.w

        def save_own_variables(self, store):
            raise RuntimeError("cannot save this layer")

    inputs = keras.Input((5,))
    model = keras.Model(inputs, Broken(name="broken")(inputs), name="broken_model")
    with pytest.raises(TargetError) as info:
        describe_with_layers(model, ("h5",))
    assert info.value.message == ("Cannot list the .weights.h5 keys of model 'broken_model': Keras' weights walk "
                                  "raised RuntimeError: cannot save this layer")
    assert "model.save_weights" in info.value.hint
    assert [t.key for t in describe(model, ("object",))] == ["broken/w"]


def test_an_object_that_is_not_trackable_is_a_loud_error():
    with pytest.raises(TargetError, match=r"`Trackable\._trackable_children` .* on an object of type list it is missing"):
        compat.checkpoint_children([1, 2])


def test_placeholder_initializers_start_variables_as_zeros_and_record_the_initializer():
    import numpy as np

    original = keras.Variable._initialize_with_initializer
    recorded = []
    with compat.placeholder_initializers(lambda variable, initializer: recorded.append((variable, initializer))):
        layer = keras.layers.Dense(3, kernel_initializer="glorot_uniform", bias_initializer="ones")
        layer.build((None, 4))
    assert keras.Variable._initialize_with_initializer is original
    assert [v for v, _ in recorded] == [layer.kernel, layer.bias]
    assert [type(i).__name__ for _, i in recorded] == ["GlorotUniform", "Ones"]
    assert not np.any(layer.kernel.numpy()) and not np.any(layer.bias.numpy())
    after = keras.layers.Dense(3)
    after.build((None, 4))
    assert np.any(after.kernel.numpy())  # outside the block, initializers run as usual


def test_placeholder_initializers_put_the_method_back_after_an_error():
    original = keras.Variable._initialize_with_initializer
    with pytest.raises(RuntimeError):
        with compat.placeholder_initializers(lambda variable, initializer: None):
            raise RuntimeError("build failed")
    assert keras.Variable._initialize_with_initializer is original


def test_placeholder_initializers_fail_loudly_without_the_private_method(monkeypatch):
    for cls in keras.Variable.__mro__:
        if "_initialize_with_initializer" in vars(cls):
            monkeypatch.delattr(cls, "_initialize_with_initializer")
    with pytest.raises(TargetError, match="keras.Variable._initialize_with_initializer"):
        with compat.placeholder_initializers(lambda variable, initializer: None):
            pass


def test_empty_host_tensor_is_written_through_its_view_and_adopted_by_the_variable():
    """What the commit pass relies on: bytes written into the view are the tensor's, and a variable
    assigned the tensor (once the view is dropped) takes its buffer without copying it."""
    import numpy as np
    import tensorflow as tf

    variable = keras.Variable(np.zeros((3, 4), "float32"))
    tensor, memory = compat.empty_host_tensor((3, 4), "float32")
    assert memory.flags.writeable and memory.shape == (3, 4) and memory.dtype == np.float32
    memory[...] = np.arange(12, dtype="float32").reshape(3, 4)
    address = memory.__array_interface__["data"][0]
    assert address % 64 == 0  # TensorFlow's alignment, which its kernels require
    del memory
    variable.assign(tensor)
    assert np.array_equal(variable.numpy(), np.arange(12, dtype="float32").reshape(3, 4))
    held = tf.convert_to_tensor(variable.value)
    assert np.from_dlpack(held).__array_interface__["data"][0] == address  # adopted, not copied


@pytest.mark.parametrize("shape, dtype", [((2,), "bfloat16"), ((0, 3), "float32")])
def test_empty_host_tensor_declines_what_it_cannot_view(shape, dtype):
    """bfloat16 has no DLPack code in numpy, and an empty tensor has no memory: the caller then
    fills a numpy array instead."""
    assert compat.empty_host_tensor(shape, dtype) is None
