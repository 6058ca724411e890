"""User rules: rename checkpoint keys, leave model variables fresh, drop checkpoint tensors.

Rules come as a dict or a YAML file, in one of two forms::

    # sections, applied in the order written
    rename:
      "encoder/": "backbone/"            # scope prefix (ends in '/' on both sides)
      "block_(\\d+)/w": "block\\1/kernel"  # regular expression, full match, back-references
    init: ["head/*"]                     # model variables (glob) to leave fresh on purpose
    ignore: ["aux_head/*"]               # checkpoint tensors (glob) meant to be dropped
    transform:                           # model variables (glob) -> a transform for their tensor
      "pos_embedding/*": resize
      "conv1/kernel": {name: adapt_channels}

    # or a list, when the order across kinds matters
    rules:
      - rename: {"encoder/": "backbone/"}
      - init: "head/*"

``rename`` maps an *old checkpoint key* (relative to the saved object that holds
the model) to a *new model key*, the direction of TensorFlow's
``init_from_checkpoint`` assignment map. The first rule that matches a key wins.
"""

from __future__ import annotations

import fnmatch
import os
import re
from dataclasses import dataclass
from typing import Any, Mapping

from regraft.errors import RegraftError
from regraft.files import read_yaml

__all__ = ["Rule", "parse_rules", "RENAME", "INIT", "IGNORE", "TRANSFORM"]

RENAME, INIT, IGNORE, TRANSFORM = "rename", "init", "ignore", "transform"
_KINDS = (RENAME, INIT, IGNORE, TRANSFORM)


@dataclass(frozen=True)
class Rule:
    """One rule.

    Attributes:
        kind: ``rename``, ``init`` or ``ignore``.
        pattern: for ``rename`` the old key, prefix or regular expression; otherwise a glob.
        replacement: for ``rename``, the new key (may use ``\\1`` back-references);
            for ``transform``, the transform's name.
        number: 1-based position among all rules, for messages ("rule 3").
        options: for ``transform``, the transform's options.
    """

    kind: str
    pattern: str
    replacement: str | None
    number: int
    options: tuple[tuple[str, Any], ...] = ()

    def __str__(self) -> str:
        if self.kind == RENAME:
            return f"rule {self.number} (rename '{self.pattern}' -> '{self.replacement}')"
        if self.kind == TRANSFORM:
            return f"rule {self.number} (transform '{self.pattern}' with {self.replacement})"
        return f"rule {self.number} ({self.kind} '{self.pattern}')"

    def rename(self, key: str) -> str | None:
        """The new key for ``key``, or ``None`` if this rename rule does not apply to it.

        Example:
            >>> Rule("rename", "encoder/", "backbone/", 1).rename("encoder/d/_kernel")
            'backbone/d/_kernel'
            >>> Rule("rename", r"block_(\\d+)/w", r"block\\1/kernel", 2).rename("block_3/w")
            'block3/kernel'
        """
        if self.replacement is None:
            return None
        if _is_prefix(self.pattern, self.replacement):
            return self.replacement + key[len(self.pattern) :] if key.startswith(self.pattern) else None
        match = _compiled(self.pattern).fullmatch(key)
        return match.expand(self.replacement) if match else None

    def matches(self, keys: list[str]) -> bool:
        """For ``init``/``ignore``/``transform``: whether the glob matches any of ``keys``."""
        return any(fnmatch.fnmatchcase(k, self.pattern) for k in keys)


_REGEX_CHARS = set("()[]{}*+?\\|^$")


def _is_prefix(pattern: str, replacement: str) -> bool:
    """A scope prefix: both sides end in '/' and the pattern uses no regular-expression syntax."""
    return pattern.endswith("/") and replacement.endswith("/") and not _REGEX_CHARS & set(pattern)


_CACHE: dict[str, re.Pattern[str]] = {}


def _compiled(pattern: str) -> re.Pattern[str]:
    if pattern not in _CACHE:
        _CACHE[pattern] = re.compile(pattern)
    return _CACHE[pattern]


def parse_rules(rules: Mapping[str, Any] | list[Any] | str | os.PathLike[str] | None, *, rename: Any = None) -> tuple[Rule, ...]:
    """Read rules from a dict, a list or a YAML file; ``rename`` (a dict or YAML file) is added first.

    Raises:
        RegraftError: a file that does not exist or is not valid YAML, an unknown
            section, a regular expression that does not compile, a prefix rule
            without '/' on both sides. The message names the rule.
    """
    items: list[tuple[str, str, str | None, tuple[tuple[str, Any], ...], str]] = []
    if rename is not None:
        what = _origin(rename, "rename")
        data = _load(rename, what)
        if not (isinstance(data, Mapping) and data and set(data) <= set(_KINDS) | {"rules"}):
            data = {RENAME: data}
        items += [(*item, what) for item in _items(data, what)]
    if rules is not None:
        what = _origin(rules, "rules")
        items += [(*item, what) for item in _items(_load(rules, what), what)]
    out = []
    for number, (kind, pattern, replacement, options, what) in enumerate(items, start=1):
        rule = Rule(kind, pattern, replacement, number, options)
        _validate(rule, what)
        out.append(rule)
    return tuple(out)


