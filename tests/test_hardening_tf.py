"""Hardening of the TensorFlow checkpoint reader (issue 13): damaged object graphs, shard
counts, state files pointing elsewhere, keys that are not UTF-8, and a fixed-seed run of
index mutations that must each end in a clean ``RegraftError`` or the original values.

Every checkpoint starts as a real file written by Keras 3 + ``tf.train.Checkpoint``,
tf-keras or TensorFlow's own ops in ``tmp_path``. Damaged object graphs are written back
by TensorFlow (``tf.raw_ops.SaveV2``, with the graph edited through TensorFlow's own
``TrackableObjectGraph`` proto), so their checksums are valid; damaged indexes are
rewritten as an SSTable with valid block checksums, so they get past the CRC.
"""

from __future__ import annotations

import os
import random
import struct
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.protobuf import tensor_bundle_pb2, trackable_object_graph_pb2

import keras
import regraft
from regraft.errors import CorruptCheckpointError, RegraftError, SourceError, UnsupportedFormatError
from regraft.sources._bundle import DAMAGED_HINT, OBJECT_GRAPH_KEY, Bundle, _read_table
from regraft.sources._crc32c import masked_crc32c

from conftest import assert_state, randomize, same_bytes, snapshot

GRAPH_HINT = f"Hint: {DAMAGED_HINT}"
LAYERS = ("model", "_functional", "_operations")  # where a Sequential's layers sit in its object graph


# --------------------------------------------------------------------------- real checkpoints


def _dense_model() -> keras.Model:
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="d"), keras.layers.Dense(2, name="e")],
                             name="seq")
    return model


@pytest.fixture(scope="module")
def keras_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A Keras 3 model trained one step with Adam, saved with its optimizer by tf.train.Checkpoint."""
    keras.utils.set_random_seed(3)
    model = _dense_model()
    model.compile(optimizer="adam", loss="mse")
    model.fit(np.ones((2, 4)), np.ones((2, 2)), verbose=0)
    randomize(model, 4)
    prefix = tf.train.Checkpoint(model=model, optimizer=model.optimizer).write(
        str(tmp_path_factory.mktemp("keras") / "ckpt"))
    return prefix, snapshot(model), model


@pytest.fixture(scope="module")
def legacy_slots_ckpt(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A TF2 checkpoint whose optimizer records ``slot_variables`` in the object graph."""
    weight = tf.Variable([1.0, 2.0])
    optimizer = tf.compat.v1.train.AdamOptimizer(0.1)
    optimizer.minimize(lambda: tf.reduce_sum(weight * weight), var_list=[weight])
    return tf.train.Checkpoint(opt=optimizer, weight=weight).write(str(tmp_path_factory.mktemp("slots") / "ckpt"))


def _tensors(prefix: str) -> dict[bytes, Any]:
    """Every tensor of a checkpoint, read by TensorFlow."""
    reader = tf.train.load_checkpoint(prefix)
    return {key.encode(): reader.get_tensor(key) for key in reader.get_variable_to_shape_map()}


def _save(prefix: str, tensors: dict[bytes, Any]) -> str:
    """Writes ``tensors`` as a checkpoint with TensorFlow's own SaveV2 op (valid checksums)."""
    names = list(tensors)
    tf.raw_ops.SaveV2(prefix=prefix, tensor_names=names, shape_and_slices=[""] * len(names),
                      tensors=[tf.constant(tensors[n]) for n in names])
    return prefix


def _graph(tensors: dict[bytes, Any]) -> trackable_object_graph_pb2.TrackableObjectGraph:
    return trackable_object_graph_pb2.TrackableObjectGraph.FromString(tensors[OBJECT_GRAPH_KEY.encode()])


def _with_graph(source: str, prefix: Path, edit: Callable[[Any], None]) -> str:
    """A copy of checkpoint ``source`` whose object graph was changed by ``edit`` (TF writes it)."""
    tensors = _tensors(source)
    graph = _graph(tensors)
    edit(graph)
    tensors[OBJECT_GRAPH_KEY.encode()] = graph.SerializeToString()
    return _save(str(prefix), tensors)


def _node(graph: Any, *path: str) -> tuple[int, Any]:
    """The id and proto of the node reached from the root by child names ``path``."""
    node_id = 0
    for name in path:
        node_id = next(c.node_id for c in graph.nodes[node_id].children if c.local_name == name)
    return node_id, graph.nodes[node_id]


