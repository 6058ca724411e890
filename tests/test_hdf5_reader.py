"""The fast HDF5 metadata reader (``sources/_hdf5.py``) against h5py, on files written by Keras, tf-keras and h5py.

:class:`~regraft.sources.keras_h5.KerasH5` decodes a file's metadata itself when the
file stays within what h5py writes by default, and hands anything else to h5py. Each
test here says which path a file takes (``metadata_reader``) and, for the fast one,
that it gives exactly what the h5py path gives: entries (keys, shapes, dtypes, kinds,
layers), layer names and classes, and every tensor bit for bit through ``read``,
``read_into``, ``read_slice`` and ``verify``.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest

import keras
import regraft
from regraft.errors import RegraftError
from regraft.sources import _hdf5
from regraft.sources.keras_h5 import KerasH5

from conftest import randomize, same_bytes


def _h5py_only(monkeypatch):
    monkeypatch.setattr(KerasH5, "_open_fast", lambda self, path: None)


def _open_both(path, monkeypatch):
    """The file opened by each path: (fast, h5py)."""
    fast = regraft.open(path)
    with monkeypatch.context() as patch:
        _h5py_only(patch)
        slow = regraft.open(path)
    assert slow.metadata_reader == "h5py"
    return fast, slow


def assert_same_as_h5py(path, monkeypatch, reader="regraft"):
    fast, slow = _open_both(path, monkeypatch)
    with fast, slow:
        assert fast.metadata_reader == reader
        assert fast.entries() == slow.entries()
        assert fast.layers() == slow.layers()
        assert (fast.format, fast.namespace, fast.files) == (slow.format, slow.namespace, slow.files)
        for entry in fast.entries():
            want = slow.read(entry.key)
            assert same_bytes(fast.read(entry.key), want), entry.key
            fast.verify(entry.key)
            into = np.full(want.shape, 7, dtype=want.dtype)
            fast.read_into(entry.key, into)
            assert same_bytes(into, want), entry.key
            if want.ndim:
                index = tuple(slice(0, max(1, n // 2)) for n in want.shape)
                before = (fast.sliced_bytes_read, slow.sliced_bytes_read)
                assert same_bytes(fast.read_slice(entry.key, index), slow.read_slice(entry.key, index)), entry.key
                assert fast.sliced_bytes_read - before[0] == slow.sliced_bytes_read - before[1]
        return fast.entries()


class _Counter(keras.layers.Layer):
    """A layer with an int32 and a float16 variable beside a float32 one."""

    def build(self, input_shape):
        self.scale = self.add_weight(shape=(input_shape[-1],), initializer="ones", name="scale")
        self.count = self.add_weight(shape=(), initializer="zeros", dtype="int32", trainable=False, name="count")
        self.half = self.add_weight(shape=(2, 3), initializer="ones", dtype="float16", name="half")

    def call(self, x):
        return x * self.scale


class _Blocks(keras.layers.Layer):
    """Sub-layers in a list attribute: Keras writes them under ``blocks/dense_1/...``."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.blocks = [keras.layers.Dense(3), keras.layers.Dense(3)]

    def call(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def _keras3_models():
    inner = keras.Sequential([keras.Input((6,)), keras.layers.Dense(5, name="inner_d")], name="inner")
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.MaxPooling2D(name="pool")(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(6, name="d_bf16", dtype="bfloat16")(x)
    x = keras.layers.Dense(6, name="d_f16", dtype="float16")(x)
    x = inner(x)
    x = _Counter(name="counter")(x)
    x = _Blocks(name="blocks")(x)
    functional = keras.Model(inputs, x)
    tokens = keras.Input((7,), dtype="int32")
    y = keras.layers.Embedding(50, 4, name="emb")(tokens)
    y = keras.layers.LSTM(3, name="lstm")(y)
    y = keras.layers.LayerNormalization(name="ln")(y)
    recurrent = keras.Model(tokens, y)
    return {"functional": functional, "recurrent": recurrent}


@pytest.fixture(scope="module")
def keras3_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keras3")
    files = {}
    for name, model in _keras3_models().items():
        randomize(model, 3)
        files[name] = str(folder / f"{name}.weights.h5")
        model.save_weights(files[name])
    model = _keras3_models()["functional"]
    model.compile(optimizer="adam", loss="mse")
    model.fit(np.zeros((4, 8, 8, 3), "float32"), np.zeros((4, 3), "float32"), epochs=1, verbose=0)
    files["archive"] = str(folder / "trained.keras")
    model.save(files["archive"])
    return files


@pytest.mark.parametrize("name", ["functional", "recurrent", "archive"])
def test_keras3_files_read_alike(keras3_files, monkeypatch, name):
    entries = assert_same_as_h5py(keras3_files[name], monkeypatch)
    dtypes = {e.dtype for e in entries}
    if name != "recurrent":  # guard: the file holds every kind of number Keras writes
        assert {"bfloat16", "float16", "int32", "float32"} <= dtypes
    if name == "archive":  # guard: the optimizer's variables and its iteration counter
        assert {e.kind for e in entries} == {"weight", "optimizer_slot", "bookkeeping"}


def test_archive_zipped_again_reads_alike(keras3_files, monkeypatch, tmp_path):
    """A .keras whose members another tool deflated: the member is copied once, then read by the fast reader."""
    path = str(tmp_path / "deflated.keras")
    with zipfile.ZipFile(keras3_files["archive"]) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    with zipfile.ZipFile(path) as archive:  # guard
        assert archive.getinfo("model.weights.h5").compress_type == zipfile.ZIP_DEFLATED
    assert_same_as_h5py(path, monkeypatch)


def test_keras2_files_read_alike(tmp_path, monkeypatch, tf_keras):
    inner = tf_keras.Sequential([tf_keras.Input((4,)), tf_keras.layers.Dense(3, name="proj")], name="encoder")
    inputs = tf_keras.Input((4,))
    x = inner(tf_keras.layers.Dense(4, name="first")(inputs))
    x = tf_keras.layers.BatchNormalization(name="bn")(x)
    x = tf_keras.layers.Dropout(0.1, name="drop")(x)  # no weights: an empty weight_names
    model = tf_keras.Model(inputs, tf_keras.layers.Dense(2, name="last")(x))
    rng = np.random.default_rng(1)
    model.set_weights([rng.standard_normal(w.shape).astype(w.dtype) for w in model.get_weights()])
    path = str(tmp_path / "nested.h5")
    model.save_weights(path)
    entries = assert_same_as_h5py(path, monkeypatch)
    assert "encoder/proj/kernel" in {e.key for e in entries}


def test_keras2_split_layer_names_read_alike(tmp_path, monkeypatch, tf_keras):
    names = [f"layer_{i}_" + "x" * 3000 for i in range(25)]  # 75 kB of names: tf-keras splits the attribute
    old = tf_keras.Sequential([tf_keras.Input((2,))] + [tf_keras.layers.Dense(2, name=n) for n in names])
    path = str(tmp_path / "long.h5")
    old.save_weights(path)
    with h5py.File(path) as f:  # guard: the writer did split the attribute
        assert "layer_names" not in f.attrs and "layer_names1" in f.attrs
    assert len(assert_same_as_h5py(path, monkeypatch)) == 50


def _small_keras3(tmp_path) -> str:
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="d"), keras.layers.Dense(2, name="e")])
    randomize(model, 2)
    path = str(tmp_path / "small.weights.h5")
    model.save_weights(path)
    return path


