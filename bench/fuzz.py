"""Fuzz regraft with mutated checkpoints, state files and plan/rules YAML.

Each case takes one real file written by TensorFlow, Keras, tf-keras or regraft
itself, mutates a copy of it, and runs the library on the copy in a child
process with a time limit and an address-space limit. The outcome is sorted into
one class:

=============== ==============================================================
``clean``       a ``RegraftError`` (the expected answer to bad input)
``ok``          success, and every value read or loaded equals the original
``undetectable`` success with other values, where the format cannot notice:
                HDF5 has no checksums (a flipped data byte is a valid file),
                and an edited object graph or plan with valid checksums may
                legitimately say "this tensor is that variable"
``other-exc``   any other exception (type and place are recorded)
``hang``        the case ran past ``--time-limit``
``crash``       the child died from a signal (segfault, abort)
``memory``      ``MemoryError``, or the child was killed for memory
``silent-diff`` success with values that differ from the original, in a case
                where the format should have caught it (a TF bundle's CRC-32C)
``silent-accept`` success on input that is invalid by its format's own rules (an
                object-graph reference to a node that does not exist)
``partial``     a load that raised but left the model changed (not all-or-nothing)
``escape``      the library read a file outside the checkpoint's folder without
                saying so (state file or HDF5 external link)
``code-ran``    a YAML python tag executed code
``harness``     the mutator itself failed (a bug of this script, not a finding)
=============== ==============================================================

Only ``clean``, ``ok`` and ``undetectable`` are good outcomes.

Speed: the parent imports regraft and TensorFlow once and forks long-lived
workers from it (the parent itself never runs a TensorFlow op; the fixtures are
written by a forked child). A worker that hangs, crashes or blows its memory is
killed and replaced. Every case is reproducible on its own: its random stream is
seeded by ``(--seed, case number)``, so ``--only N`` reruns case N, and ``--keep
DIR`` keeps its mutated files.

Usage::

    python bench/fuzz.py --seed 1 --cases 2000 --json fuzz.json
    python bench/fuzz.py --seed 1 --only 417 --keep /tmp/case417
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import random
import resource
import shutil
import signal
import struct
import sys
import tempfile
import time
import traceback
from collections import Counter, defaultdict
from multiprocessing.connection import Connection, Pipe, wait
from typing import Any, Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

GOOD = ("clean", "ok", "undetectable")
CLASSES = ("clean", "ok", "undetectable", "other-exc", "hang", "crash", "memory", "silent-diff",
           "silent-accept", "partial", "escape", "code-ran", "harness")
FILL = 0.4375  # every model variable is set to this before a load: "not loaded" is then visible
MARKER = 31337.0  # the value of the dataset outside the folder that external links point to


# ----------------------------------------------------------------------------- small encoders


def varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[pos]
        result |= (b & 0x7F) << shift
        pos += 1
        if b < 0x80:
            return result, pos
        shift += 7


def crc_masked(data: bytes) -> int:
    from regraft.sources._crc32c import crc32c, mask  # checked against TensorFlow in make_fixtures

    return mask(crc32c(data))


# ----------------------------------------------------------------------------- SSTable


TABLE_MAGIC = 0xDB4775248B80FB57


def block_entries(block: bytes) -> list[tuple[bytes, bytes]]:
    (num_restarts,) = struct.unpack_from("<I", block, len(block) - 4)
    limit = len(block) - 4 * (num_restarts + 1)
    out, key, pos = [], b"", 0
    while pos < limit:
        shared, pos = read_varint(block, pos)
        non_shared, pos = read_varint(block, pos)
        size, pos = read_varint(block, pos)
        key = key[:shared] + block[pos:pos + non_shared]
        pos += non_shared
        out.append((key, block[pos:pos + size]))
        pos += size
    return out


def table_blocks(index: bytes) -> list[tuple[str, int, int]]:
    """(what, offset, size) of every block of an SSTable."""
    footer = index[-48:]
    meta_off, pos = read_varint(footer, 0)
    meta_size, pos = read_varint(footer, pos)
    idx_off, pos = read_varint(footer, pos)
    idx_size, pos = read_varint(footer, pos)
    blocks = [("metaindex", meta_off, meta_size), ("index", idx_off, idx_size)]
    for _, handle in block_entries(index[idx_off:idx_off + idx_size]):
        off, p = read_varint(handle, 0)
        size, _ = read_varint(handle, p)
        blocks.append(("data", off, size))
    return blocks


def table_read(index: bytes) -> list[tuple[bytes, bytes]]:
    out = []
    for what, off, size in table_blocks(index):
        if what == "data":
            out.extend(block_entries(index[off:off + size]))
    return out


def _block(entries: list[tuple[bytes, bytes]]) -> bytes:
    body, restarts = bytearray(), []
    for key, value in entries:
        restarts.append(len(body))
        body += varint(0) + varint(len(key)) + varint(len(value)) + key + value
    if not restarts:
        restarts = [0]
    body += b"".join(struct.pack("<I", r) for r in restarts) + struct.pack("<I", len(restarts))
    return bytes(body)


def _trailer(block: bytes) -> bytes:
    return b"\x00" + struct.pack("<I", crc_masked(block + b"\x00"))


def table_write(entries: list[tuple[bytes, bytes]]) -> bytes:
    """An uncompressed SSTable with one data block and valid checksums (what TF's writer makes, unsharded)."""
    data = _block(entries)
    meta = _block([])
    out = data + _trailer(data)
    meta_off = len(out)
    out += meta + _trailer(meta)
    last = entries[-1][0] if entries else b""
    index = _block([(last, varint(0) + varint(len(data)))])
    idx_off = len(out)
    out += index + _trailer(index)
    handles = varint(meta_off) + varint(len(meta)) + varint(idx_off) + varint(len(index))
    return out + handles.ljust(40, b"\x00") + struct.pack("<Q", TABLE_MAGIC)


def fix_block_crcs(index: bytearray) -> None:
    """Recompute every block's trailer checksum in place (so edits get past them)."""
    try:
        blocks = table_blocks(bytes(index))
    except Exception:
        return
    for _, off, size in blocks:
        if off + size + 5 <= len(index) - 48:
            index[off + size + 1:off + size + 5] = struct.pack("<I", crc_masked(bytes(index[off:off + size + 1])))


def encode_string_tensor(value: bytes) -> tuple[bytes, int]:
    """The on-disk bytes of a scalar DT_STRING tensor and its entry checksum."""
    length = struct.pack("<I", len(value))
    from regraft.sources._crc32c import crc32c, mask

    lengths_crc = struct.pack("<I", mask(crc32c(length)))
    data = varint(len(value)) + lengths_crc + value
    return data, mask(crc32c(length + lengths_crc + value))


# ----------------------------------------------------------------------------- fixtures


def build_keras3_model():
    import keras

    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(5, name="d1"), keras.layers.Dense(3, name="d2")],
                            name="net")


