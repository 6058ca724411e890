"""Plan files: a :class:`~regraft.plans.Plan` as YAML a person can review and edit.

:func:`save_plan` writes every section of :meth:`Plan.to_dict`; :func:`read_plan`
checks the file against the schema below — every error names the file, the line
and the key, says what was expected and what was found — then refuses a plan
made for another checkpoint or model (fingerprints), and rebuilds the plan:

* a variable's ``source`` may be edited to another checkpoint key or to ``null``
  (leave it fresh); its status is then recomputed from shapes and dtypes;
* an ``unconfirmed`` variable keeps its ``proposed`` key apart from ``source``, so
  a saved plan never loads a pairing only order supports; copying the key into
  ``source`` confirms it;
* ``transform`` steps are checked against the shapes before anything is read.

Schema (version 1)::

    regraft_plan: 1
    checkpoint: {path: str, format: str, root: str, fingerprint: str}
    model: {name: str, fingerprint: str}
    variables:
      <model variable key>: {source: str|null, status: str, transform: str|null, stage: str|null,
                             reason: str, confidence: number, candidates: [str], proposed: str,
                             steps: [{name: str, ...options}], allowed_by: str, order_only: bool,
                             not_preserved: str}
    fresh: [str]            # derived: variables left fresh
    unused: [str]           # derived from the checkpoint and the sources above
    ignored: [{source: str, rule: str}] or [str]
    inserted_layers: [str]
    removed_layers: [str]
    rules: [{rule: str, used: int}]
    optimizer:              # only in plans made with optimizer= (CLI --optimizer)
      refused: str|null     # why the checkpoint's optimizer variables could not be placed
      slots:
        <optimizer/VARIABLE/SLOT or optimizer/iterations>: {source: str|null, status: str, transform: str|null,
                             stage: str|null, reason: str, shape: [int], dtype: str, steps: [...], allowed_by: str}

An optimizer slot's ``source`` may be edited like a variable's; ``null`` with no
``steps`` leaves the slot as the optimizer has it. The slots are bound to an
optimizer by :func:`regraft.apply` (``optimizer=``), which checks they are its own.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from regraft.entries import WEIGHT, SourceEntry, Stage, TargetVariable
from regraft.errors import RegraftError
from regraft.files import read_text
from regraft.growth import check_steps
from regraft.naming import collapse, dtype_of
from regraft.plans import (
    AMBIGUOUS,
    CAST,
    LOADED,
    MISSING,
    PLAN_VERSION,
    SHAPE_MISMATCH,
    TRANSFORMED,
    UNCONFIRMED,
    Assignment,
    Plan,
    fingerprint_source,
    fingerprint_target,
    status_for,
)
from regraft.sources import open_source
from regraft.targets import target_for

__all__ = ["save_plan", "read_plan"]

_HINT = "Write a plan with `regraft plan CKPT --model SPEC -o FILE`, then edit only the 'source' of its variables."

_HEADER = """\
# regraft plan: what each model variable takes from the checkpoint.
# Edit a variable's 'source' to another checkpoint key, or to null to leave it at
# its fresh value, then run:  regraft apply THIS_FILE --model SPEC --out OUT
# 'status' is recomputed from shapes and dtypes when the plan is read.
# An 'unconfirmed' variable was placed by order only: copy its 'proposed' key
# into 'source' to load it.
"""


def save_plan(plan: Plan, path: str | os.PathLike[str]) -> None:
    """Write ``plan`` as YAML to ``path`` atomically (:func:`regraft.writing.replace_file`).

    Raises:
        RegraftError: ``path`` is a folder, its folder is missing or not writable, or
            the disk is full; nothing is left behind and a previous file is unchanged.
    """
    from regraft.writing import replace_file

    path = os.fspath(path)
    text = _HEADER + _dump(plan.to_dict())
    if os.path.isdir(path):
        raise RegraftError(f"Cannot write the plan to {path}: it is a folder.", hint="Give a file name, e.g. plan.yaml.")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise RegraftError(f"Cannot write the plan to {path}: the folder {folder} does not exist.",
                           hint="Create the folder first, or choose another path.")

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    replace_file(path, write, what="the plan", example="plan.yaml")


def _dump(data: dict[str, Any]) -> str:
    """YAML with one line per variable (its entry as a flow mapping), so a reviewer reads a plan as a table."""
    import yaml

    class _Line(dict):
        pass

    class _Dumper(yaml.SafeDumper):
        pass

    _Dumper.add_representer(_Line, lambda d, v: d.represent_mapping("tag:yaml.org,2002:map", v.items(), flow_style=True))
    variables = {key: _Line(entry) for key, entry in data["variables"].items()}
    lined = {**data, "variables": variables}
    if "optimizer" in data:
        lined["optimizer"] = {**data["optimizer"],
                              "slots": {key: _Line(entry) for key, entry in data["optimizer"]["slots"].items()}}
    return yaml.dump(lined, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=100_000)


def read_plan(path: str | os.PathLike[str], model: Any) -> Plan:
    """Read a plan file (possibly edited by hand) and bind it to ``model``.

    Raises:
        RegraftError: the file is not a valid plan (the message names the line and
            key), names keys that do not exist, or was made for another checkpoint
            or model.

    Example:
        >>> plan = regraft.read_plan("plan.yaml", model)      # doctest: +SKIP
        >>> regraft.apply(plan, model)                         # doctest: +SKIP
    """
    path = os.fspath(path)
    data, lines = _load(path)
    check = _Checker(path, lines)
    checkpoint = check.mapping(data, ("checkpoint",), {"path": str, "fingerprint": str}, {"root": str, "format": str})
    model_section = check.mapping(data, ("model",), {"fingerprint": str}, {"name": str})
    variables = check.mapping_of_mappings(data, ("variables",))
    for key in ("fresh", "unused", "inserted_layers", "removed_layers"):
        check.string_list(data, (key,))
    rules = check.list_of(data, ("rules",), dict)
    ignored_items = check.list_of(data, ("ignored",), (str, dict))
    optimizer_section = check.optimizer(data) if data.get("optimizer") is not None else None
    root = checkpoint.get("root") or ""

    targets = target_for(model).describe(())[0]
    if fingerprint_target(targets) != model_section["fingerprint"]:
        raise RegraftError(
            f"Plan {path} was made for another model than '{model.name}' (its variable keys, shapes or dtypes differ).",
            hint="Make a new plan for this model with `regraft plan`.",
        )
    with open_source(checkpoint["path"]) as source:
        if fingerprint_source(source.entries()) != checkpoint["fingerprint"]:
            raise RegraftError(
                f"Plan {path} was made for another checkpoint than {checkpoint['path']} as it is now "
                "(its keys, shapes or dtypes differ).",
                hint="Make a new plan against this checkpoint with `regraft plan`.",
            )
        entries = {e.key: e for e in source.entries()}
        namespace, source_format = source.namespace, source.format

    by_key = {t.key: t for t in targets}
    unknown = sorted(set(variables) - set(by_key))
    if unknown:
        raise RegraftError(
            f"Plan {path}, line {check.line(('variables', unknown[0]))}: names variables the model does not have: "
            f"{', '.join(collapse(unknown))}.",
            hint="Only edit the 'source' of existing entries.",
        )
    assignments = []
    for target in targets:
        entry = variables.get(target.key, {"source": None})
        assignment = _assignment(target, entry, entries, check)
        if entry.get("not_preserved"):
            assignment = dataclasses.replace(assignment, not_preserved=entry["not_preserved"])
        assignments.append(assignment)
    ignored = []
    for i, item in enumerate(ignored_items):
        key, rule = (item, "") if isinstance(item, str) else (item.get("source"), str(item.get("rule", "")))
        if key not in entries:
            raise check.error(("ignored", i), f"names '{key}', which is not in the checkpoint", "a checkpoint key")
        ignored.append((entries[key], rule))
    ignored_keys = {e.key for e, _ in ignored}
    used = {a.source.key for a in assignments if a.source is not None}  # a proposal reserves its tensor
    prefix = root + "/" if root else ""
    weights = [e for e in entries.values() if e.kind == WEIGHT]
    optimizer_assignments: tuple[Assignment, ...] = ()
    if optimizer_section is not None:
        optimizer_assignments = tuple(_slot(key, entry, entries, check)
                                      for key, entry in optimizer_section["slots"].items())
    return Plan(
        source_path=checkpoint["path"],
        source_format=source_format,
        root=root,
        assignments=tuple(assignments),
        namespace=namespace,
        model_name=model_section.get("name", ""),
        unused=tuple((e, None) for e in weights if e.key.startswith(prefix) and e.key not in used | ignored_keys),
        ignored=tuple(ignored),
        outside=tuple(e for e in weights if not e.key.startswith(prefix)),
        optimizer=tuple(e for e in entries.values() if e.kind != WEIGHT),
        rules=tuple((str(r.get("rule", "")), int(r.get("used", 0) or 0)) for r in rules),
        inserted=tuple(data.get("inserted_layers") or ()),
        removed=tuple(data.get("removed_layers") or ()),
        source_fingerprint=checkpoint["fingerprint"],
        target_fingerprint=model_section["fingerprint"],
        optimizer_assignments=optimizer_assignments,
        optimizer_refused=(optimizer_section or {}).get("refused") or "",
    )


def _load(path: str) -> tuple[dict[str, Any], Any]:
    """The file's data and its YAML node tree (for line numbers)."""
    import yaml

    text = read_text(path, f"plan file {path}", _HINT)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        raise RegraftError(f"Plan {path}{where} is not valid YAML: {getattr(exc, 'problem', exc)}.", hint=_HINT) from None
    except (ValueError, TypeError, AttributeError) as exc:  # a tagged scalar PyYAML cannot build: !!int abc
        raise RegraftError(f"Plan {path} holds a tagged value that is not what its tag says ({exc}).",
                           hint=_HINT) from None
    except RecursionError:  # PyYAML composes nested collections recursively
        raise RegraftError(f"Plan {path} nests lists or mappings thousands of levels deep; a plan file "
                           "nests four.", hint=_HINT) from None
    if not isinstance(data, dict) or data.get("regraft_plan") != PLAN_VERSION:
        raise RegraftError(f"{path} is not a regraft plan file (version {PLAN_VERSION}).", hint=_HINT)
    return data, node


