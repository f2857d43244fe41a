"""Atomic file writes: write to a temporary file in the destination folder, fsync it, then rename over the target.

Every file the tools write goes through :func:`atomic_path` (or the helpers built on it: :func:`write_text_atomic`,
:func:`write_bytes_atomic`, :func:`write_with` for writer callbacks such as ``savefig``/``save_as``, and
:func:`atomic_open`). On any exception, ``KeyboardInterrupt`` or a termination signal
(:class:`flare.runtime.app.process.Terminated`) the temporary file is removed and the target is untouched.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from flare.runtime.foundation.errors import OutputError
from flare.runtime.foundation.lifecycle import pause_point


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
        _fsync(tmp)
        pause_point("before-rename")
        os.replace(tmp, target)
    except OSError as exc:  # e.g. a full disk (ENOSPC) or a quota: one line naming the target
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise OutputError(target, f"cannot write: {exc.strerror or exc}") from None
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync(path: Path) -> None:
    """Flush a finished temp file to disk before it is renamed (a crash leaves the old file or the new one)."""
    with contextlib.suppress(OSError), open(path, "rb") as f:
        os.fsync(f.fileno())


def write_with(target: str | Path, writer: Callable[[Path], None], suffix: str | None = None) -> None:
    """Atomically create ``target`` with ``writer(tmp_path)``, e.g. ``write_with(p, lambda t: fig.savefig(t))``
    or ``write_with(p, ds.save_as)``. Any exception (or a termination signal) leaves no file behind."""
    with atomic_path(target, suffix) as tmp:
        writer(tmp)


@contextlib.contextmanager
def atomic_open(target: str | Path, mode: str = "w", **kwargs: Any) -> Iterator[IO[Any]]:
    """``open()``-like context manager (``"w"``/``"wb"``) whose file appears at ``target`` only when the block
    finishes without an exception."""
    if mode not in ("w", "wb", "wt"):
        raise ValueError(f"atomic_open supports the modes w, wt and wb, not {mode!r}")
    with atomic_path(target) as tmp, open(tmp, mode, **kwargs) as f:
        yield f


def write_text_atomic(target: str | Path, text: str, encoding: str = "utf-8") -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding=encoding)


def write_bytes_atomic(target: str | Path, data: bytes) -> None:
    """Write ``data`` to ``target`` atomically; problems raise ``OutputError``."""
    try:
        with atomic_path(target) as tmp:
            tmp.write_bytes(data)
    except OSError as err:
        raise OutputError(target, f"cannot write: {err.strerror or err}") from None
