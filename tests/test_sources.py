"""regraft.open: format detection, entries (keys, kinds, slots), exact reads, path forms, errors.

Every checkpoint here is written by TensorFlow, Keras 3 or tf-keras in a temporary
folder. Reads are compared bit for bit with TensorFlow's own reader or h5py.

The checkpoints come from ``tf_writer`` functions (``tests/backend_cases.py``), so the
tests also run on the other Keras backends, without TensorFlow: each writer records
what TensorFlow's reader returns for its checkpoint (``tf_reader.npz``) and the values of
models it trained (``values.npz``); seeded models are rebuilt here with the same values.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest

import keras
import regraft
from regraft.errors import SourceError, UnsupportedFormatError

from backend_cases import tf_writer
from conftest import X5, dense_chain, functional, randomize, same_bytes, snapshot, tf_reader_values, tf_tensor, value_of

DENSE_BN_DENSE = ("d1", "bn", "d2")


# --------------------------------------------------------------------------- checkpoints (one each per module)


def _record(folder: str, prefix: str, **values) -> None:
    """Beside the checkpoint: TensorFlow's own reading of it, and the arrays ``values`` (name -> list of arrays)."""
    np.savez(os.path.join(folder, "tf_reader.npz"), **tf_reader_values(prefix))
    np.savez(os.path.join(folder, "values.npz"),
             **{f"{name}/{i}": np.asarray(a) for name, arrays in values.items() for i, a in enumerate(arrays)})


def _recorded(folder: str, name: str) -> list[np.ndarray]:
    values = np.load(os.path.join(folder, "values.npz"))
    return [values[f"{name}/{i}"] for i in range(sum(1 for k in values.files if k.startswith(name + "/")))]


def _tf_read(folder: str) -> dict[str, np.ndarray]:
    return dict(np.load(os.path.join(folder, "tf_reader.npz")))


def _subclassed():
    keras.utils.set_random_seed(1)
    model = dense_chain((4, 3))
    randomize(model, 1)
    return model


def _functional(seed):
    keras.utils.set_random_seed(seed)
    model = functional(DENSE_BN_DENSE)
    randomize(model, seed)
    return model


@tf_writer
def object_checkpoint_files(folder):
    """A subclassed and a functional model saved as ``tf.train.Checkpoint(model=m).write``."""
    import tensorflow as tf

    for name, model in (("sub", _subclassed()), ("fun", _functional(2))):
        path = tf.train.Checkpoint(model=model).write(os.path.join(folder, name, "ckpt"))
        _record(os.path.join(folder, name), path)


@pytest.fixture(scope="module")
def subclassed_ckpt(tf_written):
    """A subclassed model saved as ``tf.train.Checkpoint(model=m).write``."""
    folder = os.path.join(tf_written(object_checkpoint_files), "sub")
    path = os.path.join(folder, "ckpt")
    return SimpleNamespace(path=path, read_with=("tf", _tf_read(folder)), model=_subclassed())


@pytest.fixture(scope="module")
def functional_ckpt(tf_written):
    """A functional model saved as ``tf.train.Checkpoint(model=m).write``."""
    folder = os.path.join(tf_written(object_checkpoint_files), "fun")
    path = os.path.join(folder, "ckpt")
    return SimpleNamespace(path=path, read_with=("tf", _tf_read(folder)), model=_functional(2))


@tf_writer
def adam_files(folder):
    """``tf.train.Checkpoint(model=m, optimizer=Adam)`` saved with ``.save()`` after one ``fit`` step,
    plus the same model's ``.weights.h5`` (which then holds the optimizer too); the trained values."""
    import tensorflow as tf

    model = _functional(3)
    opt = keras.optimizers.Adam(learning_rate=0.01)
    model.compile(optimizer=opt, loss="mse")
    model.fit(X5, np.ones((2, 2), "float32"), epochs=1, batch_size=2, verbose=0)
    path = tf.train.Checkpoint(model=model, optimizer=opt).save(os.path.join(folder, "ckpt"))
    model.save_weights(os.path.join(folder, "trained.weights.h5"))
    _record(folder, path, weights=[v.numpy() for v in model.weights], m=[v.numpy() for v in opt._momentums],
            v=[v.numpy() for v in opt._velocities])


