"""Atomic file writes: write to a temporary file in the destination folder, then rename over the target."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import OutputError


def ensure_writable_folder(target: str | Path) -> Path:
    """The folder of ``target`` after checking, by really creating a file there, that it can be written
    (``os.access`` says yes to root even on read-only file systems). Raises OutputError."""
    target = Path(target)
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise OutputError(target, f"output folder {folder} does not exist")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise OutputError(target, f"output folder {folder} is not writable ({exc.strerror or exc})") from None
    return folder


@contextlib.contextmanager
def atomic_path(target: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success it is renamed to ``target``, on error removed.

    ``suffix`` (default: the target's full suffix, e.g. ``.nii.gz``) lets writers that pick a format from the file
    name (nibabel) see the right ending.
    """
    target = Path(target)
    folder = ensure_writable_folder(target)
    if suffix is None:
        suffix = "".join(target.suffixes) or ".tmp"
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix, dir=folder)
    except OSError as exc:
        raise OutputError(target, f"cannot write in {folder}: {exc.strerror or exc}") from None
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the permissions open() would
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(target: str | Path, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text)


def write_bytes_atomic(target: str | Path, blob: bytes) -> None:
    """Write ``blob`` to ``target`` atomically; problems raise ``OutputError``."""
    try:
        with atomic_path(target) as tmp:
            tmp.write_bytes(blob)
    except OSError as err:
        raise OutputError(target, f"cannot write: {err.strerror or err}") from None
