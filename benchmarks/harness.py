"""The benchmark harness behind ``flare-bench``: cold and warm runs of the runtime, the MONAI peer, the report.

Per case:

- **cold**: a fresh ``flare-run`` process (model load included — how FLARE times a container), wall time from
  process start to exit, its JSON report (per-stage times, RSS peak), memory sampled from outside; its host RSS
  peak is the child's own ``VmHWM`` from the report (exact, not inherited from this process), the 20 ms samples
  stay as ``rss_sampled_peak_mb``;
- **warm**: :class:`flare.runtime.Segmenter` loaded once, ``repeats`` runs per case (no output file written);
- **reference** (optional): the MONAI/PyTorch pipeline in ``whole-image-nearest`` mode on the same weights (the checkpoints
  behind the bundle), loaded once, ``reference_repeats`` runs per case; Dice per class against the runtime's
  output.

GPU memory is sampled with NVML every 20 ms (device total − free, and the watched process), host RSS from
``/proc``. Everything lands in ``report.json``, ``report.md`` and one PNG of memory over time per backend.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flare.runtime.bundle.manifest import Bundle, load_bundle
from flare.runtime.foundation.errors import FlareError, InputError
from flare.runtime.inference.engines import CPU_ENGINES

from .cases import resolve_cases
from .environment import environment
from .metrics import dice_per_class, ratio, spread
from .sampler import MemorySampler, MemoryTrace

FLARE_TIME_S = 15.0
FLARE_GPU_MB = 4096.0


@dataclass
class Run:
    """One measured run: wall seconds, the pipeline's report (stages) and the memory trace."""

    wall_s: float
    trace: MemoryTrace
    report: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    own_process: bool = False  # a cold run: the report's rss_peak_mb is the child's own VmHWM

    def summary(self) -> dict[str, Any]:
        mem = self.trace.summary()
        mem["rss_sampled_peak_mb"] = mem["rss_peak_mb"]
        if self.own_process and self.report.get("rss_peak_mb") is not None:
            mem["rss_peak_mb"] = self.report["rss_peak_mb"]  # exact peak (VmHWM), not a 20 ms sample
        return {"wall_s": self.wall_s, "error": self.error, "stages": self.report.get("stages"),
                "report_rss_peak_mb": self.report.get("rss_peak_mb"), "fallbacks": run_fallbacks(self.report),
                "gpu_plan": self.report.get("gpu"), "crop": self.report.get("crop"),
                "tiles": self.report.get("tiles"), **mem}


def flare_run_command() -> list[str]:
    """``flare-run`` when installed as a console script, else ``python -m flare.runtime.app.cli``."""
    exe = shutil.which("flare-run")
    return [exe] if exe else [sys.executable, "-m", "flare.runtime.app.cli"]


def variant(key: str | None) -> tuple[str | None, str]:
    """A benchmark variant's (precision, engine) from its key: ``fp32``, ``int8`` (ONNX Runtime), ``fp32@openvino``
    (:func:`variant_keys`); None: flare-run's defaults."""
    if key is None:
        return None, CPU_ENGINES[0]
    precision, _, engine = key.partition("@")
    return precision or None, engine or CPU_ENGINES[0]


def variant_keys(precisions: Sequence[str], engines: Sequence[str], cpu_default: str = "fp32") -> list[str | None]:
    """The variants run side by side: every precision on every engine (ONNX Runtime's keys are the bare precision,
    the others' ``PRECISION@ENGINE``), leaving out what an engine cannot run (OpenVINO: fp32 only; an engine left
    with nothing to run is an InputError); ``[None]`` (flare-run's defaults) when neither is given. Without
    precisions but with several engines, ONNX Runtime runs ``cpu_default`` (flare-run's CPU choice for the bundle),
    so that every variant has a name."""
    keys: list[str | None] = []
    for engine in engines or [CPU_ENGINES[0]]:
        if engine == CPU_ENGINES[0]:
            keys += [*precisions] or [cpu_default if len(engines) > 1 else None]
        elif precisions and "fp32" not in precisions:
            raise InputError(None, f"--engine {engine} runs fp32 only; add --precision fp32")
        else:
            keys.append(f"fp32@{engine}")
    return keys


