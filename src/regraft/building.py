"""Build a model and load a checkpoint into it without drawing initial values the load overwrites.

Building a Keras model draws every variable's initial value (for a 1 GB
model, seconds of random numbers), and a load then overwrites most of them.
:func:`build_and_load` builds with zeros as placeholders, loads, and only then
runs the real initializer of each variable the load left fresh (an inserted
layer, a resized head): the result is the same as a normal build followed by
:func:`regraft.load`.
"""

from __future__ import annotations

from typing import Any, Callable

from regraft.api import load
from regraft.report import LoadReport
from regraft.targets import _compat

__all__ = ["build_and_load"]


def build_and_load(build: Callable[[], Any], path: str, **options: Any) -> tuple[Any, LoadReport]:
    """``model = build()``, then ``regraft.load(model, path, **options)``, without wasted initialisers.

    Variables the load writes start as zeros instead of drawing their initial
    values; every other variable then gets its real initializer, called exactly
    as Keras would have called it. Keras' random initializers draw their seed
    when the layer is created, so with ``keras.utils.set_random_seed`` (or
    seeded initializers) the fresh variables get the very values a normal build
    gives them. ``build`` must build the model (create its variables), for
    example by calling it on an example batch.

    Args:
        build: makes and builds the model.
        path: the checkpoint, as for :func:`regraft.load`.
        **options: :func:`regraft.load`'s keyword arguments (``strict``, ``rename``, ...).

    Returns:
        ``(model, report)``.

    Raises:
        RegraftError: as :func:`regraft.load`. The model is not returned then;
            every variable has its real initial value all the same.

    Example:
        >>> model, report = regraft.build_and_load(lambda: make_model(), "ckpts/run7")   # doctest: +SKIP
    """
    deferred: list[tuple[Any, Any]] = []
    with _compat.placeholder_initializers(lambda variable, initializer: deferred.append((variable, initializer))):
        model = build()
    written: set[int] = set()
    try:
        report = load(model, path, **options)
        written = {id(a.target.variable) for a in report.plan.assignments if a.writes}
    finally:
        for variable, initializer in deferred:
            if id(variable) not in written:
                variable.assign(initializer(variable.shape, dtype=variable.dtype))
    return model, report
