"""Tests of the TensorFlow-free tensor-bundle reader against checkpoints TF writes."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from regraft.errors import CorruptCheckpointError, SourceError, UnsupportedFormatError
from regraft.sources._bundle import (
    DAMAGED_HINT,
    OBJECT_GRAPH_KEY,
    Bundle,
    _block_entries,
    _block_handle,
    _read_table,
)
from regraft.sources._crc32c import crc32c, mask, masked_crc32c, pure_python_crc32c, unmask
from regraft.sources._proto import (
    DecodeError,
    decode_varint,
    parse_bundle_entry,
    parse_bundle_header,
    parse_object_graph,
)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

NUMERIC_DTYPES = [
    "float16", "float32", "float64", "int8", "int16", "int32", "int64",
    "uint8", "uint16", "uint32", "uint64", "bool", "complex64", "complex128",
]  # fmt: skip


# --- fixtures: checkpoints written by TensorFlow ---------------------------------------


@pytest.fixture(scope="module")
def tf() -> Any:
    return pytest.importorskip("tensorflow")


def _random_array(rng: np.random.Generator, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """Random values covering the dtype's bit patterns (NaN payloads, -0.0, inf...)."""
    if dtype == "bool":
        return rng.integers(0, 2, shape).astype(bool)
    raw = rng.integers(0, 256, (*shape, np.dtype(dtype).itemsize), dtype=np.uint8)
    return raw.view(dtype).reshape(shape)


def _v2_variables(tf: Any) -> dict[str, Any]:
    """Variables of every supported dtype, scalars, 0-size tensors and strings."""
    rng = np.random.default_rng(0)
    variables = {f"v_{dt}": tf.Variable(_random_array(rng, dt, (3, 5))) for dt in NUMERIC_DTYPES}
    variables.update(
        bf16=tf.Variable(tf.bitcast(tf.constant(_random_array(rng, "uint16", (4, 7))), tf.bfloat16)),
        bf16_scalar=tf.Variable(tf.constant(-1.5, tf.bfloat16)),
        f32_scalar=tf.Variable(np.float32(-0.0)),
        i64_scalar=tf.Variable(np.int64(-(2**63))),
        bool_scalar=tf.Variable(True),
        empty_f32=tf.Variable(np.zeros((0, 4), np.float32)),
        empty_bf16=tf.Variable(tf.zeros([3, 0], tf.bfloat16)),
        empty_i64=tf.Variable(np.zeros((0,), np.int64)),
        text=tf.Variable([[b"", b"a"], [b"\x00\xff" * 100, "h\u00e9llo".encode()]]),
        text_scalar=tf.Variable(b"scalar"),
    )
    return variables


