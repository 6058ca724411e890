"""The contract every checkpoint format implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Iterable

from regraft.entries import WEIGHT, SourceEntry
from regraft.errors import CorruptCheckpointError

if TYPE_CHECKING:
    import numpy as np

__all__ = ["Source"]


class Source(ABC):
    """A checkpoint opened lazily: metadata on open, tensor bytes on :meth:`read`.

    A format is one subclass in its own module, registered with
    :func:`regraft.sources.register_format`. It implements:

    * :meth:`detect` — whether a path is in this format, from the files' contents;
    * ``__init__(path)`` — open it and build the :class:`SourceEntry` list from
      metadata only, then call ``super().__init__(path, entries)``; it sets
      :attr:`format`, :attr:`namespace` (a name from :mod:`regraft.keys`) and
      :attr:`files`;
    * :meth:`read` — one tensor's bytes, verified where the format allows;
    * optionally :meth:`layers` (every layer the file records, with its Keras name
      and class where known: name evidence and landmarks for matching),
      :meth:`native_location`, :meth:`verify`, :meth:`read_into`, :meth:`read_slice`
      and :meth:`close`.

    Attributes:
        path: the path the user gave.
        format: a short format name (``tf-object``, ``tf-keras``, ``tf1-names``,
            ``keras-h5``, ``keras2-h5``, ``keras-archive``, ``keras-sharded``,
            ``safetensors``, ``safetensors-sharded``, ``npz``, ``saved-model``).
        namespace: the key namespace of :meth:`entries` (see :mod:`regraft.keys`).
        files: the files that make up the checkpoint.
    """

    path: str
    format: str
    namespace: str
    files: tuple[str, ...]
    #: File name endings of this format. Detection is by content; when no format
    #: recognises a file, the one whose suffix it has is opened anyway so that its
    #: constructor says precisely what is wrong (a truncated zip, a bad header).
    suffixes: tuple[str, ...] = ()
    #: True when the format checksums whole tensors, so that :meth:`read_slice`, which
    #: reads a block only, cannot verify it (a TF bundle's CRC32C, a zip member's CRC32).
    slices_skip_checksum: bool = False
    #: File bytes :meth:`read_slice` has touched so far (a sharded load's cost per device).
    sliced_bytes_read: int = 0

    def __init__(self, path: str, entries: Iterable[SourceEntry]) -> None:
        self.path = path
        self._entries = {e.key: e for e in entries}

    @classmethod
    @abstractmethod
    def detect(cls, path: str) -> bool:
        """True when ``path`` holds a checkpoint of this format (judged by content, not by name)."""

    @abstractmethod
    def read(self, key: str) -> np.ndarray:
        """Read one tensor (a fresh, writable array) by canonical key."""

    def entries(self) -> list[SourceEntry]:
        """Every tensor of the checkpoint, weights first, in key order."""
        return list(self._entries.values())

    def roots(self) -> list[str]:
        """Top-level objects that hold weights (``""`` is the saved root itself)."""
        tops = {e.key.split("/", 1)[0] for e in self._entries.values() if "/" in e.key and e.kind == WEIGHT}
        return sorted(tops)

    def layers(self) -> dict[str, tuple[str | None, str | None]]:
        """Layer keys the format records, with (Keras name, class in snake case) where known.

        Includes weightless layers (pooling, activation), which alignment uses as
        landmarks. Layers that hold weights are implied by the entries anyway.
        """
        return {}

    def verify(self, key: str) -> None:
        """Check that :meth:`read` would succeed (checksum included), without keeping the bytes.

        Formats override it when checking is cheaper than reading.
        """
        self.read(key)

    def read_into(self, key: str, out: np.ndarray, checked: bool = False) -> None:
        """Read one tensor into ``out``, an array of its shape and dtype (the memory of a variable's next value).

        ``checked``: the tensor passed :meth:`verify` and its files are unchanged
        since (the caller compared their identity): a format may skip the checks
        :meth:`verify` made, such as a checksum.
        """
        value = self.read(key)
        if value.shape != out.shape:
            raise CorruptCheckpointError(
                f"Tensor '{key}' in {self.path} has shape {value.shape} on disk, but its metadata says {out.shape}.",
                hint="The checkpoint is inconsistent; save it again.",
            )
        out[...] = value

    def read_slice(self, key: str, index: tuple[slice, ...]) -> np.ndarray:
        """``read(key)[index]`` as a fresh array: one device's block of a sharded variable.

        ``index`` holds one ``slice(start, stop)`` per axis, integer bounds, step 1.
        This default reads the whole tensor (verified as :meth:`read` verifies it) and
        counts all of its bytes in :attr:`sliced_bytes_read`; formats that can read a
        block alone override it and count what they touched.
        """
        import numpy as np  # here, not at the top: listing a checkpoint (`regraft inspect`) needs no numpy

        value = self.read(key)
        self.sliced_bytes_read += value.nbytes
        return np.array(value[index], copy=True, order="C")

    def native_location(self, key: str) -> tuple[str, str] | None:
        """``(checkpoint prefix, tensor name)`` when the backend can read this tensor itself, else ``None``."""
        return None

    def close(self) -> None:
        """Release open files."""

    def __enter__(self) -> "Source":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.format} {self.path!r}: {len(self._entries)} tensors>"
