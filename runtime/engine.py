"""The generation engine: one exported model folder, one variant, one InferenceSession.

Shaped like gpt-fast's generate.py: a generation makes a KVCache (runtime/kv_cache.py: its
buffers and IO binding), `prefill()` runs the prompt, `decode_step()` one token, and
`_generate()` is the loop between them and the sampler (runtime/sampling.py). Several
generations may run at once from different threads: each has its own cache; they share the
session and its intra-op thread pool (runtime/README.md, concurrency).
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from dataclasses import dataclass

import numpy as np

from .errors import EngineError, PromptTooLongError, VariantNotFoundError  # noqa: F401
from .folder import (NUM_LOGITS_TO_KEEP, VARIANTS, graph_input_names, needs_custom_ops,  # noqa: F401
                     read_config, variant_path)
from .kv_cache import KVCache
from .sampling import GenerationSettings, Sampler
from .session import check_custom_ops, open_session
from .stats import GenerationStats, StatsClock
from .text import StreamDecoder, clean_text, compile_template, normalize_messages

CACHE_BLOCK = 64  # KV cache capacity is rounded up to a multiple of this


@dataclass
class GenerationEvent:
    text: str  # new text since the previous event (never a split character)
    token_ids: list[int]  # new token ids since the previous event
    stats: GenerationStats
    done: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "time" | "cancelled" once done


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    stats: GenerationStats
    finish_reason: str

    @classmethod
    def collect(cls, events) -> "GenerationResult":
        """The whole generation from a stream of GenerationEvents (Engine's or the batcher's)."""
        parts, ids, last = [], [], None
        for event in events:
            parts.append(event.text)
            ids.extend(event.token_ids)
            last = event
        return cls("".join(parts), ids, last.stats, last.finish_reason)


class Limits:
    """The two reasons to end a generation early, checked between tokens: the caller's
    `cancel` (anything with is_set(), e.g. a threading.Event) and settings.max_time_s."""

    def __init__(self, cancel, max_time_s: float | None, started: float):
        self.cancel = cancel
        self.deadline = None if max_time_s is None else started + float(max_time_s)

    def reason(self) -> str | None:
        if self.cancel is not None and self.cancel.is_set():
            return "cancelled"
        if self.deadline is not None and time.perf_counter() >= self.deadline:
            return "time"
        return None


class Engine:
    def __init__(self, model_dir, variant: str = "ternary", threads: int | None = None,
                 session_config: dict | None = None, prefill_chunk: int = 256,
                 last_logits_only: bool = True):
        """Load `variant` of the model folder `model_dir`.

        threads: intra-op threads (None: runtime.cpus.available_threads(), the CPUs this
            process may use, cgroup quota included).
        session_config: extra onnxruntime session config entries, e.g. {"mlas.use_lut_gemm": "1"}.
        prefill_chunk: the prompt is run in chunks of at most this many tokens (bounds the
            memory of the activations and logits; 0 = whole prompt at once).
        last_logits_only: the lm_head runs on the last position only (the graph's
            `num_logits_to_keep` input = 1). False: logits for every prompt position (also
            what folders of format 1, which lack that input, always give).
        """
        from tokenizers import Tokenizer

        model_dir = os.fspath(model_dir)
        self.model_dir = model_dir
        self.config = read_config(model_dir)
        model_path = variant_path(model_dir, variant, self.config)
        tok_path = os.path.join(model_dir, "tokenizer.json")
        if not os.path.exists(tok_path):
            raise EngineError(f"{model_dir} has no tokenizer.json")
        if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
            raise ValueError(f"threads must be a positive integer or None, got {threads!r}")

        self.variant = variant
        self.context_length = int(self.config["context_length"])
        self.tokenizer = Tokenizer.from_file(tok_path)
        self.prefill_chunk = int(prefill_chunk)
        self.session_config = dict(session_config or {})
        self.uses_custom_ops = needs_custom_ops(variant)
        if self.uses_custom_ops:
            check_custom_ops()
        try:
            self.session = open_session(model_path, threads=threads, custom_ops=self.uses_custom_ops,
                                        config=self.session_config)
        except Exception as e:  # onnxruntime raises its own exception types
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise EngineError(f"onnxruntime cannot load {model_path}: {first}") from None
        self.threads = self.session.get_session_options().intra_op_num_threads
        self.model_file_bytes = sum(
            os.path.getsize(p) for p in (model_path, model_path + ".data") if os.path.exists(p))

        c = self.config
        self.num_layers = int(c["num_layers"])
        self.kv_heads = int(c["num_key_value_heads"])
        self.head_dim = int(c["head_dim"])
        out_shape = self.session.get_outputs()[0].shape
        self.vocab_size = out_shape[-1] if isinstance(out_shape[-1], int) else int(c["vocab_size"])
        # The graph says what it needs: format 2 graphs take num_logits_to_keep; format 1
        # graphs (no such input) always return logits for every position.
        inputs = graph_input_names(self.session)
        self._keep_input = NUM_LOGITS_TO_KEEP in inputs
        self.last_logits_only = bool(last_logits_only) and self._keep_input
        self.stop_token_ids = [int(t) for t in c.get("stop_token_ids") or []]
        self.bos_token_id = c.get("bos_token_id")
        self._template_source = c.get("chat_template")
        self._active = 0
        self._lock = threading.Lock()

    # -- text ---------------------------------------------------------------------------
    @property
    def active_generations(self) -> int:
        """How many stream() generators are running now (0 = idle)."""
        return self._active

    def render_chat(self, messages, add_generation_prompt: bool = True) -> str:
        """The chat template applied to messages (text, BOS included as the template writes it)."""
        if not self._template_source:
            raise EngineError(f"{self.model_dir} has no chat template; use a raw prompt")
        c = self.config
        return compile_template(self._template_source).render(
            messages=normalize_messages(messages), add_generation_prompt=add_generation_prompt,
            bos_token=c.get("bos_token") or "", eos_token=c.get("eos_token") or "")

    def count_tokens(self, text: str) -> int:
        """Tokens of `text` alone (no BOS or other special tokens added)."""
        return len(self.tokenizer.encode(clean_text(text), add_special_tokens=False).ids)

    def prompt_ids(self, prompt: str | None = None, messages=None,
                   settings: GenerationSettings | None = None) -> list[int]:
        """The token ids a generation would start from (see stream()); raises
        PromptTooLongError when they leave no room for a new token."""
        if (prompt is None) == (messages is None):
            raise ValueError("pass exactly one of prompt (raw text) or messages (chat)")
        if prompt is not None:
            # Raw text: the tokenizer's own special tokens (BOS when the model's tokenizer
            # adds it, as transformers' tokenizer would).
            ids = self._encode_raw(prompt)
        else:
            messages = normalize_messages(messages)
            ids = self._encode_chat(messages)
            if len(ids) >= self.context_length and settings is not None and settings.truncate:
                ids = self._truncate(messages, settings)
        if not ids:
            raise ValueError("empty prompt and the model has no BOS token to start from")
        if len(ids) >= self.context_length:
            detail = "" if messages is None else "; pass settings.truncate=True to drop the oldest turns"
            raise PromptTooLongError(len(ids), self.context_length, detail)
        return ids

    def _encode_raw(self, prompt: str) -> list[int]:
        ids = self.tokenizer.encode(clean_text(prompt), add_special_tokens=bool(self.config.get("add_bos_token", True))).ids
        if not ids and self.bos_token_id is not None:
            ids = [int(self.bos_token_id)]  # empty prompt: start from BOS alone
        return ids

    def _encode_chat(self, messages) -> list[int]:
        # Like transformers' apply_chat_template: the template writes BOS itself.
        return self.tokenizer.encode(self.render_chat(messages), add_special_tokens=False).ids

    def _truncate(self, messages: list[dict], settings: GenerationSettings) -> list[int]:
        """Drop the oldest non-system messages (never the last one) until the prompt leaves
        room for max_new_tokens, or for at least one token when that is impossible."""
        messages = list(messages)
        ids = self._encode_chat(messages)
        budget = max(1, self.context_length - settings.max_new_tokens)
        while len(ids) > budget:
            droppable = [i for i, m in enumerate(messages[:-1]) if m["role"] != "system"]
            if not droppable:
                break
            del messages[droppable[0]]
            # Start the history at a user turn: drop an assistant turn left in front.
            rest = [i for i, m in enumerate(messages[:-1]) if m["role"] != "system"]
            if rest and messages[rest[0]]["role"] == "assistant":
                del messages[rest[0]]
            ids = self._encode_chat(messages)
        return ids

    # -- generation -----------------------------------------------------------------------
    def generate(self, prompt: str | None = None, messages=None,
                 settings: GenerationSettings | None = None, cancel=None) -> GenerationResult:
        return GenerationResult.collect(
            self.stream(prompt=prompt, messages=messages, settings=settings, cancel=cancel))

    def stream(self, prompt: str | None = None, messages=None,
               settings: GenerationSettings | None = None, cancel: threading.Event | None = None):
        """Generate from a raw `prompt` or chat `messages`; returns an iterator of
        GenerationEvent. Bad settings, an overlong prompt etc. raise here, before any compute.
        `cancel`: anything with is_set() (a threading.Event), checked between tokens.
        """
        started = time.perf_counter()
        settings = _checked(settings)
        return self._generate(self.prompt_ids(prompt, messages, settings), settings, cancel, started)

    def stream_tokens(self, ids, settings: GenerationSettings | None = None,
                      cancel: threading.Event | None = None):
        """stream() from token ids as they are (no tokenizer, no BOS added)."""
        started = time.perf_counter()
        settings = _checked(settings)
        ids = [int(t) for t in ids]
        if not ids:
            raise ValueError("no prompt tokens")
        if min(ids) < 0 or max(ids) >= self.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.vocab_size})")
        if len(ids) >= self.context_length:
            raise PromptTooLongError(len(ids), self.context_length)
        return self._generate(ids, settings, cancel, started)

    def new_cache(self, capacity: int, batch: int = 1) -> KVCache:
        """An empty KV cache for `batch` sequences of up to `capacity` tokens."""
        extra = {NUM_LOGITS_TO_KEEP: np.array([int(self.last_logits_only)], np.int64)} if self._keep_input else {}
        return KVCache(self.session, self.num_layers, self.kv_heads, self.head_dim, capacity,
                       self.vocab_size, batch, extra)

    def prefill(self, cache: KVCache, ids, limits: Limits | None = None) -> np.ndarray | None:
        """Run the prompt `ids` through the model in chunks of prefill_chunk tokens; the logits
        of its last position ([vocab]), or None when `limits` ended it between chunks."""
        prompt = np.asarray(ids, dtype=np.int64).reshape(1, -1)
        chunk = self.prefill_chunk if self.prefill_chunk > 0 else prompt.shape[1]
        for start in range(0, prompt.shape[1], chunk):
            if limits is not None and limits.reason():
                return None
            part = prompt[:, start:start + chunk]
            if self.last_logits_only or part.shape[1] == 1:
                logits = cache.step_logits
            else:  # every position's logits (format 1 folders, last_logits_only=False)
                logits = np.empty((1, part.shape[1], self.vocab_size), np.float32)
            cache.forward(part, logits)
        return logits[0, -1]

    def decode_step(self, cache: KVCache, token: int) -> np.ndarray:
        """Feed one token; the logits of the next ([vocab], a view of the cache's buffer)."""
        return cache.forward(np.array([[token]], np.int64), cache.step_logits)[0, -1]

    def _cache_capacity(self, prompt_len: int, new_tokens: int) -> int:
        need = prompt_len + new_tokens
        return min(self.context_length, -(-need // CACHE_BLOCK) * CACHE_BLOCK)

    def _generate(self, ids: list[int], settings: GenerationSettings, cancel, started: float):
        """The loop: prefill, then sample / emit / decode_step until a finish reason."""
        with self._lock:
            self._active += 1
        try:
            max_new = min(settings.max_new_tokens, self.context_length - len(ids))
            cache = self.new_cache(self._cache_capacity(len(ids), max_new))
            stats = GenerationStats(prompt_tokens=len(ids), variant=self.variant, threads=self.threads,
                                    kv_cache_tokens=cache.capacity, kv_cache_mb=cache.nbytes / 2**20)
            clock = StatsClock(stats, started, GenerationEvent)
            limits = Limits(cancel, settings.max_time_s, started)
            finish = _Finish(self, settings, max_new)
            sampler = Sampler(settings, self.vocab_size, ids)

            logits = None if limits.reason() else self.prefill(cache, ids, limits)
            if logits is None:  # cancelled or out of time before the first token
                yield clock.event(text="", token_ids=[], done=True, finish_reason=limits.reason())
                return
            clock.prefilled(len(ids))
            token = sampler(logits)
            clock.first_token()
            while True:
                text, reason = finish.accept(token)
                reason = reason or limits.reason()
                if reason is not None and reason != "stop":
                    text += finish.flush()
                yield clock.event(text=text, token_ids=[token], done=reason is not None, finish_reason=reason)
                if reason is not None:
                    return
                reason = limits.reason()  # set while the caller handled the event
                if reason is not None:
                    yield clock.event(text=finish.flush(), token_ids=[], done=True, finish_reason=reason)
                    return
                token = sampler(self.decode_step(cache, token))
        finally:
            with self._lock:
                self._active -= 1

    def __repr__(self):
        return f"Engine({self.model_dir!r}, variant={self.variant!r}, threads={self.threads})"


def _checked(settings: GenerationSettings | None) -> GenerationSettings:
    """A validated copy (the caller's object is never changed)."""
    settings = dataclasses.replace(settings) if settings is not None else GenerationSettings()
    settings.stop = [settings.stop] if isinstance(settings.stop, str) else list(settings.stop)
    settings.validate()
    return settings


class _Finish:
    """Per token: its text, and whether it ends the generation ("stop" or "length")."""

    def __init__(self, engine: Engine, settings: GenerationSettings, max_new: int):
        ids = engine.stop_token_ids if settings.stop_token_ids is None else settings.stop_token_ids
        self.stop_ids, self.max_new = set(ids), max_new
        self.decoder = StreamDecoder(engine.tokenizer, settings.stop)
        self.count = 0

    def accept(self, token: int) -> tuple[str, str | None]:
        self.count += 1
        if token in self.stop_ids:
            return "", "stop"
        text = self.decoder.add([token])
        if self.decoder.stopped:
            return text, "stop"
        return text, "length" if self.count >= self.max_new else None

    def flush(self) -> str:
        return self.decoder.flush()
