"""Hardening of the HDF5 reader (issue 13, items 3-5): crafted or damaged Keras ``.h5`` files.

Every file starts as a real one written by Keras 3 (``.weights.h5``) or tf-keras
(``.h5``) in a temporary folder and is then altered with h5py the way the fuzzing
campaign did. Each must give a :class:`~regraft.RegraftError` whose exact text
names the file, the dataset or group, the problem and the fix, before any
variable of the model is touched; and files that are unusual but sound (chunked,
compressed, big-endian, compact, chunked ``layer_names``) must still load bit for
bit.
"""

from __future__ import annotations

import os
import shutil

import h5py
import numpy as np
import pytest

import keras
import regraft
from regraft.errors import CorruptCheckpointError, SourceError, UnsupportedFormatError

from conftest import assert_state, randomize, same_bytes, snapshot, value_of

_REFUSED_LINK_HINT = "Hint: Save the weights again with model.save_weights(), or replace each link by a copy of its data."
_NOT_KERAS = "Hint: Keras does not write this; save the weights again with model.save_weights()."
_NOT_NUMBERS = (
    "Hint: regraft loads numeric weights only (bool, int, float, complex, bfloat16); "
    "remove or convert this dataset, or save the weights again with model.save_weights()."
)
_ALTERED = "Hint: The file is incomplete or was altered; save the weights again with model.save_weights()."


def _model():
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="d"), keras.layers.Dense(2, name="e")])


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    """The same two-layer model saved by Keras 3 (``k3``) and by tf-keras (``k2``), with its values."""
    tf_keras = pytest.importorskip("tf_keras")
    folder = tmp_path_factory.mktemp("originals")
    model = _model()
    randomize(model, 13)
    values = [value_of(v) for v in model.weights]
    model.save_weights(str(folder / "k3.weights.h5"))
    old = tf_keras.Sequential([tf_keras.Input((4,)), tf_keras.layers.Dense(3, name="d"), tf_keras.layers.Dense(2, name="e")])
    old.set_weights(values)
    old.save_weights(str(folder / "k2.h5"))
    return {"k3": str(folder / "k3.weights.h5"), "k2": str(folder / "k2.h5"), "values": values}


def _crafted(originals, tmp_path, kind: str, mutate) -> str:
    path = str(tmp_path / ("crafted.weights.h5" if kind == "k3" else "crafted.h5"))
    shutil.copy(originals[kind], path)
    with h5py.File(path, "r+") as f:
        mutate(f)
    return path


def _replace(path: str, **dataset):
    def mutate(f):
        del f[path]
        f.create_dataset(path, **dataset)

    return mutate


def _set_attr(path: str, name: str, value):
    def mutate(f):
        f[path].attrs[name] = value

    return mutate


def _link(path: str, link):
    def mutate(f):
        del f[path]
        f[path] = link

    return mutate


def _vlen_attribute(path: str, name: str):
    def mutate(f):
        values = np.empty(2, dtype=object)
        values[0], values[1] = np.array([100, 47], "int8"), np.array([101], "int8")
        f[path].attrs.create(name, values, dtype=h5py.vlen_dtype("int8"))

    return mutate


def _compound_attribute(path: str, name: str):
    def mutate(f):
        f[path].attrs[name] = np.zeros((), dtype=[("a", "f4"), ("b", "i4")])

    return mutate


def _virtual(f):
    layout = h5py.VirtualLayout(shape=(4, 3), dtype="f4")
    layout[:] = h5py.VirtualSource("other.h5", "x", shape=(4, 3))
    del f["layers/dense/vars/0"]
    f.create_virtual_dataset("layers/dense/vars/0", layout)


def _external_storage(f):
    del f["layers/dense/vars/0"]
    f.create_dataset("layers/dense/vars/0", shape=(4, 3), dtype="f4", external=[("raw.bin", 0, 48)])


