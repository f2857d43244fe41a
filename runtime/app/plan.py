"""What ``flare-run`` will do, decided before any work: the cases behind its INPUT arguments and each case's outputs.

An INPUT is a NIfTI file, a single DICOM file, a DICOM series folder, or a folder of cases (NIfTI files and/or DICOM
series, found recursively; hidden files and folders are skipped). :func:`discover` turns the inputs into
:class:`Case` objects with unique names; :func:`make_plan` adds the output paths. Every problem is a one-line
:class:`~flare.runtime.foundation.errors.FlareError` raised before a model is loaded or a file is written.

**File mode** (one INPUT that is one image: a NIfTI file, a ``.dcm`` file or a folder holding exactly one DICOM
series, or one series picked with ``--series``): ``-o`` and the ``--statistics``/``--preview``/``--report`` values are
files. **Folder mode** (anything else): they are folders (created), and each case writes ``CASE.nii.gz`` (or
``CASE.dcm``), ``CASE_stats.json``, ``CASE_preview.png`` and ``CASE_report.json`` there; ``OUT/summary.json`` lists
every case.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

from flare.runtime.foundation.errors import InputError, OutputError
from flare.runtime.foundation.files import real_path

if TYPE_CHECKING:
    from flare.runtime.image.model import LoadedImage

__all__ = ["Case", "CaseJob", "OutputFormat", "Plan", "discover", "is_nifti_name", "make_plan"]

NIFTI_SUFFIXES = (".nii.gz", ".nii")
#: an output named ``*.rtstruct.dcm`` is an RTSTRUCT; any other ``*.dcm`` a DICOM-SEG
RTSTRUCT_SUFFIX = ".rtstruct.dcm"
#: ``--statistics`` given without a path (flare-run's TotalSegmentator habit): the statistics go beside the output
BESIDE_OUTPUT = Path("::beside-the-output::")
#: DICOM modalities that become cases when a folder is searched (other series, e.g. SEG or SR, are skipped)
CASE_MODALITIES = ("CT", "")


class OutputFormat(str, Enum):
    """What a label map is written as."""

    nifti = "nifti"
    dicom_seg = "dicom-seg"
    rtstruct = "rtstruct"

    @property
    def suffix(self) -> str:
        return {"nifti": ".nii.gz", "dicom-seg": ".dcm", "rtstruct": RTSTRUCT_SUFFIX}[self.value]

    @property
    def needs_dicom(self) -> bool:
        return self is not OutputFormat.nifti


@dataclass(frozen=True)
class Case:
    """One image to segment: a NIfTI file, or a DICOM series (a ``.dcm`` file or a folder plus its series UID)."""

    name: str  # unique among the cases of one run; names the outputs in folder mode
    source: Path
    kind: str  # "nifti", "dicom", or "unreadable" (a file or folder the search could not read: a failed case)
    series_uid: str | None = None
    description: str = ""
    rel: str = ""  # path relative to the INPUT it was found in (disambiguates equal names)
    error: str | None = None  # found broken while searching (a damaged DICOM file): read() raises it

    def read(self, preflight: Callable[..., None] | None = None) -> LoadedImage:
        """Read and validate the image (one-line ``InputError`` on any problem); ``preflight(path, shape, affine,
        itemsize, scaled, source_bytes)`` refuses it from the header(s), before any voxel is decoded."""
        if self.error is not None:
            raise InputError(None, self.error)
        if self.kind == "dicom":
            from flare.runtime.image.dicom import read_dicom

            return read_dicom(self.source, self.series_uid, preflight=preflight)
        from flare.runtime.image.nifti import read_image

        return read_image(self.source, preflight=preflight)


@dataclass(frozen=True)
class CaseJob:
    """A case and the files it writes (``None``: not asked for)."""

    case: Case
    output: Path
    statistics: Path | None = None
    preview: Path | None = None
    report: Path | None = None
    masks: Path | None = None  # folder of one mask file per label (TotalSegmentator's names)
    tables: tuple[Path, ...] = ()  # label tables for viewers (3D Slicer .ctbl, ITK-SNAP label description)

    def outputs(self) -> list[Path]:
        return [p for p in (self.output, self.statistics, self.preview, self.report, *self.tables) if p is not None]


@dataclass
class Plan:
    jobs: list[CaseJob]
    folder_mode: bool
    fmt: OutputFormat
    out_dir: Path | None = None  # folder mode: where summary.json goes
    folders: list[Path] = field(default_factory=list)  # folders to create before the first case
    skipped: list[str] = field(default_factory=list)  # one line per DICOM series not taken as a case
    roi_subset: tuple[int, ...] | None = None  # FLARE ids kept in the outputs (--roi-subset); None: all

    @property
    def summary_path(self) -> Path | None:
        return None if self.out_dir is None else self.out_dir / "summary.json"

    def create_folders(self) -> None:
        for folder in self.folders:
            try:
                folder.mkdir(exist_ok=True)
            except OSError as err:
                raise OutputError(folder, f"cannot create the folder: {err.strerror or err}") from None

    def remove_empty_folders(self) -> None:
        """Remove the folders :meth:`create_folders` made that are still empty (an interrupted run), deepest first."""
        for folder in reversed(self.folders):
            try:
                folder.rmdir()  # only an empty folder
            except OSError:
                pass


# ------------------------------------------------------------------------------------------------ discovery
def is_nifti_name(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def _stem(path: Path) -> str:
    name = path.name
    for suffix in NIFTI_SUFFIXES + (".dcm",):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _safe(name: str) -> str:
    """A file-name-safe version of ``name`` (letters, digits, ``.``, ``_``, ``-``)."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")
    return cleaned or "case"


