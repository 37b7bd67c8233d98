"""A Space serving a published folder: export -> publish (fake hub API) -> the repo in the hub
cache as `preload_from_hub` leaves it -> `python app.py --model ORG/NAME`, offline, with no
compiler: the start downloads nothing, exports nothing, compiles nothing (the folder's own
operator library runs), says so, and answers. Also: when the folder's library cannot run here
(another architecture, an onnxruntime older than its API, another version's entry points),
the start says why and builds as before (custom_ops/prebuilt.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request

import pytest

import custom_ops
from custom_ops import build, prebuilt
from custom_ops.build import LIBRARY_NAME
from export import publish
from tests.hub_fakes import FakeHubApi, put_in_hub_cache
from tests.test_app_common import AppServer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "models", "shakespeare-bitnet")
REPO_ID = "someone/shakespeare-bitnet-onnx"


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """The demo model exported, published to a fake hub, and laid out in a fresh hub cache."""
    base = tmp_path_factory.mktemp("published")
    out = base / "export"
    subprocess.run([sys.executable, "-m", "export", DEMO, "--out", str(out), "--variants", "ternary,int2"],
                   cwd=REPO, check=True, capture_output=True, timeout=300)
    api = FakeHubApi()
    original = publish.make_api
    publish.make_api = lambda token: api
    try:
        publish.publish_folder(out, REPO_ID, token="hf_test", progress=lambda m: None)
    finally:
        publish.make_api = original
    remote = api.write_repo(REPO_ID, base / "remote")
    hub = base / "hub"
    snapshot = put_in_hub_cache(str(hub), REPO_ID, remote)
    return {"hub": str(hub), "snapshot": snapshot, "export": str(out)}


@pytest.fixture
def no_adoption():
    """Each test starts with nothing adopted and leaves nothing adopted."""
    build._adopted = None
    yield
    build._adopted = None


def post_json(url: str, body: dict, timeout: float = 120) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def test_a_space_start_serves_the_published_folder_without_compiler_download_or_export(published, tmp_path):
    build_dir, export_cache = tmp_path / "no-build-here", tmp_path / "export-cache"
    env = {"HF_HUB_CACHE": published["hub"], "HF_HUB_OFFLINE": "1", "BITNET_BUILD_DIR": str(build_dir),
           "BITNET_ONNX_CACHE": str(export_cache), "CXX": str(tmp_path / "no-compiler"),
           "BITNET_MODEL": REPO_ID,  # the Space variable naming the model
           "SPACE_AUTHOR_NAME": "someone"}  # what Spaces sets: the Space's owner publishes the repo
    with AppServer(REPO_ID, tmp_path, env=env) as server:
        log = server.log_text()
        assert "operator library: using the model folder's copy" in log, log
        assert f"{REPO_ID} is an exported folder: using it from the hub cache" in log, log
        assert "exporting" not in log and "compiling" not in log, log
        assert server.status["state"] == "ready"
        assert "ternary engine loaded" in log and "BitLinear kernel: unavailable" not in log, log
        with urllib.request.urlopen(server.url, timeout=60) as page:
            assert page.status == 200 and b"gradio" in page.read().lower()
        answer = post_json(server.url + "v1/chat/completions", {
            "model": REPO_ID, "messages": [{"role": "user", "content": "Good morrow"}],
            "max_tokens": 8, "temperature": 0})
        assert answer["choices"][0]["message"]["content"]
    # nothing compiled, nothing exported
    assert not (build_dir / LIBRARY_NAME).exists()
    assert not export_cache.exists() or not any(export_cache.iterdir())


def test_the_folder_copy_is_adopted_only_without_an_up_to_date_build(published, tmp_path, monkeypatch, no_adoption):
    from playground.hub import cached_folder, choose_operator_library

    monkeypatch.setenv("BITNET_BUILD_DIR", str(tmp_path / "empty"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", published["hub"])
    monkeypatch.setenv("SPACE_AUTHOR_NAME", "someone")
    assert os.path.realpath(cached_folder(REPO_ID)) == os.path.realpath(published["snapshot"])
    choice = choose_operator_library(REPO_ID)
    assert choice.source == "folder" and custom_ops.library_path() == choice.path
    assert choice.path.startswith(published["snapshot"])

    build._adopted = None  # a machine that already has an up-to-date build keeps using it
    monkeypatch.setenv("BITNET_BUILD_DIR", str(tmp_path / "built"))
    os.makedirs(tmp_path / "built")
    shutil.copyfile(os.path.join(published["export"], LIBRARY_NAME), tmp_path / "built" / LIBRARY_NAME)
    choice = prebuilt.adopt_folder_library(published["snapshot"])
    assert choice.source == "built" and build._adopted is None

    monkeypatch.setenv("BITNET_BUILD_DIR", str(tmp_path / "empty"))
    choice = choose_operator_library("microsoft/bitnet-b1.58-2B-4T")  # a checkpoint: nothing to adopt
    assert choice.source == "build" and "not an exported folder on disk or in the hub cache" in choice.message
    assert build._adopted is None


# -- a copy that cannot run here -------------------------------------------------------------------
FAKE_LIBRARY = r"""
#include <stddef.h>
#include <stdint.h>
extern "C" {
// What our library does under an onnxruntime older than its API version: register nothing.
void* RegisterCustomOps(void* options, const void* api_base) { return nullptr; }
#ifdef ALL_ENTRY_POINTS
const char* bitnet_resolve_kernel(const char* requested) { return "reference"; }
uint32_t bitnet_cpu_features() { return 0; }
void bitnet_kernel_table(uint32_t features, char* out, size_t size) {}
size_t bitnet_kernel_levels(char* out, size_t size) { return 0; }
#endif
}
"""


def compile_fake(tmp_path, cxx: str, name: str, *flags) -> str:
    if shutil.which(cxx) is None:
        pytest.skip(f"{cxx} is not installed")
    src = tmp_path / "fake.cc"
    src.write_text(FAKE_LIBRARY)
    folder = tmp_path / name
    folder.mkdir()
    subprocess.run([cxx, "-shared", "-fPIC", *flags, str(src), "-o", str(folder / LIBRARY_NAME)], check=True)
    return str(folder)


def test_another_architecture_is_refused_and_built_here(tmp_path, monkeypatch, no_adoption):
    other = "aarch64-linux-gnu-g++" if not custom_ops.ARM64 else "x86_64-linux-gnu-g++"
    folder = compile_fake(tmp_path, other, "arm", "-DALL_ENTRY_POINTS")
    monkeypatch.setenv("BITNET_BUILD_DIR", str(tmp_path / "empty"))
    choice = prebuilt.adopt_folder_library(folder)
    assert choice.source == "build" and build._adopted is None
    assert "cannot be used here: it does not load on this" in choice.message and "compiling it here" in choice.message


def test_an_onnxruntime_older_than_the_copy_is_refused(tmp_path, monkeypatch, no_adoption):
    folder = compile_fake(tmp_path, "g++", "old-ort", "-DALL_ENTRY_POINTS")
    monkeypatch.setenv("BITNET_BUILD_DIR", str(tmp_path / "empty"))
    choice = prebuilt.adopt_folder_library(folder)
    assert choice.source == "build" and "onnxruntime cannot use it" in choice.message, choice.message


def test_another_versions_entry_points_are_refused(tmp_path, monkeypatch, no_adoption):
    folder = compile_fake(tmp_path, "g++", "old-version")
    monkeypatch.setenv("BITNET_BUILD_DIR", str(tmp_path / "empty"))
    choice = prebuilt.adopt_folder_library(folder)
    assert choice.source == "build" and "lacks bitnet_resolve_kernel" in choice.message, choice.message


def test_a_folder_without_a_copy_builds(tmp_path, monkeypatch, no_adoption):
    monkeypatch.setenv("BITNET_BUILD_DIR", str(tmp_path / "empty"))
    choice = prebuilt.adopt_folder_library(tmp_path)
    assert choice.source == "build" and "the model folder carries none" in choice.message


def test_a_preloaded_cache_is_not_reported_as_a_download(tmp_path, monkeypatch):
    """The download watcher reports growth of the repo's blobs, not what preload_from_hub put
    there at build time (a Space's start downloads nothing and must not say it does)."""
    import time

    from playground import models

    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    blobs = tmp_path / "models--org--name" / "blobs"
    blobs.mkdir(parents=True)
    (blobs / "preloaded").write_bytes(b"0" * 2**20)
    lines = []
    watcher = models._DownloadWatcher("org/name", lines.append, every_s=0.05)
    time.sleep(0.3)
    assert lines == []
    (blobs / "new.incomplete").write_bytes(b"0" * 2**20)
    deadline = time.time() + 5
    while not lines and time.time() < deadline:
        time.sleep(0.05)
    watcher.stop()
    assert lines and lines[0].startswith("downloading: ")


def test_a_library_from_someone_elses_repo_needs_consent(published, tmp_path, monkeypatch, no_adoption):
    """Loading the folder's library runs its native code: a hub repo that is not the Space
    owner's is only used with BITNET_TRUST_FOLDER_LIBRARY=1; without it the start builds."""
    from playground.hub import TRUST_ENV, choose_operator_library, library_trust

    monkeypatch.setenv("BITNET_BUILD_DIR", str(tmp_path / "empty"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", published["hub"])
    monkeypatch.delenv(TRUST_ENV, raising=False)
    monkeypatch.setenv("SPACE_AUTHOR_NAME", "somebody-else")
    choice = choose_operator_library(REPO_ID)
    assert choice.source == "build" and build._adopted is None
    assert f"not loading the copy in {REPO_ID}" in choice.message and f"set {TRUST_ENV}=1" in choice.message
    monkeypatch.delenv("SPACE_AUTHOR_NAME")
    assert library_trust(REPO_ID) is None
    monkeypatch.setenv(TRUST_ENV, "1")
    assert choose_operator_library(REPO_ID).source == "folder"
    assert library_trust(str(tmp_path)) == "a folder on this disk"
