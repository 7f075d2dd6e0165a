"""Graph rewrites that make ONNX Runtime compute what a NumPy emulation describes, for parity only (never timed):
int8-dyn graphs with exact integer MatMuls, bf16 graphs made computable on the CPU provider."""

from __future__ import annotations

import numpy as np


def exact_integer_matmuls(model):
    """``model`` (an int8-dyn ``ModelProto``, edited in place and returned) with every ``MatMulInteger`` computed
    as ONNX defines it — (A − a_zero) · (B − b_zero), exact — in float64 MatMuls whose integer result is cast
    back to int32, so the rest of the graph is unchanged.

    ONNX Runtime's integer kernel is not that on every CPU: on AVX2 without VNNI it multiplies uint8 × int8 with
    ``vpmaddubsw``, which saturates each pair of products at int16 (measured on the demo model: 1307 of 65536
    outputs of layer 0's gate MatMul off, by up to 15215). The int8-dyn emulation reference describes the graph's
    arithmetic, so it is compared with this run; the real kernels are gated against eager fp32 by perplexity."""
    from onnx import TensorProto, helper

    nodes = []
    for n in model.graph.node:
        if n.op_type != "MatMulInteger":
            nodes.append(n)
            continue
        a, b, a_zero, b_zero = n.input
        t = n.output[0] + "/exact"
        nodes += [helper.make_node("Cast", [a], [t + "/a"], to=TensorProto.DOUBLE),
                  helper.make_node("Cast", [a_zero], [t + "/az"], to=TensorProto.DOUBLE),
                  helper.make_node("Sub", [t + "/a", t + "/az"], [t + "/a0"]),
                  helper.make_node("Cast", [b], [t + "/b"], to=TensorProto.DOUBLE),
                  helper.make_node("Cast", [b_zero], [t + "/bz"], to=TensorProto.DOUBLE),
                  helper.make_node("Sub", [t + "/b", t + "/bz"], [t + "/b0"]),
                  helper.make_node("MatMul", [t + "/a0", t + "/b0"], [t + "/y"]),
                  helper.make_node("Cast", [t + "/y"], [n.output[0]], to=TensorProto.INT32)]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def upcast_bf16(model):
    """``model`` (a bf16 ``ModelProto``, edited in place and returned) made computable by ONNX Runtime's CPU
    provider, which has no bf16 kernels: bf16 initializers upcast to fp32 (exact: every bf16 value is an fp32
    value) and every ``Cast`` to bf16, in the graph and in the function bodies, made a cast to fp32. What is left
    is the graph's structure — its ops, wiring, attributes — computing in fp32 on the bf16-rounded weights, which
    the ``emulation-bf16-weights`` reference describes (a bug in the graph is not made fp32 by this)."""
    import ml_dtypes  # noqa: F401  (a dependency of onnx: numpy_helper reads bf16 through it)
    from onnx import TensorProto, numpy_helper

    for i, t in enumerate(model.graph.initializer):
        if t.data_type == TensorProto.BFLOAT16:
            value = numpy_helper.to_array(t).astype(np.float32)
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(value, t.name))
    for nodes in (model.graph.node, *(f.node for f in model.functions)):
        for n in nodes:
            for a in n.attribute:
                if n.op_type == "Cast" and a.name == "to" and a.i == TensorProto.BFLOAT16:
                    a.i = TensorProto.FLOAT
    return model
