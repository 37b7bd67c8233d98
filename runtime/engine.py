"""The generation engine: one exported model folder, one variant, one InferenceSession.

Shaped like gpt-fast's generate.py: a generation makes a KVCache (runtime/kv_cache.py: its
buffers and IO binding), `prefill()` runs the prompt, `decode_step()` one token, and
`_generate()` is the loop between them and a Generation (runtime/generation.py: sampler,
stop rules, events; the batcher drives the same one). Several
generations may run at once from different threads: each has its own cache; they share the
session and its intra-op thread pool (runtime/README.md, concurrency).
"""

from __future__ import annotations

import os
import threading
import time

import numpy as np

from .cpus import check_threads
from .errors import EngineError, PromptTooLongError, first_line
from .folder import NUM_LOGITS_TO_KEEP, graph_input_names, needs_custom_ops, read_config, variant_path
from .generation import EarlyStop, Generation, GenerationResult, checked_settings, checked_token_ids
from .kv_cache import KVCache
from .logprobs import TokenLogprob, token_logprob
from .sampling import GenerationSettings
from .session import check_custom_ops, open_session
from .stats import GenerationStats
from .text import clean_text, compile_template, normalize_messages

CACHE_BLOCK = 64  # KV cache capacity is rounded up to a multiple of this


class Engine:
    batcher = None  # one sequence at a time; a BatchedEngine (runtime/batcher.py) has its Batcher here

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
        check_threads(threads)

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
            raise EngineError(f"onnxruntime cannot load {model_path}: {first_line(e)}") from None
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
        settings = checked_settings(settings)
        return self._generate(self.prompt_ids(prompt, messages, settings), settings, cancel, started)

    def stream_tokens(self, ids, settings: GenerationSettings | None = None,
                      cancel: threading.Event | None = None):
        """stream() from token ids as they are (no tokenizer, no BOS added)."""
        started = time.perf_counter()
        settings = checked_settings(settings)
        ids = checked_token_ids(ids, self.vocab_size)
        if len(ids) >= self.context_length:
            raise PromptTooLongError(len(ids), self.context_length)
        return self._generate(ids, settings, cancel, started)

    def new_cache(self, capacity: int, batch: int = 1, last_logits_only: bool | None = None) -> KVCache:
        """An empty KV cache for `batch` sequences of up to `capacity` tokens. `last_logits_only`
        (None: the engine's) binds num_logits_to_keep when the graph has that input."""
        last_only = self.last_logits_only if last_logits_only is None else last_logits_only
        keep = int(bool(last_only)) if self._keep_input else None
        return KVCache(self.session, self.num_layers, self.kv_heads, self.head_dim, capacity,
                       self.vocab_size, batch, keep)

    def prefill(self, cache: KVCache, ids, early_stop: EarlyStop | None = None) -> np.ndarray | None:
        """Run the prompt `ids` through the model in chunks of prefill_chunk tokens; the logits
        of its last position ([vocab]), or None when `early_stop` ended it between chunks."""
        ids = list(ids)
        chunk = self.prefill_chunk if self.prefill_chunk > 0 else len(ids)
        for start in range(0, len(ids), chunk):
            if early_stop is not None and early_stop.reason():
                return None
            logits = cache.prefill(0, ids[start:start + chunk])
        return logits

    def score(self, ids, top: int = 0, cancel=None) -> list[TokenLogprob] | None:
        """How likely the model finds each token of `ids` after the ones before it (token ids
        as they are; the first has no context and gets no score): the log-softmax of the
        logits at every prompt position, with the `top` most likely tokens there. What an
        evaluation harness sums for a loglikelihood. None when `cancel` was set between chunks."""
        ids = checked_token_ids(ids, self.vocab_size)
        if len(ids) > self.context_length:
            raise PromptTooLongError(len(ids), self.context_length)
        cache = self.new_cache(self._cache_capacity(len(ids), 0), last_logits_only=False)
        chunk = self.prefill_chunk if self.prefill_chunk > 0 else len(ids)
        scores: list[TokenLogprob] = []
        for start in range(0, len(ids), chunk):
            if cancel is not None and cancel.is_set():
                return None
            part = ids[start:start + chunk]
            logits = cache.prefill(0, part, all_positions=True)
            # row i of the chunk predicts token start + i + 1 (the last row of the prompt: none)
            for i in range(min(len(part), len(ids) - 1 - start)):
                scores.append(token_logprob(logits[i], ids[start + i + 1], top))
        return scores

    @property
    def lm_head(self) -> str:
        """Which lm_head computes this variant's logits (the logprobs' fidelity): "native"
        (the checkpoint's own precision, exact), "i8" (our int8 table) or "nbits8" (stock
        MatMulNBits 8-bit); "unknown" for folders that do not record it."""
        return str((self.config.get("lm_head_kinds") or {}).get(self.variant, "unknown"))

    def decode_step(self, cache: KVCache, token: int) -> np.ndarray:
        """Feed one token; the logits of the next ([vocab], a view of the cache's buffer)."""
        return cache.decode({0: token})[0]

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
            stats = GenerationStats(kv_cache_tokens=cache.capacity, kv_cache_mb=cache.nbytes / 2**20)
            gen = Generation(self, ids, settings, max_new=max_new, cancel=cancel, started=started, stats=stats)
            logits = None if gen.interrupted() else self.prefill(cache, ids, gen.early_stop)
            if logits is None:  # cancelled or out of time before the first token
                yield gen.end(gen.interrupted())
                return
            event = gen.first(logits)
            while True:
                yield event
                if event.done:
                    return
                reason = gen.interrupted()  # set while the caller handled the event
                if reason is not None:
                    yield gen.end(reason)
                    return
                event = gen.next(self.decode_step(cache, gen.token))
        finally:
            with self._lock:
                self._active -= 1

    def __repr__(self):
        return f"Engine({self.model_dir!r}, variant={self.variant!r}, threads={self.threads})"

