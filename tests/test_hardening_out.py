"""Writing outputs (issue 13: items 6, 7, 8 of "Fuzzing and faults"; the SIGKILL and disk-full checks).

An output is the previous file (or absent) or the complete new one, whatever stops
the writer; a path that cannot be written is a RegraftError naming it, the problem
and the fix, with nothing left behind. Faults are real: a file-size limit
(RLIMIT_FSIZE) in a child process for a full disk, SIGKILL of a child CLI; kill
points inside the commit protocol are enumerated in-process.
"""

from __future__ import annotations

import importlib.util
import os
import random
import signal
import subprocess
import sys

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

import regraft.writing as writing  # noqa: E402
from conftest import randomize, same_bytes  # noqa: E402
from regraft.cli.main import main  # noqa: E402
from regraft.errors import RegraftError  # noqa: E402
from regraft.targets.keras import save_weights  # noqa: E402

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")

MODELS_PY = '''
import keras

def build(width=2048):
    inputs = keras.Input((16,))
    x = keras.layers.Dense(width, name="d1")(inputs)
    return keras.Model(inputs, keras.layers.Dense(8, name="d2")(x))

def build_big():
    return build(65536)
'''

def _bench_faults():
    """bench/faults.py, whose child script the tests run too."""
    path = os.path.join(os.path.dirname(SRC), "bench", "faults.py")
    spec = importlib.util.spec_from_file_location("bench_faults", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The CLI in a child process, with regraft's weight writer wrapped: "fsize" sets a real file-size limit just
# before writing (SIGXFSZ ignored, so a write past it fails with EFBIG as on a full disk); "announce" prints
# WRITING when the write starts, so the parent can kill the child during it. The same script as the bench's.
CHILD = _bench_faults().CHILD


def _module(tmp_path):
    path = tmp_path / "models.py"
    path.write_text(MODELS_PY)
    spec = importlib.util.spec_from_file_location("hardening_models", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return str(path), module


@pytest.fixture
def setup(tmp_path):
    """models.py, a source checkpoint of ``build()`` (seed 1) and the values it holds."""
    models_py, module = _module(tmp_path)
    source = module.build()
    randomize(source, 1)
    prefix = tf.train.Checkpoint(model=source).write(str(tmp_path / "src" / "ckpt"))
    return models_py, module, prefix, [np.array(v.numpy()) for v in source.weights]


def values_at(module, path, builder="build"):
    """The values a fresh model reads from ``path`` (TF prefix or .weights.h5), or None when absent.

    A path that exists but cannot be read completely fails the test.
    """
    model = getattr(module, builder)()
    if path.endswith(".weights.h5"):
        if not os.path.exists(path):
            return None
        model.load_weights(path)
    else:
        if not os.path.exists(path + ".index"):
            return None
        tf.train.Checkpoint(model=model).read(path).assert_existing_objects_matched()
    return [np.array(v.numpy()) for v in model.weights]


def same_values(a, b) -> bool:
    return a is not None and b is not None and len(a) == len(b) and all(same_bytes(x, y) for x, y in zip(a, b))


def leftovers(folder) -> list[str]:
    return sorted(n for n in os.listdir(folder)
                  if n.startswith(".regraft") or "regraft-tmp" in n or n.endswith("_temp"))


def assert_clean_bundle(folder, base) -> None:
    """The folder holds exactly one checkpoint ``base``: its index and every data file it reads, nothing else."""
    names = sorted(n for n in os.listdir(folder) if n.startswith(base + ".") or n.startswith("."))
    counts = {n.rsplit("-of-", 1)[1] for n in names if ".data-" in n}
    assert len(counts) == 1, names
    assert names == writing.bundle_names(base, int(counts.pop())), names


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# --------------------------------------------------------------------------- item 6: paths that cannot be written


@pytest.mark.parametrize(
    "out, expected, hint",
    [
        ("{tmp}/" + "x" * 240, "Error: Cannot write the checkpoint {tmp}/" + "x" * 240 + ": a file name would be "
         "260 bytes long; the file system allows 255.", "Hint: Choose a shorter name."),
        ("{tmp}/" + "x" * 250 + ".weights.h5", "Error: Cannot write the weights {tmp}/" + "x" * 250 + ".weights.h5: "
         "a file name would be 261 bytes long; the file system allows 255.", "Hint: Choose a shorter name."),
        ("{tmp}/models.py/ckpt", "Error: Cannot write the checkpoint {tmp}/models.py/ckpt: {tmp}/models.py is a file, "
         "not a folder.", "Hint: Check the path."),
        ("{tmp}/src/", "Error: Cannot write the checkpoint {tmp}/src/: it names a folder, not a file.",
         "Hint: Give a file name inside it, e.g. {tmp}/src/ckpt."),
        ("{tmp}/src", "Error: Cannot write the checkpoint {tmp}/src: it is an existing folder.",
         "Hint: Give a file name inside it, e.g. {tmp}/src/ckpt."),
        ("{tmp}/src.weights.h5/", "Error: Cannot write the checkpoint {tmp}/src.weights.h5/: it names a folder, not "
         "a file.", "Hint:"),
    ],
)
def test_out_that_cannot_be_written_is_refused_before_loading(capsys, tmp_path, setup, out, expected, hint):
    models_py, _, prefix, _ = setup
    out = out.format(tmp=tmp_path)
    before = sorted(os.listdir(tmp_path))
    code, stdout, err = run_cli(capsys, "load", prefix, "--model", f"{models_py}:build", "--out", out)
    assert code == 2
    assert stdout == ""
    lines = err.strip().splitlines()
    assert lines[0] == expected.format(tmp=tmp_path)
    assert lines[1].startswith(hint.format(tmp=tmp_path))
    assert sorted(os.listdir(tmp_path)) == before


def test_a_tf_prefix_too_long_for_tensorflow_is_a_regraft_error_from_the_writer(tmp_path, setup):
    """The library writer checks too (TF would raise InvalidArgumentError on the data file's name)."""
    _, module, _, _ = setup
    with pytest.raises(RegraftError) as caught:
        save_weights(module.build(), str(tmp_path / ("y" * 236)))
    assert str(caught.value) == (f"Cannot write the checkpoint {tmp_path}/{'y' * 236}: a file name would be 256 bytes "
                                 "long; the file system allows 255.\nHint: Choose a shorter name.")
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "name, expected",
    [
        ("sub", "Error: Cannot write the plan to {tmp}/sub: it is a folder."),
        ("missing/plan.yaml", "Error: Cannot write the plan to {tmp}/missing/plan.yaml: the folder {tmp}/missing "
         "does not exist."),
        ("p" * 256 + ".yaml", "Error: Cannot write the plan {tmp}/" + "p" * 256 + ".yaml: a file name would be 261 "
         "bytes long; the file system allows 255."),
        ("models.py/plan.yaml", "Error: Cannot write the plan to {tmp}/models.py/plan.yaml: the folder "
         "{tmp}/models.py does not exist."),
    ],
)
def test_plan_output_that_cannot_be_written(capsys, tmp_path, setup, name, expected):
    models_py, _, prefix, _ = setup
    (tmp_path / "sub").mkdir()
    code, _, err = run_cli(capsys, "plan", prefix, "--model", f"{models_py}:build", "-o", tmp_path / name)
    assert code == 2
    assert err.splitlines()[0] == expected.format(tmp=tmp_path)
    assert err.splitlines()[1].startswith("Hint: ")
    assert leftovers(tmp_path) == [] and leftovers(tmp_path / "sub") == []


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda p: p.mkdir(), "is a folder, not a file."),
        (lambda p: p.write_bytes(b"rename:\n  caf\xe9: x\n"), "is not UTF-8 text (byte 13 cannot be decoded)."),
    ],
)
def test_yaml_inputs_that_are_not_yaml_files(capsys, tmp_path, setup, make, expected):
    models_py, _, prefix, _ = setup
    make(tmp_path / "in.yaml")
    for argv in (["diff", prefix, "--model", f"{models_py}:build", "--rules", tmp_path / "in.yaml"],
                 ["apply", tmp_path / "in.yaml", "--model", f"{models_py}:build", "--out", tmp_path / "o.weights.h5"]):
        code, _, err = run_cli(capsys, *argv)
        assert code == 2, err
        assert err.startswith("Error: The ") and expected in err.splitlines()[0], err
        assert err.splitlines()[1].startswith("Hint: ")


