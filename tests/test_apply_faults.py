"""All-or-nothing under interrupts and faults: a load either raises with every variable unchanged
or returns with every variable loaded, wherever Ctrl-C or an exception lands."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import warnings

import numpy as np
import pytest

import regraft
import regraft.applying as applying
from regraft.errors import LoadError

from conftest import assert_state, build, dense_chain, randomize, save_h5, save_tf, snapshot, value_of


@pytest.fixture(params=["tf", "h5"])
def saved(request, tmp_path):
    """(old model, checkpoint path) for a functional model saved in each format."""
    old = build("functional", seed=40)
    if request.param == "tf":
        return old, save_tf(tmp_path / "ckpt", model=old)
    return old, save_h5(old, tmp_path / "model.weights.h5")


HELD_BACK = (
    "regraft: interrupt received while the checked tensors were being assigned; "
    "the load was finished rather than left half-done."
)


def watch_assignments(monkeypatch, before=None, after=None):
    """Call ``before(key)`` and ``after(key)`` around each variable's assignment in the commit pass,
    whichever way the target assigns it (a value, or memory it fills)."""
    from regraft.targets.keras import KerasTarget

    for name in ("assign", "assign_filled"):
        real = getattr(KerasTarget, name)

        def wrapped(self, variable, value, _real=real):
            if before is not None:
                before(variable.key)
            _real(self, variable, value)
            if after is not None:
                after(variable.key)

        monkeypatch.setattr(KerasTarget, name, wrapped)


def io_error_at(n, first=None):
    """A ``before`` callback for :func:`watch_assignments`: the ``n``-th assignment raises
    ``OSError(EIO)`` (after calling ``first()``, if given) instead of running."""
    started = []

    def before(key):
        if len(started) == n - 1:
            if first is not None:
                first()
            raise OSError(5, "Input/output error")
        started.append(key)

    return before


def loaded_values(old, model) -> dict[int, np.ndarray]:
    return {id(t): value_of(s) for s, t in zip(old.weights, model.weights)}


def test_interrupt_at_every_call_of_the_load_leaves_nothing_half_done(saved):
    """SIGINT raised as the k-th Python function of regraft starts (function entry is where CPython
    runs signal handlers), for every k: the load either raises KeyboardInterrupt with the model
    unchanged, or finishes and returns with everything loaded."""
    old, path = saved
    model = build("functional", seed=41)
    plan = regraft.plan(model, path)
    package = os.path.dirname(applying.__file__)
    count = [0]
    fire_at = [-1]

    def tracer(frame, event, arg):
        if event == "call" and frame.f_code.co_filename.startswith(package):
            if count[0] == fire_at[0]:
                signal.raise_signal(signal.SIGINT)
            count[0] += 1
        return None

    sys.settrace(tracer)
    try:
        regraft.apply(plan, model)
    finally:
        sys.settrace(None)
    calls = count[0]
    assert calls > 50
    outcomes = {"interrupted": 0, "finished": 0}
    for k in range(calls):
        randomize(model, 100 + k)
        before = snapshot(model)
        count[0], fire_at[0] = 0, k
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                sys.settrace(tracer)
                try:
                    regraft.apply(plan, model)
                finally:
                    sys.settrace(None)
            except KeyboardInterrupt:
                outcomes["interrupted"] += 1
                assert_state(model, before)
                continue
        assert_state(model, before, loaded_values(old, model))
        # held back during the commit (and warned about), or, landing as the handler is put back, dropped
        assert [str(w.message) for w in caught] in ([], [HELD_BACK])
        outcomes["finished"] += 1
    assert outcomes["interrupted"] > 10 and outcomes["finished"] > 10, outcomes
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_interrupt_after_the_last_assignment_finishes_the_load(saved, monkeypatch):
    """Ctrl-C landing right after the last variable is assigned (where the old reader thread and
    journal were closed) returns with every variable loaded, and says the interrupt was held back."""
    old, path = saved
    model = build("functional", seed=42)
    before = snapshot(model)
    n = len(model.weights)
    calls = []

    def after(key):
        calls.append(key)
        if len(calls) == n:
            signal.raise_signal(signal.SIGINT)

    watch_assignments(monkeypatch, after=after)
    with pytest.warns(RuntimeWarning, match="the load was finished rather than left half-done"):
        report = regraft.load(model, path)
    assert len(calls) == n and report.counts()["loaded"] == n
    assert_state(model, before, loaded_values(old, model))


@pytest.mark.parametrize("raised", [KeyboardInterrupt, ValueError])
def test_progress_callback_raising_midway_changes_nothing(saved, raised):
    old, path = saved
    model = build("functional", seed=43)
    before = snapshot(model)
    seen = []

    def progress(done, total, key):
        seen.append((done, total))
        if done == 4:
            raise raised("stop")

    with pytest.raises(raised):
        regraft.load(model, path, progress=progress)
    assert seen == [(1, 8), (2, 8), (3, 8), (4, 8)]
    assert_state(model, before)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_no_undo_journal_is_written(saved, monkeypatch):
    """The journal whose own failed write raised OSError (disk full) is gone: a load writes no
    temporary file at all, so a full or read-only temp folder cannot break it."""
    old, path = saved

    def no_temp(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tempfile, "TemporaryFile", no_temp)
    monkeypatch.setattr(tempfile, "NamedTemporaryFile", no_temp)
    model = build("functional", seed=44)
    before = snapshot(model)
    report = regraft.load(model, path)
    assert report.counts()["loaded"] == 8
    assert_state(model, before, loaded_values(old, model))


def data_file(path: str) -> str:
    """The file holding the tensors' bytes: the .weights.h5 itself, or the TF bundle's data shard."""
    return path if path.endswith(".h5") else path + ".data-00000-of-00001"


def touch(path: str) -> None:
    """Rewrite ``path``'s modification time (one second later), as a writer rewriting it in place would."""
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


