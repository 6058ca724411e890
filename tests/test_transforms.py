"""Transforms against numpy references, their refusals, and function preservation on numpy networks.

No TensorFlow here: the networks are a few lines of numpy (dense layers,
inference-mode BatchNormalization, a loop-and-einsum conv2d).
"""

from __future__ import annotations

import ast
import doctest
import math
import pathlib
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

from regraft import transforms
from regraft.entries import TargetVariable
from regraft.errors import LoadError, RegraftError
from regraft.transforms import (
    TRANSFORMS,
    Transform,
    TransformError,
    cast_array,
    check,
    get,
    identity_kernel,
    register,
    run,
    widen_mapping,
)

BUILTINS = {
    "identity", "overlay", "pad", "slice", "resize", "adapt_channels",
    "widen_out", "widen_in", "identity_init", "fill", "cast",
}


def rand(shape, seed=0, dtype="float32"):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


@pytest.fixture
def registry():
    """Restore the transform table after a test that registers."""
    saved = dict(TRANSFORMS)
    yield TRANSFORMS
    TRANSFORMS.clear()
    TRANSFORMS.update(saved)


# --------------------------------------------------------------------------- numpy networks


def relu(x):
    return np.maximum(x, 0)


def batchnorm(h, gamma, beta, mean, var, eps=1e-3):
    """Inference-mode BatchNormalization."""
    return gamma * (h - mean) / np.sqrt(var + eps) + beta


def conv2d(x, k, padding="valid"):
    """Stride-1 2-D convolution (cross-correlation, as Keras): x (B, H, W, C), k (kh, kw, C, O)."""
    kh, kw = k.shape[:2]
    if padding == "same":
        x = np.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
    h, w = x.shape[1] - kh + 1, x.shape[2] - kw + 1
    out = np.zeros((x.shape[0], h, w, k.shape[3]), np.result_type(x, k))
    for i in range(kh):
        for j in range(kw):
            out += np.einsum("bhwc,co->bhwo", x[:, i:i + h, j:j + w], k[i, j])
    return out


def test_the_numpy_conv_is_a_convolution():
    x, k = rand((1, 5, 6, 2), 1, "float64"), rand((3, 3, 2, 4), 2, "float64")
    ref = np.zeros((1, 3, 4, 4))
    for r in range(3):
        for c in range(4):
            ref[0, r, c] = np.tensordot(x[0, r:r + 3, c:c + 3], k, axes=3)
    np.testing.assert_allclose(conv2d(x, k), ref, rtol=1e-12)
    assert conv2d(x, k, "same").shape == (1, 5, 6, 4)


# --------------------------------------------------------------------------- registry and check


def test_builtins_are_registered_with_a_doc():
    assert BUILTINS <= set(TRANSFORMS)
    for name in BUILTINS:
        t = get(name)
        assert isinstance(t, Transform) and t.name == name and t.doc
        assert t.needs_fresh == (name == "overlay")


def test_unknown_transform_name():
    with pytest.raises(TransformError) as exc:
        get("pda")
    assert exc.value.message == (
        "Unknown transform 'pda'; known transforms: adapt_channels, cast, conv_oihw_to_hwio, "
        "depthwise_oihw_to_hwcm, fill, identity, identity_init, linear_to_dense, overlay, "
        "pad, resize, slice, widen_in, widen_out."
    )
    with pytest.raises(TransformError, match="Unknown transform 'pda'"):
        check("pda", (2,), (2,), "w")


K = "dense2/kernel"


