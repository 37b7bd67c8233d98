"""How the ternary variant's attention treats a batch of sequences of different lengths,
proven on the exported demo model (models/shakespeare-bitnet) with raw session runs.

The ternary variant runs bitnet.GroupQueryAttention (custom_ops/src/attention.cc), which keeps
the contract of ONNX Runtime's com.microsoft.GroupQueryAttention (the stock-ORT baselines still
use that one). What the export feeds it (export/graph.py): seqlens_k[b] = sum(attention_mask[b])
- 1 and total_sequence_length = attention_mask.shape[1]; the KV buffers [B, kv_heads, capacity,
head_dim] are bound as both past and present (shared buffer). Per row b it takes the rotary
positions of the new tokens from seqlens_k[b], writes their keys/values at
[seqlens_k[b] - S + 1, seqlens_k[b] + 1) of row b's buffer, and attends over keys
[0, seqlens_k[b] + 1) only. The tests below show the consequences the batcher relies on:

- a [B, 1] decode step gives every row bit-identical logits to running that row alone on the
  same cache contents, whatever the other rows' lengths and the row's position in the batch;
- only the COUNT of ones in a mask row matters (positions are not read): rows are right-padded
  by construction, and left padding is silently misread (it is not supported);
- total_sequence_length (the mask's width) may be anything from the longest row to the
  capacity without changing a logit;
- cache contents beyond a row's length (NaN garbage from a previous occupant) are never read;
- an idle slot can ride along as a padding row (mask sum 1: writes only its own position 0);
- a step with S > 1 new tokens per row on top of a past runs in a batch too (ORT's kernel
  refuses it), each row getting the logits it gets alone;
- a prompt prefilled in chunks of any size, one token included, gives bit-identical logits
  (one summation order for every attention path);
- the kernels compute each row the same way for every batch size M = 1..9 (BitLinear and the
  head), end to end, for both heads of the ternary variant.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from export import export_checkpoint
from runtime.folder import (ATTENTION_MASK, INPUT_IDS, LOGITS, NUM_LOGITS_TO_KEEP, bind_constant_input, past_name,
                            present_name, variant_path)
from runtime.session import open_session
from tests.export_harness import load_config, make_session

DEMO = Path(__file__).resolve().parent.parent / "models" / "shakespeare-bitnet"
CAPACITY = 64
LAST = np.ones([1], np.int64)  # num_logits_to_keep = 1


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    base = tmp_path_factory.mktemp("batch_attention")
    native = export_checkpoint(str(DEMO), str(base / "native"), ("ternary",), progress=lambda m: None)
    int8 = export_checkpoint(str(DEMO), str(base / "int8"), ("ternary",), lm_head="int8",
                             progress=lambda m: None)
    cfg = load_config(native)
    sessions = {"native": make_session(native), "int8": make_session(int8)}
    # Two intra-op threads: the kernels split rows and columns across the pool.
    sessions.update({(head, 2): open_session(variant_path(folder, "ternary"), threads=2, custom_ops=True)
                     for head, folder in (("native", native), ("int8", int8))})
    return {"cfg": cfg, "sessions": sessions}


def _prompts(cfg, count: int, seed: int = 0) -> list[list[int]]:
    """`count` prompts of different lengths (3 to 3 + 4 * count tokens) of random ids."""
    rng = np.random.default_rng(seed)
    return [rng.integers(2, cfg["vocab_size"], size=3 + 4 * i + int(rng.integers(0, 3))).tolist()
            for i in range(count)]


class Rows:
    """KV buffers for `batch` rows, driven by raw session runs with an explicit mask."""

    def __init__(self, session, cfg, batch: int, capacity: int = CAPACITY, fill: float = 0.0):
        self.session, self.cfg = session, cfg
        shape = (batch, cfg["num_key_value_heads"], capacity, cfg["head_dim"])
        self.buffers = [np.full(shape, fill, np.float32) for _ in range(2 * cfg["num_layers"])]
        self.lengths = [0] * batch

    def copy_row(self, row: int, other: "Rows", other_row: int = 0) -> None:
        """Row `row` takes the cache contents (up to its length) of other's row."""
        n = other.lengths[other_row]
        for mine, theirs in zip(self.buffers, other.buffers):
            mine[row, :, :n] = theirs[other_row, :, :n]
        self.lengths[row] = n

    def run(self, tokens, mask: np.ndarray | None = None, advance: bool = True) -> np.ndarray:
        """One run on tokens [batch, n]; the default mask is right-padded ones for each row's
        length + n, as wide as the longest row. Returns logits [batch, 1, vocab]."""
        tokens = np.asarray(tokens, np.int64)
        n = tokens.shape[1]
        if mask is None:
            total = max(self.lengths) + n
            mask = np.zeros((len(self.lengths), total), np.int64)
            for row, length in enumerate(self.lengths):
                mask[row, :length + n] = 1
        binding = self.session.io_binding()
        binding.bind_cpu_input(INPUT_IDS, tokens)
        binding.bind_cpu_input(ATTENTION_MASK, np.ascontiguousarray(mask, np.int64))
        bind_constant_input(binding, NUM_LOGITS_TO_KEEP, LAST)
        binding.bind_output(LOGITS)
        for i in range(self.cfg["num_layers"]):
            for j, kind in enumerate(("key", "value")):
                value = ort.OrtValue.ortvalue_from_numpy(self.buffers[2 * i + j])
                binding.bind_ortvalue_input(past_name(i, kind), value)
                binding.bind_ortvalue_output(present_name(i, kind), value)
        self.session.run_with_iobinding(binding)
        if advance:
            self.lengths = [length + n for length in self.lengths]
        return binding.copy_outputs_to_cpu()[0]


