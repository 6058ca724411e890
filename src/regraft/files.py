"""Reading the files users write (rules, plans) with errors that name the file."""

from __future__ import annotations

import os
from typing import Any

from regraft.errors import RegraftError

__all__ = ["read_text", "read_yaml"]


def read_text(path: str, what: str, missing_hint: str) -> str:
    """The UTF-8 text of ``path``; ``what`` names it in messages ("The rules file x.yaml …").

    Raises:
        RegraftError: the file does not exist (with ``missing_hint``), is a folder,
            cannot be read, or is not UTF-8 text.
    """
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise RegraftError(f"The {what} does not exist.", hint=missing_hint) from None
    except IsADirectoryError:
        raise RegraftError(f"The {what} is a folder, not a file.", hint=missing_hint) from None
    except UnicodeDecodeError as exc:
        raise RegraftError(f"The {what} is not UTF-8 text (byte {exc.start} cannot be decoded).",
                           hint="Save it as UTF-8 text.") from None
    except OSError as exc:
        raise RegraftError(f"The {what} cannot be read: {exc.strerror or exc}.",
                           hint=f"Check the permissions of {os.path.abspath(path)}.") from None


def read_yaml(path: str, what: str, missing_hint: str) -> Any:
    """Parse the YAML file ``path`` (see :func:`read_text` for the file errors).

    Raises:
        RegraftError: the file cannot be read or is not valid YAML.
    """
    import yaml

    text = read_text(path, what, missing_hint)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RegraftError(f"The {what} is not valid YAML: {exc}", hint="Fix the YAML syntax.") from None
    except (ValueError, TypeError, AttributeError) as exc:  # a tagged scalar PyYAML cannot build: !!int abc
        raise RegraftError(f"The {what} holds a tagged value that is not what its tag says ({exc}).",
                           hint="Remove the !! tag, or write a value of that type.") from None
    except RecursionError:  # PyYAML composes nested collections recursively
        raise RegraftError(f"The {what} nests lists or mappings thousands of levels deep.",
                           hint="Write it with the few levels of nesting its format uses.") from None
