"""Writing outputs so that a reader finds the previous file or the complete new one, never a part.

Every output regraft writes (weights, plan files) is first written into a *staging
folder* next to the target, ``.regraft-out-<host>-<pid>-<token>``, then moved into
place: :func:`replace_file` for one file (``os.replace``, atomic), and
:func:`replace_bundle` for a TensorFlow checkpoint prefix, whose ``.index`` and
``.data-*`` files must change together (see its docstring for why every moment of
a kill leaves a readable checkpoint). Failures become a :class:`RegraftError`
naming the path, the problem (disk full, permission, name too long) and the fix.

A run that is killed leaves its staging folder behind. The next write into the
same folder removes it — only when it is provably stale: its name carries this
host's tag and the id of a process that no longer exists.

Example:
    >>> import os, tempfile
    >>> folder = tempfile.mkdtemp()
    >>> def write(path):
    ...     with open(path, "w") as f:
    ...         f.write("hello")
    >>> replace_file(os.path.join(folder, "a.txt"), write, what="the greeting") == [os.path.join(folder, "a.txt")]
    True
    >>> sorted(os.listdir(folder))
    ['a.txt']
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
from collections.abc import Callable, Iterator

from regraft.errors import RegraftError

__all__ = ["check_out_path", "replace_file", "replace_bundle", "bundle_names", "clean_stale", "explain", "write_error",
           "STAGING_PREFIX"]

STAGING_PREFIX = ".regraft-out-"
_MANIFEST = "manifest.json"  # in a bundle's staging folder: which prefix and shard count it writes
_COMMITTED = "committed.index"  # a second link to the new index, made just before it is renamed into place
_COMMITTED_FLAG = "committed"  # written after the rename where hard links are not supported
_NO_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK}
_NAME_MAX_DEFAULT = 255


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode("utf-8", "surrogateescape")).hexdigest()[:8]


_STAGING_RE = re.compile(re.escape(STAGING_PREFIX) + r"([0-9a-f]{8})-(\d+)-([0-9a-z]+)\Z")


# --- error messages -------------------------------------------------------------------------------

_PROBLEMS = {
    errno.ENOSPC: ("the disk is full", "Free space on the disk holding {folder}, or write somewhere else."),
    errno.EDQUOT: ("the disk quota is exceeded", "Free space within your quota, or write somewhere else."),
    errno.EFBIG: ("a file grew beyond the size limit (ulimit -f, or the file system's largest file)",
                  "Raise the limit (ulimit -f unlimited), or write to another file system."),
    errno.EACCES: ("permission denied", "Choose a folder you can write to, or change the permissions of {folder}."),
    errno.EPERM: ("operation not permitted", "Choose a folder you can write to."),
    errno.EROFS: ("the file system is read-only", "Write to a writable file system."),
    errno.ENAMETOOLONG: ("a file name is too long for the file system", "Choose a shorter name."),
    errno.ENOTDIR: ("a part of the path is a file, not a folder", "Check the path."),
    errno.EISDIR: ("it is a folder", "Give a file name inside the folder."),
    errno.EIO: ("an input/output error occurred (a failing disk or network file system)", "Check the disk."),
}


def explain(code_or_text: int | str, folder: str) -> tuple[str, str]:
    """``(problem, hint)`` for an errno, or for an error text that contains one's message.

    Frameworks report a failed write in their own exception types (TensorFlow's
    ``OutOfRangeError: ...; File too large``); their text is matched against the
    system's messages so every writer gets the same explanation.

    Example:
        >>> explain(28, "/data")
        ('the disk is full', 'Free space on the disk holding /data, or write somewhere else.')
    """
    if isinstance(code_or_text, int):
        code = code_or_text
    else:
        code = next((c for c in _PROBLEMS if os.strerror(c).lower() in code_or_text.lower()), None)
    if code in _PROBLEMS:
        problem, hint = _PROBLEMS[code]
        return problem, hint.format(folder=folder)
    text = os.strerror(code_or_text) if isinstance(code_or_text, int) else code_or_text.strip().splitlines()[0]
    return text, "Check the path and the disk, or write somewhere else."


def write_error(path: str, what: str, exc: BaseException) -> RegraftError:
    """The error for a failed write of ``path``: what failed and the fix, from an ``OSError`` or a framework's text."""
    folder = os.path.dirname(os.path.abspath(path))
    code = exc.errno if isinstance(exc, OSError) and exc.errno else (getattr(exc, "message", None) or str(exc))
    problem, hint = explain(code, folder)
    return RegraftError(f"Cannot write {what} {path}: {problem}. Nothing was written; any previous {path} "
                        "is unchanged.", hint=hint)


