"""The KV cache of one generation: its buffers, its attention mask and its IO binding.

One float32 buffer [batch, kv_heads, capacity, head_dim] per layer for keys and one for values,
preallocated and bound (IO binding) as BOTH the graph's `past_key_values.i.*` input and its
`present.i.*` output: GroupQueryAttention writes the new keys/values in place at each row's
current length and reads [0, length + new), so a step copies no cache. `lengths[b]` counts the
tokens cached for row b; the attention mask is ones for those (right padding, as GQA's
seqlens_k expects), so rows of different lengths fit the same buffers (batched decode).
"""

from __future__ import annotations

import numpy as np

from .folder import ATTENTION_MASK, INPUT_IDS, LOGITS, bind_constant_input, past_name, present_name


class KVCache:
    def __init__(self, session, num_layers: int, kv_heads: int, head_dim: int, capacity: int,
                 vocab_size: int, batch: int = 1, extra_inputs: dict | None = None):
        """Buffers for `batch` rows of up to `capacity` tokens. `extra_inputs` (name -> array)
        are bound once, e.g. num_logits_to_keep."""
        import onnxruntime as ort

        self.session, self.capacity, self.batch = session, int(capacity), int(batch)
        shape = (self.batch, kv_heads, self.capacity, head_dim)
        self.buffers = [np.zeros(shape, np.float32) for _ in range(2 * num_layers)]
        self.lengths = np.zeros(self.batch, np.int64)
        self._mask = np.zeros((self.batch, self.capacity), np.int64)
        # One row of logits per sequence: what a decode step (and a last-position prefill) returns.
        self.step_logits = np.empty((self.batch, 1, vocab_size), np.float32)
        self.binding = session.io_binding()
        for i in range(num_layers):
            for j, kind in enumerate(("key", "value")):
                value = ort.OrtValue.ortvalue_from_numpy(self.buffers[2 * i + j])
                self.binding.bind_ortvalue_input(past_name(i, kind), value)
                self.binding.bind_ortvalue_output(present_name(i, kind), value)
        self._extra = {name: np.asarray(value) for name, value in (extra_inputs or {}).items()}
        for name, value in self._extra.items():
            bind_constant_input(self.binding, name, value)

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buffers)

    def room(self) -> int:
        """Tokens that still fit (the fullest row)."""
        return self.capacity - int(self.lengths.max())

    def forward(self, tokens: np.ndarray, logits: np.ndarray) -> np.ndarray:
        """Run the model on `tokens` [batch, n] at positions lengths..lengths+n, appending them
        to the cache; the model writes its logits into `logits` (returned)."""
        tokens = np.ascontiguousarray(tokens, dtype=np.int64)
        n = tokens.shape[1]
        if n > self.room():
            raise ValueError(f"{n} tokens do not fit the KV cache ({self.room()} of {self.capacity} left)")
        new_lengths = self.lengths + n
        for row, length in enumerate(new_lengths):
            self._mask[row, self.lengths[row]:length] = 1
        total = int(new_lengths.max())
        self.binding.bind_cpu_input(INPUT_IDS, tokens)
        self.binding.bind_cpu_input(ATTENTION_MASK, np.ascontiguousarray(self._mask[:, :total]))
        self.binding.bind_output(LOGITS, "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
        self.session.run_with_iobinding(self.binding)
        self.lengths = new_lengths
        return logits
