"""Structural alignment of two architectures, from their keys alone.

Both sides are turned into trees of key segments (:func:`build_tree`): inner
nodes are layers and containers, leaves are variables. Weightless layers
(pooling, activation) appear as empty nodes and serve as landmarks. Two trees are
aligned top-down (:func:`align_trees`):

* an *ordered* container — a list of layers (``_operations/0..N``,
  ``layer_with_weights-N``, a ``.weights.h5`` ``layers`` group, whose items are
  numbered per class) — is aligned as a sequence with dynamic programming, in
  the spirit of Needleman–Wunsch: each pair of items gets an integer score from
  variable roles and shapes, layer kind and Keras name where known; skipping an
  item (an inserted or removed layer) costs a gap penalty;
* an *attribute* container (a subclassed model's ``self.encoder``) pairs equal
  names first, then pairs what is left when the structure is identical, so a
  renamed attribute is found; two equally good candidates are reported as
  ambiguous, never chosen;
* matched children are aligned recursively; variables pair by their segment
  (``_kernel``, ``bias``, ``vars/0``).

Layer names, where given, are the *strong* names of :mod:`regraft.names`
(auto-generated ones are left out by the caller): equal names add
``SAME_NAME``; two different names forbid the pair.

Ties in a sequence — a run of identical layers grown longer, with no names to
tell them apart — are broken by order: the old layers are taken to be the first
ones of the run (models grow by appending blocks). A pair is certain only when
*every* optimal alignment contains it (:func:`forced_pairs`); every other pair is
marked ``by_order``, and the plan asks the user to confirm it.

Scores are integers so that ties are exact.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from regraft.keys import Namespace
from regraft.keys import namespace as namespace_of
from regraft.names import is_auto_name, split_counter

__all__ = ["Node", "Pair", "Alignment", "build_tree", "align_trees", "align_layers", "forced_pairs", "leaf_layers",
           "leaf_children", "compatible_roles"]

# Scores (integers: ties must be exact).
SAME_STRUCTURE = 100  # same variable roles and shapes
SAME_ROLES = 40  # same roles, some shapes differ (a resized layer)
KEPT_SHAPES = 20  # shared among the variables of a resized layer that kept their shape
LANDMARK = 50  # two weightless layers of the same (or unknown) kind
LANDMARK_OTHER_KIND = 20
SAME_NAME = 100  # equal strong layer names (different strong names: never paired)
GAP = 25  # skipping one item of a sequence
EXPLAINED_RESIZE = 65  # a layer whose input grew as the layer before it grew: one change, not two

_NUMBERED = re.compile(r"^(?:layer_with_weights-|layer-)?(\d+)$")


@dataclass
class Node:
    """A node of a key tree.

    Attributes:
        path: the node's key (``""`` for the root).
        name: the Keras layer name, where the format records it.
        kind: the layer class in snake case (``conv2d``), where known.
        children: segment → child, in creation order where the format keeps it.
        leaf: the record (SourceEntry / TargetVariable) at a variable.
        shape: the variable's shape, for leaves.
    """

    path: str
    name: str | None = None
    kind: str | None = None
    children: dict[str, "Node"] = field(default_factory=dict)
    leaf: Any = None
    shape: tuple[int, ...] | None = None
    _signature: Counter | None = field(default=None, repr=False)
    _leaves: list["Node"] | None = field(default=None, repr=False, compare=False)

    def signature(self) -> Counter:
        """Multiset of (leaf segment, shape) over the subtree — what a layer holds."""
        if self._signature is None:
            sig: Counter = Counter()
            if self.leaf is not None:
                sig[(self.path.rpartition("/")[2], self.shape)] += 1
            for child in self.children.values():
                if child.leaf is not None and not child.children:
                    # A variable: its one (segment, shape), counted here without a Counter of its own.
                    item = (child.path.rpartition("/")[2], child.shape)
                    sig[item] = sig.get(item, 0) + 1
                elif child._signature is None and child.leaf is None and _only_variables(child):
                    # A group of variables (.weights.h5 'vars'): counted the same way, in the same order.
                    for grandchild in child.children.values():
                        item = (grandchild.path.rpartition("/")[2], grandchild.shape)
                        sig[item] = sig.get(item, 0) + 1
                else:
                    sig.update(child.signature())
            self._signature = sig
        return self._signature

    def roles(self) -> Counter:
        """Multiset of leaf segments over the subtree (shapes ignored)."""
        out: Counter = Counter()
        for (role, _), n in self.signature().items():
            out[role] += n
        return out


def _only_variables(node: Node) -> bool:
    """A node whose children are all variables with nothing below them."""
    return all(c.leaf is not None and not c.children for c in node.children.values())


@dataclass(frozen=True)
class Pair:
    """A source leaf matched to a target leaf.

    Attributes:
        source, target: the leaf records.
        source_layer, target_layer: the keys of the aligned layers that hold them.
        score: the alignment score of those layers.
        by_order: the layer pair was chosen by order among equally good placements.
        how: ``"name"``, ``"structure"`` or ``"sequence"`` — what paired the layers.
    """

    source: Any
    target: Any
    source_layer: str
    target_layer: str
    score: int
    by_order: bool
    how: str


@dataclass
class Alignment:
    """The result of aligning two trees.

    Attributes:
        pairs: matched leaves.
        inserted: target layer keys with no counterpart (new layers).
        removed: source layer keys with no counterpart (dropped layers).
        ambiguous: target layer key → the equally good source layer keys.
        tied: target layer keys left unpaired by the order rule although another
            equally good alignment pairs them (inserted *somewhere* in a run of alike layers).
    """

    pairs: list[Pair] = field(default_factory=list)
    inserted: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    ambiguous: dict[str, list[str]] = field(default_factory=dict)
    tied: list[str] = field(default_factory=list)


def build_tree(
    leaves: Iterable[tuple[str, Any, tuple[int, ...]]],
    layers: dict[str, tuple[str | None, str | None]] | None = None,
) -> Node:
    """Build a key tree.

    Args:
        leaves: ``(key, record, shape)`` for every variable.
        layers: extra layer nodes, ``key → (Keras name, kind)``; adds weightless
            layers as landmarks and names/kinds to layers that hold variables.
    """
    root = Node("")
    for key, (name, kind) in sorted((layers or {}).items(), key=lambda kv: _natural(kv[0])):
        node = _ensure(root, key)
        node.name, node.kind = name, kind
    parents: dict[str, Node] = {}  # a leaf's parent key -> its node: variables of one layer share it
    for key, record, shape in leaves:
        if key:
            parent_key, _, segment = key.rpartition("/")
            parent = parents.get(parent_key)
            if parent is None:
                parent = parents[parent_key] = _ensure(root, parent_key)
            node = parent.children.get(segment)
            if node is None:
                node = parent.children[segment] = Node(f"{parent.path}/{segment}" if parent.path else segment)
        else:
            node = root
        node.leaf, node.shape = record, tuple(shape)
    return root


def _ensure(root: Node, key: str) -> Node:
    node = root
    for segment in key.split("/") if key else []:
        child = node.children.get(segment)
        if child is None:
            child = node.children[segment] = Node(f"{node.path}/{segment}" if node.path else segment)
        node = child
    return node


_DIGIT_RUNS = re.compile(r"(\d+)")


def _natural(key: str) -> list[Any]:
    parts: list[Any] = _DIGIT_RUNS.split(key)  # text, digits, text, ...: every odd item is a run of digits
    parts[1::2] = map(int, parts[1::2])
    return parts


def align_trees(source: Node, target: Node, ns: str | Namespace) -> Alignment:
    """Align two key trees whose keys are in namespace ``ns``; see the module docstring."""
    out = Alignment()
    _align(source, target, namespace_of(ns), out, by_order=False, how="exact")
    return out


def _align(s: Node, t: Node, ns: Namespace, out: Alignment, by_order: bool, how: str) -> None:
    if s.leaf is not None and t.leaf is not None:
        out.pairs.append(Pair(s.leaf, t.leaf, _parent(s.path), _parent(t.path), _score(s, t), by_order, how))
        return
    sequences = _sequences(s, t, ns)
    if sequences is not None:
        for s_items, t_items in sequences:
            _align_sequence(s_items, t_items, ns, out, by_order)
        return
    _align_attributes(s, t, ns, out, by_order, how)


def _parent(path: str) -> str:
    parent = path.rpartition("/")[0]
    return parent[: -len("/vars")] if parent.endswith("/vars") else parent


def _sequences(s: Node, t: Node, ns: Namespace) -> list[tuple[list[Node], list[Node]]] | None:
    """Split two ordered containers into the sequences to align, or ``None`` if not ordered."""
    s_keys, t_keys = list(s.children), list(t.children)
    if not s_keys or not t_keys:
        return None
    if all(c.leaf is not None for c in (*s.children.values(), *t.children.values())):
        return None  # a layer's own variables pair by segment (role or index), not by order
    if all(_NUMBERED.match(k) for k in s_keys + t_keys):
        def order(keys: list[str], node: Node) -> list[Node]:
            return [node.children[k] for k in sorted(keys, key=lambda k: int(_NUMBERED.match(k).group(1)))]

        return [(order(s_keys, s), order(t_keys, t))]
    if ns.lists_by_class and not ns.keys_are_names and (
        (s.path.rpartition("/")[2] in ns.containers and t.path.rpartition("/")[2] in ns.containers)
        or _auto_named_items(s, ns) and _auto_named_items(t, ns)
    ):
        # A layer list (Functional/Sequential 'layers', or a list or dict attribute): Keras names
        # its items by class and counter, so only the order within a class is known.
        by_class: dict[str, tuple[list[tuple[int, Node]], list[tuple[int, Node]]]] = {}
        for side, node in ((0, s), (1, t)):
            for key, child in node.children.items():
                cls, n = split_counter(key)
                by_class.setdefault(cls, ([], []))[side].append((n, child))
        return [
            ([n for _, n in sorted(a, key=lambda x: x[0])], [n for _, n in sorted(b, key=lambda x: x[0])])
            for _, (a, b) in sorted(by_class.items())
        ]
    return None


# Layer classes whose bias, when they have one, is their last variable (.weights.h5 numbers variables).
_BIAS_LAST = frozenset({"dense", "einsum_dense", "conv1d", "conv2d", "conv3d", "conv1d_transpose", "conv2d_transpose",
                        "conv3d_transpose", "depthwise_conv1d", "depthwise_conv2d", "separable_conv1d",
                        "separable_conv2d"})


def compatible_roles(a: set[str], b: set[str], kind: str | None = None) -> bool:
    """Whether two layers' variables can be one layer's, before and after a change: equal, or one has a bias more.

    Variables are named (``kernel``, ``bias``) or, in ``.weights.h5``, only numbered
    in creation order: then a missing bias can be told only for a ``kind`` (the
    layers' common class) whose bias comes last. A BatchNormalization that lost
    its ``gamma`` shifts every index after it, so numbered sets must otherwise be equal.

    Example:
        >>> compatible_roles({"_kernel", "bias"}, {"_kernel"}), compatible_roles({"0", "1"}, {"0"}, "dense")
        (True, True)
        >>> compatible_roles({"0", "1", "2", "3"}, {"0", "1", "2"}), compatible_roles({"gamma", "beta"}, {"beta"})
        (False, False)
        >>> compatible_roles({"_kernel", "bias"}, {"_kernel", "bias", "lora_kernel_a", "lora_kernel_b"})
        True
    """
    # LoRA adapters (enable_lora) add lora_kernel_a/b beside the same kernel and bias: the layer is the same.
    a, b = {x for x in a if not x.startswith("lora_")}, {x for x in b if not x.startswith("lora_")}
    if a == b:
        return True
    if (a ^ b) <= {"bias"}:
        return True
    if kind in _BIAS_LAST and all(x.isdigit() for x in a | b):
        small, large = sorted((a, b), key=len)
        return small == {str(i) for i in range(len(small))} and large == {str(i) for i in range(len(small) + 1)}
    return False


def leaf_children(node: Node) -> list[Node]:
    """A layer node's variables (under its ``vars`` group for ``.weights.h5`` keys).

    Computed once per node (trees are complete when alignment starts); do not change the list.
    """
    if node._leaves is None:
        node._leaves = [c for c in node.children.get("vars", node).children.values() if c.leaf is not None]
    return node._leaves


def _holds_variables(node: Node) -> bool:
    """A layer node whose children are all its variables (directly, or in a ``vars`` group)."""
    holder = node.children.get("vars", node)
    return bool(holder.children) and len(leaf_children(node)) == len(holder.children)


def _auto_named_items(node: Node, ns: Namespace) -> bool:
    """A container whose items Keras named by class and counter (``dense``, ``dense_1``)."""
    return bool(node.children) and all(
        c.leaf is None and key != ns.variable_group and is_auto_name(key) for key, c in node.children.items())


def _score(s: Node, t: Node) -> int:
    """How well source node ``s`` fits target node ``t``; 0 means they cannot be paired."""
    if s.kind and t.kind and s.kind != t.kind:
        return 0
    if s.leaf is not None or t.leaf is not None:
        if s.leaf is None or t.leaf is None:
            return 0
        return SAME_STRUCTURE if s.shape == t.shape else SAME_ROLES
    s_sig, t_sig = s.signature(), t.signature()
    if not s_sig and not t_sig:
        base = LANDMARK if (not s.kind or not t.kind or s.kind == t.kind) else LANDMARK_OTHER_KIND
    elif s_sig == t_sig:
        base = SAME_STRUCTURE
    elif s_sig and t_sig and s.roles() == t.roles():
        # A resized layer: prefer the candidate that keeps more variables' shapes
        # (a layer whose output width changed keeps its bias only if it is the same layer).
        kept = sum((s_sig & t_sig).values())
        base = SAME_ROLES + (KEPT_SHAPES * kept) // max(sum(s_sig.values()), 1)
    else:
        # Partly alike (a nested block that changed inside, a layer that lost its bias):
        # a share of SAME_ROLES by how much of the roles they have in common.
        s_roles, t_roles = s.roles(), t.roles()
        kind = s.kind if s.kind and s.kind == t.kind else None
        if _holds_variables(s) and _holds_variables(t) and not compatible_roles(set(s_roles), set(t_roles), kind):
            return 0  # one layer, other variables: another class (BatchNormalization -> LayerNormalization)
        common = sum((s_roles & t_roles).values())
        share = common / max(sum(s_roles.values()), sum(t_roles.values()), 1)
        if share < 0.5:
            return 0
        base = max(1, int(SAME_ROLES * share))
    if s.name and t.name:
        if s.name != t.name:
            return 0
        base += SAME_NAME
    return base


def _align_attributes(s: Node, t: Node, ns: Namespace, out: Alignment, by_order: bool, how: str) -> None:
    """Pair equal names, then what is left by structure; ties are ambiguous."""
    s_left = dict(s.children)
    t_left = dict(t.children)
    if ns.keys_are_names:
        _align_auto_named(s_left, t_left, ns, out, by_order)
    for key in list(t_left):
        s_node = s_left.get(key)
        if s_node is None:
            continue
        t_node = t_left[key]
        if s_node.leaf is not None and t_node.leaf is not None:  # two variables: _align's first case, inline
            del s_left[key], t_left[key]
            out.pairs.append(Pair(s_node.leaf, t_node.leaf, _parent(s_node.path), _parent(t_node.path),
                                  _score(s_node, t_node), by_order, how))
        elif (s_node.leaf is None) == (t_node.leaf is None):
            del s_left[key], t_left[key]
            _align(s_node, t_node, ns, out, by_order, how)
    if s_left and t_left:
        scores = {(sk, tk): _score(sn, tn) for sk, sn in s_left.items() for tk, tn in t_left.items()}
        for tk in list(t_left):
            # Under another name only an identical structure is evidence enough: a resized
            # layer with a new name is more likely a new layer than the old one renamed.
            candidates = [(scores[(sk, tk)], sk) for sk in s_left if scores[(sk, tk)] >= SAME_STRUCTURE]
            if not candidates:
                continue
            best = max(c[0] for c in candidates)
            top = [sk for score, sk in candidates if score == best]
            # The source must also prefer this target over the other targets left.
            rivals = [tk2 for tk2 in t_left if tk2 != tk and scores.get((top[0], tk2), 0) == best]
            if len(top) == 1 and not rivals:
                _align(s_left.pop(top[0]), t_left.pop(tk), ns, out, by_order, "structure")
            else:
                out.ambiguous[t_left[tk].path] = sorted(s_left[sk].path for sk in top)
    if s_left:
        contested = {p for ps in out.ambiguous.values() for p in ps}
        out.removed.extend(n.path for n in s_left.values() if n.signature() and n.path not in contested)
    if t_left:
        out.inserted.extend(n.path for n in t_left.values() if n.signature() and n.path not in out.ambiguous)


def _align_auto_named(s_left: dict[str, Node], t_left: dict[str, Node], ns: Namespace, out: Alignment,
                      by_order: bool) -> None:
    """Where keys are names (TF1, Keras 2 ``.h5``): layers with auto-generated names are a sequence per class.

    ``dense_2`` in the old program and ``dense_2`` in the new one are equal only by
    the counter, which shifts when a layer is inserted: such layers are aligned
    like a ``.weights.h5`` ``layers`` group, class by class in counter order, and a
    tie among alike layers stays a tie. Aligned items are removed from both dicts.
    """
    by_class: dict[str, tuple[list[tuple[int, str]], list[tuple[int, str]]]] = {}
    for side, left in ((0, s_left), (1, t_left)):
        for key, node in left.items():
            if node.leaf is None and is_auto_name(key):
                cls, n = split_counter(key)
                by_class.setdefault(cls, ([], []))[side].append((n, key))
    for s_keys, t_keys in by_class.values():
        if s_keys and t_keys:
            s_items = [s_left.pop(k) for _, k in sorted(s_keys)]
            t_items = [t_left.pop(k) for _, k in sorted(t_keys)]
            _align_sequence(s_items, t_items, ns, out, by_order)


def _align_sequence(s_items: list[Node], t_items: list[Node], ns: Namespace, out: Alignment, by_order: bool) -> None:
    """Global alignment of two sequences of layers; recurse into matched pairs."""
    n, m = len(s_items), len(t_items)
    if n == 0 or m == 0:  # weightless layers are landmarks, not layers anybody lost
        out.removed.extend(x.path for x in s_items if x.signature())
        out.inserted.extend(x.path for x in t_items if x.signature())
        return
    if (n + 1) * (m + 1) > BAND_MIN_CELLS:
        banded = _band_sequence(s_items, t_items)
        if banded is not None:
            early, forced, pairable = banded
            _recurse_sequence(s_items, t_items, early, forced, pairable, ns, out, by_order)
            return
    scores = _score_matrix(s_items, t_items)
    early = _traceback(_dp_moves(scores), prefer_diagonal=False)  # matches as early as possible
    explained = _explained_resizes(s_items, t_items, scores)
    if explained.any():
        # Credit a resize that the pair before it explains, but only where that pair is in the
        # alignment too: align once with the credit on every such cell, then keep that
        # alignment only if it is better once the credit counts only where it is earned.
        credited = scores + EXPLAINED_RESIZE * explained
        other = _traceback(_dp_moves(credited), prefer_diagonal=False)
        if _earned(other, scores, explained) > _earned(early, scores, explained):
            scores, early = credited, other
    forced, pairable = _certainty(scores)
    _recurse_sequence(s_items, t_items, early, forced, pairable, ns, out, by_order)


def _recurse_sequence(s_items: list[Node], t_items: list[Node], early: list[tuple[int, int]],
                      forced: set[tuple[int, int]], pairable: set[int], ns: Namespace, out: Alignment,
                      by_order: bool) -> None:
    """Record a sequence alignment: recurse into its pairs, list removed, inserted and tied layers."""
    n, m = len(s_items), len(t_items)
    matched_s, matched_t = set(), set()
    for i, j in early:
        placed_by_order = (i, j) not in forced
        matched_s.add(i)
        matched_t.add(j)
        _align(s_items[i], t_items[j], ns, out, by_order or placed_by_order, "sequence")
    out.removed.extend(s_items[i].path for i in range(n) if i not in matched_s and s_items[i].signature())
    out.inserted.extend(t_items[j].path for j in range(m) if j not in matched_t and t_items[j].signature())
    out.tied.extend(t_items[j].path for j in sorted(pairable - matched_t))


def _band_sequence(s_items: list[Node], t_items: list[Node]) -> tuple[list[tuple[int, int]], set[tuple[int, int]], set[int]] | None:
    """:func:`_band_align` of two long sequences, or None where the full table must run.

    The scores of a band cell are those of :func:`_score_matrix`. A sequence where a
    resize could be explained by the pair before it (:func:`_explained_resizes`)
    takes the full table, which weighs the credited alignment against the plain one.
    """
    s_ids, t_ids, small = _structure_scores(s_items, t_items)
    s_w = [_widths(x) for x in s_items]  # (input, output) per item, as Python ints
    t_w = [_widths(x) for x in t_items]
    # Explained needs chain_s[i], chain_t[j], equal output and different input widths.
    chained_t: dict[int, set[int]] = {}
    for j in range(1, len(t_items)):
        if t_w[j - 1][1] == t_w[j][0] and t_w[j][0] >= 0:
            chained_t.setdefault(t_w[j][1], set()).add(t_w[j][0])
    for i in range(1, len(s_items)):
        if s_w[i - 1][1] == s_w[i][0] and s_w[i][0] >= 0 and chained_t.get(s_w[i][1], set()) - {s_w[i][0]}:
            return None
    names_s = np.array([x.name or "" for x in s_items], dtype=object)
    names_t = np.array([x.name or "" for x in t_items], dtype=object)
    s_arr, t_arr = np.asarray(s_ids), np.asarray(t_ids)
    use_names = bool(names_s.any() and names_t.any())

    def cells(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        base = small[s_arr[rows], t_arr[cols]]
        if not use_names:
            return base
        ns_, nt_ = names_s[rows], names_t[cols]
        both = (ns_ != "") & (nt_ != "")
        same = ns_ == nt_
        return np.where(both & ~same, 0, base + SAME_NAME * (both & same & (base > 0)))

    def best_of(ids: list[int], names: np.ndarray, other_ids: list[int], other_names: np.ndarray,
                table: np.ndarray) -> np.ndarray:
        # Exact best score per item: unnamed partners score as structure, a named item pairs
        # only with unnamed partners or its namesakes (+SAME_NAME).
        if not use_names:
            best_by_id = table.max(axis=1)
            return best_by_id[np.asarray(ids)]
        unnamed = sorted({other_ids[j] for j in range(len(other_ids)) if not other_names[j]})
        best_unnamed = table[:, unnamed].max(axis=1) if unnamed else np.zeros(table.shape[0], dtype=np.int64)
        best_any = table.max(axis=1)
        namesakes: dict[str, set[int]] = {}
        for j, name in enumerate(other_names):
            if name:
                namesakes.setdefault(name, set()).add(other_ids[j])
        any_best, unnamed_best = best_any.tolist(), best_unnamed.tolist()
        out = []
        for sid, name in zip(ids, names):
            if not name:
                out.append(any_best[sid])
                continue
            value = unnamed_best[sid]
            for tid in namesakes.get(name, ()):
                if table[sid, tid] > 0:
                    value = max(value, int(table[sid, tid]) + SAME_NAME)
            out.append(value)
        return np.array(out, dtype=np.int64).reshape(len(ids))

    rowmax = best_of(s_ids, names_s, t_ids, names_t, small)
    colmax = best_of(t_ids, names_t, s_ids, names_s, small.T)
    return _band_align(cells, rowmax, colmax, len(s_items), len(t_items))


def _structure_scores(s_items: list[Node], t_items: list[Node]) -> tuple[list[int], list[int], np.ndarray]:
    """Structure class of every item on each side, and the name-free score of every pair of classes."""
    s_keys = [_structure_key(x) for x in s_items]
    t_keys = [_structure_key(x) for x in t_items]
    s_ids, s_uniq = _factorise(s_keys)
    t_ids, t_uniq = _factorise(t_keys)
    s_rep: dict[int, Node] = {}
    t_rep: dict[int, Node] = {}
    for item, sid in zip(s_items, s_ids):
        s_rep.setdefault(sid, item)
    for item, tid in zip(t_items, t_ids):
        t_rep.setdefault(tid, item)
    small = np.zeros((len(s_uniq), len(t_uniq)), dtype=np.int64)
    for a in range(len(s_uniq)):
        for b in range(len(t_uniq)):
            small[a, b] = _score(_without_name(s_rep[a]), _without_name(t_rep[b]))
    return s_ids, t_ids, small


def _score_matrix(s_items: list[Node], t_items: list[Node]) -> np.ndarray:
    """Scores of every (source, target) item pair, vectorised over structure classes."""
    s_keys = [_structure_key(x) for x in s_items]
    t_keys = [_structure_key(x) for x in t_items]
    # Distinct structures are few even in long sequences: score each distinct pair once.
    s_ids, s_uniq = _factorise(s_keys)
    t_ids, t_uniq = _factorise(t_keys)
    s_rep = {sid: s_items[s_ids.index(sid)] for sid in set(s_ids)}
    t_rep = {tid: t_items[t_ids.index(tid)] for tid in set(t_ids)}
    small = np.zeros((len(s_uniq), len(t_uniq)), dtype=np.int64)
    for a in range(len(s_uniq)):
        for b in range(len(t_uniq)):
            small[a, b] = _score(_without_name(s_rep[a]), _without_name(t_rep[b]))
    matrix = small[np.asarray(s_ids)[:, None], np.asarray(t_ids)[None, :]]
    names_s = np.array([x.name or "" for x in s_items], dtype=object)
    names_t = np.array([x.name or "" for x in t_items], dtype=object)
    if names_s.any() and names_t.any():
        both = (names_s[:, None] != "") & (names_t[None, :] != "")
        same = names_s[:, None] == names_t[None, :]
        matrix = np.where(both & ~same, 0, matrix + SAME_NAME * (both & same & (matrix > 0)))
    return matrix


def _widths(node: Node) -> tuple[int, int]:
    """(input, output) units of a layer's kernel (its variable of highest rank, rank >= 2); -1 if none."""
    shapes = [shape for (_, shape) in node.signature() if shape is not None and len(shape) >= 2]
    if not shapes:
        return -1, -1
    kernel = max(shapes, key=len)
    return int(kernel[-2]), int(kernel[-1])


def _earned(path: list[tuple[int, int]], scores: np.ndarray, explained: np.ndarray) -> int:
    """An alignment's score, crediting an explained resize only when the pair before it is in the alignment."""
    n, m = scores.shape
    pairs = set(path)
    total = sum(int(scores[i, j]) for i, j in path) - GAP * (n + m - 2 * len(path))
    return total + EXPLAINED_RESIZE * sum(1 for i, j in path if explained[i, j] and (i - 1, j - 1) in pairs)


def _explained_resizes(s_items: list[Node], t_items: list[Node], matrix: np.ndarray) -> np.ndarray:
    """Resized pairs whose only change is an input width that the pair before them explains.

    A layer widened from 48 to 64 units and the next layer, whose input grew from 48 to
    64, are one change: the pair before is pairable and both sides chain (the layer before
    outputs what this one reads). Without this, a widened layer followed later by an
    inserted layer of its neighbours' shape is read as "a new layer in front, every old
    layer shifted by one" (an exact pair outweighing two resized ones), so the old first
    layer lands in the second. The credit is earned only when the pair before is in the
    alignment (:func:`_earned`).
    """
    s_w = np.array([_widths(x) for x in s_items], dtype=np.int64).reshape(-1, 2)
    t_w = np.array([_widths(x) for x in t_items], dtype=np.int64).reshape(-1, 2)
    n, m = matrix.shape
    chain_s = np.zeros(n, dtype=bool)  # chain_s[i]: item i - 1 outputs what item i reads (by width)
    chain_t = np.zeros(m, dtype=bool)
    chain_s[1:] = (s_w[:-1, 1] == s_w[1:, 0]) & (s_w[1:, 0] >= 0)
    chain_t[1:] = (t_w[:-1, 1] == t_w[1:, 0]) & (t_w[1:, 0] >= 0)
    before = np.zeros((n, m), dtype=bool)
    before[1:, 1:] = matrix[:-1, :-1] > 0
    in_changed = s_w[:, None, 0] != t_w[None, :, 0]
    out_kept = s_w[:, None, 1] == t_w[None, :, 1]
    explained = before & chain_s[:, None] & chain_t[None, :]
    return ((matrix > 0) & in_changed & out_kept & explained).astype(np.int64)



def _structure_key(node: Node) -> tuple:
    # Signature items are ((segment, shape), count): plain tuples of str and ints, sortable as they are.
    return (node.kind, tuple(sorted(node.signature().items())), node.leaf is not None, node.shape)


def _without_name(node: Node) -> Node:
    if node.name is None:
        return node
    copy = Node(node.path, None, node.kind, node.children, node.leaf, node.shape)
    copy._signature = node.signature()
    return copy


def _factorise(keys: list[tuple]) -> tuple[list[int], list[tuple]]:
    index: dict[tuple, int] = {}
    ids = [index.setdefault(k, len(index)) for k in keys]
    return ids, list(index)


DIAG, UP, LEFT = 1, 2, 4


def _dp_values(scores: np.ndarray) -> np.ndarray:
    """The table of best prefix scores: ``F[i, j]`` aligns the first ``i`` sources with the first ``j`` targets."""
    n, m = scores.shape
    neg = np.iinfo(np.int64).min // 4
    cols = np.arange(m + 1, dtype=np.int64)
    values = np.empty((n + 1, m + 1), dtype=np.int64)
    values[0] = -GAP * cols
    for i in range(1, n + 1):
        prev = values[i - 1]
        diag = np.full(m + 1, neg, dtype=np.int64)
        diag[1:] = np.where(scores[i - 1] > 0, prev[:-1] + scores[i - 1], neg)
        vertical = np.maximum(diag, prev - GAP)
        vertical[0] = -GAP * i
        values[i] = np.maximum.accumulate(vertical + GAP * cols) - GAP * cols
    return values


def forced_pairs(scores: np.ndarray) -> set[tuple[int, int]]:
    """The pairs ``(i, j)`` that every optimal alignment of the two sequences contains (see :func:`_certainty`).

    Example:
        >>> sorted(forced_pairs(np.array([[100, 0], [0, 100]])))
        [(0, 0), (1, 1)]
        >>> sorted(forced_pairs(np.array([[100, 100]])))   # one old layer, two alike new ones: a tie
        []
    """
    return _certainty(scores)[0]


def _certainty(scores: np.ndarray) -> tuple[set[tuple[int, int]], set[int]]:
    """Which pairs every optimal alignment contains, and which targets some optimal alignment pairs.

    A path through the DP grid moves from cell level ``i + j`` to the next level
    (a gap) or the one after (a pair), so every optimal path visits level ``L`` or
    ``L + 1``. A pair ``(i, j)`` is on every optimal path exactly when ``(i, j)`` is
    the only optimal cell of its level, no optimal cell lies on the next level,
    and the pair itself is an optimal move.

    Returns (the forced pairs, the targets ``j`` that some optimal alignment pairs).
    """
    n, m = scores.shape
    forward = _dp_values(scores)
    backward = _dp_values(scores[::-1, ::-1])[::-1, ::-1]  # best score of aligning the suffixes
    best = forward[n, m]
    on_path = forward + backward == best
    levels = np.add.outer(np.arange(n + 1), np.arange(m + 1))
    per_level = np.bincount(levels[on_path], minlength=n + m + 2)
    level = levels[:-1, :-1]
    optimal_pair = (scores > 0) & on_path[:-1, :-1] & on_path[1:, 1:] & (forward[:-1, :-1] + scores == forward[1:, 1:])
    forced = optimal_pair & (per_level[level] == 1) & (per_level[level + 1] == 0)
    return {(int(i), int(j)) for i, j in zip(*np.nonzero(forced))}, {int(j) for j in np.nonzero(optimal_pair.any(axis=0))[0]}


def _dp_moves(scores: np.ndarray) -> np.ndarray:
    """Fill the DP table row by row (numpy), returning per cell the optimal moves as bit flags.

    ``UP`` skips a source item (removed layer), ``LEFT`` a target item (inserted
    layer), ``DIAG`` pairs them (allowed only where the score is positive).
    """
    n, m = scores.shape
    neg = np.iinfo(np.int64).min // 4
    moves = np.zeros((n + 1, m + 1), dtype=np.uint8)
    moves[0, 1:] = LEFT
    moves[1:, 0] = UP
    cols = np.arange(m + 1, dtype=np.int64)
    prev = -GAP * cols
    for i in range(1, n + 1):
        diag = np.full(m + 1, neg, dtype=np.int64)
        allowed = scores[i - 1] > 0
        diag[1:] = np.where(allowed, prev[:-1] + scores[i - 1], neg)
        up = prev - GAP
        best_vertical = np.maximum(diag, up)
        best_vertical[0] = -GAP * i
        # Left moves chain along the row: H[j] = max_k<=j (C[k] - GAP*(j-k)).
        row = np.maximum.accumulate(best_vertical + GAP * cols) - GAP * cols
        flags = np.zeros(m + 1, dtype=np.uint8)
        flags |= np.where(diag == row, DIAG, 0).astype(np.uint8)
        flags |= np.where(up == row, UP, 0).astype(np.uint8)
        left = np.full(m + 1, neg, dtype=np.int64)
        left[1:] = row[:-1] - GAP
        flags |= np.where(left == row, LEFT, 0).astype(np.uint8)
        moves[i] = flags
        prev = row
    return moves


def _traceback(moves: np.ndarray, prefer_diagonal: bool) -> list[tuple[int, int]]:
    """Walk back from the end; with ``prefer_diagonal=False`` gaps are taken first, so
    matches land as early as possible (the "old layers come first" tie rule)."""
    i, j = moves.shape[0] - 1, moves.shape[1] - 1
    pairs = []
    order = (DIAG, UP, LEFT) if prefer_diagonal else (UP, LEFT, DIAG)
    while i > 0 or j > 0:
        flags = int(moves[i, j])
        for move in order:
            if flags & move:
                break
        else:  # pragma: no cover - every reachable cell has a move
            raise RuntimeError("alignment table is inconsistent")
        if move == DIAG:
            pairs.append((i - 1, j - 1))
            i, j = i - 1, j - 1
        elif move == UP:
            i -= 1
        else:
            j -= 1
    pairs.reverse()
    return pairs


def leaf_layers(tree: Node) -> list[Node]:
    """The layers that hold variables, depth first in natural key order (``_operations/2`` before ``/10``).

    For ``.weights.h5`` keys the layer is the parent of its ``vars`` group.
    """
    out: list[Node] = []
    stack = [tree]
    while stack:
        node = stack.pop()
        holder = node.children.get("vars")
        if any(c.leaf is not None for c in node.children.values()) or (
            holder is not None and any(c.leaf is not None for c in holder.children.values())
        ):
            out.append(node)
        inner = [k for k, c in node.children.items() if c.leaf is None and c.path.rpartition("/")[2] != "vars"]
        if inner:
            stack.extend(reversed([node.children[k] for k in sorted(inner, key=_natural)]))
    return out


def align_layers(
    s_layers: list[Node],
    t_layers: list[Node],
    s_open: list[int],
    t_open: list[int],
    anchors: list[tuple[int, int]],
    ns: str | Namespace,
) -> Alignment:
    """Align the open leaf layers of two flat layer sequences, between anchors already paired.

    ``anchors`` are ``(source index, target index)`` pairs decided before; the
    ones that keep both orders split the sequences into segments, and only
    open layers of the same segment can pair, so a layer removed in one place is
    never taken for one inserted somewhere else. Pairs come back with
    ``how="nesting"``; a tie is marked ``by_order`` as in any sequence.
    """
    chain = _increasing_chain(sorted(set(anchors)))
    bounds = [(-1, -1)] + chain + [(len(s_layers), len(t_layers))]
    s_open_set, t_open_set = set(s_open), set(t_open)
    out = Alignment()
    for (i0, j0), (i1, j1) in zip(bounds, bounds[1:]):
        s_items = [s_layers[i] for i in range(i0 + 1, i1) if i in s_open_set]
        t_items = [t_layers[j] for j in range(j0 + 1, j1) if j in t_open_set]
        if s_items and t_items:
            _align_sequence(s_items, t_items, namespace_of(ns), out, False)
    out.pairs = [Pair(p.source, p.target, p.source_layer, p.target_layer, p.score, p.by_order, "nesting")
                 for p in out.pairs]
    return out


def _increasing_chain(pairs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The longest chain of pairs increasing in both coordinates (pairs sorted by the first)."""
    import bisect

    tails: list[int] = []  # tails[k]: smallest second coordinate ending a chain of length k + 1
    tail_index: list[int] = []
    parent: list[int] = [-1] * len(pairs)
    for n, (_, j) in enumerate(pairs):
        k = bisect.bisect_left(tails, j)
        if k == len(tails):
            tails.append(j)
            tail_index.append(n)
        else:
            tails[k], tail_index[k] = j, n
        parent[n] = tail_index[k - 1] if k else -1
    chain, n = [], tail_index[-1] if tail_index else -1
    while n != -1:
        chain.append(pairs[n])
        n = parent[n]
    return chain[::-1]


# Long sequences: the same dynamic programme restricted to a band of diagonals.
#
# Aligning n old layers with m new ones fills an (n + 1) x (m + 1) table: quadratic in
# time and memory (a 50,000-variable chain is ~17,000 layers: 290 million cells). A
# near-identical pair of sequences keeps every optimal path close to the diagonal, so
# the programme is run on the diagonals ``lo..hi`` only (``j - i`` of a cell), and the
# band is *proved* wide enough before its result is used: every path that leaves the
# band crosses diagonal ``lo - 1`` or ``hi + 1``, and an upper bound on the best path
# through any cell of those two diagonals (each row and column contributes at most its
# best score, each skipped item costs ``GAP``) must be below the band's optimum. Then
# every optimal path of the full table lies inside the band, the band's forward and
# backward values equal the full table's on every cell of an optimal path, and so the
# traceback, the forced pairs and the pairable targets are exactly those of the full
# table. If the proof fails the band is widened; past a quarter of the table the full
# programme runs instead. Cells of the band are stored skewed: row ``i``, column ``k``
# is cell ``(i, i + lo + k)``.

BAND_MIN_CELLS = 1 << 18  # below this many cells the full table is cheap
_NEG = np.iinfo(np.int64).min // 4


def _band_forward(skew: np.ndarray, n: int, m: int, lo: int, want_moves: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Forward values (and move flags) of the band; ``skew[r, k]`` scores pair ``(r, r + lo + k)``.

    Row ``i`` holds the cells ``j = i + lo + k`` that exist (``0 <= j <= m``): one run of
    ``k``. Only the values need the row-by-row loop; the move flags are read off the
    finished table in one pass.
    """
    width = skew.shape[1]
    ks = np.arange(width, dtype=np.int64)
    gap_k = GAP * ks
    values = np.full((n + 1, width), _NEG, dtype=np.int64)
    j = lo + ks
    valid = (j >= 0) & (j <= m)
    values[0] = np.where(valid, -GAP * j, _NEG)
    allowed = skew > 0
    up = np.empty(width, dtype=np.int64)
    up[-1] = _NEG
    for i in range(1, n + 1):
        prev = values[i - 1]
        first, last = min(max(0, -i - lo), width), max(-1, min(width - 1, m - i - lo))  # the valid run of k
        diag = np.where(allowed[i - 1], prev + skew[i - 1], _NEG)
        np.subtract(prev[1:], GAP, out=up[:-1])
        vertical = np.maximum(diag, up)
        if first == -i - lo and first < width:
            vertical[first] = -GAP * i  # the first column holds only gaps
        row = values[i]
        np.add(vertical, gap_k, out=row)
        np.maximum.accumulate(row, out=row)
        row -= gap_k
        np.maximum(row, _NEG, out=row)
        row[:first] = _NEG
        row[last + 1:] = _NEG
    if not want_moves:
        return values, None
    prev, rows = values[:-1], values[1:]
    diag = np.where(allowed, prev + skew, _NEG)
    up = np.full((n, width), _NEG, dtype=np.int64)
    up[:, :-1] = prev[:, 1:] - GAP
    left = np.full((n, width), _NEG, dtype=np.int64)
    left[:, 1:] = rows[:, :-1] - GAP
    moves = np.zeros((n + 1, width), dtype=np.uint8)
    moves[0] = np.where(valid & (j > 0), LEFT, 0)
    flags = (np.where(diag == rows, DIAG, 0) | np.where(up == rows, UP, 0) | np.where(left == rows, LEFT, 0))
    jj = np.arange(1, n + 1, dtype=np.int64)[:, None] + lo + ks[None, :]
    flags[jj == 0] = UP
    flags[(jj < 0) | (jj > m)] = 0
    moves[1:] = flags
    return values, moves


def _band_bound_ok(rowmax: np.ndarray, colmax: np.ndarray, n: int, m: int, lo: int, hi: int, best: int) -> bool:
    """Whether every path through diagonal ``lo - 1`` or ``hi + 1`` scores below ``best`` (see above)."""
    rp = np.concatenate(([0], np.cumsum(rowmax, dtype=np.int64)))
    cp = np.concatenate(([0], np.cumsum(colmax, dtype=np.int64)))
    rs, cs = rp[-1] - rp, cp[-1] - cp
    for d in (lo - 1, hi + 1):
        if d < -n or d > m:
            continue  # no cell on that diagonal: nothing can leave the band that way
        i = np.arange(max(0, -d), min(n, m - d) + 1, dtype=np.int64)
        j = i + d
        ahead, behind = (n - i) - (m - j), (m - j) - (n - i)
        upper = (np.minimum(rp[i] - GAP * np.maximum(0, j - i), cp[j] - GAP * np.maximum(0, i - j))
                 + np.minimum(rs[i] - GAP * np.maximum(0, behind), cs[j] - GAP * np.maximum(0, ahead)))
        if upper.size and int(upper.max()) >= best:
            return False
    return True


def _band_align(band_scores, rowmax: np.ndarray, colmax: np.ndarray, n: int, m: int,
                slack: int = 8, give_up: bool = True) -> tuple[list[tuple[int, int]], set[tuple[int, int]], set[int]] | None:
    """``(early traceback, forced pairs, pairable targets)`` from a proved band, or None if no band pays.

    ``band_scores(rows, cols)`` scores arrays of pairs (``0`` where they cannot pair);
    ``rowmax`` / ``colmax`` bound each row's / column's best score from above.
    ``give_up=False`` widens the band up to the whole table instead of returning None (tests).
    """
    base_lo, base_hi = min(0, m - n), max(0, m - n)
    while True:
        lo, hi = max(-n, base_lo - slack), min(m, base_hi + slack)
        width = hi - lo + 1
        if give_up and width * 4 > m + 1:
            return None
        r = np.arange(n, dtype=np.int64)[:, None]
        c = r + lo + np.arange(width, dtype=np.int64)[None, :]
        inside = (c >= 0) & (c < m)
        skew = np.zeros((n, width), dtype=np.int64)
        skew[inside] = band_scores(np.broadcast_to(r, c.shape)[inside], c[inside])
        forward, moves = _band_forward(skew, n, m, lo, want_moves=True)
        end = (m - n) - lo
        best = int(forward[n, end])
        if _band_bound_ok(rowmax, colmax, n, m, lo, hi, best):
            break
        slack = max(1, slack * 4)
    backward = _band_forward(skew[::-1, ::-1], n, m, (m - n) - hi, want_moves=False)[0][::-1, ::-1]
    on_path = forward + backward == best
    ks = np.arange(width, dtype=np.int64)
    levels = 2 * np.arange(n + 1, dtype=np.int64)[:, None] + lo + ks[None, :]
    per_level = np.bincount(levels[on_path], minlength=n + m + 2)
    level = np.clip(levels[:-1], 0, n + m)
    optimal_pair = (skew > 0) & on_path[:-1] & on_path[1:] & (forward[:-1] + skew == forward[1:]) & inside
    forced = optimal_pair & (per_level[level] == 1) & (per_level[level + 1] == 0)
    fi, fk = np.nonzero(forced)
    pi, pk = np.nonzero(optimal_pair)
    # Traceback as _traceback(prefer_diagonal=False): gaps first, so matches land as early as possible.
    i, k, pairs = n, end, []
    while i > 0 or i + lo + k > 0:
        flags = int(moves[i, k])
        if flags & UP:
            i, k = i - 1, k + 1
        elif flags & LEFT:
            k -= 1
        elif flags & DIAG:
            pairs.append((i - 1, i - 1 + lo + k))
            i -= 1
        else:  # pragma: no cover - every reachable cell has a move
            raise RuntimeError("alignment band is inconsistent")
    pairs.reverse()
    return (pairs, {(int(a), int(a + lo + b)) for a, b in zip(fi, fk)},
            {int(a + lo + b) for a, b in zip(pi, pk)})
