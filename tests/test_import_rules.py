"""Import rules: runtime/ never imports torch or monai (source and run time, in a subprocess); the import graph of
runtime/, train/, export/ and benchmarks/ has no cycle and follows the layer rules of docs/architecture.md."""

from __future__ import annotations

import ast
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
labels = rt.segment({str(ct)!r}, bundle={str(tiny_bundle)!r}, device="cpu",
                    output={str(tmp_path / 'o.nii.gz')!r}).labels
import flare.runtime.app.cli, flare.runtime.ops.lr_split, flare.runtime.ops.postprocessing
loaded = [m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r}]
assert not loaded, loaded
print(labels.shape)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr


# ------------------------------------------------------------------------------------------------ the import graph
# The import graph of runtime/, train/, export/ and benchmarks/ (docs/architecture.md, "Layer rules").
#
# Edges are read from the source (AST): module-level imports and imports inside functions (lazy imports are still
# dependencies), but not ``if TYPE_CHECKING:`` blocks (annotations only). ``lazy_import("name")`` counts as importing
# ``name``. The rules:
#
# * no import cycle anywhere (module level, lazy imports included);
# * runtime layers import only downward, in this order (a layer may import its own layer and every layer before it):
#   foundation < ops < {bundle, image} < inference < pipeline < serving < app, and the ``flare.runtime`` package (the
#   public API, which imports its exports lazily by name) last. bundle and image do not import each other; app may
#   import serving (``flare-run --server`` uses the client), serving never imports app;
# * runtime imports none of train/export/benchmarks; train imports none of export/benchmarks; export does not import
#   benchmarks;
# * in runtime, only ``inference.engines`` imports onnxruntime/tensorrt, only ``inference.device`` imports CuPy, only
#   ``image`` imports nibabel/pydicom/highdicom (the allow-list below names the one exception and why).

PACKAGES = {"runtime": "flare.runtime", "train": "flare.train", "export": "flare.export", "benchmarks": "flare.benchmarks"}
LAYERS = {"foundation": 0, "ops": 1, "bundle": 2, "image": 2, "inference": 3, "pipeline": 4, "serving": 5, "app": 6}
API_RANK = 7  # the flare.runtime package itself
#: in runtime: third-party package -> the modules (prefixes) that may import it
THIRD_PARTY_HOMES = {
    "onnxruntime": ("flare.runtime.inference.engines",),
    "tensorrt": ("flare.runtime.inference.engines",),
    "cupy": ("flare.runtime.inference.device",),
    "cupyx": ("flare.runtime.inference.device",),
    "nibabel": ("flare.runtime.image",),
    "pydicom": ("flare.runtime.image",),
    "highdicom": ("flare.runtime.image",),
}
#: (module, package) pairs allowed outside the homes above, with the reason
ALLOWED = {
    # "auto" is answered once, in the device module: it asks the installed ONNX Runtime for its execution providers
    # (the engines take the same lazy handle from there; moving it into engines/ would make device import engines,
    # which import device)
    ("flare.runtime.inference.device", "onnxruntime"),
}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _modules() -> dict[str, tuple[Path, bool]]:
    mods = {}
    for folder, pkg in PACKAGES.items():
        for path in (REPO / folder).rglob("*.py"):
            parts = list(path.relative_to(REPO / folder).with_suffix("").parts)
            is_pkg = parts[-1] == "__init__"
            name = ".".join([pkg, *(parts[:-1] if is_pkg else parts)])
            mods[name] = (path, is_pkg)
    return mods


