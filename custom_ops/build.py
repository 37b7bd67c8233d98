"""Builds the bitnet custom-op library: fetch ONNX Runtime's headers, compile with g++.

The headers come from ORT_INCLUDE_DIR when set, else from Debian trixie's `libonnxruntime-dev`
package, downloaded with `apt-get download` into a private apt state under the build folder
and unpacked with `dpkg -x` (no root, no system install). Nothing third-party is vendored.
The library is built for baseline x86-64; its SIMD kernels carry per-function target
attributes and are chosen at load time, so one build runs on any x86-64 CPU.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
SOURCE_DIR = PACKAGE_DIR / "src"
LIBRARY_NAME = "libbitnet_ops.so"
HEADER_PACKAGE = "libonnxruntime-dev"
HEADER_SUITE = "trixie"  # the Debian release whose libonnxruntime-dev has the headers we build with
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"


class BuildError(RuntimeError):
    """The library cannot be built; the message says what is missing."""


def build_dir() -> Path:
    return Path(os.environ.get("BITNET_BUILD_DIR", PACKAGE_DIR / "build"))


def sources() -> list[Path]:
    return sorted(SOURCE_DIR.glob("*.cc")) + sorted(SOURCE_DIR.glob("*.h"))


def _log(message: str) -> None:
    print(f"[custom_ops] {message}", file=sys.stderr, flush=True)


def _is_stale(library: Path) -> bool:
    if not library.exists():
        return True
    built = library.stat().st_mtime
    return any(src.stat().st_mtime > built for src in sources() + [Path(__file__)])


# ---- headers ---------------------------------------------------------------------------------

def _debian_mirror() -> str:
    """The Debian archive URI this machine's apt already uses (so no host is hard-coded)."""
    candidates = []
    for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
        uri = None
        for line in Path(path).read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "URIs":
                uri = value.split()[0] if value.split() else None
            if key.strip() == "Suites" and uri:
                candidates.append((uri, value.split()))
    for path in ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*.list"))]:
        if not os.path.exists(path):
            continue
        for line in Path(path).read_text(errors="replace").splitlines():
            words = line.split("#")[0].split()
            if words and words[0] == "deb":
                words = [w for w in words[1:] if not w.startswith("[")]
                if len(words) >= 2:
                    candidates.append((words[0], [words[1]]))
    for uri, suites in candidates:
        if uri.rstrip("/").endswith("/debian") and not any(s.endswith("-security") for s in suites):
            return uri
    raise BuildError(
        "cannot fetch ONNX Runtime's C/C++ headers: no Debian archive found in /etc/apt sources. "
        "Install onnxruntime's headers and set ORT_INCLUDE_DIR to the folder holding onnxruntime_cxx_api.h."
    )


def _fetch_headers(dest: Path) -> Path:
    for tool in ("apt-get", "dpkg"):
        if shutil.which(tool) is None:
            raise BuildError(
                f"cannot fetch ONNX Runtime's headers: `{tool}` is missing (not a Debian system?). "
                "Set ORT_INCLUDE_DIR to a folder holding onnxruntime_cxx_api.h."
            )
    if not os.path.exists(KEYRING):
        raise BuildError(f"cannot fetch ONNX Runtime's headers: the Debian archive keyring {KEYRING} is missing "
                         "(apt-get install debian-archive-keyring), or set ORT_INCLUDE_DIR.")
    state = dest / "apt"
    for sub in ("lists/partial", "archives/partial"):
        (state / sub).mkdir(parents=True, exist_ok=True)
    sources_list = state / "sources.list"
    sources_list.write_text(f"deb [signed-by={KEYRING}] {_debian_mirror()} {HEADER_SUITE} main\n")
    apt_options = [
        f"-oDir::State={state}", "-oDir::State::status=/dev/null", f"-oDir::Cache={state}",
        f"-oDir::Etc::SourceList={sources_list}", "-oDir::Etc::SourceParts=/dev/null",
        "-oDebug::NoLocking=1", "-oAPT::Sandbox::User=root" if os.geteuid() == 0 else "-oAPT::Sandbox::User=",
        "-qq",
    ]
    _log(f"fetching ONNX Runtime headers: apt-get download {HEADER_PACKAGE} ({HEADER_SUITE})")
    for args in (["update"], ["download", HEADER_PACKAGE]):
        result = subprocess.run(["apt-get", *apt_options, *args], cwd=state, capture_output=True, text=True)
        if result.returncode != 0:
            raise BuildError(f"cannot fetch ONNX Runtime's headers: `apt-get {' '.join(args)}` failed:\n"
                             f"{result.stderr.strip()[-2000:]}\nSet ORT_INCLUDE_DIR to skip the download.")
    debs = sorted(state.glob(f"{HEADER_PACKAGE}_*.deb"))
    if not debs:
        raise BuildError(f"apt-get download {HEADER_PACKAGE} produced no .deb file")
    unpacked = dest / "root"
    subprocess.run(["dpkg", "-x", str(debs[-1]), str(unpacked)], check=True)
    include = unpacked / "usr" / "include" / "onnxruntime"
    if not (include / "onnxruntime_cxx_api.h").exists():
        raise BuildError(f"{debs[-1].name} has no onnxruntime_cxx_api.h")
    return include


def include_dir() -> Path:
    """Folder holding onnxruntime_cxx_api.h: ORT_INCLUDE_DIR, or the fetched Debian headers."""
    env = os.environ.get("ORT_INCLUDE_DIR")
    if env:
        path = Path(env)
        if not (path / "onnxruntime_cxx_api.h").exists():
            raise BuildError(f"ORT_INCLUDE_DIR={env} does not hold onnxruntime_cxx_api.h")
        return path
    headers = build_dir() / "ort-headers"
    include = headers / "root" / "usr" / "include" / "onnxruntime"
    if (include / "onnxruntime_cxx_api.h").exists():
        return include
    return _fetch_headers(headers)


# ---- compile ---------------------------------------------------------------------------------

def compiler() -> str:
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        raise BuildError(f"cannot build the bitnet custom ops: C++ compiler `{cxx}` not found "
                         "(apt-get install g++, or set CXX)")
    return cxx


def compile_library(output: Path) -> None:
    cxx = compiler()
    include = include_dir()
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=LIBRARY_NAME + ".", suffix=".tmp", dir=output.parent)
    os.close(fd)
    units = [str(s) for s in sorted(SOURCE_DIR.glob("*.cc"))]
    cmd = [cxx, "-std=c++17", "-O3", "-fPIC", "-shared", "-fvisibility=hidden", "-fno-math-errno",
           "-ffp-contract=off", "-Wall", "-Wextra", "-Wno-unused-parameter", f"-I{include}", *units, "-o", tmp]
    if platform.machine() in ("x86_64", "AMD64"):
        cmd.insert(1, "-march=x86-64")  # baseline: SIMD kernels opt in per function
    _log(f"compiling {output.name} from {len(units)} sources with {cxx} ...")
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        os.unlink(tmp)
        raise BuildError(f"compiling the bitnet custom ops failed:\n{' '.join(cmd)}\n{result.stderr[-4000:]}")
    os.replace(tmp, output)  # atomic: a concurrent reader sees the old or the new library
    _log(f"built {output}")


@contextlib.contextmanager
def _build_lock(folder: Path):
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time across processes
        yield


def ensure_built(force: bool = False) -> Path:
    """Path of the library, compiling it first when missing, older than its sources, or forced."""
    library = build_dir() / LIBRARY_NAME
    if not force and not _is_stale(library):
        return library
    with _build_lock(build_dir()):
        if force or _is_stale(library):
            compile_library(library)
    return library
