"""Training recipes as data: ``train/configs/<name>.json`` (``flare23`` = the paper, ``tiny`` = CPU demo) or a path.

A config holds the fold network and its data settings at the top level and the locator's under ``locator``; the
locator section inherits every key it does not set (``train`` and ``augment`` are merged key by key). The dict
saved in each checkpoint (:func:`checkpoint_config`) is what ``flare-export`` reads.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
from pathlib import Path
from typing import Any

from flare.runtime.foundation.errors import InputError
from flare.runtime.ops.postprocessing import MODES

CONFIG_DIR = Path(__file__).with_name("configs")
#: JSON Schema of the settings the code computes with (types and ranges); :func:`check_config`
SCHEMA_FILE = Path(__file__).with_name("config.schema.json")
#: ``pseudolabel.postprocess``: no cleaning of the stage-1 prediction (the paper, the default) or a runtime rule set
PSEUDOLABEL_POSTPROCESS = ("none", *MODES)
REQUIRED = ("name", "network", "spacing_mm", "hu_window", "roi", "train", "augment", "validation", "locator")


def available_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``over``, recursing into nested dicts (inputs are not modified)."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_config(name_or_path: str | Path | dict[str, Any], overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Load a named or file config (or copy a dict), apply ``overrides`` and check the required keys."""
    if isinstance(name_or_path, dict):
        cfg = copy.deepcopy(name_or_path)
        source: str | Path = "<dict>"
    else:
        source = Path(name_or_path)
        if not source.suffix and not source.is_file():  # a folder of that name in the cwd is no config
            source = CONFIG_DIR / f"{name_or_path}.json"
        if not source.is_file():
            raise InputError(name_or_path, f"no such config (named configs: {', '.join(available_configs())})")
        try:
            cfg = json.loads(source.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise InputError(source, f"cannot parse config: {err}") from None
        if not isinstance(cfg, dict):
            raise InputError(source, "a config is a JSON object")
    if overrides:
        check_config(cfg, source)  # the file's own values first: a bad override is then named as one
        cfg = deep_merge(cfg, overrides)
    missing = [k for k in REQUIRED if k not in cfg]
    if missing:
        raise InputError(source, f"config lacks {', '.join(missing)}")
    check_config(cfg, f"{source} with overrides" if overrides else source)
    _check_tiles(cfg, source)
    pseudolabel_postprocess(cfg, source)
    return cfg


def check_config(cfg: dict[str, Any], source: str | Path = "<config>") -> None:
    """The settings' types and ranges (``config.schema.json``) and ``hu_window`` low below high: the most relevant
    problem as a one-line ``InputError`` naming the key (a string spacing or a zero batch size used to surface as a
    traceback deep in training)."""
    import jsonschema
    from flare.runtime.bundle.manifest import json_where
    from jsonschema.exceptions import best_match

    err = best_match(jsonschema.Draft202012Validator(_schema()).iter_errors(cfg))
    if err is not None:
        where = json_where(err.absolute_path) or "config"
        raise InputError(source, f"{where}: {err.message}")
    lo, hi = cfg.get("hu_window", (0.0, 1.0))
    if not lo < hi:
        raise InputError(source, f"hu_window: the low end {lo} must be below the high end {hi}")


@functools.cache
def _schema() -> dict[str, Any]:
    return dict(json.loads(SCHEMA_FILE.read_text()))


def pseudolabel_postprocess(cfg: dict[str, Any], source: str | Path = "<config>") -> str:
    """``pseudolabel.postprocess`` of a config or its fold settings ("none" when absent), checked."""
    mode = cfg.get("pseudolabel", {}).get("postprocess", "none")
    if mode not in PSEUDOLABEL_POSTPROCESS:
        raise InputError(source, f"pseudolabel.postprocess must be one of {', '.join(PSEUDOLABEL_POSTPROCESS)}, "
                                 f"got {mode!r}")
    return str(mode)


def _check_tiles(cfg: dict[str, Any], source: str | Path) -> None:
    """Every crop and tile side a multiple of its network's :func:`~flare.train.networks.spatial_divisor` (16 for
    the 5-level flare23 network, 8 for the 4-level ones)."""
    from .networks import spatial_divisor

    fold = spatial_divisor(cfg["network"])
    loc = spatial_divisor(cfg["locator"].get("network", cfg["network"]))
    sides = {"roi": (cfg["roi"], fold), "locator.roi": (cfg["locator"].get("roi", [loc]), loc),
             "validation.roi": (cfg["validation"].get("roi", [fold]), fold),
             "locator.validation.roi": (cfg["locator"].get("validation", {}).get("roi", [loc]), loc)}
    for key, (roi, div) in sides.items():
        if any(int(v) % div for v in roi):
            raise InputError(source, f"{key} sides must be divisible by {div} (the network's spatial divisor)")


def infer_roi(eff: dict[str, Any]) -> list[int]:
    """The tile of whole-case prediction of a role's effective settings: ``validation.roi`` when set, else the
    training crop ``roi``. Validation, pseudo-labels, held-out scoring and the exported bundle use it. A fully
    convolutional network trained on small crops segments better with a larger tile (more context, fewer tile
    borders): train/results/RESULTS.md, issue 20."""
    return [int(v) for v in eff.get("validation", {}).get("roi", eff["roi"])]


def role_config(cfg: dict[str, Any], role: str) -> dict[str, Any]:
    """The effective settings of ``role`` ("fold" or "locator"): the locator section over the top level."""
    if role == "fold":
        return {k: v for k, v in cfg.items() if k != "locator"}
    if role == "locator":
        base = {k: v for k, v in cfg.items() if k not in ("locator", "stage2")}
        # per-class and per-tile settings of the folds (13 classes, their tile) are not the locator's
        base["validation"] = {k: v for k, v in cfg["validation"].items() if k != "roi"}
        base["train"] = {k: v for k, v in cfg["train"].items() if k not in ("class_weights", "crop_ratios")}
        return deep_merge(base, cfg["locator"])
    raise ValueError(f"unknown role {role!r}")


def config_sha256(cfg: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()


def checkpoint_config(cfg: dict[str, Any], role: str, fold: int | None, stage: int | None) -> dict[str, Any]:
    """The ``config`` stored in a checkpoint: the fields export and the runtime read plus the whole recipe."""
    eff = role_config(cfg, role)
    out: dict[str, Any] = {
        "network": eff["network"], "role": role, "fold": fold, "stage": stage,
        "spacing_mm": [float(v) for v in eff["spacing_mm"]], "hu_window": [float(v) for v in eff["hu_window"]],
        "roi": infer_roi(eff), "labels": eff.get("labels", "flare23-merged13"),
        "training_config": cfg, "training_config_sha256": config_sha256(cfg),
    }
    if role == "locator":
        out["locator_margin_mm"] = float(eff.get("locator_margin_mm", 20.0))
    return out
