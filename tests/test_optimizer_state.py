"""Optimizer state follows its variables: load(..., optimizer=) with real trained optimizers.

Runs on the TensorFlow backend (which trains and writes the checkpoints itself) and on
JAX without TensorFlow, where the checkpoints are the ones ``tests/backend_cases.py``
wrote with TensorFlow (``REGRAFT_TF_FILES``) and the old model and its optimizer are
rebuilt from the numpy copy of their state, so that this backend takes the old
model's next step itself.
"""

from __future__ import annotations

import os
import shutil

import keras
import numpy as np
import pytest

import backend_cases
from backend_cases import OPTIMIZERS, TRAINED, X3 as X, Y2 as Y, train_step as _step
from conftest import assert_state, same_bytes, snapshot, value_of

import regraft
from regraft.errors import RegraftError
from regraft.optimizer_state import slot_steps


def _model(width: int = 4, insert: bool = False) -> keras.Model:
    return backend_cases.optimizer_model(width, insert)


def _trained(tmp_path, name: str, case: str | None = None):
    """The old model, its optimizer and the prefix of ``Checkpoint(model=, optimizer=)`` of the
    ``trained_<name>`` case: trained here on TensorFlow; on another backend, the TF-written files
    (copied into ``tmp_path``) and the old state rebuilt from their numpy copy."""
    trained = next(c for c in TRAINED if c.name == (case or f"trained_{name}"))
    folder = str(tmp_path / trained.name)
    if keras.backend.backend() == "tensorflow":
        model, optimizer = backend_cases.write_trained(trained, folder)
        return model, optimizer, os.path.join(folder, "ckpt")
    files = os.environ.get("REGRAFT_TF_FILES")
    if not files:
        pytest.skip("needs TF-written checkpoints: set REGRAFT_TF_FILES (make test-jax does)")
    assert os.path.exists(os.path.join(files, trained.name, "state.npz")), \
        f"REGRAFT_TF_FILES={files} lacks {trained.name}: run tests/backend_cases.py again"
    shutil.copytree(os.path.join(files, trained.name), folder)
    model, optimizer = backend_cases.restore_trained(trained, folder)
    return model, optimizer, os.path.join(folder, "ckpt")


def _slots(optimizer, variable) -> dict[str, np.ndarray]:
    """The optimizer's slot values for ``variable`` by slot list name (through its public variables' paths)."""
    from regraft.targets import _compat

    variables, lists = _compat.optimizer_slot_lists(_compat.slot_holder(optimizer))
    i = [id(v) for v in variables].index(id(variable))
    return {name: value_of(items[i]) for name, items in lists.items()}


def _gradients(model) -> list[np.ndarray]:
    return [keras.ops.convert_to_numpy(g) for g in backend_cases.gradients(model)]


def _assert_same_loss_scale(old_opt, new_opt) -> None:
    """A LossScaleOptimizer's dynamic scale and its counter are carried (checked non-initial)."""
    from regraft.targets import _compat

    old_scale, new_scale = _compat.loss_scale_variables(old_opt), _compat.loss_scale_variables(new_opt)
    assert old_scale.keys() == new_scale.keys()
    if old_scale:
        assert float(np.asarray(old_scale["dynamic_scale"].numpy())) == 4096.0  # 1024, doubled twice in 5 steps
        assert all(same_bytes(value_of(old_scale[k]), value_of(new_scale[k])) for k in old_scale)


def _iterations(optimizer) -> int:
    return int(np.asarray(optimizer.iterations.numpy()))


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_unchanged_model_takes_the_old_models_next_step_bit_for_bit(tmp_path, name):
    old, old_opt, prefix = _trained(tmp_path, name)
    new, new_opt = _model(), OPTIMIZERS[name]()
    report = regraft.load(new, prefix, optimizer=new_opt)
    assert _iterations(new_opt) == _iterations(old_opt) == 5
    assert {r["state"] for r in report.to_dict()["optimizer"]} == {"loaded"}
    for a, b in zip(old.trainable_variables, new.trainable_variables):
        old_slots, new_slots = _slots(old_opt, a), _slots(new_opt, b)
        assert old_slots.keys() == new_slots.keys() and old_slots
        assert all(same_bytes(old_slots[k], new_slots[k]) for k in old_slots)
    _assert_same_loss_scale(old_opt, new_opt)
    _step(old, old_opt)
    _step(new, new_opt)
    # The same values through the same ops on one CPU thread pool: the step is bit for bit equal.
    for a, b in zip(old.weights, new.weights):
        assert same_bytes(value_of(a), value_of(b)), a.path
    # Guard: without the optimizer state the step differs (Adam's bias correction, the momentum).
    cold, cold_opt = _model(), OPTIMIZERS[name]()
    regraft.load(cold, prefix)
    _step(cold, cold_opt)
    assert not same_bytes(value_of(cold.weights[0]), value_of(old.weights[0]))


@pytest.mark.parametrize("name, summary", [("adam", "optimizer: 9 loaded, 4 fresh"),
                                           ("sgd_momentum", "optimizer: 5 loaded, 2 fresh")])
