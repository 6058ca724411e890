"""The public functions: open a checkpoint, plan a load, preview it, load."""

from __future__ import annotations

import os
import warnings
from typing import Any, Iterable, Mapping

from regraft.applying import Progress, apply, interrupts_held
from regraft.errors import LoadError
from regraft.matching import make_plan
from regraft.optimizer_state import with_optimizer
from regraft.plans import Plan
from regraft.report import LoadReport
from regraft.rules import parse_rules
from regraft.sources import Source, open_source, without_gc
from regraft.targets import target_for

__all__ = ["open", "plan", "diff", "load", "convert"]

PathLike = str | os.PathLike[str]
Rules = Mapping[str, Any] | list[Any] | PathLike | None


def open(path: PathLike, *, allow_outside_state: bool = False) -> Source:  # noqa: A001 - the verb is regraft.open
    """Open a checkpoint for its metadata; no tensor bytes are read until ``read(key)``.

    A folder's ``checkpoint`` state file that names a checkpoint outside the folder
    is refused unless ``allow_outside_state=True`` (then a warning names what was opened).

    Example:
        >>> with regraft.open("ckpts/run7") as src:          # doctest: +SKIP
        ...     for e in src.entries(): print(e.key, e.shape, e.dtype, e.kind)
    """
    with without_gc():
        return open_source(path, allow_outside_state=allow_outside_state)


def plan(
    model: Any,
    source: PathLike | Source,
    *,
    rules: Rules = None,
    rename: Mapping[str, str] | PathLike | None = None,
    allow_missing: Iterable[str] = (),
    allow_unused: Iterable[str] = (),
    root: str | None = None,
    reshape: str = "error",
    noise: float = 0.0,
    accept_order: bool = False,
    allow_outside_state: bool = False,
    optimizer: Any = None,
) -> Plan:
    """Decide what each variable of ``model`` takes from the checkpoint, from metadata only.

    Args:
        model: the built Keras 3 model to load into.
        source: a checkpoint path, or a :class:`Source` from :func:`open`.
        rules: rename/init/ignore/transform rules, as a dict, a list or a YAML file (see
            :mod:`regraft.rules`).
        rename: shorthand for ``rules={"rename": rename}``: old checkpoint key
            (or ``"scope/"``) → new model key, or a YAML file of that mapping.
        allow_missing: glob patterns of model variables that may stay fresh.
        allow_unused: glob patterns of checkpoint tensors that may go unused.
        root: the saved object holding the model (``"model"``); chosen automatically.
        reshape: what to do with a matched tensor of another shape: ``"error"``
            (a strict problem; left fresh otherwise), ``"fresh"`` (left fresh on
            purpose), ``"overlay"`` (old values where the shapes overlap) or
            ``"preserve"`` (function-preserving growth: widen, identity for
            inserted layers; see :mod:`regraft.growth`).
        noise: for ``preserve``, relative noise added to widened copies to break
            their symmetry (0: exact).
        accept_order: load pairings that only order supports (a tie among alike
            layers with no names to tell them apart: VGG16 → VGG19 saved without
            names). By default they are ``unconfirmed``: proposed, left fresh,
            and a strict problem.
        allow_outside_state: follow a folder's ``checkpoint`` state file that names a
            checkpoint outside the folder (see :func:`open`).
        optimizer: a Keras 3 optimizer whose slots and step count the plan also decides
            (see :func:`load`); a saved plan carries them in its ``optimizer`` section.

    Returns:
        An immutable :class:`Plan`; print it, save it (:func:`regraft.save_plan`), or
        apply it (:func:`regraft.apply`).

    Example:
        >>> p = regraft.plan(new_model, "ckpts/run7")   # doctest: +SKIP
        >>> print(p); regraft.save_plan(p, "plan.yaml")  # doctest: +SKIP
    """
    if isinstance(source, Source):
        return _with_optimizer(
            _plan(model, source, rules, rename, allow_missing, allow_unused, root, reshape, noise, accept_order),
            model, source, optimizer)
    with without_gc():
        opened = open_source(source, allow_outside_state=allow_outside_state)
    with opened:
        return _with_optimizer(
            _plan(model, opened, rules, rename, allow_missing, allow_unused, root, reshape, noise, accept_order),
            model, opened, optimizer)


def _with_optimizer(the_plan: Plan, model: Any, source: Source, optimizer: Any) -> Plan:
    """``the_plan`` with the optimizer's slots and step count (:mod:`regraft.optimizer_state`), if one is given."""
    if optimizer is None:
        return the_plan
    return with_optimizer(the_plan, optimizer, model.trainable_variables, getattr(source, "config", None))


def _plan(model: Any, source: Source, rules: Rules, rename: Any, allow_missing: Iterable[str],
          allow_unused: Iterable[str], root: str | None, reshape: str = "error", noise: float = 0.0,
          accept_order: bool = False) -> Plan:
    with without_gc():
        return _make(model, source, rules, rename, allow_missing, allow_unused, root, reshape, noise, accept_order)