def cold_run(case: Path, bundle: Path, device: str, work: Path, precision: str | None = None,
             folds: int | None = None, engine: str = "onnxruntime") -> Run:
    """One fresh ``flare-run`` process on ``case``; memory of the child sampled from here."""
    out, rep = work / "cold_seg.nii.gz", work / "cold_report.json"
    for stale in (out, rep):
        stale.unlink(missing_ok=True)
    cmd = flare_run_command() + [str(case), "-o", str(out), "--bundle", str(bundle), "--device", device,
                                 "--report", str(rep), "--quiet"]
    cmd += ["--precision", precision] if precision else []
    cmd += ["--folds", str(folds)] if folds else []
    cmd += ["--engine", engine] if engine != CPU_ENGINES[0] else []
    child: list[int] = []
    with MemorySampler(pids=lambda: child) as sampler:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        child.append(proc.pid)
        _, err = proc.communicate()
        wall = time.perf_counter() - t0
    if proc.returncode != 0:
        line = (err or "").strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
        return Run(wall, sampler.trace, error=line[0])
    return Run(wall, sampler.trace, json.loads(rep.read_text()), own_process=True)


def warm_run(segmenter: Any, case: Path) -> tuple[Run, np.ndarray]:
    """One ``Segmenter.segment`` in this process (models already loaded)."""
    with MemorySampler() as sampler:
        t0 = time.perf_counter()
        result = segmenter.segment(case)
        wall = time.perf_counter() - t0
    return Run(wall, sampler.trace, result.report.to_json()), result.labels


def reference_run(pipeline: Any, case: Path) -> tuple[Run, np.ndarray]:
    """One MONAI reference run in this process (networks already loaded)."""
    with MemorySampler() as sampler:
        t0 = time.perf_counter()
        res = pipeline.segment(case)
        wall = time.perf_counter() - t0
    return Run(wall, sampler.trace, res.report), res.labels


def _stats(runs: list[Run], key: str) -> dict[str, Any]:
    return spread([r.summary().get(key) for r in runs if r.error is None])


def _stage_medians(runs: list[Run]) -> dict[str, float | None]:
    names: list[str] = []
    for r in runs:
        for name in (r.report.get("stages") or {}):
            if name not in names:
                names.append(name)
    return {n: spread([(r.report.get("stages") or {}).get(n) for r in runs])["median"] for n in names}


def run_fallbacks(report: dict[str, Any]) -> list[str]:
    """Every fallback one run's report records: the runtime's own list (``fallbacks``, when it keeps one), the
    memory plan's (``gpu.fallback``: smaller tiles, the CPU after an out-of-memory error)."""
    found = [str(f) for f in (report.get("fallbacks") or [])]
    found += [f"gpu: {f}" for f in ((report.get("gpu") or {}).get("fallback") or [])]
    return list(dict.fromkeys(found))


def summarise_backend(runs: list[Run], load_s: float | None = None) -> dict[str, Any]:
    """Median/min/max of wall time, peaks and areas; per-stage medians; errors; every fallback of every run."""
    return {
        "runs": len(runs),
        "errors": [r.error for r in runs if r.error],
        "fallbacks": list(dict.fromkeys(f for r in runs for f in run_fallbacks(r.report))),
        "load_s": load_s,
        "wall_s": _stats(runs, "wall_s"),
        "gpu_device_peak_mb": _stats(runs, "gpu_device_peak_mb"),
        "gpu_device_mbs": _stats(runs, "gpu_device_mbs"),
        "gpu_process_peak_mb": _stats(runs, "gpu_process_peak_mb"),
        "gpu_process_mbs": _stats(runs, "gpu_process_mbs"),
        "rss_peak_mb": _stats(runs, "rss_peak_mb"),
        "stages": _stage_medians([r for r in runs if r.error is None]),
        "samples": [r.summary() for r in runs],
    }


def judge(case: dict[str, Any]) -> dict[str, Any]:
    """Pass/fail of the runtime against FLARE's 15 s (cold wall, else warm) and 4 GB (GPU device peak)."""
    cold, warm = case.get("cold") or {}, case.get("warm") or {}
    t = (cold.get("wall_s") or {}).get("median") or (warm.get("wall_s") or {}).get("median")
    gpu = (cold.get("gpu_device_peak_mb") or {}).get("median") or (warm.get("gpu_device_peak_mb") or {}).get("median")
    own = (cold.get("gpu_process_peak_mb") or {}).get("median") or (warm.get("gpu_process_peak_mb") or {}).get("median")
    return {"time_s": t, "time_ok": None if t is None else t <= FLARE_TIME_S,
            "gpu_mb": gpu, "gpu_ok": None if gpu is None else gpu <= FLARE_GPU_MB,
            "gpu_process_mb": own}


