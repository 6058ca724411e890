"""The formats people hand regraft beside checkpoints: .keras archives, sharded Keras weights,
safetensors (single and sharded), .npz, SavedModel folders.

Every file is written by its real writer (Keras model.save / save_weights, the safetensors
package, numpy.savez, tf.saved_model.save, model.export) in tmp_path. Loads are checked by
value against the writer's own arrays, bit for bit; damaged files against exact error text.
The SavedModel folders come from a ``tf_writer`` (``tests/backend_cases.py``), so these tests
also run on the other Keras backends, without TensorFlow.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from conftest import assert_state, randomize, same_bytes, snapshot, value_of

import keras  # noqa: E402
import regraft  # noqa: E402
from regraft.errors import CorruptCheckpointError, SourceError, UnsupportedFormatError  # noqa: E402

from backend_cases import tf_writer  # noqa: E402


@pytest.fixture
def safetensors_numpy():
    """The safetensors package's numpy writer, or skip."""
    return pytest.importorskip("safetensors.numpy")


def chain(inserted: bool = False, seed: int = 0) -> keras.Model:
    """``Input(5) -> enc -> bn -> [ins] -> head``, named layers, seeded random values everywhere."""
    inputs = keras.Input((5,))
    x = keras.layers.Dense(4, name="enc")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    if inserted:
        x = keras.layers.Dense(4, name="ins")(x)
    model = keras.Model(inputs, keras.layers.Dense(2, name="head")(x))
    randomize(model, seed)
    return model


def by_path(model: keras.Model) -> dict[str, np.ndarray]:
    return {v.path: value_of(v) for v in model.weights}


def expect_loaded(new: keras.Model, old_values: dict[str, np.ndarray]) -> dict[int, np.ndarray]:
    """Expected values: every variable of ``new`` whose path the old model had takes the old value."""
    return {id(v): old_values[v.path] for v in new.weights if v.path in old_values}


def load_changed(path: str, old: keras.Model) -> regraft.LoadReport:
    """Load ``path`` into the changed model (a layer inserted) and check every variable's bytes."""
    new = chain(inserted=True, seed=1)
    before = snapshot(new)
    report = regraft.load(new, path, allow_missing=["ins/*"])
    assert_state(new, before, expect_loaded(new, by_path(old)))
    assert {a.target.key for a in report.plan.assignments if a.status == "missing"} == {"ins/kernel", "ins/bias"}
    return report


# --------------------------------------------------------------------------- .keras archives


def test_keras_archive_loads_into_a_changed_model(tmp_path):
    old = chain()
    path = str(tmp_path / "old.keras")
    old.save(path)
    with regraft.open(path) as src:
        assert (src.format, src.namespace) == ("keras-archive", "h5")
        assert src.config["class_name"] == "Functional"
        assert {e.layer_name for e in src.entries()} == {"enc", "bn", "head"}
    assert load_changed(path, old).plan.source_format == "keras-archive"


def test_keras_archive_reads_the_member_in_place_and_copies_a_compressed_one(tmp_path):
    old = chain()
    stored = tmp_path / "old.keras"
    old.save(stored)
    with zipfile.ZipFile(stored) as z:
        assert z.getinfo("model.weights.h5").compress_type == zipfile.ZIP_STORED  # what Keras 3.15 writes
        members = {n: z.read(n) for n in z.namelist()}
    deflated = tmp_path / "rezipped.keras"
    with zipfile.ZipFile(deflated, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    with regraft.open(str(stored)) as a, regraft.open(str(deflated)) as b:
        assert [e.key for e in a.entries()] == [e.key for e in b.entries()]
        for e in a.entries():
            assert same_bytes(a.read(e.key), b.read(e.key))
    load_changed(str(deflated), old)


def test_damaged_keras_archives(tmp_path):
    old = chain()
    path = tmp_path / "old.keras"
    old.save(path)
    data = path.read_bytes()
    cut = tmp_path / "cut.keras"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptCheckpointError) as info:
        regraft.open(str(cut))
    assert str(info.value) == (
        f"{cut} is not a readable .keras archive: File is not a zip file (a truncated or damaged zip file).\n"
        "Hint: Save it again with model.save('x.keras'), or pass the model's .weights.h5 file.")
    without = tmp_path / "without.keras"
    with zipfile.ZipFile(without, "w") as z:
        z.writestr("config.json", "{}")
        z.writestr("metadata.json", "{}")
    with pytest.raises(UnsupportedFormatError, match=r"is a zip archive without model.weights.h5 \(found: "
                                                    r"config.json, metadata.json\)"):
        regraft.open(str(without))