class _Checker:
    """Type checks on the plan's data; errors name the file, line and key path."""

    def __init__(self, path: str, root: Any) -> None:
        self.path, self.root = path, root

    def line(self, keys: tuple[Any, ...]) -> int:
        node, line = self.root, 1
        for key in keys:
            if node is None:
                break
            line = node.start_mark.line + 1
            if hasattr(node, "value") and isinstance(node.value, list) and node.value and isinstance(node.value[0], tuple):
                found = next(((k, v) for k, v in node.value if getattr(k, "value", None) == key), None)
                if found is None:
                    break
                line, node = found[0].start_mark.line + 1, found[1]
            elif isinstance(getattr(node, "value", None), list) and isinstance(key, int) and key < len(node.value):
                node = node.value[key]
                line = node.start_mark.line + 1
            else:
                break
        return line

    def error(self, keys: tuple[Any, ...], problem: str, expected: str) -> RegraftError:
        name = ".".join(str(k) for k in keys)
        return RegraftError(f"Plan {self.path}, line {self.line(keys)}: '{name}' {problem}; expected {expected}.",
                            hint=_HINT)

    def _get(self, data: dict[str, Any], keys: tuple[Any, ...]) -> Any:
        value: Any = data
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        return value

    def mapping(self, data: dict[str, Any], keys: tuple[str, ...], required: dict[str, type],
                optional: dict[str, type]) -> dict[str, Any]:
        value = self._get(data, keys)
        if not isinstance(value, dict):
            raise self.error(keys, "is missing" if value is None else f"is {_kind(value)}", "a mapping")
        for name, kind in {**required, **optional}.items():
            if name not in value or (value[name] is None and name in optional):
                if name in required:
                    raise self.error((*keys, name), "is missing", _kind_name(kind))
                continue
            if not isinstance(value[name], kind):
                raise self.error((*keys, name), f"is {_kind(value[name])}", _kind_name(kind))
        return value

    def mapping_of_mappings(self, data: dict[str, Any], keys: tuple[str, ...]) -> dict[str, dict[str, Any]]:
        value = self._get(data, keys)
        if not isinstance(value, dict):
            raise self.error(keys, "is missing" if value is None else f"is {_kind(value)}",
                             "a mapping of model variable keys to entries")
        for name, entry in value.items():
            if not isinstance(entry, dict):
                raise self.error((*keys, name), f"is {_kind(entry)}", "a mapping with a 'source'")
            source = entry.get("source")
            if source is not None and not isinstance(source, str):
                raise self.error((*keys, name, "source"), f"is {_kind(source)}", "a checkpoint key or null")
            for field, kind in (("proposed", str), ("reason", str), ("stage", str), ("status", str),
                                ("allowed_by", str), ("not_preserved", str)):
                if entry.get(field) is not None and not isinstance(entry[field], kind):
                    raise self.error((*keys, name, field), f"is {_kind(entry[field])}", _kind_name(kind))
            confidence = entry.get("confidence")
            if confidence is not None and (isinstance(confidence, bool) or not isinstance(confidence, (int, float))):
                raise self.error((*keys, name, "confidence"), f"is {_kind(confidence)}", "a number")
            steps = entry.get("steps")
            if steps is not None and (not isinstance(steps, list) or not all(
                    isinstance(s, dict) and isinstance(s.get("name"), str) for s in steps)):
                raise self.error((*keys, name, "steps"), f"is {_kind(steps)}",
                                 "a list of mappings with a 'name', like  - {name: pad, value: 0.0}")
            candidates = entry.get("candidates")
            if candidates is not None and not (isinstance(candidates, list) and all(isinstance(c, str) for c in candidates)):
                raise self.error((*keys, name, "candidates"), f"is {_kind(candidates)}", "a list of checkpoint keys")
        return value

    def optimizer(self, data: dict[str, Any]) -> dict[str, Any]:
        """The optimizer section: ``refused`` and a mapping of slot keys to entries."""
        section = self.mapping(data, ("optimizer",), {"slots": dict}, {"refused": str})
        for key, entry in section["slots"].items():
            where = ("optimizer", "slots", key)
            if not isinstance(key, str) or not key.startswith("optimizer/"):
                raise self.error(where, "is not an optimizer slot key", "a key starting with 'optimizer/'")
            if not isinstance(entry, dict):
                raise self.error(where, f"is {_kind(entry)}", "a mapping with a 'source', 'shape' and 'dtype'")
            source = entry.get("source")
            if source is not None and not isinstance(source, str):
                raise self.error((*where, "source"), f"is {_kind(source)}", "a checkpoint key or null")
            shape = entry.get("shape")
            if not isinstance(shape, list) or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0
                                                      for n in shape):
                raise self.error((*where, "shape"), "is missing" if shape is None else f"is {_kind(shape)}",
                                 "a list of whole numbers (the slot's shape)")
            for field, required in (("dtype", True), ("status", False), ("stage", False), ("reason", False),
                                    ("allowed_by", False)):
                value = entry.get(field)
                if (value is None and required) or (value is not None and not isinstance(value, str)):
                    raise self.error((*where, field), "is missing" if value is None else f"is {_kind(value)}",
                                     "a string")
            steps = entry.get("steps")
            if steps is not None and (not isinstance(steps, list) or not all(
                    isinstance(s, dict) and isinstance(s.get("name"), str) for s in steps)):
                raise self.error((*where, "steps"), f"is {_kind(steps)}",
                                 "a list of mappings with a 'name', like  - {name: fill, value: 0.0}")
        return section

    def string_list(self, data: dict[str, Any], keys: tuple[str, ...]) -> list[str]:
        value = self._get(data, keys)
        if value is None:
            return []
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.error(keys, f"is {_kind(value)}", "a list of strings")
        return value

    def list_of(self, data: dict[str, Any], keys: tuple[str, ...], kind: Any) -> list[Any]:
        value = self._get(data, keys)
        if value is None:
            return []
        if not isinstance(value, list) or not all(isinstance(v, kind) for v in value):
            raise self.error(keys, f"is {_kind(value)}", f"a list of {_kind_name(kind)}s")
        return value


