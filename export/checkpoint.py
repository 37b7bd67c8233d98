"""Read a BitNet b1.58 checkpoint folder: the config, the tensor index, the weights.

Everything that can be checked before writing is checked in `open_checkpoint`, so a bad
checkpoint fails with one ExportError before any output exists.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass

import numpy as np

from . import ternary
from .errors import ExportError
from .safetensors_reader import FLOAT_DTYPES, TensorInfo, read_float32, read_header, read_raw

# BitNet (2B4T: sub-norms, relu2) and LLaMA-architecture BitNet b1.58 checkpoints
# (HF1BitLLM/Llama3-8B-1.58, Falcon3-*-1.58bit: no sub-norms, SiLU-gated MLP) loaded by
# transformers as LlamaForCausalLM with a bitnet quantization_config.
SUPPORTED_ARCHITECTURES = ("BitNetForCausalLM", "LlamaForCausalLM")
ARCH_TRAITS = {  # architecture -> (has attn/ffn sub-norms, MLP activation)
    "BitNetForCausalLM": (True, "relu2"),
    "LlamaForCausalLM": (False, "silu"),
}
LINEAR_CLASSES = ("bitlinear", "autobitlinear")
ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJ = ("gate_proj", "up_proj", "down_proj")


@dataclass
class ModelSpec:
    """The model's shapes and quantization convention, from config.json."""

    architecture: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_ids: list[int]
    # "bitlinear" | "autobitlinear" | None (no quantization_config: float master weights)
    linear_class: str | None
    quantization_mode: str  # "offline" | "online"
    raw_config: dict
    sub_norms: bool = True  # attn_sub_norm / ffn_sub_norm (BitNet); absent in LLaMA variants
    # quantization_config.use_rms_norm: every BitLinear normalizes its input first with its
    # own `<proj>.rms_norm.weight` and this eps (None: no such norms)
    linear_norm_eps: float | None = None
    activation: str = "relu2"  # "relu2" (BitNet) or "silu" (LLaMA variants)


def _eos_list(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def parse_config(config: dict) -> ModelSpec:
    archs = config.get("architectures") or []
    model_type = config.get("model_type")
    arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None and not archs and model_type in ("bitnet", "llama"):
        arch = "BitNetForCausalLM" if model_type == "bitnet" else "LlamaForCausalLM"
    if arch is None:
        raise ExportError(
            f"unsupported architecture {archs or model_type!r}: this exporter reads "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} checkpoints")
    sub_norms, activation = ARCH_TRAITS[arch]

    quant = config.get("quantization_config")
    if arch == "LlamaForCausalLM" and (quant or {}).get("quant_method") != "bitnet":
        raise ExportError("LlamaForCausalLM without a bitnet quantization_config is not a "
                          "BitNet b1.58 model (its weights are not ternary)")
    if quant is None:
        linear_class, mode = None, "online"
    else:
        if quant.get("quant_method") != "bitnet":
            raise ExportError(
                f"unsupported quantization method {quant.get('quant_method')!r} "
                "(only quant_method 'bitnet' or float weights are supported)")
        linear_class = quant.get("linear_class", "bitlinear")
        mode = quant.get("quantization_mode", "offline")
        if linear_class not in LINEAR_CLASSES:
            raise ExportError(f"unsupported quantization_config.linear_class {linear_class!r}")
        if mode not in ("offline", "online"):
            raise ExportError(f"unsupported quantization_config.quantization_mode {mode!r}")
        if quant.get("modules_to_not_convert"):
            extra = [m for m in quant["modules_to_not_convert"] if m not in ("lm_head",)]
            if extra:
                raise ExportError(f"unsupported quantization_config.modules_to_not_convert {extra}")

    act = config.get("hidden_act", activation)
    if act != activation:
        raise ExportError(f"unsupported hidden_act {act!r} for {arch} (expected {activation})")
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise ExportError("checkpoints with linear biases (attention_bias/mlp_bias) are not supported")

    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ExportError(f"unsupported RoPE type {rope_type!r} (only default RoPE is supported)")
    theta = rope.get("rope_theta", config.get("rope_theta", 500000.0))

    def need(key, default=None):
        value = config.get(key, default)
        if value is None:
            raise ExportError(f"config.json lacks {key}")
        return value

    hidden = int(need("hidden_size", 2560))
    heads = int(need("num_attention_heads", 20))
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    if sub_norms and heads * head_dim != hidden:
        raise ExportError(
            f"num_attention_heads*head_dim = {heads * head_dim} differs from hidden_size {hidden}; "
            "BitNet's attn_sub_norm needs them equal")
    if heads % kv_heads:
        raise ExportError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    if head_dim % 16:
        # ONNX Runtime's CPU GroupQueryAttention rejects other head sizes at run time.
        raise ExportError(f"head_dim {head_dim} is not a multiple of 16 (GroupQueryAttention needs it)")

    return ModelSpec(
        architecture=arch or "BitNetForCausalLM",
        num_layers=int(need("num_hidden_layers", 30)),
        hidden_size=hidden,
        intermediate_size=int(need("intermediate_size", 6912)),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=int(need("vocab_size", 128256)),
        max_position_embeddings=int(need("max_position_embeddings", 2048)),
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-5)),
        rope_theta=float(theta),
        # BitNetConfig's default is False: a config without the key has its own lm_head.
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        bos_token_id=config.get("bos_token_id", 128000),
        eos_token_ids=_eos_list(config.get("eos_token_id", 128001)),
        linear_class=linear_class,
        quantization_mode=mode,
        raw_config=config,
        sub_norms=sub_norms,
        activation=activation,
        linear_norm_eps=(float((quant or {}).get("rms_norm_eps") or 1e-6)
                         if (quant or {}).get("use_rms_norm") else None),
    )