@pytest.fixture(scope="module")
def v2_ckpt(tf: Any, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A TF2 object-based checkpoint, with optimizer slot variables."""
    variables = _v2_variables(tf)
    weight = tf.Variable([1.0, 2.0])
    optimizer = tf.compat.v1.train.AdamOptimizer(0.1)
    optimizer.minimize(lambda: tf.reduce_sum(weight * weight), var_list=[weight])
    checkpoint = tf.train.Checkpoint(opt=optimizer, weight=weight, **variables)
    return str(checkpoint.save(str(tmp_path_factory.mktemp("v2") / "ckpt")))


def _save_graph_checkpoint(tf: Any, prefix: Path, build: Any, **saver_kwargs: Any) -> str:
    """Builds variables in a fresh graph and saves them with a TF1 Saver."""
    graph = tf.Graph()
    with graph.as_default():
        build()
        saver = tf.compat.v1.train.Saver(**saver_kwargs)
        config = tf.compat.v1.ConfigProto(device_count={"CPU": 2})
        with tf.compat.v1.Session(graph=graph, config=config) as session:
            session.run(tf.compat.v1.global_variables_initializer())
            return str(saver.save(session, str(prefix)))


@pytest.fixture(scope="module")
def v1_ckpt(tf: Any, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A TF1 name-based checkpoint from tf.compat.v1.train.Saver."""

    def build() -> None:
        rng = np.random.default_rng(1)
        with tf.compat.v1.variable_scope("dense"):
            tf.compat.v1.get_variable("kernel", initializer=rng.standard_normal((4, 3)).astype(np.float32))
            tf.compat.v1.get_variable("bias", initializer=np.zeros(3, np.float64))
        tf.compat.v1.get_variable("step", initializer=np.int64(7))

    return _save_graph_checkpoint(tf, tmp_path_factory.mktemp("v1") / "model", build)


@pytest.fixture(scope="module")
def sharded_ckpt(tf: Any, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A checkpoint with two data shards: variables on two CPU devices, sharded Saver."""

    def build() -> None:
        with tf.device("/cpu:0"):
            tf.compat.v1.get_variable("a", initializer=np.arange(6, dtype=np.float32))
        with tf.device("/cpu:1"):
            tf.compat.v1.get_variable("b", initializer=np.arange(4, dtype=np.int64))

    return _save_graph_checkpoint(tf, tmp_path_factory.mktemp("sharded") / "model", build, sharded=True)


@pytest.fixture(scope="module")
def partitioned_ckpt(tf: Any, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A checkpoint of a partitioned variable (stored as slices) and a plain one."""

    def build() -> None:
        partitioner = tf.compat.v1.fixed_size_partitioner(2)
        tf.compat.v1.get_variable("part", shape=[10, 4], partitioner=partitioner)
        tf.compat.v1.get_variable("plain", initializer=np.ones(3, np.float32))

    return _save_graph_checkpoint(tf, tmp_path_factory.mktemp("part") / "model", build)


def _copy_checkpoint(prefix: str, directory: Path) -> str:
    """Copies a checkpoint's index and data files; returns the new prefix."""
    source = Path(prefix)
    for path in source.parent.glob(source.name + ".*"):
        shutil.copy(path, directory / path.name)
    return str(directory / source.name)


# --- helpers ----------------------------------------------------------------------------


def _bits(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8)


def _assert_matches_tf(tf: Any, prefix: str) -> Bundle:
    """Checks every tensor of the bundle equals TF's, bit for bit."""
    reader = tf.train.load_checkpoint(prefix)
    bundle = Bundle(prefix)
    assert set(bundle.entries) == set(reader.get_variable_to_shape_map())
    assert list(bundle.entries) == sorted(bundle.entries)
    for key, entry in bundle.entries.items():
        expected = reader.get_tensor(key)
        if entry.dtype == "string":
            assert bundle.read_string(key) == np.asarray(expected, dtype=object).reshape(-1).tolist(), key
            assert entry.shape == np.shape(expected)
            continue
        ours = bundle.read(key)
        assert ours.dtype == expected.dtype, key
        assert ours.shape == expected.shape == entry.shape, key
        assert np.array_equal(_bits(ours), _bits(expected)), key
    return bundle


def _data_blocks(index: bytes) -> list[tuple[int, int]]:
    """Returns the (offset, size) of each data block of an index file."""
    footer = index[-48:]
    _, _, pos = _block_handle(footer)
    offset, size, _ = _block_handle(footer, pos)
    return [_block_handle(handle)[:2] for _, handle in _block_entries(index[offset : offset + size])]


def _reseal(index: bytearray, offset: int, size: int) -> None:
    """Recomputes a block's checksum after editing it (or its compression byte)."""
    crc = masked_crc32c(bytes(index[offset : offset + size + 1]))
    index[offset + size + 1 : offset + size + 5] = struct.pack("<I", crc)


def _edit_first_block(prefix: str, old: bytes, new: bytes) -> None:
    """Replaces bytes inside the first data block of an index and fixes its checksum."""
    path = prefix + ".index"
    index = bytearray(Path(path).read_bytes())
    offset, size = _data_blocks(bytes(index))[0]
    at = index.index(old, offset, offset + size)
    index[at : at + len(old)] = new
    _reseal(index, offset, size)
    Path(path).write_bytes(bytes(index))


# --- reading real checkpoints -------------------------------------------------------------


def test_v2_checkpoint_matches_tf_bit_for_bit(tf: Any, v2_ckpt: str) -> None:
    bundle = _assert_matches_tf(tf, v2_ckpt)
    dtypes = {np.dtype(e.dtype).name for e in bundle.entries.values() if e.dtype != "string"}
    assert dtypes >= set(NUMERIC_DTYPES) | {"bfloat16"}
    assert bundle.entries["empty_bf16/.ATTRIBUTES/VARIABLE_VALUE"].shape == (3, 0)
    assert bundle.entries["i64_scalar/.ATTRIBUTES/VARIABLE_VALUE"].shape == ()
    assert bundle.read("i64_scalar/.ATTRIBUTES/VARIABLE_VALUE") == -(2**63)
    assert bundle.header.num_shards == 1
    assert bundle.header.endianness == 0


def test_read_returns_fresh_writable_contiguous_array(v2_ckpt: str) -> None:
    bundle = Bundle(v2_ckpt)
    key = "v_float32/.ATTRIBUTES/VARIABLE_VALUE"
    first = bundle.read(key)
    assert first.flags.writeable and first.flags.c_contiguous and first.flags.owndata
    first[...] = 0
    assert not np.array_equal(bundle.read(key), first)


def test_object_graph_matches_tf(tf: Any, v2_ckpt: str) -> None:
    from tensorflow.core.protobuf import trackable_object_graph_pb2

    bundle = Bundle(v2_ckpt)
    raw = bundle.read_string(OBJECT_GRAPH_KEY)
    expected = tf.train.load_checkpoint(v2_ckpt).get_tensor(OBJECT_GRAPH_KEY)
    assert raw == [expected]

    proto = trackable_object_graph_pb2.TrackableObjectGraph.FromString(expected)
    nodes = bundle.object_graph()
    assert nodes is not None and len(nodes) == len(proto.nodes)
    for node, node_proto in zip(nodes, proto.nodes, strict=True):
        assert [(c.node_id, c.local_name) for c in node.children] == [
            (c.node_id, c.local_name) for c in node_proto.children
        ]
        assert [(a.name, a.full_name, a.checkpoint_key) for a in node.attributes] == [
            (a.name, a.full_name, a.checkpoint_key) for a in node_proto.attributes
        ]
        assert [
            (s.original_variable_node_id, s.slot_name, s.slot_variable_node_id) for s in node.slot_variables
        ] == [(s.original_variable_node_id, s.slot_name, s.slot_variable_node_id) for s in node_proto.slot_variables]
    assert sorted(s.slot_name for n in nodes for s in n.slot_variables) == ["m", "v"]


def test_entries_match_protobuf_runtime(v2_ckpt: str) -> None:
    from tensorflow.core.protobuf import tensor_bundle_pb2

    table = _read_table(Path(v2_ckpt + ".index").read_bytes(), "x")
    header = tensor_bundle_pb2.BundleHeaderProto.FromString(table[0][1])
    assert parse_bundle_header(table[0][1]).version_producer == header.version.producer == 1
    for _, value in table[1:]:
        ours = parse_bundle_entry(value)
        theirs = tensor_bundle_pb2.BundleEntryProto.FromString(value)
        assert (ours.dtype, ours.shard_id, ours.offset, ours.size, ours.crc32c) == (
            theirs.dtype, theirs.shard_id, theirs.offset, theirs.size, theirs.crc32c
        )  # fmt: skip
        assert ours.shape == tuple(d.size for d in theirs.shape.dim)


def test_tf1_saver_checkpoint(tf: Any, v1_ckpt: str) -> None:
    bundle = _assert_matches_tf(tf, v1_ckpt)
    assert list(bundle.entries) == ["dense/bias", "dense/kernel", "step"]
    assert bundle.object_graph() is None


def test_multi_shard_checkpoint(tf: Any, sharded_ckpt: str) -> None:
    bundle = _assert_matches_tf(tf, sharded_ckpt)
    assert bundle.header.num_shards == 2
    assert {e.shard_id for e in bundle.entries.values()} == {0, 1}
    assert bundle.data_path(1) == sharded_ckpt + ".data-00001-of-00002"


def test_partitioned_variable_is_listed_but_not_read(tf: Any, partitioned_ckpt: str) -> None:
    bundle = Bundle(partitioned_ckpt)
    assert list(bundle.entries) == ["part", "plain"]  # slice keys are hidden, as in TF
    assert bundle.entries["part"].sliced and bundle.entries["part"].shape == (10, 4)
    np.testing.assert_array_equal(bundle.read("plain"), np.ones(3, np.float32))
    with pytest.raises(UnsupportedFormatError) as info:
        bundle.read("part")
    assert "'part'" in info.value.message
    assert "partitioned variables are not supported" in info.value.message
    assert info.value.hint


def test_bundle_does_not_import_tensorflow(v2_ckpt: str) -> None:
    code = (
        "import sys; from regraft.sources._bundle import Bundle; b = Bundle(sys.argv[1]); "
        "[b.read(k) for k, e in b.entries.items() if e.dtype != 'string']; b.object_graph(); "
        "assert 'tensorflow' not in sys.modules, 'tensorflow imported'"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1] / "src"))
    subprocess.run([sys.executable, "-c", code, v2_ckpt], check=True, env=env)


