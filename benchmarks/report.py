"""``report.json``, ``report.md`` and memory-over-time PNGs of a ``flare-bench`` run (atomic writes)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flare.runtime.foundation.atomic import atomic_path, write_text_atomic
from flare.runtime.foundation.labels import LABELS

from .sampler import MemoryTrace

STAGE_ORDER = ("read", "locate", "crop_resample", "infer", "postprocess", "restore", "write")


def fmt(value: Any, digits: int = 2) -> str:
    """Numbers with ``digits`` decimals, booleans as pass/FAIL, None as "n/a"."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "pass" if value else "FAIL"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _med(d: dict[str, Any] | None, key: str) -> Any:
    return ((d or {}).get(key) or {}).get("median")


def _range(d: dict[str, Any] | None, key: str, digits: int = 2) -> str:
    s = (d or {}).get(key) or {}
    if s.get("median") is None:
        return "n/a"
    if s.get("n", 0) > 1:
        return f"{fmt(s['median'], digits)} ({fmt(s['min'], digits)}–{fmt(s['max'], digits)})"
    return fmt(s["median"], digits)


def _dice_text(dice: dict[str, float] | None) -> str:
    if not dice:
        return "n/a"
    vals = list(dice.values())
    worst = min(dice, key=lambda k: dice[k])
    return f"{sum(vals) / len(vals):.3f} (min {dice[worst]:.3f} {LABELS[int(worst)].short})"


def _precision_lines(report: dict[str, Any]) -> list[str]:
    """The side-by-side table of ``--precision a --precision b`` runs (interleaved), per case and stage."""
    if not report.get("precisions"):
        return []
    first = report["precisions"][0]
    lines = ["", (f"## Side by side ({', '.join(report['precisions'])}; folds: "
                 f"{report.get('folds') or 'all'})"), "",
             f"Interleaved runs; stages are warm medians (s). Agreement and Dice: labels against {first}'s (warm).",
             "", "| case | precision | cold wall s | warm s | host RSS peak MB | " + " | ".join(STAGE_ORDER)
             + f" | model load s | agreement vs {first} | Dice vs {first} |",
             "|---|---|---|---|---|" + "---|" * (len(STAGE_ORDER) + 3)]
    for c in report["cases"]:
        for p, d in (c.get("by_precision") or {}).items():
            cold, warm = d.get("cold"), d.get("warm") or {}
            st, vs = warm.get("stages") or {}, d.get(f"vs_{first}") or {}
            mem = cold if cold else warm
            lines.append(f"| {c['name']} | {p} | {_range(cold, 'wall_s')} | {_range(warm, 'wall_s')} | "
                         f"{_range(mem, 'rss_peak_mb', 0)} | " + " | ".join(fmt(st.get(s), 3) for s in STAGE_ORDER)
                         + f" | {fmt(warm.get('load_s'), 3)} | {fmt(vs.get('voxel_agreement'), 5)} | "
                         f"{_dice_text(vs.get('dice')) if vs else 'n/a'} |")
    return lines


def run_errors(report: dict[str, Any]) -> list[tuple[str, str]]:
    """(case name, error) of every cold, warm or reference run that failed."""
    return [(c["name"], e) for c in report["cases"] for k in ("cold", "warm", "reference")
            for e in ((c.get(k) or {}).get("errors") or [])]


