"""``regraft convert``: checkpoint to checkpoint with the new model's structure taken from a weights file.

The reference is always ``regraft.load`` into the real new model: the converted file, read by
the format's own reader into that model, must hold the same values bit for bit, and the plan
made against the file must decide what the plan made against the model decides.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import regraft
from conftest import randomize, same_bytes, value_of
from regraft.cli.main import main
from regraft.errors import LoadError, RegraftError
from regraft.sources import open_source
from regraft.targets.file import FileTarget

keras = pytest.importorskip("keras")
tf = pytest.importorskip("tensorflow")


def _functional(layers, name="m"):
    """``Input(4)`` then ``layers``: (name or None, units) Dense layers, a BatchNormalization after the first."""
    inputs = keras.Input((4,))
    x = inputs
    for i, (layer_name, units) in enumerate(layers):
        x = keras.layers.Dense(units, name=layer_name)(x)
        if i == 0:
            x = keras.layers.BatchNormalization(name="bn" if layer_name else None)(x)
    return keras.Model(inputs, x, name=name)


def _sequential(units):
    return keras.Sequential([keras.Input((4,))] + [keras.layers.Dense(u) for u in units], name="seq")


# old model, new model: each a builder; the pairs cover inserted, renamed, widened and order-only cases
PAIRS = {
    "inserted": (lambda: _functional([("fc0", 8), ("head", 3)]),
                 lambda: _functional([("fc0", 8), ("new", 8), ("head", 3)])),
    "renamed": (lambda: _functional([("fc0", 8), ("head", 3)]),
                lambda: _functional([("fc0", 8), ("classifier", 3)])),
    "widened": (lambda: _functional([("fc0", 8), ("head", 3)]),
                lambda: _functional([("fc0", 16), ("head", 3)])),
    "unnamed_inserted": (lambda: _sequential([4, 4, 2]), lambda: _sequential([4, 4, 4, 2])),
}


def _save(model, path, fmt):
    if fmt == "h5":
        model.save_weights(str(path) + ".weights.h5")
        return str(path) + ".weights.h5"
    return tf.train.Checkpoint(model=model).write(str(path))


def _decisions(plan, ns):
    return {a.target.keys[ns]: (str(a.status), a.source.key if a.source else None, a.order_only)
            for a in plan.assignments}


@pytest.mark.parametrize("fmt", ["h5", "tf"])
@pytest.mark.parametrize("case", sorted(PAIRS))
def test_a_plan_against_the_weights_file_decides_what_the_plan_against_the_model_decides(tmp_path, case, fmt):
    build_old, build_new = PAIRS[case]
    old, new = build_old(), build_new()
    randomize(old, 1)
    old_file = _save(old, tmp_path / "old", fmt)
    like = _save(new, tmp_path / "new", fmt)
    for accept_order in (False, True):
        with open_source(like) as source:
            target = FileTarget(source)
            from_file = regraft.plan(target, old_file, accept_order=accept_order)
            ns = source.namespace
        from_model = regraft.plan(new, old_file, accept_order=accept_order)
        assert _decisions(from_file, ns) == _decisions(from_model, ns)
        assert len(from_file.problems()) == len(from_model.problems())  # they name readable keys, which differ
        assert [e.key for e, _ in from_file.unused] == [e.key for e, _ in from_model.unused]


def _expected(new_builder, old_file, like_model, **options):
    """The new model after ``regraft.load``; variables left fresh keep ``like_model``'s values (as convert does)."""
    expected = new_builder()
    for v, w in zip(expected.weights, like_model.weights):
        v.assign(w.numpy())
    regraft.load(expected, old_file, **options)
    return expected


@pytest.mark.parametrize("out_name,fmt,like_kind", [
    ("out.weights.h5", "h5", "h5"),
    ("out.keras", "h5", "keras"),
    ("out.weights.h5", "h5", "keras"),
    ("ckpt", "tf", "tf"),
])
def test_converted_file_read_by_its_own_reader_equals_load_into_the_model(tmp_path, out_name, fmt, like_kind):
    build_old, build_new = PAIRS["inserted"]
    old, new = build_old(), build_new()
    randomize(old, 1)
    randomize(new, 2)
    old_file = _save(old, tmp_path / "old", fmt)
    if like_kind == "keras":
        like = str(tmp_path / "new.keras")
        new.save(like)
    else:
        like = _save(new, tmp_path / "new", fmt)
    out = str(tmp_path / "out" / out_name)
    report = regraft.convert(old_file, like, out, allow_missing=["new/*"])
    assert report.counts()["loaded"] == 8 and report.counts()["missing"] == 2
    expected = _expected(build_new, old_file, new, allow_missing=["new/*"])
    if out_name.endswith(".keras"):
        back = keras.saving.load_model(out, compile=False)
    else:
        back = build_new()
        if out_name.endswith(".weights.h5"):
            back.load_weights(out)
        else:
            tf.train.Checkpoint(model=back).read(out).assert_existing_objects_matched()
    assert len(back.weights) == len(expected.weights) == 10
    for got, want in zip(back.weights, expected.weights):
        assert same_bytes(value_of(got), value_of(want)), got.path
    # and regraft reads it back strictly: every variable, exact keys
    again = build_new()
    assert regraft.load(again, out).counts()["loaded"] == 10
    for got, want in zip(again.weights, expected.weights):
        assert same_bytes(value_of(got), value_of(want)), got.path


