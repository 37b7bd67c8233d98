"""The shipped demo checkpoint (models/shakespeare-bitnet): format, size, and logits parity.

Parity: transformers' BitNetForCausalLM on the packed checkpoint gives the same logits as our
training model's quantized forward (demo.model.DemoBitNet). Tolerance: max |diff| <= 1e-4 on
logits (measured: 0.0 -- the training model's inference path uses the same float ops in the same
order as transformers' eager code, so even the int8 rounding of activations agrees bit for bit;
any op-order difference would flip a few int8 roundings and show up as ~1e-2).
"""

import json
import os

import pytest
import torch

from demo import corpus, pack
from demo.model import DemoBitNet, DemoConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "models", "shakespeare-bitnet")
TOL = 1e-4


def load_hf(folder):
    from transformers import BitNetForCausalLM

    return BitNetForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                             attn_implementation="eager").eval()


def test_folder_files_and_size():
    names = set(os.listdir(MODEL))
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json", "README.md"} <= names
    total = sum(os.path.getsize(os.path.join(MODEL, n)) for n in names)
    assert total <= 10 * 1024 * 1024, total


def test_packed_format_like_2b4t():
    from safetensors import safe_open

    with open(os.path.join(MODEL, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["architectures"] == ["BitNetForCausalLM"] and cfg["model_type"] == "bitnet"
    assert cfg["hidden_act"] == "relu2" and cfg["tie_word_embeddings"] is True
    assert cfg["num_key_value_heads"] < cfg["num_attention_heads"]          # GQA
    assert cfg["quantization_config"]["quant_method"] == "bitnet"
    assert cfg["quantization_config"]["linear_class"] == "bitlinear"
    assert cfg["quantization_config"]["quantization_mode"] == "offline"
    with safe_open(os.path.join(MODEL, "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert "lm_head.weight" not in keys
        for i in range(cfg["num_hidden_layers"]):
            for proj in pack.PROJECTIONS:
                part = "self_attn" if proj in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
                name = f"model.layers.{i}.{part}.{proj}"
                w, s = f.get_tensor(name + ".weight"), f.get_tensor(name + ".weight_scale")
                assert w.dtype == torch.uint8 and s.dtype == torch.bfloat16 and s.shape == (1,)
                codes = torch.stack([(w >> (2 * k)) & 3 for k in range(4)])
                assert int(codes.max()) <= 2          # only -1, 0, +1


def test_pack_layout_matches_transformers():
    from transformers.integrations.bitnet import pack_weights, unpack_weights

    w = torch.randint(-1, 2, (24, 10), dtype=torch.int8)
    packed = pack.pack_checkpoint_weight(w)
    assert torch.equal(packed, pack_weights(w.clone().float()))
    unpack = getattr(unpack_weights, "__wrapped__", unpack_weights)
    assert torch.equal(unpack(packed, torch.float32), w.float())
    assert torch.equal(pack.unpack_checkpoint_weight(packed), w)


def test_packer_parity_training_model_vs_transformers(tmp_path):
    """Random float masters -> training model's quantized forward == transformers on the packed files."""
    torch.manual_seed(0)
    cfg = DemoConfig(vocab_size=4096, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                     num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=128)
    model = DemoBitNet(cfg, quantized=True).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.add_((0.2 if "norm" in n else 0.01) * torch.randn_like(p))
    pack.write_checkpoint(model, MODEL, str(tmp_path))
    hf = load_hf(str(tmp_path))
    ids = torch.randint(0, cfg.vocab_size, (2, 64))
    with torch.no_grad():
        diff = (model(ids) - hf(ids).logits).abs().max().item()
    assert diff <= TOL


@pytest.fixture(scope="module")
def shipped():
    return load_hf(MODEL), pack.load_packed(MODEL)


def test_shipped_loads_as_packed_bitlinear(shipped):
    from transformers.integrations.bitnet import BitLinear

    hf, _ = shipped
    q = hf.model.layers[0].self_attn.q_proj
    assert isinstance(q, BitLinear) and q.weight.dtype == torch.uint8
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()


def test_shipped_logits_match_training_model(shipped):
    from tokenizers import Tokenizer

    hf, ours = shipped
    tok = Tokenizer.from_file(os.path.join(MODEL, "tokenizer.json"))
    prompt = corpus.render([{"role": "user", "content": "What news, my lord? How fares the king?"}],
                           add_generation_prompt=True)
    ids = torch.tensor([tok.encode(prompt, add_special_tokens=False).ids])
    rand = torch.randint(0, hf.config.vocab_size, (2, 96), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for x in (ids, rand):
            diff = (ours(x) - hf(x).logits).abs().max().item()
            assert diff <= TOL, diff


def test_shipped_tensors_survive_unpack_and_repack():
    """The packer is the exact inverse of the loader on the shipped files (runs on a clean
    clone; that packing *your* training output reproduces them is
    `python bench/check_demo_checkpoint.py`, which needs python -m demo train's build/)."""
    from safetensors.torch import load_file

    shipped = load_file(os.path.join(MODEL, "model.safetensors"))
    again = pack.packed_state_dict(pack.load_packed(MODEL))
    assert set(again) == set(shipped)
    for k in again:
        assert again[k].dtype == shipped[k].dtype and torch.equal(again[k], shipped[k]), k


def test_straight_through_gradients_reach_float_masters():
    torch.manual_seed(0)
    cfg = DemoConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                     num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16)
    model = DemoBitNet(cfg, quantized=True)
    ids = torch.randint(0, 64, (2, 16))
    logits = model(ids)
    with torch.no_grad():
        ref = model(ids)
    assert (logits - ref).abs().max().item() < 1e-4   # training and inference paths agree
    logits.logsumexp(-1).mean().backward()
    g = model.model.layers[0].mlp.up_proj.weight.grad
    assert g is not None and g.abs().sum() > 0