def test_read_wrong_kind_of_tensor(v2_ckpt: str) -> None:
    bundle = Bundle(v2_ckpt)
    with pytest.raises(UnsupportedFormatError, match="read_string"):
        bundle.read("text/.ATTRIBUTES/VARIABLE_VALUE")
    with pytest.raises(UnsupportedFormatError, match="has dtype float32, not string"):
        bundle.read_string("v_float32/.ATTRIBUTES/VARIABLE_VALUE")
    with pytest.raises(SourceError, match="has no tensor 'nope'"):
        bundle.read("nope")


# --- damaged and missing files ------------------------------------------------------------


def test_missing_index(tmp_path: Path) -> None:
    with pytest.raises(SourceError) as info:
        Bundle(str(tmp_path / "model"))
    assert type(info.value) is SourceError
    assert info.value.message == (
        f"expected a TensorFlow checkpoint index at {tmp_path / 'model.index'}, found no such file"
    )
    assert "prefix" in info.value.hint
    with pytest.raises(SourceError) as info:
        Bundle(str(tmp_path / "model.index"))
    assert info.value.hint == f"Pass the checkpoint prefix without the file suffix: {tmp_path / 'model'}"


def test_missing_data_shard(sharded_ckpt: str, tmp_path: Path) -> None:
    prefix = _copy_checkpoint(sharded_ckpt, tmp_path)
    os.remove(prefix + ".data-00001-of-00002")
    with pytest.raises(SourceError) as info:
        Bundle(prefix)
    assert info.value.message == (
        f"{prefix}.index expects 2 data file(s), but {prefix}.data-00001-of-00002 does not exist"
    )
    assert info.value.hint