def _compressed_bomb(f):
    del f["layers/dense/vars/1"]
    data = f.create_dataset("layers/dense/vars/1", shape=(2**25,), dtype="f4", chunks=(2**20,), compression="gzip")
    data[: 2**20] = 1.0  # one chunk of 32 written; the others would read as fill values


# (id, file kind, mutation, error class, exact message with {path})
CASES = [
    ("empty name", "k3", _set_attr("layers/dense/vars", "name", ""), CorruptCheckpointError,
     "{path}: '/layers/dense/vars' has attribute name = ''; Keras writes the layer's name there, a non-empty "
     "string without '/'.\nHint: Delete or fix the attribute (with h5py: del f['/layers/dense/vars'].attrs['name']), "
     "or save the weights again with model.save_weights()."),
    ("integer name", "k3", _set_attr("layers/dense/vars", "name", 7), CorruptCheckpointError,
     "{path}: '/layers/dense/vars' has attribute name = 7; Keras writes the layer's name there, a non-empty "
     "string without '/'.\nHint: Delete or fix the attribute (with h5py: del f['/layers/dense/vars'].attrs['name']), "
     "or save the weights again with model.save_weights()."),
    ("array name", "k3", _set_attr("layers/dense/vars", "name", np.array([b"\xff\xfe"])), CorruptCheckpointError,
     "{path}: '/layers/dense/vars' has attribute name = [b'\\xff\\xfe']; Keras writes the layer's name there, a "
     "non-empty string without '/'.\nHint: Delete or fix the attribute (with h5py: del "
     "f['/layers/dense/vars'].attrs['name']), or save the weights again with model.save_weights()."),
    ("vlen strings", "k3", _replace("layers/dense/vars/0", data=np.array(["a", "b"], dtype=h5py.string_dtype())),
     CorruptCheckpointError, "{path}: '/layers/dense/vars/0' holds variable-length strings, not numbers.\n" + _NOT_NUMBERS),
    ("fixed strings", "k2", _replace("d/d/bias:0", data=np.array([b"abc"] * 3)),
     CorruptCheckpointError, "{path}: '/d/d/bias:0' holds fixed-length strings, not numbers.\n" + _NOT_NUMBERS),
    ("compound", "k3", _replace("layers/dense/vars/1", data=np.zeros(3, dtype=[("a", "f4"), ("b", "i4")])),
     CorruptCheckpointError, "{path}: '/layers/dense/vars/1' holds compound records (fields a, b), not numbers.\n" + _NOT_NUMBERS),
    ("object references", "k2", _replace("d/d/kernel:0", shape=(4, 3), dtype=h5py.ref_dtype),
     CorruptCheckpointError, "{path}: '/d/d/kernel:0' holds HDF5 object references, not numbers.\n" + _NOT_NUMBERS),
    ("array type", "k3", _replace("layers/dense/vars/1", shape=(3,), dtype=np.dtype(("f4", (2,)))),
     CorruptCheckpointError, "{path}: '/layers/dense/vars/1' holds an array type (float32 x (2,)), not numbers.\n" + _NOT_NUMBERS),
    ("opaque without bfloat16 tag", "k2", _replace("d/d/kernel:0", data=np.zeros((4, 3), "V4")), CorruptCheckpointError,
     "{path}: '/d/d/kernel:0' holds opaque 4-byte values tagged dtype=None; regraft reads Keras' opaque type only "
     "as 2-byte values tagged 'bfloat16'.\n" + _NOT_KERAS),
    ("null dataspace", "k3", _replace("layers/dense/vars/0", data=h5py.Empty("f4")), CorruptCheckpointError,
     "{path}: '/layers/dense/vars/0' holds no data (an HDF5 null dataspace), not an array.\n" + _NOT_KERAS),
    ("sparse 2**20 x 2**20", "k3", _replace("layers/dense/vars/0", shape=(2**20, 2**20), dtype="f4", chunks=(64, 64)),
     CorruptCheckpointError,
     "{path}: '/layers/dense/vars/0' declares shape (1048576, 1048576) of float32 (4,398,046,511,104 bytes) but "
     "stores 0 bytes: the rest was never written and would read as fill values.\n" + _NOT_KERAS),
    ("sparse in keras 2", "k2", _replace("d/d/kernel:0", shape=(2**20, 2**20), dtype="f4", chunks=(64, 64)),
     CorruptCheckpointError,
     "{path}: '/d/d/kernel:0' declares shape (1048576, 1048576) of float32 (4,398,046,511,104 bytes) but "
     "stores 0 bytes: the rest was never written and would read as fill values.\n" + _NOT_KERAS),
    ("beyond numpy", "k3", _replace("layers/dense/vars/0", shape=(2**40, 2**40), dtype="f8", chunks=(1, 1)),
     CorruptCheckpointError,
     "{path}: '/layers/dense/vars/0' declares shape (1099511627776, 1099511627776) of float64 "
     "(9,671,406,556,917,033,397,649,408 bytes), more than any array can hold.\n" + _NOT_KERAS),
    ("compressed, one chunk of 32 written", "k3", _compressed_bomb, CorruptCheckpointError,
     "{path}: '/layers/dense/vars/1' declares shape (33554432,) of float32 (134,217,728 bytes) from {stored} "
     "compressed bytes, more than 2048x; it would not fit in memory or was never written.\n" + _NOT_KERAS),
    ("virtual dataset", "k3", _virtual, CorruptCheckpointError,
     "{path}: '/layers/dense/vars/0' keeps its bytes in other files (a virtual dataset).\nHint: regraft reads only "
     "bytes stored in the weights file itself; save the weights again with model.save_weights()."),
    ("external raw storage", "k3", _external_storage, CorruptCheckpointError,
     "{path}: '/layers/dense/vars/0' keeps its bytes in external raw files.\nHint: regraft reads only "
     "bytes stored in the weights file itself; save the weights again with model.save_weights()."),
    ("vars is a dataset", "k3", _replace("layers/dense/vars", data=1.0), CorruptCheckpointError,
     "{path}: '/layers/dense/vars' is a dataset where Keras writes the group of a layer's variables.\n" + _NOT_KERAS),
    ("weight_names names a missing dataset", "k2", _set_attr("d", "weight_names", [b"d/ghost:0"]),
     CorruptCheckpointError, "{path}: '/d/d/ghost:0' is listed in the weight_names of '/d' but does not exist.\n" + _ALTERED),
    ("weight_names = 1.5", "k2", _set_attr("d", "weight_names", 1.5), CorruptCheckpointError,
     "{path}: '/d' has attribute 'weight_names' = 1.5; expected a list of names.\n" + _NOT_KERAS),
    ("weight_names not UTF-8", "k2", _set_attr("d", "weight_names", np.array([b"\xff\xfe"])), CorruptCheckpointError,
     "{path}: '/d' has attribute 'weight_names' with a name that is not UTF-8: b'\\xff\\xfe'.\n" + _NOT_KERAS),
    ("weight_names names a group", "k2", _set_attr("d", "weight_names", [b"d"]), CorruptCheckpointError,
     "{path}: '/d/d' is listed in the weight_names of '/d' but is not a dataset.\n" + _NOT_KERAS),
    ("weight_names of variable-length int sequences", "k2", _vlen_attribute("d", "weight_names"), CorruptCheckpointError,
     "{path}: '/d' has attribute 'weight_names' of HDF5 type class variable-length sequence, where Keras writes "
     "strings; it was not decoded.\nHint: The file is damaged or was altered; save the weights again with "
     "model.save_weights()."),
    ("name of compound type", "k3", _compound_attribute("layers/dense/vars", "name"), CorruptCheckpointError,
     "{path}: '/layers/dense/vars' has attribute 'name' of HDF5 type class compound, where Keras writes "
     "strings; it was not decoded.\nHint: The file is damaged or was altered; save the weights again with "
     "model.save_weights()."),
    ("layer_names = 7", "k2", lambda f: f.attrs.__setitem__("layer_names", 7), CorruptCheckpointError,
     "{path}: '/' has attribute 'layer_names' = 7; expected a list of names.\n" + _NOT_KERAS),
    ("layer_names names a missing group", "k2", lambda f: f.attrs.__setitem__("layer_names", [b"d", b"ghost"]),
     CorruptCheckpointError, "{path}: '/ghost' is listed in the root's layer_names but does not exist.\n" + _ALTERED),
    ("layer_names with an empty name", "k2", lambda f: f.attrs.__setitem__("layer_names", [b"d", b""]),
     CorruptCheckpointError, "{path}: '/' has attribute 'layer_names' with an empty name.\n" + _NOT_KERAS),
    ("soft-link loop", "k2", _link("d/d/kernel:0", h5py.SoftLink("/d/d/kernel:0")), UnsupportedFormatError,
     "{path} holds 1 link(s) that regraft does not follow: '/d/d/kernel:0' -> soft link to '/d/d/kernel:0'. "
     "Keras never writes links; a link can lead out of the file or in a loop.\n" + _REFUSED_LINK_HINT),
    ("dangling soft link", "k3", _link("layers/dense/vars/0", h5py.SoftLink("/nowhere")), UnsupportedFormatError,
     "{path} holds 1 link(s) that regraft does not follow: '/layers/dense/vars/0' -> soft link to '/nowhere'. "
     "Keras never writes links; a link can lead out of the file or in a loop.\n" + _REFUSED_LINK_HINT),
    ("soft link inside the file", "k3", _link("layers/dense/vars/1", h5py.SoftLink("/layers/dense_1/vars/1")),
     UnsupportedFormatError,
     "{path} holds 1 link(s) that regraft does not follow: '/layers/dense/vars/1' -> soft link to "
     "'/layers/dense_1/vars/1'. Keras never writes links; a link can lead out of the file or in a loop.\n"
     + _REFUSED_LINK_HINT),
    ("external link to a group", "k3", _link("layers/dense", h5py.ExternalLink("elsewhere.h5", "/g")),
     UnsupportedFormatError,
     "{path} holds 1 link(s) that regraft does not follow: '/layers/dense' -> external file 'elsewhere.h5', "
     "object '/g'. Keras never writes links; a link can lead out of the file or in a loop.\n" + _REFUSED_LINK_HINT),
    # fuzz seed 7 case 735: raised inside h5py's visit callback, this came out as SystemError
    ("link name not UTF-8", "k2", lambda f: f.create_group(b"d\xb4"), CorruptCheckpointError,
     "{path}: cannot read its list of groups and datasets: 'utf-8' codec can't decode byte 0xb4 in position 1: "
     "invalid start byte.\nHint: The file is damaged or was not written by Keras; save the weights again with "
     "model.save_weights()."),
]


