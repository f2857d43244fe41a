"""The one-call Python API: ``flare.runtime.segment(ct, bundle, output=...)``.

A :class:`~flare.runtime.pipeline.segmenter.Segmenter` for one image, and the label map written through the app's
writer (:mod:`flare.runtime.app.write`) when ``output`` is given. For many images, load a ``Segmenter`` once and
call its ``segment()``: it returns the same :class:`~flare.runtime.pipeline.result.SegmentResult` and writes
nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from flare.runtime.inference.engine_names import CPU_ENGINES
from flare.runtime.pipeline.result import SegmentResult
from flare.runtime.pipeline.segmenter import Segmenter

if TYPE_CHECKING:
    from flare.runtime.bundle.manifest import Bundle
    from flare.runtime.image.model import LoadedImage

__all__ = ["segment"]


def segment(image: str | Path | LoadedImage, bundle: str | Path | Bundle, *, output: str | Path | None = None,
            device: str = "auto", folds: int | None = None, overlap: float | None = None,
            precision: str | None = None, gpu_mem_budget: float | None = None, postprocess: str | None = None,
            cudnn_algo_search: str = "HEURISTIC", engine: str = CPU_ENGINES[0]) -> SegmentResult:
    """Segment one CT: ``result.labels`` (uint8 FLARE ids in the input grid), ``result.affine``, ``result.report``;
    writes the label map to ``output`` (NIfTI, in the input's space) when given. An ``output`` that is the input,
    an existing file of the bundle or of an input folder, or a folder is refused (``OutputError``) before any work.

    ``postprocess`` picks the clean-up rules: ``"paper"`` or ``"strict"`` (see :mod:`flare.runtime.ops.postprocessing`);
    None takes the bundle's ``postprocess.mode`` (``"paper"`` unless the bundle says otherwise). ``engine``
    ``"openvino"`` runs the fp32 models with OpenVINO on the CPU (the ``openvino`` extra)."""
    from flare.runtime.app.write import Outputs, write_result

    if output is not None:
        from flare.runtime.app.output_guard import check_outputs

        read = [image, bundle if isinstance(bundle, (str, Path)) else bundle.root]
        check_outputs([Path(p) for p in read if isinstance(p, (str, Path))], {"segmentation": output})
    result = Segmenter(bundle, device=device, folds=folds, overlap=overlap, precision=precision,
                       gpu_mem_budget=gpu_mem_budget, postprocess=postprocess,
                       cudnn_algo_search=cudnn_algo_search, engine=engine).segment(image)
    if output is not None:
        write_result(result, Outputs(Path(output)))
    return result
