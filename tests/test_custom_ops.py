"""The bitnet custom ops against the numpy reference, for every kernel level (BITNET_KERNEL):
the levels this CPU lacks are skipped with the missing features named (tests/kernel_levels.py)."""

import ctypes
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import custom_ops
from custom_ops import reference
from tests.kernel_levels import AVAILABLE as KERNELS
from tests.kernel_levels import KERNEL_PARAMS
SHAPES_2B4T = [(2560, 2560), (2560, 640), (2560, 6912), (6912, 2560)]  # (K, N)
SMALL_SHAPES = [(48, 96), (80, 160), (33, 17), (16, 1)]  # odd multiples of the packing units, and not


def test_this_cpu_runs_the_simd_kernels():
    # The CI machines have AVX-512 VNNI; on others this documents what was covered.
    assert KERNELS[0] == "reference"
    assert custom_ops.resolve_kernel("auto") == KERNELS[-1]


def ternary(rng, n, k):
    """Random ternary weights with about a third zeros."""
    return rng.choice(np.array([-1, 0, 1], np.int8), size=(n, k))


def bitlinear_model(k, n, packed, scale, x_dtype=TensorProto.FLOAT, attrs=None, w_name="W"):
    attrs = {"K": k, "N": n} if attrs is None else attrs
    node = helper.make_node("BitLinear", ["X", w_name, "S"], ["Y"], domain=custom_ops.DOMAIN, name="proj", **attrs)
    graph = helper.make_graph(
        [node], "bitlinear", [helper.make_tensor_value_info("X", x_dtype, None)],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(packed, w_name), numpy_helper.from_array(scale, "S")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(custom_ops.DOMAIN, 1)])
    return model.SerializeToString()


def session(model_bytes, kernel, threads=2):
    os.environ["BITNET_KERNEL"] = kernel  # read when the library is registered
    try:
        return ort.InferenceSession(model_bytes, custom_ops.session_options(threads))
    finally:
        del os.environ["BITNET_KERNEL"]


class Layer:
    """A random ternary layer, its model bytes, and the reference output for any x."""

    def __init__(self, k, n, seed=0, per_channel=True):
        rng = np.random.default_rng(seed)
        self.k, self.n = k, n
        self.w = ternary(rng, n, k)
        self.scale = (rng.random(n if per_channel else 1) + 0.5).astype(np.float32)
        self.model = bitlinear_model(k, n, custom_ops.pack_ternary(self.w), self.scale)

    def check(self, kernel, x, threads=2):
        y = session(self.model, kernel, threads).run(None, {"X": x})[0]
        expected = reference.bitlinear(x, self.w, self.scale)
        assert y.shape == expected.shape
        # The int32 sums are exact and the epilogue is the same float32 math: bit for bit.
        np.testing.assert_array_equal(y, expected)
        return y


@pytest.mark.parametrize("kernel", KERNEL_PARAMS)
@pytest.mark.parametrize("k,n", SMALL_SHAPES)
@pytest.mark.parametrize("m", [1, 2, 7, 64, 129])
def test_small_shapes_match_reference(kernel, k, n, m):
    layer = Layer(k, n, seed=k * 1000 + n, per_channel=(m % 2 == 1))
    x = np.random.default_rng(m).standard_normal((m, k)).astype(np.float32) * 3
    layer.check(kernel, x)


@pytest.fixture(scope="module", params=SHAPES_2B4T, ids=lambda s: f"{s[0]}to{s[1]}")
def layer_2b4t(request):
    return Layer(*request.param, seed=1)


@pytest.mark.parametrize("kernel", KERNEL_PARAMS)
@pytest.mark.parametrize("m,threads", [(1, 1), (1, 2), (2, 2), (7, 1), (64, 2), (129, 2)])
def test_2b4t_shapes_match_reference(layer_2b4t, kernel, m, threads):
    x = np.random.default_rng(m).standard_normal((m, layer_2b4t.k)).astype(np.float32)
    layer_2b4t.check(kernel, x, threads)


