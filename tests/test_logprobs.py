"""runtime/logprobs.py against a direct float64 reference: log(exp(x_i) / sum_j exp(x_j))."""

import math

import numpy as np
import pytest

from runtime.logprobs import log_softmax, prompt_logprobs, token_logprob


def reference(row, token):
    total = math.fsum(math.exp(float(v)) for v in row)
    return math.log(math.exp(float(row[token])) / total)


def test_token_logprob_and_top():
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal(50) * 4).astype(np.float32)
    lp = token_logprob(logits, 7, top=5)
    assert lp.token == 7 and lp.logprob == pytest.approx(reference(logits, 7), abs=1e-9)
    order = sorted(range(50), key=lambda t: -logits[t])[:5]
    assert [t for t, _ in lp.top] == order
    for t, v in lp.top:
        assert v == pytest.approx(reference(logits, t), abs=1e-9)
    assert token_logprob(logits, 7).top == []


def test_large_logits_do_not_overflow():
    logits = np.array([1000.0, 999.0, -1000.0], np.float32)
    row = log_softmax(logits)
    assert np.isfinite(row[:2]).all() and row[0] == pytest.approx(-math.log1p(math.exp(-1)))
    assert np.exp(row).sum() == pytest.approx(1.0)


def test_prompt_logprobs_score_each_next_token():
    rng = np.random.default_rng(1)
    ids = [3, 9, 1, 4, 4]
    logits = rng.standard_normal((len(ids), 12)).astype(np.float32)
    scores = prompt_logprobs(logits, ids, top=2)
    assert [s.token for s in scores] == ids[1:]
    for i, s in enumerate(scores):
        assert s.logprob == pytest.approx(reference(logits[i], ids[i + 1]), abs=1e-9)
        assert s.top[0][0] == int(np.argmax(logits[i]))
    with pytest.raises(ValueError, match="all 5 positions"):
        prompt_logprobs(logits[:4], ids)