D1 = "'d1/kernel', 'd1/bias', 'bn/gamma'"
REST = "'bn/beta', 'bn/moving_mean', 'bn/moving_variance', 'd2/kernel' and 1 more"
RELOAD = ("it overwrites every variable the plan writes, so this model then ends up as if loaded once.")


def test_io_error_in_the_commit_names_what_was_assigned_and_how_to_recover(saved, monkeypatch):
    """The disk failing after the check pass (here as the 4th variable is assigned) cannot be undone
    without a second copy of the model; the error says exactly which variables hold new values."""
    old, path = saved
    model = build("functional", seed=45)
    before = snapshot(model)
    watch_assignments(monkeypatch, before=io_error_at(4))
    with pytest.raises(LoadError) as info:
        regraft.load(model, path)
    assert str(info.value) == (
        f"Loading {path} stopped after 3 of 8 variables were assigned, although every tensor had passed its "
        f"checks (OSError: [Errno 5] Input/output error). The model is now partly loaded (assigned {D1}; "
        f"not assigned {REST}).\n"
        f"Hint: Load again once the disk or device works: {RELOAD}"
    )
    loaded = loaded_values(old, model)
    assert_state(model, before, {k: v for k, v in loaded.items() if k in {id(w) for w in model.weights[:3]}})
    monkeypatch.undo()
    regraft.load(model, path)  # as the hint says: the second load finishes the first
    assert_state(model, before, loaded)


def test_failure_on_the_first_assignment_says_the_model_is_unchanged(saved, monkeypatch):
    old, path = saved
    model = build("functional", seed=46)
    before = snapshot(model)

    def fail(key):
        raise MemoryError("out of device memory")

    watch_assignments(monkeypatch, before=fail)
    with pytest.raises(LoadError) as info:
        regraft.load(model, path)
    assert str(info.value) == (
        f"Loading {path} stopped after 0 of 8 variables were assigned, although every tensor had passed its "
        "checks (MemoryError: out of device memory). Nothing was assigned: the model is unchanged.\n"
        "Hint: Load again once the disk or device works."
    )
    assert_state(model, before)


