"""The model bundle: ``bundle.json`` plus model files, the only thing the runtime needs.

Schema (format version 1; machine-checked with ``jsonschema`` against ``bundle.schema.json`` beside this module,
with strict integers, after size and nesting-depth limits)::

    {
      "format": "flare-bundle", "format_version": 1,
      "labels": {...flare.runtime.foundation.labels.registry_snapshot()...},
      "preprocessing": {"spacing_mm": [1, 1, 1], "hu_window": [-250, 250], "orientation": "RAS",
                        "locator_spacing_mm": [4, 4, 4], "locator_margin_mm": 20.0},
      "locator": MODEL,                       # optional: without it the whole image is used
      "folds": [MODEL, ...],                  # at least one
      "tiling": {"roi": [224, 224, 224], "overlap": 0.0, "blend": "constant", "locator_roi": [128, 128, 128]},
      "postprocess": {"mode": "paper", "min_tumor_voxels": 100, "largest_component": [1, 2, 3, 4, 5, 13],
                      "z_pass": true},
      "profile": "cpu",                       # optional: "gpu" (default, the flare23 recipe) or "cpu" (docs/cpu.md)
      "provenance": {"monai": "...", "torch": "...", "onnx": "...", "config_sha256": "...", ...},
      "verification": {...},                  # optional, written by flare-export
      "card": {...}                           # optional: the model card, see flare.runtime.bundle.card
    }

    MODEL = {"name": "fold0", "in_channels": 1, "out_channels": 13, "output": "logits",
             "spatial_divisor": 16, "opset": 17,
             "files": {"fp32": {"path": "fold0.fp32.onnx", "sha256": "...", "input_name": "image",
                                "output_name": "logits", "input_dtype": "float32", "output_dtype": "float32"},
                       "fp16": {...}, "int8": {...}}}   # int8: static QDQ, float32 I/O (CPU)

``postprocess.mode`` is the default rule set of ``flare-run`` (``paper`` or ``strict``, see
:mod:`flare.runtime.ops.postprocessing`); bundles written before it existed get ``paper``. ``largest_component`` lists the
organs those rules clean (the paper's largest z run, or the strict largest 3-D component); ``z_pass`` is the strict
rules' organ-union z pass.

Paths inside the bundle are relative to the bundle folder. The locator has one output channel (organ-union logit,
foreground where > 0) or several (foreground where argmax > 0). Folds output merged-space logits
(``flare.runtime.foundation.labels.NUM_MERGED_CLASSES`` channels); the runtime applies softmax.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flare.runtime.bundle.card import ModelCard, card_from_raw
from flare.runtime.foundation.errors import BundleError
from flare.runtime.foundation.labels import check_snapshot
from flare.runtime.ops.postprocessing import DEFAULT_MODE, check_mode

FORMAT = "flare-bundle"
FORMAT_VERSION = 1
PRECISIONS = ("fp32", "fp16", "int8")
PROFILES = ("gpu", "cpu")


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
    profile: str = "gpu"  # "cpu": a CPU recipe (bundles without the key are the GPU recipe)
    card: ModelCard = field(default_factory=ModelCard)  # "unknown" fields for bundles without a card

    @property
    def precisions(self) -> tuple[str, ...]:
        return tuple(p for p in PRECISIONS if all(p in m.files for m in self.folds))

    @property
    def fold_divisor(self) -> int:
        """The folds' tile sides must be multiples of this: the least common multiple of their ``spatial_divisor``
        (16 for the 5-level SegResNetDS, 8 for the 4-level one; bundles without the key: 16)."""
        return math.lcm(*(m.spatial_divisor for m in self.folds))


def default_bundle_dir() -> Path:
    """Where ``flare-run`` looks for a bundle without ``--bundle``: ``$FLARE_BUNDLE``, else the per-user cache
    folder ``$XDG_CACHE_HOME/flare/bundle`` (``~/.cache/flare/bundle``), where ``flare-demo`` installs one."""
    import os

    env = os.environ.get("FLARE_BUNDLE")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "flare" / "bundle"


def how_to_get_a_bundle() -> str:
    """Advice that names only commands this install can run: with the training/export extras ``flare-demo`` and
    ``flare-export``; a runtime-only install gets a bundle folder made elsewhere."""
    from importlib.util import find_spec

    def has(name: str) -> bool:
        try:
            return find_spec(name) is not None
        except (ImportError, ValueError):
            return False

    if all(has(m) for m in ("torch", "monai", "onnx")):
        return ("pass --bundle DIR (or set FLARE_BUNDLE), or make one: flare-demo (a phantom-trained demo bundle, "
                "installed as the default) or flare-export CHECKPOINT_DIR -o DIR")
    return ("pass --bundle DIR (or set FLARE_BUNDLE) with a bundle exported elsewhere (flare-export, from the "
            "'export' extra); this install has the runtime only: pip install 'flare-seg[train,export]' adds "
            "flare-demo and flare-export")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


HASH_CACHE_NAME = ".flare-sha256-cache.json"
"""Per-bundle cache of model-file hashes, keyed by file version (device, inode, size, mtime_ns, ctime_ns)."""


def _hash_cache_file(root: Path) -> Path:
    """The bundle folder's cache file when the folder is writable, else one under ``~/.cache/flare/sha256`` named
    after the bundle's path."""
    import os

    if os.access(root, os.W_OK):
        return root / HASH_CACHE_NAME
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "flare" / "sha256"
    return cache / (hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:32] + ".json")


