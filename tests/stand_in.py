"""A random tiny BitNet b1.58 checkpoint for the playground's tests (numpy + safetensors, no
torch): byte-level tokenizer, so one generated token is one byte of text and token counts are
checkable from the text; `end_of_turn_scale=0` makes answers that never end by themselves
(the stop and cancel tests need them)."""

from __future__ import annotations

import json
from pathlib import Path

STAND_IN_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>")


def _byte_tokenizer():
    """Byte-level tokenizer: the 256 bytes, then BOS, EOS, EOT (ids 256, 257, 258)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_chars = sorted(alphabet, key=lambda ch: _byte_of(ch))
    vocab = {ch: i for i, ch in enumerate(byte_chars)}
    for i, name in enumerate(SPECIALS):
        vocab[name] = 256 + i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIALS))
    return tok, byte_chars


def _byte_of(ch: str) -> int:
    """Inverse of GPT-2's bytes_to_unicode."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(cs, bs))[ord(ch)]


def write_stand_in_checkpoint(path, seed: int = 0, context: int | None = None,
                              end_of_turn_scale: float = 2.0) -> Path:
    """A random BitNet b1.58 checkpoint (float master weights, untied head) with a byte-level
    tokenizer. The head favours printable ASCII so the noise it writes is at least readable;
    end_of_turn_scale sets how often it ends its turn (0: never, so only max tokens or a
    cancel end an answer, whatever the CPU's rounding)."""
    import numpy as np
    from safetensors.numpy import save_file

    from export.model_folder import DEFAULT_CHAT_TEMPLATE

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok, _ = _byte_tokenizer()
    vocab = 256 + len(SPECIALS)
    s = dict(STAND_IN_SHAPE)
    if context:
        s["max_position_embeddings"] = int(context)
    h, inter, heads, kv = s["hidden_size"], s["intermediate_size"], s["num_attention_heads"], s["num_key_value_heads"]
    d = h // heads
    rng = np.random.default_rng(seed)
    t = {"model.embed_tokens.weight": rng.standard_normal((vocab, h)).astype(np.float32),
         "model.norm.weight": np.ones(h, np.float32)}
    head = np.zeros((vocab, h), np.float32)
    printable = [b for b in range(256) if 32 <= b < 127 and chr(b).isalnum() or b in (32, 44, 46)]
    head[printable] = rng.standard_normal((len(printable), h)) * 3.0
    head[32] *= 1.5  # more spaces: word-like noise
    head[256 + 2] = rng.standard_normal(h) * end_of_turn_scale  # an occasional end of turn
    t["lm_head.weight"] = head
    shapes = {"self_attn.q_proj": (heads * d, h), "self_attn.k_proj": (kv * d, h),
              "self_attn.v_proj": (kv * d, h), "self_attn.o_proj": (h, heads * d),
              "mlp.gate_proj": (inter, h), "mlp.up_proj": (inter, h), "mlp.down_proj": (h, inter)}
    for layer in range(s["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        for norm, width in (("input_layernorm", h), ("post_attention_layernorm", h),
                            ("self_attn.attn_sub_norm", h), ("mlp.ffn_sub_norm", inter)):
            t[p + norm + ".weight"] = np.ones(width, np.float32)
        for name, shape in shapes.items():
            t[p + name + ".weight"] = (0.05 * rng.standard_normal(shape)).astype(np.float32)
    save_file(t, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = {"architectures": ["BitNetForCausalLM"], "model_type": "bitnet", "vocab_size": vocab,
              "hidden_act": "relu2", "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
              "tie_word_embeddings": False, "bos_token_id": 256, "eos_token_id": [257, 258],
              **s}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": SPECIALS[0], "eos_token": SPECIALS[1], "chat_template": DEFAULT_CHAT_TEMPLATE,
        "tokenizer_class": "PreTrainedTokenizerFast"}))
    return path
