"""Targets: the model a checkpoint is loaded into, behind the :class:`Target` protocol.

Keras 3 on TensorFlow (:mod:`regraft.targets.keras`) is the only implementation so
far; :func:`target_for` chooses the implementation for a model. Every private
access to Keras or TensorFlow lives in :mod:`regraft.targets._compat`.
"""

from __future__ import annotations

from typing import Any

from regraft.targets.base import GraphLayer, LayerTable, Target
from regraft.targets.keras import (
    KerasTarget,
    assign,
    custom_classes,
    describe,
    describe_with_layers,
    layer_graph,
    read_value,
    save_weights,
    unique_variables,
)

__all__ = [
    "Target",
    "GraphLayer",
    "LayerTable",
    "KerasTarget",
    "target_for",
    "assign",
    "custom_classes",
    "describe",
    "describe_with_layers",
    "layer_graph",
    "read_value",
    "save_weights",
    "unique_variables",
]


def target_for(model: Any) -> Target:
    """The :class:`Target` for ``model`` (a built Keras 3 model on TensorFlow today).

    Raises:
        TargetError: ``model`` is not a model regraft can load into, or is not built.
    """
    if isinstance(model, Target):  # KerasTarget, FileTarget (regraft.convert), ...
        return model
    return KerasTarget(model)
