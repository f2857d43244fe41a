"""Import MONAI Auto3DSeg ``segresnet`` fold checkpoints into a flare bundle.

A work dir holds ``segresnet_0/``, ``segresnet_1/``, ... each with ``model/model.pt`` (``{"state_dict": ...}``,
sometimes with ``epoch``/``best_metric``/``config``) and ``configs/hyper_parameters.yaml``. From the YAML:

* ``network`` (``_target_: SegResNetDS``, ``init_filters``, ``blocks_down``, ``norm``, ``dsdepth``,
  ``in_channels``/``out_channels``, usually ``@input_channels``/``@output_classes`` references) rebuilds the net;
  ``INSTANCE_NVFUSER`` is MONAI's fused instance norm and is rebuilt as ``instance`` (same maths, same weights);
* ``resample_resolution`` -> ``preprocessing.spacing_mm``; ``roi_size`` -> ``tiling.roi`` (sides divisible by 16);
* ``normalize_mode`` ``range``/``ct`` with ``intensity_bounds [a, b]`` (default ``[-250, 250]``): Auto3DSeg feeds
  ``sigmoid(2 (HU - a) / (b - a) - 1)``. The runtime feeds ``clip((HU - lo) / (hi - lo), 0, 1)``, so the export
  prepends the exact affine+sigmoid map in the graph and widens the bundle's window to
  ``[a - 3.5 (b - a), b + 3.5 (b - a)]``, where the sigmoid argument reaches ±8: clipping there changes the network
  input by less than 3.4e-4. ``meanstd``/``mri``/``pet`` (per-image statistics) cannot be reproduced -> error.

Labels: models with 13 outputs are taken to be in flare's merged training space (background, 11 organs with both
kidneys and both adrenals merged, tumor — the NVAUTO setting). Models with 15 outputs are taken to predict FLARE23
ids 0..14; the export appends an exact merge: merged logit = ``logsumexp`` of the right and left logits, so softmax
probabilities of the merged classes are the sums of the originals, and the runtime re-splits left/right by world
position. Any other number of outputs is refused. There is no locator: the runtime uses the whole image.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from flare.runtime.bundle.manifest import sha256_file
from flare.runtime.foundation.errors import InputError
from flare.runtime.foundation.labels import LEFT_RIGHT_PAIRS, MERGED_TO_FLARE, NUM_FLARE_IDS, NUM_MERGED_CLASSES

from .sources import ExportSources, ModelSource, agreed, check_roi, folds_divisor

if TYPE_CHECKING:
    import torch

HP_FILE = Path("configs") / "hyper_parameters.yaml"
MODEL_FILE = Path("model") / "model.pt"
SIGMOID_REACH = 8.0  # |sigmoid argument| covered by the widened HU window


def export_auto3dseg(work_dir: str | Path, out_dir: str | Path, fp16: bool = False, trt: bool = False,
                     opset: int = 17, verify: bool = True, progress: bool = True, command: str | None = None,
                     card: str | Path | None = None) -> Path:
    """Convert the ``segresnet_*`` folds of an Auto3DSeg work dir into a bundle at ``out_dir``."""
    from .bundle_export import export_sources

    if trt:
        from .trt import import_tensorrt

        import_tensorrt()
    sources = auto3dseg_sources(work_dir)
    cmd = command or f"flare.export.export_auto3dseg({str(work_dir)!r}, {str(out_dir)!r}, fp16={fp16}, trt={trt}, " \
                     f"opset={opset}, verify={verify})"
    return export_sources(sources, out_dir, fp16=fp16, trt=trt, opset=opset, verify=verify, progress=progress,
                          command=cmd, card=card)


def read_hyper_parameters(path: Path) -> dict[str, Any]:
    try:
        import yaml
    except ImportError:
        raise InputError(path, "reading Auto3DSeg configs needs PyYAML: pip install pyyaml") from None
    if not path.is_file():
        raise InputError(path, "hyper_parameters.yaml is missing (expected an Auto3DSeg segresnet fold folder)")
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise InputError(path, f"cannot parse YAML ({exc.__class__.__name__})") from None
    if not isinstance(doc, dict):
        raise InputError(path, "hyper_parameters.yaml is not a mapping")
    return doc


def resolve(value: Any, doc: dict[str, Any], where: Path, key: str) -> Any:
    """Follow MONAI config references like ``@output_classes`` or ``@network#init_filters``; expressions
    (``$...``) are not evaluated."""
    seen = 0
    while isinstance(value, str) and value.startswith("@"):
        node: Any = doc
        for part in value[1:].split("#"):
            if not isinstance(node, dict) or part not in node:
                raise InputError(where, f"{key}: reference {value!r} points to nothing")
            node = node[part]
        value, seen = node, seen + 1
        if seen > 10:
            raise InputError(where, f"{key}: circular reference {value!r}")
    if isinstance(value, str) and value.startswith("$"):
        raise InputError(where, f"{key} is an expression ({value!r}); write its value into the YAML")
    return value


def network_spec(hp: dict[str, Any], where: Path) -> dict[str, Any]:
    """The flare network spec (see :mod:`flare.train.networks`) of a segresnet ``network`` section."""
    net = hp.get("network")
    if not isinstance(net, dict):
        raise InputError(where, "no network section")
    target = str(net.get("_target_", ""))
    if target.rsplit(".", 1)[-1] != "SegResNetDS":
        raise InputError(where, f"network _target_ {target!r} is not SegResNetDS: only segresnet folds convert")

    def get(key: str, default: Any) -> Any:
        value = resolve(net.get(key, default), hp, where, f"network.{key}")
        if value is None:
            raise InputError(where, f"network.{key} is not set")
        return value

    norm = str(get("norm", "instance")).lower()
    return {"name": "SegResNetDS", "init_filters": int(get("init_filters", 32)),
            "blocks_down": [int(b) for b in get("blocks_down", [1, 2, 2, 4, 4])],
            "in_channels": int(get("in_channels", "@input_channels")),
            "out_channels": int(get("out_channels", "@output_classes")),
            "norm": "instance" if norm == "instance_nvfuser" else norm, "dsdepth": int(get("dsdepth", 4))}


def load_state_dict(path: Path) -> dict[str, Any]:
    """``model.pt``'s weights (``weights_only=True``), without DDP/compile key prefixes."""
    import torch

    if not path.is_file():
        raise InputError(path, "model.pt is missing")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 (any torch/pickle error: one line for the user)
        raise InputError(path, f"cannot load with weights_only=True ({exc.__class__.__name__}: "
                               f"{str(exc).splitlines()[0][:200]})") from None
    state = payload.get("state_dict", payload) if isinstance(payload, dict) else None
    if not isinstance(state, dict) or not state:
        raise InputError(path, "no state_dict in the checkpoint")
    out = {}
    for k, v in state.items():
        for prefix in ("module.", "_orig_mod."):
            k = k.removeprefix(prefix)
        out[k] = v
    return out


