"""8-bit lm_heads: the int8 table of our `bitnet.MatMulI8` and stock MatMulNBits bits=8.

- `quantize_head_table` (ternary variant, default): one int8 table [vocab, hidden] with one
  scale per row, shared by the embedding Gather and the MatMulI8 head (custom_ops' function).
- `make_int8_head` (baselines, default; every variant with `--lm-head nbits8`): MatMulNBits
  bits=8, per block of BLOCK_SIZE inputs of each vocabulary row: scale = max|W|/127,
  code = round(W/scale) + 128 (ORT's default 8-bit zero point).
Both halve the bytes the head reads versus fp16; the effect on logits is measured
(bench/head_fidelity.py) and reported in export/README.md.
"""

from __future__ import annotations

import numpy as np
from onnx import helper, numpy_helper


def quantize_head_table(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float [N, K] -> (int8 [N, K], float32 scales [N]): custom_ops.quantize_head_table
    (imported here so the baselines' export does not need the custom_ops package)."""
    import custom_ops

    return custom_ops.quantize_head_table(weight)

BLOCK_SIZE = 32
ACCURACY_LEVEL = 4  # int8 activations: the fast int8 x int8 kernel
CHUNK_ROWS = 8192


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