def test_read_only_folder_is_refused(capsys, tmp_path, setup):
    """A real read-only folder (as root, permissions do not stop writes: that case is left to the errno path)."""
    models_py, _, prefix, _ = setup
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as root: a read-only folder is writable")
        code, _, err = run_cli(capsys, "load", prefix, "--model", f"{models_py}:build", "--out", locked / "ckpt")
        assert code == 2
        assert err.splitlines()[0] == (f"Error: Cannot write the checkpoint {locked}/ckpt: the folder {locked} is "
                                       "not writable.")
        code, _, err = run_cli(capsys, "plan", prefix, "--model", f"{models_py}:build", "-o", locked / "p.yaml")
        assert code == 2
        assert err.splitlines()[0] == (f"Error: Cannot write the plan {locked}/p.yaml: the folder {locked} is "
                                       "not writable.")
        assert os.listdir(locked) == []
    finally:
        locked.chmod(0o755)


def test_write_errors_name_the_problem_from_errno_or_framework_text():
    assert writing.explain(28, "/d") == ("the disk is full",
                                         "Free space on the disk holding /d, or write somewhere else.")
    assert writing.explain("{{function_node SaveV2}} /d/x_temp/part; File too large [Op:SaveV2]", "/d")[0] == (
        "a file grew beyond the size limit (ulimit -f, or the file system's largest file)")
    assert writing.explain("Unable to create file (unable to open file: errno = 13, error message = 'Permission "
                           "denied')", "/d")[0] == "permission denied"
    assert writing.explain("something else\nmore", "/d") == ("something else",
                                                             "Check the path and the disk, or write somewhere else.")