@dataclass
class TernaryLinear:
    """One projection as the exporter uses it: y = (xq . w^T) / s * multiplier."""

    w: np.ndarray  # int8 [out, in], values in {-1, 0, 1}
    multiplier: np.float32  # per-tensor weight scale, in the convention of the formula above
    input_norm: np.ndarray | None = None  # use_rms_norm: RMSNorm weight applied to x first


class Checkpoint:
    def __init__(self, folder: str, spec: ModelSpec, tensors: dict[str, TensorInfo]):
        self.folder, self.spec, self.tensors = folder, spec, tensors

    # -- reading -------------------------------------------------------------------------
    def float_tensor(self, name: str) -> np.ndarray:
        return read_float32(self.tensors[name])

    def dtype_of(self, name: str) -> str:
        return self.tensors[name].dtype

    def embedding(self) -> np.ndarray:
        return self.float_tensor("model.embed_tokens.weight")

    def lm_head(self) -> np.ndarray:
        if self.spec.tie_word_embeddings:
            return self.embedding()
        return self.float_tensor("lm_head.weight")

    def lm_head_name(self) -> str:
        return "model.embed_tokens.weight" if self.spec.tie_word_embeddings else "lm_head.weight"

    def linear(self, prefix: str) -> TernaryLinear:
        """The ternary weights and scale multiplier of `prefix`.weight, mirroring transformers.

        - bitlinear (BitLinear): y = xq@w^T / (s * weight_scale)      -> multiplier 1/weight_scale
        - autobitlinear offline: y = (xq/s)@w^T * weight_scale        -> multiplier weight_scale
        - autobitlinear online / float master weights: absmean at load:
          w = clamp(round(W*c), -1, 1), W ~ w/c with c = 1/mean|W|    -> multiplier 1/c
        """
        lin = self._ternary(prefix)
        if self.spec.linear_norm_eps is not None:
            lin.input_norm = self.float_tensor(prefix + ".rms_norm.weight")
        return lin

    def _ternary(self, prefix: str) -> TernaryLinear:
        info = self.tensors[prefix + ".weight"]
        packed = info.dtype == "U8"
        cls, mode = self.spec.linear_class, self.spec.quantization_mode
        if packed:
            w = ternary.unpack_rows(read_raw(info))
        elif cls is None or mode == "online" or (
                cls == "bitlinear" and prefix + ".weight_scale" not in self.tensors):
            # Float master weights: quantize now as transformers does at every forward.
            scale_c, w = ternary.absmean_quantize(read_float32(info))
            return TernaryLinear(w, np.float32(1.0) / scale_c)
        else:
            w = ternary.float_to_ternary(read_float32(info), prefix)
        ws = self._weight_scale(prefix)
        if cls == "bitlinear":
            return TernaryLinear(w, np.float32(1.0) / ws)
        return TernaryLinear(w, ws)

    def _weight_scale(self, prefix: str) -> np.float32:
        info = self.tensors.get(prefix + ".weight_scale")
        if info is None:
            raise ExportError(f"checkpoint lacks {prefix}.weight_scale")
        value = read_float32(info).reshape(-1)
        if value.size != 1:
            raise ExportError(f"{prefix}.weight_scale has shape {info.shape}, expected one value")
        if not np.isfinite(value[0]) or value[0] == 0:
            raise ExportError(f"{prefix}.weight_scale is {value[0]}")
        return np.float32(value[0])


