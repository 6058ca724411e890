"""Decide, for every target variable, which checkpoint tensor it takes.

Stages run in order on what the previous stages left undecided:

1. ``rule``    — the user's rules: ``ignore`` drops checkpoint tensors, ``init``
   leaves model variables fresh, ``rename`` maps old keys to new ones;
2. ``exact``   — the same key in the checkpoint's namespace, for keys that name
   things (``encoder/dense/_kernel``). Keys that are *positions*
   (``_operations/12``, ``layer_with_weights-3``, ``layers/conv2d_7``) are not
   trusted on their own: one inserted layer shifts them all;
3. ``aligned`` — structural alignment of the two architectures
   (:mod:`regraft.align`); a positional key that the alignment confirms is
   reported as ``exact``.

Every decision carries a reason and a confidence. Equally good candidates are
reported as ``ambiguous`` and never loaded.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

from regraft.align import Alignment, Pair, align_trees, build_tree
from regraft.entries import WEIGHT, SourceEntry, TargetVariable
from regraft.errors import RegraftError
from regraft.growth import apply_policy, with_steps
from regraft.naming import matches_any
from regraft.plan import (
    AMBIGUOUS,
    CAST,
    LOADED,
    MISSING,
    SHAPE_MISMATCH,
    Assignment,
    Plan,
    fingerprint_source,
    fingerprint_target,
)
from regraft.rules import IGNORE, INIT, RENAME, TRANSFORM, Rule
from regraft.sources.base import Source

__all__ = ["make_plan", "choose_root", "is_positional"]

_POSITIONAL = {
    "object": re.compile(r"(^|/)\d+(/|$)"),
    "keras2": re.compile(r"(^|/)layer(_with_weights)?-\d+(/|$)"),
    "h5": re.compile(r"(^|/)layers/"),
}

Decision = tuple[SourceEntry, str, str, float]  # entry, stage, reason, confidence


def is_positional(key: str, namespace: str) -> bool:
    """True when ``key`` addresses a layer by its position rather than by a name.

    Example:
        >>> is_positional("_operations/3/_kernel", "object"), is_positional("encoder/d/_kernel", "object")
        (True, False)
    """
    pattern = _POSITIONAL.get(namespace)
    return bool(pattern and pattern.search(key.rpartition("/")[0]))


def choose_root(source: Source, targets: list[TargetVariable], root: str | None) -> str:
    """The saved object whose subtree holds the model's weights.

    A checkpoint may hold several objects (``model``, ``optimizer``, an EMA copy).
    The user's ``root`` wins; otherwise the candidate whose keys match the most
    target keys, then one named ``model``, then the saved root itself.
    """
    candidates = [""] + [r for r in source.roots() if r]
    if root is not None:
        root = root.strip("/")
        if root not in candidates:
            raise RegraftError(
                f"Root '{root}' is not an object of {source.path}. Objects holding weights: "
                + ", ".join(repr(c) for c in candidates if c) + ".",
                hint="Pass one of those names as root=, or leave it out to choose automatically.",
            )
        return root
    wanted = {t.keys[source.namespace] for t in targets if source.namespace in t.keys}
    keys = [e.key for e in source.entries() if e.kind == WEIGHT]

    def score(candidate: str) -> tuple[int, int, int]:
        prefix = candidate + "/" if candidate else ""
        hits = sum(1 for k in keys if k.startswith(prefix) and k[len(prefix) :] in wanted)
        return (hits, candidate == "model", candidate == "")

    best = max(candidates, key=score)
    if best == "" and len(candidates) == 2 and score(best)[0] == 0:
        return candidates[1]  # a single saved object: that is the model
    return best


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
) -> Plan:
    """Match every target variable to a source tensor or none, from metadata only.

    ``reshape`` is the policy for matched tensors of another shape (see
    :mod:`regraft.growth`); ``graph`` (from ``targets.layer_graph``) is what the
    ``preserve`` policy follows.
    """
    namespace = source.namespace
    root = choose_root(source, targets, root)
    prefix = root + "/" if root else ""
    available: dict[str, SourceEntry] = {}
    outside, optimizer, ignored = [], [], []
    rule_counts = {rule.number: 0 for rule in rules}
    for entry in source.entries():
        if entry.kind != WEIGHT:
            optimizer.append(entry)
        elif not entry.key.startswith(prefix):
            outside.append(entry)
        else:
            relative = entry.key[len(prefix) :]
            rule = next((r for r in rules if r.kind == IGNORE and r.matches([relative, entry.key])), None)
            if rule is not None:
                rule_counts[rule.number] += 1
                ignored.append((entry, str(rule)))
            else:
                available[relative] = entry

    decided: dict[str, Decision] = {}
    fresh: dict[str, tuple[str, str]] = {}  # target key -> (reason, allowed by)
    for target in targets:
        rule = next((r for r in rules if r.kind == INIT and r.matches([target.key, *target.keys.values()])), None)
        if rule is not None:
            rule_counts[rule.number] += 1
            fresh[target.key] = (f"{rule}: left fresh on purpose", str(rule))

    open_targets = [t for t in targets if t.key not in fresh]
    decided.update(_rename_stage(open_targets, available, namespace, rules, rule_counts))
    used = {id(d[0]) for d in decided.values()}
    decided.update(_exact_stage([t for t in open_targets if t.key not in decided], available, namespace, used))
    used = {id(d[0]) for d in decided.values()}

    source_layers = {k[len(prefix) :]: v for k, v in source.layers().items() if k.startswith(prefix)}
    alignment = _align(targets, target_layers, available, source_layers, namespace)
    ambiguous: dict[str, tuple[str, ...]] = {}
    for pair in alignment.pairs:
        target, entry = pair.target, pair.source
        if target.key in decided or target.key in fresh or id(entry) in used:
            continue
        decided[target.key] = _aligned_decision(pair, namespace, prefix)
        used.add(id(entry))
    for layer, candidates in alignment.ambiguous.items():
        for target in targets:
            key = target.keys.get(namespace, "")
            if key.startswith(layer + "/") and target.key not in decided:
                relative = key[len(layer) :]
                found = [available[c + relative].key for c in candidates if c + relative in available]
                ambiguous[target.key] = tuple(found) or tuple(prefix + c for c in candidates)

    assignments = []
    for target in targets:
        assignments.append(_assignment(target, decided.get(target.key), fresh.get(target.key),
                                       ambiguous.get(target.key, ()), allow_missing))
    assignments = apply_policy(assignments, reshape, graph, noise)
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
        removed=tuple(_named(prefix + key, source_layers.get(key, (None, None))[0]) for key in alignment.removed),
        source_fingerprint=fingerprint_source(source.entries()),
        target_fingerprint=fingerprint_target(targets),
    )


def _assignment(
    target: TargetVariable,
    decision: Decision | None,
    fresh: tuple[str, str] | None,
    candidates: tuple[str, ...],
    allow_missing: tuple[str, ...],
) -> Assignment:
    allowed = matches_any([target.key, *target.keys.values()], allow_missing)
    if fresh is not None:
        return Assignment(target, None, MISSING, "rule", fresh[0], fresh[1], 1.0)
    if decision is None:
        if candidates:
            return Assignment(target, None, AMBIGUOUS, "aligned", "equally good candidates", allowed, None, candidates)
        return Assignment(target, None, MISSING, "", "no counterpart in the checkpoint", allowed)
    entry, stage, reason, confidence = decision
    if tuple(entry.shape) != tuple(target.shape):
        return Assignment(target, entry, SHAPE_MISMATCH, stage, reason, allowed, confidence)
    if entry.dtype != target.dtype:
        return Assignment(target, entry, CAST, stage, f"{reason}; cast {entry.dtype} -> {target.dtype}", None, confidence)
    return Assignment(target, entry, LOADED, stage, reason, None, confidence)


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
    targets: list[TargetVariable], available: dict[str, SourceEntry], namespace: str, used: set[int]
) -> dict[str, Decision]:
    out = {}
    for target in targets:
        key = target.keys.get(namespace)
        if key is None or key not in available or id(available[key]) in used or is_positional(key, namespace):
            continue
        out[target.key] = (available[key], "exact", "exact key", 1.0)
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
                out[target.key] = (entry, "rule", f"{rule}", 1.0)
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


def _aligned_decision(pair: Pair, namespace: str, prefix: str) -> Decision:
    entry, target = pair.source, pair.target
    if entry.key == prefix + target.keys.get(namespace, "") and not pair.by_order:
        return entry, "exact", "exact key (position confirmed by alignment)", 1.0
    if pair.by_order:
        return (entry, "aligned",
                f"aligned: layer {pair.source_layer} -> {pair.target_layer}, placed by order within a run of alike layers",
                0.6)
    how = {"name": "same layer name", "structure": "same structure under another name", "sequence": "by sequence alignment"}
    confidence = 0.9 if pair.score >= 100 else 0.5
    shapes = "shapes equal" if entry.shape == target.shape else "shapes differ"
    return entry, "aligned", f"aligned: layer {pair.source_layer} -> {pair.target_layer} ({how.get(pair.how, pair.how)}, {shapes})", confidence


def _named(key: str, name: str | None) -> str:
    """A checkpoint layer key with its Keras name, where the format keeps one: ``layers/dense_3 (d3)``."""
    return f"{key} ({name})" if name and name != key.rpartition("/")[2] else key


def _inserted_layers(assignments: list[Assignment]) -> tuple[str, ...]:
    """Model layers with no counterpart: none of their variables has a source (after any
    reshape policy), and not because a rule or an ambiguity said so."""
    layers: dict[str, bool] = {}
    for a in assignments:
        counterpart = a.source is not None or a.stage == "rule" or a.status == AMBIGUOUS
        layers[a.target.layer] = layers.get(a.target.layer, False) or counterpart
    return tuple(sorted(layer for layer, has in layers.items() if not has))
