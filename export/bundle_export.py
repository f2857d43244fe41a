"""Checkpoints -> bundle: export every network to ONNX (fp32, optionally fp16), optimise, verify, write bundle.json.

The bundle is built in a temporary folder beside ``out_dir`` and renamed into place at the end, so a failed export
never leaves a half-written bundle; an existing flare bundle at ``out_dir`` is replaced, any other non-empty folder
is refused.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from flare.runtime.bundle.card import CARD_FILE, ModelCard, card_from_raw
from flare.runtime.bundle.manifest import (
    FORMAT,
    load_bundle,
    model_entry,
    new_bundle_json,
    read_card_file,
    sha256_file,
    write_bundle_json,
)
from flare.runtime.foundation.errors import BundleError, InputError, OutputError
from flare.runtime.foundation.files import is_within
from flare.runtime.foundation.lifecycle import pause_point

from .onnx_export import INPUT_NAME, OUTPUT_NAME, export_onnx, optimise_if_helpful
from .sources import ExportSources, ModelSource, config_hash, flare_sources

Step = Callable[[str], None]


def export_bundle(ckpt_dir: str | Path, out_dir: str | Path, fp16: bool = False, trt: bool = False,
                  opset: int = 17, verify: bool = True, progress: bool = True, command: str | None = None,
                  int8: bool = False, calibration: Sequence[str | Path] = (), profile: str | None = None,
                  card: str | Path | None = None) -> Path:
    """Export the ``flare-train`` checkpoints in ``ckpt_dir`` (locator + fold0..N) to a bundle at ``out_dir``.

    ``int8`` adds static int8 models calibrated on the ``calibration`` CTs (:mod:`flare.export.quantize`);
    ``profile`` ("gpu" or "cpu") defaults to the training config's ``profile`` key.
    Returns the bundle folder. Problems raise :class:`flare.runtime.foundation.errors.FlareError` subclasses."""
    if trt:
        from .trt import import_tensorrt

        import_tensorrt()  # fail before the long work when TensorRT is missing
    if int8:
        from .quantize import calibration_cases

        calibration = calibration_cases(calibration)  # fail before the long work
    sources = flare_sources(ckpt_dir)
    if profile is not None:
        sources.profile = profile
    cmd = command or f"flare.export.export_bundle({str(ckpt_dir)!r}, {str(out_dir)!r}, fp16={fp16}, trt={trt}, " \
                     f"opset={opset}, verify={verify}, int8={int8}, calibration={[str(c) for c in calibration]})"
    return export_sources(sources, out_dir, fp16=fp16, trt=trt, opset=opset, verify=verify, progress=progress,
                          command=cmd, calibration=[Path(c) for c in calibration] if int8 else None, card=card)


def export_sources(sources: ExportSources, out_dir: str | Path, *, fp16: bool = False, trt: bool = False,
                   opset: int = 17, verify: bool = True, progress: bool = True, command: str = "",
                   calibration: list[Path] | None = None, card: str | Path | None = None) -> Path:
    """Export already loaded :class:`ExportSources` (flare checkpoints or an Auto3DSeg import) to ``out_dir``;
    with ``calibration`` (CT paths) also static int8 models, verified against fp32; ``card``: a model-card JSON file
    whose fields replace the derived ones (:func:`model_card`)."""
    out = Path(out_dir).resolve()
    check_target(out, reads=[sources.root, *([Path(card)] if card is not None else []), *(calibration or [])])
    model_card_doc = model_card(sources, card).to_json()  # a bad card file fails before the long work
    int8 = calibration is not None
    n_steps = len(sources.models) * (2 + int(fp16) + int(verify) + int(int8)) + int(trt) + 1
    with _progress(progress, n_steps) as step, _staging(out) as tmp:
        models, optimisation = {}, {}
        for src in sources.models:
            models[src.name], optimisation[src.name] = export_model(src, tmp, fp16, opset, step)
            pause_point(f"export:{src.name}")  # test hook (FLARE_TEST_PAUSE_AT); a no-op otherwise
        report: dict[str, Any] = verify_models(sources, tmp, models, fp16, step) if verify else {"skipped": True}
        if int8:
            report["int8"] = quantize_models(sources, tmp, models, calibration or [], step, gate=verify)
        doc = bundle_document(sources, models, opset, command)
        doc["card"] = model_card_doc
        doc["verification"] = report
        doc["provenance"]["optimisation"] = optimisation
        if trt:
            step("TensorRT engines")
            from .trt import build_bundle_engines

            doc["engines"] = build_bundle_engines(tmp, doc)
        step("bundle.json")
        write_bundle_json(tmp, doc)
        try:  # what flare-run will check: a bundle it would refuse is not written
            load_bundle(tmp, verify_hashes=False)
        except BundleError as err:
            raise InputError(sources.root, f"the checkpoints make a bundle that flare-run would refuse: "
                                           f"{err.problem}") from None
    return out


def export_model(src: ModelSource, folder: Path, fp16: bool, opset: int,
                 step: Step) -> tuple[dict[str, Any], dict[str, Any]]:
    """Write ``<name>.fp32.onnx`` (and ``<name>.fp16.onnx``) into ``folder``; returns the bundle MODEL entry and
    the optimisation measurement."""
    step(f"{src.name}: ONNX export")
    fp32 = export_onnx(src.net, folder / f"{src.name}.fp32.onnx", src.in_channels, opset, src.spatial_divisor)
    step(f"{src.name}: graph optimisation")
    optimisation = optimise_if_helpful(fp32, src.in_channels)
    files = {"fp32": _file_entry(fp32, "float32")}
    if fp16:
        step(f"{src.name}: fp16 conversion")
        from .fp16 import convert_to_fp16

        files["fp16"] = _file_entry(convert_to_fp16(fp32, folder / f"{src.name}.fp16.onnx"), "float32")
    entry = model_entry(src.name, files, out_channels=src.out_channels, in_channels=src.in_channels, opset=opset,
                        spatial_divisor=src.spatial_divisor)
    return entry, optimisation


def _file_entry(path: Path, io_dtype: str) -> dict[str, str]:
    return {"path": path.name, "sha256": sha256_file(path), "input_name": INPUT_NAME, "output_name": OUTPUT_NAME,
            "input_dtype": io_dtype, "output_dtype": io_dtype}


def verify_models(sources: ExportSources, folder: Path, models: dict[str, dict[str, Any]], fp16: bool,
                  step: Step) -> dict[str, Any]:
    """Parity of every exported file against its PyTorch network (see :mod:`flare.export.verify`)."""
    from .verify import MIN_AGREEMENT, TOLERANCE, default_ct_path, torch_reference, verification_tiles, verify_file

    ct = default_ct_path()
    results: dict[str, Any] = {}
    for src in sources.models:
        step(f"{src.name}: verification")
        tiles = verification_tiles(src.in_channels, sources.hu_window, ct, src.spatial_divisor)
        refs = torch_reference(src.net, tiles)
        results[src.name] = {p: verify_file(folder / f["path"], p, tiles, refs)
                             for p, f in models[src.name]["files"].items()}
    return {"passed": True, "backend": "onnxruntime CPUExecutionProvider vs PyTorch fp32 (CPU)",
            "tolerance": {**TOLERANCE, "min_agreement": MIN_AGREEMENT},
            "ct": str(ct) if ct else None, "models": results}


def quantize_models(sources: ExportSources, folder: Path, models: dict[str, dict[str, Any]], calibration: list[Path],
                    step: Step, gate: bool = True) -> dict[str, Any]:
    """Add an ``int8`` file to every MODEL entry (:mod:`flare.export.quantize`); returns the int8 verification
    record (settings, gate, and per model the candidates tried and the one kept)."""
    from .quantize import quantize_model, record, tile_set
    from .verify import default_ct_path

    ct = default_ct_path()
    grids: dict[tuple[Any, ...], Any] = {}  # tiles per (spacing, channels, divisor): the folds share theirs
    results: dict[str, Any] = {}
    for src in sources.models:
        step(f"{src.name}: int8 calibration + verification")
        spacing = sources.locator_spacing_mm if src.role == "locator" else sources.spacing_mm
        key = (tuple(spacing), src.in_channels, src.spatial_divisor)
        if key not in grids:
            grids[key] = tile_set(calibration, ct, spacing, sources.hu_window, src.in_channels,
                                  divisor=src.spatial_divisor)
        fp32 = folder / models[src.name]["files"]["fp32"]["path"]
        dst = folder / f"{src.name}.int8.onnx"
        results[src.name] = quantize_model(fp32, dst, grids[key], gate=gate, optional=src.role == "locator")
        if dst.is_file():
            models[src.name]["files"]["int8"] = _file_entry(dst, "float32")
    return {"passed": True if gate else None, "backend": "onnxruntime CPUExecutionProvider, int8 vs fp32",
            **record(), "models": results}


def bundle_document(sources: ExportSources, models: dict[str, dict[str, Any]], opset: int,
                    command: str) -> dict[str, Any]:
    """bundle.json content (without verification) from the sources and the exported MODEL entries."""
    folds = [models[m.name] for m in sources.folds]
    locator = models[sources.locator.name] if sources.locator else None
    doc = new_bundle_json(folds, locator, profile=sources.profile, spacing_mm=sources.spacing_mm, hu_window=sources.hu_window,
                          locator_spacing_mm=sources.locator_spacing_mm, locator_margin_mm=sources.locator_margin_mm,
                          roi=sources.roi, locator_roi=sources.locator_roi, provenance=provenance(sources, opset,
                                                                                                  command))
    return doc


def model_card(sources: ExportSources, card_file: str | Path | None = None) -> ModelCard:
    """The bundle's model card: ``card.json`` of the checkpoint folder (written by flare-train) when there is one,
    else what the checkpoints tell (recipe, date of the newest checkpoint; the data set stays ``unknown``), then
    the fields of ``card_file`` (``flare-export --card``) on top."""
    own = sources.root / CARD_FILE
    if own.is_file():
        card = card_from_raw(read_card_file(own))
    else:
        recipe = {str(m.config.get("training_config", {}).get("name") or "") for m in sources.folds} - {""}
        newest = max((m.checkpoint.stat().st_mtime for m in sources.models), default=None)
        card = ModelCard(recipe="auto3dseg segresnet" if sources.kind == "auto3dseg" else
                         (", ".join(sorted(recipe)) or "unknown"),
                         trained_at="unknown" if newest is None else
                         _dt.datetime.fromtimestamp(newest, _dt.UTC).date().isoformat())
    return card.merged(read_card_file(card_file)) if card_file is not None else card


def provenance(sources: ExportSources, opset: int, command: str) -> dict[str, Any]:
    """Versions, checkpoint and config hashes, date, opset and command of this export."""
    from importlib.metadata import PackageNotFoundError, version

    def ver(pkg: str) -> str | None:
        with contextlib.suppress(PackageNotFoundError):
            return version(pkg)
        return None

    checkpoints = {m.name: {"path": m.checkpoint.relative_to(sources.root).as_posix()
                            if m.checkpoint.is_relative_to(sources.root) else str(m.checkpoint),
                            "sha256": sha256_file(m.checkpoint), "config_sha256": m.config_sha256, "role": m.role}
                   for m in sources.models}
    return {
        "source": sources.kind,
        "checkpoint_dir": str(sources.root),
        "checkpoints": checkpoints,
        "config_sha256": config_hash({m.name: m.config for m in sources.models}),
        "torch": ver("torch"), "monai": ver("monai"), "onnx": ver("onnx"), "onnxruntime": ver("onnxruntime")
        or ver("onnxruntime-gpu"), "flare": ver("flare-seg"),
        "opset": opset,
        "exported_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "command": command or " ".join(sys.argv),
        "notes": list(sources.notes),
    }


def is_flare_bundle(folder: Path) -> bool:
    try:
        return json.loads((folder / "bundle.json").read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def check_target(out: Path, reads: Sequence[Path] = ()) -> None:
    """Refuse an output path that exists as a file or as a non-empty folder that is not a flare bundle, or a bundle
    folder that holds something the export reads (``reads``: its checkpoints, card, calibration CTs), which
    replacing the bundle would delete."""
    if out.exists() and not out.is_dir():
        raise OutputError(out, "exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not is_flare_bundle(out):
        raise OutputError(out, "folder is not empty and is not a flare bundle: refusing to overwrite it")
    for src in reads:
        if is_within(src, out):
            raise OutputError(out, f"holds {src}, which this export reads; replacing the bundle would delete it "
                                   "(write the bundle elsewhere)")
    if not out.parent.is_dir():
        raise OutputError(out, f"parent folder {out.parent} does not exist")


@contextlib.contextmanager
def _staging(out: Path) -> Iterator[Path]:
    """A temporary folder beside ``out`` that replaces ``out`` on success and is removed on failure."""
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as exc:
        raise OutputError(out, f"cannot create a folder beside it ({exc.strerror})") from None
    try:
        yield tmp
        tmp.chmod(0o755)
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            out.rename(old / "bundle")
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def _progress(enabled: bool, total: int) -> Iterator[Step]:
    """A ``step(description)`` callback that advances a rich progress bar (a no-op when quiet)."""
    if not enabled:
        yield lambda _desc: None
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description:<36}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), transient=False) as bar:
        task = bar.add_task("export", total=total)
        started = [False]

        def step(desc: str) -> None:
            bar.update(task, description=desc, advance=1 if started[0] else 0)
            started[0] = True

        yield step
        bar.update(task, description="done", completed=total)