def test_checkpoint_truncated_during_the_check_pass_is_refused_with_nothing_assigned(saved):
    """A writer truncating the file while it is checked is caught from the file's size before the
    commit, where the model can still be left unchanged."""
    old, path = saved
    model = build("functional", seed=47)
    before = snapshot(model)
    data = data_file(path)
    size = os.path.getsize(data)

    def truncate(done, total, key):
        if done == total:
            os.truncate(data, size - 8)

    with pytest.raises(LoadError) as info:
        regraft.load(model, path, progress=truncate)
    assert str(info.value) == (
        f"The checkpoint {path} changed on disk while its tensors were being checked: {data} changed size "
        f"from {size:,} to {size - 8:,} bytes. Nothing was assigned: the model is unchanged.\n"
        "Hint: Load again once nothing writes to the checkpoint."
    )
    assert_state(model, before)


def test_checkpoint_replaced_during_the_check_pass_is_refused_with_nothing_assigned(saved, tmp_path):
    """An atomic replace (a new inode under the same name) would make TensorFlow's reader, which opens
    the path again in the commit, read bytes that were never checked: refused before the commit."""
    old, path = saved
    model = build("functional", seed=48)
    before = snapshot(model)
    data = data_file(path)

    def replace(done, total, key):
        if done == 1:
            copy = str(tmp_path / "copy")
            with open(data, "rb") as src, open(copy, "wb") as dst:
                dst.write(src.read())
            os.replace(copy, data)

    with pytest.raises(LoadError) as info:
        regraft.load(model, path, progress=replace)
    assert str(info.value) == (
        f"The checkpoint {path} changed on disk while its tensors were being checked: {data} was replaced "
        "by another file. Nothing was assigned: the model is unchanged.\n"
        "Hint: Load again once nothing writes to the checkpoint."
    )
    assert_state(model, before)


def test_checkpoint_rewritten_during_the_commit_is_named_even_when_every_assignment_succeeds(saved, monkeypatch):
    """Bytes rewritten in place during the commit may be assigned without any read failing (HDF5
    keeps no checksum): the file's changed modification time is reported after the last assignment."""
    old, path = saved
    model = build("functional", seed=49)
    before = snapshot(model)
    data = data_file(path)
    seen = []

    def rewrite_after_second(key):
        seen.append(key)
        if len(seen) == 2:
            touch(data)

    watch_assignments(monkeypatch, after=rewrite_after_second)
    with pytest.raises(LoadError) as info:
        regraft.load(model, path)
    assert str(info.value) == (
        f"Every variable was assigned from {path}, but it changed on disk during the load: {data} was "
        "rewritten (modification time changed). The model is now partly loaded (assigned 'd1/kernel', "
        "'d1/bias', 'bn/gamma', 'bn/beta' and 4 more).\n"
        f"Hint: Load again once nothing writes to the checkpoint: {RELOAD}"
    )
    assert_state(model, before, loaded_values(old, model))  # here the bytes did not change


def test_read_failing_after_the_file_changed_names_both(saved, monkeypatch):
    old, path = saved
    model = build("functional", seed=50)
    data = data_file(path)
    watch_assignments(monkeypatch, before=io_error_at(3, first=lambda: touch(data)))
    with pytest.raises(LoadError) as info:
        regraft.load(model, path)
    assert str(info.value) == (
        f"Loading {path} stopped after 2 of 8 variables were assigned, although every tensor had passed its "
        f"checks (OSError: [Errno 5] Input/output error): {data} was rewritten (modification time changed). "
        "The model is now partly loaded (assigned 'd1/kernel', 'd1/bias'; not assigned 'bn/gamma', 'bn/beta', "
        "'bn/moving_mean', 'bn/moving_variance' and 2 more).\n"
        f"Hint: Load again once nothing writes to the checkpoint: {RELOAD}"
    )