@pytest.fixture(scope="module")
def adam_ckpt(tf_written):
    """The Adam checkpoint and ``.weights.h5``; ``model`` is the same model built here holding the trained
    values, ``m`` and ``v`` the optimizer's moments per trainable variable."""
    folder = tf_written(adam_files)
    path = os.path.join(folder, "ckpt-1")
    model = _functional(3)
    for variable, value in zip(model.weights, _recorded(folder, "weights"), strict=True):
        variable.assign(value)
    return SimpleNamespace(path=path, read_with=("tf", _tf_read(folder)), model=model, m=_recorded(folder, "m"),
                           v=_recorded(folder, "v"), h5=os.path.join(folder, "trained.weights.h5"))


@pytest.fixture(scope="module")
def h5_ckpt(adam_ckpt):
    return SimpleNamespace(path=adam_ckpt.h5, read_with=("h5", adam_ckpt.h5), model=adam_ckpt.model)


@tf_writer
def tf_keras_files(folder):
    """A tf-keras Sequential trained one step with the legacy Adam, saved in TF format and as .h5; its values."""
    import tf_keras

    tf_keras.backend.clear_session()
    tf_keras.utils.set_random_seed(4)
    model = tf_keras.Sequential(
        [
            tf_keras.layers.Dense(4, input_shape=(5,), name="d1"),
            tf_keras.layers.BatchNormalization(name="bn"),
            tf_keras.layers.Dense(2, name="d2"),
        ]
    )
    model.compile(optimizer=tf_keras.optimizers.legacy.Adam(0.01), loss="mse")
    model.fit(X5, np.ones((2, 2), "float32"), epochs=1, batch_size=2, verbose=0)
    prefix = os.path.join(folder, "weights")
    model.save_weights(prefix)  # no .h5 suffix: TensorFlow format
    model.save_weights(os.path.join(folder, "legacy.h5"))
    _record(folder, prefix, weights=[v.numpy() for v in model.weights], trainable=[v.trainable for v in model.weights])


@pytest.fixture(scope="module")
def tfkeras_ckpt(tf_written):
    """The tf-keras files; ``weights`` are its variables' values and ``trainable`` their flags, in order."""
    folder = tf_written(tf_keras_files)
    prefix = os.path.join(folder, "weights")
    return SimpleNamespace(path=prefix, read_with=("tf", _tf_read(folder)), weights=_recorded(folder, "weights"),
                           trainable=[bool(t) for t in _recorded(folder, "trainable")],
                           h5=os.path.join(folder, "legacy.h5"))


@pytest.fixture(scope="module")
def keras2_h5_ckpt(tfkeras_ckpt):
    return SimpleNamespace(path=tfkeras_ckpt.h5, read_with=("h5-keras2", tfkeras_ckpt.h5), weights=tfkeras_ckpt.weights)


@tf_writer
def tf1_files(folder):
    """A TF1 ``Saver`` checkpoint of two variables trained one step with v1 Adam; their values."""
    import tensorflow as tf

    graph = tf.Graph()
    with graph.as_default():
        tf.compat.v1.set_random_seed(5)
        x = tf.compat.v1.placeholder(tf.float32, (None, 5))
        kernel = tf.compat.v1.get_variable("d1/kernel", shape=(5, 4))
        bias = tf.compat.v1.get_variable("d1/bias", shape=(4,), initializer=tf.compat.v1.ones_initializer())
        loss = tf.reduce_sum(tf.matmul(x, kernel) + bias)
        step = tf.compat.v1.train.get_or_create_global_step()
        train = tf.compat.v1.train.AdamOptimizer(0.1).minimize(loss, global_step=step)
        saver = tf.compat.v1.train.Saver()
        with tf.compat.v1.Session(graph=graph) as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            sess.run(train, {x: X5})
            values = sess.run([kernel, bias])
            path = saver.save(sess, os.path.join(folder, "model.ckpt"))
    _record(folder, path, **{"d1/kernel": values[:1], "d1/bias": values[1:]})


