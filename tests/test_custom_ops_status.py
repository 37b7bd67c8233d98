"""custom_ops.status(): whether the operator can run here, why not and how to fix it, the
kernel the dispatch chose and the CPU model; and `python -m runtime` on the ternary variant
when the operator is unavailable (a missing compiler, simulated with CXX=/nonexistent and a
fresh build folder)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import custom_ops
from custom_ops.operator_status import cpu_from_cpuinfo
from export import export_checkpoint
from tests.checkpoints import write_tiny_checkpoint

ROOT = Path(custom_ops.__file__).resolve().parent.parent
BUILT = str(Path(custom_ops.library_path()).parent)  # the library the other tests use
PRINT_STATUS = "import json, custom_ops; print(json.dumps(custom_ops.status().__dict__))"


def status_in_subprocess(tmp_path, **env_changes) -> dict:
    env = {**os.environ, "BITNET_BUILD_DIR": str(tmp_path / "fresh-build"), **env_changes}
    result = subprocess.run([sys.executable, "-c", PRINT_STATUS], env=env, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr  # status() never raises
    return json.loads(result.stdout.strip().splitlines()[-1])


def one_line(text: str) -> bool:
    return bool(text.strip()) and "\n" not in text


def test_status_when_the_operator_runs():
    st = custom_ops.status()
    assert st.ok and st.reason == "" and st.fix == ""
    assert st.kernel == custom_ops.resolve_kernel("auto") and st.kernel in custom_ops.KERNELS
    assert st.cpu == custom_ops.cpu_model() and one_line(st.cpu)
    assert custom_ops.status() is st  # cached: asked once per process


def test_cpu_model_names_this_cpu():
    cpu = custom_ops.cpu_model()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            assert cpu == names[0]
    assert one_line(cpu)


def test_cpu_model_on_arm64_linux():
    graviton2 = "processor\t: 0\nBogoMIPS\t: 243.75\nFeatures\t: fp asimd asimddp\nCPU implementer\t: 0x41\n" \
                "CPU architecture: 8\nCPU variant\t: 0x3\nCPU part\t: 0xd0c\nCPU revision\t: 1\n"
    assert cpu_from_cpuinfo(graviton2) == "ARM Neoverse N1"
    other = graviton2.replace("0x41", "0xc0")
    assert cpu_from_cpuinfo(other) == "ARM64 CPU (implementer 0xc0, part 0xd0c)"
    assert cpu_from_cpuinfo("model name\t: AMD EPYC 7R13 Processor\n") == "AMD EPYC 7R13 Processor"
    assert cpu_from_cpuinfo("") is None


def test_missing_compiler(tmp_path):
    st = status_in_subprocess(tmp_path, CXX="/nonexistent")
    assert st["ok"] is False and st["kernel"] is None
    assert one_line(st["reason"]) and "/nonexistent" in st["reason"] and "compiler" in st["reason"]
    assert one_line(st["fix"]) and "CXX" in st["fix"]
    assert one_line(st["cpu"])


def test_unusable_build_folder(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    env = dict(os.environ, BITNET_BUILD_DIR=str(blocker / "build"))
    result = subprocess.run([sys.executable, "-c", PRINT_STATUS], env=env, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    st = json.loads(result.stdout.strip().splitlines()[-1])
    assert st["ok"] is False and one_line(st["reason"]) and one_line(st["fix"])


def test_kernel_this_cpu_lacks(tmp_path):
    lacking = [k for k in custom_ops.KERNELS if k not in custom_ops.available_kernels()]
    name = lacking[0] if lacking else "no-such-level"
    st = status_in_subprocess(tmp_path, BITNET_KERNEL=name, BITNET_BUILD_DIR=BUILT)
    assert st["ok"] is False and f"BITNET_KERNEL={name}" in st["reason"] and "BITNET_KERNEL" in st["fix"]
    assert one_line(st["reason"])


def test_forced_kernel_is_reported(tmp_path):
    st = status_in_subprocess(tmp_path, BITNET_KERNEL="reference", BITNET_BUILD_DIR=BUILT)
    assert st["ok"] is True and st["kernel"] == "reference"


@pytest.fixture(scope="module")
def ternary_folder(tmp_path_factory):
    base = tmp_path_factory.mktemp("status")
    ckpt = write_tiny_checkpoint(base / "ckpt", fmt="bitlinear", tied=False, seed=1)
    return export_checkpoint(str(ckpt), str(base / "onnx"), ("ternary",), progress=lambda m: None)


def test_runtime_cli_says_why_and_how_to_fix_in_one_line(tmp_path, ternary_folder):
    env = dict(os.environ, CXX="/nonexistent", BITNET_BUILD_DIR=str(tmp_path / "fresh-build"))
    result = subprocess.run([sys.executable, "-m", "runtime", str(ternary_folder), "--prompt", "w5 w17", "--raw",
                             "--max-new-tokens", "2"], env=env, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 1 and result.stdout == ""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("error:") and "/nonexistent" in line  # why
    assert "CXX" in line and "--variant" in line  # how to fix, and what runs meanwhile


def test_runtime_cli_runs_when_the_operator_is_available(ternary_folder):
    result = subprocess.run([sys.executable, "-m", "runtime", str(ternary_folder), "--prompt", "w5 w17", "--raw",
                             "--max-new-tokens", "2"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
