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

from .graph import MS_DOMAIN, GraphBuilder, Projection, gated
from .lm_head_int8 import make_int8_head, quantize_shared_table
from .matmulnbits import make_matmulnbits

CUSTOM_DOMAIN = CUSTOM_OP_DOMAIN

# --lm-head: how each variant computes the head (export/README.md has the fidelity figures).
#   int8: ternary -> our bitnet.MatMulI8 reading one int8 table that the embedding Gathers
#       from too (tied); baselines -> stock MatMulNBits bits=8.
#   native / fp16: the checkpoint's precision everywhere (ternary: fp16 MatMulF16 for 16-bit
#       checkpoints, fp32 Gemm otherwise; baselines: fp32 Gemm). The exact head.
#   nbits8: stock MatMulNBits bits=8 in every variant (the pre-MatMulI8 `int8`).
#   auto (default): int8 when the head table is big enough to matter in a decode step
#       (vocab x hidden >= AUTO_INT8_MIN_ELEMENTS: 2B4T's is 328M), else native (a few-MB head
#       costs nothing to read, so small models keep exact logits).
LM_HEAD_CHOICES = ("auto", "int8", "native", "fp16", "nbits8")
DEFAULT_LM_HEAD = "auto"
AUTO_INT8_MIN_ELEMENTS = 16 * 2**20  # a 32 MiB fp16 table


def resolve_lm_head(choice: str, vocab_size: int, hidden_size: int) -> str:
    """The head an export writes for a --lm-head choice: "int8", "native" or "nbits8"."""
    if choice not in LM_HEAD_CHOICES:
        raise ValueError(f"--lm-head must be one of {', '.join(LM_HEAD_CHOICES)}, not {choice!r}")
    if choice == "auto":
        return "int8" if vocab_size * hidden_size >= AUTO_INT8_MIN_ELEMENTS else "native"
    return "native" if choice == "fp16" else choice


def head_kind(variant: str, choice: str) -> str:
    """'i8' (bitnet.MatMulI8), 'nbits8' (MatMulNBits bits=8) or 'native' for a variant, given
    a resolved choice (resolve_lm_head)."""
    if choice not in ("int8", "native", "nbits8"):
        raise ValueError(f"unresolved --lm-head choice {choice!r} (call resolve_lm_head first)")
    if choice == "int8":
        return "i8" if variant == "ternary" else "nbits8"
    return choice


def _multiplier(b: GraphBuilder, name: str, multiplier: np.ndarray) -> str:
    m = np.asarray(multiplier, dtype=np.float32)
    if np.all(m == m[0]):
        m = m[:1]  # one scale for the whole tensor: a scalar multiplier
    return b.initializer(name, m)


