"""CRC-32C (Castagnoli) checksums as used by TensorFlow checkpoints.

Uses the ``crc32c`` package (a dependency); :func:`pure_python_crc32c` is a
table implementation kept as the reference the tests check it against.
TensorFlow stores *masked* checksums (see :func:`mask`), so that a checksum of
data that itself contains checksums stays well distributed.
"""

from __future__ import annotations

import os
import sys
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = ["crc32c", "mask", "masked_crc32c", "pure_python_crc32c", "unmask"]

_MASK_DELTA = 0xA282EAD8
_U32 = 0xFFFFFFFF
_POLY_REFLECTED = 0x82F63B78


def _make_table() -> tuple[int, ...]:
    """Builds the 256-entry lookup table of the reflected Castagnoli polynomial."""
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ _POLY_REFLECTED if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_TABLE = _make_table()


def _crc32c_extension() -> ModuleType:
    """The ``crc32c`` package's C extension module, loaded without the package's ``__init__``.

    That ``__init__`` reads its own version through ``importlib.metadata``, which
    imports ``email``, ``csv``, ``zipfile`` and more: ~20 ms of every ``regraft``
    command. The extension is what computes the checksums; it is loaded from the
    package's folder under its own name (so that a later ``import crc32c`` reuses
    it). Any surprise in that layout falls back to importing the package.
    """
    name = "crc32c._crc32c"
    if name in sys.modules:
        return sys.modules[name]
    try:
        from importlib.machinery import EXTENSION_SUFFIXES, ExtensionFileLoader
        from importlib.util import find_spec, module_from_spec, spec_from_file_location

        package = find_spec("crc32c")  # finds the package's folder without running its __init__
        for folder in (package.submodule_search_locations or []) if package else []:
            for suffix in EXTENSION_SUFFIXES:
                path = os.path.join(folder, "_crc32c" + suffix)
                if os.path.isfile(path):
                    spec = spec_from_file_location(name, path, loader=ExtensionFileLoader(name, path))
                    if spec is None or spec.loader is None:
                        break
                    module = module_from_spec(spec)
                    spec.loader.exec_module(module)
                    if callable(getattr(module, "crc32c", None)):
                        sys.modules[name] = module
                        return module
    except (ImportError, OSError):
        pass
    import crc32c as package_module

    return package_module


_EXTENSION = _crc32c_extension()


def pure_python_crc32c(data: Buffer, value: int = 0) -> int:
    """Computes CRC-32C byte by byte: the reference implementation (about 5 MB/s).

    Args:
        data: bytes-like object to checksum.
        value: checksum of the preceding data, to extend it (0 to start).

    Returns:
        The unsigned 32-bit checksum of the preceding data followed by ``data``.
    """
    table = _TABLE
    crc = value ^ _U32
    for byte in memoryview(data).cast("B"):
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ _U32


def crc32c(data: Buffer, value: int = 0) -> int:
    """Computes the CRC-32C of ``data``, optionally extending an earlier checksum (the ``crc32c`` package).

    Args:
        data: bytes-like object (bytes, memoryview, C-contiguous numpy array...).
        value: checksum of the preceding data, to extend it (0 to start).

    Returns:
        The unsigned 32-bit checksum.
    """
    return _EXTENSION.crc32c(data, value=value)


def mask(crc: int) -> int:
    """Masks a checksum the way TensorFlow and LevelDB store it.

    Args:
        crc: an unsigned 32-bit checksum.

    Returns:
        ``rotate_right(crc, 15) + 0xa282ead8`` modulo 2**32.
    """
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & _U32


def unmask(masked: int) -> int:
    """Inverts :func:`mask`.

    Args:
        masked: a masked 32-bit checksum.

    Returns:
        The original checksum.
    """
    rot = (masked - _MASK_DELTA) & _U32
    return ((rot >> 17) | (rot << 15)) & _U32


def masked_crc32c(data: Buffer) -> int:
    """Computes the masked CRC-32C of ``data``, as stored in TensorFlow files.

    Args:
        data: bytes-like object to checksum.

    Returns:
        ``mask(crc32c(data))``.
    """
    return mask(crc32c(data))
