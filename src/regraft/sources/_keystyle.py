"""How a flat file of named arrays (safetensors, npz) spells its keys."""

from __future__ import annotations

from typing import Iterable

from regraft.entries import BOOKKEEPING, OPTIMIZER_SLOT, WEIGHT, SourceEntry

__all__ = ["TORCH_ROLES", "is_torch_style", "canonical_key", "entry_order", "numbered"]

#: The leaf names PyTorch modules give their tensors (Linear, Conv, BatchNorm, LayerNorm, Embedding).
TORCH_ROLES = frozenset({"weight", "bias", "running_mean", "running_var", "num_batches_tracked"})


def is_torch_style(names: Iterable[str]) -> bool:
    """Dotted names without ``/`` whose leaves include PyTorch's (``features.0.weight``): a ``state_dict``.

    Example:
        >>> is_torch_style(["features.0.weight", "features.0.bias"]), is_torch_style(["dense/kernel"])
        (True, False)
    """
    names = list(names)
    return bool(names) and all("/" not in n for n in names) and any(n.rpartition(".")[2] in TORCH_ROLES for n in names)


def canonical_key(name: str, torch: bool) -> str:
    """The key regraft uses: ``/`` between a PyTorch name's parts, other names as they are.

    Example:
        >>> canonical_key("encoder.layer.3.attention.self.query.weight", True)
        'encoder/layer/3/attention/self/query/weight'
    """
    return name.replace(".", "/") if torch else name


_KIND_ORDER = {WEIGHT: 0, OPTIMIZER_SLOT: 1, BOOKKEEPING: 2}


def entry_order(e: SourceEntry) -> tuple[int, str]:
    """The order a source lists its entries in: weights, then slots, then bookkeeping; by key within each."""
    return (_KIND_ORDER[e.kind], e.key)


def numbered(entries: list[SourceEntry]) -> list[SourceEntry]:
    """Number each layer's weights in order of appearance; weights first, then slots, then bookkeeping."""
    counters: dict[str, int] = {}
    out = []
    for e in entries:
        index = None
        if e.kind == WEIGHT:
            index = counters.get(e.layer, 0)
            counters[e.layer] = index + 1
        out.append(
            SourceEntry(e.key, e.shape, e.dtype, e.kind, e.layer, e.role, index, e.layer_name, e.aliases, e.slot_of)
        )
    return sorted(out, key=entry_order)
