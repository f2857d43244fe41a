"""Numerical parity of exported models: ONNX Runtime CPU against the PyTorch network they came from.

Every model file is run on random tiles and, when the real CT of ``../shared/data`` is present, on a tile of real
anatomy. Measures per tile:

* ``rel_err``: ``max |onnx - torch| / max(max |torch|, 1)`` over all logits: relative to the largest logit, or an
  absolute error in logits where every logit of the tile is within ±1 (a trained locator on a noise tile answers
  "barely not organ" everywhere, max |logit| 0.4 in the demo of training seed 2, and its fp16 error of 0.006 logits
  read as 1.4 % and refused the export; a logit error of 0.01 moves a probability by at most 0.25 %);
* ``agreement``: fraction of voxels whose argmax class (or, for a 1-channel locator, the sign of the logit) matches,
  over the voxels where PyTorch's decision is not a tie (top-2 margin above ``TIE_MARGIN`` x max |logit|: any
  rounding flips a tie; untrained test networks have many); ``agreement_all`` and ``ties`` report the raw count;
* ``finite``: no NaN/inf anywhere.

Limits: fp32 ``rel_err <= 1e-4``, fp16 ``rel_err <= 1e-2``, ``agreement >= 0.999``, always finite. Any failure
raises a one-line :class:`FlareError`, so no bundle is written.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from flare.runtime.foundation.errors import FlareError
from flare.runtime.inference.tiling import ceil_to

from .onnx_export import INPUT_NAME, ort_session

if TYPE_CHECKING:
    import torch

TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2}
MIN_AGREEMENT = 0.999
#: reference voxels whose top-2 logit margin is below this fraction of max |logit| are ties: not counted
TIE_MARGIN = 1e-3
#: the error is relative to max |logit|, or to this many logits when every logit is smaller (see ``rel_err``)
ERROR_SCALE_FLOOR = 1.0
CT_NAME = "ts_abdomen_ct_3mm.nii.gz"


@dataclass(frozen=True)
class Tile:
    label: str
    array: np.ndarray  # (1, C, X, Y, Z) float32


def default_ct_path() -> Path | None:
    """The real CT used for verification: ``$FLARE_SHARED_DATA`` or ``../shared/data`` beside the repository
    (or the working directory); ``None`` when absent."""
    candidates = [Path(os.environ["FLARE_SHARED_DATA"])] if os.environ.get("FLARE_SHARED_DATA") else []
    candidates += [Path(__file__).resolve().parents[2] / "shared" / "data", Path.cwd().parent / "shared" / "data"]
    return next((c / CT_NAME for c in candidates if (c / CT_NAME).is_file()), None)


def ct_tile(path: Path, hu_window: tuple[float, float], in_channels: int, max_side: int = 48,
            divisor: int = 16) -> Tile:
    """A centre tile of the CT (sides ≤ ``max_side``, padded with 0 up to multiples of the network's spatial
    ``divisor``), normalised with the bundle's HU window exactly as the runtime does; the channel is repeated for
    multi-channel models."""
    import nibabel as nib

    data = np.asanyarray(nib.load(str(path)).dataobj).astype(np.float32)  # type: ignore[attr-defined]
    lo, hi = hu_window
    data = np.clip((data - lo) / (hi - lo), 0.0, 1.0)
    sides = [min(max_side, s) for s in data.shape]
    starts = [(s - t) // 2 for s, t in zip(data.shape, sides)]
    crop = data[tuple(slice(a, a + t) for a, t in zip(starts, sides))]
    tile = np.zeros([ceil_to(t, divisor) for t in sides], np.float32)
    tile[: sides[0], : sides[1], : sides[2]] = crop
    arr = np.repeat(tile[None, None], in_channels, axis=1)
    return Tile(f"CT {path.name} {'x'.join(map(str, tile.shape))}", np.ascontiguousarray(arr))


def random_tiles(in_channels: int, seed: int = 0, divisor: int = 16) -> list[Tile]:
    """Uniform noise in [0, 1] (the normalised range) on a cube and on a non-cubic tile whose sides are 1, 2 and 3
    times the network's spatial ``divisor`` (exercises dynamic axes and the declared divisor)."""
    rng = np.random.default_rng(seed)
    return [Tile(f"random {'x'.join(map(str, s))}", rng.random((1, in_channels, *s), dtype=np.float32))
            for s in ((32, 32, 32), (divisor, 2 * divisor, 3 * divisor))]


def compare(onnx_out: np.ndarray, ref: np.ndarray) -> dict[str, Any]:
    """The parity measures of one tile (see the module docstring)."""
    if not (np.isfinite(onnx_out).all() and np.isfinite(ref).all()):
        return {"finite": False, "max_abs_err": None, "rel_err": None, "agreement": None}
    peak = float(np.abs(ref).max())
    scale = max(peak, ERROR_SCALE_FLOOR)
    if ref.shape[1] == 1:
        same, margin = (onnx_out[:, 0] > 0) == (ref[:, 0] > 0), np.abs(ref[:, 0])
    else:
        same = onnx_out.argmax(1) == ref.argmax(1)
        top2 = np.partition(ref, -2, axis=1)[:, -2:]
        margin = top2[:, 1] - top2[:, 0]
    decisive = margin > TIE_MARGIN * max(peak, 1e-6)
    err = float(np.abs(onnx_out.astype(np.float64) - ref).max())
    return {"finite": True, "max_abs_err": err, "rel_err": err / scale,
            "agreement": float(same[decisive].mean()) if decisive.any() else 1.0,
            "agreement_all": float(same.mean()), "ties": int((~decisive).sum())}


def torch_reference(net: torch.nn.Module, tiles: list[Tile]) -> list[np.ndarray]:
    import torch

    with torch.no_grad():
        return [net.eval()(torch.from_numpy(t.array)).float().numpy() for t in tiles]


def verify_file(path: Path, precision: str, tiles: list[Tile], refs: list[np.ndarray]) -> dict[str, Any]:
    """Run one ONNX file on ``tiles`` and compare with ``refs``; raises FlareError on the first failure."""
    sess = ort_session(path)
    checks = []
    for tile, ref in zip(tiles, refs):
        out = sess.run(None, {INPUT_NAME: tile.array})[0]
        if out.shape != ref.shape:
            raise FlareError(path, f"{precision} output shape {out.shape} differs from PyTorch's {ref.shape} "
                                   f"on {tile.label}")
        m = {"tile": tile.label, **compare(out, ref)}
        checks.append(m)
        if not m["finite"]:
            raise FlareError(path, f"{precision} output has NaN/inf on {tile.label} (PyTorch or ONNX Runtime): "
                                   "export refused")
        if m["rel_err"] > TOLERANCE[precision]:
            raise FlareError(path, f"{precision} relative error {m['rel_err']:.2e} exceeds "
                                   f"{TOLERANCE[precision]:.0e} on {tile.label}")
        if m["agreement"] < MIN_AGREEMENT:
            raise FlareError(path, f"{precision} argmax agreement {m['agreement']:.5f} is below {MIN_AGREEMENT} "
                                   f"on {tile.label}")
    return {"passed": True, "tolerance": TOLERANCE[precision], "checks": checks}


def verification_tiles(in_channels: int, hu_window: tuple[float, float], ct: Path | None,
                       divisor: int = 16) -> list[Tile]:
    tiles = random_tiles(in_channels, divisor=divisor)
    if ct is not None:
        tiles.append(ct_tile(ct, hu_window, in_channels, divisor=divisor))
    return tiles