@pytest.fixture(scope="module")
def tf1_ckpt(tf_written):
    folder = tf_written(tf1_files)
    path = os.path.join(folder, "model.ckpt")
    values = {name: _recorded(folder, name)[0] for name in ("d1/kernel", "d1/bias")}
    return SimpleNamespace(path=path, read_with=("tf", _tf_read(folder)), values=values)


def entries_of(path):
    with regraft.open(path) as src:
        return src.format, src.namespace, {e.key: e for e in src.entries()}


# --------------------------------------------------------------------------- entries per format


def test_subclassed_object_checkpoint_entries(subclassed_ckpt):
    fmt, ns, entries = entries_of(subclassed_ckpt.path)
    assert (fmt, ns) == ("tf-object", "object")
    m = subclassed_ckpt.model
    expected = {
        "model/dense1/_kernel": ("model/dense1", "kernel", 0, m.dense1.kernel),
        "model/dense1/bias": ("model/dense1", "bias", 1, m.dense1.bias),
        "model/dense2/_kernel": ("model/dense2", "kernel", 0, m.dense2.kernel),
        "model/dense2/bias": ("model/dense2", "bias", 1, m.dense2.bias),
    }
    assert set(entries) == set(expected)
    for key, (layer, role, index, variable) in expected.items():
        e = entries[key]
        assert (e.kind, e.layer, e.role, e.index, e.slot_of, e.aliases) == ("weight", layer, role, index, None, ())
        assert (e.shape, e.dtype) == (tuple(variable.shape), "float32")
    with regraft.open(subclassed_ckpt.path) as src:
        assert src.roots() == ["model"]
        for key, (*_, variable) in expected.items():
            assert same_bytes(src.read(key), value_of(variable)), key


def test_functional_object_checkpoint_entries(functional_ckpt):
    fmt, ns, entries = entries_of(functional_ckpt.path)
    assert (fmt, ns) == ("tf-object", "object")
    # _operations/0 is the InputLayer; 1, 2, 3 are d1, bn, d2 (model.weights order below).
    keys = [
        "model/_operations/1/_kernel",
        "model/_operations/1/bias",
        "model/_operations/2/gamma",
        "model/_operations/2/beta",
        "model/_operations/2/moving_mean",
        "model/_operations/2/moving_variance",
        "model/_operations/3/_kernel",
        "model/_operations/3/bias",
    ]
    assert sorted(entries) == sorted(keys)
    indices = [0, 1, 0, 1, 2, 3, 0, 1]
    with regraft.open(functional_ckpt.path) as src:
        for key, index, variable in zip(keys, indices, functional_ckpt.model.weights):
            e = entries[key]
            assert e.kind == "weight" and e.index == index and e.layer == key.rsplit("/", 1)[0]
            assert e.role == variable.name and e.shape == tuple(variable.shape)
            assert same_bytes(src.read(key), value_of(variable)), key