def make_fixtures(root: str) -> None:
    """Write every original file (runs in a forked child: the parent runs no TF op)."""
    import h5py
    import numpy as np
    import tensorflow as tf
    import tf_keras

    import regraft

    rng = np.random.default_rng(0)
    model = build_keras3_model()
    for v in model.weights:
        v.assign(rng.standard_normal(v.shape).astype("float32"))
    values = [np.array(v.numpy()) for v in model.weights]
    np.savez(os.path.join(root, "values.npz"), *values)

    tf.train.Checkpoint(model=model).write(os.path.join(root, "tf", "ckpt"))
    os.makedirs(os.path.join(root, "state"))
    tf.train.Checkpoint(model=model).write(os.path.join(root, "state", "ckpt-1"))
    with open(os.path.join(root, "state", "checkpoint"), "w") as f:
        f.write('model_checkpoint_path: "ckpt-1"\nall_model_checkpoint_paths: "ckpt-1"\n')
    os.makedirs(os.path.join(root, "outside"))
    tf.train.Checkpoint(model=model).write(os.path.join(root, "outside", "ckpt-9"))
    with h5py.File(os.path.join(root, "outside", "marker.h5"), "w") as f:
        f["x"] = np.full((4, 5), MARKER, "float32")
        f["vars/0"] = np.full((4, 5), MARKER, "float32")
    model.save_weights(os.path.join(root, "k3.weights.h5"))

    old = tf_keras.Sequential([tf_keras.Input((4,)), tf_keras.layers.Dense(5, name="d1"),
                               tf_keras.layers.Dense(3, name="d2")])
    old.set_weights(values)
    old.save_weights(os.path.join(root, "k2.h5"))
    old.save_weights(os.path.join(root, "tfk", "ckpt"))  # TF format: keys layer_with_weights-N

    regraft.save_plan(regraft.plan(model, os.path.join(root, "tf", "ckpt")), os.path.join(root, "plan.yaml"))
    with open(os.path.join(root, "rules.yaml"), "w") as f:
        f.write("rename:\n  'model/d1/': 'model/d1/'\ninit:\n  - 'nothing/*'\nignore:\n  - 'save_counter*'\n"
                "transform:\n  - key: 'model/d2/kernel'\n    op: identity\n")

    # Self-checks: this script's SSTable writer and string encoder must produce files TF reads,
    # else every "recomputed checksum" mutation would be rejected for the wrong reason.
    prefix = os.path.join(root, "tf", "ckpt")
    with open(prefix + ".index", "rb") as f:
        entries = table_read(f.read())
    check = os.path.join(root, "selfcheck")
    os.makedirs(check)
    graph_entry = dict(entries)[b"_CHECKPOINTABLE_OBJECT_GRAPH"]
    graph = tf.train.load_checkpoint(prefix).get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH")
    data, crc = encode_string_tensor(graph)
    from tensorflow.core.protobuf import tensor_bundle_pb2

    proto = tensor_bundle_pb2.BundleEntryProto.FromString(graph_entry)
    assert proto.crc32c == crc, "string tensor checksum recomputation disagrees with TensorFlow"
    shutil.copy(prefix + ".data-00000-of-00001", os.path.join(check, "c.data-00000-of-00001"))
    with open(os.path.join(check, "c.index"), "wb") as f:
        f.write(table_write(entries))
    reader = tf.train.load_checkpoint(os.path.join(check, "c"))
    assert sorted(reader.get_variable_to_shape_map()) == sorted(tf.train.load_checkpoint(prefix).get_variable_to_shape_map())
    with regraft.open(os.path.join(check, "c")) as src:
        assert len(src.entries()) >= 4


# ----------------------------------------------------------------------------- mutators

# A mutator gets (rng, fixture folder, case folder) and returns (path to open, note, undetectable):
# ``undetectable`` says that different values would not be a finding (no checksum covers them);
# the string "invalid" says the input breaks the format's rules, so success is a finding.

Mutator = Callable[[random.Random, str, str], tuple[str, str, bool]]
MUTATORS: dict[str, dict[str, Mutator]] = defaultdict(dict)


def mutator(kind: str, name: str) -> Callable[[Mutator], Mutator]:
    def add(fn: Mutator) -> Mutator:
        MUTATORS[kind][name] = fn
        return fn

    return add


def copy_tf(fx: str, case: str, sub: str = "tf", name: str = "ckpt") -> str:
    os.makedirs(os.path.join(case, sub), exist_ok=True)
    for f in os.listdir(os.path.join(fx, sub)):
        shutil.copy(os.path.join(fx, sub, f), os.path.join(case, sub, f))
    return os.path.join(case, sub, name)


def flip_bytes(rng: random.Random, buf: bytearray, lo: int = 0, hi: int | None = None, count: int | None = None) -> str:
    hi = len(buf) if hi is None else hi
    if hi <= lo:
        return "nothing to flip"
    spots = []
    for _ in range(count or rng.choice((1, 1, 1, 2, 4, 16))):
        i = rng.randrange(lo, hi)
        if rng.random() < 0.5:
            bit = rng.randrange(8)
            buf[i] ^= 1 << bit
            spots.append(f"{i}^bit{bit}")
        else:
            buf[i] = rng.randrange(256)
            spots.append(f"{i}={buf[i]}")
    return "flip " + ",".join(spots)


def rw(path: str, fn: Callable[[bytearray], str]) -> str:
    with open(path, "rb") as f:
        buf = bytearray(f.read())
    note = fn(buf)
    with open(path, "wb") as f:
        f.write(buf)
    return note


# --- TF bundles


@mutator("tf", "data-flip")
def _tf_data_flip(rng, fx, case, sub="tf"):
    prefix = copy_tf(fx, case, sub)
    return prefix, rw(prefix + ".data-00000-of-00001", lambda b: flip_bytes(rng, b)), False


@mutator("tf", "index-flip")
def _tf_index_flip(rng, fx, case, sub="tf"):
    prefix = copy_tf(fx, case, sub)
    return prefix, rw(prefix + ".index", lambda b: flip_bytes(rng, b)), False


@mutator("tf", "index-flip-crc-fixed")
def _tf_index_flip_fixed(rng, fx, case, sub="tf"):
    prefix = copy_tf(fx, case, sub)

    def edit(buf):
        blocks = table_blocks(bytes(buf))
        what, off, size = rng.choice(blocks)
        note = f"{what} block: " + flip_bytes(rng, buf, off, off + size, rng.choice((1, 1, 2, 3)))
        if what == "index":  # fix the index block's own CRC, then the data blocks it may now name
            buf[off + size + 1:off + size + 5] = struct.pack("<I", crc_masked(bytes(buf[off:off + size + 1])))
        fix_block_crcs(buf)
        return note

    return prefix, rw(prefix + ".index", edit), False


@mutator("tf", "truncate")
def _tf_truncate(rng, fx, case, sub="tf"):
    prefix = copy_tf(fx, case, sub)
    name = prefix + rng.choice((".index", ".data-00000-of-00001"))
    size = os.path.getsize(name)
    cut = rng.choice((0, 1, rng.randrange(size), size - 1, size - 48, size - 4))
    os.truncate(name, max(cut, 0))
    return prefix, f"truncate {os.path.basename(name)} to {max(cut, 0)} of {size}", False


