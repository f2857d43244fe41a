"""fp32 ONNX -> mixed-precision fp16 ONNX with float32 inputs and outputs.

Compute-heavy, range-safe ops (convolutions, activations, additions, concatenation, pooling) and
**BatchNormalization** run in float16; every other float op — the normalisations that reduce over the tile
(InstanceNormalization, GroupNormalization, LayerNormalization), Resize, reductions, Softmax, exp/log — stays
float32, with ``Cast`` nodes inserted only where the precision changes.

BatchNormalization at inference is a per-channel affine map with fixed statistics (no reduction, nothing that can
overflow that the convolution before it could not): in fp32 it put a Cast → BN → Cast pair around every norm of
SegResNetDS (pre-activation blocks: 34 BatchNorm layers in the paper's network), which kept ONNX Runtime's CUDA provider
from running the network as one fp16 chain. The norms that reduce over a whole tile stay fp32 until a GPU run shows
their fp16 kernels accumulate safely (the finite-output check of every engine stays either way). Weights of fp16 ops are stored as float16 initializers (half the file size). The graph's
input and output stay float32 (``input_dtype``/``output_dtype`` "float32" in ``bundle.json``): the runtime feeds the
same array to both precisions, and the logits leave the model in fp32 for the softmax accumulator.

On the CUDA provider and TensorRT the fp16 ops run as true fp16 kernels. ONNX Runtime's CPU provider has no fp16
kernels for most of them and wraps them in casts itself, so CPU verification of an fp16 file measures the effect
of fp16 weights and fp16 tensors between ops, not of fp16 arithmetic inside a convolution.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

#: ops computed in float16; everything else that carries floats stays float32
FP16_OPS = frozenset({
    "Conv", "ConvTranspose", "Relu", "LeakyRelu", "PRelu", "Add", "Sub", "Mul", "Concat", "MaxPool",
    "AveragePool", "Identity", "Dropout", "Pad", "Slice", "Reshape", "Transpose", "BatchNormalization",
})
#: fp16 weights are clipped to this range (float16 max is 65504) — larger weights would become inf
_FP16_MAX = 65000.0


def convert_to_fp16(src: Path, dst: Path) -> Path:
    """Write the mixed-precision model of ``src`` to ``dst`` (see the module docstring)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.shape_inference.infer_shapes(onnx.load(str(src)))
    graph = model.graph
    FLOAT, HALF = TensorProto.FLOAT, TensorProto.FLOAT16
    dtype: dict[str, int] = {}
    for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
        dtype[vi.name] = vi.type.tensor_type.elem_type
    inits = {t.name: t for t in graph.initializer}
    for name, t in inits.items():
        dtype[name] = t.data_type

    new_nodes: list = []
    half_inits: list = []
    cache: dict[tuple[str, int], str] = {}
    current: dict[str, int] = {n: FLOAT for n, t in dtype.items() if t == FLOAT}  # float tensors' actual type

    def as_type(name: str, want: int) -> str:
        if current.get(name, want) == want:
            return name
        key = (name, want)
        if key not in cache:
            new = f"{name}__{'fp16' if want == HALF else 'fp32'}"
            if name in inits and want == HALF:
                arr = numpy_helper.to_array(inits[name]).astype(np.float32)
                half_inits.append(numpy_helper.from_array(np.clip(arr, -_FP16_MAX, _FP16_MAX).astype(np.float16),
                                                          new))
            else:
                new_nodes.append(helper.make_node("Cast", [name], [new], to=want, name=f"cast_{new}"))
            cache[key] = new
            current[new] = want
        return cache[key]

    for node in graph.node:
        want = HALF if node.op_type in FP16_OPS else FLOAT
        for i, name in enumerate(node.input):
            if name and name in current:
                node.input[i] = as_type(name, want)
        for name in node.output:
            if dtype.get(name) == FLOAT:
                current[name] = want
        new_nodes.append(node)

    # graph outputs keep their float32 type: rename the fp16 producer's tensor and cast back
    for out in graph.output:
        if current.get(out.name) == HALF:
            inner = f"{out.name}__fp16_out"
            for node in new_nodes:
                node.output[:] = [inner if o == out.name else o for o in node.output]
                node.input[:] = [inner if i == out.name else i for i in node.input]
            new_nodes.append(helper.make_node("Cast", [inner], [out.name], to=FLOAT, name=f"cast_{out.name}_fp32"))

    used = {i for n in new_nodes for i in n.input}
    kept_inits = [t for t in graph.initializer if t.name in used] + [t for t in half_inits if t.name in used]
    del graph.node[:]
    graph.node.extend(new_nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept_inits)
    del graph.value_info[:]  # stale types; shape inference recomputes them
    model = onnx.shape_inference.infer_shapes(model)
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))
    return dst