def _load_index(folder: str) -> dict[str, TensorInfo]:
    index_files = glob.glob(os.path.join(folder, "*.safetensors.index.json"))
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if index_files:
        with open(index_files[0]) as f:
            weight_map = json.load(f).get("weight_map", {})
        files = sorted({os.path.join(folder, v) for v in weight_map.values()})
        missing = [os.path.basename(p) for p in files if not os.path.exists(p)]
        if missing:
            raise ExportError(f"checkpoint shards listed in the index are missing: {', '.join(missing)}")
    if not files:
        raise ExportError(f"no .safetensors weights in {folder}")
    tensors = {}
    for path in files:
        tensors.update(read_header(path))
    return tensors


def _expected_shapes(spec: ModelSpec) -> dict[str, tuple]:
    h, i, d = spec.hidden_size, spec.intermediate_size, spec.head_dim
    q, kv = spec.num_attention_heads * d, spec.num_key_value_heads * d
    shapes = {"model.embed_tokens.weight": (spec.vocab_size, h), "model.norm.weight": (h,)}
    if not spec.tie_word_embeddings:
        shapes["lm_head.weight"] = (spec.vocab_size, h)
    linear = {"self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
              "self_attn.o_proj": (h, q), "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h),
              "mlp.down_proj": (h, i)}
    for layer in range(spec.num_layers):
        p = f"model.layers.{layer}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        if spec.sub_norms:
            shapes[p + "self_attn.attn_sub_norm.weight"] = (h,)
            shapes[p + "mlp.ffn_sub_norm.weight"] = (i,)
        for name, shape in linear.items():
            shapes[p + name + ".weight"] = shape
            if spec.linear_norm_eps is not None:
                shapes[p + name + ".rms_norm.weight"] = (shape[1],)
    return shapes


def linear_prefixes(spec: ModelSpec, layer: int) -> dict[str, str]:
    p = f"model.layers.{layer}."
    names = {n: p + "self_attn." + n for n in ATTN_PROJ}
    names.update({n: p + "mlp." + n for n in MLP_PROJ})
    return names


def _validate(spec: ModelSpec, tensors: dict[str, TensorInfo]) -> None:
    missing, wrong = [], []
    for name, shape in _expected_shapes(spec).items():
        info = tensors.get(name)
        if info is None:
            missing.append(name)
            continue
        is_linear = name.endswith("_proj.weight")
        if is_linear and info.dtype == "U8":
            packed_shape = (shape[0] // 4, shape[1])
            if shape[0] % 4 or info.shape != packed_shape:
                wrong.append(f"{name} is packed uint8 {list(info.shape)}, config implies "
                             f"{list(packed_shape)} (unpacked {list(shape)})")
            elif spec.linear_class is None:
                wrong.append(f"{name} is packed uint8 but config.json has no bitnet quantization_config")
            elif spec.quantization_mode == "online":
                wrong.append(f"{name} is packed uint8 but quantization_mode is 'online' (float weights)")
        elif info.dtype not in FLOAT_DTYPES:
            wrong.append(f"{name} has dtype {info.dtype}")
        elif info.shape != shape:
            wrong.append(f"{name} has shape {list(info.shape)}, config implies {list(shape)}")
        if is_linear and spec.linear_class is not None and spec.quantization_mode == "offline" \
                and not (spec.linear_class == "bitlinear" and info.dtype != "U8"):
            if name.replace(".weight", ".weight_scale") not in tensors:
                missing.append(name.replace(".weight", ".weight_scale"))
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise ExportError(f"checkpoint lacks tensors: {', '.join(missing[:3])}{more}")
    if wrong:
        more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
        raise ExportError(f"checkpoint disagrees with config.json: {wrong[0]}{more}")


def open_checkpoint(folder: str) -> Checkpoint:
    config_path = os.path.join(folder, "config.json")
    if not os.path.exists(config_path):
        raise ExportError(f"{folder} has no config.json; is it a Hugging Face checkpoint?")
    try:
        with open(config_path) as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportError(f"config.json is not valid JSON: {e}") from None
    spec = parse_config(config)
    tensors = _load_index(folder)
    _validate(spec, tensors)
    return Checkpoint(folder, spec, tensors)
