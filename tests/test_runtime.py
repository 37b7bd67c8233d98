"""The generation engine (runtime/) on tiny exported checkpoints.

- greedy decoding equals transformers' generate() token for token, for every variant, with the
  prompt in one prefill run and in several chunks;
- the logits processor equals transformers' warpers on fixed vectors, and samples follow the
  resulting distribution; sampling is reproducible with a seed;
- streaming deltas join to the full text (a byte-level tokenizer where characters span
  tokens), stop ids and stop strings (also spanning tokens) end generation;
- cancel stops within one step; concurrent generations equal solo ones;
- overlong, empty and control-character prompts behave as documented; the CLI.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

from export import export_checkpoint
from runtime import (Engine, GenerationSettings, PromptTooLongError, VariantNotFoundError,
                     token_distribution)
from runtime.folder import VARIANTS
from runtime.sampling import Sampler
from runtime.text import StreamDecoder
from tests.checkpoints import EOT, load_reference, write_tiny_checkpoint
from tests.export_harness import reference_greedy

ALL_VARIANTS = VARIANTS
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Seed 1, untied: greedy output is varied (tied tiny models echo their last token), and
# prompt A reaches <|eot_id|> (a stop id) at its 4th token.
PROMPT_A = "w5 w17 w33 w100 w7 w250"
PROMPT_B = "w40 w41 w42"
NO_STOP = dict(stop_token_ids=[])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = tmp_path_factory.mktemp("runtime")
    ckpt = write_tiny_checkpoint(base / "ckpt", fmt="bitlinear", tied=False, seed=1)
    out = export_checkpoint(str(ckpt), str(base / "onnx"), ALL_VARIANTS, progress=lambda m: None)
    return {"dir": out, "ckpt": ckpt}


@pytest.fixture(scope="module")
def reference(tiny):
    return load_reference(tiny["ckpt"])


@pytest.fixture(scope="module")
def engine(tiny):
    return Engine(tiny["dir"], "ternary", threads=1)


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory):
    """A tiny model with the real Llama 3 byte-level tokenizer (128256 tokens)."""
    base = tmp_path_factory.mktemp("llama3")
    ckpt = write_tiny_checkpoint(base / "ckpt", fmt="bitlinear", tied=False, seed=3, tokenizer="llama3")
    return export_checkpoint(str(ckpt), str(base / "onnx"), ("ternary",), progress=lambda m: None)


# ---- parity with transformers ------------------------------------------------------------

@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_greedy_equals_transformers(tiny, reference, variant):
    # The whole prompt in one run; chunks of 3 (past > 0 and seq > 1); and logits for every
    # position (num_logits_to_keep = 0) instead of the last one only.
    for chunk, last_only in ((256, True), (3, True), (3, False)):
        engine = Engine(tiny["dir"], variant, threads=1, prefill_chunk=chunk, last_logits_only=last_only)
        assert engine.last_logits_only == last_only
        for prompt in (PROMPT_A, PROMPT_B):
            ids = engine.prompt_ids(prompt)
            assert ids[0] == 0  # BOS from the tokenizer, as transformers' tokenizer adds it
            expected = reference_greedy(reference, ids, 40)
            result = engine.generate(prompt=prompt, settings=GenerationSettings(max_new_tokens=40, **NO_STOP))
            assert result.token_ids == expected, (variant, chunk, last_only, prompt)
            assert result.finish_reason == "length" and result.stats.new_tokens == 40


def test_stops_on_the_models_stop_ids(engine, reference):
    ids = engine.prompt_ids(PROMPT_A)
    expected = reference_greedy(reference, ids, 10)
    result = engine.generate(prompt=PROMPT_A, settings=GenerationSettings(max_new_tokens=10))
    assert EOT in expected
    stop_at = expected.index(EOT)
    assert result.token_ids == expected[:stop_at + 1]  # the stop id is reported, not shown
    assert result.finish_reason == "stop"
    assert "<|eot_id|>" not in result.text
    assert result.text == engine.tokenizer.decode(expected[:stop_at])


# ---- sampling ------------------------------------------------------------------------------

def _hf_distribution(logits, settings, seen=()):
    import torch
    from transformers import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                              TopKLogitsWarper, TopPLogitsWarper)

    scores = torch.tensor(logits, dtype=torch.float32)[None]
    ids = torch.tensor([list(seen)], dtype=torch.long)
    if settings.repetition_penalty != 1.0:
        scores = RepetitionPenaltyLogitsProcessor(settings.repetition_penalty)(ids, scores)
    scores = TemperatureLogitsWarper(settings.temperature)(ids, scores)
    if settings.top_k:
        scores = TopKLogitsWarper(settings.top_k)(ids, scores)
    if settings.top_p < 1.0:
        scores = TopPLogitsWarper(settings.top_p)(ids, scores)
    return torch.softmax(scores.double(), dim=-1)[0].numpy()


@pytest.mark.parametrize("kw", [
    dict(temperature=1.0),
    dict(temperature=0.7, top_k=3),
    dict(temperature=1.0, top_p=0.75),
    dict(temperature=1.3, top_k=4, top_p=0.9),
    dict(temperature=1.0, repetition_penalty=1.5),
])
def test_logits_processor_equals_transformers(kw):
    probs = np.array([0.05, 0.4, 0.1, 0.3, 0.15, 1e-4], dtype=np.float64)
    logits = np.log(probs).astype(np.float32)
    logits[0] = -2.0  # a negative logit next to positive ones for the repetition penalty
    logits[3] = 1.5
    settings = GenerationSettings(**kw)
    seen = [0, 3]
    ours = token_distribution(logits, settings, seen if "repetition_penalty" in kw else None)
    theirs = _hf_distribution(logits, settings, seen if "repetition_penalty" in kw else ())
    np.testing.assert_allclose(ours, theirs, atol=1e-6)


@pytest.mark.parametrize("temperature", [1e-40, 1e-300, 5e-324])
def test_tiny_temperature_is_greedy_not_nan(temperature):
    """x / 1e-40 overflows float32 (inf - inf = NaN in the softmax): the sampler must stay
    finite on its own and, in the limit, pick the argmax (ties share the mass)."""
    logits = np.array([1.0, 3.5, -2.0, 3.5 - 1e-6, 0.0], np.float32)
    for kw in (dict(), dict(top_k=2), dict(top_p=0.5), dict(repetition_penalty=1.3)):
        settings = GenerationSettings(temperature=temperature, seed=0, **kw)
        probs = token_distribution(logits, settings, [0] if "repetition_penalty" in kw else None)
        assert np.all(np.isfinite(probs)) and abs(probs.sum() - 1) < 1e-12, (kw, probs)
        assert probs[1] == 1.0, (kw, probs)
        sampler = Sampler(settings, logits.size)  # (a repetition penalty then demotes token 1)
        draws = 20 if "repetition_penalty" not in kw else 1
        assert all(sampler(logits) == 1 for _ in range(draws))


def test_samples_follow_the_known_distribution():
    probs = np.array([0.4, 0.3, 0.15, 0.1, 0.05])
    logits = np.log(probs).astype(np.float32)
    # top_k=3 keeps 0.4, 0.3, 0.15 renormalized; top_p=0.75 then keeps the same three
    # (cumulative from the least likely: 0.05, 0.15 <= 0.25 are removed).
    for kw, expected in [(dict(top_k=3), [0.4, 0.3, 0.15, 0, 0]),
                         (dict(top_p=0.75), [0.4, 0.3, 0.15, 0, 0]),
                         (dict(top_k=2), [0.4, 0.3, 0, 0, 0]),
                         (dict(), [0.4, 0.3, 0.15, 0.1, 0.05])]:
        expected = np.array(expected) / sum(expected)
        sampler = Sampler(GenerationSettings(temperature=1.0, seed=7, **kw), 5)
        n = 20000
        counts = np.bincount([sampler(logits) for _ in range(n)], minlength=5)
        assert np.all(counts[expected == 0] == 0), (kw, counts)
        # within 5 standard deviations of the binomial count
        sd = np.sqrt(n * expected * (1 - expected))
        assert np.all(np.abs(counts - n * expected) <= 5 * sd + 1), (kw, counts)


def test_sampling_is_reproducible_with_a_seed(engine):
    settings = GenerationSettings(max_new_tokens=24, temperature=1.5, top_k=50, top_p=0.95, seed=123, **NO_STOP)
    a = engine.generate(prompt=PROMPT_B, settings=settings).token_ids
    b = engine.generate(prompt=PROMPT_B, settings=settings).token_ids
    assert a == b
    others = {tuple(engine.generate(prompt=PROMPT_B, settings=GenerationSettings(
        max_new_tokens=24, temperature=1.5, top_k=50, top_p=0.95, seed=s, **NO_STOP)).token_ids)
        for s in range(4)}
    assert len(others) > 1  # different seeds give different texts
    greedy = engine.generate(prompt=PROMPT_B, settings=GenerationSettings(max_new_tokens=24, **NO_STOP))
    assert tuple(greedy.token_ids) not in others


def test_repetition_penalty_changes_greedy_output(engine):
    plain = engine.generate(prompt=PROMPT_A, settings=GenerationSettings(max_new_tokens=30, **NO_STOP))
    penalized = engine.generate(prompt=PROMPT_A, settings=GenerationSettings(
        max_new_tokens=30, repetition_penalty=3.0, **NO_STOP))
    assert len(set(penalized.token_ids)) > len(set(plain.token_ids))


def test_bad_settings_raise_before_compute(engine):
    for kw in (dict(max_new_tokens=0), dict(temperature=-1), dict(top_p=0), dict(top_p=1.5),
               dict(top_k=-1), dict(repetition_penalty=0), dict(seed=-1), dict(stop=[3])):
        with pytest.raises(ValueError):
            engine.stream(prompt="w5", settings=GenerationSettings(**kw))
    with pytest.raises(ValueError):
        engine.stream()  # neither prompt nor messages
    with pytest.raises(ValueError):
        engine.stream(prompt="w5", messages=[])


# ---- streaming, stop strings ---------------------------------------------------------------

def _stream(engine, **kw):
    events = list(engine.stream(**kw))
    assert all(not e.done for e in events[:-1]) and events[-1].done
    return events


def test_stream_joins_to_the_full_text(engine):
    events = _stream(engine, prompt=PROMPT_B, settings=GenerationSettings(max_new_tokens=30, **NO_STOP))
    result = engine.generate(prompt=PROMPT_B, settings=GenerationSettings(max_new_tokens=30, **NO_STOP))
    ids = [t for e in events for t in e.token_ids]
    assert ids == result.token_ids
    assert "".join(e.text for e in events) == result.text == engine.tokenizer.decode(ids)
    assert [e.stats.new_tokens for e in events] == list(range(1, 31))  # live stats


def test_stream_never_splits_a_character_llama3(llama3_dir):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(llama3_dir, "tokenizer.json"))
    text = "héllo → 世界 🦙🙂 naïve Ω ∑ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 日本語のテキスト"
    ids = tok.encode(text, add_special_tokens=False).ids
    pieces = [tok.decode([i]) for i in ids]
    assert any("\ufffd" in p for p in pieces), "no character spans tokens; pick other text"
    decoder = StreamDecoder(tok)
    deltas = [decoder.add([i]) for i in ids] + [decoder.flush()]
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)

    # Through the engine: random high-temperature tokens of a 128k byte-level vocabulary.
    engine = Engine(llama3_dir, threads=1)
    events = _stream(engine, prompt=text, settings=GenerationSettings(
        max_new_tokens=48, temperature=5.0, seed=0, **NO_STOP))
    ids = [t for e in events for t in e.token_ids]
    joined = "".join(e.text for e in events)
    assert joined == engine.tokenizer.decode(ids, skip_special_tokens=True)
    # An unfinished character (U+FFFD at the end of the text so far) is held back until a
    # later token completes it (or the generation ends): no delta but the last ends with one.
    assert not any(e.text.endswith("\ufffd") for e in events[:-1])


def test_stop_string_spanning_tokens(engine):
    full = engine.generate(prompt=PROMPT_B, settings=GenerationSettings(max_new_tokens=30, **NO_STOP))
    words = full.text.split(" ")
    stop = words[3][1:] + " " + words[4][:2]  # from inside token 4 into token 5
    settings = GenerationSettings(max_new_tokens=30, stop=[stop, "never-there"], **NO_STOP)
    events = _stream(engine, prompt=PROMPT_B, settings=settings)
    joined = "".join(e.text for e in events)
    assert joined == full.text[:full.text.index(stop)]
    assert events[-1].finish_reason == "stop"
    assert len([t for e in events for t in e.token_ids]) == 5


def test_stop_string_prefix_is_held_back_then_released(engine):
    full = engine.generate(prompt=PROMPT_B, settings=GenerationSettings(max_new_tokens=12, **NO_STOP))
    # A stop string that starts like the text's 3rd word but never matches.
    third = full.text.split(" ")[2]
    decoy = third + " zzz"
    events = _stream(engine, prompt=PROMPT_B, settings=GenerationSettings(max_new_tokens=12, stop=[decoy], **NO_STOP))
    assert "".join(e.text for e in events) == full.text
    assert events[-1].finish_reason == "length"


# ---- cancel and concurrency ----------------------------------------------------------------

def test_cancel_stops_within_one_step(engine):
    cancel = threading.Event()
    events = []
    for event in engine.stream(prompt=PROMPT_B, settings=GenerationSettings(max_new_tokens=100, **NO_STOP),
                               cancel=cancel):
        events.append(event)
        if len(events) == 3:
            cancel.set()
    assert events[-1].done and events[-1].finish_reason == "cancelled"
    assert sum(len(e.token_ids) for e in events) == 3  # no model step after the cancel
    assert engine.active_generations == 0

    cancel = threading.Event()
    cancel.set()
    result = engine.generate(prompt=PROMPT_B, cancel=cancel)
    assert result.finish_reason == "cancelled" and result.token_ids == []


def test_max_time_ends_with_finish_reason_time(engine):
    settings = GenerationSettings(max_new_tokens=100, max_time_s=1e-9, **NO_STOP)
    result = engine.generate(prompt=PROMPT_B, settings=settings)
    assert result.finish_reason == "time" and result.token_ids == []  # the limit passed before prefill
    # A limit that passes mid-generation: the stream ends at a token boundary with "time".
    clock = {"t": 0.0}
    events = []
    settings = GenerationSettings(max_new_tokens=100, max_time_s=3600, **NO_STOP)
    gen = engine.stream(prompt=PROMPT_B, settings=settings)
    import runtime.engine as engine_module

    real = engine_module.time.perf_counter
    try:
        engine_module.time.perf_counter = lambda: real() + clock["t"]
        for event in gen:
            events.append(event)
            if len(events) == 4:
                clock["t"] = 7200.0  # two hours later
    finally:
        engine_module.time.perf_counter = real
    assert events[-1].done and events[-1].finish_reason == "time"
    assert sum(len(e.token_ids) for e in events) == 4  # no model step after the limit
    assert engine.active_generations == 0
    with pytest.raises(ValueError, match="max_time_s"):
        engine.stream(prompt=PROMPT_B, settings=GenerationSettings(max_time_s=0))
    with pytest.raises(ValueError, match="max_time_s"):
        engine.stream(prompt=PROMPT_B, settings=GenerationSettings(max_time_s=float("nan")))


def test_cancel_between_prefill_chunks(tiny):
    """The cancel handle is also checked between prompt chunks: no token after it is set."""
    from runtime.generation import EarlyStop

    class CountingEvent:  # set once the first chunk has been checked
        def __init__(self):
            self.calls = 0

        def is_set(self):
            self.calls += 1
            return self.calls > 2

    engine = Engine(tiny["dir"], "ternary", threads=1, prefill_chunk=2)
    cache = engine.new_cache(64)
    ids = engine.prompt_ids(PROMPT_A)
    assert engine.prefill(cache, ids, EarlyStop(CountingEvent(), None, 0.0)) is None
    assert 0 < int(cache.lengths[0]) < len(ids)
    result = engine.generate(prompt=PROMPT_A, cancel=CountingEvent())
    assert result.finish_reason == "cancelled" and result.token_ids == []


def test_prefill_and_decode_step_drive_the_cache(engine, reference):
    """The loop's parts, used directly (as a batched scheduler will): greedy from them equals
    transformers."""
    ids = engine.prompt_ids(PROMPT_A)
    cache = engine.new_cache(64)
    assert cache.buffers[0].shape == (1, engine.kv_heads, 64, engine.head_dim)
    token = int(np.argmax(engine.prefill(cache, ids)))
    tokens = [token]
    for _ in range(9):
        token = int(np.argmax(engine.decode_step(cache, token)))
        tokens.append(token)
    assert tokens == reference_greedy(reference, ids, 10)
    assert int(cache.lengths[0]) == len(ids) + 9
    with pytest.raises(ValueError, match="do not fit"):
        cache.forward(np.zeros((1, 64), np.int64), np.empty((1, 64, engine.vocab_size), np.float32))


def test_kv_cache_holds_a_batch(engine, reference):
    """Two prompts of equal length in one [2, kv_heads, capacity, head_dim] cache, prefilled
    and decoded together, give each prompt's own greedy tokens (the shape batching builds on)."""
    rows = [engine.prompt_ids(PROMPT_A)[:6], engine.prompt_ids("w9 w8 w7 w6 w5 w4 w3")[:6]]
    cache = engine.new_cache(64, batch=2)
    cache.forward(np.array(rows, np.int64), cache.step_logits)
    tokens = [[int(t)] for t in cache.step_logits[:, -1].argmax(-1)]
    for _ in range(7):
        cache.forward(np.array([[t[-1]] for t in tokens], np.int64), cache.step_logits)
        for row, t in zip(tokens, cache.step_logits[:, -1].argmax(-1)):
            row.append(int(t))
    assert list(cache.lengths) == [13, 13]
    assert tokens == [reference_greedy(reference, ids, 8) for ids in rows]


