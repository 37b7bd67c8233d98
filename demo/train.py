"""Train the demo model (ternary BitNet b1.58 QAT, or the float baseline) on the Shakespeare chats.

Deterministic for a fixed seed and thread count: the data order comes from its own generator,
the initial weights from torch.manual_seed. Progress lines show loss, tokens/s and ETA.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from . import corpus, tokenizer
from .model import DemoBitNet, DemoConfig

BUILD = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "build", "demo")


@dataclass
class TrainArgs:
    variant: str = "ternary"        # "ternary" (BitNet b1.58 QAT) or "float" (baseline)
    steps: int = 2000               # ~1.56 epochs of the training plays
    batch_size: int = 4
    seq_len: int = 256
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 20
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    seed: int = 1234
    threads: int = 1                # the shipped runs: ternary and float side by side, one core each
    eval_every: int = 100
    eval_windows: int = 8           # quick validation during training
    final_eval_windows: int = 64    # validation at the end (0 = every window of the held-out plays)
    log_every: int = 10
    max_minutes: float = 60.0       # safety valve: stop (and say so) past this wall time
    stop_after: int = 0             # stop after this many steps of the `steps` schedule (0: run all);
                                    # reproduces a run the time valve cut short
    compile: bool = True            # torch.compile the training step (fuses the quantization ops)
    out: str = BUILD


# ---------------------------------------------------------------- data

def prepare_data(out: str = BUILD, log=print):
    """Corpus -> tokenizer (trained on training plays only) -> token streams. Cached in out/data."""
    data_dir = os.path.join(out, "data")
    tok_dir = os.path.join(out, "tokenizer")
    stamp = os.path.join(data_dir, "tokens.pt")
    if os.path.exists(stamp) and os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
        return torch.load(stamp), tokenizer.load(tok_dir)
    t0 = time.time()
    train_plays, val_plays = corpus.split_plays(corpus.load_plays())
    tok = tokenizer.train_tokenizer(train_plays)
    # Files appear whole (written aside, then renamed): the ternary and float runs may start
    # side by side and both get here; they write the same bytes.
    tmp_dir = f"{tok_dir}.{os.getpid()}.tmp"
    tokenizer.save(tok, tmp_dir)
    os.makedirs(tok_dir, exist_ok=True)
    for name in os.listdir(tmp_dir):
        os.replace(os.path.join(tmp_dir, name), os.path.join(tok_dir, name))
    os.rmdir(tmp_dir)
    streams = {}
    for name, plays in (("train", train_plays), ("val", val_plays)):
        texts = [corpus.render(c) for p in plays for c in corpus.conversations(p)]
        ids = [i for e in tok.encode_batch(texts, add_special_tokens=False) for i in e.ids]
        streams[name] = torch.tensor(ids, dtype=torch.int16 if tok.get_vocab_size() < 32768 else torch.int32)
    streams["train_plays"] = [p.slug for p in train_plays]
    streams["val_plays"] = [p.slug for p in val_plays]
    os.makedirs(data_dir, exist_ok=True)
    torch.save(streams, f"{stamp}.{os.getpid()}.tmp")
    os.replace(f"{stamp}.{os.getpid()}.tmp", stamp)
    log(f"data: {len(streams['train']):,} training tokens ({len(train_plays)} plays), "
        f"{len(streams['val']):,} validation tokens ({', '.join(streams['val_plays'])}); "
        f"tokenizer {tok.get_vocab_size()} tokens; {time.time() - t0:.0f}s")
    return streams, tok


class Batches:
    """Random windows of seq_len+1 tokens, each starting at a conversation start (BOS)."""

    def __init__(self, stream: torch.Tensor, bos_id: int, batch_size: int, seq_len: int, seed: int):
        self.stream = stream.long()
        starts = (self.stream == bos_id).nonzero().flatten()
        self.starts = starts[starts + seq_len + 1 <= len(self.stream)]
        self.batch_size, self.seq_len = batch_size, seq_len
        self.gen = torch.Generator().manual_seed(seed)

    def next(self) -> torch.Tensor:
        idx = torch.randint(len(self.starts), (self.batch_size,), generator=self.gen)
        return torch.stack([self.stream[s: s + self.seq_len + 1] for s in self.starts[idx].tolist()])


def val_windows(stream: torch.Tensor, seq_len: int, limit: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of seq_len+1 tokens (sharing one boundary token) over the stream."""
    stream = stream.long()
    n = (len(stream) - 1) // seq_len
    picks = list(range(n))
    if limit and limit < n:   # evenly spaced over both plays
        picks = [i * n // limit for i in range(limit)]
    return torch.stack([stream[i * seq_len: i * seq_len + seq_len + 1] for i in picks])


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, batch_size: int = 8) -> float:
    """Mean next-token cross-entropy (nats) over all predicted tokens of the windows."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        w = windows[i: i + batch_size]
        logits = model(w[:, :-1])
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1),
                                 reduction="sum").item()
        count += w[:, 1:].numel()
    model.train()
    return total / count


# ---------------------------------------------------------------- training

def model_config(vocab_size: int) -> DemoConfig:
    return DemoConfig(vocab_size=vocab_size, hidden_size=192, intermediate_size=512,
                      num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=2,
                      max_position_embeddings=512)


def lr_at(step: int, a: TrainArgs) -> float:
    if step < a.warmup:
        return a.lr * (step + 1) / a.warmup
    progress = (step - a.warmup) / max(1, a.steps - a.warmup)
    return a.lr * (a.min_lr_ratio + (1 - a.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _fmt_time(s: float) -> str:
    s = int(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def train(a: TrainArgs, log=print) -> dict:
    torch.set_num_threads(a.threads)
    out_dir = os.path.join(a.out, a.variant)
    os.makedirs(out_dir, exist_ok=True)
    streams, tok = prepare_data(a.out, log)
    bos_id = tok.token_to_id(corpus.BOS)
    cfg = model_config(tok.get_vocab_size())

    torch.manual_seed(a.seed)
    model = DemoBitNet(cfg, quantized=(a.variant == "ternary"))
    decay = [p for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() == 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": a.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.95), eps=1e-8)
    forward = torch.compile(model) if a.compile else model
    batches = Batches(streams["train"], bos_id, a.batch_size, a.seq_len, a.seed)
    quick_val = val_windows(streams["val"], a.seq_len, a.eval_windows)
    tokens_per_step = a.batch_size * a.seq_len
    log(f"{a.variant}: {model.num_params() / 1e6:.2f}M parameters, {a.steps} steps x "
        f"{tokens_per_step} tokens = {a.steps * tokens_per_step / 1e6:.2f}M tokens "
        f"({a.steps * tokens_per_step / len(streams['train']):.2f} epochs), {a.threads} threads")

    history = []
    t_start = time.time()
    t_last, tok_last = t_start, 0
    loss_ema = None
    stopped_early = False
    step = 0
    for step in range(a.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, a)
        batch = batches.next()
        logits = forward(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), a.grad_clip)
        opt.step()
        loss_ema = loss.item() if loss_ema is None else 0.95 * loss_ema + 0.05 * loss.item()
        done = step + 1
        if done % a.log_every == 0 or done == a.steps:
            now = time.time()
            rate = (done * tokens_per_step - tok_last) / max(now - t_last, 1e-9)
            t_last, tok_last = now, done * tokens_per_step
            elapsed = now - t_start
            eta = elapsed / done * (a.steps - done)
            log(f"{a.variant} step {done}/{a.steps} loss {loss.item():.3f} (avg {loss_ema:.3f}) "
                f"lr {lr_at(step, a):.2e} {rate:.0f} tok/s elapsed {_fmt_time(elapsed)} ETA {_fmt_time(eta)}")
            history.append({"step": done, "loss": loss.item(), "loss_avg": loss_ema,
                            "tok_s": rate, "elapsed_s": elapsed})
        if done % a.eval_every == 0 and done < a.steps:
            v = evaluate(model, quick_val)
            log(f"{a.variant} step {done} quick val loss {v:.3f} (ppl {math.exp(v):.1f}, {len(quick_val)} windows)")
            history.append({"step": done, "quick_val_loss": v})
        if a.stop_after and done >= a.stop_after:
            log(f"{a.variant}: stopping at step {done} of {a.steps} (--stop-after)")
            stopped_early = True
            break
        if (time.time() - t_start) / 60 > a.max_minutes:
            log(f"{a.variant}: stopping at step {done}: past --max-minutes {a.max_minutes}")
            stopped_early = True
            break
    train_s = time.time() - t_start

    t0 = time.time()
    full_val = val_windows(streams["val"], a.seq_len, a.final_eval_windows or None)
    val_loss = evaluate(model, full_val)
    log(f"{a.variant}: validation loss {val_loss:.4f} nats/token, perplexity {math.exp(val_loss):.2f} "
        f"on {full_val[:, 1:].numel():,} tokens of {', '.join(streams['val_plays'])} "
        f"({time.time() - t0:.0f}s)")
    metrics = {
        "variant": a.variant, "params": model.num_params(), "steps_done": step + 1,
        "stopped_early": stopped_early, "tokens_seen": (step + 1) * tokens_per_step,
        "train_wall_s": train_s, "mean_tok_s": (step + 1) * tokens_per_step / train_s,
        "val_loss": val_loss, "val_ppl": math.exp(val_loss), "val_tokens": full_val[:, 1:].numel(),
        "val_plays": streams["val_plays"], "final_train_loss_avg": loss_ema,
        "args": asdict(a), "config": cfg.to_dict(), "torch": str(torch.__version__),
    }
    torch.save({"state_dict": model.state_dict(), "config": cfg.to_dict(),
                "quantized": model.quantized, "metrics": metrics}, os.path.join(out_dir, "checkpoint.pt"))
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    with open(os.path.join(out_dir, "history.json"), "w") as f:
        json.dump(history, f)
    return metrics


def load_checkpoint(path: str) -> DemoBitNet:
    ck = torch.load(path, map_location="cpu")
    model = DemoBitNet(DemoConfig(**ck["config"]), quantized=ck["quantized"])
    model.load_state_dict(ck["state_dict"])
    model.eval()
    return model
