"""``regraft verify``: load the old and the new model, compare their outputs (:func:`regraft.verification.verify`)."""

from __future__ import annotations

import argparse
import os
import re
from typing import Any

import numpy as np

from regraft.cli.output import emit, info
from regraft.verification import VerifyError, verify

__all__ = ["verify_command", "read_inputs"]


def verify_command(args: argparse.Namespace) -> int:
    """``regraft verify``: load the old checkpoint and the new weights, compare the two models' outputs.

    ``args`` holds ``old_checkpoint`` (checkpoint of the old model), ``old_model``
    (its ``--model`` spec), ``new_weights`` (a ``.weights.h5`` or TF checkpoint
    prefix, e.g. written by ``regraft load --out``), ``model`` (the new model's
    spec), ``tolerance``, ``samples``, ``inputs`` (``None`` or a file for
    :func:`read_inputs`) and ``json``. Both loads are strict.

    Exit codes:
        0: the largest difference is within the tolerance.
        1: it exceeds the tolerance (the report is printed; one line on stderr
            says so). Not a user error.
        2: a user error (bad spec, failed load, incomparable models): raised as a
            :class:`~regraft.errors.RegraftError` for the CLI's ``main`` to print
            as ``Error:``/``Hint:`` and turn into exit code 2.
    """
    from regraft.api import load
    from regraft.cli.modelspec import build_model

    old_model = build_model(args.old_model)
    load(old_model, args.old_checkpoint)
    new_model = build_model(args.model)
    load(new_model, args.new_weights)
    inputs_path = getattr(args, "inputs", None)
    inputs = read_inputs(inputs_path) if inputs_path else None
    report = verify(
        old_model,
        new_model,
        inputs,
        tolerance=getattr(args, "tolerance", 1e-5),
        samples=getattr(args, "samples", 8),
        seed=getattr(args, "seed", 0),
    )
    emit(report.to_dict(), str(report), getattr(args, "json", False))
    if not report.passed:
        info(f"verify failed: max |Δ| {report.max_abs:.1e} exceeds the tolerance {report.tolerance:g}.")
        return 1
    return 0


def read_inputs(path: str) -> Any:
    """The inputs stored in a ``.npy`` file (one array) or an ``.npz`` file.

    An ``.npz`` whose arrays are named ``arr_0, arr_1, …`` (``numpy.savez`` with
    positional arrays) gives a list of inputs in that order (one array alone);
    other names give a dict keyed by input name.

    Raises:
        VerifyError: the file is missing, unreadable, or holds no arrays.
    """
    if not os.path.isfile(path):
        raise VerifyError(f"Inputs file {path} does not exist.", hint="Pass a .npy file saved with numpy.save.")
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise VerifyError(f"Cannot read inputs file {path}: {_first_line(exc)}",
                          hint="Pass a .npy file saved with numpy.save (or an .npz saved with numpy.savez).") from exc
    if isinstance(loaded, np.ndarray):
        return loaded
    with loaded:
        keys = list(loaded.files)
        if not keys:
            raise VerifyError(f"Inputs file {path} holds no arrays.", hint="Save at least one array.")
        if all(re.fullmatch(r"arr_(\d+)", k) for k in keys):
            arrays = [loaded[k] for k in sorted(keys, key=lambda k: int(k[4:]))]
            return arrays[0] if len(arrays) == 1 else arrays
        return {k: loaded[k] for k in keys}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""
