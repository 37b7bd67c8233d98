"""A hub repo that holds an exported folder is used as it is (playground/hub.py), and
`python -m export` writes a model card so such a folder can be published (export/model_card.py).

No network here: repos are laid out in a temporary hub cache the way huggingface_hub stores
them (models--org--name/blobs, snapshots/<revision>/ symlinks, refs/main) and read with
HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from playground.hub import HubFolderError, exported_snapshot
from runtime.folder import CONFIG_NAME
from tests.hub_fakes import put_in_hub_cache

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "models", "shakespeare-bitnet")


@pytest.fixture(scope="module")
def demo_export(tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "shakespeare-bitnet-onnx"
    subprocess.run([sys.executable, "-m", "export", DEMO, "--out", str(out)], cwd=REPO, check=True,
                   capture_output=True, timeout=300)
    return str(out)


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_exported_repo_is_used_as_is(tmp_path, demo_export, offline):
    snapshot = put_in_hub_cache(tmp_path, "someone/shakespeare-onnx", demo_export)
    folder = exported_snapshot("someone/shakespeare-onnx", cache_dir=str(tmp_path))
    assert os.path.realpath(folder) == os.path.realpath(snapshot)

    from runtime import Engine, GenerationSettings

    engine = Engine(folder, variant="ternary", threads=1)
    text = "".join(e.text for e in engine.stream(
        messages=[{"role": "user", "content": "Good morrow"}],
        settings=GenerationSettings(max_new_tokens=8, temperature=0.0)))
    reference = Engine(demo_export, variant="ternary", threads=1)
    expected = "".join(e.text for e in reference.stream(
        messages=[{"role": "user", "content": "Good morrow"}],
        settings=GenerationSettings(max_new_tokens=8, temperature=0.0)))
    assert text and text == expected


def test_a_checkpoint_repo_is_not_an_exported_folder(tmp_path, offline):
    put_in_hub_cache(tmp_path, "someone/shakespeare", DEMO)
    assert exported_snapshot("someone/shakespeare", cache_dir=str(tmp_path)) is None


def test_a_repo_not_in_the_cache_offline_is_none(tmp_path, offline):
    assert exported_snapshot("someone/never-downloaded", cache_dir=str(tmp_path)) is None


def test_missing_variant_file_is_one_clear_error(tmp_path, demo_export, offline):
    put_in_hub_cache(tmp_path, "someone/partial", demo_export, skip=("model.int2.onnx.data",))
    with pytest.raises(HubFolderError, match=r"lacks model\.int2\.onnx.*offline") as e:
        exported_snapshot("someone/partial", cache_dir=str(tmp_path))
    assert "\n" not in str(e.value)
    # asking only for what is there works
    assert exported_snapshot("someone/partial", variants=["ternary"], cache_dir=str(tmp_path))


def test_broken_config_is_one_clear_error(tmp_path, demo_export, offline):
    broken = tmp_path / "broken"
    shutil.copytree(demo_export, broken)
    (broken / CONFIG_NAME).write_text("{not json")
    put_in_hub_cache(tmp_path / "hub", "someone/broken", str(broken))
    with pytest.raises(HubFolderError, match="someone/broken: .*bitnet_onnx.json cannot be read") as e:
        exported_snapshot("someone/broken", cache_dir=str(tmp_path / "hub"))
    assert "\n" not in str(e.value)
    (broken / CONFIG_NAME).write_text(json.dumps({"format": "something-else", "variants": {}}))
    put_in_hub_cache(tmp_path / "hub2", "someone/broken", str(broken))
    with pytest.raises(HubFolderError, match="format is 'something-else'"):
        exported_snapshot("someone/broken", cache_dir=str(tmp_path / "hub2"))


# -- the model card ----------------------------------------------------------------------------
def card_front_matter(folder) -> dict:
    from huggingface_hub import ModelCard

    return ModelCard.load(os.path.join(folder, "README.md")).data.to_dict()


def test_export_writes_a_model_card(demo_export):
    meta = card_front_matter(demo_export)
    assert meta["library_name"] == "onnxruntime"
    assert meta["license"] == "mit" and meta["language"] == "en"  # from the source's own card
    assert "bitnet" in meta["tags"] and "onnx" in meta["tags"]
    assert "base_model" not in meta  # the source is a local folder, not a hub id
    text = open(os.path.join(demo_export, "README.md"), encoding="utf-8").read()
    for needle in ("| `ternary` | `model.onnx`", "| `int2` | `model.int2.onnx`",
                   f"python -m export {DEMO} --out DIR --variants ternary,int2",
                   "--model ORG/NAME", "hf upload ORG/NAME DIR ."):
        assert needle in text, needle


def test_card_names_a_hub_source_as_base_model_and_shows_parity(tmp_path, demo_export):
    from export.model_card import write_model_card
    from runtime.folder import read_config

    folder = tmp_path / "copy"
    shutil.copytree(demo_export, folder)
    config = dict(read_config(folder), source="microsoft/bitnet-b1.58-2B-4T", lm_head="int8")
    parity = {"prompt_tokens": 19, "decode_steps": 16, "logit_scale": 12.5,
              "variants": {"ternary": {"max_abs_logit_diff": 1.14e-05, "greedy_agree": "16/16"}}}
    write_model_card(str(folder), config, parity=parity)
    assert card_front_matter(folder)["base_model"] == "microsoft/bitnet-b1.58-2B-4T"
    text = (folder / "README.md").read_text()
    assert "| `ternary` | 1.14e-05 | 16/16 |" in text
    assert "--lm-head int8" in text


def test_card_command_line_rewrites_with_parity(tmp_path, demo_export):
    folder = tmp_path / "copy"
    shutil.copytree(demo_export, folder)
    parity = tmp_path / "parity.txt"  # what python -m demo.check_export prints: lines, then JSON
    parity.write_text("ternary  max |logit diff| 1.1e-05  greedy tokens agree 16/16\n" + json.dumps(
        {"prompt_tokens": 19, "decode_steps": 16,
         "variants": {"int2": {"max_abs_logit_diff": 0.0906, "greedy_agree": "16/16"}}}) + "\n")
    r = subprocess.run([sys.executable, "-m", "export.model_card", str(folder), "--parity", str(parity)],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "| `int2` | 9.06e-02 | 16/16 |" in (folder / "README.md").read_text()
    bad = subprocess.run([sys.executable, "-m", "export.model_card", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr


# -- --model ORG/NAME in the playground ---------------------------------------------------------
RESOLVE = """
import json, os, sys
from playground import models
lines = []
r = models.resolve_model(sys.argv[1], progress=lines.append)
print(json.dumps({"folder": r.folder, "fallback": r.fallback, "model_id": r.model_id, "lines": lines}))
"""


def resolve_in_fresh_process(tmp_path, spec: str) -> dict:
    """resolve_model in a new interpreter: huggingface_hub reads HF_HOME when imported."""
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1",
               BITNET_ONNX_CACHE=str(tmp_path / "export-cache"))
    r = subprocess.run([sys.executable, "-c", RESOLVE, spec], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_model_flag_uses_a_cached_exported_repo_without_exporting(tmp_path, demo_export):
    snapshot = put_in_hub_cache(tmp_path / "hf" / "hub", "someone/shakespeare-onnx", demo_export)
    got = resolve_in_fresh_process(tmp_path, "someone/shakespeare-onnx")
    assert os.path.realpath(got["folder"]) == os.path.realpath(snapshot)
    assert not got["fallback"] and got["model_id"] == "someone/shakespeare-onnx"
    assert not (tmp_path / "export-cache").exists() or not any((tmp_path / "export-cache").iterdir()), \
        "an exported repo must not be exported again"
    assert any("is an exported folder: using it" in line for line in got["lines"])


def test_model_flag_with_an_incomplete_cached_export_falls_back_with_a_reason(tmp_path, demo_export):
    put_in_hub_cache(tmp_path / "hf" / "hub", "someone/partial", demo_export, skip=("model.onnx.data",))
    got = resolve_in_fresh_process(tmp_path, "someone/partial")
    assert got["fallback"]  # offline, nothing usable: the demo model, with a one-line reason
    notice = [line for line in got["lines"] if "Could not use someone/partial" in line]
    assert len(notice) == 1 and "lacks model.onnx.data" in notice[0], got["lines"]


def test_online_exported_repo_is_used_as_is(monkeypatch, tmp_path, demo_export):
    """The online branch (no network here: the hub call is replaced by the cache folder)."""
    from playground import hub, models

    monkeypatch.setenv("BITNET_ONNX_CACHE", str(tmp_path / "export-cache"))
    calls = []

    def fake_snapshot(repo_id, variants=None, **kw):
        calls.append(repo_id)
        return demo_export

    def no_export(*a, **k):
        raise AssertionError("an exported repo must not be fetched as a checkpoint or exported")

    monkeypatch.setattr(hub, "exported_snapshot", fake_snapshot)
    monkeypatch.setattr(models, "_export", no_export)
    r = models.resolve_model("someone/online-onnx", progress=lambda m: None, fetch=no_export)
    assert r.folder == demo_export and not r.fallback and r.model_id == "someone/online-onnx"
    assert calls == ["someone/online-onnx"]


def test_hub_failures_are_one_line(monkeypatch, tmp_path):
    import huggingface_hub

    def broken_download(*a, **k):
        raise OSError("connection reset by peer\nsecond line")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", broken_download)
    with pytest.raises(HubFolderError) as e:
        exported_snapshot("someone/flaky", cache_dir=str(tmp_path))
    assert str(e.value) == ("cannot fetch bitnet_onnx.json of someone/flaky: OSError: "
                            "connection reset by peer")


def test_online_hub_failure_falls_back_with_the_reason(monkeypatch, tmp_path):
    from playground import hub, models

    monkeypatch.setenv("BITNET_ONNX_CACHE", str(tmp_path / "export-cache"))

    def failing(repo_id, variants=None, **kw):
        raise HubFolderError(f"cannot download {repo_id}: OSError: connection reset")

    monkeypatch.setattr(hub, "exported_snapshot", failing)
    monkeypatch.setattr(models, "demo_model", lambda progress, requested: models.ResolvedModel(
        "/nowhere", models.DEMO_NAME, requested, fallback=True))
    lines = []
    r = models.resolve_model("someone/flaky-onnx", progress=lines.append)
    assert r.fallback and "Could not use someone/flaky-onnx (cannot download" in r.notice
    assert "\n" not in r.notice
