"""Keras 3 ``.keras`` archives: the ``model.weights.h5`` inside the zip, read in place.

``model.save("x.keras")`` writes a zip holding ``metadata.json``, ``config.json``
and ``model.weights.h5`` (checked with Keras 3.15: members are *stored*, not
compressed). The weights member has the layout of a ``.weights.h5`` file, so this
is :class:`~regraft.sources.keras_h5.KerasH5` reading the member in place: its
fast reader maps the zip and reads the image at the member's offset, and h5py
(for files outside that reader's subset) reads through a file object over the
member's bytes; nothing is extracted. A compressed member (an archive zipped again
by another tool) is copied once into an unnamed temporary file, since both seek
back and forth (``bench/bench_formats.py`` measures both).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import struct
import tempfile
import zipfile
from typing import IO, Any, Iterator

from regraft.errors import CorruptCheckpointError, UnsupportedFormatError
from regraft.sources.keras_h5 import KerasH5

__all__ = ["KerasArchive"]

WEIGHTS_MEMBER = "model.weights.h5"
_NPZ_MEMBER = "model.weights.npz"
_RESAVE_HINT = "Save it again with model.save('x.keras'), or pass the model's .weights.h5 file."


def _data_offset(path: str, info: zipfile.ZipInfo) -> int:
    """Where a member's bytes start: after its local header (whose name and extra field lengths
    may differ from the central directory's)."""
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
    if len(local) < 30 or local[:4] != b"PK\x03\x04":
        raise zipfile.BadZipFile(f"no local file header at byte {info.header_offset}")
    name_length, extra_length = struct.unpack("<HH", local[26:30])
    return info.header_offset + 30 + name_length + extra_length


class _Window(io.RawIOBase):
    """A read-only file object over bytes ``[start, start + size)`` of a file, read with ``pread``.

    h5py reads a stored zip member through it in place: seeks cost nothing (zipfile's
    own member objects re-read from the start on every backward seek).
    """

    def __init__(self, path: str, start: int, size: int) -> None:
        self._fd = os.open(path, os.O_RDONLY)
        self._start, self._size, self._pos = start, size, 0
        if os.fstat(self._fd).st_size < start + size:
            os.close(self._fd)
            raise zipfile.BadZipFile(f"the member ends at byte {start + size}, past the end of the file")

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        n = max(0, min(len(view), self._size - self._pos))
        got = os.preadv(self._fd, [view[:n]], self._start + self._pos) if n else 0
        self._pos += got
        return got

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()


class KerasArchive(KerasH5):
    """A Keras 3 ``.keras`` archive; its weights are read from the zip member on demand."""

    suffixes = (".keras",)

    @classmethod
    def detect(cls, path: str) -> bool:
        """True when ``path`` is a zip holding ``config.json`` and Keras weights."""
        try:
            with zipfile.ZipFile(path) as archive:
                names = set(archive.namelist())
        except (OSError, zipfile.BadZipFile, ValueError):
            return False
        return "config.json" in names and bool({WEIGHTS_MEMBER, _NPZ_MEMBER} & names)

    def __init__(self, path: str) -> None:
        self._zip: zipfile.ZipFile | None = None
        self._member: IO[bytes] | None = None
        try:
            super().__init__(path)
        except Exception:
            self.close()
            raise
        self.format = "keras-archive"
        self.config = self._read_config(path)

    def _image_file(self, path: str) -> tuple[int, int, int] | None:
        """The weights member for the fast reader: the zip itself at the member's offset when stored, else its copy."""
        self._open_member(path)
        member = self._member
        if isinstance(member, _Window):
            return member._fd, member._start, member._size
        assert member is not None
        return member.fileno(), 0, os.fstat(member.fileno()).st_size

    def _close_image(self) -> None:
        """Nothing: the member's descriptor is closed with the member."""

    def _open_h5(self, path: str) -> Any:
        import h5py

        if self._member is None:
            self._open_member(path)
        try:
            return h5py.File(self._member, "r")
        except OSError as exc:
            raise CorruptCheckpointError(
                f"{path}: its {WEIGHTS_MEMBER} cannot be opened by h5py ({exc}).", hint=_RESAVE_HINT
            ) from None

    def _open_member(self, path: str) -> None:
        """Open the zip and the weights member (in place when stored), refusing an archive without one."""
        try:
            self._zip = zipfile.ZipFile(path)
            names = set(self._zip.namelist())
        except zipfile.BadZipFile as exc:
            raise CorruptCheckpointError(
                f"{path} is not a readable .keras archive: {exc} (a truncated or damaged zip file).",
                hint=_RESAVE_HINT,
            ) from None
        except OSError as exc:
            raise CorruptCheckpointError(f"{path} cannot be read: {exc.strerror or exc}.", hint=_RESAVE_HINT) from None
        try:
            if WEIGHTS_MEMBER not in names:
                if _NPZ_MEMBER in names:
                    raise UnsupportedFormatError(
                        f"{path} stores its weights as {_NPZ_MEMBER} (weights_format='npz'); regraft reads the HDF5 form.",
                        hint="Save it with the default weights format: model.save('x.keras').",
                    )
                shown = ", ".join(sorted(names)[:6]) or "nothing"
                raise UnsupportedFormatError(
                    f"{path} is a zip archive without {WEIGHTS_MEMBER} (found: {shown}).",
                    hint="Pass an archive written by model.save('x.keras') or a .weights.h5 file.",
                )
            info = self._zip.getinfo(WEIGHTS_MEMBER)
            if info.compress_type == zipfile.ZIP_STORED:
                self._member = _Window(path, _data_offset(path, info), info.file_size)
            else:
                self._member = tempfile.TemporaryFile()
                with self._zip.open(info) as src:
                    shutil.copyfileobj(src, self._member, 1 << 20)  # the CRC is checked at the end
                self._member.seek(0)
        except zipfile.BadZipFile as exc:
            self.close()
            raise CorruptCheckpointError(
                f"{path}: its {WEIGHTS_MEMBER} is damaged ({exc}).", hint=_RESAVE_HINT) from None
        except Exception:
            self.close()
            raise

    @contextlib.contextmanager
    def _image(self) -> Iterator[IO[bytes]]:
        """The weights member's bytes (h5py seeks before each of its own reads)."""
        assert self._member is not None
        yield self._member

    def _read_config(self, path: str) -> dict[str, Any] | None:
        assert self._zip is not None
        try:
            return json.loads(self._zip.read("config.json"))
        except (ValueError, zipfile.BadZipFile) as exc:
            self.close()
            raise CorruptCheckpointError(
                f"{path}: its config.json is not valid JSON ({exc}).", hint=_RESAVE_HINT) from None

    def read(self, key: str):  # type: ignore[no-untyped-def]
        """Read one tensor from the weights member (see :meth:`KerasH5.read`)."""
        try:
            return super().read(key)
        except zipfile.BadZipFile as exc:
            raise CorruptCheckpointError(
                f"Cannot read tensor '{key}' from {self.path}: {exc}.", hint=_RESAVE_HINT) from None

    def close(self) -> None:
        """Close the HDF5 view, the member and the zip."""
        for thing in (getattr(self, "_file", None), self._member, self._zip):
            if thing is not None:
                thing.close()
        self._member = self._zip = None
