"""Build the decoder graph (one variant) node by node.

The graph follows the Optimum / onnxruntime-genai decoder convention (docs/ARCHITECTURE.md)
and uses ONNX Runtime's CPU contrib ops: GroupQueryAttention (packed QKV, rotary, KV cache,
shared past/present buffers; the ternary variant takes the bitnet domain's twin of it) and
(Skip)SimplifiedLayerNormalization. How a projection or the embedding/lm_head is computed is
the variant's business (`variants.py`); this module only wires the transformer around them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from runtime.folder import ATTENTION_MASK, INPUT_IDS, LOGITS, NUM_LOGITS_TO_KEEP, past_name, present_name

from .checkpoint import ModelSpec
from .external_data import ExternalDataWriter

OPSET = 17
MS_DOMAIN = "com.microsoft"


@dataclass
class Projection:
    """y = (xq . w^T) / s * multiplier, multiplier per output row (float32 [N])."""

    w: np.ndarray  # int8 [N, K]
    multiplier: np.ndarray  # float32 [N]
    input_norm: np.ndarray | None = None  # use_rms_norm: RMSNorm weight [K] applied to x first


@dataclass
class LayerWeights:
    input_norm: np.ndarray
    post_attention_norm: np.ndarray
    attn_sub_norm: np.ndarray | None  # None: no sub-norms (LLaMA-architecture BitNet)
    ffn_sub_norm: np.ndarray | None
    # [q, k, v stacked along N] (the packed-QKV order GroupQueryAttention reads), or [q, k, v]
    # separately when their use_rms_norm input norms differ; the same for [gate, up]
    qkv: list[Projection]
    o: Projection
    gate_up: list[Projection]
    down: Projection


class GraphBuilder:
    """Collects nodes and initializers; initializers go straight to the external data file."""

    def __init__(self, writer: ExternalDataWriter):
        self.writer = writer
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self._count = 0
        self._consts: set[str] = set()

    def initializer(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(self.writer.tensor(name, array))
        return name

    def add_protos(self, nodes, initializers) -> None:
        self.nodes.extend(nodes)
        self.initializers.extend(self.writer.from_proto(t) for t in initializers)

    def const(self, name: str, value, dtype=np.float32) -> str:
        """A small inline constant, shared by name across the graph."""
        if name in self._consts:
            return name
        self._consts.add(name)
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op_type: str, inputs: list[str], name: str | None = None, outputs=None,
           n_outputs: int = 1, domain: str = "", **attrs):
        self._count += 1
        name = name or f"{op_type}_{self._count}"
        if outputs is None:
            outputs = [f"{name}/out{i}" for i in range(n_outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=name, domain=domain, **attrs))
        return outputs[0] if len(outputs) == 1 else outputs


def gated(b: GraphBuilder, name: str, gate: str, up: str, activation: str) -> str:
    """act(gate) * up in ONNX ops: relu(x)^2 (BitNet) or silu(x) = x * sigmoid(x), as torch computes it."""
    if activation == "relu2":
        relu = b.op("Relu", [gate], name=f"{name}.relu")
        act = b.op("Mul", [relu, relu], name=f"{name}.relu_squared")
    else:
        act = b.op("Mul", [gate, b.op("Sigmoid", [gate], name=f"{name}.sigmoid")], name=f"{name}.silu")
    return b.op("Mul", [act, up], name=f"{name}.gated")


def rope_cache(spec: ModelSpec) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [max_positions, head_dim/2] for rotate-half RoPE, as transformers computes them."""
    dim = spec.head_dim
    inv_freq = (1.0 / (spec.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))).astype(np.float32)
    positions = np.arange(spec.max_position_embeddings, dtype=np.float32)
    angles = positions[:, None] * inv_freq[None, :]  # float32 product, like torch
    return np.cos(angles.astype(np.float64)).astype(np.float32), np.sin(angles.astype(np.float64)).astype(np.float32)


