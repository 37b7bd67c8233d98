"""Property-based fuzz of the BitLinear custom op against custom_ops.reference.bitlinear, for
every kernel level (skipped with the missing CPU features where this CPU lacks them): random shapes (odd K and N, tiny and not so tiny), values from
subnormal to float32 max, all-zero rows, rows with NaN or +-inf, per-tensor and per-channel
scales. One single-node ONNX model per example, as tests/test_custom_ops.py builds them.
The results must be equal bit for bit (NaN where the reference has NaN)."""

from __future__ import annotations

import os

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import custom_ops
from custom_ops import reference

from tests.kernel_levels import KERNEL_PARAMS
EXAMPLES = int(os.environ.get("BITNET_FUZZ_EXAMPLES", 150))
F32 = np.finfo(np.float32)


def model_bytes(k: int, n: int, packed: np.ndarray, scale: np.ndarray) -> bytes:
    node = helper.make_node("BitLinear", ["X", "W", "S"], ["Y"], domain=custom_ops.DOMAIN, K=k, N=n)
    graph = helper.make_graph(
        [node], "fuzz", [helper.make_tensor_value_info("X", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(packed, "W"), numpy_helper.from_array(scale, "S")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid(custom_ops.DOMAIN, 1)])
    return model.SerializeToString()


def run(kernel: str, model: bytes, x: np.ndarray, threads: int) -> np.ndarray:
    os.environ["BITNET_KERNEL"] = kernel  # read when the library is registered
    try:
        sess = ort.InferenceSession(model, custom_ops.session_options(threads))
    finally:
        del os.environ["BITNET_KERNEL"]
    return sess.run(None, {"X": x})[0]


ROW_KINDS = ("normal", "wide", "hypothesis", "zero", "nan", "inf", "max", "subnormal", "ties")


@st.composite
def cases(draw):
    k = draw(st.one_of(st.integers(1, 40), st.integers(41, 600)))
    n = draw(st.one_of(st.integers(1, 40), st.integers(41, 160)))
    m = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(m):
        kind = draw(st.sampled_from(ROW_KINDS))
        if kind == "normal":
            row = rng.standard_normal(k) * 3
        elif kind == "wide":  # magnitudes spread over float32's range
            row = rng.standard_normal(k) * 10.0 ** rng.uniform(-38, 38, k)
        elif kind == "hypothesis":
            vals = draw(st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False), min_size=1, max_size=8))
            row = rng.choice(np.array(vals, np.float64), size=k)
        elif kind == "zero":
            row = np.zeros(k)
        elif kind in ("nan", "inf"):
            row = rng.standard_normal(k)
            bad = {"nan": np.nan, "inf": draw(st.sampled_from([np.inf, -np.inf]))}[kind]
            row[rng.integers(0, k, size=draw(st.integers(1, 3)))] = bad
        elif kind == "max":
            row = rng.choice(np.array([F32.max, -F32.max, 0.0, 1.0]), size=k)
        elif kind == "subnormal":
            row = rng.standard_normal(k) * 1e-42
        else:  # values that land exactly on .5 after scaling (round half to even)
            row = rng.integers(-254, 255, size=k) / 2.0
            row[0] = 127.0
        rows.append(row.astype(np.float32))
    x = np.stack(rows)
    if m >= 2 and draw(st.booleans()):
        x = x.reshape(1, m, k)  # batch axis
    w = rng.choice(np.array([-1, 0, 1], np.int8), size=(n, k),
                   p=draw(st.sampled_from([(1 / 3, 1 / 3, 1 / 3), (0.5, 0, 0.5), (0, 1, 0), (1, 0, 0)])))
    scale_kind = draw(st.sampled_from(["one", "channel", "extreme"]))
    if scale_kind == "one":
        scale = np.array([rng.uniform(0.01, 4)], np.float32)
    elif scale_kind == "channel":
        scale = rng.uniform(-2, 2, n).astype(np.float32)
    else:
        scale = rng.choice(np.array([0.0, 1e-30, 1e30, -1.0, F32.max], np.float32), size=n).astype(np.float32)
    threads = draw(st.sampled_from([1, 2]))
    return x, w, scale, threads


@pytest.mark.parametrize("kernel", KERNEL_PARAMS)
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=cases())
def test_bitlinear_matches_reference(kernel, case):
    x, w, scale, threads = case
    n, k = w.shape
    y = run(kernel, model_bytes(k, n, custom_ops.pack_ternary(w), scale), x, threads)
    with np.errstate(all="ignore"):
        expected = reference.bitlinear(x, w, scale)
    assert y.shape == expected.shape and y.dtype == np.float32
    np.testing.assert_array_equal(y, expected)  # NaN positions must match too
