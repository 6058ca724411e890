"""Checkpoints written by TensorFlow, for the tests that load them on another Keras backend.

A machine with the JAX (or PyTorch) backend and no TensorFlow cannot write a TF
checkpoint, and regraft ships no test files. So the checkpoints are written by
the real writers in an environment that has TensorFlow, into a folder the other
environment then reads (``make test-jax`` does both):

    KERAS_BACKEND=tensorflow python tests/backend_cases.py OUT_DIR    # the TF environment
    REGRAFT_TF_FILES=OUT_DIR KERAS_BACKEND=jax pytest tests/test_backends.py

For each case (:data:`CASES`) the folder gets ``<case>/ckpt*`` (``tf.train.Checkpoint(model=old)``),
``<case>/old.weights.h5`` (``old.save_weights``) and ``<case>/values.npz``: every old
variable's value under its ``variable.path`` (written by numpy, so a test compares
what it loaded with values regraft did not read). Under the TF backend the tests
call :func:`write_case` themselves.

For the optimizer-state tests, each of :data:`TRAINED` is a small model trained a few
steps by a Keras 3 optimizer on TensorFlow: ``trained_<name>/ckpt*``
(``tf.train.Checkpoint(model=, optimizer=)``), ``trained_<name>/old.keras`` (``model.save``
after compiling with that optimizer) and ``trained_<name>/state.npz`` (every model
weight by position, every slot by list and variable position, the step count), from
which another backend rebuilds the old model *and its optimizer* without regraft
(:func:`restore_trained`) and takes the old model's next step itself.

Models come from ``conftest.build`` and friends, built after ``clear_session()`` so
auto-generated names, and so ``variable.path``, are the same in both processes.

Any test can declare its own TF-written files the same way: a module-level function
``write(folder)`` decorated with :func:`tf_writer` writes them (building its own seeded
models), and the test asks the ``tf_written`` fixture (conftest) for the folder. On the
TF backend the fixture calls ``write`` in-process; with ``REGRAFT_TF_FILES`` it returns
``OUT_DIR/written/<module>.<function>``, which :func:`main` filled by importing each
test module that declares writers and calling them. The test rebuilds the old model on its own
backend (the same seeded values) or reads the values the writer saved beside the files.
"""

from __future__ import annotations

import glob
import importlib
import os
import sys
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import conftest  # noqa: E402


def _fresh(builder: Callable[[], object]) -> Callable[[], object]:
    def build():
        import keras

        keras.backend.clear_session()
        return builder()

    return build


def _functional_inserted():
    """``functional()`` with a Dense(4) named ``extra`` inserted between ``bn`` and ``d2``."""
    import keras

    inputs = keras.Input((5,))
    x = keras.layers.Dense(4, name="d1")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.Dense(4, name="extra")(x)
    return keras.Model(inputs, keras.layers.Dense(2, name="d2")(x), name="functional_model")


def _functional_seeded():
    model = conftest.functional()
    conftest.randomize(model, 3)
    return model


def _chain_grown():
    model = conftest.dense_chain((4, 2, 2))
    conftest.randomize(model, 4)
    return model


def _chain_old():
    model = conftest.dense_chain((4, 2))
    conftest.randomize(model, 5)
    return model


SHARDED_UNITS = (64, 512, 256, 64)  # inputs, d1, d2, head: every width divides by 8 devices


def sharded_mlp(units: tuple[int, ...] = SHARDED_UNITS, dtype: str | None = None, insert: bool = False):
    """``Input -> d1 -> d2 [-> extra] -> head`` (Dense layers), wide enough that a device's block is many pages.

    tests/test_sharded.py builds it again inside a ``keras.distribution`` scope.
    """
    import keras

    kw = {"dtype": dtype} if dtype else {}
    inputs = keras.Input((units[0],))
    x = keras.layers.Dense(units[1], name="d1", **kw)(inputs)
    x = keras.layers.Dense(units[2], name="d2", **kw)(x)
    if insert:
        x = keras.layers.Dense(units[2], name="extra", **kw)(x)
    return keras.Model(inputs, keras.layers.Dense(units[3], name="head", **kw)(x), name="sharded_mlp")


def _sharded_old():
    """:func:`sharded_mlp` with random values, and one that does not fit float16 in its last tensor."""
    model = sharded_mlp()
    conftest.randomize(model, 6)
    bias = model.get_layer("head").bias
    bias.assign(np.where(np.arange(bias.shape[0]) == 3, 1e6, np.asarray(bias.numpy())).astype("float32"))
    return model


