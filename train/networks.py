"""Network factory shared by training, export and the MONAI reference pipeline.

A network is described by a plain dict (saved in every checkpoint and config file)::

    {"name": "SegResNetDS", "init_filters": 32, "blocks_down": [1, 2, 2, 4, 4], "in_channels": 1,
     "out_channels": 13, "norm": "batch", "dsdepth": 4}
    {"name": "SegResNet", "init_filters": 16, "blocks_down": [1, 2, 2, 4], "in_channels": 1, "out_channels": 1}
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # spatial_divisor is read by config checks that must not import torch (torch_setup first)
    import torch

FLARE23_NETWORK: dict[str, Any] = {
    "name": "SegResNetDS", "init_filters": 32, "blocks_down": [1, 2, 2, 4, 4], "in_channels": 1,
    "out_channels": 13, "norm": "batch", "dsdepth": 4,
}
LOCATOR_NETWORK: dict[str, Any] = {
    "name": "SegResNet", "init_filters": 16, "blocks_down": [1, 2, 2, 4], "in_channels": 1, "out_channels": 1,
    "norm": "batch",
}


def build_network(spec: dict[str, Any]) -> torch.nn.Module:
    """Instantiate the MONAI network described by ``spec``."""
    from monai.networks.nets import SegResNet, SegResNetDS

    name = spec["name"]
    common: dict[str, Any] = {
        "spatial_dims": 3, "init_filters": int(spec["init_filters"]), "in_channels": int(spec.get("in_channels", 1)),
        "out_channels": int(spec["out_channels"]), "blocks_down": tuple(int(b) for b in spec["blocks_down"]),
        "norm": spec.get("norm", "batch")}
    if name == "SegResNetDS":
        return SegResNetDS(**common, dsdepth=int(spec.get("dsdepth", 1)))
    if name == "SegResNet":
        blocks_up = tuple(1 for _ in range(len(common["blocks_down"]) - 1))
        return SegResNet(**common, blocks_up=blocks_up)
    raise ValueError(f"unknown network {name!r} (expected SegResNetDS or SegResNet)")


def spatial_divisor(spec: dict[str, Any]) -> int:
    """What every tile side of the network described by ``spec`` must be a multiple of: ``2 ** (levels - 1)``, one
    halving per level after the first (MONAI ``SegResNetDS.shape_factor()``; the same for ``SegResNet``) — 16 for
    the 5-level flare23 network, 8 for the 4-level CPU/locator networks."""
    if spec.get("name") not in ("SegResNetDS", "SegResNet"):
        raise ValueError(f"unknown network {spec.get('name')!r} (expected SegResNetDS or SegResNet)")
    return int(2 ** (len(spec["blocks_down"]) - 1))


def count_parameters(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())
