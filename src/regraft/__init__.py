"""regraft: load a TensorFlow/Keras checkpoint into a model whose architecture changed.

Example:
    >>> import regraft                                            # doctest: +SKIP
    >>> report = regraft.load(model, "ckpts/run7", strict=False)  # doctest: +SKIP
    >>> print(report)                                             # doctest: +SKIP
"""

from typing import TYPE_CHECKING

from regraft.errors import (
    CorruptCheckpointError,
    LoadError,
    ModelSpecError,
    RegraftError,
    SourceError,
    TargetError,
    UnsupportedFormatError,
)

if TYPE_CHECKING:
    from regraft.api import convert, diff, load, open, plan
    from regraft.applying import apply
    from regraft.building import build_and_load
    from regraft.entries import SourceEntry, TargetVariable
    from regraft.planfile import read_plan, save_plan
    from regraft.plans import Assignment, Plan
    from regraft.report import LoadReport
    from regraft.verification import VerifyReport, verify

# The public names are imported on first use (PEP 562), so that `import regraft.cli.main`
# (every CLI command, `regraft inspect` included) does not pay for the planner, the
# applier and numpy before it knows what it will run.
_LAZY = {
    "open": "regraft.api", "load": "regraft.api", "diff": "regraft.api", "plan": "regraft.api",
    "convert": "regraft.api", "apply": "regraft.applying", "build_and_load": "regraft.building",
    "SourceEntry": "regraft.entries", "TargetVariable": "regraft.entries",
    "read_plan": "regraft.planfile", "save_plan": "regraft.planfile",
    "Assignment": "regraft.plans", "Plan": "regraft.plans",
    "LoadReport": "regraft.report",
    "VerifyReport": "regraft.verification", "verify": "regraft.verification",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'regraft' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__version__ = "0.1.0"

__all__ = [
    "open",
    "load",
    "build_and_load",
    "diff",
    "plan",
    "apply",
    "convert",
    "save_plan",
    "read_plan",
    "verify",
    "VerifyReport",
    "LoadReport",
    "Plan",
    "Assignment",
    "SourceEntry",
    "TargetVariable",
    "RegraftError",
    "SourceError",
    "UnsupportedFormatError",
    "CorruptCheckpointError",
    "TargetError",
    "LoadError",
    "ModelSpecError",
]
