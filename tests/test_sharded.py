"""Sharded loads: a Keras 3 JAX model laid out over 8 devices reads each device's block, not whole tensors.

The loads run on the JAX backend with 8 virtual CPU devices: ``XLA_FLAGS=
--xla_force_host_platform_device_count=8`` must be set before JAX starts, which the
Makefile's ``test-jax`` does for the whole JAX stage. The TF bundle, ``.weights.h5``,
``.npz`` and safetensors files are the ``sharded_mlp`` case of tests/backend_cases.py,
written by TensorFlow, Keras, numpy and safetensors in the TF environment
(``REGRAFT_TF_FILES``). Every check is by value: each device's shard against the
block of the checkpoint tensor (from ``values.npz``, which numpy wrote), bit for bit
where no cast or transform applies. The byte-run arithmetic is checked everywhere
against brute force.
"""

from __future__ import annotations

import mmap
import os
import shutil

import numpy as np
import pytest

import backend_cases
from conftest import assert_state, same_bytes, snapshot

import regraft
from regraft.errors import CorruptCheckpointError, LoadError
from regraft.sources import _slices

FILES = {"tf": "ckpt", "h5": "old.weights.h5", "npz": "values.npz", "safetensors": "old.safetensors"}
# d1's kernel and bias by columns, d2's and head's kernels by rows, over the 4-way 'model' axis of a 2x4 mesh
# (so each block sits on 2 devices); the other biases replicated.
ROWS_AND_COLUMNS = {"d1/kernel": (None, "model"), "d1/bias": ("model",), "d2/kernel": ("model", None),
                    "head/kernel": ("model", None), "extra/kernel": ("model", None)}
ROWS_OVER_8 = {"d1/kernel": ("model", None), "d2/kernel": ("model", None), "head/kernel": ("model", None),
               "d1/bias": ("model",), "d2/bias": ("model",)}


# --------------------------------------------------------------------------- byte runs (any backend)


