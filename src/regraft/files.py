"""Reading the YAML files users write (rules, plans) with errors that name the file."""

from __future__ import annotations

from typing import Any

from regraft.errors import RegraftError

__all__ = ["read_yaml"]


def read_yaml(path: str, what: str, missing_hint: str) -> Any:
    """Parse the YAML file ``path``; ``what`` names it in messages ("The rules file x.yaml …").

    Raises:
        RegraftError: the file does not exist (with ``missing_hint``) or is not valid YAML.
    """
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except FileNotFoundError:
        raise RegraftError(f"The {what} does not exist.", hint=missing_hint) from None
    except yaml.YAMLError as exc:
        raise RegraftError(f"The {what} is not valid YAML: {exc}", hint="Fix the YAML syntax.") from None