@pytest.mark.parametrize(
    "name, in_shape, target, options, reason",
    [
        ("identity", (3, 4), (3, 5), {}, "identity keeps the shape; use 'overlay', 'pad', 'slice' or 'resize'."),
        ("overlay", (3, 4), (3, 4, 1), {},
         "ranks differ (2 vs 3); overlay keeps the rank, "
         "so reshape in the model or write a transform with register()."),
        ("pad", (64, 10), (32, 10), {}, "pad only grows; use 'slice' or 'overlay'."),
        ("pad", (4,), (6,), {"where": "middle"}, "option where must be 'end' or 'start', not 'middle'."),
        ("pad", (4,), (6,), {"value": "zero"}, "option value must be a number, not 'zero'."),
        ("slice", (32, 10), (64, 10), {}, "slice only shrinks; use 'pad' or 'overlay'."),
        ("slice", (64, 10), (32, 10), {"start": [40, 0]}, "start 40 with size 32 runs outside axis 0 of size 64."),
        ("slice", (64, 10), (32, 10), {"start": [0]}, "option start has 1 entries for rank 2."),
        ("slice", (5, 4), (3, 4), {"indices": {0: [0, 2]}}, "indices pick 2 entries of axis 0, but the target has 3."),
        ("slice", (5, 4), (3, 4), {"indices": {0: [0, 2, 5]}}, "index 5 is out of range for axis 0 of size 5."),
        ("slice", (5, 4), (3, 4), {"indices": {0: [0, 2, 2]}},
         "indices along axis 0 repeat; use 'widen_out' to copy units."),
        ("slice", (5, 4), (3, 4), {"indices": {0: [0, 1, 2]}, "start": [1, 0]},
         "axis 0 is picked by indices, so its start must be 0, not 1."),
        ("resize", (10, 4), (12, 5), {"axes": [0]},
         "axis 1 changes size (4 -> 5) but is not in axes=[0]; list it in axes to interpolate it."),
        ("resize", (0, 4), (3, 4), {}, "resize cannot interpolate axis 0 from or to size 0."),
        ("resize", (3, 4), (5, 4), {"axes": [0, 2]}, "axes entry=2 is out of range for rank 2."),
        ("adapt_channels", (3, 3, 4, 8), (3, 3, 1, 8), {},
         "adapt_channels starts from 3 input channels (RGB), but axis 2 has 4."),
        ("adapt_channels", (3, 3, 3, 8), (5, 5, 1, 8), {},
         "adapt_channels changes only axis 2, but axis 0 changes too (3 -> 5)."),
        ("widen_out", (20, 64), (20, 96), {"mapping": list(range(90))},
         "mapping has 90 entries but axis 1 of the target has 96."),
        ("widen_out", (4,), (5,), {"mapping": [0, 1, 2, 3, 4]},
         "mapping entry 4 is out of range for axis 0 of size 4."),
        ("widen_out", (4,), (5,), {"mapping": [0, 1, 2, 3, 1.5]},
         "every entry of option mapping must be an int, not 1.5."),
        ("widen_in", (4, 3), (5, 3), {"mapping": [0, 1, 2, 0, 1]},
         "mapping never uses unit 3 of axis 0, so widen_in would drop its contribution; "
         "use the producer's mapping (every old unit appears in widen_mapping's)."),
        ("widen_in", (4, 3), (5, 3), {"mapping": [0, 1, 2, 3, 1], "noise": -1.0},
         "option noise must be a finite number >= 0, not -1.0."),
        ("cast", (3,), (4,), {"dtype": "float16"}, "cast changes only the dtype; use a shape transform for the shape."),
        ("cast", (3,), (3,), {"dtype": "floot16"}, "unknown dtype 'floot16'."),
        ("pad", (4,), (6,), {"valeu": 1.0}, "unknown option 'valeu' (pad takes: value, where)."),
        ("identity", (4,), (4,), {"axis": 0}, "unknown option 'axis' (identity takes: no options)."),
        ("widen_out", (4,), (5,), {}, "option 'mapping' is required."),
        ("cast", (4,), (4,), {}, "option 'dtype' is required."),
        ("pad", (4,), (6,), {"key": "x"}, "'key' is not an option: the applier passes it."),
        ("widen_out", (4,), (5,), {"mapping": np.array([0, 1, 2, 3, 0])},
         "option 'mapping' holds a numpy.ndarray, which a plan file cannot store; "
         "use ints, floats, strings and lists or dicts of them (numpy: .tolist())."),
        ("pad", (4,), (6,), {"value": np.float32(1)},
         "option 'value' holds a numpy.float32, which a plan file cannot store; "
         "use ints, floats, strings and lists or dicts of them (numpy: .tolist())."),
    ],
)
def test_check_refuses_with_the_reason(name, in_shape, target, options, reason):
    with pytest.raises(TransformError) as exc:
        check(name, in_shape, target, K, **options)
    prefix = f"Transform '{name}' cannot turn tensor '{K}' of shape {in_shape} into {target}: "
    assert exc.value.message == prefix + reason
    assert exc.value.hint


@pytest.mark.parametrize(
    "name, target, options, reason",
    [
        ("identity_init", (8, 4), {},
         "an identity kernel needs at least as many outputs as inputs, but shape (8, 4) has 8 inputs and 4 outputs."),
        ("identity_init", (2, 2, 8, 8), {},
         "an identity kernel needs odd kernel sizes to centre a delta, but shape (2, 2, 8, 8) has an even one."),
        ("identity_init", (8,), {"role": "kernel"},
         "an identity kernel needs rank >= 2 (shape (8,)); a rank-1 variable is a bias: role='bias' gives zeros."),
        ("identity_init", (8,), {"role": "gamma"}, "option role must be 'kernel' or 'bias', not 'gamma'."),
        ("pad", (8,), {}, "pad needs a source tensor; only 'identity_init' works without one."),
        ("fill", (8,), {}, "option 'value' is required."),
        ("fill", (8,), {"value": float("nan")}, "option value must be a finite number, not nan."),
        ("fill", (8,), {"value": "0"}, "option value must be a number, not '0'."),
    ],
)
def test_check_without_a_source(name, target, options, reason):
    with pytest.raises(TransformError) as exc:
        check(name, None, target, "new/kernel", **options)
    assert exc.value.message == f"Transform '{name}' cannot fill variable 'new/kernel' of shape {target}: {reason}"


