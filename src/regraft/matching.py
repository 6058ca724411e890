"""Decide, for every target variable, which checkpoint tensor it takes.

Stages run in order on what the previous stages left undecided:

1. ``rule``    — the user's rules: ``ignore`` drops checkpoint tensors, ``init``
   leaves model variables fresh, ``rename`` maps old keys to new ones;
2. ``exact``   — the same key in the checkpoint's namespace, for keys that name
   things (``encoder/dense/_kernel``). Keys that are *positions*
   (``_operations/12``, ``layer_with_weights-3``, ``layers/conv2d_7``) or
   auto-generated names (``dense_3/kernel``) are not trusted on their own: one
   inserted layer shifts them all;
3. ``name``    — the layer names the checkpoint records (:mod:`regraft.names`):
   a strong (chosen, not auto-generated) name that is unique on both sides
   pairs two layers, through any change of nesting;
4. ``aligned`` — structural alignment of the two architectures
   (:mod:`regraft.align`), with strong names as anchors; a positional key that
   the alignment confirms is reported as ``exact``. What the tree alignment
   leaves is aligned once more as flat sequences of leaf layers between the
   pairs already decided, which finds layers whose nesting changed.

Every decision carries a reason and a confidence. Equally good candidates are
reported as ``ambiguous`` and never loaded. A pairing that only order supports
(a tie among alike layers) is ``unconfirmed``: proposed, never loaded unless the
user confirms it (``accept_order=True``) or writes a rule.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from typing import Any, NamedTuple

from regraft.align import (
    Alignment,
    Node,
    Pair,
    align_layers,
    align_trees,
    build_tree,
    compatible_roles,
    leaf_children,
    leaf_layers,
)
from regraft.entries import WEIGHT, SourceEntry, Stage, TargetVariable
from regraft.errors import RegraftError
from regraft.growth import apply_policy, with_steps
from regraft.keys import OBJECT, Namespace
from regraft.layouts import view_targets
from regraft.keys import namespace as namespace_of
from regraft.naming import matches_any
from regraft.names import NamedLayer, Token, is_auto_name, model_prefixes, pair_by_names, split_counter, strip_prefix
from regraft.plans import (
    AMBIGUOUS,
    CAST,
    LOADED,
    MISSING,
    SHAPE_MISMATCH,
    UNCONFIRMED,
    Assignment,
    Plan,
    fingerprint_source,
    fingerprint_target,
    status_for,
)
from regraft.rules import IGNORE, INIT, RENAME, TRANSFORM, Rule
from regraft.sources.base import Source

__all__ = ["make_plan", "choose_root", "is_positional"]


class Decision(NamedTuple):
    """Which tensor a variable takes, decided by which stage, why, and how surely."""

    entry: SourceEntry
    stage: Stage
    reason: str
    confidence: float
    order_only: bool = False  # only order among alike layers supports it: the user confirms
    structural: bool = False  # made by aligning the architectures (not by a rule, a key or a name)

# Confidence of each kind of decision (see docs/design.md; bench/bench_zoo.py checks them by value).
CONFIDENCE_RULE = 1.0
CONFIDENCE_NAME = 0.95
CONFIDENCE_STRUCTURE = 0.9  # same structure, every optimal alignment agrees
CONFIDENCE_NESTING = 0.8  # same structure, found through a change of nesting
CONFIDENCE_RESIZED = 0.5  # the same position, some shapes differ
CONFIDENCE_ORDER = 0.3  # a tie among alike layers broken by order: unconfirmed



def is_positional(key: str, ns: str | Namespace) -> bool:
    """True when ``key`` addresses a layer by its position rather than by a name (see :mod:`regraft.keys`).

    Example:
        >>> is_positional("_operations/3/_kernel", "object"), is_positional("encoder/d/_kernel", "object")
        (True, False)
    """
    return namespace_of(ns).is_positional(key)


def choose_root(source: Source, targets: list[TargetVariable], root: str | None) -> str:
    """The saved object whose subtree holds the model's weights.

    A checkpoint may hold several objects (``model``, ``optimizer``, an EMA copy).
    The user's ``root`` wins; otherwise the candidate whose keys match the most
    target keys, then one named ``model``, then the saved root itself.
    """
    # Saved objects are named children of the saved root (model, optimizer, ema). A layer group
    # (.weights.h5, Keras 2 .h5, TF1 scopes) or a numbered layer (layer_with_weights-0) is part of
    # the one model the file holds, never a root of its own.
    ns = namespace_of(source.namespace)
    candidates = [""] + [r for r in source.roots() if r and ns.saved_objects and not ns.position(r, "")]
    if root is not None:
        root = root.strip("/")
        if root not in candidates and root not in source.roots():
            raise RegraftError(
                f"Root '{root}' is not an object of {source.path}. Objects holding weights: "
                + ", ".join(repr(c) for c in candidates if c) + ".",
                hint="Pass one of those names as root=, or leave it out to choose automatically.",
            )
        return root
    wanted = {t.keys[source.namespace] for t in targets if source.namespace in t.keys}
    keys = [e.key for e in source.entries() if e.kind == WEIGHT]

    scores: dict[str, tuple[int, int, int]] = {}

    def score(candidate: str) -> tuple[int, int, int]:
        found = scores.get(candidate)
        if found is None:
            prefix = candidate + "/" if candidate else ""
            hits = sum(1 for k in keys if k.startswith(prefix) and k[len(prefix) :] in wanted)
            found = scores[candidate] = (hits, candidate == "model", candidate == "")
        return found

    ranked = sorted(candidates, key=score, reverse=True)
    best = ranked[0]
    if score(best)[0] == 0:
        # No key says which object is the model. Two objects holding the same keys are copies
        # (a model and its EMA): which one the user means, only the user knows.
        by_keys: dict[frozenset[str], list[str]] = {}
        for candidate in candidates[1:]:
            relative = frozenset(k[len(candidate) + 1 :] for k in keys if k.startswith(candidate + "/"))
            by_keys.setdefault(relative, []).append(candidate)
        copies = next((group for group in by_keys.values() if len(group) > 1), None)
        if copies and "model" not in candidates:
            raise _several_roots(source, copies)
        if best == "" and len(candidates) == 2:
            return candidates[1]  # a single saved object: that is the model
    elif len(ranked) > 1 and score(ranked[1]) == score(best):
        raise _several_roots(source, [c for c in ranked if score(c) == score(best)])
    return best


def _several_roots(source: Source, candidates: list[str]) -> RegraftError:
    names = " and ".join(repr(c) for c in sorted(candidates))
    return RegraftError(
        f"{source.path} holds several objects that fit the model equally well: {names} (a model and a copy of it, "
        "such as an EMA?). regraft does not pick one.",
        hint=f"Choose with root={sorted(candidates)[0]!r} (CLI --root {sorted(candidates)[0]}).",
    )


def make_plan(
    targets: list[TargetVariable],
    source: Source,
    *,
    target_layers: dict[str, tuple[str | None, str | None]] | None = None,
    rules: tuple[Rule, ...] = (),
    allow_missing: tuple[str, ...] = (),
    allow_unused: tuple[str, ...] = (),
    root: str | None = None,
    model_name: str = "",
    reshape: str = "error",
    graph: list[Any] | None = None,
    noise: float = 0.0,
    accept_order: bool = False,
    model_classes: frozenset[str] = frozenset(),
) -> Plan:
    """Match every target variable to a source tensor or none, from metadata only.

    ``reshape`` is the policy for matched tensors of another shape (see
    :mod:`regraft.growth`); ``graph`` (from ``targets.layer_graph``) is what the
    ``preserve`` policy follows. ``accept_order`` loads pairings that only order
    supports instead of leaving them ``unconfirmed``. ``model_classes`` are the
    model's layer classes in snake case: names built from them are auto-generated.
    """
    namespace = source.namespace
    ns = namespace_of(namespace)
    targets = _reachable(targets, ns)
    originals = targets
    layout_back: dict[str, tuple[TargetVariable, str | None]] = {}
    if ns.layout:  # another framework's layouts: compare each variable as that framework stores it
        targets, layout_back = view_targets(targets, ns.layout, namespace)
    root = choose_root(source, targets, root)
    prefix = root + "/" if root else ""
    available: dict[str, SourceEntry] = {}
    outside, optimizer, ignored = [], [], []
    rule_counts = {rule.number: 0 for rule in rules}
    ignore_rules = [r for r in rules if r.kind == IGNORE]
    for entry in source.entries():
        if entry.kind != WEIGHT:
            optimizer.append(entry)
        elif not entry.key.startswith(prefix):
            outside.append(entry)
        else:
            relative = entry.key[len(prefix) :]
            rule = next((r for r in ignore_rules if r.matches([relative, entry.key])), None) if ignore_rules else None
            if rule is not None:
                rule_counts[rule.number] += 1
                ignored.append((entry, str(rule)))
            else:
                available[relative] = entry

    decided: dict[str, Decision] = {}
    fresh: dict[str, tuple[str, str]] = {}  # target key -> (reason, allowed by)
    init_rules = [r for r in rules if r.kind == INIT]
    for target in targets if init_rules else ():
        rule = next((r for r in init_rules if r.matches([target.key, *target.keys.values()])), None)
        if rule is not None:
            rule_counts[rule.number] += 1
            fresh[target.key] = (f"{rule}: left fresh on purpose", str(rule))

    source_layers = {k[len(prefix) :]: v for k, v in source.layers().items() if k.startswith(prefix)}
    names = _Names(ns, source_layers, target_layers or {}, available, model_name, model_classes)
    open_targets = [t for t in targets if t.key not in fresh]
    used: set[int] = set()  # the entries decided so far; each stage decides only targets still open

    def decide(stage: dict[str, Decision]) -> None:
        decided.update(stage)
        used.update(id(d[0]) for d in stage.values())

    decide(_rename_stage(open_targets, available, namespace, rules, rule_counts))
    decide(_rename_layers_stage([t for t in open_targets if t.key not in decided], available, ns,
                                rules, rule_counts, source_layers, used))
    decide(_exact_stage([t for t in open_targets if t.key not in decided], available, ns, used, names))
    decide(_name_stage([t for t in open_targets if t.key not in decided], available, ns, used, names))

    source_tree, target_tree = _trees(targets, available, namespace, names)
    alignment = align_trees(source_tree, target_tree, ns)
    ambiguous: dict[str, tuple[str, ...]] = {}
    for pair in alignment.pairs:
        target, entry = pair.target, pair.source
        if target.key in decided or target.key in fresh or id(entry) in used:
            continue
        decided[target.key] = _aligned_decision(pair, namespace, prefix, names)
        used.add(id(entry))
    under = _by_layer_prefix(targets, namespace) if alignment.ambiguous else {}
    for layer, candidates in alignment.ambiguous.items():
        for target in under.get(layer, ()):
            key = target.keys.get(namespace, "")
            if target.key not in decided:
                relative = key[len(layer) :]
                found = [available[c + relative].key for c in candidates if c + relative in available]
                # Every candidate holds this variable: name the tensors; otherwise the layers.
                ambiguous[target.key] = (tuple(found) if len(found) == len(candidates)
                                         else tuple(prefix + c for c in candidates))
    # What is left on both sides: aligned again as flat sequences of leaf layers, between the
    # layers already paired (a model split into a sub-model and a head, Sequential made functional).
    layers = leaf_layers(source_tree), leaf_layers(target_tree)  # both stages below walk them
    nested = _nesting_stage(layers, ns, decided, used, fresh, ambiguous)
    for pair in nested.pairs:
        decided[pair.target.key] = _aligned_decision(pair, namespace, prefix, names)
        used.add(id(pair.source))
    if ns.drops_dict_keys:
        for target in _dict_items(targets, ns):
            decision = decided.get(target.key)
            if decision is not None and decision.stage in (Stage.EXACT, Stage.ALIGNED):
                decided[target.key] = decision._replace(
                    reason=decision.reason + "; a dict item: .weights.h5 does not keep dict keys, only order",
                    confidence=CONFIDENCE_ORDER, order_only=True)
    tied_layers = {layer + "/" for layer in (*alignment.tied, *nested.tied)}
    tied = {t.key for t in targets if t.key not in decided
            and tied_layers and _under_any(t.keys.get(namespace, ""), tied_layers)}
    tied |= _elsewhere_alike(layers, ns, decided, used, prefix)
    removed = [key for key in alignment.removed if not _has_used(source_tree, key, used)]

    assignments = []
    for target in targets:
        assignments.append(_assignment(target, decided.get(target.key), fresh.get(target.key),
                                       ambiguous.get(target.key, ()), allow_missing, accept_order,
                                       target.key in tied))
    if layout_back:
        assignments = [_from_layout(a, layout_back, ns.layout or "") for a in assignments]
    policed = apply_policy(assignments, reshape, graph, noise)
    # Reshape policies think in Keras layouts: a mismatched tensor in another layout stays a mismatch.
    assignments = [a if a.status == SHAPE_MISMATCH and layout_back.get(a.target.key, (None, None))[1] else p
                   for a, p in zip(assignments, policed)]
    assignments = _transform_rules(assignments, rules, rule_counts)
    unused = tuple(
        (entry, matches_any([key, entry.key], allow_unused)) for key, entry in available.items() if id(entry) not in used
    )
    return Plan(
        source_path=source.path,
        source_format=source.format,
        root=root,
        assignments=tuple(assignments),
        namespace=namespace,
        model_name=model_name,
        unused=unused,
        ignored=tuple(ignored),
        outside=tuple(outside),
        optimizer=tuple(optimizer),
        rules=tuple((rule, rule_counts[rule.number]) for rule in rules),
        inserted=_inserted_layers(assignments),
        removed=tuple(_named(prefix + key, source_layers.get(key, (None, None))[0]) for key in removed),
        source_fingerprint=fingerprint_source(source.entries()),
        target_fingerprint=fingerprint_target(originals),
    )


def _by_layer_prefix(targets: list[TargetVariable], namespace: str) -> dict[str, list[TargetVariable]]:
    """Targets by every ``/``-ended head of their key in ``namespace`` (without the ``/``), in order.

    ``out[layer]`` lists the targets whose key starts with ``layer + "/"``: one lookup
    per ambiguous layer instead of a pass over every target.
    """
    out: dict[str, list[TargetVariable]] = {}
    for target in targets:
        key = target.keys.get(namespace, "")
        end = key.find("/")
        while end != -1:
            out.setdefault(key[:end], []).append(target)
            end = key.find("/", end + 1)
    return out


def _from_layout(a: Assignment, back: dict[str, tuple[TargetVariable, str | None]], layout: str) -> Assignment:
    """An assignment made on a variable's view in another layout, for the variable itself.

    A tensor taken whole goes through the layout's transform (``linear_to_dense``)
    even when the shapes happen to agree (a square kernel is still transposed).
    """
    target, transform = back[a.target.key]
    a = replace(a, target=target)
    if a.source is None:
        return a
    if a.status in (LOADED, CAST) and transform:
        return with_steps(a, [(transform, {})], f"{layout} layout: {transform}")
    if a.status in (LOADED, CAST):
        return replace(a, status=status_for(a.source, target))
    if a.status == SHAPE_MISMATCH and transform:
        return replace(a, reason=f"{a.reason}; in {layout} layout (reshape policies do not convert layouts)"
                       if a.reason else f"in {layout} layout (reshape policies do not convert layouts)")
    return a


def _reachable(targets: list[TargetVariable], ns: Namespace) -> list[TargetVariable]:
    """Give a key in ``namespace`` to variables the framework's own walk does not reach.

    Keras 3's object graph leaves out layers held in a plain list attribute
    (``self.blocks = [...]``), so they have no ``object`` key; tf.keras saved them
    (``blocks/0/kernel``). Their readable key has the same shape and takes part in
    matching like any other key (its list index is a position, never trusted alone).
    """
    if ns is not OBJECT:
        return targets
    taken = {t.keys[ns.name] for t in targets if ns.name in t.keys}
    return [t if ns.name in t.keys or t.key in taken else replace(t, keys={**t.keys, ns.name: t.key})
            for t in targets]


class _Names:
    """The strong layer names of both sides, normalised, and each layer's name path.

    Auto-generated names are weak evidence and are left out here entirely, so
    nothing downstream can rest a decision on them. Model-name prefixes that
    change with the model (``convnext_tiny_…`` → ``convnext_small_…``) are stripped.
    """

    def __init__(self, ns: Namespace, source_layers: dict[str, tuple[str | None, str | None]],
                 target_layers: dict[str, tuple[str | None, str | None]], available: dict[str, SourceEntry],
                 model_name: str, model_classes: frozenset[str]) -> None:
        self.ns = ns
        self.classes = model_classes
        if ns.keys_are_names:  # every segment of a layer key is a name
            source_raw = {seg for key in available for seg in key.split("/")[:-1]}
            target_raw = {seg for key in target_layers for seg in key.split("/")}
        else:
            source_raw = {name for name, _ in source_layers.values() if name}
            target_raw = {name for name, _ in target_layers.values() if name}
        self.source_prefix, self.target_prefix = model_prefixes(source_raw, target_raw, model_name)
        self.source = {key: self._token(name, kind, self.source_prefix) for key, (name, kind) in source_layers.items()}
        self.target = {key: self._token(name, kind, self.target_prefix) for key, (name, kind) in target_layers.items()}
        self._source_counts = Counter(t.text for t in self.source.values() if t is not None)
        self._target_counts = Counter(t.text for t in self.target.values() if t is not None)
        self.source_kinds = {key: kind for key, (_, kind) in source_layers.items()}
        self.target_kinds = {key: kind for key, (_, kind) in target_layers.items()}

    def _token(self, name: str | None, kind: str | None, prefix: str) -> Token | None:
        if not name:
            return None
        return Token(strip_prefix(name, prefix), not is_auto_name(name, kind, self.classes))

    def strong(self, side: str, key: str) -> str | None:
        """The strong, normalised name of the layer at ``key`` on ``side`` (``source`` or ``target``), if any.

        A name that two layers of one side carry (an outer head named like the wrapped
        model's last layer) tells them apart from nothing: it is not evidence here.
        """
        table = self.source if side == "source" else self.target
        token = table.get(key)
        if token is None or not token.strong:
            return None
        counts = self._source_counts if side == "source" else self._target_counts
        return token.text if counts[token.text] == 1 else None

    def path(self, side: str, layer_key: str) -> tuple[Token, ...]:
        """The name path of a layer: one token per named level (see :mod:`regraft.names`)."""
        table = self.source if side == "source" else self.target
        prefix = self.source_prefix if side == "source" else self.target_prefix
        segments = layer_key.split("/") if layer_key else []
        tokens = []
        for i, segment in enumerate(segments):
            if self.ns.keys_are_names:
                tokens.append(Token(strip_prefix(segment, prefix), not is_auto_name(segment, None, self.classes)))
            elif self.ns.position(segment, segments[i - 1] if i else ""):
                token = table.get("/".join(segments[: i + 1]))
                if token is not None:
                    tokens.append(token)
            elif segment not in self.ns.containers:
                token = table.get("/".join(segments[: i + 1])) if self.ns.records_layer_names else None
                # An attribute: named in code. Where both sides also record the layer's own name at
                # every level (.weights.h5), a chosen one says more (a layer moved into a custom layer).
                tokens.append(token if token is not None and token.strong else Token(segment, True))
        return tuple(tokens)

    def label(self, side: str, layer_key: str) -> str:
        """A layer key for people: with the layer's recorded name where the key is a position (``_operations/89 (conv4_block3_1_conv)``)."""
        table = self.source if side == "source" else self.target
        token = table.get(layer_key)
        if token is None or token.text == layer_key.rpartition("/")[2]:
            return layer_key
        return f"{layer_key} ({token.text})"

    def auto_key(self, key: str) -> bool:
        """For keys that are names (TF1, Keras 2 ``.h5``): the owning layer's name is auto-generated."""
        layer = key.rpartition("/")[0].rpartition("/")[2]
        return bool(layer) and is_auto_name(layer, None, self.classes)


def _dict_items(targets: list[TargetVariable], ns: Namespace) -> list[TargetVariable]:
    """Model variables held (at some depth) by an item of a dict attribute, where ``.weights.h5`` keys are used.

    Keras saves a dict's items like a list's, under class-and-counter names
    (``heads/dense_1``), and drops the keys: the readable key (``heads/cls/kernel``)
    is the only place the dict key shows.
    """
    out = []
    held: dict[tuple[str, str], bool] = {}  # (key's parent, readable layer key) -> held by a dict item: once per layer
    for target in targets:
        key = target.keys.get(ns.name, "")
        parent, readable_layer = key.rpartition("/")[0], target.key.rpartition("/")[0]
        found = held.get((parent, readable_layer))
        if found is None:
            found = held[(parent, readable_layer)] = _in_dict_item(ns.split(key)[0], readable_layer, ns)
        if found:
            out.append(target)
    return out


def _in_dict_item(layer: str, readable_layer: str, ns: Namespace) -> bool:
    """Whether a layer's ``.weights.h5`` key passes an auto-named item whose readable key names it otherwise."""
    parts = layer.split("/")
    segments = [(seg, i > 0 and parts[i - 1] in ns.containers)
                for i, seg in enumerate(parts) if seg not in ns.containers]
    readable = readable_layer.split("/")
    if len(segments) != len(readable):
        return False
    return any(not under_layers and is_auto_name(seg) and name != seg and not name.isdigit()
               for (seg, under_layers), name in zip(segments, readable))


def _name_stage(targets: list[TargetVariable], available: dict[str, SourceEntry], ns: Namespace,
                used: set[int], names: _Names) -> dict[str, Decision]:
    """Pair layers by the strong names both sides record, then their variables by segment."""
    split = _layer_splitter(ns)
    source_groups: dict[str, dict[str, SourceEntry]] = {}
    for key, entry in available.items():
        if id(entry) not in used:
            layer, leaf = split(key)
            source_groups.setdefault(layer, {})[leaf] = entry
    target_groups: dict[str, dict[str, TargetVariable]] = {}
    for target in targets:
        if ns.name in target.keys:
            layer, leaf = split(target.keys[ns.name])
            target_groups.setdefault(layer, {})[leaf] = target
    sources = [NamedLayer(k, names.path("source", k), frozenset(v), names.source_kinds.get(k))
               for k, v in source_groups.items()]
    wanted = [NamedLayer(k, names.path("target", k), frozenset(v), names.target_kinds.get(k))
              for k, v in target_groups.items()]
    out: dict[str, Decision] = {}
    for s_layer, t_layer, token in pair_by_names(sources, wanted, compatible_roles):
        for leaf, target in target_groups[t_layer.key].items():
            entry = source_groups[s_layer.key].get(leaf)
            if entry is not None:
                reason = f"same layer name '{token.text}' recorded in the checkpoint (layer {s_layer.key} -> {t_layer.key})"
                out[target.key] = Decision(entry, Stage.NAME, reason, CONFIDENCE_NAME)
    return out


def _layer_splitter(ns: Namespace) -> Any:
    """``ns.split``, computing each layer once: the layer depends only on what precedes the key's last ``/``."""
    layers: dict[str, str] = {}

    def split(key: str) -> tuple[str, str]:
        parent, _, leaf = key.rpartition("/")
        layer = layers.get(parent)
        if layer is None:
            layer = layers[parent] = ns.split(key)[0]
        return layer, leaf

    return split


def _trees(targets: list[TargetVariable], available: dict[str, SourceEntry], namespace: str,
           names: _Names) -> tuple[Node, Node]:
    """Key trees of both sides, their layers carrying strong names only."""
    source_tree = build_tree(
        [(key, entry, entry.shape) for key, entry in available.items()],
        {key: (names.strong("source", key), kind) for key, kind in names.source_kinds.items()},
    )
    target_tree = build_tree(
        [(t.keys[namespace], t, t.shape) for t in targets if namespace in t.keys],
        {key: (names.strong("target", key), kind) for key, kind in names.target_kinds.items()},
    )
    return source_tree, target_tree


def _nesting_stage(layers: tuple[list[Node], list[Node]], ns: Namespace, decided: dict[str, Decision],
                   used: set[int], fresh: dict[str, tuple[str, str]], ambiguous: dict[str, tuple[str, ...]]) -> Alignment:
    """Align the leaf layers nothing was decided for, as flat sequences between the pairs already made.

    ``layers`` are the leaf layers of the source and target trees (:func:`~regraft.align.leaf_layers`).
    """
    s_layers, t_layers = layers
    s_kind, t_kind = _kinds_of(s_layers), _kinds_of(t_layers)
    if ns.lists_by_class and all(s_kind.values()) and all(t_kind.values()):
        # .weights.h5 and Keras 2 .h5 keys order layers alphabetically (by class where Keras named
        # them: conv2d, conv2d_1), by creation only within a class: align class by class.
        out = Alignment()
        for kind in sorted(set(s_kind.values()) & set(t_kind.values())):
            part = _nesting_stage_of([n for n in s_layers if s_kind[id(n)] == kind],
                                     [n for n in t_layers if t_kind[id(n)] == kind], ns, decided, used, fresh,
                                     ambiguous)
            out.pairs.extend(part.pairs)
            out.tied.extend(part.tied)
        return out
    return _nesting_stage_of(s_layers, t_layers, ns, decided, used, fresh, ambiguous)


def _kinds_of(layers: list[Node]) -> dict[int, str]:
    """Each layer's class where known: recorded, or read off an auto-generated name (conv2d_1 → conv2d)."""
    out = {}
    for node in layers:
        last = node.path.rpartition("/")[2]
        out[id(node)] = node.kind or (split_counter(last)[0] if is_auto_name(last) else "")
    return out


def _nesting_stage_of(s_layers: list[Node], t_layers: list[Node], ns: Namespace, decided: dict[str, Decision],
                      used: set[int], fresh: dict[str, tuple[str, str]],
                      ambiguous: dict[str, tuple[str, ...]]) -> Alignment:
    owner = {id(child.leaf): i for i, node in enumerate(s_layers) for child in leaf_children(node)}
    anchors: list[tuple[int, int]] = []
    s_open, t_open = [], []
    for j, node in enumerate(t_layers):
        keys = [child.leaf.key for child in leaf_children(node)]
        sources = {owner.get(id(decided[k][0])) for k in keys if k in decided}
        anchors.extend((i, j) for i in sources if i is not None)
        if not sources and not any(k in fresh or k in ambiguous for k in keys):
            t_open.append(j)
    # A tensor some ambiguous variable could take is contested, not free: pairing it here would
    # settle by elimination what the alignment called a tie.
    contested = {c for candidates in ambiguous.values() for c in candidates}  # tensor keys or layer keys

    def is_contested(key: str) -> bool:
        return key in contested or any(key.startswith(c + "/") for c in contested)

    for i, node in enumerate(s_layers):
        children = leaf_children(node)
        if not any(id(c.leaf) in used or is_contested(c.leaf.key) for c in children):
            s_open.append(i)
    return align_layers(s_layers, t_layers, s_open, t_open, anchors, ns)


def _under_any(key: str, layers: set[str]) -> bool:
    """Whether ``key`` starts with one of ``layers`` (each ending in ``/``): one set lookup per ``/`` of the key."""
    end = key.find("/")
    while end != -1:
        if key[:end + 1] in layers:
            return True
        end = key.find("/", end + 1)
    return False


def _elsewhere_alike(layers: tuple[list[Node], list[Node]], ns: Namespace, decided: dict[str, Decision],
                     used: set[int], prefix: str) -> set[str]:
    """Positional pairs that an alike layer in another container could equally explain: made order-only.

    A model wrapped in another with a head shaped like its last layer, or unwrapped:
    the alignment pairs the layers at the same depth, but the alike layer one level
    down (or up) is just as good a counterpart. Such a pair is not certain; the
    alike layer left without a source is returned (it is a confirmation too).
    """
    s_layers, t_layers = layers
    owner = {id(c.leaf): node for node in s_layers for c in leaf_children(node)}

    # Both are asked again and again for the same layers (every rival test): computed once each.
    signatures: dict[int, tuple] = {}
    containers: dict[str, str] = {}

    def signature(node: Node) -> tuple:
        found = signatures.get(id(node))
        if found is None:
            found = signatures[id(node)] = tuple(
                sorted((c.path.rpartition("/")[2], c.shape) for c in leaf_children(node)))
        return found

    def container(node: Node) -> str:
        found = containers.get(node.path)
        if found is None:
            found = containers[node.path] = ns.split(node.path + "/x")[0].rpartition("/")[0]
        return found

    free_sources: dict[tuple, list[Node]] = {}
    for node in s_layers:
        if not any(id(c.leaf) in used for c in leaf_children(node)):
            free_sources.setdefault(signature(node), []).append(node)
    free_targets: dict[tuple, list[Node]] = {}
    for node in t_layers:
        if not any(c.leaf.key in decided for c in leaf_children(node)):
            free_targets.setdefault(signature(node), []).append(node)
    # Which source containers each target container's decided layers came from, and back: a rival
    # counts only in a container that corresponds to the pair's own (the wrapped model holds the
    # rest of the old model), not in a new block that merely has alike layers.
    sources_of: dict[str, set[str]] = {}
    targets_of: dict[str, set[str]] = {}
    for t_node in t_layers:
        t_container = None
        for c in leaf_children(t_node):
            d = decided.get(c.leaf.key)
            s_node = owner.get(id(d.entry)) if d is not None else None
            if s_node is not None:
                if t_container is None:
                    t_container = container(t_node)
                s_container = container(s_node)
                sources_of.setdefault(t_container, set()).add(s_container)
                targets_of.setdefault(s_container, set()).add(t_container)
    # ... or one whose other free layers could take free layers of the pair's own container.
    free_sigs_s: dict[str, set[tuple]] = {}
    for sig, nodes in free_sources.items():
        for node in nodes:
            free_sigs_s.setdefault(container(node), set()).add(sig)
    free_sigs_t: dict[str, set[tuple]] = {}
    for sig, nodes in free_targets.items():
        for node in nodes:
            free_sigs_t.setdefault(container(node), set()).add(sig)
    left: set[str] = set()
    # A layer can have a rival only with as many variables as some free layer of the other side.
    free_sizes_t = {len(sig) for sig in free_targets}
    free_sizes_s = {len(sig) for sig in free_sources}
    for t_node in t_layers:
        children = leaf_children(t_node)
        decisions = [d for d in map(decided.get, [c.leaf.key for c in children]) if d is not None]
        if not decisions or any(not d.structural or d.order_only for d in decisions):
            continue  # rules, exact keys that name things and recorded names are not in question here
        s_node = owner.get(id(decisions[0].entry))
        if s_node is None:
            continue
        rivals_t = [n for n in (free_targets.get(signature(t_node), [])
                                if len(children) in free_sizes_t else []) if container(n) != container(t_node)
                    and (container(s_node) in sources_of.get(container(n), set())
                         or free_sigs_t.get(container(n), set()) & free_sigs_s.get(container(s_node), set()))]
        rivals_s = [n for n in (free_sources.get(signature(s_node), [])
                                if len(leaf_children(s_node)) in free_sizes_s else []) if container(n) != container(s_node)
                    and (container(t_node) in targets_of.get(container(n), set())
                         or free_sigs_s.get(container(n), set()) & free_sigs_t.get(container(t_node), set()))]
        if not rivals_t and not rivals_s:
            continue
        for child in children:
            d = decided.get(child.leaf.key)
            if d is not None:
                decided[child.leaf.key] = d._replace(
                    reason=d.reason + "; an alike layer in another container fits as well (wrapped or unwrapped?)",
                    confidence=CONFIDENCE_ORDER, order_only=True)
        left.update(c.leaf.key for n in rivals_t for c in leaf_children(n))
    return left


def _has_used(tree: Node, key: str, used: set[int]) -> bool:
    node = tree
    for segment in key.split("/") if key else []:
        node = node.children.get(segment)
        if node is None:
            return False
    stack = [node]
    while stack:
        n = stack.pop()
        if n.leaf is not None and id(n.leaf) in used:
            return True
        stack.extend(n.children.values())
    return False


def _assignment(
    target: TargetVariable,
    decision: Decision | None,
    fresh: tuple[str, str] | None,
    candidates: tuple[str, ...],
    allow_missing: tuple[str, ...],
    accept_order: bool = False,
    tied: bool = False,
) -> Assignment:
    allowed = matches_any([target.key, *target.keys.values()], allow_missing) if allow_missing else None
    if fresh is not None:
        return Assignment(target, None, MISSING, Stage.RULE, fresh[0], fresh[1], 1.0)
    if decision is None and tied:
        # Inserted *somewhere* in a run of alike layers: taking the old layers to come first leaves
        # this one fresh, but another, equally good placement gives it an old layer.
        reason = "left fresh by order only: a tie among alike layers (another placement gives it an old layer)"
        if accept_order:
            return Assignment(target, None, MISSING, Stage.ALIGNED, reason + "; order accepted", allowed,
                              CONFIDENCE_ORDER, order_only=True)
        return Assignment(target, None, UNCONFIRMED, Stage.ALIGNED, reason, allowed, CONFIDENCE_ORDER, order_only=True)
    if decision is None:
        if candidates:
            return Assignment(target, None, AMBIGUOUS, Stage.ALIGNED, "equally good candidates", allowed, None, candidates)
        return Assignment(target, None, MISSING, Stage.NONE, "no counterpart in the checkpoint", allowed)
    entry, stage, reason, confidence, order_only = decision[:5]
    if order_only and not accept_order:
        return Assignment(target, entry, UNCONFIRMED, stage, reason, allowed, confidence, order_only=True)
    if order_only:
        reason += "; confirmed by accept_order"
    status = status_for(entry, target)
    if status == CAST:
        reason += f"; cast {entry.dtype} -> {target.dtype}"
    return Assignment(target, entry, status, stage, reason, allowed if status == SHAPE_MISMATCH else None, confidence,
                      order_only=order_only)


def _transform_rules(assignments: list[Assignment], rules: tuple[Rule, ...], counts: dict[int, int]) -> list[Assignment]:
    """Apply ``transform`` rules: the first matching rule decides a variable's transform."""
    transform_rules = [r for r in rules if r.kind == TRANSFORM]
    if not transform_rules:
        return assignments
    out = []
    for a in assignments:
        rule = next((r for r in transform_rules if r.matches([a.target.key, *a.target.keys.values()])), None)
        if rule is None or (a.source is None and rule.replacement != "identity_init"):
            out.append(a)
            continue
        counts[rule.number] += 1
        base = replace(a, steps=(), reason=a.reason.split("; ")[0])
        out.append(with_steps(base, [(rule.replacement or "", dict(rule.options))], str(rule)))
    return out


def _exact_stage(
    targets: list[TargetVariable], available: dict[str, SourceEntry], ns: Namespace, used: set[int], names: _Names
) -> dict[str, Decision]:
    """Equal keys, where the key names things: not a position, not an auto-generated layer name,
    and (where keys are names) not a layer name that two layers of one side carry."""
    out = {}
    layer_names: Counter = Counter()
    if ns.keys_are_names:  # only there are keys names that two layers may share
        layer_names.update(ns.split(t.keys[ns.name])[0].rpartition("/")[2] for t in targets if ns.name in t.keys)
        layer_names.update(ns.split(k)[0].rpartition("/")[2] for k in available)
    positional: dict[str, bool] = {}  # per layer: whether its key picks it by position (ns.is_positional)
    for target in targets:
        key = target.keys.get(ns.name)
        if key is None or key not in available or id(available[key]) in used:
            continue
        parent = key.rpartition("/")[0]  # the layer's key, with the variable group where there is one
        is_positional = positional.get(parent)
        if is_positional is None:
            is_positional = positional[parent] = ns.is_positional(key)
        if is_positional:
            continue
        if ns.keys_are_names and names.auto_key(key):
            continue  # dense_3/kernel: the counter depends on what the program built first
        if ns.keys_are_names and layer_names[ns.split(key)[0].rpartition("/")[2]] > 2:
            continue  # 'fc' is the wrapped model's last layer and the new head: a key, not evidence
        out[target.key] = Decision(available[key], Stage.EXACT, "exact key", CONFIDENCE_RULE)
    return out


def _rename_layers_stage(
    targets: list[TargetVariable],
    available: dict[str, SourceEntry],
    ns: Namespace,
    rules: tuple[Rule, ...],
    counts: dict[int, int],
    source_layers: dict[str, tuple[str | None, str | None]],
    used: set[int],
) -> dict[str, Decision]:
    """Scope renames applied to the layer names the checkpoint records.

    ``rename={"dense_layer_1/": "my_dense_layer/"}`` then works in every format,
    whatever the file's keys look like (``_operations/1/_kernel``,
    ``layers/dense/vars/0``): the layer the checkpoint names ``dense_layer_1``
    goes to the model layer ``my_dense_layer``, variable by variable.
    """
    renames = [r for r in rules if r.kind == RENAME and r.pattern.endswith("/")]
    if not renames or ns.keys_are_names:  # there the keys are the names: the key rename did it
        return {}
    by_layer: dict[str, dict[str, TargetVariable]] = {}
    for target in targets:
        if ns.name in target.keys:
            by_layer.setdefault(target.key.rpartition("/")[0], {})[ns.split(target.keys[ns.name])[1]] = target
    groups: dict[str, dict[str, SourceEntry]] = {}
    for key, entry in available.items():
        if id(entry) not in used:
            layer, leaf = ns.split(key)
            groups.setdefault(layer, {})[leaf] = entry
    out: dict[str, Decision] = {}
    for layer, (name, _) in source_layers.items():
        if not name or layer not in groups:
            continue
        for rule in renames:
            renamed = rule.rename(name + "/")
            if renamed is None:
                continue
            wanted = by_layer.get(renamed.rstrip("/"), {})
            for leaf, target in wanted.items():
                entry = groups[layer].get(leaf)
                if entry is not None and target.key not in out:
                    out[target.key] = Decision(entry, Stage.RULE, f"{rule} (layer named '{name}' in the checkpoint)",
                                               CONFIDENCE_RULE)
            counts[rule.number] += bool(wanted)
            break
    return out


def _rename_stage(
    targets: list[TargetVariable],
    available: dict[str, SourceEntry],
    namespace: str,
    rules: tuple[Rule, ...],
    counts: dict[int, int],
) -> dict[str, Decision]:
    """Rewrite source keys with the first rename rule that applies, then look the new key up.

    A rewritten key matches a target whose key in the source's namespace, or whose
    readable key, equals it. Two tensors renamed onto one variable is an error.
    """
    renames = [r for r in rules if r.kind == RENAME]
    if not renames:
        return {}
    by_key: dict[str, TargetVariable] = {}
    for target in targets:
        by_key.setdefault(target.key, target)
        if namespace in target.keys:
            by_key.setdefault(target.keys[namespace], target)
    out: dict[str, Decision] = {}
    for key, entry in available.items():
        for rule in renames:
            renamed = rule.rename(key)
            if renamed is None:
                continue
            target = by_key.get(renamed)
            if target is not None:
                if target.key in out:
                    raise RegraftError(
                        f"{rule} renames both '{out[target.key][0].key}' and '{entry.key}' onto variable '{target.key}'.",
                        hint="Make the rule more specific so that one tensor maps to each variable.",
                    )
                out[target.key] = Decision(entry, Stage.RULE, f"{rule}", CONFIDENCE_RULE)
                counts[rule.number] += 1
            break
    return out


def _align(
    targets: list[TargetVariable],
    target_layers: dict[str, tuple[str | None, str | None]] | None,
    available: dict[str, SourceEntry],
    source_layers: dict[str, tuple[str | None, str | None]],
    namespace: str,
) -> Alignment:
    source_tree = build_tree([(key, entry, entry.shape) for key, entry in available.items()], source_layers)
    target_tree = build_tree(
        [(t.keys[namespace], t, t.shape) for t in targets if namespace in t.keys], target_layers or {}
    )
    return align_trees(source_tree, target_tree, namespace)


def _aligned_decision(pair: Pair, namespace: str, prefix: str, names: "_Names") -> Decision:
    entry, target = pair.source, pair.target
    source_layer, target_layer = names.label("source", pair.source_layer), names.label("target", pair.target_layer)
    if entry.key == prefix + target.keys.get(namespace, "") and not pair.by_order:
        return Decision(entry, Stage.EXACT, "exact key (position confirmed by alignment)", CONFIDENCE_RULE,
                        structural=True)
    if pair.by_order:
        return Decision(entry, Stage.ALIGNED,
                        f"aligned: layer {source_layer} -> {target_layer}, placed by order only "
                        "(a tie among alike layers, no names to tell them apart)", CONFIDENCE_ORDER, True, True)
    how = {"name": "same layer name", "structure": "same structure under another name",
           "sequence": "by sequence alignment", "nesting": "by sequence alignment through a change of nesting"}
    if pair.score < 100:
        confidence = CONFIDENCE_RESIZED
    else:
        confidence = CONFIDENCE_NESTING if pair.how == "nesting" else CONFIDENCE_STRUCTURE
    shapes = "shapes equal" if entry.shape == target.shape else "shapes differ"
    reason = f"aligned: layer {source_layer} -> {target_layer} ({how.get(pair.how, pair.how)}, {shapes})"
    return Decision(entry, Stage.ALIGNED, reason, confidence, structural=True)


def _named(key: str, name: str | None) -> str:
    """A checkpoint layer key with its Keras name, where the format keeps one: ``layers/dense_3 (d3)``."""
    return f"{key} ({name})" if name and name != key.rpartition("/")[2] else key


def _inserted_layers(assignments: list[Assignment]) -> tuple[str, ...]:
    """Model layers with no counterpart: none of their variables has a source (after any
    reshape policy), and not because a rule or an ambiguity said so."""
    layers: dict[str, bool] = {}
    for a in assignments:
        counterpart = a.source is not None or a.stage == Stage.RULE or a.status == AMBIGUOUS
        layers[a.target.layer] = layers.get(a.target.layer, False) or counterpart
    return tuple(sorted(layer for layer, has in layers.items() if not has))