def _inside(path: Path, folders: Sequence[Path]) -> bool:
    resolved = real_path(path)
    return any(resolved == f or f in resolved.parents for f in folders)


def _search(folder: Path, exclude: Sequence[Path], skipped: list[str]) -> tuple[list[Path], bool, list[Case]]:
    """One stat-first walk of an INPUT folder (:func:`flare.runtime.foundation.files.walk`): its NIfTI files (those
    flare wrote left out, with a note), whether it holds other files (candidate DICOM files), and a failed case per
    entry that cannot be read. FIFOs, devices and sockets are never opened (a note each)."""
    from flare.runtime.foundation.files import walk
    from flare.runtime.image.nifti import written_by_flare

    found = walk(folder, skip_folder=lambda p: _inside(p, exclude))
    skipped.extend(str(p) for p in found.special)
    niftis = []
    for path in (f for f in found.files if is_nifti_name(f)):
        mark = written_by_flare(path)
        if mark:
            skipped.append(f"{path}: written by flare ({mark}), not a CT; skipped")
        else:
            niftis.append(path)
    others = any(not is_nifti_name(f) for f in found.files)
    failed = [Case(_safe(_rel(p.path, folder).replace(os.sep, "_")), p.path, "unreadable", None, "",
                   _rel(p.path, folder), error=str(p)) for p in found.unreadable]
    return niftis, others, failed


def _series_cases(folder: Path, root: Path, exclude: Sequence[Path], skipped: list[str]) -> list[Case]:
    """The DICOM CT series under ``folder``. A damaged DICOM file makes only the case around it fail: the search
    is split per subfolder, and the innermost folder that still fails becomes a case that reports the problem."""
    from flare.runtime.image.dicom import find_series, is_dicom_file

    try:
        found = [s for s in find_series(folder) if not _inside(s.folder, exclude)]
    except InputError as err:
        try:
            entries = sorted(folder.iterdir())
        except OSError:  # an unreadable folder: already a failed case of the search (_search)
            return []
        subfolders = [p for p in entries if p.is_dir() and not p.name.startswith(".") and not _inside(p, exclude)]
        loose = [p for p in entries if not p.name.startswith(".") and is_dicom_file(p)]
        cases = [c for sub in subfolders for c in _series_cases(sub, root, exclude, skipped)]
        if loose:  # the files right here (or a subfolder's) hold the problem
            cases.insert(0, Case(_safe(_rel_name(folder, root)), folder, "dicom", None, "", _rel(folder, root),
                                 error=str(err)))
        return cases
    taken = [s for s in found if s.modality.upper() in CASE_MODALITIES]
    skipped.extend(f"{s.folder}: series {s.uid} ({s.modality} {s.description!r}) is not a CT, skipped"
                   for s in found if s not in taken)
    per_folder: dict[Path, int] = {}
    for s in taken:
        per_folder[s.folder] = per_folder.get(s.folder, 0) + 1
    cases = []
    for s in sorted(taken, key=lambda s: (str(s.folder), s.uid)):
        base = _rel_name(s.folder, root)
        if per_folder[s.folder] > 1:
            base = f"{base}_{s.description or s.uid.rsplit('.', 1)[-1]}"
        cases.append(Case(_safe(base), s.folder, "dicom", s.uid, s.description, _rel(s.folder, root)))
    return cases