def _entry_edit(rng: random.Random, key: bytes, value: bytes) -> tuple[bytes, str]:
    from tensorflow.core.protobuf import tensor_bundle_pb2

    if key == b"":
        header = tensor_bundle_pb2.BundleHeaderProto.FromString(value)
        choice = rng.choice(("num_shards", "endianness", "version", "garble"))
        if choice == "num_shards":
            header.num_shards = rng.choice((0, 2, 3, 100, 10**6, 2**31 - 1, -1, -(2**31)))
            return header.SerializeToString(), f"header num_shards={header.num_shards}"
        if choice == "endianness":
            header.endianness = 1
            return header.SerializeToString(), "header big-endian"
        if choice == "version":
            header.version.producer = rng.choice((0, 2, 99, -1))
            header.version.min_consumer = rng.choice((0, 1, 99, 2**31 - 1))
            header.version.bad_consumers.append(1)
            return header.SerializeToString(), f"header version {header.version}".replace("\n", " ")
        raw = bytearray(value)
        return bytes(raw[: rng.randrange(len(raw) + 1)]) + bytes(rng.randrange(256) for _ in range(rng.randrange(4))), "header garbled bytes"
    entry = tensor_bundle_pb2.BundleEntryProto.FromString(value)
    choice = rng.choice(("dtype", "shape", "shape", "shard", "offset", "size", "crc", "slices", "raw", "unknown-field"))
    if choice == "dtype":
        entry.dtype = rng.choice((0, 2, 3, 4, 7, 10, 14, 19, 20, 21, 23, 24, 30, 33, 99, 101, 1000))
        note = f"dtype={entry.dtype}"
    elif choice == "shape":
        dims = [d.size for d in entry.shape.dim]
        op = rng.choice(("huge", "neg", "zero", "add", "drop", "swap", "unknown-rank", "many"))
        if op == "huge" and dims:
            dims[rng.randrange(len(dims))] = rng.choice((2**31, 2**40, 2**62, 2**63 - 1))
        elif op == "neg" and dims:
            dims[rng.randrange(len(dims))] = rng.choice((-1, -2, -(2**63)))
        elif op == "zero" and dims:
            dims[rng.randrange(len(dims))] = 0
        elif op == "add":
            dims.insert(rng.randrange(len(dims) + 1), rng.choice((1, 2, 7)))
        elif op == "drop" and dims:
            dims.pop(rng.randrange(len(dims)))
        elif op == "swap":
            dims = dims[::-1]
        elif op == "many":
            dims = [1] * rng.choice((33, 64, 300))
        del entry.shape.dim[:]
        for d in dims:
            entry.shape.dim.add().size = d
        if op == "unknown-rank":
            entry.shape.unknown_rank = True
        note = f"shape {op} -> {dims[:8]}"
    elif choice == "shard":
        entry.shard_id = rng.choice((1, 2, 7, 2**31 - 1, -1))
        note = f"shard_id={entry.shard_id}"
    elif choice == "offset":
        entry.offset = rng.choice((1, entry.offset + 4, 10**6, 2**40, 2**63 - 1, -1, -(2**62)))
        note = f"offset={entry.offset}"
    elif choice == "size":
        entry.size = rng.choice((0, max(entry.size - 4, 0), entry.size + 4, 2**32, 2**62, -1))
        note = f"size={entry.size}"
    elif choice == "crc":
        entry.crc32c = rng.randrange(2**32)
        note = f"crc32c={entry.crc32c}"
    elif choice == "slices":
        s = entry.slices.add()
        s.extent.add().start = rng.choice((0, 1, -1))
        note = "slices added"
    elif choice == "unknown-field":
        return value + varint((rng.choice((8, 15, 99, 536870911)) << 3) | rng.choice((0, 2, 5))) + b"\x05abcde", "unknown field"
    else:
        raw = bytearray(value)
        note = "raw " + flip_bytes(rng, raw)
        return bytes(raw), note
    return entry.SerializeToString(), note


@mutator("tf", "entry-edit")
def _tf_entry_edit(rng, fx, case, sub="tf"):
    """Edit one BundleEntryProto (or the header) and rebuild the index with valid checksums."""
    prefix = copy_tf(fx, case, sub)

    def edit(buf):
        entries = table_read(bytes(buf))
        i = rng.randrange(len(entries)) if rng.random() < 0.8 else 0
        value, note = _entry_edit(rng, *entries[i])
        entries[i] = (entries[i][0], value)
        buf[:] = table_write(entries)
        return f"{entries[i][0][:60]!r}: {note}"

    return prefix, rw(prefix + ".index", edit), False


@mutator("tf", "key-edit")
def _tf_key_edit(rng, fx, case, sub="tf"):
    """Rename, duplicate, drop, reorder or garble index keys; checksums valid."""
    prefix = copy_tf(fx, case, sub)

    def edit(buf):
        entries = table_read(bytes(buf))
        i = rng.randrange(len(entries))
        op = rng.choice(("rename", "dup", "drop", "drop-header", "unsorted", "non-utf8", "empty", "long", "nul"))
        key, value = entries[i]
        if op == "rename":
            entries[i] = (key[:-3] + b"zzz", value)
        elif op == "dup":
            entries.insert(i, (key, value))
        elif op in ("drop", "drop-header"):
            entries.pop(0 if op == "drop-header" else i)
        elif op == "unsorted":
            rng.shuffle(entries)
        elif op == "non-utf8":
            entries[i] = (key + b"\xff\xfe", value)
        elif op == "empty":
            entries[i] = (b"", value)
        elif op == "long":
            entries[i] = (key + b"x" * 70000, value)
        elif op == "nul":
            entries[i] = (key.replace(b"/", b"\x00", 1), value)
        buf[:] = table_write(entries)
        return f"{op} {key[:60]!r}"

    return prefix, rw(prefix + ".index", edit), False


@mutator("tf", "shards")
def _tf_shards(rng, fx, case, sub="tf"):
    """Missing or extra data shards (header edited with valid checksums where it must be)."""
    prefix = copy_tf(fx, case, sub)
    op = rng.choice(("missing", "extra-file", "claim-2", "claim-2-with-file", "dir-shard", "empty-shard"))
    data = prefix + ".data-00000-of-00001"
    if op == "missing":
        os.remove(data)
    elif op == "extra-file":
        shutil.copy(data, prefix + ".data-00001-of-00002")
    elif op == "dir-shard":
        os.remove(data)
        os.mkdir(data)
    elif op == "empty-shard":
        open(data, "w").close()
    else:
        from tensorflow.core.protobuf import tensor_bundle_pb2

        def edit(buf):
            entries = table_read(bytes(buf))
            header = tensor_bundle_pb2.BundleHeaderProto.FromString(entries[0][1])
            header.num_shards = 2
            entries[0] = (b"", header.SerializeToString())
            buf[:] = table_write(entries)
            return ""

        rw(prefix + ".index", edit)
        if op == "claim-2-with-file":
            shutil.copy(data, prefix + ".data-00000-of-00002")
            shutil.copy(data, prefix + ".data-00001-of-00002")
    return prefix, op, False


