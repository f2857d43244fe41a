"""The CPU engine's session options: one CPU arena shared by every session (ONNX Runtime's environment allocator),
or none with ``FLARE_ORT_ARENA=0``; each in a fresh process (the environment allocator is per process)."""

from __future__ import annotations

import os
import subprocess
import sys

SCRIPT = """
import numpy as np, onnx, onnxruntime as ort
from onnx import helper, TensorProto
from flare.runtime.inference.engines.ort_cpu import cpu_session_options, shared_cpu_arena
x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, "a", "b", "c"])
y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, "a", "b", "c"])
g = helper.make_graph([helper.make_node("Mul", ["x", "two"], ["t"]), helper.make_node("Add", ["t", "x"], ["y"])],
                      "g", [x], [y], [helper.make_tensor("two", TensorProto.FLOAT, [1], [2.0])])
m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]); m.ir_version = 8
sessions = []
for _ in range(3):
    so = cpu_session_options(1)
    sessions.append(ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]))
    try:
        shared = so.get_session_config_entry("session.use_env_allocators")
    except RuntimeError:  # not set
        shared = "-"
    print(so.enable_cpu_mem_arena, shared)
v = np.random.default_rng(0).random((1, 1, 32, 32, 32), dtype=np.float32)
print(all(np.array_equal(s.run(None, {"x": v})[0], 3 * v) for s in sessions for _ in range(2)))
"""


def run(env: dict[str, str]) -> list[str]:
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, **env})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split("\n")[:-1]


def test_every_cpu_session_uses_one_shared_arena() -> None:
    assert run({"FLARE_ORT_ARENA": "1"}) == ["True 1"] * 3 + ["True"]


def test_arena_off_shares_nothing() -> None:
    assert run({"FLARE_ORT_ARENA": "0"}) == ["False -"] * 3 + ["True"]