def compare(case: dict[str, Any]) -> dict[str, Any]:
    """Runtime (warm, same folds as the reference) over reference ratios of time, GPU peak, GPU area, host RSS."""
    warm, ref = case.get("warm_same_folds") or case.get("warm") or {}, case.get("reference") or {}

    def med(d: dict[str, Any], key: str) -> float | None:
        return (d.get(key) or {}).get("median")

    return {k: ratio(med(warm, k), med(ref, k))
            for k in ("wall_s", "gpu_device_peak_mb", "gpu_device_mbs", "gpu_process_peak_mb", "rss_peak_mb")}


Progress = Callable[[str], None]
Record = Callable[[str, Path, Run], None]  # (phase, case, run): called as each run ends


def run_recorder(path: Path | None, bundle: Path) -> Record:
    """Append one JSON line per finished run to ``path`` (a timeout or crash later keeps what was measured)."""

    def record(phase: str, case: Path, run: Run) -> None:
        if path is None:
            return
        line = {"stage": "bench", "phase": phase, "case": case.name, "bundle": str(bundle), **run.summary()}
        with open(path, "a") as f:
            f.write(json.dumps(line, default=_jsonable) + "\n")

    return record


def _jsonable(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else str(value)


def run_benchmark(bundle: str | Path, cases: str | Path | list[str | Path] = "synthetic", reference: bool = True,
                  out_dir: str | Path = "bench-out", repeats: int = 3, device: str = "auto", *,
                  cold: int = 1, reference_repeats: int = 1, reference_mode: str = "whole-image-nearest",
                  reference_cases: int | None = None, reference_folds: int | None = None,
                  checkpoints: str | Path | None = None, cache_dir: str | Path | None = None,
                  quiet: bool = False, command: str | None = None, precisions: Sequence[str] = (),
                  folds: int | None = None, runs_log: str | Path | None = None,
                  engines: Sequence[str] = ()) -> dict[str, Any]:
    """Benchmark ``bundle`` on ``cases`` and write ``report.json``, ``report.md`` and PNGs into ``out_dir``.

    Returns the report dictionary. ``repeats`` warm runs per case, ``cold`` fresh-process runs per case,
    ``reference_repeats`` MONAI reference runs per case (0 or ``reference=False`` skips the peer) on the first
    ``reference_cases`` cases with the first ``reference_folds`` folds. Both default to everything on a GPU and to
    1 on the CPU, where PyTorch's 3-D convolutions make the Auto3DSeg-like peer far too slow for whole FLARE-size
    CTs (measured: 0.2-1.1 s per 32^3 tile of the tiny demo network on 2 cores against ~0.05 s in ONNX Runtime).
    With fewer folds the runtime is run once more with the same folds for the ratios and the Dice.

    ``precisions`` (e.g. fp32, int8) runs the cold and warm phases once per precision, interleaved run by run (so
    that the load of a shared machine falls on each alike), into ``case["by_precision"]``, with the labels of each
    later precision compared with the first's (voxel agreement, per-class Dice); ``cold``/``warm`` are then the
    first precision's. ``engines`` (onnxruntime, openvino) does the same per CPU engine (:func:`variant_keys`:
    keys ``fp32``, ``int8``, ``fp32@openvino``). ``folds`` runs the runtime with the first N folds only.
    ``runs_log``: a JSON-lines file that gets one line per run as soon as it ends (the GPU check's results file).
    """
    from .report import write_reports

    if repeats < 1 or cold < 0 or reference_repeats < 0:
        raise ValueError("repeats must be >= 1, cold and reference_repeats >= 0")
    b: Bundle = load_bundle(bundle)
    out = Path(out_dir)
    case_paths = resolve_cases(cases if isinstance(cases, (list, tuple)) else str(cases),
                               Path(cache_dir) if cache_dir else None, progress=not quiet)
    if runs_log:  # appended to, so it may exist; but never onto what the benchmark reads (a CT, the bundle)
        from flare.runtime.app.output_guard import check_outputs

        check_outputs([b.root, *case_paths, *([Path(checkpoints)] if checkpoints else [])], {"runs log": runs_log})
    from flare.runtime.inference.engines import default_precision
    from flare.runtime.pipeline.segmenter import check_folds

    check_folds(b.root, folds, len(b.folds))
    variants = variant_keys(precisions, engines, default_precision(b.folds[0], "cpu"))
    out.mkdir(parents=True, exist_ok=True)  # after every refusal: a refused run leaves no empty folder
    env = environment(device)
    runs_ref = reference_repeats if reference else 0
    on_cpu = _on_cpu(device)
    n_ref_cases = min(len(case_paths), reference_cases or (1 if on_cpu else len(case_paths)))
    n_ref_folds = min(len(b.folds), reference_folds or (1 if on_cpu else len(b.folds)))
    total = len(case_paths) * (cold + repeats) + n_ref_cases * (runs_ref + (n_ref_folds < len(b.folds)))
    results: list[dict[str, Any]] = [{"case": str(p), "name": p.name} for p in case_paths]
    keep: dict[str, dict[str, MemoryTrace]] = {"runtime": {}, "reference": {}}
    total += len(case_paths) * (cold + repeats) * (len(variants) - 1)
    rec = run_recorder(Path(runs_log) if runs_log else None, b.root)
    with _progress(total, quiet) as step:
        _cold_phase(case_paths, b, device, cold, results, keep, step, rec, variants, folds)
        labels = _warm_phase(case_paths, b, device, repeats, results, keep, step, rec, variants, folds)
        if runs_ref:
            if n_ref_folds < len(b.folds):
                labels = _same_folds_phase(case_paths[:n_ref_cases], b, device, n_ref_folds, results, step, rec)
            _reference_phase(case_paths[:n_ref_cases], b, device, runs_ref, reference_mode, n_ref_folds, checkpoints,
                             results, labels, keep, step, rec)
    for case in results:
        case["flare"] = judge(case)
        case["ratios"] = compare(case) if "reference" in case else None
    report = {"format": "flare-bench", "version": 1, "command": command, "bundle": str(b.root),
              "device": device, "precisions": [v for v in variants if v is not None], "engines": list(engines), "folds": folds, "repeats": {"cold": cold, "warm": repeats, "reference": runs_ref},
              "reference_mode": reference_mode if runs_ref else None,
              "reference_scope": {"cases": n_ref_cases, "folds": n_ref_folds, "bundle_folds": len(b.folds)}
              if runs_ref else None, "targets": {"time_s": FLARE_TIME_S,
              "gpu_mb": FLARE_GPU_MB}, "environment": env, "cases": results}
    write_reports(report, keep, out)
    return report


class _progress:
    """Rich progress bar over all runs (a no-op when quiet)."""

    def __init__(self, total: int, quiet: bool) -> None:
        self.total, self.quiet = total, quiet
        self._p: Any = None
        self._task: Any = None

    def __enter__(self) -> Progress:
        if self.quiet:
            return lambda label: None
        from rich.progress import BarColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as RichProgress

        self._p = RichProgress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                               TimeElapsedColumn(), transient=False)
        self._p.start()
        self._task = self._p.add_task("flare-bench", total=self.total)

        def step(label: str) -> None:
            self._p.update(self._task, advance=1, description=label)

        return step

    def __exit__(self, *exc: object) -> None:
        if self._p is not None:
            self._p.stop()