# --- checks before any work -----------------------------------------------------------------------

def check_out_path(path: str, *, what: str, suffixes: tuple[str, ...] = ("",), example: str = "") -> None:
    """Refuse, before any work, an output path that cannot be written.

    ``suffixes`` are what the writer appends to ``path`` (a TF prefix: ``.index``,
    ``.data-00000-of-00002``), so a name too long is caught here, not halfway. A
    missing folder is fine (the writers create it, as TensorFlow does). ``example``
    is a file name the hint suggests (default: the name ``path`` ends with).

    Raises:
        RegraftError: the path names a folder, lies under a file, has a name longer
            than the file system allows, or its folder is not writable.
    """
    path = os.fspath(path)
    base = os.path.basename(path)
    example = example or base or "model.weights.h5"
    if not base or path.endswith(os.sep) or (os.altsep and path.endswith(os.altsep)):
        raise RegraftError(f"Cannot write {what} {path}: it names a folder, not a file.",
                           hint=f"Give a file name inside it, e.g. {os.path.join(path, example)}.")
    if os.path.isdir(path):
        raise RegraftError(f"Cannot write {what} {path}: it is an existing folder.",
                           hint=f"Give a file name inside it, e.g. {os.path.join(path, example)}.")
    folder = os.path.dirname(os.path.abspath(path))
    existing = folder
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise RegraftError(f"Cannot write {what} {path}: {existing} is a file, not a folder.",
                           hint="Check the path.")
    try:
        name_max = os.pathconf(existing, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        name_max = _NAME_MAX_DEFAULT
    parts = os.path.relpath(folder, existing).split(os.sep) if folder != existing else []
    longest = max([len(os.fsencode(p)) for p in parts if p != "."]
                  + [len(os.fsencode(base + s)) for s in suffixes])
    if longest > name_max:
        raise RegraftError(f"Cannot write {what} {path}: a file name would be {longest} bytes long; the file "
                           f"system allows {name_max}.", hint="Choose a shorter name.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RegraftError(f"Cannot write {what} {path}: the folder {existing} is not writable.",
                           hint="Choose a folder you can write to, or change its permissions.")


def _make_folder(path: str, what: str) -> str:
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)  # as TensorFlow does for a checkpoint prefix
    except OSError as exc:
        raise write_error(path, what, exc) from None
    return folder


# --- staging folders ------------------------------------------------------------------------------

def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def _stale(name: str) -> bool:
    """A staging folder whose writer is provably gone: made on this host by a process that no longer exists."""
    found = _STAGING_RE.match(name)
    return bool(found) and found.group(1) == _host_tag() and int(found.group(2)) != os.getpid() \
        and not _alive(int(found.group(2)))


def clean_stale(folder: str) -> list[str]:
    """Remove the staging folders killed runs left in ``folder``; returns their names.

    A bundle's staging folder is first settled (:func:`_settle`): files it had
    already linked into ``folder`` are removed if the new index never replaced the
    old one, and the previous checkpoint's data files if it did.
    """
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in sorted(names):
        if name.startswith(STAGING_PREFIX) and _stale(name):
            _settle(folder, os.path.join(folder, name))
            removed.append(name)
    return removed