@pytest.mark.parametrize(
    "name, in_shape, target, options",
    [
        ("identity", (3, 4), (3, 4), {}),
        ("overlay", (3, 4), (5, 2), {}),
        ("pad", (3, 4), (3, 4), {"value": 1, "where": "start"}),
        ("slice", (5, 4), (3, 4), {"indices": {"0": [4, 0, 2]}}),  # JSON turns axis keys into strings
        ("slice", (5, 4), (3, 2), {"indices": {-1: [3, 1]}, "start": [2, 0]}),
        ("resize", (3, 4), (5, 4), {"axes": [0, 1]}),
        ("adapt_channels", (3, 3, 3, 8), (3, 3, 7, 8), {}),
        ("adapt_channels", (5, 3, 8), (5, 1, 8), {"axis": 1}),
        ("widen_in", (3, 3, 4, 6), (3, 3, 5, 6), {"mapping": [0, 1, 2, 3, 1], "axis": 2, "noise": 0.1, "seed": 4}),
        ("identity_init", (3, 3, 4, 6), (3, 3, 4, 6), {}),
        ("fill", (3, 4), (3, 4), {"value": 0.0}),
        ("cast", (2,), (2,), {"dtype": "bfloat16"}),
    ],
)
def test_check_accepts(name, in_shape, target, options):
    assert check(name, in_shape, target, "v", **options) is None


# --------------------------------------------------------------------------- no arithmetic: exact


def test_identity_returns_the_value():
    v = rand((3, 4))
    assert run("identity", v, None, (3, 4), "w") is v


@pytest.mark.parametrize(
    "value_shape, target",
    [((2, 3), (4, 5)), ((4, 5), (2, 3)), ((4, 2), (2, 5)), ((7,), (3,)), ((3,), (7,)), ((2, 3, 4), (2, 3, 4))],
)
def test_overlay(value_shape, target):
    value, fresh = rand(value_shape, 1), rand(target, 2)
    ref = fresh.copy()
    block = tuple(slice(0, min(a, b)) for a, b in zip(value_shape, target))
    ref[block] = value[block]
    out = run("overlay", value, fresh, target, "w")
    np.testing.assert_array_equal(out, ref)
    assert out.dtype == fresh.dtype and out is not fresh


def test_overlay_takes_the_variables_dtype_and_refuses_overflow():
    fresh = np.zeros((3,), "float16")
    out = run("overlay", np.array([1.5, 2.0], "float64"), fresh, (3,), "w")
    assert out.dtype == np.float16 and out.tolist() == [1.5, 2.0, 0.0]
    with pytest.raises(LoadError, match="the value 70000 does not fit float16"):
        run("overlay", np.array([70000.0], "float32"), fresh, (3,), "w")
    with pytest.raises(TransformError, match=r"needs the current value of variable 'w' \(fresh\), got None"):
        run("overlay", np.ones(2), None, (3,), "w")


@pytest.mark.parametrize(
    "value_shape, target, options, widths, constant",
    [
        ((2, 3), (4, 5), {}, [(0, 2), (0, 2)], 0.0),
        ((2, 3), (4, 3), {"where": "start"}, [(2, 0), (0, 0)], 0.0),
        ((2, 3, 1), (2, 4, 3), {"value": -1.5}, [(0, 0), (0, 1), (0, 2)], -1.5),
        ((5,), (5,), {}, [(0, 0)], 0.0),
    ],
)
def test_pad(value_shape, target, options, widths, constant):
    value = rand(value_shape)
    out = run("pad", value, None, target, "w", **options)
    np.testing.assert_array_equal(out, np.pad(value, widths, constant_values=constant))
    assert out.dtype == value.dtype


@pytest.mark.parametrize(
    "target, options, index",
    [
        ((3, 4), {}, np.s_[:3, :4]),
        ((3, 4), {"start": [2, 1]}, np.s_[2:5, 1:5]),
        ((3, 6), {"indices": {0: [4, 0, 2]}}, np.s_[[4, 0, 2], :]),
        ((3, 6), {"indices": {"0": [4, 0, 2]}}, np.s_[[4, 0, 2], :]),
        ((5, 2), {"indices": {-1: [5, 1]}}, np.s_[:, [5, 1]]),
        ((2, 2), {"indices": {1: [5, 1]}, "start": [3, 0]}, np.s_[3:5, [5, 1]]),
    ],
)
def test_slice(target, options, index):
    value = rand((5, 6))
    out = run("slice", value, None, target, "w", **options)
    np.testing.assert_array_equal(out, value[index])
    assert not np.shares_memory(out, value)


