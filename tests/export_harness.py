"""Drive exported models with onnxruntime in both KV-cache modes, and the reference.

- GrowingCache: Optimum-style; past length = tokens so far, present = past + new tokens.
- SharedBuffer: the runtime's mode; KV buffers of max length L preallocated once and the SAME
  OrtValue bound as past_key_values.i.* and present.i.* (GroupQueryAttention's shared-buffer
  mode); attention_mask covers the tokens so far including the new ones.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from runtime.folder import bind_constant_input, needs_custom_ops, read_config, variant_path
from runtime.kv_cache import cache_dtype
from runtime.session import open_session


ALL_POSITIONS = np.zeros([1], np.int64)  # num_logits_to_keep = 0: logits for every position


def export_tiny_case(base, name: str, case, variants, **export_options):
    """Write the tiny checkpoint of a test case `(fmt, tied, extra)` under base (seeded by the
    case's name) and export `variants` of it; returns (checkpoint folder, exported folder)."""
    from export import export_checkpoint
    from tests.checkpoints import write_tiny_checkpoint

    fmt, tied, extra = case
    ckpt = write_tiny_checkpoint(base / "ckpt", fmt=fmt, tied=tied, seed=len(name), **extra)
    return ckpt, export_checkpoint(str(ckpt), str(base / "onnx"), variants, progress=lambda m: None, **export_options)


def load_config(folder) -> dict:
    return read_config(folder)


def make_session(folder, variant: str = "ternary") -> ort.InferenceSession:
    """The variant's session, opened exactly as the engine opens it (one thread)."""
    return open_session(variant_path(folder, variant), threads=1, custom_ops=needs_custom_ops(variant))


class GrowingCache:
    def __init__(self, session, cfg, feed_num_logits_to_keep: bool = True):
        """feed_num_logits_to_keep=False: only input_ids, attention_mask and the past, as an
        Optimum-style loop written for other decoders feeds them (the graph's default applies)."""
        self.session, self.cfg = session, cfg
        self.extra = {"num_logits_to_keep": ALL_POSITIONS} if feed_num_logits_to_keep else {}
        shape = (1, cfg["num_key_value_heads"], 0, cfg["head_dim"])
        self.past = {}
        for i in range(cfg["num_layers"]):
            for kind in ("key", "value"):
                self.past[f"past_key_values.{i}.{kind}"] = np.zeros(shape, cache_dtype(session))
        self.length = 0
        self.output_names = [o.name for o in session.get_outputs()]

    def step(self, ids) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)
        self.length += ids.shape[1]
        feed = {"input_ids": ids, "attention_mask": np.ones((1, self.length), np.int64),
                **self.extra, **self.past}
        outputs = dict(zip(self.output_names, self.session.run(None, feed)))
        for name in self.past:
            present = outputs[name.replace("past_key_values", "present")]
            assert present.shape[2] == self.length, present.shape
            self.past[name] = present
        return outputs["logits"][0]


class SharedBuffer:
    def __init__(self, session, cfg, max_length: int = 64):
        self.session, self.cfg = session, cfg
        shape = (1, cfg["num_key_value_heads"], max_length, cfg["head_dim"])
        self.buffers = {}
        for i in range(cfg["num_layers"]):
            for kind in ("key", "value"):
                self.buffers[(i, kind)] = ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, cache_dtype(session)))
        self.length = 0

    def step(self, ids) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)
        self.length += ids.shape[1]
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("attention_mask", np.ones((1, self.length), np.int64))
        bind_constant_input(binding, "num_logits_to_keep", ALL_POSITIONS)
        binding.bind_output("logits")  # first, so it is output 0 below
        for (i, kind), value in self.buffers.items():
            binding.bind_ortvalue_input(f"past_key_values.{i}.{kind}", value)
            binding.bind_ortvalue_output(f"present.{i}.{kind}", value)
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0][0]


def greedy(runner, prompt, new_tokens: int) -> list[int]:
    logits = runner.step(prompt)
    out = []
    for _ in range(new_tokens):
        token = int(np.argmax(logits[-1]))
        out.append(token)
        logits = runner.step([token])
    return out


def reference_logits(model, prompt, steps) -> list[np.ndarray]:
    """transformers logits for the prompt, then one step per token of `steps` with its cache."""
    import torch

    with torch.no_grad():
        out = model(torch.tensor([prompt]), use_cache=True)
        results = [out.logits[0].numpy()]
        cache = out.past_key_values if hasattr(out, "past_key_values") else out.cache
        for token in steps:
            out = model(torch.tensor([[token]]), cache=cache, use_cache=True)
            cache = out.past_key_values if hasattr(out, "past_key_values") else out.cache
            results.append(out.logits[0].numpy())
    return results


def reference_greedy(model, prompt, new_tokens: int) -> list[int]:
    import torch

    with torch.no_grad():
        ids = torch.tensor([prompt])
        # An explicit mask: generate() would otherwise mask every token equal to pad_token_id.
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             do_sample=False, min_new_tokens=new_tokens, eos_token_id=None,
                             pad_token_id=-1)
    return out[0, len(prompt):].tolist()


def assert_logits_close(runner, prompt, steps, expected, tolerance: float) -> None:
    """Feed `prompt`, then each of `steps` one token at a time; each call's logits must be
    within `tolerance` (absolute) of the reference's `expected` ones, call by call."""
    got = [runner.step(prompt)] + [runner.step([t]) for t in steps]
    for i, (g, e) in enumerate(zip(got, expected)):
        assert g.shape == e.shape
        diff = float(np.abs(g - e).max())
        assert diff <= tolerance, f"{type(runner).__name__} call {i}: max diff {diff:.3g} > {tolerance:.3g}"
