"""Continuous batching: many generations share one decode step.

    batcher = Batcher(engine, slots=8)
    for event in batcher.stream(messages=[...], settings=GenerationSettings(...), cancel=ev):
        ...  # the same GenerationEvents Engine.stream yields (stats: BatchStats)

One scheduler thread owns the model. Each iteration it
  1. admits waiting requests into free KV-cache slots (FIFO; runtime/kv_cache.py SlotPool),
  2. ends the sequences whose caller cancelled, closed the stream or ran out of time
     (their slot is free for the next step),
  3. runs ONE decode step for every decoding sequence together (input_ids [B, 1]),
  4. runs ONE prefill chunk (at most `prefill_chunk` tokens) of the oldest newcomer.
So a running stream waits at most one decode step plus one prefill chunk between tokens,
however long a newcomer's prompt is, and sequences join and leave between steps.

Each sequence is a Generation (runtime/generation.py: its sampler and seed, stop rules and
limits), the same per-token object Engine.stream drives: since every kernel computes a row
the same way whatever the batch (tests/test_batch_attention.py) and a prompt is always
prefilled alone in the same chunks, a sequence's tokens do not depend on what else runs
(tests/test_batcher.py).
"""

from __future__ import annotations

import collections
import dataclasses
import queue
import threading
import time
from dataclasses import dataclass

from .engine import Engine
from .errors import PromptTooLongError
from .generation import Generation, GenerationEvent, GenerationResult, checked_settings, checked_token_ids
from .kv_cache import SlotPool
from .sampling import GenerationSettings
from .stats import GenerationStats, peak_rss_mb, rss_mb


class QueueFullError(RuntimeError):
    """Every slot is busy and the waiting queue is full."""


@dataclass
class BatchStats(GenerationStats):
    """GenerationStats plus where the stream ran: its wait for a slot and its batch sizes.
    decode_tokens_per_s is the stream's own rate (its tokens / its time), not the batch's."""

    queue_wait_s: float = 0.0  # submit -> slot
    batch_size: float = 0.0  # mean number of sequences in the decode steps it took part in
    max_batch_size: int = 0


class _Sequence(Generation):
    """One request: a Generation plus its slot, its prefill progress and its event queue."""

    def __init__(self, ids, settings: GenerationSettings, cancel, started: float, batcher: "Batcher"):
        stats = BatchStats(kv_cache_tokens=batcher.capacity, kv_cache_mb=batcher.pool.slot_nbytes / 2**20)
        max_new = min(settings.max_new_tokens, batcher.capacity - len(ids))
        super().__init__(batcher.engine, ids, settings, max_new=max_new, cancel=cancel, started=started, stats=stats)
        self.events: queue.Queue = queue.Queue()
        self.slot: int | None = None
        self.prefilled = 0  # prompt tokens in the cache
        # n > 1 (submit_many): the first sequence of a group prefills the prompt once and the
        # others, holding their slots meanwhile, start from a copy of its cache
        self.leader: _Sequence | None = None
        self.followers: list[_Sequence] = []
        self.steps = 0  # decode steps taken part in
        self._batch_sum = 0  # their batch sizes, summed

    @property
    def group(self) -> list["_Sequence"]:
        """This sequence and the ones that start from its prefilled prompt."""
        return [self] + self.followers

    def took_step(self, batch_size: int) -> None:
        self.steps += 1
        self._batch_sum += batch_size
        self.stats.batch_size = self._batch_sum / self.steps
        self.stats.max_batch_size = max(self.stats.max_batch_size, batch_size)


class BatchStream:
    """What submit() returns: an iterator of GenerationEvent (the last has done=True).
    `queue_position` (1 = next to get a slot, 0 = running or finished); close() ends the
    generation (a client disconnect) and frees its slot within one step."""

    def __init__(self, seq: _Sequence, batcher: "Batcher"):
        self._seq, self._batcher = seq, batcher
        self._finished = False

    @property
    def queue_position(self) -> int:
        return self._batcher._position(self._seq.leader or self._seq)

    def __iter__(self):
        return self

    def __next__(self) -> GenerationEvent:
        if self._finished:
            raise StopIteration
        item = self._seq.events.get()
        if isinstance(item, BaseException):
            self._finished = True
            raise item
        if item.done:
            self._finished = True
        return item

    def close(self) -> None:
        if not self._seq.done:
            self._seq.early_stop.closed = True
            self._batcher._wake()

    def __del__(self):
        self._seq.early_stop.closed = True  # abandoned without close(): free the slot all the same


