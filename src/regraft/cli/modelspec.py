"""Turn a ``--model`` spec (``path/file.py:callable`` or ``package.module:callable``) into a built model."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from typing import Any

from regraft.errors import ModelSpecError

__all__ = ["build_model"]


def build_model(spec: str) -> Any:
    """Import the callable named by ``spec``, call it with no arguments, and check it returns a built model.

    Raises:
        ModelSpecError: the spec is malformed, does not import, the callable fails,
            or it returns something that is not a built Keras model.
    """
    module_part, sep, attr = spec.rpartition(":")
    if not sep or not module_part or not attr:
        raise ModelSpecError(
            f"--model '{spec}' is not of the form FILE.py:CALLABLE or package.module:CALLABLE.",
            hint="For example: --model models.py:build_new",
        )
    module = _import(module_part, spec)
    factory = getattr(module, attr, None)
    if factory is None:
        names = sorted(n for n in dir(module) if callable(getattr(module, n)) and not n.startswith("_"))
        raise ModelSpecError(
            f"{module_part} has no attribute '{attr}'.",
            hint="Callables it defines: " + (", ".join(names[:10]) or "none") + ".",
        )
    try:
        model = factory() if callable(factory) else factory
    except Exception as exc:  # the user's code failed: say where, keep it short
        raise ModelSpecError(
            f"Calling {spec}() raised {type(exc).__name__}: {exc}",
            hint="Run the function on its own to debug it; set REGRAFT_DEBUG=1 for the traceback.",
        ) from exc
    import keras

    if not isinstance(model, keras.Model):
        raise ModelSpecError(
            f"{spec}() returned {type(model).__name__}, not a keras.Model.",
            hint="Make the function return the built model.",
        )
    return model


def _import(module_part: str, spec: str) -> Any:
    if module_part.endswith(".py") or os.sep in module_part or "/" in module_part:
        path = os.path.abspath(module_part)
        if not os.path.isfile(path):
            raise ModelSpecError(f"Model file {module_part} does not exist.", hint="Check the path before the ':'.")
        name = "regraft_user_" + os.path.splitext(os.path.basename(path))[0]
        loader_spec = importlib.util.spec_from_file_location(name, path)
        if loader_spec is None or loader_spec.loader is None:
            raise ModelSpecError(f"Cannot import {module_part} as Python.", hint="Pass a .py file.")
        module = importlib.util.module_from_spec(loader_spec)
        sys.path.insert(0, os.path.dirname(path))
        try:
            loader_spec.loader.exec_module(module)
        except Exception as exc:
            raise ModelSpecError(
                f"Importing {module_part} raised {type(exc).__name__}: {exc}",
                hint="Fix the error in that file; set REGRAFT_DEBUG=1 for the traceback.",
            ) from exc
        finally:
            sys.path.remove(os.path.dirname(path))
        return module
    try:
        return importlib.import_module(module_part)
    except Exception as exc:
        raise ModelSpecError(
            f"Cannot import module '{module_part}' from --model '{spec}': {type(exc).__name__}: {exc}",
            hint="Check the module is on PYTHONPATH, or pass a file path like models.py:build_new.",
        ) from exc