@pytest.mark.parametrize("kernel", KERNEL_PARAMS)
def test_batch_and_sequence_dims(kernel):
    layer = Layer(80, 96)
    x = np.random.default_rng(3).standard_normal((2, 3, 80)).astype(np.float32)
    assert layer.check(kernel, x).shape == (2, 3, 96)
    empty = session(layer.model, kernel).run(None, {"X": np.zeros((0, 5, 80), np.float32)})[0]
    assert empty.shape == (0, 5, 96)


@pytest.mark.parametrize("kernel", KERNEL_PARAMS)
def test_zero_tiny_huge_and_nonfinite_rows(kernel):
    layer = Layer(64, 32)
    x = np.random.default_rng(4).standard_normal((6, 64)).astype(np.float32)
    x[0] = 0.0                      # the 1e-5 clamp: zeros out
    x[1] = 1e-30                    # below the clamp: quantizes to zero
    x[2, :5] = [np.inf, -1, 2, 3, 4]
    x[3, 7] = np.nan
    x[4] *= 1e30                    # huge but finite
    y = layer.check(kernel, x)
    assert np.all(y[0] == 0) and np.all(y[1] == 0)
    assert np.all(np.isnan(y[2])) and np.all(np.isnan(y[3]))  # documented: non-finite row -> NaN row
    assert np.all(np.isfinite(y[4])) and np.all(np.isfinite(y[5]))


def test_quantization_rounds_half_to_even():
    # x * s lands exactly on .5 for these values: torch.round semantics say 2.5 -> 2, 3.5 -> 4.
    x = np.array([[127.0, 2.5, 3.5, -2.5, 0.5]], np.float32)
    xq, s = reference.quantize_activations(x)
    assert s[0, 0] == 1.0 and xq.tolist() == [[127, 2, 4, -2, 0]]
    w = np.zeros((32, 5), np.int8)
    w[0, 1] = w[1, 2] = w[2, 3] = w[3, 4] = 1
    model = bitlinear_model(5, 32, custom_ops.pack_ternary(w), np.ones(1, np.float32))
    for kernel in KERNELS:
        y = session(model, kernel).run(None, {"X": x})[0]
        assert y[0, :4].tolist() == [2.0, 4.0, -2.0, 0.0], kernel


def test_threads_split_work_identically():
    layer = Layer(2560, 640, seed=5)
    x = np.random.default_rng(5).standard_normal((33, 2560)).astype(np.float32)
    one = layer.check(KERNELS[-1], x, threads=1)
    two = layer.check(KERNELS[-1], x, threads=2)
    np.testing.assert_array_equal(one, two)


# ---- bad input: an ONNX Runtime error naming the problem, and the process goes on ----------

def run_error(model_bytes, x):
    with pytest.raises(Exception) as info:
        session(model_bytes, KERNELS[-1]).run(None, {"X": x})
    return str(info.value)


def test_bad_x_last_dimension():
    layer = Layer(64, 32)
    message = run_error(layer.model, np.ones((2, 63), np.float32))
    assert "BitLinear node 'proj'" in message and "K=64" in message and "[2, 63]" in message
    layer.check(KERNELS[-1], np.ones((2, 64), np.float32))  # still works afterwards


def test_bad_x_rank_and_dtype():
    layer = Layer(64, 32)
    assert "rank" in run_error(layer.model, np.array(1.0, np.float32))
    bad_type = bitlinear_model(64, 32, custom_ops.pack_ternary(layer.w), layer.scale, x_dtype=TensorProto.DOUBLE)
    with pytest.raises(Exception, match=r"(?i)type"):
        session(bad_type, KERNELS[-1])


def test_bad_w_size_and_dtype():
    layer = Layer(64, 32)
    short = custom_ops.pack_ternary(layer.w)[:, :-1].copy()
    message = run_error(bitlinear_model(64, 32, short, layer.scale), np.ones((1, 64), np.float32))
    assert "W holds" in message and "pack_ternary" in message
    as_int8 = custom_ops.pack_ternary(layer.w).view(np.int8)
    with pytest.raises(Exception, match=r"(?i)type"):
        session(bitlinear_model(64, 32, as_int8, layer.scale), KERNELS[-1])


