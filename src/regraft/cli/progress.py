"""A progress bar on stderr for loads that take longer than a second: tensors, megabytes, rate.

It reports both passes of a load: the check pass (every tensor checksummed
or converted; the model can still stop unchanged), called as the
``progress(done, total, key)`` callback, then the commit pass (every tensor
read again and assigned; for a ``.weights.h5`` file this is where the bytes
are read), called as its :meth:`ProgressBar.assigned` method.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable, TextIO

__all__ = ["ProgressBar", "SHOW_AFTER_S"]

SHOW_AFTER_S = 1.0  # loads shorter than this draw nothing
_REDRAW_S = 0.1
_WIDTH = 24
MB = 1 << 20


class ProgressBar:
    """A ``progress(done, total, key)`` callback drawing one redrawn line on a terminal.

    Args:
        sizes: bytes per target key, for the megabytes and the rate (tensors only if empty).
        stream: where to draw (stderr).
        clock: seconds, for tests.

    Example:
        >>> bar = ProgressBar({"a": 4 * MB, "b": 4 * MB}, clock=iter([0.0, 2.0]).__next__)
        >>> bar.done_bytes = 4 * MB
        >>> bar.line(1, 2, 2.0)
        'loading  50% [############............] 1/2 tensors  4/8 MB  2 MB/s'
    """

    def __init__(self, sizes: dict[str, int], stream: TextIO | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.sizes = sizes
        self.total_bytes = sum(sizes.values())
        self.stream = stream or sys.stderr
        self.clock = clock
        self.start = self.first = clock()  # the pass's start; the load's
        self.phase = "check"
        self.checked: list[str] = []  # the keys the check pass reported: what the commit writes
        self.done_bytes = 0
        self.drawn_at: float | None = None

    def __call__(self, done: int, total: int, key: str) -> None:
        """The check pass: ``done`` of ``total`` tensors checked, ``key`` the last one."""
        self.checked.append(key)
        self._step(done, total, key, ("loading", "checked", "; assigning"))

    def assigned(self, done: int, total: int, key: str) -> None:
        """The commit pass: ``done`` of ``total`` tensors assigned, ``key`` the last one."""
        if self.phase == "check":  # the first assignment: counts and rate start again
            self.phase, self.start, self.done_bytes = "commit", self.clock(), 0
            if self.checked:  # the model's variables left fresh are not part of the load
                self.total_bytes = sum(self.sizes.get(k, 0) for k in self.checked)
        self._step(done, total, key, ("assigning", "assigned", ""))

    def _step(self, done: int, total: int, key: str, words: tuple[str, str, str]) -> None:
        self.done_bytes += self.sizes.get(key, 0)
        now = self.clock()
        last = done == total
        if now - self.first < SHOW_AFTER_S and self.drawn_at is None:
            return
        if not last and self.drawn_at is not None and now - self.drawn_at < _REDRAW_S:
            return
        self.drawn_at = now
        self.stream.write("\r\033[K" + self.line(done, total, now - self.start, words) + ("\n" if last else ""))
        self.stream.flush()

    def line(self, done: int, total: int, elapsed: float, words: tuple[str, str, str] = ("loading", "checked", "; assigning")) -> str:
        """One state of the bar; ``words`` name the pass running, the pass done and what follows."""
        running, finished, then = words
        rate = self.done_bytes / MB / elapsed if elapsed > 0 else 0.0
        size = f", {self.done_bytes / MB:.0f} MB at {rate:.0f} MB/s" if self.total_bytes else ""
        if done == total:
            return f"{finished} {done}/{total} tensors{size}{then}"
        filled = _WIDTH * done // max(total, 1)
        share = self.done_bytes / self.total_bytes if self.total_bytes else done / max(total, 1)
        mb = f"  {self.done_bytes / MB:.0f}/{self.total_bytes / MB:.0f} MB  {rate:.0f} MB/s" if self.total_bytes else ""
        return f"{running} {share:4.0%} [{'#' * filled}{'.' * (_WIDTH - filled)}] {done}/{total} tensors{mb}"


def progress_bar(enabled: bool, model: Any = None, stream: TextIO | None = None) -> ProgressBar | None:
    """The bar for a load into ``model``, or ``None`` when disabled or stderr is not a terminal."""
    stream = stream or sys.stderr
    if not enabled or not stream.isatty():
        return None
    sizes: dict[str, int] = {}
    if model is not None:
        from regraft.targets import target_for

        for variable in target_for(model).describe(("name",))[0]:
            count = 1
            for dim in variable.shape:
                count *= dim
            sizes[variable.key] = count * _itemsize(variable.dtype)
    return ProgressBar(sizes, stream)


def _itemsize(dtype: str) -> int:
    from regraft.naming import dtype_of

    return dtype_of(dtype).itemsize