def test_checkpoint_with_adam_separates_weights_slots_and_bookkeeping(adam_ckpt):
    fmt, ns, entries = entries_of(adam_ckpt.path)
    assert (fmt, ns) == ("tf-object", "object")
    model = adam_ckpt.model
    weight_keys = {
        id(v): k
        for v, k in zip(
            model.weights,
            [
                "model/_operations/1/_kernel",
                "model/_operations/1/bias",
                "model/_operations/2/gamma",
                "model/_operations/2/beta",
                "model/_operations/2/moving_mean",
                "model/_operations/2/moving_variance",
                "model/_operations/3/_kernel",
                "model/_operations/3/bias",
            ],
        )
    }
    weights = {k: e for k, e in entries.items() if e.kind == "weight"}
    assert set(weights) == set(weight_keys.values())
    assert not any(k.startswith("optimizer/") for k in weights)

    # Trainable weights are also reachable through the optimizer: that path is an alias only.
    trainable = {id(v): i for i, v in enumerate(model.trainable_variables)}
    for v in model.weights:
        e = entries[weight_keys[id(v)]]
        want = (f"optimizer/_trainable_variables/{trainable[id(v)]}",) if id(v) in trainable else ()
        assert e.aliases == want, e.key

    # Adam moments: one m and one v per trainable weight, slot_of naming that weight's key.
    slots = {k: e for k, e in entries.items() if e.kind == "optimizer_slot"}
    assert len(slots) == 2 * len(model.trainable_variables)
    with regraft.open(adam_ckpt.path) as src:
        for i, v in enumerate(model.trainable_variables):
            for kind, moments in (("_momentums", adam_ckpt.m), ("_velocities", adam_ckpt.v)):
                alias = f"optimizer/{kind}/{i}"
                (slot,) = [e for e in slots.values() if alias in e.aliases or e.key == alias]
                assert slot.slot_of == weight_keys[id(v)], alias
                assert same_bytes(src.read(slot.key), moments[i]), alias
        # Bookkeeping: iterations, learning rate, save counter.
        bookkeeping = {k: e for k, e in entries.items() if e.kind == "bookkeeping"}
        assert set(bookkeeping) == {"optimizer/_iterations", "optimizer/_learning_rate", "save_counter"}
        assert same_bytes(src.read("optimizer/_iterations"), np.array(1, "int64"))
        assert same_bytes(src.read("save_counter"), np.array(1, "int64"))
        assert same_bytes(src.read("optimizer/_learning_rate"), np.array(0.01, "float32"))
        assert src.roots() == ["model"]
    assert len(entries) == 8 + 12 + 3


def test_tf_keras_legacy_optimizer_checkpoint(tfkeras_ckpt):
    fmt, ns, entries = entries_of(tfkeras_ckpt.path)
    assert (fmt, ns) == ("tf-keras", "keras2")
    roles = ["kernel", "bias", "gamma", "beta", "moving_mean", "moving_variance", "kernel", "bias"]
    layers = [0, 0, 1, 1, 1, 1, 2, 2]
    keys = [f"layer_with_weights-{n}/{r}" for n, r in zip(layers, roles)]
    weights = {k: e for k, e in entries.items() if e.kind == "weight"}
    assert sorted(weights) == sorted(keys)
    with regraft.open(tfkeras_ckpt.path) as src:
        for key, value in zip(keys, tfkeras_ckpt.weights, strict=True):
            assert weights[key].role == key.rsplit("/", 1)[1]
            assert weights[key].layer == key.rsplit("/", 1)[0]
            assert same_bytes(src.read(key), value), key
        # The legacy optimizer records its slots in the object graph: m and v per trainable weight.
        slots = {k: e for k, e in entries.items() if e.kind == "optimizer_slot"}
        trainable_keys = [k for k, trainable in zip(keys, tfkeras_ckpt.trainable, strict=True) if trainable]
        assert sorted(slots) == sorted(
            f"{k}/.OPTIMIZER_SLOT/optimizer/{s}" for k in trainable_keys for s in ("m", "v")
        )
        for key, slot in slots.items():
            owner = key.split("/.OPTIMIZER_SLOT/")[0]
            assert slot.slot_of == owner
            assert (slot.layer, slot.role) == (key.rsplit("/", 1)[0], key.rsplit("/", 1)[1])
            assert slot.shape == weights[owner].shape
        bookkeeping = {k for k, e in entries.items() if e.kind == "bookkeeping"}
        assert bookkeeping == {f"optimizer/{n}" for n in ("iter", "learning_rate", "beta_1", "beta_2", "decay")}
        assert same_bytes(src.read("optimizer/iter"), np.array(1, "int64"))


