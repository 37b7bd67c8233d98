"""Unit checks of the exporter's building blocks against transformers' own functions."""

from __future__ import annotations

import json

import numpy as np
import pytest

from export import ternary
from export.errors import ExportError
from export.safetensors_reader import bf16_bits_to_float32, read_float32, read_header
from runtime.folder import CONFIG_NAME


@pytest.mark.parametrize("shape", [(4, 3), (64, 17), (640, 2560 // 16)])
def test_unpack_matches_transformers(shape):
    from transformers.integrations.bitnet import pack_weights, unpack_weights
    import torch

    rng = np.random.default_rng(1)
    w = rng.integers(-1, 2, size=shape).astype(np.int8)
    packed = pack_weights(torch.tensor(w, dtype=torch.int8).clone())
    np.testing.assert_array_equal(ternary.pack_rows(w), packed.numpy())
    np.testing.assert_array_equal(ternary.unpack_rows(packed.numpy()),
                                  unpack_weights(packed, dtype=torch.float32).numpy().astype(np.int8))


def test_invalid_code_is_refused():
    with pytest.raises(ExportError, match="code 3"):
        ternary.unpack_rows(np.full((2, 2), 0xFF, np.uint8))


def test_absmean_matches_transformers_weight_quant():
    import torch
    from transformers.integrations.bitnet import WeightQuant

    rng = np.random.default_rng(2)
    weight = (0.03 * rng.standard_normal((96, 80))).astype(np.float32)
    c, w = ternary.absmean_quantize(weight)
    expected = WeightQuant.forward(None, torch.tensor(weight)).numpy()  # = w / c in float32
    np.testing.assert_array_equal(w.astype(np.float32) / c, expected)
    assert set(np.unique(w)) <= {-1, 0, 1}


def test_float_ternary_must_be_ternary():
    np.testing.assert_array_equal(ternary.float_to_ternary(np.array([[1.0, -1.0, 0.0]]), "x"), [[1, -1, 0]])
    with pytest.raises(ExportError, match="only -1, 0 and 1"):
        ternary.float_to_ternary(np.array([[0.5]]), "x")


def test_bf16_reads_exactly(tmp_path):
    import torch
    from safetensors.torch import save_file

    values = torch.tensor([[1.5, -2.25, 3.0e38, 1e-30]], dtype=torch.bfloat16)
    save_file({"t": values}, str(tmp_path / "a.safetensors"))
    info = read_header(str(tmp_path / "a.safetensors"))["t"]
    np.testing.assert_array_equal(read_float32(info), values.float().numpy())
    assert bf16_bits_to_float32(np.array([0x3FC0], np.uint16))[0] == 1.5


def test_embedding_outside_fp16_range_stays_fp32(tmp_path):
    """bf16 values beyond fp16's 65504 would overflow: the export keeps fp32 (and a Gemm head)."""
    import onnx
    from safetensors.torch import load_file, save_file

    from export import export_checkpoint
    from tests.checkpoints import write_tiny_checkpoint

    ckpt = write_tiny_checkpoint(tmp_path / "ckpt", fmt="bitlinear", tied=True)
    tensors = load_file(str(ckpt / "model.safetensors"))
    tensors["model.embed_tokens.weight"][3, 5] = 1e6
    save_file(tensors, str(ckpt / "model.safetensors"))
    out = export_checkpoint(str(ckpt), str(tmp_path / "m"), ["ternary"], progress=lambda m: None)
    assert json.loads((tmp_path / "m" / CONFIG_NAME).read_text())["embedding_dtype"] == "float32"
    model = onnx.load(f"{out}/model.onnx", load_external_data=False)
    assert [n.op_type for n in model.graph.node if n.name == "lm_head"] == ["Gemm"]


def test_embedding_dtype_names_the_table_each_variant_gathers_from(tmp_path):
    """A tied int8 head shares its int8 table with the ternary embedding: the config says int8
    there (not the checkpoint's float16), and float32 for the baselines, as the graphs hold."""
    import onnx

    from export import export_checkpoint
    from tests.checkpoints import write_tiny_checkpoint

    ckpt = write_tiny_checkpoint(tmp_path / "ckpt", fmt="bitlinear", tied=True)
    out = export_checkpoint(str(ckpt), str(tmp_path / "m"), ["ternary", "int2"], lm_head="int8",
                            progress=lambda m: None)
    cfg = json.loads((tmp_path / "m" / CONFIG_NAME).read_text())
    assert cfg["embedding_dtypes"] == {"ternary": "int8", "int2": "float32"}
    assert cfg["embedding_dtype"] == "int8"
    for variant, file_name in cfg["variants"].items():
        model = onnx.load(f"{out}/{file_name}", load_external_data=False)
        gather = next(n for n in model.graph.node if n.name == "model.embed_tokens")
        table = next(t for t in model.graph.initializer if t.name == gather.input[0])
        assert onnx.helper.tensor_dtype_to_np_dtype(table.data_type).name == cfg["embedding_dtypes"][variant]