def _make(model: Any, source: Source, rules: Rules, rename: Any, allow_missing: Iterable[str],
          allow_unused: Iterable[str], root: str | None, reshape: str, noise: float, accept_order: bool) -> Plan:
    target = target_for(model)
    targets, layers = target.describe((source.namespace,))
    return make_plan(
        targets,
        source,
        target_layers=layers.get(source.namespace),
        rules=parse_rules(rules, rename=rename),
        allow_missing=tuple(allow_missing),
        allow_unused=tuple(allow_unused),
        root=root,
        model_name=target.name,
        reshape=reshape,
        graph=target.layer_graph() if reshape == "preserve" else None,
        noise=noise,
        accept_order=accept_order,
        model_classes=target.layer_classes(),
    )


def diff(model: Any, path: PathLike, **options: Any) -> LoadReport:
    """What :func:`load` would do, without loading anything (a report with ``applied=False``).

    Takes the same keyword options as :func:`plan` (``optimizer=`` included: the report's
    optimizer section then says what each slot would get).
    """
    return LoadReport.build(plan(model, path, **options), None)


def load(
    model: Any,
    path: PathLike,
    *,
    rules: Rules = None,
    rename: Mapping[str, str] | PathLike | None = None,
    strict: bool = True,
    allow_missing: Iterable[str] = (),
    allow_unused: Iterable[str] = (),
    freeze: bool = False,
    root: str | None = None,
    reshape: str = "error",
    noise: float = 0.0,
    accept_order: bool = False,
    progress: Progress | None = None,
    allow_outside_state: bool = False,
    optimizer: Any = None,
    full_checksums: bool = False,
) -> LoadReport:
    """Load a checkpoint into a (possibly changed) built Keras model: :func:`plan`, then apply.

    Args:
        model: the built Keras 3 model to load into.
        path: a TF checkpoint (prefix, ``.index``, or folder with a ``checkpoint``
            file), a Keras ``.weights.h5`` or a Keras 2 ``.h5`` file.
        rules, rename, allow_missing, allow_unused, root, reshape, noise, accept_order, allow_outside_state:
            as for :func:`plan`.
        strict: raise :class:`~regraft.errors.LoadError` before touching the model
            when anything is missing, unused, ambiguous or shape-mismatched, or a
            rule matched nothing (except what the allow patterns cover), listing
            every problem at once.
        freeze: set ``trainable=False`` on every layer whose variables were all
            loaded unchanged (a layer with a transformed variable stays trainable).
        progress: called as ``progress(done, total, key)`` after each tensor.
        optimizer: a Keras 3 optimizer (built here for the model's trainable variables if it
            is not built) whose slots follow their variables: each slot gets its variable's
            transform (mapped for Net2Net widening), fresh variables get fresh slots, and the
            step count is carried; see :mod:`regraft.optimizer_state`. Loaded all-or-nothing
            with the model; the report's ``optimizer`` section says what each slot got. A
            loaded variable whose slots the checkpoint lacks is a strict problem. An unbuilt
            optimizer is built even when the load is then refused.
        full_checksums: for a model laid out over several devices (Keras 3 on JAX with
            ``keras.distribution``), whose variables are read block by block, also checksum
            each TF-bundle or ``.npz`` tensor whole first (block reads cannot verify a
            checksum that covers the whole tensor); see docs/multihost.md.

    Returns:
        A :class:`LoadReport` with one status per variable.

    Raises:
        RegraftError: bad input; the model is unchanged whenever load raises.

    Example:
        >>> report = regraft.load(model, "ckpts/run7", strict=False)   # doctest: +SKIP
        >>> print(report.summary())                                    # doctest: +SKIP
        3 loaded, 0 shape-mismatch, 2 missing, 2 unused — 61.0% of parameters from the checkpoint
    """
    with without_gc():
        source = open_source(path, allow_outside_state=allow_outside_state)
    with interrupts_held(), source:  # Ctrl-C after the first assignment is held back until load returns
        the_plan = _plan(model, source, rules, rename, allow_missing, allow_unused, root, reshape, noise, accept_order)
        the_plan = _with_optimizer(the_plan, model, source, optimizer)
        _refuse_if_strict(the_plan, source.path, f"model '{model.name}'", strict)
        return apply(the_plan, model, source, freeze=freeze, progress=progress,  # the source it was made from
                     full_checksums=full_checksums)


_STRICT_HINT = ("Map renamed keys with rename=, allow expected gaps with allow_missing=/allow_unused=, confirm "
                "placements by order with accept_order=True, or pass strict=False to load what matches and report "
                "the rest.")


def _refuse_if_strict(the_plan: Plan, source_path: str, into: str, strict: bool,
                      unchanged: str = "the model was not changed") -> None:
    """Raise the strict refusal listing every problem (``strict``); warn about rules that matched nothing."""
    problems = the_plan.problems()
    if strict and problems:
        raise LoadError(
            f"Refusing to load {source_path} into {into}: "
            f"{len(problems)} problem{'s' if len(problems) > 1 else ''}; {unchanged}.\n  "
            + "\n  ".join(problems),
            problems,
            hint=_STRICT_HINT,
        )
    for rule in the_plan.unused_rules():
        warnings.warn(f"regraft: {rule} matched nothing", stacklevel=3)