# --------------------------------------------------------------------------- an SSTable writer


def _block(entries: list[tuple[bytes, bytes]]) -> bytes:
    """One uncompressed block, every key in full (a single restart point at 0)."""
    out = bytearray()
    for key, value in entries:
        out += _varint(0) + _varint(len(key)) + _varint(len(value)) + key + value
    return bytes(out) + struct.pack("<II", 0, 1)


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def _write_index(path: str, entries: list[tuple[bytes, bytes]]) -> None:
    """Writes ``entries`` as a LevelDB table the way TensorFlow's table builder lays it out."""
    out = bytearray()

    def add(block: bytes) -> bytes:
        handle = _varint(len(out)) + _varint(len(block))
        out.extend(block + b"\x00" + struct.pack("<I", masked_crc32c(block + b"\x00")))
        return handle

    data = add(_block(entries))
    meta = add(_block([]))
    index = add(_block([(entries[-1][0] if entries else b"", data)]))
    footer = meta + index
    out += footer + b"\x00" * (40 - len(footer)) + struct.pack("<Q", 0xDB4775248B80FB57)
    Path(path).write_bytes(bytes(out))


def _index_entries(prefix: str) -> list[tuple[bytes, bytes]]:
    return _read_table(Path(prefix + ".index").read_bytes(), prefix + ".index")