def markdown(report: dict[str, Any]) -> str:
    """The human-readable report."""
    env = report["environment"]
    gpu = env["gpu"]
    gpu_line = (f"{gpu['name']}, {gpu['total_mb']} MB, driver {gpu['driver']}" if gpu.get("available")
                else f"none ({gpu.get('reason', 'n/a')}) — GPU columns are n/a")
    rep = report["repeats"]
    lines = [
        "# flare-bench report", "",
        f"- date: {env['date']}; host `{env['host']}`, {env['os']}",
        f"- CPU: {env['cpu']}, {env['cores']} cores, {fmt(env['ram_gb'], 1)} GB RAM",
        f"- GPU: {gpu_line}",
        f"- device: `{report['device']}`; ONNX Runtime providers: {', '.join(env['ort_providers']) or 'n/a'}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()),
        f"- bundle: `{report['bundle']}`",
        (f"- runs per case: {rep['cold']} cold (fresh `flare-run` process, model load included), {rep['warm']} warm "
         f"(models loaded once), {rep['reference']} MONAI reference ({report.get('reference_mode') or 'off'})"),
        f"- command: `{report.get('command') or 'n/a'}`",
        (f"- targets: {fmt(report['targets']['time_s'], 0)} s per case (cold wall time), "
         f"{fmt(report['targets']['gpu_mb'], 0)} MB GPU (device total − free, sampled every 20 ms)"), "",
        "## Runtime per case", "",
        "Times in s, memory in MB, area in MB·s: median (min–max) over the runs.", "",
        "| case | cold wall s | warm s | GPU peak MB | GPU MB·s | GPU MB (process) | host RSS peak MB | ≤ 15 s | ≤ 4 GB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in report["cases"]:
        cold, warm, judged = c.get("cold"), c.get("warm"), c["flare"]
        mem = cold if cold else warm
        lines.append(f"| {c['name']} | {_range(cold, 'wall_s')} | {_range(warm, 'wall_s')} | "
                     f"{_range(mem, 'gpu_device_peak_mb', 0)} | {_range(mem, 'gpu_device_mbs', 0)} | "
                     f"{_range(mem, 'gpu_process_peak_mb', 0)} | {_range(mem, 'rss_peak_mb', 0)} | "
                     f"{fmt(judged['time_ok'])} | {fmt(judged['gpu_ok'])} |")
    lines += ["", "## Runtime stages (warm, median s)", "",
              "| case | " + " | ".join(STAGE_ORDER) + " | model load s |",
              "|---|" + "---|" * (len(STAGE_ORDER) + 1)]
    for c in report["cases"]:
        st = (c.get("warm") or {}).get("stages") or {}
        lines.append(f"| {c['name']} | " + " | ".join(fmt(st.get(s), 3) for s in STAGE_ORDER)
                     + f" | {fmt((c.get('warm') or {}).get('load_s'), 3)} |")
    lines += _precision_lines(report)
    if any("reference" in c for c in report["cases"]):
        scope = report.get("reference_scope") or {}
        lines += ["", f"## MONAI/PyTorch reference ({report.get('reference_mode')}) on the same weights", "",
                  (f"Reference on {scope.get('cases')} case(s) with {scope.get('folds')} of "
                   f"{scope.get('bundle_folds')} fold(s); the runtime is compared with the same folds (a separate warm "
                   "run when fewer than all). Ratios are runtime / reference: below 1 means the runtime is faster or "
                   "lighter. Dice: mean over classes present in either output (worst class)."), "",
                  ("| case | reference s | GPU peak MB | GPU MB·s | host RSS peak MB | time ratio | GPU peak ratio "
                   "| GPU MB·s ratio | Dice runtime vs reference |"),
                  "|---|---|---|---|---|---|---|---|---|"]
        for c in report["cases"]:
            ref, r = c.get("reference"), c.get("ratios") or {}
            if ref is None:
                continue
            lines.append(f"| {c['name']} | {_range(ref, 'wall_s')} | {_range(ref, 'gpu_device_peak_mb', 0)} | "
                         f"{_range(ref, 'gpu_device_mbs', 0)} | {_range(ref, 'rss_peak_mb', 0)} | "
                         f"{fmt(r.get('wall_s'), 3)} | {fmt(r.get('gpu_device_peak_mb'), 3)} | "
                         f"{fmt(r.get('gpu_device_mbs'), 3)} | {_dice_text(c.get('dice'))} |")
    errors = run_errors(report)
    if errors:
        lines += ["", "## Errors", ""] + [f"- {name}: {err}" for name, err in errors]
    fallbacks = [(c["name"], k, f) for c in report["cases"] for k in ("cold", "warm")
                 for f in ((c.get(k) or {}).get("fallbacks") or [])]
    lines += ["", "## Fallbacks", ""] + ([f"- {name} ({k}): {f}" for name, k, f in fallbacks] or ["none recorded"])
    plots = ", ".join(f"`{p}`" for p in report.get("plots", []))
    lines += ["", f"Memory over time: {plots or 'n/a'}", ""]
    return "\n".join(lines)


def plot_memory(traces: dict[str, MemoryTrace], title: str, target: Path) -> Path:
    """One PNG: GPU memory (device total − free) over time per case, or host RSS when there is no GPU."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4), dpi=100)
    gpu = any(t.gpu_available and t.device_mb for t in traces.values())
    for name, tr in traces.items():
        ys = tr.device_mb if gpu else tr.rss_mb
        if tr.t and ys:
            ax.plot(tr.t, ys, label=name, linewidth=1.2)
    if gpu:
        ax.axhline(4096, color="red", linestyle="--", linewidth=0.8, label="FLARE 4 GB")
        ax.set_ylabel("GPU memory used, MB (total − free)")
    else:
        ax.set_ylabel("host RSS, MB")
        title += " — GPU n/a (no NVML device), host RSS shown"
    ax.set_xlabel("time since start of the run, s")
    ax.set_title(title, fontsize=10)
    if traces:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return target


def write_reports(report: dict[str, Any], traces: dict[str, dict[str, MemoryTrace]], out_dir: Path) -> None:
    """Write the PNGs (one per backend with traces), then ``report.json`` and ``report.md``."""
    plots = []
    names = {"runtime": "flare runtime (cold run where measured)", "reference": "MONAI reference"}
    for backend, per_case in traces.items():
        if per_case:
            path = plot_memory(per_case, names.get(backend, backend), out_dir / f"memory_{backend}.png")
            plots.append(path.name)
    report["plots"] = plots
    write_text_atomic(out_dir / "report.json", json.dumps(report, indent=2, default=_json_default) + "\n")
    write_text_atomic(out_dir / "report.md", markdown(report))


def _json_default(value: Any) -> Any:
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")
