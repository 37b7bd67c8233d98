"""Optional int8 lm_head (`--lm-head int8`): stock MatMulNBits with bits=8.

Per block of BLOCK_SIZE inputs of each vocabulary row: scale = max|W|/127,
code = round(W/scale) + 128 (ORT's default 8-bit zero point). Halves the bytes the head reads
versus fp16; the effect on logits is measured by the tests and reported in export/README.md.
"""

from __future__ import annotations

import numpy as np
from onnx import helper, numpy_helper

BLOCK_SIZE = 32
ACCURACY_LEVEL = 4  # int8 activations: the fast int8 x int8 kernel


def quantize_int8_blocks(weight: np.ndarray, block_size: int = BLOCK_SIZE):
    """float [N, K] -> (codes uint8 [N, n_blocks, block_size], scales float32 [N, n_blocks])."""
    n, k = weight.shape
    n_blocks = -(-k // block_size)
    padded = np.zeros((n, n_blocks * block_size), dtype=np.float32)
    padded[:, :k] = weight
    blocks = padded.reshape(n, n_blocks, block_size)
    scales = np.abs(blocks).max(axis=2) / 127.0
    scales[scales == 0] = 1.0
    q = np.clip(np.rint(blocks / scales[..., None]), -127, 127)
    return (q + 128).astype(np.uint8), scales.astype(np.float32)


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