def test_tf1_saver_checkpoint_keys_are_variable_names(tf1_ckpt):
    fmt, ns, entries = entries_of(tf1_ckpt.path)
    assert (fmt, ns) == ("tf1-names", "name")
    kinds = {k: (e.kind, e.slot_of) for k, e in entries.items()}
    assert kinds == {
        "d1/kernel": ("weight", None),
        "d1/bias": ("weight", None),
        "d1/kernel/Adam": ("optimizer_slot", "d1/kernel"),
        "d1/kernel/Adam_1": ("optimizer_slot", "d1/kernel"),
        "d1/bias/Adam": ("optimizer_slot", "d1/bias"),
        "d1/bias/Adam_1": ("optimizer_slot", "d1/bias"),
        "beta1_power": ("bookkeeping", None),
        "beta2_power": ("bookkeeping", None),
        "global_step": ("bookkeeping", None),
    }
    assert (entries["d1/kernel"].layer, entries["d1/kernel"].role) == ("d1", "kernel")
    with regraft.open(tf1_ckpt.path) as src:
        for key, value in tf1_ckpt.values.items():
            assert same_bytes(src.read(key), value), key
        assert same_bytes(src.read("global_step"), np.array(1, "int64"))


def test_keras3_weights_h5_entries(h5_ckpt):
    fmt, ns, entries = entries_of(h5_ckpt.path)
    assert (fmt, ns) == ("keras-h5", "h5")
    groups = ["layers/dense"] * 2 + ["layers/batch_normalization"] * 4 + ["layers/dense_1"] * 2
    names = ["d1"] * 2 + ["bn"] * 4 + ["d2"] * 2
    indices = [0, 1, 0, 1, 2, 3, 0, 1]
    weights = {k: e for k, e in entries.items() if e.kind == "weight"}
    assert len(weights) == 8
    with regraft.open(h5_ckpt.path) as src:
        for group, name, index, variable in zip(groups, names, indices, h5_ckpt.model.weights):
            e = weights[f"{group}/vars/{index}"]
            assert (e.layer, e.layer_name, e.index, e.shape) == (group, name, index, tuple(variable.shape))
            assert same_bytes(src.read(e.key), value_of(variable)), e.key
    # The compiled model's optimizer state is in the file too, never as weights.
    others = {k: e.kind for k, e in entries.items() if e.kind != "weight"}
    assert set(others) == {f"optimizer/vars/{i}" for i in range(14)}
    assert {others["optimizer/vars/0"], others["optimizer/vars/1"]} == {"bookkeeping"}
    assert {others[f"optimizer/vars/{i}"] for i in range(2, 14)} == {"optimizer_slot"}


def test_keras2_h5_entries(keras2_h5_ckpt):
    fmt, ns, entries = entries_of(keras2_h5_ckpt.path)
    assert (fmt, ns) == ("keras2-h5", "name")
    roles = ["kernel", "bias", "gamma", "beta", "moving_mean", "moving_variance", "kernel", "bias"]
    names = ["d1", "d1", "bn", "bn", "bn", "bn", "d2", "d2"]
    keys = [f"{n}/{r}" for n, r in zip(names, roles)]
    assert list(entries) == keys
    with regraft.open(keras2_h5_ckpt.path) as src:
        for key, name, value in zip(keys, names, keras2_h5_ckpt.weights, strict=True):
            e = entries[key]
            assert (e.kind, e.layer, e.layer_name, e.role) == ("weight", name, name, key.rsplit("/", 1)[1])
            assert same_bytes(src.read(key), value), key


# --------------------------------------------------------------------------- reads equal TF / h5py


@pytest.mark.parametrize(
    "fixture",
    ["subclassed_ckpt", "functional_ckpt", "adam_ckpt", "tfkeras_ckpt", "tf1_ckpt", "h5_ckpt", "keras2_h5_ckpt"],
)
def test_read_equals_tensorflow_and_h5py(fixture, request):
    ckpt = request.getfixturevalue(fixture)
    how, reference = ckpt.read_with  # the .h5 file, or what TensorFlow's reader read from the checkpoint
    with regraft.open(ckpt.path) as src:
        entries = src.entries()
        assert entries
        if how != "h5":
            assert any(e.kind == "weight" for e in entries)
        with h5py.File(reference, "r") if how.startswith("h5") else _nothing() as f:
            for e in entries:
                if how == "tf":
                    expected = tf_tensor(reference, e)
                elif how == "h5":
                    expected = f[e.key][()]
                else:  # Keras 2 .h5: /<layer_name>/<weight name>:0
                    expected = f[e.layer_name][e.key + ":0"][()]
                got = src.read(e.key)
                assert same_bytes(got, expected), e.key
                assert got.shape == e.shape and got.dtype.name == e.dtype
                assert got.flags.writeable and got.flags.c_contiguous


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# --------------------------------------------------------------------------- path forms