def _copy(prefix: str, folder: Path) -> str:
    """A copy of a checkpoint's files in ``folder``; returns the new prefix."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in os.listdir(os.path.dirname(prefix)):
        if name.startswith(os.path.basename(prefix) + "."):
            (folder / name).write_bytes(Path(os.path.dirname(prefix), name).read_bytes())
    return str(folder / os.path.basename(prefix))


def _with_header(source: str, folder: Path, **fields: int) -> str:
    """A copy of ``source`` whose bundle header has ``fields`` changed (block checksums valid)."""
    prefix = _copy(source, folder)
    entries = _index_entries(prefix)
    header = tensor_bundle_pb2.BundleHeaderProto.FromString(entries[0][1])
    for name, value in fields.items():
        setattr(header, name, value)
    _write_index(prefix + ".index", [(b"", header.SerializeToString())] + entries[1:])
    return prefix


def test_the_index_writer_writes_what_tensorflow_reads(keras_ckpt: Any, tmp_path: Path) -> None:
    prefix = _copy(keras_ckpt[0], tmp_path)
    _write_index(prefix + ".index", _index_entries(keras_ckpt[0]))
    assert Path(prefix + ".index").read_bytes() != Path(keras_ckpt[0] + ".index").read_bytes()
    theirs, ours = _tensors(keras_ckpt[0]), _tensors(prefix)
    assert theirs.keys() == ours.keys()
    assert all(same_bytes(theirs[k], ours[k]) for k in theirs if k != OBJECT_GRAPH_KEY.encode())


# --------------------------------------------------------------------------- 1. object-graph references


def _graph_message(prefix: str, problem: str) -> str:
    return (f"{prefix}.data-00000-of-00001: the object graph of checkpoint {prefix} is invalid: {problem}.\n"
            + GRAPH_HINT)


def _child_to(node_id: Callable[[int], int]) -> Callable[[Any], None]:
    def edit(graph: Any) -> None:
        _, layer = _node(graph, *LAYERS)
        layer.children[0].node_id = node_id(len(graph.nodes))

    return edit


@pytest.mark.parametrize(
    "edit, problem",
    [
        (_child_to(lambda n: n + 5),
         "child '0' pointing to node {n_plus_5}, but the graph has {n} nodes (0 to {last})"),
        (_child_to(lambda n: -1), "child '0' pointing to node -1, but the graph has {n} nodes (0 to {last})"),
    ],
    ids=["past-the-end", "minus-one"],
)
def test_child_node_id_out_of_range(keras_ckpt: Any, tmp_path: Path, edit: Any, problem: str) -> None:
    prefix = _with_graph(keras_ckpt[0], tmp_path / "ckpt", edit)
    graph = _graph(_tensors(keras_ckpt[0]))
    n = len(graph.nodes)
    owner, _ = _node(graph, *LAYERS)
    with pytest.raises(CorruptCheckpointError) as info:
        regraft.open(prefix)
    detail = problem.format(n=n, n_plus_5=n + 5, last=n - 1)
    assert str(info.value) == _graph_message(prefix, f"node {owner} has {detail}")


def test_inspect_of_a_damaged_graph_prints_one_error(keras_ckpt: Any, tmp_path: Path) -> None:
    prefix = _with_graph(keras_ckpt[0], tmp_path / "ckpt", _child_to(lambda n: n + 5))
    run = subprocess.run([sys.executable, "-m", "regraft", "inspect", prefix], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": "src"}, timeout=300)
    assert run.returncode == 2 and run.stdout == ""
    assert "Traceback" not in run.stderr
    assert run.stderr.startswith(f"Error: {prefix}.data-00000-of-00001: the object graph of checkpoint")
    assert run.stderr.endswith(GRAPH_HINT + "\n")


@pytest.mark.parametrize("field", ["original_variable_node_id", "slot_variable_node_id"])
@pytest.mark.parametrize("value", [-1, 10_000])
def test_slot_variable_node_ids_out_of_range(legacy_slots_ckpt: str, tmp_path: Path, field: str, value: int) -> None:
    def edit(graph: Any) -> None:
        _, opt = _node(graph, "opt")
        assert len(opt.slot_variables) == 2  # Adam's m and v of the one weight
        setattr(opt.slot_variables[0], field, value)

    prefix = _with_graph(legacy_slots_ckpt, tmp_path / "ckpt", edit)
    graph = _graph(_tensors(prefix))
    owner, opt = _node(graph, "opt")
    what = "slot variable 'm' of a variable" if field == "original_variable_node_id" else "slot variable 'm'"
    n = len(graph.nodes)
    with pytest.raises(CorruptCheckpointError) as info:
        regraft.open(prefix)
    assert str(info.value) == _graph_message(
        prefix, f"node {owner} has {what} pointing to node {value}, but the graph has {n} nodes (0 to {n - 1})")


def test_attribute_key_pointing_nowhere(keras_ckpt: Any, tmp_path: Path) -> None:
    def edit(graph: Any) -> None:
        _, kernel = _node(graph, *LAYERS, "1", "_kernel")
        kernel.attributes[0].checkpoint_key = "model/nowhere/.ATTRIBUTES/VARIABLE_VALUE"

    prefix = _with_graph(keras_ckpt[0], tmp_path / "ckpt", edit)
    owner, _ = _node(_graph(_tensors(prefix)), *LAYERS, "1", "_kernel")
    with pytest.raises(CorruptCheckpointError) as info:
        regraft.open(prefix)
    assert str(info.value) == _graph_message(
        prefix, f"node {owner} saves its VARIABLE_VALUE under key 'model/nowhere/.ATTRIBUTES/VARIABLE_VALUE', "
        f"which {prefix}.index does not hold")


def test_a_table_saved_under_suffixed_keys_is_not_a_key_pointing_nowhere(tmp_path: Path) -> None:
    """A hash table's attribute "table" is saved as "…/table-keys" and "…/table-values"."""
    module = tf.Module()
    module.v = tf.Variable(np.arange(6, dtype=np.float32).reshape(2, 3))
    module.t = tf.lookup.experimental.MutableHashTable(tf.string, tf.int64, -1)
    module.t.insert(tf.constant(["a"]), tf.constant([1], tf.int64))
    prefix = tf.train.Checkpoint(m=module).write(str(tmp_path / "ckpt"))
    graph = _graph(_tensors(prefix))
    _, table = _node(graph, "m", "t")
    assert [a.checkpoint_key for a in table.attributes] == ["m/t/.ATTRIBUTES/table"]
    assert {b"m/t/.ATTRIBUTES/table-keys", b"m/t/.ATTRIBUTES/table-values"} <= set(_tensors(prefix))
    with regraft.open(prefix) as src:
        assert [e.key for e in src.entries() if e.kind == "weight"] == ["m/v"]
        assert same_bytes(src.read("m/v"), module.v.numpy())


def test_duplicate_child_names(keras_ckpt: Any, tmp_path: Path) -> None:
    def edit(graph: Any) -> None:
        _, layers = _node(graph, *LAYERS)
        layers.children[1].local_name = "0"  # two layers both called '0': one would hide the other

    prefix = _with_graph(keras_ckpt[0], tmp_path / "ckpt", edit)
    graph = _graph(_tensors(prefix))
    owner, layers = _node(graph, *LAYERS)
    a, b = layers.children[0].node_id, layers.children[1].node_id
    with pytest.raises(CorruptCheckpointError) as info:
        regraft.open(prefix)
    assert str(info.value) == _graph_message(prefix, f"node {owner} has two children named '0' (nodes {a} and {b})")