def test_cancel_from_another_thread(engine):
    cancel = threading.Event()
    seen = []
    gen = engine.stream(prompt=PROMPT_B, settings=GenerationSettings(max_new_tokens=120, **NO_STOP), cancel=cancel)

    def consume():
        for event in gen:
            seen.append(event)
            if len(seen) == 5:
                threading.Thread(target=cancel.set).start()

    t = threading.Thread(target=consume)
    t.start()
    t.join(30)
    assert not t.is_alive()
    assert seen[-1].finish_reason == "cancelled"
    assert seen[-1].stats.new_tokens < 120


def test_concurrent_generations_equal_solo(engine):
    jobs = {
        "a": dict(prompt=PROMPT_A, settings=GenerationSettings(max_new_tokens=60, **NO_STOP)),
        "b": dict(prompt=PROMPT_B, settings=GenerationSettings(max_new_tokens=60, temperature=1.0, seed=5, **NO_STOP)),
        "c": dict(messages=[{"role": "user", "content": "w9 w10"}],
                  settings=GenerationSettings(max_new_tokens=60, temperature=0.8, top_k=20, seed=9, **NO_STOP)),
    }
    solo = {k: engine.generate(**kw).token_ids for k, kw in jobs.items()}
    results, errors = {}, []
    barrier = threading.Barrier(len(jobs))

    def run(key):
        try:
            barrier.wait()
            results[key] = engine.generate(**jobs[key]).token_ids
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(k,)) for k in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert results == solo
    assert engine.active_generations == 0