@pytest.mark.parametrize("kind, mutate, error, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_crafted_file_is_refused_before_the_model_is_touched(originals, tmp_path, kind, mutate, error, message):
    path = _crafted(originals, tmp_path, kind, mutate)
    with pytest.raises(error) as info:
        regraft.open(path)
    stored = ""
    if "{stored}" in message:
        with h5py.File(path) as f:
            stored = f"{f['layers/dense/vars/1'].id.get_storage_size():,}"
    assert str(info.value) == message.format(path=path, stored=stored)
    model = _model()
    before = snapshot(model)
    with pytest.raises(error):
        regraft.load(model, path, strict=False)
    assert_state(model, before)


def test_external_link_out_of_the_folder_is_not_followed(originals, tmp_path):
    """Item 4: a Keras 2 .h5 whose kernel is an external link to an absolute path outside its folder."""
    outside = tmp_path / "elsewhere" / "secret.h5"
    outside.parent.mkdir()
    secret = np.full((4, 3), 7.0, "float32")
    with h5py.File(outside, "w") as f:
        f["x"] = secret
    (tmp_path / "ckpt").mkdir()
    path = _crafted(originals, tmp_path / "ckpt", "k2", _link("d/d/kernel:0", h5py.ExternalLink(str(outside), "/x")))
    with h5py.File(path) as f:  # guard: h5py itself follows the link to the outside dataset
        assert same_bytes(f["d/d/kernel:0"][()], secret)
    with pytest.raises(UnsupportedFormatError) as info:
        regraft.open(path)
    assert str(info.value) == (
        f"{path} holds 1 link(s) that regraft does not follow: '/d/d/kernel:0' -> external file '{outside}', "
        "object '/x'. Keras never writes links; a link can lead out of the file or in a loop.\n" + _REFUSED_LINK_HINT
    )


def test_damaged_attribute_type_is_refused_before_h5py_decodes_it(originals, tmp_path):
    """Item 5: two damaged bytes in the type of a real tf-keras ``weight_names`` attribute (found by flipping
    bytes near attributes) turn its variable-length strings into variable-length int sequences, and h5py
    dies with SIGSEGV decoding them. regraft refuses the type without decoding. Run in a child process so
    that a regression fails this test instead of killing the test run."""
    import subprocess
    import sys

    data = bytearray(open(originals["k2"], "rb").read())
    at = data.index(b"weight_names\x00")  # the attribute message: name padded to 16 bytes, then the datatype
    assert data[at + 16] == 0x19 and data[at + 17] == 0x01  # guard: version 1, variable-length, of strings
    data[at + 17], data[at + 18] = 0x7F, 0x7B
    path = tmp_path / "damaged.h5"
    path.write_bytes(bytes(data))
    with h5py.File(path) as f:  # guard: the damage really made it a sequence type
        assert isinstance(h5py.h5a.open(f["d"].id, b"weight_names").get_type(), h5py.h5t.TypeVlenID)
    code = "import sys, regraft\ntry:\n    regraft.open(sys.argv[1])\nexcept regraft.RegraftError as e:\n    print(e)"
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout == (
        f"{path}: '/d' has attribute 'weight_names' of HDF5 type class variable-length sequence, where Keras "
        "writes strings; it was not decoded.\nHint: The file is damaged or was altered; save the weights again "
        "with model.save_weights().\n"
    )


def test_many_links_are_counted_and_the_first_five_named(originals, tmp_path):
    def mutate(f):
        for i in range(7):
            f[f"extra/l{i}"] = h5py.SoftLink("/layers")

    path = _crafted(originals, tmp_path, "k3", mutate)
    with pytest.raises(UnsupportedFormatError) as info:
        regraft.open(path)
    named = "; ".join(f"'/extra/l{i}' -> soft link to '/layers'" for i in range(5))
    assert str(info.value).startswith(f"{path} holds 7 link(s) that regraft does not follow: {named} and 2 more. ")


def _rewrite(layout: dict):
    def mutate(f):
        names = []
        f.visit(lambda n: names.append(n) if isinstance(f[n], h5py.Dataset) else None)
        for name in names:
            data = f[name][()]
            del f[name]
            f.create_dataset(name, data=data.astype(data.dtype.newbyteorder(layout.pop("byteorder", "="))), **layout)

    return mutate


@pytest.mark.parametrize(
    "kind, layout",
    [
        ("k3", {"chunks": True, "compression": "gzip"}),
        ("k2", {"chunks": True, "compression": "lzf"}),
        ("k3", {"chunks": True}),
        ("k2", {"byteorder": ">"}),
        ("k3", {"byteorder": ">", "chunks": True, "shuffle": True, "compression": "gzip"}),
    ],
    ids=["gzip", "lzf", "chunked", "big-endian", "big-endian-shuffled-gzip"],
)
def test_sound_layouts_still_load_bit_for_bit(originals, tmp_path, kind, layout):
    """The size checks refuse only what was never written: compressed, chunked, big-endian data loads exactly."""
    path = _crafted(originals, tmp_path, kind, _rewrite(dict(layout)))
    model = _model()
    report = regraft.load(model, path)
    assert report.counts()["loaded"] == 4
    for variable, want in zip(model.weights, originals["values"]):
        assert same_bytes(value_of(variable), want), variable.path


def test_zeros_compressed_a_thousandfold_still_read(originals, tmp_path):
    """80 MiB of zeros gzip to about 80 kB: above the 64 MiB floor, within the 2048x bound (deflate's limit is 1032x)."""
    zeros = np.zeros((2**21, 10), "float32")

    def mutate(f):
        group = f.create_group("layers/big/vars")
        group.attrs["name"] = "big"
        group.create_dataset("0", data=zeros, chunks=(2**18, 10), compression="gzip", compression_opts=9)

    path = _crafted(originals, tmp_path, "k3", mutate)
    with h5py.File(path) as f:  # guard: the ratio is above 1000x, where a cruder bound would refuse it
        assert zeros.nbytes > 1000 * f["layers/big/vars/0"].id.get_storage_size()
    with regraft.open(path) as source:
        assert same_bytes(source.read("layers/big/vars/0"), zeros)


def test_compact_layout_loads(originals, tmp_path):
    def mutate(f):
        data = f["layers/dense/vars/1"][()]
        del f["layers/dense/vars/1"]
        plist = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        plist.set_layout(h5py.h5d.COMPACT)
        space = h5py.h5s.create_simple(data.shape)
        dsid = h5py.h5d.create(f["layers/dense/vars"].id, b"1", h5py.h5t.IEEE_F32LE, space, dcpl=plist)
        dsid.write(h5py.h5s.ALL, h5py.h5s.ALL, data)

    path = _crafted(originals, tmp_path, "k3", mutate)
    with h5py.File(path) as f:  # guard: the dataset really is compact
        assert f["layers/dense/vars/1"].id.get_create_plist().get_layout() == h5py.h5d.COMPACT
    with regraft.open(path) as source:
        assert same_bytes(source.read("layers/dense/vars/1"), originals["values"][1])


def test_keras2_layer_names_split_into_chunks(tmp_path, tf_keras):
    """tf-keras splits a layer_names list too long for an object header into layer_names0, layer_names1, ..."""
    names = [f"layer_{i}_" + "x" * 3000 for i in range(25)]  # 75 kB of names: more than the 64 kB header
    old = tf_keras.Sequential([tf_keras.Input((2,))] + [tf_keras.layers.Dense(2, name=n) for n in names])
    rng = np.random.default_rng(5)
    old.set_weights([rng.standard_normal(w.shape).astype("float32") for w in old.get_weights()])
    path = str(tmp_path / "long.h5")
    old.save_weights(path)
    with h5py.File(path) as f:  # guard: the writer did split the attribute
        assert "layer_names" not in f.attrs and "layer_names1" in f.attrs
    model = keras.Sequential([keras.Input((2,))] + [keras.layers.Dense(2, name=n) for n in names])
    regraft.load(model, path)
    for variable, want in zip(model.weights, old.get_weights()):
        assert same_bytes(value_of(variable), want), variable.path


def test_keras3_bfloat16_weights_load(tmp_path):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="d", dtype="bfloat16")])
    randomize(model, 4)
    path = str(tmp_path / "bf16.weights.h5")
    model.save_weights(path)
    with h5py.File(path) as f:  # guard: Keras writes bfloat16 as a tagged 2-byte opaque type
        assert f["layers/dense/vars/0"].dtype.kind == "V" and f["layers/dense/vars/0"].attrs["dtype"] == "bfloat16"
    fresh = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="d", dtype="bfloat16")])
    with regraft.open(path) as source:
        assert [e.dtype for e in source.entries()] == ["bfloat16", "bfloat16"]
    regraft.load(fresh, path)
    for a, b in zip(fresh.weights, model.weights):
        assert same_bytes(value_of(a), value_of(b)), a.path


