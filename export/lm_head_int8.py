"""8-bit lm_heads: the int8 table of our `bitnet.MatMulI8` and stock MatMulNBits bits=8.

- `quantize_shared_table` (ternary variant): one int8 table [vocab, hidden] with a scale per
  row and per column, shared by the embedding Gather and the MatMulI8 head.
- `make_int8_head` (baselines, default; every variant with `--lm-head nbits8`): MatMulNBits
  bits=8, per block of BLOCK_SIZE inputs of each vocabulary row: scale = max|W|/127,
  code = round(W/scale) + 128 (ORT's default 8-bit zero point).
Both halve the bytes the head reads versus fp16; the effect on logits is measured
(bench/head_fidelity.py) and reported in export/README.md.
"""

from __future__ import annotations

import numpy as np
from onnx import helper, numpy_helper

BLOCK_SIZE = 32
ACCURACY_LEVEL = 4  # int8 activations: the fast int8 x int8 kernel
CHUNK_ROWS = 8192


def quantize_shared_table(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float [N, K] -> (codes int8 [N, K], row scales float32 [N], column scales float32 [K])
    with weight[n, k] ~= codes[n, k] * rows[n] * cols[k].

    Column scales take out outlier channels before the per-row int8 quantization
    (custom_ops.quantize_head_table), so the other channels of a row keep their precision:
    cols[k] is the RMS of column k after each row is divided by its own RMS (so large rows do
    not decide it), normalized to mean 1. The head multiplies x by cols first (MatMulI8's
    activations carry ~15 bits) and the embedding multiplies its rows by them. Measured on a
    table with outlier channels and log-normal row norms: worst row error 1.5e-2 vs 4.0e-2 with
    per-row scales alone (export/README.md).
    """
    import custom_ops  # only the ternary variant (which needs custom_ops anyway) uses this

    if weight.shape[1] == 0:
        return np.zeros(weight.shape, np.int8), np.ones(weight.shape[0], np.float32), np.zeros(0, np.float32)
    sumsq = np.zeros(weight.shape[1], np.float64)
    for start in range(0, weight.shape[0], CHUNK_ROWS):
        chunk = np.asarray(weight[start:start + CHUNK_ROWS], np.float64)
        row_rms = np.sqrt((chunk ** 2).mean(axis=1, keepdims=True))
        row_rms[row_rms == 0] = 1.0
        sumsq += ((chunk / row_rms) ** 2).sum(axis=0)
    cols = np.sqrt(sumsq / max(weight.shape[0], 1))
    cols[cols == 0] = 1.0
    cols = (cols / cols.mean()).astype(np.float32)
    codes = np.empty(weight.shape, np.int8)
    rows = np.empty(weight.shape[0], np.float32)
    for start in range(0, weight.shape[0], CHUNK_ROWS):  # small float temporaries
        chunk = np.asarray(weight[start:start + CHUNK_ROWS], np.float32) / cols
        codes[start:start + CHUNK_ROWS], rows[start:start + CHUNK_ROWS] = custom_ops.quantize_head_table(chunk)
    return codes, rows, cols


def quantize_int8_blocks(weight: np.ndarray, block_size: int = BLOCK_SIZE):
    """float [N, K] -> (codes uint8 [N, n_blocks, block_size], scales float32 [N, n_blocks])."""
    n, k = weight.shape
    n_blocks = -(-k // block_size)
    codes = np.empty((n, n_blocks, block_size), dtype=np.uint8)
    scales = np.empty((n, n_blocks), dtype=np.float32)
    for start in range(0, n, CHUNK_ROWS):  # chunks keep the float temporaries small
        rows = slice(start, min(start + CHUNK_ROWS, n))
        padded = np.zeros((rows.stop - start, n_blocks * block_size), dtype=np.float32)
        padded[:, :k] = weight[rows]
        blocks = padded.reshape(-1, n_blocks, block_size)
        scale = np.abs(blocks).max(axis=2) / np.float32(127.0)
        scale[scale == 0] = 1.0
        codes[rows] = (np.clip(np.rint(blocks / scale[..., None]), -127, 127) + 128).astype(np.uint8)
        scales[rows] = scale
    return codes, scales


def make_int8_head(name: str, weight: np.ndarray):
    """Return a function (x_name, y_name) -> (nodes, initializers) computing x @ W^T."""
    codes, scales = quantize_int8_blocks(weight)
    n, k = weight.shape

    def build(x_name: str, y_name: str):
        inits = [numpy_helper.from_array(codes, f"{name}.B8"),
                 numpy_helper.from_array(scales, f"{name}.scales")]
        node = helper.make_node("MatMulNBits", [x_name, f"{name}.B8", f"{name}.scales"], [y_name],
                                name=name, domain="com.microsoft", K=int(k), N=int(n), bits=8,
                                block_size=BLOCK_SIZE, accuracy_level=ACCURACY_LEVEL)
        return [node], inits

    return build
