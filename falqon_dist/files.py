"""Files a run writes into its directory: opened without following a symbolic link, replaced atomically.

A run directory is often shared, copied or symlinked around (``runs/latest -> runs/2024-...``). A
name *inside* it that is a symbolic link (``train.log -> ~/notes.txt``, planted or left by a copy)
used to redirect our writes: ``open(run_dir / "train.log", "a")`` appended to the link's target,
``write_text`` truncated it. Here:

* :func:`open_no_follow` opens with ``O_NOFOLLOW`` (and ``O_CLOEXEC``: no rank's child inherits a
  run's log or lock): a symbolic link at the name is refused, whatever it points to, and so is
  anything but a regular file (a FIFO would block the open forever) and, for writing, a file with
  other hard links (``cp -al`` of a run: appending would write into both runs).
* :func:`write_atomic` writes a whole file into a temporary file of the same directory, fsyncs it
  and ``os.replace``-s it over the name: a reader sees the old or the new file, never half of one,
  and a replace over a symbolic link replaces the link, never its target. A link at the name is
  still refused first, so a user's link is not silently dropped.

Only the last component is checked: a symlinked run directory itself (or a symlinked
``checkpoints/`` on a bigger disk) is the user's choice and is followed as before.

This module imports nothing of falqon_dist, so every layer (``distributed``, ``train``, ``export``)
may use it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from pathlib import Path
from typing import IO, Any

__all__ = ["UnsafeFileError", "check_plain_file", "open_no_follow", "write_atomic"]

#: ``open()`` modes → ``os.open`` flags (``b`` may be added to any of them for bytes).
_FLAGS = {
    "r": os.O_RDONLY,
    "r+": os.O_RDWR,
    "w": os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
    "w+": os.O_RDWR | os.O_CREAT | os.O_TRUNC,
    "a": os.O_WRONLY | os.O_CREAT | os.O_APPEND,
    "a+": os.O_RDWR | os.O_CREAT | os.O_APPEND,
    "x": os.O_WRONLY | os.O_CREAT | os.O_EXCL,
}


class UnsafeFileError(OSError):
    """A name in a run directory that falqon_dist will not write through (a symbolic link, a FIFO,
    a directory, a file with other hard links). An ``OSError``, so code that tolerates a failed
    write (``contextlib.suppress(OSError)``) tolerates this one too; the message names the path."""

    def __str__(self) -> str:  # the sentence alone, without OSError's "[Errno 40]"
        return str(self.strerror)


def _symlink_error(path: str | os.PathLike[str]) -> UnsafeFileError:
    return UnsafeFileError(
        errno.ELOOP,
        f"{path} is a symbolic link; falqon_dist writes only regular files in a run directory — remove it",
    )


def check_plain_file(path: str | os.PathLike[str], *, in_place: bool = True) -> None:
    """Raise :class:`UnsafeFileError` if ``path`` exists and is not a regular file we may write:
    a symbolic link (dangling or not), a directory, a FIFO, or — for a file written in place
    (``in_place``: appended, locked) — a file with other hard links. A file only ever replaced by
    :func:`write_atomic` (``in_place=False``) may have hard links: the replace leaves them the old
    bytes. A missing ``path`` is fine: it will be created."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(info.st_mode):
        raise _symlink_error(path)
    _check_regular(path, info, writing=in_place)


def _check_regular(path: str | os.PathLike[str], info: os.stat_result, *, writing: bool) -> None:
    if not stat.S_ISREG(info.st_mode):
        raise UnsafeFileError(
            errno.EINVAL,
            f"{path} is not a regular file; falqon_dist writes only regular files "
            "in a run directory — remove it",
        )
    if writing and info.st_nlink > 1:
        raise UnsafeFileError(
            errno.EMLINK,
            f"{path} has {info.st_nlink - 1} other hard link(s) (a copy made with "
            "cp -al or ln?); writing it would change every copy — replace it "
            "with a plain copy (cp --remove-destination) or remove it",
        )


def open_no_follow(
    path: str | os.PathLike[str],
    mode: str = "r",
    *,
    encoding: str | None = None,
    errors: str | None = None,
    perms: int = 0o666,
) -> IO[Any]:
    """``open(path, mode)`` that never follows a symbolic link at ``path`` and opens only a regular
    file (see the module doc); raises :class:`UnsafeFileError` naming ``path`` otherwise.

    ``mode``: ``r``, ``r+``, ``w``, ``w+``, ``a``, ``a+`` or ``x``, with ``b`` for bytes. A created
    file gets ``perms`` less the umask, as ``open()`` gives it.
    """
    binary = "b" in mode
    base = mode.replace("b", "").replace("t", "")
    if base not in _FLAGS:
        raise ValueError(
            f"open_no_follow: unsupported mode {mode!r} (one of {', '.join(_FLAGS)}, with b or not)"
        )
    # O_NONBLOCK: a FIFO planted at the name must not block the open; cleared once it is a regular file.
    # O_TRUNC waits for the checks: a file with another hard link must not be emptied before it is refused.
    flags = _FLAGS[base] | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    truncate = bool(flags & os.O_TRUNC)
    flags &= ~os.O_TRUNC
    try:
        fd = os.open(path, flags, perms)
    except OSError as error:
        if error.errno == errno.ELOOP or (error.errno == errno.EEXIST and os.path.islink(path)):
            raise _symlink_error(path) from None
        if error.errno == errno.ENXIO:  # a FIFO with no reader, opened for writing
            raise UnsafeFileError(
                errno.ENXIO,
                f"{path} is not a regular file; falqon_dist writes only regular "
                "files in a run directory — remove it",
            ) from None
        raise
    try:
        _check_regular(path, os.fstat(fd), writing=base != "r")
        os.set_blocking(fd, True)
        if truncate:
            os.ftruncate(fd, 0)
        return os.fdopen(
            fd,
            mode if binary else base,
            encoding=None if binary else encoding,
            errors=None if binary else errors,
        )
    except BaseException:
        os.close(fd)
        raise


def umask() -> int:
    """This process's umask, read without changing it where Linux tells (``/proc/self/status``)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    # elsewhere: the classic read-by-setting (not thread-safe; Linux never gets here)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomic(
    path: str | os.PathLike[str], data: str | bytes, *, encoding: str = "utf-8"
) -> None:
    """Replace ``path`` with ``data`` as one step: a temporary file in the same directory, fsynced,
    then ``os.replace``-d over ``path`` (and the directory fsynced), so a crash or a full disk leaves
    the old file or the new one, never a truncated one. Refuses (:class:`UnsafeFileError`) a
    symbolic link or a non-regular file at ``path``; a new file gets the mode ``open()`` would give
    it, an existing one keeps its mode."""
    path = Path(path)
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        info = None
    if info is not None and stat.S_ISLNK(info.st_mode):
        raise _symlink_error(path)
    if info is not None:
        _check_regular(path, info, writing=False)
    mode = stat.S_IMODE(info.st_mode) if info is not None else 0o666 & ~umask()
    payload = data.encode(encoding) if isinstance(data, str) else data
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, mode)
        # over a link planted since the check: the link goes, its target stays
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable (where the file system allows opening a directory)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
