"""frequency_penalty / presence_penalty in the sampler, against a numpy reference written from
OpenAI's definition: mu[j] - c[j] * alpha_frequency - (c[j] > 0) * alpha_presence, where c[j]
counts how often token j was generated before this step (the prompt does not count)."""

import numpy as np
import pytest

from runtime.sampling import GenerationSettings, Sampler, token_distribution

VOCAB = 12


def reference_logits(logits, generated, frequency, presence):
    """The penalized logits, one token at a time (no vectorised shortcut)."""
    out = np.array(logits, dtype=np.float64)
    for j in range(out.size):
        count = sum(1 for t in generated if t == j)
        out[j] -= count * frequency + (1.0 if count > 0 else 0.0) * presence
    return out


def reference_probs(logits, generated, frequency, presence, temperature):
    x = reference_logits(logits, generated, frequency, presence) / temperature
    e = np.exp(x - x.max())
    return e / e.sum()


def fixed_logits(seed):
    return np.random.default_rng(seed).standard_normal(VOCAB).astype(np.float32) * 3


@pytest.mark.parametrize("frequency,presence", [(0.7, 0.0), (0.0, 1.3), (0.5, 0.4), (-0.8, -0.3), (2.0, 2.0)])
def test_greedy_choices_follow_the_reference(frequency, presence):
    """The same logits every step: the penalties alone make the greedy choice move on."""
    logits = fixed_logits(1)
    settings = GenerationSettings(temperature=0.0, frequency_penalty=frequency, presence_penalty=presence)
    sampler = Sampler(settings, VOCAB, prompt_ids=[int(np.argmax(logits))])  # the prompt never counts
    generated = []
    for _ in range(20):
        expected = int(np.argmax(reference_logits(logits, generated, frequency, presence)))
        assert sampler(logits.copy()) == expected
        generated.append(expected)
    if frequency > 0 or presence > 0:
        assert len(set(generated)) > 1  # the check above could fail: the penalty changed the choice


@pytest.mark.parametrize("frequency,presence,temperature", [(0.6, 0.2, 1.0), (1.5, -0.5, 0.7), (-1.0, 1.0, 1.3)])
def test_sampling_distribution_matches_the_reference(frequency, presence, temperature):
    logits = fixed_logits(2)
    generated = [3, 3, 5, 7, 3, 0]
    counts = np.bincount(generated, minlength=VOCAB).astype(np.int32)
    settings = GenerationSettings(temperature=temperature, frequency_penalty=frequency, presence_penalty=presence)
    got = token_distribution(logits, settings, counts=counts)
    want = reference_probs(logits, generated, frequency, presence, temperature)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    plain = token_distribution(logits, GenerationSettings(temperature=temperature))
    assert np.abs(np.log(plain) - np.log(want)).max() > 0.1  # the penalty moved the distribution


def test_seeded_draws_count_what_was_drawn():
    """With temperature, each step draws from the reference distribution of the tokens drawn
    so far (replayed with the same seed and the same uniform draws)."""
    logits = fixed_logits(3)
    settings = GenerationSettings(temperature=1.0, frequency_penalty=1.1, presence_penalty=0.6, seed=42)
    sampler = Sampler(settings, VOCAB)
    rng = np.random.default_rng(42)
    generated = []
    for _ in range(30):
        token = sampler(logits.copy())
        cdf = np.cumsum(reference_probs(logits, generated, 1.1, 0.6, 1.0))
        expected = min(int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right")), VOCAB - 1)
        assert token == expected
        generated.append(token)


def test_penalties_combine_with_the_repetition_penalty():
    """Repetition penalty (prompt + generated, multiplicative) first, then OpenAI's (generated)."""
    logits = fixed_logits(4)
    prompt, generated = [1, 2], [2, 4, 4]
    settings = GenerationSettings(temperature=1.0, repetition_penalty=1.4, frequency_penalty=0.3,
                                  presence_penalty=0.2)
    seen = sorted(set(prompt + generated))
    x = logits.astype(np.float64)
    x[seen] = np.where(x[seen] > 0, x[seen] / 1.4, x[seen] * 1.4)
    want = reference_probs(x, generated, 0.3, 0.2, 1.0)
    counts = np.bincount(generated, minlength=VOCAB)
    got = token_distribution(logits, settings, seen=seen, counts=counts)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("field", ["frequency_penalty", "presence_penalty"])
@pytest.mark.parametrize("value", [2.01, -2.5, float("nan"), float("inf"), True, "1"])
def test_out_of_range_penalties_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        GenerationSettings(**{field: value}).validate()