def _kind(value: Any) -> str:
    if value is None:
        return "empty (null)"
    return {dict: "a mapping", list: "a list", str: f"the text {value!r}", bool: f"{value!r} (a boolean)"}.get(
        type(value), f"{value!r} ({type(value).__name__})")


def _kind_name(kind: Any) -> str:
    names = {str: "a string", dict: "a mapping", list: "a list", int: "a whole number"}
    if isinstance(kind, tuple):
        return " or ".join(names.get(k, k.__name__) for k in kind)
    return names.get(kind, kind.__name__)


def _assignment(target: TargetVariable, entry: dict[str, Any], entries: dict[str, SourceEntry],
                check: _Checker) -> Assignment:
    key, proposed = entry.get("source"), entry.get("proposed")
    status, stage = entry.get("status"), _stage(entry.get("stage"), check, ("variables", target.key, "stage"))
    reason, confidence, allowed = entry.get("reason") or "", entry.get("confidence"), entry.get("allowed_by")
    order_only = bool(entry.get("order_only"))
    where = ("variables", target.key)
    if proposed is not None and proposed not in entries:
        raise check.error((*where, "proposed"), f"names '{proposed}', which is not in the checkpoint",
                          "a key listed by `regraft inspect CKPT`")
    if key is None and status == UNCONFIRMED:
        return Assignment(target, entries[proposed] if proposed else None, UNCONFIRMED, stage,
                          reason or "placed by order only", allowed, confidence, order_only=True)
    if key is None and status == AMBIGUOUS:
        candidates = tuple(entry.get("candidates") or ())
        return Assignment(target, None, AMBIGUOUS, stage, reason, allowed, confidence, candidates)
    if key is None and entry.get("steps"):
        return _transformed(target, None, entry, stage, reason, confidence, check)
    if key is None:
        if status == MISSING:  # as planned
            return Assignment(target, None, MISSING, stage, reason, allowed, confidence, order_only=order_only)
        return Assignment(target, None, MISSING, Stage.PLAN, "left fresh in the plan", "plan")
    if key not in entries:
        raise check.error((*where, "source"), f"names '{key}', which is not in the checkpoint",
                          "a key listed by `regraft inspect CKPT`, or null to leave the variable fresh")
    source = entries[key]
    if status == UNCONFIRMED or not stage:
        stage, reason = Stage.PLAN, "chosen in the plan file"  # the user confirmed or chose it
    if entry.get("steps"):
        return _transformed(target, source, entry, stage, reason, confidence, check)
    status = status_for(source, target)  # a mismatch is reported and left fresh: what a plan says of it
    return Assignment(target, source, status, stage, reason, allowed if status == SHAPE_MISMATCH else None, confidence,
                      order_only=order_only)