def _origin(value: Any, kind: str) -> str:
    """How messages name where rules came from: the file, or the argument."""
    if isinstance(value, (str, os.PathLike)):
        return f"{kind} file {os.fspath(value)}"
    return f"{kind} given"


def _load(value: Any, what: str) -> Any:
    if not isinstance(value, (str, os.PathLike)):
        return value
    data = read_yaml(os.fspath(value), what, "Check the path.")
    return {} if data is None else data


def _items(data: Any, what: str) -> list[tuple[str, str, str | None, tuple[tuple[str, Any], ...]]]:
    if isinstance(data, Mapping) and list(data) == ["rules"]:
        data = data["rules"]
    if isinstance(data, list):
        out = []
        for entry in data:
            if not isinstance(entry, Mapping) or len(entry) != 1:
                raise RegraftError(
                    f"Each item of the {what} list must be one of rename/init/ignore/transform. Received: {entry!r}.",
                    hint='Write items like  - rename: {"encoder/": "backbone/"}  or  - init: "head/*"',
                )
            out += _items(dict(entry), what)
        return out
    if not isinstance(data, Mapping):
        raise RegraftError(
            f"The {what} must be a mapping of rename/init/ignore/transform sections. Received: {type(data).__name__}.",
            hint='Write  rename: {"encoder/": "backbone/"}',
        )
    out = []
    for kind, body in data.items():
        if kind not in _KINDS:
            raise RegraftError(
                f"Unknown section '{kind}' in the {what}; expected rename, init, ignore or transform.",
                hint="Old checkpoint key -> new model key pairs go under 'rename:'.",
            )
        if kind == RENAME:
            if not isinstance(body, Mapping):
                raise RegraftError(
                    f"'rename' in the {what} must map old checkpoint keys to new model keys. Received: {body!r}.",
                    hint='Write  rename: {"encoder/": "backbone/"}',
                )
            for old, new in body.items():
                if not isinstance(old, str) or not isinstance(new, str):
                    raise RegraftError(
                        f"Rename rule {old!r}: {new!r} in the {what} must map a string to a string.",
                        hint='Write rules like {"encoder/": "backbone/"}.',
                    )
                out.append((RENAME, old, new, ()))
        elif kind == TRANSFORM:
            out += _transform_items(body, what)
        else:
            patterns = [body] if isinstance(body, str) else body
            if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
                raise RegraftError(
                    f"'{kind}' in the {what} must be a glob pattern or a list of them. Received: {body!r}.",
                    hint=f'Write  {kind}: ["head/*"]',
                )
            out += [(kind, p, None, ()) for p in patterns]
    return out


def _transform_items(body: Any, what: str) -> list[tuple[str, str, str | None, tuple[tuple[str, Any], ...]]]:
    if not isinstance(body, Mapping):
        raise RegraftError(
            f"'transform' in the {what} must map model variable patterns to transforms. Received: {body!r}.",
            hint='Write  transform: {"head/kernel": {name: pad, value: 0.0}}',
        )
    out = []
    for pattern, spec in body.items():
        if isinstance(spec, str):
            spec = {"name": spec}
        if not isinstance(pattern, str) or not isinstance(spec, Mapping) or not isinstance(spec.get("name"), str):
            raise RegraftError(
                f"Transform rule {pattern!r}: {spec!r} in the {what} must name a transform.",
                hint='Write  "head/kernel": pad  or  "head/kernel": {name: pad, value: 0.0}',
            )
        options = tuple(sorted((k, v) for k, v in spec.items() if k != "name"))
        out.append((TRANSFORM, pattern, spec["name"], options))
    return out


def _validate(rule: Rule, what: str) -> None:
    if rule.kind == TRANSFORM:
        from regraft import transforms

        transforms.get(rule.replacement or "")  # an unknown name fails here, listing the known ones
        return
    if rule.kind != RENAME or rule.replacement is None:
        return
    if rule.pattern.endswith("/") != rule.replacement.endswith("/") and not _REGEX_CHARS & set(rule.pattern):
        raise RegraftError(
            f"{rule} in the {what}: a scope prefix must end in '/' on both sides.",
            hint=f"Write '{rule.pattern.rstrip('/')}/' -> '{rule.replacement.rstrip('/')}/' for a prefix, "
            "or neither for one key.",
        )
    try:
        compiled = _compiled(rule.pattern)
    except re.error as exc:
        raise RegraftError(f"{rule} in the {what}: '{rule.pattern}' is not a valid regular expression ({exc}).",
                           hint="Escape special characters with a backslash.") from None
    groups = [int(g) for g in re.findall(r"\\(\d+)", rule.replacement)]
    if groups and max(groups) > compiled.groups:
        raise RegraftError(
            f"{rule} in the {what}: the replacement uses \\{max(groups)} but the pattern has {compiled.groups} group(s).",
            hint="Add parentheses around the part to carry over, e.g. 'encoder/(.*)'.",
        )
