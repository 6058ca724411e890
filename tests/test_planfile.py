"""Plan files: every section round-trips, and a hand-broken file gets an error naming line and key."""

from __future__ import annotations

import os

import pytest
import yaml

from conftest import randomize, save_h5, save_tf, unnamed_stack

import keras  # noqa: E402  (conftest set the TF log level first)

import regraft  # noqa: E402
from regraft.errors import RegraftError  # noqa: E402
from regraft.rules import parse_rules  # noqa: E402


def mlp(insert: bool, name: str):
    keras.backend.clear_session()
    inputs = keras.Input((8,))
    x = keras.layers.Dense(16, name="d1")(inputs)
    if insert:
        x = keras.layers.Dense(16, name="inserted")(x)
    x = keras.layers.Dense(12, name="d2")(x)
    return keras.Model(inputs, keras.layers.Dense(4, name="head")(keras.layers.Dense(12, name="aux")(x)), name=name)


@pytest.fixture
def planned(tmp_path):
    """A plan with rules (rename used, ignore used, init used), an inserted layer and an identity transform."""
    old = mlp(False, "old")
    randomize(old, 1)
    path = save_tf(tmp_path / "ckpt" / "ckpt", model=old)
    new = mlp(True, "new")
    rules = {"init": ["aux/*"], "ignore": ["*/_operations/4/*"], "rename": {"never_there/": "nowhere/"}}
    plan = regraft.plan(new, path, rules=rules, reshape="preserve", allow_unused=["*"])
    return plan, new, tmp_path


def test_every_section_round_trips(planned):
    plan, new, tmp_path = planned
    regraft.save_plan(plan, tmp_path / "plan.yaml")
    again = regraft.read_plan(tmp_path / "plan.yaml", new)
    assert again.to_dict() == plan.to_dict()
    assert again.to_dict()["ignored"] and again.to_dict()["rules"]
    assert any(a.status == "transformed" for a in again.assignments)


@pytest.mark.parametrize("fmt", ["tf", "h5"])
def test_unconfirmed_and_accepted_order_round_trip(tmp_path, fmt):
    old = unnamed_stack(3)
    randomize(old, 2)
    path = save_tf(tmp_path / "ckpt" / "ckpt", model=old) if fmt == "tf" else save_h5(old, tmp_path / "o.weights.h5")
    for accept in (False, True):
        new = unnamed_stack(4)
        plan = regraft.plan(new, path, accept_order=accept)
        regraft.save_plan(plan, tmp_path / "plan.yaml")
        assert regraft.read_plan(tmp_path / "plan.yaml", new).to_dict() == plan.to_dict()


def test_confirming_a_proposal_by_copying_it_into_source_loads_it(tmp_path):
    old = unnamed_stack(3)
    randomize(old, 3)
    path = save_tf(tmp_path / "ckpt" / "ckpt", model=old)
    new = unnamed_stack(4)
    regraft.save_plan(regraft.plan(new, path), tmp_path / "plan.yaml")
    data = yaml.safe_load((tmp_path / "plan.yaml").read_text())
    key, entry = next((k, e) for k, e in data["variables"].items() if e.get("proposed"))
    entry["source"] = entry["proposed"]
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump(data))
    edited = regraft.read_plan(tmp_path / "plan.yaml", new)
    assignment = next(a for a in edited.assignments if a.target.key == key)
    assert assignment.status == "loaded" and assignment.source.key == entry["proposed"]


def _broken(planned, edit) -> str:
    plan, new, tmp_path = planned
    regraft.save_plan(plan, tmp_path / "plan.yaml")
    data = yaml.safe_load((tmp_path / "plan.yaml").read_text())
    edit(data)
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(RegraftError) as info:
        regraft.read_plan(tmp_path / "plan.yaml", new)
    return str(info.value)


