"""Generate replies from the packed checkpoint with transformers (the reference implementation)."""

from __future__ import annotations

import os

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # transformers' BitNet code calls torch.compile


def load(model_dir: str):
    import torch
    from transformers import AutoTokenizer, BitNetForCausalLM

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = BitNetForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                              attn_implementation="eager").eval()
    return tok, model


def chat(model_dir: str, prompt: str, greedy: bool = False, seed: int = 0,
         max_new_tokens: int = 120, loaded=None, history=None) -> str:
    import torch

    tok, model = loaded or load(model_dir)
    messages = list(history or []) + [{"role": "user", "content": prompt}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)["input_ids"]
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    torch.manual_seed(seed)
    kwargs = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=0.8, top_k=40,
                                                       top_p=0.95)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, eos_token_id=[tok.eos_token_id, eot],
                             repetition_penalty=1.1, pad_token_id=tok.eos_token_id, **kwargs)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