def test_safetensors_output_holds_the_like_files_keys(tmp_path):
    from safetensors.numpy import load_file

    build_old, build_new = PAIRS["inserted"]
    old, new = build_old(), build_new()
    randomize(old, 1)
    old_file, like = _save(old, tmp_path / "old", "h5"), _save(new, tmp_path / "new", "h5")
    out = str(tmp_path / "out.safetensors")
    regraft.convert(old_file, like, out, allow_missing=["new/*"])
    tensors = load_file(out)
    with open_source(like) as source:
        assert sorted(tensors) == sorted(e.key for e in source.entries())
    expected = _expected(build_new, old_file, new, allow_missing=["new/*"])
    values = _h5_order(build_new(), tensors)  # each variable's value found by its .weights.h5 path
    assert len(values) == len(expected.weights) == 10
    for got, want in zip(expected.weights, values):
        assert same_bytes(value_of(got), want), got.path


def _h5_order(model, tensors):
    """The safetensors values in ``model.weights`` order, by the .weights.h5 path Keras gives each variable."""
    from regraft.targets import target_for

    variables, _ = target_for(model).describe(("h5",))
    return [tensors[v.keys["h5"]] for v in variables]


def test_a_strict_problem_refuses_as_load_does_and_writes_nothing(tmp_path):
    build_old, build_new = PAIRS["inserted"]
    old_file = _save(build_old(), tmp_path / "old", "h5")
    like = _save(build_new(), tmp_path / "new", "h5")
    out = tmp_path / "out.weights.h5"
    with pytest.raises(LoadError) as caught:
        regraft.convert(old_file, like, str(out))
    assert str(caught.value).startswith(
        f"Refusing to load {old_file} into the layout of {like}: 1 problem; nothing was written.\n"
        "  missing from the checkpoint (2): new/{0..1}")
    assert not out.exists() and sorted(os.listdir(tmp_path)) == ["new.weights.h5", "old.weights.h5"]


def test_order_only_pairings_are_unconfirmed_unless_accepted(tmp_path):
    build_old, build_new = PAIRS["unnamed_inserted"]
    old, new = build_old(), build_new()
    randomize(old, 1)
    old_file = _save(old, tmp_path / "old", "h5")
    like = _save(new, tmp_path / "new", "h5")
    out = tmp_path / "out.weights.h5"
    with pytest.raises(LoadError) as caught:
        regraft.convert(old_file, like, str(out))
    assert str(caught.value).startswith(
        f"Refusing to load {old_file} into the layout of {like}: 1 problem; nothing was written.\n"
        "  3 layers placed by order only: ")
    assert "(a tie among alike layers, no names to tell them apart) — confirm with accept_order=True" in str(
        caught.value)
    assert not out.exists()
    report = regraft.convert(old_file, like, str(out), accept_order=True, allow_missing=["*"])
    assert report.counts()["loaded"] == 6 and report.counts()["unconfirmed"] == 0
    expected = _expected(build_new, old_file, new, accept_order=True, allow_missing=["*"])
    back = build_new()
    back.load_weights(str(out))
    for got, want in zip(back.weights, expected.weights):
        assert same_bytes(value_of(got), value_of(want)), got.path


def test_files_in_different_namespaces_are_refused(tmp_path):
    build_old, build_new = PAIRS["inserted"]
    old_file = _save(build_old(), tmp_path / "old", "tf")
    like = _save(build_new(), tmp_path / "new", "h5")
    with pytest.raises(RegraftError) as caught:
        regraft.convert(old_file, like, str(tmp_path / "out.weights.h5"))
    assert str(caught.value) == (
        f"Cannot convert {old_file} (tf-object) into the layout of {like} (keras-h5): their keys are in different "
        "namespaces (object and h5), and without the model's code regraft cannot compute the new model's keys in the "
        "old checkpoint's namespace.\nHint: Pass the new model as a .keras archive (model.save('new.keras'): Keras "
        "rebuilds it from its config), or a --like file of the old checkpoint's kind (a TF checkpoint for a TF "
        "checkpoint, .weights.h5 for Keras weights), or use `regraft load` with the new model's code.")