def _store(res: dict[str, Any], phase: str, variants: list[str | None], runs: dict[str | None, list[Run]],
           load_s: dict[str | None, float] | None = None) -> None:
    """The phase's summary per variant: ``res[phase]`` is the first's, ``res["by_precision"][p][phase]`` each."""
    for v in variants:
        summary = summarise_backend(runs[v], None if load_s is None else load_s[v])
        if phase == "warm":
            summary["backend"] = runs[v][-1].report.get("backend")
        if v == variants[0]:
            res[phase] = summary
        if v is not None:
            res.setdefault("by_precision", {}).setdefault(v, {})[phase] = summary


def _cold_phase(cases: list[Path], b: Bundle, device: str, n: int, results: list[dict[str, Any]],
                keep: dict[str, dict[str, MemoryTrace]], step: Progress, record: Record,
                variants: list[str | None],
                folds: int | None) -> None:
    if n == 0:
        return
    with tempfile.TemporaryDirectory(prefix="flare-bench-") as tmp:
        for path, res in zip(cases, results):
            runs: dict[str | None, list[Run]] = {v: [] for v in variants}
            for _ in range(n):
                for v in variants:  # interleaved
                    precision, engine = variant(v)
                    runs[v].append(cold_run(path, b.root, device, Path(tmp), precision, folds, engine))
                    record("cold", path, runs[v][-1])
                    step(f"cold {path.name}" + (f" {v}" if v else ""))
            _store(res, "cold", variants, runs)
            keep["runtime"][path.name] = runs[variants[0]][-1].trace


