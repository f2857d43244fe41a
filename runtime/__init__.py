"""flare.runtime — the torch-free FLARE23 inference runtime (numpy, nibabel, ONNX Runtime).

Public API (imported lazily so that ``import flare.runtime`` and ``flare-run --help`` stay instant)::

    from flare.runtime import segment, Segmenter, SegmentResult, Report, RemoteSegmenter, split_left_right
    from flare.runtime import postprocess, load_bundle
    from flare.runtime import read_dicom, write_dicom_seg  # DICOM series in, DICOM-SEG out (the dicom extra)

The functions live in small modules (``flare.runtime.ops.postprocessing`` holds ``postprocess``); no module shares a
name with a function exported here, so ``from flare.runtime import postprocess`` always gives the function.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "segment": "app.api",
    "Segmenter": "pipeline.segmenter",
    "SegmentResult": "pipeline.result",
    "Report": "pipeline.result",
    "RemoteSegmenter": "serving.client",
    "split_left_right": "ops.lr_split",
    "postprocess": "ops.postprocessing",
    "load_bundle": "bundle.manifest",
    "read_image": "image.nifti",
    "write_labels": "image.nifti",
    "read_dicom": "image.dicom",
    "find_series": "image.dicom",
    "write_dicom_seg": "image.dicomseg",
    "FlareError": "foundation.errors",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
