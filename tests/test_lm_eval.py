"""lm-evaluation-harness (PyPI's lm-eval, its own CLI) scores models through `python -m server`.

Local tasks written here (a YAML task over a JSONL file: no downloads): a multiple-choice task
(loglikelihoods through /v1/completions with echo + logprobs) and a generation task (through
/v1/completions and, with the chat template, /v1/chat/completions). lm-eval tokenizes through
the server's /tokenize (its remote tokenizer). Checked per item:
- on the demo model (models/shakespeare-bitnet), every loglikelihood lm-eval reports equals
  what the engine computes directly (Engine.score) for the same tokens;
- on a tiny test checkpoint, it equals what transformers computes (within float tolerance);
- generations equal the engine's greedy text up to the task's stop string.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from runtime import Engine, GenerationSettings
from tests.api_support import server_subprocess

pytest.importorskip("lm_eval")

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "models" / "shakespeare-bitnet"

MC_ITEMS = [
    {"question": "ROMEO: But soft, what light through yonder", "choices": [" window breaks", " door opens", " sea"],
     "answer": 0},
    {"question": "KING: Now is the winter of our", "choices": [" discontent", " summer", " lord"], "answer": 0},
    {"question": "HAMLET: To be, or not to", "choices": [" be", " go", " sleep, my lord"], "answer": 0},
    {"question": "First Citizen: Before we proceed any further, hear me", "choices": [" speak", " sing"],
     "answer": 0},
]
GEN_ITEMS = [{"prompt": "ROMEO: My lord,", "target": " I"}, {"prompt": "JULIET: O Romeo,", "target": " my"}]
TINY_ITEMS = [{"question": "w5 w17 w33", "choices": [" w100", " w7 w250", " w9"], "answer": 1},
              {"question": "w12 w40", "choices": [" w99 w3", " w200"], "answer": 0}]


MC_TASK = """output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{answer}}"
metric_list:
  - metric: acc
"""
GEN_TASK = """output_type: generate_until
doc_to_text: "{{prompt}}"
doc_to_target: "{{target}}"
generation_kwargs:
  until: ["\\n", "."]
  max_gen_toks: 12
  do_sample: false
  temperature: 0
metric_list:
  - metric: exact_match
