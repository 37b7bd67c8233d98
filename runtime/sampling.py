"""Generation settings and the logits processor / sampler (numpy, one vector at a time).

Order of operations, as transformers' `generate` applies them, with OpenAI's frequency and
presence penalties next to the repetition penalty (as vLLM and llama.cpp place them):
repetition penalty -> frequency/presence penalties -> (greedy: argmax) | temperature -> top-k
-> top-p -> softmax -> draw.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .logprobs import MAX_TOP


@dataclass
class GenerationSettings:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    repetition_penalty: float = 1.0  # 1 = off; transformers' CTRL-style penalty
    # OpenAI's penalties, in [-2, 2], 0 = off: logit -= frequency_penalty * count +
    # presence_penalty * (count > 0), count = times the token was generated so far (not the prompt)
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None  # None: a fresh random seed per generation
    # None: no log-probabilities; k >= 0: each generated token's log-probability under the model
    # (log-softmax of the logits it was sampled from) and the k most likely tokens there
    logprobs: int | None = None
    stop: list[str] = field(default_factory=list)  # stop strings (not included in the text)
    # Extras beyond the minimal contract:
    stop_token_ids: list[int] | None = None  # None: the model's stop ids; []: never stop on ids
    truncate: bool = False  # messages only: drop the oldest non-system turns when too long
    max_time_s: float | None = None  # stop after this many seconds (finish reason "time"), like
    # transformers' max_time: counted from the call, checked between tokens

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        if not isinstance(self.max_new_tokens, (int, np.integer)) or isinstance(self.max_new_tokens, bool) \
                or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not np.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if not isinstance(self.top_k, (int, np.integer)) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not np.isfinite(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty!r}")
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
                    or not np.isfinite(value) or not -2.0 <= value <= 2.0:
                raise ValueError(f"{name} must be a number in [-2, 2] (0 = off), got {value!r}")
        if self.logprobs is not None and (isinstance(self.logprobs, bool) or not isinstance(
                self.logprobs, (int, np.integer)) or not 0 <= self.logprobs <= MAX_TOP):
            raise ValueError(f"logprobs must be None or an integer in [0, {MAX_TOP}], got {self.logprobs!r}")
        if self.seed is not None and (not isinstance(self.seed, (int, np.integer)) or isinstance(self.seed, bool)
                                      or self.seed < 0):
            raise ValueError(f"seed must be None or an integer >= 0, got {self.seed!r}")
        if self.max_time_s is not None and (isinstance(self.max_time_s, bool) or not isinstance(
                self.max_time_s, (int, float, np.integer, np.floating)) or not self.max_time_s > 0
                or not np.isfinite(self.max_time_s)):
            raise ValueError(f"max_time_s must be None or a number of seconds > 0, got {self.max_time_s!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not all(isinstance(s, str) for s in self.stop):
            raise ValueError("stop must be a list of strings")
        self.stop = [s for s in self.stop if s]  # an empty stop string would stop at once


def apply_repetition_penalty(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """transformers' RepetitionPenaltyLogitsProcessor: for every token already seen (prompt and
    generated), divide a positive logit by `penalty`, multiply a negative one. In place."""
    if penalty == 1.0 or seen.size == 0:
        return logits
    values = logits[seen]
    logits[seen] = np.where(values > 0, values / penalty, values * penalty)
    return logits


def apply_frequency_presence_penalties(logits: np.ndarray, counts: np.ndarray, frequency: float,
                                       presence: float) -> np.ndarray:
    """OpenAI's penalties: logits[j] -= counts[j] * frequency + (counts[j] > 0) * presence, where
    counts[j] is how often token j was generated so far. In place."""
    if frequency == 0.0 and presence == 0.0:
        return logits
    logits -= (counts * np.float32(frequency) + (counts > 0) * np.float32(presence)).astype(logits.dtype)
    return logits


def filter_top_k(logits: np.ndarray, k: int) -> np.ndarray:
    """Keep the k largest logits (ties at the k-th value are kept, as transformers does)."""
    if k <= 0 or k >= logits.size:
        return logits
    kth = np.partition(logits, -k)[-k]
    logits[logits < kth] = -np.inf
    return logits


def filter_top_p(logits: np.ndarray, p: float) -> np.ndarray:
    """Nucleus filter (transformers' TopPLogitsWarper): keep the smallest set of most likely
    tokens whose probability sums to >= p; the most likely token is always kept."""
    if p >= 1.0:
        return logits
    order = np.argsort(logits, kind="stable")  # ascending
    probs = softmax(logits[order])
    cumulative = np.cumsum(probs, dtype=np.float64)
    remove = cumulative <= (1.0 - p)
    remove[-1] = False
    logits[order[remove]] = -np.inf
    return logits


def softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = np.max(x)
    e = np.exp(x - m)
    return e / e.sum()


def token_distribution(logits: np.ndarray, settings: GenerationSettings, seen=None,
                       counts=None) -> np.ndarray:
    """The probabilities the sampler draws from for one step (float64, sums to 1).
    `seen`: token ids for the repetition penalty (prompt and generated); `counts`: per-token
    counts of the generated tokens [vocab] for the frequency/presence penalties.
    Greedy settings (temperature 0) give a one-hot vector. `logits` is not modified."""
    x = np.array(logits, dtype=np.float32, copy=True)
    if seen is not None:
        apply_repetition_penalty(x, np.asarray(seen, dtype=np.int64), settings.repetition_penalty)
    if counts is not None:
        apply_frequency_presence_penalties(x, counts, settings.frequency_penalty, settings.presence_penalty)
    if settings.temperature == 0:
        out = np.zeros(x.size, dtype=np.float64)
        out[int(np.argmax(x))] = 1.0
        return out
    # Shift so the largest logit is 0 before dividing (softmax does not change): then no
    # temperature, however tiny (1e-40), overflows to inf - inf = NaN; it tends to greedy.
    x = x.astype(np.float64)
    x -= np.max(x)
    with np.errstate(over="ignore"):  # -inf for the others is the right limit
        x /= float(settings.temperature)
    filter_top_k(x, settings.top_k)
    filter_top_p(x, settings.top_p)
    return softmax(x)


class Sampler:
    """Picks the next token from a logits vector. One per generation (it owns the RNG)."""

    def __init__(self, settings: GenerationSettings, vocab_size: int, prompt_ids=()):
        self.settings = settings
        self.rng = np.random.default_rng(settings.seed)
        # For the repetition penalty: which tokens were seen (prompt + generated), as a mask.
        self._seen = None
        if settings.repetition_penalty != 1.0:
            self._seen = np.zeros(vocab_size, dtype=bool)
            ids = np.asarray(list(prompt_ids), dtype=np.int64)
            self._seen[ids[(ids >= 0) & (ids < vocab_size)]] = True
        # For the frequency/presence penalties: how often each token was generated.
        self._counts = None
        if settings.frequency_penalty != 0.0 or settings.presence_penalty != 0.0:
            self._counts = np.zeros(vocab_size, dtype=np.int32)

    def __call__(self, logits: np.ndarray) -> int:
        s = self.settings
        if s.temperature == 0 and self._seen is None and self._counts is None:
            token = int(np.argmax(logits))
        else:
            seen = None if self._seen is None else np.flatnonzero(self._seen)
            probs = token_distribution(logits, s, seen, self._counts)
            if s.temperature == 0:
                token = int(np.argmax(probs))
            else:
                # Inverse CDF with one uniform draw: reproducible for a seed.
                cdf = np.cumsum(probs)
                token = int(np.searchsorted(cdf, self.rng.random() * cdf[-1], side="right"))
                token = min(token, probs.size - 1)
                while probs[token] == 0 and token > 0:  # float edge at the top of the cdf
                    token -= 1
        if self._seen is not None and 0 <= token < self._seen.size:
            self._seen[token] = True
        if self._counts is not None and 0 <= token < self._counts.size:
            self._counts[token] += 1
        return token