def _solo(session, cfg, prompt) -> Rows:
    """The prompt prefilled alone; `.next_logits` holds the logits after its last token."""
    rows = Rows(session, cfg, 1)
    rows.next_logits = rows.run([prompt])[0, -1]
    return rows


def _batch_of(session, cfg, solos: list[Rows], fill: float = 0.0) -> Rows:
    rows = Rows(session, cfg, len(solos), fill=fill)
    for r, solo in enumerate(solos):
        rows.copy_row(r, solo)
    return rows


def _decode_alone(solo: Rows, token: int) -> np.ndarray:
    return solo.run([[token]])[0, -1]


# ---- one decode step: batched rows equal solo rows, bit for bit ------------------------------

@pytest.mark.parametrize("order", [(0, 1), (1, 0)])
def test_two_rows_of_different_lengths_equal_each_alone(demo, order):
    cfg, session = demo["cfg"], demo["sessions"]["native"]
    prompts = [_prompts(cfg, 5)[0], _prompts(cfg, 5)[4]]  # 3-5 and 19-21 tokens
    assert len(prompts[0]) != len(prompts[1])
    solos = [_solo(session, cfg, p) for p in prompts]
    tokens = [7, 11]
    batch = _batch_of(session, cfg, [solos[i] for i in order])
    got = batch.run([[tokens[i]] for i in order])
    for r, i in enumerate(order):
        expected = _decode_alone(solos[i], tokens[i])
        assert np.array_equal(got[r, -1], expected), (r, i)
        # The step wrote the row's new key/value where the solo run wrote them.
        n = solos[i].lengths[0]
        assert batch.lengths[r] == n
        for mine, theirs in zip(batch.buffers, solos[i].buffers):
            assert np.array_equal(mine[r, :, :n], theirs[0, :, :n])


def test_rows_stay_equal_over_many_steps_and_late_joins(demo):
    """A runs alone for 5 steps, then B joins at a different position; 12 steps together:
    every step's logits and greedy tokens equal each sequence run alone."""
    cfg, session = demo["cfg"], demo["sessions"]["native"]
    pa, pb = _prompts(cfg, 4)[3], _prompts(cfg, 4)[1]
    alone = {}
    for name, prompt in (("a", pa), ("b", pb)):
        solo = _solo(session, cfg, prompt)
        logits = solo.next_logits
        trace = []
        for _ in range(17):
            token = int(np.argmax(logits))
            trace.append((token, logits.copy()))
            logits = solo.run([[token]])[0, -1]
        alone[name] = trace

    a = _solo(session, cfg, pa)
    logits_a = a.next_logits
    for step in range(5):
        token = int(np.argmax(logits_a))
        assert token == alone["a"][step][0]
        logits_a = a.run([[token]])[0, -1]
    b = _solo(session, cfg, pb)
    logits_b = b.next_logits
    batch = _batch_of(session, cfg, [a, b])
    for step in range(12):
        ta, tb = int(np.argmax(logits_a)), int(np.argmax(logits_b))
        assert np.array_equal(logits_a, alone["a"][5 + step][1]), step
        assert np.array_equal(logits_b, alone["b"][step][1]), step
        out = batch.run([[ta], [tb]])
        logits_a, logits_b = out[0, -1].copy(), out[1, -1].copy()


