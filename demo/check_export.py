"""Export the demo model with `python -m export` and compare the ONNX variants with transformers.

    python -m demo.check_export [--model models/shakespeare-bitnet] [--onnx DIR]

For a chat prompt: prefill logits, then decode steps (KV cache, teacher-forced on transformers'
greedy tokens); prints max |logit diff| per variant and whether greedy tokens agree.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_variant(folder: str, variant: str, prompt: list[int], steps: list[int]):
    import numpy as np

    sys.path.insert(0, ROOT)
    from runtime.folder import needs_custom_ops, read_config, variant_path
    from runtime.session import open_session

    cfg = read_config(folder)
    sess = open_session(variant_path(folder, variant, cfg), threads=1, custom_ops=needs_custom_ops(variant))
    names = [o.name for o in sess.get_outputs()]
    past = {f"past_key_values.{i}.{k}": np.zeros((1, cfg["num_key_value_heads"], 0, cfg["head_dim"]),
                                                 np.float32)
            for i in range(cfg["num_layers"]) for k in ("key", "value")}
    length, results = 0, []
    for chunk in [prompt] + [[t] for t in steps]:
        ids = np.asarray([chunk], np.int64)
        length += ids.shape[1]
        out = dict(zip(names, sess.run(None, {"input_ids": ids,
                                               "attention_mask": np.ones((1, length), np.int64),
                                               "num_logits_to_keep": np.zeros([1], np.int64),
                                               **past})))
        past = {n: out[n.replace("past_key_values", "present")] for n in past}
        results.append(out["logits"][0])
    return results


def main(argv=None) -> int:
    import numpy as np
    import torch

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "shakespeare-bitnet"))
    ap.add_argument("--onnx", default=None, help="an exported folder (default: export to a temp dir)")
    ap.add_argument("--steps", type=int, default=16)
    args = ap.parse_args(argv)
    sys.path.insert(0, ROOT)
    from runtime.folder import VARIANTS

    folder = args.onnx
    if folder is None:
        folder = os.path.join(tempfile.mkdtemp(), "onnx")
        subprocess.run([sys.executable, "-m", "export", args.model, "--out", folder,
                        "--variants", ",".join(VARIANTS)], check=True, cwd=ROOT)
    from tokenizers import Tokenizer
    from transformers import BitNetForCausalLM

    tok = Tokenizer.from_file(os.path.join(args.model, "tokenizer.json"))
    from demo import corpus

    text = corpus.render([{"role": "user", "content": "Good morrow, my lord. What news from the court?"}],
                         add_generation_prompt=True)
    prompt = tok.encode(text, add_special_tokens=False).ids
    model = BitNetForCausalLM.from_pretrained(args.model, dtype=torch.float32,
                                              attn_implementation="eager").eval()
    with torch.no_grad():
        ids = torch.tensor([prompt])
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.steps,
                             min_new_tokens=args.steps, do_sample=False, eos_token_id=None,
                             repetition_penalty=1.0, top_k=None, top_p=None, temperature=None,
                             pad_token_id=-1)[0, len(prompt):].tolist()
        full = model(torch.tensor([prompt + gen])).logits[0].numpy()
    ref = [full[: len(prompt)]] + [full[len(prompt) + i: len(prompt) + i + 1] for i in range(len(gen))]
    report = {}
    for variant in VARIANTS:
        outs = run_variant(folder, variant, prompt, gen)
        diff = max(float(np.abs(a - b).max()) for a, b in zip(outs, ref))
        greedy = [int(np.argmax(o[-1])) for o in outs[:-1]]
        agree = sum(int(a == b) for a, b in zip(greedy, gen[: len(greedy)]))
        report[variant] = {"max_abs_logit_diff": diff, "greedy_agree": f"{agree}/{len(greedy)}"}
        print(f"{variant:8s} max |logit diff| {diff:.2e}  greedy tokens agree {agree}/{len(greedy)}",
              flush=True)
    print(json.dumps({"prompt_tokens": len(prompt), "decode_steps": len(gen),
                      "logit_scale": float(np.abs(full).max()), "variants": report}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