class DecoderGraph:
    """The decoder of one variant. Call embed(), add_layer() per layer, then finish()."""

    def __init__(self, spec: ModelSpec, variant, writer: ExternalDataWriter):
        self.spec, self.variant = spec, variant
        self.b = GraphBuilder(writer)
        self.residual = None  # residual stream entering the next norm
        self.pending = None  # output of the last sublayer, not yet added to the residual
        self._inputs, self._outputs = [], []
        self._attention_inputs()

    # -- graph inputs and attention bookkeeping -------------------------------------------
    def _attention_inputs(self) -> None:
        s, b = self.spec, self.b
        self._inputs += [
            helper.make_tensor_value_info(INPUT_IDS, TensorProto.INT64, ["batch_size", "sequence_length"]),
            helper.make_tensor_value_info(ATTENTION_MASK, TensorProto.INT64, ["batch_size", "total_sequence_length"]),
        ]
        # seqlens_k = tokens so far - 1 per row; total_sequence_length = mask width.
        mask_sum = b.op("ReduceSum", ["attention_mask", b.const("axes_1", [1], np.int64)], keepdims=0)
        minus_one = b.op("Sub", [mask_sum, b.const("one_i64", 1, np.int64)])
        self.seqlens_k = b.op("Cast", [minus_one], name="seqlens_k", to=TensorProto.INT32)
        mask_shape = b.op("Shape", ["attention_mask"])
        total = b.op("Gather", [mask_shape, b.const("index_1", 1, np.int64)], axis=0)
        self.total_len = b.op("Cast", [total], name="total_sequence_length", to=TensorProto.INT32)
        cos, sin = rope_cache(s)
        self.cos = b.initializer("rope.cos_cache", cos)
        self.sin = b.initializer("rope.sin_cache", sin)

    def embed(self, embedding: np.ndarray, lm_head: np.ndarray | None, storage_dtype) -> None:
        """Token embedding; also registers the lm_head weights (None when tied)."""
        self.residual = self.variant.embedding(self.b, "input_ids", embedding, lm_head, storage_dtype)

    def _norm(self, name: str, weight: np.ndarray) -> str:
        """RMSNorm of the residual stream, adding the pending sublayer output first if any."""
        b, eps = self.b, self.spec.rms_norm_eps
        gamma = b.initializer(name + ".weight", weight.astype(np.float32))
        if self.pending is None:
            return b.op("SimplifiedLayerNormalization", [self.residual, gamma], name=name,
                        axis=-1, epsilon=eps, stash_type=1)
        out, _, _, summed = b.op("SkipSimplifiedLayerNormalization", [self.pending, self.residual, gamma],
                                 name=name, n_outputs=4, domain=MS_DOMAIN, epsilon=eps)
        self.residual, self.pending = summed, None
        return out

    def _sub_norm(self, name: str, x: str, weight: np.ndarray | None) -> str:
        if weight is None:
            return x
        gamma = self.b.initializer(name + ".weight", weight.astype(np.float32))
        return self.b.op("SimplifiedLayerNormalization", [x, gamma], name=name, axis=-1,
                         epsilon=self.spec.rms_norm_eps, stash_type=1)

    def _linear(self, name: str, x: str, proj: Projection) -> str:
        """The variant's projection, after the projection's own input RMSNorm if it has one."""
        if proj.input_norm is not None:
            gamma = self.b.initializer(name + ".rms_norm.weight", proj.input_norm.astype(np.float32))
            x = self.b.op("SimplifiedLayerNormalization", [x, gamma], name=name + ".rms_norm", axis=-1,
                          epsilon=self.spec.linear_norm_eps, stash_type=1)
        return self.variant.linear(self.b, name, x, proj)

    def add_layer(self, i: int, lw: LayerWeights) -> None:
        s, b = self.spec, self.b
        p = f"model.layers.{i}"
        kv_shape = ["batch_size", s.num_key_value_heads, "past_sequence_length", s.head_dim]
        present_shape = ["batch_size", s.num_key_value_heads, "present_sequence_length", s.head_dim]
        past_k, past_v = past_name(i, "key"), past_name(i, "value")
        pres_k, pres_v = present_name(i, "key"), present_name(i, "value")
        cache = TensorProto.FLOAT16 if self.variant.kv_cache == "float16" else TensorProto.FLOAT
        self._inputs += [helper.make_tensor_value_info(n, cache, kv_shape) for n in (past_k, past_v)]
        self._outputs += [helper.make_tensor_value_info(n, cache, present_shape) for n in (pres_k, pres_v)]

        n = self._norm(f"{p}.input_layernorm", lw.input_norm)
        if len(lw.qkv) == 1:  # packed QKV
            qkv = [self._linear(f"{p}.self_attn.qkv_proj", n, lw.qkv[0]), "", ""]
        else:
            qkv = [self._linear(f"{p}.self_attn.{m}_proj", n, proj) for m, proj in zip("qkv", lw.qkv)]
        attn, _, _ = b.op("GroupQueryAttention",
                    qkv + [past_k, past_v, self.seqlens_k, self.total_len, self.cos, self.sin],
                    name=f"{p}.self_attn.attention", outputs=[f"{p}.self_attn.out", pres_k, pres_v],
                    domain=self.variant.attention_domain, num_heads=s.num_attention_heads,
                    kv_num_heads=s.num_key_value_heads,
                    do_rotary=1, rotary_interleaved=0, scale=float(s.head_dim ** -0.5))
        attn = self._sub_norm(f"{p}.self_attn.attn_sub_norm", attn, lw.attn_sub_norm)
        self.pending = self._linear(f"{p}.self_attn.o_proj", attn, lw.o)

        n = self._norm(f"{p}.post_attention_layernorm", lw.post_attention_norm)
        if len(lw.gate_up) == 1:
            gate_up = self._linear(f"{p}.mlp.gate_up_proj", n, lw.gate_up[0])
            hidden = self.variant.gated_activation(b, f"{p}.mlp", gate_up, s.intermediate_size, s.activation)
        else:
            gate, up = (self._linear(f"{p}.mlp.{m}_proj", n, proj) for m, proj in zip(("gate", "up"), lw.gate_up))
            hidden = gated(b, f"{p}.mlp", gate, up, s.activation)
        hidden = self._sub_norm(f"{p}.mlp.ffn_sub_norm", hidden, lw.ffn_sub_norm)
        self.pending = self._linear(f"{p}.mlp.down_proj", hidden, lw.down)

    def _keep_last_positions(self, hidden: str) -> str:
        """Input `num_logits_to_keep` (int64, a scalar or [1], the name and values transformers.js
        and onnxruntime-genai feed): 0 = every position goes through the lm_head, n > 0 = only
        the last n, so a prefill does not pay the [seq, vocab] head for logits nobody reads.
        Optional: an initializer of the same name gives it the default 0 (every position), so an
        Optimum-style loop that feeds only input_ids, attention_mask and the past runs as is
        (docs/ARCHITECTURE.md, "logits")."""
        b = self.b
        # No declared shape: scalar (transformers.js) and [1] (onnxruntime-genai) both fit.
        self._inputs.append(helper.make_tensor_value_info(NUM_LOGITS_TO_KEEP, TensorProto.INT64, None))
        b.const(NUM_LOGITS_TO_KEEP, 0, np.int64)
        keep = b.op("Reshape", [NUM_LOGITS_TO_KEEP, b.const("shape_1", [1], np.int64)], name="num_logits_to_keep/1d")
        start = b.op("Neg", [keep], name="num_logits_to_keep/start")
        end = b.const("int64_max", [np.iinfo(np.int64).max], np.int64)
        return b.op("Slice", [hidden, start, end, b.const("axes_1", [1], np.int64)], name="keep_last_positions")

    def finish(self, final_norm: np.ndarray, producer: str) -> onnx.ModelProto:
        s, b = self.spec, self.b
        normed = self._keep_last_positions(self._norm("model.norm", final_norm))
        self.variant.lm_head(b, normed, LOGITS)
        logits = helper.make_tensor_value_info(LOGITS, TensorProto.FLOAT,
                                               ["batch_size", "sequence_length", s.vocab_size])
        graph = helper.make_graph(b.nodes, "bitnet_decoder", self._inputs, [logits] + self._outputs,
                                  initializer=b.initializers)
        opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)]
        opsets += [helper.make_opsetid(d, 1) for d in self.variant.extra_domains]
        model = helper.make_model(graph, opset_imports=opsets, producer_name=producer)
        model.ir_version = 8
        return model