def test_two_paths_naming_one_key(keras_ckpt: Any, tmp_path: Path) -> None:
    def edit(graph: Any) -> None:  # a second VARIABLE_VALUE on one variable: two tensors, one path
        _, kernel = _node(graph, *LAYERS, "1", "_kernel")
        _, bias = _node(graph, *LAYERS, "1", "bias")
        kernel.attributes.add().CopyFrom(bias.attributes[0])

    prefix = _with_graph(keras_ckpt[0], tmp_path / "ckpt", edit)
    owner, kernel = _node(_graph(_tensors(prefix)), *LAYERS, "1", "_kernel")
    first, second = (a.checkpoint_key for a in kernel.attributes)  # TF keys them by the optimizer's path
    with pytest.raises(CorruptCheckpointError) as info:
        regraft.open(prefix)
    assert str(info.value) == _graph_message(
        prefix, f"node {owner} saves tensor '{second}' under the path 'model/_functional/_operations/1/_kernel', "
        f"which already names tensor '{first}'")


def test_a_cycle_in_the_graph_is_followed_once(keras_ckpt: Any, tmp_path: Path) -> None:
    def edit(graph: Any) -> None:  # layer 0 gets an edge back to the model that holds it
        model_id, _ = _node(graph, "model")
        _, layer = _node(graph, *LAYERS, "1")
        layer.children.add(node_id=model_id, local_name="back")

    prefix = _with_graph(keras_ckpt[0], tmp_path / "ckpt", edit)
    with regraft.open(keras_ckpt[0]) as before, regraft.open(prefix) as after:
        weights = [e for e in before.entries() if e.kind == "weight"]
        assert [e.key for e in after.entries() if e.kind == "weight"] == [e.key for e in weights]
        for e in weights:
            assert same_bytes(after.read(e.key), before.read(e.key)), e.key
    model = _dense_model()
    before_load = snapshot(model)
    regraft.load(model, prefix)
    _, state, original = keras_ckpt
    assert_state(model, before_load, {id(v): state[id(o)] for v, o in zip(model.weights, original.weights)})


# --------------------------------------------------------------------------- 2. shard counts


@pytest.mark.parametrize("count", [2**31 - 1, 10**6, 2])
def test_a_claimed_shard_count_is_checked_with_one_listing(keras_ckpt: Any, tmp_path: Path, count: int) -> None:
    prefix = _with_header(keras_ckpt[0], tmp_path, num_shards=count)
    os.rename(prefix + ".data-00000-of-00001", f"{prefix}.data-00000-of-{count:05d}")
    started = time.perf_counter()
    with pytest.raises(SourceError) as info:
        Bundle(prefix)
    elapsed = time.perf_counter() - started
    hint = ("Copy every PREFIX.data-*-of-* file together with the .index file." if count == 2 else
            "The folder holds 1 of them: a count so far above the files present means the index is damaged; "
            "re-save the checkpoint or restore the file from a backup.")
    more = f" (and {count - 2:,} more)" if count > 2 else ""
    assert str(info.value) == (
        f"{prefix}.index expects {count:,} data file(s), but {prefix}.data-00001-of-{count:05d} does not "
        f"exist{more}\nHint: {hint}")
    assert elapsed < 60  # a generous bound against the hang (one isfile per shard took hours), not a benchmark


def test_the_first_missing_shard_is_named(tmp_path: Path) -> None:
    with tf.device("/cpu:0"):
        variables = {f"v{i}": tf.Variable(np.full(3, i, np.float32)) for i in range(3)}
    prefix = tf.train.Checkpoint(**variables).write(str(tmp_path / "ckpt"))
    prefix = _with_header(prefix, tmp_path / "three", num_shards=3)
    os.rename(prefix + ".data-00000-of-00001", prefix + ".data-00000-of-00003")
    Path(prefix + ".data-00002-of-00003").write_bytes(b"")
    (tmp_path / "three" / "ckpt.data-00001-of-00003").mkdir()  # a folder is not a data file
    Path(prefix + ".data-00001-of-00004").write_bytes(b"")  # another write's shard does not count
    with pytest.raises(SourceError) as info:
        Bundle(prefix)
    assert info.value.message == (
        f"{prefix}.index expects 3 data file(s), but {prefix}.data-00001-of-00003 does not exist")


