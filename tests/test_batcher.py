"""The continuous batcher (runtime/batcher.py) on the exported demo model.

- batch invariance: a sequence's tokens (greedy, or sampled with its seed) equal its solo run
  (Engine.stream_tokens) in batches of B = 1..9, at every position, joining at different times;
- sequences join and leave between steps: finish (length, stop id, stop string), cancel,
  close (disconnect), max_time; the others go on unchanged and the slot is free for the next;
- scheduling: one prefill chunk between two decode steps, never a 1-token final chunk;
- the queue: positions, cancel while queued, QueueFullError; bad input raises before compute;
- per-stream stats: TTFT, own rate, batch sizes; the slot pool's memory.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from export import export_checkpoint
from runtime import Engine, GenerationSettings, PromptTooLongError
from runtime.batcher import Batcher, BatchStats, QueueFullError

DEMO = Path(__file__).resolve().parent.parent / "models" / "shakespeare-bitnet"
NEW = 12
GREEDY = GenerationSettings(max_new_tokens=NEW, stop_token_ids=[])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return export_checkpoint(str(DEMO), str(tmp_path_factory.mktemp("batcher") / "onnx"), ("ternary",),
                             progress=lambda m: None)


@pytest.fixture(scope="module")
def engine(folder):
    return Engine(folder, "ternary", threads=1, prefill_chunk=16)


@pytest.fixture
def batcher(engine):
    b = Batcher(engine, slots=9, prefill_chunk=16)
    yield b
    b.close()


def _prompts(count: int, seed: int = 0) -> list[list[int]]:
    """Prompts of different lengths (2 to 40 tokens; some end just past a chunk boundary)."""
    rng = np.random.default_rng(seed)
    lengths = [2, 17, 33, 5, 40, 16, 9, 25, 3]
    return [rng.integers(2, 4096, size=lengths[i % len(lengths)]).tolist() for i in range(count)]


def _drain(stream) -> tuple[list[int], str, object]:
    ids, text, last = [], [], None
    for event in stream:
        ids.extend(event.token_ids)
        text.append(event.text)
        last = event
    return ids, "".join(text), last


def _solo(engine, ids, settings=GREEDY):
    return _drain(engine.stream_tokens(ids, settings))


def _concurrently(streams) -> list:
    """Drain every stream in its own thread (as server requests would)."""
    results = [None] * len(streams)

    def drain(i):
        results[i] = _drain(streams[i])

    threads = [threading.Thread(target=drain, args=(i,)) for i in range(len(streams))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


# ---- batch invariance -----------------------------------------------------------------------

def test_greedy_tokens_equal_solo_for_every_batch_size(engine, batcher):
    prompts = _prompts(9)
    solo = [_solo(engine, p)[0] for p in prompts]
    for b in range(1, 10):
        members = [(b + k) % 9 for k in range(b)]  # a different subset and order per B
        results = _concurrently([batcher.submit(prompts[i], GREEDY) for i in members])
        for (ids, _, last), i in zip(results, members):
            assert ids == solo[i], (b, i)
            assert last.finish_reason == "length"
        if b > 1:
            assert max(r[2].stats.max_batch_size for r in results) > 1  # they did share steps


def test_sampled_tokens_with_a_seed_equal_solo(engine, batcher):
    prompts = _prompts(6, seed=1)
    settings = [GenerationSettings(max_new_tokens=NEW, stop_token_ids=[], temperature=0.9, top_k=50,
                                   top_p=0.95, repetition_penalty=1.1, seed=100 + i) for i in range(6)]
    solo = [_solo(engine, p, s)[0] for p, s in zip(prompts, settings)]
    results = _concurrently([batcher.submit(p, s) for p, s in zip(prompts, settings)])
    assert [r[0] for r in results] == solo


def test_late_joiners_and_early_leavers_leave_the_others_unchanged(engine, batcher):
    """Streams of different lengths joining while others decode: every one equals its solo
    run, and the ones that finish early free their slot for the rest."""
    prompts = _prompts(8, seed=2)
    settings = [GenerationSettings(max_new_tokens=3 + 4 * i, stop_token_ids=[]) for i in range(8)]
    solo = [_solo(engine, p, s)[0] for p, s in zip(prompts, settings)]
    streams, results = [], [None] * 8

    def drain(i):
        results[i] = _drain(streams[i])

    threads = []
    for i in range(8):
        streams.append(batcher.submit(prompts[i], settings[i]))
        threads.append(threading.Thread(target=drain, args=(i,)))
        threads[-1].start()
        time.sleep(0.003 * (i % 3))
    for t in threads:
        t.join(60)
    assert [r[0] for r in results] == solo
    assert batcher.stats()["free_slots"] == 9


def test_a_newcomer_prefilling_in_a_hole_rides_as_a_padding_row(engine):
    """Slots 0 and 2 decode while a newcomer prefills in slot 1 (freed by a stream that
    finished): each decode step carries slot 1 as a padding row; nobody's tokens change."""
    b = Batcher(engine, slots=3, prefill_chunk=8)
    try:
        prompts = _prompts(4, seed=7)
        long_run = GenerationSettings(max_new_tokens=60, stop_token_ids=[])
        short = GenerationSettings(max_new_tokens=2, stop_token_ids=[])
        a, gone, c = b.submit(prompts[0], long_run), b.submit(prompts[1], short), b.submit(prompts[2], long_run)
        _drain(gone)
        next(a), next(c)
        newcomer_prompt = np.random.default_rng(8).integers(2, 4096, 45).tolist()
        # Its cache as its first decode step starts (the slot is reused once it finishes).
        seen, decode = [], b.pool.decode

        def watch(tokens):
            if 1 in tokens and not seen:
                seen.append([buf[1, :, :45].copy() for buf in b.pool.buffers])
            return decode(tokens)

        b.pool.decode = watch
        newcomer = b.submit(newcomer_prompt, GREEDY)
        results = _concurrently([a, c, newcomer])
        assert results[2][0] == _solo(engine, newcomer_prompt)[0]
        # It holds exactly the solo prefill's keys and values: no padding-row write landed
        # inside the prompt while it was prefilled between the others' steps.
        solo_cache = engine.new_cache(64)
        engine.prefill(solo_cache, newcomer_prompt)
        for mine, solo in zip(seen[0], solo_cache.buffers):
            assert np.array_equal(mine, solo[0, :, :45])
        assert results[2][2].stats.max_batch_size == 3
        assert [r[0] for r in results[:2]] == [_solo(engine, p, long_run)[0][1:] for p in (prompts[0], prompts[2])]
    finally:
        b.close()


