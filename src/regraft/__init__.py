"""regraft: load a TensorFlow/Keras checkpoint into a model whose architecture changed.

Example:
    >>> import regraft                                            # doctest: +SKIP
    >>> report = regraft.load(model, "ckpts/run7", strict=False)  # doctest: +SKIP
    >>> print(report)                                             # doctest: +SKIP
"""

from regraft.api import diff, load, open, plan
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
from regraft.plan import Assignment, Plan
from regraft.report import LoadReport
from regraft.verify import VerifyReport, verify

__version__ = "0.1.0"

__all__ = [
    "open",
    "load",
    "diff",
    "plan",
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
