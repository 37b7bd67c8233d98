"""Fidelity of the 8-bit lm_heads against the exact head, teacher-forced (a measurement, not a test).

    python bench/head_fidelity.py [--steps 128] [--markdown]

For each checkpoint: export the ternary variant with `--lm-head native` (the exact head: fp16
MatMulF16 or fp32 Gemm) and `--lm-head int8` (bitnet.MatMulI8, one int8 table shared with the
embedding), plus the int2 baseline with `--lm-head int8` (stock MatMulNBits bits=8); run one
teacher-forced pass over a token sequence (every position's logits) and compare with the exact
export and with transformers' float32 logits: max |logit difference| / max |logit| and top-1
agreement over all positions. Checkpoints:
- the demo model (models/shakespeare-bitnet) on a Shakespeare passage;
- the test checkpoints of tests/checkpoints.py (random weights) on the reference's own greedy path;
- a synthetic checkpoint (vocab 32000, hidden 512) whose embedding rows have a realistic spread
  of norms (log-normal row scales, sigma 0.5, and 16 channels 8x larger), on random tokens.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

from export import export_checkpoint  # noqa: E402
from tests.checkpoints import load_reference, write_tiny_checkpoint  # noqa: E402
from tests.export_harness import load_config, make_session  # noqa: E402

PASSAGE = ("KING HENRY: Once more unto the breach, dear friends, once more; or close the wall up with "
           "our English dead. In peace there's nothing so becomes a man as modest stillness and humility: "
           "but when the blast of war blows in our ears, then imitate the action of the tiger; stiffen the "
           "sinews, summon up the blood, disguise fair nature with hard-favour'd rage.")


def onnx_logits(folder: str, variant: str, ids: list[int]) -> np.ndarray:
    """Every position's logits from one prefill of `ids` (teacher forcing)."""
    session = make_session(folder, variant)
    cfg = load_config(folder)
    feed = {"input_ids": np.asarray([ids], np.int64), "attention_mask": np.ones((1, len(ids)), np.int64)}
    for i in range(cfg["num_layers"]):
        for kind in ("key", "value"):
            feed[f"past_key_values.{i}.{kind}"] = np.zeros((1, cfg["num_key_value_heads"], 0, cfg["head_dim"]), np.float32)
    return session.run(["logits"], feed)[0][0]


def reference_logits(ckpt: str, ids: list[int]) -> np.ndarray:
    import torch

    model = load_reference(ckpt)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def compare(got: np.ndarray, exact: np.ndarray) -> tuple[float, float]:
    rel = float(np.abs(got - exact).max() / np.abs(exact).max())
    top1 = float(np.mean(got.argmax(-1) == exact.argmax(-1)))
    return rel, top1


def measure(name: str, ckpt: str, ids: list[int], work: Path) -> list[tuple]:
    folders = {}
    for head in ("native", "int8"):
        out = work / f"{name}-{head}"
        folders[head] = export_checkpoint(ckpt, str(out), ["ternary", "int2"], lm_head=head, progress=lambda m: None)
    ref = reference_logits(ckpt, ids)
    exact = onnx_logits(folders["native"], "ternary", ids)
    rows = [(name, "ternary, exact head (`native`)", "transformers", *compare(exact, ref), len(ids))]
    for variant, label in (("ternary", "ternary, MatMulI8 (`int8`)"), ("int2", "int2, MatMulNBits 8-bit (`int8`)")):
        got = onnx_logits(folders["int8"], variant, ids)
        same_variant_exact = exact if variant == "ternary" else onnx_logits(folders["native"], "int2", ids)
        rows.append((name, label, "same export, exact head", *compare(got, same_variant_exact), len(ids)))
        rows.append((name, label, "transformers", *compare(got, ref), len(ids)))
    return rows


@contextlib.contextmanager
def exact_embedding():
    """Diagnostic: MatMulI8 head but the embedding Gathers an exact fp32 table (not the shared
    int8 one), to split the int8 export's error between head and embedding."""
    import export.variants as variants

    shared = variants._Variant._int8_table_embedding

    def head_only(self, b, ids, embedding):
        shared(self, b, ids, embedding)  # registers the int8 head table
        return b.op("Gather", [b.initializer("model.embed_tokens.weight", embedding.astype(np.float32)), ids], axis=0)

    variants._Variant._int8_table_embedding = head_only
    try:
        yield
    finally:
        variants._Variant._int8_table_embedding = shared