# --------------------------------------------------------------------------- paths that cannot be read


def _unreadable_paths(tmp_path):
    cases = []
    if os.path.exists("/proc/self/mem"):
        cases.append(("/proc/self/mem", "Input/output error (errno 5)", "Pass a checkpoint file or prefix on a regular disk"))
    if os.path.exists("/proc/sys/vm/drop_caches"):  # write-only for everyone, root included
        cases.append(("/proc/sys/vm/drop_caches", "Permission denied (errno 13)", "Give your user read access"))
    return cases


def test_unreadable_paths_are_a_clean_error(tmp_path):
    cases = _unreadable_paths(tmp_path)
    if not cases:
        pytest.skip("no /proc on this system")
    for path, reason, hint in cases:
        with pytest.raises(SourceError) as info:
            regraft.open(path)
        assert str(info.value).startswith(f"Cannot read {path} to detect its format: {reason}.\nHint: {hint}")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads any file")
def test_file_without_read_permission(originals, tmp_path):
    path = tmp_path / "locked.weights.h5"
    shutil.copy(originals["k3"], path)
    path.chmod(0)
    with pytest.raises(SourceError) as info:
        regraft.open(str(path))
    assert str(info.value) == (
        f"Cannot read {path} to detect its format: Permission denied (errno 13).\n"
        f"Hint: Give your user read access to {path} (chmod u+r) or copy the file somewhere you can read it."
    )


