"""Speed of ``flare.runtime.postprocess``: the paper's rules (default) against the strict 3-D rules, numpy on the host.

Usage::

    python -m flare.benchmarks.postprocess_speed [--repeats 5] [--out postprocess_speed.json]

The label maps are built from the real TotalSegmentator label map ``ts_abdomen_labels_flare_ids.nii.gz``
(``$FLARE_SHARED_DATA``, else ``../shared/data``; 122x101x30 at 3 mm): nearest-resampled to 366x303x375 (1 mm in
plane, the 30 slices stretched to 330) and centred in a 384x384x375 uint8 map, the size of the worst case of issue 9
(a whole 512x512x300 CT at 1 mm). Three variants:

* ``clean`` — that map: every organ is one piece, nothing is removed by the paper's rules;
* ``outliers`` — plus, for each of liver, kidneys, spleen, pancreas and aorta, a 6x6x3 stray blob 12 slices beyond
  the organ's z range, and five 30-voxel tumors (150 voxels in total): the paper's rules remove the blobs and keep
  the tumors, the strict rules remove both;
* ``noisy`` — 2 % of the voxels set to random ids 1..14 (what a random-weight network predicts looks like this):
  thousands of small components for the strict rules.

Each mode runs ``repeats`` times on a fresh copy of each map (the copy is not timed; ``copy=False``); best and
median seconds are reported with the voxels each mode removed. For scale, the rows ``split_left_right`` time the
other half of the pipeline's ``postprocess`` stage (host-only, cc3d) on the same map with both kidneys and both
adrenal glands merged (voxels relabelled instead of removed). The ``stage_*`` rows time the pipeline's whole
``postprocess`` stage (merged classes → FLARE ids, split, paper rules) on the merged map: ``stage_whole_map`` the
whole-map order, ``stage_boxes`` :func:`flare.runtime.ops.finish.finish_labels` (one bounding-box scan),
``stage_boxes_given`` the same with the boxes handed over (as the device ensemble does); the three must give the
same labels (the sha256 column). Prints a Markdown table and writes JSON with the machine and date.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

SHAPE = (384, 384, 375)
INNER_Z = 330
GAP = 12
SOURCE = "ts_abdomen_labels_flare_ids.nii.gz"


def _nearest(data: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    index = [np.minimum(((np.arange(n) + 0.5) * s / n).astype(np.intp), s - 1) for n, s in zip(shape, data.shape)]
    return data[np.ix_(*index)]


def build_maps(source: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """The ``clean``, ``outliers`` and ``noisy`` label maps (uint8, :data:`SHAPE`)."""
    import nibabel as nib
    from flare.runtime.foundation.labels import TUMOR, Z_RUN_IDS

    data = np.asarray(nib.load(source).dataobj).astype(np.uint8)  # type: ignore[attr-defined]
    inner = (data.shape[0] * 3, data.shape[1] * 3, INNER_Z)
    clean = np.zeros(SHAPE, np.uint8)
    lo = [(s - n) // 2 for s, n in zip(SHAPE, inner)]
    clean[lo[0]:lo[0] + inner[0], lo[1]:lo[1] + inner[1], lo[2]:lo[2] + inner[2]] = _nearest(data, inner)

    outliers = clean.copy()
    for i, organ in enumerate(Z_RUN_IDS):
        zs = np.flatnonzero(np.any(clean == organ, axis=(0, 1)))
        z = int(zs[-1]) + 1 + GAP if zs[-1] + 1 + GAP + 3 <= SHAPE[2] else int(zs[0]) - GAP - 3
        outliers[10 + 12 * i:16 + 12 * i, 10:16, z:z + 3] = organ
    for i in range(5):
        outliers[300 + 10 * i:303 + 10 * i, 350:355, 100:102] = TUMOR  # 30 voxels each

    rng = np.random.default_rng(seed)
    noisy = clean.copy()
    flat = noisy.reshape(-1)
    picks = rng.choice(flat.size, size=flat.size // 50, replace=False)
    flat[picks] = rng.integers(1, TUMOR + 1, size=picks.size, dtype=np.uint8)
    return {"clean": clean, "outliers": outliers, "noisy": noisy}


def run(source: Path, repeats: int = 5) -> dict[str, Any]:
    from flare.benchmarks.host_stages import machine_info
    from flare.runtime.foundation.labels import merge_left_right, merged_to_flare
    from flare.runtime.ops.components import label_boxes
    from flare.runtime.ops.finish import finish_labels
    from flare.runtime.ops.lr_split import split_left_right
    from flare.runtime.ops.postprocessing import MODES, postprocess

    maps = build_maps(source)
    def rules(mode: str) -> Callable[[np.ndarray], np.ndarray]:
        return lambda work: postprocess(work, (1.0, 1.0, 1.0), mode=mode, copy=False)

    steps = {mode: rules(mode) for mode in MODES}
    steps["split_left_right"] = lambda work: split_left_right(work, np.eye(4))
    # the pipeline's whole postprocess stage (paper rules) on the merged map: the whole-map order of main before
    # issue 16c, then flare.runtime.ops.finish on bounding boxes (one find_objects scan), then with the boxes
    # handed over as the device ensemble does (the scan not timed: the device made them from its tiles)
    steps["stage_whole_map"] = lambda work: postprocess(split_left_right(merged_to_flare(work), np.eye(4)),
                                                        (1.0, 1.0, 1.0), copy=False)
    steps["stage_boxes"] = lambda work: finish_labels(work, np.eye(4), (1.0, 1.0, 1.0))
    given: dict[int, Any] = {}
    steps["stage_boxes_given"] = lambda work: finish_labels(work, np.eye(4), (1.0, 1.0, 1.0), boxes=given[id(work)])
    rows = []
    for case, labels in maps.items():
        for step, fn in steps.items():
            src = merged_to_flare(merge_left_right(labels)) if step == "split_left_right" else labels
            if step.startswith("stage_"):
                src = merge_left_right(labels)
            times, out = [], src
            for _ in range(max(1, repeats)):
                work = src.copy()
                given[id(work)] = label_boxes(work, 12)
                t0 = time.perf_counter()
                out = fn(work)
                times.append(time.perf_counter() - t0)
            rows.append({"case": case, "mode": step, "best_s": min(times), "median_s": statistics.median(times),
                         "runs": len(times), "changed_voxels": int(np.count_nonzero(out != src)),
                         "labels_sha": hashlib.sha256(out.tobytes()).hexdigest()[:12]})
    return {"machine": machine_info(), "shape": list(SHAPE), "source": str(source), "rows": rows}


def markdown(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    title = (f"postprocess on {'x'.join(map(str, doc['shape']))} uint8 label maps, numpy; {m['cpu']}, "
             f"{m['usable_cores']} usable cores; {m['date']}")
    lines = [title, "",
             "| map | mode | best s | median s | runs | voxels changed | labels sha256 |",
             "|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        lines.append(f"| {r['case']} | {r['mode']} | {r['best_s']:.3f} | {r['median_s']:.3f} | {r['runs']} | "
                     f"{r['changed_voxels']} | {r['labels_sha']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from flare.benchmarks.cases import shared_data_dir
    from flare.benchmarks.host_stages import publish

    parser = argparse.ArgumentParser(prog="python -m flare.benchmarks.postprocess_speed",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="write the results as JSON to this file")
    parser.add_argument("--repeats", type=int, default=5, help="runs per map and mode (best and median reported)")
    parser.add_argument("--source", type=Path, default=None, help=f"the label map to build from (default: {SOURCE} "
                                                                  "in $FLARE_SHARED_DATA or ../shared/data)")
    args = parser.parse_args(argv)
    source = args.source or shared_data_dir() / SOURCE
    if not source.is_file():
        print(f"{source}: source label map not found (see ../shared/data/README.md)", file=sys.stderr)
        return 2
    doc = run(source, args.repeats)
    return publish(doc, markdown(doc), args.out)


if __name__ == "__main__":
    sys.exit(main())