@mutator("tf", "object-graph")
def _tf_object_graph(rng, fx, case, sub="tf"):
    """Edit the TrackableObjectGraph, re-encode it with a valid checksum (an undetectable rewrite)."""
    from tensorflow.core.protobuf import tensor_bundle_pb2, trackable_object_graph_pb2

    prefix = copy_tf(fx, case, sub)
    with open(prefix + ".index", "rb") as f:
        entries = table_read(f.read())
    table = dict(entries)
    key = b"_CHECKPOINTABLE_OBJECT_GRAPH"
    entry = tensor_bundle_pb2.BundleEntryProto.FromString(table[key])
    data_path = prefix + ".data-00000-of-00001"
    with open(data_path, "rb") as f:
        data = f.read()
    raw = data[entry.offset:entry.offset + entry.size]
    length, pos = read_varint(raw, 0)
    graph = trackable_object_graph_pb2.TrackableObjectGraph.FromString(raw[pos + 4:pos + 4 + length])
    nodes = graph.nodes
    n = len(nodes)
    with_children = [i for i in range(n) if nodes[i].children]
    with_attrs = [i for i in range(n) if nodes[i].attributes]
    op = rng.choice(("child-oob", "child-neg", "child-self", "child-root", "drop-node", "dup-child-name",
                     "empty-child-name", "attr-key-missing", "attr-key-other", "swap-children", "slot-oob",
                     "full-name", "raw-garble", "no-nodes", "many-nodes"))
    note = op
    if op in ("child-oob", "child-neg", "child-self", "child-root"):
        node = nodes[rng.choice(with_children)]
        ref = node.children[rng.randrange(len(node.children))]
        ref.node_id = {"child-oob": n + rng.choice((0, 5, 2**31 - 1 - n)), "child-neg": rng.choice((-1, -2, -(2**31))),
                       "child-self": nodes.index(node) if hasattr(nodes, "index") else 0, "child-root": 0}[op]
        note = f"{op} node_id={ref.node_id}"
    elif op == "drop-node":
        del nodes[rng.randrange(1, n)]
    elif op == "dup-child-name":
        node = nodes[rng.choice(with_children)]
        if len(node.children) > 1:
            node.children[1].local_name = node.children[0].local_name
    elif op == "empty-child-name":
        node = nodes[rng.choice(with_children)]
        node.children[0].local_name = ""
    elif op in ("attr-key-missing", "attr-key-other"):
        node = nodes[rng.choice(with_attrs)]
        other = [k.decode() for k in table if k.endswith(b"VARIABLE_VALUE")]
        node.attributes[0].checkpoint_key = "nothing/here" if op == "attr-key-missing" else rng.choice(other)
    elif op == "swap-children":
        node = nodes[rng.choice(with_children)]
        if len(node.children) > 1:
            a, b = node.children[0].node_id, node.children[1].node_id
            node.children[0].node_id, node.children[1].node_id = b, a
    elif op == "slot-oob":
        slot = nodes[0].slot_variables.add()
        slot.original_variable_node_id = rng.choice((n + 3, -1, 1))
        slot.slot_variable_node_id = rng.choice((n + 7, -5, 2))
        slot.slot_name = "m"
    elif op == "full-name":
        node = nodes[rng.choice(with_attrs)]
        node.attributes[0].full_name = rng.choice(("", "/", "a" * 5000, "x/../../y", "d1/kernel\x00"))
    elif op == "no-nodes":
        del nodes[:]
    elif op == "many-nodes":
        for i in range(rng.choice((1000, 20000))):
            nodes.add().children.add(node_id=n + i + 1, local_name=f"c{i}")
    payload = graph.SerializeToString()
    invalid = op in ("child-oob", "child-neg")
    if op == "raw-garble":
        buf = bytearray(payload)
        note += " " + flip_bytes(rng, buf)
        payload = bytes(buf)
    encoded, crc = encode_string_tensor(payload)
    entry.offset, entry.size, entry.crc32c = len(data), len(encoded), crc
    with open(data_path, "ab") as f:
        f.write(encoded)
    table[key] = entry.SerializeToString()
    with open(prefix + ".index", "wb") as f:
        f.write(table_write(sorted(table.items())))
    return prefix, note, "invalid" if invalid else True


for _name, _fn in list(MUTATORS["tf"].items()):  # the same mutations of a tf-keras save_weights checkpoint
    MUTATORS["tfk"][_name] = functools.partial(_fn, sub="tfk")


# --- checkpoint state files


@mutator("state", "points")
def _state(rng, fx, case):
    copy_tf(fx, case, "state", "ckpt-1")
    shutil.copytree(os.path.join(fx, "outside"), os.path.join(case, "outside"))
    folder = os.path.join(case, "state")
    outside = os.path.join(case, "outside", "ckpt-9")
    target = rng.choice(("../outside/ckpt-9", outside, "/etc/passwd", "/proc/self/mem", "/", "..", "ckpt-404",
                         "", "ckpt-1.index", "ckpt-1\x00x", "\udcff", "ckpt-1\" extra \"", "a" * 5000,
                         "ckpt-1/../../outside/ckpt-9", "./ckpt-1", "//ckpt-1"))
    body = rng.choice((f'model_checkpoint_path: "{target}"\n', f"model_checkpoint_path: {target}\n",
                       f'all_model_checkpoint_paths: "ckpt-1"\nmodel_checkpoint_path: "{target}"\n',
                       f'model_checkpoint_path: "ckpt-1"\nmodel_checkpoint_path: "{target}"\n'))
    with open(os.path.join(folder, "checkpoint"), "wb") as f:
        f.write(body.encode("utf-8", "surrogateescape") if rng.random() < 0.9 else b"\xff\xfe" + os.urandom(40))
    return folder, repr(body[:120]), False


# --- HDF5 (Keras 3 .weights.h5 and Keras 2 .h5)


def _h5_datasets(f) -> list[str]:
    import h5py

    names: list[str] = []
    f.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
    return names


def _h5_groups(f) -> list[str]:
    import h5py

    names: list[str] = []
    f.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Group) else None)
    return names


def _find_all(buf: bytes, needle: bytes) -> list[int]:
    out, at = [], buf.find(needle)
    while at >= 0:
        out.append(at)
        at = buf.find(needle, at + 1)
    return out


def copy_h5(fx: str, case: str, kind: str) -> str:
    name = "k3.weights.h5" if kind == "k3" else "k2.h5"
    os.makedirs(case, exist_ok=True)
    shutil.copy(os.path.join(fx, name), os.path.join(case, name))
    return os.path.join(case, name)