def _stage(text: Any, check: _Checker, where: tuple[str, ...]) -> Stage:
    try:
        return Stage(text or "")
    except ValueError:
        raise check.error(where, f"is {text!r}", "one of " + ", ".join(repr(s.value) for s in Stage if s.value)) from None


def _transformed(target: TargetVariable, source: SourceEntry | None, entry: dict[str, Any], stage: str, reason: str,
                 confidence: Any, check: _Checker) -> Assignment:
    """An entry with ``steps``: each step checked against the shapes before anything is read."""
    steps = tuple((step["name"], {k: v for k, v in step.items() if k != "name"}) for step in entry["steps"])
    check_steps(steps, source.shape if source else None, target.shape, target.key)
    return Assignment(target, source, TRANSFORMED, stage, reason, entry.get("allowed_by"), confidence, (), steps,
                      order_only=bool(entry.get("order_only")))


def _slot(key: str, entry: dict[str, Any], entries: dict[str, SourceEntry], check: _Checker) -> Assignment:
    """An optimizer slot's assignment; its target is a placeholder until :func:`regraft.apply` binds it."""
    where = ("optimizer", "slots", key)
    try:
        dtype = str(dtype_of(entry["dtype"]))
    except TypeError:
        raise check.error((*where, "dtype"), f"is {entry['dtype']!r}", "a dtype name such as 'float32'") from None
    target = TargetVariable(key, tuple(entry["shape"]), dtype, "optimizer", "", key.rpartition("/")[2], 0, False)
    stage = _stage(entry.get("stage"), check, (*where, "stage"))
    reason, allowed, name = entry.get("reason") or "", entry.get("allowed_by"), entry.get("source")
    if name is not None and name not in entries:
        raise check.error((*where, "source"), f"names '{name}', which is not in the checkpoint",
                          "a key listed by `regraft inspect CKPT --all`, or null")
    source = entries[name] if name is not None else None
    if entry.get("steps"):
        return _transformed(target, source, entry, stage, reason, None, check)
    if source is None:  # kept as the optimizer has it
        return Assignment(target, None, MISSING, stage, reason, allowed)
    status = status_for(source, target)
    if status == SHAPE_MISMATCH:
        raise check.error((*where, "source"), f"names '{name}' of shape {list(source.shape)}",
                          f"a tensor of the slot's shape {list(target.shape)}, or null")
    return Assignment(target, source, status, stage, reason, None)