def test_extra_shards_of_another_count_are_ignored(keras_ckpt: Any, tmp_path: Path) -> None:
    prefix = _copy(keras_ckpt[0], tmp_path)
    Path(prefix + ".data-00001-of-00002").write_bytes(b"junk")
    with regraft.open(prefix) as src, regraft.open(keras_ckpt[0]) as original:
        assert src.files == (prefix + ".index", prefix + ".data-00000-of-00001")
        for e in original.entries():
            assert same_bytes(src.read(e.key), original.read(e.key)), e.key


# --------------------------------------------------------------------------- 10. state files pointing elsewhere


@pytest.fixture
def elsewhere(keras_ckpt: Any, tmp_path: Path) -> Any:
    """A checkpoint in ``other/`` and an empty folder ``run/`` whose state file TF will make point at it."""
    other = _copy(keras_ckpt[0], tmp_path / "other")
    run = tmp_path / "run"
    run.mkdir()
    return other, run


@pytest.mark.parametrize("spelling", ["absolute", "relative"])
def test_a_state_file_pointing_outside_is_refused(elsewhere: Any, spelling: str) -> None:
    other, run = elsewhere
    written = other if spelling == "absolute" else os.path.relpath(other, run)
    tf.compat.v1.train.update_checkpoint_state(str(run), written)
    assert f'model_checkpoint_path: "{written}"' in (run / "checkpoint").read_text()
    with pytest.raises(SourceError) as info:
        regraft.open(str(run))
    assert str(info.value) == (
        f"{run / 'checkpoint'} names '{written}' as the latest checkpoint, which is outside the folder {run} "
        f"({other}); regraft opens only a checkpoint in the folder it was given.\n"
        "Hint: Pass that checkpoint's prefix itself, or allow the state file to point elsewhere with "
        "allow_outside_state=True (on the command line: --allow-outside-state)."
    )
    model = _dense_model()
    before = snapshot(model)
    for call in (regraft.load, regraft.diff, regraft.plan):
        with pytest.raises(SourceError, match="outside the folder"):
            call(model, str(run))
    assert_state(model, before)


def test_an_allowed_outside_state_file_says_what_it_opened(elsewhere: Any, keras_ckpt: Any) -> None:
    other, run = elsewhere
    tf.compat.v1.train.update_checkpoint_state(str(run), "../other/ckpt")
    expected = (f"regraft: the state file {run / 'checkpoint'} points outside its folder; "
                f"opened {os.path.abspath(str(run / '../other/ckpt'))}")
    with pytest.warns(UserWarning) as record:
        source = regraft.open(str(run), allow_outside_state=True)
    assert [str(w.message) for w in record] == [expected]
    assert source.path == other and source.files[0] == other + ".index"
    with source, regraft.open(other) as original:
        for e in original.entries():
            assert same_bytes(source.read(e.key), original.read(e.key)), e.key
    model = _dense_model()
    before = snapshot(model)
    with pytest.warns(UserWarning, match="points outside its folder"):
        regraft.load(model, str(run), allow_outside_state=True)
    _, state, original_model = keras_ckpt
    assert_state(model, before, {id(v): state[id(o)] for v, o in zip(model.weights, original_model.weights)})


def test_an_allowed_outside_state_file_naming_nothing_says_so(elsewhere: Any) -> None:
    other, run = elsewhere
    tf.compat.v1.train.update_checkpoint_state(str(run), other + "-gone")
    with pytest.raises(SourceError) as info:
        regraft.open(str(run), allow_outside_state=True)
    assert info.value.message == (
        f"{run / 'checkpoint'} names '{other}-gone' as the latest checkpoint, but {other}-gone.index does not exist.")


def test_the_cli_refuses_and_allows_an_outside_state_file(elsewhere: Any) -> None:
    other, run = elsewhere
    tf.compat.v1.train.update_checkpoint_state(str(run), other)
    command = [sys.executable, "-m", "regraft", "inspect", str(run), "--json"]
    env = {**os.environ, "PYTHONPATH": "src"}
    refused = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert refused.stderr.endswith("(on the command line: --allow-outside-state).\n")
    allowed = subprocess.run(command + ["--allow-outside-state"], capture_output=True, text=True, env=env, timeout=300)
    assert allowed.returncode == 0, allowed.stderr
    assert allowed.stderr.endswith(
        f"Warning: the state file {run / 'checkpoint'} points outside its folder; opened {other}\n")
    assert f'"{other}.index"' in allowed.stdout


