"""A KV cache slot pool: the cache of many sequences decoded together (continuous batching).

One float32 buffer [slots, kv_heads, capacity, head_dim] per layer for keys and one for values,
allocated once. A sequence owns one slot (a row) from join to leave: nothing is copied when
sequences join or leave. Two kinds of run, both bound through IO binding with the same
buffers as past AND present (GroupQueryAttention's shared-buffer mode; runtime/kv_cache.py):

- `prefill(slot, ids)`: one chunk of a newcomer's prompt, alone (batch 1) on a view of its row.
  ORT's GQA accepts S > 1 new tokens on top of a cache only with batch 1.
- `decode(tokens)`: one token for each decoding slot in one run with input_ids [B, 1], where B
  is the highest such slot + 1. Rows in between that are not decoding (free, or a newcomer
  still prefilling) ride along as padding rows: mask sum = their length + 1, so GQA writes one
  dummy key/value at their position `length` (beyond anything valid; the next prefill chunk
  or occupant overwrites it) and reads only their own row.

How GQA reads the rows (tests/test_batch_attention.py proves each point on the demo model):
per row b only seqlens_k[b] = sum(mask[b]) - 1 matters: the new token's rotary position and
cache slot are seqlens_k[b], and attention reads keys [0, seqlens_k[b]] of row b only, so rows
of different lengths share a step, garbage beyond a row's length is never read, and the
mask's width (total_sequence_length) is only an upper bound.
"""

from __future__ import annotations

import numpy as np

from .folder import (ATTENTION_MASK, INPUT_IDS, LOGITS, NUM_LOGITS_TO_KEEP, bind_constant_input, past_name,
                     present_name)


class SlotPool:
    def __init__(self, session, num_layers: int, kv_heads: int, head_dim: int, vocab_size: int,
                 slots: int, capacity: int, keep_input: bool = True):
        """`slots` sequences of up to `capacity` tokens each. `keep_input`: the graph takes
        num_logits_to_keep (format 2 folders); without it every position gets logits."""
        if slots < 1 or capacity < 2:
            raise ValueError(f"need slots >= 1 and capacity >= 2, got {slots} and {capacity}")
        self.session, self.num_layers = session, num_layers
        self.slots, self.capacity, self.vocab_size = int(slots), int(capacity), int(vocab_size)
        shape = (self.slots, kv_heads, self.capacity, head_dim)
        # np.zeros: the OS hands out zero pages lazily, so RSS grows only with the rows used.
        self.buffers = [np.zeros(shape, np.float32) for _ in range(2 * num_layers)]
        self.lengths = np.zeros(self.slots, np.int64)  # tokens cached per slot
        self._free = list(range(self.slots))
        self._keep = np.ones([1], np.int64) if keep_input else None
        self._bindings: dict = {}  # ("row", slot) or ("rows", B) -> (binding, logits buffer)

    # -- slots ------------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes reserved for the cache (all slots, keys and values)."""
        return sum(b.nbytes for b in self.buffers)

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

    def release(self, slot: int) -> None:
        """Give the slot back; its contents stay as garbage (never read: see module doc)."""
        if slot in self._free:
            raise ValueError(f"slot {slot} is already free")
        self.lengths[slot] = 0
        self._free.append(slot)

    # -- runs -------------------------------------------------------------------------------
    def _binding(self, key, rows: slice, logits_shape: tuple):
        """IO binding of the KV buffers' rows `rows` (a view, no copy), made once per key."""
        import onnxruntime as ort

        if key not in self._bindings:
            binding = self.session.io_binding()
            for i in range(self.num_layers):
                for j, kind in enumerate(("key", "value")):
                    value = ort.OrtValue.ortvalue_from_numpy(self.buffers[2 * i + j][rows])
                    binding.bind_ortvalue_input(past_name(i, kind), value)
                    binding.bind_ortvalue_output(present_name(i, kind), value)
            if self._keep is not None:
                bind_constant_input(binding, NUM_LOGITS_TO_KEEP, self._keep)
            self._bindings[key] = (binding, np.empty(logits_shape, np.float32))
        return self._bindings[key]

    def _run(self, binding, tokens: np.ndarray, mask: np.ndarray, logits: np.ndarray) -> np.ndarray:
        binding.bind_cpu_input(INPUT_IDS, np.ascontiguousarray(tokens, np.int64))
        binding.bind_cpu_input(ATTENTION_MASK, np.ascontiguousarray(mask))
        binding.bind_output(LOGITS, "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
        self.session.run_with_iobinding(binding)
        return logits

    def prefill(self, slot: int, ids) -> np.ndarray:
        """Append `ids` (one chunk of a prompt) to `slot`; the logits after its last token
        ([vocab], a view of a reused buffer: copy it to keep it)."""
        ids = np.asarray(ids, np.int64).reshape(1, -1)
        n, start = ids.shape[1], int(self.lengths[slot])
        if start + n > self.capacity:
            raise ValueError(f"{n} tokens do not fit slot {slot} ({self.capacity - start} left)")
        if self._keep is not None or n == 1:
            binding, logits = self._binding(("row", slot), slice(slot, slot + 1), (1, 1, self.vocab_size))
        else:  # a format-1 graph: logits for every position of the chunk
            binding, _ = self._binding(("row", slot), slice(slot, slot + 1), (1, 1, self.vocab_size))
            logits = np.empty((1, n, self.vocab_size), np.float32)
        self._run(binding, ids, np.ones((1, start + n), np.int64), logits)
        self.lengths[slot] = start + n
        return logits[0, -1]

    def decode(self, tokens: dict[int, int]) -> np.ndarray:
        """One token per decoding slot ({slot: token}) in one run; returns logits [B, vocab]
        with row = slot (padding rows hold junk). A view of a reused buffer."""
        rows = max(tokens) + 1
        binding, logits = self._binding(("rows", rows), slice(0, rows), (rows, 1, self.vocab_size))
        ids = np.zeros((rows, 1), np.int64)
        for slot, token in tokens.items():
            ids[slot, 0] = token
        if any(self.lengths[:rows] >= self.capacity):
            raise ValueError("a slot in the decode batch is full")
        # Right-padded mask: each row's length + 1 ones (padding rows too, see the module doc).
        ends = self.lengths[:rows] + 1
        mask = (np.arange(int(ends.max()))[None, :] < ends[:, None]).astype(np.int64)
        self._run(binding, ids, mask, logits)
        for slot in tokens:
            self.lengths[slot] += 1
        return logits[:, 0]
