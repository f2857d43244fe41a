"""The CPU engines' names (``--engine``) and cuDNN's algorithm searches (``--cudnn-algo-search``), importable without
loading any engine, bundle or device code (the CLIs build their options from it at start-up)."""

from __future__ import annotations

from enum import Enum

__all__ = ["ALGO_SEARCH", "CPU_ENGINES", "CpuEngine", "CudnnAlgoSearch"]


class CpuEngine(str, Enum):
    """The engines that run on the CPU (``--engine``); the first is the default."""

    onnxruntime = "onnxruntime"
    openvino = "openvino"


CPU_ENGINES = tuple(e.value for e in CpuEngine)


class CudnnAlgoSearch(str, Enum):
    """cuDNN's convolution algorithm search in ONNX Runtime's CUDA provider; the first is flare's default."""

    HEURISTIC = "HEURISTIC"
    EXHAUSTIVE = "EXHAUSTIVE"
    DEFAULT = "DEFAULT"


ALGO_SEARCH = tuple(e.value for e in CudnnAlgoSearch)
