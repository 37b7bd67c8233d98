"""Bad checkpoints: one clear error line, non-zero exit, no traceback, no output folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from export import ExportError, export_checkpoint
from tests.checkpoints import write_tiny_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (path / "config.json").write_text(json.dumps(config))


def _drop_tensor(path, name):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path / "model.safetensors"))
    del tensors[name]
    save_file(tensors, str(path / "model.safetensors"))


def _truncate(path):
    file = path / "model.safetensors"
    size = file.stat().st_size
    with open(file, "r+b") as f:
        f.truncate(size - 1000)


def _quant(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"].update(changes)
    (path / "config.json").write_text(json.dumps(config))


BREAKAGES = {
    "missing-config": (lambda p: (p / "config.json").unlink(), "no config.json"),
    "missing-tensor": (lambda p: _drop_tensor(p, "model.layers.1.mlp.down_proj.weight"),
                       "lacks tensors: model.layers.1.mlp.down_proj.weight"),
    "missing-weight-scale": (lambda p: _drop_tensor(p, "model.layers.0.self_attn.q_proj.weight_scale"),
                             "lacks tensors: model.layers.0.self_attn.q_proj.weight_scale"),
    "shape-mismatch": (lambda p: _edit_config(p, intermediate_size=48), "disagrees with config.json"),
    "unknown-architecture": (lambda p: _edit_config(p, architectures=["MambaForCausalLM"], model_type="mamba"),
                             "unsupported architecture"),
    "unknown-quant-method": (lambda p: _quant(p, quant_method="gptq"), "unsupported quantization method"),
    "unknown-linear-class": (lambda p: _quant(p, linear_class="fancylinear"), "linear_class"),
    "use-rms-norm-without-norm-weights": (lambda p: _quant(p, use_rms_norm=True), "rms_norm.weight"),
    "truncated-safetensors": (_truncate, "truncated"),
    "garbage-safetensors": (lambda p: (p / "model.safetensors").write_bytes(b"not a file"), "truncated or not"),
    "no-weights": (lambda p: (p / "model.safetensors").unlink(), "no .safetensors"),
    "no-tokenizer": (lambda p: (p / "tokenizer.json").unlink(), "no tokenizer.json"),
    "bad-json": (lambda p: (p / "config.json").write_text("{"), "not valid JSON"),
}


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("good") / "ckpt", fmt="bitlinear", num_hidden_layers=2)


def _run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "export", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def _assert_clean_failure(result, out, expected):
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("export failed:") and expected in lines[0], lines[0]
    assert "Traceback" not in result.stderr
    assert not out.exists()
    if out.parent.exists():
        assert not [p for p in os.listdir(out.parent) if p.startswith(f".{out.name}.")]


@pytest.mark.parametrize("case", sorted(BREAKAGES))
def test_bad_checkpoint_fails_cleanly(case, good_checkpoint, tmp_path):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(good_checkpoint, ckpt)
    breakage, expected = BREAKAGES[case]
    breakage(ckpt)
    out = tmp_path / "out" / "model"
    result = _run_cli(ckpt, "--out", out, "--variants", "int2,fp32")
    _assert_clean_failure(result, out, expected)


def test_missing_shard_fails_cleanly(tmp_path):
    ckpt = write_tiny_checkpoint(tmp_path / "ckpt", fmt="bitlinear", shards=2)
    (ckpt / "model-00002-of-00002.safetensors").unlink()
    out = tmp_path / "model"
    _assert_clean_failure(_run_cli(ckpt, "--out", out, "--variants", "fp32"), out, "missing")


def test_unknown_hub_id_offline(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    out = tmp_path / "model"
    _assert_clean_failure(_run_cli("nobody/no-such-model", "--out", out, env=env), out, "hub cache")


def test_unknown_variant(good_checkpoint, tmp_path):
    out = tmp_path / "model"
    _assert_clean_failure(_run_cli(good_checkpoint, "--out", out, "--variants", "int3"), out, "unknown variant")


def test_failure_during_writing_leaves_nothing(good_checkpoint, tmp_path, monkeypatch):
    """An error half way through (here: while reading layer 1) removes the partial folder."""
    from export import exporter

    real = exporter.read_layer

    def failing(ckpt, layer):
        if layer == 1:
            raise ExportError("simulated failure")
        return real(ckpt, layer)

    monkeypatch.setattr(exporter, "read_layer", failing)
    out = tmp_path / "model"
    with pytest.raises(ExportError, match="simulated"):
        export_checkpoint(str(good_checkpoint), str(out), ["int2", "fp32"], progress=lambda m: None)
    assert os.listdir(tmp_path) == []


def test_existing_output_needs_overwrite(good_checkpoint, tmp_path):
    out = tmp_path / "model"
    export_checkpoint(str(good_checkpoint), str(out), ["fp32"], progress=lambda m: None)
    with pytest.raises(ExportError, match="--overwrite"):
        export_checkpoint(str(good_checkpoint), str(out), ["fp32"], progress=lambda m: None)
    export_checkpoint(str(good_checkpoint), str(out), ["int2"], overwrite=True, progress=lambda m: None)
    assert sorted(p for p in os.listdir(out) if p.endswith(".onnx")) == ["model.int2.onnx"]
    assert os.listdir(tmp_path) == ["model"]
