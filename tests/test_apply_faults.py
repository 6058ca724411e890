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

from conftest import assert_state, build, randomize, save_h5, save_tf, snapshot, value_of


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
    from regraft.targets.keras import KerasTarget

    n = len(model.weights)
    calls = []
    real_assign = KerasTarget.assign

    def assign(self, variable, value):
        real_assign(self, variable, value)
        calls.append(variable.key)
        if len(calls) == n:
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(KerasTarget, "assign", assign)
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


def test_failure_in_the_commit_pass_says_the_model_is_partly_loaded(saved, monkeypatch):
    """Data cannot fail after the check pass; if the environment does (the file rewritten in place,
    the disk failing), the error says so plainly instead of claiming the model is unchanged."""
    old, path = saved
    model = build("functional", seed=45)
    from regraft.targets.keras import KerasTarget

    real_assign = KerasTarget.assign
    calls = []

    def assign(self, variable, value):
        if len(calls) == 3:
            raise OSError(5, "Input/output error")
        calls.append(variable.key)
        real_assign(self, variable, value)

    monkeypatch.setattr(KerasTarget, "assign", assign)
    with pytest.raises(LoadError) as info:
        regraft.load(model, path)
    assert str(info.value) == (
        f"Loading {path} stopped after 3 of 8 variables were assigned, although every tensor had passed "
        "its checks: [Errno 5] Input/output error. The model is now partly loaded.\n"
        "Hint: The checkpoint was probably changed on disk during the load, or the disk failed. "
        "Rebuild the model (or load its previous weights) and load again."
    )


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
        expected = want if outcome == "finished" else before
        ok = all(same_bytes(a, b) for a, b in zip(now, expected))
        counts[outcome if ok else "bad"] += 1
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
    assert counts["bad"] == 0, counts
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