# --------------------------------------------------------------------------- sharded Keras weights


def wide_chain(inserted: bool = False, seed: int = 0) -> keras.Model:
    """Sizes chosen so that 0.0000935 GB shards split BatchNormalization's four variables 2 + 2."""
    inputs = keras.Input((80,))
    x = keras.layers.Dense(300, name="enc")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    if inserted:
        x = keras.layers.Dense(300, name="ins")(x)
    model = keras.Model(inputs, keras.layers.Dense(20, name="head")(x))
    randomize(model, seed)
    return model


def test_sharded_keras_weights(tmp_path):
    old = wide_chain()
    path = tmp_path / "old.weights.json"
    old.save_weights(str(path), max_shard_size=0.0000935)
    index = json.loads(path.read_text())
    shards = sorted(p.name for p in tmp_path.glob("old_*.weights.h5"))
    assert shards == ["old_00000.weights.h5", "old_00001.weights.h5"]
    assert index["weight_map"] == {"/layers/dense/vars": shards[:1],  # Keras 3.15 writes lists
                                   "/layers/batch_normalization/vars": shards,  # a layer split in two
                                   "/layers/dense_1/vars": shards[1:]}
    with regraft.open(str(path)) as src:
        assert (src.format, src.namespace) == ("keras-sharded", "h5")
        assert src.files == (str(path), *(str(tmp_path / s) for s in shards))
        assert {e.layer_name for e in src.entries()} == {"enc", "bn", "head"}
    new = wide_chain(inserted=True, seed=1)
    before = snapshot(new)
    regraft.load(new, str(path), allow_missing=["ins/*"])
    assert_state(new, before, expect_loaded(new, by_path(old)))
    (tmp_path / shards[-1]).unlink()
    with pytest.raises(SourceError) as info:
        regraft.open(str(path))
    assert str(info.value) == (
        f"{path} names shard {shards[-1]}, which does not exist in {tmp_path}.\n"
        "Hint: Keep every shard beside the .weights.json file that lists it.")
    path.write_text(path.read_text()[:40])
    with pytest.raises(CorruptCheckpointError, match="is not a sharded Keras weights file: it is not JSON"):
        regraft.open(str(path))


# --------------------------------------------------------------------------- safetensors


def test_safetensors_file_loads_by_value(tmp_path, safetensors_numpy):
    old = chain()
    path = str(tmp_path / "old.safetensors")
    safetensors_numpy.save_file(by_path(old), path, metadata={"framework": "keras"})
    with regraft.open(path) as src:
        assert (src.format, src.namespace) == ("safetensors", "name")
        assert src.metadata == {"framework": "keras"}
        for key, value in by_path(old).items():
            assert same_bytes(src.read(key), value)
    load_changed(path, old)


def test_safetensors_dtypes_round_trip(tmp_path, safetensors_numpy):
    import ml_dtypes

    arrays = {
        "a/f16": np.arange(6, dtype="float16").reshape(2, 3),
        "a/bf16": np.arange(4, dtype=ml_dtypes.bfloat16),
        "a/i64": np.array([-1, 2**40], dtype="int64"),
        "a/u8": np.arange(3, dtype="uint8"),
        "a/b": np.array([True, False]),
        "a/f64": np.zeros((0, 2)),
        "a/scalar": np.array(3.5, dtype="float32"),
    }
    path = str(tmp_path / "dtypes.safetensors")
    safetensors_numpy.save_file(arrays, path)
    with regraft.open(path) as src:
        assert {e.key: (e.shape, e.dtype) for e in src.entries()} == {
            k: (v.shape, v.dtype.name) for k, v in arrays.items()}
        for key, value in arrays.items():
            got = src.read(key)
            assert same_bytes(got, value) and got.flags.writeable


