"""Walking input folders without hanging and without skipping anything silently.

:func:`walk` is the one folder search of the runtime (folders of cases, DICOM series): every entry is ``lstat``-ed
before anything else, so a FIFO, device or socket is never opened (opening a FIFO without a writer blocks forever);
symbolic links are followed to files, not to folders (as ``os.walk``: no loops); hidden entries (``.name``) are skipped; a folder or
file that cannot be read is not dropped but returned as a :class:`Problem` (the callers turn it into a failed case).
:func:`real_path` and :func:`is_within` are the one way paths are compared (inputs against outputs, a bundle against
what an export reads).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Problem", "Walk", "is_within", "kind_of", "real_path", "walk"]


def real_path(path: str | Path) -> Path:
    """``path`` with symlinks and ``..`` resolved; unlike ``Path.resolve`` a symlink loop is not an error here (it is
    refused, with one line, where the file is read or written)."""
    return Path(os.path.realpath(path))


def is_within(path: str | Path, folder: str | Path) -> bool:
    """Whether ``path`` is ``folder`` or below it, symlinks resolved."""
    inner, outer = real_path(path), real_path(folder)
    return inner == outer or outer in inner.parents


@dataclass(frozen=True)
class Problem:
    """An entry the search could not use: ``path`` and a one-line ``problem``."""

    path: Path
    problem: str

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}"


@dataclass
class Walk:
    """What :func:`walk` found: regular, readable files, unreadable entries, special files."""

    files: list[Path] = field(default_factory=list)  # a folder's files (by name) before its subfolders
    unreadable: list[Problem] = field(default_factory=list)  # cannot be listed or opened: a failed case
    special: list[Problem] = field(default_factory=list)  # FIFO, device, socket: never opened, skipped with a note


_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def kind_of(mode: int) -> str | None:
    """``None`` for a regular file, else what the file is (``"a FIFO (named pipe)"``, ...)."""
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a folder"
    return next((what for test, what in _KINDS if test(mode)), "not a regular file")


def _readable(path: Path) -> str | None:
    """Why a regular file cannot be opened for reading, or None (opening a regular file never blocks)."""
    try:
        with open(path, "rb"):
            return None
    except OSError as err:
        return f"cannot read: {err.strerror or err}"


def walk(folder: Path, skip_folder: Callable[[Path], bool] = lambda p: False) -> Walk:
    """Regular files under ``folder`` in ``os.walk`` order (a folder's files by name, then its subfolders by name,
    recursively; hidden entries and ``skip_folder`` folders left out)."""
    found = Walk()
    pending = [Path(folder)]
    while pending:
        here = pending.pop()
        try:
            with os.scandir(here) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as err:
            found.unreadable.append(Problem(here, f"cannot read the folder: {err.strerror or err}"))
            continue
        subfolders = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = Path(entry.path)
            try:
                mode = os.stat(path).st_mode  # follows a symlink: a link to a FIFO is a FIFO
            except OSError as err:
                found.unreadable.append(Problem(path, f"cannot read: {err.strerror or err}"))
                continue
            if stat.S_ISDIR(mode):
                if not entry.is_symlink() and not skip_folder(path):  # as os.walk: links to folders not followed
                    subfolders.append(path)
                continue
            what = kind_of(mode)
            if what is not None:
                found.special.append(Problem(path, f"is {what}, not a regular file; skipped (never opened)"))
                continue
            problem = _readable(path)
            if problem is not None:
                found.unreadable.append(Problem(path, problem))
            else:
                found.files.append(path)
        pending.extend(reversed(subfolders))
    return found
