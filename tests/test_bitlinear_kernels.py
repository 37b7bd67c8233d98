"""BitLinear's decode (M = 1) kernels and their batch invariance, for every kernel level.

Each level's kernel has a one-row path (decode) and a multi-row tile path (prefill and
batches); they unpack the 2-bit codes differently, so both are checked bit for bit against
custom_ops/reference.py, and every row of a batch of M = 1..9 must equal the same row run
alone (continuous batching gives a sequence the same tokens alone or in any batch). Shapes
cover several column groups, a partial last group (N not a multiple of 32), K not a multiple
of the 16-value block, and K long enough to use many blocks per int16 chunk.
"""

import ctypes
import os

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import custom_ops
from custom_ops import reference
from tests.kernel_levels import KERNEL_PARAMS

# (K, N): one group; several groups with a partial last one; K off the block size; 2B4T's
# k_proj and down_proj shapes (K = 6912: 432 blocks, 54 int16 chunks in the AVX2 row kernel).
SHAPES = [(16, 32), (200, 70), (100, 33), (2560, 640), (6912, 96)]


def bitlinear_session(w, scale, kernel, threads=2):
    import onnxruntime as ort

    n, k = w.shape
    node = helper.make_node("BitLinear", ["X", "W", "S"], ["Y"], domain=custom_ops.DOMAIN, K=k, N=n)
    graph = helper.make_graph(
        [node], "bitlinear", [helper.make_tensor_value_info("X", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(custom_ops.pack_ternary(w), "W"), numpy_helper.from_array(scale, "S")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid(custom_ops.DOMAIN, 1)])
    os.environ["BITNET_KERNEL"] = kernel  # read when the library is registered
    try:
        return ort.InferenceSession(model.SerializeToString(), custom_ops.session_options(threads))
    finally:
        del os.environ["BITNET_KERNEL"]


def layer(k, n, seed):
    rng = np.random.default_rng(seed)
    w = rng.choice(np.array([-1, 0, 1], np.int8), size=(n, k))
    scale = (rng.random(n) + 0.5).astype(np.float32)
    return w, scale


@pytest.mark.parametrize("kernel", KERNEL_PARAMS)
@pytest.mark.parametrize("k,n", SHAPES)
def test_rows_of_any_batch_equal_the_reference_and_the_row_alone(kernel, k, n):
    w, scale = layer(k, n, seed=k + n)
    sess = bitlinear_session(w, scale, kernel)
    x = np.random.default_rng(k * n).standard_normal((9, k)).astype(np.float32) * 2
    alone = np.concatenate([sess.run(None, {"X": x[i:i + 1]})[0] for i in range(9)])
    np.testing.assert_array_equal(alone, reference.bitlinear(x, w, scale))
    for m in range(1, 10):
        np.testing.assert_array_equal(sess.run(None, {"X": x[:m]})[0], alone[:m], err_msg=f"M={m}")


@pytest.mark.parametrize("kernel", KERNEL_PARAMS)
@pytest.mark.parametrize("k,n", [(200, 70), (100, 33), (1104, 96)])
def test_multi_row_tiles_of_every_height_are_batch_invariant(kernel, k, n):
    """Batches of M = 1..17 and past the 16- and 32-row tiles (AMX row tiles, VNNI 6-row tiles,
    AVX2 2-row tiles with their remainders), odd K and N: every row is the reference's and the
    row run alone."""
    w, scale = layer(k, n, seed=3 * k + n)
    sess = bitlinear_session(w, scale, kernel)
    x = np.random.default_rng(k + 7 * n).standard_normal((50, k)).astype(np.float32)
    alone = np.concatenate([sess.run(None, {"X": x[i:i + 1]})[0] for i in range(len(x))])
    np.testing.assert_array_equal(alone, reference.bitlinear(x, w, scale))
    for m in [*range(2, 18), 31, 32, 33, 48, 50]:
        np.testing.assert_array_equal(sess.run(None, {"X": x[:m]})[0], alone[:m], err_msg=f"M={m}")


@pytest.mark.parametrize("kernel", KERNEL_PARAMS)
def test_extreme_codes_and_activations_do_not_overflow(kernel):
    """All weights +1 (code 2, the largest unsigned operand) or all -1, against activations
    that quantize to -127 or +127 everywhere (the extremes absmax quantization produces): the
    largest partial sums the int16 and int32 chunks of the kernels meet, at K = 6912."""
    k, n = 6912, 64
    scale = np.ones(n, np.float32)
    for w in (np.ones((n, k), np.int8), -np.ones((n, k), np.int8)):
        sess = bitlinear_session(w, scale, kernel)
        for x in (np.full((1, k), -1.0, np.float32), np.full((1, k), 1.0, np.float32),
                  np.where(np.arange(k) % 2 == 0, -1.0, 127 / 128).astype(np.float32)[None]):
            y = sess.run(None, {"X": x})[0]
            np.testing.assert_array_equal(y, reference.bitlinear(x, w, scale))


@pytest.mark.parametrize("kernel", KERNEL_PARAMS)
def test_decode_rows_with_one_thread_and_two_agree(kernel):
    w, scale = layer(2560, 2560, seed=5)
    x = np.random.default_rng(6).standard_normal((1, 2560)).astype(np.float32)
    one = bitlinear_session(w, scale, kernel, threads=1).run(None, {"X": x})[0]
    two = bitlinear_session(w, scale, kernel, threads=2).run(None, {"X": x})[0]
    np.testing.assert_array_equal(one, two)
    np.testing.assert_array_equal(one, reference.bitlinear(x, w, scale))


def test_owned_weights_compute_the_same(monkeypatch):
    """By default each kernel reads its own huge-page copy of W made at session creation;
    BITNET_WEIGHTS=ort reads ORT's buffer. The results are the same bits, for decode rows and
    batches, and the copy goes with its session."""
    w, scale = layer(2560, 640, seed=11)
    x = np.random.default_rng(12).standard_normal((9, 2560)).astype(np.float32)
    held = ctypes.CDLL(custom_ops.library_path()).bitnet_owned_weight_bytes  # the library ORT loaded
    held.restype = ctypes.c_size_t
    before = held()
    monkeypatch.delenv("BITNET_WEIGHTS", raising=False)
    owned = bitlinear_session(w, scale, "auto")
    assert held() - before == custom_ops.pack_ternary(w).nbytes  # this kernel holds a copy
    monkeypatch.setenv("BITNET_WEIGHTS", "ort")
    plain = bitlinear_session(w, scale, "auto")
    assert held() - before == custom_ops.pack_ternary(w).nbytes  # the default holds none
    for m in (1, 2, 9):
        y = owned.run(None, {"X": x[:m]})[0]
        np.testing.assert_array_equal(y, plain.run(None, {"X": x[:m]})[0])
        np.testing.assert_array_equal(y, reference.bitlinear(x[:m], w, scale))
    del owned
    assert held() == before  # released with its session
