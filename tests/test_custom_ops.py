"""The bitnet custom ops against the numpy reference, for every kernel this CPU runs."""

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

KERNELS = custom_ops.available_kernels()
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


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("k,n", SMALL_SHAPES)
@pytest.mark.parametrize("m", [1, 2, 7, 64, 129])
def test_small_shapes_match_reference(kernel, k, n, m):
    layer = Layer(k, n, seed=k * 1000 + n, per_channel=(m % 2 == 1))
    x = np.random.default_rng(m).standard_normal((m, k)).astype(np.float32) * 3
    layer.check(kernel, x)


@pytest.fixture(scope="module", params=SHAPES_2B4T, ids=lambda s: f"{s[0]}to{s[1]}")
def layer_2b4t(request):
    return Layer(*request.param, seed=1)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("m,threads", [(1, 1), (1, 2), (2, 2), (7, 1), (64, 2), (129, 2)])
def test_2b4t_shapes_match_reference(layer_2b4t, kernel, m, threads):
    x = np.random.default_rng(m).standard_normal((m, layer_2b4t.k)).astype(np.float32)
    layer_2b4t.check(kernel, x, threads)


@pytest.mark.parametrize("kernel", KERNELS)
def test_batch_and_sequence_dims(kernel):
    layer = Layer(80, 96)
    x = np.random.default_rng(3).standard_normal((2, 3, 80)).astype(np.float32)
    assert layer.check(kernel, x).shape == (2, 3, 96)
    empty = session(layer.model, kernel).run(None, {"X": np.zeros((0, 5, 80), np.float32)})[0]
    assert empty.shape == (0, 5, 96)


@pytest.mark.parametrize("kernel", KERNELS)
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


@pytest.mark.parametrize("kernel", KERNELS)
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
