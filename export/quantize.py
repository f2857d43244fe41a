"""fp32 ONNX -> static int8 ONNX (QDQ) for ONNX Runtime's CPU provider, calibrated and verified on real CTs.

* **Calibration data**: the CTs given to ``flare-export --int8 --calibration CASES...``, each run through the
  runtime's own preprocessing (:func:`case_volume`: read, closest-canonical RAS, trilinear resampling to the model's
  grid, HU window -> [0, 1]) and cut into tiles; the tiles with the most tissue are used.
* **Quantization**: :func:`onnxruntime.quantization.quantize_static`, QDQ format, weights int8 per output channel
  (symmetric), activations uint8 (asymmetric), MinMax ranges; only ``Conv`` and ``ConvTranspose`` are quantized
  (:data:`QUANT_OPS`): normalisation (BatchNormalization after the export), additions, ReLU and Resize stay float,
  as does the softmax (the runtime applies it outside the model).
* **Which convolutions stay float is decided by measurement** (:func:`quantize_model`, numbers in
  ``benchmarks/RESULTS.md``): the stem (it reads the image) and the head (it writes the logits) always stay float
  (quantized, they cost the trained demo network's smallest organs 40 % of their Dice); so does every convolution
  with fewer than ``FLOAT_LADDER[0]`` (32) input or output channels, because ONNX Runtime's u8s8 3D convolution is
  no faster than its fp32 one there (16 channels: 0.37-0.62 s against 0.39 s per 96³ layer; 32 and 64 channels:
  1.9x faster), so quantizing them loses accuracy for nothing. If that model fails the accuracy gate on the
  verification tiles, the channel threshold is raised along :data:`FLOAT_LADDER` (the next resolution level stays
  float too); the first candidate that passes is kept, and every tried candidate's measures are recorded in
  ``bundle.json`` (``verification.int8``).
* **Verification** (:func:`compare_int8`): int8 against the fp32 model on tiles of the verification cases (CTs the
  calibration did not see, when at least two were given, plus the export's own verification CT from
  ``../shared/data``): NaN/inf check, voxel agreement of the argmax (sign for a one-channel locator) and per-class
  Dice of the int8 labels against the fp32 labels. Gate: agreement >= :data:`MIN_AGREEMENT` and Dice >=
  :data:`MIN_DICE` for every class with at least :data:`MIN_CLASS_VOXELS` fp32 voxels, in every verification case. A fold that fails with
  every candidate is refused with a one-line error (no bundle is written); the locator then stays fp32 only (the
  runtime runs a model without an int8 file in fp32).

ONNX Runtime runs the QDQ graph with its integer kernels (u8s8 convolutions). On x86 CPUs without AVX-512 VNNI /
AVX-VNNI, u8s8 can saturate (``vpmaddubsw``): the verification here measures this machine's kernels only.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flare.runtime.foundation.errors import FlareError, InputError
from flare.runtime.inference.tiling import ceil_to

from .onnx_export import INPUT_NAME, ort_session

QUANT_OPS = ("Conv", "ConvTranspose")
#: agreement of the int8 argmax with the fp32 argmax, over all voxels of the verification tiles
MIN_AGREEMENT = 0.995
#: per-class Dice of the int8 labels against the fp32 labels (classes with enough fp32 voxels)
MIN_DICE = 0.98
MIN_CLASS_VOXELS = 50
#: calibration/verification tile side (voxels): activation ranges of a fully convolutional network do not depend on
#: the tile size, and the calibrator holds every intermediate tensor of a tile in memory
TILE_SIDE = 64
MAX_TILES_PER_CASE = 8
#: float candidates, most quantized first: convolutions with fewer input or output channels than this stay fp32
#: (besides the stem and the head, always fp32)
FLOAT_LADDER = (32, 64, 128)


@dataclass
class TileSet:
    """Preprocessed tiles ``(1, C, s, s, s)`` float32 for one model's grid: for calibration and for verification."""

    calibration: list[np.ndarray]
    verification: list[np.ndarray]
    calibration_cases: list[str] = field(default_factory=list)
    verification_cases: list[str] = field(default_factory=list)
    #: for each verification tile, the index of its case in ``verification_cases`` (the gate is per case)
    verification_case_of: list[int] = field(default_factory=list)


def case_volume(path: Path, spacing_mm: Sequence[float], hu_window: tuple[float, float]) -> np.ndarray:
    """A CT on the model's grid, normalised, exactly as the runtime prepares it (whole image, no locator crop)."""
    from flare.runtime.image.model import to_canonical
    from flare.runtime.image.nifti import read_image
    from flare.runtime.ops.geometry import spacing_from_affine
    from flare.runtime.ops.resample import normalise_hu, output_shape, resample_linear

    img = read_image(path)
    data, affine, _ = to_canonical(img)
    vol = resample_linear(data, output_shape(data.shape, spacing_from_affine(affine), spacing_mm))
    return normalise_hu(vol, hu_window, out=vol)


