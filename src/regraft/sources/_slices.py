"""Reading one block of a C-order tensor, and counting the file bytes that reading touches.

A device's shard of a variable is a block: one ``slice(start, stop)`` per axis.
Stored in C order, a block is a set of equal contiguous *runs*: the innermost axis
the block does not take whole, with every axis after it, is one run; the axes
before it repeat the run. A block of leading rows is one run (one byte range); a
block of columns is one short run per row (strided).

Formats that store a tensor as plain C-order bytes at a known offset (a TF bundle
entry, a safetensors tensor, a stored ``.npy`` member) read a block from a memory
map of the file with :func:`read_block`; :func:`touched_bytes` says honestly how
much of the file that read touched: a single run is its own bytes; strided runs
are counted by the memory pages (``mmap.PAGESIZE``) they lie in, since the kernel
reads whole pages (its read-ahead may read more, which no count here sees).
"""

from __future__ import annotations

import math
import mmap

import numpy as np

__all__ = ["Index", "runs", "touched_bytes", "read_block"]

Index = tuple[slice, ...]
"""One ``slice(start, stop)`` per axis, with integer bounds and step 1 (``applying`` normalises them)."""


def runs(shape: tuple[int, ...], itemsize: int, index: Index) -> tuple[np.ndarray, int]:
    """The byte offsets (from the tensor's first byte) of the block's runs, and the length of one run.

    Example:
        >>> offsets, length = runs((4, 6), 4, (slice(0, 4), slice(2, 5)))   # columns 2..4 of 4 rows
        >>> offsets.tolist(), length
        ([8, 32, 56, 80], 12)
        >>> runs((4, 6), 4, (slice(1, 3), slice(0, 6)))[0].tolist(), runs((4, 6), 4, (slice(1, 3), slice(0, 6)))[1]
        ([24], 48)
    """
    bounds = [(s.start, s.stop) for s in index]
    if any(stop <= start for start, stop in bounds):
        return np.zeros(0, np.int64), 0
    partial = [axis for axis, (start, stop) in enumerate(bounds) if (start, stop) != (0, shape[axis])]
    inner = partial[-1] if partial else 0
    strides = [math.prod(shape[axis + 1 :]) * itemsize for axis in range(len(shape))]
    if not shape:
        return np.zeros(1, np.int64), itemsize
    start, stop = bounds[inner]
    offsets = np.array([start * strides[inner]], np.int64)
    for axis in reversed(range(inner)):
        a_start, a_stop = bounds[axis]
        offsets = (np.arange(a_start, a_stop, dtype=np.int64)[:, None] * strides[axis] + offsets[None, :]).ravel()
    return offsets, (stop - start) * strides[inner]


def touched_bytes(base: int, shape: tuple[int, ...], itemsize: int, index: Index) -> int:
    """File bytes a read of the block touches: one run's own length, or the pages strided runs lie in.

    ``base`` is the tensor's offset in its file (page boundaries are the file's).

    Example:
        >>> touched_bytes(0, (1024, 1024), 4, (slice(0, 128), slice(0, 1024)))   # 128 whole rows: one range
        524288
        >>> touched_bytes(0, (1024, 1024), 4, (slice(0, 1024), slice(0, 128)))   # 512 bytes of each 4 KiB row
        4194304
    """
    offsets, length = runs(shape, itemsize, index)
    if not len(offsets) or not length:
        return 0
    if len(offsets) == 1:
        return length
    first = (base + offsets) // mmap.PAGESIZE
    last = (base + offsets + length - 1) // mmap.PAGESIZE
    shared = int(np.count_nonzero(first[1:] == last[:-1]))  # runs are ascending and disjoint
    return (int(np.sum(last - first + 1)) - shared) * mmap.PAGESIZE


def read_block(buffer: object, offset: int, dtype: np.dtype, shape: tuple[int, ...], index: Index) -> np.ndarray:
    """``tensor[index]`` as a fresh C-order array, the tensor being C-order bytes at ``offset`` of ``buffer``.

    ``buffer`` is a memory map (or bytes): only the pages of the block are read.
    """
    view = np.frombuffer(buffer, dtype=dtype, count=math.prod(shape), offset=offset).reshape(shape)
    return np.array(view[index], dtype=dtype.newbyteorder("="), copy=True, order="C")