def test_closing_the_iterator_ends_the_generation(engine):
    gen = engine.stream(prompt=PROMPT_B, settings=GenerationSettings(max_new_tokens=100, **NO_STOP))
    next(gen)
    next(gen)
    assert engine.active_generations == 1
    gen.close()  # what a disconnected client / Gradio's stop does
    assert engine.active_generations == 0


def test_stream_tokens(engine):
    ids = engine.prompt_ids(PROMPT_B)
    expected = engine.generate(prompt=PROMPT_B, settings=GenerationSettings(max_new_tokens=8, **NO_STOP))
    events = list(engine.stream_tokens(ids, GenerationSettings(max_new_tokens=8, **NO_STOP)))
    assert [t for e in events for t in e.token_ids] == expected.token_ids
    for bad in ([], [engine.vocab_size], [-1]):
        with pytest.raises(ValueError):
            engine.stream_tokens(bad)
    with pytest.raises(PromptTooLongError):
        engine.stream_tokens([5] * engine.context_length)


# ---- prompts: overlong, empty, control characters, chat ------------------------------------

def test_overlong_prompt_raises_before_compute(engine):
    context = engine.context_length
    prompt = " ".join(["w5"] * context)
    with pytest.raises(PromptTooLongError) as info:
        engine.stream(prompt=prompt)
    assert info.value.prompt_tokens == context + 1 and info.value.context_length == context
    assert str(context) in str(info.value) and str(context + 1) in str(info.value)
    assert engine.active_generations == 0


