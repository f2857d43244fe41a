"""The bundle's declared model contract, checked against the real model when an engine opens it.

``bundle.json`` declares for every model its input and output names, element types, channel counts and spatial
divisor; a wrong declaration (or a wrong file with an updated sha256) must not end in an ONNX Runtime traceback or,
worse, a silently wrong segmentation. :func:`check_model_contract` compares the declaration with what ONNX
Runtime reports for the loaded model (``session.get_inputs()`` / ``get_outputs()``; the ``onnx`` package is not
needed) and, with ``probe``, runs one zero tile of ``spatial_divisor³`` voxels to confirm the model accepts that
size and returns the declared channels at the same spatial size. Any mismatch is one
:class:`~flare.runtime.foundation.errors.BundleError` naming the model file.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flare.runtime.bundle.manifest import ModelFile, ModelSpec
from flare.runtime.foundation.errors import BundleError

__all__ = ["check_model_contract"]

_ORT_TYPES = {"float32": "tensor(float)", "float16": "tensor(float16)"}
_NP_TYPES = {"float32": np.float32, "float16": np.float16}


def _static(dim: Any) -> int | None:
    return dim if isinstance(dim, int) and dim > 0 else None


def _check_arg(mf: ModelFile, spec: ModelSpec, arg: Any, role: str, dtype: str, channels: int) -> None:
    where = f"model {spec.name} {role} {arg.name!r}"
    if arg.type != _ORT_TYPES[dtype]:
        raise BundleError(mf.path, f"{where} has element type {arg.type}, the bundle declares {dtype}")
    shape = list(arg.shape or [])
    if len(shape) != 5:
        raise BundleError(mf.path, f"{where} has rank {len(shape)} (shape {shape}); (batch, channels, x, y, z) "
                                   "is needed")
    if _static(shape[1]) is not None and shape[1] != channels:
        raise BundleError(mf.path, f"{where} has {shape[1]} channels, the bundle declares {channels}")
    fixed = [d for d in shape[2:] if _static(d) is not None]
    if fixed:
        raise BundleError(mf.path, f"{where} has fixed spatial dimensions {shape[2:]}; the runtime tiles volumes "
                                   "and needs dynamic spatial axes")


def check_model_contract(mf: ModelFile, spec: ModelSpec, session: Any, probe: bool = True) -> None:
    """Raise a one-line BundleError when the ONNX Runtime ``session`` of ``mf`` does not match ``spec``."""
    inputs, outputs = list(session.get_inputs()), list(session.get_outputs())
    if len(inputs) != 1:
        raise BundleError(mf.path, f"model {spec.name} has {len(inputs)} inputs "
                                   f"({', '.join(repr(i.name) for i in inputs)}); exactly one image input is needed")
    if inputs[0].name != mf.input_name:
        raise BundleError(mf.path, f"model {spec.name} input is named {inputs[0].name!r}, the bundle declares "
                                   f"{mf.input_name!r}")
    by_name = {o.name: o for o in outputs}
    if mf.output_name not in by_name:
        raise BundleError(mf.path, f"model {spec.name} has no output {mf.output_name!r} (it has "
                                   f"{', '.join(repr(n) for n in by_name)})")
    _check_arg(mf, spec, inputs[0], "input", mf.input_dtype, spec.in_channels)
    _check_arg(mf, spec, by_name[mf.output_name], "output", mf.output_dtype, spec.out_channels)
    if probe:
        _probe(mf, spec, session)


def _probe(mf: ModelFile, spec: ModelSpec, session: Any) -> None:
    """Run one zero tile of ``spatial_divisor³``: the declared divisor must be accepted, channels must match."""
    d = spec.spatial_divisor
    tile = np.zeros((1, spec.in_channels, d, d, d), dtype=_NP_TYPES[mf.input_dtype])
    from flare.runtime.inference.device import (
        ort,  # the project's lazy import; the session exists, so ONNX Runtime is installed
    )

    quiet = ort.RunOptions()
    quiet.log_severity_level = 4  # the failure becomes our one-line error, not an ONNX Runtime log on stderr
    try:
        out = session.run([mf.output_name], {mf.input_name: tile}, run_options=quiet)[0]
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        first = (str(exc).splitlines() or [exc.__class__.__name__])[0][:200]
        raise BundleError(mf.path, f"model {spec.name} fails on a {d}x{d}x{d} tile (declared spatial_divisor "
                                   f"{d}): {first}") from None
    expected = (1, spec.out_channels, d, d, d)
    if tuple(np.shape(out)) != expected:
        raise BundleError(mf.path, f"model {spec.name} returns shape {tuple(np.shape(out))} for a {d}x{d}x{d} tile; "
                                   f"the bundle declares {expected}")
