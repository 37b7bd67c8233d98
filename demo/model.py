"""The training model: BitNet b1.58 exactly as transformers' BitNetForCausalLM computes it.

Same modules, names and order as `transformers.models.bitnet.modeling_bitnet` (input_layernorm,
q/k/v/o_proj, attn_sub_norm, post_attention_layernorm, gate/up/down_proj with relu2,
ffn_sub_norm, final norm, lm_head tied to embed_tokens), so its state dict maps 1:1 onto
transformers' names.

Quantization-aware training as in BitNet b1.58: every projection is a BitLinear whose forward
pass uses
  - absmean ternary weights: c = 1/mean|W|.clamp(1e-5), w = clamp(round(W*c), -1, 1), W ~ w/c
  - per-token absmax int8 activations: s = 127/max|x|.clamp(1e-5), xq = clamp(round(x*s), -128, 127)
with straight-through gradients (x + (q(x) - x).detach()) into float master weights.
One deviation, so that the shipped checkpoint is exactly the trained function: the weight
scale c is rounded to bfloat16 in the forward pass, because the packed checkpoint stores
`weight_scale` in bf16 (as microsoft/bitnet-b1.58-2B-4T does). The ternary values themselves
use the exact c.

`quantized=False` gives the float baseline: the same network with plain linear layers.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class DemoConfig:
    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 704
    num_hidden_layers: int = 6
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 1024
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    initializer_range: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def to_dict(self) -> dict:
        return asdict(self)


def weight_quant(w: torch.Tensor):
    """absmean ternary: (ternary values as float, bf16-rounded scale c); W ~ ternary / c."""
    c = 1.0 / w.abs().mean().clamp(min=1e-5)
    ternary = (w * c).round().clamp(-1, 1)
    c_bf16 = c.to(torch.bfloat16).to(w.dtype)
    return ternary, c_bf16


def act_quant(x: torch.Tensor):
    """per-token absmax int8: (integer values as float, scale s); x ~ xq / s."""
    s = 127.0 / x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
    return (x * s).round().clamp(-128, 127), s


class BitLinear(nn.Linear):
    """nn.Linear with BitNet b1.58 quantization-aware training (straight-through estimator)."""

    def __init__(self, in_features: int, out_features: int, quantized: bool = True):
        super().__init__(in_features, out_features, bias=False)
        self.quantized = quantized

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.quantized:
            return F.linear(x, self.weight)
        w = self.weight
        ternary, c = weight_quant(w)
        xq, s = act_quant(x)
        if not torch.is_grad_enabled():
            # inference: integer-valued matmul, then rescale, as transformers' BitLinear does
            return F.linear(xq, ternary) / (s * c)
        # training: the same values, straight-through gradients into the float masters
        w_q = w + (ternary / c - w).detach()
        x_q = x + (xq / s - x).detach()
        return F.linear(x_q, w_q)


class RMSNorm(nn.Module):
    """Same arithmetic as transformers' BitNetRMSNorm."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(variance + self.eps))


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: DemoConfig, quantized: bool):
        super().__init__()
        self.cfg = cfg
        hd = cfg.head_dim
        self.q_proj = BitLinear(cfg.hidden_size, cfg.num_attention_heads * hd, quantized)
        self.k_proj = BitLinear(cfg.hidden_size, cfg.num_key_value_heads * hd, quantized)
        self.v_proj = BitLinear(cfg.hidden_size, cfg.num_key_value_heads * hd, quantized)
        self.o_proj = BitLinear(cfg.num_attention_heads * hd, cfg.hidden_size, quantized)
        self.attn_sub_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin):
        b, t, _ = x.shape
        hd = self.cfg.head_dim
        q = self.q_proj(x).view(b, t, -1, hd).transpose(1, 2)
        k = self.k_proj(x).view(b, t, -1, hd).transpose(1, 2)
        v = self.v_proj(x).view(b, t, -1, hd).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        rep = self.cfg.num_attention_heads // self.cfg.num_key_value_heads
        if rep > 1:
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        if torch.is_grad_enabled():
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            # inference: transformers' eager attention arithmetic, so the quantized network's
            # int8 rounding sees bit-identical inputs (tests compare logits with transformers)
            scores = torch.matmul(q, k.transpose(2, 3)) * hd ** -0.5
            mask = torch.full((t, t), torch.finfo(scores.dtype).min).triu(1)
            probs = F.softmax(scores + mask, dim=-1, dtype=torch.float32)
            y = torch.matmul(probs, v)
        y = y.transpose(1, 2).reshape(b, t, -1)
        return self.o_proj(self.attn_sub_norm(y))


class MLP(nn.Module):
    def __init__(self, cfg: DemoConfig, quantized: bool):
        super().__init__()
        self.gate_proj = BitLinear(cfg.hidden_size, cfg.intermediate_size, quantized)
        self.up_proj = BitLinear(cfg.hidden_size, cfg.intermediate_size, quantized)
        self.down_proj = BitLinear(cfg.intermediate_size, cfg.hidden_size, quantized)
        self.ffn_sub_norm = RMSNorm(cfg.intermediate_size, cfg.rms_norm_eps)

    def forward(self, x):
        return self.down_proj(self.ffn_sub_norm(F.relu(self.gate_proj(x)).square() * self.up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DemoConfig, quantized: bool):
        super().__init__()
        self.self_attn = Attention(cfg, quantized)
        self.mlp = MLP(cfg, quantized)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Inner(nn.Module):
    def __init__(self, cfg: DemoConfig, quantized: bool):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, quantized) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class DemoBitNet(nn.Module):
    """Decoder-only BitNet; `model.*` parameter names equal transformers' BitNetForCausalLM."""

    def __init__(self, cfg: DemoConfig, quantized: bool = True):
        super().__init__()
        self.cfg = cfg
        self.quantized = quantized
        self.model = Inner(cfg, quantized)
        hd = cfg.head_dim
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float) / hd))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.apply(self._init)
        # GPT-2 style: scale the residual-branch outputs down with depth
        for name, p in self.named_parameters():
            if name.endswith("o_proj.weight") or name.endswith("down_proj.weight"):
                nn.init.normal_(p, std=cfg.initializer_range / math.sqrt(2 * cfg.num_hidden_layers))

    def _init(self, m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=self.cfg.initializer_range)

    def rope(self, t: int, device):
        pos = torch.arange(t, device=device, dtype=torch.float)
        freqs = pos[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [b, t] -> logits [b, t, vocab] (float32)."""
        x = self.model.embed_tokens(ids)
        cos, sin = self.rope(ids.shape[1], ids.device)
        for layer in self.model.layers:
            x = layer(x, cos, sin)
        x = self.model.norm(x)
        return F.linear(x, self.model.embed_tokens.weight)  # tied lm_head

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