def test_partly_loaded_transformed_variable_asks_for_a_rebuilt_model(tmp_path, monkeypatch):
    """An ``overlay`` keeps the variable's fresh values outside the old block: once assigned, its
    fresh values are gone, so loading into the same model again would not repeat the first load."""
    old = dense_chain((4, 2))
    new = dense_chain((6, 2))
    path = save_tf(tmp_path / "ckpt", model=old)
    watch_assignments(monkeypatch, before=io_error_at(3))
    with pytest.raises(LoadError) as info:
        regraft.load(new, path, reshape="overlay")
    assert str(info.value).endswith(
        "Hint: Load again once the disk or device works, into a rebuilt model: 'dense1/kernel', 'dense1/bias' "
        "already hold values transformed from their fresh ones, so a second load into this model would not "
        "give the same result."
    ), str(info.value)

STRESS = textwrap.dedent(
    """
    import os, random, signal, sys, threading, time, warnings
    sys.path.insert(0, {tests!r})
    import numpy as np
    import regraft
    from conftest import build, randomize, save_tf, snapshot, value_of, same_bytes

    old = build("functional", seed=50)
    path = save_tf({folder!r} + "/ckpt", model=old)
    model = build("functional", seed=51)
    plan = regraft.plan(model, path)
    regraft.apply(plan, model)
    start = time.perf_counter(); regraft.apply(plan, model); duration = time.perf_counter() - start
    want = [value_of(v) for v in old.weights]
    rng = random.Random(7)
    counts = {{"interrupted": 0, "finished": 0, "bad": 0}}
    bad = []
    warnings.simplefilter("ignore")
    for trial in range({trials}):
        randomize(model, 1000 + trial)
        before = [value_of(v) for v in model.weights]
        timer = threading.Timer(rng.uniform(0, duration * 1.2), os.kill, (os.getpid(), signal.SIGINT))
        outcome = None
        try:
            timer.start()
            regraft.apply(plan, model)
            outcome = "finished"
        except KeyboardInterrupt:
            outcome = outcome or "interrupted"
        try:
            timer.join()
            time.sleep(0.002)
        except KeyboardInterrupt:
            pass  # fired after the load returned: not the load's business
        now = [value_of(v) for v in model.weights]
        as_loaded = sum(same_bytes(a, b) for a, b in zip(now, want))
        as_before = sum(same_bytes(a, b) for a, b in zip(now, before))
        whole = len(now)
        # A load that returned holds the checkpoint. An interrupted one holds the old values,
        # or all of the checkpoint when Ctrl-C surfaced after the load's last assignment (in
        # the bytecodes between regraft's handler being put back and this frame): never a mix.
        ok = as_loaded == whole if outcome == "finished" else whole in (as_loaded, as_before)
        counts[outcome if ok else "bad"] += 1
        if not ok:
            bad.append((trial, outcome, as_loaded, as_before, whole))
    print("bad trials (trial, outcome, as loaded, as before, variables):", bad)
    print(counts)
    """
)


def test_random_ctrl_c_during_loads_in_a_child_process(tmp_path):
    """SIGINT from another thread at random moments of 60 loads (a child process, so the test
    runner's own handler is not involved): never a half-loaded model."""
    tests = os.path.dirname(os.path.abspath(__file__))
    script = STRESS.format(tests=tests, folder=str(tmp_path), trials=60)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(tests, "..", "src"), tests]))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    counts = eval(done.stdout.strip().splitlines()[-1])
    assert counts["bad"] == 0, done.stdout[-3000:]
    assert counts["interrupted"] + counts["finished"] == 60


def test_a_load_on_another_thread_leaves_the_handler_alone(saved):
    import threading

    old, path = saved
    model = build("functional", seed=46)
    before = snapshot(model)
    results = []
    worker = threading.Thread(target=lambda: results.append(regraft.load(model, path)))
    worker.start()
    worker.join()
    assert results and results[0].counts()["loaded"] == 8
    assert_state(model, before, loaded_values(old, model))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
