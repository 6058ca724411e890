"""The command line, run in-process through ``regraft.cli.main.main``.

Files TensorFlow writes come from ``tf_writer`` functions (``tests/backend_cases.py``), so the
tests run on every Keras backend; writing a TF checkpoint (``--out PREFIX``, the demo) needs
the TensorFlow backend and is skipped elsewhere.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
from regraft.cli.main import main  # noqa: E402
from regraft.demo import build_inserted_new, build_inserted_old  # noqa: E402

from backend_cases import tf_writer  # noqa: E402

needs_tf_backend = pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                                      reason="writes a TF checkpoint, which needs the TensorFlow Keras backend")

MODELS_PY = '''
import keras

def build():
    inputs = keras.Input((4,))
    x = keras.layers.Dense(3, name="d1")(inputs)
    return keras.Model(inputs, keras.layers.Dense(2, name="d2")(x))

def not_a_model():
    return 42

def broken():
    raise RuntimeError("boom")
'''


@pytest.fixture
def models_py(tmp_path):
    path = tmp_path / "models.py"
    path.write_text(MODELS_PY)
    return str(path)


@tf_writer
def inserted_files(folder):
    """``Checkpoint(model=old).save`` of the demo's original model (dense1 -> dense2), and dense1's values."""
    import tensorflow as tf

    old = build_inserted_old()
    tf.train.Checkpoint(model=old).save(os.path.join(folder, "ckpt"))
    np.savez(os.path.join(folder, "values.npz"), **{f"dense1/{n}": getattr(old.dense1, n).numpy() for n in ("kernel", "bias")})


@pytest.fixture
def inserted_ckpt(tf_written, tmp_path):
    """The checkpoint of the demo's original model, copied to ``tmp_path/old``, and its dense1's values."""
    folder = tf_written(inserted_files, copy_to=tmp_path / "old")
    return os.path.join(folder, "ckpt-1"), dict(np.load(os.path.join(folder, "values.npz")))


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_inspect_lists_weights_and_json(capsys, inserted_ckpt):
    prefix, old = inserted_ckpt
    code, out, err = run(capsys, "inspect", prefix)
    assert code == 0
    assert "model/dense1/_kernel  (32, 64)" in out
    assert "4 weights (2,762 parameters), 0 optimizer slots, 1 bookkeeping" in out
    code, out, _ = run(capsys, "inspect", prefix, "--json", "--all")
    data = json.loads(out)
    assert data["format"] == "tf-object"
    assert data["objects"] == ["model"]
    keys = {e["key"]: e for e in data["entries"]}
    assert keys["model/dense2/bias"]["shape"] == [10]
    assert keys["save_counter"]["kind"] == "bookkeeping"


@pytest.mark.parametrize(
    "argv, message, hint",
    [
        (["inspect", "{tmp}/nope"], "Error: {tmp}/nope does not exist.", "Hint: Check the path"),
        (["inspect", "{tmp}"], "Error: {tmp} is a folder but holds no checkpoint", "Hint: Pass a checkpoint prefix"),
        (["diff", "{ckpt}", "--model", "nocolon"], "is not of the form FILE.py:CALLABLE", "Hint: For example"),
        (["diff", "{ckpt}", "--model", "{tmp}/missing.py:build"], "Model file {tmp}/missing.py does not exist.", "Hint:"),
        (["diff", "{ckpt}", "--model", "{models}:nothing"], "has no attribute 'nothing'", "Callables it defines: broken, build, not_a_model"),
        (["diff", "{ckpt}", "--model", "{models}:not_a_model"], "returned int, not a keras.Model.", "Hint:"),
        (["diff", "{ckpt}", "--model", "{models}:broken"], "raised RuntimeError: boom", "REGRAFT_DEBUG=1"),
        (["diff", "{ckpt}", "--model", "no_such_module_xyz:build"], "Cannot import module 'no_such_module_xyz'", "PYTHONPATH"),
    ],
)
def test_user_errors_exit_2_without_traceback(capsys, tmp_path, models_py, inserted_ckpt, argv, message, hint):
    (tmp_path / "unrelated.txt").write_text("x")
    fill = dict(tmp=str(tmp_path), ckpt=inserted_ckpt[0], models=models_py)
    code, out, err = run(capsys, *[a.format(**fill) for a in argv])
    assert code == 2
    assert out == ""
    assert message.format(**fill) in err
    assert hint in err
    assert "Traceback" not in err


def test_diff_reports_plan_and_loads_nothing(capsys, inserted_ckpt):
    prefix, _ = inserted_ckpt
    code, out, _ = run(capsys, "diff", prefix, "--model", "regraft.demo:build_inserted_new", "--json")
    assert code == 0
    data = json.loads(out)
    status = {row["target"]: row["status"] for row in data["variables"]}
    assert status == {
        "dense1/kernel": "loaded", "dense1/bias": "loaded",
        "dense2/kernel": "shape-mismatch", "dense2/bias": "shape-mismatch",
        "dense3/kernel": "missing", "dense3/bias": "missing",
    }
    assert data["applied"] is False
    assert any("missing from the checkpoint (2): dense3/{bias,kernel}" in p for p in data["strict_problems"])


def test_load_strict_refusal_writes_nothing(capsys, tmp_path, inserted_ckpt):
    prefix, _ = inserted_ckpt
    out_path = tmp_path / "new.weights.h5"
    code, out, err = run(capsys, "load", prefix, "--model", "regraft.demo:build_inserted_new", "--out", str(out_path))
    assert code == 2
    assert "Error: Refusing to load" in err
    assert "shape mismatch: tensor 'model/dense2/_kernel' has shape (64, 10); variable 'dense2/kernel' needs (64, 128)" in err
    assert not out_path.exists()
    assert os.listdir(tmp_path) == ["old"]  # no temporary files left behind either


@pytest.mark.parametrize("out_name", ["new.weights.h5", pytest.param("newckpt/ckpt", marks=needs_tf_backend)])
def test_load_writes_output_with_checkpoint_values(capsys, tmp_path, inserted_ckpt, out_name):
    prefix, old = inserted_ckpt
    out_path = tmp_path / out_name
    out_path.parent.mkdir(exist_ok=True)
    code, out, err = run(
        capsys, "load", prefix, "--model", "regraft.demo:build_inserted_new", "--out", str(out_path),
        "--allow-missing", "dense2/*", "--allow-missing", "dense3/*", "--json",
    )
    assert code == 0, err
    data = json.loads(out)
    assert data["counts"]["loaded"] == 2
    reloaded = build_inserted_new()
    if out_name.endswith(".h5"):
        reloaded.load_weights(str(out_path))
    else:
        import tensorflow as tf

        tf.train.Checkpoint(model=reloaded).read(str(out_path)).assert_existing_objects_matched()
    for name in ("kernel", "bias"):
        expected = old[f"dense1/{name}"]
        assert np.array_equal(getattr(reloaded.dense1, name).numpy().view(np.uint8), expected.view(np.uint8))
    assert not [f for f in os.listdir(out_path.parent) if f.startswith(".regraft-out-")]


def test_file_model_spec(capsys, tmp_path, models_py):
    import keras

    spec = f"{models_py}:build"
    import importlib.util

    module_spec = importlib.util.spec_from_file_location("m", models_py)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    old = module.build()
    weights = tmp_path / "old.weights.h5"
    old.save_weights(str(weights))
    code, out, err = run(capsys, "diff", str(weights), "--model", spec)
    assert code == 0, err
    assert "4 would load, 0 shape-mismatch, 0 missing, 0 unused — 100.0% of parameters" in out
    assert isinstance(old, keras.Model)


@pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                    reason="the demo writes TF checkpoints, which needs the TensorFlow Keras backend")
def test_demo_runs_and_explains_the_tutorial_bug(capsys):
    code, out, err = run(capsys, "demo")
    assert code == 0
    for title in ("(a) inserted layer", "(b) more filters", "(c) renamed layer", "(d) inserted layer, functional"):
        assert f"=== {title}" in out
    # (a): the inserted layer is refused strictly, and the tutorial's dense2 -> dense3 copy cannot work.
    assert "missing from the checkpoint (2): dense3/{bias,kernel}" in out
    assert "shape mismatch: tensor 'model/dense2/_kernel' has shape (64, 10); variable 'dense3/kernel' needs (128, 10)" in out
    # (c): two different chosen names are not paired on a guess; one rename rule (by layer name) loads it all.
    assert "missing from the checkpoint (2): my_dense_layer/{bias,kernel}" in out
    assert "(rename={'dense_layer_1/': 'my_dense_layer/'}):\n  4 loaded, 0 shape-mismatch, 0 missing, 0 unused — 100.0%" in out
    # (d): positional keys shift after an inserted layer; alignment still finds head and d3's bias.
    assert "loaded          head/kernel      model/_operations/4/_kernel  (16, 4)" in out
    assert "  inserted layers: inserted" in out
    # (a) again with reshape='preserve': the inserted dense2 starts as an identity, the function is kept.
    assert "  transformed, identity_init (2): dense2/{bias,kernel}" in out
    verify_line = next(line for line in out.splitlines() if line.startswith("  verify: max |Δ| "))
    assert verify_line.endswith("over 8 probe inputs: within 1e-05")


def test_help_explains_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("inspect", "diff", "load", "demo"):
        assert command in out


def test_strict_refusal_hint_speaks_flags(capsys, tmp_path, inserted_ckpt):
    prefix, _ = inserted_ckpt
    code, _, err = run(capsys, "load", prefix, "--model", "regraft.demo:build_inserted_new",
                       "--out", str(tmp_path / "n.weights.h5"))
    assert code == 2
    hint = next(line for line in err.splitlines() if line.startswith("Hint:"))
    assert "--rename" in hint and "--allow-missing" in hint and "--accept-order" in hint and "--no-strict" in hint
    assert "=" not in hint  # no Python keyword arguments


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["dif", "x"], "invalid choice: 'dif'"),
        (["diff", "x", "--model", "m:f", "--reshap", "preserve"], "unrecognized arguments: --reshap preserve"),
        (["load", "x", "--model", "m:f", "--out", "o", "--no-stric"], "unrecognized arguments: --no-stric"),
    ],
)
def test_mistyped_commands_and_flags_are_refused_with_a_suggestion(capsys, argv, expected):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert expected in err and "did you mean" in err
    command = argv[0] if argv[0] != "dif" else None
    if command:  # the subcommand's own usage, not the top-level one
        assert f"usage: regraft {command}" in err


@tf_writer
def many_names_files(folder):
    from conftest import save_tf1

    arrays = {f"scope_{i:04d}/a_rather_long_variable_name": np.zeros((2,), "float32") for i in range(2500)}
    save_tf1(arrays, os.path.join(folder, "model.ckpt"))


def test_piping_into_a_closed_reader_exits_quietly(tf_written):
    """`regraft inspect CKPT | head`: more output than a pipe buffer holds, so the write fails mid-way."""
    import subprocess
    import sys

    prefix = os.path.join(tf_written(many_names_files), "model.ckpt")
    env = dict(os.environ, PYTHONPATH=os.path.join(os.path.dirname(__file__), "..", "src"), TF_CPP_MIN_LOG_LEVEL="3")
    for extra in ("", "--json"):
        shell = f"{sys.executable} -m regraft inspect {prefix} {extra} | head -c 10; exit ${{PIPESTATUS[0]}}"
        done = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 0, done.stderr
        assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr


@pytest.mark.parametrize("out_name", ["new.h5", "new.npz", "new.weights.json"])
def test_out_with_an_extension_regraft_does_not_write_is_refused_before_any_work(capsys, tmp_path, inserted_ckpt,
                                                                                  out_name):
    prefix, _ = inserted_ckpt
    code, _, err = run(capsys, "load", prefix, "--model", "regraft.demo:build_inserted_new", "--no-strict",
                       "--out", str(tmp_path / out_name))
    ext = out_name[3:]
    assert code == 2 and f"regraft does not write {ext} files. It writes .weights.h5 (Keras weights), .keras " in err
    assert "Hint: End --out with .weights.h5, .keras or .safetensors" in err
    assert sorted(os.listdir(tmp_path)) == ["old"]


@needs_tf_backend
def test_out_into_a_new_folder_creates_it(capsys, tmp_path, inserted_ckpt):
    prefix, _ = inserted_ckpt
    out = tmp_path / "runs" / "new" / "ckpt"
    code, _, err = run(capsys, "load", prefix, "--model", "regraft.demo:build_inserted_new", "--no-strict",
                       "--out", str(out))
    assert code == 0, err
    assert (tmp_path / "runs" / "new" / "ckpt.index").exists()


def test_a_load_that_loads_nothing_is_an_error_and_writes_nothing(capsys, tmp_path, models_py):
    other = keras.Sequential([keras.Input((3,)), keras.layers.Dense(7, name="unrelated")])
    weights = tmp_path / "other.weights.h5"
    other.save_weights(str(weights))
    out = tmp_path / "new.weights.h5"
    code, _, err = run(capsys, "load", str(weights), "--model", "regraft.demo:build_inserted_new", "--no-strict",
                       "--out", str(out))
    assert code == 2 and "Nothing was loaded" in err
    assert not out.exists()


def test_freeze_with_a_weights_file_warns_which_layers_to_freeze_in_code(capsys, tmp_path, inserted_ckpt):
    prefix, _ = inserted_ckpt
    code, _, err = run(capsys, "load", prefix, "--model", "regraft.demo:build_inserted_new", "--no-strict",
                       "--freeze", "--out", str(tmp_path / "n.weights.h5"))
    assert code == 0
    assert "do not keep trainable flags" in err and "dense1" in err


def test_diff_lists_each_shape_mismatch_once(capsys, tmp_path):
    """Many widened layers: each mismatch is shown once, the details are capped, the refusal counts them."""
    def mlp(width):
        keras.backend.clear_session()
        inputs = keras.Input((4,))
        x = inputs
        for i in range(15):
            x = keras.layers.Dense(width, name=f"fc{i}")(x)
        return keras.Model(inputs, x)

    path = tmp_path / "old.weights.h5"
    mlp(8).save_weights(str(path))
    models = tmp_path / "wide.py"
    models.write_text("import keras\n\ndef build():\n    inputs = keras.Input((4,))\n    x = inputs\n"
                      "    for i in range(15):\n        x = keras.layers.Dense(12, name=f'fc{i}')(x)\n"
                      "    return keras.Model(inputs, x)\n")
    code, out, _ = run(capsys, "diff", str(path), "--model", f"{models}:build")
    assert code == 0
    assert out.count("fc3/kernel: (8, 8) in") == 1 and "shape mismatch: tensor" not in out
    assert "… and 18 more shape mismatches" in out
    assert "30 shape mismatches (see above; --table lists every variable)" in out
    assert len(out.splitlines()) < 40


@tf_writer
def slots_and_keras2_files(folder):
    """A trained model's ``Checkpoint(model, optimizer)``, and a tf-keras model of 30 Dense layers as Keras 2 .h5."""
    import tensorflow as tf
    import tf_keras

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="d")])
    model.compile(optimizer="adam", loss="mse")
    model.fit(np.ones((2, 3), "float32"), np.ones((2, 2), "float32"), verbose=0)
    tf.train.Checkpoint(model=model, optimizer=model.optimizer).write(os.path.join(folder, "ck", "ck"))
    old = tf_keras.Sequential([tf_keras.Input((3,))] + [tf_keras.layers.Dense(2) for _ in range(30)])
    old.save_weights(os.path.join(folder, "k2.h5"))