def test_truncated_data_file(v2_ckpt: str, tmp_path: Path) -> None:
    prefix = _copy_checkpoint(v2_ckpt, tmp_path)
    bundle = Bundle(prefix)
    last = max(bundle.entries.values(), key=lambda e: e.offset + e.size)
    data_path = bundle.data_path(0)
    os.truncate(data_path, last.offset + last.size - 3)
    reader = bundle.read_string if last.dtype == "string" else bundle.read
    with pytest.raises(CorruptCheckpointError) as info:
        reader(last.key)
    assert info.value.message == (
        f"{data_path}: tensor {last.key!r} needs {last.size} bytes at offset {last.offset}, "
        f"found only {last.size - 3}; the data file is truncated"
    )
    assert info.value.hint == DAMAGED_HINT
    assert bundle.read("v_int8/.ATTRIBUTES/VARIABLE_VALUE").shape == (3, 5)  # earlier bytes intact


@pytest.mark.parametrize("key", ["v_float64/.ATTRIBUTES/VARIABLE_VALUE", OBJECT_GRAPH_KEY])
def test_flipped_byte_in_data(v2_ckpt: str, tmp_path: Path, key: str) -> None:
    prefix = _copy_checkpoint(v2_ckpt, tmp_path)
    bundle = Bundle(prefix)
    entry = bundle.entries[key]
    data_path = bundle.data_path(0)
    data = bytearray(Path(data_path).read_bytes())
    data[entry.offset + entry.size - 1] ^= 0x10
    Path(data_path).write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError) as info:
        bundle.read_string(key) if entry.dtype == "string" else bundle.read(key)
    assert info.value.message.startswith(f"{data_path}: tensor {key!r} has checksum ")
    assert info.value.message.endswith(f"expected {entry.crc32c:#010x}; its data is corrupted")
    assert info.value.hint == DAMAGED_HINT