def case_tiles(vol: np.ndarray, in_channels: int, side: int = TILE_SIDE,
               max_tiles: int = MAX_TILES_PER_CASE, divisor: int = 16) -> list[np.ndarray]:
    """Non-overlapping ``side``³ tiles of ``vol`` (zero-padded: 0 is air after the HU window), the ``max_tiles`` with
    the most tissue (non-zero voxels), as ``(1, in_channels, side, side, side)`` float32."""
    side = ceil_to(side, divisor)  # the network's spatial divisor
    grid = [range(0, max(n, 1), side) for n in vol.shape]
    tiles: list[tuple[int, np.ndarray]] = []
    for x in grid[0]:
        for y in grid[1]:
            for z in grid[2]:
                part = vol[x:x + side, y:y + side, z:z + side]
                tile = np.zeros((side,) * 3, np.float32)
                tile[: part.shape[0], : part.shape[1], : part.shape[2]] = part
                tiles.append((int(np.count_nonzero(tile)), tile))
    tiles.sort(key=lambda t: -t[0])
    return [np.ascontiguousarray(np.repeat(t[None, None], in_channels, axis=1)) for _, t in tiles[:max_tiles]]


def calibration_cases(paths: Sequence[str | Path]) -> list[Path]:
    """The CT files named by ``paths``: files as given, folders expanded to their ``.nii``/``.nii.gz`` files."""
    cases: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.name.endswith((".nii", ".nii.gz")) and q.is_file())
            if not found:
                raise InputError(p, "calibration folder holds no .nii/.nii.gz files")
            cases += found
        elif p.is_file():
            cases.append(p)
        else:
            raise InputError(p, "calibration case does not exist")
    if not cases:
        raise InputError(None, "--int8 needs --calibration CASES (real CTs, .nii/.nii.gz)")
    return cases


def split_cases(paths: Sequence[str | Path], extra_verification: Path | None) -> tuple[list[Path], list[Path]]:
    """(calibration cases, verification cases) of :func:`calibration_cases`: with two or more cases every fourth
    (at least one) is held out for verification; with one, it serves both. The export's verification CT is always
    verified on too."""
    cases = calibration_cases(paths)
    held = [c for i, c in enumerate(cases) if i % 4 == 3] or cases[-1:] if len(cases) >= 2 else []
    calib = [c for c in cases if c not in held]
    verify = held or list(calib)
    if extra_verification is not None and extra_verification.resolve() not in {c.resolve() for c in cases}:
        verify.append(extra_verification)
    return calib, verify


def tile_set(cases: Sequence[Path], extra_verification: Path | None, spacing_mm: Sequence[float],
             hu_window: tuple[float, float], in_channels: int, side: int = TILE_SIDE, divisor: int = 16) -> TileSet:
    """Calibration and verification tiles of one model grid (see :func:`split_cases`); sides ``side`` rounded up to
    the model's spatial ``divisor``."""
    calib, verify = split_cases(cases, extra_verification)
    volumes: dict[Path, np.ndarray] = {}

    case_of: list[int] = []

    def tiles(paths: list[Path]) -> list[np.ndarray]:
        out: list[np.ndarray] = []
        for i, p in enumerate(paths):
            if p not in volumes:
                volumes[p] = case_volume(p, spacing_mm, hu_window)
            new = case_tiles(volumes[p], in_channels, side, divisor=divisor)
            out += new
            case_of.extend([i] * len(new))
        return out

    calibration = tiles(calib)
    case_of.clear()
    return TileSet(calibration, tiles(verify), [p.name for p in calib], [p.name for p in verify], case_of)


