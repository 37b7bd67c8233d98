"""The lm_head choices of the export: the shared int8 table (bitnet.MatMulI8), the exact head,
the stock 8-bit head, how `--lm-head auto` picks, and the CLI's accepted values."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import custom_ops
from export import export_checkpoint
from export.lm_head_int8 import quantize_shared_table
from export.variants import AUTO_INT8_MIN_ELEMENTS, LM_HEAD_CHOICES, head_kind, resolve_lm_head
from tests.checkpoints import load_reference, write_tiny_checkpoint
from tests.export_harness import SharedBuffer, load_config, make_session, reference_logits

PROMPT = [0, 5, 17, 33, 100, 7, 250]
STEPS = [12, 40, 99]


def test_auto_picks_int8_only_for_big_heads():
    assert resolve_lm_head("auto", 128256, 2560) == "int8"    # 2B4T: 656 MB in fp16
    assert resolve_lm_head("auto", 4096, 192) == "native"     # the demo model: 3 MB
    assert resolve_lm_head("auto", AUTO_INT8_MIN_ELEMENTS, 1) == "int8"
    assert resolve_lm_head("auto", AUTO_INT8_MIN_ELEMENTS - 1, 1) == "native"
    assert resolve_lm_head("fp16", 128256, 2560) == "native"
    assert [resolve_lm_head(c, 10, 10) for c in ("int8", "native", "nbits8")] == ["int8", "native", "nbits8"]
    with pytest.raises(ValueError, match="--lm-head must be one of"):
        resolve_lm_head("int4", 10, 10)


def test_head_kind_per_variant():
    assert [head_kind(v, "int8") for v in ("ternary", "int2", "int4", "fp32")] == ["i8", "nbits8", "nbits8", "nbits8"]
    assert {head_kind(v, "native") for v in ("ternary", "int2")} == {"native"}
    assert {head_kind(v, "nbits8") for v in ("ternary", "int2")} == {"nbits8"}


def test_cli_keeps_the_old_values(tmp_path):
    from export.__main__ import main

    for value in ("native", "int8"):  # the values before `auto`/`fp16`/`nbits8` existed
        assert value in LM_HEAD_CHOICES
    with pytest.raises(SystemExit):
        main(["x", "--out", str(tmp_path / "o"), "--lm-head", "int3"])


def test_shared_table_reconstructs_rows_with_outlier_channels():
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((300, 64)) * np.exp(rng.normal(0, 0.5, (300, 1)))).astype(np.float32)
    w[:, 5] *= 20  # an outlier channel
    codes, rows, cols = quantize_shared_table(w)
    assert codes.dtype == np.int8 and rows.shape == (300,) and cols.shape == (64,)
    def row_errors(approx):
        return np.linalg.norm(approx - w, axis=1) / np.linalg.norm(w, axis=1)

    shared = row_errors(codes * rows[:, None] * cols[None])
    per_row_codes, per_row_scales = custom_ops.quantize_head_table(w)
    per_row = row_errors(per_row_codes * per_row_scales[:, None])  # the outlier column sets every row's step
    assert shared.max() < 0.75 * per_row.max() and np.median(shared) < 0.5 * np.median(per_row)
    assert shared.max() < 2e-2


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    base = tmp_path_factory.mktemp("head")
    ckpt = write_tiny_checkpoint(base / "ckpt", fmt="bitlinear", tied=True, hidden_size=128,
                                 num_attention_heads=4, num_key_value_heads=2, intermediate_size=96)
    out = export_checkpoint(str(ckpt), str(base / "m"), ["ternary", "int2"], lm_head="int8", progress=lambda m: None)
    return {"ckpt": ckpt, "out": out, "cfg": load_config(out),
            "expected": reference_logits(load_reference(ckpt), PROMPT, STEPS)}


def test_one_int8_table_for_embedding_and_head(tied):
    model = onnx.load(f"{tied['out']}/model.onnx", load_external_data=False)
    inits = {i.name: i for i in model.graph.initializer}
    head = [n for n in model.graph.node if n.name == "lm_head"][0]
    embed = [n for n in model.graph.node if n.name == "model.embed_tokens"][0]
    assert head.op_type == "MatMulI8" and head.domain == "bitnet"
    assert head.input[1] == embed.input[0] == "model.embed_tokens.weight_i8"
    assert inits[head.input[1]].data_type == onnx.TensorProto.INT8
    vocab, hidden = tied["cfg"]["vocab_size"], tied["cfg"]["hidden_size"]
    tables = [i for i in inits.values() if list(i.dims) == [vocab, hidden]]
    assert len(tables) == 1  # no fp16/fp32 copy of the table
    assert tied["cfg"]["lm_head"] == "int8"
    assert tied["cfg"]["lm_head_kinds"] == {"ternary": "i8", "int2": "nbits8"}
    int2 = onnx.load(f"{tied['out']}/model.int2.onnx", load_external_data=False)
    assert [n.op_type for n in int2.graph.node if n.name == "lm_head"] == ["MatMulNBits"]


def test_int8_heads_close_to_transformers(tied):
    """Lossy by design: bound 2e-2 x max |logit| (measured ~6e-3, export/README.md)."""
    expected = tied["expected"]
    scale = max(float(np.abs(e).max()) for e in expected)
    for variant in ("ternary", "int2"):
        runner = SharedBuffer(make_session(tied["out"], variant), tied["cfg"])
        got = [runner.step(PROMPT)] + [runner.step([t]) for t in STEPS]
        diff = max(float(np.abs(g - e).max()) for g, e in zip(got, expected))
        assert diff <= 2e-2 * scale, (variant, diff / scale)


def test_auto_on_a_small_model_is_the_exact_head(tied, tmp_path):
    out = export_checkpoint(str(tied["ckpt"]), str(tmp_path / "auto"), ["ternary"], progress=lambda m: None)
    cfg = load_config(out)
    assert cfg["lm_head"] == "native" and cfg["lm_head_kinds"] == {"ternary": "native"}
    model = onnx.load(f"{out}/model.onnx", load_external_data=False)
    assert [n.op_type for n in model.graph.node if n.name == "lm_head"] == ["MatMulF16"]