def test_new_tokens_are_capped_by_the_context(engine):
    context = engine.context_length
    prompt = " ".join(["w5"] * (context - 6))  # + BOS = context - 5 tokens
    result = engine.generate(prompt=prompt, settings=GenerationSettings(max_new_tokens=50, **NO_STOP))
    assert result.finish_reason == "length" and result.stats.new_tokens == 5
    assert result.stats.kv_cache_tokens == context


def test_kv_cache_follows_the_request(engine):
    small = engine.generate(prompt="w5", settings=GenerationSettings(max_new_tokens=3, **NO_STOP))
    assert small.stats.kv_cache_tokens == 64  # 2 + 3 tokens rounded up to the 64-token block
    s = small.stats
    assert s.prompt_tokens == 2 and s.new_tokens == 3 and s.variant == "ternary" and s.threads == 1
    assert s.ttft_s > 0 and s.prefill_tokens_per_s > 0 and s.decode_tokens_per_s > 0 and s.total_s >= s.ttft_s
    assert 0 < s.rss_mb <= s.peak_rss_mb


def test_chat_truncation_drops_oldest_turns(engine):
    long_turn = " ".join(["w7"] * 40)
    messages = [{"role": "system", "content": "w3"}]
    for i in range(4):
        messages += [{"role": "user", "content": long_turn}, {"role": "assistant", "content": long_turn}]
    messages.append({"role": "user", "content": "w9 w10"})
    with pytest.raises(PromptTooLongError, match="truncate"):
        engine.stream(messages=messages)
    settings = GenerationSettings(max_new_tokens=10, truncate=True, **NO_STOP)
    ids = engine.prompt_ids(messages=messages, settings=settings)
    assert len(ids) + 10 <= engine.context_length
    text = engine.tokenizer.decode(ids)
    assert text.startswith("w3") and text.rstrip().endswith("w9 w10")  # system and last turn kept
    result = engine.generate(messages=messages, settings=settings)
    assert result.stats.new_tokens == 10