def test_inserted_layer_gets_fresh_slots_and_the_rest_keep_theirs(tmp_path, name, summary):
    old, old_opt, prefix = _trained(tmp_path, name)
    new, new_opt = _model(insert=True), OPTIMIZERS[name]()
    _step(new, new_opt)  # a used optimizer: its slots are not zeros before the load
    assert all(s.any() for v in new.trainable_variables if "/ins/" in v.path for s in _slots(new_opt, v).values())
    report = regraft.load(new, prefix, optimizer=new_opt, reshape="preserve")
    rows = {r["slot"]: r for r in report.to_dict()["optimizer"]}
    assert rows["optimizer/iterations"]["state"] == "loaded" and _iterations(new_opt) == 5
    for layer in ("d1", "d2"):
        for role in ("kernel", "bias"):
            new_var = next(v for v in new.trainable_variables if v.path.endswith(f"{layer}/{role}"))
            old_var = next(v for v in old.trainable_variables if v.path.endswith(f"{layer}/{role}"))
            old_slots, new_slots = _slots(old_opt, old_var), _slots(new_opt, new_var)
            assert old_slots and all(same_bytes(old_slots[k], new_slots[k]) for k in old_slots)
            assert all(rows[f"optimizer/{layer}/{role}/{k.lstrip('_')}"]["state"] == "loaded" for k in old_slots)
    inserted = [v for v in new.trainable_variables if "/ins/" in v.path]
    assert len(inserted) == 2
    assert all(not s.any() for v in inserted for s in _slots(new_opt, v).values())
    assert {r["state"] for k, r in rows.items() if k.startswith("optimizer/ins/")} == {"fresh"}
    assert summary in report.summary()
    _step(new, new_opt)  # training goes on from the loaded state


def test_legacy_tf_keras_slot_variables_follow_their_weights(tmp_path):
    tf_keras = pytest.importorskip("tf_keras")
    old = tf_keras.Sequential([tf_keras.layers.Dense(4, activation="relu", name="d1", input_shape=(3,)),
                               tf_keras.layers.Dense(2, name="d2")])
    old_opt = tf_keras.optimizers.legacy.Adam(0.01)
    old.compile(old_opt, "mse")
    old.fit(X, Y, verbose=0, epochs=3, batch_size=16)  # tf_keras: skipped without TensorFlow
    old.save_weights(str(tmp_path / "tk"))
    new, opt = _model(), OPTIMIZERS["adam"]()
    report = regraft.load(new, str(tmp_path / "tk"), optimizer=opt)
    assert {r["state"] for r in report.to_dict()["optimizer"]} == {"loaded"}
    assert _iterations(opt) == 3
    for a, b in zip(old.trainable_variables, new.trainable_variables):
        slots = _slots(opt, b)
        assert same_bytes(slots["_momentums"], old_opt.get_slot(a, "m").numpy())
        assert same_bytes(slots["_velocities"], old_opt.get_slot(a, "v").numpy())


MISSING = ("optimizer state missing from the checkpoint (9): optimizer/d{1..2}/bias/{momentums,velocities}, "
           "optimizer/d{1..2}/kernel/{momentums,velocities}, optimizer/iterations — slots of loaded variables would "
           "start fresh (")


def _slots_refused_then_fresh(path: str, reason: str) -> None:
    """Strict refuses ``path``'s optimizer state for ``reason``, leaving the model and a stepped Adam
    unchanged; ``strict=False`` then starts every slot fresh and keeps the step count."""
    new, opt = _model(), OPTIMIZERS["adam"]()
    _step(new, opt)
    before, opt_before = snapshot(new), {id(v): value_of(v) for v in opt.variables}
    with pytest.raises(regraft.errors.LoadError) as info:
        regraft.load(new, path, optimizer=opt)
    assert info.value.problems == [f"{MISSING}{reason})"]
    assert_state(new, before)
    assert all(same_bytes(opt_before[id(v)], value_of(v)) for v in opt.variables)
    report = regraft.load(new, path, optimizer=opt, strict=False)
    assert _iterations(opt) == 1  # kept: nothing in the checkpoint is taken for the step count
    assert "optimizer: 8 fresh, 1 kept" in report.summary()
    assert all(not s.any() for v in new.trainable_variables for s in _slots(opt, v).values())


@pytest.mark.parametrize("fmt", ["tf", "h5"])
def test_a_checkpoint_without_optimizer_state_is_a_strict_problem(tmp_path, fmt):
    model = _model()
    if fmt == "tf":
        from conftest import save_tf  # TensorFlow's writer: skipped without TensorFlow

        prefix = save_tf(tmp_path / "weights_only", model=model)
    else:  # an uncompiled model's .weights.h5 holds no optimizer
        prefix = str(tmp_path / "weights_only.weights.h5")
        model.save_weights(prefix)
    _slots_refused_then_fresh(prefix, "a checkpoint without the optimizer, or slots that do not record their variable")


