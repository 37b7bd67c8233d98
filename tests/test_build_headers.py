"""Where the build finds ONNX Runtime's headers on each OS, and the header-vs-runtime version
check, on real folder layouts built from the headers this machine's build uses (Homebrew on
macOS, NuGet and vcpkg on Windows, distribution dev packages on Linux)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import onnxruntime as ort
import pytest

import custom_ops
from custom_ops import build, headers
from custom_ops.errors import BuildError

ROOT = Path(custom_ops.__file__).resolve().parent.parent
RUNTIME = ort.__version__
RUNTIME_API = headers.runtime_api_version(RUNTIME)


@pytest.fixture(scope="module")
def real_headers() -> Path:
    return build.include_dir()  # obtained the way the build obtains them (or ORT_INCLUDE_DIR)


def install(real: Path, folder: Path, api: int | None = None) -> Path:
    """Copies the headers into folder, optionally claiming another ORT_API_VERSION."""
    folder.mkdir(parents=True, exist_ok=True)
    for item in real.iterdir():
        if item.is_file():
            shutil.copy(item, folder / item.name)
        else:
            shutil.copytree(item, folder / item.name, dirs_exist_ok=True)
    if api is not None:
        c_api = folder / headers.C_HEADER
        text, n = re.subn(r"(#define\s+ORT_API_VERSION\s+)\d+", rf"\g<1>{api}", c_api.read_text())
        assert n == 1
        c_api.write_text(text)
    return folder


def find(tmp_path, system, env=None, root=None, runtime=RUNTIME):
    return headers.find_include_dir(tmp_path / "cache", system=system, env=env or {}, root=root or tmp_path,
                                    runtime_version=runtime, allow_download=False)


def test_real_headers_are_served_by_the_installed_runtime(real_headers):
    api = headers.header_api_version(real_headers)
    assert 1 <= api <= RUNTIME_API
    assert headers.check_version(real_headers, RUNTIME) == api


@pytest.mark.parametrize("layout", ["opt/homebrew/include/onnxruntime", "usr/local/include/onnxruntime",
                                    "opt/homebrew/opt/onnxruntime/include/onnxruntime/core/session"])
def test_macos_homebrew(tmp_path, real_headers, layout):
    want = install(real_headers, tmp_path / layout)
    assert find(tmp_path, "Darwin") == want


def test_macos_brew_prefix_first(tmp_path, real_headers):
    install(real_headers, tmp_path / "usr/local/include/onnxruntime")
    cellar = install(real_headers, tmp_path / "Cellar/onnxruntime/1.21.0/include/onnxruntime")
    found = headers.candidate_dirs("Darwin", {}, tmp_path, brew_prefix=str(tmp_path / "Cellar/onnxruntime/1.21.0"))
    assert [d for d in found if headers.holds_headers(d)][0] == cellar


def test_windows_nuget_global_packages_newest_first(tmp_path, real_headers):
    api = headers.header_api_version(real_headers)
    packages = tmp_path / "Users/me/.nuget/packages" / headers.NUGET_ID
    install(real_headers, packages / f"1.{api - 1}.0/build/native/include", api=api - 1)
    newest = install(real_headers, packages / f"1.{api}.1/build/native/include")
    assert find(tmp_path, "Windows", env={"USERPROFILE": str(tmp_path / "Users/me")}) == newest


def test_windows_nuget_skips_headers_newer_than_the_runtime(tmp_path, real_headers):
    packages = tmp_path / "nuget" / headers.NUGET_ID
    install(real_headers, packages / f"1.{RUNTIME_API + 1}.0/build/native/include", api=RUNTIME_API + 1)
    served = install(real_headers, packages / f"1.{RUNTIME_API}.0/build/native/include", api=RUNTIME_API)
    assert find(tmp_path, "Windows", env={"NUGET_PACKAGES": str(tmp_path / "nuget")}) == served


def test_windows_solution_packages_folder(tmp_path, real_headers):
    want = install(real_headers, tmp_path / "packages/Microsoft.ML.OnnxRuntime.1.21.0/build/native/include")
    found = headers.candidate_dirs("Windows", {}, tmp_path, search_dirs=[tmp_path])
    assert want in found and headers.holds_headers(want)


@pytest.mark.parametrize("layout", ["installed/x64-windows/include", "installed/arm64-windows/include/onnxruntime"])
def test_windows_vcpkg(tmp_path, real_headers, layout):
    want = install(real_headers, tmp_path / "vcpkg" / layout)
    assert find(tmp_path, "Windows", env={"VCPKG_ROOT": str(tmp_path / "vcpkg")}) == want


@pytest.mark.parametrize("layout", ["usr/include/onnxruntime", "usr/local/include/onnxruntime",
                                    "usr/include/onnxruntime/core/session"])
def test_linux_distribution_packages(tmp_path, real_headers, layout):
    want = install(real_headers, tmp_path / layout)
    assert find(tmp_path, "Linux") == want


def test_ort_include_dir_comes_first(tmp_path, real_headers):
    install(real_headers, tmp_path / "usr/include/onnxruntime")
    explicit = install(real_headers, tmp_path / "mine")
    assert find(tmp_path, "Linux", env={"ORT_INCLUDE_DIR": str(explicit)}) == explicit


def test_nothing_found_says_how_to_install_per_os(tmp_path):
    for system, needle in [("Darwin", "brew install onnxruntime"), ("Windows", "Microsoft.ML.OnnxRuntime"),
                           ("Linux", "development package")]:
        with pytest.raises(BuildError) as e:
            find(tmp_path, system)
        assert "cannot find ONNX Runtime's C/C++ headers" in str(e.value)
        assert needle in e.value.fix and "ORT_INCLUDE_DIR" in e.value.fix


def test_headers_newer_than_the_runtime_are_refused(tmp_path, real_headers):
    too_new = install(real_headers, tmp_path / "usr/include/onnxruntime", api=RUNTIME_API + 1)
    with pytest.raises(BuildError) as e:
        find(tmp_path, "Linux")
    message = str(e.value)
    assert "\n" not in message and str(too_new) in message
    assert f"API version {RUNTIME_API + 1}" in message and RUNTIME in message
    assert f"onnxruntime>=1.{RUNTIME_API + 1}" in e.value.fix
    # an older runtime than the headers, the other way round
    older = install(real_headers, tmp_path / "older", api=21)
    with pytest.raises(BuildError, match="newer than the installed onnxruntime 1.20.1"):
        headers.check_version(older, "1.20.1")
    assert headers.check_version(older, "1.21.0") == 21
    assert headers.check_version(older, "1.22.0") == 21


def test_header_without_api_version_is_named(tmp_path, real_headers):
    folder = install(real_headers, tmp_path / "broken")
    (folder / headers.C_HEADER).write_text("// not the real header\n")
    with pytest.raises(BuildError, match="does not define ORT_API_VERSION"):
        headers.header_api_version(folder)


def test_build_command_refuses_too_new_headers_in_one_line(tmp_path, real_headers):
    too_new = install(real_headers, tmp_path / "new", api=RUNTIME_API + 1)
    env = dict(os.environ, ORT_INCLUDE_DIR=str(too_new), BITNET_BUILD_DIR=str(tmp_path / "build"))
    result = subprocess.run([sys.executable, "-m", "custom_ops", "build"], env=env, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "newer than the installed onnxruntime" in errors[0]
    assert not (tmp_path / "build" / build.LIBRARY_NAME).exists()


def test_compile_commands_per_compiler_family(tmp_path):
    units = sorted(build.SOURCE_DIR.glob("*.cc"))
    gnu = build.compile_commands("clang++", Path("/inc"), units, "libbitnet_ops.dylib", tmp_path, "arm64")
    # Units with flags of their own compile alone: attention.cc (FMA contraction allowed: it
    # promises closeness, not bits) and, on ARM, the dot-product kernels; then the link.
    assert len(gnu) == 3 and all("-c" in cmd for cmd in gnu[:2])
    assert "-ffp-contract=fast" in gnu[0] and gnu[0][-3].endswith("attention.cc")
    assert "-march=armv8.2-a+dotprod" in gnu[1]
    assert "-shared" in gnu[2] and gnu[2][-2:] == ["-o", "libbitnet_ops.dylib"] and str(tmp_path / "kernels_arm_dotprod.o") in gnu[2]
    x86 = build.compile_commands("g++", Path("/inc"), units, "lib.so", tmp_path, "x86_64")
    assert len(x86) == 2 and "-ffp-contract=fast" in x86[0] and str(tmp_path / "attention.o") in x86[1]
    assert "-march=x86-64" in x86[1] and "-ffp-contract=off" in x86[1] and "-ffp-contract=fast" not in x86[1]
    cl = build.compile_commands("cl.exe", Path("C:/ort/include"), units, "bitnet_ops.dll", tmp_path, "AMD64")
    assert len(cl) == 2 and "/LD" in cl[1] and "/Febitnet_ops.dll" in cl[1] and "/IC:/ort/include" in cl[1]
    assert not any(a.startswith("-") for cmd in cl for a in cmd[1:])  # no GNU-style flags for cl
    clang_cl = build.compile_commands("clang-cl", Path("C:/inc"), units, "bitnet_ops.dll", tmp_path, "ARM64")
    assert "/clang:-march=armv8.2-a+dotprod" in clang_cl[1] and "/c" in clang_cl[1]
    assert "/clang:-ffp-contract=off" in clang_cl[2]
    assert build.LIBRARY_NAMES == {"Linux": "libbitnet_ops.so", "Darwin": "libbitnet_ops.dylib", "Windows": "bitnet_ops.dll"}


@pytest.mark.skipif(shutil.which("clang++") is None, reason="clang++ not installed (the macOS compiler family)")
def test_library_builds_with_clang(tmp_path, real_headers):
    """clang++ (what macOS builds with) compiles the x86 SIMD kernels' target attributes."""
    units = sorted(build.SOURCE_DIR.glob("*.cc"))
    library = tmp_path / "libbitnet_ops.so"
    for cmd in build.compile_commands("clang++", real_headers, units, str(library), tmp_path):
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
    assert library.stat().st_size > 0