# --------------------------------------------------------------------------- item 7: disk full during --out


def _child(args, **kwargs):
    env = dict(os.environ, PYTHONPATH=SRC, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.Popen([sys.executable, "-c", CHILD, *map(str, args)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


@pytest.mark.parametrize("out_name", ["out/new.weights.h5", "out/ckpt"])
def test_disk_full_during_out_keeps_the_previous_output(tmp_path, setup, out_name):
    models_py, module, prefix, _ = setup
    out = str(tmp_path / out_name)
    os.makedirs(os.path.dirname(out))
    previous = module.build()
    randomize(previous, 2)
    save_weights(previous, out)  # a good previous output, written by regraft
    expected = values_at(module, out)
    files = {n: (tmp_path / "out" / n).read_bytes() for n in os.listdir(tmp_path / "out")}
    # 20 kB: more than the index, less than the weights (200 kB)
    child = _child(["fsize", 20_000, "load", prefix, "--model", f"{models_py}:build", "--out", out])
    stdout, stderr = child.communicate(timeout=300)
    assert child.returncode == 2, stderr
    what = "the weights" if out.endswith(".h5") else "the checkpoint"
    assert stderr.splitlines()[-2] == (
        f"Error: Cannot write {what} {out}: a file grew beyond the size limit (ulimit -f, or the file system's "
        f"largest file). Nothing was written; any previous {out} is unchanged.")
    assert stderr.splitlines()[-1] == "Hint: Raise the limit (ulimit -f unlimited), or write to another file system."
    assert {n: (tmp_path / "out" / n).read_bytes() for n in os.listdir(tmp_path / "out")} == files
    assert same_values(values_at(module, out), expected)


# --------------------------------------------------------------------------- item 8: killed at any moment


class _Killed(BaseException):
    """Stands for SIGKILL: nothing of the writer runs after it (its cleanup is switched off below)."""


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _killed_write(monkeypatch, model, out, step: int, dead_pid: int) -> int:
    """Run regraft's writer, "killed" before its ``step``-th file system change; returns how many it made.

    Every link, rename, removal, folder creation and fsync of ``regraft.writing`` counts
    as a step. The killed writer's staging folder carries a dead pid, as a killed
    process's would, and nothing of its cleanup runs.
    """
    done = [0]

    def tick():
        if done[0] == step:
            raise _Killed
        done[0] += 1

    class KillingOs:
        def __getattr__(self, name):
            return getattr(os, name)

        def getpid(self):
            return dead_pid

    def wrap(name):
        real = getattr(os, name)

        def call(*args, **kwargs):
            tick()
            return real(*args, **kwargs)

        setattr(KillingOs, name, staticmethod(call))

    for name in ("mkdir", "link", "replace", "remove"):
        wrap(name)
    real_fsync = writing._fsync
    with monkeypatch.context() as patch:
        patch.setattr(writing, "os", KillingOs())
        patch.setattr(writing, "_fsync", lambda path: (tick(), real_fsync(path)))
        patch.setattr(writing, "_settle", lambda folder, stage: None)
        try:
            save_weights(model, out)
        except _Killed:
            pass
    return done[0]


@pytest.mark.parametrize("out_name", ["out/ckpt", "out/new.weights.h5"])
@pytest.mark.parametrize("previous", [True, False], ids=["over-previous", "no-previous"])
def test_a_kill_at_every_step_leaves_the_old_or_the_new_output(monkeypatch, tmp_path, setup, out_name, previous):
    _, module, _, _ = setup
    folder = tmp_path / "out"
    out = str(tmp_path / out_name)
    base = os.path.basename(out)
    old, new, later = module.build(), module.build(), module.build()
    for seed, model in enumerate((old, new, later), start=2):
        randomize(model, seed)
    old_values, new_values, later_values = ([np.array(v.numpy()) for v in m.weights] for m in (old, new, later))
    dead = _dead_pid()
    seen = set()
    for step in range(100):
        folder.mkdir()
        if previous:
            if out.endswith(".h5"):
                old.save_weights(out)
            else:
                tf.train.Checkpoint(model=old).write(out)  # TensorFlow's own checkpoint: one data file
        steps = _killed_write(monkeypatch, new, out, step, dead)
        found = values_at(module, out)
        if same_values(found, new_values):
            seen.add("new")
        elif previous:
            assert same_values(found, old_values), f"killed before step {step}: neither the old nor the new output"
            seen.add("old")
        else:
            assert found is None, f"killed before step {step}: a partial output"
            seen.add("absent")
        # The next run cleans what the killed one left, whatever the step, and writes its own output.
        save_weights(later, out)
        assert leftovers(folder) == []
        assert same_values(values_at(module, out), later_values)
        if not out.endswith(".h5"):
            assert_clean_bundle(folder, base)
        else:
            assert os.listdir(folder) == [base]
        for name in os.listdir(folder):
            os.remove(folder / name)
        folder.rmdir()
        if steps < step:  # this kill came after the writer had finished
            break
    assert seen == {"new", "old" if previous else "absent"}


def test_clean_stale_touches_only_staging_of_dead_processes_on_this_host(tmp_path):
    dead, alive = _dead_pid(), os.getppid()
    tag = writing._host_tag()
    names = [f".regraft-out-{tag}-{dead}-ab12cd34", f".regraft-out-{tag}-{alive}-ab12cd34",
             f".regraft-out-{'0' * 8 if tag != '0' * 8 else '1' * 8}-{dead}-ab12cd34", ".regraft-out-x8k2_p0q"]
    for name in names:
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.weights.h5").write_bytes(b"partial")
    assert writing.clean_stale(str(tmp_path)) == [names[0]]
    assert sorted(os.listdir(tmp_path)) == sorted(names[1:])


def test_an_output_of_two_data_files_loads_in_regraft_and_tensorflow(tmp_path, setup):
    """Replacing a one-file checkpoint writes two data files (names the old index does not read)."""
    import regraft

    _, module, prefix, values = setup
    out = str(tmp_path / "out" / "ckpt")
    first, second = module.build(), module.build()
    randomize(first, 5)
    regraft.load(second, prefix)
    assert save_weights(first, out) == [out + ".data-00000-of-00001", out + ".index"]
    assert save_weights(second, out) == [out + ".data-00000-of-00002", out + ".data-00001-of-00002", out + ".index"]
    assert_clean_bundle(tmp_path / "out", "ckpt")
    assert same_values(values_at(module, out), values)
    third = module.build()
    regraft.load(third, out)
    assert same_values([np.array(v.numpy()) for v in third.weights], values)
    assert save_weights(first, out) == [out + ".data-00000-of-00001", out + ".index"]
    assert_clean_bundle(tmp_path / "out", "ckpt")


@pytest.mark.parametrize("out_name, seed", [("out/ckpt", 1), ("out/new.weights.h5", 2)])  # more: bench/faults.py
def test_sigkill_of_the_cli_during_out(capsys, tmp_path, setup, out_name, seed):
    """A real SIGKILL of `regraft load --out` at a seeded moment of its write, over a previous output."""
    models_py, module, prefix, _ = setup
    out = str(tmp_path / out_name)
    os.makedirs(os.path.dirname(out))
    big = module.build_big()
    randomize(big, 7)
    tf.train.Checkpoint(model=big).write(str(tmp_path / "big" / "ckpt"))
    new_values = [np.array(v.numpy()) for v in big.weights]
    old = module.build_big()
    randomize(old, 8)
    save_weights(old, out)
    old_values = [np.array(v.numpy()) for v in old.weights]
    delay = random.Random(seed).uniform(0.0, 0.3)
    child = _child(["announce", 0, "load", tmp_path / "big" / "ckpt", "--model", f"{models_py}:build_big",
                    "--out", out])
    try:
        assert child.stdout.readline() == "WRITING\n"
        import time

        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
        child.communicate(timeout=300)
    finally:
        child.kill()
    found = values_at(module, out, "build_big")
    assert same_values(found, old_values) or same_values(found, new_values)
    # the next run (the CLI, in this process) writes over it and leaves nothing of the killed one
    code, _, err = run_cli(capsys, "load", tmp_path / "big" / "ckpt", "--model", f"{models_py}:build_big",
                           "--out", out)
    assert code == 0, err
    assert leftovers(tmp_path / "out") == []
    assert same_values(values_at(module, out, "build_big"), new_values)
    if not out.endswith(".h5"):
        assert_clean_bundle(tmp_path / "out", "ckpt")


def test_weights_h5_bytes_equal_what_keras_save_weights_writes(tmp_path, setup):
    """regraft builds the .weights.h5 in memory (_compat.save_weights_to_buffer): the same groups, attributes and
    values as Keras' own save_weights file."""
    import h5py

    _, module, _, _ = setup
    model = module.build()
    randomize(model, 3)
    model.save_weights(str(tmp_path / "keras.weights.h5"))
    save_weights(model, str(tmp_path / "regraft.weights.h5"))

    def contents(path):
        found = {}
        with h5py.File(path, "r") as f:
            f.visititems(lambda name, obj: found.__setitem__(name, (
                dict(obj.attrs), obj[()] if isinstance(obj, h5py.Dataset) else None)))
        return found

    keras_file, regraft_file = contents(tmp_path / "keras.weights.h5"), contents(tmp_path / "regraft.weights.h5")
    assert sorted(keras_file) == sorted(regraft_file) and len(keras_file) > 4
    for name, (attrs, value) in keras_file.items():
        assert {k: str(v) for k, v in attrs.items()} == {k: str(v) for k, v in regraft_file[name][0].items()}, name
        assert (value is None and regraft_file[name][1] is None) or same_bytes(value, regraft_file[name][1]), name


def test_a_folder_the_system_refuses_is_a_regraft_error(setup):
    """/sys refuses new files even to root (EPERM), while os.access calls it writable: the errno path."""
    _, module, _, _ = setup
    out = "/sys/regraft-test.weights.h5"
    if not os.path.isdir("/sys"):
        pytest.skip("no /sys")
    with pytest.raises(RegraftError) as caught:
        save_weights(module.build(), out)
    message = str(caught.value)
    assert message in (
        f"Cannot write the weights {out}: operation not permitted. Nothing was written; any previous {out} is "
        "unchanged.\nHint: Choose a folder you can write to.",
        f"Cannot write the weights {out}: the folder /sys is not writable.\nHint: Choose a folder you can write "
        "to, or change its permissions.",
    )
    assert not [n for n in os.listdir("/sys") if n.startswith(".regraft") or n.startswith("regraft")]


def test_a_file_system_without_hard_links_still_gets_a_clean_replacement(monkeypatch, tmp_path, setup):
    import errno

    _, module, _, values = setup
    out = str(tmp_path / "out" / "ckpt")
    first, second = module.build(), module.build()
    randomize(first, 5)
    for i, v in enumerate(second.weights):
        v.assign(values[i])

    def no_links(source, target):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(writing.os, "link", no_links)  # writing.os is the os module: patched for the test only
    save_weights(first, out)
    save_weights(second, out)
    assert_clean_bundle(tmp_path / "out", "ckpt")
    assert leftovers(tmp_path / "out") == []
    assert same_values(values_at(module, out), values)


def test_writing_docstring_examples_run():
    import doctest

    result = doctest.testmod(writing)
    assert result.attempted > 0 and result.failed == 0