def h5_mutators(kind: str) -> None:
    @mutator(kind, "byte-flip")
    def byte_flip(rng, fx, case):
        path = copy_h5(fx, case, kind)
        return path, rw(path, lambda b: flip_bytes(rng, b, 8)), True

    @mutator(kind, "attr-flip")
    def attr_flip(rng, fx, case):
        """Damage the bytes around an attribute (its message header and value): h5py decodes these itself."""
        path = copy_h5(fx, case, kind)

        def edit(buf):
            spots = [i for name in (b"layer_names", b"weight_names", b"name", b"backend", b"keras_version",
                                    b"date_saved", b"d1", b"d2") for i in _find_all(bytes(buf), name)]
            if not spots:
                return "no attribute found"
            at = rng.choice(spots)
            return f"near byte {at}: " + flip_bytes(rng, buf, max(8, at - 48), min(len(buf), at + 64),
                                                    rng.choice((1, 2, 4, 13)))

        return path, rw(path, edit), True

    @mutator(kind, "data-flip")
    def data_flip(rng, fx, case):
        import h5py

        path = copy_h5(fx, case, kind)
        with h5py.File(path, "r") as f:
            name = rng.choice(_h5_datasets(f))
            offset, size = f[name].id.get_offset(), f[name].id.get_storage_size()
        if offset is None or not size:
            return path, f"{name}: no contiguous data", True
        return path, f"{name}: " + rw(path, lambda b: flip_bytes(rng, b, offset, offset + size)), True

    @mutator(kind, "truncate")
    def truncate(rng, fx, case):
        path = copy_h5(fx, case, kind)
        size = os.path.getsize(path)
        cut = rng.choice((8, 96, rng.randrange(size), size - 1, size // 2))
        os.truncate(path, cut)
        return path, f"truncate to {cut} of {size}", True

    @mutator(kind, "dtype")
    def dtype(rng, fx, case):
        import h5py
        import numpy as np

        path = copy_h5(fx, case, kind)
        with h5py.File(path, "r+") as f:
            name = rng.choice(_h5_datasets(f))
            old = f[name][()]
            del f[name]
            choice = rng.choice(("float16", "float64", "int8", "uint64", "bool", "complex64", "compound", "vlen-str",
                                 "fixed-str", "objref", "regionref", "enum", "opaque", "bytes-obj", "array-dtype"))
            if choice in ("float16", "float64", "int8", "uint64", "bool", "complex64"):
                f[name] = old.astype(choice)
            elif choice == "compound":
                f[name] = np.zeros(old.shape, dtype=[("a", "f4"), ("b", "i4")])
            elif choice == "vlen-str":
                f.create_dataset(name, data=np.array(["x"] * old.size, dtype=object).reshape(old.shape),
                                 dtype=h5py.string_dtype())
            elif choice == "fixed-str":
                f[name] = np.full(old.shape, b"abc", dtype="S3")
            elif choice == "objref":
                d = f.create_dataset(name, old.shape, dtype=h5py.ref_dtype)
                d[...] = f.ref
            elif choice == "regionref":
                f.create_dataset(name, (2,), dtype=h5py.regionref_dtype)
            elif choice == "enum":
                f.create_dataset(name, old.shape, dtype=h5py.enum_dtype({"A": 0, "B": 1}, basetype="i1"))
            elif choice == "opaque":
                f[name] = np.void(b"\x01\x02\x03\x04")
            elif choice == "bytes-obj":
                f.create_dataset(name, old.shape, dtype=h5py.vlen_dtype(np.dtype("int32")))
            else:
                f.create_dataset(name, (2,), dtype=np.dtype(("f4", (2, 2))))
        return path, f"{name} -> {choice}", True

    @mutator(kind, "shape")
    def shape(rng, fx, case):
        import h5py
        import numpy as np

        path = copy_h5(fx, case, kind)
        with h5py.File(path, "r+") as f:
            name = rng.choice(_h5_datasets(f))
            old = f[name][()]
            del f[name]
            choice = rng.choice(("transpose", "extra-dim", "zero", "scalar", "flat", "huge-sparse", "huge-1d",
                                 "maxshape-none", "empty-space"))
            if choice == "transpose":
                f[name] = old.T.copy() if old.ndim > 1 else old[::-1].copy()
            elif choice == "extra-dim":
                f[name] = old[None]
            elif choice == "zero":
                f.create_dataset(name, (0,) + old.shape[1:], dtype=old.dtype)
            elif choice == "scalar":
                f[name] = np.float32(1.5)
            elif choice == "flat":
                f[name] = old.reshape(-1)
            elif choice == "huge-sparse":
                f.create_dataset(name, (2**20, 2**20), dtype="f4", chunks=(64, 64))
            elif choice == "huge-1d":
                f.create_dataset(name, (2**40,), dtype="f8", chunks=(1024,))
            elif choice == "maxshape-none":
                f.create_dataset(name, data=old, maxshape=(None,) * old.ndim, chunks=True)
            else:
                f.create_dataset(name, dtype="f4", shape=h5py.Empty("f4").shape)
        return path, f"{name} -> {choice}", True

    @mutator(kind, "groups")
    def groups(rng, fx, case):
        import h5py
        import numpy as np

        path = copy_h5(fx, case, kind)
        with h5py.File(path, "r+") as f:
            choice = rng.choice(("drop-dataset", "drop-group", "extra-group", "extra-dataset", "deep", "weird-name",
                                 "group-for-dataset", "dataset-for-group"))
            name = rng.choice(_h5_datasets(f) if "dataset" in choice else _h5_groups(f) or ["x"])
            if choice in ("drop-dataset", "drop-group"):
                if name in f:
                    del f[name]
            elif choice == "extra-group":
                f.create_group(name + "/extra/vars")
            elif choice == "extra-dataset":
                parent = name.rpartition("/")[0]
                f[(parent + "/" if parent else "") + rng.choice(("7", "vars/7", "extra:0", "-1", "01"))] = np.ones(3, "f4")
            elif choice == "deep":
                f.create_group("/".join(["layers"] + ["g"] * 60 + ["vars"]))
                f["/".join(["layers"] + ["g"] * 60 + ["vars", "0"])] = np.ones(2, "f4")
            elif choice == "weird-name":
                f.create_group(rng.choice(("layers/ü\u200b", "layers/a b", "layers/%s", "layers/..")) + "/vars")
                f[rng.choice(("vars/x", "vars/0x1", "vars/٣"))] = np.ones(2, "f4")
            elif choice == "group-for-dataset":
                del f[name]
                f.create_group(name)
            else:
                if name in f and name:
                    del f[name]
                f[name or "layers"] = np.ones(2, "f4")
        return path, f"{choice} {name}", True

    @mutator(kind, "links")
    def links(rng, fx, case):
        import h5py

        path = copy_h5(fx, case, kind)
        shutil.copytree(os.path.join(fx, "outside"), os.path.join(case, "outside"))
        marker = os.path.join(case, "outside", "marker.h5")
        with h5py.File(path, "r+") as f:
            datasets, grps = _h5_datasets(f), _h5_groups(f)
            name = rng.choice(datasets)
            choice = rng.choice(("soft-dataset", "soft-dangling", "soft-loop", "soft-parent", "hard-cycle",
                                 "external-abs", "external-rel", "external-missing", "external-self", "soft-root"))
            if choice == "soft-dataset":
                other = rng.choice(datasets)
                del f[name]
                f[name] = h5py.SoftLink("/" + other)
            elif choice == "soft-dangling":
                del f[name]
                f[name] = h5py.SoftLink("/nowhere/at/all")
            elif choice == "soft-loop":
                del f[name]
                f[name] = h5py.SoftLink("/" + name)
            elif choice in ("soft-parent", "soft-root"):
                group = rng.choice(grps)
                f[group + "/loop"] = h5py.SoftLink("/" if choice == "soft-root" else "/" + group)
            elif choice == "hard-cycle":
                group = rng.choice(grps)
                f[group + "/cycle"] = f[group]
            else:
                del f[name]
                file = {"external-abs": marker, "external-rel": "outside/marker.h5",
                        "external-missing": "/nonexistent/x.h5", "external-self": os.path.basename(path)}[choice]
                f[name] = h5py.ExternalLink(file, rng.choice(("/x", "/vars/0")))
        return path, f"{choice} {name}", True

    @mutator(kind, "attrs")
    def attrs(rng, fx, case):
        import h5py
        import numpy as np

        path = copy_h5(fx, case, kind)
        with h5py.File(path, "r+") as f:
            values = (b"", "", 1.5, 7, np.array([1, 2]), np.array([b"\xff\xfe"]), b"\xff\xfe", "x" * 70000,
                      np.array(["nope"], dtype="S4"), np.zeros((2, 2)), np.array([], dtype="S1"))
            value = values[rng.randrange(len(values))]
            if kind == "k2":
                layer = rng.choice([n.decode() if isinstance(n, bytes) else n for n in f.attrs["layer_names"]])
                where = rng.choice(("layer_names", "weight_names", "weight_names-missing", "layer_names-missing",
                                    "drop-attr"))
                if where == "layer_names":
                    f.attrs["layer_names"] = value
                elif where == "weight_names":
                    f[layer].attrs["weight_names"] = value
                elif where == "weight_names-missing":
                    f[layer].attrs["weight_names"] = np.array([b"d1/kernel:0", b"d1/missing:0"])
                elif where == "layer_names-missing":
                    f.attrs["layer_names"] = np.array([b"d1", b"ghost"])
                else:
                    del f[layer].attrs["weight_names"]
                return path, f"{where}={value!r:.60}", True
            groups = [g for g in _h5_groups(f) if g.endswith("vars")]
            group = rng.choice(groups)
            f[group].attrs["name"] = value
            return path, f"{group}.name={value!r:.60}", True


h5_mutators("k3")
h5_mutators("k2")


# --- plan and rules YAML


def _yaml_paths(node: Any, path: tuple = ()) -> list[tuple]:
    out = [path]
    if isinstance(node, dict):
        for k, v in node.items():
            out.extend(_yaml_paths(v, path + (k,)))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out.extend(_yaml_paths(v, path + (i,)))
    return out


WRONG_VALUES = (None, 5, -1, 1.5, True, "abc", "", [], [1, 2], {}, {"a": 1}, ["x"], 2**70, "model/d1/kernel",
                "../../etc/passwd", "\u0000", "a" * 10000)


def yaml_mutators(kind: str, fixture: str) -> None:
    def load_fixture(fx: str) -> Any:
        import yaml

        with open(os.path.join(fx, fixture)) as f:
            return yaml.safe_load(f)

    def write(case: str, text: str | bytes) -> str:
        os.makedirs(case, exist_ok=True)
        path = os.path.join(case, fixture)
        with open(path, "wb") as f:
            f.write(text.encode("utf-8", "surrogateescape") if isinstance(text, str) else text)
        return path

    @mutator(kind, "structure")
    def structure(rng, fx, case):
        import yaml

        data = load_fixture(fx)
        notes = []
        for _ in range(rng.choice((1, 1, 2, 3))):
            paths = [p for p in _yaml_paths(data) if p]
            if not paths:
                break
            path = rng.choice(paths)
            parent = data
            for k in path[:-1]:
                parent = parent[k]
            if isinstance(parent, dict) and rng.random() < 0.35:
                del parent[path[-1]]
                notes.append(f"drop {'.'.join(map(str, path))}")
            else:
                value = copy.deepcopy(WRONG_VALUES[rng.randrange(len(WRONG_VALUES))])
                parent[path[-1]] = value
                notes.append(f"{'.'.join(map(str, path))}={value!r:.30}")
        if rng.random() < 0.1:
            data = copy.deepcopy(WRONG_VALUES[rng.randrange(len(WRONG_VALUES))])
            notes = [f"whole file = {data!r:.30}"]
        return write(case, yaml.safe_dump(data, sort_keys=False)), "; ".join(notes), True

    @mutator(kind, "text")
    def text(rng, fx, case):
        with open(os.path.join(fx, fixture), "rb") as f:
            buf = bytearray(f.read())
        choice = rng.choice(("flip", "cut", "non-utf8", "tabs", "dup-key", "anchor-bomb", "deep", "empty", "bom"))
        if choice == "flip":
            note = flip_bytes(rng, buf)
        elif choice == "cut":
            del buf[rng.randrange(len(buf)):]
            note = f"cut at {len(buf)}"
        elif choice == "non-utf8":
            buf[rng.randrange(len(buf))] = 0xFF
            note = "0xff byte"
        elif choice == "tabs":
            buf = bytearray(bytes(buf).replace(b"  ", b"\t"))
            note = "tabs"
        elif choice == "dup-key":
            buf += bytes(buf).split(b"\n", 1)[0] + b"\n"
            note = "duplicate first key"
        elif choice == "anchor-bomb":
            lines = ["a: &a [x, x, x, x, x, x, x, x, x]"] + [f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}" + f", *{chr(97 + i)}" * 8 + "]" for i in range(9)]
            buf = bytearray(("\n".join(lines) + "\n").encode()) + buf
            note = "billion laughs"
        elif choice == "deep":
            buf = bytearray(b"[" * 5000 + b"]" * 5000)
            note = "5000 nested lists"
        elif choice == "empty":
            buf = bytearray()
            note = "empty"
        else:
            buf = bytearray(b"\xef\xbb\xbf") + buf
            note = "BOM"
        return write(case, bytes(buf)), note, True

    @mutator(kind, "python-tag")
    def python_tag(rng, fx, case):
        touch = os.path.join(case, "CODE_RAN")
        tag = rng.choice((f'!!python/object/apply:os.system ["touch {touch}"]',
                          f'!!python/object/apply:builtins.exec ["open({touch!r}, \'w\').close()"]',
                          "!!python/name:os.system", "!!python/object:argparse.Namespace {a: 1}",
                          "!!binary aGVsbG8=", "!!set {a, b}", "!!timestamp 2001-12-14", "!custom x"))
        with open(os.path.join(fx, fixture)) as f:
            lines = f.read().splitlines()
        i = rng.randrange(len(lines))
        head, sep, _ = lines[i].partition(": ")
        lines[i] = f"{head}: {tag}" if sep else f"{lines[i]} {tag}" if lines[i].rstrip().endswith(":") else f"x: {tag}"
        return write(case, "\n".join(lines) + "\n"), f"line {i + 1}: {tag[:50]}", True

    @mutator(kind, "path")
    def path(rng, fx, case):
        os.makedirs(case, exist_ok=True)
        choice = rng.choice(("directory", "missing", "fifo-like-devnull", "proc-mem", "no-permission"))
        target = os.path.join(case, fixture)
        if choice == "directory":
            os.mkdir(target)
        elif choice == "fifo-like-devnull":
            target = "/dev/null"
        elif choice == "proc-mem":
            target = "/proc/self/mem"
        elif choice == "no-permission":
            shutil.copy(os.path.join(fx, fixture), target)
            os.chmod(target, 0)
        else:
            target = os.path.join(case, "missing", fixture)
        return target, choice, True


yaml_mutators("plan", "plan.yaml")
yaml_mutators("rules", "rules.yaml")


# ----------------------------------------------------------------------------- running one case


def _where(tb) -> str:
    frames = traceback.extract_tb(tb)
    ours = [f for f in frames if f"{os.sep}regraft{os.sep}" in f.filename]
    frame = (ours or frames)[-1]
    inner = frames[-1]
    place = f"{os.path.relpath(frame.filename, ROOT) if ROOT in frame.filename else frame.filename}:{frame.lineno} ({frame.name})"
    if inner is not frame:
        place += f" <- {os.path.basename(inner.filename)}:{inner.lineno}"
    return place


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Worker:
    """State of a worker process: the fixtures' original values and one model to load into."""

    def __init__(self, fx: str) -> None:
        import numpy as np

        import regraft

        self.fx = fx
        self.model = build_keras3_model()
        with np.load(os.path.join(fx, "values.npz")) as z:
            self.values = [z[f"arr_{i}"] for i in range(len(z.files))]
        self.originals: dict[str, dict[str, Any]] = {}
        for kind, path in (("tf", "tf/ckpt"), ("tfk", "tfk/ckpt"), ("k3", "k3.weights.h5"), ("k2", "k2.h5"), ("state", "state")):
            with regraft.open(os.path.join(fx, path)) as src:
                self.originals[kind] = {e.key: src.read(e.key) for e in src.entries()
                                        if e.dtype not in ("string", "resource", "variant")}

    def reset(self) -> None:
        import numpy as np

        for v in self.model.weights:
            v.assign(np.full(v.shape, FILL, v.dtype))

    def model_state(self) -> str:
        """"fill" (untouched), "original" (values equal what was saved), or "other"."""
        import numpy as np

        states = set()
        for v, orig in zip(self.model.weights, self.values):
            now = np.asarray(v.numpy())
            if np.array_equal(now, np.full(now.shape, FILL, now.dtype)):
                states.add("fill")
            elif now.shape == orig.shape and np.array_equal(now.view(np.uint8), orig.view(np.uint8)):
                states.add("original")
            else:
                return "other"
        return "fill" if states == {"fill"} else "loaded"

    def run(self, kind: str, mut: str, seed: int, number: int, case: str,
            tell: Callable[[str], None] = lambda note: None) -> dict[str, Any]:
        import numpy as np

        import regraft

        rng = random.Random(f"{seed}:{number}")
        result: dict[str, Any] = {"case": number, "kind": kind, "mutator": mut, "seed": seed}
        try:
            path, note, undetectable = MUTATORS[kind][mut](rng, self.fx, case)
        except Exception as exc:
            result.update(cls="harness", exception=type(exc).__name__, message=str(exc)[:300],
                          where=_where(exc.__traceback__), traceback=traceback.format_exc()[-1500:])
            return result
        result["note"] = note
        tell(note)  # the parent knows what was being tried if this case then hangs or crashes
        phase = "open"
        outside = [os.path.join(case, "outside")]
        try:
            if kind in ("plan", "rules"):
                phase = "read-plan" if kind == "plan" else "parse-rules"
                if kind == "plan":
                    self.reset()
                    plan = regraft.read_plan(path, self.model)
                    phase = "apply"
                    try:
                        regraft.apply(plan, self.model)
                    except regraft.RegraftError:
                        if self.model_state() != "fill":
                            result.update(cls="partial", phase=phase)
                            return result
                        raise
                else:
                    from regraft.rules import parse_rules

                    parse_rules(path)
                    phase = "plan"
                    regraft.plan(self.model, os.path.join(self.fx, "tf", "ckpt"), rules=path)
                if os.path.exists(os.path.join(case, "CODE_RAN")):
                    result.update(cls="code-ran", phase=phase)
                else:
                    result.update(cls="ok", phase=phase)
                return result
            original = self.originals[kind]
            differs = []
            with regraft.open(path) as src:
                escaped = [f for f in getattr(src, "files", ()) if any(
                    os.path.realpath(f).startswith(os.path.realpath(o)) for o in outside)]
                phase = "entries"
                entries = src.entries()
                phase = "read"
                for e in entries:
                    if e.dtype in ("string", "resource", "variant"):
                        continue
                    value = src.read(e.key)
                    if isinstance(value, np.ndarray) and value.dtype.kind in "fc" and value.size and np.any(value == MARKER):
                        escaped.append(f"{e.key} holds the outside marker value")
                    if e.key in original:
                        want = original[e.key]
                        if value.shape == want.shape and value.dtype == want.dtype and not np.array_equal(
                                value.view(np.uint8), want.view(np.uint8)):
                            differs.append(e.key)
                if escaped:
                    result.update(cls="escape", phase=phase, message="; ".join(escaped)[:300])
                    return result
                phase = "load"
                self.reset()
                try:
                    plan = regraft.plan(self.model, src)
                    phase = "apply"
                    report = regraft.apply(plan, self.model, src)
                except regraft.RegraftError:
                    if self.model_state() != "fill":
                        result.update(cls="partial", phase=phase)
                        return result
                    raise
                state = self.model_state()
            announced = False
            if state == "other":
                differs.append("(a model variable took a value that is neither original nor untouched)")
                # An edited dtype of the same width passes the CRC (it covers bytes, not metadata): the file is
                # then consistent, and the report says the tensor was cast. Announced, so not silent.
                counts = report.counts()
                announced = counts.get("cast", 0) + counts.get("transformed", 0) > 0
            if undetectable == "invalid":
                result.update(cls="silent-accept", phase=phase, message="opened, read and loaded without a word")
            elif differs:
                result.update(cls="undetectable" if undetectable or announced else "silent-diff", phase=phase,
                              message=", ".join(differs)[:300])
            else:
                result.update(cls="ok", phase=phase)
            return result
        except regraft.RegraftError as exc:
            result.update(cls="clean", phase=phase, exception=type(exc).__name__, message=str(exc)[:200])
        except MemoryError as exc:
            result.update(cls="memory", phase=phase, exception=type(exc).__name__, message=str(exc)[:300],
                          where=_where(exc.__traceback__), traceback=traceback.format_exc()[-1500:])
        except Exception as exc:  # noqa: BLE001 - the point is to catch everything
            result.update(cls="other-exc", phase=phase, exception=type(exc).__name__, message=str(exc)[:300],
                          where=_where(exc.__traceback__), traceback=traceback.format_exc()[-1500:])
        if kind in ("plan", "rules") and os.path.exists(os.path.join(case, "CODE_RAN")):
            result["cls"] = "code-ran"
        return result


def worker_main(conn: Connection, fx: str, work: str, mem_limit: int, time_limit: float) -> None:
    import faulthandler
    import warnings

    warnings.simplefilter("ignore")
    import logging

    logging.disable(logging.CRITICAL)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    state = Worker(fx)
    if mem_limit:
        with open("/proc/self/statm") as f:
            vm = int(f.read().split()[0]) * resource.getpagesize()
        resource.setrlimit(resource.RLIMIT_AS, (vm + mem_limit, resource.RLIM_INFINITY))
    conn.send("ready")
    while True:
        job = conn.recv()
        if job is None:
            return
        kind, mut, seed, number = job
        case = os.path.join(work, f"case-{number}")
        # If the case hangs, the parent finds where in this file (written by a C watchdog thread, so it works
        # even while C code holds the GIL).
        with open(os.path.join(work, f"stack-{number}"), "w") as stack:
            faulthandler.dump_traceback_later(max(time_limit - 1.5, time_limit * 0.8), file=stack)
            try:
                result = state.run(kind, mut, seed, number, case, lambda note: conn.send(("note", note)))
            finally:
                faulthandler.cancel_dump_traceback_later()
                _rmtree(case)
        os.remove(stack.name)
        conn.send(result)


def _rmtree(path: str) -> None:
    if os.path.exists(path):
        for dirpath, dirnames, _ in os.walk(path):
            for d in dirnames:
                try:
                    os.chmod(os.path.join(dirpath, d), 0o700)
                except OSError:
                    pass
        shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------------- the parent


class Pool:
    """Long-lived forked workers; one that hangs, dies or blows its memory is replaced."""

    def __init__(self, size: int, fx: str, work: str, mem_limit: int, time_limit: float) -> None:
        self.fx, self.work, self.mem_limit, self.time_limit = fx, work, mem_limit, time_limit
        self.workers: list[tuple[int, Connection]] = [self._spawn() for _ in range(size)]

    def _spawn(self) -> tuple[int, Connection]:
        parent, child = Pipe()
        pid = os.fork()
        if pid == 0:
            parent.close()
            code = 0
            try:
                worker_main(child, self.fx, self.work, self.mem_limit, self.time_limit)
            except BaseException:  # noqa: BLE001
                code = 3
            os._exit(code)
        child.close()
        if parent.poll(120) and parent.recv() == "ready":
            return pid, parent
        raise RuntimeError("a fuzz worker did not start")

    def _reap(self, pid: int, kill: bool) -> int:
        if kill:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _, status = os.waitpid(pid, 0)
        return status

    def run(self, jobs: list[tuple[str, str, int, int]], time_limit: float,
            on_result: Callable[[dict[str, Any]], None]) -> None:
        pending = list(reversed(jobs))
        busy: dict[int, tuple[tuple, float]] = {}  # worker slot -> (job, deadline)
        notes: dict[int, str] = {}  # worker slot -> what its current case mutated
        while pending or busy:
            for slot in range(len(self.workers)):
                if slot not in busy and pending:
                    job = pending.pop()
                    self.workers[slot][1].send(job)
                    busy[slot] = (job, time.monotonic() + time_limit)
            conns = {self.workers[s][1]: s for s in busy}
            timeout = max(0.0, min(d for _, d in busy.values()) - time.monotonic())
            for conn in wait(list(conns), timeout):
                slot = conns[conn]
                job, deadline = busy[slot]
                try:
                    message = conn.recv()
                except (EOFError, OSError):
                    busy.pop(slot)
                    on_result(self._died(slot, job, notes.pop(slot, "")))
                    continue
                if isinstance(message, tuple):
                    notes[slot] = message[1]
                    continue
                busy.pop(slot)
                notes.pop(slot, None)
                on_result(message)
            now = time.monotonic()
            for slot, (job, deadline) in list(busy.items()):
                if now >= deadline:
                    busy.pop(slot)
                    pid, conn = self.workers[slot]
                    self._reap(pid, kill=True)
                    conn.close()
                    _rmtree(os.path.join(self.work, f"case-{job[3]}"))
                    self.workers[slot] = self._spawn()
                    on_result(_result(job, "hang", note=notes.pop(slot, ""), message=f"no answer within {time_limit} s",
                                      **_stack(os.path.join(self.work, f"stack-{job[3]}"))))

    def _died(self, slot: int, job: tuple, note: str) -> dict[str, Any]:
        pid, conn = self.workers[slot]
        status = self._reap(pid, kill=False)
        conn.close()
        _rmtree(os.path.join(self.work, f"case-{job[3]}"))
        self.workers[slot] = self._spawn()
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            cls = "memory" if sig == signal.SIGKILL else "crash"  # SIGKILL from outside: the OOM killer
            return _result(job, cls, note=note, message=f"killed by {signal.Signals(sig).name}")
        return _result(job, "crash", note=note, message=f"exited with status {os.WEXITSTATUS(status)}")

    def close(self) -> None:
        for pid, conn in self.workers:
            try:
                conn.send(None)
            except OSError:
                pass
            self._reap(pid, kill=False)


def _stack(path: str) -> dict[str, str]:
    """Where a hung worker was, from its faulthandler dump: the innermost regraft frame and the dump."""
    try:
        with open(path) as f:
            dump = f.read()
        os.remove(path)
    except OSError:
        return {}
    lines = [line.strip() for line in dump.splitlines() if line.strip().startswith("File ")]
    ours = [line for line in lines if f"{os.sep}regraft{os.sep}" in line]  # innermost first
    where = (ours or lines or [""])[0].replace("File ", "").replace(ROOT + os.sep, "")
    return {"where": where, "traceback": dump[-1500:]}


def _result(job: tuple, cls: str, **extra: Any) -> dict[str, Any]:
    kind, mut, seed, number = job
    return {"case": number, "kind": kind, "mutator": mut, "seed": seed, "cls": cls, **extra}


def plan_jobs(seed: int, cases: int, kinds: list[str] | None) -> list[tuple[str, str, int, int]]:
    """Case n gets a (kind, mutator) from its own random stream; weights favour the richer formats."""
    weights = {"tf": 4, "tfk": 2, "k3": 3, "k2": 3, "state": 1, "plan": 2, "rules": 1}
    pairs = [(k, m) for k in MUTATORS if not kinds or k in kinds for m in MUTATORS[k]]
    w = [weights.get(k, 1) / len(MUTATORS[k]) for k, _ in pairs]
    jobs = []
    for n in range(cases):
        kind, mut = random.Random(f"pick:{seed}:{n}").choices(pairs, w)[0]
        jobs.append((kind, mut, seed, n))
    return jobs


def print_table(results: list[dict[str, Any]], out=sys.stdout) -> None:
    counts: dict[tuple[str, str], Counter] = defaultdict(Counter)
    for r in results:
        counts[(r["kind"], r["mutator"])][r["cls"]] += 1
    shown = [c for c in CLASSES if any(cnt[c] for cnt in counts.values())]
    width = max(len(f"{k} {m}") for k, m in counts) if counts else 10
    print(f"{'kind mutator':<{width}} " + " ".join(f"{c:>12}" for c in shown) + f" {'total':>6}", file=out)
    total: Counter = Counter()
    for key in sorted(counts):
        cnt = counts[key]
        total += cnt
        print(f"{' '.join(key):<{width}} " + " ".join(f"{cnt[c] or '':>12}" for c in shown) + f" {sum(cnt.values()):>6}",
              file=out)
    print(f"{'all':<{width}} " + " ".join(f"{total[c]:>12}" for c in shown) + f" {sum(total.values()):>6}", file=out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cases", type=int, default=500)
    ap.add_argument("--time-limit", type=float, default=10.0, help="seconds per case (default 10)")
    ap.add_argument("--memory-limit", type=int, default=2048, help="MiB of address space per case above the "
                    "worker's start (default 2048; 0 = none)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--kinds", default="", help="comma-separated subset of: " + ", ".join(MUTATORS))
    ap.add_argument("--only", type=int, action="append", help="run only case N (repeatable)")
    ap.add_argument("--keep", help="with --only: mutate into this folder and keep it (no run)")
    ap.add_argument("--json", help="write every non-good case (and the counts) to this file")
    args = ap.parse_args(argv)

    import regraft  # noqa: F401 - imported once here, inherited by every forked worker
    import tensorflow  # noqa: F401
    from tensorflow.core.protobuf import tensor_bundle_pb2, trackable_object_graph_pb2  # noqa: F401
    import h5py  # noqa: F401
    import keras  # noqa: F401
    import yaml  # noqa: F401

    kinds = [k for k in args.kinds.split(",") if k] or None
    jobs = plan_jobs(args.seed, args.cases, kinds)
    if args.only:
        jobs = [j for j in jobs if j[3] in args.only] or [j for j in plan_jobs(args.seed, max(args.only) + 1, kinds)
                                                           if j[3] in args.only]
    with tempfile.TemporaryDirectory(prefix="regraft-fuzz-") as tmp:
        fx = os.path.join(tmp, "fixtures")
        os.makedirs(fx)
        started = time.monotonic()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                make_fixtures(fx)
            except BaseException:  # noqa: BLE001
                traceback.print_exc()
                code = 1
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        if status != 0:
            print("FAILED: writing the fixtures", file=sys.stderr)
            return 1
        setup = time.monotonic() - started
        if args.keep:
            for kind, mut, seed, number in jobs:
                case = os.path.join(args.keep, f"case-{number}")
                path, note, _ = MUTATORS[kind][mut](random.Random(f"{seed}:{number}"), fx, case)
                print(f"case {number}: {kind} {mut}: {note}\n  open: {path}")
            shutil.copytree(fx, os.path.join(args.keep, "fixtures"), dirs_exist_ok=True)
            return 0
        work = os.path.join(tmp, "cases")
        os.makedirs(work)
        results: list[dict[str, Any]] = []
        t0 = time.monotonic()
        pool = Pool(min(args.workers, len(jobs)) or 1, fx, work, args.memory_limit << 20, args.time_limit)

        def on_result(r: dict[str, Any]) -> None:
            results.append(r)
            if len(results) % 500 == 0:
                print(f"  {len(results)}/{len(jobs)} cases, {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)

        try:
            pool.run(jobs, args.time_limit, on_result)
        finally:
            pool.close()
        elapsed = time.monotonic() - t0
    results.sort(key=lambda r: r["case"])
    print(f"regraft fuzz: seed {args.seed}, {len(results)} cases, {args.workers} workers, "
          f"time limit {args.time_limit:g} s, memory limit {args.memory_limit} MiB")
    print_table(results)
    bad = [r for r in results if r["cls"] not in GOOD]
    print(f"\n{len(bad)} of {len(results)} cases outside clean/ok/undetectable; "
          f"setup {setup:.1f} s, cases {elapsed:.1f} s ({len(results) / elapsed:.1f} cases/s)")
    for r in bad[:40]:
        print(f"  case {r['case']}: {r['kind']} {r['mutator']} -> {r['cls']} {r.get('exception', '')} "
              f"{r.get('where', '')} [{r.get('note', '')[:80]}]")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"seed": args.seed, "cases": len(results), "seconds": round(elapsed, 1),
                       "counts": dict(Counter(r["cls"] for r in results)),
                       "reproduce": f"python bench/fuzz.py --seed {args.seed} --cases {args.cases} --only N",
                       "non_clean": bad}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