def _file_version(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]  # ctime: a restored mtime is seen


def verify_files(root: Path, files: list[tuple[Path, str, str]],
                 check: Callable[[Path, str], None] | None = None) -> int:
    """Check each ``(path, expected sha256, what)``; a mismatch is a one-line BundleError. A file whose version
    (device, inode, size, mtime_ns, ctime_ns) matches the cache (:func:`_hash_cache_file`) with the expected hash is
    not read again; hashes computed here are added to the cache (atomic write; an unwritable cache is only a slower next start).
    Returns the number of files actually hashed."""
    from flare.runtime.foundation.atomic import write_text_atomic

    cache_file = _hash_cache_file(root)
    try:
        cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
        entries = cache.get("files", {}) if isinstance(cache, dict) else {}
    except (OSError, ValueError):
        entries = {}
    hashed = 0
    for path, expected, what in files:
        version = _file_version(path)
        hit = entries.get(str(path))
        if isinstance(hit, dict) and hit.get("version") == version and hit.get("sha256") == expected:
            continue
        digest = sha256_file(path)
        hashed += 1
        if digest != expected:
            raise BundleError(path, f"sha256 mismatch for {what}: the file was changed or corrupted")
        if check is not None:  # further checks of a new file version (cached with its hash)
            check(path, what)
        entries[str(path)] = {"version": version, "sha256": digest}
    if hashed:
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(cache_file, json.dumps({"format": "flare-sha256-cache", "files": entries}) + "\n")
        except OSError:
            pass
    return hashed


def verify_bundle(bundle: Bundle, precisions: dict[str, str] | None = None) -> int:
    """Verify the model files that will be loaded: for each model name in ``precisions`` the file of that
    precision (``ModelSpec.file_for``: fp16 falls back to fp32); ``None``: every file of every model. Cached per
    file version (:func:`verify_files`); returns the number of files hashed."""
    models = ([bundle.locator] if bundle.locator is not None else []) + list(bundle.folds)
    todo = []
    for m in models:
        if precisions is None:
            chosen = list(m.files.items())
        elif m.name in precisions:
            chosen = [(precisions[m.name], m.file_for(precisions[m.name]))]
        else:
            continue
        todo += [(f.path, f.sha256, f"{m.name} ({p})") for p, f in chosen]
    return verify_files(bundle.root, todo, check=_check_self_contained)