def _warm_phase(cases: list[Path], b: Bundle, device: str, n: int, results: list[dict[str, Any]],
                keep: dict[str, dict[str, MemoryTrace]], step: Progress, record: Record,
                variants: list[str | None],
                folds: int | None) -> dict[str, np.ndarray]:
    from flare.runtime.pipeline.segmenter import Segmenter

    segs: dict[str | None, Segmenter] = {}
    for v in variants:  # one at a time: a Segmenter builds its folds in the background, the next would compete
        segs[v] = Segmenter(b, device=device, precision=variant(v)[0], folds=folds, engine=variant(v)[1])
        segs[v].engines  # noqa: B018 - waits for the folds
    labels: dict[str | None, dict[str, np.ndarray]] = {v: {} for v in variants}
    for path, res in zip(cases, results):
        runs: dict[str | None, list[Run]] = {v: [] for v in variants}
        for _ in range(n):
            for v in variants:  # interleaved
                try:
                    run, labels[v][path.name] = warm_run(segs[v], path)
                except FlareError as err:
                    run = Run(0.0, MemoryTrace(False, "not run"), error=str(err))
                runs[v].append(run)
                record("warm", path, run)
                step(f"warm {path.name}" + (f" {v}" if v else ""))
        _store(res, "warm", variants, runs, {v: segs[v].load_s for v in variants})
        first = labels[variants[0]].get(path.name)
        for v in variants[1:]:
            other = labels[v].get(path.name)
            if first is not None and other is not None:
                res["by_precision"][v]["vs_" + str(variants[0])] = {
                    "voxel_agreement": round(float((first == other).mean()), 6),
                    "dice": {str(k): d for k, d in dice_per_class(other, first).items()}}
        keep["runtime"].setdefault(path.name, runs[variants[0]][-1].trace)
    return labels[variants[0]]


def _on_cpu(device: str) -> bool:
    """Whether the runtime will run on the CPU, answered **without creating a CUDA context** in this process (no
    CuPy, no device query: ONNX Runtime's provider list only). The cold runs come first and a context here would
    add its 0.3-0.5 GB to every device-wide peak they measure; the children answer for themselves."""
    from flare.runtime.inference.device import ort_providers

    return device == "cpu" or (device == "auto" and "CUDAExecutionProvider" not in ort_providers())


def _same_folds_phase(cases: list[Path], b: Bundle, device: str, folds: int, results: list[dict[str, Any]],
                      step: Progress, record: Record) -> dict[str, np.ndarray]:
    """One warm runtime run per case with only the first ``folds`` folds: the reference's counterpart."""
    from flare.runtime.pipeline.segmenter import Segmenter

    seg = Segmenter(b, device=device, folds=folds)
    labels: dict[str, np.ndarray] = {}
    for path, res in zip(cases, results):
        run, labels[path.name] = warm_run(seg, path)
        record("warm_same_folds", path, run)
        res["warm_same_folds"] = summarise_backend([run], seg.load_s)
        res["warm_same_folds"]["folds"] = folds
        step(f"runtime {folds} fold(s) {path.name}")
    return labels


def _reference_phase(cases: list[Path], b: Bundle, device: str, n: int, mode: str, folds: int,
                     checkpoints: str | Path | None, results: list[dict[str, Any]], labels: dict[str, np.ndarray],
                     keep: dict[str, dict[str, MemoryTrace]], step: Progress, record: Record) -> None:
    from .reference import ReferencePipeline

    pipe = ReferencePipeline(b, checkpoints, device=device, mode=mode, folds=folds)
    for path, res in zip(cases, results):
        runs, ref_labels = [], None
        for _ in range(n):
            run, ref_labels = reference_run(pipe, path)
            runs.append(run)
            record("reference", path, run)
            step(f"reference {path.name}")
        res["reference"] = summarise_backend(runs, pipe.load_s)
        res["reference"]["backend"] = runs[-1].report.get("backend")
        keep["reference"][path.name] = runs[-1].trace
        ours = labels.get(path.name)
        if ours is not None and ref_labels is not None:
            if ours.shape != ref_labels.shape:
                raise InputError(path, f"runtime and reference outputs differ in shape {ours.shape} vs "
                                       f"{ref_labels.shape}")
            res["dice"] = {str(k): v for k, v in dice_per_class(ours, ref_labels).items()}