@pytest.mark.parametrize("axis, shape", [(-1, (20, 64)), (0, (64,)), (3, (3, 3, 8, 64))])
def test_widen_out(axis, shape):
    value = rand(shape)
    mapping = widen_mapping(shape[axis], shape[axis] + 32, seed=7).tolist()
    target = tuple(len(mapping) if i == axis % len(shape) else d for i, d in enumerate(shape))
    out = run("widen_out", value, None, target, "w", mapping=mapping, axis=axis)
    moved = np.moveaxis(value, axis, 0)
    ref = np.stack([moved[j] for j in mapping], axis=0)
    np.testing.assert_array_equal(out, np.moveaxis(ref, 0, axis))


# --------------------------------------------------------------------------- arithmetic: tight tolerances


def test_widen_in_divides_by_copy_counts():
    value = rand((3, 4, 2), dtype="float64")
    mapping = [0, 1, 2, 3, 1, 1, 3]
    out = run("widen_in", value, None, (3, 7, 2), "w", mapping=mapping, axis=1)
    counts = {u: mapping.count(u) for u in range(4)}
    for j, u in enumerate(mapping):
        np.testing.assert_allclose(out[:, j], value[:, u] / counts[u], rtol=1e-15)
    # the sum over the copies of each unit is the old row
    for u in range(4):
        np.testing.assert_allclose(out[:, [j for j, m in enumerate(mapping) if m == u]].sum(axis=1), value[:, u],
                                   rtol=1e-14)


def resize_reference(value, target):
    """Separable align-corners linear interpolation with np.interp."""
    out = value.astype(np.float64)
    for axis, m in enumerate(target):
        n = out.shape[axis]
        if n == m:
            continue
        pos = np.linspace(0, n - 1, m) if m > 1 else np.zeros(1)
        out = np.apply_along_axis(lambda v: np.interp(pos, np.arange(n), v), axis, out)
    return out


@pytest.mark.parametrize(
    "shape, target, options",
    [
        ((5,), (9,), {}),
        ((9,), (5,), {}),
        ((10, 4), (17, 4), {}),
        ((197, 8), (50, 8), {}),
        ((4, 6), (7, 3), {}),
        ((3, 3, 2, 4), (5, 5, 2, 4), {"axes": [0, 1]}),
        ((1, 3), (4, 3), {}),
        ((4, 3), (1, 3), {}),
        ((4, 3), (6, 3), {"axes": [0, 1]}),
    ],
)
def test_resize_is_align_corners_linear(shape, target, options):
    value = rand(shape, 3)
    out = run("resize", value, None, target, "pos", **options)
    assert out.dtype == value.dtype
    np.testing.assert_allclose(out, resize_reference(value, target), rtol=1e-6, atol=1e-6)
    corners = tuple(0 for _ in shape)
    assert out[corners] == value[corners]
    last_in = tuple(-1 if a > 1 and b > 1 else 0 for a, b in zip(shape, target))
    assert out[last_in] == value[last_in]  # first and last samples are kept exactly


def test_resize_reproduces_a_linear_ramp_and_keeps_ints_as_floats():
    ramp = np.linspace(-1.0, 3.0, 7)[:, None] * np.ones((1, 2))
    expected = np.linspace(-1.0, 3.0, 25)[:, None] * np.ones((1, 2))
    np.testing.assert_allclose(run("resize", ramp, None, (25, 2), "p"), expected, rtol=1e-14, atol=1e-14)
    out = run("resize", np.array([0, 10]), None, (3,), "p")
    assert out.dtype == np.float64 and out.tolist() == [0.0, 5.0, 10.0]


def timm_adapt_input_conv(kernel, n):
    """timm's adapt_input_conv, written for Keras layout (kh, kw, c_in, c_out)."""
    if n == 1:
        return kernel.sum(axis=2, keepdims=True)
    repeat = math.ceil(n / 3)
    return np.tile(kernel, (1, 1, repeat, 1))[:, :, :n, :] * (3 / n)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 6, 8])
def test_adapt_channels_matches_timm(n):
    kernel = rand((3, 3, 3, 8), 4, "float64")
    out = run("adapt_channels", kernel, None, (3, 3, n, 8), "stem/kernel")
    np.testing.assert_allclose(out, timm_adapt_input_conv(kernel, n), rtol=1e-15)


def test_adapt_channels_other_axis():
    kernel = rand((5, 3, 4), 5, "float64")  # Conv1D (k, c_in, c_out)
    out = run("adapt_channels", kernel, None, (5, 1, 4), "k", axis=1)
    np.testing.assert_allclose(out, kernel.sum(axis=1, keepdims=True), rtol=1e-15)


