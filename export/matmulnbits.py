"""Build ONNX Runtime ``com.microsoft.MatMulNBits`` nodes for ternary weights.

``make_matmulnbits`` turns int8 ternary weights ``w`` [N, K] (values in {-1, 0, 1}) and an
optional scale into one MatMulNBits node plus its initializers, such that

    Y = X @ (w * scale)^T        (X float32 [..., K], Y float32 [..., N])

exactly: every dequantized weight is ``(code - zero_point) * block_scale`` with
``code - zero_point`` in {-1, 0, 1} and ``block_scale`` the row's scale.

Layout (ORT contrib op spec, checked against onnxruntime 1.32's
``contrib_ops/cpu/quantization/matmul_nbits_helper.h`` and by experiment in
``tests/test_matmulnbits.py``):

- ``B``: uint8 [N, n_blocks, blob_size], ``n_blocks = ceil(K / block_size)``,
  ``blob_size = block_size * bits / 8``. Codes are packed low bits first along K: element
  ``k`` of a block sits in byte ``k // (8 // bits)`` at bit ``(k % (8 // bits)) * bits``.
  K is padded to ``n_blocks * block_size`` with the code of a zero weight (the zero point),
  so the padding contributes nothing whatever the kernel does with it.
- ``scales``: float32 [N, n_blocks] (one value per block; we repeat the row's scale).
- ``zero_points``: optional. Without it ORT uses ``2 ** (bits - 1)`` (2 for bits=2, 8 for
  bits=4), which is exactly what we store codes against (code = w + 2**(bits-1)), so by
  default we omit it. With ``zero_points=True`` it is written explicitly as uint8
  [N, ceil(n_blocks * bits / 8)], packed low bits first along the block axis, each value
  ``2 ** (bits - 1)``; the result is the same (the tests check both).

Attributes: K, N, bits, block_size, accuracy_level. ``block_size`` must be a power of two
>= 16 (ORT's check). For ORT's LUT kernel (session config ``mlas.use_lut_gemm`` = "1") bits
must be 2, block_size a multiple of 32, K a multiple of 32 and N a multiple of 128.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .graph import MS_DOMAIN


def _pack_low_first(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack the last axis of ``codes`` (uint8, each < 2**bits) low bits first into bytes.

    The last axis length must be a multiple of ``8 // bits``.
    """
    per = 8 // bits
    c = codes.astype(np.uint8).reshape(*codes.shape[:-1], codes.shape[-1] // per, per)
    out = np.zeros(c.shape[:-1], dtype=np.uint8)
    for i in range(per):
        out |= (c[..., i] << np.uint8(i * bits)).astype(np.uint8)
    return out


def pack_weights(w_ternary: np.ndarray, bits: int, block_size: int) -> np.ndarray:
    """Return B (uint8 [N, n_blocks, blob_size]) for ternary ``w`` [N, K]."""
    w = np.asarray(w_ternary)
    if w.ndim != 2:
        raise ValueError(f"w_ternary must be 2-D [N, K], got shape {w.shape}")
    if bits not in (2, 4):
        raise ValueError(f"bits must be 2 or 4, got {bits}")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")
    wi = w.astype(np.int16)
    if wi.size and (wi.min() < -1 or wi.max() > 1):
        raise ValueError("w_ternary must only hold -1, 0 and 1")
    n, k = w.shape
    n_blocks = -(-k // block_size)
    zp = 1 << (bits - 1)
    codes = np.full((n, n_blocks * block_size), zp, dtype=np.uint8)
    codes[:, :k] = (wi + zp).astype(np.uint8)
    packed = _pack_low_first(codes, bits)  # [N, n_blocks*block_size*bits/8]
    return packed.reshape(n, n_blocks, block_size * bits // 8)


def _row_scales(scale, n: int) -> np.ndarray:
    if scale is None:
        return np.ones(n, dtype=np.float32)
    s = np.asarray(scale, dtype=np.float32)
    if s.ndim == 0 or s.size == 1:
        return np.full(n, s.reshape(-1)[0], dtype=np.float32)
    if s.shape != (n,):
        raise ValueError(f"scale must be None, a float or float32 [N={n}], got shape {s.shape}")
    return s.copy()


def make_matmulnbits(
    name: str,
    x_name: str,
    y_name: str,
    w_ternary: np.ndarray,
    bits: int,
    block_size: int,
    accuracy_level: int,
    scale=None,
    *,
    zero_points: bool = False,
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """One MatMulNBits node computing ``Y = X @ (w * scale)^T`` exactly.

    ``name`` prefixes the node and initializer names (``{name}.B``, ``{name}.scales``,
    ``{name}.zero_points``). ``scale``: None (1), a float (per tensor) or float32 [N] (per
    output row). Returns ``([node], initializers)``.
    """
    b = pack_weights(w_ternary, bits, block_size)
    n, n_blocks, _ = b.shape
    k = int(np.asarray(w_ternary).shape[1])
    scales = np.repeat(_row_scales(scale, n)[:, None], n_blocks, axis=1).astype(np.float32)

    inits = [
        numpy_helper.from_array(b, f"{name}.B"),
        numpy_helper.from_array(np.ascontiguousarray(scales), f"{name}.scales"),
    ]
    inputs = [x_name, f"{name}.B", f"{name}.scales"]
    if zero_points:
        zp_codes = np.full((n, n_blocks), 1 << (bits - 1), dtype=np.uint8)
        per = 8 // bits
        pad = (-n_blocks) % per
        if pad:
            # Padding entries are never read; fill them with the same value.
            zp_codes = np.concatenate(
                [zp_codes, np.full((n, pad), 1 << (bits - 1), dtype=np.uint8)], axis=1)
        zp = _pack_low_first(zp_codes, bits)  # [N, ceil(n_blocks*bits/8)]
        assert zp.shape == (n, (n_blocks * bits + 7) // 8)
        inits.append(numpy_helper.from_array(zp, f"{name}.zero_points"))
        inputs.append(f"{name}.zero_points")

    node = helper.make_node(
        "MatMulNBits",
        inputs,
        [y_name],
        name=name,
        domain=MS_DOMAIN,
        K=k,
        N=int(n),
        bits=int(bits),
        block_size=int(block_size),
        accuracy_level=int(accuracy_level),
    )
    return [node], inits


def weight_bytes(n: int, k: int, bits: int, block_size: int, zero_points: bool = False) -> int:
    """Bytes of B + scales (+ zero points) a MatMulNBits node of this shape reads."""
    n_blocks = -(-k // block_size)
    total = n * n_blocks * (block_size * bits // 8) + n * n_blocks * 4
    if zero_points:
        total += n * ((n_blocks * bits + 7) // 8)
    return total