def test_flipped_string_length_is_detected(v2_ckpt: str, tmp_path: Path) -> None:
    prefix = _copy_checkpoint(v2_ckpt, tmp_path)
    bundle = Bundle(prefix)
    entry = bundle.entries[OBJECT_GRAPH_KEY]
    data = bytearray(Path(bundle.data_path(0)).read_bytes())
    data[entry.offset] ^= 0x01  # the first varint length
    Path(bundle.data_path(0)).write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match=r"string tensor '_CHECKPOINTABLE_OBJECT_GRAPH' is garbled"):
        bundle.object_graph()


def test_truncated_index(v2_ckpt: str, tmp_path: Path) -> None:
    index = Path(v2_ckpt + ".index").read_bytes()
    path = tmp_path / "model.index"
    path.write_bytes(index[:-1])
    with pytest.raises(CorruptCheckpointError) as info:
        Bundle(str(tmp_path / "model"))
    assert info.value.message.startswith(f"{path} ends with 0x")
    assert "expected the table magic number 0xdb4775248b80fb57" in info.value.message
    assert info.value.hint == DAMAGED_HINT

    path.write_bytes(index[:20])
    with pytest.raises(CorruptCheckpointError) as info:
        Bundle(str(tmp_path / "model"))
    assert info.value.message == f"{path} is 20 bytes, shorter than the 48-byte footer of a checkpoint index"

    path.write_bytes(index[200:])  # footer intact, the blocks it points to are cut off
    with pytest.raises(CorruptCheckpointError, match="runs past the end of the file's blocks"):
        Bundle(str(tmp_path / "model"))

    for size in range(len(index)):
        path.write_bytes(index[:size])
        with pytest.raises(CorruptCheckpointError):
            Bundle(str(tmp_path / "model"))


def test_garbage_index(tmp_path: Path) -> None:
    rng = random.Random(0)
    path = tmp_path / "model.index"
    path.write_bytes(bytes(rng.randrange(256) for _ in range(1000)))
    with pytest.raises(CorruptCheckpointError, match="expected the table magic number"):
        Bundle(str(tmp_path / "model"))
    for _ in range(200):  # garbage that ends with the right magic number
        garbage = bytes(rng.randrange(256) for _ in range(rng.randrange(40, 200)))
        path.write_bytes(garbage + struct.pack("<Q", 0xDB4775248B80FB57))
        with pytest.raises(CorruptCheckpointError):
            Bundle(str(tmp_path / "model"))


def test_every_flipped_index_byte_is_caught_or_harmless(v2_ckpt: str, tmp_path: Path) -> None:
    index = Path(v2_ckpt + ".index").read_bytes()
    prefix = _copy_checkpoint(v2_ckpt, tmp_path)
    path = Path(prefix + ".index")
    expected = list(Bundle(prefix).entries.values())
    for position in range(len(index)):
        damaged = bytearray(index)
        damaged[position] ^= 0x04
        path.write_bytes(bytes(damaged))
        try:
            entries = list(Bundle(prefix).entries.values())
        except CorruptCheckpointError as exc:
            assert exc.message.startswith(str(path)) and exc.hint == DAMAGED_HINT
        else:  # only footer padding may change without notice
            assert position >= len(index) - 48 and entries == expected


def test_garbled_entry_with_valid_block_checksum(v2_ckpt: str, tmp_path: Path) -> None:
    prefix = _copy_checkpoint(v2_ckpt, tmp_path)
    key = OBJECT_GRAPH_KEY.encode()
    _edit_first_block(prefix, key + b"\x08", key + b"\x0f")  # dtype tag with wire type 7
    with pytest.raises(CorruptCheckpointError) as info:
        Bundle(prefix)
    assert info.value.message == (
        f"{prefix}.index: the entry of tensor {OBJECT_GRAPH_KEY!r} is garbled: field 1 has invalid wire type 7"
    )


