"""Decide, for every target variable, which checkpoint tensor it takes.

Stages run in order on what the previous stages left unmatched; each returns the
pairs it decided with a reason. Today: ``rename`` (the user's rules) then
``exact`` (same key in the source's namespace). Automatic alignment will be a
further stage with the same signature.
"""

from __future__ import annotations

import os
from typing import Callable, Mapping


from regraft.entries import WEIGHT, SourceEntry, TargetVariable
from regraft.errors import RegraftError
from regraft.naming import matches_any
from regraft.plan import CAST, LOADED, MISSING, SHAPE_MISMATCH, Assignment, Plan
from regraft.sources.base import Source

__all__ = ["make_plan", "read_renames", "choose_root"]

Decision = tuple[SourceEntry, str]
Stage = Callable[[list[TargetVariable], dict[str, SourceEntry], str], dict[str, Decision]]


def read_renames(rename: Mapping[str, str] | str | os.PathLike[str] | None) -> list[tuple[str, str]]:
    """Normalise ``rename`` (a dict, or a YAML file of one) to an ordered list of (old, new) pairs.

    Keys are checkpoint keys (or prefixes ending in ``/``), values are what they
    become in the model, like ``tf.compat.v1.train.init_from_checkpoint``'s
    ``assignment_map``. A YAML file may hold the mapping itself or under ``rename:``.
    """
    if rename is None:
        return []
    if isinstance(rename, (str, os.PathLike)):
        import yaml

        path = os.fspath(rename)
        try:
            with open(path, encoding="utf-8") as f:
                data = yaml.safe_load(f)
        except FileNotFoundError:
            raise RegraftError(f"Rename file {path} does not exist.", hint="Check the path given to --rename.") from None
        except yaml.YAMLError as exc:
            raise RegraftError(f"Rename file {path} is not valid YAML: {exc}.", hint="Fix the YAML syntax.") from None
        if isinstance(data, dict) and "rename" in data:
            data = data["rename"]
        if not isinstance(data, dict):
            raise RegraftError(
                f"Rename file {path} must hold a mapping 'old checkpoint key: new model key'. "
                f"Received: {type(data).__name__}.",
                hint='Write lines like  "encoder/": "backbone/"',
            )
        rename = data
    pairs = []
    for old, new in dict(rename).items():
        if not isinstance(old, str) or not isinstance(new, str):
            raise RegraftError(
                f"Rename rule {old!r}: {new!r} must map a string to a string.",
                hint='Write rules like {"encoder/": "backbone/"}.',
            )
        if old.endswith("/") != new.endswith("/"):
            raise RegraftError(
                f"Rename rule '{old}' -> '{new}': a scope prefix must end in '/' on both sides.",
                hint=f"Write '{old.rstrip('/')}/' -> '{new.rstrip('/')}/' for a prefix, or neither for one key.",
            )
        pairs.append((old, new))
    return pairs


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
    rename: list[tuple[str, str]] = (),  # type: ignore[assignment]
    allow_missing: tuple[str, ...] = (),
    allow_unused: tuple[str, ...] = (),
    root: str | None = None,
) -> Plan:
    """Match every target variable to a source tensor or none, from metadata only."""
    root = choose_root(source, targets, root)
    prefix = root + "/" if root else ""
    in_root: dict[str, SourceEntry] = {}
    outside, optimizer = [], []
    for entry in source.entries():
        if entry.kind != WEIGHT:
            optimizer.append(entry)
        elif entry.key.startswith(prefix):
            in_root[entry.key[len(prefix) :]] = entry
        else:
            outside.append(entry)

    namespace = source.namespace
    decided: dict[str, tuple[SourceEntry, str, str]] = {}
    unmatched = list(targets)
    available = dict(in_root)
    rename_counts = [0] * len(rename)
    stages: list[tuple[str, Stage]] = [
        ("rename", lambda ts, av, ns: _rename_stage(ts, av, ns, rename, rename_counts)),
        ("exact", _exact_stage),
    ]
    for name, stage in stages:
        for target_key, (entry, reason) in stage(unmatched, available, namespace).items():
            decided[target_key] = (entry, name, reason)
        used = {id(e) for e, _, _ in decided.values()}
        available = {k: e for k, e in available.items() if id(e) not in used}
        unmatched = [t for t in unmatched if t.key not in decided]

    assignments = []
    for target in targets:
        if target.key not in decided:
            allowed = matches_any([target.key, *target.keys.values()], allow_missing)
            assignments.append(Assignment(target, None, MISSING, "", "no tensor with this key", allowed))
            continue
        entry, stage, reason = decided[target.key]
        allowed = None
        if tuple(entry.shape) != tuple(target.shape):
            status = SHAPE_MISMATCH
            allowed = matches_any([target.key, *target.keys.values()], allow_missing)
        elif entry.dtype != target.dtype:
            status = CAST
            reason += f"; cast {entry.dtype} -> {target.dtype}"
        else:
            status = LOADED
        assignments.append(Assignment(target, entry, status, stage, reason, allowed))
    unused = tuple(
        (entry, matches_any([key, entry.key], allow_unused)) for key, entry in available.items()
    )
    return Plan(
        source_path=source.path,
        source_format=source.format,
        root=root,
        assignments=tuple(assignments),
        unused=unused,
        outside=tuple(outside),
        optimizer=tuple(optimizer),
        renames_used=tuple((old, new, n) for (old, new), n in zip(rename, rename_counts)),
    )


def _exact_stage(targets: list[TargetVariable], available: dict[str, SourceEntry], namespace: str) -> dict[str, Decision]:
    out = {}
    for target in targets:
        key = target.keys.get(namespace)
        if key is not None and key in available:
            out[target.key] = (available[key], "exact key")
    return out


def _rename_stage(
    targets: list[TargetVariable],
    available: dict[str, SourceEntry],
    namespace: str,
    rules: list[tuple[str, str]],
    counts: list[int],
) -> dict[str, Decision]:
    """Rewrite source keys with the first rule that applies, then look the new key up.

    A rewritten key matches a target whose key in the source's namespace, or whose
    readable key, equals it.
    """
    if not rules:
        return {}
    by_key: dict[str, TargetVariable] = {}
    for target in targets:
        by_key.setdefault(target.key, target)
        if namespace in target.keys:
            by_key.setdefault(target.keys[namespace], target)
    out: dict[str, Decision] = {}
    for key, entry in available.items():
        for i, (old, new) in enumerate(rules):
            if old.endswith("/") and key.startswith(old):
                renamed = new + key[len(old) :]
            elif key == old:
                renamed = new
            else:
                continue
            target = by_key.get(renamed)
            if target is not None and target.key not in out:
                out[target.key] = (entry, f"rename '{old}' -> '{new}'")
                counts[i] += 1
            break
    return out