def _rel(folder: Path, root: Path) -> str:
    try:
        return str(folder.relative_to(root))
    except ValueError:
        return folder.name


def _rel_name(folder: Path, root: Path) -> str:
    """A series folder's name; the INPUT folder's own (resolved) name when the series is the INPUT itself."""
    real = real_path(folder)
    return real.name if real == real_path(root) else folder.name


def _is_dicom(path: Path) -> bool:
    if path.suffix.lower() == ".dcm":
        return True
    from flare.runtime.image.dicom import is_dicom_file

    return is_dicom_file(path)


def _cases_of(path: Path, exclude: Sequence[Path], skipped: list[str]) -> tuple[list[Case], bool]:
    """The cases of one INPUT and whether the INPUT is itself one image (file mode is possible)."""
    if not path.exists():
        raise InputError(path, "a symbolic link to nothing (or a loop of links)" if os.path.islink(path)
                         else "no such file or folder")
    if not path.is_dir():
        if not is_nifti_name(path) and _is_dicom(path):
            return [Case(_safe(_stem(path)), path, "dicom", None, "", path.name)], True
        return [Case(_safe(_stem(path)), path, "nifti", None, "", path.name)], True  # read_image judges the rest
    files, others, unreadable = _search(path, exclude, skipped)
    niftis = [Case(_safe(_stem(p)), p, "nifti", None, "", str(p.relative_to(path))) for p in files]
    if not niftis and not others and not unreadable:
        raise InputError(path, "is a folder without NIfTI files or DICOM series")
    series: list[Case] = []
    if others:
        from flare.runtime.app.entrypoints import need

        message = need([("pydicom", "dicom")])
        if message is None:
            series = _series_cases(path, path, exclude, skipped)
        elif niftis:
            skipped.append(f"{path}: files other than NIfTI were not searched for DICOM series (reading DICOM "
                           f"{message})")
        else:
            raise InputError(path, f"holds no NIfTI files; reading DICOM {message}")
    if not niftis and not series and not unreadable:
        raise InputError(path, "folder holds no NIfTI files (.nii, .nii.gz) or DICOM CT series")
    one_series = not niftis and not unreadable and len(series) == 1
    return niftis + series + unreadable, one_series


def _unique_names(cases: list[Case]) -> list[Case]:
    """Give equal names their relative path, then ``_2``, ``_3`` … in discovery order (case-insensitively)."""
    counts: dict[str, int] = {}
    for c in cases:
        counts[c.name.lower()] = counts.get(c.name.lower(), 0) + 1
    renamed = [replace(c, name=_safe(c.rel.replace(os.sep, "_").removesuffix(".nii.gz").removesuffix(".nii")
                                      .removesuffix(".dcm")))
               if counts[c.name.lower()] > 1 and c.rel not in ("", ".") else c for c in cases]
    seen: set[str] = set()
    out = []
    for c in renamed:
        name, k = c.name, 1
        while name.lower() in seen:
            k += 1
            name = f"{c.name}_{k}"
        seen.add(name.lower())
        out.append(replace(c, name=name))
    return out


def discover(inputs: Sequence[Path], series: str | None = None, exclude: Iterable[Path] = ()
             ) -> tuple[list[Case], bool, list[str]]:
    """``(cases, file_mode, skipped)`` for the INPUT arguments; ``series`` keeps only that DICOM series."""
    if not inputs:
        raise InputError(None, "no INPUT given")
    excluded = [real_path(p) for p in exclude]
    cases: list[Case] = []
    singles: list[bool] = []
    skipped: list[str] = []
    for path in inputs:
        real = real_path(path)
        below = [e for e in excluded if real in e.parents]  # outputs inside this input folder
        found, single = _cases_of(path, below, skipped)
        cases += found
        singles.append(single)
    if series is not None:
        picked = [c for c in cases if c.kind == "dicom" and (c.series_uid in (None, series))]
        if not picked:
            raise InputError(inputs[0] if len(inputs) == 1 else None,
                             f"no DICOM series {series} among the inputs")
        cases = [replace(c, series_uid=series) for c in picked]
    file_mode = len(inputs) == 1 and len(cases) == 1 and (singles[0] or series is not None)
    return _unique_names(cases), file_mode, skipped


# ------------------------------------------------------------------------------------------------ outputs
def default_output(input_path: Path, kind: str = "nifti") -> Path:
    """``ct.nii.gz`` → ``ct_seg.nii.gz`` beside the input; a DICOM folder ``study/ct``, or a file in it, →
    ``study/ct_seg.nii.gz`` (beside the series, never inside it)."""
    if kind == "dicom" and not input_path.is_dir():
        input_path = input_path.parent
    base = input_path if input_path.name not in ("", ".", "..") else real_path(input_path)
    return base.with_name(_stem(base) + "_seg.nii.gz")