def test_an_absolute_state_file_inside_its_folder_is_fine(keras_ckpt: Any, tmp_path: Path) -> None:
    prefix = _copy(keras_ckpt[0], tmp_path / "run")
    tf.compat.v1.train.update_checkpoint_state(str(tmp_path / "run"), prefix)  # TF1 Saver's absolute style
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with regraft.open(str(tmp_path / "run")) as src:
            assert src.files[0] == prefix + ".index"


# --------------------------------------------------------------------------- 11. keys that are not UTF-8


def test_a_key_that_is_not_utf8_reads_its_own_bytes(tmp_path: Path) -> None:
    values = {b"w\xff": np.arange(6, dtype=np.float32).reshape(2, 3), b"w\xfe": np.full(4, 7, np.int64),
              b"plain": np.ones(2, np.float16)}
    prefix = _save(str(tmp_path / "ckpt"), values)
    with regraft.open(prefix) as src:
        assert sorted(e.key for e in src.entries()) == ["plain", "w\\xfe", "w\\xff"]
        assert same_bytes(src.read("w\\xff"), values[b"w\xff"])
        assert same_bytes(src.read("w\\xfe"), values[b"w\xfe"])
        assert src.native_location("w\\xff") is None  # TensorFlow would look up the escaped text
        assert src.native_location("plain") == (prefix, "plain")
    assert Bundle(prefix).entries["w\\xff"].raw_key == b"w\xff"


def test_a_load_through_a_key_that_is_not_utf8(keras_ckpt: Any, tmp_path: Path) -> None:
    """The object graph names the tensor by its raw bytes; the load reads those bytes.

    Python's protobuf refuses to put bytes that are not UTF-8 in a string field, so the
    graph is serialized with a placeholder byte that is then swapped (same length).
    """
    tensors = _tensors(keras_ckpt[0])
    graph = _graph(tensors)
    _, kernel = _node(graph, *LAYERS, "1", "_kernel")
    old = kernel.attributes[0].checkpoint_key.encode()
    placeholder = old.replace(b"/.ATTRIBUTES/", b"~/.ATTRIBUTES/")
    new = old.replace(b"/.ATTRIBUTES/", b"\xff/.ATTRIBUTES/")
    tensors[new] = tensors.pop(old)
    kernel.attributes[0].checkpoint_key = placeholder.decode()
    serialized = graph.SerializeToString()
    assert serialized.count(placeholder) == 1
    tensors[OBJECT_GRAPH_KEY.encode()] = serialized.replace(placeholder, new)
    prefix = _save(str(tmp_path / "ckpt"), tensors)
    kept = tf.raw_ops.RestoreV2(prefix=prefix, tensor_names=[new], shape_and_slices=[""], dtypes=[tf.float32])[0]
    assert same_bytes(kept.numpy(), tensors[new])  # TensorFlow finds it under the raw bytes

    model = _dense_model()
    before = snapshot(model)
    report = regraft.load(model, prefix)
    assert report.counts()["loaded"] == 4
    _, state, original = keras_ckpt
    assert_state(model, before, {id(v): state[id(o)] for v, o in zip(model.weights, original.weights)})


