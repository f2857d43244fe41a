"""TensorRT engines for a bundle (``flare-export --trt``). UNVERIFIED: written against the documented TensorRT
8.6/10 Python API and never run in this project's CI (TensorRT cannot be installed there); the tests check only the
clear error when TensorRT is missing and skip the real build.

Layout inside the bundle::

    engines/sm<major><minor>-trt<version>/<onnx-sha256>.plan   serialized engine
    engines/sm<major><minor>-trt<version>/<onnx-sha256>.json   key: onnx sha256, sm, TensorRT version, profile,
                                                                precision, plan sha256
    engines/sm<major><minor>-trt<version>/timing.cache         shared timing cache (speeds up rebuilds)

An engine is reused only when its key file matches the ONNX sha256, the GPU compute capability, the TensorRT version
and the plan's own sha256; anything else is rebuilt, never loaded. Precision: from the bundle's fp16 ONNX file
(whose normalisation layers are already fp32) as a *strongly typed* network when TensorRT supports it; otherwise
from the fp32 file with the FP16 builder flag and normalisation/scale/reduce/softmax layers pinned to fp32.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flare.runtime.bundle.manifest import sha256_file
from flare.runtime.foundation.errors import FlareError

MIN_SIDE = 16  # smallest tile side of the optimisation profile (one spatial divisor)


def import_tensorrt() -> Any:
    """``import tensorrt`` or a one-line FlareError telling how to get it."""
    try:
        import tensorrt
    except ImportError:
        raise FlareError(None, "TensorRT is not installed: pip install tensorrt (needs an NVIDIA GPU and CUDA), "
                               "or export without --trt") from None
    return tensorrt


def compute_capability() -> str:
    """``"sm<major><minor>"`` of GPU 0 (via torch, which export already depends on)."""
    import torch

    if not torch.cuda.is_available():
        raise FlareError(None, "TensorRT engines need a CUDA GPU, and none is visible")
    major, minor = torch.cuda.get_device_capability(0)
    return f"sm{major}{minor}"


def engine_dir(bundle_root: Path, sm: str, trt_version: str) -> Path:
    return bundle_root / "engines" / f"{sm}-trt{trt_version}"


def engine_key(onnx_sha256: str, sm: str, trt_version: str, profile: dict[str, list[int]], precision: str) -> dict:
    return {"onnx_sha256": onnx_sha256, "sm": sm, "tensorrt": trt_version, "profile": profile,
            "precision": precision}


def cached_engine(folder: Path, key: dict[str, Any]) -> Path | None:
    """The plan for ``key`` when its key file matches exactly and the plan is intact; else ``None`` (rebuild)."""
    plan, key_file = folder / f"{key['onnx_sha256']}.plan", folder / f"{key['onnx_sha256']}.json"
    try:
        stored = json.loads(key_file.read_text())
    except (OSError, ValueError):
        return None
    if not plan.is_file() or {k: stored.get(k) for k in key} != key or stored.get("plan_sha256") != sha256_file(plan):
        return None
    return plan


def _profile(in_channels: int, roi: list[int]) -> dict[str, list[int]]:
    return {"min": [1, in_channels, MIN_SIDE, MIN_SIDE, MIN_SIDE], "opt": [1, in_channels, *roi],
            "max": [1, in_channels, *roi]}


def build_engine(onnx_path: Path, folder: Path, key: dict[str, Any], input_name: str, strongly_typed: bool) -> Path:
    """Build, serialise and key one engine (see the module docstring for the precision rules)."""
    from flare.runtime.foundation.atomic import atomic_path, write_text_atomic

    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH) if hasattr(
        trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH") else 0
    if strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise FlareError(onnx_path, f"TensorRT cannot parse the model: {errors[:300]}")
    config = builder.create_builder_config()
    if not strongly_typed and key["precision"] == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        keep_fp32 = {getattr(trt.LayerType, n) for n in ("NORMALIZATION", "SCALE", "REDUCE", "SOFTMAX")
                     if hasattr(trt.LayerType, n)}
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            if layer.type in keep_fp32:
                layer.precision = trt.float32
                for j in range(layer.num_outputs):
                    layer.set_output_type(j, trt.float32)
    profile = builder.create_optimization_profile()
    profile.set_shape(input_name, *(tuple(key["profile"][k]) for k in ("min", "opt", "max")))
    config.add_optimization_profile(profile)
    cache_file = folder / "timing.cache"
    cache = config.create_timing_cache(cache_file.read_bytes() if cache_file.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=True)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise FlareError(onnx_path, "TensorRT failed to build an engine (see the TensorRT log above)")
    plan = folder / f"{key['onnx_sha256']}.plan"
    with atomic_path(plan) as tmp:
        tmp.write_bytes(bytes(serialized))
    with atomic_path(cache_file) as tmp:
        tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
    write_text_atomic(folder / f"{key['onnx_sha256']}.json",
                      json.dumps({**key, "plan_sha256": sha256_file(plan)}, indent=2) + "\n")
    return plan


def ensure_engine(bundle_root: Path, onnx_rel: str, in_channels: int, roi: list[int], precision: str,
                  input_name: str = "image") -> dict[str, Any]:
    """Reuse the cached engine of one ONNX file when its key matches, else (re)build it; returns its record."""
    trt = import_tensorrt()
    sm, version = compute_capability(), str(trt.__version__)
    onnx_path = bundle_root / onnx_rel
    key = engine_key(sha256_file(onnx_path), sm, version, _profile(in_channels, roi), precision)
    folder = engine_dir(bundle_root, sm, version)
    folder.mkdir(parents=True, exist_ok=True)
    strongly_typed = precision == "fp16" and ".fp16." in onnx_rel and hasattr(
        trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
    plan = cached_engine(folder, key) or build_engine(onnx_path, folder, key, input_name, strongly_typed)
    return {**key, "onnx": onnx_rel, "path": plan.relative_to(bundle_root).as_posix()}


def build_bundle_engines(bundle_root: Path, doc: dict[str, Any]) -> list[dict[str, Any]]:
    """One fp16 engine per model of ``doc`` (built from the fp16 ONNX file when the bundle has one)."""
    records = []
    models = ([("locator", doc["locator"], doc["tiling"]["locator_roi"])] if doc.get("locator") else []) + \
             [(m["name"], m, doc["tiling"]["roi"]) for m in doc["folds"]]
    for name, entry, roi in models:
        f = entry["files"].get("fp16") or entry["files"]["fp32"]
        rec = ensure_engine(bundle_root, f["path"], int(entry["in_channels"]), list(roi), "fp16", f["input_name"])
        records.append({"model": name, **rec})
    return records