def _saved_twice(save):
    """A model given two states in turn; ``save()`` after each; returns the model and its states."""
    keras.utils.set_random_seed(6)
    model = dense_chain((3, 2))
    states = []
    for seed in (10, 11):
        randomize(model, seed)
        states.append(snapshot(model))
        save(model)
    return model, states


@tf_writer
def two_saves_files(folder):
    """One model saved twice (values changed between) by Checkpoint.save and by a CheckpointManager."""
    import tensorflow as tf

    objects = {}

    def save(model):
        if not objects:
            objects["ckpt"] = tf.train.Checkpoint(model=model)
            objects["manager"] = tf.train.CheckpointManager(tf.train.Checkpoint(model=model),
                                                            os.path.join(folder, "managed"), max_to_keep=5)
        objects["ckpt"].save(os.path.join(folder, "saved", "ckpt"))
        objects["manager"].save()

    _saved_twice(save)


@pytest.fixture(scope="module")
def two_saves(tf_written):
    model, states = _saved_twice(lambda model: None)
    return SimpleNamespace(folder=Path(tf_written(two_saves_files)), model=model, states=states)


@pytest.mark.parametrize(
    "given, save",
    [
        ("saved/ckpt-1", 0),
        ("saved/ckpt-2", 1),
        ("saved/ckpt-1.index", 0),
        ("saved/ckpt-2.data-00000-of-00001", 1),
        ("saved", 1),  # folder with a 'checkpoint' state file: the latest
        ("managed", 1),  # CheckpointManager folder: the latest
        ("managed/ckpt-1", 0),
    ],
)
def test_path_forms(two_saves, given, save):
    path = str(two_saves.folder / given)
    model = two_saves.model
    state = two_saves.states[save]
    with regraft.open(path) as src:
        assert src.format == "tf-object" and src.path == path
        pairs = {
            "model/dense1/_kernel": model.dense1.kernel,
            "model/dense1/bias": model.dense1.bias,
            "model/dense2/_kernel": model.dense2.kernel,
            "model/dense2/bias": model.dense2.bias,
        }
        assert {e.key for e in src.entries() if e.kind == "weight"} == set(pairs)
        for key, variable in pairs.items():
            assert same_bytes(src.read(key), state[id(variable)]), key


def test_open_accepts_pathlib_and_closes(two_saves):
    src = regraft.open(two_saves.folder / "saved")
    with src:
        assert isinstance(src.path, str) and src.path.endswith("saved")
        kernel = src.read("model/dense1/_kernel")
    assert same_bytes(kernel, two_saves.states[1][id(two_saves.model.dense1.kernel)])


# --------------------------------------------------------------------------- errors


def _missing(tmp_path, tf_written):
    return str(tmp_path / "nope" / "ckpt-9"), [str(tmp_path / "nope"), "does not exist either"]


def _missing_in_existing_folder(tmp_path, tf_written):
    path = str(tmp_path / "ckpt-9")
    return path, [f"{path} does not exist.", f"{tmp_path} is where it was looked for"]


def _unrelated_folder(tmp_path, tf_written):
    folder = tmp_path / "stuff"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    (folder / "data.csv").write_text("a,b\n1,2\n")
    return str(folder), [
        f"{folder} is a folder but holds no checkpoint (found: data.csv, notes.txt)",
        "Hint: Pass a checkpoint prefix",
        "'checkpoint' state file",
    ]


def _random_hdf5(tmp_path, tf_written):
    path = tmp_path / "random.h5"
    with h5py.File(path, "w") as f:
        f["random"] = np.random.default_rng(0).standard_normal((3, 4))
    return str(path), [
        f"{path} is an HDF5 file but not Keras weights",
        "its top level holds random",
        "model.save_weights('x.weights.h5')",
    ]