MAX_BUNDLE_JSON_BYTES = 4 * 2**20
"""bundle.json larger than this is refused before it is read."""
MAX_JSON_DEPTH = 32
"""Deepest nesting of arrays/objects accepted in bundle.json (checked before parsing; the format needs 5)."""
SCHEMA_FILE = Path(__file__).with_name("bundle.schema.json")


def _json_depth(text: str) -> int:
    """Deepest ``[``/``{`` nesting outside strings, without parsing (so a 100k-deep file cannot recurse)."""
    import re

    import numpy as np

    bare = re.sub(r'"(?:[^"\\]|\\.)*"', '""', text).encode("utf-8", "replace")
    b = np.frombuffer(bare, dtype=np.uint8)
    opens = (b == ord("[")) | (b == ord("{"))
    closes = (b == ord("]")) | (b == ord("}"))
    return int(np.cumsum(opens.astype(np.int64) - closes).max(initial=0))


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _read_json(bundle_json: Path) -> Any:
    """Parse bundle.json after bounding its size and nesting depth; NaN/Infinity are refused."""
    try:
        size = bundle_json.stat().st_size
        if size > MAX_BUNDLE_JSON_BYTES:
            raise BundleError(bundle_json, f"bundle.json is {size} bytes, more than the limit of "
                                           f"{MAX_BUNDLE_JSON_BYTES}")
        text = bundle_json.read_text(encoding="utf-8")
        depth = _json_depth(text)
        if depth > MAX_JSON_DEPTH:
            raise BundleError(bundle_json, f"bundle.json nests {depth} levels deep, more than the limit of "
                                           f"{MAX_JSON_DEPTH}")
        return json.loads(text, parse_constant=_no_constant)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise BundleError(bundle_json, f"cannot parse bundle.json ({exc.__class__.__name__}: {exc})") from None


@functools.cache
def _validator(definition: str | None = None) -> Any:
    """The JSON Schema validator of bundle.schema.json (or of one of its ``$defs``), with strict integers (``1.0``
    and ``true`` are not)."""
    import jsonschema

    schema = json.loads(SCHEMA_FILE.read_text())
    if definition is not None:
        schema = {"$schema": schema["$schema"], "$defs": schema["$defs"], "$ref": f"#/$defs/{definition}"}
    base = jsonschema.validators.validator_for(schema)
    checker = base.TYPE_CHECKER.redefine(
        "integer", lambda _checker, value: isinstance(value, int) and not isinstance(value, bool))
    strict = jsonschema.validators.extend(base, type_checker=checker)
    strict.check_schema(schema)
    return strict(schema)


def json_where(path: Any) -> str:
    """A jsonschema error path as the key it names, e.g. ``preprocessing.spacing_mm[2]``."""
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")


def validate_bundle_json(raw: Any, bundle_json: Path) -> None:
    """Check ``raw`` against bundle.schema.json; the most relevant violation becomes a one-line BundleError."""
    from jsonschema.exceptions import best_match

    err = best_match(_validator().iter_errors(raw))
    if err is None:
        return
    where = json_where(err.absolute_path)
    if err.validator == "required":
        missing = str(err.message).split("'")[1] if "'" in str(err.message) else str(err.message)
        raise BundleError(bundle_json, f"missing field {where + '.' if where else ''}{missing}")
    message = str(err.message)
    if len(message) > 160:
        message = message[:160] + "..."
    raise BundleError(bundle_json, f"field {where or '(top level)'}: {message}")


def card_errors(raw: Any) -> str | None:
    """The most relevant problem of a model card object against the schema's ``card`` definition, or None."""
    from jsonschema.exceptions import best_match

    err = best_match(_validator("card").iter_errors(raw))
    if err is None:
        return None
    where = json_where(err.absolute_path)
    return f"{'field ' + where + ': ' if where else ''}{str(err.message)[:160]}"


