"""runtime/ never imports torch or monai — not in its source and not at run time (checked in a subprocess)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from conftest import REPO, data_path

FORBIDDEN = ("torch", "monai")


def test_runtime_source_has_no_torch_imports() -> None:
    pattern = re.compile(r"^\s*(import|from)\s+(torch|monai)\b", re.MULTILINE)
    hits = [str(p) for p in (REPO / "runtime").rglob("*.py") if pattern.search(p.read_text())]
    assert not hits, hits


def test_segment_does_not_load_torch(tiny_bundle: Path, tmp_path: Path) -> None:
    ct = data_path("ts_abdomen_ct_3mm.nii.gz")
    code = f"""
import sys
import flare.runtime as rt
labels, affine, report = rt.segment({str(ct)!r}, bundle={str(tiny_bundle)!r}, device="cpu",
                                    output={str(tmp_path / 'o.nii.gz')!r})
import flare.runtime.app.cli, flare.runtime.ops.lr_split, flare.runtime.ops.postprocessing
loaded = [m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r}]
assert not loaded, loaded
print(labels.shape)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