def test_empty_prompt_starts_from_bos(engine):
    assert engine.prompt_ids("") == [0]
    result = engine.generate(prompt="", settings=GenerationSettings(max_new_tokens=5, **NO_STOP))
    assert result.stats.prompt_tokens == 1 and len(result.token_ids) == 5
    # An empty chat still has the template's BOS and generation prompt.
    assert engine.generate(messages=[], settings=GenerationSettings(max_new_tokens=2)).stats.prompt_tokens >= 1


def test_control_characters_do_not_crash(engine, llama3_dir):
    nasty = "\x00\x01\x07\x1b[31m\r\n\t\x7f\u200b\ufeff\ud800 w5 \udfff\U0010ffff"
    for eng in (engine, Engine(llama3_dir, threads=1)):
        r = eng.generate(prompt=nasty, settings=GenerationSettings(max_new_tokens=3, **NO_STOP))
        assert len(r.token_ids) == 3
        r = eng.generate(messages=[{"role": "system", "content": nasty}, {"role": "user", "content": nasty}],
                         settings=GenerationSettings(max_new_tokens=3, **NO_STOP))
        assert len(r.token_ids) == 3
        assert eng.count_tokens(nasty) > 0


def test_chat_template_and_content_blocks(engine):
    messages = [{"role": "system", "content": "w1"}, {"role": "user", "content": [{"type": "text", "text": "w5"}]}]
    text = engine.render_chat(messages)
    assert text == "<|begin_of_text|>System: w1<|eot_id|>User: w5<|eot_id|>Assistant: "
    assert engine.render_chat(messages, add_generation_prompt=False).endswith("User: w5<|eot_id|>")
    with pytest.raises(ValueError):
        engine.render_chat([{"role": "robot", "content": "x"}])