def test_directory_named_like_weights(tmp_path):
    folder = tmp_path / "x.weights.h5"
    folder.mkdir()
    with pytest.raises(SourceError) as info:
        regraft.open(str(folder))
    assert str(info.value).startswith(f"{folder} is a folder but holds no checkpoint (found: nothing).")


def test_wrong_shapes_dtypes_and_groups_reach_the_plan_not_the_reader(originals, tmp_path):
    """A sound file that does not fit: each misfit is a plan problem (strict refuses, listing all), not a crash."""

    def mutate(f):
        del f["layers/dense/vars/0"]
        f["layers/dense/vars/0"] = np.zeros((5, 3), "f4")  # wrong shape
        del f["layers/dense/vars/1"]
        f["layers/dense/vars/1"] = np.arange(3, dtype="i8")  # integer bias: cast exactly
        del f["layers/dense_1"]  # missing group
        f["layers/dense_9/vars/0"] = np.zeros(3, "f4")  # extra group
        f["layers/dense_9/vars"].attrs["name"] = "z"

    path = _crafted(originals, tmp_path, "k3", mutate)
    model = _model()
    before = snapshot(model)
    with pytest.raises(regraft.LoadError) as info:
        regraft.load(model, path)
    assert info.value.problems == [
        "shape mismatch: tensor 'layers/dense/vars/0' has shape (5, 3); variable 'd/kernel' needs (4, 3)",
        "missing from the checkpoint (2): e/{bias,kernel}",
        "unused checkpoint tensors (1): layers/dense_9/vars/0",
    ]
    assert_state(model, before)
    report = regraft.load(model, path, strict=False)
    assert (report.counts()["cast"], report.counts()["shape-mismatch"], report.counts()["missing"]) == (1, 1, 2)
    assert_state(model, before, {id(model.weights[1]): np.arange(3, dtype="float32")})