def test_unsupported_dtype(v2_ckpt: str, tmp_path: Path) -> None:
    prefix = _copy_checkpoint(v2_ckpt, tmp_path)
    key = OBJECT_GRAPH_KEY.encode()
    _edit_first_block(prefix, key + b"\x08\x07", key + b"\x08\x14")  # DT_STRING -> DT_RESOURCE
    bundle = Bundle(prefix)
    assert bundle.entries[OBJECT_GRAPH_KEY].dtype == "resource"
    with pytest.raises(UnsupportedFormatError, match="has dtype resource"):
        bundle.read(OBJECT_GRAPH_KEY)


def test_big_endian_header(v2_ckpt: str, tmp_path: Path) -> None:
    prefix = _copy_checkpoint(v2_ckpt, tmp_path)
    # header {num_shards: 1, version {producer: 1}} -> {num_shards: 1, endianness: BIG, 4: 0}
    _edit_first_block(prefix, b"\x08\x01\x1a\x02\x08\x01", b"\x08\x01\x10\x01\x20\x00")
    with pytest.raises(UnsupportedFormatError, match="big-endian"):
        Bundle(prefix)


def test_compressed_index_block(v2_ckpt: str, tmp_path: Path) -> None:
    prefix = _copy_checkpoint(v2_ckpt, tmp_path)
    index = bytearray(Path(prefix + ".index").read_bytes())
    offset, size = _data_blocks(bytes(index))[0]
    index[offset + size] = 1
    _reseal(index, offset, size)
    Path(prefix + ".index").write_bytes(bytes(index))
    with pytest.raises(UnsupportedFormatError, match="data block at offset 0 is snappy-compressed"):
        Bundle(prefix)


# --- protobuf wire format ------------------------------------------------------------------


def test_negative_and_large_varints() -> None:
    from tensorflow.core.protobuf import tensor_bundle_pb2

    proto = tensor_bundle_pb2.BundleEntryProto(
        dtype=1, shard_id=-1, offset=-(2**63), size=2**63 - 1, crc32c=0xFFFFFFFF
    )
    proto.shape.dim.add(size=-1)
    proto.shape.dim.add(size=2**40)
    proto.slices.add()
    entry = parse_bundle_entry(proto.SerializeToString())
    assert (entry.shard_id, entry.offset, entry.size, entry.crc32c) == (-1, -(2**63), 2**63 - 1, 0xFFFFFFFF)
    assert entry.shape == (-1, 2**40) and entry.num_slices == 1
    assert decode_varint(b"\xff" * 9 + b"\x01", 0) == (2**64 - 1, 10)


def test_unknown_fields_and_groups_are_skipped() -> None:
    from tensorflow.core.protobuf import tensor_bundle_pb2

    base = tensor_bundle_pb2.BundleEntryProto(dtype=9, offset=12, size=8)
    base.shape.dim.add(size=2)
    unknown = (
        b"\x98\x06\x96\x01"  # field 99 varint 150
        b"\xa1\x06" + b"\x01" * 8  # field 100 fixed64
        + b"\xad\x06" + b"\x02" * 4  # field 101 fixed32
        + b"\xb2\x06\x03abc"  # field 102 length-delimited
        + b"\xbb\x06\x08\x05\xc3\x06\x10\x01\xc4\x06\xbc\x06"  # group 103 { 1: 5, group 104 { 2: 1 } }
    )
    parsed = parse_bundle_entry(unknown + base.SerializeToString() + unknown)
    assert parsed == parse_bundle_entry(base.SerializeToString())
    assert (parsed.dtype, parsed.offset, parsed.size, parsed.shape) == (9, 12, 8, (2,))
    assert tensor_bundle_pb2.BundleEntryProto.FromString(unknown + base.SerializeToString()).size == 8


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x08", "varint at byte 1 is cut off at byte 1"),
        (b"\x08" + b"\xff" * 10, "longer than 10 bytes"),
        (b"\x0e\x00", "field 1 has invalid wire type 6"),
        (b"\x0c", "unmatched end-group tag of field 1"),
        (b"\x0b\x08\x01", "group 1 has no end tag"),
        (b"\x0b\x14", "group closed by the end tag of field 2"),
        (b"\x0a\x01\x00", "field 1 has wire type 2, expected 0"),
        (b"\x12\x05\x00", "needs 5 bytes, only 1 left"),
        (b"\x35\x00\x00", "needs 4 bytes, only 2 left"),
        (b"\x00\x00", "field number 0"),
    ],
)
def test_malformed_messages(data: bytes, message: str) -> None:
    with pytest.raises(DecodeError, match=message):
        parse_bundle_entry(data)