def _text_named_weights_h5(tmp_path, tf_written):
    path = tmp_path / "x.weights.h5"
    path.write_text("these are not weights\n")
    return str(path), [
        f"{path} is in no format regraft reads",
        "Hint: Pass a checkpoint prefix (dir/ckpt-3), a SavedModel folder, or a .weights.h5",
    ]


def _state_file_to_nowhere(tmp_path, tf_written):
    folder = tmp_path / "stale"
    folder.mkdir()
    (folder / "checkpoint").write_text('model_checkpoint_path: "ckpt-7"\nall_model_checkpoint_paths: "ckpt-7"\n')
    return str(folder), [
        f"{folder / 'checkpoint'} names 'ckpt-7' as the latest checkpoint",
        f"{folder / 'ckpt-7'}.index does not exist",
    ]


@tf_writer
def two_prefixes_files(folder):
    import tensorflow as tf

    model = functional(("a", "b", "c"))
    for name in ("run-a", "run-b"):
        tf.train.Checkpoint(model=model).write(os.path.join(folder, name))


def _two_prefixes_no_state(tmp_path, tf_written):
    folder = tmp_path / "two"
    tf_written(two_prefixes_files, copy_to=folder)
    return str(folder), [
        f"{folder} holds 2 checkpoints (run-a, run-b) and no 'checkpoint' state file",
        f"Hint: Pass one prefix, e.g. {folder / 'run-b'}.",
    ]


@pytest.mark.parametrize(
    "make, error",
    [
        (_missing, SourceError),
        (_missing_in_existing_folder, SourceError),
        (_unrelated_folder, SourceError),
        (_random_hdf5, UnsupportedFormatError),
        (_text_named_weights_h5, UnsupportedFormatError),
        (_state_file_to_nowhere, SourceError),
        (_two_prefixes_no_state, SourceError),
    ],
    ids=lambda v: getattr(v, "__name__", "").strip("_"),
)
def test_open_errors(tmp_path, tf_written, make, error):
    path, fragments = make(tmp_path, tf_written)
    with pytest.raises(error) as info:
        regraft.open(path)
    assert isinstance(info.value, regraft.RegraftError)
    text = str(info.value)
    for fragment in fragments:
        assert fragment in text, f"{fragment!r} not in {text!r}"
    assert info.value.hint and text.endswith("Hint: " + info.value.hint)


def test_missing_path_message_is_exact(tmp_path):
    path = str(tmp_path / "ckpt-9")
    with pytest.raises(SourceError) as info:
        regraft.open(path)
    assert str(info.value) == f"{path} does not exist.\nHint: Check the path; {tmp_path} is where it was looked for."


def test_builtin_formats_are_imported_only_where_they_could_answer(tmp_path):
    """Each built-in format is listed by name with what lets the registry skip it without importing it
    (its suffixes, files only, a signature); here each such shortcut is checked against the class itself."""
    from regraft.sources import FORMATS, BuiltinFormat

    folder, missing, hdf5, other = tmp_path / "d", tmp_path / "missing", tmp_path / "a.h5", tmp_path / "b.bin"
    folder.mkdir()
    with h5py.File(hdf5, "w"):
        pass
    other.write_bytes(b"\x89HDF\r\n\x1a" + b"\x00" * 100)  # one byte short of the signature
    builtins = [f for f in FORMATS if isinstance(f, BuiltinFormat)]
    assert len(builtins) == 7
    for fmt in builtins:
        cls = fmt.load()
        assert fmt.suffixes == cls.suffixes
        for path in (folder, missing, hdf5, other):
            if cls.detect(str(path)):
                assert fmt.may_detect(str(path)), (fmt.name, path)
        if fmt.files_only:
            assert not fmt.may_detect(str(folder)) and not fmt.may_detect(str(missing))
    assert [f.name for f in builtins if f.may_detect(str(hdf5))][:1] == ["KerasH5"]
    assert "KerasH5" not in [f.name for f in builtins if f.may_detect(str(other))]