def _brute_pages(base: int, shape: tuple[int, ...], itemsize: int, index: tuple[slice, ...]) -> tuple[set[int], int]:
    """Every byte of the block, by enumerating its elements: the pages they lie in and their count."""
    strides = [int(np.prod(shape[a + 1:], dtype=np.int64)) * itemsize for a in range(len(shape))]
    grids = np.meshgrid(*[np.arange(s.start, s.stop) for s in index], indexing="ij")
    offsets = sum(g.ravel() * st for g, st in zip(grids, strides)) if shape else np.zeros(1, np.int64)
    pages: set[int] = set()
    for off in np.asarray(offsets).ravel():
        pages.update(range((base + off) // mmap.PAGESIZE, (base + off + itemsize - 1) // mmap.PAGESIZE + 1))
    return pages, np.asarray(offsets).size * itemsize


@pytest.mark.parametrize("seed", range(60))
def test_runs_and_touched_bytes_agree_with_brute_force(seed):
    rng = np.random.default_rng(seed)
    rank = int(rng.integers(1, 4))
    shape = tuple(int(d) for d in rng.integers(1, 40, rank))
    itemsize = int(rng.choice([1, 2, 4, 8]))
    base = int(rng.integers(0, 3 * mmap.PAGESIZE))
    index = []
    for d in shape:
        start = int(rng.integers(0, d))
        index.append(slice(start, int(rng.integers(start + 1, d + 1))) if rng.random() < 0.7 else slice(0, d))
    index = tuple(index)
    offsets, length = _slices.runs(shape, itemsize, index)
    pages, size = _brute_pages(base, shape, itemsize, index)
    assert len(offsets) * length == size  # the runs hold exactly the block's bytes
    covered = {int(o) + i for o in offsets for i in range(length)}
    assert len(covered) == size  # disjoint
    touched = _slices.touched_bytes(base, shape, itemsize, index)
    assert touched == (length if len(offsets) == 1 else len(pages) * mmap.PAGESIZE)
    data = np.arange(int(np.prod(shape)), dtype=f"u{itemsize}" if itemsize > 1 else "u1").reshape(shape)
    buffer = b"\0" * base + data.tobytes()
    assert same_bytes(_slices.read_block(buffer, base, data.dtype, shape, index), data[index])


def test_the_docstring_examples_run():
    import doctest

    result = doctest.testmod(_slices)
    assert result.attempted == 5 and result.failed == 0


def test_a_block_of_leading_rows_is_one_byte_range_and_columns_are_strided():
    assert _slices.runs((8, 1024), 4, (slice(2, 4), slice(0, 1024)))[0].tolist() == [2 * 4096]
    assert _slices.touched_bytes(100, (8, 1024), 4, (slice(2, 4), slice(0, 1024))) == 8192
    # 512 bytes of each 4 KiB row, rows page-aligned: one page per row
    assert _slices.touched_bytes(0, (8, 1024), 4, (slice(0, 8), slice(0, 128))) == 8 * mmap.PAGESIZE


# --------------------------------------------------------------------------- loads on 8 devices (JAX)


@pytest.fixture(scope="module")
def files() -> str:
    """The sharded_mlp case's folder; skips unless JAX has 8 devices and the TF-written files are there."""
    import keras

    if keras.backend.backend() != "jax":
        pytest.skip("sharded loads are a JAX-backend feature (keras.distribution lays variables out over devices)")
    import jax

    if jax.device_count() < 8:
        pytest.skip(f"needs 8 devices, JAX has {jax.device_count()}: set "
                    "XLA_FLAGS=--xla_force_host_platform_device_count=8 before JAX starts (make test-jax does)")
    folder = os.environ.get("REGRAFT_TF_FILES")
    if not folder or not os.path.exists(os.path.join(folder, "sharded_mlp", "old.safetensors")):
        pytest.skip("needs the TF-written sharded_mlp case: set REGRAFT_TF_FILES (make test-jax does)")
    return os.path.join(folder, "sharded_mlp")


def _distribution(layout: dict[str, tuple], mesh_shape: tuple[int, int] = (2, 4)):
    from keras import distribution

    mesh = distribution.DeviceMesh(mesh_shape, ("batch", "model"), distribution.list_devices())
    layout_map = distribution.LayoutMap(mesh)
    for key, axes in layout.items():
        layout_map[key] = axes
    return distribution.ModelParallel(layout_map=layout_map, batch_dim_name="batch")


def _build(dist, **options):
    """``sharded_mlp`` built inside ``dist``'s scope, so its variables get their layouts."""
    import keras

    keras.backend.clear_session()
    if dist is None:
        return backend_cases.sharded_mlp(**options)
    with dist.scope():
        return backend_cases.sharded_mlp(**options)


def _old(files: str) -> dict[str, np.ndarray]:
    return dict(np.load(os.path.join(files, "values.npz")))


def _shards_equal(variable, expected: np.ndarray) -> None:
    """Every addressable shard of ``variable`` is the block of ``expected`` at its index, bit for bit."""
    value = variable.value
    assert len(value.sharding.device_set) == 8
    for shard in value.addressable_shards:
        assert same_bytes(np.asarray(shard.data), expected[shard.index]), f"{variable.path} on {shard.device}"


def _spec(variable) -> tuple:
    return tuple(variable.value.sharding.spec)


@pytest.mark.parametrize("fmt", sorted(FILES))
def test_each_device_holds_its_block_bit_for_bit(files, fmt):
    model = _build(_distribution(ROWS_AND_COLUMNS))
    specs = {v.path: _spec(v) for v in model.weights}
    report = regraft.load(model, os.path.join(files, FILES[fmt]))
    old = _old(files)
    for variable in model.weights:
        _shards_equal(variable, old[variable.path])
        assert _spec(variable) == specs[variable.path]  # the layout is kept
    # a block on the 4-way axis is read once for the 2 devices holding it; replicated biases once for all 8
    assert report.sharded["d2/kernel"].blocks == 4 and report.sharded["d2/kernel"].devices == 8
    assert report.sharded["head/bias"].blocks == 1
    checksum = "not verified: read as slices" if fmt in ("tf", "npz") else ""
    assert {r.checksum for r in report.sharded.values()} == {checksum}
    assert report.to_dict()["variables"][0]["sharded"]["checksum"] == (checksum or None)


@pytest.mark.parametrize("fmt", sorted(FILES))
def test_rows_over_8_devices_read_about_one_eighth_each(files, fmt):
    model = _build(_distribution(ROWS_OVER_8, (1, 8)))
    source = regraft.open(os.path.join(files, FILES[fmt]))
    with source:
        report = regraft.apply(regraft.plan(model, source), model, source)
    old = _old(files)
    for variable in model.weights:
        _shards_equal(variable, old[variable.path])
    for key in ("d1/kernel", "d2/kernel", "head/kernel"):
        read = report.sharded[key]
        assert read.blocks == 8 and read.shard_bytes * 8 == read.whole_bytes == old[key].nbytes
        # a block of leading rows is one byte range: exactly its own bytes, not the tensor's
        assert read.block_bytes == (read.shard_bytes,) * 8, key
    # the source's own counter: every block read in the check pass, then again in the commit
    assert source.sliced_bytes_read == 2 * sum(sum(r.block_bytes) for r in report.sharded.values())


def test_columns_touch_the_pages_their_rows_lie_in(files):
    """d1/kernel [64, 512] float32 by 4 column blocks: 512 bytes of each 2 KiB row, so every page is touched."""
    model = _build(_distribution(ROWS_AND_COLUMNS))
    report = regraft.load(model, os.path.join(files, "ckpt"))
    read = report.sharded["d1/kernel"]
    assert read.shard_bytes == 64 * 128 * 4 and read.blocks == 4
    for touched in read.block_bytes:  # honest: more than the shard, at most the pages the tensor spans + 1
        assert read.shard_bytes < touched <= read.whole_bytes + mmap.PAGESIZE
    _shards_equal(model.get_layer("d1").kernel, _old(files)["d1/kernel"])


def test_data_parallel_replicas_read_each_tensor_once(files):
    from keras import distribution

    model = _build(distribution.DataParallel(devices=distribution.list_devices()))
    report = regraft.load(model, os.path.join(files, "ckpt"))
    old = _old(files)
    for variable in model.weights:
        _shards_equal(variable, old[variable.path])
        read = report.sharded[variable.path]
        assert (read.devices, read.blocks, read.block_bytes) == (8, 1, (old[variable.path].nbytes,))


def test_a_cast_is_made_per_block_with_its_overflow_check(files):
    import ml_dtypes

    model = _build(_distribution(ROWS_AND_COLUMNS), dtype="bfloat16")
    report = regraft.load(model, os.path.join(files, "ckpt"))
    old = _old(files)
    assert {str(a.status) for a in report.plan.assignments} == {"cast"}
    for variable in model.weights:
        _shards_equal(variable, old[variable.path].astype(ml_dtypes.bfloat16))
    whole_error = float(np.max(np.abs(old["d1/kernel"].astype(ml_dtypes.bfloat16).astype(np.float64)
                                      - old["d1/kernel"])))
    assert report.cast_errors["d1/kernel"] == whole_error  # the largest over the blocks is the whole tensor's


def test_a_later_tensor_failing_its_check_leaves_every_shard_unchanged(files):
    """head/bias holds 1e6, which float16 cannot hold: refused in the check pass, nothing assigned."""
    model = _build(_distribution(ROWS_AND_COLUMNS), dtype="float16")
    before = snapshot(model)
    specs = {v.path: _spec(v) for v in model.weights}
    with pytest.raises(LoadError) as caught:
        regraft.load(model, os.path.join(files, "ckpt"))
    assert caught.value.message.startswith("Tensor '") and caught.value.message.endswith(
        "(float32) cannot be cast to float16 for variable 'head/bias': the value 1e+06 does not fit float16.")
    assert_state(model, before)
    assert {v.path: _spec(v) for v in model.weights} == specs


def _damaged_copy(files: str, tmp_path) -> tuple[str, tuple[int, ...], str]:
    """A copy of the TF checkpoint with one float of d2/kernel changed: its prefix, the float's position, the key."""
    from regraft.sources._bundle import Bundle

    for name in os.listdir(files):
        if name.startswith("ckpt"):
            shutil.copy(os.path.join(files, name), tmp_path / name)
    prefix = str(tmp_path / "ckpt")
    model = _build(None)
    with regraft.open(prefix) as source:
        plan = regraft.plan(model, source)
        d2 = next(a.source.key for a in plan.assignments if a.target.key == "d2/kernel")
        _, bundle_key = source.native_location(d2)
    entry = Bundle(prefix).entries[bundle_key]
    position = (300, 17)  # row 300 of [512, 256]: the block of device rows 256..384
    at = entry.offset + (position[0] * 256 + position[1]) * 4
    with open(f"{prefix}.data-00000-of-00001", "r+b") as f:
        f.seek(at)
        f.write(np.float32(12345.0).tobytes())
    return prefix, position, bundle_key


def test_slice_reads_skip_the_checksum_unless_full_checksums_is_asked(files, tmp_path):
    prefix, position, key = _damaged_copy(files, tmp_path)
    model = _build(_distribution(ROWS_AND_COLUMNS))
    before = snapshot(model)
    with pytest.raises(CorruptCheckpointError) as caught:
        regraft.load(model, prefix, full_checksums=True)
    assert caught.value.message.startswith(f"{prefix}.data-00000-of-00001: tensor {key!r} has checksum 0x")
    assert caught.value.message.endswith("; its data is corrupted")
    assert_state(model, before)
    # without it, the damaged float is loaded: the documented price of reading blocks
    report = regraft.load(model, prefix)
    assert report.sharded["d2/kernel"].checksum == "not verified: read as slices"
    assert "checksum not verified: read as slices" in report.summary()
    assert np.asarray(model.get_layer("d2").kernel.numpy())[position] == np.float32(12345.0)


def test_full_checksums_says_verified_whole(files):
    model = _build(_distribution(ROWS_AND_COLUMNS))
    report = regraft.load(model, os.path.join(files, "ckpt"), full_checksums=True)
    assert {r.checksum for r in report.sharded.values()} == {"verified whole"}
    _shards_equal(model.get_layer("d2").kernel, _old(files)["d2/kernel"])


def test_an_inserted_layer_keeps_its_initial_value_and_layout(files):
    model = _build(_distribution(ROWS_AND_COLUMNS), insert=True)
    extra = model.get_layer("extra").kernel
    initial, spec = np.asarray(extra.numpy()), _spec(extra)
    report = regraft.load(model, os.path.join(files, "ckpt"), strict=False)
    assert report.counts()["missing"] == 2
    assert "extra/kernel" not in report.sharded
    assert same_bytes(np.asarray(extra.numpy()), initial) and _spec(extra) == spec == ("model", None)
    old = _old(files)
    for variable in model.weights:
        if not variable.path.startswith("extra/"):
            _shards_equal(variable, old[variable.path])


def test_a_widened_layer_is_read_whole_and_the_report_says_so(files):
    """Net2Net widening maps units by a seeded copy: no block of the result is a block of the source."""
    units = (64, 512, 320, 64)
    model = _build(_distribution(ROWS_AND_COLUMNS), units=units)
    report = regraft.load(model, os.path.join(files, "ckpt"), reshape="preserve")
    reference = _build(None, units=units)
    regraft.load(reference, os.path.join(files, "ckpt"), reshape="preserve")
    for variable, expected in zip(model.weights, reference.weights):
        _shards_equal(variable, np.asarray(expected.numpy()))
    assert report.sharded["d2/kernel"].read_whole == "read whole: widen_out is not sliceable"
    assert report.sharded["head/kernel"].read_whole == "read whole: widen_in is not sliceable"
    assert report.sharded["d1/kernel"].read_whole is None
    assert "read whole: widen_out is not sliceable (d2/{bias,kernel})" in report.summary()


def test_a_zero_pad_reads_only_the_source_part_of_each_block(files):
    """d1 grown 512 -> 576 by 'pad': the last column block of d1/kernel is 80 source columns and 64 zeros."""
    units = (64, 576, 256, 64)
    model = _build(_distribution(ROWS_AND_COLUMNS), units=units)
    report = regraft.load(model, os.path.join(files, "ckpt"),
                          rules={"transform": {"d1/*": "pad", "d2/kernel": "pad"}})
    old = _old(files)
    _shards_equal(model.get_layer("d1").kernel, np.pad(old["d1/kernel"], ((0, 0), (0, 64))))
    _shards_equal(model.get_layer("d1").bias, np.pad(old["d1/bias"], (0, 64)))
    _shards_equal(model.get_layer("d2").kernel, np.pad(old["d2/kernel"], ((0, 64), (0, 0))))
    read = report.sharded["d2/kernel"]  # row blocks of 144: the last has 80 source rows
    assert read.read_whole is None and read.block_bytes == (144 * 1024, 144 * 1024, 144 * 1024, 80 * 1024)


def test_a_pytorch_layout_is_transposed_per_block(files, tmp_path):
    """An .npz with a PyTorch state_dict's names and [out, in] kernels: each block reads its transposed block."""
    old = _old(files)
    arrays = {}
    for i, layer in enumerate(("d1", "d2", "head")):
        arrays[f"{i}.weight"] = np.ascontiguousarray(old[f"{layer}/kernel"].T)
        arrays[f"{i}.bias"] = old[f"{layer}/bias"]
    np.savez(tmp_path / "torch.npz", **arrays)
    model = _build(_distribution(ROWS_AND_COLUMNS))
    report = regraft.load(model, str(tmp_path / "torch.npz"))
    for variable in model.weights:
        _shards_equal(variable, old[variable.path])
    read = report.sharded["d2/kernel"]  # rows of the kernel are columns of the stored [256, 512] weight
    assert read.read_whole is None and read.blocks == 4


def test_a_pytorch_conv_layout_is_permuted_per_block(files, tmp_path):
    """A Conv2D kernel saved OIHW by numpy: each device's HWIO block reads its permuted block of the file."""
    import keras

    rng = np.random.default_rng(7)
    kernel = rng.standard_normal((3, 3, 8, 16)).astype("float32")  # Keras HWIO
    bias = rng.standard_normal(16).astype("float32")
    np.savez(tmp_path / "conv.npz", **{"0.weight": np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)), "0.bias": bias})
    keras.backend.clear_session()
    with _distribution({"conv/kernel": (None, None, "model", None), "conv/bias": ("model",)}).scope():
        inputs = keras.Input((6, 6, 8))
        model = keras.Model(inputs, keras.layers.Conv2D(16, 3, name="conv")(inputs))
    report = regraft.load(model, str(tmp_path / "conv.npz"))
    _shards_equal(model.get_layer("conv").kernel, kernel)
    _shards_equal(model.get_layer("conv").bias, bias)
    read = report.sharded["conv/kernel"]
    assert read.read_whole is None and read.blocks == 4 and read.shard_bytes == 3 * 3 * 2 * 16 * 4


