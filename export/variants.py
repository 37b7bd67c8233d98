"""How each variant computes a projection and the embedding/lm_head.

Every variant computes y = (xq . w^T) / s * multiplier with the per-token int8 activation
quantization of BitNet (s = 127 / max|x|, xq = clamp(round(x*s), -128, 127)):

- ternary: our custom `bitnet.BitLinear` op does all of that in one node (exact).
- fp32 (baseline): the quantization emulated with standard ops, then MatMul with the ternary
  values as float32 weights (exact: integer sums below 2**24).
- int2 / int4 (baselines): the same emulation, then MatMulNBits holding the exact ternary
  values. With accuracy_level 4 MatMulNBits re-quantizes its input to int8 per block of
  `block_size` inputs (scale max|block|/127): exact only for the block that holds the row's
  max of 127, so int2 (block 128) is the same function only while K <= 128; at 2B4T's
  K = 2560 it differs by ~0.7 % RMS per projection (tests/test_matmulnbits.py), int4 (block
  32) likewise at every K > 32.
"""

from __future__ import annotations

import numpy as np

from runtime.folder import CUSTOM_OP_DOMAIN, VARIANTS, variant_file

from .graph import GraphBuilder, Projection
from .lm_head_int8 import make_int8_head
from .matmulnbits import make_matmulnbits

CUSTOM_DOMAIN = CUSTOM_OP_DOMAIN


def _multiplier(b: GraphBuilder, name: str, multiplier: np.ndarray) -> str:
    m = np.asarray(multiplier, dtype=np.float32)
    if np.all(m == m[0]):
        m = m[:1]  # one scale for the whole tensor: a scalar multiplier
    return b.initializer(name, m)


class _Variant:
    name = ""
    file_name = ""
    extra_domains: tuple = ()

    def __init__(self, lm_head_precision: str = "native"):
        self.lm_head_precision = lm_head_precision
        self._head_weight = None  # initializer name of the lm_head table when stored as float
        self._head_is_f16 = False

    # -- embedding / lm_head (shared by all variants unless overridden) -------------------
    def embedding(self, b: GraphBuilder, ids: str, embedding, lm_head, storage_dtype) -> str:
        dtype = self.storage(storage_dtype)
        self._head_is_f16 = dtype == np.float16
        table = b.initializer("model.embed_tokens.weight", embedding.astype(dtype, copy=False))
        rows = b.op("Gather", [table, ids], name="model.embed_tokens", axis=0)
        if dtype != np.float32:
            rows = b.op("Cast", [rows], name="model.embed_tokens.cast", to=1)
        if self.lm_head_precision == "int8":
            self._int8_head = make_int8_head("lm_head", embedding if lm_head is None else lm_head)
        elif lm_head is None:
            self._head_weight = table  # tied: the lm_head reads the embedding initializer itself
        else:
            self._head_weight = b.initializer("lm_head.weight", lm_head.astype(dtype, copy=False))
        return rows

    def storage(self, checkpoint_dtype):
        return np.float32

    def lm_head(self, b: GraphBuilder, x: str, out: str) -> None:
        if self.lm_head_precision == "int8":
            nodes, inits = self._int8_head(x, out)
            b.add_protos(nodes, inits)
            return
        # Gemm with transB reads the [vocab, hidden] table as stored, so a tied head shares it.
        hidden = b.op("Shape", [x], start=-1)
        flat = b.op("Reshape", [x, b.op("Concat", [b.const("minus_one", [-1], np.int64), hidden], axis=0)])
        logits = b.op("Gemm", [flat, self._head_weight], name="lm_head", transB=1)
        lead = b.op("Shape", [x], end=-1)
        vocab = b.op("Shape", [self._head_weight], start=0, end=1)
        b.op("Reshape", [logits, b.op("Concat", [lead, vocab], axis=0)], outputs=[out])

    # -- projections ----------------------------------------------------------------------
    def linear(self, b: GraphBuilder, name: str, x: str, proj: Projection) -> str:
        raise NotImplementedError