_PROBE = "probe_layer_for_heap"  # a layer name found by its bytes in the file's global heap


def _saved_with_name(tmp_path, kind: str, name: str) -> tuple[str, list]:
    """A one-layer model saved by Keras 3 (``k3``) or tf-keras (``k2``) with layer ``name``, and its values."""
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name=name)])
    randomize(model, 21)
    values = [value_of(v) for v in model.weights]
    if kind in ("k3", "keras"):
        path = str(tmp_path / ("sound.weights.h5" if kind == "k3" else "sound.keras"))
        model.save_weights(path) if kind == "k3" else model.save(path)
    else:
        tf_keras = pytest.importorskip("tf_keras")
        old = tf_keras.Sequential([tf_keras.Input((4,)), tf_keras.layers.Dense(3, name=name)])
        old.set_weights(values)
        path = str(tmp_path / "sound.h5")
        old.save_weights(path)
    return path, values


@pytest.mark.parametrize("kind", ["k3", "k2", "keras"])
def test_damaged_global_heap_is_refused_before_h5py_spins_on_it(tmp_path, kind):
    """Item 5: HDF5 keeps variable-length strings (the layer's ``name`` in Keras 3, ``layer_names`` and
    ``weight_names`` in tf-keras) in a global heap collection, which it walks object by object. The fuzzer's
    damage gave one object index 0 and size 0: HDF5 then never advances and h5py spins forever in
    ``attrs[...]``, holding the GIL. regraft walks the collection itself first, with a bound. The read runs in a
    child process so that a regression fails this test instead of hanging the test run."""
    import subprocess
    import sys

    path, _ = _saved_with_name(tmp_path, kind, _PROBE)
    data = bytearray(open(path, "rb").read())
    heap = data.index(b"GCOL")  # the collection; the layer's name is also a link name elsewhere in the file
    name = data.index(_PROBE.encode(), heap)  # the string object's bytes; its 16-byte header comes before
    while int.from_bytes(data[name - 8 : name], "little") != len(_PROBE):  # tf-keras: skip 'probe.../kernel:0'
        name = data.index(_PROBE.encode(), name + 1)
    header = name - 16
    assert data[heap + 4] == 1 and name < heap + int.from_bytes(data[heap + 8 : heap + 16], "little")  # guard
    data[header : header + 2] = b"\0\0"  # object index 0 (free space) ...
    data[header + 8 : name] = bytes(8)  # ... of size 0
    damaged = tmp_path / {"k3": "damaged.weights.h5", "k2": "damaged.h5", "keras": "damaged.keras"}[kind]
    image = data.index(b"\x89HDF\r\n\x1a\n")  # where the HDF5 image starts: 0, or the .keras weights member
    damaged.write_bytes(bytes(data))
    code = "import sys, regraft\ntry:\n    regraft.open(sys.argv[1])\nexcept regraft.RegraftError as e:\n    print(e)"
    done = subprocess.run([sys.executable, "-c", code, str(damaged)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout == (
        f"{damaged}: 'global heap at byte {heap - image:,}' holds an object (index 0) of 0 bytes at byte "
        f"{header - image:,}, "
        "which would make HDF5 loop forever; its strings (layer and weight names) cannot be read.\n"
        "Hint: The file is damaged; save the weights again with model.save_weights().\n"
    )


def test_weights_holding_a_heap_signature_load(tmp_path):
    """The heap check looks for the collections' signature 'GCOL' outside the datasets' bytes: a kernel whose
    bytes spell a collection that HDF5 would loop on (version 1, 4096 bytes, an object of index 0 and size 0)
    is data, not metadata, and loads bit for bit."""
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1024, name="d")])
    kernel = np.zeros((4, 1024), "float32")
    kernel.reshape(-1).view("u1")[:16] = np.frombuffer(b"GCOL\x01\0\0\0" + (4096).to_bytes(8, "little"), "u1")
    bias = np.arange(1024, dtype="float32")
    model.set_weights([kernel, bias])
    path = str(tmp_path / "sound.weights.h5")
    model.save_weights(path)
    data = open(path, "rb").read()
    assert data.count(b"GCOL\x01") == 2 and data.index(b"GCOL") + 4096 < data.rindex(b"GCOL") < len(data) - 4096
    fresh = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1024, name="d")])
    regraft.load(fresh, path)
    assert same_bytes(value_of(fresh.weights[0]), kernel) and same_bytes(value_of(fresh.weights[1]), bias)
