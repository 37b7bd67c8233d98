"""The generation engine: one exported model folder, one variant, one InferenceSession.

Each `stream()` call owns its KV cache (preallocated for the request, bound with IO binding so
the same buffer is GroupQueryAttention's past input and present output: decode copies no
cache) and its logits buffers. Calls from several threads run at once; they share the
session and its intra-op thread pool (see README: concurrency).
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from dataclasses import dataclass

import numpy as np

from .errors import EngineError, PromptTooLongError, VariantNotFoundError  # noqa: F401
from .folder import VARIANTS, needs_custom_ops, read_config, variant_path  # noqa: F401
from .sampling import GenerationSettings, Sampler
from .session import session_options
from .stats import GenerationStats, peak_rss_mb, rss_mb
from .text import StreamDecoder, clean_text, compile_template, normalize_messages

CACHE_BLOCK = 64  # KV cache capacity is rounded up to a multiple of this


@dataclass
class GenerationEvent:
    text: str  # new text since the previous event (never a split character)
    token_ids: list[int]  # new token ids since the previous event
    stats: GenerationStats
    done: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" once done


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    stats: GenerationStats
    finish_reason: str


FINAL_NORM = "model.norm"  # export/graph.py names the final RMSNorm node so


def _last_position_logits(model) -> bool:
    """Edit the graph (in memory) so that the lm_head sees only the last position: logits
    become [batch, 1, vocab]. A prompt of n tokens then costs one lm_head row instead of n
    (2B4T: 128 x 2560 x 128256 multiply-adds less per 128-token prefill) and no [n, vocab]
    buffer. Returns False (graph untouched) when the final norm is not found."""
    from onnx import TensorProto, helper

    nodes = [n for n in model.graph.node if n.name == FINAL_NORM]
    if len(nodes) != 1 or model.graph.output[0].name != "logits":
        return False
    hidden = nodes[0].output[0]
    last = hidden + "/last_position"
    consumers = [n for n in model.graph.node if hidden in n.input]
    if not consumers:
        return False
    for n in consumers:
        for i, name in enumerate(n.input):
            if name == hidden:
                n.input[i] = last
    consts = [helper.make_tensor(f"{last}/{k}", TensorProto.INT64, [1], [v])
              for k, v in (("starts", -1), ("ends", 2**62), ("axes", 1))]
    model.graph.initializer.extend(consts)
    index = list(model.graph.node).index(nodes[0]) + 1
    model.graph.node.insert(index, helper.make_node(
        "Slice", [hidden] + [c.name for c in consts], [last], name=hidden + "/slice_last"))
    dims = model.graph.output[0].type.tensor_type.shape.dim
    if len(dims) == 3:
        dims[1].ClearField("dim_param")
        dims[1].dim_value = 1
    return True


class Engine:
    def __init__(self, model_dir, variant: str = "ternary", threads: int | None = None,
                 session_config: dict | None = None, prefill_chunk: int = 256,
                 last_logits_only: bool = True):
        """Load `variant` of the model folder `model_dir`.

        threads: intra-op threads (None: onnxruntime's default, one per physical core).
        session_config: extra onnxruntime session config entries, e.g. {"mlas.use_lut_gemm": "1"}.
        prefill_chunk: the prompt is run in chunks of at most this many tokens (bounds the
            memory of the [chunk, vocab] logits and activations; 0 = whole prompt at once).
        last_logits_only: run the lm_head on the last position only: through the graph's
            optional `logits_to_keep` input when it has one, else by an in-memory edit of the
            graph (the files are not changed). False: logits for every prompt position.
        """
        import onnxruntime as ort
        from tokenizers import Tokenizer

        model_dir = os.fspath(model_dir)
        self.model_dir = model_dir
        self.config = read_config(model_dir)
        model_path = variant_path(model_dir, variant, self.config)
        tok_path = os.path.join(model_dir, "tokenizer.json")
        if not os.path.exists(tok_path):
            raise EngineError(f"{model_dir} has no tokenizer.json")
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads must be a positive integer or None, got {threads!r}")

        self.variant = variant
        self.context_length = int(self.config["context_length"])
        self.tokenizer = Tokenizer.from_file(tok_path)
        self.prefill_chunk = int(prefill_chunk)
        self.session_config = dict(session_config or {})

        self.uses_custom_ops = needs_custom_ops(variant)
        so = session_options(threads, self.uses_custom_ops, self.session_config)
        import onnx

        try:
            proto = onnx.load(model_path, load_external_data=False)  # the graph; weights stay on disk
        except Exception as e:
            raise EngineError(f"{model_path} is not a readable ONNX model: {e}") from None
        # How many positions get logits. Folders exported with the optional `logits_to_keep`
        # input (an initializer that is also a graph input; IO binding cannot feed such an
        # "overridable initializer"): its value is set in memory to 1 (or 0 = all) and it
        # becomes a constant. A required `logits_to_keep` input is fed at run time. Older
        # folders without it: a Slice to the last position is inserted in memory.
        last_logits_only = bool(last_logits_only)
        self._logits_to_keep_input, edited = False, False
        if any(i.name == "logits_to_keep" for i in proto.graph.input):
            inits = [t for t in proto.graph.initializer if t.name == "logits_to_keep"]
            if inits:
                from onnx import numpy_helper

                inits[0].CopyFrom(numpy_helper.from_array(np.array(int(last_logits_only), np.int64),
                                                          "logits_to_keep"))
                kept = [i for i in proto.graph.input if i.name != "logits_to_keep"]
                del proto.graph.input[:]
                proto.graph.input.extend(kept)
                edited = True
            else:
                self._logits_to_keep_input = True
        elif last_logits_only:
            edited = _last_position_logits(proto)
        self.last_logits_only = last_logits_only and (edited or self._logits_to_keep_input)
        try:
            if edited:
                # The edited graph is passed as bytes; its weights are read from the folder.
                so.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                            os.path.dirname(os.path.abspath(model_path)))
                self.session = ort.InferenceSession(proto.SerializeToString(), so,
                                                    providers=["CPUExecutionProvider"])
            else:
                self.session = ort.InferenceSession(model_path, so, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types
            raise EngineError(f"onnxruntime cannot load {model_path}: {e}") from None
        del proto
        self.threads = so.intra_op_num_threads
        self.model_file_bytes = sum(
            os.path.getsize(p) for p in (model_path, model_path + ".data") if os.path.exists(p))

        c = self.config
        self.num_layers = int(c["num_layers"])
        self.kv_heads = int(c["num_key_value_heads"])
        self.head_dim = int(c["head_dim"])
        out_shape = self.session.get_outputs()[0].shape
        self.vocab_size = out_shape[-1] if isinstance(out_shape[-1], int) else int(c["vocab_size"])
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
        parts, ids, last = [], [], None
        for event in self.stream(prompt=prompt, messages=messages, settings=settings, cancel=cancel):
            parts.append(event.text)
            ids.extend(event.token_ids)
            last = event
        return GenerationResult("".join(parts), ids, last.stats, last.finish_reason)

    def stream(self, prompt: str | None = None, messages=None,
               settings: GenerationSettings | None = None, cancel: threading.Event | None = None):
        """Generate from a raw `prompt` or chat `messages`; returns an iterator of
        GenerationEvent. Bad settings, an overlong prompt etc. raise here, before any compute.
        """
        started = time.perf_counter()
        settings = dataclasses.replace(settings) if settings is not None else GenerationSettings()
        settings.stop = list(settings.stop) if not isinstance(settings.stop, str) else [settings.stop]
        settings.validate()
        ids = self.prompt_ids(prompt, messages, settings)
        return self._run(ids, settings, cancel, started)

    def stream_tokens(self, ids, settings: GenerationSettings | None = None,
                      cancel: threading.Event | None = None):
        """stream() from token ids as they are (no tokenizer, no BOS added)."""
        started = time.perf_counter()
        settings = dataclasses.replace(settings) if settings is not None else GenerationSettings()
        settings.stop = list(settings.stop) if not isinstance(settings.stop, str) else [settings.stop]
        settings.validate()
        ids = [int(t) for t in ids]
        if not ids:
            raise ValueError("no prompt tokens")
        if min(ids) < 0 or max(ids) >= self.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.vocab_size})")
        if len(ids) >= self.context_length:
            raise PromptTooLongError(len(ids), self.context_length)
        return self._run(ids, settings, cancel, started)

    def _cache_capacity(self, prompt_len: int, new_tokens: int) -> int:
        need = prompt_len + new_tokens
        return min(self.context_length, -(-need // CACHE_BLOCK) * CACHE_BLOCK)

    def _run(self, ids: list[int], settings: GenerationSettings, cancel, started: float):
        import onnxruntime as ort

        with self._lock:
            self._active += 1
        try:
            n_prompt = len(ids)
            max_new = min(settings.max_new_tokens, self.context_length - n_prompt)
            capacity = self._cache_capacity(n_prompt, max_new)
            stops = set(self.stop_token_ids if settings.stop_token_ids is None else settings.stop_token_ids)
            stats = GenerationStats(prompt_tokens=n_prompt, variant=self.variant, threads=self.threads,
                                    kv_cache_tokens=capacity)

            # Per generation: KV buffers, attention mask, logits buffers, one IO binding.
            shape = (1, self.kv_heads, capacity, self.head_dim)
            kv_arrays = [np.zeros(shape, np.float32) for _ in range(2 * self.num_layers)]
            stats.kv_cache_mb = sum(a.nbytes for a in kv_arrays) / 2**20
            binding = self.session.io_binding()
            for i in range(self.num_layers):
                for j, kind in enumerate(("key", "value")):
                    value = ort.OrtValue.ortvalue_from_numpy(kv_arrays[2 * i + j])
                    binding.bind_ortvalue_input(f"past_key_values.{i}.{kind}", value)
                    binding.bind_ortvalue_output(f"present.{i}.{kind}", value)
            if self._logits_to_keep_input:
                binding.bind_cpu_input("logits_to_keep", np.array(int(self.last_logits_only), np.int64))
            mask = np.ones((1, capacity), np.int64)
            step_logits = np.empty((1, 1, self.vocab_size), np.float32)

            def run(tokens: np.ndarray, pos: int, logits: np.ndarray) -> None:
                """Feed tokens at positions pos.. ; the model writes into `logits`."""
                binding.bind_cpu_input("input_ids", tokens)
                binding.bind_cpu_input("attention_mask", mask[:, :pos + tokens.shape[1]])
                binding.bind_output("logits", "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
                self.session.run_with_iobinding(binding)

            def snapshot(**kw):
                now = time.perf_counter()
                stats.total_s = now - started
                if stats.new_tokens > 1:
                    stats.decode_s = now - t_first
                    stats.decode_tokens_per_s = (stats.new_tokens - 1) / max(stats.decode_s, 1e-9)
                stats.rss_mb = rss_mb()
                stats.peak_rss_mb = max(peak_rss_mb(), stats.rss_mb)
                return GenerationEvent(stats=stats.copy(), **kw)

            decoder = StreamDecoder(self.tokenizer, settings.stop)
            sampler = Sampler(settings, self.vocab_size, ids)

            if cancel is not None and cancel.is_set():
                yield snapshot(text="", token_ids=[], done=True, finish_reason="cancelled")
                return

            # Prefill, in chunks; only the last position's logits are kept.
            prompt = np.asarray(ids, dtype=np.int64).reshape(1, -1)
            chunk = self.prefill_chunk if self.prefill_chunk > 0 else n_prompt
            t_prefill = time.perf_counter()
            pos = 0
            while pos < n_prompt:
                part = prompt[:, pos:pos + chunk]
                if part.shape[1] == 1 or self.last_logits_only:
                    chunk_logits = step_logits
                else:
                    chunk_logits = np.empty((1, part.shape[1], self.vocab_size), np.float32)
                run(part, pos, chunk_logits)
                pos += part.shape[1]
            last = chunk_logits[0, -1]
            del prompt
            t_first = time.perf_counter()
            stats.prefill_s = t_first - t_prefill
            stats.prefill_tokens_per_s = n_prompt / max(stats.prefill_s, 1e-9)

            token = sampler(last)
            del chunk_logits, last
            stats.ttft_s = time.perf_counter() - started
            t_first = time.perf_counter()
            input_ids = np.empty((1, 1), np.int64)
            while True:
                stats.new_tokens += 1
                finish = None
                if token in stops:
                    finish = "stop"
                    text = ""
                else:
                    text = decoder.add([token])
                    if decoder.stopped:
                        finish = "stop"
                if finish is None and stats.new_tokens >= max_new:
                    finish = "length"
                if finish is None and cancel is not None and cancel.is_set():
                    finish = "cancelled"
                if finish is not None:
                    if finish != "stop":
                        text += decoder.flush()
                    yield snapshot(text=text, token_ids=[token], done=True, finish_reason=finish)
                    return
                yield snapshot(text=text, token_ids=[token])
                if cancel is not None and cancel.is_set():
                    yield snapshot(text=decoder.flush(), token_ids=[], done=True, finish_reason="cancelled")
                    return
                input_ids[0, 0] = token
                run(input_ids, pos, step_logits)
                pos += 1
                token = sampler(step_logits[0, 0])
        finally:
            with self._lock:
                self._active -= 1

    def __repr__(self):
        return f"Engine({self.model_dir!r}, variant={self.variant!r}, threads={self.threads})"