# --------------------------------------------------------------------------- two processes (JAX multi-controller)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _two_processes(files: str, fail_in: int | None) -> list[dict]:
    """Run :func:`_process` as processes 0 and 1 of one JAX job (4 CPU devices each); return what each printed."""
    import json
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", KERAS_BACKEND="jax",
               PYTHONPATH=os.pathsep.join([os.path.join(here, "..", "src"), here]))
    port = str(_free_port())
    children = [subprocess.Popen([sys.executable, __file__, str(i), port, files, str(fail_in)], env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (0, 1)]
    results = []
    for child in children:
        out, err = child.communicate(timeout=300)
        assert child.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def test_two_processes_each_read_only_the_blocks_of_their_devices(files):
    """A 1 x 8 mesh over 2 processes: each holds 4 of the 8 row blocks and reads those, half of each tensor."""
    results = _two_processes(files, None)
    old = _old(files)
    for process, result in enumerate(results):
        assert result["loaded"] and result["shards_equal"], result
        for key in ("d1/kernel", "d2/kernel", "head/kernel"):
            devices, blocks, read = result["sharded"][key]
            assert (devices, blocks, read) == (4, 4, old[key].nbytes // 2), (process, key)
        devices, blocks, read = result["sharded"]["head/bias"]  # replicated: read once per process
        assert (devices, blocks, read) == (4, 1, old["head/bias"].nbytes)


def test_a_process_failing_its_check_stops_the_other_before_it_assigns(files):
    results = _two_processes(files, 1)
    assert results[1]["error"] == "RuntimeError: stopped in the check pass"
    assert results[0]["error"].startswith("LoadError: Loading ") and "another process of this model failed its checks" \
        in results[0]["error"]
    assert results[0]["unchanged"] and results[1]["unchanged"]


def _process(process: int, port: str, files: str, fail_in: str) -> None:
    """One process of :func:`_two_processes`: build the distributed model, load, print what happened as JSON."""
    import json

    import jax

    import keras

    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=process)
    keras.utils.set_random_seed(0)  # initial values must agree across processes (JAX checks)
    model = _build(_distribution(ROWS_OVER_8, (1, 8)))

    def local_shards() -> dict:
        return {(v.path, str(s.device)): np.asarray(s.data).copy() for v in model.weights
                for s in v.value.addressable_shards}

    before = local_shards()

    def stop(done: int, total: int, key: str) -> None:
        raise RuntimeError("stopped in the check pass")

    result: dict = {"process": process}
    try:
        with regraft.open(os.path.join(files, "ckpt")) as source:
            report = regraft.apply(regraft.plan(model, source), model, source,
                                   progress=stop if str(process) == fail_in else None)
        old = _old(files)
        result["loaded"] = True
        result["shards_equal"] = all(same_bytes(np.asarray(s.data), old[v.path][s.index])
                                     for v in model.weights for s in v.value.addressable_shards)
        result["sharded"] = {k: [r.devices, r.blocks, sum(r.block_bytes)] for k, r in report.sharded.items()}
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        result["error"] = f"{type(exc).__name__}: {getattr(exc, 'message', exc)}"
        after = local_shards()
        result["unchanged"] = all(same_bytes(after[k], before[k]) for k in before)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    import sys

    _process(int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4])
