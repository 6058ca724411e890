"""Key namespaces: how each checkpoint format addresses a variable, declared in one place.

A *namespace* says what a format's keys look like and what in them can be trusted:

========  ===============================================  ==================================
name      format                                           example
========  ===============================================  ==================================
object    TF2 object-based checkpoint                      ``dense1/_kernel``, ``_operations/3/bias``
keras2    tf-keras ``save_weights`` (TF format)            ``layer_with_weights-0/kernel``
h5        Keras 3 ``.weights.h5``                          ``layers/dense_1/vars/0``
name      TF1 ``Saver``, Keras 2 ``.h5`` (keys are names)  ``encoder/proj/kernel``
torch     PyTorch ``state_dict`` in safetensors / npz      ``features/0/weight``
========  ===============================================  ==================================

Matching (:mod:`regraft.matching`, :mod:`regraft.align`) asks a :class:`Namespace`
its questions — is this segment a position? which segments only hold layers? are
layer lists numbered by class? — instead of testing format names. A new format
with a new key style declares one :class:`Namespace` and registers it
(:func:`register`); the model side (:mod:`regraft.targets`) computes each
variable's key in it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

from regraft.errors import RegraftError
from regraft.names import is_auto_name

__all__ = ["Namespace", "OBJECT", "KERAS2", "H5", "NAME", "TORCH", "NAMESPACES", "namespace", "register"]


@dataclass(frozen=True)
class Namespace:
    """How one format's keys address variables, and what in them is evidence.

    Attributes:
        name: the namespace's name (a key of ``TargetVariable.keys``).
        example: a key, for documentation.
        position: ``position(segment, previous_segment)`` is true when the segment
            picks a layer by its place in a list, not by a name (``3`` in
            ``_operations/3``): such keys are never trusted on their own.
        containers: segments that only hold layers and name nothing (``_operations``).
        variable_group: the segment between a layer and its variables, if any (``vars``).
        keys_are_names: keys are the variables' names themselves (TF1, Keras 2 ``.h5``).
        saved_objects: the saved root's named children may be separate saved objects
            (``model``, ``optimizer``, an EMA copy), one of which holds the model.
        lists_by_class: layer lists are keyed by class and counter (``dense_1``), so
            only the order within a class is known.
        records_layer_names: the file records every layer's own name, at every level.
        drops_dict_keys: items of a dict attribute are saved like a list's, keys lost.
        numbered: the pattern of a list item's segment whose number gives its order.
        layout: the tensor layout of another framework the keys come with (``torch``,
            see :mod:`regraft.layouts`): variables are compared as that framework stores them.
    """

    name: str
    example: str
    position: Callable[[str, str], bool] = field(compare=False)
    containers: frozenset[str] = frozenset()
    variable_group: str | None = None
    keys_are_names: bool = False
    saved_objects: bool = False
    lists_by_class: bool = False
    records_layer_names: bool = False
    drops_dict_keys: bool = False
    numbered: re.Pattern[str] | None = None
    layout: str | None = None

    def is_positional(self, key: str) -> bool:
        """True when a variable key picks its layer by position somewhere.

        Example:
            >>> OBJECT.is_positional("_operations/3/_kernel"), OBJECT.is_positional("encoder/d/_kernel")
            (True, False)
            >>> H5.is_positional("blocks/dense_1/vars/0"), H5.is_positional("encoder/proj/vars/0")
            (True, False)
        """
        segments = self.split(key)[0].split("/")
        return any(self.position(s, segments[i - 1] if i else "") for i, s in enumerate(segments) if s)

    def split(self, key: str) -> tuple[str, str]:
        """A variable key's layer and leaf segment.

        Example:
            >>> H5.split("layers/dense/vars/0"), OBJECT.split("dense1/_kernel")
            (('layers/dense', '0'), ('dense1', '_kernel'))
        """
        layer, _, leaf = key.rpartition("/")
        group = self.variable_group
        if group and (layer == group or layer.endswith("/" + group)):
            layer = layer[: -len(group)].rstrip("/")
        return layer, leaf


_NUMBER = re.compile(r"^\d+$")
_KERAS2_ITEM = re.compile(r"^layer(_with_weights)?-(\d+)$")

OBJECT = Namespace(
    "object", "model/_operations/3/_kernel",
    position=lambda segment, previous: segment.isdigit(),
    containers=frozenset({"_operations", "_functional", "_layers", "_self_tracked_trackables"}),
    saved_objects=True,
    numbered=_NUMBER,
)
KERAS2 = Namespace(
    "keras2", "layer_with_weights-0/kernel",
    position=lambda segment, previous: bool(_KERAS2_ITEM.match(segment)),
    containers=frozenset({"_layers"}),
    saved_objects=True,
    numbered=_KERAS2_ITEM,
)
H5 = Namespace(
    "h5", "layers/dense_1/vars/0",
    # A layer list's item, or a list or dict attribute's (blocks/dense_1): named by class and counter.
    position=lambda segment, previous: previous == "layers" or (segment != "vars" and is_auto_name(segment)),
    containers=frozenset({"layers"}),
    variable_group="vars",
    lists_by_class=True,
    records_layer_names=True,
    drops_dict_keys=True,
)
NAME = Namespace(
    "name", "encoder/proj/kernel",
    position=lambda segment, previous: False,
    keys_are_names=True,
    lists_by_class=True,
)

TORCH = Namespace(
    "torch", "features/0/weight",
    # A PyTorch state_dict's names with '/' for '.': nn.Sequential and ModuleList items are numbers.
    position=lambda segment, previous: segment.isdigit(),
    numbered=_NUMBER,
    layout="torch",
)

NAMESPACES: dict[str, Namespace] = {}


def register(ns: Namespace) -> Namespace:
    """Make a namespace known by its name (a new format with a new key style calls this once)."""
    NAMESPACES[ns.name] = ns
    return ns


for _ns in (OBJECT, KERAS2, H5, NAME, TORCH):
    register(_ns)


def namespace(name: str | Namespace) -> Namespace:
    """The namespace called ``name`` (a :class:`Namespace` is returned as it is).

    Raises:
        RegraftError: no format declared a namespace of that name.
    """
    if isinstance(name, Namespace):
        return name
    try:
        return NAMESPACES[name]
    except KeyError:
        raise RegraftError(f"Unknown key namespace '{name}'. Known: {', '.join(sorted(NAMESPACES))}.",
                           hint="A format module declares its namespace with regraft.keys.register.") from None