def _copy_with_h5py(source: str, target: str, **kwargs) -> None:
    """Copy every group, dataset and attribute into a new file created with ``h5py.File(target, "w", **kwargs)``."""
    with h5py.File(source) as src, h5py.File(target, "w", **kwargs) as dst:
        def copy(name, obj):
            if isinstance(obj, h5py.Group):
                dst.require_group(name).attrs.update(obj.attrs)
            else:
                dst.create_dataset(name, data=obj[()])
        src.visititems(copy)


@pytest.mark.parametrize(
    "why, options",
    [("chunked", {"chunks": True}), ("compressed", {"chunks": True, "compression": "gzip"})],
)
def test_chunked_and_compressed_datasets_are_left_to_h5py(tmp_path, monkeypatch, why, options):
    path = _small_keras3(tmp_path)
    with h5py.File(path, "r+") as f:
        data = f["layers/dense/vars/0"][()]
        del f["layers/dense/vars/0"]
        f.create_dataset("layers/dense/vars/0", data=data, **options)
    assert_same_as_h5py(path, monkeypatch, reader="h5py")


def test_latest_file_format_is_left_to_h5py(tmp_path, monkeypatch):
    """``libver='latest'`` writes superblock 3, version-2 object headers and link messages: outside the subset."""
    path = str(tmp_path / "latest.weights.h5")
    _copy_with_h5py(_small_keras3(tmp_path), path, libver="latest")
    with open(path, "rb") as f:  # guard: a superblock version 3
        assert f.read(9)[8] == 3
    entries = assert_same_as_h5py(path, monkeypatch, reader="h5py")
    assert [e.key for e in entries] == ["layers/dense/vars/0", "layers/dense/vars/1", "layers/dense_1/vars/0",
                                         "layers/dense_1/vars/1"]