"""


def write_task(folder: Path, name: str, items, body: str) -> str:
    """A YAML task `name` over a JSONL file of `items` in `folder` (json dataset: no download)."""
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(i) + "\n" for i in items))
    (folder / f"{name}.yaml").write_text(f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                         f"    test: {data}\ntest_split: test\ntarget_delimiter: \"\"\n" + body)
    return name


def write_tasks(folder: Path, mc_items, gen_items=None, prefix="bitnet") -> list[str]:
    """The multiple-choice task (and the generation task) in `folder`; their names."""
    folder.mkdir(parents=True, exist_ok=True)
    names = [write_task(folder, f"{prefix}_mc", mc_items, MC_TASK)]
    if gen_items:
        names.append(write_task(folder, f"{prefix}_gen", gen_items, GEN_TASK))
    return names


def run_lm_eval(tmp: Path, model: str, base_url: str, tasks: list[str], include: Path, *extra) -> dict:
    """The lm_eval CLI in a subprocess (offline, caches under tmp); {task: [sample, ...]}.
    local-completions sends token ids (tokenized by the server's /tokenize); the chat model
    sends messages (the server applies the chat template)."""
    out = tmp / f"out-{model}"
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_HOME=str(tmp / "hf"),
               HF_DATASETS_CACHE=str(tmp / "hf" / "datasets"), TOKENIZERS_PARALLELISM="false")
    tokens = "tokenizer_backend=remote,tokenized_requests=True" if model == "local-completions" else \
        "tokenizer_backend=none,tokenized_requests=False"
    cmd = [sys.executable, "-m", "lm_eval", "--model", model, "--model_args",
           f"base_url={base_url},model=served,{tokens},num_concurrent=1,max_retries=1,timeout=120",
           "--tasks", ",".join(tasks), "--include_path", str(include), "--log_samples",
           "--output_path", str(out), *extra]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, cwd=tmp)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    samples = {}
    for path in out.rglob("samples_*.jsonl"):
        task = path.name[len("samples_"):].rsplit("_", 1)[0]
        samples[task] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    assert set(samples) == set(tasks), (list(out.rglob("*")), p.stderr[-3000:])
    return samples


def arguments(sample) -> list[tuple]:
    """The (context, continuation or generation kwargs) pairs of a sample, in request order."""
    args = sample["arguments"]
    if isinstance(args, dict):
        args = [tuple(a.values()) for a in args.values()]
    return [tuple(a) for a in args]


def loglikelihoods(sample) -> list[float]:
    return [float(r[0][0] if isinstance(r[0], list) else r[0]) for r in sample["resps"]]


def encode_pair(engine, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's own split (trailing spaces of the context move to the continuation; the pair
    is encoded whole and the continuation is what follows the context's tokens), through the
    same tokenizer the server's /tokenize uses (no special tokens)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        continuation = context[-spaces:] + continuation
        context = context[:-spaces]
    whole = engine.tokenizer.encode(context + continuation, add_special_tokens=False).ids
    ctx = engine.tokenizer.encode(context, add_special_tokens=False).ids
    return ctx, whole[len(ctx):]


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory):
    from export import export_checkpoint

    return export_checkpoint(str(DEMO), str(tmp_path_factory.mktemp("lmeval") / "demo"), ("ternary",),
                             progress=lambda m: None)


def test_lm_eval_on_the_demo_model(demo_folder, tmp_path):
    tasks = write_tasks(tmp_path / "tasks", MC_ITEMS, GEN_ITEMS)
    with server_subprocess([demo_folder, "--threads", "1"], cwd=str(ROOT)) as (url, _):
        samples = run_lm_eval(tmp_path, "local-completions", url + "/v1/completions", tasks, tmp_path / "tasks",
                              "--batch_size", "2")
        chat = run_lm_eval(tmp_path, "local-chat-completions", url + "/v1/chat/completions", tasks[1:],
                           tmp_path / "tasks", "--apply_chat_template")
    engine = Engine(demo_folder, "ternary", threads=1)
    checked = 0
    for sample in samples[tasks[0]]:
        for (context, continuation), got in zip(arguments(sample), loglikelihoods(sample)):
            ctx, cont = encode_pair(engine, context, continuation)
            scores = engine.score(ctx + cont)[len(ctx) - 1:]
            assert got == pytest.approx(sum(s.logprob for s in scores), abs=1e-4), (context, continuation)
            checked += 1
    assert checked == sum(len(i["choices"]) for i in MC_ITEMS)
    for sample in samples[tasks[1]]:
        context = arguments(sample)[0][0]
        ids = engine.tokenizer.encode(context, add_special_tokens=False).ids
        expected = "".join(e.text for e in engine.stream_tokens(ids, GenerationSettings(max_new_tokens=12)))
        for stop in ("\n", "."):
            expected = expected.split(stop)[0]
        assert sample["resps"][0][0] == expected, (context, sample["resps"])
    for sample in chat[tasks[1]]:  # the chat model: messages in, the engine's greedy answer out
        messages = json.loads(arguments(sample)[0][0][0])
        expected = engine.generate(messages=messages, settings=GenerationSettings(max_new_tokens=12, stop=["\n", "."]))
        assert sample["resps"][0][0] == expected.text and expected.text, (messages, sample["resps"])
    assert len(chat[tasks[1]]) == len(GEN_ITEMS)


def test_lm_eval_loglikelihoods_equal_transformers(tmp_path):
    import torch

    from export import export_checkpoint
    from runtime.logprobs import log_softmax
    from tests.checkpoints import load_reference, write_tiny_checkpoint

    ckpt = write_tiny_checkpoint(tmp_path / "ckpt", fmt="bitlinear", tied=False, seed=1)
    folder = export_checkpoint(str(ckpt), str(tmp_path / "onnx"), ("ternary",), progress=lambda m: None)
    tasks = write_tasks(tmp_path / "tasks", TINY_ITEMS, prefix="tiny")
    with server_subprocess([folder, "--threads", "1"], cwd=str(ROOT)) as (url, _):
        samples = run_lm_eval(tmp_path, "local-completions", url + "/v1/completions", tasks, tmp_path / "tasks")
    model = load_reference(ckpt)
    engine = Engine(folder, "ternary", threads=1)
    checked = 0
    for sample in samples[tasks[0]]:
        for (context, continuation), got in zip(arguments(sample), loglikelihoods(sample)):
            ctx, cont = encode_pair(engine, context, continuation)
            with torch.no_grad():
                logits = model(torch.tensor([ctx + cont])).logits[0].numpy()
            rows = log_softmax(logits)
            want = sum(rows[len(ctx) - 1 + i, t] for i, t in enumerate(cont))
            # logits agree within 2e-3 * max |logit| (tests/test_export.py): per token at most
            # twice that in a log-softmax
            assert abs(got - want) <= 4e-3 * float(np.abs(logits).max()) * len(cont), (context, continuation)
            checked += 1
    assert checked == sum(len(i["choices"]) for i in TINY_ITEMS)