def convert(
    path: PathLike,
    like: PathLike,
    out: PathLike,
    *,
    rules: Rules = None,
    rename: Mapping[str, str] | PathLike | None = None,
    strict: bool = True,
    allow_missing: Iterable[str] = (),
    allow_unused: Iterable[str] = (),
    root: str | None = None,
    reshape: str = "error",
    accept_order: bool = False,
    progress: Progress | None = None,
    allow_outside_state: bool = False,
) -> LoadReport:
    """Convert a checkpoint into the layout of a weights file of the new model, with no model code.

    The new model's structure (keys, shapes, dtypes, recorded layer names) is read
    from ``like``, a weights file of the new model; matching is the same as
    :func:`load`'s, and refuses the same things (order-only pairings stay
    ``unconfirmed`` unless ``accept_order``). Variables nothing is loaded into keep
    their values in ``like``. ``out`` is written atomically in the format its
    extension names (see :class:`regraft.targets.file.FileTarget`).

    Args:
        path: the old checkpoint.
        like: a weights file of the new model, in the same key namespace as ``path``
            (``.weights.h5``, ``.keras`` and sharded Keras weights share one; TF
            checkpoints and SavedModels another).
        out: the file (or TF checkpoint prefix) to write.
        rules, rename, allow_missing, allow_unused, root, accept_order, allow_outside_state, progress:
            as for :func:`load`.
        reshape: ``"error"``, ``"fresh"`` or ``"overlay"``; ``"preserve"`` needs the
            model's layer graph, which a weights file does not record.

    Returns:
        The :class:`LoadReport` of the conversion.

    Raises:
        RegraftError: bad input, an output format ``like`` cannot be written as, or
            checkpoints in different namespaces; nothing is written.

    Example:
        >>> regraft.convert("old/ckpt", "new.weights.h5", "converted.weights.h5")   # doctest: +SKIP
    """
    return convert_files(path, like, out, rules=rules, rename=rename, strict=strict, allow_missing=allow_missing,
                         allow_unused=allow_unused, root=root, reshape=reshape, accept_order=accept_order,
                         progress=progress, allow_outside_state=allow_outside_state)[0]


def convert_files(path: PathLike, like: PathLike, out: PathLike, *, rules: Rules = None,
                  rename: Mapping[str, str] | PathLike | None = None, strict: bool = True,
                  allow_missing: Iterable[str] = (), allow_unused: Iterable[str] = (), root: str | None = None,
                  reshape: str = "error", accept_order: bool = False, progress: Progress | None = None,
                  allow_outside_state: bool = False) -> tuple[LoadReport, list[str]]:
    """:func:`convert`, also returning the files written (for the CLI)."""
    from regraft.errors import RegraftError
    from regraft.targets.file import FileTarget, check_writable, model_from_archive, output_format

    path, like, out = os.fspath(path), os.fspath(like), os.fspath(out)
    if reshape == "preserve":
        raise RegraftError("convert cannot use reshape='preserve': function-preserving growth follows the new "
                           "model's layer graph, which a weights file does not record.",
                           hint="Use regraft.load with the new model's code, or reshape='fresh' / 'overlay'.")
    with without_gc():
        like_source = open_source(like)
    with like_source:
        with without_gc():
            source = open_source(path, allow_outside_state=allow_outside_state)
        with source:
            if source.namespace == like_source.namespace:
                check_writable(like_source, output_format(out), out)
                target: Any = FileTarget(like_source)
            elif like_source.format == "keras-archive":  # its config rebuilds the model: keys in every namespace
                target = target_for(model_from_archive(like_source.path))
            else:
                raise RegraftError(
                    f"Cannot convert {source.path} ({source.format}) into the layout of {like_source.path} "
                    f"({like_source.format}): their keys are in different namespaces ({source.namespace} and "
                    f"{like_source.namespace}), and without the model's code regraft cannot compute the new "
                    "model's keys in the old checkpoint's namespace.",
                    hint="Pass the new model as a .keras archive (model.save('new.keras'): Keras rebuilds it from "
                    "its config), or a --like file of the old checkpoint's kind (a TF checkpoint for a TF "
                    "checkpoint, .weights.h5 for Keras weights), or use `regraft load` with the new model's code.")
            the_plan = _plan(target, source, rules, rename, allow_missing, allow_unused, root, reshape, 0.0,
                             accept_order)
            _refuse_if_strict(the_plan, source.path, f"the layout of {like_source.path}", strict,
                              "nothing was written")
            counts = the_plan.counts()
            if not (counts["loaded"] + counts["cast"] + counts["transformed"]):
                raise RegraftError(
                    f"Nothing would be converted from {source.path}: no variable of {like_source.path} matched "
                    "(the files may belong to unrelated models); nothing was written.",
                    hint="Check both files; `regraft inspect` lists the keys of each.")
            report = apply(the_plan, target, source, progress=progress)
        written = target.save(out)
        return report, written