def _imports_of(name: str, path: Path, is_pkg: bool, mods: dict[str, tuple[Path, bool]]) -> tuple[set[str], set[str]]:
    """``(flare modules, third-party top-level packages)`` that module ``name`` imports."""
    inner: set[str] = set()
    outer: set[str] = set()

    def add(target: str) -> None:
        if target.split(".")[0] == "flare":
            while target not in mods and "." in target:
                target = target.rsplit(".", 1)[0]
            if target != name:
                inner.add(target)
        else:
            outer.add(target.split(".")[0])

    def from_module(node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        base = name.split(".") if is_pkg else name.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        return ".".join(base + ([node.module] if node.module else []))

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for stmt in child.orelse:
                    visit(ast.Module(body=[stmt], type_ignores=[]))
                continue
            if isinstance(child, ast.Import):
                for alias in child.names:
                    add(alias.name)
            elif isinstance(child, ast.ImportFrom):
                module = from_module(child)
                for alias in child.names:
                    full = f"{module}.{alias.name}"
                    add(full if full in mods else module)
            elif (isinstance(child, ast.Call) and getattr(child.func, "id", getattr(child.func, "attr", None))
                  == "lazy_import" and child.args and isinstance(child.args[0], ast.Constant)
                  and isinstance(child.args[0].value, str)):
                add(child.args[0].value)
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return inner, outer


def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """``(flare edges, third-party top-level packages)`` per module."""
    mods = _modules()
    edges: dict[str, set[str]] = {}
    external: dict[str, set[str]] = {}
    for name, (path, is_pkg) in mods.items():
        edges[name], external[name] = _imports_of(name, path, is_pkg, mods)
    return edges, external


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            strong(v)
    return found


def _layer(module: str) -> tuple[str, int] | None:
    """``(layer, rank)`` of a runtime module; None outside runtime."""
    if module == "flare.runtime":
        return "flare.runtime", API_RANK
    if not module.startswith("flare.runtime."):
        return None
    layer = module.split(".")[2]
    assert layer in LAYERS, f"{module}: runtime module outside the layers {sorted(LAYERS)}: add it to one"
    return layer, LAYERS[layer]


GRAPH = import_graph()


def test_no_import_cycles() -> None:
    assert _cycles(GRAPH[0]) == []


def test_runtime_layers_import_only_downward() -> None:
    upward = []
    for module, targets in GRAPH[0].items():
        here = _layer(module)
        if here is None:
            continue
        for target in targets:
            there = _layer(target)
            assert there is not None, f"{module} imports {target}: runtime imports none of train/export/benchmarks"
            if there[1] > here[1] or (there[1] == here[1] and there[0] != here[0]):
                upward.append(f"{module} ({here[0]}) -> {target} ({there[0]})")
    assert not upward, upward


def test_packages_import_in_order() -> None:
    """runtime < train < export < benchmarks: a package imports only those before it (and itself)."""
    order = [PACKAGES[p] for p in ("runtime", "train", "export", "benchmarks")]

    def rank(module: str) -> int:
        return next(i for i, pkg in enumerate(order) if module == pkg or module.startswith(pkg + "."))

    bad = [f"{m} -> {t}" for m, targets in GRAPH[0].items() for t in targets if rank(t) > rank(m)]
    assert not bad, bad


def test_heavy_packages_have_one_home_in_runtime() -> None:
    bad = []
    for module, packages in GRAPH[1].items():
        if not module.startswith("flare.runtime"):
            continue
        for package, homes in THIRD_PARTY_HOMES.items():
            if package in packages and not module.startswith(homes) and (module, package) not in ALLOWED:
                bad.append(f"{module} imports {package} (only {', '.join(homes)} may)")
    assert not bad, bad


def test_the_graph_sees_lazy_imports() -> None:
    """The checks above would pass vacuously if lazy imports were missed: a few known edges must be there."""
    edges, external = GRAPH
    assert "flare.runtime.pipeline.segmenter" in edges["flare.runtime.app.cli"]  # imported inside run()
    assert "pydicom" in external["flare.runtime.image.dicom"]  # lazy_import("pydicom", ...)
    assert "onnxruntime" in external["flare.runtime.inference.device"]  # lazy_import("onnxruntime", ...)


def test_every_runtime_module_imports_alone_without_heavy_libraries() -> None:
    """Each runtime module imported on its own (a fresh flare.runtime each time) loads no heavy library."""
    names = sorted(m for m in GRAPH[0] if m.startswith("flare.runtime"))
    code = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    for m in [m for m in sys.modules if m.startswith('flare.runtime')]:\n"
        "        del sys.modules[m]\n"
        "    importlib.import_module(name)\n"
        "bad = [m for m in ('torch', 'monai', 'cupy', 'onnxruntime', 'tensorrt') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