def test_inspect_all_names_each_slots_weight_and_h5_has_no_objects_line(capsys, tf_written):
    folder = tf_written(slots_and_keras2_files)
    code, out, _ = run(capsys, "inspect", os.path.join(folder, "ck", "ck"), "--all")
    assert code == 0 and "SLOT OF" in out.splitlines()[1]
    slot_rows = [line for line in out.splitlines() if " optimizer_slot " in line]
    assert slot_rows and all(line.rstrip().endswith(("_kernel", "bias")) for line in slot_rows)

    code, out, _ = run(capsys, "inspect", os.path.join(folder, "k2.h5"))
    assert code == 0 and "objects:" not in out.splitlines()[0]


def test_no_tensorflow_start_up_lines_on_the_terminal(tmp_path, models_py):
    import subprocess
    import sys

    old = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="d")])
    old.save_weights(str(tmp_path / "o.weights.h5"))
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env["PYTHONPATH"] = os.path.join(os.path.dirname(__file__), "..", "src")
    done = subprocess.run([sys.executable, "-m", "regraft", "diff", str(tmp_path / "o.weights.h5"), "--model",
                           "regraft.demo:build_inserted_new"], capture_output=True, text=True,
                          env=env, timeout=300)
    assert "would load" in done.stdout or "missing" in done.stdout, done.stderr
    assert "I0000" not in done.stderr and "absl::InitializeLog" not in done.stderr, done.stderr
