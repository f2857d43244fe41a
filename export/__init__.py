"""flare.export: checkpoints -> verified ONNX (fp32/fp16) bundle (+ optional TensorRT engines); CLI ``flare-export``.

Heavy libraries (torch, onnx, onnxruntime, tensorrt) are imported inside the functions that use them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["export_auto3dseg", "export_bundle"]


def export_bundle(ckpt_dir: str | Path, out_dir: str | Path, fp16: bool = False, trt: bool = False, opset: int = 17,
                  verify: bool = True, progress: bool = True, **kwargs: Any) -> Path:
    """Export a flare-train checkpoint folder to a bundle; see :func:`flare.export.bundle_export.export_bundle`."""
    from .bundle_export import export_bundle as _export

    return _export(ckpt_dir, out_dir, fp16=fp16, trt=trt, opset=opset, verify=verify, progress=progress, **kwargs)


def export_auto3dseg(work_dir: str | Path, out_dir: str | Path, fp16: bool = False, trt: bool = False,
                     opset: int = 17, verify: bool = True, progress: bool = True, **kwargs: Any) -> Path:
    """Convert a MONAI Auto3DSeg work dir to a bundle; see :func:`flare.export.auto3dseg.export_auto3dseg`."""
    from .auto3dseg import export_auto3dseg as _export

    return _export(work_dir, out_dir, fp16=fp16, trt=trt, opset=opset, verify=verify, progress=progress, **kwargs)