class _Variant:
    name = ""
    file_name = ""
    extra_domains: tuple = ()
    attention_domain = MS_DOMAIN  # whose GroupQueryAttention the layers use
    kv_cache = "float32"          # the KV cache's element type (past_key_values.* / present.*)

    def __init__(self, lm_head_precision: str = "native"):
        self.lm_head_precision = lm_head_precision  # resolved: int8, native or nbits8
        self._head_weight = None  # initializer name of the lm_head table when stored as float
        self._head_is_f16 = False
        self._i8_head = None      # (codes, row scales, column scales) initializer names for MatMulI8

    @property
    def head_kind(self) -> str:
        return head_kind(self.name, self.lm_head_precision)

    def gated_activation(self, b: GraphBuilder, name: str, gate_up: str, size: int, activation: str) -> str:
        """act(gate) * up from the fused gate+up projection's output [..., 2 size]."""
        gate, up = b.op("Split", [gate_up, b.const(f"{name}.split", [size, size], np.int64)],
                        name=f"{name}.split", n_outputs=2, axis=-1)
        return gated(b, name, gate, up, activation)

    # -- embedding / lm_head (shared by all variants unless overridden) -------------------
    def embedding(self, b: GraphBuilder, ids: str, embedding, lm_head, storage_dtype) -> str:
        kind = self.head_kind
        if kind == "i8" and lm_head is None:
            return self._int8_table_embedding(b, ids, embedding)
        dtype = self.storage(storage_dtype)
        self._head_is_f16 = dtype == np.float16
        table = b.initializer("model.embed_tokens.weight", embedding.astype(dtype, copy=False))
        rows = b.op("Gather", [table, ids], name="model.embed_tokens", axis=0)
        if dtype != np.float32:
            rows = b.op("Cast", [rows], name="model.embed_tokens.cast", to=1)
        if kind == "i8":
            codes, rows_scale, cols_scale = quantize_shared_table(lm_head)
            self._i8_head = (b.initializer("lm_head.weight_i8", codes), b.initializer("lm_head.row_scales", rows_scale),
                             b.initializer("lm_head.col_scales", cols_scale))
        elif kind == "nbits8":
            self._int8_head = make_int8_head("lm_head", embedding if lm_head is None else lm_head)
        elif lm_head is None:
            self._head_weight = table  # tied: the lm_head reads the embedding initializer itself
        else:
            self._head_weight = b.initializer("lm_head.weight", lm_head.astype(dtype, copy=False))
        return rows

    def _int8_table_embedding(self, b: GraphBuilder, ids: str, embedding) -> str:
        """Tied int8 head: one int8 table [vocab, hidden] with row and column scales, read by
        the embedding (row n = codes[n] * rows[n] * cols, with Gather, Cast, Mul) and by
        MatMulI8 (lm_head)."""
        codes, rows_scale, cols_scale = quantize_shared_table(embedding)
        table = b.initializer("model.embed_tokens.weight_i8", codes)
        row_table = b.initializer("model.embed_tokens.row_scales", rows_scale)
        cols = b.initializer("model.embed_tokens.col_scales", cols_scale)
        rows = b.op("Cast", [b.op("Gather", [table, ids], name="model.embed_tokens", axis=0)],
                    name="model.embed_tokens.cast", to=1)
        row_scales = b.op("Unsqueeze", [b.op("Gather", [row_table, ids], name="model.embed_tokens.row_scales", axis=0),
                                        b.const("axes_last", [-1], np.int64)])
        self._i8_head = (table, row_table, cols)
        return b.op("Mul", [b.op("Mul", [rows, row_scales]), cols], name="model.embed_tokens.dequant")

    def storage(self, checkpoint_dtype):
        return np.float32

    def lm_head(self, b: GraphBuilder, x: str, out: str) -> None:
        if self.head_kind == "nbits8":
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
    # Ours reads the cache once per KV head and splits long caches over threads (ORT's CPU
    # kernel reads it once per query head): same inputs, outputs and attributes.
    attention_domain = CUSTOM_DOMAIN

    def gated_activation(self, b, name, gate_up, size, activation):
        if activation != "relu2":
            return super().gated_activation(b, name, gate_up, size, activation)
        # One node instead of Split, Relu, Mul, Mul; the same IEEE operations (bit-equal).
        return b.op("GatedReluSquared", [gate_up], name=name + ".gated_relu_squared", domain=CUSTOM_DOMAIN)

    def __init__(self, lm_head_precision: str = "native", kv_cache: str = "float32"):
        super().__init__(lm_head_precision)
        self.kv_cache = kv_cache  # ours reads float32 or float16 caches
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
        if self.head_kind == "i8":
            codes, rows_scale, cols = self._i8_head
            scaled = b.op("Mul", [x, cols], name="lm_head.col_scales")  # x . (codes * cols) = (x * cols) . codes
            b.op("MatMulI8", [scaled, codes, rows_scale], name="lm_head", outputs=[out], domain=CUSTOM_DOMAIN)
            return
        if self.head_kind == "native" and self._head_is_f16:
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
KV_CACHE_CHOICES = ("float32", "float16")
# MLAS has int8-activation 2-bit kernels up to block 128; at 256 ORT 1.32 silently dequantizes
# the weights to fp32 on every call (~100x slower; measured in bench/README.md).
INT2_BLOCK_SIZE = 128


def make_variant(name: str, lm_head_precision: str = "native", int2_block_size: int = INT2_BLOCK_SIZE,
                 kv_cache: str = "float32"):
    """A variant's graph builder; `kv_cache` applies to the ternary variant (the stock-ORT
    baselines keep a float32 cache: ORT's CPU GroupQueryAttention is slower on float16)."""
    if name == "ternary":
        return TernaryVariant(lm_head_precision, kv_cache)
    if name == "int2":
        return NBitsVariant(2, int2_block_size, 4, lm_head_precision)
    if name == "int4":
        return NBitsVariant(4, 32, 4, lm_head_precision)
    if name == "fp32":
        return Fp32Variant(lm_head_precision)
    raise ValueError(name)