def test_missing_variant_is_a_clear_error(tiny):
    with pytest.raises(VariantNotFoundError) as info:
        Engine(tiny["dir"], "int3")
    assert isinstance(info.value, KeyError)
    assert "int3" in str(info.value) and "ternary" in str(info.value)


# ---- CLI -----------------------------------------------------------------------------------

def _cli(*args, stdin=None):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "runtime", *args], capture_output=True, text=True,
                          input=stdin, env=env, cwd=ROOT, timeout=120)


def test_cli_json_matches_engine(tiny, engine):
    p = _cli(tiny["dir"], "--prompt", PROMPT_B, "--raw", "--json", "--max-new-tokens", "12",
             "--threads", "1", "--variant", "ternary")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    expected = engine.generate(prompt=PROMPT_B, settings=GenerationSettings(max_new_tokens=12))
    assert out["token_ids"] == expected.token_ids and out["text"] == expected.text
    assert out["stats"]["new_tokens"] == len(expected.token_ids) and out["stats"]["variant"] == "ternary"


def test_cli_streams_and_chats(tiny):
    p = _cli(tiny["dir"], "--prompt", PROMPT_B, "--raw", "--max-new-tokens", "5", "--threads", "1")
    assert p.returncode == 0 and p.stdout.strip() and "decode" in p.stderr
    p = _cli(tiny["dir"], "--max-new-tokens", "3", "--threads", "1", "--json", "--system", "w3",
             stdin="w5 w6\nw7\n")
    assert p.returncode == 0, p.stderr
    answers = [json.loads(line) for line in p.stdout.splitlines()]
    assert len(answers) == 2
    assert answers[1]["stats"]["prompt_tokens"] > answers[0]["stats"]["prompt_tokens"]  # history


@pytest.mark.parametrize("args, needle", [
    (["/nonexistent/model", "--prompt", "x"], "does not exist"),
    (["{dir}", "--prompt", "x", "--top-p", "2"], "top_p"),
    (["{dir}", "--prompt", " ".join(["w5"] * 200), "--raw"], "context holds 128"),
])
def test_cli_errors_are_one_line(tiny, args, needle):
    p = _cli(*[a.format(dir=tiny["dir"]) for a in args])
    assert p.returncode == 1
    assert "Traceback" not in p.stderr
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], p.stderr