# ---- the mask: only its row sums and its width reach GQA --------------------------------------

def test_only_the_count_of_ones_in_a_mask_row_matters(demo):
    """Left padding ([0, 0, 1, 1, 1]) is read as right padding: GQA sees seqlens_k only."""
    cfg, session = demo["cfg"], demo["sessions"]["native"]
    short, long_ = _prompts(cfg, 4)[0], _prompts(cfg, 4)[3]
    solos = [_solo(session, cfg, p) for p in (short, long_)]
    right = _batch_of(session, cfg, solos)
    left = _batch_of(session, cfg, solos)
    total = max(right.lengths) + 1
    mask = np.zeros((2, total), np.int64)
    for r, length in enumerate(left.lengths):
        mask[r, total - length - 1:] = 1  # the same count, at the other end
    assert not np.array_equal(mask[0], np.sort(mask[0])[::-1])  # really left-padded
    assert np.array_equal(left.run([[5], [6]], mask=mask), right.run([[5], [6]]))


@pytest.mark.parametrize("width", ["longest", "capacity"])
def test_total_sequence_length_is_only_a_bound(demo, width):
    cfg, session = demo["cfg"], demo["sessions"]["native"]
    prompts = _prompts(cfg, 3)
    solos = [_solo(session, cfg, p) for p in prompts]
    batch = _batch_of(session, cfg, solos)  # copies the caches before the solo steps below
    expected = [_decode_alone(s, 9) for s in solos]
    total = max(batch.lengths) + 1 if width == "longest" else CAPACITY
    mask = np.zeros((3, total), np.int64)
    for r, length in enumerate(batch.lengths):
        mask[r, :length + 1] = 1
    got = batch.run([[9]] * 3, mask=mask)
    for r in range(3):
        assert np.array_equal(got[r, -1], expected[r])


# ---- what a slot may hold: garbage beyond the length, an idle padding row ----------------------

def test_garbage_beyond_a_rows_length_is_never_read(demo):
    """Rows whose buffers are NaN beyond their length (a previous occupant's leftovers, or
    never written) give the same logits as clean ones."""
    cfg, session = demo["cfg"], demo["sessions"]["native"]
    prompts = _prompts(cfg, 3)
    solos = [_solo(session, cfg, p) for p in prompts]
    dirty = _batch_of(session, cfg, solos, fill=np.nan)
    expected = [_decode_alone(s, 13) for s in solos]
    got = dirty.run([[13]] * 3)
    assert np.isfinite(got).all()
    for r in range(3):
        assert np.array_equal(got[r, -1], expected[r])


def test_an_idle_padding_row_changes_nothing(demo):
    """Batch [A, idle, B]: the idle row (mask sum 1, garbage buffers) runs a dummy token at its
    position 0; A and B equal their solo runs and its slot is written at position 0 only."""
    cfg, session = demo["cfg"], demo["sessions"]["native"]
    pa, pb = _prompts(cfg, 3)[1], _prompts(cfg, 3)[2]
    solos = [_solo(session, cfg, p) for p in (pa, pb)]
    batch = Rows(session, cfg, 3, fill=np.nan)
    batch.copy_row(0, solos[0])
    batch.copy_row(2, solos[1])
    expected = [_decode_alone(s, 21) for s in solos]
    batch.lengths[1] = 0  # idle: its one dummy token lands at position 0
    got = batch.run([[21], [0], [21]])
    assert np.array_equal(got[0, -1], expected[0])
    assert np.array_equal(got[2, -1], expected[1])
    for buffer in batch.buffers:
        assert np.isfinite(buffer[1, :, 0]).all()
        assert np.isnan(buffer[1, :, 1:]).all()