def float_nodes(model_path: Path, min_channels: int) -> list[str]:
    """Names of the convolutions kept in float: the stem (those reading the graph input), the head (those whose
    output reaches a graph output without passing through another convolution) and every convolution with fewer
    than ``min_channels`` input or output channels (the ONNX weight's first two dimensions)."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    convs = [n for n in graph.node if n.op_type in QUANT_OPS]
    inputs = {i.name for i in graph.input}
    names = [n.name for n in convs if any(i in inputs for i in n.input)]
    producers = {o: n for n in graph.node for o in n.output}
    seen: set[str] = set()
    stack = [o.name for o in graph.output]
    while stack:
        node = producers.get(stack.pop())
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        if node.op_type in QUANT_OPS:
            names.append(node.name)
        else:
            stack += list(node.input)
    dims = {t.name: t.dims for t in graph.initializer}
    names += [n.name for n in convs if n.input[1] in dims and min(dims[n.input[1]][:2]) < min_channels]
    return sorted(set(names))


class _Reader:
    """The calibration data reader ONNX Runtime's calibrator pulls tiles from; ``set_range`` lets the calibrator take
    one tile at a time (``CalibStridedMinMax`` 1: ranges merged per tile, so only one tile's intermediate tensors
    are held in memory)."""

    def __init__(self, tiles: list[np.ndarray]) -> None:
        self._tiles = tiles
        self._it: Iterator[np.ndarray] = iter(tiles)

    def __len__(self) -> int:
        return len(self._tiles)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._it = iter(self._tiles[start_index:end_index])

    def get_next(self) -> dict[str, np.ndarray] | None:
        tile = next(self._it, None)
        return None if tile is None else {INPUT_NAME: tile}


def quantize_file(src: Path, dst: Path, calibration: list[np.ndarray], exclude: list[str]) -> Path:
    """Static QDQ int8 of ``src`` into ``dst`` (see the module docstring for the settings)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src, dst = Path(src).resolve(), Path(dst).resolve()
    with tempfile.TemporaryDirectory(prefix="flare-int8-", dir=dst.parent) as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        cwd = os.getcwd()
        os.chdir(tmp)  # the calibrator writes its augmented model into the working directory
        try:
            quantize_static(str(pre), str(dst), _Reader(calibration), quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=list(QUANT_OPS), per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=exclude,
                            extra_options={"CalibStridedMinMax": 1, "WeightSymmetric": True,
                                           "ActivationSymmetric": False})
        finally:
            os.chdir(cwd)
    return dst


def _labels(logits: np.ndarray) -> np.ndarray:
    return (logits[0, 0] > 0).astype(np.uint8) if logits.shape[1] == 1 else logits[0].argmax(0).astype(np.uint8)


def _dice(inter: dict[int, int], sizes: dict[int, list[int]]) -> dict[str, float]:
    return {str(k): round(2 * inter.get(k, 0) / (s[0] + s[1]), 5) for k, s in sorted(sizes.items())}


def compare_int8(int8_path: Path, fp32_path: Path, tiles: list[np.ndarray],
                 case_of: Sequence[int] | None = None) -> dict[str, Any]:
    """int8 against fp32 on ``tiles``: finite, voxel agreement, per-class Dice over all tiles (classes with fp32
    voxels) and per case (``case_of``: each tile's case; None: one case), and whether that passes the gate: the
    agreement over all tiles, and every class's Dice **in every case** where it has at least
    :data:`MIN_CLASS_VOXELS` fp32 voxels (pooling the cases hid per-case misses of small, low-margin classes:
    ``benchmarks/RESULTS.md``)."""
    q, f = ort_session(int8_path), ort_session(fp32_path)
    cases = list(case_of) if case_of is not None else [0] * len(tiles)
    same = total = 0
    channels = 0
    inter: dict[int, dict[int, int]] = {}  # case -> class -> voxels
    sizes: dict[int, dict[int, list[int]]] = {}
    for tile, case in zip(tiles, cases, strict=True):
        a = q.run(None, {INPUT_NAME: tile})[0]
        if not np.isfinite(a).all():
            return {"finite": False, "passed": False}
        channels = a.shape[1]
        la, lb = _labels(a), _labels(f.run(None, {INPUT_NAME: tile})[0])
        same += int((la == lb).sum())
        total += la.size
        for k in np.union1d(np.unique(la), np.unique(lb)).tolist():
            if k == 0:
                continue
            ia, ib = la == k, lb == k
            ci = inter.setdefault(case, {})
            ci[k] = ci.get(k, 0) + int((ia & ib).sum())
            s = sizes.setdefault(case, {}).setdefault(k, [0, 0])
            s[0] += int(ia.sum())
            s[1] += int(ib.sum())
    pooled_inter: dict[int, int] = {}
    pooled_sizes: dict[int, list[int]] = {}
    for case, per in sizes.items():
        for k, (na, nb) in per.items():
            pooled_inter[k] = pooled_inter.get(k, 0) + inter[case].get(k, 0)
            ps = pooled_sizes.setdefault(k, [0, 0])
            ps[0], ps[1] = ps[0] + na, ps[1] + nb
    dice = _dice(pooled_inter, pooled_sizes)
    fp32_voxels = {str(k): s[1] for k, s in sorted(pooled_sizes.items())}
    per_case = {c: _dice(inter[c], sizes[c]) for c in sorted(sizes)}
    gated = [(d, c, k) for c, dc in per_case.items() for k, d in dc.items()
             if sizes[c][int(k)][1] >= MIN_CLASS_VOXELS]
    agreement = same / max(total, 1)
    worst = min(gated) if gated else None
    passed = agreement >= MIN_AGREEMENT and all(d >= MIN_DICE for d, _, _ in gated)
    return {"finite": True, "passed": passed, "agreement": round(agreement, 6), "dice": dice,
            "fp32_voxels": fp32_voxels, "dice_per_case": {str(c): d for c, d in per_case.items()},
            "min_dice_gated": worst[0] if worst else None,
            "min_dice_case_class": [worst[1], worst[2]] if worst else None,
            "min_dice_class_name": class_name(int(worst[2]), channels) if worst else None,
            "voxels": total, "tiles": len(tiles)}


