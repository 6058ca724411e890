"""Targets: the model a checkpoint is loaded into. Only Keras 3 on TensorFlow for now."""

from regraft.targets.keras import (
    assign,
    custom_classes,
    describe,
    describe_with_layers,
    layer_graph,
    read_value,
    restore_tensor,
    save_weights,
    unique_variables,
)

__all__ = [
    "assign",
    "custom_classes",
    "describe",
    "describe_with_layers",
    "layer_graph",
    "read_value",
    "restore_tensor",
    "save_weights",
    "unique_variables",
]
