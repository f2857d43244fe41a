"""Datalist analysis: per-case label availability and the label-subset table (the paper's Table 1).

A case's available classes are the FLARE ids present in its label file; "fully labelled" means all 13 organs are
present (tumour is not required). Cases with the same set of available ids form a subset.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flare.runtime.foundation import labels as L
from flare.runtime.foundation.atomic import write_text_atomic

from .datalist import case_name, fully_labelled, given_ids, load_datalist, relative_to


def describe_ids(ids: set[int]) -> str:
    """Short human name of a set of FLARE ids ("all 14 classes", "tumor only", "unlabelled", or the list)."""
    if not ids:
        return "unlabelled"
    if ids == set(range(1, L.NUM_FLARE_IDS)):
        return "all 14 classes"
    if set(L.ORGAN_IDS) == ids:
        return "13 organs"
    if ids == {L.TUMOR}:
        return "tumor only"
    return ", ".join(L.LABELS[i].short for i in sorted(ids))


def analyze(datalist: str | Path | dict[str, Any]) -> dict[str, Any]:
    """Per-case availability and subset table of the ``training`` list (``testing`` cases are counted apart)."""
    doc = datalist if isinstance(datalist, dict) else load_datalist(datalist)
    cases = []
    for entry in doc["training"]:
        ids = given_ids(entry)
        cases.append({"case": case_name(entry), "fold": entry.get("fold"), "ids": sorted(ids),
                      "fully_labelled": fully_labelled(ids), "has_tumor": L.TUMOR in ids})
    table: dict[str, dict[str, Any]] = {}
    for c in cases:
        key = describe_ids(set(c["ids"]))
        row = table.setdefault(key, {"subset": key, "ids": c["ids"], "cases": 0})
        row["cases"] += 1
    rows = sorted(table.values(), key=lambda r: (-len(r["ids"]), r["subset"]))
    n = len(cases)
    for r in rows:
        r["percent"] = round(100.0 * r["cases"] / n, 1)
    return {"datalist": doc.get("_path"), "cases": cases, "subsets": rows, "n_training": n,
            "n_fully_labelled": sum(c["fully_labelled"] for c in cases),
            "n_with_tumor": sum(c["has_tumor"] for c in cases), "n_testing": len(doc.get("testing") or []),
            "n_unlabelled": len(doc.get("unlabeled") or [])}


def save_analysis(result: dict[str, Any], out: str | Path) -> None:
    """Write ``result`` with its ``datalist`` path relative to the file's folder."""
    doc = dict(result)
    if doc.get("datalist"):
        doc["datalist"] = relative_to(doc["datalist"], Path(out).parent)
    write_text_atomic(out, json.dumps(doc, indent=1) + "\n")


def print_analysis(result: dict[str, Any], *, per_case: bool = False) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    if per_case:
        t = Table(title="label availability per case")
        for col in ("case", "fold", "full", "FLARE ids"):
            t.add_column(col)
        for c in result["cases"]:
            t.add_row(c["case"], str(c["fold"]), "yes" if c["fully_labelled"] else "", " ".join(map(str, c["ids"])))
        con.print(t)
    t = Table(title=f"label subsets ({result['n_training']} training cases, {result['n_fully_labelled']} fully "
                    f"labelled, {result['n_testing']} held out)")
    for col in ("subset", "cases", "%"):
        t.add_column(col, justify="right" if col != "subset" else "left")
    for r in result["subsets"]:
        t.add_row(r["subset"], str(r["cases"]), f"{r['percent']:.1f}")
    con.print(t)