def test_adapt_channels_preserves_the_output_for_grey_and_replicated_images():
    kernel = rand((3, 3, 3, 8), 6, "float64")
    grey = rand((2, 7, 7, 1), 7, "float64")
    adapted = run("adapt_channels", kernel, None, (3, 3, 1, 8), "stem/kernel")
    np.testing.assert_allclose(conv2d(grey, adapted), conv2d(np.repeat(grey, 3, axis=3), kernel),
                               rtol=1e-12, atol=1e-12)
    rgb = rand((2, 7, 7, 3), 8, "float64")
    for n in (6, 9):  # an image whose n channels cycle r, g, b, r, g, b...
        adapted = run("adapt_channels", kernel, None, (3, 3, n, 8), "stem/kernel")
        np.testing.assert_allclose(conv2d(np.tile(rgb, (1, 1, 1, n // 3)), adapted), conv2d(rgb, kernel),
                                   rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- cast, consistent with apply.convert


def _target(dtype):
    return TargetVariable(key="dense/kernel", shape=(3,), dtype=dtype, layer="dense", layer_class="Dense",
                          role="kernel", index=0, trainable=True)


@pytest.mark.parametrize(
    "value, dtype",
    [
        (np.array([1.0, 0.1, -2.5], "float32"), "float16"),
        (np.array([1.0, 0.1, -2.5], "float32"), "bfloat16"),
        (np.array([1.0, 0.1, -2.5], "float64"), "float32"),
        (np.array([1.0, 0.1, -2.5], "float32"), "float32"),
        (np.array([1.0, 0.1, -2.5], "float32").astype(ml_dtypes.bfloat16), "float32"),
        (np.array([1, -7, 3], "int64"), "int32"),
        (np.array([1.0, 70000.0, -2.5], "float32"), "float16"),
        (np.array([1.0, 300.0, -2.5], "float32"), "int8"),
        (np.array([1, -1, 3], "int32"), "uint8"),
        (np.array([1.0, 1e39, 2.0], "float64"), "float32"),
        (np.array([1.0, 300.0, -2.5], "float32").astype(ml_dtypes.bfloat16), "int8"),
    ],
)
def test_cast_array_agrees_with_apply_convert(value, dtype):
    from regraft.applying import convert

    try:
        want, want_error = convert(value, _target(dtype), "ckpt/w")
    except LoadError as exc:
        with pytest.raises(LoadError) as mine:
            cast_array(value, dtype, "ckpt/w", target_key="dense/kernel")
        assert (mine.value.message, mine.value.hint) == (exc.message, exc.hint)
        with pytest.raises(LoadError):
            run("cast", value, None, value.shape, "dense/kernel", dtype=dtype)
        return
    got, error = cast_array(value, dtype, "ckpt/w", target_key="dense/kernel")
    assert got.dtype == want.dtype and got.tobytes() == want.tobytes() and error == want_error
    out = run("cast", value, None, value.shape, "dense/kernel", dtype=dtype)
    assert out.dtype == want.dtype and out.tobytes() == want.tobytes()


def test_cast_refusal_message():
    with pytest.raises(LoadError) as exc:
        run("cast", np.array([1.0, 70000.0], "float32"), None, (2,), "dense/kernel", dtype="float16")
    assert exc.value.message == (
        "Tensor 'dense/kernel' (float32) cannot be cast to float16: the value 70000 does not fit float16."
    )


# --------------------------------------------------------------------------- Net2Net widening


def test_widen_mapping():
    m = widen_mapping(64, 96, seed=3)
    assert m.dtype == np.int64 and m.shape == (96,)
    np.testing.assert_array_equal(m, widen_mapping(64, 96, seed=3))
    np.testing.assert_array_equal(m[:64], np.arange(64))
    assert set(m.tolist()) == set(range(64)) and m.min() >= 0 and m.max() < 64
    assert not np.array_equal(m, widen_mapping(64, 96, seed=4))
    np.testing.assert_array_equal(widen_mapping(5, 5), np.arange(5))


@pytest.mark.parametrize(
    "args, message",
    [
        ((5, 3), "widen_mapping cannot widen 5 units to 3: it needs 1 <= old_units <= new_units."),
        ((0, 3), "widen_mapping cannot widen 0 units to 3: it needs 1 <= old_units <= new_units."),
        ((5, 8.0), "new_units must be an int, not 8.0."),
    ],
)
def test_widen_mapping_refuses(args, message):
    with pytest.raises(TransformError) as exc:
        widen_mapping(*args)
    assert exc.value.message == message


def dense_params(seed, d_in=20, hidden=64, d_out=10):
    rng = np.random.default_rng(seed)
    f = lambda *s: rng.standard_normal(s).astype("float32")  # noqa: E731
    return {
        "w1": f(d_in, hidden) / math.sqrt(d_in), "b1": f(hidden) * 0.1,
        "gamma": 1 + 0.1 * f(hidden), "beta": 0.1 * f(hidden), "mean": 0.1 * f(hidden),
        "var": (0.5 + rng.random(hidden)).astype("float32"),
        "w2": f(hidden, d_out) / math.sqrt(hidden), "b2": f(d_out) * 0.1,
    }


def dense_net(p, x, bn):
    h = x @ p["w1"].astype(np.float64) + p["b1"]
    if bn:
        h = batchnorm(h, p["gamma"], p["beta"], p["mean"], p["var"])
    return relu(h) @ p["w2"].astype(np.float64) + p["b2"]


def widen_dense(p, mapping, **in_options):
    new = len(mapping)
    w = dict(p)
    w["w1"] = run("widen_out", p["w1"], None, (p["w1"].shape[0], new), "d1/kernel", mapping=mapping)
    for k in ("b1", "gamma", "beta", "mean", "var"):
        w[k] = run("widen_out", p[k], None, (new,), f"d1/{k}", mapping=mapping)
    w["w2"] = run("widen_in", p["w2"], None, (new, p["w2"].shape[1]), "d2/kernel", mapping=mapping, **in_options)
    return w


@pytest.mark.parametrize("bn", [False, True])
@pytest.mark.parametrize("in_axis", [{}, {"axis": 0}, {"axis": -2}])
def test_dense_widening_preserves_the_function(bn, in_axis):
    p = dense_params(1)
    x = np.random.default_rng(2).standard_normal((128, 20))
    mapping = widen_mapping(64, 96, seed=3).tolist()
    wide = widen_dense(p, mapping, **in_axis)
    assert wide["w2"].shape == (96, 10) and wide["w2"].dtype == np.float32
    np.testing.assert_allclose(dense_net(wide, x, bn), dense_net(p, x, bn), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bn", [False, True])
def test_dense_widening_with_noise_breaks_symmetry_but_keeps_sums(bn):
    p = dense_params(1)
    x = np.random.default_rng(2).standard_normal((128, 20))
    mapping = widen_mapping(64, 96, seed=3).tolist()
    exact = widen_dense(p, mapping)
    noisy = widen_dense(p, mapping, noise=0.01, seed=5)
    np.testing.assert_array_equal(noisy["w2"], widen_dense(p, mapping, noise=0.01, seed=5)["w2"])  # deterministic
    diff = np.abs(noisy["w2"] - exact["w2"])
    assert diff.max() > 1e-4 and diff.max() < 0.1 * np.std(p["w2"])  # about noise * std(value)
    copied = [u for u in range(64) if mapping.count(u) > 1]
    u = copied[0]
    rows = [j for j, m in enumerate(mapping) if m == u]
    assert not np.array_equal(noisy["w2"][rows[0]], noisy["w2"][rows[1]])  # copies no longer equal
    single = [j for j, m in enumerate(mapping) if mapping.count(m) == 1]
    np.testing.assert_array_equal(noisy["w2"][single], exact["w2"][single])  # lone units get no noise
    for u in copied:
        rows = [j for j, m in enumerate(mapping) if m == u]
        np.testing.assert_allclose(noisy["w2"][rows].sum(axis=0), p["w2"][u], rtol=1e-5, atol=1e-6)
    # The noise cancels over the copies, so the function is kept up to rounding, not just "close".
    y, y_noisy = dense_net(p, x, bn), dense_net(noisy, x, bn)
    assert np.linalg.norm(y_noisy - y) / np.linalg.norm(y) < 1e-2
    np.testing.assert_allclose(y_noisy, y, rtol=1e-5, atol=1e-5)


def test_conv_widening_preserves_the_function():
    rng = np.random.default_rng(11)
    k1, b1 = rng.standard_normal((3, 3, 3, 32)).astype("float32") / 5, rng.standard_normal(32).astype("float32") / 10
    k2, b2 = rng.standard_normal((3, 3, 32, 5)).astype("float32") / 17, rng.standard_normal(5).astype("float32")
    x = rng.standard_normal((2, 9, 9, 3))
    mapping = widen_mapping(32, 64, seed=1).tolist()
    k1w = run("widen_out", k1, None, (3, 3, 3, 64), "c1/kernel", mapping=mapping)
    b1w = run("widen_out", b1, None, (64,), "c1/bias", mapping=mapping)
    k2w = run("widen_in", k2, None, (3, 3, 64, 5), "c2/kernel", mapping=mapping, axis=2)
    np.testing.assert_array_equal(k2w, run("widen_in", k2, None, (3, 3, 64, 5), "c2/kernel", mapping=mapping))

    def net(ka, ba, kb, bb):
        return conv2d(relu(conv2d(x, ka.astype(np.float64)) + ba), kb.astype(np.float64)) + bb

    np.testing.assert_allclose(net(k1w, b1w, k2w, b2), net(k1, b1, k2, b2), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- identity_init


@pytest.mark.parametrize(
    "shape, ref",
    [
        ((3, 3), np.eye(3)),
        ((2, 4), np.eye(2, 4)),
        ((1, 1), np.ones((1, 1))),
    ],
)
def test_identity_kernel_dense(shape, ref):
    out = identity_kernel(shape)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, ref)


def test_identity_kernel_conv_is_a_centred_delta():
    k = identity_kernel((3, 5, 2, 4), "float64")
    ref = np.zeros((3, 5, 2, 4))
    ref[1, 2, 0, 0] = ref[1, 2, 1, 1] = 1
    np.testing.assert_array_equal(k, ref)
    np.testing.assert_array_equal(identity_kernel((3, 2, 2))[1], np.eye(2))  # Conv1D


@pytest.mark.parametrize(
    "shape, message",
    [
        ((8, 4), "An identity kernel needs at least as many outputs as inputs, "
                 "but shape (8, 4) has 8 inputs and 4 outputs."),
        ((3, 3, 8, 4), "An identity kernel needs at least as many outputs as inputs, "
                       "but shape (3, 3, 8, 4) has 8 inputs and 4 outputs."),
        ((2, 2, 4, 4), "An identity kernel needs odd kernel sizes to centre a delta, "
                       "but shape (2, 2, 4, 4) has an even one."),
        ((3, 4, 4, 4), "An identity kernel needs odd kernel sizes to centre a delta, "
                       "but shape (3, 4, 4, 4) has an even one."),
        ((4,), "An identity kernel needs rank >= 2 (shape (4,)); "
               "a rank-1 variable is a bias: role='bias' gives zeros."),
    ],
)
def test_identity_kernel_refuses(shape, message):
    with pytest.raises(TransformError) as exc:
        identity_kernel(shape)
    assert exc.value.message == message


def test_identity_init_roles():
    np.testing.assert_array_equal(run("identity_init", None, None, (4,), "new/bias"), np.zeros(4, "float32"))
    np.testing.assert_array_equal(run("identity_init", None, None, (3, 3), "new/kernel"), np.eye(3, dtype="float32"))
    out = run("identity_init", rand((9, 9)), None, (3, 3), "new/kernel", role="bias", dtype="float16")
    assert out.dtype == np.float16 and not out.any()  # ignores the value
    assert run("identity_init", None, None, (3, 3), "k", dtype="bfloat16").dtype == ml_dtypes.bfloat16


@pytest.mark.parametrize("m", [16, 24])
def test_identity_dense_inserted_after_relu_is_exact(m):
    p = dense_params(5, hidden=16)
    x = np.random.default_rng(6).standard_normal((64, 20)).astype("float32")
    h = relu(x @ p["w1"] + p["b1"])
    y = h @ p["w2"] + p["b2"]
    k = run("identity_init", None, None, (16, m), "new/kernel")
    b = run("identity_init", None, None, (m,), "new/bias")
    w2 = run("pad", p["w2"], None, (m, 10), "d2/kernel")  # the m - n new inputs are always 0
    w2o = run("overlay", p["w2"], rand((m, 10), 9), (m, 10), "d2/kernel")  # ...so any values there do
    np.testing.assert_array_equal(relu(h @ k + b) @ w2 + p["b2"], y)
    np.testing.assert_array_equal(relu(h @ k + b) @ w2o + p["b2"], y)


def test_identity_init_is_not_exact_after_relu_on_signed_inputs():
    """The documented condition matters: ReLU on the inserted layer clips negative inputs."""
    h = np.array([[1.0, -2.0]], "float32")
    k = run("identity_init", None, None, (2, 2), "k")
    np.testing.assert_array_equal(h @ k, h)  # no activation: exact
    assert not np.array_equal(relu(h @ k), h)


@pytest.mark.parametrize("kernel", [(3, 3), (1, 1), (5, 3)])
def test_identity_conv_inserted_after_relu_is_exact(kernel):
    rng = np.random.default_rng(12)
    k1 = rng.standard_normal((3, 3, 3, 8)) / 5
    k2 = rng.standard_normal((3, 3, 8, 4)) / 8
    x = rng.standard_normal((2, 8, 8, 3))
    h = relu(conv2d(x, k1, "same"))
    y = conv2d(h, k2, "same")
    ki = run("identity_init", None, None, kernel + (8, 8), "new/kernel", dtype="float64")
    bi = run("identity_init", None, None, (8,), "new/bias", dtype="float64")
    np.testing.assert_array_equal(conv2d(relu(conv2d(h, ki, "same") + bi), k2, "same"), y)


# --------------------------------------------------------------------------- inputs are never changed


@pytest.mark.parametrize(
    "name, shape, target, options",
    [
        ("overlay", (4, 3), (3, 5), {}),
        ("pad", (4, 3), (5, 5), {}),
        ("slice", (4, 3), (2, 3), {"indices": {0: [3, 1]}}),
        ("resize", (4, 3), (7, 3), {}),
        ("adapt_channels", (3, 3, 3, 2), (3, 3, 4, 2), {}),
        ("widen_out", (4, 3), (4, 5), {"mapping": [0, 1, 2, 0, 0]}),
        ("widen_in", (4, 3), (6, 3), {"mapping": [0, 1, 2, 3, 0, 0], "axis": 0, "noise": 0.1}),
        ("cast", (4, 3), (4, 3), {"dtype": "float16"}),
    ],
)
def test_inputs_are_not_changed(name, shape, target, options):
    value, fresh = rand(shape, 1), rand(target, 2)
    value_copy, fresh_copy = value.copy(), fresh.copy()
    out = run(name, value, fresh, target, "w", **options)
    np.testing.assert_array_equal(value, value_copy)
    np.testing.assert_array_equal(fresh, fresh_copy)
    assert not np.shares_memory(out, value) and not np.shares_memory(out, fresh)


# --------------------------------------------------------------------------- user transforms


def test_register_a_user_transform(registry):
    def scale(value, fresh, factor=1.0, target_shape=None):
        assert target_shape == (3,)
        return value * factor

    t = register("scale", scale, doc="multiply")
    assert get("scale") is t and t.doc == "multiply" and not t.needs_fresh
    np.testing.assert_array_equal(run("scale", np.array([1.0, 2.0, 3.0]), None, (3,), "w", factor=2.0), [2.0, 4.0, 6.0])
    with pytest.raises(TransformError) as exc:
        check("scale", (3,), (3,), "w", fctor=2.0)
    assert exc.value.message == (
        "Transform 'scale' cannot turn tensor 'w' of shape (3,) into (3,): unknown option 'fctor' (scale takes: factor)."
    )
    with pytest.raises(TransformError) as exc:
        check("scale", (3,), (4,), "w")
    assert exc.value.message == (
        "Transform 'scale' cannot turn tensor 'w' of shape (3,) into (4,): "
        "it keeps the shape (no out_shape was registered)."
    )


def test_register_refuses_to_overwrite(registry):
    with pytest.raises(TransformError) as exc:
        register("pad", lambda value, fresh: value)
    assert exc.value.message == "Transform 'pad' is a built-in transform; register(..., replace=True) replaces it."
    register("mine", lambda value, fresh: value)
    with pytest.raises(TransformError, match="Transform 'mine' is already registered"):
        register("mine", lambda value, fresh: value)
    replaced = register("pad", lambda value, fresh: value, replace=True)
    assert get("pad") is replaced
    with pytest.raises(TransformError, match="is not usable in a plan"):
        register("two words", lambda value, fresh: value)
    with pytest.raises(TransformError, match=r"apply must accept \(value, fresh, \*\*options\)"):
        register("one_arg", lambda value: value)


def test_user_out_shape_failures_and_wrong_outputs_name_the_variable(registry):
    def tile_shape(in_shape, target_shape, times):
        if target_shape[0] != in_shape[0] * times:
            raise ValueError(f"{in_shape[0]} * {times} is not {target_shape[0]}")
        return target_shape

    register("tile", lambda value, fresh, times: np.tile(value, times), tile_shape)
    np.testing.assert_array_equal(run("tile", np.array([1, 2]), None, (4,), "w", times=2), [1, 2, 1, 2])
    with pytest.raises(TransformError) as exc:
        check("tile", (2,), (5,), "w", times=2)
    assert exc.value.message == (
        "Transform 'tile' cannot turn tensor 'w' of shape (2,) into (5,): ValueError: 2 * 2 is not 5."
    )
    register("liar", lambda value, fresh: value[:1])
    with pytest.raises(TransformError) as exc:
        run("liar", np.ones(3), None, (3,), "w")
    assert exc.value.message == "Transform 'liar' returned shape (1,) for variable 'w' of shape (3,)."
    register("broken", lambda value, fresh: 1 / 0)
    with pytest.raises(TransformError, match="Transform 'broken' failed on tensor 'w': ZeroDivisionError"):
        run("broken", np.ones(3), None, (3,), "w")


def test_errors_are_regraft_errors():
    assert issubclass(TransformError, RegraftError)


# --------------------------------------------------------------------------- module hygiene


def test_docstring_examples():
    result = doctest.testmod(transforms)
    assert result.failed == 0 and result.attempted > 0


def test_no_tensorflow_or_keras():
    tree = ast.parse(pathlib.Path(transforms.__file__).read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert imported <= {"__future__", "functools", "inspect", "math", "operator", "re", "dataclasses", "typing",
                        "numpy", "regraft"}
    # What importing this module pulls in, without the package __init__ (the public API, owned elsewhere).
    code = (
        "import sys, types; pkg = types.ModuleType('regraft'); pkg.__path__ = [sys.argv[1]]; "
        "sys.modules['regraft'] = pkg; import regraft.transforms; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'tensorflow', 'keras', 'tf_keras'}))"
    )
    out = subprocess.run([sys.executable, "-c", code, str(pathlib.Path(transforms.__file__).parent)],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_fill_ignores_the_value_and_gives_the_constant():
    assert same_fill(run("fill", None, None, (2, 3), "bn/moving_variance", value=0.999), np.full((2, 3), 0.999, "float32"))
    assert same_fill(run("fill", np.ones(3), None, (3,), "bn/gamma", value=0), np.zeros(3, "float32"))
    assert run("fill", None, None, (2,), "v", value=1, dtype="float16").dtype == np.float16


def same_fill(a, b) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