def test_sharded_safetensors(tmp_path, safetensors_numpy):
    old = chain()
    values = by_path(old)
    names = sorted(values)
    shards = {"model-00001-of-00002.safetensors": names[:3], "model-00002-of-00002.safetensors": names[3:]}
    weight_map = {}
    for shard, keys in shards.items():
        safetensors_numpy.save_file({k: values[k] for k in keys}, str(tmp_path / shard))
        weight_map.update({k: shard for k in keys})
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 1}, "weight_map": weight_map}))
    with regraft.open(str(index)) as src:
        assert src.format == "safetensors-sharded"
        assert src.files == (str(index), *(str(tmp_path / s) for s in sorted(shards)))
    load_changed(str(index), old)
    # An index naming a tensor its shard does not hold.
    weight_map[names[0]] = "model-00002-of-00002.safetensors"
    index.write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CorruptCheckpointError) as info:
        regraft.open(str(index))
    assert str(info.value).startswith(
        f"{tmp_path / 'model-00001-of-00002.safetensors'} does not hold what {index} says: "
        f"not in the index ['{names[0]}'].")
    weight_map[names[0]] = "gone.safetensors"
    index.write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(SourceError, match=f"names shard gone.safetensors, which does not exist in {tmp_path}"):
        regraft.open(str(index))


def _header_file(path, header: dict, payload: bytes) -> str:
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + payload)
    return str(path)


@pytest.mark.parametrize("header, payload, problem", [
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4,
     "tensor 'w' ends at byte {end}, past the end of the file ({size} bytes)"),
    ({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8,
     "tensor 'w' of shape (3,) and dtype F32 needs 12 bytes, its data_offsets give 8"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "v": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12,
     "tensor 'v' (bytes {v_begin}..{v_end}) overlaps the tensor before it"),
    ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8,
     "bytes {start}..{w_begin} before tensor 'w' belong to no tensor"),
    ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 8,
     "bytes {w_end}..{size} at the end belong to no tensor"),
    ({"w": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, "tensor 'w' has dtype 'Q7'; known: F64"),
    ({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4,
     "tensor 'w' has shape [-1], not a list of non-negative integers"),
    ({"w": {"dtype": "F32", "shape": [1]}}, b"\0" * 4, "tensor 'w' lacks dtype, shape or data_offsets"),
], ids=["past-end", "size", "overlap", "hole", "tail", "dtype", "shape", "fields"])
def test_safetensors_headers_are_bounded(tmp_path, header, payload, problem):
    path = _header_file(tmp_path / "bad.safetensors", header, payload)
    start = 8 + len(json.dumps(header).encode())
    size = os.path.getsize(path)
    offsets = {f"{k}_{w}": start + header[k]["data_offsets"][i] for k in header if "data_offsets" in header[k]
               for i, w in enumerate(("begin", "end"))}
    problem = problem.format(start=start, size=size, end=start + 8, **offsets)
    with pytest.raises(CorruptCheckpointError) as info:
        regraft.open(path)
    assert str(info.value).startswith(f"{path} is not a valid safetensors file: {problem}")
    assert info.value.hint


