"""What an export starts from: the networks to export and the preprocessing/tiling settings they were trained with.

:func:`flare_sources` reads a ``flare-train`` checkpoint folder (layout of :mod:`flare.train.checkpoints`);
:mod:`flare.export.auto3dseg` produces the same :class:`ExportSources` from a MONAI Auto3DSeg work dir.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flare.runtime.bundle.manifest import sha256_file
from flare.runtime.foundation.errors import InputError
from flare.runtime.foundation.labels import NUM_MERGED_CLASSES

if TYPE_CHECKING:
    import torch


@dataclass
class ModelSource:
    """One network to export (eval mode, fp32, on CPU) and where it came from."""

    name: str  # "locator", "fold0", ...
    role: str  # "locator" or "fold"
    net: torch.nn.Module
    in_channels: int
    out_channels: int
    checkpoint: Path  # absolute path of the weights file
    config: dict[str, Any]
    config_sha256: str

    @property
    def spatial_divisor(self) -> int:
        """The network's spatial divisor (:func:`flare.train.networks.spatial_divisor` of ``config["network"]``)."""
        from flare.train.networks import spatial_divisor

        return spatial_divisor(self.config["network"])


@dataclass
class ExportSources:
    """All networks of one bundle plus the settings that ``bundle.json`` records."""

    root: Path  # absolute: CHECKPOINT_DIR or the Auto3DSeg work dir
    kind: str  # "flare" or "auto3dseg"
    folds: list[ModelSource]
    locator: ModelSource | None
    spacing_mm: tuple[float, float, float]
    hu_window: tuple[float, float]
    roi: tuple[int, int, int]
    locator_spacing_mm: tuple[float, float, float] = (4.0, 4.0, 4.0)
    locator_margin_mm: float = 20.0
    locator_roi: tuple[int, int, int] = (128, 128, 128)
    notes: list[str] = field(default_factory=list)
    profile: str | None = None  # bundle.json "profile": the training config's "profile" key ("cpu"), else none

    @property
    def models(self) -> list[ModelSource]:
        return ([self.locator] if self.locator else []) + list(self.folds)


def config_hash(config: dict[str, Any]) -> str:
    """sha256 of a config's canonical JSON (sorted keys), stable across file formatting."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def folds_divisor(folds: list[ModelSource]) -> int:
    """The spatial divisor the folds' common ROI must respect (the least common multiple of theirs)."""
    return math.lcm(*(m.spatial_divisor for m in folds))


def check_roi(roi: Any, where: Path, divisor: int) -> tuple[int, int, int]:
    """A 3-side ROI whose sides are positive multiples of ``divisor`` (the networks' spatial divisor)."""
    try:
        out = tuple(int(v) for v in roi)
    except (TypeError, ValueError):
        raise InputError(where, f"roi {roi!r} must be 3 integers") from None
    if len(out) != 3 or any(v <= 0 or v % divisor for v in out):
        raise InputError(where, f"roi {list(out)} must be 3 positive sides divisible by {divisor}")
    return out  # type: ignore[return-value]


def agreed(values: dict[str, Any], what: str, where: Path) -> Any:
    """The single value all folds agree on, else a clear error naming the disagreeing folds."""
    distinct = {json.dumps(v): v for v in values.values()}
    if len(distinct) != 1:
        detail = ", ".join(f"{k}={v}" for k, v in values.items())
        raise InputError(where, f"folds disagree on {what} ({detail}); export folds trained with one setting")
    return next(iter(distinct.values()))


def _load_flare_model(folder: Path, name: str) -> ModelSource:
    from flare.train.checkpoints import load_network

    ckpt = folder / "model.pt"
    if not ckpt.is_file():
        raise InputError(ckpt, f"checkpoint of {name} is missing")
    try:
        net, config = load_network(ckpt)
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 (torch/pickle/state-dict errors: one line for the user)
        raise InputError(ckpt, f"cannot load checkpoint ({exc.__class__.__name__}: {str(exc)[:300]})") from None
    if isinstance(config.get("training_config"), dict):  # the recipe it was trained with, as flare-train checks it
        from flare.train.config import check_config

        check_config(config["training_config"], ckpt)
    spec = config.get("network", {})
    cfg_file = folder / "config.json"
    return ModelSource(name=name, role=str(config.get("role", "locator" if name == "locator" else "fold")),
                       net=net.float().eval(), in_channels=int(spec.get("in_channels", 1)),
                       out_channels=int(spec["out_channels"]), checkpoint=ckpt.resolve(), config=config,
                       config_sha256=sha256_file(cfg_file) if cfg_file.is_file() else config_hash(config))


def flare_sources(ckpt_dir: str | Path) -> ExportSources:
    """Read ``CKPT_DIR/locator`` (optional) and ``CKPT_DIR/fold0..`` and check that the folds agree."""
    root = Path(ckpt_dir).resolve()
    if not root.is_dir():
        raise InputError(root, "checkpoint folder does not exist")
    fold_dirs = sorted((p for p in root.glob("fold*") if p.is_dir() and p.name[4:].isdigit()),
                       key=lambda p: int(p.name[4:]))
    if not fold_dirs:
        raise InputError(root, "no fold0..foldN checkpoint folders found (expected the flare-train layout)")
    folds = [_load_flare_model(p, p.name) for p in fold_dirs]
    for m in folds:
        if m.out_channels != NUM_MERGED_CLASSES:
            raise InputError(m.checkpoint, f"fold network has {m.out_channels} outputs, the runtime needs "
                                           f"{NUM_MERGED_CLASSES} (merged FLARE23 classes)")
    locator = _load_flare_model(root / "locator", "locator") if (root / "locator").is_dir() else None
    cfgs = {m.name: m.config for m in folds}
    try:
        return _settings(root, folds, locator, cfgs)
    except (ValueError, TypeError, IndexError, KeyError, AttributeError) as exc:  # hand-edited checkpoint configs
        raise InputError(root, f"malformed spacing_mm/hu_window/roi in a checkpoint's config "
                               f"({exc.__class__.__name__}: {exc})") from None


def _settings(root: Path, folds: list[ModelSource], locator: ModelSource | None,
              cfgs: dict[str, dict[str, Any]]) -> ExportSources:
    spacing = agreed({k: [float(v) for v in c.get("spacing_mm", [1, 1, 1])] for k, c in cfgs.items()},
                     "spacing_mm", root)
    hu = agreed({k: [float(v) for v in c.get("hu_window", [-250, 250])] for k, c in cfgs.items()}, "hu_window", root)
    roi = check_roi(agreed({k: c.get("roi", [224, 224, 224]) for k, c in cfgs.items()}, "roi", root), root,
                    folds_divisor(folds))
    src = ExportSources(root=root, kind="flare", folds=folds, locator=locator, spacing_mm=tuple(spacing),
                        hu_window=(hu[0], hu[1]), roi=roi,
                        profile=agreed({k: (c.get("training_config") or {}).get("profile") for k, c in cfgs.items()},
                                       "profile", root))
    if locator is not None:
        lc = locator.config
        src.locator_spacing_mm = tuple(float(v) for v in lc.get("spacing_mm", [4, 4, 4]))  # type: ignore[assignment]
        src.locator_margin_mm = float(lc.get("locator_margin_mm", 20.0))
        src.locator_roi = check_roi(lc.get("roi", [128, 128, 128]), locator.checkpoint, locator.spatial_divisor)
    return src
