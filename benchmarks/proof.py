"""Proof that the recipe learns, measured the way a user meets it: through ``flare.runtime.Segmenter``.

Every score here comes from a bundle exported from the checkpoints and run by the runtime (locator crop, tiles,
left/right split, post-processing, labels restored to the input grid), compared with the complete truth
(``label_full``) of phantoms drawn from a seed that training never sees, per FLARE class in the input grid. A class
absent from a case's truth is not scored for that case (the paper's rule); a class's Dice is its mean over the cases
that have it.

Pieces (each used by ``flare-demo --proof`` and by the short demo):

- :func:`resolution_ceiling`: what a perfect network could reach at a training spacing (truth -> spacing -> back,
  nearest neighbour, the runtime's resampling);
- :func:`score_bundle`: per-case, per-class Dice of a bundle through the runtime (``postprocess`` "paper" and/or
  "strict");
- :func:`export_view`: a bundle from chosen checkpoints (a snapshot of the folds for a learning curve);
- :func:`learning_curve`: Dice against training steps from the stage-2 snapshots;
- :func:`run_proof`: phantoms -> ceiling -> two-stage run -> naive run (the paper's ablation) -> curve -> report.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from flare.runtime.foundation import labels as L
from flare.runtime.foundation.atomic import write_text_atomic
from flare.runtime.foundation.errors import FlareError

#: the six large organs of the issue's target (both kidneys count)
LARGE_ORGANS = (L.LIVER, L.RIGHT_KIDNEY, L.LEFT_KIDNEY, L.SPLEEN, L.AORTA, L.STOMACH)
ORGANS = tuple(L.ORGAN_IDS)
#: the demo's held-out phantoms (12 by default). Proof configs up to run H were chosen by their score on the first
#: 12 phantoms of this seed, so for the proof it is a development set, not a test set
HELDOUT_SEED = 2026
#: the proof's test set: 36 phantoms drawn after every choice of the proof's config and training set, never trained
#: on, never used to choose. (Seed 2027, drawn first, showed that the choices made on seed 2026 were noise and chose
#: between the recorded runs: train/results/RESULTS.md, "a fresh test set"; so it is not the test set either.)
TEST_SEED = 2028
#: test phantoms of the proof: with 12, one run's tumour Dice was uncertain by about +-0.16 from the draw alone
#: (bootstrap over the cases); 36 narrow that to about +-0.08
PROOF_TEST_CASES = 36
TRAIN_SEED = 0
#: every n-th phantom, training and test alike, is a head-to-thigh scan. The test set shows what remote false organs
#: cost under the paper's z-run rule; in training, with the generator's natural 10 %, the network saw a head or
#: thighs in too few crops and labelled brain as liver and kidney on the long test scans (train/results/RESULTS.md,
#: proof run 3)
LONG_EVERY = 4
PHANTOM_SIZE = 96
#: training phantoms of the proof (seed 0; the unlabelled fifth is left out: 32 train). 64 (51 train) did not raise
#: the tumour Dice on fresh phantoms (0.15-0.16 either way) and cut the two-stage gain over naive training from
#: +0.12 to +0.06-0.09: the naive run learns the missed organs from the extra fully labelled cases
#: (train/results/RESULTS.md, "a fresh test set")
PROOF_TRAIN_CASES = 40

Say = Callable[[str], None]


def _quiet(_msg: str) -> None:
    return None


# ------------------------------------------------------------------------------------------------------ scoring
def summarise(per_case: Sequence[dict[int, float]], missing: Sequence[int] = ()) -> dict[str, Any]:
    """Per-class mean over the cases that have the class, and the headline means: 13 organs, the six large organs,
    tumour, and ``missing`` (the organs the partial labels lack)."""
    per_class: dict[int, float] = {}
    for c in range(1, L.NUM_FLARE_IDS):
        vals = [d[c] for d in per_case if c in d]
        if vals:
            per_class[c] = float(np.mean(vals))

    def mean(ids: Sequence[int]) -> float | None:
        vals = [per_class[c] for c in ids if c in per_class]
        return round(float(np.mean(vals)), 4) if vals else None

    out = {"cases": len(per_case), "organ_mean": mean(ORGANS), "large6_mean": mean(LARGE_ORGANS),
           "tumor": round(per_class[L.TUMOR], 4) if L.TUMOR in per_class else None,
           "per_class": {L.name_of(c): round(v, 4) for c, v in per_class.items()}}
    if missing:
        out["missing_mean"] = mean(missing)
    return out


def read_labels(path: str | Path) -> np.ndarray:
    """A label map from a NIfTI file, as uint8, in its stored voxel order."""
    import nibabel as nib

    img: Any = nib.load(path)
    return np.asarray(img.dataobj).astype(np.uint8)


def _truth(entry: dict[str, Any]) -> np.ndarray:
    return read_labels(entry.get("label_full") or entry["label"])


def case_dice(pred: np.ndarray, truth: np.ndarray) -> dict[int, float]:
    from flare.train.engine import dice_per_class

    return dice_per_class(pred, truth, list(range(1, L.NUM_FLARE_IDS)))


def score_bundle(bundle: str | Path, entries: Sequence[dict[str, Any]], *, postprocess: Sequence[str] = ("paper",),
                 out_dir: str | Path | None = None, say: Say = _quiet) -> dict[str, Any]:
    """Run ``flare.runtime.Segmenter`` (CPU) on every entry's image and score it against its complete truth in the
    input grid, once per ``postprocess`` mode. With ``out_dir`` the labels of the first mode are written there
    (``<case>.nii.gz``, as flare-run would). Returns ``{mode: {"summary", "per_case"}, "seconds_per_case"}``."""
    from flare.runtime import Segmenter
    from flare.runtime.app.write import Outputs, write_result
    from flare.train.datalist import case_name

    base = Segmenter(bundle, device="cpu")
    segs = {mode: base.with_options(postprocess=mode) for mode in postprocess}
    per_case: dict[str, list[dict[str, Any]]] = {mode: [] for mode in postprocess}
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for n, entry in enumerate(entries):
        truth = _truth(entry)
        for k, (mode, seg) in enumerate(segs.items()):
            target = Path(out_dir) / f"{case_name(entry)}.nii.gz" if out_dir is not None and k == 0 else None
            seg_result = seg.segment(entry["image"])
            if target is not None:
                write_result(seg_result, Outputs(target))
            dice = case_dice(np.asarray(seg_result.labels), truth)
            per_case[mode].append({"case": case_name(entry), "extent": (entry.get("params") or {}).get("extent"),
                                   "dice": {L.name_of(c): round(v, 4) for c, v in dice.items()}, "_ids": dice})
        say(f"  scored {n + 1}/{len(entries)} {case_name(entry)}")
    out: dict[str, Any] = {"seconds_per_case": round((time.perf_counter() - t0) / max(1, len(entries)), 2)}
    for mode, rows in per_case.items():
        out[mode] = {"summary": summarise([r["_ids"] for r in rows], missing_organs()),
                     "per_case": [{k: v for k, v in r.items() if k != "_ids"} for r in rows]}
    return out


def missing_organs() -> tuple[int, ...]:
    """The organs the phantoms' partial label subset ("organs5_tumor") lacks: what pseudo-labels must add."""
    from flare.train.phantoms import SUBSETS

    return tuple(c for c in ORGANS if c not in SUBSETS["organs5_tumor"])


