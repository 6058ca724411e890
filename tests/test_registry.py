"""The format seam: a new checkpoint format is one Source subclass plus its registration."""

from __future__ import annotations

import os

import numpy as np
import pytest

from conftest import assert_state, snapshot

import keras  # noqa: E402  (conftest set the TF log level first)

import regraft  # noqa: E402
from regraft.entries import SourceEntry  # noqa: E402
from regraft.sources import FORMATS, register_format  # noqa: E402
from regraft.sources.base import Source  # noqa: E402


class NpyFolder(Source):
    """A folder of .npy files, one per variable, '/' in a key written as '~': the whole format, for this test."""

    @classmethod
    def detect(cls, path: str) -> bool:
        return os.path.isdir(path) and any(f.endswith(".npy") for f in os.listdir(path))

    def __init__(self, path: str) -> None:
        self.format, self.namespace, self.files = "test-npy-folder", "name", (path,)
        self._files = {f[: -len(".npy")].replace("~", "/"): os.path.join(path, f)
                       for f in sorted(os.listdir(path)) if f.endswith(".npy")}
        arrays = {k: np.load(f, mmap_mode="r") for k, f in self._files.items()}  # headers only
        entries = [SourceEntry(k, tuple(a.shape), a.dtype.name, layer=k.rpartition("/")[0], role=k.rpartition("/")[2])
                   for k, a in arrays.items()]
        super().__init__(path, entries)

    def read(self, key: str) -> np.ndarray:
        return np.load(self._files[key])


def test_a_source_must_say_how_to_detect_and_read():
    class Half(Source):
        def read(self, key):
            return np.zeros(())

    with pytest.raises(TypeError, match="detect"):
        Half("x", [])


def test_a_registered_format_loads_into_a_changed_model(tmp_path):
    inputs = keras.Input((4,))
    x = keras.layers.Dense(3, name="enc")(inputs)
    old = keras.Model(inputs, keras.layers.Dense(2, name="head")(x))
    arrays = {f"{v.path}": np.random.default_rng(i).standard_normal(v.shape).astype("float32")
              for i, v in enumerate(old.weights)}
    path = str(tmp_path / "old")
    os.mkdir(path)
    for key, value in arrays.items():
        np.save(os.path.join(path, key.replace("/", "~") + ".npy"), value)
    inputs = keras.Input((4,))
    x = keras.layers.Dense(3, name="enc")(inputs)
    x = keras.layers.Dense(3, name="inserted")(x)
    new = keras.Model(inputs, keras.layers.Dense(2, name="head")(x))
    before = snapshot(new)
    register_format(NpyFolder)
    try:
        report = regraft.load(new, path, strict=False)
    finally:
        FORMATS.remove(NpyFolder)
    assert report.plan.source_format == "test-npy-folder"
    loaded = {id(v): arrays[k] for k in arrays for v in new.weights if v.path == k}
    assert len(loaded) == 4
    assert_state(new, before, loaded)
    assert {a.target.key: a.status for a in report.plan.assignments if a.target.layer == "inserted"} == {
        "inserted/kernel": "missing", "inserted/bias": "missing"}


def test_applying_goes_through_the_target_protocol(tmp_path):
    """Loading reads and assigns only through a Target: a recording wrapper sees every write."""
    from regraft.applying import apply
    from regraft.targets import KerasTarget, Target, target_for

    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2, name="head")(keras.layers.Dense(3, name="enc")(inputs)))
    path = str(tmp_path / "m.weights.h5")
    model.save_weights(path)

    class Recording(KerasTarget):
        def __init__(self, m):
            super().__init__(m)
            self.assigned = []

        def assign(self, variable, value):
            self.assigned.append(variable.key)
            super().assign(variable, value)

        def assign_filled(self, variable, fill):
            self.assigned.append(variable.key)
            super().assign_filled(variable, fill)

    target = Recording(model)
    assert isinstance(target, Target) and target_for(target) is target
    apply(regraft.plan(model, path), target)
    assert target.assigned == ["enc/kernel", "enc/bias", "head/kernel", "head/bias"]