def test_a_file_copied_by_h5py_with_default_settings_takes_the_fast_path(tmp_path, monkeypatch):
    path = str(tmp_path / "copy.weights.h5")
    _copy_with_h5py(_small_keras3(tmp_path), path)
    assert_same_as_h5py(path, monkeypatch)


def test_damaged_metadata_never_gets_past_the_fast_reader_unnoticed(tmp_path, monkeypatch):
    """Bits flipped in the metadata: the fast reader declines, or gives what h5py gives.

    Where h5py refuses a file the fast reader takes (HDF5 checks a few fields that
    do not change what is read, such as a local heap's free list), the fast reader
    must give exactly the original file's entries and values. Fixed seed; the data
    bytes of the datasets are left alone (HDF5 cannot notice a change there).
    """
    path = _small_keras3(tmp_path)
    with h5py.File(path) as f:
        data = [(f[n].id.get_offset(), f[n].id.get_storage_size()) for n in
                ("layers/dense/vars/0", "layers/dense/vars/1", "layers/dense_1/vars/0", "layers/dense_1/vars/1")]
    with open(path, "rb") as f:
        original_image = f.read()
    with regraft.open(path) as source:
        original = (source.entries(), source.layers(), {e.key: source.read(e.key) for e in source.entries()})
    metadata = [i for i in range(len(original_image)) if not any(a <= i < a + n for a, n in data)]
    rng = random.Random(10)
    outcomes = {"declined": 0, "agreed": 0, "original": 0}
    for case in range(200):
        image = bytearray(original_image)
        for _ in range(rng.choice((1, 1, 2, 4))):
            image[rng.choice(metadata)] ^= 1 << rng.randrange(8)
        mutated = str(tmp_path / f"case{case}.weights.h5")
        with open(mutated, "wb") as f:
            f.write(image)
        try:
            fast = regraft.open(mutated)
        except RegraftError:
            outcomes["declined"] += 1  # the h5py path refused it: its message stands
            continue
        with fast:
            if fast.metadata_reader == "h5py":
                outcomes["declined"] += 1
                continue
            got = (fast.entries(), fast.layers(), {e.key: fast.read(e.key) for e in fast.entries()})
        with monkeypatch.context() as patch:
            _h5py_only(patch)
            try:
                with regraft.open(mutated) as slow:
                    want = (slow.entries(), slow.layers(), {e.key: slow.read(e.key) for e in slow.entries()})
                outcomes["agreed"] += 1
            except RegraftError:
                want = original
                outcomes["original"] += 1
        assert got[:2] == want[:2], case
        assert got[2].keys() == want[2].keys() and all(same_bytes(got[2][k], want[2][k]) for k in got[2]), case
    assert outcomes["declined"] > 20 and outcomes["agreed"] > 20, outcomes  # guard: both outcomes are exercised


def test_the_reader_only_ever_declines_damaged_or_cut_images(tmp_path):
    """Straight on the reader: any flipped bits or cut image gives a tree or :class:`NotHandled`, nothing else.

    (``KerasH5`` falls back to h5py on any exception, which would hide a reader bug; so this calls it directly.)
    """
    with open(_small_keras3(tmp_path), "rb") as f:
        original = f.read()
    rng = random.Random(11)
    images = [original[:n] for n in range(0, len(original), 37)]
    for _ in range(1500):
        image = bytearray(original)
        for _ in range(rng.choice((1, 2, 8))):
            image[rng.randrange(len(image))] ^= 1 << rng.randrange(8)
        images.append(bytes(image))
    read = 0
    for image in images:
        try:
            _, objects = _hdf5.read_tree(memoryview(image))
            for found in objects.values():
                for attribute in found.attributes.values():
                    _hdf5.attribute_value(memoryview(image), attribute, {})
            read += 1
        except _hdf5.NotHandled:
            pass
    assert 100 < read < len(images) - 100  # guard: both outcomes are exercised


