"""regraft: load a TensorFlow/Keras checkpoint into a model whose architecture changed.

Example:
    >>> import regraft                                            # doctest: +SKIP
    >>> report = regraft.load(model, "ckpts/run7", strict=False)  # doctest: +SKIP
    >>> print(report)                                             # doctest: +SKIP
"""

from regraft.api import convert, diff, load, open, plan
from regraft.applying import apply
from regraft.building import build_and_load
from regraft.entries import SourceEntry, TargetVariable
from regraft.errors import (
    CorruptCheckpointError,
    LoadError,
    ModelSpecError,
    RegraftError,
    SourceError,
    TargetError,
    UnsupportedFormatError,
)
from regraft.planfile import read_plan, save_plan
from regraft.plans import Assignment, Plan
from regraft.report import LoadReport
from regraft.verification import VerifyReport, verify

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
