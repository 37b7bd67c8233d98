"""The ARM64 kernels (NEON and dot product) against the reference kernel, without ARM hardware:
cross-compiled with Debian's aarch64 compiler and run under qemu-user, once on a CPU model with
the dot-product extension (-cpu max) and once without it (-cpu cortex-a53), so both dispatch
paths run. The driver (tests/arm_kernels_driver.cc) checks BitLinear bit for bit at the 2B4T
shapes, odd K and N, M = 1..9 and 128, MatMulI8 bit for bit, MatMulF16 against a scalar
model of its summation order, and GroupQueryAttention (its portable kernel, NEON by the
compiler) against a float64 model and decode against prefill, bit for bit. CI installs the tools (.ci/run); elsewhere: apt-get install g++-aarch64-linux-gnu qemu-user.
Speed on ARM cannot be measured this way (qemu translates every instruction).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from custom_ops import build

CROSS_CXX = "aarch64-linux-gnu-g++"
QEMU = "qemu-aarch64"
DRIVER = Path(__file__).parent / "arm_kernels_driver.cc"
# Every unit but the ONNX Runtime glue (ops.cc) and its weight memory, which the driver replaces.
KERNEL_UNITS = ["dispatch.cc", "kernels_reference.cc", "kernels_x86_avx2.cc", "kernels_x86_avx512.cc",
                "kernels_arm.cc", "kernels_arm_dotprod.cc", "attention.cc", "attention_x86.cc"]

missing = [tool for tool in (CROSS_CXX, QEMU) if shutil.which(tool) is None]
if missing and os.environ.get("BITNET_REQUIRE_ARM") == "1":  # CI: these tests must run
    raise RuntimeError(f"BITNET_REQUIRE_ARM=1 but {' and '.join(missing)} not installed")
pytestmark = pytest.mark.skipif(
    bool(missing), reason=f"ARM64 kernels not proved here: {' and '.join(missing)} not installed "
                          "(apt-get install g++-aarch64-linux-gnu qemu-user)")


def compile_aarch64(commands):
    for cmd in commands:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stderr[-3000:]}"


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    """The static aarch64 test driver, its kernels compiled with the library's own flags."""
    out = tmp_path_factory.mktemp("arm")
    units = [build.SOURCE_DIR / name for name in KERNEL_UNITS]
    # The library's compile commands for aarch64, with the driver in place of ops.cc and a
    # static executable in place of the shared library: the flags (and the dot-product unit's
    # own -march) are exactly the ones a build on an ARM64 machine uses.
    commands = build.compile_commands(CROSS_CXX, build.SOURCE_DIR, units + [DRIVER], str(out / "driver"), out, "aarch64")
    link = commands[-1]
    link[link.index("-shared")] = "-static"
    link.remove("-fPIC")
    compile_aarch64(commands)
    return out / "driver"


@pytest.mark.parametrize("cpu,dotprod", [("max", 1), ("cortex-a53", 0)], ids=["with-dotprod", "without-dotprod"])
def test_arm_kernels_match_reference_under_qemu(driver, cpu, dotprod):
    result = subprocess.run([QEMU, "-cpu", cpu, str(driver), "--expect-dotprod", str(dotprod)],
                            capture_output=True, text=True, timeout=600)
    lines = result.stdout.splitlines()
    failed = [line for line in lines if not line.startswith("ok")]
    assert result.returncode == 0 and lines and lines[-1] == "PASSED: 0 failure(s)", \
        "\n".join(failed[:20]) + result.stderr[-2000:]
    checked = [line for line in lines if line.startswith("ok   BitLinear")]
    kernels = {"neon", "dotprod"} if dotprod else {"neon"}
    for kernel in kernels:  # every kernel ran at every shape, the 2B4T ones and M = 128 included
        ran = [line for line in checked if f"BitLinear {kernel} ==" in line]
        assert len(ran) >= 60, f"{kernel}: only {len(ran)} BitLinear checks"
        for shape in ("K=2560 N=2560", "K=2560 N=640", "K=2560 N=6912", "K=6912 N=2560", "M=128 K=2560 N=640"):
            assert any(shape in line for line in ran), f"{kernel} not checked at {shape}"
    if not dotprod:
        assert not any("BitLinear dotprod" in line for line in lines)
        assert any("BITNET_KERNEL=dotprod refused" in line for line in lines)
    assert any("MatMulF16 neon == scalar model" in line for line in lines)
    attention = [line for line in lines if "GroupQueryAttention" in line]
    assert len(attention) == 12 and all(line.startswith("ok") for line in attention), "\n".join(attention)


