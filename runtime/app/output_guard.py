"""Output-side invariants, checked in one place before any work: never clobber an input or another output.

:func:`check_outputs` takes every input the run reads and every named output it will write (segmentation, report,
statistics, preview, summary, DICOM-SEG, ...) and raises a one-line :class:`~flare.runtime.foundation.errors.OutputError`
when

* an output is an existing folder, an existing non-regular file (device, FIFO, socket: the atomic rename would
  replace the node itself), or a path whose folder is missing or not writable,
* two outputs are the same file, or an output is one of the inputs.

"The same file" is decided twice: by the fully resolved path (symlinks followed, ``..`` removed, so two spellings
of one path are equal even when the file does not exist yet) and, for files that exist, by ``(st_dev, st_ino)``
(hard links, bind mounts, case-insensitive file systems). An input given as a folder (e.g. a DICOM series or a
batch folder, a bundle folder) also protects every existing file below it.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path

from flare.runtime.foundation.errors import OutputError
from flare.runtime.foundation.files import real_path

__all__ = ["check_outputs", "same_file"]


def _identity(path: Path) -> tuple[Path, tuple[int, int] | None]:
    """(resolved path, (device, inode) when the path exists)."""
    resolved = real_path(path)
    try:
        st = os.stat(path)
    except OSError:
        return resolved, None
    return resolved, (st.st_dev, st.st_ino)


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether ``a`` and ``b`` name the same file (resolved path, or device and inode when both exist)."""
    ra, ia = _identity(Path(a))
    rb, ib = _identity(Path(b))
    return ra == rb or (ia is not None and ia == ib)


def _inside(path: Path, folder: Path) -> bool:
    return folder in path.parents


def check_outputs(inputs: Iterable[str | Path], outputs: Mapping[str, str | Path | None], *,
                  writable: bool = True) -> None:
    """Refuse outputs that are folders, collide with each other or with an input (one-line ``OutputError``).

    ``outputs`` maps a role (``"segmentation"``, ``"report"``, ...) to a path; ``None`` entries are skipped.
    With ``writable`` (default) each output's folder must exist and accept a new file.
    """
    from flare.runtime.foundation.atomic import ensure_writable_folder

    # inputs indexed once (a folder of DICOM series passes every file): each output is then a few look-ups
    by_path: dict[Path, Path] = {}
    by_id: dict[tuple[int, int], Path] = {}
    folders: list[tuple[Path, Path]] = []
    for p in inputs:
        src = Path(p)
        src_res, src_id = _identity(src)
        by_path.setdefault(src_res, src)
        if src_id is not None:
            by_id.setdefault(src_id, src)
            if src.is_dir():
                folders.append((src, src_res))
    seen_path: dict[Path, tuple[str, Path]] = {}
    seen_id: dict[tuple[int, int], tuple[str, Path]] = {}
    for role, raw in outputs.items():
        if raw is None:
            continue
        out = Path(raw)
        resolved, ident = _identity(out)
        if out.is_dir():
            raise OutputError(out, f"{role} output is an existing folder; give a file name")
        if ident is not None and not stat.S_ISREG(os.stat(out).st_mode):
            # the atomic rename would replace the device node / FIFO / socket itself (e.g. /dev/null as root)
            raise OutputError(out, f"{role} output exists and is not a regular file (a device, FIFO or socket)")
        src_hit = by_path.get(resolved) or (by_id.get(ident) if ident is not None else None)
        if src_hit is not None:
            raise OutputError(out, f"{role} output is the input {src_hit}; it would be overwritten")
        if ident is not None:
            for src, src_res in folders:
                if _inside(resolved, src_res):
                    raise OutputError(out, f"{role} output would overwrite a file of the input folder {src}")
        other_hit = seen_path.get(resolved) or (seen_id.get(ident) if ident is not None else None)
        if other_hit is not None:
            other_role, other = other_hit
            raise OutputError(out, f"{role} output is the same file as the {other_role} output {other}")
        seen_path.setdefault(resolved, (role, out))
        if ident is not None:
            seen_id.setdefault(ident, (role, out))
        if writable:
            ensure_writable_folder(out)
