"""The model bundle: ``bundle.json`` plus model files, the only thing the runtime needs.

Schema (format version 1)::

    {
      "format": "flare-bundle", "format_version": 1,
      "labels": {...flare.runtime.labels.registry_snapshot()...},
      "preprocessing": {"spacing_mm": [1, 1, 1], "hu_window": [-250, 250], "orientation": "RAS",
                        "locator_spacing_mm": [4, 4, 4], "locator_margin_mm": 20.0},
      "locator": MODEL,                       # optional: without it the whole image is used
      "folds": [MODEL, ...],                  # at least one
      "tiling": {"roi": [224, 224, 224], "overlap": 0.0, "blend": "constant", "locator_roi": [128, 128, 128]},
      "postprocess": {"mode": "paper", "min_tumor_voxels": 100, "largest_component": [1, 2, 3, 4, 5, 13],
                      "z_pass": true},
      "provenance": {"monai": "...", "torch": "...", "onnx": "...", "config_sha256": "...", ...},
      "verification": {...}                   # optional, written by flare-export
    }

    MODEL = {"name": "fold0", "in_channels": 1, "out_channels": 13, "output": "logits",
             "spatial_divisor": 16, "opset": 17,
             "files": {"fp32": {"path": "fold0.fp32.onnx", "sha256": "...", "input_name": "image",
                                "output_name": "logits", "input_dtype": "float32", "output_dtype": "float32"},
                       "fp16": {...}}}

``postprocess.mode`` is the default rule set of ``flare-run`` (``paper`` or ``strict``, see
:mod:`flare.runtime.postprocessing`); bundles written before it existed get ``paper``. ``largest_component`` lists the
organs those rules clean (the paper's largest z run, or the strict largest 3-D component); ``z_pass`` is the strict
rules' organ-union z pass.

Paths inside the bundle are relative to the bundle folder. The locator has one output channel (organ-union logit,
foreground where > 0) or several (foreground where argmax > 0). Folds output merged-space logits
(``flare.runtime.labels.NUM_MERGED_CLASSES`` channels); the runtime applies softmax.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import BundleError
from .labels import check_snapshot
from .postprocessing import DEFAULT_MODE, check_mode

FORMAT = "flare-bundle"
FORMAT_VERSION = 1
PRECISIONS = ("fp32", "fp16")
_DTYPES = {"float32", "float16"}


@dataclass(frozen=True)
class ModelFile:
    path: Path  # absolute
    sha256: str
    input_name: str
    output_name: str
    input_dtype: str
    output_dtype: str


@dataclass(frozen=True)
class ModelSpec:
    name: str
    in_channels: int
    out_channels: int
    spatial_divisor: int
    opset: int
    files: dict[str, ModelFile]  # precision -> file

    def file_for(self, precision: str) -> ModelFile:
        """The file for ``precision``; fp16 falls back to fp32 when the bundle has no fp16 model."""
        if precision in self.files:
            return self.files[precision]
        if "fp32" in self.files:
            return self.files["fp32"]
        raise BundleError(None, f"model {self.name} has no {precision} or fp32 file")


@dataclass(frozen=True)
class Bundle:
    root: Path
    raw: dict[str, Any]
    locator: ModelSpec | None
    folds: tuple[ModelSpec, ...]
    spacing_mm: tuple[float, float, float]
    hu_window: tuple[float, float]
    locator_spacing_mm: tuple[float, float, float]
    locator_margin_mm: float
    roi: tuple[int, int, int]
    locator_roi: tuple[int, int, int]
    overlap: float
    blend: str
    min_tumor_voxels: int
    largest_component: tuple[int, ...]
    z_pass: bool
    postprocess_mode: str = DEFAULT_MODE
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def precisions(self) -> tuple[str, ...]:
        return tuple(p for p in PRECISIONS if all(p in m.files for m in self.folds))


def default_bundle_dir() -> Path:
    """Where ``flare-run`` looks for a bundle without ``--bundle``: ``$FLARE_BUNDLE``, else the per-user cache
    folder ``$XDG_CACHE_HOME/flare/bundle`` (``~/.cache/flare/bundle``), where ``flare-demo`` installs one."""
    import os

    env = os.environ.get("FLARE_BUNDLE")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "flare" / "bundle"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _get(d: dict, key: str, where: str, bundle_json: Path) -> Any:
    if not isinstance(d, dict) or key not in d:
        raise BundleError(bundle_json, f"missing field {where}{key}")
    return d[key]


def _triple(value: Any, key: str, bundle_json: Path, kind: type = float) -> tuple:
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise BundleError(bundle_json, f"field {key} must be a list of 3 numbers")
    try:
        out = tuple(kind(v) for v in value)
    except (TypeError, ValueError):
        raise BundleError(bundle_json, f"field {key} must be a list of 3 numbers") from None
    if not all(v > 0 for v in out):
        raise BundleError(bundle_json, f"field {key} must be positive")
    return out


def _model(entry: Any, where: str, root: Path, bundle_json: Path, verify: bool) -> ModelSpec:
    if not isinstance(entry, dict):
        raise BundleError(bundle_json, f"{where} must be an object")
    files_raw = _get(entry, "files", f"{where}.", bundle_json)
    if not isinstance(files_raw, dict) or not files_raw:
        raise BundleError(bundle_json, f"{where}.files must name at least one precision")
    files: dict[str, ModelFile] = {}
    for precision, f in files_raw.items():
        if precision not in PRECISIONS:
            raise BundleError(bundle_json, f"{where}.files has unknown precision {precision!r}")
        rel = str(_get(f, "path", f"{where}.files.{precision}.", bundle_json))
        path = (root / rel).resolve()
        if root.resolve() not in path.parents:
            raise BundleError(bundle_json, f"{where}.files.{precision}.path {rel!r} points outside the bundle")
        digest = str(_get(f, "sha256", f"{where}.files.{precision}.", bundle_json))
        if not path.is_file():
            raise BundleError(path, f"model file of {where} ({precision}) is missing")
        if verify and sha256_file(path) != digest:
            raise BundleError(path, f"sha256 mismatch for {where} ({precision}): the file was changed or corrupted")
        dtypes = (f.get("input_dtype", "float32"), f.get("output_dtype", "float32"))
        if not set(dtypes) <= _DTYPES:
            raise BundleError(bundle_json, f"{where}.files.{precision} has unsupported dtypes {dtypes}")
        files[precision] = ModelFile(path, digest, str(f.get("input_name", "image")),
                                     str(f.get("output_name", "logits")), dtypes[0], dtypes[1])
    try:
        return ModelSpec(
            name=str(entry.get("name", where)),
            in_channels=int(entry.get("in_channels", 1)),
            out_channels=int(_get(entry, "out_channels", f"{where}.", bundle_json)),
            spatial_divisor=int(entry.get("spatial_divisor", 16)),
            opset=int(entry.get("opset", 17)),
            files=files,
        )
    except (TypeError, ValueError) as exc:
        raise BundleError(bundle_json, f"{where} has a malformed field: {exc}") from None


def load_bundle(path: str | Path, verify_hashes: bool = True) -> Bundle:
    """Load and validate a bundle folder (or its ``bundle.json``). Any problem raises a one-line BundleError."""
    path = Path(path)
    bundle_json = path if path.name == "bundle.json" else path / "bundle.json"
    root = bundle_json.parent
    if not root.exists():
        raise BundleError(root, "bundle folder does not exist (run flare-export or flare-demo, or pass --bundle)")
    if not bundle_json.is_file():
        raise BundleError(bundle_json, "bundle.json is missing: not a flare bundle folder")
    try:
        raw = json.loads(bundle_json.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(bundle_json, f"cannot parse bundle.json ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise BundleError(bundle_json, f"not a flare bundle (field format must be {FORMAT!r})")
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(bundle_json, f"bundle format_version {version!r} is not supported by this runtime "
                                       f"(supports {FORMAT_VERSION}); re-export it or upgrade flare")
    try:
        check_snapshot(_get(raw, "labels", "", bundle_json))
    except ValueError as exc:
        raise BundleError(bundle_json, str(exc)) from None
    pre = _get(raw, "preprocessing", "", bundle_json)
    folds_raw = _get(raw, "folds", "", bundle_json)
    if not isinstance(folds_raw, list) or not folds_raw:
        raise BundleError(bundle_json, "field folds must list at least one model")
    folds = tuple(_model(m, f"folds[{i}]", root, bundle_json, verify_hashes) for i, m in enumerate(folds_raw))
    locator = raw.get("locator")
    loc = _model(locator, "locator", root, bundle_json, verify_hashes) if locator else None
    tiling = raw.get("tiling", {})
    post = raw.get("postprocess", {})
    hu = _get(pre, "hu_window", "preprocessing.", bundle_json)
    if not isinstance(hu, (list, tuple)) or len(hu) != 2 or not float(hu[0]) < float(hu[1]):
        raise BundleError(bundle_json, "preprocessing.hu_window must be [low, high] with low < high")
    overlap = float(tiling.get("overlap", 0.0))
    if not 0.0 <= overlap < 1.0:
        raise BundleError(bundle_json, "tiling.overlap must lie in [0, 1)")
    return Bundle(
        root=root,
        raw=raw,
        locator=loc,
        folds=folds,
        spacing_mm=_triple(_get(pre, "spacing_mm", "preprocessing.", bundle_json), "spacing_mm", bundle_json),
        hu_window=(float(hu[0]), float(hu[1])),
        locator_spacing_mm=_triple(pre.get("locator_spacing_mm", [4, 4, 4]), "locator_spacing_mm", bundle_json),
        locator_margin_mm=float(pre.get("locator_margin_mm", 20.0)),
        roi=_triple(tiling.get("roi", [224, 224, 224]), "tiling.roi", bundle_json, int),
        locator_roi=_triple(tiling.get("locator_roi", [128, 128, 128]), "tiling.locator_roi", bundle_json, int),
        overlap=overlap,
        blend=str(tiling.get("blend", "constant")),
        min_tumor_voxels=int(post.get("min_tumor_voxels", 100)),
        largest_component=tuple(int(v) for v in post.get("largest_component", [1, 2, 3, 4, 5, 13])),
        z_pass=bool(post.get("z_pass", True)),
        postprocess_mode=_postprocess_mode(post, bundle_json),
        provenance=dict(raw.get("provenance", {})),
    )


def _postprocess_mode(post: dict[str, Any], bundle_json: Path) -> str:
    """``postprocess.mode``; bundles written before the key existed get the default (the paper's rules)."""
    try:
        return check_mode(post.get("mode", DEFAULT_MODE))
    except ValueError as exc:
        raise BundleError(bundle_json, f"postprocess.{exc}") from None


def model_entry(name: str, files: dict[str, dict[str, str]], out_channels: int, in_channels: int = 1,
                opset: int = 17, spatial_divisor: int = 16) -> dict[str, Any]:
    """Build one MODEL entry of bundle.json. ``files`` maps precision -> {path, sha256, input_name, ...}."""
    return {"name": name, "in_channels": in_channels, "out_channels": out_channels, "output": "logits",
            "spatial_divisor": spatial_divisor, "opset": opset, "files": files}


def new_bundle_json(folds: list[dict[str, Any]], locator: dict[str, Any] | None = None, *,
                    spacing_mm: tuple[float, float, float] = (1.0, 1.0, 1.0),
                    hu_window: tuple[float, float] = (-250.0, 250.0),
                    locator_spacing_mm: tuple[float, float, float] = (4.0, 4.0, 4.0),
                    locator_margin_mm: float = 20.0,
                    roi: tuple[int, int, int] = (224, 224, 224),
                    locator_roi: tuple[int, int, int] = (128, 128, 128),
                    overlap: float = 0.0, blend: str = "constant",
                    provenance: dict[str, Any] | None = None) -> dict[str, Any]:
    """The bundle.json document with the defaults of DESIGN.md; flare-export and tests write bundles with it."""
    from .labels import LARGEST_COMPONENT_IDS, registry_snapshot

    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "labels": registry_snapshot(),
        "preprocessing": {"spacing_mm": list(spacing_mm), "hu_window": list(hu_window), "orientation": "RAS",
                          "locator_spacing_mm": list(locator_spacing_mm), "locator_margin_mm": locator_margin_mm},
        "locator": locator,
        "folds": folds,
        "tiling": {"roi": list(roi), "overlap": overlap, "blend": blend, "locator_roi": list(locator_roi)},
        "postprocess": {"mode": DEFAULT_MODE, "min_tumor_voxels": 100, "largest_component": list(LARGEST_COMPONENT_IDS),
                        "z_pass": True},
        "provenance": provenance or {},
    }


def write_bundle_json(folder: str | Path, doc: dict[str, Any]) -> Path:
    """Write ``doc`` as ``folder/bundle.json`` atomically and return its path."""
    from .atomic import write_text_atomic

    target = Path(folder) / "bundle.json"
    write_text_atomic(target, json.dumps(doc, indent=2) + "\n")
    return target
