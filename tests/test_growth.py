"""Reshape policies and function-preserving growth, end to end on real Keras models."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from conftest import randomize, same_bytes, save_tf, value_of

import keras  # noqa: E402  (conftest set the TF log level first)

import regraft  # noqa: E402
from regraft.demo import build_inserted_new, build_inserted_old  # noqa: E402


def mlp(width: int, name: str):
    inputs = keras.Input((8,))
    x = keras.layers.Dense(width, activation="relu", name="h1")(inputs)
    x = keras.layers.Dense(width, activation="relu", name="h2")(x)
    return keras.Model(inputs, keras.layers.Dense(3, name="out")(x), name=name)


def convs(filters: int, batch_norm: bool, name: str):
    inputs = keras.Input((10, 10, 3))
    x = keras.layers.Conv2D(filters, 3, activation="relu", name="c1")(inputs)
    if batch_norm:
        x = keras.layers.BatchNormalization(name="bn")(x)
    return keras.Model(inputs, keras.layers.Conv2D(16, 3, name="c2")(x), name=name)


def positive_batch_norm(model) -> None:
    """Random BN statistics with a positive variance, so outputs are finite."""
    rng = np.random.default_rng(11)
    for v in model.get_layer("bn").weights:
        v.assign(rng.uniform(0.5, 1.5, tuple(v.shape)).astype("float32"))


# Function-preservation tests keep Keras' own (Glorot) initialisation: outputs of order 1, so the
# 1e-5 tolerance measures the transforms, not float32 rounding of outputs in the hundreds.


def test_tutorial_inserted_layer_is_function_preserving(tmp_path):
    keras.utils.set_random_seed(1)
    old, new = build_inserted_old(), build_inserted_new()
    for v in (old.dense1.bias, old.dense2.bias):  # non-zero biases, so that they are tested too
        v.assign(np.random.default_rng(1).standard_normal(tuple(v.shape)).astype("float32") * 0.1)
    report = regraft.load(new, save_tf(tmp_path / "a" / "ckpt", model=old), reshape="preserve")
    rows = {r["target"]: r for r in report.rows()}
    assert rows["dense2/kernel"]["transform"] == "identity_init" and rows["dense2/kernel"]["source"] is None
    assert rows["dense3/kernel"]["transform"] == "pad" and rows["dense3/kernel"]["source"] == "model/dense2/_kernel"
    assert rows["dense3/bias"]["status"] == "loaded"
    result = regraft.verify(old, new)
    assert result.passed and result.max_abs < 1e-5
    kernel = value_of(new.dense3.kernel)
    assert same_bytes(kernel[:64], value_of(old.dense2.kernel)) and not kernel[64:].any()


@pytest.mark.parametrize("batch_norm", [False, True])
def test_wider_convolution_is_function_preserving(tmp_path, batch_norm):
    keras.utils.set_random_seed(2)
    old, new = convs(32, batch_norm, "old"), convs(64, batch_norm, "new")
    if batch_norm:
        positive_batch_norm(old)
    report = regraft.load(new, save_tf(tmp_path / "c" / "ckpt", model=old), reshape="preserve")
    assert report.counts()["shape-mismatch"] == 0 and report.counts()["missing"] == 0
    result = regraft.verify(old, new)
    assert result.passed, str(result)
    # The first 32 filters are the old ones, copied bit for bit.
    assert same_bytes(value_of(new.get_layer("c1").kernel)[..., :32], value_of(old.get_layer("c1").kernel))


def test_overlay_keeps_old_filters_and_fresh_values_elsewhere(tmp_path):
    old, new = convs(32, False, "old"), convs(64, False, "new")
    randomize(old, 3)
    fresh = value_of(new.get_layer("c1").kernel)
    regraft.load(new, save_tf(tmp_path / "c" / "ckpt", model=old), reshape="overlay")
    kernel = value_of(new.get_layer("c1").kernel)
    assert same_bytes(kernel[..., :32], value_of(old.get_layer("c1").kernel))
    assert same_bytes(kernel[..., 32:], fresh[..., 32:])
    c2 = value_of(new.get_layer("c2").kernel)  # (3, 3, 64, 16): old rows first, fresh rows after
    assert same_bytes(c2[:, :, :32], value_of(old.get_layer("c2").kernel))


def test_pad_rule_fills_zeros(tmp_path):
    old, new = convs(32, False, "old"), convs(64, False, "new")
    randomize(old, 4)
    report = regraft.load(new, save_tf(tmp_path / "c" / "ckpt", model=old),
                          rules={"transform": {"c1/*": "pad", "c2/kernel": {"name": "pad", "value": 0.0}}})
    kernel = value_of(new.get_layer("c1").kernel)
    assert same_bytes(kernel[..., :32], value_of(old.get_layer("c1").kernel)) and not kernel[..., 32:].any()
    assert not value_of(new.get_layer("c1").bias)[32:].any()
    assert {r["rule"]: r["used"] for r in report.to_dict()["rules"]} == {
        "rule 1 (transform 'c1/*' with pad)": 2, "rule 2 (transform 'c2/kernel' with pad)": 1}


def test_mlp_widened_in_both_hidden_layers(tmp_path):
    keras.utils.set_random_seed(5)
    old, new = mlp(64, "old"), mlp(96, "new")
    path = save_tf(tmp_path / "m" / "ckpt", model=old)
    report = regraft.load(new, path, reshape="preserve")
    assert {r["target"]: r["transform"] for r in report.rows()}["h2/kernel"] == "widen_out + widen_in"
    assert regraft.verify(old, new).max_abs < 1e-5

    noisy = mlp(96, "noisy")
    regraft.load(noisy, path, reshape="preserve", noise=0.01)
    assert not same_bytes(value_of(noisy.get_layer("h2").kernel), value_of(new.get_layer("h2").kernel))
    # The noise keeps each unit's copies summing to the old row: close, but not the same numbers.
    assert 0 < regraft.verify(old, noisy).max_abs < 1e-4


def test_freeze_keeps_transformed_layers_trainable(tmp_path):
    old, new = build_inserted_old(), build_inserted_new()
    report = regraft.load(new, save_tf(tmp_path / "a" / "ckpt", model=old), reshape="preserve", freeze=True)
    assert report.frozen == ("dense1",)
    assert report.kept_trainable() == ["dense2", "dense3"]
    assert not new.dense1.trainable and new.dense2.trainable and new.dense3.trainable
    assert "kept trainable (transformed): dense2, dense3" in str(report)


def test_preserve_says_why_it_could_not(tmp_path):
    old, new = mlp(64, "old"), mlp(32, "new")  # narrower: not function-preserving
    path = save_tf(tmp_path / "m" / "ckpt", model=old)
    plan = regraft.plan(new, path, reshape="preserve")
    reasons = {a.target.key: a.reason for a in plan.assignments}
    assert "could not preserve: fewer output units cannot compute the same function" in reasons["h1/kernel"]
    assert {a.status for a in plan.assignments if a.target.key.startswith("h1/")} == {"shape-mismatch"}


def test_plan_file_keeps_transform_steps(tmp_path):
    keras.utils.set_random_seed(6)
    old, new = mlp(64, "old"), mlp(96, "new")
    path = save_tf(tmp_path / "m" / "ckpt", model=old)
    plan_file = tmp_path / "plan.yaml"
    regraft.save_plan(regraft.plan(new, path, reshape="preserve"), plan_file)
    data = yaml.safe_load(plan_file.read_text())
    assert [s["name"] for s in data["variables"]["h2/kernel"]["steps"]] == ["widen_out", "widen_in"]
    regraft.apply(regraft.read_plan(plan_file, new), new)
    assert regraft.verify(old, new).max_abs < 1e-5

    data["variables"]["out/kernel"]["steps"] = [{"name": "pad"}]  # (64, 3) -> (96, 3) with zeros: valid
    data["variables"]["h1/kernel"]["steps"] = [{"name": "slice"}]  # (8, 64) -> (8, 96): refused on reading
    plan_file.write_text(yaml.safe_dump(data))
    with pytest.raises(regraft.RegraftError) as info:
        regraft.read_plan(plan_file, new)
    assert "Transform 'slice' cannot turn tensor 'h1/kernel' of shape (8, 64) into (8, 96)" in str(info.value)


@pytest.mark.parametrize("saved", ["float16", "bfloat16", "float64"])
def test_cast_from_other_float_dtypes_into_float32_is_exact(tmp_path, saved):
    """The other direction of the cast tests in test_load: float16/bfloat16 widen exactly; float64 rounds."""
    def model(dtype, name):
        inputs = keras.Input((4,))
        return keras.Model(inputs, keras.layers.Dense(3, name="d", dtype=dtype)(inputs), name=name)

    old, new = model(saved, "old"), model("float32", "new")
    randomize(old, 12)
    report = regraft.load(new, save_tf(tmp_path / "c" / "ckpt", model=old))
    rows = {r["target"]: r for r in report.rows()}
    assert rows["d/kernel"]["status"] == "cast" and rows["d/kernel"]["source_dtype"] == saved
    kernel64 = value_of(old.get_layer("d").kernel).astype("float64")
    assert rows["d/kernel"]["max_cast_error"] == float(np.max(np.abs(kernel64.astype("float32") - kernel64)))
    assert (rows["d/kernel"]["max_cast_error"] == 0.0) == (saved != "float64")
    for name in ("kernel", "bias"):
        expected = value_of(getattr(old.get_layer("d"), name)).astype("float32")
        assert same_bytes(value_of(getattr(new.get_layer("d"), name)), expected)


# --------------------------------------------------------------------------- growth moves (issue 9)
# The models are bench/bench_growth.py's cases, so that the bench and the tests grow the same models.


def _bench():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "bench" / "bench_growth.py"
    spec = importlib.util.spec_from_file_location("bench_growth", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BENCH = _bench()


def grow(tmp_path, case: str, seed: int = 7, **load_options):
    """Old model (random biases and BN statistics), a real TF checkpoint, the grown model loaded with preserve."""
    builder = BENCH.CASES[case][1]
    keras.utils.set_random_seed(seed)
    old = builder(False)
    BENCH.randomize_extras(old, seed)
    path = save_tf(tmp_path / case / "ckpt", model=old)
    new = builder(True)
    before = {v.path: value_of(v) for v in new.weights}
    report = regraft.load(new, path, reshape="preserve", **{**BENCH.OPTIONS.get(case, {}), **load_options})
    return old, new, report, before


def steps_of(report, key):
    return {a.target.key: a.steps for a in report.plan.assignments}[key]


def widened_in(old, mapping, axis):
    """widen_in by hand: copy rows by the mapping, divide each by its copy count."""
    mapping = np.asarray(mapping)
    count = np.bincount(mapping, minlength=old.shape[axis])
    return (np.take(old.astype("float64"), mapping, axis=axis)
            / np.expand_dims(count[mapping], [a for a in range(old.ndim) if a != axis % old.ndim])).astype("float32")


PRESERVED = [name for name, (_, _, preservable) in BENCH.CASES.items() if preservable and name != "mobilenet_v2"]


@pytest.mark.parametrize("case", PRESERVED)
def test_growth_case_computes_what_the_old_model_did(tmp_path, case):
    old, new, report, _ = grow(tmp_path, case)
    result = regraft.verify(old, new)
    assert result.max_rel < 1e-5, str(result)
    assert not [a for a in report.plan.assignments if a.not_preserved]


def test_widening_is_carried_through_pooling_into_the_head(tmp_path):
    old, new, report, _ = grow(tmp_path, "conv_bn_pool_head")
    (name, options), = steps_of(report, "head/kernel")
    assert name == "widen_in" and options["axis"] == 0
    c2_mapping = dict(steps_of(report, "c2/kernel"))["widen_out"]["mapping"]
    assert options["mapping"] == c2_mapping and c2_mapping[:32] == list(range(32))
    expected = widened_in(value_of(old.get_layer("head").kernel), c2_mapping, 0)
    assert np.allclose(value_of(new.get_layer("head").kernel), expected, rtol=0, atol=1e-7)
    # c1's old filters keep their places, bit for bit; BN vectors are copied along c1's mapping;
    # c2 copies its filters by its own mapping and divides its input rows by c1's.
    assert same_bytes(value_of(new.get_layer("c1").kernel)[..., :16], value_of(old.get_layer("c1").kernel))
    c1_mapping = dict(steps_of(report, "c1/kernel"))["widen_out"]["mapping"]
    gamma = value_of(old.get_layer("bn1").gamma)
    assert same_bytes(value_of(new.get_layer("bn1").gamma), gamma[c1_mapping])
    expected = widened_in(value_of(old.get_layer("c2").kernel)[..., c2_mapping], c1_mapping, 2)
    assert np.allclose(value_of(new.get_layer("c2").kernel), expected, rtol=0, atol=1e-7)


def test_flatten_consumer_rows_repeat_per_spatial_position(tmp_path):
    old, new, report, _ = grow(tmp_path, "conv_flatten")
    c1_mapping = dict(steps_of(report, "c1/kernel"))["widen_out"]["mapping"]
    (name, options), = steps_of(report, "head/kernel")
    positions = old.get_layer("flat").input.shape[1] * old.get_layer("flat").input.shape[2]
    assert options["mapping"] == [p * 6 + u for p in range(positions) for u in c1_mapping]
    expected = widened_in(value_of(old.get_layer("head").kernel), options["mapping"], 0)
    assert np.allclose(value_of(new.get_layer("head").kernel), expected, rtol=0, atol=1e-7)


def test_residual_stream_shares_one_mapping_across_the_sum(tmp_path):
    old, new, report, _ = grow(tmp_path, "resnet_wider")
    mapping = {key: dict(steps_of(report, key))["widen_out"]["mapping"]
               for key in ("stem/kernel", "b1_conv2/kernel", "b2_conv2/kernel", "b2_proj/kernel")}
    assert mapping["stem/kernel"] == mapping["b1_conv2/kernel"]  # summed by b1_add (identity shortcut)
    assert mapping["b2_conv2/kernel"] == mapping["b2_proj/kernel"]  # summed by b2_add (projection shortcut)
    assert regraft.verify(old, new).max_rel < 1e-5


def test_concatenate_shifts_each_input_mapping_by_its_offset(tmp_path):
    old, new, report, _ = grow(tmp_path, "concatenate")
    a = dict(steps_of(report, "branch_a/kernel"))["widen_out"]["mapping"]
    c = dict(steps_of(report, "branch_c/kernel"))["widen_out"]["mapping"]
    (name, options), = steps_of(report, "mix/kernel")
    assert options["mapping"] == a + [6 + u for u in range(4)] + [10 + u for u in c]


def test_inserted_residual_block_starts_at_zero(tmp_path):
    old, new, report, before = grow(tmp_path, "resnet_deeper")
    assert not value_of(new.get_layer("b3_bn2").gamma).any() and not value_of(new.get_layer("b3_bn2").beta).any()
    rows = {r["target"]: r for r in report.rows()}
    assert rows["b3_bn2/gamma"]["transform"] == "fill" and rows["b3_bn2/gamma"]["source"] is None
    # The rest of the branch is left fresh on purpose: its values do not matter.
    for key in ("b3_conv1/kernel", "b3_conv2/kernel", "b3_bn1/gamma", "b3_bn2/moving_variance"):
        assert rows[key]["status"] == "missing" and rows[key]["allowed_by"].startswith("reshape='preserve'")
    layer = new.get_layer("b3_conv1")
    assert same_bytes(value_of(layer.kernel), before[layer.kernel.path])
    assert report.plan.inserted == tuple(sorted(f"b3_{n}" for n in ("bn1", "bn2", "conv1", "conv2")))
    assert regraft.verify(old, new).max_abs == 0.0


def test_inserted_pre_ln_block_zeroes_attention_output_and_last_projection(tmp_path):
    old, new, report, _ = grow(tmp_path, "pre_ln_deeper")
    zeroed = sorted(a.target.key for a in report.plan.assignments if a.steps and a.steps[0][0] == "fill")
    assert zeroed == ["block3_ff2/bias", "block3_ff2/kernel", "block3_mha/_layers/5/bias", "block3_mha/_layers/5/kernel"]
    weights = {v.path: v for v in new.get_layer("block3_mha").weights}
    assert not value_of(weights["block3_mha/attention_output/kernel"]).any()  # the output projection
    assert value_of(weights["block3_mha/query/kernel"]).any()  # left fresh: it does not matter
    assert regraft.verify(old, new).max_abs == 0.0


@pytest.mark.parametrize("case, problem", [
    ("inserted_valid_conv", "not preserved: layer 'c_valid' (c_valid/{bias,kernel}): an inserted convolution is an "
     "identity only with stride 1, 'same' padding and one group (its output must keep the input's size)"),
    ("more_classes", "not preserved: layer 'logits' (logits/{bias,kernel}): a model output with more units than "
     "before: the copied units are not new outputs, and the old model has nothing to compare them with"),
    ("block_after_linear_stem", "not preserved: layer 'b0_bn1' (b0_bn1/{beta,gamma,moving_mean,moving_variance}): the "
     "relu after the residual sum changes its input even when the branch adds zero (the input can be negative)"),
])
def test_growth_that_cannot_be_an_identity_is_refused_with_the_reason(tmp_path, case, problem):
    with pytest.raises(regraft.LoadError) as info:
        grow(tmp_path, case)
    assert problem in info.value.problems


def test_post_ln_block_is_refused_with_the_reason(tmp_path):
    with pytest.raises(regraft.LoadError) as info:
        grow(tmp_path, "post_ln_deeper")
    assert ("not preserved: layer 'block3_ln1' (block3_ln1/{beta,gamma}): an inserted layer_normalization layer "
            "cannot start as an identity (it normalises its input; in a post-LN block it follows the residual sum)"
            in info.value.problems)


def test_not_preserved_is_marked_in_a_non_strict_report_and_kept_in_plan_files(tmp_path):
    old, new, report, _ = grow(tmp_path, "post_ln_deeper", strict=False)
    marked = {r["target"]: r["not_preserved"] for r in report.rows() if "not_preserved" in r}
    assert set(marked) == {"block3_ln1/gamma", "block3_ln1/beta", "block3_ln2/gamma", "block3_ln2/beta"}
    assert regraft.verify(old, new).max_rel > 1e-3  # indeed another function: the mark was due
    plan_file = tmp_path / "plan.yaml"
    regraft.save_plan(report.plan, plan_file)
    again = regraft.read_plan(plan_file, new)
    assert {a.target.key: a.not_preserved for a in again.assignments if a.not_preserved} == marked


def test_inserted_batch_norm_is_an_exact_identity(tmp_path):
    old, new, report, _ = grow(tmp_path, "inserted_conv_bn")
    bn = new.get_layer("bn_inserted")
    assert same_bytes(value_of(bn.moving_variance), np.full(6, 1 - 1e-3, "float32"))
    assert same_bytes(value_of(bn.gamma), np.ones(6, "float32")) and not value_of(bn.moving_mean).any()
    assert regraft.verify(old, new).max_abs == 0.0


def test_layer_inserted_right_after_a_widened_one_is_an_identity_at_the_new_width(tmp_path):
    old, new, report, _ = grow(tmp_path, "insert_after_widened")
    assert same_bytes(value_of(new.get_layer("h_inserted").kernel), np.eye(40, dtype="float32"))
    h1_mapping = dict(steps_of(report, "h1/kernel"))["widen_out"]["mapping"]
    assert dict(steps_of(report, "out/kernel"))["widen_in"]["mapping"] == h1_mapping
    # Identity-initialised variables are written, but do not come from the checkpoint.
    assert report.parameter_share() < 1.0
    assert regraft.verify(old, new).max_rel < 1e-5


def test_mobilenet_v2_grows_through_depthwise_convolutions(tmp_path):
    old, new, report, _ = grow(tmp_path, "mobilenet_v2")
    (name, options), = steps_of(report, "block_1_depthwise/kernel")  # (3, 3, 96, 1) -> (3, 3, 120, 1)
    assert name == "widen_out" and options["axis"] == -2
    assert options["mapping"] == dict(steps_of(report, "block_1_expand/kernel"))["widen_out"]["mapping"]
    kernel = value_of(old.get_layer("block_1_depthwise").kernel)
    assert same_bytes(value_of(new.get_layer("block_1_depthwise").kernel), kernel[:, :, options["mapping"]])
    assert regraft.verify(old, new).max_rel < 1e-5


def test_a_widened_first_layer_pairs_with_its_old_self_not_with_the_next(tmp_path):
    keras.utils.set_random_seed(8)
    old = BENCH.mlp_unnamed(False)
    path = save_tf(tmp_path / "m" / "ckpt", model=old)
    new = BENCH.mlp_unnamed(True)
    plan = regraft.plan(new, path)
    first, second = new.layers[1], new.layers[2]
    sources = {a.target.key: a.source.key if a.source else None for a in plan.assignments}
    assert sources[f"{first.name}/kernel"] == "model/_operations/1/_kernel"  # not left fresh
    assert sources[f"{second.name}/kernel"] == "model/_operations/2/_kernel"
    # The inserted 48 -> 48 layer is one of two alike ones: order decides, and says so.
    report = regraft.load(new, path, reshape="preserve", accept_order=True)
    assert regraft.verify(old, new).max_rel < 1e-5, report


def test_leaky_relu_layer_is_not_taken_for_non_negative(tmp_path):
    from regraft.targets.keras import layer_graph

    def model(grown: bool, slope: float):
        inputs = keras.Input((6,))
        x = keras.layers.Dense(8, name="d1")(inputs)
        x = keras.layers.ReLU(negative_slope=slope, name="act")(x)
        if grown:
            x = keras.layers.Dense(8, activation="relu", name="inserted")(x)
        return keras.Model(inputs, keras.layers.Dense(2, name="out")(x))

    graph = {g.key: g for g in layer_graph(model(False, 0.1))}
    assert not graph["act"].non_negative and graph["act"].activation == "leaky_relu"
    assert {g.key: g for g in layer_graph(model(False, 0.0))}["act"].non_negative
    old = model(False, 0.1)
    path = save_tf(tmp_path / "l" / "ckpt", model=old)
    plan = regraft.plan(model(True, 0.1), path, reshape="preserve")
    assert ("not preserved: layer 'inserted' (inserted/{bias,kernel}): an inserted layer with activation relu is an "
            "identity only on non-negative inputs (after a ReLU)") in plan.problems()
    new = model(True, 0.0)  # a plain ReLU before it: exact
    regraft.load(new, save_tf(tmp_path / "r" / "ckpt", model=model(False, 0.0)), reshape="preserve")


def test_init_rule_wins_over_preserve(tmp_path):
    keras.utils.set_random_seed(9)
    old, new = build_inserted_old(), build_inserted_new()
    fresh_kernel = value_of(new.dense2.kernel)
    path = save_tf(tmp_path / "a" / "ckpt", model=old)
    with pytest.raises(regraft.LoadError) as info:  # the layer after the fresh one cannot follow it
        regraft.load(new, path, reshape="preserve", rules={"init": ["dense2/*"]})
    assert info.value.problems == [
        "not preserved: layer 'dense3' (dense3/kernel): its input units changed (64 -> 128) without a widened or "
        "inserted layer before it that regraft can follow"]
    report = regraft.load(new, path, reshape="preserve", rules={"init": ["dense2/*"]}, strict=False)
    assert same_bytes(value_of(new.dense2.kernel), fresh_kernel)  # the rule's fresh values, not an identity
    rows = {r["target"]: r for r in report.rows()}
    assert rows["dense2/kernel"]["not_preserved"] == "an init rule leaves this layer fresh"
    assert rows["dense2/kernel"]["allowed_by"].startswith("rule 1")
    assert not regraft.verify(old, new).passed


def test_grouped_view_says_what_growth_did_per_layer(tmp_path):
    _, _, report, _ = grow(tmp_path, "conv_bn_pool_head")
    c1 = dict(steps_of(report, "c1/kernel"))["widen_out"]["mapping"]
    lines = report.grouped().splitlines()
    start = lines.index("growth (reshape='preserve'):")
    copies = ", ".join(f"{j}<-{c1[j]}" for j in range(16, 22))
    assert lines[start + 1:start + 4] == [
        f"  c1: widened 16->24 (units copied: {copies}, ...)",
        lines[start + 2],  # c2's own mapping, checked below
        "  head: consumer rows divided (input 32->48)",
    ]
    assert lines[start + 2].startswith("  c2: widened 32->48 (units copied: ") \
        and lines[start + 2].endswith("; consumer rows divided (input 16->24)")

    _, _, report, _ = grow(tmp_path, "resnet_deeper")
    assert "  b3_bn2: zeroed: the inserted residual branch it ends adds nothing" in report.grouped().splitlines()


def test_identity_layers_do_not_count_as_from_the_checkpoint(tmp_path):
    old, new = build_inserted_old(), build_inserted_new()
    report = regraft.load(new, save_tf(tmp_path / "a" / "ckpt", model=old), reshape="preserve")
    sizes = {a.target.key: a.target.size for a in report.plan.assignments}
    from_checkpoint = sum(size for key, size in sizes.items() if not key.startswith("dense2/"))
    assert report.parameter_share() == from_checkpoint / sum(sizes.values())
    assert "  dense2: inserted as an identity" in report.grouped().splitlines()
    assert f"{from_checkpoint / sum(sizes.values()):.1%} of parameters from the checkpoint" in report.summary()


def test_squeeze_excite_reshape_keeps_the_channel_axis(tmp_path):
    """GAP -> Reshape((1, 1, C)) -> conv: the channels survive the reshape, so the widening follows."""
    def model(grown: bool):
        inputs = keras.Input((6, 6, 3))
        x = keras.layers.Conv2D(12 if grown else 8, 3, padding="same", activation="swish", name="c")(inputs)
        s = keras.layers.GlobalAveragePooling2D(name="gap")(x)
        s = keras.layers.Reshape((1, 1, 12 if grown else 8), name="reshape")(s)
        s = keras.layers.Conv2D(4, 1, activation="swish", name="se_reduce")(s)
        s = keras.layers.Conv2D(12 if grown else 8, 1, activation="sigmoid", name="se_expand")(s)
        x = keras.layers.Multiply(name="excite")([x, s])
        x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
        return keras.Model(inputs, keras.layers.Dense(3, name="head")(x))

    keras.utils.set_random_seed(10)
    old, new = model(False), model(True)
    BENCH.randomize_extras(old, 10)
    report = regraft.load(new, save_tf(tmp_path / "se" / "ckpt", model=old), reshape="preserve")
    c = dict(steps_of(report, "c/kernel"))["widen_out"]["mapping"]
    assert dict(steps_of(report, "se_reduce/kernel"))["widen_in"]["mapping"] == c
    assert dict(steps_of(report, "se_expand/kernel"))["widen_out"]["mapping"] == c  # one mapping per product
    assert regraft.verify(old, new).max_rel < 1e-5
