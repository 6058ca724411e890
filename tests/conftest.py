"""Shared helpers for the regraft tests: small real Keras models, real checkpoints, exact comparisons.

Every checkpoint used by the tests is written by TensorFlow / Keras / tf-keras
themselves into a temporary folder; nothing is hand-made except corruptions of a
real file. Comparisons are bit-for-bit (bytes, dtype and shape).
"""

from __future__ import annotations

import os

import functools

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported anywhere

import numpy as np  # noqa: E402
import pytest  # noqa: E402

# TensorFlow and Keras are imported lazily (inside the helpers below, and by the test
# modules that need them) so that the TensorFlow-free test files sharing this conftest
# do not pay for importing TensorFlow.

VALUE_SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"


# --------------------------------------------------------------------------- comparisons


def np_dtype(name) -> np.dtype:
    if str(name) == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def same_bytes(a, b) -> bool:
    """True when ``a`` and ``b`` have the same dtype, shape and bytes (NaN-safe, -0.0-sensitive)."""
    a = np.ascontiguousarray(np.asarray(a))
    b = np.ascontiguousarray(np.asarray(b))
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return np.array_equal(a.reshape(-1).view(np.uint8), b.reshape(-1).view(np.uint8))


def value_of(variable) -> np.ndarray:
    """A copy of a Keras variable's current value."""
    return np.array(variable.numpy(), copy=True)


def snapshot(model) -> dict[int, np.ndarray]:
    """Every variable's value, keyed by ``id(variable)``."""
    return {id(v): value_of(v) for v in model.weights}


def assert_state(model, before: dict[int, np.ndarray], loaded: dict[int, np.ndarray] | None = None) -> None:
    """Every variable in ``loaded`` (by id) equals its expected value bit for bit; every other
    variable equals its value in ``before`` bit for bit."""
    loaded = dict(loaded or {})
    ids = {id(v) for v in model.weights}
    assert set(loaded) <= ids, "expected values given for variables that are not in the model"
    wrong = []
    for v in model.weights:
        want = loaded[id(v)] if id(v) in loaded else before[id(v)]
        if not same_bytes(value_of(v), want):
            wrong.append(f"{v.path} ({'should be loaded' if id(v) in loaded else 'should be unchanged'})")
    assert not wrong, "variables with the wrong bytes: " + ", ".join(wrong)


def assert_all_differ(a_model, b_model) -> None:
    """Guard: every variable of ``a_model`` differs from the one at the same position in ``b_model``
    (so that a load that did nothing cannot pass a round-trip test)."""
    assert len(a_model.weights) == len(b_model.weights)
    for va, vb in zip(a_model.weights, b_model.weights):
        assert not same_bytes(value_of(va), value_of(vb)), f"{va.path} already equals {vb.path}"


def randomize(model, seed: int) -> None:
    """Give every variable distinct random values (biases, BN statistics included)."""
    rng = np.random.default_rng(seed)
    for v in model.weights:
        v.assign(rng.standard_normal(tuple(v.shape)).astype(np_dtype(v.dtype)))


# --------------------------------------------------------------------------- checkpoints


def save_tf(path, **objects) -> str:
    """``tf.train.Checkpoint(**objects).write(path)``; returns the prefix."""
    import tensorflow as tf

    return tf.train.Checkpoint(**objects).write(os.fspath(path))


def save_h5(model, path) -> str:
    path = os.fspath(path)
    model.save_weights(path)
    return path


def save_tf1(arrays: dict[str, np.ndarray], path) -> str:
    """A TF1 ``tf.compat.v1.train.Saver`` checkpoint of variables named like ``arrays``' keys."""
    import tensorflow as tf

    graph = tf.Graph()
    with graph.as_default():
        variables = [tf.compat.v1.get_variable(name, initializer=value) for name, value in arrays.items()]
        saver = tf.compat.v1.train.Saver(variables)
        with tf.compat.v1.Session(graph=graph) as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            return saver.save(sess, os.fspath(path))