@dataclass(frozen=True)
class Case:
    """An old model written by TF, a new model to load into, and which old variable each new one gets."""

    name: str
    build_old: Callable[[], object]
    build_new: Callable[[], object]
    # new variable path -> old variable path; None means "left fresh". Empty: same paths (unchanged model).
    expected: dict[str, str | None] = field(default_factory=dict)
    strict: bool = True
    safetensors: bool = False  # also write old.safetensors (the safetensors package; the JAX stage lacks it)


CASES: tuple[Case, ...] = tuple(
    Case(kind, _fresh(lambda kind=kind: conftest.build(kind, 1)), _fresh(lambda kind=kind: conftest.build(kind, 2)))
    for kind in conftest.ARCHITECTURES
) + (
    Case("functional_inserted", _fresh(_functional_seeded), _fresh(_functional_inserted),
         {"d1/kernel": "d1/kernel", "d1/bias": "d1/bias", "bn/gamma": "bn/gamma", "bn/beta": "bn/beta",
          "bn/moving_mean": "bn/moving_mean", "bn/moving_variance": "bn/moving_variance",
          "extra/kernel": None, "extra/bias": None, "d2/kernel": "d2/kernel", "d2/bias": "d2/bias"},
         strict=False),
    Case("subclassed_grown", _fresh(_chain_old), _fresh(_chain_grown),
         {"tutorial/dense1/kernel": "tutorial/dense1/kernel", "tutorial/dense1/bias": "tutorial/dense1/bias",
          "tutorial/dense2/kernel": "tutorial/dense2/kernel", "tutorial/dense2/bias": "tutorial/dense2/bias",
          "tutorial/dense3/kernel": None, "tutorial/dense3/bias": None},
         strict=False),
    Case("sharded_mlp", _fresh(_sharded_old), _fresh(sharded_mlp), safetensors=True),
)


def write_case(case: Case, folder: str) -> None:
    """Write ``case``'s old model as a TF checkpoint, a .weights.h5 file and its values (TF backend only)."""
    import tensorflow as tf

    os.makedirs(folder, exist_ok=True)
    old = case.build_old()
    tf.train.Checkpoint(model=old).write(os.path.join(folder, "ckpt"))
    old.save_weights(os.path.join(folder, "old.weights.h5"))
    np.savez(os.path.join(folder, "values.npz"), **{v.path: np.asarray(v.numpy()) for v in old.weights})
    if case.safetensors:
        from safetensors.numpy import save_file

        save_file({v.path: np.asarray(v.numpy()) for v in old.weights}, os.path.join(folder, "old.safetensors"))


WRITERS: dict[str, Callable[[str], None]] = {}


def writer_key(write: Callable[[str], None]) -> str:
    return f"{write.__module__}.{write.__name__}"


def tf_writer(write: Callable[[str], None]) -> Callable[[str], None]:
    """Declare ``write(folder)`` as writing, with TensorFlow, files that tests on every backend read.

    ``write`` builds its own models (deterministically: it runs after ``clear_session()``)
    and writes into ``folder``, which exists. A stage without TensorFlow reads what
    :func:`main` wrote in the TF environment; see the module docstring.
    """
    WRITERS[writer_key(write)] = write
    return write


def written_folder(write: Callable[[str], None], scratch: Callable[[str], str]) -> str:
    """The folder holding ``write``'s files: ``REGRAFT_TF_FILES/written/<key>``, or written here (TF backend).

    ``scratch(name)`` makes a new empty folder (``tmp_path_factory.mktemp``). Raises
    :class:`LookupError` when the files cannot be had: no ``REGRAFT_TF_FILES`` and no TensorFlow backend.
    """
    key = writer_key(write)
    root = os.environ.get("REGRAFT_TF_FILES")
    if root:
        folder = os.path.join(root, "written", key)
        if not os.path.exists(os.path.join(folder, ".done")):
            raise FileNotFoundError(f"REGRAFT_TF_FILES={root} lacks {key}'s files: run tests/backend_cases.py again")
        return folder
    import keras

    if keras.backend.backend() != "tensorflow":
        raise LookupError("needs files written by TensorFlow: set REGRAFT_TF_FILES (make test-jax does)")
    folder = scratch(key)
    _write(write, folder)
    return folder


def _write(write: Callable[[str], None], folder: str) -> None:
    import keras

    os.makedirs(folder, exist_ok=True)
    keras.backend.clear_session()
    write(folder)
    open(os.path.join(folder, ".done"), "w").close()