@pytest.mark.parametrize("out_name,message", [
    ("out.keras", "that needs a .keras archive of the new model (the config is copied from it)."),
    ("ckpt", "that needs a TF checkpoint of the new model (its object graph is copied)."),
])
def test_an_output_the_like_file_cannot_give_is_refused_before_any_work(tmp_path, out_name, message):
    build_old, build_new = PAIRS["inserted"]
    old_file = _save(build_old(), tmp_path / "old", "h5")
    like = _save(build_new(), tmp_path / "new", "h5")
    with pytest.raises(RegraftError) as caught:
        regraft.convert(old_file, like, str(tmp_path / out_name), allow_missing=["new/*"])
    assert message in str(caught.value)
    assert str(caught.value).endswith("Hint: From this --like file regraft writes: .weights.h5, .safetensors.")
    assert sorted(os.listdir(tmp_path)) == ["new.weights.h5", "old.weights.h5"]


def test_cli_convert_writes_and_reports_json(capsys, tmp_path):
    build_old, build_new = PAIRS["inserted"]
    old = build_old()
    randomize(old, 1)
    old_file = _save(old, tmp_path / "old", "tf")
    like = _save(build_new(), tmp_path / "new", "tf")
    out = str(tmp_path / "conv" / "ckpt")
    code = main(["convert", old_file, "--like", like, "--out", out, "--allow-missing", "new/*", "--json"])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    data = json.loads(stdout)
    assert data["written"] == [out + ".data-00000-of-00001", out + ".index"]
    # a second conversion over the same prefix: the old checkpoint is replaced atomically (other shard count)
    code = main(["convert", old_file, "--like", like, "--out", out, "--allow-missing", "new/*", "--json"])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads(stdout)["written"] == [out + ".data-00000-of-00002", out + ".data-00001-of-00002",
                                             out + ".index"]
    assert sorted(os.listdir(tmp_path / "conv")) == ["ckpt.data-00000-of-00002", "ckpt.data-00001-of-00002",
                                                     "ckpt.index"]
    back = build_new()
    tf.train.Checkpoint(model=back).read(out).assert_existing_objects_matched()
    expected = build_new()
    regraft.load(expected, old_file, allow_missing=["new/*"])
    for got, want in zip(back.weights, expected.weights):
        if "new" not in got.path:
            assert same_bytes(value_of(got), value_of(want)), got.path
    code = main(["convert", old_file, "--like", like, "--out", out, "--reshape", "preserve"])
    _, err = capsys.readouterr()
    assert code == 2 and "Error: convert cannot use reshape='preserve'" in err


@pytest.mark.parametrize("out_name", ["out.weights.h5", "out.safetensors", "ckpt"])
def test_a_tf_checkpoint_into_a_keras_archives_model_equals_load_into_the_model(tmp_path, out_name):
    """Different namespaces: the .keras config rebuilds the model, which knows its keys in both."""
    build_old, build_new = PAIRS["inserted"]
    old, new = build_old(), build_new()
    randomize(old, 1)
    randomize(new, 2)
    old_file = _save(old, tmp_path / "old", "tf")
    like = str(tmp_path / "new.keras")
    new.save(like)
    out = str(tmp_path / out_name)
    report = regraft.convert(old_file, like, out, allow_missing=["new/*"])
    assert report.counts()["loaded"] == 8
    expected = _expected(build_new, old_file, new, allow_missing=["new/*"])
    back = build_new()
    if out_name.endswith(".weights.h5"):
        back.load_weights(out)
    elif out_name.endswith(".safetensors"):
        from safetensors.numpy import load_file

        tensors = load_file(out)
        assert sorted(tensors) == sorted(v.path for v in back.weights)  # functional: readable keys are the paths
        for v in back.weights:
            v.assign(tensors[v.path])
    else:
        tf.train.Checkpoint(model=back).read(out).assert_existing_objects_matched()
    for got, want in zip(back.weights, expected.weights):
        assert same_bytes(value_of(got), value_of(want)), got.path


def test_a_keras_archive_keras_cannot_rebuild_is_a_regraft_error(tmp_path):
    class Unregistered(keras.layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.dense = keras.layers.Dense(3)

        def call(self, x):
            return self.dense(x)

    inputs = keras.Input((4,))
    model = keras.Model(inputs, Unregistered(name="u")(inputs), name="m")
    like = str(tmp_path / "new.keras")
    model.save(like)
    old_file = _save(model, tmp_path / "old", "tf")
    with pytest.raises(RegraftError) as caught:
        regraft.convert(old_file, like, str(tmp_path / "out.weights.h5"))
    assert str(caught.value).startswith(f"Cannot rebuild the model of {like} from its config: Keras raised ")
    assert caught.value.hint.startswith("Its layers need classes Keras knows")
    assert sorted(os.listdir(tmp_path)) == ["new.keras", "old.data-00000-of-00001", "old.index"]