def tf_reader_values(prefix: str) -> dict[str, np.ndarray]:
    """Every tensor of numbers TensorFlow's own reader returns for the checkpoint ``prefix``, by key."""
    import tensorflow as tf

    reader = tf.train.load_checkpoint(prefix)
    values = {key: np.asarray(reader.get_tensor(key)) for key in reader.get_variable_to_shape_map()}
    return {key: value for key, value in values.items() if value.dtype.kind not in "OSU"}


def tf_tensor(tf_values: dict[str, np.ndarray], entry) -> np.ndarray:
    """What TensorFlow's own reader returned (``tf_reader_values``) for a regraft entry (its key or an alias)."""
    candidates = [k + VALUE_SUFFIX for k in (entry.key, *entry.aliases)] + [entry.key]
    found = [k for k in candidates if k in tf_values]
    assert found, f"TensorFlow's reader has none of {candidates}"
    return tf_values[found[0]]


# --------------------------------------------------------------------------- models

X5 = np.linspace(-1.0, 1.0, 10, dtype="float32").reshape(2, 5)


@functools.cache
def _model_classes() -> dict[str, type]:
    """The subclassed models, defined on first use (they need Keras)."""
    import keras

    class Chain(keras.Model):
        """A subclassed model whose layers are attributes, applied in order.

        ``spec`` is a list of ``(attribute, layer)`` or ``(attribute, [layers])``; the
        object-graph keys are then ``<attribute>/...`` or ``<attribute>/<i>/...``.
        """

        def __init__(self, spec, name="chain", **kwargs):
            super().__init__(name=name, **kwargs)
            self._order = tuple(attr for attr, _ in spec)
            for attr, layer in spec:
                setattr(self, attr, layer)

        def call(self, x):
            for attr in self._order:
                layer = getattr(self, attr)
                for one in layer if isinstance(layer, (list, tuple)) else [layer]:
                    x = one(x)
            return x

    class Block(keras.layers.Layer):
        """A sub-layer owning two layers (for nested models)."""

        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.dense = keras.layers.Dense(4, name="dense")
            self.bn = keras.layers.BatchNormalization(name="bn")

        def build(self, input_shape):
            self.dense.build(input_shape)
            self.bn.build(tuple(input_shape[:-1]) + (4,))

        def call(self, x):
            return self.bn(self.dense(x))

    class NestedSub(keras.Model):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.block = Block(name="block")
            self.head = keras.layers.Dense(2, name="head")

        def call(self, x):
            return self.head(self.block(x))

    class SmallSub(keras.Model):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.dense1 = keras.layers.Dense(4, activation="relu")
            self.bn = keras.layers.BatchNormalization()
            self.dense2 = keras.layers.Dense(2)

        def call(self, x):
            return self.dense2(self.bn(self.dense1(x)))

    return {"Chain": Chain, "Block": Block, "NestedSub": NestedSub, "SmallSub": SmallSub}


def __getattr__(name: str):
    """``from conftest import Chain`` (PEP 562): the model classes are created on first access."""
    if name in ("Chain", "Block", "NestedSub", "SmallSub"):
        return _model_classes()[name]
    raise AttributeError(name)


def dense_chain(units, name="tutorial", inputs=None, dtypes=None):
    """The tutorial's subclassed model: ``dense1 -> dense2 [-> dense3]`` (dense1 with relu), built."""
    import keras

    dtypes = dtypes or [None] * len(units)
    spec = []
    for i, (u, dtype) in enumerate(zip(units, dtypes), start=1):
        kw = {"dtype": dtype} if dtype else {}
        spec.append((f"dense{i}", keras.layers.Dense(u, activation="relu" if i == 1 else None, name=f"dense{i}", **kw)))
    model = _model_classes()["Chain"](spec, name=name)
    model(X5 if inputs is None else inputs)
    return model


def functional(names=("d1", "bn", "d2"), dtype=None, units=(4, 2)):
    """``Input(5) -> Dense(4) -> BatchNormalization -> Dense(2)``, layers named ``names``."""
    import keras

    kw = {"dtype": dtype} if dtype else {}
    inputs = keras.Input((5,))
    x = keras.layers.Dense(units[0], name=names[0], **kw)(inputs)
    x = keras.layers.BatchNormalization(name=names[1], **kw)(x)
    outputs = keras.layers.Dense(units[1], name=names[2], **kw)(x)
    return keras.Model(inputs, outputs, name="functional_model")