def test_safetensors_header_length_and_json(tmp_path, safetensors_numpy):
    real = tmp_path / "real.safetensors"
    safetensors_numpy.save_file({"a/w": np.ones(4, "float32")}, str(real))
    data = real.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:-3])  # truncated: the last tensor ends past the end
    with pytest.raises(CorruptCheckpointError, match=r"tensor 'a/w' ends at byte \d+, past the end of the file"):
        regraft.open(str(cut))
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(CorruptCheckpointError) as info:
        regraft.open(str(huge))
    assert str(info.value).startswith(
        f"{huge} is not a valid safetensors file: its header length field says 1000000000000 bytes, but the file "
        "holds 2 after it and headers are limited to 100000000.")
    garbled = tmp_path / "garbled.safetensors"
    garbled.write_bytes(struct.pack("<Q", 4) + b"{x: ")
    with pytest.raises(CorruptCheckpointError, match="its 4-byte header is not UTF-8 JSON"):
        regraft.open(str(garbled))
    index = tmp_path / "model.safetensors.index.json"
    index.write_text('{"weight_map": {"a": "x.bin"}}')
    with pytest.raises(CorruptCheckpointError) as info:
        regraft.open(str(index))
    assert str(info.value) == (
        f"{index} is not a sharded safetensors index: it is not JSON with a 'weight_map' of tensor name -> "
        ".safetensors file.\nHint: Pass the index written with the shards, or one shard.")
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(b"\x01\x02")
    with pytest.raises(CorruptCheckpointError, match="is not a valid safetensors file: it is 2 bytes long"):
        regraft.open(str(tiny))


def test_safetensors_and_npz_metadata_without_tensorflow(tmp_path, safetensors_numpy):
    """inspect's path: opening and listing import neither TensorFlow nor Keras, and read no tensor bytes."""
    safetensors_numpy.save_file({"features.0.weight": np.ones((3, 2, 1, 1), "float32")}, str(tmp_path / "a.safetensors"))
    np.savez(tmp_path / "b.npz", **{"dense/kernel": np.ones((2, 3), "float32")})
    code = (
        "import sys, regraft\n"
        f"for p in ({str(tmp_path / 'a.safetensors')!r}, {str(tmp_path / 'b.npz')!r}):\n"
        "    with regraft.open(p) as s: print(s.format, s.namespace, [(e.key, e.shape) for e in s.entries()])\n"
        "print(sorted(m for m in ('tensorflow', 'keras', 'torch') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": os.path.join(os.path.dirname(__file__), "..", "src")})
    assert out.stdout.splitlines() == [
        "safetensors torch [('features/0/weight', (3, 2, 1, 1))]",
        "npz name [('dense/kernel', (2, 3))]",
        "[]",
    ]


# --------------------------------------------------------------------------- npz


def test_npz_loads_by_value(tmp_path):
    old = chain()
    for save in (np.savez, np.savez_compressed):
        path = str(tmp_path / f"{save.__name__}.npz")
        save(path, **by_path(old))
        with regraft.open(path) as src:
            assert (src.format, src.namespace) == ("npz", "name")
        load_changed(path, old)


