"""Builds the bitnet custom-op library: find ONNX Runtime's headers, compile.

Headers: custom_ops/headers.py (ORT_INCLUDE_DIR, Homebrew, NuGet/vcpkg, a distribution's dev
package, else Debian's libonnxruntime-dev fetched with apt-get; checked against the installed
onnxruntime). Compilers: g++ or clang++ (Linux, macOS: a .so / .dylib), MSVC's cl or clang-cl
(Windows: a .dll); CXX overrides. Nothing third-party is vendored.
On x86-64 the library is built for baseline x86-64; its SIMD kernels carry per-function target
attributes and are chosen at load time, so one build runs on any x86-64 CPU. On ARM64 the
dot-product kernel's unit alone is compiled for ARMv8.2 + dotprod and chosen from HWCAP.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

from .errors import BuildError, log
from .headers import find_include_dir

PACKAGE_DIR = Path(__file__).resolve().parent
SOURCE_DIR = PACKAGE_DIR / "src"
LIBRARY_NAMES = {"Linux": "libbitnet_ops.so", "Darwin": "libbitnet_ops.dylib", "Windows": "bitnet_ops.dll"}
LIBRARY_NAME = LIBRARY_NAMES.get(platform.system(), "libbitnet_ops.so")
# Units that need more than the baseline, per CPU architecture (GCC 12 refuses the dot-product
# intrinsics under a per-function target attribute, so that kernel gets a unit of its own).
UNIT_FLAGS = {"kernels_arm_dotprod.cc": {"arm64": ["-march=armv8.2-a+dotprod"]},
              # Attention promises closeness, not bits: let its clones use FMA where they have it.
              "attention.cc": {"x86_64": ["-ffp-contract=fast"], "arm64": ["-ffp-contract=fast"]}}

__all__ = ["BuildError", "build_dir", "include_dir", "compiler", "compile_commands", "ensure_built", "LIBRARY_NAME"]


def build_dir() -> Path:
    return Path(os.environ.get("BITNET_BUILD_DIR", PACKAGE_DIR / "build"))


def sources() -> list[Path]:
    return sorted(SOURCE_DIR.glob("*.cc")) + sorted(SOURCE_DIR.glob("*.h"))


def _is_stale(library: Path) -> bool:
    if not library.exists():
        return True
    built = library.stat().st_mtime
    return any(src.stat().st_mtime > built for src in sources() + [Path(__file__)])


def include_dir() -> Path:
    """Folder holding onnxruntime_cxx_api.h, no newer than the installed onnxruntime."""
    return find_include_dir(build_dir() / "ort-headers")


# ---- compile ---------------------------------------------------------------------------------

def _arch(machine: str) -> str:
    machine = machine.lower()
    if machine in ("x86_64", "amd64", "x64"):
        return "x86_64"
    if machine in ("aarch64", "arm64"):
        return "arm64"
    return machine


def default_compiler(system: str) -> str:
    if system == "Darwin":
        return "clang++"  # Xcode's command line tools
    if system == "Windows":
        # clang-cl compiles the SIMD kernels; cl keeps the reference kernels (src/compiler.h)
        return "clang-cl" if shutil.which("clang-cl") else "cl"
    return "g++"


def compiler() -> str:
    cxx = os.environ.get("CXX") or default_compiler(platform.system())
    if shutil.which(cxx) is None:
        raise BuildError(f"cannot build the bitnet custom ops: C++ compiler `{cxx}` not found",
                         fix="install a C++ compiler (Debian/Ubuntu: apt-get install g++; macOS: "
                             "xcode-select --install; Windows: Visual Studio Build Tools, from a developer prompt) "
                             "or point CXX at one")
    return cxx


def _msvc_style(cxx: str) -> bool:
    return Path(cxx).name.lower() in ("cl", "cl.exe", "clang-cl", "clang-cl.exe")


def compile_commands(cxx: str, include: Path, units: list[Path], output: str, objects: Path,
                     machine: str | None = None) -> list[list[str]]:
    """The commands that build the library: one per unit with flags of its own (an object in
    `objects`), then one that compiles the rest and links everything into `output`."""
    arch = _arch(machine or platform.machine())
    special = [u for u in units if arch in UNIT_FLAGS.get(u.name, {})]
    plain = [str(u) for u in units if u not in special]
    commands = []
    if _msvc_style(cxx):
        # cl / clang-cl: /LD builds a DLL; exports come from BITNET_EXPORT (__declspec(dllexport)).
        # cl has no per-function target attributes: its x86 build keeps the reference kernels
        # (src/compiler.h); clang-cl compiles the SIMD kernels like clang.
        clang_cl = "clang" in Path(cxx).name.lower()
        base = [cxx, "/nologo", "/std:c++17", "/O2", "/EHsc", "/MD", "/W3", f"/I{include}"]
        base += ["/clang:-ffp-contract=off"] if clang_cl else ["/fp:precise"]  # no FMA contraction either way
        objs = []
        for unit in special:
            obj = objects / (unit.stem + ".obj")
            flags = [f"/clang:{f}" for f in UNIT_FLAGS[unit.name][arch]] if clang_cl else []
            commands.append([*base, *flags, "/c", str(unit), f"/Fo{obj}"])
            objs.append(str(obj))
        commands.append([*base, "/LD", *plain, *objs, f"/Fo{objects}{os.sep}", f"/Fe{output}"])
        return commands
    cmd = [cxx, "-std=c++17", "-O3", "-fPIC", "-shared", "-fvisibility=hidden", "-fno-math-errno",
           "-ffp-contract=off", "-Wall", "-Wextra", "-Wno-unused-parameter", f"-I{include}", *plain, "-o", output]
    if arch == "x86_64":
        cmd.insert(1, "-march=x86-64")  # baseline: SIMD kernels opt in per function
    base = [a for a in cmd if a not in ("-shared", "-o", output) and a not in plain]
    for unit in special:
        obj = objects / (unit.stem + ".o")
        commands.append([*base, *UNIT_FLAGS[unit.name][arch], "-c", str(unit), "-o", str(obj)])
        cmd.insert(cmd.index("-o"), str(obj))
    commands.append(cmd)
    return commands


def compile_library(output: Path) -> None:
    cxx = compiler()
    include = include_dir()
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=LIBRARY_NAME + ".", suffix=".tmp", dir=output.parent)
    os.close(fd)
    units = sorted(SOURCE_DIR.glob("*.cc"))
    log(f"compiling {output.name} from {len(units)} sources with {cxx} ...")
    with tempfile.TemporaryDirectory(prefix="objects.", dir=output.parent) as objects:
        for cmd in compile_commands(cxx, include, units, tmp, Path(objects)):
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode != 0:
                os.unlink(tmp)
                raise BuildError(f"compiling the bitnet custom ops failed:\n{' '.join(cmd)}\n"
                                 f"{(result.stderr or result.stdout)[-4000:]}",
                                 fix=f"see the compiler's message above; CXX={cxx} must be a C++17 compiler")
    os.replace(tmp, output)  # atomic: a concurrent reader sees the old or the new library
    log(f"built {output}")


@contextlib.contextmanager
def _build_lock(folder: Path):
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a+") as lock:  # one build at a time across processes
        try:
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)
        except ImportError:  # Windows
            import msvcrt

            lock.seek(0)
            while True:
                try:
                    msvcrt.locking(lock.fileno(), msvcrt.LK_LOCK, 1)
                    break
                except OSError:  # LK_LOCK gives up after 10 s: keep waiting
                    continue
        yield


_adopted: Path | None = None  # a ready library used instead of a build (custom_ops/prebuilt.py)


def adopt(library) -> None:
    """Use `library` (checked by custom_ops.prebuilt.probe) instead of building one here."""
    global _adopted
    _adopted = Path(library)


def ensure_built(force: bool = False) -> Path:
    """Path of the library, compiling it first when missing, older than its sources, or forced
    (an adopted library is returned as it is, unless forced)."""
    if _adopted is not None and not force:
        return _adopted
    library = build_dir() / LIBRARY_NAME
    if not force and not _is_stale(library):
        return library
    with _build_lock(build_dir()):
        if force or _is_stale(library):
            compile_library(library)
    return library