def test_arm_matmul_i8_runs_neon_bit_for_bit_under_qemu(driver):
    """The 8-bit head has an ARM64 kernel (NEON smull/smlal2 + sadalp), equal to the reference
    bit for bit at 2B4T's K, odd K and N, M = 1..9 and 33."""
    result = subprocess.run([QEMU, "-cpu", "cortex-a53", str(driver), "--expect-dotprod", "0"],
                            capture_output=True, text=True, timeout=600)
    checked = [line for line in result.stdout.splitlines() if "MatMulI8" in line]
    assert checked and all(line.startswith("ok") for line in checked), "\n".join(checked)
    assert sum("MatMulI8 neon == reference" in line for line in checked) >= 12
    assert any("K=2560" in line for line in checked) and any("M=33" in line for line in checked)


def test_library_cross_compiles_for_arm64(tmp_path):
    """The whole library (ops.cc and every kernel) builds for ARM64 with the build's own commands
    and exports the entry points ONNX Runtime and custom_ops look up."""
    include = build.include_dir()  # the same headers the x86 build uses (they are architecture-neutral)
    units = sorted(build.SOURCE_DIR.glob("*.cc"))
    library = tmp_path / "libbitnet_ops.so"
    commands = build.compile_commands(CROSS_CXX, include, units, str(library), tmp_path, "aarch64")
    assert any("-march=armv8.2-a+dotprod" in cmd and str(build.SOURCE_DIR / "kernels_arm_dotprod.cc") in cmd
               for cmd in commands[:-1]), "the dot-product unit must be compiled on its own"
    assert "-march=armv8.2-a+dotprod" not in commands[-1]
    compile_aarch64(commands)
    symbols = subprocess.run(["aarch64-linux-gnu-nm", "-D", "--defined-only", str(library)],
                             capture_output=True, text=True).stdout
    for name in ("RegisterCustomOps", "bitnet_resolve_kernel", "bitnet_cpu_features", "bitnet_kernel_table"):
        assert f" T {name}" in symbols


def test_dotprod_unit_exports_only_its_kernel(tmp_path):
    """The unit built for ARMv8.2 + dotprod defines one global symbol and no weak (COMDAT) ones, so
    the linker can never pick an ARMv8.2 copy of a shared inline function for code that runs on
    CPUs without the extension."""
    unit = build.SOURCE_DIR / "kernels_arm_dotprod.cc"
    commands = build.compile_commands(CROSS_CXX, build.SOURCE_DIR, [unit], str(tmp_path / "unused.so"), tmp_path, "aarch64")
    compile_aarch64(commands[:1])
    symbols = subprocess.run(["aarch64-linux-gnu-nm", "-C", "--defined-only", str(tmp_path / "kernels_arm_dotprod.o")],
                             capture_output=True, text=True).stdout.splitlines()
    kinds = {line.split()[1]: [] for line in symbols}
    for line in symbols:
        kinds[line.split()[1]].append(line)
    assert [line.split(" ", 2)[2] for line in kinds.get("T", [])] == \
        ["bitnet::bitlinear_dotprod(bitnet::BitLinearProblem const&, long, long, long, long)"]
    assert not any(kind in kinds for kind in ("W", "V", "u")), symbols