def _format_of(output: Path) -> OutputFormat:
    name = output.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        return OutputFormat.nifti
    if name.endswith(RTSTRUCT_SUFFIX):
        return OutputFormat.rtstruct
    if name.endswith(".dcm"):
        return OutputFormat.dicom_seg
    raise OutputError(output, f"output must end in .nii.gz or .nii (NIfTI), {RTSTRUCT_SUFFIX} (RTSTRUCT) or .dcm "
                              "(DICOM-SEG)")


def table_paths(output: Path) -> tuple[Path, Path]:
    """The label tables written beside ``output`` with ``--label-table``: ``STEM.ctbl`` (3D Slicer colour table)
    and ``STEM.itksnap.txt`` (ITK-SNAP label description file)."""
    stem = _stem(output).removesuffix(".rtstruct")
    return output.with_name(stem + ".ctbl"), output.with_name(stem + ".itksnap.txt")


def _check_file_target(path: Path, what: str, suffixes: tuple[str, ...]) -> None:
    from flare.runtime.foundation.atomic import ensure_writable_folder

    if not path.name.lower().endswith(suffixes):
        raise OutputError(path, f"{what} must end in {' or '.join(suffixes)}")
    if path.is_dir():
        raise OutputError(path, f"{what} is a folder; give a file name ending in {suffixes[0]}")
    ensure_writable_folder(path)


def _check_folder_target(path: Path, what: str) -> bool:
    """Whether ``path`` must be created; OutputError when it cannot be a folder for the outputs."""
    from flare.runtime.foundation.atomic import ensure_writable_folder

    if path.exists() and not path.is_dir():
        raise OutputError(path, f"{what} is a file; several cases need a folder")
    if path.is_dir():
        ensure_writable_folder(path / "x")
        return False
    ensure_writable_folder(path)  # the parent must exist and be writable
    return True


def _input_files(case: Case) -> list[Path]:
    if case.source.is_dir():
        try:
            return [p for p in case.source.iterdir() if p.is_file()]
        except OSError:  # an unreadable folder (a failed case): nothing in it can be named as an output
            return [case.source]
    return [case.source]


def _check_distinct(jobs: Sequence[CaseJob], cases: Sequence[Case], extra: Sequence[Path] = (),
                    protect: Sequence[Path] = (), subset: Sequence[int] | None = None) -> None:
    """No two outputs (the mask files of ``--masks`` included) are the same file, no output is an input or an
    existing file below a ``protect`` folder (:func:`flare.runtime.app.output_guard.check_outputs`: resolved paths and
    device/inode), and no ``--masks`` folder is the path of an output file. Folders are created separately."""
    from flare.runtime.app.label_outputs import mask_paths
    from flare.runtime.app.output_guard import check_outputs
    from flare.runtime.foundation.labels import LABELS

    outputs: dict[str, Path | None] = {}
    for job in jobs:
        prefix = f"{job.case.name} " if len(jobs) > 1 else ""
        for role, path in (("segmentation", job.output), ("statistics", job.statistics),
                           ("preview", job.preview), ("report", job.report),
                           *((f"label table {i + 1}", t) for i, t in enumerate(job.tables))):
            outputs[prefix + role] = path
        if job.masks is not None:
            outputs.update({f"{prefix}{LABELS[i].file} mask": p for i, p in mask_paths(job.masks, subset).items()})
    outputs.update({f"summary{'' if i == 0 else i}": p for i, p in enumerate(extra)})
    check_outputs([*(p for c in cases for p in _input_files(c)), *protect], outputs, writable=False)
    masked = [job for job in jobs if job.masks is not None]
    if not masked:
        return
    files = {real_path(p): role for role, p in outputs.items() if p is not None}
    for job in masked:  # an existing folder at an output's path was refused above; a new one must not be made there
        clash = files.get(real_path(job.masks))  # type: ignore[arg-type]
        if clash is not None:
            raise OutputError(job.masks, f"the --masks folder is the path of the {clash} output")


