"""Parity of exported models with transformers' BitNetForCausalLM (float32) on tiny checkpoints.

Tolerance: the ternary and fp32 variants compute exactly the reference's integer dot
products, and so does int2 on these checkpoints because every projection's K is <= 128, one
MatMulNBits block (at 2B4T's K = 2560 int2 is approximate: tests/test_matmulnbits.py
measures it). So logits agree to float32 rounding, typically ~3e-7 * max |logit|. The int8
activation quantization is discontinuous, though: when the reference has x*s exactly on a .5
tie (it happens: 108.5 in one of these checkpoints), a last-bit difference in an RMSNorm
moves one xq by 1 and the logits by up to ~4e-4 * max |logit|. So the bound is
max |diff| <= 2e-3 * max |reference logit|. int4 runs MatMulNBits with accuracy_level 4,
which re-quantizes its (already int8-valued) input per block of 32: 2e-2 (measured ~3e-3).
Each check covers a 7-token prompt, then 5 single-token steps through the KV cache, in both
cache modes (growing Optimum-style cache and the runtime's shared preallocated buffers),
then 32 greedy tokens that must equal transformers' generate() (int4: teacher-forced, see
_assert_greedy_up_to_near_ties).
"""

from __future__ import annotations

import numpy as np
import pytest

from runtime.folder import FORMAT_VERSION, VARIANTS
from tests.checkpoints import load_reference
from tests.export_harness import (GrowingCache, SharedBuffer, assert_logits_close, export_tiny_case, greedy,
                                  load_config, make_session, reference_greedy, reference_logits)

ALL_VARIANTS = VARIANTS
RELATIVE_TOLERANCE = {"ternary": 2e-3, "int2": 2e-3, "fp32": 2e-3, "int4": 2e-2}
PROMPT = [0, 5, 17, 33, 100, 7, 250]
STEPS = [12, 40, 99, 3, 200]

