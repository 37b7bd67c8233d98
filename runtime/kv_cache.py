"""The KV cache: its buffers, the attention mask and the IO binding, for one generation
(Engine) or for the slots of many decoded together (the batcher's SlotPool).

One buffer [rows, kv_heads, capacity, head_dim] per layer for keys and one for values, of the
graph's cache type (float32, or float16 from `python -m export --kv-cache float16`),
allocated once and bound (IO binding) as BOTH the graph's `past_key_values.i.*` input and its
`present.i.*` output: GroupQueryAttention writes the new keys/values in place at each row's
current length and reads [0, length + new), so a step copies no cache. `lengths[r]` counts the
tokens cached in row r; the attention mask is ones for those (right padding, as GQA's
seqlens_k expects), so rows of different lengths share a run. Three kinds of run:

- `forward(tokens, logits)`: the same number of new tokens for every row.
- `prefill(row, ids)`: one chunk of a prompt for one row, alone (batch 1) on a view of it.
  ORT's GQA accepts S > 1 new tokens on top of a cache only with batch 1.
- `decode({row: token})`: one token for each given row in one run with input_ids [B, 1], where
  B is the highest such row + 1. Rows in between that are not decoding (free, or a newcomer
  still prefilling) ride along as padding rows: mask sum = their length + 1, so GQA writes one
  dummy key/value at their position `length` (beyond anything valid; the next prefill chunk
  or occupant overwrites it) and reads only their own row.

How GQA reads the rows (tests/test_batch_attention.py proves each point on the demo model):
per row r only seqlens_k[r] = sum(mask[r]) - 1 matters: the new token's rotary position and
cache slot are seqlens_k[r], and attention reads keys [0, seqlens_k[r]] of row r only, so rows
of different lengths share a step, garbage beyond a row's length is never read, and the
mask's width (total_sequence_length) is only an upper bound.
"""

from __future__ import annotations

import numpy as np

from .folder import ATTENTION_MASK, INPUT_IDS, LOGITS, NUM_LOGITS_TO_KEEP, bind_constant_input, past_name, present_name

CACHE_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def cache_dtype(session) -> type:
    """The element type of the graph's KV cache inputs (float32 unless exported with float16)."""
    past = past_name(0, "key")
    for graph_input in session.get_inputs():
        if graph_input.name == past:
            if graph_input.type not in CACHE_TYPES:
                raise ValueError(f"{past} is {graph_input.type}; a KV cache is float or float16")
            return CACHE_TYPES[graph_input.type]
    return np.float32


