"""The repository as the Hugging Face Hub sees it when it becomes a Space: a front matter the
Hub accepts (export/space_config.py holds the rules), a LICENSE matching the card, and no
binary over 1 MB outside LFS/Xet -- while the binaries stay plain blobs in this repository."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from export.space_config import (BINARY_LIMIT, LFS_POINTER_PREFIX, binaries_without_lfs_rule,
                                     front_matter_problems, gradio_pin, preload_entry_problems,
                                     published_front_matter, read_front_matter)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
PIN = gradio_pin(os.path.join(ROOT, "requirements.txt"))


def test_readme_front_matter_is_accepted():
    meta = read_front_matter(README)
    assert PIN and meta["sdk_version"] == PIN
    assert front_matter_problems(meta, gradio_pin=PIN) == []
    assert len(meta["short_description"]) <= 60
    assert os.path.isfile(os.path.join(ROOT, meta["app_file"]))


@pytest.mark.parametrize("change, complaint", [
    ({"short_description": "Ternary BitNet b1.58 2B4T vs stock ONNX Runtime, side by side, on CPU"},
     "short_description: .* is 69 characters"),
    ({"python_version": 3.1}, "python_version: must be a str.*quote it"),
    ({"sdk_version": "5.0.0"}, "differs from the gradio pin"),
    ({"colorFrom": "orange"}, "colorFrom: 'orange' is not one of"),
    ({"sdk": "streamlit"}, "sdk: 'streamlit' is not one of"),
    ({"suggested_hardware": "cpu-huge"}, "suggested_hardware"),
    ({"startup_duration_timeout": "one hour"}, "startup_duration_timeout"),
    ({"suggested_storage": "small"}, "persistent storage is no longer offered"),
    ({"sdk_versoin": "6.31.0"}, "sdk_versoin: not a Spaces configuration key"),
    ({"pinned": "no"}, "pinned: must be a bool"),
    ({"models": ["not a repo"]}, "models: .* not a repo id"),
    ({"preload_from_hub": "org/name"}, "preload_from_hub: must be a list"),
    ({"preload_from_hub": ["org/name a.json,,b.json"]}, "no empty item"),
    ({"preload_from_hub": ["org/name a.json deadbeef"]}, "not a 40-hex commit sha"),
    ({"preload_from_hub": ["org/name a.json b.json"]}, "not a 40-hex commit sha"),
    ({"preload_from_hub": ["org/name a b c d"]}, "expected 'REPO"),
    ({"preload_from_hub": ["name-only"]}, "not a repo id"),
])
def test_each_rule_catches_its_break(change, complaint):
    import re

    meta = {**read_front_matter(README), **change}
    problems = front_matter_problems(meta, gradio_pin=PIN)
    assert any(re.search(complaint, p) for p in problems), problems


def test_missing_required_key_and_a_broken_block(tmp_path):
    meta = read_front_matter(README)
    del meta["sdk_version"]
    assert "sdk_version: missing" in front_matter_problems(meta, gradio_pin=PIN)
    from export.space_config import FrontMatterError

    (tmp_path / "README.md").write_text("# no front matter\n")
    with pytest.raises(FrontMatterError, match="does not start with"):
        read_front_matter(tmp_path / "README.md")
    (tmp_path / "README.md").write_text("---\ntitle: [unclosed\n---\n")
    with pytest.raises(FrontMatterError, match="not valid YAML"):
        read_front_matter(tmp_path / "README.md")


def test_well_formed_preload_entries():
    assert preload_entry_problems("coqui/XTTS-v1") == []
    assert preload_entry_problems("org/name config.json,sub/model.onnx") == []
    assert preload_entry_problems("org/name config.json " + "0" * 40) == []


def test_published_front_matter_is_accepted_and_preloads_the_folder():
    meta = published_front_matter("someone/bitnet-onnx", ["bitnet_onnx.json", "model.onnx"],
                                  read_front_matter(README))
    assert front_matter_problems(meta, gradio_pin=PIN) == []
    assert meta["preload_from_hub"] == ["someone/bitnet-onnx bitnet_onnx.json,model.onnx"]
    assert meta["models"] == ["someone/bitnet-onnx"]
    with pytest.raises(ValueError, match="ORG/NAME"):
        published_front_matter("not a repo", [], {})


def test_license_file_matches_the_card():
    with open(os.path.join(ROOT, "LICENSE"), encoding="utf-8") as f:
        text = f.read()
    assert read_front_matter(README)["license"] == "mit"
    assert text.startswith("MIT License") and "Permission is hereby granted, free of charge" in text


# -- binaries ------------------------------------------------------------------------------------
def _git_checkout() -> bool:
    return shutil.which("git") is not None and os.path.exists(os.path.join(ROOT, ".git"))


@pytest.mark.skipif(not _git_checkout(), reason="not a git checkout (no tracked files to check)")
def test_no_tracked_binary_over_1mb_lacks_an_lfs_rule():
    assert binaries_without_lfs_rule(ROOT) == []


@pytest.mark.skipif(not _git_checkout(), reason="not a git checkout (no tracked files to check)")
def test_binaries_stay_plain_blobs_here():
    """The rules must not have turned a binary into an LFS pointer in this repository (a clone
    without git-lfs, as CI makes, would then read 130 bytes of pointer instead of the model)."""
    safetensors = "models/shakespeare-bitnet/model.safetensors"
    blob = subprocess.run(["git", "-C", ROOT, "cat-file", "-p", f"HEAD:{safetensors}"],
                          capture_output=True, check=True).stdout
    assert not blob.startswith(LFS_POINTER_PREFIX) and len(blob) > BINARY_LIMIT
    with open(os.path.join(ROOT, safetensors), "rb") as f:
        assert not f.read(100).startswith(LFS_POINTER_PREFIX)


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_the_binary_check_finds_a_binary_without_a_rule(tmp_path):
    """The check itself, on a repository made for it: a 2 MB binary with no rule is reported,
    a text file of the same size and a small binary are not; a rule clears it; a rule in this
    clone's own .git/info/attributes does not count (it does not travel with a push)."""
    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "weights.bin").write_bytes(b"\0\1" * (BINARY_LIMIT // 2 + 10))
    (tmp_path / "big.txt").write_text("x" * (BINARY_LIMIT + 10))
    (tmp_path / "small.bin").write_bytes(b"\0" * 1000)
    git("add", ".")
    assert binaries_without_lfs_rule(tmp_path) == ["weights.bin"]
    (tmp_path / ".git" / "info").mkdir(exist_ok=True)
    (tmp_path / ".git" / "info" / "attributes").write_text("*.bin filter=lfs\n")
    assert binaries_without_lfs_rule(tmp_path) == ["weights.bin"]
    (tmp_path / ".gitattributes").write_text("*.bin filter=lfs diff=lfs merge=lfs -text\n")
    assert binaries_without_lfs_rule(tmp_path) == []


def test_command_line_check(tmp_path, capsys):
    from export.space_config import main

    assert main([ROOT]) == 0
    assert "the Hub accepts this Space configuration" in capsys.readouterr().out
    text = open(README, encoding="utf-8").read().replace(
        "short_description: ", "short_description: A much longer description that the Hub refuses - ", 1)
    (tmp_path / "README.md").write_text(text, encoding="utf-8")
    assert main([str(tmp_path)]) == 1
    assert "short_description" in capsys.readouterr().err
