"""The network factory's spatial divisor against MONAI's own networks."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("blocks", [[1, 1, 1], [1, 2, 2, 4], [1, 2, 2, 4, 4]])
def test_spatial_divisor_is_monai_shape_factor(blocks: list[int]) -> None:
    from flare.train.networks import build_network, spatial_divisor

    spec = {"name": "SegResNetDS", "init_filters": 4, "blocks_down": blocks, "in_channels": 1, "out_channels": 2}
    net = build_network(spec)
    assert [spatial_divisor(spec)] * 3 == list(net.shape_factor())
    assert spatial_divisor(spec) == 2 ** (len(blocks) - 1)


@pytest.mark.parametrize("name", ["SegResNetDS", "SegResNet"])
def test_networks_run_on_tiles_of_their_divisor(name: str) -> None:
    import torch
    from flare.train.networks import build_network, spatial_divisor

    spec = {"name": name, "init_filters": 4, "blocks_down": [1, 1, 1, 1], "in_channels": 1, "out_channels": 2}
    d = spatial_divisor(spec)
    assert d == 8
    with torch.no_grad():
        out = build_network(spec).eval()(torch.zeros(1, 1, d, 2 * d, 3 * d))
    out = out[0] if isinstance(out, (list, tuple)) else out
    assert tuple(out.shape) == (1, 2, d, 2 * d, 3 * d)


def test_spatial_divisor_refuses_unknown_networks() -> None:
    from flare.train.networks import spatial_divisor

    with pytest.raises(ValueError, match="unknown network"):
        spatial_divisor({"name": "UNet", "blocks_down": [1, 1]})
