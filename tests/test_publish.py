"""Publishing an exported folder to a hub model repo (export/publish.py), offline: the hub API
is a fake that records the calls and keeps the uploaded files (tests/hub_fakes.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from custom_ops.build import LIBRARY_NAME
from export import publish
from export.publish import PublishError, publish_folder
from export.space_config import front_matter_problems, gradio_pin
from runtime.folder import CONFIG_NAME
from tests.hub_fakes import FakeHubApi

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "models", "shakespeare-bitnet")


@pytest.fixture(scope="module")
def demo_export(tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "shakespeare-bitnet-onnx"
    subprocess.run([sys.executable, "-m", "export", DEMO, "--out", str(out), "--variants", "ternary,int2"],
                   cwd=REPO, check=True, capture_output=True, timeout=300)
    return str(out)


@pytest.fixture
def fake_api(monkeypatch):
    api = FakeHubApi()
    monkeypatch.setattr(publish, "make_api", lambda token: api)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)
    return api


@pytest.fixture
def no_token(monkeypatch, tmp_path):
    import huggingface_hub.constants as constants

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token-here"))


def test_publish_uploads_exactly_the_folder_with_its_card(tmp_path, demo_export, fake_api):
    folder = tmp_path / "onnx"
    shutil.copytree(demo_export, folder)
    (folder / "notes.txt").write_text("not part of the export")
    url = publish_folder(folder, "someone/shakespeare-onnx", progress=lambda m: None)
    assert url == "https://huggingface.co/someone/shakespeare-onnx"
    (create, repo, create_kw), (upload, repo2, upload_kw) = fake_api.calls
    assert (create, repo, upload, repo2) == ("create_repo", "someone/shakespeare-onnx", "upload_folder",
                                             "someone/shakespeare-onnx")
    assert create_kw["exist_ok"] is True and create_kw["private"] is False and create_kw["repo_type"] == "model"
    assert upload_kw["token"] == "hf_test_token" and upload_kw["repo_type"] == "model"
    uploaded = fake_api.uploaded("someone/shakespeare-onnx")
    assert {CONFIG_NAME, "README.md", "tokenizer.json", "genai_config.json", "model.onnx", "model.onnx.data",
            "model.int2.onnx", "model.int2.onnx.data", LIBRARY_NAME} <= uploaded
    assert "notes.txt" not in uploaded
    # what was uploaded is byte for byte the folder
    for name in uploaded:
        assert fake_api.repos["someone/shakespeare-onnx"][name] == (folder / name).read_bytes(), name


def test_republishing_fewer_variants_removes_the_stale_files(tmp_path, demo_export, fake_api):
    publish_folder(demo_export, "someone/m", progress=lambda m: None)
    smaller = tmp_path / "ternary-only"
    subprocess.run([sys.executable, "-m", "export", DEMO, "--out", str(smaller), "--variants", "ternary"],
                   cwd=REPO, check=True, capture_output=True, timeout=300)
    publish_folder(smaller, "someone/m", progress=lambda m: None)
    uploaded = fake_api.uploaded("someone/m")
    assert "model.onnx" in uploaded and "model.int2.onnx" not in uploaded and "model.int2.onnx.data" not in uploaded



def test_republishing_spares_onnx_files_publish_did_not_write(demo_export, fake_api):
    fake_api.repos["someone/shared"] = {"onnx/model_quantized.onnx": b"theirs", "decoder.onnx.data": b"theirs"}
    publish_folder(demo_export, "someone/shared", progress=lambda m: None)
    uploaded = fake_api.uploaded("someone/shared")
    assert {"onnx/model_quantized.onnx", "decoder.onnx.data", "model.onnx", "model.int2.onnx"} <= uploaded

def test_private_repo(demo_export, fake_api):
    publish_folder(demo_export, "someone/private-one", private=True, progress=lambda m: None)
    assert fake_api.calls[0][2]["private"] is True


def test_export_push_to_hub_prints_a_space_front_matter_the_hub_accepts(tmp_path, fake_api, capsys):
    import yaml

    from export.__main__ import main

    out = tmp_path / "published"
    assert main([DEMO, "--out", str(out), "--variants", "ternary,int2", "--push-to-hub", "someone/demo-onnx"]) == 0
    assert "README.md" in fake_api.uploaded("someone/demo-onnx")
    printed = capsys.readouterr().out
    assert "BITNET_MODEL=someone/demo-onnx" in printed
    block = printed.split("---\n")[1]
    meta = yaml.safe_load(block)
    assert front_matter_problems(meta, gradio_pin=gradio_pin(os.path.join(REPO, "requirements.txt"))) == []
    (entry,) = meta["preload_from_hub"]
    repo, files = entry.split()
    assert repo == "someone/demo-onnx"
    assert set(files.split(",")) == fake_api.uploaded("someone/demo-onnx")


# -- clear errors ----------------------------------------------------------------------------------
def test_no_token_is_one_clear_error(demo_export, no_token, monkeypatch):
    monkeypatch.setattr(publish, "make_api", lambda token: pytest.fail("no API call without a token"))
    with pytest.raises(PublishError, match=r"no Hugging Face token: run `hf auth login` or set HF_TOKEN"):
        publish_folder(demo_export, "someone/x", progress=lambda m: None)


def test_export_refuses_to_start_without_a_token(tmp_path, no_token, capsys):
    from export.__main__ import main

    out = tmp_path / "never-written"
    assert main([DEMO, "--out", str(out), "--push-to-hub", "someone/x"]) == 1
    assert "export not started: no Hugging Face token" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("repo_id, complaint", [
    ("just-a-name", "give ORG/NAME"),
    ("a/b/c", "give ORG/NAME"),
    ("someone/bad name", "not a valid repo id"),
    ("someone/double--dash", "not a valid repo id"),
])
def test_bad_repo_id_is_one_clear_error(demo_export, fake_api, repo_id, complaint, capsys):
    with pytest.raises(PublishError, match=complaint) as e:
        publish_folder(demo_export, repo_id, progress=lambda m: None)
    assert "\n" not in str(e.value) and fake_api.calls == []
    assert publish.main([demo_export, repo_id]) == 1
    assert complaint in capsys.readouterr().err


def test_a_folder_that_is_not_an_export_is_refused(tmp_path, demo_export, fake_api):
    with pytest.raises(PublishError, match=r"is not an exported model folder \(no bitnet_onnx.json\)"):
        publish_folder(DEMO, "someone/x", progress=lambda m: None)  # a checkpoint, not an export
    with pytest.raises(PublishError, match="is not a folder"):
        publish_folder(tmp_path / "missing", "someone/x", progress=lambda m: None)
    partial = tmp_path / "partial"
    shutil.copytree(demo_export, partial)
    (partial / "model.int2.onnx.data").unlink()
    with pytest.raises(PublishError, match=r"lacks model\.int2\.onnx\.data; re-export"):
        publish_folder(partial, "someone/x", progress=lambda m: None)
    (partial / "README.md").unlink()
    shutil.copyfile(os.path.join(demo_export, "model.int2.onnx.data"), partial / "model.int2.onnx.data")
    with pytest.raises(PublishError, match="lacks README.md; write the model card with python -m export.model_card"):
        publish_folder(partial, "someone/x", progress=lambda m: None)
    assert fake_api.calls == []


def test_a_hub_failure_is_one_line(demo_export, monkeypatch):
    import httpx
    from huggingface_hub.errors import HfHubHTTPError

    response = httpx.Response(403, request=httpx.Request("POST", "https://huggingface.co/api/repos/create"))
    api = FakeHubApi(fail=HfHubHTTPError("403 Forbidden: you cannot write to someone\nmore details",
                                         response=response))
    monkeypatch.setattr(publish, "make_api", lambda token: api)
    monkeypatch.setenv("HF_TOKEN", "hf_read_only")
    with pytest.raises(PublishError, match=r"publishing .* to someone/x failed: HfHubHTTPError: 403 Forbidden") as e:
        publish_folder(demo_export, "someone/x", progress=lambda m: None)
    assert "\n" not in str(e.value)
