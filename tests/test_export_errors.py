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


# ---- the output folder never destroys the source ---------------------------------------------

def _snapshot(folder) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _out_cases(ckpt, tmp_path):
    """(label, --out path, needle) for outputs that are, lie inside or contain the source."""
    link = tmp_path / "link-to-ckpt"
    link.symlink_to(ckpt, target_is_directory=True)
    return [
        ("the source", ckpt, "is the source"),
        ("inside", ckpt / "onnx", "lies inside"),
        ("the parent", tmp_path, "contains"),
        ("a symlink to it", link, "is the source"),
        ("inside via symlink", link / "onnx", "lies inside"),
        ("dot-dot", tmp_path / "elsewhere" / ".." / ckpt.name, "is the source"),
        ("dot-dot inside", ckpt / "a" / ".." / "b", "lies inside"),
    ]


@pytest.mark.parametrize("overwrite", [False, True])
def test_out_that_is_inside_or_contains_the_source_is_refused(good_checkpoint, tmp_path, overwrite):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(good_checkpoint, ckpt)
    before = _snapshot(ckpt)
    for label, out, needle in _out_cases(ckpt, tmp_path):
        args = [ckpt, "--out", out, "--variants", "fp32"] + (["--overwrite"] if overwrite else [])
        result = _run_cli(*args)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 1 and len(lines) == 1, (label, result.stderr)
        assert lines[0].startswith("export failed:") and needle in lines[0], (label, lines[0])
        assert "Traceback" not in result.stderr
        assert _snapshot(ckpt) == before, label  # not one byte of the checkpoint changed
        assert sorted(os.listdir(ckpt)) == sorted(before), label  # nothing added either
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "link-to-ckpt"]


def test_out_containing_a_file_the_source_links_to_is_refused(good_checkpoint, tmp_path):
    """A hub snapshot's files are symlinks into the cache's blob store: --out that blob
    folder (or one containing it) would replace the real weights."""
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshot"
    blobs.mkdir()
    snapshot.mkdir()
    for p in good_checkpoint.iterdir():
        (blobs / p.name).write_bytes(p.read_bytes())
        (snapshot / p.name).symlink_to(blobs / p.name)
    before = _snapshot(blobs)
    result = _run_cli(snapshot, "--out", blobs, "--overwrite", "--variants", "fp32")
    assert result.returncode == 1 and "links to it" in result.stderr, result.stderr
    assert _snapshot(blobs) == before


def test_overwrite_replaces_only_an_exported_folder(good_checkpoint, tmp_path):
    other = tmp_path / "notes"
    other.mkdir()
    (other / "thesis.tex").write_text("years of work")
    result = _run_cli(good_checkpoint, "--out", other, "--overwrite", "--variants", "fp32")
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and len(lines) == 1 and "not an exported model folder" in lines[0], result.stderr
    assert (other / "thesis.tex").read_text() == "years of work"
    file = tmp_path / "a-file"
    file.write_text("x")
    with pytest.raises(ExportError, match="not an exported model folder"):
        export_checkpoint(str(good_checkpoint), str(file), ["fp32"], overwrite=True, progress=lambda m: None)
    assert file.read_text() == "x"
    # an exported folder is replaced, and an empty folder is simply used
    empty = tmp_path / "empty"
    empty.mkdir()
    export_checkpoint(str(good_checkpoint), str(empty), ["fp32"], progress=lambda m: None)
    export_checkpoint(str(good_checkpoint), str(empty), ["int2"], overwrite=True, progress=lambda m: None)
    assert sorted(p for p in os.listdir(empty) if p.endswith(".onnx")) == ["model.int2.onnx"]
