"""Key collapsing and pattern helpers, plus the runnable docstring examples of pure modules."""

from __future__ import annotations

import doctest

import pytest

from regraft import naming
from regraft.naming import collapse, matches_any


@pytest.mark.parametrize(
    "keys, expected",
    [
        (["block0/kernel", "block1/kernel", "block2/kernel"], ["block{0..2}/kernel"]),
        (["block0/kernel", "block2/kernel", "block5/kernel"], ["block{0,2,5}/kernel"]),
        ([f"block{i}/conv{j}/kernel" for i in range(12) for j in range(2)], ["block{0..11}/conv{0..1}/kernel"]),
        (["dense2/kernel", "dense2/bias"], ["dense2/{bias,kernel}"]),
        (["a/_operations/3/kernel", "a/_operations/5/kernel", "a/_operations/3/bias", "a/_operations/5/bias"],
         ["a/_operations/{3,5}/{bias,kernel}"]),
        (["head/bias"], ["head/bias"]),
        ([], []),
    ],
)
def test_collapse(keys, expected):
    assert collapse(keys) == expected


def test_matches_any_returns_the_first_matching_pattern():
    assert matches_any(["head/kernel", "x"], ["body/*", "head/*", "*"]) == "head/*"
    assert matches_any(["head/kernel"], ["body/*"]) is None


def test_docstring_examples():
    result = doctest.testmod(naming)
    assert result.attempted == 4 and result.failed == 0


@pytest.mark.parametrize("module", ["regraft.names", "regraft.keys", "regraft.align", "regraft.matching",
                                    "regraft.sources.tf_checkpoint", "regraft.sources.keras_h5"])
def test_matching_docstring_examples_run(module):
    import importlib

    result = doctest.testmod(importlib.import_module(module))
    assert result.attempted > 0 and result.failed == 0