def read_card_file(path: str | Path) -> dict[str, Any]:
    """A model card object from a JSON file (``flare-export --card FILE``, the checkpoint folder's ``card.json``),
    checked against the schema's ``card`` definition; one-line :class:`~flare.runtime.foundation.errors.InputError`
    on any problem."""
    from flare.runtime.foundation.errors import InputError

    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(path, f"cannot read the model card ({exc.__class__.__name__}: {exc})") from None
    problem = card_errors(raw)
    if problem is not None:
        raise InputError(path, f"not a valid model card: {problem}")
    return raw  # type: ignore[no-any-return]


def _model(entry: dict[str, Any], where: str, root: Path, bundle_json: Path) -> ModelSpec:
    """A schema-valid MODEL entry → ModelSpec, after the file checks (inside the bundle, present)."""
    files: dict[str, ModelFile] = {}
    for precision, f in entry["files"].items():
        rel = f["path"]
        path = (root / rel).resolve()
        if root.resolve() not in path.parents:
            raise BundleError(bundle_json, f"{where}.files.{precision}.path {rel!r} points outside the bundle")
        if not path.is_file():
            raise BundleError(path, f"model file of {where} ({precision}) is missing")
        files[precision] = ModelFile(path, f["sha256"], f.get("input_name", "image"), f.get("output_name", "logits"),
                                     f.get("input_dtype", "float32"), f.get("output_dtype", "float32"))
    return ModelSpec(name=entry.get("name", where), in_channels=entry.get("in_channels", 1),
                     out_channels=entry["out_channels"], spatial_divisor=entry.get("spatial_divisor", 16),
                     opset=entry.get("opset", 17), files=files)


def _check_self_contained(path: Path, what: str) -> None:
    """Every byte a model loads must be covered by its sha256: ONNX external-data files are refused."""
    from flare.runtime.bundle.onnx_scan import uses_external_data

    if not path.name.lower().endswith(".onnx"):
        return
    try:
        external = uses_external_data(path)
    except (OSError, ValueError) as exc:
        raise BundleError(path, f"model file of {what} is not a valid ONNX file ({exc})") from None
    if external:
        raise BundleError(path, f"model {what} keeps weights in ONNX external-data files, which no "
                                "sha256 of the bundle covers; export it with the weights inside the .onnx file")


def _check_cross_fields(b: Bundle, bundle_json: Path) -> None:
    """Rules between fields that a JSON Schema cannot express."""
    from flare.runtime.foundation.labels import NUM_MERGED_CLASSES

    if not b.hu_window[0] < b.hu_window[1]:
        raise BundleError(bundle_json, "preprocessing.hu_window must be [low, high] with low < high")
    for i, m in enumerate(b.folds):
        if m.out_channels != NUM_MERGED_CLASSES:
            raise BundleError(bundle_json, f"folds[{i}].out_channels is {m.out_channels}; the folds must output "
                                           f"the {NUM_MERGED_CLASSES} merged classes")
        if any(r % m.spatial_divisor for r in b.roi):
            raise BundleError(bundle_json, f"tiling.roi {list(b.roi)} is not divisible by folds[{i}]."
                                           f"spatial_divisor {m.spatial_divisor}")
    if b.locator is not None and any(r % b.locator.spatial_divisor for r in b.locator_roi):
        raise BundleError(bundle_json, f"tiling.locator_roi {list(b.locator_roi)} is not divisible by "
                                       f"locator.spatial_divisor {b.locator.spatial_divisor}")


