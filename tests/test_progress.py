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