class TernaryVariant(_Variant):
    name, file_name, extra_domains = "ternary", variant_file("ternary"), (CUSTOM_DOMAIN,)

    def __init__(self, lm_head_precision: str = "native"):
        super().__init__(lm_head_precision)
        import custom_ops  # the C++ op library; only the ternary variant needs it

        if custom_ops.DOMAIN != CUSTOM_DOMAIN:
            raise RuntimeError(f"custom_ops.DOMAIN is {custom_ops.DOMAIN!r}, expected {CUSTOM_DOMAIN!r}")
        self._pack = custom_ops.pack_ternary

    def storage(self, checkpoint_dtype):
        # Keep a 16-bit checkpoint's precision at 16 bits (our MatMulF16 reads it as is).
        return checkpoint_dtype

    def linear(self, b, name, x, proj):
        n, k = proj.w.shape
        w = b.initializer(name + ".W", self._pack(proj.w))
        s = _multiplier(b, name + ".S", proj.multiplier)
        return b.op("BitLinear", [x, w, s], name=name, domain=CUSTOM_DOMAIN, K=int(k), N=int(n))

    def lm_head(self, b, x, out):
        if self.lm_head_precision != "int8" and self._head_is_f16:
            # fp16 table read as is (a stock Cast would be constant-folded into an fp32 copy).
            b.op("MatMulF16", [x, self._head_weight], name="lm_head", outputs=[out], domain=CUSTOM_DOMAIN)
            return
        super().lm_head(b, x, out)


class _EmulatedQuantVariant(_Variant):
    """Baselines: int8 activation quantization with standard ops, then a stock matmul."""

    def linear(self, b, name, x, proj):
        absmax = b.op("ReduceMax", [b.op("Abs", [x])], name=name + ".absmax", axes=[-1], keepdims=1)
        clamped = b.op("Max", [absmax, b.const("eps_1e-5", 1e-5)])
        s = b.op("Div", [b.const("q_127", 127.0), clamped], name=name + ".act_scale")
        rounded = b.op("Round", [b.op("Mul", [x, s])])  # ONNX Round: half to even, like torch
        xq = b.op("Clip", [rounded, b.const("q_min", -128.0), b.const("q_max", 127.0)], name=name + ".xq")
        acc = self.matmul(b, name, xq, proj.w)  # exact: integer sums below 2**24
        scaled = b.op("Div", [acc, s])
        return b.op("Mul", [scaled, _multiplier(b, name + ".S", proj.multiplier)], name=name)

    def matmul(self, b, name, xq, w) -> str:
        raise NotImplementedError


class NBitsVariant(_EmulatedQuantVariant):
    def __init__(self, bits: int, block_size: int, accuracy_level: int, lm_head_precision="native"):
        super().__init__(lm_head_precision)
        self.bits, self.block_size, self.accuracy_level = bits, block_size, accuracy_level
        self.name = f"int{bits}"
        self.file_name = variant_file(self.name)

    def matmul(self, b, name, xq, w):
        out = name + ".matmul"
        nodes, inits = make_matmulnbits(out, xq, out + "/out", w, self.bits, self.block_size,
                                        self.accuracy_level)
        b.add_protos(nodes, inits)
        return out + "/out"


class Fp32Variant(_EmulatedQuantVariant):
    name, file_name = "fp32", variant_file("fp32")

    def matmul(self, b, name, xq, w):
        weight = b.initializer(name + ".weight_t", np.ascontiguousarray(w.T, dtype=np.float32))
        return b.op("MatMul", [xq, weight], name=name + ".matmul")


VARIANT_NAMES = VARIANTS
# MLAS has int8-activation 2-bit kernels up to block 128; at 256 ORT 1.32 silently dequantizes
# the weights to fp32 on every call (~100x slower; measured in bench/README.md).
INT2_BLOCK_SIZE = 128


def make_variant(name: str, lm_head_precision: str = "native", int2_block_size: int = INT2_BLOCK_SIZE):
    if name == "ternary":
        return TernaryVariant(lm_head_precision)
    if name == "int2":
        return NBitsVariant(2, int2_block_size, 4, lm_head_precision)
    if name == "int4":
        return NBitsVariant(4, 32, 4, lm_head_precision)
    if name == "fp32":
        return Fp32Variant(lm_head_precision)
    raise ValueError(name)
