"""What the pipeline returns: a :class:`SegmentResult` (labels in the input grid, the input image, a :class:`Report`).

The pipeline never writes files; the app layer (:mod:`flare.runtime.app.write`) writes the labels, DICOM-SEG,
statistics, preview and the report, and times its own ``write`` stage into :attr:`Report.stages`. A server answer
(:mod:`flare.runtime.serving.client`) is the same object, its report read back with :meth:`Report.from_json`.

The JSON form (``flare-run --report``, the server's ``report`` output) keeps these keys, in this order: ``input``,
``crop``, ``tiles``, ``backend``, ``folds``, ``postprocess``, ``stages``, ``total_s``, ``rss_peak_mb``,
``gpu_peak_mb``, then ``gpu`` (CUDA runs), ``voxels``, ``volume_ml``, ``fallbacks`` (when any), ``output`` (when
written), ``model_card``, and — when used — ``roi_subset``, ``masks`` and ``server``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    from flare.runtime.image.model import LoadedImage

__all__ = ["STAGES", "Report", "SegmentResult"]

#: the stages of one image, in order (``write`` is the app's, 0.0 until it writes)
STAGES = ("read", "locate", "crop_resample", "infer", "postprocess", "restore", "write")

_OPTIONAL = ("gpu", "fallbacks", "output", "model_card", "roi_subset", "masks", "server")  # left out while empty


@dataclass
class Report:
    """The run report of one image. Sections are plain JSON-able dicts; see the module docstring for the keys."""

    input: dict[str, Any]  # path, shape, spacing, orientation, oblique
    crop: dict[str, Any]  # lo, hi, located, resampled_shape
    tiles: dict[str, Any]  # roi, total, per_fold, overlap, blend, locator, z_range_folds_1_on
    backend: dict[str, Any]  # device, engine, precision, load_s, load
    folds: Any  # per-fold details of the ensemble
    postprocess: dict[str, Any]  # mode
    stages: dict[str, float]  # seconds per stage, every name of STAGES
    total_s: float
    rss_peak_mb: float
    gpu_peak_mb: float | None = None
    gpu: dict[str, Any] | None = None  # the ensemble's GPU part (CUDA runs)
    voxels: dict[str, int] = field(default_factory=dict)  # per label, in the input grid
    volume_ml: dict[str, float] = field(default_factory=dict)
    fallbacks: list[Any] = field(default_factory=list)  # what fell back (smaller tiles, the CPU) and why
    output: str | None = None  # the label map written (set by the app)
    model_card: dict[str, Any] | None = None  # the bundle's model card summary (its ``warning`` for synthetic data)
    roi_subset: list[int] | None = None  # FLARE ids kept (``--roi-subset``; set by the app)
    masks: list[str] | None = None  # one mask file per label (``--masks``; set by the app)
    server: str | None = None  # the flare-serve that answered (``flare-run --server``)

    def add_stage_time(self, name: str, seconds: float) -> None:
        """Add ``seconds`` to stage ``name`` (the app's read-ahead and write)."""
        self.stages[name] = round(self.stages.get(name, 0.0) + seconds, 4)

    def to_json(self) -> dict[str, Any]:
        """The JSON object (a dict of JSON types), keys in the documented order; empty optional keys left out."""
        doc = {f.name: getattr(self, f.name) for f in fields(self)}
        return {k: v for k, v in doc.items() if k not in _OPTIONAL or v not in (None, [])}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Report:
        """A report from its JSON object (a server's answer); unknown keys are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in doc.items() if k in names})


@dataclass
class SegmentResult:
    """One segmented image: uint8 FLARE-id ``labels`` in the input's voxel grid, the input ``image`` (its affine and
    header are what the labels are written with) and the :class:`Report`."""

    labels: np.ndarray
    image: LoadedImage
    report: Report

    @property
    def affine(self) -> np.ndarray:
        return self.image.affine
