"""The model-folder contract (runtime/folder.py), old folders, and what the graph asks for.

- a folder written by the previous exporter (format 1: optional `logits_to_keep` initializer
  input) still loads and generates transformers' tokens; one older still, or of another
  format, fails with one line that says to re-export;
- a plain onnxruntime session on a fresh export logs no warning (the format-1 graph does:
  the check can fail), and the runtime never imports onnx;
- the folder helpers, the session helper and the CPU count.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from export import export_checkpoint
from runtime import Engine, EngineError, GenerationSettings, VariantNotFoundError
from runtime import folder
from runtime.cpus import available_threads
from runtime.session import open_session, session_options
from tests.checkpoints import load_reference, write_tiny_checkpoint
from tests.export_harness import reference_greedy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "w5 w17 w33 w100 w7 w250"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = tmp_path_factory.mktemp("folder")
    ckpt = write_tiny_checkpoint(base / "ckpt", fmt="bitlinear", tied=False, seed=1)
    out = export_checkpoint(str(ckpt), str(base / "onnx"), ("ternary", "int2"), progress=lambda m: None)
    return {"dir": out, "ckpt": ckpt}


def make_format1_folder(src: str, dst) -> str:
    """Turn a fresh export into what the previous exporter wrote: `logits_to_keep`, an int64
    scalar initializer (0) that is also a graph input, read by Neg directly; format_version 1."""
    import onnx
    from onnx import numpy_helper

    os.makedirs(dst, exist_ok=True)
    for name in os.listdir(src):
        shutil.copy(os.path.join(src, name), os.path.join(dst, name))
    for file in ("model.onnx", "model.int2.onnx"):
        model = onnx.load(os.path.join(dst, file), load_external_data=False)
        g = model.graph
        kept = [i for i in g.input if i.name != folder.NUM_LOGITS_TO_KEEP]
        del g.input[:]
        g.input.extend(kept)
        g.input.append(onnx.helper.make_tensor_value_info("logits_to_keep", onnx.TensorProto.INT64, []))
        g.initializer.append(numpy_helper.from_array(np.array(0, np.int64), "logits_to_keep"))
        for node in g.node:
            for i, name in enumerate(node.input):
                if name == folder.NUM_LOGITS_TO_KEEP:
                    node.input[i] = "logits_to_keep"
        onnx.save(model, os.path.join(dst, file))
    path = os.path.join(dst, folder.CONFIG_NAME)
    with open(path) as f:
        cfg = json.load(f)
    cfg["format_version"] = 1
    with open(path, "w") as f:
        json.dump(cfg, f)
    return str(dst)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "runtime", *args], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=ROOT), cwd=ROOT, timeout=120)


# ---- folders of earlier exporters ----------------------------------------------------------

@pytest.mark.parametrize("variant", ["ternary", "int2"])
def test_format1_folder_still_generates_the_reference_tokens(tiny, tmp_path, variant):
    old = make_format1_folder(tiny["dir"], tmp_path / "old")
    reference = load_reference(tiny["ckpt"])
    engine = Engine(old, variant, threads=1, prefill_chunk=4)
    assert not engine.last_logits_only  # the old graph gives every position's logits
    ids = engine.prompt_ids(PROMPT)
    result = engine.generate(prompt=PROMPT, settings=GenerationSettings(max_new_tokens=20, stop_token_ids=[]))
    assert result.token_ids == reference_greedy(reference, ids, 20)


@pytest.mark.parametrize("edit, needle", [
    (lambda cfg: cfg.pop("format_version"), "older exporter"),
    (lambda cfg: cfg.pop("head_dim"), "lacks head_dim"),
    (lambda cfg: cfg.update(format="something-else"), "not 'bitnet-onnx'"),
    (lambda cfg: cfg.update(format_version=99), "newer"),
])
def test_unreadable_folders_fail_with_one_line(tiny, tmp_path, edit, needle):
    bad = tmp_path / "bad"
    shutil.copytree(tiny["dir"], bad)
    cfg = json.loads((bad / folder.CONFIG_NAME).read_text())
    edit(cfg)
    (bad / folder.CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(EngineError, match=needle):
        Engine(str(bad), threads=1)
    p = _cli(str(bad), "--prompt", "w5")
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 1 and len(lines) == 1 and needle in lines[0], p.stderr
    assert "re-export" in lines[0] or "update bitnet-onnx" in lines[0]


def test_not_an_exported_folder_hint_never_names_the_source_as_output(tiny, tmp_path):
    """The hint names a sibling folder, never `--out SOURCE` (following that with --overwrite
    would delete the checkpoint)."""
    ckpt = str(tiny["ckpt"])
    p = _cli(ckpt, "--prompt", "hi")
    assert p.returncode == 1
    line = p.stderr.strip()
    assert f"python -m export {ckpt} --out {ckpt}-onnx" in line, line
    assert f"--out {ckpt} " not in line + " "


# ---- what a plain onnxruntime user sees ----------------------------------------------------

_PLAIN_ORT = """
import sys, numpy as np, onnxruntime as ort
sys.path.insert(0, {root!r})
so = ort.SessionOptions()
if {ternary}:
    import custom_ops
    so.register_custom_ops_library(custom_ops.library_path())
