"""Descriptions of one checkpoint tensor and of one model variable.

Both sides of a load are described with the same vocabulary so that the matcher
can compare them without knowing where they came from:

* ``key`` — the canonical key in the source's *namespace* (see below);
* ``layer`` — the key of the owning object (layer) and ``role`` — the variable's
  part in it (``kernel``, ``bias``, ``gamma``…) where the format records it;
* ``index`` — the variable's position inside its layer (creation order).

Namespaces are the different ways a format addresses a variable:

``object``  TF2 object-graph path (``dense1/_kernel``, ``_operations/3/bias``)
``keras2``  tf-keras object path (``layer_with_weights-0/kernel``)
``h5``      Keras 3 ``.weights.h5`` path (``layers/dense_1/vars/0``)
``name``    variable name (TF1 ``Saver`` checkpoints, Keras 2 ``.h5`` files)

A source speaks exactly one namespace; a target variable knows its key in every
namespace it can be reached by, so exact matching is a dictionary lookup.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

__all__ = ["SourceEntry", "TargetVariable", "Status", "Stage", "WEIGHT", "OPTIMIZER_SLOT", "BOOKKEEPING"]


class _Text(str, Enum):
    """An enum whose members are also their text (compares equal to it, prints as it)."""

    def __str__(self) -> str:
        return str(self.value)


class Status(_Text):
    """What happens to a model variable (see :class:`regraft.plans.Assignment`)."""

    LOADED = "loaded"
    CAST = "cast"
    TRANSFORMED = "transformed"
    SHAPE_MISMATCH = "shape-mismatch"
    MISSING = "missing"
    AMBIGUOUS = "ambiguous"
    UNCONFIRMED = "unconfirmed"  # a pairing only order supports: proposed, left fresh until confirmed


class Stage(_Text):
    """Which matching stage decided a variable's source."""

    NONE = ""
    RULE = "rule"
    EXACT = "exact"
    NAME = "name"
    ALIGNED = "aligned"
    PLAN = "plan"  # chosen in an edited plan file

WEIGHT = "weight"
OPTIMIZER_SLOT = "optimizer_slot"
BOOKKEEPING = "bookkeeping"
NAMESPACES = ("object", "keras2", "h5", "name")


@dataclass(frozen=True)
class SourceEntry:
    """One tensor of a checkpoint, described from metadata only.

    Attributes:
        key: canonical key, relative to the checkpoint's saved root.
        shape: tensor shape.
        dtype: numpy dtype name (``"float32"``, ``"bfloat16"``…).
        kind: ``weight``, ``optimizer_slot`` or ``bookkeeping``.
        layer: key of the owning layer/object (``""`` at top level).
        role: the variable's role in its layer when known (``kernel``), else ``None``.
        index: position of the variable inside its layer, when known.
        layer_name: the Keras layer name when the format stores it.
        aliases: every other path that reaches the same tensor.
        slot_of: for an optimizer slot, the key of the weight it belongs to when known.
    """

    key: str
    shape: tuple[int, ...]
    dtype: str
    kind: str = WEIGHT
    layer: str = ""
    role: str | None = None
    index: int | None = None
    layer_name: str | None = None
    aliases: tuple[str, ...] = ()
    slot_of: str | None = None

    @property
    def size(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)


@dataclass(frozen=True)
class TargetVariable:
    """One variable of the model being loaded into.

    Attributes:
        key: the readable key used in reports (the Keras variable path, made unique).
        shape: variable shape.
        dtype: numpy dtype name of the variable.
        layer: Keras path of the owning layer.
        layer_class: class name of the owning layer.
        role: the variable's name inside its layer (``kernel``).
        index: position among the owning layer's variables.
        keys: key of this variable in each namespace that reaches it.
        variable: the live Keras variable (not compared, not printed).
        layer_object: the owning Keras layer (for freezing).
    """

    key: str
    shape: tuple[int, ...]
    dtype: str
    layer: str
    layer_class: str
    role: str
    index: int
    trainable: bool
    keys: dict[str, str] = field(default_factory=dict, compare=False)
    variable: Any = field(default=None, compare=False, repr=False)
    layer_object: Any = field(default=None, compare=False, repr=False)

    @property
    def size(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)