CASES = {
    # name: (format, tied, extra writer arguments)
    "bitlinear-tied": ("bitlinear", True, {}),
    "bitlinear-untied-sharded": ("bitlinear", False, {"shards": 3}),
    "autobitlinear-untied": ("autobitlinear", False, {}),
    "autobitlinear-unpacked-tied": ("autobitlinear_unpacked", True, {}),
    "float-untied-odd": ("float", False, {"hidden_size": 96, "num_attention_heads": 6,
                                          "num_key_value_heads": 3, "intermediate_size": 36,
                                          "vocab_size": 301, "num_hidden_layers": 3}),
    "float-fp32-tied": ("float", True, {"float_dtype": "fp32"}),
    # LLaMA-architecture BitNet (HF1BitLLM/Llama3-8B-1.58, Falcon3-*-1.58bit): no sub-norms,
    # SiLU-gated MLP, head_dim 32 with heads*head_dim != hidden_size.
    "llama-bitlinear-untied": ("bitlinear", False, {"arch": "llama", "head_dim": 32}),
    # quantization_config.use_rms_norm: an RMSNorm in front of every BitLinear. Distinct norm
    # weights: q/k/v and gate/up can no longer share one quantized input, so they stay separate.
    "llama-rmsnorm-autobitlinear": ("autobitlinear", False, {"arch": "llama", "linear_rms_norm": "random"}),
    "bitlinear-rmsnorm-equal": ("bitlinear", True, {"linear_rms_norm": "ones"}),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def exported(request, tmp_path_factory):
    ckpt, out = export_tiny_case(tmp_path_factory.mktemp(request.param), request.param,
                                 CASES[request.param], ALL_VARIANTS)
    model = load_reference(ckpt)
    tokens = reference_greedy(model, PROMPT, 32)
    return {
        "name": request.param, "out": out, "cfg": load_config(out),
        "logits": reference_logits(model, PROMPT, STEPS),
        "greedy": tokens,
        # the reference's logits along its own greedy path: row -1 of entry i predicts tokens[i]
        "greedy_logits": reference_logits(model, PROMPT, tokens[:-1]),
        "batch_logits": _reference_batch(model),
    }


PROMPT_B = [0, 9, 8, 7, 6, 250, 100]


def _reference_batch(model):
    import torch

    with torch.no_grad():
        return model(torch.tensor([PROMPT, PROMPT_B])).logits.numpy()


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_logits_and_greedy_match_transformers(exported, variant):
    session = make_session(exported["out"], variant)
    expected = exported["logits"]
    scale = max(float(np.abs(x).max()) for x in expected)
    for runner_class in (GrowingCache, SharedBuffer):
        assert_logits_close(runner_class(session, exported["cfg"]), PROMPT, STEPS, expected,
                            RELATIVE_TOLERANCE[variant] * scale)
        if variant == "int4":
            _assert_greedy_up_to_near_ties(runner_class(session, exported["cfg"]), exported,
                                           RELATIVE_TOLERANCE[variant] * scale)
        else:
            tokens = greedy(runner_class(session, exported["cfg"]), PROMPT, 32)
            assert tokens == exported["greedy"], runner_class.__name__


def _assert_greedy_up_to_near_ties(runner, exported, tolerance):
    """int4 is approximate, so its free-running greedy text may fork at a near tie. Instead,
    teacher-force the reference's 32 greedy tokens: at every step our argmax must be the
    reference's token, unless the reference scores ours within `tolerance` of its own."""
    logits = runner.step(PROMPT)
    for i, token in enumerate(exported["greedy"]):
        ours = int(np.argmax(logits[-1]))
        reference = exported["greedy_logits"][i][-1]
        assert ours == token or reference[token] - reference[ours] <= tolerance, (i, ours, token)
        logits = runner.step([token])


def test_model_folder_layout(exported):
    cfg = exported["cfg"]
    assert cfg["format"] == "bitnet-onnx" and cfg["format_version"] == FORMAT_VERSION == 2
    assert cfg["variants"] == {"ternary": "model.onnx", "int2": "model.int2.onnx",
                               "int4": "model.int4.onnx", "fp32": "model.fp32.onnx"}
    assert cfg["custom_op_domain"] == "bitnet"
    assert cfg["stop_token_ids"] == [1, 2]  # eos, then <|eot_id|> of the tiny tokenizer
    assert cfg["bos_token_id"] == 0 and cfg["add_bos_token"] is True
    import os

    names = set(os.listdir(exported["out"]))
    for model in cfg["variants"].values():
        assert model in names and model + ".data" in names
    assert {"tokenizer.json", "tokenizer_config.json", "bitnet_onnx.json"} <= names


def test_graph_uses_fused_projections_and_contrib_ops(exported):
    import os

    import onnx

    model = onnx.load(os.path.join(exported["out"], "model.onnx"), load_external_data=False)
    ops = [n.op_type for n in model.graph.node]
    layers = exported["cfg"]["num_layers"]
    separate = CASES[exported["name"]][2].get("linear_rms_norm") == "random"
    # fused: qkv, o, gate_up, down; separate input norms: q, k, v, o, gate, up, down
    assert ops.count("BitLinear") == (7 if separate else 4) * layers
    assert ops.count("GroupQueryAttention") == layers
    assert "SkipSimplifiedLayerNormalization" in ops
    assert [i.name for i in model.graph.input][:2] == ["input_ids", "attention_mask"]
    assert model.graph.output[0].name == "logits"
    assert model.graph.output[1].name == "present.0.key"
    assert "MatMul" not in ops
    head = [n for n in model.graph.node if n.name == "lm_head"][0]
    if exported["cfg"]["embedding_dtype"] == "float16":
        assert head.op_type == "MatMulF16"  # shares the fp16 embedding, never expanded
        if exported["cfg"]["tie_word_embeddings"]:
            assert head.input[1] == "model.embed_tokens.weight"


@pytest.mark.parametrize("runner_class", [GrowingCache, SharedBuffer])
def test_prompt_in_chunks_matches_one_prefill(exported, runner_class):
    """A later multi-token call (chunked prefill, several tokens after a cached prefix)."""
    session = make_session(exported["out"], "ternary")
    runner = runner_class(session, exported["cfg"])
    runner.step(PROMPT[:3])
    got = runner.step(PROMPT[3:])
    expected = exported["logits"][0][3:]
    assert np.abs(got - expected).max() <= RELATIVE_TOLERANCE["ternary"] * np.abs(expected).max()


@pytest.mark.parametrize("variant", ["ternary", "int2"])
def test_num_logits_to_keep_returns_the_last_positions(exported, variant):
    """Input num_logits_to_keep: 0 = all positions, n = the last n only; a scalar (as
    transformers.js feeds it) and a [1] tensor (as onnxruntime-genai does) both work; left out,
    the graph's default is 0 (all positions, what an Optimum-style caller expects)."""
    session = make_session(exported["out"], variant)
    cfg = exported["cfg"]
    empty = np.zeros((1, cfg["num_key_value_heads"], 0, cfg["head_dim"]), np.float32)
    feed = {"input_ids": np.array([PROMPT], np.int64), "attention_mask": np.ones((1, len(PROMPT)), np.int64)}
    feed.update({f"past_key_values.{i}.{k}": empty for i in range(cfg["num_layers"]) for k in ("key", "value")})
    omitted = session.run(["logits"], feed)[0]
    full = session.run(["logits"], dict(feed, num_logits_to_keep=np.array(0, np.int64)))[0]
    np.testing.assert_array_equal(omitted, full)
    full_1d = session.run(["logits"], dict(feed, num_logits_to_keep=np.zeros([1], np.int64)))[0]
    last = session.run(["logits"], dict(feed, num_logits_to_keep=np.array([1], np.int64)))[0]
    two = session.run(["logits"], dict(feed, num_logits_to_keep=np.array(2, np.int64)))[0]
    assert full.shape[1] == len(PROMPT) and last.shape[1] == 1 and two.shape[1] == 2
    np.testing.assert_array_equal(full, full_1d)
    np.testing.assert_allclose(last[0, 0], full[0, -1], rtol=0, atol=1e-5 * np.abs(full).max())
    np.testing.assert_allclose(two[0], full[0, -2:], rtol=0, atol=1e-5 * np.abs(full).max())


@pytest.mark.parametrize("variant", ["ternary", "int2"])
def test_optimum_style_loop_on_plain_onnxruntime(exported, variant):
    """A loop that knows only input_ids, attention_mask and past_key_values (present fed back
    as past), on an InferenceSession with onnxruntime's default options: the logits of every
    position and the greedy tokens are transformers'."""
    import onnxruntime as ort

    from runtime.folder import variant_path

    options = ort.SessionOptions()
    if variant == "ternary":
        import custom_ops

        options.register_custom_ops_library(custom_ops.library_path())
    session = ort.InferenceSession(variant_path(exported["out"], variant), options,
                                   providers=["CPUExecutionProvider"])
    assert "num_logits_to_keep" not in {i.name for i in session.get_inputs()}  # nothing more to feed
    runner = GrowingCache(session, exported["cfg"], feed_num_logits_to_keep=False)
    expected = exported["logits"]
    scale = max(float(np.abs(x).max()) for x in expected)
    got = [runner.step(PROMPT)] + [runner.step([t]) for t in STEPS]
    assert got[0].shape[0] == len(PROMPT)  # every position, as Optimum expects
    for g, e in zip(got, expected):
        assert g.shape == e.shape and float(np.abs(g - e).max()) <= RELATIVE_TOLERANCE[variant] * scale
    runner = GrowingCache(session, exported["cfg"], feed_num_logits_to_keep=False)
    assert greedy(runner, PROMPT, 32) == exported["greedy"]


def test_shared_buffers_need_no_clearing(exported):
    """Stale values beyond the current length (a previous conversation) are never read."""
    session = make_session(exported["out"], "ternary")
    runner = SharedBuffer(session, exported["cfg"])
    rng = np.random.default_rng(0)
    for value in runner.buffers.values():
        value.update_inplace(rng.standard_normal(value.shape()).astype(np.float32) * 100)
    got = [runner.step(PROMPT)] + [runner.step([t]) for t in STEPS]
    scale = max(float(np.abs(x).max()) for x in exported["logits"])
    for g, e in zip(got, exported["logits"]):
        assert np.abs(g - e).max() <= RELATIVE_TOLERANCE["ternary"] * scale


def test_batch_of_two_without_padding(exported):
    """Two rows of the same length in one call, growing-cache style (GQA takes no left padding)."""
    session = make_session(exported["out"], "ternary")
    cfg = exported["cfg"]
    empty = np.zeros((2, cfg["num_key_value_heads"], 0, cfg["head_dim"]), np.float32)
    feed = {"input_ids": np.array([PROMPT, PROMPT_B], np.int64),
            "attention_mask": np.ones((2, len(PROMPT)), np.int64), "num_logits_to_keep": np.array(0, np.int64)}
    feed.update({f"past_key_values.{i}.{k}": empty for i in range(cfg["num_layers"]) for k in ("key", "value")})
    logits = session.run(["logits"], feed)[0]
    expected = exported["batch_logits"]
    assert np.abs(logits - expected).max() <= RELATIVE_TOLERANCE["ternary"] * np.abs(expected).max()