def test_dataset_types_are_described_as_numpy_describes_them(tmp_path):
    """The reader describes a dataset's type without numpy; each description is what numpy says of h5py's dtype."""
    path = str(tmp_path / "types.h5")
    codes = [f"{order}{kind}{size}" for order in "<>" for kind in "iu" for size in (1, 2, 4, 8)]
    codes += [f"{order}f{size}" for order in "<>" for size in (2, 4, 8)] + ["V2", "V3"]
    with h5py.File(path, "w") as f:
        for n, code in enumerate(codes):
            f.create_dataset(f"d{n}", data=np.zeros((2, 3), dtype=code))
    with open(path, "rb") as file, h5py.File(path) as f:
        _, objects = _hdf5.read_tree(memoryview(file.read()))
        assert len(objects) == len(codes)  # guard: every dataset was read
        for name, dataset in objects.items():
            want = f[name].dtype
            assert dataset.dtype == want and np.dtype(dataset.type.code) == want, name
            assert (dataset.type.kind, dataset.type.itemsize, dataset.type.name) == (want.kind, want.itemsize, want.name)
    assert {d.type.kind for d in objects.values()} == {"i", "u", "f", "V"}  # guard


def _tf_keras_file(tf_keras, path: str) -> str:
    inputs = tf_keras.Input((4,))
    x = tf_keras.layers.Dense(4, name="first")(inputs)
    x = tf_keras.layers.Dropout(0.1, name="drop")(x)  # no weights: an empty weight_names
    model = tf_keras.Model(inputs, tf_keras.layers.BatchNormalization(name="bn")(x))
    model.save_weights(path)
    return path


@pytest.mark.parametrize("name", ["functional", "archive", "tf-keras"])
def test_listing_a_keras_file_imports_neither_numpy_nor_h5py_nor_the_tf_checkpoint_reader(
        keras3_files, monkeypatch, capsys, tmp_path, name):
    """``regraft inspect`` of a Keras 3 file (bfloat16 and optimizer variables included) or a tf-keras
    ``.h5`` in a fresh process loads none of them, and prints what the h5py path prints."""
    from regraft.cli.main import main

    if name == "tf-keras":
        path = _tf_keras_file(pytest.importorskip("tf_keras"), str(tmp_path / "model.h5"))
        with regraft.open(path) as source:  # guard: the fast reader took it
            assert source.metadata_reader == "regraft" and source.format == "keras2-h5"
    else:
        path = keras3_files[name]
    code = (
        "import sys, io, contextlib; from regraft.cli.main import main\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        "    assert main(['inspect', '--all', sys.argv[1]]) == 0 and main(['inspect', '--json', sys.argv[1]]) == 0\n"
        "loaded = sorted(m for m in ('numpy', 'h5py', 'regraft.sources.tf_checkpoint', 'regraft.sources._bundle', "
        "'regraft.sources._slices') if m in sys.modules)\n"
        "assert not loaded, loaded\n"
        "sys.stdout.write(out.getvalue())"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1] / "src"))
    fresh = subprocess.run([sys.executable, "-c", code, path], check=True, env=env, capture_output=True, text=True)
    _h5py_only(monkeypatch)
    assert main(["inspect", "--all", path]) == 0 and main(["inspect", "--json", path]) == 0
    want = capsys.readouterr().out
    assert fresh.stdout == want
    if name == "tf-keras":  # guard: what the files hold
        assert "first/kernel" in want
    else:
        assert "bfloat16" in want and ("optimizer" in want or name != "archive")


def test_attribute_lists_are_the_attribute_values_listed(tmp_path, tf_keras):
    """``attribute_list`` (tf-keras' name lists without numpy) gives ``attribute_value(...).tolist()``, or
    declines alike, on a tf-keras file and 1,500 copies with bits flipped."""
    with open(_tf_keras_file(tf_keras, str(tmp_path / "model.h5")), "rb") as f:
        original = f.read()
    rng = random.Random(12)
    images = [original]
    for _ in range(1500):
        image = bytearray(original)
        for _ in range(rng.choice((1, 2, 8))):
            image[rng.randrange(len(image))] ^= 1 << rng.randrange(8)
        images.append(bytes(image))

    def outcome(decode, *args):
        try:
            return decode(*args)
        except _hdf5.NotHandled:
            return "declined"

    listed = declined = 0
    for image in images:
        view = memoryview(image)
        try:
            _, objects = _hdf5.read_tree(view)
        except _hdf5.NotHandled:
            continue
        for found in [*objects.values(), _hdf5.read_tree(view)[0]]:
            for attribute in found.attributes.values():
                items = outcome(_hdf5.attribute_list, view, attribute, {})
                value = outcome(_hdf5.attribute_value, view, attribute, {})
                if items is None:
                    assert value == "declined" or np.asarray(value).ndim != 1
                elif items == "declined":
                    assert value == "declined"
                    declined += 1
                else:
                    want = np.asarray(value).tolist()
                    assert items == want and [type(i) for i in items] == [type(i) for i in want]
                    listed += 1
    assert listed > 1000 and declined > 10  # guard: both outcomes are exercised
