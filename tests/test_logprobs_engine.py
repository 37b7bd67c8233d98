"""Log-probabilities from the engine and the batcher, and n > 1 sharing one prefill.

- Engine.score (every prompt position's log-softmax) against transformers on a tiny
  checkpoint, and chunked against one piece;
- the logprobs a generation reports (settings.logprobs) equal the scores of the same tokens
  as a prompt, in the plain engine and through the batcher;
- Batcher.submit_many: the prompt is prefilled once, each of the n sequences equals a solo
  run with seed + j, a group waits for n free slots, n > slots is refused.
"""

from __future__ import annotations

import numpy as np
import pytest

from export import export_checkpoint
from runtime import Engine, GenerationSettings
from runtime.batcher import Batcher
from runtime.logprobs import log_softmax
from tests.checkpoints import load_reference, write_tiny_checkpoint

PROMPT = [0, 5, 17, 33, 100, 7, 250, 41, 9, 77, 3]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = tmp_path_factory.mktemp("logprobs")
    ckpt = write_tiny_checkpoint(base / "ckpt", fmt="bitlinear", tied=False, seed=1)
    out = export_checkpoint(str(ckpt), str(base / "onnx"), ("ternary", "int2"), progress=lambda m: None)
    return {"ckpt": ckpt, "dir": out}


@pytest.fixture(scope="module")
def reference_logprobs(tiny):
    import torch

    model = load_reference(tiny["ckpt"])
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT])).logits[0].numpy()
    return log_softmax(logits), float(np.abs(logits).max())


@pytest.mark.parametrize("variant", ["ternary", "int2"])
def test_score_matches_transformers(tiny, reference_logprobs, variant):
    engine = Engine(tiny["dir"], variant, threads=1, prefill_chunk=4)  # 3 chunks
    assert engine.lm_head == "native"  # a small head stays exact (export --lm-head auto)
    scores = engine.score(PROMPT, top=3)
    reference, scale = reference_logprobs
    assert [s.token for s in scores] == PROMPT[1:]
    got = np.array([s.logprob for s in scores])
    want = np.array([reference[i, PROMPT[i + 1]] for i in range(len(PROMPT) - 1)])
    # logits agree within 2e-3 * max |logit| (tests/test_export.py); a log-softmax moves by at
    # most twice the largest logit error
    np.testing.assert_allclose(got, want, rtol=0, atol=4e-3 * scale)
    for i, s in enumerate(scores):
        assert [t for t, _ in s.top][:1] == [int(np.argmax(reference[i]))] or \
            reference[i].max() - reference[i, s.top[0][0]] <= 4e-3 * scale


def test_score_in_chunks_equals_one_piece(tiny):
    whole = Engine(tiny["dir"], "ternary", threads=1, prefill_chunk=0).score(PROMPT, top=2)
    chunked = Engine(tiny["dir"], "ternary", threads=1, prefill_chunk=3).score(PROMPT, top=2)
    np.testing.assert_allclose([s.logprob for s in chunked], [s.logprob for s in whole], rtol=0, atol=1e-4)
    assert Engine(tiny["dir"], "ternary", threads=1).score(PROMPT[:1]) == []  # nothing to score


def _generated_against_scores(engine, events_source):
    result = events_source()
    assert result.logprobs is not None and len(result.logprobs) == len(result.token_ids)
    scores = engine.score(PROMPT + result.token_ids, top=2)[len(PROMPT) - 1:]
    for lp, s, token in zip(result.logprobs, scores, result.token_ids):
        assert lp.token == s.token == token
        assert abs(lp.logprob - s.logprob) <= 1e-3
        assert lp.top[0][0] == token  # greedy: the chosen token is the most likely one
        assert len(lp.top) == 2
    return result


def test_generation_reports_its_tokens_logprobs(tiny):
    engine = Engine(tiny["dir"], "ternary", threads=1)
    settings = GenerationSettings(max_new_tokens=8, stop_token_ids=[], logprobs=2)
    solo = _generated_against_scores(engine, lambda: _collect(engine.stream_tokens(PROMPT, settings)))
    batcher = Batcher(engine, slots=2, prefill_chunk=4)
    try:
        batched = _generated_against_scores(engine, lambda: _collect(batcher.submit(PROMPT, settings)))
    finally:
        batcher.close()
    assert batched.token_ids == solo.token_ids
    off = _collect(engine.stream_tokens(PROMPT, GenerationSettings(max_new_tokens=3)))
    assert off.logprobs is None


def _collect(events):
    from runtime.generation import GenerationResult

    return GenerationResult.collect(events)


def test_n_sequences_share_one_prefill(tiny):
    engine = Engine(tiny["dir"], "ternary", threads=1)
    batcher = Batcher(engine, slots=4, prefill_chunk=4)
    runs = []
    prefill = batcher.pool.prefill

    def counting_prefill(slot, ids, *args, **kw):
        runs.append(len(ids))
        return prefill(slot, ids, *args, **kw)

    batcher.pool.prefill = counting_prefill
    settings = GenerationSettings(max_new_tokens=10, temperature=1.0, seed=7, stop_token_ids=[])
    try:
        streams = batcher.submit_many(3, PROMPT, settings)
        results = [_collect(s) for s in streams]
    finally:
        batcher.close()
    assert sum(runs) == len(PROMPT)  # the prompt went through the model once for all three
    for j, result in enumerate(results):
        own = GenerationSettings(max_new_tokens=10, temperature=1.0, seed=7 + j, stop_token_ids=[])
        assert result.token_ids == _collect(engine.stream_tokens(PROMPT, own)).token_ids
    assert len({tuple(r.token_ids) for r in results}) > 1  # different seeds, different answers


def test_a_group_waits_for_its_slots_and_n_is_bounded(tiny):
    engine = Engine(tiny["dir"], "ternary", threads=1)
    batcher = Batcher(engine, slots=2, prefill_chunk=4)
    try:
        with pytest.raises(ValueError, match="n must be an integer from 1 to the batcher's 2 slots"):
            batcher.submit_many(3, PROMPT)
        long = batcher.submit(PROMPT, GenerationSettings(max_new_tokens=30, stop_token_ids=[]))
        next(long)  # it holds a slot now: a group of two must wait for it
        pair = batcher.submit_many(2, PROMPT, GenerationSettings(max_new_tokens=3, stop_token_ids=[]))
        assert pair[0].queue_position == 1 and pair[1].queue_position == 1
        rest = _collect(long)
        results = [_collect(s) for s in pair]
        assert rest.finish_reason == "length"
        assert all(r.stats.queue_wait_s > 0 and len(r.token_ids) == 3 for r in results)
        assert results[0].token_ids == results[1].token_ids  # greedy: the same answer twice
    finally:
        batcher.close()