@contextlib.contextmanager
def _staging(folder: str, path: str, what: str) -> Iterator[str]:
    """A fresh staging folder in ``folder``, settled and removed on exit whatever happens."""
    stage = os.path.join(folder, f"{STAGING_PREFIX}{_host_tag()}-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        os.mkdir(stage)
    except OSError as exc:
        raise write_error(path, what, exc) from None
    try:
        yield stage
    finally:
        _settle(folder, stage)


@contextlib.contextmanager
def _folder_lock(folder: str) -> Iterator[None]:
    """An exclusive ``flock`` on the folder itself, so two writers of one prefix take turns (no file left)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: writers of the same prefix are not serialised
        yield
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # a file system without flock
            pass
        yield
    finally:
        os.close(fd)  # releases the lock


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EBADF):  # folders cannot be synced everywhere
            raise
    finally:
        os.close(fd)


# --- one file ---------------------------------------------------------------------------------------

def replace_file(path: str, write: Callable[[str], None], *, what: str, example: str = "") -> list[str]:
    """Write one file atomically: ``write(tmp)`` writes it at a temporary path, then it replaces ``path``.

    The temporary path is in a staging folder next to ``path`` and ends with the
    same name (writers that check the extension accept it). The file is synced,
    renamed over ``path`` in one step, and the folder synced. Killed at any moment,
    ``path`` is the previous file (or absent) or the complete new one.

    Raises:
        RegraftError: the path cannot be written (see :func:`check_out_path`), or
            ``write`` or the rename failed with an ``OSError`` (disk full,
            permission, …). Other exceptions of ``write`` propagate unchanged; in
            every case nothing is left behind.
    """
    path = os.fspath(path)
    check_out_path(path, what=what, example=example)
    folder = _make_folder(path, what)
    with _folder_lock(folder):
        clean_stale(folder)
    with _staging(folder, path, what) as stage:
        staged = os.path.join(stage, os.path.basename(path))
        try:
            write(staged)
            _fsync(staged)
            os.replace(staged, path)
        except OSError as exc:
            raise write_error(path, what, exc) from None
        with contextlib.suppress(OSError):  # written and renamed: a folder that cannot be synced changes nothing
            _fsync(folder)
    return [path]


# --- a TensorFlow checkpoint prefix -----------------------------------------------------------------

def _data_re(base: str) -> re.Pattern[str]:
    return re.compile(re.escape(base) + r"\.data-(\d{5})-of-(\d{5})\Z")


def bundle_names(base: str, shards: int) -> list[str]:
    """The files of checkpoint prefix ``base`` written in ``shards`` data files, index last.

    Example:
        >>> bundle_names("ckpt", 2)
        ['ckpt.data-00000-of-00002', 'ckpt.data-00001-of-00002', 'ckpt.index']
    """
    return [f"{base}.data-{i:05d}-of-{shards:05d}" for i in range(shards)] + [f"{base}.index"]


def replace_bundle(prefix: str, write: Callable[[str, int], None], *, what: str, example: str = "",
                   shard_choices: tuple[int, ...] = (1, 2)) -> list[str]:
    """Write a TF checkpoint prefix so that ``prefix`` is always the old checkpoint or the new one.

    ``write(tmp_prefix, shards)`` must write a checkpoint at ``tmp_prefix`` in
    exactly ``shards`` data files. An index refers to its data files by name only,
    ``<prefix>.data-<i>-of-<n>``, with ``n`` from its header. So the new checkpoint
    is written with a shard count ``n`` that no data file present in the folder
    has (from ``shard_choices``): its data files then have names the old index
    does not read. The steps, with the state a kill at each point leaves:

    1. write into the staging folder and sync (nothing outside staging changed:
       the old checkpoint is readable);
    2. hard-link the new data files into the folder under their final names
       (new names only: the old index and its data files are untouched; the
       new files are orphans, and provably ours: the same inodes as in staging;
       where the file system has no hard links they are moved, and a killed
       run's orphans then stay);
    3. sync the folder, then rename the new index over the old one — one atomic
       step: before it the old index reads the old data, after it the new index
       reads the new data, both complete;
    4. delete the old data files (their count differs from the live index's:
       nothing reads them).

    Step 4, and the removal of step 2's orphans after a failure, is done by
    :func:`_settle`, which the next run also calls on a killed run's staging
    folder; it decides from the inodes (is the live index the one this staging
    folder made?), so it is right whatever step the kill interrupted.
    Writers of one folder take turns under a ``flock`` of the folder.

    Raises:
        RegraftError: as :func:`replace_file`, or when data files for every count
            in ``shard_choices`` already exist in the folder.
    """
    prefix = os.fspath(prefix)
    base = os.path.basename(prefix)
    longest = bundle_names(base, max(shard_choices))[0][len(base):]
    check_out_path(prefix, what=what, suffixes=(".index", longest), example=example)
    folder = _make_folder(prefix, what)
    with _folder_lock(folder):
        clean_stale(folder)
        data_re = _data_re(base)
        present = {int(m.group(2)) for m in map(data_re.match, os.listdir(folder)) if m}
        shards = next((n for n in shard_choices if n not in present), None)
        if shards is None:
            raise RegraftError(
                f"Cannot write {what} {prefix}: its folder already holds data files for "
                f"{' and '.join(map(str, sorted(present)))} shards ({base}.data-*), so the new checkpoint "
                "could not be written without touching the ones the current index reads.",
                hint=f"Delete the {base}.data-* files that {base}.index does not use, or write another prefix.")
        with _staging(folder, prefix, what) as stage:
            names = bundle_names(base, shards)
            try:
                with open(os.path.join(stage, _MANIFEST), "w", encoding="utf-8") as f:
                    json.dump({"base": base, "shards": shards}, f)
                write(os.path.join(stage, base), shards)
                produced = sorted(set(os.listdir(stage)) - {_MANIFEST})
                if produced != sorted(names):
                    raise RegraftError(
                        f"Cannot write {what} {prefix}: the checkpoint writer produced {', '.join(produced)}, "
                        f"expected {', '.join(names)}; nothing was written.",
                        hint="Report this: the installed TensorFlow names checkpoint files differently.")
                for name in names:
                    _fsync(os.path.join(stage, name))
                linked = all([_link_or_move(os.path.join(stage, name), os.path.join(folder, name))
                              for name in names[:-1]])
                _fsync(folder)
                index = os.path.join(stage, names[-1])
                linked = linked and _link_or_move(index, os.path.join(stage, _COMMITTED), move=False)
                os.replace(index, os.path.join(folder, names[-1]))
            except OSError as exc:
                raise write_error(prefix, what, exc) from None
            if not linked:  # no inodes to decide from: say it outright (a kill before this line, or a failure
                # here, leaves the old data files as garbage beside the new checkpoint, never a broken one)
                with contextlib.suppress(OSError):
                    open(os.path.join(stage, _COMMITTED_FLAG), "wb").close()
    return [os.path.join(folder, n) for n in names]


def _settle(folder: str, stage: str) -> None:
    """Finish or undo what staging folder ``stage`` did in ``folder``, then remove it.

    Only a bundle's staging folder (it has a manifest) touched ``folder``. If the
    live index is this folder's new one (same inode as ``committed.index``), the
    data files of any other shard count are the old checkpoint's: removed. If not,
    data files in ``folder`` that are the same inodes as this staging folder's are
    orphans it linked before it was stopped: removed. Nothing else is touched.
    """
    try:
        with open(os.path.join(stage, _MANIFEST), encoding="utf-8") as f:
            manifest = json.load(f)
        base, shards = str(manifest["base"]), int(manifest["shards"])
    except (OSError, ValueError, KeyError, TypeError):
        manifest = None
    if manifest is not None and os.sep not in base and base not in ("", ".", ".."):
        index = os.path.join(folder, f"{base}.index")
        committed = (_same(os.path.join(stage, _COMMITTED), index)
                     or os.path.exists(os.path.join(stage, _COMMITTED_FLAG)))
        data_re = _data_re(base)
        for name in os.listdir(folder):
            found = data_re.match(name)
            if not found:
                continue
            live = os.path.join(folder, name)
            if committed and int(found.group(2)) != shards:
                _remove(live)  # the previous checkpoint's data: the live index (ours) does not read it
            elif not committed and _same(os.path.join(stage, name), live):
                _remove(live)  # linked by us, but our index never went live
        if committed:
            with contextlib.suppress(OSError):
                _fsync(folder)
    shutil.rmtree(stage, ignore_errors=True)


def _link_or_move(source: str, target: str, move: bool = True) -> bool:
    """Hard-link ``source`` as ``target``; True if linked. Where the file system has no hard links, move
    it instead (``move``) and return False: a killed run's files then cannot be proven ours and stay."""
    try:
        os.link(source, target)
        return True
    except OSError as exc:
        if exc.errno not in _NO_LINKS:
            raise
    if move:
        os.replace(source, target)
    return False


def _same(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        os.remove(path)