def write_declared(out_dir: str) -> int:
    """Import every test module that declares writers (its text holds ``@tf_writer``) and call each writer."""
    here = os.path.dirname(os.path.abspath(__file__))
    for path in sorted(glob.glob(os.path.join(here, "test_*.py"))):
        with open(path, encoding="utf-8") as f:
            if "@tf_writer" in f.read():
                importlib.import_module(os.path.splitext(os.path.basename(path))[0])
    for key, write in sorted(WRITERS.items()):
        _write(write, os.path.join(out_dir, "written", key))
    return len(WRITERS)


# --------------------------------------------------------------------------- trained models with optimizer state

X3 = np.random.default_rng(0).normal(size=(16, 3)).astype("float32")
Y2 = np.random.default_rng(1).normal(size=(16, 2)).astype("float32")

OPTIMIZERS: dict[str, Callable[[], object]] = {
    "adam": lambda: __import__("keras").optimizers.Adam(0.01),
    "sgd_momentum": lambda: __import__("keras").optimizers.SGD(0.01, momentum=0.9),
    "rmsprop_centered": lambda: __import__("keras").optimizers.RMSprop(0.01, momentum=0.5, centered=True),
    "nadam": lambda: __import__("keras").optimizers.Nadam(0.01),  # its step reads a scalar, _u_product
    # Adam wrapped for mixed precision: its loss scale doubles every 2 finite steps (1024 -> 4096 in 5 steps).
    "loss_scale_adam": lambda: __import__("keras").optimizers.LossScaleOptimizer(
        __import__("keras").optimizers.Adam(0.01), initial_scale=1024.0, dynamic_growth_steps=2),
}


def optimizer_model(width: int = 4, insert: bool = False, widths: tuple[int, ...] = ()) -> object:
    """``Input(3) -> Dense(width, relu) 'd1' [-> Dense(width) 'ins'] -> Dense(2) 'd2'``; with ``widths``
    ``(w1, w2)``: ``d1`` (relu, w1) -> ``d2`` (tanh, w2) -> ``d3`` (2)."""
    import keras

    if widths:
        return keras.Sequential([keras.Input((3,)), keras.layers.Dense(widths[0], activation="relu", name="d1"),
                                 keras.layers.Dense(widths[1], activation="tanh", name="d2"),
                                 keras.layers.Dense(2, name="d3")])
    layers = [keras.Input((3,)), keras.layers.Dense(width, activation="relu", name="d1")]
    if insert:
        layers.append(keras.layers.Dense(width, name="ins"))
    layers.append(keras.layers.Dense(2, name="d2"))
    return keras.Sequential(layers)


def gradients(model) -> list:
    """The gradients of the mean squared error on the fixed batch, on this backend (TensorFlow, JAX or PyTorch)."""
    import keras

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(X3) - Y2))
        return tape.gradient(loss, model.trainable_variables)
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        non_trainable = [v.value for v in model.non_trainable_variables]

        def loss(values):
            outputs, _ = model.stateless_call(values, non_trainable, X3)
            return jnp.mean(jnp.square(outputs - Y2))

        return jax.grad(loss)([v.value for v in model.trainable_variables])
    if backend == "torch":  # as Keras' torch trainer does: backward() fills each parameter's .grad
        import torch

        trainable = model.trainable_variables
        for v in trainable:
            v.value.grad = None
        torch.mean(torch.square(model(X3) - torch.as_tensor(Y2))).backward()
        return [v.value.grad for v in trainable]
    raise NotImplementedError(f"no gradient helper for the {backend} backend")


def train_step(model, optimizer) -> None:
    """One training step on the fixed batch: the same ops for every model of one backend.

    On JAX through ``stateless_apply``, as Keras' JAX trainer does (a ``LossScaleOptimizer``'s
    eager ``apply`` leaks tracers from its ``cond`` there)."""
    import keras

    grads = gradients(model)
    if keras.backend.backend() != "jax":
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return
    trainable = model.trainable_variables
    if not optimizer.built:
        optimizer.build(trainable)
    new_trainable, new_optimizer = optimizer.stateless_apply(
        [v.value for v in optimizer.variables], grads, [v.value for v in trainable])
    for variable, value in zip((*trainable, *optimizer.variables), (*new_trainable, *new_optimizer)):
        variable.assign(value)


@dataclass(frozen=True)
class Trained:
    """A model of :func:`optimizer_model` trained ``steps`` steps by ``OPTIMIZERS[optimizer]``."""

    name: str
    optimizer: str
    steps: int = 5
    widths: tuple[int, ...] = ()

    def build(self):
        return optimizer_model(widths=self.widths)