class KVCache:
    def __init__(self, session, num_layers: int, kv_heads: int, head_dim: int, capacity: int,
                 vocab_size: int, batch: int = 1, num_logits_to_keep: int | None = None):
        """Buffers for `batch` rows of up to `capacity` tokens. `num_logits_to_keep`: what to
        bind to the graph's input of that name (1: the last position's logits only, 0: every
        position's); None when the graph has no such input (format 1: every position's)."""
        self.session, self.num_layers = session, int(num_layers)
        self.capacity, self.batch, self.vocab_size = int(capacity), int(batch), int(vocab_size)
        shape = (self.batch, kv_heads, self.capacity, head_dim)
        self.dtype = cache_dtype(session)
        # np.zeros: the OS hands out zero pages lazily, so RSS grows only with the tokens cached.
        self.buffers = [np.zeros(shape, self.dtype) for _ in range(2 * self.num_layers)]
        self.lengths = np.zeros(self.batch, np.int64)
        self._keep = None if num_logits_to_keep is None else np.array([int(num_logits_to_keep)], np.int64)
        self.last_logits_only = num_logits_to_keep == 1
        # One row of logits per sequence: what a decode step (and a last-position prefill) returns.
        self.step_logits = np.empty((self.batch, 1, self.vocab_size), np.float32)
        self._bindings: dict[tuple[int, int], object] = {}  # (first row, end row) -> IO binding

    @property
    def nbytes(self) -> int:
        """Bytes reserved for the cache (all rows, keys and values)."""
        return sum(b.nbytes for b in self.buffers)

    def forward(self, tokens: np.ndarray, logits: np.ndarray) -> np.ndarray:
        """Run the model on `tokens` [batch, n] at positions lengths..lengths+n, appending them
        to the cache; the model writes its logits into `logits` (returned)."""
        tokens = np.ascontiguousarray(tokens, dtype=np.int64)
        self._run(0, self.batch, tokens, logits)
        self.lengths += tokens.shape[1]
        return logits

    def prefill(self, row: int, ids, all_positions: bool = False) -> np.ndarray:
        """Append `ids` (one chunk of a prompt) to `row`; the logits after its last token
        ([vocab], a view of a reused buffer: copy it to keep it), or with `all_positions` the
        logits after each of its tokens ([n, vocab]; a cache made with num_logits_to_keep 0)."""
        ids = np.asarray(ids, np.int64).reshape(1, -1)
        n = ids.shape[1]
        if all_positions and self.last_logits_only:
            raise ValueError("this cache computes the last position's logits only (num_logits_to_keep 1)")
        if (self.last_logits_only or n == 1) and not all_positions:
            logits = self.step_logits[row:row + 1]
        else:  # every position's logits (format 1 graphs, num_logits_to_keep 0)
            logits = np.empty((1, n, self.vocab_size), np.float32)
        self._run(row, row + 1, ids, logits)
        self.lengths[row] += n
        return logits[0] if all_positions else logits[0, -1]

    def decode(self, tokens: dict[int, int]) -> np.ndarray:
        """One token per decoding row ({row: token}) in one run; returns logits [B, vocab] with
        B = the highest row + 1 (padding rows hold junk). A view of a reused buffer."""
        rows = max(tokens) + 1
        ids = np.zeros((rows, 1), np.int64)
        for row, token in tokens.items():
            ids[row, 0] = token
        logits = self.step_logits[:rows]
        self._run(0, rows, ids, logits)
        for row in tokens:
            self.lengths[row] += 1
        return logits[:, 0]

    def _run(self, first: int, end: int, tokens: np.ndarray, logits: np.ndarray) -> None:
        """One model run of `tokens` [end - first, n] on rows first..end-1, each at its own
        length (the mask is right-padded: length + n ones per row). Lengths are not updated."""
        n = tokens.shape[1]
        lengths = self.lengths[first:end]
        room = self.capacity - int(lengths.max())
        if n > room:
            raise ValueError(f"{n} tokens do not fit the KV cache ({room} of {self.capacity} left)")
        ends = lengths + n
        mask = (np.arange(int(ends.max()))[None, :] < ends[:, None]).astype(np.int64)
        binding = self._binding(first, end)
        binding.bind_cpu_input(INPUT_IDS, tokens)
        binding.bind_cpu_input(ATTENTION_MASK, mask)
        binding.bind_output(LOGITS, "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
        self.session.run_with_iobinding(binding)

    def _binding(self, first: int, end: int):
        """The IO binding of rows first..end-1 of the buffers (views, no copy), made once."""
        import onnxruntime as ort

        key = (first, end)
        if key not in self._bindings:
            binding = self.session.io_binding()
            for i in range(self.num_layers):
                for j, kind in enumerate(("key", "value")):
                    value = ort.OrtValue.ortvalue_from_numpy(self.buffers[2 * i + j][first:end])
                    binding.bind_ortvalue_input(past_name(i, kind), value)
                    binding.bind_ortvalue_output(present_name(i, kind), value)
            if self._keep is not None:
                bind_constant_input(binding, NUM_LOGITS_TO_KEEP, self._keep)
            self._bindings[key] = binding
        return self._bindings[key]


class SlotPool:
    """A KVCache whose rows are slots that sequences take and give back (continuous batching):
    a sequence owns one slot from join to leave, so nothing is copied when sequences join or
    leave. `prefill(slot, ids)` and `decode({slot: token})` are the cache's."""

    def __init__(self, cache: KVCache):
        if cache.batch < 1 or cache.capacity < 2:
            raise ValueError(f"need slots >= 1 and capacity >= 2, got {cache.batch} and {cache.capacity}")
        self.cache = cache
        self.slots, self.capacity = cache.batch, cache.capacity
        self.buffers, self.lengths = cache.buffers, cache.lengths
        self.prefill, self.decode = cache.prefill, cache.decode
        self._free = list(range(self.slots))

    @property
    def nbytes(self) -> int:
        return self.cache.nbytes

    @property
    def slot_nbytes(self) -> int:
        return self.nbytes // self.slots

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def acquire(self) -> int | None:
        """The lowest free slot (keeps the decoding rows packed at the front), or None."""
        if not self._free:
            return None
        self._free.sort()
        slot = self._free.pop(0)
        self.lengths[slot] = 0
        return slot

    def copy(self, source: int, target: int) -> None:
        """Make slot `target` hold what slot `source` has cached (a prompt prefilled once and
        continued several ways): its keys, values and length."""
        length = int(self.lengths[source])
        for buffer in self.buffers:
            buffer[target, :, :length] = buffer[source, :, :length]
        self.lengths[target] = length

    def release(self, slot: int) -> None:
        """Give the slot back; its contents stay as garbage (never read: see the module doc)."""
        if slot in self._free:
            raise ValueError(f"slot {slot} is already free")
        self.lengths[slot] = 0
        self._free.append(slot)