def test_bad_s_length():
    layer = Layer(64, 32)
    model = bitlinear_model(64, 32, custom_ops.pack_ternary(layer.w), np.ones(5, np.float32))
    assert "S must hold 1 or N=32" in run_error(model, np.ones((1, 64), np.float32))


@pytest.mark.parametrize("attrs,needle", [({"K": 64}, "'N'"), ({"N": 32}, "'K'"), ({"K": 64, "N": -3}, "positive")])
def test_bad_attributes(attrs, needle):
    w = np.zeros((32, 64), np.int8)
    model = bitlinear_model(64, 32, custom_ops.pack_ternary(w), np.ones(1, np.float32), attrs=attrs)
    with pytest.raises(Exception) as info:
        session(model, KERNELS[-1]).run(None, {"X": np.ones((1, 64), np.float32)})
    assert needle in str(info.value) and "BitLinear" in str(info.value)


def test_unknown_kernel_name_is_a_clear_error():
    os.environ["BITNET_KERNEL"] = "avx9000"
    try:
        with pytest.raises(Exception, match="avx9000 is not a kernel name"):
            custom_ops.session_options()
    finally:
        del os.environ["BITNET_KERNEL"]
    assert custom_ops.resolve_kernel("avx9000") == ""


@pytest.mark.parametrize("bad", [np.array([[2, 0]]), np.zeros((2, 2, 2), np.int8), np.zeros((2, 2), np.float32)])
def test_pack_ternary_rejects_non_ternary(bad):
    with pytest.raises(ValueError):
        custom_ops.pack_ternary(bad)


# ---- MatMulF16: the fp16 embedding used as the lm_head -------------------------------------