def make_plan(inputs: Sequence[Path], *, output: Path | None, fmt: OutputFormat | None = None,
              series: str | None = None, statistics: Path | None = None, preview: Path | None = None,
              report: Path | None = None, masks: Path | None = None, label_table: bool = False,
              roi_subset: Sequence[str] | None = None, protect: Sequence[Path] = ()) -> Plan:
    """Decide the cases and their output paths, checking every output before any work (one-line errors).
    ``statistics`` may be :data:`BESIDE_OUTPUT` (``--statistics`` without a path). ``protect``: folders the run
    reads besides the cases (the bundle), whose existing files no output may replace."""
    subset = _subset_ids(roi_subset)
    beside = statistics == BESIDE_OUTPUT
    exclude = [p for p in (output, None if beside else statistics, preview, report, masks) if p is not None]
    cases, file_mode, skipped = discover(inputs, series, exclude)
    if file_mode:
        case = cases[0]
        out = output if output is not None else default_output(inputs[0], case.kind)
        if output is None and fmt is not None and fmt is not OutputFormat.nifti:
            out = out.with_name(out.name.removesuffix(".nii.gz") + fmt.suffix)
        out_fmt = _format_of(out)
        if fmt is not None and fmt is not out_fmt:
            raise OutputError(out, f"--format {fmt.value} does not match the output name (use {fmt.suffix})")
        if out_fmt.needs_dicom and case.kind != "dicom":
            what = "RTSTRUCT" if out_fmt is OutputFormat.rtstruct else "DICOM-SEG"
            raise OutputError(out, f"{what} output needs a DICOM input; {case.source} is NIfTI "
                                   "(write .nii.gz instead)")
        _check_file_target(out, "output", NIFTI_SUFFIXES + (".dcm",))
        if beside:
            statistics = out.with_name(_stem(out).removesuffix(".rtstruct") + "_stats.json")
        if masks is not None:
            _check_folder_target(masks, "--masks folder")
        for path, what, suffixes in ((statistics, "--statistics", (".json",)), (preview, "--preview", (".png",)),
                                     (report, "--report", (".json",))):
            if path is not None:
                _check_file_target(path, what, suffixes)
        job = CaseJob(case, out, statistics, preview, report, masks, table_paths(out) if label_table else ())
        _check_distinct([job], cases, protect=protect, subset=subset)
        return Plan([job], False, out_fmt, folders=[masks] if masks is not None and not masks.is_dir() else [],
                    skipped=skipped, roi_subset=subset)
    if output is None:
        raise OutputError(None, f"{len(cases)} cases found: give an output folder with -o")
    for path, what in ((output, "-o"), (statistics, "--statistics"), (preview, "--preview"), (report, "--report")):
        if path is not None and not path.is_dir() and path.name.lower().endswith(NIFTI_SUFFIXES + (".dcm", ".json",
                                                                                                 ".png")):
            raise OutputError(path, f"{len(cases)} cases found: {what} must be a folder, not a file name")
    fmt = fmt or OutputFormat.nifti
    if fmt.needs_dicom:
        nifti = [c for c in cases if c.kind != "dicom"]
        if nifti:
            raise OutputError(output, f"--format {fmt.value} needs DICOM inputs; {nifti[0].source} is NIfTI "
                                      "(use --format nifti)")
    if beside:
        statistics = output
    folders = []
    for path, what in ((output, "output"), (statistics, "--statistics"), (preview, "--preview"),
                       (report, "--report"), (masks, "--masks")):
        if path is not None and _check_folder_target(path, f"{what} folder") and path not in folders:
            folders.append(path)
    if masks is not None:
        folders += [masks / c.name for c in cases if not (masks / c.name).is_dir()]
    jobs = [CaseJob(c, output / f"{c.name}{fmt.suffix}",
                    None if statistics is None else statistics / f"{c.name}_stats.json",
                    None if preview is None else preview / f"{c.name}_preview.png",
                    None if report is None else report / f"{c.name}_report.json",
                    None if masks is None else masks / c.name,
                    table_paths(output / f"{c.name}{fmt.suffix}") if label_table else ()) for c in cases]
    _check_distinct(jobs, cases, [output / "summary.json"], protect, subset)
    return Plan(jobs, True, fmt, output, folders, skipped, subset)


def _subset_ids(names: Sequence[str] | None) -> tuple[int, ...] | None:
    """``--roi-subset`` names (TotalSegmentator's, e.g. ``kidney_left``, or the registry's short/full names) as
    sorted FLARE ids; an unknown name is a one-line InputError listing the valid ones."""
    if not names:
        return None
    from flare.runtime.foundation.labels import label_named

    ids = set()
    for name in names:
        try:
            ids.add(label_named(name).id)
        except KeyError as err:
            raise InputError(None, f"--roi-subset: {err.args[0]}") from None
    return tuple(sorted(ids))

