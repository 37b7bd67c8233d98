"""Log-probabilities of tokens under the model: the log-softmax of the logits the model gave
(before any sampling setting: temperature, top-k/p and the penalties shape the draw, not the
model's distribution), as OpenAI's `logprobs` report them and evaluation harnesses sum them.

    lp = token_logprob(logits, token, top=5)   # TokenLogprob(token, logprob, top=[(id, lp), ...])
    scores = prompt_logprobs(all_position_logits, ids, top=1)   # one per prompt token after the first
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

MAX_TOP = 20  # OpenAI's bound on top_logprobs


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # most likely first


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log(softmax(x)) along the last axis, in float64 (sums in float32 lose the small tail)."""
    x = np.asarray(logits, dtype=np.float64)
    shifted = x - np.max(x, axis=-1, keepdims=True)
    return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))


def _top(row: np.ndarray, k: int) -> list[tuple[int, float]]:
    if k <= 0:
        return []
    k = min(k, row.size)
    best = np.argpartition(-row, k - 1)[:k]
    best = best[np.lexsort((best, -row[best]))]  # most likely first, ties by id
    return [(int(t), float(row[t])) for t in best]


def token_logprob(logits: np.ndarray, token: int, top: int = 0) -> TokenLogprob:
    """The log-probability of `token` under the logits of one position ([vocab]), and the
    `top` most likely tokens there."""
    row = log_softmax(logits)
    return TokenLogprob(int(token), float(row[int(token)]), _top(row, top))


def prompt_logprobs(logits: np.ndarray, ids, top: int = 0) -> list[TokenLogprob]:
    """Each prompt token after the first given the ones before it: `logits` [len(ids), vocab]
    holds every position's logits (row i predicts token i + 1); the last row is not used."""
    ids = [int(t) for t in ids]
    logits = np.asarray(logits)
    if logits.shape[0] != len(ids):
        raise ValueError(f"need the logits of all {len(ids)} positions, got {logits.shape[0]}")
    # row by row: a [positions, vocab] float64 array of a long prompt would be gigabytes
    return [token_logprob(logits[i], ids[i + 1], top) for i in range(len(ids) - 1)]
