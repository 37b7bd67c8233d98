"""Write the trained ternary model as a packed BitNet checkpoint, like microsoft/bitnet-b1.58-2B-4T.

Every q/k/v/o/gate/up/down projection is stored as
  `<name>.weight`       uint8 [out/4, in]: output row i*(out/4)+r is ((packed[r] >> 2i) & 3) - 1
  `<name>.weight_scale` bf16 [1]: the absmean multiplier c = 1/mean|W| (linear_class "bitlinear":
                        y = (xq @ w^T) / (s * weight_scale))
exactly as transformers' integrations/bitnet.py unpacks them. Embedding (tied lm_head) and the
RMSNorm weights are stored in float32 (small here; keeps the trained function exact).
"""

from __future__ import annotations

import json
import os
import shutil

import torch

from export.ternary import pack_rows, unpack_rows  # the one implementation of the layout

from . import corpus, tokenizer
from .model import DemoBitNet, weight_quant

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def pack_checkpoint_weight(w: torch.Tensor) -> torch.Tensor:
    """int ternary [out, in] -> uint8 [out/4, in] in transformers' BitNet layout."""
    return torch.from_numpy(pack_rows(w.to(torch.int8).numpy()))


def unpack_checkpoint_weight(packed: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(unpack_rows(packed.numpy()))


def hf_config(model: DemoBitNet, bos_id: int, eos_id: int) -> dict:
    c = model.cfg
    return {
        "architectures": ["BitNetForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "head_dim": c.head_dim,
        "hidden_act": "relu2",
        "hidden_size": c.hidden_size,
        "initializer_range": c.initializer_range,
        "intermediate_size": c.intermediate_size,
        "max_position_embeddings": c.max_position_embeddings,
        "model_type": "bitnet",
        "num_attention_heads": c.num_attention_heads,
        "num_hidden_layers": c.num_hidden_layers,
        "num_key_value_heads": c.num_key_value_heads,
        "pad_token_id": None,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_parameters": {"rope_theta": c.rope_theta, "rope_type": "default"},
        "rope_theta": c.rope_theta,
        "tie_word_embeddings": True,
        "dtype": "float32",
        "use_cache": True,
        "vocab_size": c.vocab_size,
        "quantization_config": {
            "quant_method": "bitnet",
            "linear_class": "bitlinear",
            "quantization_mode": "offline",
            "use_rms_norm": False,
        },
    }


def packed_state_dict(model: DemoBitNet) -> dict[str, torch.Tensor]:
    if not model.quantized:
        raise ValueError("only the ternary (quantized) model is packed")
    tensors = {}
    for name, p in model.state_dict().items():
        p = p.detach().float()
        if name.endswith(".weight") and name.split(".")[-2] in PROJECTIONS:
            ternary, c = weight_quant(p)
            prefix = name[: -len(".weight")]
            tensors[name] = pack_checkpoint_weight(ternary.to(torch.int8))
            tensors[prefix + ".weight_scale"] = c.reshape(1).to(torch.bfloat16)
        else:
            tensors[name] = p.contiguous()
    return tensors


def write_checkpoint(model: DemoBitNet, tok_dir: str, out: str, card: str | None = None,
                     generation: dict | None = None) -> None:
    """Write config.json, model.safetensors, tokenizer files and generation_config.json into out."""
    from safetensors.torch import save_file

    os.makedirs(out, exist_ok=True)
    tok = tokenizer.load(tok_dir)
    bos_id, eos_id, eot_id = (tok.token_to_id(t) for t in (corpus.BOS, corpus.EOS, corpus.EOT))
    save_file(packed_state_dict(model), os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(hf_config(model, bos_id, eos_id), f, indent=2)
        f.write("\n")
    gen = {"bos_token_id": bos_id, "eos_token_id": [eos_id, eot_id], "do_sample": True,
           "temperature": 0.8, "top_k": 40, "top_p": 0.95, "repetition_penalty": 1.1,
           "max_new_tokens": 200}
    gen.update(generation or {})
    with open(os.path.join(out, "generation_config.json"), "w") as f:
        json.dump(gen, f, indent=2)
        f.write("\n")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(os.path.join(tok_dir, name), os.path.join(out, name))
    if card is not None:
        with open(os.path.join(out, "README.md"), "w") as f:
            f.write(card)


def load_packed(folder: str) -> DemoBitNet:
    """The training model (DemoBitNet, quantized) rebuilt from a packed checkpoint folder.

    Float masters are chosen so that the training model's own quantizer reproduces the stored
    ternary values and bf16 scale exactly: W = t / (c * mean|t|) gives 1/mean|W| = c and
    round(W * c) = round(t / mean|t|) = t after the clamp (mean|t| <= 1).
    """
    from safetensors.torch import load_file

    from .model import DemoConfig

    with open(os.path.join(folder, "config.json")) as f:
        hf = json.load(f)
    cfg = DemoConfig(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"], num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=hf["num_attention_heads"], num_key_value_heads=hf["num_key_value_heads"],
        max_position_embeddings=hf["max_position_embeddings"],
        rope_theta=hf["rope_parameters"]["rope_theta"], rms_norm_eps=hf["rms_norm_eps"])
    tensors = load_file(os.path.join(folder, "model.safetensors"))
    state = {}
    for name, t in tensors.items():
        if name.endswith(".weight_scale"):
            continue
        if t.dtype == torch.uint8:
            ternary = unpack_checkpoint_weight(t).float()
            c = tensors[name[: -len(".weight")] + ".weight_scale"].float().reshape(())
            state[name] = ternary / (c * ternary.abs().mean())
        else:
            state[name] = t.float()
    model = DemoBitNet(cfg, quantized=True)
    model.load_state_dict(state)
    return model.eval()