def scores_key(folders: Sequence[Path], entries: Sequence[dict[str, Any]], modes: Sequence[str]) -> str:
    """What a score depends on: the checkpoints' bytes (locator and folds), the test cases and the modes."""
    import hashlib

    h = hashlib.sha256(json.dumps([[str(e["image"]) for e in entries], list(modes)]).encode())
    for folder in folders:
        h.update(hashlib.sha256((Path(folder) / "model.pt").read_bytes()).digest())
    return h.hexdigest()


def cached_scores(cache: Path, key: str, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``compute()``, or its earlier result stored in ``cache`` under the same ``key`` (a rerun of the proof does
    not score the same models again)."""
    if cache.is_file():
        doc = json.loads(cache.read_text())
        if doc.get("key") == key:
            return doc["result"]
    result = compute()
    cache.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(cache, json.dumps({"key": key, "result": result}) + "\n")
    return result


def score_checkpoints(ckpt_root: Path, folds: Sequence[Path], entries: Sequence[dict[str, Any]], bundle_dir: Path,
                      cache: Path, *, locator: Path | None = None, postprocess: Sequence[str] = ("paper",),
                      out_dir: Path | None = None) -> dict[str, Any]:
    """Export the locator + ``folds`` (:func:`export_view`) to ``bundle_dir`` and :func:`score_bundle` it, unless
    ``cache`` holds the scores of the same checkpoints."""
    loc = locator or ckpt_root / "locator"
    key = scores_key([loc, *folds], entries, postprocess)

    def compute() -> dict[str, Any]:
        bundle = export_view(ckpt_root, folds, bundle_dir, bundle_dir.with_name(f".view-{bundle_dir.name}"),
                             locator=loc)
        return score_bundle(bundle, entries, postprocess=postprocess, out_dir=out_dir)

    return cached_scores(cache, key, compute)


def resolution_ceiling(entries: Sequence[dict[str, Any]], spacing_mm: float) -> dict[str, Any]:
    """Dice of the truth itself resampled to ``spacing_mm`` and back (nearest neighbour, the runtime's grids):
    the most a perfect network trained at that spacing can score."""
    import nibabel as nib
    from flare.runtime.ops.resample import output_shape, resample_nearest

    per_case = []
    for entry in entries:
        img: Any = nib.as_closest_canonical(nib.load(entry.get("label_full") or entry["label"]))
        truth = np.asarray(img.dataobj).astype(np.uint8)
        zooms = [float(v) for v in img.header.get_zooms()[:3]]
        coarse = resample_nearest(truth, output_shape(truth.shape, zooms, [spacing_mm] * 3))
        per_case.append(case_dice(resample_nearest(coarse, truth.shape), truth))
    return summarise(per_case, missing_organs())


# -------------------------------------------------------------------------------------------- bundles and curve
def export_view(ckpt_root: Path, folds: Sequence[Path], out: Path, view: Path, locator: Path | None = None) -> Path:
    """Export a bundle (fp32, verification off) to ``out`` from the locator (``ckpt_root/locator`` unless given)
    and the given fold folders (e.g. the snapshots of one step), linked into the folder ``view`` in the flare-train
    layout."""
    from flare.export import export_bundle

    shutil.rmtree(view, ignore_errors=True)
    view.mkdir(parents=True)
    os.symlink((locator or ckpt_root / "locator").resolve(), view / "locator")
    for k, folder in enumerate(folds):
        os.symlink(Path(folder).resolve(), view / f"fold{k}")
    from flare.runtime.bundle.card import CARD_FILE

    if (ckpt_root / CARD_FILE).is_file():  # the run's model card (data set, recipe) goes into the bundle too
        os.symlink((ckpt_root / CARD_FILE).resolve(), view / CARD_FILE)
    shutil.rmtree(out, ignore_errors=True)
    try:
        return export_bundle(view, out, fp16=False, verify=False, progress=False, command="flare-demo --proof")
    finally:
        shutil.rmtree(view, ignore_errors=True)


def snapshot_steps(ckpt_root: Path, folds: int) -> list[int]:
    """Steps at which every stage-2 fold saved a snapshot (``OUT/foldK/snapshots/stepNNNNNN``)."""
    sets = [{int(p.name[4:]) for p in (ckpt_root / f"fold{k}" / "snapshots").glob("step*")} for k in range(folds)]
    return sorted(set.intersection(*sets)) if sets else []


def learning_curve(ckpt_root: Path, folds: int, entries: Sequence[dict[str, Any]], work: Path, *,
                   stage1_steps: int = 0, skip: set[int] | frozenset[int] = frozenset(),
                   say: Say = _quiet) -> list[dict[str, Any]]:
    """Dice through the runtime (paper post-processing) on ``entries`` of the stage-1 ensemble (at
    ``stage1_steps``, trained on the fully labelled cases only) and of each stage-2 snapshot ensemble (stage 2 starts
    from stage 1's weights, so its steps count on from ``stage1_steps``); steps in ``skip`` (scored elsewhere, e.g.
    the final model) are left out."""
    sets = [(stage1_steps, [ckpt_root / "stage1" / f"fold{k}" for k in range(folds)], "stage 1")]
    sets += [(stage1_steps + step, [ckpt_root / f"fold{k}" / "snapshots" / f"step{step:06d}" for k in range(folds)],
              "stage 2") for step in snapshot_steps(ckpt_root, folds)]
    points = []
    for step, folders, stage in sets:
        if step in skip or not all((f / "model.pt").is_file() for f in folders):
            continue
        cache = ckpt_root / "scores" / f"curve_step{step:06d}.json"
        s = score_checkpoints(ckpt_root, folders, entries, work / "bundle", cache)["paper"]["summary"]
        points.append({"step": step, "stage": stage,
                       **{k: s[k] for k in ("organ_mean", "large6_mean", "tumor", "missing_mean")}})
        say(f"curve: step {step} ({stage}): 13-organ mean {s['organ_mean']}, six large {s['large6_mean']}, "
            f"tumor {s['tumor']}")
    shutil.rmtree(work, ignore_errors=True)
    return points


def plot_curve(points: Sequence[dict[str, Any]], ceiling: dict[str, Any], path: Path, title: str) -> Path:
    """PNG of Dice against steps (13-organ mean, six large organs, tumour) with the resolution ceiling."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from flare.runtime.foundation.atomic import atomic_path

    steps = [p["step"] for p in points]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for key, label, colour in (("organ_mean", "13-organ mean", "C0"), ("large6_mean", "six large organs", "C1"),
                               ("tumor", "tumor", "C3")):
        ax.plot(steps, [p[key] if p[key] is not None else np.nan for p in points], "o-", label=label, color=colour)
    for key, colour in (("organ_mean", "C0"), ("large6_mean", "C1")):
        if ceiling.get(key) is not None:
            ax.axhline(ceiling[key], ls="--", color=colour, lw=1)
    ax.plot([], [], "k--", lw=1, label="resolution ceiling")
    ax.set_xlabel("training steps (stage 1, then stage 2 from its weights)")
    ax.set_ylabel("Dice through flare.runtime")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


# -------------------------------------------------------------------------------------------------- the proof
def make_sets(out: Path, train_cases: int, test_cases: int, size: int = PHANTOM_SIZE, *,
              test_seed: int) -> tuple[Path, Path]:
    """Training phantoms (seed :data:`TRAIN_SEED`, none held out) and a held-out set of ``test_seed`` (the proof's
    :data:`TEST_SEED`, the demo's :data:`HELDOUT_SEED`); in both every 4th case is a head-to-thigh scan. An existing
    set is reused when it is the one asked for (number of cases, seed, size); another one is refused
    (:class:`FlareError`): a resumed run would otherwise train or score on other phantoms than the command says."""
    from flare.train.phantoms import make_phantoms

    train_dir, test_dir = out / "phantoms", out / "test"
    for folder, cases, seed, holdout in ((train_dir, train_cases, TRAIN_SEED, 0),
                                         (test_dir, test_cases, test_seed, test_cases)):
        if (folder / "dataset.json").is_file():
            _check_set(folder, cases, seed, size)
        else:
            make_phantoms(folder, cases, seed, size=size, holdout=holdout, long_every=LONG_EVERY)
    return train_dir, test_dir


def _check_set(folder: Path, cases: int, seed: int, size: int) -> None:
    try:
        doc = json.loads((folder / "dataset.json").read_text())
        have = (len(doc["training"]) + len(doc["testing"]), doc["seed"], doc["size"])
    except (OSError, ValueError, KeyError, TypeError):
        raise FlareError(folder / "dataset.json", "not a phantom set written by flare; use a fresh output folder") \
            from None
    if have != (cases, seed, size):
        raise FlareError(folder, f"holds {have[0]} phantoms (seed {have[1]}, size {have[2]}), this run asks for "
                                 f"{cases} (seed {seed}, size {size}); use a fresh output folder")


def heldout_entries(test_dir: Path) -> list[dict[str, Any]]:
    doc = json.loads((test_dir / "dataset.json").read_text())
    return [{**e, **{k: str(test_dir / e[k]) for k in ("image", "label", "label_full") if e.get(k)}}
            for e in doc["testing"]]


def run_proof(out: str | Path, *, config: str | Path | dict[str, Any] = "proof", folds: int = 1,
              train_cases: int = PROOF_TRAIN_CASES, test_cases: int = PROOF_TEST_CASES, naive: bool = True,
              curve: bool = True, overrides: dict[str, Any] | None = None, size: int = PHANTOM_SIZE,
              threads: int | None = None, say: Say = _quiet, command: str = "") -> dict[str, Any]:
    """The whole proof; returns (and writes to ``OUT/proof.json``) the results, ``OUT/curve.png``, ``OUT/proof.md``.
    The naive run trains in a second process beside the two-stage run, each with ``threads`` torch threads
    (default: the CPUs shared between the processes — on 2 cores 1 each; 2 each made both runs 3-5x slower)."""
    from flare.train.config import load_config
    from flare.train.run import run_all

    threads = threads or max(1, (os.cpu_count() or 2) // (2 if naive else 1))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(config, overrides)
    spacing = float(cfg["spacing_mm"][0])
    t0 = time.perf_counter()
    times: dict[str, float] = {}
    res: dict[str, Any] = {"config": cfg["name"], "folds": folds, "spacing_mm": spacing, "command": command,
                           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                           "load_before": [round(v, 2) for v in os.getloadavg()], "cpus": os.cpu_count()}

    def lap(name: str, t: float) -> None:
        times[name] = round(time.perf_counter() - t, 1)

    t = time.perf_counter()
    train_dir, test_dir = make_sets(out, train_cases, test_cases, size, test_seed=TEST_SEED)
    tests = heldout_entries(test_dir)
    res["test_set"] = {"seed": TEST_SEED, "cases": len(tests), "size": size,
                       "extents": [(e.get("params") or {}).get("extent") for e in tests]}
    res["ceiling"] = {f"{s:g}mm": resolution_ceiling(tests, s) for s in sorted({6.0, spacing, 3.0}, reverse=True)}
    lap("phantoms+ceiling", t)
    say(f"resolution ceiling at {spacing:g} mm (13-organ mean): {res['ceiling'][f'{spacing:g}mm']['organ_mean']}")
    t = time.perf_counter()
    say(f"two-stage training ({folds} fold{'s' if folds > 1 else ''}, config {cfg['name']}) -> {out / 'two_stage'}"
        + (f"; naive training (partial labels as given, as many steps) -> {out / 'naive'} at the same time, in a "
           f"second process ({threads} torch thread(s) each)" if naive else ""))
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        # the naive run needs no locator of its own: the two-stage run's is trained on the same cases and seed
        naive_job = pool.submit(run_all, train_dir, out / "naive", cfg, folds, naive=True, locator=False, quiet=True,
                                threads=threads) if naive else None
        res["two_stage_training"] = _slim_summary(run_all(train_dir, out / "two_stage", cfg, folds, quiet=True,
                                                          threads=threads))
        if naive_job is not None:
            res["naive_training"] = _slim_summary(naive_job.result())
    lap("train", t)
    t = time.perf_counter()
    stage1_steps = int(cfg["train"]["epochs"]) * int(cfg["train"]["steps_per_epoch"])
    total = stage1_steps + int(cfg["stage2"]["epochs"]) * int(cfg["train"]["steps_per_epoch"])
    say(f"scoring through flare.runtime on {len(tests)} unseen phantoms, in parallel processes: two-stage (paper and "
        "strict post-processing)" + (", naive (paper)" if naive else "") + (", the learning curve" if curve else ""))
    jobs = 1 + int(naive) + int(curve)
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        scoring = {name: pool.submit(score_checkpoints, out / name, [out / name / f"fold{k}" for k in range(folds)],
                                     tests, out / f"bundle_{name}", out / name / "scores" / "final.json",
                                     locator=out / "two_stage" / "locator", out_dir=out / f"seg_{name}",
                                     postprocess=("paper", "strict") if name == "two_stage" else ("paper",))
                   for name in (("two_stage", "naive") if naive else ("two_stage",))}  # naive: the paper's rules
        curve_job = pool.submit(learning_curve, out / "two_stage", folds, tests, out / ".curve",
                                stage1_steps=stage1_steps, skip={total}) if curve else None
        for name, job in scoring.items():
            res[name] = job.result()
        res["curve"] = curve_job.result() if curve_job is not None else []
    lap("score", t)
    if curve:
        final = res["two_stage"]["paper"]["summary"]
        res["curve"].append({"step": total, "stage": "stage 2 (final)",
                             **{k: final[k] for k in ("organ_mean", "large6_mean", "tumor", "missing_mean")}})
        for point in res["curve"]:
            say(f"curve: step {point['step']} ({point['stage']}): 13-organ mean {point['organ_mean']}, six large "
                f"{point['large6_mean']}, tumor {point['tumor']}")
        plot_curve(res["curve"], res["ceiling"][f"{spacing:g}mm"], out / "curve.png",
                   f"tiny SegResNetDS at {spacing:g} mm, {folds} fold(s), two-stage; "
                   f"{len(tests)} unseen phantoms (seed {TEST_SEED})")
    res["spread"] = spread(res)
    res["seconds"] = {**times, "total": round(time.perf_counter() - t0, 1)}
    res["load_after"] = [round(v, 2) for v in os.getloadavg()]
    write_text_atomic(out / "proof.json", json.dumps(res, indent=1) + "\n")
    write_text_atomic(out / "proof.md", proof_markdown(res))
    return res


def spread(res: dict[str, Any], rounds: int = 2000, seed: int = 0) -> dict[str, Any]:
    """How much the headline figures depend on which test phantoms were drawn: 95 % intervals of a bootstrap over
    the test cases (resampled with replacement; each resample scored as the headline is, by :func:`summarise`) for
    the two-stage tumour Dice and, paired case by case, for two-stage minus naive on the missed organs; and in
    how many cases the two-stage model scores higher there. Training noise (another seed, another snapshot) is
    not in it."""
    def ids(rows: Sequence[dict[str, Any]]) -> list[dict[int, float]]:
        return [{L.label_named(n).id: v for n, v in r["dice"].items()} for r in rows]

    two = ids(res["two_stage"]["paper"]["per_case"])
    naive = ids(res["naive"]["paper"]["per_case"]) if "naive" in res else None
    missing = missing_organs()
    rng = np.random.default_rng(seed)
    tumour, gap = [], []
    for _ in range(rounds):
        pick = rng.integers(len(two), size=len(two))
        s2 = summarise([two[i] for i in pick], missing)
        if s2["tumor"] is not None:
            tumour.append(s2["tumor"])
        if naive is not None:
            sn = summarise([naive[i] for i in pick], missing)
            if s2.get("missing_mean") is not None and sn.get("missing_mean") is not None:
                gap.append(s2["missing_mean"] - sn["missing_mean"])

    def ci(v: list[float]) -> list[float] | None:
        return [round(float(q), 3) for q in np.percentile(v, [2.5, 97.5])] if v else None

    out: dict[str, Any] = {"rounds": rounds, "tumor_ci95": ci(tumour)}
    if naive is not None:
        pairs = [(summarise([a], missing)["missing_mean"], summarise([b], missing)["missing_mean"])
                 for a, b in zip(two, naive, strict=True)]
        pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
        out["missing_gap_ci95"] = ci(gap)
        out["missing_cases_two_stage_higher"] = [sum(a > b for a, b in pairs), len(pairs)]
    return out


def _slim_summary(summary: dict[str, Any]) -> dict[str, Any]:
    keep = ("config", "folds", "naive", "n_training", "n_fully_labelled", "n_pseudolabelled", "seconds", "wall_s")
    return {k: summary[k] for k in keep if k in summary}


def _f(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def proof_markdown(res: dict[str, Any]) -> str:
    """The results table (headline means, per class, ablation, post-processing, curve) as Markdown."""
    sp = f"{res['spacing_mm']:g}mm"
    ceil = res["ceiling"][sp]
    cols = [(m, pp) for m in ("two_stage", "naive") for pp in ("paper", "strict") if pp in res.get(m, {})]
    head = "| | ceiling " + sp + " | " + " | ".join(f"{m.replace('_', '-')} ({pp})" for m, pp in cols) + " |"
    lines = [head, "|---" * (len(cols) + 2) + "|"]
    rows = [("13-organ mean", "organ_mean"), ("six large organs", "large6_mean"), ("tumor", "tumor"),
            ("organs the partial labels miss", "missing_mean")]
    for label, key in rows:
        vals = [_f(res[m][pp]["summary"].get(key)) for m, pp in cols]
        lines.append(f"| **{label}** | {_f(ceil.get(key))} | " + " | ".join(vals) + " |")
    for c in range(1, L.NUM_FLARE_IDS):
        name = L.name_of(c)
        vals = [_f(res[m][pp]["summary"]["per_class"].get(name)) for m, pp in cols]
        lines.append(f"| {name} | {_f(ceil['per_class'].get(name))} | " + " | ".join(vals) + " |")
    out = "\n".join(lines) + "\n"
    draw = res.get("spread") or {}
    if draw.get("tumor_ci95") or draw.get("missing_gap_ci95"):
        bits = []
        if draw.get("tumor_ci95"):
            bits.append("tumor (two-stage) {:.3f}–{:.3f}".format(*draw["tumor_ci95"]))
        if draw.get("missing_gap_ci95"):
            k, n = draw["missing_cases_two_stage_higher"]
            bits.append("two-stage minus naive on the missed organs {:+.3f} to {:+.3f} (two-stage higher in {} of {} "
                        "cases)".format(*draw["missing_gap_ci95"], k, n))
        out += (f"\nOver which test phantoms were drawn (95 % bootstrap over the cases, {draw['rounds']} rounds; training "
                "noise not included): " + "; ".join(bits) + ".\n")
    if "strict" in res.get("two_stage", {}):
        out += "\n" + postprocess_markdown(res["two_stage"]["paper"]["per_case"], res["two_stage"]["strict"]["per_case"])
    if res.get("curve"):
        out += "\nLearning curve (stage 2, through the runtime, paper post-processing):\n\n" \
               "| step | 13-organ mean | six large | tumor | missing organs |\n|---|---|---|---|---|\n"
        out += "".join(f"| {p['step']} | {_f(p['organ_mean'])} | {_f(p['large6_mean'])} | {_f(p['tumor'])} | "
                       f"{_f(p['missing_mean'])} |\n" for p in res["curve"])
    return out


def postprocess_markdown(paper: Sequence[dict[str, Any]], strict: Sequence[dict[str, Any]]) -> str:
    """Per test case: 13-organ mean with the paper's rules and with ``strict``, and the classes where they differ by
    more than 0.02 (a remote false organ that wins the paper's z-run shows up here)."""
    lines = ["Post-processing per case (two-stage model): the paper's rules vs `--postprocess strict`:", "",
             "| case | extent | 13-organ mean (paper) | (strict) | classes that differ (paper → strict) |",
             "|---|---|---|---|---|"]
    for a, b in zip(paper, strict, strict=True):
        organs = [L.name_of(c) for c in ORGANS]
        ma = [a["dice"][n] for n in organs if n in a["dice"]]
        mb = [b["dice"][n] for n in organs if n in b["dice"]]
        diff = ", ".join(f"{n} {a['dice'][n]:.2f} → {b['dice'][n]:.2f}" for n in a["dice"]
                         if n in b["dice"] and abs(a["dice"][n] - b["dice"][n]) > 0.02)
        lines.append(f"| {a['case']} | {a.get('extent')} | {_f(float(np.mean(ma)) if ma else None)} | "
                     f"{_f(float(np.mean(mb)) if mb else None)} | {diff or '—'} |")
    return "\n".join(lines) + "\n"
