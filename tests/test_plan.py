"""Automatic matching of changed architectures, rules, and plan files (issue: matching and plans)."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from conftest import X5, assert_state, randomize, same_bytes, save_h5, save_tf, snapshot, unnamed_stack, value_of

import keras  # noqa: E402  (conftest set the TF log level first)

import regraft  # noqa: E402
from regraft.cli.main import main  # noqa: E402


def mlp(insert_units: int | None, name: str = "mlp"):
    """Input(8) -> d1(32) -> d2(16) [-> inserted(insert_units)] -> d3(16) -> head(4), functional."""
    inputs = keras.Input((8,))
    x = keras.layers.Dense(32, activation="relu", name="d1")(inputs)
    x = keras.layers.Dense(16, activation="relu", name="d2")(x)
    if insert_units:
        x = keras.layers.Dense(insert_units, activation="relu", name="inserted")(x)
    x = keras.layers.Dense(16, activation="relu", name="d3")(x)
    return keras.Model(inputs, keras.layers.Dense(4, name="head")(x), name=name)


def by_layer_path(model) -> dict[str, np.ndarray]:
    """Variable values keyed by ``layer name/variable name`` (the ground truth of "same layer")."""
    return {f"{v.path}": value_of(v) for v in model.weights}


def classify(new, old_values: dict[str, np.ndarray]) -> tuple[set[str], set[str]]:
    """(right, wrong): new variables holding their own layer's old tensor, or another layer's."""
    right, wrong = set(), set()
    for v in new.weights:
        value = value_of(v)
        owners = {path for path, old in old_values.items() if same_bytes(old, value)}
        if v.path in owners:
            right.add(v.path)
        elif owners:
            wrong.add(v.path)
    return right, wrong


def save(model, tmp_path, fmt: str) -> str:
    return save_tf(tmp_path / "ckpt" / "ckpt", model=model) if fmt == "tf" else save_h5(model, tmp_path / "old.weights.h5")


@pytest.mark.parametrize("fmt", ["tf", "h5"])
def test_functional_mlp_with_an_inserted_layer(tmp_path, fmt):
    old, new = mlp(None, "old"), mlp(24, "new")
    randomize(old, 1)
    path = save(old, tmp_path, fmt)
    report = regraft.load(new, path, strict=False)
    right, wrong = classify(new, by_layer_path(old))
    assert wrong == set()
    # Every unchanged layer got its own old tensors; d3's kernel changed shape (16 -> 24 inputs).
    assert right == {"d1/kernel", "d1/bias", "d2/kernel", "d2/bias", "d3/bias", "head/kernel", "head/bias"}
    rows = {r["target"]: r for r in report.rows()}
    assert rows["inserted/kernel"]["status"] == "missing" and rows["inserted/bias"]["status"] == "missing"
    assert rows["d3/kernel"]["status"] == "shape-mismatch"
    assert report.plan.inserted == ("inserted",)
    # Every layer is named: the names recorded in the file decide, in both formats (TF: each variable's full_name).
    assert rows["head/kernel"]["stage"] == "name" and rows["d1/kernel"]["stage"] == "name"


@pytest.mark.parametrize("fmt", ["tf", "h5"])
def test_same_width_insert_is_decided_by_names_in_every_format(tmp_path, fmt):
    """An inserted layer identical in shape to its neighbour: the recorded names (TF: full_name) decide, not order."""
    old, new = mlp(None, "old"), mlp(16, "new")
    randomize(old, 2)
    plan = regraft.plan(new, save(old, tmp_path, fmt))
    assert not any(a.order_only for a in plan.assignments)
    regraft.load(new, save(old, tmp_path, fmt), strict=False)
    right, wrong = classify(new, by_layer_path(old))
    assert wrong == set() and {"d3/kernel", "d3/bias"} <= right
    assert {a.target.key: a.status for a in plan.assignments if a.target.layer == "inserted"} == {
        "inserted/kernel": "missing", "inserted/bias": "missing"}


def encoder_model(attribute: str, name: str):
    class Encoder(keras.layers.Layer):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.d = keras.layers.Dense(4)

        def call(self, x):
            return self.d(x)

    class Net(keras.Model):
        def __init__(self):
            super().__init__(name=name)
            setattr(self, attribute, Encoder())
            self.dense1 = keras.layers.Dense(2)

        def call(self, x):
            return self.dense1(getattr(self, attribute)(x))

    model = Net()
    model(X5)
    return model


@pytest.mark.parametrize("fmt", ["tf", "h5"])
def test_renamed_sub_module_loads_fully_without_rules(tmp_path, fmt):
    old, new = encoder_model("encoder", "old"), encoder_model("backbone", "new")
    randomize(old, 3)
    report = regraft.load(new, save(old, tmp_path, fmt))  # strict: nothing missing or unused
    assert report.counts()["loaded"] == 4
    assert same_bytes(value_of(new.backbone.d.kernel), value_of(old.encoder.d.kernel))
    assert same_bytes(value_of(new.backbone.d.bias), value_of(old.encoder.d.bias))
    assert same_bytes(value_of(new.dense1.kernel), value_of(old.dense1.kernel))
    row = {r["target"]: r for r in report.rows()}["backbone/d/kernel"]
    assert row["stage"] == "name" and "same layer name 'd'" in row["reason"]  # the attribute 'd' is unique on both sides


@pytest.mark.parametrize("fmt", ["tf", "h5"])
def test_vgg16_into_vgg19_recovers_every_layer_and_loads_nothing_wrong(tmp_path, fmt):
    kw = dict(include_top=False, weights=None, input_shape=(32, 32, 3))
    old = keras.applications.VGG16(**kw)
    randomize(old, 4)
    new = keras.applications.VGG19(**kw)
    regraft.load(new, save(old, tmp_path, fmt), strict=False)
    right, wrong = classify(new, by_layer_path(old))
    assert wrong == set()
    assert right == set(by_layer_path(old))  # all 26 old variables found their layer


def two_branch(names: tuple[str, str], name: str):
    class Net(keras.Model):
        def __init__(self):
            super().__init__(name=name)
            for attr in names:
                setattr(self, attr, keras.layers.Dense(5))

        def call(self, x):
            return getattr(self, names[0])(x) + getattr(self, names[1])(x)

    model = Net()
    model(X5)
    return model


def test_ambiguous_candidates_are_never_loaded_and_a_rule_settles_them(tmp_path):
    old = two_branch(("left", "right"), "old")
    randomize(old, 5)
    path = save(old, tmp_path, "tf")
    new = two_branch(("first", "second"), "new")
    with pytest.raises(regraft.LoadError) as info:
        regraft.load(new, path)
    assert ("ambiguous: variable 'first/kernel' fits equally well 'model/left/_kernel' and 'model/right/_kernel'; "
            "add a rename rule to choose") in info.value.problems
    before = {v.path: value_of(v) for v in new.weights}
    report = regraft.load(new, path, strict=False)
    assert report.counts()["ambiguous"] == 4
    assert all(same_bytes(value_of(v), before[v.path]) for v in new.weights)

    report = regraft.load(new, path, rules={"rename": {"left/": "second/", "right/": "first/"}})
    assert same_bytes(value_of(new.second.kernel), value_of(old.left.kernel))
    assert same_bytes(value_of(new.first.kernel), value_of(old.right.kernel))
    assert {r["stage"] for r in report.rows()} == {"rule"}


def test_rules_rename_regex_init_ignore_and_unused_rules(tmp_path):
    old = mlp(None, "old")
    randomize(old, 6)
    path = save(old, tmp_path, "h5")
    new = mlp(None, "new")
    before = {v.path: value_of(v) for v in new.weights}
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "rename:\n"
        "  'layers/dense_(1)/vars/(\\d)': 'layers/dense_\\1/vars/\\2'\n"
        "init: ['head/*']\n"
        "ignore: ['layers/dense_3/*']\n"
        "  \n"
    )
    report = regraft.load(new, path, rules=str(rules), strict=False)
    rows = {r["target"]: r for r in report.rows()}
    assert rows["d2/kernel"]["stage"] == "rule" and rows["d2/kernel"]["status"] == "loaded"
    assert rows["head/kernel"]["status"] == "missing" and rows["head/kernel"]["stage"] == "rule"
    assert same_bytes(value_of(new.get_layer("head").kernel), before["head/kernel"])
    assert same_bytes(value_of(new.get_layer("d2").kernel), value_of(old.get_layer("d2").kernel))
    assert report.to_dict()["ignored"] == [
        {"source": "layers/dense_3/vars/0", "rule": "rule 3 (ignore 'layers/dense_3/*')"},
        {"source": "layers/dense_3/vars/1", "rule": "rule 3 (ignore 'layers/dense_3/*')"},
    ]
    assert report.counts()["unused"] == 0  # ignored tensors are not unused

    with pytest.raises(regraft.LoadError) as info:
        regraft.load(new, path, rules={"rename": {"nothing/": "matches/"}})
    assert "unused rule: rule 1 (rename 'nothing/' -> 'matches/') matched nothing" in info.value.problems
    grouped = regraft.diff(new, path, rules={"rename": {"nothing/": "matches/"}}).grouped()
    assert "rule 1 (rename 'nothing/' -> 'matches/'): UNUSED (matched nothing)" in grouped


def test_plan_file_round_trip_with_an_edited_entry(tmp_path):
    old = mlp(None, "old")
    randomize(old, 7)
    path = save(old, tmp_path, "tf")
    new = mlp(None, "new")
    plan = regraft.plan(new, path)
    plan_file = tmp_path / "plan.yaml"
    regraft.save_plan(plan, plan_file)
    data = yaml.safe_load(plan_file.read_text())
    assert data["variables"]["d2/bias"]["source"] == "model/_operations/2/bias"
    # Edit: d2's bias takes d3's bias (same shape), head's bias stays fresh.
    data["variables"]["d2/bias"]["source"] = "model/_operations/3/bias"
    data["variables"]["head/bias"]["source"] = None
    plan_file.write_text(yaml.safe_dump(data))
    fresh_head_bias = value_of(new.get_layer("head").bias)

    edited = regraft.read_plan(plan_file, new)
    report = regraft.apply(edited, new)
    assert same_bytes(value_of(new.get_layer("d2").bias), value_of(old.get_layer("d3").bias))
    assert same_bytes(value_of(new.get_layer("head").bias), fresh_head_bias)
    assert same_bytes(value_of(new.get_layer("d1").kernel), value_of(old.get_layer("d1").kernel))
    assert {r["target"]: r["status"] for r in report.rows()}["head/bias"] == "missing"


def test_plan_is_refused_for_another_checkpoint_or_model(tmp_path):
    old = mlp(None, "old")
    path = save(old, tmp_path, "tf")
    new = mlp(None, "new")
    plan_file = tmp_path / "plan.yaml"
    regraft.save_plan(regraft.plan(new, path), plan_file)

    with pytest.raises(regraft.RegraftError) as info:
        regraft.read_plan(plan_file, mlp(24, "other"))
    assert "was made for another model than 'other'" in str(info.value)

    save_tf(tmp_path / "ckpt" / "ckpt", model=mlp(24, "changed"))  # overwrite the checkpoint
    with pytest.raises(regraft.RegraftError) as info:
        regraft.read_plan(plan_file, new)
    assert "was made for another checkpoint than" in str(info.value)


def test_cli_plan_then_apply(tmp_path, capsys):
    old = mlp(None, "old")
    randomize(old, 8)
    path = save(old, tmp_path, "h5")
    models = tmp_path / "models.py"
    models.write_text(
        "import sys\nsys.path.insert(0, %r)\nfrom test_plan import mlp\n\ndef new():\n    return mlp(24, 'new')\n"
        % str(__import__("pathlib").Path(__file__).parent)
    )
    plan_file, out = tmp_path / "plan.yaml", tmp_path / "new.weights.h5"
    assert main(["plan", path, "--model", f"{models}:new", "-o", str(plan_file)]) == 0
    text = capsys.readouterr().out
    assert "inserted layers: inserted" in text and f"plan written to {plan_file}" in text
    assert main(["apply", str(plan_file), "--model", f"{models}:new", "--out", str(out)]) == 0
    reloaded = mlp(24, "reloaded")
    reloaded.load_weights(str(out))
    assert same_bytes(value_of(reloaded.get_layer("d2").kernel), value_of(old.get_layer("d2").kernel))


def test_removed_layers_are_named_where_the_checkpoint_keeps_names(tmp_path):
    old = mlp(24, "old")  # has the 'inserted' layer; the new model does not
    randomize(old, 10)
    new = mlp(None, "new")
    h5_plan = regraft.plan(new, save(old, tmp_path, "h5"))
    assert h5_plan.removed == ("layers/dense_2 (inserted)",)
    tf_plan = regraft.plan(new, save(old, tmp_path, "tf"))
    assert tf_plan.removed == ("model/_operations/3 (inserted)",)  # named by its variables' full_name
    regraft.load(new, save(old, tmp_path, "h5"), strict=False)
    right, wrong = classify(new, by_layer_path(old))
    assert wrong == set() and {"d1/kernel", "d2/kernel", "head/kernel", "d3/bias"} <= right


def test_unknown_rules_section_lists_every_kind(tmp_path):
    path = save(mlp(None, "old"), tmp_path, "h5")
    with pytest.raises(regraft.RegraftError) as info:
        regraft.plan(mlp(None, "new"), path, rules={"renmae": {"a/": "b/"}})
    assert "Unknown section 'renmae' in the rules given; expected rename, init, ignore or transform." in str(info.value)


@pytest.mark.parametrize("fmt", ["tf", "h5"])
def test_order_alone_is_never_silent(tmp_path, fmt):
    """Three alike unnamed layers become four: which one is new only order can say, so the user confirms."""
    old = unnamed_stack(3)
    randomize(old, 21)
    path = save(old, tmp_path, fmt)
    new = unnamed_stack(4)
    before = snapshot(new)
    with pytest.raises(regraft.LoadError, match=r"placed by order only: .* confirm with accept_order=True \(CLI --accept-order\)"):
        regraft.load(new, path)
    report = regraft.load(new, path, strict=False)
    statuses = {a.target.key: a.status for a in report.plan.assignments}
    unconfirmed = {k for k, s in statuses.items() if s == "unconfirmed"}
    proposed = {a.target.layer for a in report.plan.assignments if a.status == "unconfirmed" and a.source is not None}
    left = {a.target.layer for a in report.plan.assignments if a.status == "unconfirmed" and a.source is None}
    assert len(proposed) == 3 and len(left) == 1  # old layers first; the fourth could be any of them
    assert_state(new, before, {id(v): value_of(s) for s, v in zip(old.weights[-2:], new.weights[-2:])})  # head: certain
    assert "placed by order only" in report.grouped() and "unconfirmed" in report.summary()
    assert all(r.get("confirm") for r in report.rows() if r["status"] == "unconfirmed")

    accepted = regraft.load(unnamed_stack(4), path, strict=False, accept_order=True)
    assert not any(a.status == "unconfirmed" for a in accepted.plan.assignments)
    assert {a.target.key for a in accepted.plan.assignments if a.order_only} == unconfirmed


@pytest.mark.parametrize("fmt", ["tf", "h5"])
def test_unchanged_unnamed_architecture_loads_strictly_in_every_format(tmp_path, fmt):
    old = unnamed_stack(3)
    randomize(old, 22)
    path = save(old, tmp_path, fmt)
    new = unnamed_stack(3)
    before = snapshot(new)
    report = regraft.load(new, path)  # strict: no problem at all
    assert set(a.status for a in report.plan.assignments) == {"loaded"}
    assert_state(new, before, {id(v): value_of(s) for s, v in zip(old.weights, new.weights)})


def test_plan_file_keeps_an_unconfirmed_pairing_unconfirmed(tmp_path):
    old = unnamed_stack(3)
    randomize(old, 23)
    path = save(old, tmp_path, "tf")
    new = unnamed_stack(4)
    plan = regraft.plan(new, path)
    regraft.save_plan(plan, tmp_path / "plan.yaml")
    text = (tmp_path / "plan.yaml").read_text()
    assert "status: unconfirmed" in text and "proposed: " in text
    again = regraft.read_plan(tmp_path / "plan.yaml", new)
    assert [a.status for a in again.assignments] == [a.status for a in plan.assignments]
    assert not any(a.writes for a in again.assignments if a.status == "unconfirmed")


def containers_model(blocks: list[int], heads: list[str]):
    """A subclassed model with a list attribute of Dense(units) and a dict attribute of Dense(3) heads."""
    keras.backend.clear_session()

    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.blocks = [keras.layers.Dense(units) for units in blocks]
            self.heads = {name: keras.layers.Dense(3) for name in heads}

        def call(self, x):
            for block in self.blocks:
                x = block(x)
            return [head(x) for head in self.heads.values()]

    model = Net()
    model(np.zeros((1, 8), "float32"))
    return model


def test_h5_list_and_dict_items_are_positions_not_names(tmp_path):
    """.weights.h5 saves list and dict items as blocks/dense_1, heads/dense: never trusted alone."""
    old = containers_model([8, 8], ["b", "c"])
    randomize(old, 31)
    path = save(old, tmp_path, "h5")
    # A block inserted in front, and dict key 'b' renamed 'a': which is which only the user knows.
    new = containers_model([8, 8, 8], ["a", "c"])
    before = snapshot(new)
    report = regraft.load(new, path, strict=False)
    assert_state(new, before, {})  # nothing loaded on a guess
    statuses = {a.target.key: a.status for a in report.plan.assignments}
    assert set(statuses.values()) == {"unconfirmed"}
    # Unchanged: the list loads by position, but dict items stay unconfirmed (the file has no dict keys);
    # accepting order loads it all, each head its own.
    same = containers_model([8, 8], ["b", "c"])
    plan = regraft.plan(same, path)
    assert {a.target.key.split("/")[0]: a.status for a in plan.assignments} == {"blocks": "loaded", "heads": "unconfirmed"}
    before = snapshot(same)
    regraft.load(same, path, accept_order=True)
    assert_state(same, before, {id(t): value_of(s) for s, t in zip(old.weights, same.weights)})


def test_copies_of_the_model_are_never_chosen_silently_as_root(tmp_path):
    import tensorflow as tf

    net = mlp(None, "net")
    randomize(net, 41)
    ema = mlp(None, "ema")
    randomize(ema, 42)
    prefix = tf.train.Checkpoint(net=net, ema_net=ema).write(str(tmp_path / "ck" / "ck"))
    new = mlp(None, "new")
    before = snapshot(new)
    with pytest.raises(regraft.RegraftError, match=r"several objects that fit the model equally well: 'ema_net' and 'net'"):
        regraft.load(new, prefix, strict=False)
    assert_state(new, before, {})
    regraft.load(new, prefix, root="net")
    assert_state(new, before, {id(t): value_of(s) for s, t in zip(net.weights, new.weights)})


@pytest.mark.parametrize("fmt", ["tf", "h5"])
def test_a_variable_set_that_changed_is_not_matched_by_index(tmp_path, fmt):
    """BatchNormalization(scale=False): .weights.h5 numbers variables, so every index after gamma shifts."""
    def net(scale):
        keras.backend.clear_session()
        inputs = keras.Input((4,))
        x = keras.layers.BatchNormalization(scale=scale, name="bn")(keras.layers.Dense(4, name="d")(inputs))
        return keras.Model(inputs, x)

    old = net(True)
    randomize(old, 43)
    path = save(old, tmp_path, fmt)
    new = net(False)
    before = snapshot(new)
    regraft.load(new, path, strict=False)
    loaded = {id(t): value_of(s) for s, t in zip(old.weights[:2], new.weights[:2])}  # d/kernel, d/bias
    assert_state(new, before, loaded)  # bn's beta and moving statistics stay fresh, never shifted by one


@pytest.mark.parametrize("fmt", ["tf", "h5"])
def test_a_wrapped_model_with_an_alike_head_is_a_confirmation(tmp_path, fmt):
    """old: dense -> dense_1 (unnamed); new: outer(inner(dense -> dense_1)) -> a head shaped like dense_1.
    Which of the two alike layers is the old one only the user knows; with names (fc, head) names decide."""
    def inner_model():
        inputs = keras.Input((5,))
        return keras.Model(inputs, keras.layers.Dense(4)(keras.layers.Dense(4)(inputs)))

    keras.backend.clear_session()
    old = inner_model()
    randomize(old, 44)
    path = save(old, tmp_path, fmt)
    keras.backend.clear_session()
    inner = inner_model()
    inputs = keras.Input((5,))
    new = keras.Model(inputs, keras.layers.Dense(4)(inner(inputs)))
    before = snapshot(new)
    report = regraft.load(new, path, strict=False)
    inner_vars = [a for a in report.plan.assignments if a.target.key.count("/") == 2]
    first = [a for a in inner_vars if a.target.layer == next(x.target.layer for x in inner_vars if x.target.shape == (5, 4))]
    inner_last = [a for a in inner_vars if a not in first]
    head = [a for a in report.plan.assignments if a.target.key.count("/") == 1]
    # 5 -> 4: only one layer fits. The TF checkpoint's order finds it; .weights.h5 orders layers by
    # class counter only, so there it may stay fresh (missed, never wrong).
    assert {a.status for a in first} == {"loaded"} if fmt == "tf" else {a.status for a in first} <= {"loaded", "missing"}
    assert inner_last and head and {a.status for a in inner_last + head} == {"unconfirmed"}
    old_first = next(layer for layer in old.layers if layer.weights and tuple(layer.kernel.shape) == (5, 4))
    new_first = next(layer for layer in inner.layers if layer.weights and tuple(layer.kernel.shape) == (5, 4))
    expected = {id(n): value_of(o) for n, o in zip(new_first.weights, old_first.weights)}
    assert_state(new, before, expected if first[0].status == "loaded" else {})


def test_lora_enabled_layers_take_their_old_kernel_and_bias(tmp_path):
    """enable_lora adds lora_kernel_a/b beside the same kernel and bias (TF checkpoint, where variables are named)."""
    def net(lora):
        keras.backend.clear_session()
        inputs = keras.Input((6,))
        d1 = keras.layers.Dense(8, name="d1")
        model = keras.Model(inputs, keras.layers.Dense(4, name="d2")(d1(inputs)))
        if lora:
            d1.enable_lora(2)
        return model

    old = net(False)
    randomize(old, 45)
    path = save(old, tmp_path, "tf")
    new = net(True)
    before = snapshot(new)
    report = regraft.load(new, path, strict=False)
    statuses = {a.target.key: a.status for a in report.plan.assignments}
    assert statuses["d1/lora_kernel_a"] == "missing" and statuses["d1/lora_kernel_b"] == "missing"
    by_path = {v.path: v for v in new.weights}
    expected = {id(by_path[v.path]): value_of(v) for v in old.weights}
    assert_state(new, before, expected)
