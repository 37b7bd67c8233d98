"""numpy reference of the bitnet ops' math, independent of the packed layout (for tests)."""

from __future__ import annotations

import numpy as np


def quantize_activations(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row absmax int8 quantization of BitNet b1.58: returns (xq as int32, s) with
    s = 127 / max(max|x|, 1e-5) and xq = clamp(round_half_even(x * s), -128, 127), float32 math.
    Rows holding inf or NaN get s = NaN (so their outputs are NaN) and xq = 0."""
    x = np.asarray(x, dtype=np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        amax = np.abs(x).max(axis=-1, keepdims=True)
        bad = ~np.isfinite(x).all(axis=-1, keepdims=True)
        s = np.float32(127.0) / np.maximum(amax, np.float32(1e-5))
        xq = np.clip(np.round(x * s), -128, 127)
    xq = np.where(bad, 0, xq).astype(np.int32)
    s = np.where(bad, np.float32(np.nan), s).astype(np.float32)
    return xq, s


def bitlinear(x: np.ndarray, w: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """y = (xq @ w^T) / s * S for x [..., K], ternary w [N, K], S [1] or [N] (float32)."""
    xq, s = quantize_activations(x)
    # float64 products and sums of these integers are exact (|dot| <= 128 * K << 2**53)
    dot = xq.reshape(-1, xq.shape[-1]).astype(np.float64) @ np.asarray(w, dtype=np.float64).T
    dot = dot.reshape(*xq.shape[:-1], w.shape[0]).astype(np.float32)
    with np.errstate(invalid="ignore"):
        return (dot / s) * np.asarray(scale, dtype=np.float32).reshape(-1)


def matmul_f16(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """y = x @ w^T for float32 x [..., K] and float16 w [N, K], computed in float64."""
    return (np.asarray(x, np.float64) @ np.asarray(w, np.float64).T).astype(np.float32)



def matmul_i8(x: np.ndarray, w: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """MatMulI8 (the 8-bit lm_head) for x [..., K], int8 w [N, K], S [1] or [N] (float32):
    x in two int8 terms, xq/s = quantize_activations(x) and rq/r = quantize_activations of the
    residual x - xq / s (float32), then y = ((xq @ w^T) / s + (rq @ w^T) / r) * S."""
    x = np.asarray(x, dtype=np.float32)
    xq, s = quantize_activations(x)
    with np.errstate(invalid="ignore", over="ignore"):
        residual = x - xq.astype(np.float32) / s
    rq, r = quantize_activations(residual)
    w64 = np.asarray(w, dtype=np.float64)

    def dot(q):  # exact: |sums| < 2**31 << 2**53
        return (q.reshape(-1, q.shape[-1]).astype(np.float64) @ w64.T).reshape(*q.shape[:-1], -1).astype(np.float32)

    with np.errstate(invalid="ignore"):
        return (dot(xq) / s + dot(rq) / r) * np.asarray(scale, dtype=np.float32).reshape(-1)
