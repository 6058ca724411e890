"""The contract every target (a model framework a plan is applied to) implements."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol, runtime_checkable

import numpy as np

from regraft.entries import TargetVariable

__all__ = ["Target", "GraphLayer", "LayerTable"]

LayerTable = dict[str, tuple[str | None, str | None]]  # layer key -> (framework's layer name, class in snake case)


@dataclass(frozen=True)
class GraphLayer:
    """One layer of the model's computation, for function-preserving growth.

    Attributes:
        key: the layer's readable key (``TargetVariable.layer`` of its variables).
        kind: the class in snake case (``dense``, ``conv2d``, ``batch_normalization``).
        inputs: readable keys of the layers feeding it.
        activation: the activation's name for layers that have one (``relu``, ``linear``).
        non_negative: its output is never negative (a ReLU without negative slope, as the
            layer's activation or as the layer).
        model_inputs: names of the model inputs feeding it directly (not layers in the graph).
        epsilon: a normalization layer's epsilon (``None`` for other layers).
        in_shapes: the shape of each input without the batch axis, when known (``()`` if not).
        axis: the axis a ``Concatenate`` joins on (``None`` for other layers).
        out_shape: the shape of its (first) output without the batch axis, when known.
    """

    key: str
    kind: str
    inputs: tuple[str, ...]
    activation: str | None
    non_negative: bool
    model_inputs: tuple[str, ...] = ()
    epsilon: float | None = None
    in_shapes: tuple[tuple[int | None, ...], ...] = ()
    axis: int | None = None
    out_shape: tuple[int | None, ...] | None = None


@runtime_checkable
class Target(Protocol):
    """A built model, as matching and applying see it.

    Keras 3 on TensorFlow (:class:`regraft.targets.keras.KerasTarget`) is the first
    implementation; :func:`regraft.targets.target_for` picks one for a model.
    Matching only needs :meth:`describe` (keys in the checkpoint's namespace,
    computed the way the framework itself would write them), :meth:`layer_graph`
    and :meth:`layer_classes`; applying needs :meth:`variables`, :meth:`read`,
    :meth:`assign`, :meth:`assign_filled`, :meth:`shards`, :meth:`assign_shards`,
    :meth:`all_passed` and :meth:`freeze`; the CLI :meth:`save`.
    """

    model: Any
    name: str

    def describe(self, namespaces: tuple[str, ...]) -> tuple[list[TargetVariable], dict[str, LayerTable]]:
        """Every variable with its readable key and its key in each namespace; every layer per namespace."""
        ...

    def layer_graph(self) -> list[GraphLayer]:
        """The layers in computation order, each with the layers feeding it."""
        ...

    def layer_classes(self) -> frozenset[str]:
        """Snake-case class names of the model's layers (auto-generated names are built from them)."""
        ...

    def variables(self) -> list[Any]:
        """The live variables, each once, in the order :meth:`describe` lists them."""
        ...

    def read(self, variable: TargetVariable) -> np.ndarray:
        """A variable's current value."""
        ...

    def assign(self, variable: TargetVariable, value: Any) -> None:
        """Give a variable a value of its shape and dtype (a numpy array).

        The array may be a view of the source's memory, which is released after
        the load: the variable must hold a copy, never a view of ``value``.
        """
        ...

    def shards(self, variable: TargetVariable) -> list[tuple[slice, ...]] | None:
        """This process's blocks of a variable laid out over several devices, or ``None`` (one device).

        One index per device this process addresses, in a fixed order, each one
        ``slice(start, stop)`` per axis (integer bounds). Replicas repeat an index.
        """
        ...

    def assign_shards(self, variable: TargetVariable, blocks: list[np.ndarray]) -> None:
        """Give a sharded variable its value as one array per index of :meth:`shards`, in that order.

        The variable is replaced whole, keeping its layout; nothing is gathered on one device.
        Unlike :meth:`assign`'s array, the blocks are fresh arrays the caller never reuses:
        the devices' arrays may wrap their memory (JAX does on the CPU).
        """
        ...

    def all_passed(self, passed: bool) -> bool:
        """Whether every process of a multi-process model passed its check pass (``passed``: this one's).

        A collective: when the model spans several processes, each calls it once per
        load, after its check pass, failed or not; with one process it returns ``passed``.
        """
        ...

    def assign_filled(self, variable: TargetVariable, fill: Callable[[np.ndarray], None]) -> None:
        """Give a variable the value ``fill`` writes into a new array of its shape and dtype.

        The target chooses the memory: where it can, the variable's next buffer
        itself, so a tensor read from a file is copied once. ``fill`` may raise;
        the variable is then unchanged.
        """
        ...

    def freeze(self, variable: TargetVariable) -> None:
        """Make the layer owning ``variable`` not trainable."""
        ...

    def save(self, path: str) -> list[str]:
        """Write the model's weights to ``path`` atomically; return the files written."""
        ...