def load_bundle(path: str | Path, verify_hashes: bool | dict[str, str] = True) -> Bundle:
    """Load and validate a bundle folder (or its ``bundle.json``). Any problem raises a one-line BundleError.

    ``verify_hashes``: True checks every model file's sha256, a ``{model name: precision}`` dict only the files
    that will be loaded (what ``flare-run`` does), False none (the caller calls :func:`verify_bundle` later);
    hashes are cached per file version, so a second start reads no model file.

    Order: size and depth limits, JSON parse, format and version gate, JSON Schema (bundle.schema.json), label
    registry, model files (inside the bundle, present, sha256), cross-field rules. The models' real inputs and
    outputs are checked against the declaration when an engine opens them
    (:func:`flare.runtime.inference.engines.contract.check_model_contract`).
    """
    path = Path(path)
    bundle_json = path if path.name == "bundle.json" else path / "bundle.json"
    root = bundle_json.parent
    if not root.exists():
        raise BundleError(root, f"bundle folder does not exist; {how_to_get_a_bundle()}")
    if not bundle_json.is_file():
        raise BundleError(bundle_json, "bundle.json is missing: not a flare bundle folder")
    raw = _read_json(bundle_json)
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise BundleError(bundle_json, f"not a flare bundle (field format must be {FORMAT!r})")
    version = raw.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:
        raise BundleError(bundle_json, f"bundle format_version {json.dumps(version)} is not supported by this runtime "
                                       f"(supports the integer {FORMAT_VERSION}); re-export it or upgrade flare")
    validate_bundle_json(raw, bundle_json)
    try:
        check_snapshot(raw["labels"])
    except ValueError as exc:
        raise BundleError(bundle_json, f"labels: {exc}") from None
    except (KeyError, TypeError, AttributeError):
        raise BundleError(bundle_json, "labels: malformed label registry snapshot") from None
    pre, tiling, post = raw["preprocessing"], raw.get("tiling", {}), raw.get("postprocess", {})
    folds = tuple(_model(m, f"folds[{i}]", root, bundle_json) for i, m in enumerate(raw["folds"]))
    locator = raw.get("locator")
    hu = pre["hu_window"]
    b = Bundle(
        root=root,
        raw=raw,
        locator=_model(locator, "locator", root, bundle_json) if locator else None,
        folds=folds,
        spacing_mm=tuple(float(v) for v in pre["spacing_mm"]),  # type: ignore[arg-type]
        hu_window=(float(hu[0]), float(hu[1])),
        locator_spacing_mm=tuple(float(v) for v in pre.get("locator_spacing_mm", [4, 4, 4])),  # type: ignore[arg-type]
        locator_margin_mm=float(pre.get("locator_margin_mm", 20.0)),
        roi=tuple(tiling.get("roi", [224, 224, 224])),  # type: ignore[arg-type]
        locator_roi=tuple(tiling.get("locator_roi", [128, 128, 128])),  # type: ignore[arg-type]
        overlap=float(tiling.get("overlap", 0.0)),
        blend=tiling.get("blend", "constant"),
        min_tumor_voxels=post.get("min_tumor_voxels", 100),
        largest_component=tuple(post.get("largest_component", [1, 2, 3, 4, 5, 13])),
        z_pass=post.get("z_pass", True),
        postprocess_mode=_postprocess_mode(post, bundle_json),
        provenance=dict(raw.get("provenance", {})),
        profile=raw.get("profile", "gpu"),
        card=card_from_raw(raw.get("card")),
    )
    _check_cross_fields(b, bundle_json)
    if verify_hashes:
        verify_bundle(b, None if verify_hashes is True else dict(verify_hashes))
    return b


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
                    provenance: dict[str, Any] | None = None, profile: str | None = None,
                    card: ModelCard | None = None) -> dict[str, Any]:
    """The bundle.json document with the defaults of DESIGN.md; flare-export and tests write bundles with it."""
    from flare.runtime.foundation.labels import LARGEST_COMPONENT_IDS, registry_snapshot

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
        **({"profile": profile} if profile else {}),
        "card": (card or ModelCard()).to_json(),
    }


def write_bundle_json(folder: str | Path, doc: dict[str, Any]) -> Path:
    """Write ``doc`` as ``folder/bundle.json`` atomically and return its path."""
    from flare.runtime.foundation.atomic import write_text_atomic

    target = Path(folder) / "bundle.json"
    write_text_atomic(target, json.dumps(doc, indent=2) + "\n")
    return target