def build(kind: str, seed: int):
    """A built model of architecture ``kind`` with seeded random values in every variable."""
    import keras

    classes = _model_classes()
    keras.utils.set_random_seed(seed)
    if kind == "subclassed":
        model = classes["SmallSub"](name="small_sub")
        model(X5)
    elif kind == "functional":
        model = functional()
    elif kind == "sequential":
        model = keras.Sequential(
            [keras.Input((5,)), keras.layers.Dense(4), keras.layers.BatchNormalization(), keras.layers.Dense(2)],
            name="seq",
        )
    elif kind == "nested_functional":
        inner = keras.Sequential(
            [keras.Input((5,)), keras.layers.Dense(4), keras.layers.BatchNormalization()], name="inner"
        )
        inputs = keras.Input((5,))
        model = keras.Model(inputs, keras.layers.Dense(2, name="head")(inner(inputs)), name="outer")
    elif kind == "nested_subclassed":
        model = classes["NestedSub"](name="nested_sub")
        model(X5)
    else:  # pragma: no cover - a typo in a test
        raise ValueError(kind)
    randomize(model, seed)
    return model


ARCHITECTURES = ("subclassed", "functional", "sequential", "nested_functional", "nested_subclassed")


@pytest.fixture(scope="session")
def tf_written(tmp_path_factory):
    """``tf_written(write, copy_to=None)``: the folder of the files that ``write``, a ``backend_cases.tf_writer``,
    writes with TensorFlow: written here on the TF backend, read from ``REGRAFT_TF_FILES`` elsewhere; skips
    without either. ``copy_to`` (a test's ``tmp_path``) gets a copy, for a test that damages the files."""
    import shutil

    import backend_cases

    done: dict[str, str] = {}

    def get(write, copy_to=None) -> str:
        key = backend_cases.writer_key(write)
        if key not in done:
            try:
                done[key] = backend_cases.written_folder(write, lambda name: str(tmp_path_factory.mktemp(name)))
            except LookupError as exc:
                pytest.skip(str(exc))
        if copy_to is None:
            return done[key]
        shutil.copytree(done[key], os.fspath(copy_to), dirs_exist_ok=True, ignore=shutil.ignore_patterns(".done"))
        return os.fspath(copy_to)

    return get


@pytest.fixture
def tf_keras():
    """The tf-keras package (Keras 2), or skip."""
    return pytest.importorskip("tf_keras")


def unnamed_stack(n_hidden: int):
    """Input(8) -> n_hidden x Dense(8) -> Dense(2), all with Keras' own names, built as in a program of its
    own (the name counters restart): alike layers that only order tells apart."""
    import keras

    keras.backend.clear_session()
    inputs = keras.Input((8,))
    x = inputs
    for _ in range(n_hidden):
        x = keras.layers.Dense(8)(x)
    return keras.Model(inputs, keras.layers.Dense(2)(x))


# --------------------------------------------------------------------------- backends without TensorFlow


def _skip_when_tests_need_tensorflow():
    """Without TensorFlow (the JAX stage), a test whose own code (or fixture) imports it to *write* a
    checkpoint is skipped.

    Only an import made by test code counts: if regraft itself imports TensorFlow
    the test fails, since regraft must load without it.
    """
    try:
        return (yield)
    except ModuleNotFoundError as exc:
        if exc.name not in ("tensorflow", "tf_keras") or _regraft_imported_it(exc):
            raise
        pytest.skip(f"writes its files with {exc.name}, which this environment lacks")


pytest_runtest_setup = pytest.hookimpl(wrapper=True)(lambda item: (yield from _skip_when_tests_need_tensorflow()))
pytest_runtest_call = pytest.hookimpl(wrapper=True)(lambda item: (yield from _skip_when_tests_need_tensorflow()))


def _regraft_imported_it(exc: BaseException) -> bool:
    import traceback

    folders = (os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src", "regraft"),
               os.path.dirname(os.path.abspath(__import__("regraft").__file__)))
    return any(frame.filename.startswith(folders) for frame in traceback.extract_tb(exc.__traceback__))