def test_widened_gradients_scale_as_derived_and_slots_follow(tmp_path):
    """Net2Net: the new model's gradient is the old one copied on the consumer's rows and
    divided by the copy count on the producer's units; slots follow (m / k, v / k**2)."""
    old, old_opt, prefix = _trained(tmp_path, "adam")
    new, new_opt = _model(width=7), OPTIMIZERS["adam"]()
    report = regraft.load(new, prefix, optimizer=new_opt, reshape="preserve")
    mapping = next(np.asarray(o["mapping"]) for a in report.plan.assignments if a.target.key == "d1/kernel"
                   for n, o in a.steps if n == "widen_out")
    count = np.bincount(mapping)[mapping]
    g_old, g_new = _gradients(old), _gradients(new)  # d1/kernel, d1/bias, d2/kernel, d2/bias
    # Derived: producer units (d1 kernel columns, bias) divided by k; consumer rows (d2 kernel) copied.
    np.testing.assert_allclose(g_new[0], g_old[0][:, mapping] / count, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(g_new[1], g_old[1][mapping] / count, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(g_new[2], g_old[2][mapping], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(g_new[3], g_old[3], rtol=1e-5, atol=1e-7)
    # A central finite difference on one copied producer weight agrees with that scaling.
    j = int(np.flatnonzero(count > 1)[0])
    kernel = new.trainable_variables[0]
    base = value_of(kernel).astype(np.float64)
    eps = 1e-2
    losses = []
    for sign in (1, -1):
        bumped = base.copy()
        bumped[0, j] += sign * eps
        kernel.assign(bumped.astype("float32"))
        losses.append(float(np.mean((keras.ops.convert_to_numpy(new(X)).astype(np.float64) - Y) ** 2)))
    kernel.assign(base.astype("float32"))
    np.testing.assert_allclose((losses[0] - losses[1]) / (2 * eps), g_old[0][0, mapping[j]] / count[j], rtol=2e-2)
    # Slots: first moment like the gradient, second moment like its square.
    old_vars, new_vars = old.trainable_variables, new.trainable_variables
    s_old = [_slots(old_opt, v) for v in old_vars]
    s_new = [_slots(new_opt, v) for v in new_vars]
    np.testing.assert_allclose(s_new[0]["_momentums"], s_old[0]["_momentums"][:, mapping] / count, rtol=1e-6)
    np.testing.assert_allclose(s_new[0]["_velocities"], s_old[0]["_velocities"][:, mapping] / count**2, rtol=1e-6)
    np.testing.assert_allclose(s_new[1]["_momentums"], s_old[1]["_momentums"][mapping] / count, rtol=1e-6)
    assert same_bytes(s_new[2]["_momentums"], s_old[2]["_momentums"][mapping])
    assert same_bytes(s_new[2]["_velocities"], s_old[2]["_velocities"][mapping])
    states = {r["slot"]: r["state"] for r in report.to_dict()["optimizer"]}
    assert states["optimizer/d1/kernel/velocities"] == "transformed"
    assert states["optimizer/d2/bias/velocities"] == "loaded"


def test_slot_steps_table():
    m = [0, 1, 0]
    assert slot_steps([("widen_out", {"mapping": m, "axis": -1})], "_momentums") == (
        ("widen_in", {"mapping": m, "axis": -1, "power": 1}),)
    assert slot_steps([("widen_in", {"mapping": m, "axis": -2, "noise": 0.1, "seed": 3})], "_velocities") == (
        ("widen_out", {"mapping": m, "axis": -2}),)
    assert slot_steps([("identity_init", {})], "_momentums") is None
    assert slot_steps([("resize", {})], "_momentums") is None
    assert slot_steps([("pad", {"value": 1.0})], "_velocities") == (("pad", {"value": 0.0}),)
    assert slot_steps([("overlay", {})], "_velocities") == (("overlay", {"value": 0.0}),)


def test_optimizer_of_another_model_is_refused_and_nothing_changes(tmp_path):
    _, _, prefix = _trained(tmp_path, "adam")
    new, other = _model(), _model()
    opt = OPTIMIZERS["adam"]()
    opt.build(other.trainable_variables)
    before, opt_before = snapshot(new), {id(v): value_of(v) for v in opt.variables}
    with pytest.raises(RegraftError) as info:
        regraft.load(new, prefix, optimizer=opt)
    assert info.value.message == f"The optimizer '{opt.name}' was built for other variables than this model's."
    assert_state(new, before)
    assert all(same_bytes(opt_before[id(v)], value_of(v)) for v in opt.variables)


def test_a_failed_load_leaves_the_optimizer_unchanged(tmp_path):
    """A damaged slot tensor (the last one written) stops the load: the model and every optimizer
    variable keep their bytes."""
    from regraft.sources._bundle import Bundle

    old, old_opt, prefix = _trained(tmp_path, "adam")
    bundle = Bundle(prefix)
    key = next(k for k in bundle.entries if k.startswith("optimizer/_variables/9/"))
    entry = bundle.entries[key]
    data = bytearray(open(bundle.data_path(entry.shard_id), "rb").read())
    data[entry.offset] ^= 0xFF
    open(bundle.data_path(entry.shard_id), "wb").write(bytes(data))
    new, opt = _model(), OPTIMIZERS["adam"]()
    _step(new, opt)
    before, opt_before = snapshot(new), {id(v): value_of(v) for v in opt.variables}
    with pytest.raises(RegraftError) as info:
        regraft.load(new, prefix, optimizer=opt)
    assert "optimizer/_variables/9" in info.value.message
    assert_state(new, before)
    assert all(same_bytes(opt_before[id(v)], value_of(v)) for v in opt.variables)


MODELS_PY = """
import keras

def build():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, activation="relu", name="d1"),
                              keras.layers.Dense(2, name="d2")])
    model.compile(keras.optimizers.Adam(0.01), "mse")
    return model

def uncompiled():
    return keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, name="d1"), keras.layers.Dense(2, name="d2")])
"""


@pytest.mark.skipif("os.environ.get('KERAS_BACKEND', 'tensorflow') != 'tensorflow'",
                    reason="writes a TF checkpoint, which needs the TensorFlow backend")
def test_cli_optimizer_writes_model_and_optimizer_to_a_checkpoint(tmp_path, capsys):
    from regraft.cli.main import main

    old, old_opt, prefix = _trained(tmp_path, "adam")
    models = tmp_path / "models.py"
    models.write_text(MODELS_PY)
    out = str(tmp_path / "out" / "ckpt")
    assert main(["load", prefix, "--model", f"{models}:build", "--optimizer", "--out", out]) == 0
    printed = capsys.readouterr().out
    assert "loaded  optimizer/d1/kernel/momentums" in printed and "optimizer: 9 loaded" in printed
    # What was written resumes like the old model: load it back with its optimizer, step both.
    new, opt = _model(), OPTIMIZERS["adam"]()
    regraft.load(new, out, optimizer=opt)
    _step(old, old_opt)
    _step(new, opt)
    assert all(same_bytes(value_of(a), value_of(b)) for a, b in zip(old.weights, new.weights))

    # The same through a plan file: regraft plan --optimizer, then regraft apply --optimizer.
    plan_path = str(tmp_path / "plan.yaml")
    assert main(["plan", prefix, "--model", f"{models}:build", "--optimizer", "-o", plan_path]) == 0
    out2 = str(tmp_path / "out2" / "ckpt")
    assert main(["apply", plan_path, "--model", f"{models}:build", "--optimizer", "--out", out2]) == 0
    capsys.readouterr()
    first, first_opt = _model(), OPTIMIZERS["adam"]()
    regraft.load(first, out, optimizer=first_opt)
    again, again_opt = _model(), OPTIMIZERS["adam"]()
    regraft.load(again, out2, optimizer=again_opt)
    assert _iterations(again_opt) == 5
    for a, b in zip(first.trainable_variables, again.trainable_variables):
        want, got = _slots(first_opt, a), _slots(again_opt, b)
        assert want.keys() == got.keys() and all(same_bytes(want[k], got[k]) for k in want)

    assert main(["load", prefix, "--model", f"{models}:build", "--optimizer", "--out", str(tmp_path / "w.weights.h5")]) == 2
    err = capsys.readouterr().err
    assert f"Error: --optimizer needs a TensorFlow checkpoint for --out, not {tmp_path / 'w.weights.h5'}" in err
    assert main(["load", prefix, "--model", f"{models}:uncompiled", "--optimizer", "--out", str(tmp_path / "o2")]) == 2
    assert "is not compiled, so it has no optimizer to load into" in capsys.readouterr().err
    assert not os.path.exists(str(tmp_path / "o2.index"))


def test_a_layer_widened_on_both_sides_gets_both_scalings(tmp_path):
    """d1 4 -> 7 and d2 3 -> 5 units: d2's kernel copies rows (consumer of d1) and divides columns
    (producer): its gradient is g[map1[i], map2[j]] / k2[j]; slots follow (m / k2, v / k2**2)."""
    old, old_opt, prefix = _trained(tmp_path, "adam", "trained_adam_3layer")
    new, opt = backend_cases.optimizer_model(widths=(7, 5)), OPTIMIZERS["adam"]()
    report = regraft.load(new, prefix, optimizer=opt, reshape="preserve")
    steps = {a.target.key: dict(a.steps) for a in report.plan.assignments}
    map1 = np.asarray(steps["d2/kernel"]["widen_in"]["mapping"])
    map2 = np.asarray(steps["d2/kernel"]["widen_out"]["mapping"])
    k2 = np.bincount(map2)[map2]
    assert (np.bincount(map1) > 1).any() and (k2 > 1).any()
    g_old, g_new = _gradients(old), _gradients(new)
    np.testing.assert_allclose(g_new[2], g_old[2][map1][:, map2] / k2, rtol=1e-5, atol=1e-7)
    m_old, m_new = _slots(old_opt, old.trainable_variables[2]), _slots(opt, new.trainable_variables[2])
    np.testing.assert_allclose(m_new["_momentums"], m_old["_momentums"][map1][:, map2] / k2, rtol=1e-6)
    np.testing.assert_allclose(m_new["_velocities"], m_old["_velocities"][map1][:, map2] / k2**2, rtol=1e-6)
    _step(new, opt)


def test_overlay_keeps_old_moments_in_the_block_and_zeros_elsewhere(tmp_path):
    old, old_opt, prefix = _trained(tmp_path, "adam")
    new, opt = _model(width=6), OPTIMIZERS["adam"]()
    _step(new, opt)  # used: its slots are not zeros before the load
    report = regraft.load(new, prefix, optimizer=opt, reshape="overlay")
    m_old = _slots(old_opt, old.trainable_variables[0])["_momentums"]
    m_new = _slots(opt, new.trainable_variables[0])["_momentums"]
    assert same_bytes(m_new[:, :4], m_old) and not m_new[:, 4:].any() and m_old.all()
    assert {r["slot"]: r["state"] for r in report.to_dict()["optimizer"]}["optimizer/d1/kernel/momentums"] == "transformed"


# --------------------------------------------------------------------------- .keras: optimizer/vars/N by position


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_keras_archive_numbered_slots_resume_like_the_old_model(tmp_path, name):
    """model.save('x.keras') stores the optimizer's variables as optimizer/vars/N with nothing naming
    their weight: regraft rebuilds the model and optimizer the archive's config describes (as Keras'
    loader does) to know which is which. The archive is TensorFlow's on every backend."""
    old, old_opt, prefix = _trained(tmp_path, name)
    path = os.path.join(os.path.dirname(prefix), "old.keras")
    new, new_opt = _model(), OPTIMIZERS[name]()
    report = regraft.load(new, path, optimizer=new_opt)
    rows = {r["slot"]: r for r in report.to_dict()["optimizer"]}
    assert {r["state"] for r in rows.values()} == {"loaded"} and _iterations(new_opt) == 5
    # A LossScaleOptimizer saves its own 4 variables first, then its inner optimizer's (whose step count counts).
    assert rows["optimizer/iterations"]["source"] == ("optimizer/vars/4" if name == "loss_scale_adam"
                                                      else "optimizer/vars/0")
    _assert_same_loss_scale(old_opt, new_opt)
    for a, b in zip(old.trainable_variables, new.trainable_variables):
        old_slots, new_slots = _slots(old_opt, a), _slots(new_opt, b)
        assert old_slots.keys() == new_slots.keys() and old_slots
        assert all(same_bytes(old_slots[k], new_slots[k]) for k in old_slots), b.path
    _step(old, old_opt)
    _step(new, new_opt)
    for a, b in zip(old.weights, new.weights):
        assert same_bytes(value_of(a), value_of(b)), a.path


def test_keras_archive_slots_follow_into_a_changed_model(tmp_path):
    """A .keras written on this backend; the new model has an inserted layer: d1/d2 slots by value,
    the inserted layer's fresh."""
    old, old_opt, _ = _trained(tmp_path, "rmsprop_centered")
    old.compile(optimizer=old_opt, loss="mse")
    old.save(str(tmp_path / "here.keras"))
    new, opt = _model(insert=True), OPTIMIZERS["rmsprop_centered"]()
    report = regraft.load(new, str(tmp_path / "here.keras"), optimizer=opt, reshape="preserve")
    assert "optimizer: 13 loaded, 6 fresh" in report.summary()
    by_path = {v.path.split("/", 1)[1]: v for v in old.trainable_variables}
    for v in new.trainable_variables:
        layer_role = v.path.split("/", 1)[1]
        if layer_role.startswith("ins/"):
            assert all(not s.any() for s in _slots(opt, v).values())
            continue
        want, got = _slots(old_opt, by_path[layer_role]), _slots(opt, v)
        assert len(want) == 3 and all(same_bytes(want[k], got[k]) for k in want), v.path


def test_keras_archive_whose_optimizer_was_built_for_other_variables_is_refused(tmp_path):
    """d1 frozen after training: the config's model has 2 trainable variables, the saved optimizer
    slots for 4. Position cannot say which is which: strict refuses, strict=False starts fresh."""
    old, old_opt, _ = _trained(tmp_path, "adam")
    old.get_layer("d1").trainable = False
    old.compile(optimizer=old_opt, loss="mse")
    path = str(tmp_path / "frozen.keras")
    old.save(path)
    _slots_refused_then_fresh(
        path, f"{path} holds 10 optimizer variables; the Adam its config names, built for the model it describes, has 6")


def test_keras_archive_whose_optimizer_keras_cannot_rebuild_is_refused(tmp_path):
    """config.json naming an optimizer class Keras does not know (a real archive, its config edited)."""
    import json
    import zipfile

    old, old_opt, _ = _trained(tmp_path, "adam")
    old.compile(optimizer=old_opt, loss="mse")
    old.save(str(tmp_path / "good.keras"))
    path = str(tmp_path / "unknown.keras")
    with zipfile.ZipFile(tmp_path / "good.keras") as src, zipfile.ZipFile(path, "w") as out:
        for info in src.infolist():
            data = src.read(info)
            if info.filename == "config.json":
                config = json.loads(data)
                config["compile_config"]["optimizer"]["class_name"] = "NoSuchOptimizer"
                data = json.dumps(config).encode()
            out.writestr(info, data)
    new, opt = _model(), OPTIMIZERS["adam"]()
    before = snapshot(new)
    with pytest.raises(regraft.errors.LoadError) as info:
        regraft.load(new, path, optimizer=opt)
    [problem] = info.value.problems
    assert problem.startswith(
        f"{MISSING}Cannot rebuild the model and optimizer of {path} from its config: Keras raised ValueError: ")
    assert "NoSuchOptimizer" in problem
    assert_state(new, before)
    report = regraft.load(new, path, optimizer=opt, strict=False)  # the weights still load
    assert report.counts()["loaded"] == 4 and "optimizer: 8 fresh, 1 kept" in report.summary()


def test_weights_h5_numbered_optimizer_variables_are_refused(tmp_path):
    """A compiled model's .weights.h5 holds optimizer/vars/N but neither the optimizer's class nor the
    model: regraft does not guess."""
    old, old_opt, _ = _trained(tmp_path, "adam")
    old.compile(optimizer=old_opt, loss="mse")
    path = str(tmp_path / "w.weights.h5")
    old.save_weights(path)
    with pytest.raises(regraft.errors.LoadError) as info:
        regraft.load(_model(), path, optimizer=OPTIMIZERS["adam"]())
    assert info.value.problems[0].endswith(
        f"— slots of loaded variables would start fresh ({path} numbers its optimizer variables (optimizer/vars/N) "
        "without recording the optimizer's class or the model they were built for)")


# --------------------------------------------------------------------------- plans and plan files carry the optimizer


def test_plan_file_round_trips_the_optimizer_and_apply_resumes_like_the_old_model(tmp_path):
    old, old_opt, prefix = _trained(tmp_path, "adam")
    made_for = _model()
    plan = regraft.plan(made_for, prefix, optimizer=OPTIMIZERS["adam"]())
    path = str(tmp_path / "plan.yaml")
    regraft.save_plan(plan, path)
    new, opt = _model(), OPTIMIZERS["adam"]()  # built the same way; the optimizer unbuilt
    read = regraft.read_plan(path, new)
    assert read.to_dict() == plan.to_dict()
    assert [a.target.variable for a in read.optimizer_assignments] == [None] * 9  # bound by apply
    report = regraft.apply(read, new, optimizer=opt)
    assert {r["state"] for r in report.to_dict()["optimizer"]} == {"loaded"} and _iterations(opt) == 5
    _step(old, old_opt)
    _step(new, opt)
    for a, b in zip(old.weights, new.weights):
        assert same_bytes(value_of(a), value_of(b)), a.path


def test_plan_file_optimizer_section_of_a_changed_model_loads_by_value(tmp_path):
    """An inserted layer, a .keras archive: the fresh slots' fill steps and the numbered slots' sources
    survive the file; an edited slot source is honoured."""
    old, old_opt, _ = _trained(tmp_path, "adam")
    old.compile(optimizer=old_opt, loss="mse")
    old.save(str(tmp_path / "old.keras"))
    plan = regraft.plan(_model(insert=True), str(tmp_path / "old.keras"), optimizer=OPTIMIZERS["adam"](),
                        reshape="preserve")
    path = tmp_path / "plan.yaml"
    regraft.save_plan(plan, str(path))
    text = path.read_text()
    line = next(x for x in text.splitlines() if x.strip().startswith("optimizer/d2/bias/momentums:"))
    assert "source: optimizer/vars/8" in line
    path.write_text(text.replace(line, line.replace("source: optimizer/vars/8", "source: null")
                                 .replace("status: loaded", "status: missing")))
    new, opt = _model(insert=True), OPTIMIZERS["adam"]()
    _step(new, opt)  # used: every slot is non-zero before
    kept = value_of(_compat_slot(opt, new, "d2/bias", "_momentums"))
    report = regraft.apply(regraft.read_plan(str(path), new), new, optimizer=opt)
    assert "optimizer: 8 loaded, 4 fresh, 1 kept" in report.summary()
    assert same_bytes(value_of(_compat_slot(opt, new, "d2/bias", "_momentums")), kept)
    for layer_role in ("d1/kernel", "d1/bias", "d2/kernel"):
        want = _slots(old_opt, next(v for v in old.trainable_variables if v.path.endswith(layer_role)))
        got = _slots(opt, next(v for v in new.trainable_variables if v.path.endswith(layer_role)))
        assert all(same_bytes(want[k], got[k]) for k in want), layer_role
    assert all(not s.any() for v in new.trainable_variables if "/ins/" in v.path for s in _slots(opt, v).values())


def _compat_slot(optimizer, model, layer_role: str, list_name: str):
    from regraft.targets import _compat

    variables, lists = _compat.optimizer_slot_lists(_compat.slot_holder(optimizer))
    variable = next(v for v in model.trainable_variables if v.path.endswith(layer_role))
    return lists[list_name][[id(v) for v in variables].index(id(variable))]


def test_plan_file_optimizer_section_refusals(tmp_path):
    _, _, prefix = _trained(tmp_path, "adam")
    path = tmp_path / "plan.yaml"
    regraft.save_plan(regraft.plan(_model(), prefix, optimizer=OPTIMIZERS["adam"]()), str(path))
    new = _model()
    before = snapshot(new)
    with pytest.raises(RegraftError) as info:
        regraft.apply(regraft.read_plan(str(path), new), new)
    assert info.value.message == ("This plan has an optimizer section (made with optimizer=): pass the optimizer "
                                  "to load it into.")
    sgd = OPTIMIZERS["sgd_momentum"]()
    with pytest.raises(RegraftError) as info:
        regraft.apply(regraft.read_plan(str(path), new), new, optimizer=sgd)
    assert info.value.message == (
        f"This plan's optimizer slots are not those of the optimizer '{sgd.name}' (SGD): "
        "optimizer/d{1..2}/bias/velocities, optimizer/d{1..2}/kernel/velocities are in one and not the other.")
    assert_state(new, before)
    regraft.save_plan(regraft.plan(_model(), prefix), str(tmp_path / "plain.yaml"))
    with pytest.raises(RegraftError) as info:
        regraft.apply(regraft.read_plan(str(tmp_path / "plain.yaml"), new), new, optimizer=OPTIMIZERS["adam"]())
    assert info.value.message == "This plan has no optimizer section: it was made without an optimizer."
    text = path.read_text()
    lines = text.splitlines()
    number = next(i for i, x in enumerate(lines, 1) if x.strip().startswith("optimizer/d1/kernel/momentums:"))
    path.write_text(text.replace("shape: [3, 4], dtype: float32}", "shape: abc, dtype: float32}", 1))
    with pytest.raises(RegraftError) as info:
        regraft.read_plan(str(path), new)
    assert info.value.message == (
        f"Plan {path}, line {number}: 'optimizer.slots.optimizer/d1/kernel/momentums.shape' is the text 'abc'; "
        "expected a list of whole numbers (the slot's shape).")
    path.write_text(text.replace("optimizer/d1/kernel/momentums: {source: optimizer/",
                                 "optimizer/d1/kernel/momentums: {source: optimizer/_iterations, x: optimizer/", 1))
    with pytest.raises(RegraftError) as info:
        regraft.read_plan(str(path), new)
    assert info.value.message == (
        f"Plan {path}, line {number}: 'optimizer.slots.optimizer/d1/kernel/momentums.source' names "
        "'optimizer/_iterations' of shape []; expected a tensor of the slot's shape [3, 4], or null.")


def test_cli_diff_and_plan_take_optimizer(tmp_path, capsys):
    from regraft.cli.main import main

    _, _, prefix = _trained(tmp_path, "adam")
    models = tmp_path / "models.py"
    models.write_text(MODELS_PY)
    assert main(["diff", prefix, "--model", f"{models}:build", "--optimizer"]) == 0
    printed = capsys.readouterr().out
    assert "loaded  optimizer/d1/kernel/momentums" in printed and "optimizer: 9" in printed
    plan_path = str(tmp_path / "plan.yaml")
    assert main(["plan", prefix, "--model", f"{models}:build", "--optimizer", "-o", plan_path]) == 0
    capsys.readouterr()
    model = _model()
    assert len(regraft.read_plan(plan_path, model).optimizer_assignments) == 9
    assert main(["apply", plan_path, "--model", f"{models}:build", "--optimizer", "--out",
                 str(tmp_path / "w.weights.h5")]) == 2
    assert "Error: --optimizer needs a TensorFlow checkpoint for --out" in capsys.readouterr().err


# --------------------------------------------------------------------------- LossScaleOptimizer


def test_loss_scale_checkpoint_into_plain_adam_and_back(tmp_path):
    """A LossScaleOptimizer's slots live in its inner optimizer; its own _iterations stays 0 and the inner
    one counts the steps, so the inner's is carried. A plain optimizer's checkpoint into a loss-scaled one
    keeps the loss scale as built (not a strict problem)."""
    from regraft.targets import _compat

    old, old_opt, prefix = _trained(tmp_path, "loss_scale_adam")
    new, opt = _model(), OPTIMIZERS["adam"]()
    report = regraft.load(new, prefix, optimizer=opt)
    assert _iterations(opt) == 5 and {r["state"] for r in report.to_dict()["optimizer"]} == {"loaded"}
    assert {r["slot"]: r["source"] for r in report.to_dict()["optimizer"]}["optimizer/iterations"] == \
        "optimizer/inner_optimizer/_iterations"
    for a, b in zip(old.trainable_variables, new.trainable_variables):
        want, got = _slots(old_opt, a), _slots(opt, b)
        assert want.keys() == got.keys() == {"_momentums", "_velocities"}
        assert all(same_bytes(want[k], got[k]) for k in want)

    plain, plain_opt, plain_prefix = _trained(tmp_path, "adam")
    scaled, scaled_opt = _model(), OPTIMIZERS["loss_scale_adam"]()
    report = regraft.load(scaled, plain_prefix, optimizer=scaled_opt)
    rows = {r["slot"]: r for r in report.to_dict()["optimizer"]}
    assert rows["optimizer/loss_scale/dynamic_scale"]["state"] == "kept"
    assert rows["optimizer/loss_scale/dynamic_scale"]["reason"] == (
        "kept as built: the checkpoint's optimizer has no loss scale (dynamic_scale)")
    assert float(np.asarray(_compat.loss_scale_variables(scaled_opt)["dynamic_scale"].numpy())) == 1024.0
    assert _iterations(scaled_opt) == 5
    for a, b in zip(plain.trainable_variables, scaled.trainable_variables):
        want, got = _slots(plain_opt, a), _slots(scaled_opt, b)
        assert all(same_bytes(want[k], got[k]) for k in want)


# --------------------------------------------------------------------------- Adafactor: factored slots


def _adafactor_archive(tmp_path):
    """A model trained 4 steps by Adafactor on this backend, saved as .keras (Keras writes it on every backend)."""
    keras.utils.set_random_seed(11)
    old, opt = _model(), keras.optimizers.Adafactor(0.05)
    for _ in range(4):
        _step(old, opt)
    old.compile(optimizer=opt, loss="mse")
    path = str(tmp_path / "adafactor.keras")
    old.save(path)
    return old, opt, path


def test_adafactor_factored_slots_resume_like_the_old_model(tmp_path):
    old, old_opt, path = _adafactor_archive(tmp_path)
    new, opt = _model(), keras.optimizers.Adafactor(0.05)
    report = regraft.load(new, path, optimizer=opt)
    assert {r["state"] for r in report.to_dict()["optimizer"]} == {"loaded"} and _iterations(opt) == 4
    for a, b in zip(old.trainable_variables, new.trainable_variables):
        want, got = _slots(old_opt, a), _slots(opt, b)
        assert want.keys() == got.keys() == {"_r", "_c", "_v"}
        assert all(same_bytes(want[k], got[k]) for k in want), b.path
    kernel_r = _slots(opt, new.trainable_variables[0])["_r"]
    assert kernel_r.shape == (3,) and kernel_r.all()  # the row means of d1's (3, 4) kernel, trained
    _step(old, old_opt)
    _step(new, opt)
    for a, b in zip(old.weights, new.weights):
        assert same_bytes(value_of(a), value_of(b)), a.path


def test_adafactor_factored_slots_of_a_widened_variable_start_fresh_with_the_reason(tmp_path):
    old, old_opt, path = _adafactor_archive(tmp_path)
    new, opt = _model(width=7), keras.optimizers.Adafactor(0.05)
    _step(new, opt)  # used: its slots are not zeros before the load
    report = regraft.load(new, path, optimizer=opt, reshape="preserve")
    rows = {r["slot"]: r for r in report.to_dict()["optimizer"]}
    assert rows["optimizer/d1/kernel/r"]["state"] == "fresh"
    assert rows["optimizer/d1/kernel/r"]["reason"] == (
        "fresh: a factored slot (_r, shape [3], not its variable's) has no counterpart of widen_out")
    assert rows["optimizer/d2/kernel/c"]["reason"] == (
        "fresh: a factored slot (_c, shape [2], not its variable's) has no counterpart of widen_in")
    assert rows["optimizer/d1/kernel/v"]["state"] == "transformed"  # a second moment: divided by k**2
    assert rows["optimizer/d2/bias/r"]["state"] == "loaded"
    mapping = next(np.asarray(o["mapping"]) for a in report.plan.assignments if a.target.key == "d1/kernel"
                   for n, o in a.steps if n == "widen_out")
    count = np.bincount(mapping)[mapping]
    s_old = [_slots(old_opt, v) for v in old.trainable_variables]
    s_new = [_slots(opt, v) for v in new.trainable_variables]
    assert not s_new[0]["_r"].any() and not s_new[0]["_c"].any() and not s_new[2]["_r"].any()
    np.testing.assert_allclose(s_new[0]["_v"], s_old[0]["_v"][:, mapping] / count**2, rtol=1e-6)
    assert all(same_bytes(s_new[3][k], s_old[3][k]) for k in ("_r", "_c", "_v"))
    _step(new, opt)  # training goes on from the loaded state


def test_muon_slots_only_some_variables_have_resume_like_the_old_model(tmp_path):
    """Muon keeps Adam's second moment (adam_velocities) only for the variables it does not orthogonalise
    (None for the kernels): those slots are placed by position from a .keras archive and the rest skipped."""
    keras.utils.set_random_seed(3)
    old, old_opt = _model(), keras.optimizers.Muon(0.01)
    for _ in range(3):
        _step(old, old_opt)
    old.compile(optimizer=old_opt, loss="mse")
    old.save(str(tmp_path / "muon.keras"))
    new, opt = _model(), keras.optimizers.Muon(0.01)
    report = regraft.load(new, str(tmp_path / "muon.keras"), optimizer=opt)
    rows = {r["slot"]: r for r in report.to_dict()["optimizer"]}
    assert sorted(rows) == ["optimizer/d1/bias/adam_velocities", "optimizer/d1/bias/momentums",
                            "optimizer/d1/kernel/momentums", "optimizer/d2/bias/adam_velocities",
                            "optimizer/d2/bias/momentums", "optimizer/d2/kernel/momentums", "optimizer/iterations"]
    assert {r["state"] for r in rows.values()} == {"loaded"}
    _step(old, old_opt)
    _step(new, opt)
    for a, b in zip(old.weights, new.weights):
        assert same_bytes(value_of(a), value_of(b)), a.path


def test_every_builtin_optimizer_variable_is_a_known_slot_or_scalar():
    """Pins the slot lists and scalars regraft knows against this Keras: a variable of a built-in optimizer
    that is none of them (a new slot list in a later Keras) would silently keep its value."""
    import inspect

    from regraft.targets import _compat

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4), keras.layers.Dense(2)])
    seen = []
    for name in sorted(dir(keras.optimizers)):
        cls = getattr(keras.optimizers, name)
        if not (inspect.isclass(cls) and issubclass(cls, keras.optimizers.Optimizer)):
            continue
        if cls in (keras.optimizers.Optimizer, getattr(keras.optimizers, "MultiOptimizer", None)):
            continue  # the base class; MultiOptimizer delegates to several optimizers (not handled)
        optimizer = cls(keras.optimizers.Adam()) if cls is keras.optimizers.LossScaleOptimizer else cls()
        optimizer.build(model.trainable_variables)
        holder = _compat.slot_holder(optimizer)
        _, lists = _compat.optimizer_slot_lists(holder)
        known = {id(s) for items in lists.values() for s in items if s is not None}
        known |= {id(v) for v in (_compat.step_variable(holder), *_compat.loss_scale_variables(optimizer).values(),
                                  *_compat.optimizer_scalars(holder).values())}
        rest = [v.path for v in optimizer.variables if id(v) not in known and not v.path.endswith("learning_rate")]
        if cls is keras.optimizers.LossScaleOptimizer:  # its own step count stays 0: the inner one counts
            rest.remove(_compat.step_variable(optimizer).path)
        assert rest == [], name
        seen.append(name)
    assert {"Adam", "Adafactor", "Muon", "Nadam", "LossScaleOptimizer", "SGD", "RMSprop", "Ftrl"} <= set(seen)