def test_stop_ids_and_stop_strings_end_one_stream_only(engine, batcher):
    prompts = _prompts(3, seed=3)
    free_run = _solo(engine, prompts[0], GenerationSettings(max_new_tokens=24, stop_token_ids=[]))
    stop_id = free_run[0][5]
    with_id = GenerationSettings(max_new_tokens=24, stop_token_ids=[stop_id])
    stop_text = free_run[1][len(free_run[1]) // 2:][:3]
    with_text = GenerationSettings(max_new_tokens=24, stop_token_ids=[], stop=[stop_text])
    plain = GenerationSettings(max_new_tokens=24, stop_token_ids=[])
    cases = [(prompts[0], with_id), (prompts[0], with_text), (prompts[1], plain), (prompts[2], plain)]
    solo = [_solo(engine, p, s) for p, s in cases]
    results = _concurrently([batcher.submit(p, s) for p, s in cases])
    for (ids, text, last), (s_ids, s_text, s_last) in zip(results, solo):
        assert (ids, text, last.finish_reason) == (s_ids, s_text, s_last.finish_reason)
    assert results[0][2].finish_reason == "stop" and results[0][0][-1] == stop_id
    assert results[1][2].finish_reason == "stop" and stop_text not in results[1][1]


# ---- leaving early: cancel, disconnect, time --------------------------------------------------

def test_cancel_ends_one_stream_within_a_step_and_frees_its_slot(engine, batcher):
    prompts = _prompts(3, seed=4)
    long_run = GenerationSettings(max_new_tokens=200, stop_token_ids=[])
    solo = [_solo(engine, p)[0] for p in prompts[1:]]
    cancel = threading.Event()
    victim = batcher.submit(prompts[0], long_run, cancel=cancel)
    others = [batcher.submit(p, GREEDY) for p in prompts[1:]]
    got, made_at_cancel = [], None
    for event in victim:
        got.extend(event.token_ids)
        if len(got) == 3:
            made_at_cancel = victim._seq.stats.new_tokens  # made by the scheduler so far
            cancel.set()
        if event.done:
            break
    assert event.finish_reason == "cancelled"
    # The events run ahead of this reader: count what was made after the cancel, which is
    # the step in flight when it was set, at most.
    assert len(got) <= made_at_cancel + 1 < 200
    assert [r[0] for r in _concurrently(others)] == solo
    assert batcher.stats()["free_slots"] == 9


def test_closing_the_stream_is_a_disconnect(engine):
    """close() (or dropping the stream) ends the generation and frees its slot within a step:
    with one slot, the next request gets it."""
    b = Batcher(engine, slots=1, prefill_chunk=16)
    try:
        first = b.submit(_prompts(1)[0], GenerationSettings(max_new_tokens=400, stop_token_ids=[]))
        next(first)
        second = b.submit(_prompts(2)[1], GREEDY)
        assert second.queue_position == 1
        first.close()
        ids, _, last = _drain(second)
        assert ids == _solo(engine, _prompts(2)[1])[0]
        third = b.submit(_prompts(1)[0], GenerationSettings(max_new_tokens=400, stop_token_ids=[]))
        next(third)
        del third  # abandoned without close()
        assert _drain(b.submit(_prompts(2)[1], GREEDY))[0] == ids
    finally:
        b.close()


def test_max_time_ends_with_finish_reason_time(engine, batcher):
    settings = GenerationSettings(max_new_tokens=400, stop_token_ids=[], max_time_s=0.05)
    slow = threading.Event()

    class SlowCancel:  # is_set() is polled every step: make each step slow
        def is_set(self):
            time.sleep(0.005)
            return slow.is_set()

    ids, _, last = _drain(batcher.submit(_prompts(1)[0], settings, cancel=SlowCancel()))
    assert last.finish_reason == "time"
    assert 0 < len(ids) < settings.max_new_tokens


# ---- the queue -----------------------------------------------------------------------------

def test_queue_positions_cancel_while_queued_and_a_full_queue(engine):
    b = Batcher(engine, slots=1, prefill_chunk=16, max_queue=2)
    try:
        hold = threading.Event()
        first = b.submit(_prompts(1)[0], GenerationSettings(max_new_tokens=400, stop_token_ids=[]), cancel=hold)
        next(first)  # it holds the only slot
        cancel_second = threading.Event()
        second = b.submit(_prompts(2)[1], GREEDY, cancel=cancel_second)
        third = b.submit(_prompts(3)[2], GREEDY)
        assert (first.queue_position, second.queue_position, third.queue_position) == (0, 1, 2)
        with pytest.raises(QueueFullError, match="slots are busy"):
            b.submit(_prompts(1)[0], GREEDY)
        cancel_second.set()
        ids, _, last = _drain(second)
        assert (ids, last.finish_reason, last.stats.new_tokens) == ([], "cancelled", 0)
        assert third.queue_position == 1
        hold.set()
        assert _drain(third)[0] == _solo(engine, _prompts(3)[2])[0]
        assert _drain(first)[2].finish_reason == "cancelled"
    finally:
        b.close()


def test_bad_input_raises_before_compute(engine):
    b = Batcher(engine, slots=2, capacity=64)
    try:
        with pytest.raises(PromptTooLongError, match="slot capacity"):
            b.submit(list(range(2, 66)))
        with pytest.raises(ValueError, match="temperature"):
            b.submit([5, 6], GenerationSettings(temperature=-1))
        with pytest.raises(ValueError, match="token ids"):
            b.submit([5, 99999])
        with pytest.raises(ValueError, match="exactly one"):
            b.stream()
        assert b.stats()["steps"] == 0 and b._thread is None
        # New tokens are capped by the slot: 60 prompt tokens leave 4.
        ids, _, last = _drain(b.submit(list(range(2, 62)), GenerationSettings(max_new_tokens=50,
                                                                              stop_token_ids=[])))
        assert len(ids) == 4 and last.finish_reason == "length"
    finally:
        b.close()


def test_close_ends_unfinished_streams(engine):
    b = Batcher(engine, slots=1)
    running = b.submit(_prompts(1)[0], GenerationSettings(max_new_tokens=400, stop_token_ids=[]))
    waiting = b.submit(_prompts(1)[0], GREEDY)
    next(running)
    b.close()
    assert _drain(running)[2].finish_reason == "cancelled"
    assert _drain(waiting)[2].finish_reason == "cancelled"
    with pytest.raises(RuntimeError, match="closed"):
        b.submit([5, 6])


# ---- scheduling ------------------------------------------------------------------------------

def test_one_prefill_chunk_between_two_decode_steps(engine):
    """A 97-token newcomer arriving while two streams decode is prefilled in chunks of 16
    (the last one 17: never a 1-token tail), one chunk between two decode steps."""
    b = Batcher(engine, slots=4, prefill_chunk=16)
    calls = []
    prefill, decode = b.pool.prefill, b.pool.decode
    b.pool.prefill = lambda slot, ids: (calls.append(("P", len(ids))), prefill(slot, ids))[1]
    b.pool.decode = lambda tokens: (calls.append(("D", len(tokens))), decode(tokens))[1]
    try:
        long_run = GenerationSettings(max_new_tokens=40, stop_token_ids=[])
        running = [b.submit(p, long_run) for p in _prompts(2)]
        for s in running:
            next(s)
        newcomer = b.submit(np.random.default_rng(9).integers(2, 4096, 97).tolist(), GREEDY)
        first = next(newcomer)
        assert first.stats.ttft_s > 0
        _concurrently(running + [newcomer])
    finally:
        b.close()
    chunks = [n for kind, n in calls if kind == "P"]
    assert chunks[-6:] == [16, 16, 16, 16, 16, 17]
    # From the newcomer's first chunk on: never two prefill chunks in a row (others decode).
    tail = calls[[i for i, c in enumerate(calls) if c[0] == "P"][-6]:]
    for a, c in zip(tail, tail[1:]):
        assert not (a[0] == "P" and c[0] == "P"), tail
    assert max(n for kind, n in calls if kind == "D") == 3  # the newcomer joined the batch


# ---- stats and memory -------------------------------------------------------------------------

def test_per_stream_stats(engine, batcher):
    results = _concurrently([batcher.submit(p, GREEDY) for p in _prompts(4, seed=6)])
    for ids, _, last in results:
        s = last.stats
        assert isinstance(s, BatchStats)
        assert s.new_tokens == NEW and s.prompt_tokens > 0
        assert 0 < s.ttft_s <= s.total_s
        assert s.decode_tokens_per_s > 0 and s.queue_wait_s >= 0
        assert 1 <= s.batch_size <= s.max_batch_size <= 4
        assert s.kv_cache_tokens == batcher.capacity and s.rss_mb > 0


def test_slot_pool_memory_is_reserved_once(engine):
    b = Batcher(engine, slots=3, capacity=128)
    try:
        per_token = 2 * engine.num_layers * engine.kv_heads * engine.head_dim * 4
        assert b.pool.nbytes == 3 * 128 * per_token
        assert b.stats()["kv_cache_mb"] == pytest.approx(3 * 128 * per_token / 2**20)
        pointers = [buf.ctypes.data for buf in b.pool.buffers]
        _concurrently([b.submit(p, GREEDY) for p in _prompts(5)])
        assert [buf.ctypes.data for buf in b.pool.buffers] == pointers  # no reallocation
    finally:
        b.close()
