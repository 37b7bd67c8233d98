"""`python -m export --kv-cache float16`: the ternary variant's KV cache in half precision.
The graph's past/present tensors become float16, the runtime allocates half the bytes, and the
model still matches transformers in both cache modes; the demo model generates the same text
as with float32.

Tolerance: a half keeps 11 significant bits, so each cached key and value moves by up to
2^-11 relative; through the next projection's int8 activation quantization (steps of
max|x| / 127) a few codes flip, as with int4's re-quantization in tests/test_export.py. So the
bound is int4's, 2e-2 * max |logit| (measured up to 5.6e-3 here), and greedy decoding is
checked teacher-forced: our argmax is transformers' token unless transformers scores ours
within that tolerance of its own."""

from __future__ import annotations

import numpy as np
import pytest

from export import export_checkpoint
from export.errors import ExportError
from runtime import Engine, GenerationSettings
from runtime.folder import variant_path
from tests.checkpoints import load_reference
from tests.export_harness import (GrowingCache, SharedBuffer, assert_logits_close, export_tiny_case, load_config,
                                  make_session, reference_greedy, reference_logits)
from tests.test_export import CASES, PROMPT, RELATIVE_TOLERANCE, STEPS, _assert_greedy_up_to_near_ties

TOLERANCE = RELATIVE_TOLERANCE["int4"]

DEMO = "models/shakespeare-bitnet"


@pytest.fixture(scope="module", params=["bitlinear-tied", "float-untied-odd", "llama-bitlinear-untied"])
def exported(request, tmp_path_factory):
    base = tmp_path_factory.mktemp(request.param)
    ckpt, out = export_tiny_case(base, request.param, CASES[request.param], ("ternary",), kv_cache="float16")
    model = load_reference(ckpt)
    tokens = reference_greedy(model, PROMPT, 32)
    return {"out": out, "cfg": load_config(out), "logits": reference_logits(model, PROMPT, STEPS),
            "greedy": tokens, "greedy_logits": reference_logits(model, PROMPT, tokens[:-1])}


def test_the_graph_declares_a_float16_cache(exported):
    import onnx

    model = onnx.load(variant_path(exported["out"], "ternary"), load_external_data=False)
    caches = [v for v in list(model.graph.input) + list(model.graph.output) if "key" in v.name or "value" in v.name]
    assert len(caches) == 4 * exported["cfg"]["num_layers"]
    assert {v.type.tensor_type.elem_type for v in caches} == {onnx.TensorProto.FLOAT16}
    assert exported["cfg"]["kv_cache_dtypes"] == {"ternary": "float16"}


def test_logits_and_greedy_match_transformers(exported):
    session = make_session(exported["out"], "ternary")
    expected = exported["logits"]
    scale = max(float(np.abs(x).max()) for x in expected)
    for runner_class in (GrowingCache, SharedBuffer):
        assert_logits_close(runner_class(session, exported["cfg"]), PROMPT, STEPS, expected, TOLERANCE * scale)
        _assert_greedy_up_to_near_ties(runner_class(session, exported["cfg"]), exported, TOLERANCE * scale)


@pytest.fixture(scope="module")
def demo_folders(tmp_path_factory):
    base = tmp_path_factory.mktemp("demo")
    return {cache: export_checkpoint(DEMO, str(base / cache), ("ternary",), kv_cache=cache, progress=lambda m: None)
            for cache in ("float32", "float16")}


def test_demo_model_generates_the_same_text_with_half_the_cache(demo_folders):
    engines = {cache: Engine(folder, "ternary", threads=2) for cache, folder in demo_folders.items()}
    settings = GenerationSettings(max_new_tokens=48, temperature=0.0, stop_token_ids=[])
    prompt = "ROMEO:\nBut soft, what light"
    results = {cache: engine.generate(prompt, settings=settings) for cache, engine in engines.items()}
    assert results["float16"].token_ids == results["float32"].token_ids
    assert len(results["float32"].token_ids) == 48 and results["float16"].text == results["float32"].text
    caches = {cache: engine.new_cache(256) for cache, engine in engines.items()}
    assert caches["float16"].dtype == np.float16 and caches["float32"].dtype == np.float32
    assert caches["float16"].nbytes * 2 == caches["float32"].nbytes


def test_float16_cache_needs_the_ternary_variant(tmp_path):
    with pytest.raises(ExportError, match="--kv-cache float16 applies to the ternary variant only"):
        export_checkpoint(DEMO, str(tmp_path / "out"), ("int2",), kv_cache="float16", progress=lambda m: None)
    with pytest.raises(ExportError, match="--kv-cache must be one of float32, float16"):
        export_checkpoint(DEMO, str(tmp_path / "out"), ("ternary",), kv_cache="bfloat16", progress=lambda m: None)


def test_onnxruntime_genai_runs_the_float16_cache(exported):
    """genai sizes its cache from the graph's declared type: the same greedy tokens as our runtime."""
    from tests.test_genai import genai_greedy, genai_model, runtime_greedy

    tokens = genai_greedy(genai_model(exported["out"]), PROMPT, 16)
    assert tokens == runtime_greedy(exported["out"], "ternary", PROMPT, 16)