def split_error(name: str, ckpt: str, ids: list[int], work: Path) -> list[tuple]:
    exact = onnx_logits(export_checkpoint(ckpt, str(work / f"{name}-x"), ["ternary"], lm_head="native",
                                          progress=lambda m: None), "ternary", ids)
    with exact_embedding():
        out = export_checkpoint(ckpt, str(work / f"{name}-h"), ["ternary"], lm_head="int8", progress=lambda m: None)
    got = onnx_logits(out, "ternary", ids)
    return [(name, "ternary, MatMulI8 head, exact embedding (diagnostic)", "same export, exact head",
             *compare(got, exact), len(ids))]


def demo_ids(steps: int) -> list[int]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(ROOT / "models/shakespeare-bitnet/tokenizer.json"))
    ids = tok.encode(PASSAGE).ids
    return ids[:steps]


def synthetic_checkpoint(path: Path, seed: int = 0) -> str:
    """A tied BitNet checkpoint whose embedding rows have a realistic spread of norms."""
    import torch
    from safetensors.torch import load_file, save_file

    ckpt = write_tiny_checkpoint(path, fmt="bitlinear", tied=True, seed=seed, vocab_size=32000, hidden_size=512,
                                 num_attention_heads=8, num_key_value_heads=4, intermediate_size=384,
                                 num_hidden_layers=2, max_position_embeddings=256)
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((32000, 512)) * np.exp(rng.normal(0, 0.5, (32000, 1))) * 0.02
    emb[:, rng.choice(512, 16, replace=False)] *= 8.0
    for file in sorted(Path(ckpt).glob("*.safetensors")):
        tensors = load_file(str(file))
        if "model.embed_tokens.weight" in tensors:
            tensors["model.embed_tokens.weight"] = torch.tensor(emb, dtype=torch.bfloat16)
            save_file(tensors, str(file), metadata={"format": "pt"})
    return str(ckpt)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=128, help="teacher-forced positions per checkpoint")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--checkpoint", action="append", default=[],
                        help="also measure this checkpoint (hub id or folder; repeatable)")
    parser.add_argument("--only", action="store_true", help="only the --checkpoint ones")
    parser.add_argument("--text", default=PASSAGE, help="passage the --checkpoint ones are teacher-forced on")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for source in args.checkpoint:
            from export.source import resolve_source
            from tokenizers import Tokenizer

            folder = resolve_source(source, None)
            ids = Tokenizer.from_file(str(Path(folder) / "tokenizer.json")).encode(args.text).ids[:args.steps]
            name = Path(source).name
            rows += measure(name, source, ids, work)
            rows += split_error(name, source, ids, work)
        demo = str(ROOT / "models/shakespeare-bitnet")
        if args.only:
            return report(rows, args.markdown)
        rows += measure("demo (shakespeare-bitnet)", demo, demo_ids(args.steps), work)
        rows += split_error("demo (shakespeare-bitnet)", demo, demo_ids(args.steps), work)
        rng = np.random.default_rng(0)
        from tests.test_export import CASES  # the parity tests' checkpoints

        for case, (fmt, tied, extra) in sorted(CASES.items()):
            ckpt = write_tiny_checkpoint(work / f"ckpt-{case}", fmt=fmt, tied=tied, seed=len(case), **extra)
            vocab = extra.get("vocab_size", 263)
            ids = [0] + rng.integers(3, vocab, min(args.steps, 100) - 1).tolist()
            rows += measure(f"test checkpoint {case}", str(ckpt), ids, work)
        ckpt = synthetic_checkpoint(work / "ckpt-synthetic")
        ids = [0] + rng.integers(3, 32000, args.steps - 1).tolist()
        name = "synthetic (vocab 32000, hidden 512, realistic row norms)"
        rows += measure(name, ckpt, ids, work)
        rows += split_error(name, ckpt, ids, work)
    return report(rows, args.markdown)


def report(rows, markdown: bool) -> int:
    if markdown:
        print("| checkpoint | head | against | max \\|diff\\| / max \\|logit\\| | top-1 agreement | positions |")
        print("|---|---|---|---:|---:|---:|")
        for name, head, against, rel, top1, n in rows:
            print(f"| {name} | {head} | {against} | {rel:.2e} | {top1:.1%} | {n} |")
    else:
        for row in rows:
            print(*row, sep="\t")
    return 0


if __name__ == "__main__":
    sys.exit(main())