def test_random_bytes_never_crash_the_parsers() -> None:
    rng = random.Random(1)
    for _ in range(3000):
        data = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 24)))
        for parse in (parse_bundle_entry, parse_bundle_header, parse_object_graph):
            with contextlib.suppress(DecodeError):
                parse(data)


def _mutations(data: bytes, rng: random.Random, count: int) -> list[bytes]:
    """``count`` copies of ``data`` with one byte changed, inserted or deleted, or the end cut off."""
    out = []
    for _ in range(count):
        b = bytearray(data)
        edit, i = rng.randrange(4), rng.randrange(len(b) + 1)
        if edit == 0 and i < len(b):
            b[i] = rng.randrange(256)
        elif edit == 1:
            b.insert(i, rng.choice([0x00, 0x08, 0x12, 0x18, 0x35, 0x3A, 0x7F, 0x80, 0xFF, rng.randrange(256)]))
        elif edit == 2 and i < len(b):
            del b[i]
        else:
            del b[i:]
        out.append(bytes(b))
    return out


def test_the_fast_decoders_agree_with_the_reference(tf: Any, v2_ckpt: str, v1_ckpt: str, sharded_ckpt: str,
                                                    partitioned_ckpt: str, monkeypatch: pytest.MonkeyPatch,
                                                    tmp_path: Path) -> None:
    """An oracle test: on real entries and graphs, and on thousands of damaged copies, the fast decoders
    (TensorFlow's layout only) give what the reference decoder gives, or the same error."""
    from regraft.sources import _proto

    # More than 128 nodes: node ids of two varint bytes; a name of 200 bytes: a two-byte length.
    many = tf.train.Checkpoint(items=[tf.Variable([float(i)]) for i in range(150)],
                               **{"n" * 200: tf.Variable(1.0)})
    many_prefix = many.save(str(tmp_path / "many"))

    from tensorflow.core.protobuf import tensor_bundle_pb2

    rng = random.Random(3)
    cases = []
    values = [value for prefix in (v2_ckpt, v1_ckpt, sharded_ckpt, partitioned_ckpt)
              for _, value in _read_table(Path(prefix + ".index").read_bytes(), "x")[1:]]
    for fields, dims, unknown_rank in [  # the corners of each field, written by protobuf itself
        (dict(dtype=1, shard_id=3, offset=2**40, size=2**35, crc32c=0xFFFFFFFF), [0, 1, 127, 128, 2**62], False),
        (dict(dtype=200, offset=1, size=1, crc32c=1), [], True),
        (dict(dtype=1, shard_id=127, offset=127, size=128), [5, 0], True),
        (dict(dtype=1, shard_id=128, offset=0, size=0), [-1, 3], False),
        (dict(dtype=-1, shard_id=-2, offset=-3, size=-4), [2**63 - 1], False),
        (dict(), [], False),
    ]:
        proto = tensor_bundle_pb2.BundleEntryProto(**fields)
        for size in dims:
            proto.shape.dim.add(size=size)
        proto.shape.unknown_rank = unknown_rank
        values.append(proto.SerializeToString())
        proto.slices.add()
        values.append(proto.SerializeToString())
    for value in values:
        cases += [(parse_bundle_entry, v) for v in [value, *_mutations(value, rng, 150)]]
    written = [value for _, value in _read_table(Path(v2_ckpt + ".index").read_bytes(), "x")[1:]]
    assert None not in _proto.fast_bundle_entries(written)  # TensorFlow's entries take the fast path
    for prefix in (v2_ckpt, many_prefix):
        graph = b"".join(Bundle(prefix).read_string(OBJECT_GRAPH_KEY))
        fast_graph = _proto._fast_object_graph(graph)
        assert fast_graph is not None
        cases += [(parse_object_graph, g) for g in [graph, *_mutations(graph, rng, 300)]]
    assert any(n.slot_variables for n in _proto._fast_object_graph(b"".join(Bundle(v2_ckpt).read_string(OBJECT_GRAPH_KEY))))
    assert len(fast_graph) > 150

    def outcome(parse: Any, data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError as exc:
            return f"DecodeError: {exc}"

    fast = [outcome(parse, data) for parse, data in cases]
    monkeypatch.setattr(_proto, "_compiled_classes", lambda: {})
    reference = [outcome(parse, data) for parse, data in cases]
    assert len(fast) == len(reference) > 5000
    for (parse, data), ours, expected in zip(cases, fast, reference):
        assert ours == expected, (parse.__name__, data)
    assert sum(isinstance(r, str) for r in reference) > 100  # damaged bytes were refused, and alike


def test_dtype_names_are_numpy_names(v2_ckpt: str) -> None:
    bundle = Bundle(v2_ckpt)
    for entry in bundle.entries.values():
        expected = entry.dtype if isinstance(entry.dtype, str) else entry.dtype.name
        assert entry.dtype_name == expected


def test_listing_a_checkpoint_imports_neither_numpy_nor_protobuf_nor_h5py(v2_ckpt: str) -> None:
    code = (
        "import sys, io, contextlib; from regraft.cli.main import main\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out: assert main(['inspect', '--all', sys.argv[1]]) == 0\n"
        "assert 'v_float32' in out.getvalue()\n"
        "loaded = sorted(m for m in ('numpy', 'h5py', 'google.protobuf', 'importlib.metadata', 'zipfile', "
        "'regraft.sources.keras_h5', 'regraft.api') if m in sys.modules)\n"
        "assert not loaded, loaded"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1] / "src"))
    subprocess.run([sys.executable, "-c", code, v2_ckpt], check=True, env=env)