class Batcher:
    def __init__(self, engine: Engine, slots: int = 8, capacity: int | None = None,
                 prefill_chunk: int = 64, max_queue: int = 64):
        """Serve `engine`'s model to many streams at once.

        slots: sequences decoded together at most (each owns a KV cache row).
        capacity: tokens per slot (prompt + new), at most and by default the context length.
            Memory: 2 * layers * kv_heads * head_dim * 4 bytes per token per slot, reserved
            up front (`stats()["kv_cache_mb"]`); pages are touched only as tokens are cached.
        prefill_chunk: a newcomer's prompt runs in chunks of this many tokens, one chunk
            between two decode steps: the bound on how long a running stream waits.
        max_queue: requests waiting for a slot beyond this raise QueueFullError.
        """
        if prefill_chunk < 1 or max_queue < 0:
            raise ValueError("prefill_chunk must be >= 1 and max_queue >= 0")
        self.engine = engine
        self.capacity = min(int(capacity or engine.context_length), engine.context_length)
        self.prefill_chunk, self.max_queue = int(prefill_chunk), int(max_queue)
        self.pool = SlotPool(engine.new_cache(self.capacity, batch=slots, last_logits_only=True))
        self._waiting: collections.deque[_Sequence] = collections.deque()
        self._prefilling: list[_Sequence] = []
        self._decoding: dict[int, _Sequence] = {}  # slot -> sequence
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._memory = (rss_mb(), peak_rss_mb())  # sampled once per iteration, for the stats
        self.steps = 0  # decode steps run so far
        self.step_observers: list = []  # called with each decode step's batch size (metrics)

    # -- the interface callers use (Engine.stream's signature) ----------------------------
    def stream(self, prompt: str | None = None, messages=None, settings: GenerationSettings | None = None,
               cancel=None) -> BatchStream:
        """Like Engine.stream (raises before any compute on bad input), through the batch."""
        started = time.perf_counter()
        settings = checked_settings(settings)
        return self._submit(self.engine.prompt_ids(prompt, messages, settings), settings, cancel, started)

    def submit(self, prompt_ids, settings: GenerationSettings | None = None, cancel=None) -> BatchStream:
        """Like Engine.stream_tokens: generate from token ids as they are."""
        started = time.perf_counter()
        settings = checked_settings(settings)
        return self._submit(checked_token_ids(prompt_ids, self.engine.vocab_size), settings, cancel, started)

    stream_tokens = submit

    def stream_many(self, n: int, prompt: str | None = None, messages=None,
                    settings: GenerationSettings | None = None, cancel=None) -> list[BatchStream]:
        """`n` generations from one prompt (OpenAI's `n`): the prompt is prefilled once and the
        n sequences decode side by side from copies of its cache. With a seed, sequence j
        samples with seed + j (reproducible, and the n answers differ)."""
        started = time.perf_counter()
        settings = checked_settings(settings)
        ids = self.engine.prompt_ids(prompt, messages, settings)
        return self._submit(ids, settings, cancel, started, n)

    def submit_many(self, n: int, prompt_ids, settings: GenerationSettings | None = None,
                    cancel=None) -> list[BatchStream]:
        """stream_many from token ids as they are."""
        started = time.perf_counter()
        settings = checked_settings(settings)
        return self._submit(checked_token_ids(prompt_ids, self.engine.vocab_size), settings, cancel, started, n)

    def generate(self, prompt: str | None = None, messages=None, settings: GenerationSettings | None = None,
                 cancel=None) -> GenerationResult:
        return GenerationResult.collect(
            self.stream(prompt=prompt, messages=messages, settings=settings, cancel=cancel))

    def stats(self) -> dict:
        """Occupancy and memory, for a status line or a health endpoint."""
        with self._cond:
            return {"slots": self.pool.slots, "running": len(self._prefilling) + len(self._decoding),
                    "decoding": len(self._decoding), "waiting": len(self._waiting),
                    "free_slots": self.pool.free_slots, "slot_capacity": self.capacity,
                    "kv_cache_mb": self.pool.nbytes / 2**20, "steps": self.steps}

    def close(self) -> None:
        """Stop the scheduler; unfinished streams end with finish_reason "cancelled"."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()

    # -- submission -----------------------------------------------------------------------
    def _submit(self, ids: list[int], settings, cancel, started: float, n: int | None = None):
        """One sequence (n None: its stream) or a group of n (a list of streams)."""
        if len(ids) >= self.capacity:
            raise PromptTooLongError(len(ids), self.capacity, " (the batcher's slot capacity)")
        count = 1 if n is None else n
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= self.pool.slots:
            raise ValueError(f"n must be an integer from 1 to the batcher's {self.pool.slots} slots, got {n!r}")
        group = []
        for j in range(count):
            own = settings if j == 0 or settings.seed is None else \
                dataclasses.replace(settings, seed=(settings.seed + j) % 2**64)
            group.append(_Sequence(ids, own, cancel, started, self))
        seq = group[0]
        for follower in group[1:]:
            follower.leader = seq
        seq.followers = group[1:]
        with self._cond:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            if len(self._waiting) >= self.max_queue and not self.pool.free_slots:
                raise QueueFullError(f"all {self.pool.slots} slots are busy and {len(self._waiting)} "
                                     "requests are waiting; try again later")
            self._waiting.append(seq)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="batcher", daemon=True)
                self._thread.start()
            self._cond.notify_all()
        streams = [BatchStream(s, self) for s in group]
        return streams[0] if n is None else streams

    def _position(self, seq: _Sequence) -> int:
        with self._cond:
            for i, waiting in enumerate(self._waiting):
                if waiting is seq:
                    return i + 1
        return 0

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    @property
    def running(self) -> int:
        """Sequences holding a slot (prefilling or decoding)."""
        return len(self._prefilling) + len(self._decoding)

    # -- the scheduler thread ---------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not (self._waiting or self._prefilling or self._decoding):
                    self._cond.wait()
                if self._closed:
                    break
                self._admit()
            try:
                self._memory = (rss_mb(), peak_rss_mb())
                self._reap()
                if self._decoding:
                    self._decode_step()
                if self._prefilling:
                    self._prefill_chunk()
            except Exception as e:  # a bug here must not leave the callers waiting forever
                for seq in self._grouped(self._prefilling) + list(self._decoding.values()):
                    if not seq.done:
                        self._fail(seq, e)
                self._prefilling.clear()
                self._decoding.clear()
        for seq in self._grouped(list(self._waiting) + self._prefilling) + list(self._decoding.values()):
            if not seq.done:
                self._end(seq, "cancelled")

    @staticmethod
    def _grouped(leaders) -> list[_Sequence]:
        return [member for seq in leaders for member in seq.group]

    def _admit(self) -> None:
        """Waiting requests into free slots, in order; the ones already ended leave the queue."""
        for seq in [s for s in self._waiting if s.interrupted()]:
            self._waiting.remove(seq)
            self._end_group(seq, seq.interrupted())
        # FIFO: a group waits until it has a slot for each of its sequences
        while self._waiting and self.pool.free_slots > len(self._waiting[0].followers):
            seq = self._waiting.popleft()
            for member in seq.group:
                member.slot = self.pool.acquire()
                member.t_prefill = time.perf_counter()
                member.stats.queue_wait_s = member.t_prefill - member.started
            self._prefilling.append(seq)

    def _reap(self) -> None:
        """End the running sequences whose caller cancelled, closed or ran out of time."""
        for seq in [s for s in self._prefilling if s.interrupted()]:
            self._prefilling.remove(seq)
            self._end_group(seq, seq.interrupted())
        for slot, seq in list(self._decoding.items()):
            reason = seq.interrupted()
            if reason:
                del self._decoding[slot]
                self._end(seq, reason)

    def _prefill_chunk(self) -> None:
        seq = self._prefilling[0]
        n = self.prefill_chunk
        if len(seq.ids) - seq.prefilled - n == 1:
            # Never end on a 1-token chunk: ORT's GroupQueryAttention (the stock baselines')
            # computes a lone token by its decode path, whose logits differ in the last bits
            # from the same token inside a chunk. The ternary variant's op gives the same bits
            # for chunks of any size (tests/test_batch_attention.py); the fold costs it nothing.
            n += 1
        chunk = seq.ids[seq.prefilled:seq.prefilled + n]
        try:
            logits = self.pool.prefill(seq.slot, chunk)
        except Exception as e:  # onnxruntime's error: this request fails, the others go on
            self._prefilling.pop(0)
            for member in seq.group:
                self._fail(member, e)
            return
        seq.prefilled += len(chunk)
        if seq.prefilled < len(seq.ids):
            return
        self._prefilling.pop(0)
        if seq.followers:
            logits = logits.copy()  # a view of the step buffer; every member samples from it
        for member in seq.followers:  # the prompt's cache, shared: copied, not recomputed
            if member.interrupted():
                self._end(member, member.interrupted())
                continue
            self.pool.copy(seq.slot, member.slot)
            member.prefilled = seq.prefilled
            if self._send(member, member.first(logits, self._memory)):
                self._decoding[member.slot] = member
        if self._send(seq, seq.first(logits, self._memory)):
            self._decoding[seq.slot] = seq

    def _decode_step(self) -> None:
        batch = dict(self._decoding)
        try:
            logits = self.pool.decode({slot: seq.token for slot, seq in batch.items()})
        except Exception as e:
            for slot, seq in batch.items():
                del self._decoding[slot]
                self._fail(seq, e)
            return
        self.steps += 1
        for observe in self.step_observers:
            observe(len(batch))
        for slot, seq in batch.items():
            seq.took_step(len(batch))
            if not self._send(seq, seq.next(logits[slot], self._memory)):
                del self._decoding[slot]

    def _send(self, seq: _Sequence, event: GenerationEvent) -> bool:
        """Hand the event to the stream; False when it ended the sequence (its slot is free)."""
        seq.events.put(event)
        if event.done:
            self._release(seq)
        return not event.done

    def _end(self, seq: _Sequence, reason: str) -> None:
        self._send(seq, seq.end(reason, self._memory))

    def _end_group(self, seq: _Sequence, reason: str) -> None:
        """End a sequence before its prompt was prefilled, and the group waiting on it."""
        for member in seq.group:
            self._end(member, member.interrupted() or reason)

    def _fail(self, seq: _Sequence, error: BaseException) -> None:
        seq.done = True
        seq.events.put(error)
        self._release(seq)

    def _release(self, seq: _Sequence) -> None:
        seq.done = True
        if seq.slot is not None:
            self.pool.release(seq.slot)
            seq.slot = None


class BatchedEngine:
    """An Engine whose generations go through a Batcher: a drop-in for callers that hold an
    Engine (the API's model registry, the page). stream / stream_tokens / generate run in the
    shared batch; everything else (prompt_ids, render_chat, context_length, tokenizer, ...)
    is the wrapped engine's.

        engine = BatchedEngine(Engine(folder, "ternary"), slots=8)
    """

    def __init__(self, engine: Engine, **batcher_options):
        self.engine = engine
        self.batcher = Batcher(engine, **batcher_options)

    def stream(self, prompt: str | None = None, messages=None, settings: GenerationSettings | None = None,
               cancel=None) -> BatchStream:
        return self.batcher.stream(prompt=prompt, messages=messages, settings=settings, cancel=cancel)

    def stream_many(self, n: int, prompt: str | None = None, messages=None,
                    settings: GenerationSettings | None = None, cancel=None) -> list[BatchStream]:
        return self.batcher.stream_many(n, prompt=prompt, messages=messages, settings=settings, cancel=cancel)

    def submit_many(self, n: int, ids, settings: GenerationSettings | None = None, cancel=None) -> list[BatchStream]:
        return self.batcher.submit_many(n, ids, settings, cancel)

    def stream_tokens(self, ids, settings: GenerationSettings | None = None, cancel=None) -> BatchStream:
        return self.batcher.submit(ids, settings, cancel)

    def generate(self, prompt: str | None = None, messages=None, settings: GenerationSettings | None = None,
                 cancel=None) -> GenerationResult:
        return self.batcher.generate(prompt=prompt, messages=messages, settings=settings, cancel=cancel)

    @property
    def active_generations(self) -> int:
        return self.batcher.running

    def close(self) -> None:
        self.batcher.close()

    def __getattr__(self, name):  # everything else: the wrapped engine's
        return getattr(self.engine, name)

    def __repr__(self):
        return f"BatchedEngine({self.engine!r}, slots={self.batcher.pool.slots})"