def class_name(index: int, channels: int) -> str:
    """Name of a class index of a model's labels: the locator's one channel is the organ union, a fold's channels
    are the merged training classes (index 12 is the tumor, not the duodenum)."""
    from flare.runtime.foundation.labels import merged_name

    return "organ union" if channels == 1 else merged_name(index)


def quantize_model(fp32_path: Path, dst: Path, tiles: TileSet, gate: bool = True,
                   optional: bool = False) -> dict[str, Any]:
    """Quantize ``fp32_path`` into ``dst`` with the most quantized :data:`FLOAT_LADDER` candidate that passes the
    gate (a model whose every convolution would stay float has no candidate: int8 would gain nothing); returns the
    verification record (every candidate tried, the one ``chosen``). When none passes: an
    ``optional`` model (the locator: a small network on a coarse grid, cheap in fp32) keeps only its fp32 file
    (``chosen: "fp32"``, no ``dst``); any other raises a one-line FlareError. Without ``gate`` (``flare-export
    --no-verify``: random weights for timing) the first candidate is kept whatever it measures (``passed: null``)."""
    import onnx

    tried: list[dict[str, Any]] = []
    record = {"calibration": {"cases": tiles.calibration_cases, "tiles": len(tiles.calibration), "method": "MinMax"},
              "verification_cases": tiles.verification_cases}
    graph = onnx.load(str(fp32_path), load_external_data=False).graph
    n_convs = sum(n.op_type in QUANT_OPS for n in graph.node)
    for min_channels in FLOAT_LADDER if gate else FLOAT_LADDER[:1]:
        exclude = float_nodes(fp32_path, min_channels)
        if tried and exclude == tried[-1]["float_nodes"]:
            continue  # same graph as the previous candidate
        if len(exclude) == n_convs:
            tried.append({"float_below_channels": min_channels, "float_nodes": exclude, "finite": True,
                          "passed": False, "nothing_to_quantize": True})
            break
        quantize_file(fp32_path, dst, tiles.calibration, exclude)
        measure = compare_int8(dst, fp32_path, tiles.verification, tiles.verification_case_of or None)
        tried.append({"float_below_channels": min_channels, "float_nodes": exclude,
                      "int8_convs": n_convs - len(exclude), **measure})
        if measure["passed"] or not gate:
            return {"passed": True if gate else None, "chosen": min_channels, "candidates": tried, **record}
    dst.unlink(missing_ok=True)
    if optional:
        return {"passed": False, "chosen": "fp32", "candidates": tried, **record}
    last = tried[-1]
    detail = ("NaN/inf output" if not last.get("finite") else
              f"every convolution has fewer than {last['float_below_channels']} channels or is the stem/head: "
              "int8 would gain nothing" if last.get("nothing_to_quantize") else
              f"agreement {last['agreement']:.4f}, lowest class Dice {last['min_dice_gated']}{_weakest(last, tiles)}")
    raise FlareError(fp32_path, f"int8 model fails verification against fp32 with convolutions under "
                                f"{' / '.join(map(str, FLOAT_LADDER))} channels in float: {detail} (needs agreement "
                                f">= {MIN_AGREEMENT}, Dice >= {MIN_DICE}); export refused (without --int8 the "
                                "bundle runs fp32 on the CPU)")


def _weakest(measure: dict[str, Any], tiles: TileSet) -> str:
    """`` (CLASS in CASE)`` of a candidate's lowest gated class Dice, for the refusal line; empty when none."""
    if not measure.get("min_dice_case_class"):
        return ""
    case = int(measure["min_dice_case_class"][0])
    where = tiles.verification_cases[case] if case < len(tiles.verification_cases) else f"case {case}"
    return f" ({measure['min_dice_class_name']} in {where})"


def record() -> dict[str, Any]:
    """The quantization settings and the gate, as recorded in ``bundle.json``'s ``verification.int8``."""
    return {"settings": {"format": "QDQ", "weights": "int8 per-channel symmetric", "activations": "uint8 asymmetric",
                         "calibration": "MinMax", "quantized_ops": list(QUANT_OPS),
                         "always_float": "stem and head", "float_below_channels_ladder": list(FLOAT_LADDER),
                         "tile_side": TILE_SIDE,
                         "max_tiles_per_case": MAX_TILES_PER_CASE},
            "gate": {"min_agreement": MIN_AGREEMENT, "min_dice": MIN_DICE, "min_class_voxels": MIN_CLASS_VOXELS}}
