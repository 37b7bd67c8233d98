"""bitnet.GatedReluSquared (2B4T's MLP activation in one node) gives the bits of the ONNX ops it
replaces (Split, Relu, Mul, Mul) and of numpy's float32 relu(gate)^2 * up."""

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import custom_ops


def fused_model():
    node = helper.make_node("GatedReluSquared", ["X"], ["Y"], domain=custom_ops.DOMAIN, name="act")
    graph = helper.make_graph([node], "act", [helper.make_tensor_value_info("X", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                   helper.make_opsetid(custom_ops.DOMAIN, 1)]).SerializeToString()


def onnx_ops_model(size):
    split = helper.make_tensor("split", TensorProto.INT64, [2], [size, size])
    nodes = [helper.make_node("Split", ["X", "split"], ["gate", "up"], axis=-1),
             helper.make_node("Relu", ["gate"], ["relu"]),
             helper.make_node("Mul", ["relu", "relu"], ["act"]),
             helper.make_node("Mul", ["act", "up"], ["Y"])]
    graph = helper.make_graph(nodes, "act", [helper.make_tensor_value_info("X", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], [split])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


@pytest.mark.parametrize("shape", [(1, 1, 2 * 6912), (3, 40, 2 * 17), (33, 2 * 5), (2,)])
def test_bits_equal_the_onnx_ops_and_numpy(shape):
    rng = np.random.default_rng(len(shape))
    x = (rng.standard_normal(shape) * 3).astype(np.float32)
    x.flat[::7] = 0.0
    x.flat[::11] = -0.0
    fused = ort.InferenceSession(fused_model(), custom_ops.session_options(2)).run(None, {"X": x})[0]
    size = shape[-1] // 2
    plain = ort.InferenceSession(onnx_ops_model(size), providers=["CPUExecutionProvider"]).run(None, {"X": x})[0]
    gate, up = x[..., :size], x[..., size:]
    relu = np.maximum(gate, np.float32(0))
    expected = (relu * relu) * up
    assert fused.shape == shape[:-1] + (size,)
    assert np.array_equal(fused, plain)
    assert np.array_equal(fused, expected)


def test_an_odd_last_dimension_is_refused():
    sess = ort.InferenceSession(fused_model(), custom_ops.session_options(1))
    with pytest.raises(Exception, match=r"GatedReluSquared node 'act': X must be \[\.\.\., 2 I\]"):
        sess.run(None, {"X": np.ones((2, 5), np.float32)})