def test_damaged_npz(tmp_path):
    path = tmp_path / "a.npz"
    np.savez(path, **{"d/kernel": np.arange(1000, dtype="float32")})
    data = bytearray(path.read_bytes())
    cut = tmp_path / "cut.npz"
    cut.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(CorruptCheckpointError) as info:
        regraft.open(str(cut))
    assert str(info.value) == (f"{cut} is not a readable .npz archive: File is not a zip file (a truncated or damaged "
                               "zip file).\nHint: The file is damaged or was cut short; write it again with numpy.savez.")
    flipped = tmp_path / "flipped.npz"
    data[300] ^= 0xFF  # inside the array's bytes: the member's CRC32 no longer matches
    flipped.write_bytes(bytes(data))
    with regraft.open(str(flipped)) as src:
        with pytest.raises(CorruptCheckpointError, match=r"Cannot read array 'd/kernel' from .*flipped.npz: Bad CRC-32"):
            src.read("d/kernel")
    objects = tmp_path / "objects.npz"
    np.savez(objects, x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(UnsupportedFormatError, match="array 'x' holds Python objects"):
        regraft.open(str(objects))


# --------------------------------------------------------------------------- SavedModel folders


@tf_writer
def saved_model_files(folder):
    """``chain()`` written by ``tf.saved_model.save`` and by ``model.export``; a subclassed model exported."""
    import tensorflow as tf

    from conftest import dense_chain

    tf.saved_model.save(chain(), os.path.join(folder, "saved_model_save"))
    chain().export(os.path.join(folder, "export"), verbose=False)
    keras.backend.clear_session()
    old = dense_chain((4, 3))
    randomize(old, 0)
    old.export(os.path.join(folder, "subclassed_export"), verbose=False)


@pytest.mark.parametrize("writer", ["saved_model_save", "export"])
def test_saved_model_folders(tf_written, writer):
    old = chain()
    folder = os.path.join(tf_written(saved_model_files), writer)
    with regraft.open(folder) as src:
        if writer == "export":
            # export() keeps each variable twice (variables/N, _all_variables/N): one entry, named as recorded.
            assert (src.format, src.namespace) == ("saved-model-export", "name")
            assert sorted(e.key for e in src.entries()) == sorted(by_path(old))
            assert all({"_all_variables", "variables"} <= {a.split("/")[0] for a in e.aliases} for e in src.entries())
            for key, value in by_path(old).items():
                assert same_bytes(src.read(key), value)
        else:
            assert (src.format, src.namespace) == ("saved-model", "object")
        assert src.files[0] == os.path.join(folder, "saved_model.pb")
    with regraft.open(os.path.join(folder, "variables")) as src:
        assert src.format.startswith("saved-model")
    load_changed(folder, old)


def test_saved_model_without_variables(tf_written, tmp_path):
    tf_written(saved_model_files, copy_to=tmp_path)
    folder = tmp_path / "saved_model_save"
    for f in (folder / "variables").iterdir():
        f.unlink()
    with pytest.raises(SourceError) as info:
        regraft.open(str(folder))
    assert str(info.value).startswith(
        f"{folder} is a SavedModel without variables: {folder / 'variables' / 'variables'}.index does not exist "
        "(found: assets, fingerprint.pb, saved_model.pb, variables).")


def test_opening_reads_no_tensor_bytes(tmp_path, monkeypatch, safetensors_numpy):
    """safetensors maps a file only on the first read; npz reads only .npy headers on open."""
    from regraft.sources import npz, safetensors_file

    safetensors_numpy.save_file({"a/w": np.ones((4, 4), "float32")}, str(tmp_path / "a.safetensors"))
    np.savez(tmp_path / "b.npz", **{"a/w": np.ones((4, 4), "float32")})

    def refuse(*args, **kwargs):
        raise AssertionError("tensor bytes read while opening")

    monkeypatch.setattr(safetensors_file.SafetensorsFile, "_map", refuse)
    monkeypatch.setattr(npz.np.lib.format, "read_array", refuse)
    for name in ("a.safetensors", "b.npz"):
        with regraft.open(str(tmp_path / name)) as src:
            assert [(e.key, e.shape) for e in src.entries()] == [("a/w", (4, 4))]
            with pytest.raises(AssertionError, match="tensor bytes read while opening"):
                src.read("a/w")


def test_export_of_a_subclassed_model_is_not_keyed_by_its_shared_names(tf_written):
    """Its layers all record the model's scope ('tutorial/kernel' twice): never merged into one entry."""
    from conftest import dense_chain

    folder = os.path.join(tf_written(saved_model_files), "subclassed_export")
    with regraft.open(folder) as src:
        assert (src.format, src.namespace) == ("saved-model", "object")
        assert sorted({e.shape for e in src.entries()}) == [(3,), (4,), (4, 3), (5, 4)]
        assert len(src.entries()) == 8  # each variable twice: variables/N and _all_variables/N
    new = dense_chain((4, 3))
    before = snapshot(new)
    with pytest.raises(regraft.RegraftError, match="'_all_variables' and 'variables'"):
        regraft.load(new, folder)
    assert_state(new, before)