def build_with_weights(spec: dict[str, Any], state: dict[str, Any], where: Path) -> torch.nn.Module:
    """Build the net and load ``state`` strictly; instance norms with or without affine weights are detected."""
    from flare.train.networks import build_network

    specs = [spec]
    if spec["norm"] == "instance":  # affine or not depends on MONAI's defaults and on apex at training time
        specs += [{**spec, "norm": ["instance", {"affine": affine}]} for affine in (True, False)]
    error = ""
    for s in specs:
        net = build_network(s)
        result = net.load_state_dict(state, strict=False)
        if not result.missing_keys and not result.unexpected_keys:
            spec.update(s)
            return net.float().eval()
        error = f"{len(result.missing_keys)} missing and {len(result.unexpected_keys)} unexpected weights " \
                f"(e.g. {(result.missing_keys + result.unexpected_keys)[0]})"
    raise InputError(where, f"weights do not fit the network described in hyper_parameters.yaml: {error}")


def input_window(hp: dict[str, Any], where: Path) -> tuple[tuple[float, float], tuple[float, float]]:
    """(Auto3DSeg intensity bounds, the bundle's widened HU window) for ``range``/``ct`` normalisation."""
    mode = str(hp.get("normalize_mode", "meanstd")).lower()
    if mode not in ("range", "ct"):
        raise InputError(where, f"normalize_mode {mode!r} uses per-image statistics or none; the runtime's fixed "
                                "HU window reproduces only 'range'/'ct' (CT) models")
    bounds = resolve(hp.get("intensity_bounds"), hp, where, "intensity_bounds") or [-250.0, 250.0]
    a, b = float(bounds[0]), float(bounds[1])
    if not a < b:
        raise InputError(where, f"intensity_bounds {bounds} must be [low, high] with low < high")
    reach = (SIGMOID_REACH - 1.0) / 2.0 * (b - a)
    return (a, b), (a - reach, b + reach)


