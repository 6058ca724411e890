"""The public functions: open a checkpoint, preview a load, load."""

from __future__ import annotations

import os
from typing import Any, Iterable, Mapping

from regraft.apply import Progress, apply_plan, freeze_loaded
from regraft.errors import LoadError
from regraft.matching import make_plan, read_renames
from regraft.plan import Plan
from regraft.report import LoadReport
from regraft.sources import Source, open_source
from regraft.targets import describe

__all__ = ["open", "plan_load", "diff", "load"]

PathLike = str | os.PathLike[str]
Rename = Mapping[str, str] | PathLike | None


def open(path: PathLike) -> Source:  # noqa: A001 - the public verb is regraft.open
    """Open a checkpoint for its metadata; no tensor bytes are read until ``read(key)``.

    Example:
        >>> with regraft.open("ckpts/run7") as src:          # doctest: +SKIP
        ...     for e in src.entries(): print(e.key, e.shape, e.dtype, e.kind)
    """
    return open_source(path)


def plan_load(
    model: Any,
    source: Source,
    *,
    rename: Rename = None,
    allow_missing: Iterable[str] = (),
    allow_unused: Iterable[str] = (),
    root: str | None = None,
) -> Plan:
    """Decide what a load would do, from metadata only."""
    return make_plan(
        describe(model),
        source,
        rename=read_renames(rename),
        allow_missing=tuple(allow_missing),
        allow_unused=tuple(allow_unused),
        root=root,
    )


def diff(model: Any, path: PathLike, **options: Any) -> LoadReport:
    """What :func:`load` would do, without loading anything (a report with ``applied=False``).

    Takes the same keyword options as :func:`load` except ``strict`` and ``freeze``.
    """
    with open_source(path) as source:
        return LoadReport.build(plan_load(model, source, **options), None)


def load(
    model: Any,
    path: PathLike,
    *,
    rename: Rename = None,
    strict: bool = True,
    allow_missing: Iterable[str] = (),
    allow_unused: Iterable[str] = (),
    freeze: bool = False,
    root: str | None = None,
    progress: Progress | None = None,
) -> LoadReport:
    """Load a checkpoint into a (possibly changed) built Keras model.

    Args:
        model: the built Keras 3 model to load into.
        path: a TF checkpoint (prefix, ``.index``, or folder with a ``checkpoint``
            file), a Keras ``.weights.h5`` or a Keras 2 ``.h5`` file.
        rename: ``{old checkpoint key or "scope/": new model key or "scope/"}``, or
            a YAML file holding that mapping.
        strict: raise :class:`~regraft.errors.LoadError` before touching the model
            when anything is missing, unused or shape-mismatched (except what the
            allow patterns cover), listing every problem at once.
        allow_missing: glob patterns of model variables that may stay fresh.
        allow_unused: glob patterns of checkpoint tensors that may go unused.
        freeze: set ``trainable=False`` on every layer whose variables were all
            loaded unchanged.
        root: the saved object holding the model (``"model"``); chosen automatically.
        progress: called as ``progress(done, total, key)`` after each tensor.

    Returns:
        A :class:`LoadReport` with one status per variable.

    Raises:
        RegraftError: bad input; the model is unchanged whenever load raises.

    Example:
        >>> report = regraft.load(model, "ckpts/run7", strict=False)   # doctest: +SKIP
        >>> print(report.summary())                                    # doctest: +SKIP
        3 loaded, 0 shape-mismatch, 2 missing, 2 unused — 61.0% of parameters from the checkpoint
    """
    with open_source(path) as source:
        plan = plan_load(
            model, source, rename=rename, allow_missing=allow_missing, allow_unused=allow_unused, root=root
        )
        problems = plan.problems()
        if strict and problems:
            raise LoadError(
                f"Refusing to load {source.path} into model '{model.name}': "
                f"{len(problems)} problem{'s' if len(problems) > 1 else ''}; the model was not changed.\n  "
                + "\n  ".join(problems),
                problems,
                hint="Map renamed keys with rename=, allow expected gaps with allow_missing=/allow_unused=, "
                "or pass strict=False to load what matches and report the rest.",
            )
        applied = apply_plan(plan, source, progress)
    frozen = freeze_loaded(plan) if freeze else []
    return LoadReport.build(plan, applied, frozen)
