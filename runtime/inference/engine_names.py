"""The CPU engines' names (``--engine``), importable without loading any engine, bundle or device code (the CLIs
build their options from it at start-up)."""

from __future__ import annotations

from enum import Enum

__all__ = ["CPU_ENGINES", "CpuEngine"]


class CpuEngine(str, Enum):
    """The engines that run on the CPU (``--engine``); the first is the default."""

    onnxruntime = "onnxruntime"
    openvino = "openvino"


CPU_ENGINES = tuple(e.value for e in CpuEngine)
