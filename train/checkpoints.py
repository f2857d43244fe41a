"""Checkpoints: ``model.pt`` (state_dict + config, loadable with ``torch.load(weights_only=True)``) and a
``config.json`` beside it.

A checkpoint folder as produced by ``flare-train run`` and read by ``flare-export``::

    CKPT_DIR/
      locator/model.pt, locator/config.json
      fold0/model.pt,   fold0/config.json
      ...
      fold4/model.pt,   fold4/config.json

``model.pt`` holds ``{"state_dict": ..., "config": {...}, "epoch": int, "best_metric": float,
"optimizer": ... (optional), "scheduler": ... (optional)}``. ``config`` contains at least ``network`` (see
:mod:`flare.train.networks`), ``role`` ("locator" or "fold"), ``fold`` (int or null), ``spacing_mm``,
``hu_window`` and ``roi``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from flare.runtime.foundation.atomic import atomic_path, write_text_atomic


def save_checkpoint(folder: str | Path, net: torch.nn.Module, config: dict[str, Any], *, epoch: int = 0,
                    best_metric: float = float("nan"), extra: dict[str, Any] | None = None,
                    filename: str = "model.pt") -> Path:
    """Write ``folder/filename`` (default ``model.pt``) and ``folder/config.json`` atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    payload: dict[str, Any] = {"state_dict": state, "config": config, "epoch": int(epoch),
                               "best_metric": float(best_metric)}
    if extra:
        payload.update(extra)
    target = folder / filename
    with atomic_path(target) as tmp:
        torch.save(payload, tmp)
    write_text_atomic(folder / "config.json", json.dumps(config, indent=2) + "\n")
    return target


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load ``model.pt`` (or the folder holding it) with ``weights_only=True``."""
    from flare.runtime.foundation.errors import InputError

    path = Path(path)
    if path.is_dir():
        path = path / "model.pt"
    if not path.is_file():
        raise InputError(path, "checkpoint does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickle/zip/torch errors of a damaged or foreign file
        raise InputError(path, f"cannot load checkpoint ({exc.__class__.__name__}: {str(exc)[:200]})") from None
    if not isinstance(payload, dict) or "state_dict" not in payload or "config" not in payload:
        raise InputError(path, "not a flare checkpoint (needs state_dict and config)")
    return payload


def load_network(path: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the network of a checkpoint and load its weights; returns (net in eval mode, config)."""
    from .networks import build_network

    payload = load_checkpoint(path)
    net = build_network(payload["config"]["network"])
    net.load_state_dict(payload["state_dict"])
    return net.eval(), payload["config"]
