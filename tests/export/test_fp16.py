"""fp16 export: BatchNormalization runs in fp16 (no Cast pair around every norm), and the fp16 bundle segments the
real CTs like the fp32 one.

ONNX Runtime's CPU provider has no fp16 kernels for this graph: at session creation it turns the fp16 region back
into fp32 (``InsertedPrecisionFreeCast`` nodes on the fp16 weights), so the pipeline parity below measures fp16
weights and fp16 rounding of the input, not fp16 arithmetic. The arithmetic is checked on the graph level (every
BatchNormalization's inputs are fp16; only the graph's input and output are cast) and on the GPU by the gpu-marked
engine tests and the GPU check's smoke stage (finite output, argmax agreement with fp32).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import data_path
from flare.benchmarks.metrics import dice_per_class
from flare.export.fp16 import convert_to_fp16
from flare.runtime.bundle.manifest import sha256_file, write_bundle_json

CTS = ("ts_abdomen_ct_3mm.nii.gz", "ts_body_ct_3mm_int32.nii.gz", "ts_torso_ct_1p5mm_lps.nii.gz")
MIN_VOXELS = 50  # classes smaller than this (at the bundle's 6 mm) are a handful of boundary voxels


def _types(model: onnx.ModelProto) -> dict[str, int]:
    out = {vi.name: vi.type.tensor_type.elem_type
           for vi in list(model.graph.input) + list(model.graph.value_info) + list(model.graph.output)}
    out.update({t.name: t.data_type for t in model.graph.initializer})
    return out


def test_batchnorm_is_fp16_and_only_the_graph_edges_are_cast(parity_bundle: Path, tmp_path: Path) -> None:
    fp16 = onnx.shape_inference.infer_shapes(onnx.load(str(convert_to_fp16(parity_bundle / "fold0.fp32.onnx",
                                                                            tmp_path / "fold0.fp16.onnx"))))
    types = _types(fp16)
    norms = [n for n in fp16.graph.node if n.op_type == "BatchNormalization"]
    assert norms, "the tiny SegResNetDS has BatchNormalization nodes"
    for node in norms:
        assert all(types.get(i) == onnx.TensorProto.FLOAT16 for i in node.input if i), node.name
    casts = [n for n in fp16.graph.node if n.op_type == "Cast"]
    assert len(casts) == 2, [c.name for c in casts]  # float32 image in, float32 logits out


@pytest.fixture
def fp16_bundle(parity_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The parity bundle with fp16 files beside the fp32 ones (built once per session)."""
    import json

    root = tmp_path_factory.getbasetemp() / "fp16" / "bundle"
    if (root / "bundle.json").is_file() and "fp16" in (root / "bundle.json").read_text():
        return root
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(parity_bundle, root)
    doc = json.loads((root / "bundle.json").read_text())
    for entry in [doc["locator"]] + doc["folds"]:
        src = entry["files"]["fp32"]
        dst = convert_to_fp16(root / src["path"], root / src["path"].replace(".fp32.", ".fp16."))
        entry["files"]["fp16"] = {**src, "path": dst.name, "sha256": sha256_file(dst)}
    write_bundle_json(root, doc)
    return root


@pytest.mark.slow  # two Segmenters per CT (2 tiny folds, 6 mm): ~20-50 s each on the shared 2-core box
@pytest.mark.parametrize("ct", CTS)
def test_fp16_matches_fp32_on_real_cts(fp16_bundle: Path, ct: str) -> None:
    from flare.runtime.pipeline.segmenter import Segmenter

    path = data_path(ct)
    ref = Segmenter(fp16_bundle, device="cpu", precision="fp32").segment(path).labels
    result = Segmenter(fp16_bundle, device="cpu", precision="fp16").segment(path)
    got, report = result.labels, result.report.to_json()
    assert report["backend"]["precision"] == "fp16"
    counts = np.bincount(ref.ravel(), minlength=15)
    dice = dice_per_class(got, ref)
    checked = {k: d for k, d in dice.items() if counts[k] >= MIN_VOXELS}
    assert checked, "no class is large enough to compare"
    assert min(checked.values()) >= 0.99, checked
