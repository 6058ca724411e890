"""The interface every checkpoint format implements."""

from __future__ import annotations

from typing import Iterable

import numpy as np

from regraft.entries import SourceEntry

__all__ = ["Source"]


class Source:
    """A checkpoint opened lazily: metadata on open, tensor bytes on :meth:`read`.

    Attributes:
        path: the path the user gave.
        format: a short format name (``tf-object``, ``tf-keras``, ``tf1-names``,
            ``keras-h5``, ``keras2-h5``).
        namespace: the key namespace of :attr:`entries` (see :mod:`regraft.entries`).
        files: the files that make up the checkpoint.
    """

    path: str
    format: str
    namespace: str
    files: tuple[str, ...]

    def __init__(self, path: str, entries: Iterable[SourceEntry]) -> None:
        self.path = path
        self._entries = {e.key: e for e in entries}

    def entries(self) -> list[SourceEntry]:
        """Every tensor of the checkpoint, weights first, in key order."""
        return list(self._entries.values())

    def entry(self, key: str) -> SourceEntry:
        """The entry with canonical key ``key``."""
        return self._entries[key]

    def roots(self) -> list[str]:
        """Top-level objects that hold weights (``""`` is the saved root itself)."""
        tops = {e.key.split("/", 1)[0] for e in self._entries.values() if "/" in e.key and e.kind == "weight"}
        return sorted(tops)

    def layers(self) -> dict[str, tuple[str | None, str | None]]:
        """Layer keys the format records, with (Keras name, class in snake case) where known.

        Includes weightless layers (pooling, activation), which alignment uses as
        landmarks. Layers that hold weights are implied by the entries anyway.
        """
        return {}

    def native_location(self, key: str) -> tuple[str, str] | None:
        """``(checkpoint prefix, tensor name)`` when the backend can read this tensor itself, else ``None``."""
        return None

    def read(self, key: str) -> np.ndarray:
        """Read one tensor (a fresh, writable array) by canonical key."""
        raise NotImplementedError

    def close(self) -> None:
        """Release open files."""

    def __enter__(self) -> "Source":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.format} {self.path!r}: {len(self._entries)} tensors>"