# --- crc32c --------------------------------------------------------------------------------


def test_crc32c_known_values_against_the_reference() -> None:
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"6789", crc32c(b"12345")) == 0xE3069283
    assert pure_python_crc32c(b"123456789") == 0xE3069283
    data = np.random.default_rng(2).integers(0, 256, 10_000, dtype=np.uint8)
    assert pure_python_crc32c(data) == crc32c(data) == crc32c(data.tobytes())
    assert pure_python_crc32c(data[5000:], pure_python_crc32c(data[:5000])) == crc32c(data)
    assert masked_crc32c(b"") == 0xA282EAD8
    assert all(unmask(mask(v)) == v for v in (0, 1, 0xFFFFFFFF, 0xE3069283))


def test_read_into_fills_the_array_given_and_checks_the_checksum_unless_told_not_to(v2_ckpt: str, tmp_path: Path) -> None:
    """The commit pass reads into the variable's next buffer; it skips the checksum only for a
    tensor the check pass verified in a file unchanged since."""
    prefix = _copy_checkpoint(v2_ckpt, tmp_path)
    bundle = Bundle(prefix)
    key = "v_float64/.ATTRIBUTES/VARIABLE_VALUE"
    entry = bundle.entries[key]
    expected = bundle.read(key)
    out = np.empty(entry.shape, np.float64)
    bundle.read_into(key, out)
    assert out.tobytes() == expected.tobytes()
    data_path = bundle.data_path(0)
    data = bytearray(Path(data_path).read_bytes())
    data[entry.offset] ^= 0x10
    Path(data_path).write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError) as info:
        bundle.read_into(key, out)
    assert info.value.message.startswith(f"{data_path}: tensor {key!r} has checksum ")
    bundle.read_into(key, out, checksum=False)
    assert out.tobytes() == bytes(data[entry.offset : entry.offset + entry.size])
    other = np.empty(entry.shape, np.float32)  # another dtype: filled through read(), checksum included
    with pytest.raises(CorruptCheckpointError):
        bundle.read_into(key, other, checksum=False)