def _first_variable(data):
    return next(iter(data["variables"].values()))


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda d: d.pop("checkpoint"), "'checkpoint' is missing; expected a mapping"),
        (lambda d: d.__setitem__("checkpoint", "abc"), "'checkpoint' is the text 'abc'; expected a mapping"),
        (lambda d: d["checkpoint"].pop("path"), "'checkpoint.path' is missing; expected a string"),
        (lambda d: d["checkpoint"].__setitem__("path", 5), "'checkpoint.path' is 5 (int); expected a string"),
        (lambda d: d["checkpoint"].pop("fingerprint"), "'checkpoint.fingerprint' is missing"),
        (lambda d: d["checkpoint"].__setitem__("root", 5), "'checkpoint.root' is 5 (int); expected a string"),
        (lambda d: d.pop("model"), "'model' is missing; expected a mapping"),
        (lambda d: d["model"].pop("fingerprint"), "'model.fingerprint' is missing; expected a string"),
        (lambda d: d.__setitem__("variables", None), "'variables' is missing; expected a mapping"),
        (lambda d: d.__setitem__("variables", [1, 2]), "'variables' is a list; expected a mapping"),
        (lambda d: _first_variable(d).__setitem__("source", ["x"]), "source' is a list; expected a checkpoint key or null"),
        (lambda d: _first_variable(d).__setitem__("source", {}), "source' is a mapping; expected a checkpoint key or null"),
        (lambda d: _first_variable(d).__setitem__("source", "no/such/key"), "names 'no/such/key', which is not in the checkpoint"),
        (lambda d: _first_variable(d).__setitem__("steps", 7), "steps' is 7 (int); expected a list of mappings"),
        (lambda d: _first_variable(d).__setitem__("confidence", "high"), "confidence' is the text 'high'; expected a number"),
        (lambda d: d.__setitem__("inserted_layers", 5), "'inserted_layers' is 5 (int); expected a list of strings"),
        (lambda d: d.__setitem__("rules", "x"), "'rules' is the text 'x'; expected a list"),
    ],
)
def test_a_hand_broken_plan_gets_an_error_naming_line_and_key(planned, edit, expected):
    message = _broken(planned, edit)
    assert expected in message
    assert ", line " in message and "plan.yaml" in message


def test_files_that_are_not_plans(tmp_path):
    model = mlp(False, "m")
    (tmp_path / "latin1.yaml").write_bytes("regraft_plan: 1\nname: caf\xe9\n".encode("latin-1"))
    with pytest.raises(RegraftError, match="is not UTF-8 text"):
        regraft.read_plan(tmp_path / "latin1.yaml", model)
    with pytest.raises(RegraftError, match="is a folder, not a file"):
        regraft.read_plan(tmp_path, model)
    (tmp_path / "bad.yaml").write_text("regraft_plan: [1\n")
    with pytest.raises(RegraftError, match=r"line \d+ is not valid YAML"):
        regraft.read_plan(tmp_path / "bad.yaml", model)
    (tmp_path / "python.yaml").write_text("!!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(RegraftError, match="not valid YAML"):
        regraft.read_plan(tmp_path / "python.yaml", model)
    with pytest.raises(RegraftError, match="does not exist"):
        regraft.read_plan(tmp_path / "missing.yaml", model)
    (tmp_path / "deep.yaml").write_text("regraft_plan: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(RegraftError, match="nests lists or mappings thousands of levels deep"):
        regraft.read_plan(tmp_path / "deep.yaml", model)
    with pytest.raises(RegraftError, match="The rules file .* nests lists or mappings thousands of levels deep"):
        parse_rules(tmp_path / "deep.yaml")
    for tagged in ("!!timestamp abc", "!!int abc", "!!float abc"):
        (tmp_path / "tagged.yaml").write_text(f"regraft_plan: {tagged}\n")
        with pytest.raises(RegraftError, match="holds a tagged value that is not what its tag says"):
            regraft.read_plan(tmp_path / "tagged.yaml", model)
        (tmp_path / "tagged.yaml").write_text(f"rename: {tagged}\n")
        with pytest.raises(RegraftError, match="The rules file .* holds a tagged value that is not what its tag says"):
            parse_rules(tmp_path / "tagged.yaml")


def test_saving_a_plan_where_it_cannot_go_leaves_nothing(planned):
    plan, _, tmp_path = planned
    with pytest.raises(RegraftError, match="is a folder"):
        regraft.save_plan(plan, tmp_path)
    with pytest.raises(RegraftError, match="does not exist"):
        regraft.save_plan(plan, tmp_path / "nope" / "plan.yaml")
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".regraft-tmp")]
