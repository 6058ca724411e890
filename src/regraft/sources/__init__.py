"""Checkpoint formats: a registry that detects the format from the files themselves.

A format is one module with one :class:`~regraft.sources.base.Source` subclass,
registered here with :func:`register_format`; :func:`open_source` asks each
registered format, in order, whether it recognises the path.

The built-in formats are registered by name (:class:`BuiltinFormat`) and their
modules imported only when a path could be theirs: ``regraft inspect`` of a TF
checkpoint imports neither h5py, numpy, nor the zip and JSON readers.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import os
import sys
from typing import Iterator, NamedTuple, Union

from regraft.errors import SourceError, UnsupportedFormatError
from regraft.sources.base import Source

__all__ = ["Source", "open_source", "register_format", "FORMATS", "BuiltinFormat", "without_gc"]

# sources/_hdf5.SIGNATURE, written out so that listing a TF checkpoint does not import the HDF5
# reader; tests/test_sources.py checks each built-in shortcut against its class.
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


class BuiltinFormat(NamedTuple):
    """A built-in format named by module and class, imported when a path could be in it.

    Attributes:
        module: the module holding the class, e.g. ``"regraft.sources.npz"``.
        name: the :class:`Source` subclass in it.
        files_only: the format recognises only regular files, so a prefix or a
            folder is not asked (nor its module imported).
        signature: the first bytes every file of the format starts with, or ``b""``.
        suffixes: the class's :attr:`Source.suffixes`, for the by-name fallback.
    """

    module: str
    name: str
    files_only: bool
    signature: bytes = b""
    suffixes: tuple[str, ...] = ()

    def load(self) -> type[Source]:
        """The :class:`Source` subclass (importing its module)."""
        return getattr(importlib.import_module(self.module), self.name)

    def may_detect(self, path: str) -> bool:
        """False when the format cannot recognise ``path``, judged without importing it.

        Raises:
            OSError: the path's first bytes cannot be read (as the format's own ``detect`` would).
        """
        if self.files_only and not os.path.isfile(path):
            return False
        if self.signature:
            with open(path, "rb") as f:
                return f.read(len(self.signature)) == self.signature
        return True


FORMATS: list[Union[type[Source], BuiltinFormat]] = [
    # HDF5 signature first: cheap and unambiguous
    BuiltinFormat("regraft.sources.keras_h5", "KerasH5", True, _HDF5_SIGNATURE),
    # a zip with config.json and model.weights.h5
    BuiltinFormat("regraft.sources.keras_archive", "KerasArchive", True, suffixes=(".keras",)),
    # JSON: a weight_map to .weights.h5 shards
    BuiltinFormat("regraft.sources.keras_sharded", "KerasSharded", True, suffixes=(".weights.json",)),
    # a zip of .npy members
    BuiltinFormat("regraft.sources.npz", "NpzFile", True, suffixes=(".npz",)),
    # a bounded header length, then '{'; or an index JSON
    BuiltinFormat("regraft.sources.safetensors_file", "SafetensorsFile", True,
                  suffixes=(".safetensors", ".safetensors.index.json")),
    # a folder with saved_model.pb: its variables/ bundle
    BuiltinFormat("regraft.sources.saved_model", "SavedModel", False),
    BuiltinFormat("regraft.sources.tf_checkpoint", "TFCheckpoint", False),
]
"""The formats :func:`open_source` asks, in order: :class:`Source` subclasses, or built-ins by name."""


def register_format(cls: type[Source]) -> type[Source]:
    """Add a format to the registry (usable as a class decorator); later ones are asked last."""
    if cls not in FORMATS:
        FORMATS.append(cls)
    return cls


def _load(fmt: Union[type[Source], BuiltinFormat]) -> type[Source]:
    return fmt.load() if isinstance(fmt, BuiltinFormat) else fmt


def open_source(path: str | os.PathLike[str], *, allow_outside_state: bool = False) -> Source:
    """Open a checkpoint lazily, detecting its format from its contents.

    Args:
        path: a TF checkpoint prefix, its ``.index`` file, a folder holding a
            ``checkpoint`` state file, a SavedModel folder, a Keras ``.weights.h5``,
            ``.weights.json`` (sharded), ``.keras`` or Keras 2 ``.h5`` file, a
            ``.safetensors`` file or sharded index, an ``.npz`` file.
        allow_outside_state: let a folder's ``checkpoint`` state file name a
            checkpoint outside that folder (refused by default; a warning names it).

    Raises:
        SourceError: the path does not exist or holds no checkpoint.
        UnsupportedFormatError: the file exists but is in no format regraft reads.
        CorruptCheckpointError: the file is damaged.
    """
    path = os.fspath(path)
    for fmt in FORMATS:
        try:
            if isinstance(fmt, BuiltinFormat) and not fmt.may_detect(path):
                continue
            cls = _load(fmt)
            found = cls.detect(path)
        except OSError as exc:  # sniffing reads a few bytes: unreadable file, /proc/self/mem, a device
            raise _unreadable(path, exc) from None
        if found:
            # TFCheckpoint is the one format with an option; a path found by another (an HDF5
            # file) does not import it: it can be TFCheckpoint only once its module is loaded.
            tf_checkpoint = sys.modules.get("regraft.sources.tf_checkpoint")
            if tf_checkpoint is not None and cls is tf_checkpoint.TFCheckpoint:
                return cls(path, allow_outside_state=allow_outside_state)
            return cls(path)
    if not os.path.exists(path) and not os.path.exists(path + ".index"):
        parent = os.path.dirname(path) or "."
        raise SourceError(
            f"{path} does not exist.",
            hint=f"Check the path; {parent} is where it was looked for."
            if os.path.isdir(parent)
            else f"The folder {parent} does not exist either.",
        )
    if os.path.isdir(path):
        listing = sorted(os.listdir(path))
        if os.path.isfile(os.path.join(path, "checkpoint")) or any(f.endswith(".index") for f in listing):
            from regraft.sources.tf_checkpoint import resolve_prefix

            # raises its precise reason (stale state file, several prefixes, a state file pointing elsewhere)
            resolve_prefix(path, allow_outside_state)
        shown = ", ".join(listing[:6]) + (" …" if len(listing) > 6 else "") if listing else "nothing"
        raise SourceError(
            f"{path} is a folder but holds no checkpoint (found: {shown}).",
            hint="Pass a checkpoint prefix (dir/ckpt-3), a folder with a 'checkpoint' state file, or a .weights.h5 file.",
        )
    for fmt in FORMATS:
        if any(path.endswith(suffix) for suffix in fmt.suffixes):
            return _load(fmt)(path)  # recognised by name only: its constructor says what is wrong with it
    raise UnsupportedFormatError(
        f"{path} is in no format regraft reads.",
        hint="Pass a checkpoint prefix (dir/ckpt-3), a SavedModel folder, or a .weights.h5, .weights.json, "
        ".keras, .h5, .safetensors (or its .index.json), or .npz file.",
    )


def _unreadable(path: str, exc: OSError) -> SourceError:
    """The error for a path whose first bytes cannot be read while detecting its format."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    if isinstance(exc, PermissionError):
        hint = f"Give your user read access to {path} (chmod u+r) or copy the file somewhere you can read it."
    else:
        hint = "Pass a checkpoint file or prefix on a regular disk; this path cannot be read as a file."
    return SourceError(f"Cannot read {path} to detect its format: {reason} (errno {exc.errno}).", hint=hint)


@contextlib.contextmanager
def without_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector while a checkpoint is opened and planned or listed.

    Opening and planning build ~10 small objects per tensor, none of them cyclic
    garbage; at 10,000 variables the collector's repeated full passes over them
    cost about as much as the planning itself. Used by ``regraft.open``/``plan``/
    ``load`` and ``regraft inspect``.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