s = ort.InferenceSession({path!r}, so, providers=["CPUExecutionProvider"])
print(sorted(i.name for i in s.get_inputs() if not i.name.startswith("past_key_values")))
print(sorted(i.name for i in s.get_overridable_initializers()))
"""


def _plain_session_stderr(path: str, ternary: bool) -> tuple[str, str]:
    code = _PLAIN_ORT.format(root=ROOT, path=path, ternary=ternary)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return p.stdout, p.stderr


@pytest.mark.parametrize("file", ["model.onnx", "model.int2.onnx"])
def test_plain_onnxruntime_sees_an_optional_num_logits_to_keep(tiny, file):
    """num_logits_to_keep has a default in the graph (an initializer of the same name, 0 = every
    position): onnxruntime lists it among the overridable initializers, not the required
    inputs, and says so once at load (its own warning for any input with a default); nothing
    else is logged."""
    out, err = _plain_session_stderr(os.path.join(tiny["dir"], file), file == "model.onnx")
    required, overridable = out.strip().splitlines()
    assert required == "['attention_mask', 'input_ids']"
    assert overridable == "['num_logits_to_keep']"
    warnings = [line for line in err.splitlines() if "[W:" in line]
    assert len(warnings) == 1 and "Initializer num_logits_to_keep appears in graph inputs" in warnings[0], err


def test_runtime_does_not_import_onnx(tiny):
    code = (f"import sys; sys.path.insert(0, {ROOT!r}); from runtime import Engine, GenerationSettings; "
            f"e = Engine({tiny['dir']!r}, threads=1); "
            "r = e.generate(prompt='w5 w6', settings=GenerationSettings(max_new_tokens=3)); "
            "assert 'onnx' not in sys.modules, 'runtime imported onnx'; print(r.finish_reason)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr


# ---- folder helpers ------------------------------------------------------------------------

def test_folder_helpers(tiny, tmp_path):
    assert folder.VARIANTS == ("ternary", "int2", "int4", "fp32")
    assert [folder.variant_file(v) for v in folder.VARIANTS] == [
        "model.onnx", "model.int2.onnx", "model.int4.onnx", "model.fp32.onnx"]
    assert [folder.needs_custom_ops(v) for v in folder.VARIANTS] == [True, False, False, False]
    with pytest.raises(ValueError, match="int3"):
        folder.variant_file("int3")
    assert folder.is_exported(tiny["dir"]) and not folder.is_exported(tiny["ckpt"])
    cfg = folder.read_config(tiny["dir"])
    assert cfg["variants"] == {"ternary": "model.onnx", "int2": "model.int2.onnx"}
    folder.write_config(tmp_path, dict(cfg, format_version=0, extra="x"))
    again = json.loads((tmp_path / folder.CONFIG_NAME).read_text())
    assert again["format_version"] == folder.FORMAT_VERSION and again["extra"] == "x"
    assert folder.variant_path(tiny["dir"], "int2").endswith("model.int2.onnx")
    with pytest.raises(VariantNotFoundError, match="has: ternary, int2"):
        folder.variant_path(tiny["dir"], "fp32")


def test_open_session_is_what_the_engine_runs(tiny):
    session = open_session(folder.variant_path(tiny["dir"], "ternary"), threads=1, custom_ops=True,
                           config={"session.intra_op.allow_spinning": "0"})
    so = session.get_session_options()
    assert so.intra_op_num_threads == 1 and so.inter_op_num_threads == 1
    assert session_options().intra_op_num_threads == available_threads()
    engine = Engine(tiny["dir"], "int2")
    assert engine.threads == available_threads()
    with pytest.raises(ValueError, match="threads"):
        session_options(threads=0)


def _fake_cgroup(root, v2=None, v1=None):
    if v2 is not None:
        (root / "sys/fs/cgroup").mkdir(parents=True, exist_ok=True)
        (root / "sys/fs/cgroup/cpu.max").write_text(v2)
    if v1 is not None:
        (root / "sys/fs/cgroup/cpu").mkdir(parents=True, exist_ok=True)
        (root / "sys/fs/cgroup/cpu/cpu.cfs_quota_us").write_text(v1[0])
        (root / "sys/fs/cgroup/cpu/cpu.cfs_period_us").write_text(v1[1])
    return str(root)


def test_available_threads_honours_cgroup_quotas(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert available_threads(_fake_cgroup(tmp_path / "none")) == 16
    assert available_threads(_fake_cgroup(tmp_path / "a", v2="200000 100000\n")) == 2
    assert available_threads(_fake_cgroup(tmp_path / "b", v2="150000 100000\n")) == 2  # 1.5 CPUs
    assert available_threads(_fake_cgroup(tmp_path / "c", v2="max 100000\n")) == 16
    assert available_threads(_fake_cgroup(tmp_path / "d", v2="10000 100000\n")) == 1
    assert available_threads(_fake_cgroup(tmp_path / "e", v1=("300000", "100000"))) == 3
    assert available_threads(_fake_cgroup(tmp_path / "f", v1=("-1", "100000"))) == 16
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert available_threads(_fake_cgroup(tmp_path / "g", v2="800000 100000\n")) == 1


def test_ternary_without_the_custom_op_library_says_why_in_one_line(tiny, tmp_path):
    """No compiler (so no library): `python -m runtime` on the ternary variant names the
    cause and the fix in one line; the int2 baseline still runs."""
    env = dict(os.environ, PYTHONPATH=ROOT, BITNET_BUILD_DIR=str(tmp_path / "build"),
               CXX=str(tmp_path / "no-such-g++"))
    run = lambda *a: subprocess.run([sys.executable, "-m", "runtime", tiny["dir"], "--prompt", "w5",  # noqa: E731
                                     "--max-new-tokens", "2", *a], capture_output=True, text=True,
                                    env=env, cwd=ROOT, timeout=120)
    p = run()
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 1 and len(lines) == 1, p.stderr
    assert "ternary" in lines[0] and "no-such-g++" in lines[0] and "--variant int2" in lines[0], lines[0]
    assert run("--variant", "int2").returncode == 0