def test_prefill_with_a_past_runs_in_a_batch(demo):
    """S > 1 new tokens on top of a cache, for rows of different lengths in one run: each row
    gets the bits it gets alone."""
    cfg, session = demo["cfg"], demo["sessions"]["native"]
    solos = [_solo(session, cfg, p) for p in _prompts(cfg, 2)]
    batch = _batch_of(session, cfg, solos)
    got = batch.run([[1, 2, 3], [4, 5, 6]])
    assert np.array_equal(got[0, -1], solos[0].run([[1, 2, 3]])[0, -1])
    assert np.array_equal(got[1, -1], solos[1].run([[4, 5, 6]])[0, -1])


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 16, 64])
def test_prefill_chunks_of_any_size_agree(demo, chunk):
    cfg, session = demo["cfg"], demo["sessions"]["native"]
    prompt = np.random.default_rng(5).integers(2, cfg["vocab_size"], size=50).tolist()
    whole = _solo(session, cfg, prompt).next_logits
    rows = Rows(session, cfg, 1)
    for start in range(0, len(prompt), chunk):
        logits = rows.run([prompt[start:start + chunk]])[0, -1]
    assert np.array_equal(logits, whole)


# ---- kernels: every row computed the same way for every M ----------------------------------

@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("head", ["native", "int8"])
def test_decode_rows_are_batch_invariant_for_m_1_to_9(demo, head, threads):
    """Nine sequences of different lengths, decoded 3 steps in batches of every size
    M = 1..9 (rows in rotated orders): each row's logits equal its solo run's, bit for bit,
    on one and on two intra-op threads."""
    cfg = demo["cfg"]
    session = demo["sessions"][head] if threads == 1 else demo["sessions"][(head, threads)]
    prompts = _prompts(cfg, 9, seed=1)
    expected = []
    for p in prompts:
        solo = _solo(session, cfg, p)
        steps, token = [], int(np.argmax(solo.next_logits))
        for _ in range(3):
            logits = solo.run([[token]])[0, -1]
            steps.append(logits)
            token = int(np.argmax(logits))
        expected.append(steps)
    for m in range(1, 10):
        members = [(m + k) % 9 for k in range(m)]  # a different subset and order per M
        solos = [_solo(session, cfg, prompts[i]) for i in members]
        batch = _batch_of(session, cfg, solos)
        tokens = [int(np.argmax(s.next_logits)) for s in solos]
        for step in range(3):
            out = batch.run([[t] for t in tokens])
            for r, i in enumerate(members):
                assert np.array_equal(out[r, -1], expected[i][step]), (m, r, i, step)
            tokens = [int(np.argmax(out[r, -1])) for r in range(m)]


# ---- the same at the widths of BitNet b1.58 2B4T ----------------------------------------------

WIDE = dict(hidden_size=2560, intermediate_size=6912, num_hidden_layers=1, num_attention_heads=20,
            num_key_value_heads=5, vocab_size=20000, max_position_embeddings=256)


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """One random layer at 2B4T's widths (K = 2560 and 6912; a tied head of 20000 rows: several
    4096-row slices and a tail): the kernels' blocking over K and N is the real model's, unlike
    the demo's (2B4T's head has 128256 rows; fewer keep the test quick)."""
    from tests.checkpoints import write_tiny_checkpoint

    base = tmp_path_factory.mktemp("batch_wide")
    ckpt = write_tiny_checkpoint(base / "ckpt", tied=True, seed=3, **WIDE)
    folders = {head: export_checkpoint(str(ckpt), str(base / head), ("ternary",), lm_head=head,
                                       progress=lambda m: None) for head in ("native", "int8")}
    return {"cfg": load_config(folders["native"]), "folders": folders}


@pytest.mark.parametrize("head", ["native", "int8"])
def test_decode_rows_are_batch_invariant_at_2b4t_widths(wide, head):
    """Sixteen sequences; batches of M = 1..9 and 16 on two threads: every row's logits equal
    its solo run's, bit for bit."""
    cfg = wide["cfg"]
    session = open_session(variant_path(wide["folders"][head], "ternary"), threads=2, custom_ops=True)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, WIDE["vocab_size"], size=3 + 3 * i).tolist() for i in range(16)]
    expected = []
    for p in prompts:
        solo = _solo(session, cfg, p)
        expected.append(solo.run([[int(np.argmax(solo.next_logits))]])[0, -1])
    for m in list(range(1, 10)) + [16]:
        members = [(m + k) % 16 for k in range(m)]
        solos = [_solo(session, cfg, prompts[i]) for i in members]
        out = _batch_of(session, cfg, solos).run([[int(np.argmax(s.next_logits))] for s in solos])
        for r, i in enumerate(members):
            assert np.array_equal(out[r, -1], expected[i]), (m, r, i, float(np.abs(out[r, -1] - expected[i]).max()))