def test_both_graph_parsers_spell_a_name_that_is_not_utf8_alike(keras_ckpt: Any,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from regraft.sources import _proto

    graph = _graph(_tensors(keras_ckpt[0]))
    _, layers = _node(graph, *LAYERS)
    layers.children[1].local_name = "~1"
    serialized = graph.SerializeToString().replace(b"\x02~1", b"\x02\xff1")
    compiled = _proto.parse_object_graph(serialized)
    monkeypatch.setattr(_proto, "_compiled_classes", lambda: {})
    pure = _proto.parse_object_graph(serialized)
    assert pure == compiled
    assert "\\xff1" in [c.local_name for node in pure for c in node.children]


def test_a_tensor_of_more_dimensions_than_numpy_holds_is_refused_when_read(tmp_path: Path) -> None:
    prefix = str(tmp_path / "ckpt")
    names = [b"deep", b"flat"]
    tf.raw_ops.SaveV2(prefix=prefix, tensor_names=names, shape_and_slices=["", ""],
                      tensors=[tf.reshape(tf.constant([2.5]), [1] * 65), tf.constant([1.0, 2.0])])
    with regraft.open(prefix) as src:
        assert dict((e.key, len(e.shape)) for e in src.entries()) == {"deep": 65, "flat": 1}
        assert same_bytes(src.read("flat"), np.array([1.0, 2.0], np.float32))
        with pytest.raises(UnsupportedFormatError) as info:
            src.read("deep")
    assert str(info.value) == (f"{prefix}.index: tensor 'deep' has 65 dimensions; numpy arrays hold at most 64\n"
                               "Hint: Reshape it to fewer dimensions in TensorFlow and save the checkpoint again.")


def test_an_escaped_key_that_collides_with_a_real_one_is_refused(tmp_path: Path) -> None:
    prefix = _save(str(tmp_path / "ckpt"), {b"w\xff": np.zeros(2, np.float32), b"w\\xff": np.ones(2, np.float32)})
    with pytest.raises(UnsupportedFormatError) as info:
        regraft.open(prefix)
    assert str(info.value) == (
        f"{prefix}.index: the tensor keys b'w\\\\xff' and b'w\\xff' are both shown as 'w\\\\xff' (a key that is "
        "not UTF-8 is shown with \\x escapes); regraft cannot tell them apart\n"
        "Hint: Rename one of the two tensors in TensorFlow (tf.raw_ops.RestoreV2 reads by raw key) and save the "
        "checkpoint again."
    )


# --------------------------------------------------------------------------- single entry edits


def _with_entry(source: str, folder: Path, edit: Callable[[Any], None]) -> tuple[str, str]:
    """A copy of ``source`` whose (4, 3) float32 kernel entry was changed by ``edit``; returns (prefix, key)."""
    prefix = _copy(source, folder)
    entries = _index_entries(prefix)
    for i, (key, value) in enumerate(entries[1:], start=1):
        entry = tensor_bundle_pb2.BundleEntryProto.FromString(value)
        if entry.dtype == 1 and [d.size for d in entry.shape.dim] == [4, 3]:
            break
    edit(entry)
    entries[i] = (key, entry.SerializeToString())
    _write_index(prefix + ".index", entries)
    return prefix, key.decode()


def _set_dims(*sizes: int) -> Callable[[Any], None]:
    def edit(entry: Any) -> None:
        del entry.shape.dim[:]
        for size in sizes:
            entry.shape.dim.add(size=size)

    return edit


@pytest.mark.parametrize(
    "edit, problem",
    [
        (_set_dims(-1, 3), "shape [-1, 3] (unknown_rank=False) is not fully defined"),
        (_set_dims(4, -(2**63)), f"shape [4, {-(2**63)}] (unknown_rank=False) is not fully defined"),
        (_set_dims(2**40, 2**40), f"shape [{2**40}, {2**40}] has more elements than any array can hold"),
        (lambda e: setattr(e, "shard_id", 1), "shard 1, expected 0 to 0"),
        (lambda e: setattr(e, "shard_id", -1), "shard -1, expected 0 to 0"),
        (lambda e: setattr(e, "offset", -1), "offset -1 and size 48 must not be negative"),
    ],
    ids=["minus-one-dim", "most-negative-dim", "huge-product", "shard-past-end", "shard-minus-one", "negative-offset"],
)
def test_an_invalid_entry_is_refused_on_open(keras_ckpt: Any, tmp_path: Path, edit: Any, problem: str) -> None:
    prefix, key = _with_entry(keras_ckpt[0], tmp_path, edit)
    with pytest.raises(CorruptCheckpointError) as info:
        regraft.open(prefix)
    assert str(info.value) == f"{prefix}.index: the entry of tensor {key!r} is invalid: {problem}\n{GRAPH_HINT}"


@pytest.mark.parametrize(
    "edit, problem",
    [
        (lambda e: setattr(e, "size", 2**62),
         "{index}: tensor {key!r} of shape [4, 3] and dtype float32 should take 48 bytes, but its entry says "
         f"{2**62}"),
        (_set_dims(2**20, 2**20),
         "{index}: tensor {key!r} of shape [1048576, 1048576] and dtype float32 should take 4398046511104 bytes, "
         "but its entry says 48"),
        (lambda e: setattr(e, "offset", 2**40),
         "{data}: tensor {key!r} needs 48 bytes at offset 1099511627776, found only 0; the data file is truncated"),
    ],
    ids=["huge-size", "huge-shape", "offset-past-the-end"],
)
def test_an_entry_that_does_not_fit_its_data_is_refused_when_read(keras_ckpt: Any, tmp_path: Path, edit: Any,
                                                                  problem: str) -> None:
    prefix, key = _with_entry(keras_ckpt[0], tmp_path, edit)
    with regraft.open(prefix) as src:
        (entry,) = [e for e in src.entries() if src._bundle_key[e.key] == key]
        with pytest.raises(CorruptCheckpointError) as info:
            src.read(entry.key)
    expected = problem.format(index=prefix + ".index", data=prefix + ".data-00000-of-00001", key=key)
    assert str(info.value) == f"{expected}\n{GRAPH_HINT}"
    model = _dense_model()
    before = snapshot(model)
    with pytest.raises(RegraftError):  # damaged data, or (the huge shape) a shape mismatch
        regraft.load(model, prefix)
    assert_state(model, before)


# --------------------------------------------------------------------------- index mutations (fixed seed)


def _entry_edits(rng: random.Random, entry: Any) -> None:
    """One edit of a BundleEntryProto's fields: shard, offset, size, dtype, or a dimension."""
    choice = rng.randrange(8)
    if choice == 0:
        entry.shard_id = rng.choice([-1, 1, 2**31 - 1])
    elif choice == 1:
        entry.offset = rng.choice([-1, 2**62, entry.offset + 1, max(entry.offset - 1, 0)])
    elif choice == 2:
        entry.size = rng.choice([-1, 0, 2**62, entry.size + 4])
    elif choice == 3:
        entry.dtype = rng.choice([0, 7, 14, 20, 21, 99, -3, 2**30])
    elif choice == 4 and entry.shape.dim:
        entry.shape.dim[rng.randrange(len(entry.shape.dim))].size = rng.choice([-1, -(2**63), 2**40, 2**62, 0])
    elif choice == 5:
        for _ in range(rng.choice([1, 70])):
            entry.shape.dim.add(size=1)
    elif choice == 6:
        entry.shape.unknown_rank = True
    else:
        entry.crc32c ^= 1 << rng.randrange(32)


def _mutate(rng: random.Random, entries: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """One mutation of an index's entries: a field edit, a bit flip, a dropped, renamed or truncated entry."""
    entries = list(entries)
    at = rng.randrange(len(entries))
    key, value = entries[at]
    kind = rng.randrange(5)
    if kind == 0 and at > 0:
        entry = tensor_bundle_pb2.BundleEntryProto.FromString(value)
        _entry_edits(rng, entry)
        entries[at] = (key, entry.SerializeToString())
    elif kind == 0:
        header = tensor_bundle_pb2.BundleHeaderProto.FromString(value)
        header.num_shards = rng.choice([0, -1, 2, 2**31 - 1])
        header.endianness = rng.choice([0, 0, 1])
        entries[at] = (key, header.SerializeToString())
    elif kind == 1 and value:
        flipped = bytearray(value)
        flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
        entries[at] = (key, bytes(flipped))
    elif kind == 2:
        del entries[at]
    elif kind == 3 and value:
        entries[at] = (key, value[: rng.randrange(len(value))])
    else:  # a renamed key, kept in order only if the rename happens to keep it
        entries[at] = (key[:-1] + bytes([rng.randrange(256)]) if key else b"\x00", value)
    return entries


def test_fixed_seed_index_mutations_end_in_regraft_errors_or_the_original_bytes(keras_ckpt: Any,
                                                                                tmp_path: Path) -> None:
    prefix, _, _ = keras_ckpt
    entries = _index_entries(prefix)
    with regraft.open(prefix) as original:
        originals = {e.key: original.read(e.key) for e in original.entries()}
    work = _copy(prefix, tmp_path / "fuzz")
    rng = random.Random(13)
    outcomes = {"refused": 0, "opened": 0}
    for _ in range(300):
        _write_index(work + ".index", _mutate(rng, entries))
        try:
            with regraft.open(work) as src:
                for e in src.entries():
                    try:
                        value = src.read(e.key)
                    except RegraftError:
                        continue
                    if e.key in originals:  # whatever the index says, the bytes are the original ones
                        assert np.asarray(value).tobytes() == originals[e.key].tobytes(), e.key
            outcomes["opened"] += 1
        except RegraftError:
            outcomes["refused"] += 1
    assert outcomes["refused"] > 100 and outcomes["opened"] > 20, outcomes