TRAINED: tuple[Trained, ...] = tuple(Trained(f"trained_{name}", name) for name in OPTIMIZERS) + (
    Trained("trained_adam_3layer", "adam", steps=4, widths=(4, 3)),
)


def train(case: Trained):
    """``case``'s model and optimizer after ``case.steps`` steps on this backend (seeded: the same every run)."""
    import keras

    keras.utils.set_random_seed(7)
    model, optimizer = case.build(), OPTIMIZERS[case.optimizer]()
    for _ in range(case.steps):
        train_step(model, optimizer)
    return model, optimizer


def optimizer_state(model, optimizer) -> dict[str, np.ndarray]:
    """Every weight (``w/<i>``, by position in ``model.weights``), every slot (``<list>/<i>``, by position in
    ``model.trainable_variables``), ``iterations`` and a loss scale's ``scale/<name>``, as numpy arrays."""
    from regraft.targets import _compat

    variables, lists = _compat.optimizer_slot_lists(_compat.slot_holder(optimizer))
    assert [id(v) for v in variables] == [id(v) for v in model.trainable_variables]
    out = {f"w/{i}": np.asarray(v.numpy()) for i, v in enumerate(model.weights)}
    out.update({f"{name}/{i}": np.asarray(s.numpy()) for name, items in lists.items() for i, s in enumerate(items)})
    out["iterations"] = np.asarray(optimizer.iterations.numpy())
    out.update({f"scale/{name}": np.asarray(v.numpy()) for name, v in _compat.loss_scale_variables(optimizer).items()})
    out.update({f"scalar/{name}": np.asarray(v.numpy()) for name, v in _compat.optimizer_scalars(optimizer).items()})
    return out


def write_trained(case: Trained, folder: str):
    """Train ``case`` on TensorFlow, write ``ckpt*``, ``old.keras`` and ``state.npz`` into ``folder``; the model
    and optimizer."""
    import tensorflow as tf

    os.makedirs(folder, exist_ok=True)
    model, optimizer = train(case)
    tf.train.Checkpoint(model=model, optimizer=optimizer).write(os.path.join(folder, "ckpt"))
    model.compile(optimizer=optimizer, loss="mse")
    model.save(os.path.join(folder, "old.keras"))  # optimizer/vars/N, in optimizer.variables order
    np.savez(os.path.join(folder, "state.npz"), **optimizer_state(model, optimizer))
    return model, optimizer


def restore_trained(case: Trained, folder: str):
    """The old model and optimizer of ``case`` on this backend, set from ``state.npz`` (regraft reads nothing)."""
    from regraft.targets import _compat

    state = dict(np.load(os.path.join(folder, "state.npz")))
    model, optimizer = case.build(), OPTIMIZERS[case.optimizer]()
    optimizer.build(model.trainable_variables)
    for i, v in enumerate(model.weights):
        v.assign(state[f"w/{i}"])
    _, lists = _compat.optimizer_slot_lists(_compat.slot_holder(optimizer))
    for name, items in lists.items():
        for i, slot in enumerate(items):
            slot.assign(state[f"{name}/{i}"])
    optimizer.iterations.assign(state["iterations"].astype(str(optimizer.iterations.dtype)))
    for name, v in _compat.loss_scale_variables(optimizer).items():
        v.assign(state[f"scale/{name}"].astype(str(v.dtype)))
    for name, v in _compat.optimizer_scalars(optimizer).items():
        v.assign(state[f"scalar/{name}"].astype(str(v.dtype)))
    return model, optimizer


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(f"usage: {sys.argv[0]} OUT_DIR", file=sys.stderr)
        return 2
    import keras

    if keras.backend.backend() != "tensorflow":
        print(f"writing TF checkpoints needs KERAS_BACKEND=tensorflow, not {keras.backend.backend()}", file=sys.stderr)
        return 2
    for case in CASES:
        write_case(case, os.path.join(argv[0], case.name))
    for trained in TRAINED:
        write_trained(trained, os.path.join(argv[0], trained.name))
    declared = write_declared(argv[0])
    print(f"wrote {len(CASES) + len(TRAINED)} cases and the files of {declared} declared writers to {argv[0]}")
    return 0


if __name__ == "__main__":  # through the module the tests import, whose WRITERS they fill
    raise SystemExit(importlib.import_module("backend_cases").main(sys.argv[1:]))
