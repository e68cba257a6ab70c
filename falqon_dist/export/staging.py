"""Atomic output directories: an export appears at ``out_dir`` complete, or not at all.

Everything is written into a hidden sibling ``.<name>.tmp-<id>`` (same filesystem, so the final
``rename`` is atomic). With ``overwrite=True`` an existing ``out_dir`` is first renamed aside and only
deleted once the new export is in place; a crash between those two renames leaves the previous export
intact under ``.<name>.old-<id>``.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

from falqon_dist.files import umask


def check_destination(out_dir: Path, overwrite: bool) -> None:
    """Raise ``FileExistsError`` if writing ``out_dir`` would clobber something without ``overwrite``."""
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"export destination {out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(
            f"export destination {out_dir} exists and is not empty; pass overwrite=True to replace it"
        )


class StagedDirectory:
    """A fresh staging directory beside ``out_dir``: fill :attr:`path`, then :meth:`commit` or
    :meth:`discard` (``discard`` after ``commit`` is a no-op, so it can sit in a ``finally``)."""

    def __init__(self, out_dir: Path, overwrite: bool) -> None:
        self.out_dir, self.overwrite = Path(out_dir), overwrite
        check_destination(self.out_dir, overwrite)
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self._tag = uuid.uuid4().hex[:8]
        self.path = self.out_dir.parent / f".{self.out_dir.name}.tmp-{self._tag}"
        self.path.mkdir()
        self._done = False

    def commit(self) -> None:
        """Move the staged content to ``out_dir``, replacing what was there (if ``overwrite``).

        Every staged file first gets the mode a file created by this process gets (``0o666`` less
        the umask): some writers (safetensors) create theirs ``0600``, which a server running under
        another account could not read while it reads the config beside it."""
        check_destination(self.out_dir, self.overwrite)
        mode = 0o666 & ~umask()
        for path in self.path.rglob("*"):
            if path.is_file() and not path.is_symlink():
                path.chmod(mode)
        old = None
        if self.out_dir.exists():
            old = self.out_dir.parent / f".{self.out_dir.name}.old-{self._tag}"
            self.out_dir.rename(old)
        try:
            self.path.rename(self.out_dir)
        except BaseException:
            if old is not None:
                old.rename(self.out_dir)
            raise
        self._done = True
        if old is not None:
            shutil.rmtree(old)

    def discard(self) -> None:
        """Delete the staging directory unless it was committed."""
        if not self._done:
            shutil.rmtree(self.path, ignore_errors=True)
            self._done = True
