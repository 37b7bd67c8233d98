"""Ternary weights: unpacking the checkpoint's 2-bit layout and absmean quantization."""

from __future__ import annotations

import numpy as np

from .errors import ExportError

VALUES_PER_BYTE = 4


def unpack_rows(packed: np.ndarray) -> np.ndarray:
    """uint8 [out/4, in] -> int8 [out, in], the layout of transformers' `unpack_weights`.

    Output row i*(out/4) + r is bits 2i..2i+1 of packed row r, minus 1.
    """
    rows = packed.shape[0]
    out = np.empty((rows * VALUES_PER_BYTE,) + packed.shape[1:], dtype=np.int8)
    for i in range(VALUES_PER_BYTE):
        out[i * rows:(i + 1) * rows] = ((packed >> (2 * i)) & 3).astype(np.int8) - 1
    if (out > 1).any():  # code 3 -> value 2 is not ternary
        raise ExportError("packed weights hold the invalid 2-bit code 3 (value 2); corrupt checkpoint?")
    return out


def pack_rows(w: np.ndarray) -> np.ndarray:
    """Inverse of `unpack_rows`: int8 ternary [out, in] -> uint8 [out/4, in]. The one packer
    of this layout: the test checkpoints (tests/checkpoints.py), the 2B4T-shaped benchmark
    checkpoint (bench/make_2b4t_checkpoint.py) and the demo model (demo/pack.py) use it."""
    out_features = w.shape[0]
    if out_features % VALUES_PER_BYTE:
        raise ValueError("out features must be a multiple of 4 to pack")
    rows = out_features // VALUES_PER_BYTE
    codes = (w.astype(np.int16) + 1).astype(np.uint8)
    packed = np.zeros((rows,) + w.shape[1:], dtype=np.uint8)
    for i in range(VALUES_PER_BYTE):
        packed |= codes[i * rows:(i + 1) * rows] << np.uint8(2 * i)
    return packed


def absmean_quantize(weight: np.ndarray) -> tuple[np.float32, np.ndarray]:
    """BitNet b1.58 absmean: c = 1/mean(|W|).clamp(1e-5), w = clamp(round(W*c), -1, 1).

    Returns (c, w) with W ~ w / c; float32 throughout as transformers' WeightQuant does.
    """
    w32 = weight.astype(np.float32, copy=False)
    mean = np.float32(np.abs(w32).mean(dtype=np.float32))
    c = np.float32(1.0) / max(mean, np.float32(1e-5))
    # np.rint rounds half to even, like torch.round.
    w = np.clip(np.rint(w32 * c), -1, 1).astype(np.int8)
    return c, w


def float_to_ternary(weight: np.ndarray, name: str) -> np.ndarray:
    """Float weights that already hold -1/0/1 (unpacked offline checkpoints) -> int8."""
    w = weight.astype(np.int8)
    if not np.array_equal(w.astype(np.float32), weight) or np.abs(w).max(initial=0) > 1:
        raise ExportError(f"{name}.weight should hold only -1, 0 and 1 (offline autobitlinear)")
    return w