def matmul_f16_model(w16):
    node = helper.make_node("MatMulF16", ["X", "W"], ["Y"], domain=custom_ops.DOMAIN, name="lm_head")
    graph = helper.make_graph(
        [node], "head", [helper.make_tensor_value_info("X", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], [numpy_helper.from_array(w16, "W")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(custom_ops.DOMAIN, 1)]).SerializeToString()


@pytest.mark.parametrize("kernel", KERNEL_PARAMS)
@pytest.mark.parametrize("m,k,n", [(1, 2560, 1000), (5, 37, 19), (17, 64, 7), (3, 8, 4)])
def test_matmul_f16_matches_reference(kernel, m, k, n):
    rng = np.random.default_rng(m + k + n)
    w16 = rng.standard_normal((n, k)).astype(np.float16)
    x = rng.standard_normal((m, k)).astype(np.float32)
    y = session(matmul_f16_model(w16), kernel).run(None, {"X": x})[0]
    expected = reference.matmul_f16(x, w16)
    # Float sums in a different order: bounded by K * eps * sum|x*w|.
    bound = k * np.finfo(np.float32).eps * (np.abs(x) @ np.abs(w16.astype(np.float32)).T) + 1e-6
    assert np.all(np.abs(y - expected) <= bound)


def test_matmul_f16_bad_shapes():
    w16 = np.ones((4, 8), np.float16)
    with pytest.raises(Exception, match="last dimension must equal W's K=8"):
        session(matmul_f16_model(w16), KERNELS[-1]).run(None, {"X": np.ones((1, 9), np.float32)})


def test_matmul_f16_k_zero_gives_zeros():
    w16 = np.ones((6, 0), np.float16)
    for shape in [(3, 0), (2, 2, 0)]:
        y = session(matmul_f16_model(w16), KERNELS[-1]).run(None, {"X": np.ones(shape, np.float32)})[0]
        assert y.shape == shape[:-1] + (6,) and np.all(y == 0)


@pytest.mark.parametrize("kernel", KERNEL_PARAMS)
@pytest.mark.parametrize("k", [2560, 2563, 77, 5])  # whole 64-wide steps, and tails of 3, 13, 5
def test_matmul_f16_gemv_tail_and_several_slices(kernel, k):
    """Decode (M = 1) with N > 2 x 4096: the op splits the table into 4096-row slices."""
    rng = np.random.default_rng(k)
    n = 9000
    w16 = rng.standard_normal((n, k)).astype(np.float16)
    x = rng.standard_normal((1, k)).astype(np.float32)
    y = session(matmul_f16_model(w16), kernel).run(None, {"X": x})[0]
    expected = reference.matmul_f16(x, w16)
    bound = k * np.finfo(np.float32).eps * (np.abs(x) @ np.abs(w16.astype(np.float32)).T) + 1e-6
    assert np.all(np.abs(y - expected) <= bound)


def batch_invariance(run, k, rows=9):
    """Rows 0..m-1 of a batch of m (m = 1..rows) equal the same rows computed one at a time."""
    x = np.random.default_rng(k).standard_normal((rows, k)).astype(np.float32)
    alone = np.concatenate([run(x[i:i + 1]) for i in range(rows)])
    for m in range(1, rows + 1):
        np.testing.assert_array_equal(run(x[:m]), alone[:m], err_msg=f"M={m}")
    return alone


@pytest.mark.parametrize("kernel", KERNEL_PARAMS)
@pytest.mark.parametrize("k", [2560, 100])
def test_matmul_f16_is_batch_invariant(kernel, k):
    """Each row's logits are summed in the same order whatever M is (continuous batching gives
    a sequence the same tokens alone or in a batch)."""
    w16 = np.random.default_rng(1).standard_normal((300, k)).astype(np.float16)
    sess = session(matmul_f16_model(w16), kernel)
    batch_invariance(lambda x: sess.run(None, {"X": x})[0], k)


@pytest.mark.parametrize("kernel", KERNEL_PARAMS)
def test_bitlinear_is_batch_invariant(kernel):
    layer = Layer(2560, 640, seed=9)
    sess = session(layer.model, kernel)
    batch_invariance(lambda x: sess.run(None, {"X": x})[0], 2560)


# ---- MatMulI8: the 8-bit lm_head -------------------------------------------------------------

def matmul_i8_model(codes, scales):
    node = helper.make_node("MatMulI8", ["X", "W", "S"], ["Y"], domain=custom_ops.DOMAIN, name="lm_head")
    graph = helper.make_graph(
        [node], "head", [helper.make_tensor_value_info("X", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(codes, "W"), numpy_helper.from_array(scales, "S")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(custom_ops.DOMAIN, 1)]).SerializeToString()


def int8_table(rng, n, k, extremes=True):
    codes = rng.integers(-128, 128, size=(n, k), dtype=np.int8)
    if extremes and codes.size:
        codes.flat[:: 7] = -128  # |w| = 128: the AVX2 sign trick's worst case
        codes.flat[3:: 11] = 127
    return codes, (rng.random(n) + 0.25).astype(np.float32)


@pytest.mark.parametrize("kernel", KERNEL_PARAMS)
@pytest.mark.parametrize("m,k,n", [(1, 2560, 9000), (1, 2563, 4100), (3, 191, 77), (6, 64, 33), (17, 1, 5),
                                   (130, 300, 300), (2, 127, 1)])
def test_matmul_i8_matches_reference_bit_for_bit(kernel, m, k, n):
    rng = np.random.default_rng(m * 7 + k + n)
    codes, scales = int8_table(rng, n, k)
    x = rng.standard_normal((m, k)).astype(np.float32) * 4
    x[0, k // 2] = 30.0  # an outlier sets the row's scale
    y = session(matmul_i8_model(codes, scales), kernel).run(None, {"X": x})[0]
    np.testing.assert_array_equal(y, reference.matmul_i8(x, codes, scales))


@pytest.mark.parametrize("kernel", KERNEL_PARAMS)
def test_matmul_i8_extremes_nonfinite_and_scalar_scale(kernel):
    k, n = 200, 40
    codes = np.full((n, k), -128, np.int8)
    codes[1::2] = 127
    scale = np.array([0.5], np.float32)
    x = np.random.default_rng(2).standard_normal((6, k)).astype(np.float32)
    x[0] = -1.0                 # every xq = -127 against every w = -128 / 127: the largest sums
    x[1] = 0.0
    x[2, 3] = np.inf
    x[3, 9] = np.nan
    x[4] *= 1e30
    y = session(matmul_i8_model(codes, scale), kernel).run(None, {"X": x})[0]
    np.testing.assert_array_equal(y, reference.matmul_i8(x, codes, scale))
    assert y[0, 0] == 127 * 128 * k * 0.5 / 127 and np.all(y[1] == 0)
    assert np.all(np.isnan(y[2])) and np.all(np.isnan(y[3])) and np.all(np.isfinite(y[4]))


@pytest.mark.parametrize("kernel", KERNEL_PARAMS)
def test_matmul_i8_is_batch_invariant(kernel):
    codes, scales = int8_table(np.random.default_rng(4), 700, 2560)
    sess = session(matmul_i8_model(codes, scales), kernel)
    batch_invariance(lambda x: sess.run(None, {"X": x})[0], 2560)


@pytest.mark.parametrize("kernel", KERNEL_PARAMS)
@pytest.mark.parametrize("k,n", [(191, 77), (2563, 100)])
def test_matmul_i8_rows_of_every_batch_height_equal_the_reference_and_the_row_alone(kernel, k, n):
    """M = 1..17 and 33 (the AMX kernel's 16-row blocks and 32-table-row tiles with their
    remainders, the 4-row tiles of the others), odd K and N."""
    rng = np.random.default_rng(k + n)
    codes, scales = int8_table(rng, n, k)
    sess = session(matmul_i8_model(codes, scales), kernel)
    x = rng.standard_normal((33, k)).astype(np.float32) * 3
    alone = np.concatenate([sess.run(None, {"X": x[i:i + 1]})[0] for i in range(len(x))])
    np.testing.assert_array_equal(alone, reference.matmul_i8(x, codes, scales))
    for m in [*range(2, 18), 33]:
        np.testing.assert_array_equal(sess.run(None, {"X": x[:m]})[0], alone[:m], err_msg=f"M={m}")


def test_head_tables_are_owned_copies_unless_ort_is_asked(monkeypatch):
    """By default each head op streams its own huge-page copy of the table, made when the
    session is created; BITNET_WEIGHTS=ort reads ORT's. Same bits either way; the copy goes
    with its session."""
    rng = np.random.default_rng(21)
    codes, scales = int8_table(rng, 300, 2560)
    w16 = rng.standard_normal((70, 2560)).astype(np.float16)
    x = rng.standard_normal((3, 2560)).astype(np.float32)
    held = ctypes.CDLL(custom_ops.library_path()).bitnet_owned_weight_bytes  # the library ORT loaded
    held.restype = ctypes.c_size_t
    before = held()
    monkeypatch.delenv("BITNET_WEIGHTS", raising=False)
    owned = [session(matmul_i8_model(codes, scales), KERNELS[-1]), session(matmul_f16_model(w16), KERNELS[-1])]
    assert held() - before == codes.nbytes + w16.nbytes
    monkeypatch.setenv("BITNET_WEIGHTS", "ort")
    plain = [session(matmul_i8_model(codes, scales), KERNELS[-1]), session(matmul_f16_model(w16), KERNELS[-1])]
    assert held() - before == codes.nbytes + w16.nbytes
    for i in range(2):
        for m in (1, 3):
            np.testing.assert_array_equal(owned[i].run(None, {"X": x[:m]})[0], plain[i].run(None, {"X": x[:m]})[0])
    np.testing.assert_array_equal(owned[0].run(None, {"X": x})[0], reference.matmul_i8(x, codes, scales))
    del owned
    assert held() == before


def test_a_head_table_shared_with_a_gather_stays_readable(tmp_path, monkeypatch):
    """A tied int8 table is both the embedding's Gather table and MatMulI8's W. The op copies W
    and lets the OS take back ORT's pages (from the memory-mapped external data file here);
    the Gather must still read the same rows afterwards, and the head the same table."""
    import onnx

    rng = np.random.default_rng(23)
    codes, scales = int8_table(rng, 1000, 2560)
    nodes = [helper.make_node("Gather", ["W", "ids"], ["rows"]),
             helper.make_node("MatMulI8", ["X", "W", "S"], ["Y"], domain=custom_ops.DOMAIN, name="lm_head")]
    graph = helper.make_graph(
        nodes, "tied", [helper.make_tensor_value_info("ids", TensorProto.INT64, None),
                        helper.make_tensor_value_info("X", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("rows", TensorProto.INT8, None), helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(codes, "W"), numpy_helper.from_array(scales, "S")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(custom_ops.DOMAIN, 1)])
    path = tmp_path / "tied.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location="tied.onnx.data", size_threshold=0)
    monkeypatch.delenv("BITNET_WEIGHTS", raising=False)
    sess = session(str(path), KERNELS[-1])  # from the file: ORT maps the external data
    for seed in (1, 2):
        ids = np.random.default_rng(seed).integers(0, 1000, 64)
        x = np.random.default_rng(seed).standard_normal((2, 2560)).astype(np.float32)
        rows, y = sess.run(None, {"ids": ids, "X": x})
        np.testing.assert_array_equal(rows, codes[ids])
        np.testing.assert_array_equal(y, reference.matmul_i8(x, codes, scales))


def test_matmul_i8_shapes_and_errors():
    codes, scales = int8_table(np.random.default_rng(5), 6, 8)
    sess = session(matmul_i8_model(codes, scales), KERNELS[-1])
    assert sess.run(None, {"X": np.ones((2, 3, 8), np.float32)})[0].shape == (2, 3, 6)
    assert sess.run(None, {"X": np.ones((0, 8), np.float32)})[0].shape == (0, 6)
    with pytest.raises(Exception, match="last dimension must equal W's K=8"):
        sess.run(None, {"X": np.ones((1, 9), np.float32)})
    bad_s = session(matmul_i8_model(codes, np.ones(4, np.float32)), KERNELS[-1])
    with pytest.raises(Exception, match="S must hold 1 or N=6"):
        bad_s.run(None, {"X": np.ones((1, 8), np.float32)})
    empty_k = session(matmul_i8_model(np.zeros((6, 0), np.int8), scales), KERNELS[-1])
    y = empty_k.run(None, {"X": np.ones((3, 0), np.float32)})[0]
    assert y.shape == (3, 6) and np.all(y == 0)


def test_quantize_head_table():
    w = np.random.default_rng(6).standard_normal((50, 33)).astype(np.float32)
    w[7] = 0.0
    codes, scales = custom_ops.quantize_head_table(w)
    assert codes.dtype == np.int8 and scales.dtype == np.float32 and scales[7] == 1.0
    assert np.all(np.abs(codes).max(axis=1)[np.arange(50) != 7] == 127)
    assert np.abs(codes * scales[:, None] - w).max() <= scales.max() / 2 * (1 + 1e-6)


# ---- dispatch ------------------------------------------------------------------------------

F = custom_ops
DISPATCH_TABLE = {
    # CPU (features): level, BitLinear, MatMulF16, MatMulI8
    "x86-64 baseline": (0, ("reference", "reference", "reference", "reference")),
    "Haswell / Zen 1-3 (AVX2)": (F.FEATURE_AVX2, ("avx2", "avx2", "avx2", "avx2")),
    "Alder Lake (AVX2 + AVX-VNNI)": (F.FEATURE_AVX2 | F.FEATURE_AVXVNNI, ("avxvnni", "avx2", "avx2", "avxvnni")),
    "Skylake-SP (AVX-512 F/BW/VL, no VNNI)": (F.FEATURE_AVX2 | F.FEATURE_AVX512, ("avx512", "avx2", "avx512", "avx512bw")),
    "Cascade Lake / Ice Lake / Zen 4 (AVX-512 VNNI)": (
        F.FEATURE_AVX2 | F.FEATURE_AVX512 | F.FEATURE_AVX512VNNI, ("avx512vnni", "avx512vnni", "avx512", "avx512vnni")),
    "Sapphire Rapids (both VNNI)": (
        F.FEATURE_AVX2 | F.FEATURE_AVX512 | F.FEATURE_AVX512VNNI | F.FEATURE_AVXVNNI,
        ("avx512vnni", "avx512vnni", "avx512", "avx512vnni")),
    "Sapphire Rapids with AMX tiles": (
        F.FEATURE_AVX2 | F.FEATURE_AVX512 | F.FEATURE_AVX512VNNI | F.FEATURE_AVXVNNI | F.FEATURE_AMX,
        ("amx", "amx", "avx512", "amx")),
    "AMX bits without AVX-512 VNNI (inconsistent)": (F.FEATURE_AVX2 | F.FEATURE_AMX, ("avx2",) * 4),
    # features the SIMD kernels build on missing: nothing above the reference is usable
    "AVX-512 bits without AVX2 (inconsistent)": (F.FEATURE_AVX512 | F.FEATURE_AVX512VNNI, ("reference",) * 4),
}


@pytest.mark.parametrize("cpu", sorted(DISPATCH_TABLE))
def test_dispatch_table(cpu):
    features, expected = DISPATCH_TABLE[cpu]
    table = custom_ops.kernel_table(features)
    assert (table["level"], table["BitLinear"], table["MatMulF16"], table["MatMulI8"]) == expected


def test_forced_levels_select_their_row_of_the_table():
    for level in custom_ops.KERNELS:
        assert custom_ops.kernel_table(custom_ops.LEVEL_FEATURES[level])["level"] == level
        if level in KERNELS:
            assert custom_ops.resolve_kernel(level) == level
        else:  # forcing a level this CPU lacks is refused, naming the instructions
            assert custom_ops.resolve_kernel(level) == "" and custom_ops.missing_features(level)
    assert custom_ops.resolve_kernel("auto") == custom_ops.kernel_table(custom_ops.cpu_features())["level"]


def test_levels_the_cpu_lacks_are_skipped_naming_the_features(monkeypatch):
    """What an AVX2-only machine's test summary shows (checked here on any CPU)."""
    import tests.kernel_levels as levels

    monkeypatch.setattr(custom_ops, "cpu_features", lambda: custom_ops.FEATURE_AVX2)
    assert custom_ops.missing_features("avx512vnni") == ["AVX-512 F/BW/VL", "AVX-512 VNNI"]
    assert custom_ops.missing_features("avxvnni") == ["AVX-VNNI"]
    monkeypatch.setattr(levels, "AVAILABLE", ["reference", "avx2"])
    marks = {p.values[0]: p.marks[0] for p in levels.kernel_params()}
    assert marks["reference"].args == (False,) and marks["avx2"].args == (False,)
    for level in ("avxvnni", "avx512", "avx512vnni"):
        assert marks[level].args == (True,)
        assert marks[level].kwargs["reason"].startswith(f"kernel {level} not proved here: this CPU lacks")
    assert "AVX-512 VNNI" in marks["avx512vnni"].kwargs["reason"]


# ---- bit for bit at rounding ties ------------------------------------------------------------

def constructed_ties(count=24, seed=0):
    """Rows whose float32 x*s is exactly k + 0.5 while the exact product is not: a fused
    multiply-add (or any rounding of the exact product) rounds those differently from numpy."""
    rng = np.random.default_rng(seed)
    rows = []
    while len(rows) < count:
        amax = np.float32(rng.uniform(0.5, 4.0))
        s = np.float32(127.0) / amax
        k = int(rng.integers(-120, 120))
        target = np.float32(k + 0.5)
        x = np.float32(target / s)
        found = None
        for _ in range(64):  # walk x by ulps around the tie
            for cand in (x, np.nextafter(x, np.float32(np.inf)), np.nextafter(x, np.float32(-np.inf))):
                if np.float32(cand * s) == target and float(cand) * float(s) != float(target):
                    found = cand
            if found is not None:
                break
            x = np.nextafter(x, np.float32(np.inf) if np.float32(x * s) < target else np.float32(-np.inf))
        if found is None:
            continue
        lead = int(rng.integers(0, 49))  # the tie after 0-48 other elements (vector and scalar paths)
        row = rng.uniform(-1, 1, lead + 1 + int(rng.integers(0, 40))).astype(np.float32) * amax
        row[lead] = found
        row[-1 if lead != len(row) - 1 else 0] = amax  # sets s = 127 / amax
        rows.append(row)
    return rows


def test_constructed_ties_are_real():
    """Each row has a float32 tie whose exact product is not a tie, and a kernel rounding the
    exact product (what an FMA-contracted `x * s + magic` does) would differ from numpy on
    some of them: the test below could fail."""
    fused_differs = 0
    for row in constructed_ties():
        s = np.float32(127.0) / np.abs(row).max()
        prods = row * s
        ties = (prods - np.floor(prods)) == np.float32(0.5)
        exact = row.astype(np.float64) * np.float64(s)
        assert np.any(ties & (exact != prods.astype(np.float64)))
        fused_differs += int(np.any(np.round(exact) != np.round(prods)))
    assert fused_differs >= 5


@pytest.mark.parametrize("kernel", KERNEL_PARAMS)
def test_ties_round_like_numpy_in_every_op(kernel):
    for i, row in enumerate(constructed_ties()):
        k = len(row)
        x = row[None, :]
        w = ternary(np.random.default_rng(i), 33, k)
        scale = np.ones(33, np.float32)
        model = bitlinear_model(k, 33, custom_ops.pack_ternary(w), scale)
        y = session(model, kernel, threads=1).run(None, {"X": x})[0]
        np.testing.assert_array_equal(y, reference.bitlinear(x, w, scale))
        codes, scales = int8_table(np.random.default_rng(i), 20, k)
        y8 = session(matmul_i8_model(codes, scales), kernel, threads=1).run(None, {"X": x})[0]
        np.testing.assert_array_equal(y8, reference.matmul_i8(x, codes, scales))


# ---- the build -----------------------------------------------------------------------------

def test_library_path_does_not_rebuild_when_fresh():
    path = Path(custom_ops.library_path())
    before = path.stat().st_mtime_ns
    assert Path(custom_ops.library_path()).stat().st_mtime_ns == before


def run_build(env_changes, tmp_path):
    env = dict(os.environ, BITNET_BUILD_DIR=str(tmp_path / "build"), **env_changes)
    return subprocess.run([sys.executable, "-m", "custom_ops", "build"], env=env, capture_output=True, text=True,
                          cwd=Path(custom_ops.__file__).parent.parent)


def test_missing_compiler_is_named(tmp_path):
    result = run_build({"CXX": "no-such-compiler"}, tmp_path)
    assert result.returncode == 1 and "no-such-compiler" in result.stderr and "not found" in result.stderr


def test_bad_ort_include_dir_is_named(tmp_path):
    result = run_build({"ORT_INCLUDE_DIR": str(tmp_path)}, tmp_path)
    assert result.returncode == 1 and "ORT_INCLUDE_DIR" in result.stderr


def test_stale_library_is_rebuilt(tmp_path):
    include = Path(custom_ops.build.include_dir())  # the headers the main build already fetched
    first = run_build({"ORT_INCLUDE_DIR": str(include)}, tmp_path)
    assert first.returncode == 0, first.stderr
    library = Path(first.stdout.strip())
    assert "compiling" in first.stderr
    os.utime(library, (0, 0))  # older than every source
    second = run_build({"ORT_INCLUDE_DIR": str(include)}, tmp_path)
    assert second.returncode == 0 and "compiling" in second.stderr
    assert library.stat().st_mtime > 0
    third = run_build({"ORT_INCLUDE_DIR": str(include)}, tmp_path)
    assert "compiling" not in third.stderr
