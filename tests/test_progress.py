"""The CLI progress bar: nothing for short loads or when stderr is not a terminal; tensors,
megabytes and rate otherwise."""

from __future__ import annotations

import doctest
import io

import regraft.cli.progress as progress
from regraft.cli.progress import MB, ProgressBar, progress_bar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_doctests():
    assert doctest.testmod(progress).failed == 0


def test_off_when_not_a_terminal_or_disabled():
    assert progress_bar(True, stream=io.StringIO()) is None
    assert progress_bar(False, stream=Terminal()) is None
    assert isinstance(progress_bar(True, stream=Terminal()), ProgressBar)


def test_a_load_under_a_second_draws_nothing():
    out = Terminal()
    times = iter([0.0, 0.2, 0.5, 0.9])
    bar = ProgressBar({"a": MB, "b": MB, "c": MB}, stream=out, clock=times.__next__)
    for i, key in enumerate("abc", start=1):
        bar(i, 3, key)
    assert out.getvalue() == ""


def test_a_long_load_shows_tensors_megabytes_and_rate():
    out = Terminal()
    times = iter([0.0, 0.5, 1.5, 1.55, 3.0])
    bar = ProgressBar({"a": 10 * MB, "b": 20 * MB, "c": 10 * MB, "d": 20 * MB}, stream=out, clock=times.__next__)
    for i, key in enumerate("abcd", start=1):
        bar(i, 4, key)
    assert out.getvalue() == (
        "\r\033[Kloading  50% [############............] 2/4 tensors  30/60 MB  20 MB/s"  # first draw after 1 s
        # the third call, 0.05 s later, is not redrawn
        "\r\033[Kchecked 4/4 tensors, 60 MB at 20 MB/s; assigning\n"
    )


def test_sizes_come_from_the_model():
    import keras

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="d")])
    bar = progress_bar(True, model, stream=Terminal())
    assert bar.sizes == {"d/kernel": 4 * 3 * 4, "d/bias": 3 * 4}


def test_the_commit_pass_is_drawn_with_its_own_counts_and_rate():
    """A .weights.h5 load reads its bytes in the commit pass: the bar goes on through it, counting
    again from its start, out of the bytes the check pass reported (a variable left fresh is not
    loaded), and ends with a line of its own."""
    out = Terminal()
    times = iter([0.0, 0.1, 0.2, 1.2, 1.7, 2.2])
    bar = ProgressBar({"a": 10 * MB, "b": 30 * MB, "fresh": 60 * MB}, stream=out, clock=times.__next__)
    bar(1, 2, "a")
    bar(2, 2, "b")  # the check pass took 0.2 s: nothing drawn
    bar.assigned(1, 2, "a")
    bar.assigned(2, 2, "b")
    assert out.getvalue() == (
        "\r\033[Kassigning  25% [############............] 1/2 tensors  10/40 MB  20 MB/s"
        "\r\033[Kassigned 2/2 tensors, 40 MB at 40 MB/s\n"
    )


def test_a_load_reports_each_assignment_and_ignores_a_display_that_fails(tmp_path):
    from conftest import build, save_h5

    import regraft

    old = build("functional", seed=60)
    path = save_h5(old, tmp_path / "old.weights.h5")
    model = build("functional", seed=61)
    checked, assigned = [], []

    class Display:
        def __call__(self, done, total, key):
            checked.append(done)

        def assigned(self, done, total, key):
            assigned.append((done, total, key))
            if done == 2:
                raise OSError(5, "terminal gone")

    report = regraft.load(model, path, progress=Display())
    assert report.counts()["loaded"] == 8
    assert checked == list(range(1, 9))
    assert assigned == [(1, 8, "d1/kernel"), (2, 8, "d1/bias")]  # not called after it failed