def adapter_module(net: torch.nn.Module, bounds: tuple[float, float], window: tuple[float, float],
                   merge: bool) -> torch.nn.Module:
    """Wrap an Auto3DSeg net: runtime input ``clip((HU - lo) / (hi - lo), 0, 1)`` -> Auto3DSeg input
    ``sigmoid(2 (HU - a) / (b - a) - 1)`` -> net -> (when ``merge``) 13 merged-class logits."""
    import torch

    (a, b), (lo, hi) = bounds, window
    scale = 2.0 * (hi - lo) / (b - a)
    shift = 2.0 * (lo - a) / (b - a) - 1.0
    groups = [[f, *[left for right, left in LEFT_RIGHT_PAIRS if right == f]] for f in MERGED_TO_FLARE.tolist()]

    class Adapter(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.net(torch.sigmoid(x * scale + shift))
            if not merge:
                return y
            return torch.cat([y[:, g[0]:g[0] + 1] if len(g) == 1 else torch.logsumexp(y[:, g], dim=1, keepdim=True)
                              for g in groups], dim=1)

    return Adapter().eval()


def fold_source(folder: Path, name: str) -> tuple[ModelSource, dict[str, Any]]:
    """One ``segresnet_<k>`` folder -> (ModelSource, its settings)."""
    hp_path = folder / HP_FILE
    hp = read_hyper_parameters(hp_path)
    spec = network_spec(hp, hp_path)
    if spec["out_channels"] not in (NUM_MERGED_CLASSES, NUM_FLARE_IDS):
        raise InputError(hp_path, f"the model predicts {spec['out_channels']} classes; only FLARE23 models convert: "
                                  f"{NUM_MERGED_CLASSES} merged classes or {NUM_FLARE_IDS} FLARE ids")
    ckpt = folder / MODEL_FILE
    net = build_with_weights(spec, load_state_dict(ckpt), ckpt)
    bounds, window = input_window(hp, hp_path)
    merge = spec["out_channels"] == NUM_FLARE_IDS
    settings = {"spacing_mm": [float(v) for v in resolve(hp.get("resample_resolution", [1, 1, 1]), hp, hp_path,
                                                          "resample_resolution")],
                "hu_window": list(window), "roi": resolve(hp.get("roi_size", [224, 224, 144]), hp, hp_path,
                                                          "roi_size"),
                "resample": bool(hp.get("resample", True)), "bounds": list(bounds), "merge": merge}
    config = {"network": spec, "role": "fold", "fold": int(name.rsplit("_", 1)[-1]), "auto3dseg": settings}
    source = ModelSource(name=f"fold{config['fold']}", role="fold",
                         net=adapter_module(net, bounds, window, merge), in_channels=spec["in_channels"],
                         out_channels=NUM_MERGED_CLASSES, checkpoint=ckpt.resolve(), config=config,
                         config_sha256=sha256_file(hp_path))
    return source, settings


def auto3dseg_sources(work_dir: str | Path) -> ExportSources:
    """Read every ``segresnet_<k>`` fold of ``work_dir`` and check that they agree on preprocessing and ROI."""
    root = Path(work_dir).resolve()
    if not root.is_dir():
        raise InputError(root, "Auto3DSeg work dir does not exist")
    dirs = sorted((p for p in root.glob("segresnet_*") if p.is_dir() and p.name.rsplit("_", 1)[-1].isdigit()),
                  key=lambda p: int(p.name.rsplit("_", 1)[-1]))
    if not dirs:
        raise InputError(root, "no segresnet_<fold> folders: not an Auto3DSeg work dir with segresnet folds")
    loaded = [fold_source(d, d.name) for d in dirs]
    per_fold = {src.name: s for src, s in loaded}
    spacing = agreed({k: s["spacing_mm"] for k, s in per_fold.items()}, "resample_resolution", root)
    window = agreed({k: s["hu_window"] for k, s in per_fold.items()}, "intensity_bounds", root)
    roi = check_roi(agreed({k: s["roi"] for k, s in per_fold.items()}, "roi_size", root), root,
                    folds_divisor([src for src, _ in loaded]))
    notes = [(f"Auto3DSeg 'range' normalisation with intensity_bounds {next(iter(per_fold.values()))['bounds']} "
              f"is folded into each graph; the bundle HU window is widened to {window}")]
    if any(s["merge"] for s in per_fold.values()):
        notes.append("15 FLARE-id outputs merged to 13 classes in the graph (logsumexp of right/left logits); "
                     "left/right are re-split by the runtime")
    if not all(s["resample"] for s in per_fold.values()):
        notes.append("hyper_parameters say resample: false; the bundle assumes resample_resolution anyway")
    return ExportSources(root=root, kind="auto3dseg", folds=[src for src, _ in loaded], locator=None,
                         spacing_mm=tuple(spacing), hu_window=(window[0], window[1]), roi=roi, notes=notes)
